"""Mining on manifolds: unsupervised training pairs from the kNN graph (spec search §10,
T:24834-25677; reference gtolias/mom ``mat/mom_1M.m``).

- Anchors: the modes (local maxima over graph neighbours) of the random walk's stationary
  distribution π on the largest connected component, the N_a with the largest π (T:25257-25276).
- Manifold similarity of y_j to anchor r: f_r(j), f_r = (1 − α)(I − αS)⁻¹ e_r by CG (T:25151-25186);
  many anchors are solved at once as columns of one multi-right-hand-side system.
- Positives P⁺(r) = NN^m_{k_p}(r) \\ NN^e_{k_p}(r), ordered by manifold similarity (T:25209-25226):
  far in Euclidean terms, near on the manifold.
- Negatives P⁻(r) = NN^e_{k_n}(r) \\ NN^m_{k_n}(r), ordered by Euclidean similarity (T:25238-25255):
  near in Euclidean terms, not on the anchor's manifold. Pools capped at 50 per anchor (T:25482-25487).

NN^m only holds items the diffusion reaches (f > 0). The defaults are the paper's retrieval settings
(k_p = 50, k_n = 10,000, N_a = 1,500 of 1M images); :func:`effective_sizes` scales N_a and the
neighbourhoods down for small collections (documented there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from operators.constraints import Count, OpenUnit, Tolerance


@dataclass
class MiningParams:
    anchors: Count = 1500         # N_a (retrieval: 1,500 of 1M images, mom_1M.m)
    k_pos: Count = 50             # k_p: manifold / Euclidean neighbourhood for positives (T:25482)
    k_neg: Count = 10000          # k_n: Euclidean / manifold neighbourhood for negatives (retrieval)
    cap: Count = 50               # pool size per anchor (T:25482-25487)
    alpha: OpenUnit = 0.99         # diffusion α (T:25472-25481)
    tol: Tolerance = 1e-10          # CG relative residual  [ext: mom posmine.m/negmine.m, dfs(L, e, 1e-10, 20)]
    maxiter: Count = 20           # CG iterations: the reference stops at 20 (ranks, not values, are used)


def effective_sizes(p: MiningParams, n: int) -> tuple[int, int, int]:
    """(N_a, k_p, k_n) for a graph of ``n`` nodes: the paper's sizes scaled by n / 1M where they
    would cover most of a small collection — N_a ≥ 1 and at most 1,500 · n / 1M rounded up to 16;
    k_p and k_n at most n / 4, so that a neighbourhood never holds most of the collection."""
    anchors = min(p.anchors, max(16, int(np.ceil(p.anchors * n / 1_000_000))))
    cap = max(1, n // 4)
    return anchors, min(p.k_pos, cap), min(p.k_neg, cap)


def pools(manifold_ids: np.ndarray, manifold_scores: np.ndarray, euclid_ids: np.ndarray, euclid_scores: np.ndarray,
          k_pos: int, k_neg: int, cap: int) -> tuple[list[tuple], list[tuple]]:
    """Positive and negative pools of each anchor (one row each).

    ``manifold_ids/scores`` (m, ≥ k_n): the anchor's manifold neighbours best first (−1 or score ≤ 0:
    not reached); ``euclid_ids/scores`` (m, ≥ k_n): its Euclidean neighbours best first. The anchor
    itself is in neither. Returns per anchor (ids, scores) of positives and of negatives.
    """
    positives, negatives = [], []
    for mi, ms, ei, es in zip(manifold_ids, manifold_scores, euclid_ids, euclid_scores):
        reached = (mi >= 0) & (ms > 0)
        nn_m = mi[reached]
        ms = ms[reached]
        ev = ei >= 0
        ei, es = ei[ev], es[ev]
        pos = ~np.isin(nn_m[:k_pos], ei[:k_pos])
        neg = ~np.isin(ei[:k_neg], nn_m[:k_neg])
        positives.append((nn_m[:k_pos][pos][:cap], ms[:k_pos][pos][:cap]))
        negatives.append((ei[:k_neg][neg][:cap], es[:k_neg][neg][:cap]))
    return positives, negatives
