"""Retrieval metrics: AP, mAP, mP@k, and the revisited Oxford/Paris Easy/Medium/Hard protocols.

AP follows the revisitop ``compute_ap`` [ext] (representation spec §8): ignored ("junk") images are
removed from the ranking, then with the 0-based ranks r_j of the n positives (j = 0…n−1),
    AP = Σ_j (1/n) · (P0 + P1)/2,  P0 = j / r_j (1 when r_j = 0),  P1 = (j+1)/(r_j+1)
(trapezoid rule). mP@k uses k' = min(k, rank of the last positive + 1) as revisitop does.
Revisited setups (Revisiting Oxford & Paris, seed 002 L27744-27752): Easy: positives E, ignore H∪U;
Medium: positives E∪H, ignore U; Hard: positives H, ignore E∪U. ``junk`` in the gnd files holds U.
A query with no positives in a setup is left out of that setup's mean.
"""

from __future__ import annotations

import numpy as np


def positive_ranks(ranking: np.ndarray, positives: np.ndarray, ignore: np.ndarray) -> tuple[np.ndarray, int]:
    """0-based ranks of the positives found in ``ranking`` after removing ignored ids, and n_pos.

    Positives absent from the (truncated) ranking count as never retrieved.
    """
    ranking = np.asarray(ranking)
    keep = ~np.isin(ranking, ignore)
    kept = ranking[keep]
    ranks = np.flatnonzero(np.isin(kept, positives))
    return ranks, len(np.unique(positives))


def average_precision(ranks: np.ndarray, n_pos: int) -> float:
    """Trapezoidal AP from sorted 0-based positive ranks (see module doc)."""
    if n_pos == 0:
        return float("nan")
    j = np.arange(len(ranks), dtype=np.float64)
    r = np.asarray(ranks, np.float64)
    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    p1 = (j + 1) / (r + 1)
    return float(np.sum((p0 + p1) / 2.0) / n_pos)


def precision_at(ranks: np.ndarray, ks: tuple[int, ...]) -> np.ndarray:
    """revisitop's precision at k: k' = min(k, last positive rank + 1), P = |{r < k'}| / k'."""
    out = np.zeros(len(ks))
    if len(ranks) == 0:
        return out
    for i, k in enumerate(ks):
        kk = min(k, int(ranks.max()) + 1)
        out[i] = np.sum(ranks < kk) / kk
    return out


def evaluate(
    rankings: list[np.ndarray], positives: list[np.ndarray], ignore: list[np.ndarray], ks: tuple[int, ...] = (1, 5, 10)
) -> dict:
    """mAP and mP@k over queries with at least one positive; per-query APs in ``ap``."""
    aps, prs = [], []
    for ranking, pos, ign in zip(rankings, positives, ignore):
        pos = np.asarray(pos)
        if len(pos) == 0:
            aps.append(float("nan"))
            continue
        ranks, n_pos = positive_ranks(ranking, pos, np.asarray(ign))
        aps.append(average_precision(ranks, n_pos))
        prs.append(precision_at(ranks, ks))
    valid = [a for a in aps if not np.isnan(a)]
    pr = np.mean(prs, axis=0) if prs else np.zeros(len(ks))
    return {
        "mAP": float(np.mean(valid)) if valid else float("nan"),
        "queries": len(valid),
        **{f"mP@{k}": float(v) for k, v in zip(ks, pr)},
        "ap": aps,
    }


def revisited_setups(gnd: list[dict]) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Positives and ignored ids per query for the easy / medium / hard setups."""

    def arr(g, *keys):
        return np.concatenate([np.asarray(g.get(k, []), dtype=np.int64).ravel() for k in keys])

    return {
        "easy": ([arr(g, "easy") for g in gnd], [arr(g, "junk", "hard") for g in gnd]),
        "medium": ([arr(g, "easy", "hard") for g in gnd], [arr(g, "junk") for g in gnd]),
        "hard": ([arr(g, "hard") for g in gnd], [arr(g, "junk", "easy") for g in gnd]),
    }
