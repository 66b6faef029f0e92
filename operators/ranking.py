"""Rankings of a block of queries as arrays, the one currency between search and re-ranking stages.

Row ``j`` belongs to query ``qids[j]``; ``ids[j]`` lists database ids best first and ``scores[j]``
their scores. Short rankings are padded with id −1 and score −inf at the end, so every stage works
on whole (m, k) arrays instead of walking queries one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD_ID = -1


@dataclass
class Ranking:
    qids: np.ndarray  # (m,) int64
    ids: np.ndarray  # (m, k) int64, padded with −1
    scores: np.ndarray  # (m, k) float32, padded with −inf

    def __post_init__(self) -> None:
        self.qids = np.asarray(self.qids, np.int64)
        self.ids = np.asarray(self.ids, np.int64).reshape(len(self.qids), -1)
        self.scores = np.array(self.scores, np.float32).reshape(len(self.qids), -1)  # a copy: padding is written
        self.scores[self.ids < 0] = -np.inf

    @classmethod
    def empty(cls, qids: np.ndarray, k: int = 0) -> "Ranking":
        m = len(qids)
        return cls(qids, np.full((m, k), PAD_ID, np.int64), np.full((m, k), -np.inf, np.float32))

    @property
    def depth(self) -> int:
        return self.ids.shape[1]

    def top(self, k: int) -> "Ranking":
        """The first ``k`` columns (padded when shallower)."""
        if k <= self.depth:
            return Ranking(self.qids, self.ids[:, :k], self.scores[:, :k])
        pad = ((0, 0), (0, k - self.depth))
        return Ranking(
            self.qids, np.pad(self.ids, pad, constant_values=PAD_ID), np.pad(self.scores, pad, constant_values=-np.inf)
        )

    def align(self, qids: np.ndarray) -> "Ranking":
        """Rows for ``qids`` in that order; a query this ranking does not hold gets an empty row."""
        qids = np.asarray(qids, np.int64)
        order = np.argsort(self.qids, kind="stable")
        pos = np.clip(np.searchsorted(self.qids[order], qids), 0, max(len(order) - 1, 0))
        hit = (self.qids[order][pos] == qids) if len(order) else np.zeros(len(qids), bool)
        out = Ranking.empty(qids, self.depth)
        out.ids[hit], out.scores[hit] = self.ids[order[pos[hit]]], self.scores[order[pos[hit]]]
        return out

    @classmethod
    def concat(cls, parts: list["Ranking"]) -> "Ranking":
        """Rows of every part, one after the other (parts padded to the deepest)."""
        if not parts:
            return cls.empty(np.zeros(0, np.int64))
        k = max(p.depth for p in parts)
        parts = [p.top(k) for p in parts]
        return cls(
            np.concatenate([p.qids for p in parts]),
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.scores for p in parts]),
        )

    def lists(self) -> tuple[list[list[int]], list[list[float]]]:
        """Per query, its ids and scores with the padding removed."""
        keep = (self.ids >= 0) & np.isfinite(self.scores)
        return ([r[m].tolist() for r, m in zip(self.ids, keep)], [r[m].tolist() for r, m in zip(self.scores, keep)])
