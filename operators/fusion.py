"""Late fusion of the ASMK score with the global-descriptor similarity, over the union of both shortlists.

For query q and candidate image i (row j of the candidate matrix):

- ``score`` fusion:  s(q, i) = a(q, i) / max_j a(q, j)  +  β · g⁺(q, i)³ / max_j g⁺(q, j)³,
  with a the ASMK score (0 outside the ASMK shortlist) and g⁺ = max(0, cosine similarity of the
  global descriptors) raised to 3, the monomial kernel of the diffusion papers (search spec §1);
  each term is normalised per query so that β is comparable across queries.
- ``rank`` fusion (reciprocal rank fusion [ext: Cormack et al. 2009]):
  s(q, i) = 1 / (k₀ + r_a(q, i))  +  β / (k₀ + r_g(q, i)),
  with r the 1-based rank of i in each method's ranking (an item outside the ASMK shortlist has no
  ASMK term); scores do not enter, only orders, so a method whose scores are peaked on wrong items
  cannot outweigh the other.

The default, rank fusion with β = 1.5, was chosen by leave-one-group-out cross-validation
(``benchmarks/fusion_cv.py``): β is tuned on the queries of every other group and judged on the
held-out group's, never on the figures it is judged by. On instance-mini (whole and 40%-crop
queries pooled) it scored 96.17 cross-validated mAP against 95.86 for score fusion, ASMK* alone
92.51 and global alone 95.37; on crops no group fell more than 3 points below its better
component, where score fusion at the old β = 0.5 lost 5.9 on one (README "Fusion").
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from operators.ranking import Ranking

Mode = Literal["score", "rank"]
RRF_K0 = 60.0  # reciprocal rank fusion's constant [ext]


def fuse(
    cand_ids: np.ndarray,
    asmk: np.ndarray,
    cand_global: np.ndarray,
    beta: float = 1.5,
    k: int = 100,
    mode: Mode = "rank",
) -> tuple[np.ndarray, np.ndarray]:
    """Fused top-``k`` of m queries.

    ``cand_ids`` (m, c): each query's candidates (−1: padding); ``asmk`` (m, c): their ASMK scores
    (−inf outside the ASMK shortlist); ``cand_global`` (m, c): their global cosine similarities.
    Returns ids and scores (m, k), best first (ties: smaller id), padded with (−1, −inf).
    """
    valid = cand_ids >= 0
    in_asmk = valid & np.isfinite(asmk)
    g = np.where(valid, cand_global, -np.inf)
    if mode == "score":
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
