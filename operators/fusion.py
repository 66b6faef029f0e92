"""Late fusion of the ASMK score with the global-descriptor similarity, over the union of both shortlists.

For query q and candidate image i (row j of the candidate matrix):

- ``score`` fusion:  s(q, i) = a(q, i) / max_j a(q, j)  +  β · g⁺(q, i)³ / max_j g⁺(q, j)³,
  with a the ASMK score (0 outside the ASMK shortlist) and g⁺ = max(0, cosine similarity of the
  global descriptors) raised to 3, the monomial kernel of the diffusion papers (search spec §1);
  each term is normalised per query so that β is comparable across queries.
- ``z`` fusion (z-score normalisation of each channel against its own null level [ext: Montague & Aslam,
  "Relevance score normalization for metasearch", CIKM 2001]):
  s(q, i) = max(0, (a(q, i) − μ_a(q)) / σ_a(q))  +  β · max(0, (g(q, i) − μ_g(q)) / σ_g(q)),
  μ_c(q), σ_c(q) the mean and standard deviation of channel c's scores at ranks ≥ t of its own shortlist
  (:func:`null_level`: the images unrelated to q). The weight of a channel is per query and needs no label: a
  channel whose best candidates barely rise above its unrelated images (global descriptors among a million
  look-alike distractors, a tiny crop's few local features) adds little; one whose matches stand many σ
  above adds much.
- ``rank`` fusion (reciprocal rank fusion [ext: Cormack et al. 2009]):
  s(q, i) = 1 / (k₀ + r_a(q, i))  +  β / (k₀ + r_g(q, i)),
  with r the 1-based rank of i in each method's ranking (an item outside the ASMK shortlist has no
  ASMK term); scores do not enter, only orders, so a method whose scores are peaked on wrong items
  cannot outweigh the other.

The default, z fusion with β = 2 (``NULL_START`` = 0.05), stays above the better of its two channels at every
database size measured but one (0.22 below global, whole images, among 2,000 mosaic distractors; above both at 1M:
docs/results.md), because its weights follow each query's score distributions rather than one constant:
rank fusion with β = 1.5 (chosen by leave-one-group-out cross-validation on instance-mini's 186 images,
``benchmarks/fusion_cv.py``) fell 1.6 / 2.7 points below ASMK* alone among 10k distractors (whole / crops) and
11.9 on crops at 1M, where the global channel's positives drown among look-alike distractors. β was chosen by the
same cross-validation on instance-mini and never re-tuned at scale (docs/results.md "Fusion").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from operators.ranking import Ranking

Mode = Literal["z", "score", "rank"]
RRF_K0 = 60.0  # reciprocal rank fusion's constant [ext]
NULL_START = 0.05  # z fusion: a shortlist's ranks from this fraction on are its channel's null (unrelated) level
SD_FLOOR = 1e-6  # z fusion: a null level's spread is at least this (a shortlist of equal scores)


def fuse(
    cand_ids: np.ndarray,
    asmk: np.ndarray,
    cand_global: np.ndarray,
    beta: float = 1.5,
    k: int = 100,
    mode: Mode = "rank",
    null: tuple[NullLevel, NullLevel] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fused top-``k`` of m queries.

    ``cand_ids`` (m, c): each query's candidates (−1: padding); ``asmk`` (m, c): their ASMK scores
    (−inf outside the ASMK shortlist); ``cand_global`` (m, c): their global cosine similarities;
    ``null``: the ASMK and global null levels (:func:`null_level` of each shortlist; ``z`` mode only).
    Returns ids and scores (m, k), best first (ties: smaller id), padded with (−1, −inf).
    """
    valid = cand_ids >= 0
    in_asmk = valid & np.isfinite(asmk)
    g = np.where(valid, cand_global, -np.inf)
    if mode == "z":
        if null is None:
            raise ValueError("z fusion needs both channels' null levels (null_level of each shortlist)")
        a = np.where(in_asmk, asmk, 0.0)  # outside its shortlist: ASMK's floor, no shared evidence
        s = null[0].z(a) + beta * null[1].z(np.where(valid, cand_global, 0.0))
    elif mode == "score":
        a = np.where(in_asmk, np.maximum(asmk, 0.0), 0.0)
        g3 = np.maximum(np.where(valid, g, 0.0), 0.0) ** 3
        s = _max_normalised(a) + beta * _max_normalised(g3)
    else:
        s = np.where(in_asmk, 1.0 / (RRF_K0 + _ranks(np.where(in_asmk, asmk, -np.inf))), 0.0)
        s = s + beta / (RRF_K0 + _ranks(g))
    s = np.where(valid, s, -np.inf)
    order = np.lexsort((np.where(valid, cand_ids, np.iinfo(np.int64).max), -s), axis=1)[:, :k]
    ids, scores = np.take_along_axis(cand_ids, order, 1), np.take_along_axis(s, order, 1)
    return np.where(np.isfinite(scores), ids, -1), scores


@dataclass(frozen=True)
class NullLevel:
    """One channel's per-query null level: mean ``mu`` and spread ``sd`` (m,) of its scores on unrelated images."""

    mu: np.ndarray
    sd: np.ndarray

    def z(self, scores: np.ndarray) -> np.ndarray:
        """max(0, (s − μ_q) / σ_q): how far above its channel's unrelated images a candidate stands (m, c)."""
        return np.maximum((scores - self.mu[:, None]) / self.sd[:, None], 0.0)


def null_level(scores: np.ndarray, n_database: int, absent: float | None = None) -> NullLevel:
    """The null level of a channel from its own shortlists ``scores`` (m, L), sorted best first.

    A query's related images are few and at the top; the shortlist's ranks from t = ⌈NULL_START · min(L, n)⌉
    on are, for nearly every query, unrelated images: μ_q and σ_q are the mean and standard deviation of
    those scores (padding, −inf, counts as ``absent`` when given, else is left out; σ ≥ SD_FLOOR).
    """
    width = min(scores.shape[1], n_database)
    tail = scores[:, int(np.ceil(NULL_START * width)) : width].astype(np.float64)
    if absent is not None:
        tail = np.where(np.isfinite(tail), tail, absent)
    known = np.isfinite(tail)
    count = np.maximum(known.sum(1), 1)
    mu = np.where(known, tail, 0.0).sum(1) / count
    var = np.where(known, (tail - mu[:, None]) ** 2, 0.0).sum(1) / count
    return NullLevel(mu, np.maximum(np.sqrt(var), SD_FLOOR))


def union_candidates(a: Ranking, g: Ranking) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, the union of two rankings' ids: (ids, ASMK score or −inf, global score or NaN), (m, ka + kg).

    Each id appears once (padding −1); an id of both keeps ``a``'s score and takes ``g``'s similarity.
    """
    ids = np.concatenate([a.ids, g.ids], 1)
    asmk = np.concatenate([a.scores, np.full(g.scores.shape, -np.inf, np.float32)], 1).astype(np.float64)
    glob = np.concatenate([np.full(a.scores.shape, np.nan), g.scores], 1).astype(np.float64)
    order = np.argsort(ids, axis=1, kind="stable")  # an id of both: a's entry first, g's next to it
    ids, asmk, glob = (np.take_along_axis(x, order, 1) for x in (ids, asmk, glob))
    dup = np.zeros(ids.shape, bool)
    dup[:, 1:] = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)
    first = np.roll(dup, -1, axis=1)  # the a-entry of a duplicated id
    glob[first] = glob[dup]
    ids[dup] = -1
    return ids, asmk, glob


def _max_normalised(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True) if x.shape[1] else np.zeros((len(x), 1))
    return np.divide(x, top, out=np.zeros_like(x, dtype=np.float64), where=top > 0)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each entry within its row by decreasing score (−inf ranks last)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, scores.shape[1] + 1)[None, :].repeat(len(scores), 0), 1)
    return ranks.astype(np.float64)
