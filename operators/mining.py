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

i-ASMK* pairs (``jobs.mine``, when discovery has run): images sharing components are positives
(:func:`shared_components`, :func:`component_positives`); an anchor's kNN-graph neighbours sharing
none are its negatives (:func:`graph_negatives`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from operators.centrality import modes, stationary
from operators.constraints import Count, OpenUnit, Tolerance
from operators.graph import components


@dataclass
class MiningParams:
    anchors: Count = 1500  # N_a (retrieval: 1,500 of 1M images, mom_1M.m)
    k_pos: Count = 50  # k_p: manifold / Euclidean neighbourhood for positives (T:25482)
    k_neg: Count = 10000  # k_n: Euclidean / manifold neighbourhood for negatives (retrieval)
    cap: Count = 50  # pool size per anchor (T:25482-25487)
    alpha: OpenUnit = 0.99  # diffusion α (T:25472-25481)
    tol: Tolerance = 1e-10  # CG relative residual  [ext: mom posmine.m/negmine.m, dfs(L, e, 1e-10, 20)]
    maxiter: Count = 20  # CG iterations: the reference stops at 20 (ranks, not values, are used)


def effective_sizes(p: MiningParams, n: int) -> tuple[int, int, int]:
    """(N_a, k_p, k_n) for a graph of ``n`` nodes: the paper's sizes scaled by n / 1M where they
    would cover most of a small collection — N_a ≥ 1 and at most 1,500 · n / 1M rounded up to 16;
    k_p and k_n at most n / 4, so that a neighbourhood never holds most of the collection."""
    anchors = min(p.anchors, max(16, int(np.ceil(p.anchors * n / 1_000_000))))
    cap = max(1, n // 4)
    return anchors, min(p.k_pos, cap), min(p.k_neg, cap)


def pools(
    manifold_ids: np.ndarray,
    manifold_scores: np.ndarray,
    euclid_ids: np.ndarray,
    euclid_scores: np.ndarray,
    k_pos: int,
    k_neg: int,
    cap: int,
) -> tuple[list[tuple], list[tuple]]:
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


def mode_anchors(
    w: sp.spmatrix, n_anchors: int, where: str = "largest", min_component: int = 3
) -> tuple[np.ndarray, dict]:
    """The ``n_anchors`` modes of π with the largest π (node rows) of the affinity graph ``w``, on its largest
    component (``where="largest"``) or on any component of at least ``min_component`` nodes (``"all"``)."""
    _, label = components(w)
    size = np.bincount(label)
    eligible = (label == size.argmax()) if where == "largest" else (size[label] >= min_component)
    found = modes(w, stationary(w))
    chosen = found[eligible[found]][:n_anchors]
    return chosen, {
        "nodes": w.shape[0],
        "lcc": int(size.max()),
        "components": len(size),
        "modes": len(found),
        "eligible_modes": int(eligible[found].sum()),
    }


def shared_components(indptr: np.ndarray, members: np.ndarray, n_img: int) -> tuple[np.ndarray, np.ndarray]:
    """Image pairs (key i · n_img + j, i < j) of every component and how many components each shares;
    components of one size are expanded together (no loop over components)."""
    sizes = np.diff(indptr)
    keys = []
    for size in np.unique(sizes[sizes > 1]):
        starts = indptr[:-1][sizes == size]
        m = np.sort(members[starts[:, None] + np.arange(size)[None, :]], axis=1)  # (components, size)
        i, j = np.triu_indices(size, 1)
        keys.append((m[:, i] * n_img + m[:, j]).ravel())
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.unique(np.concatenate(keys), return_counts=True)


def component_positives(
    key: np.ndarray, shared: np.ndarray, n_img: int, cap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positive pairs (anchor, other, components shared) from :func:`shared_components`' keys and counts:
    each image pair in both directions, at most ``cap`` per anchor, those sharing most first (ties: smaller
    other), anchors in increasing order."""
    a, b = key // n_img, key % n_img
    a, b, shared = np.r_[a, b], np.r_[b, a], np.r_[shared, shared]  # both directions, then cap per anchor
    order = np.lexsort((b, -shared, a))
    a, b, shared = a[order], b[order], shared[order]
    keep = np.r_[0, np.flatnonzero(np.diff(a)) + 1]
    rank = np.arange(len(a)) - np.repeat(keep, np.diff(np.r_[keep, len(a)]))
    return a[rank < cap], b[rank < cap], shared[rank < cap]


def graph_negatives(
    anchors: np.ndarray, ids: np.ndarray, knn_ids: np.ndarray, knn_sims: np.ndarray, positive: set, cap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each anchor's kNN-graph neighbours (global similarity, best first) that share no component with it:
    (anchor ids, other ids, similarities), at most ``cap`` per anchor.

    ``ids`` (n,): the image id of each graph row; ``knn_ids`` / ``knn_sims`` (n, k): each row's neighbour rows
    (−1: none) and similarities; ``positive``: the (anchor, other) id pairs that do share one. An anchor that
    is no graph row has none.
    """
    row_of = {int(i): r for r, i in enumerate(ids)}
    a_out, o_out, s_out = [], [], []
    for anchor in anchors.tolist():
        r = row_of.get(anchor)
        if r is None:
            continue
        nb, sims = np.asarray(knn_ids[r]), np.asarray(knn_sims[r])
        keep = [(int(ids[x]), float(s)) for x, s in zip(nb, sims) if x >= 0 and (anchor, int(ids[x])) not in positive]
        for other, s in keep[:cap]:
            a_out.append(anchor), o_out.append(other), s_out.append(s)
    return np.array(a_out, np.int64), np.array(o_out, np.int64), np.array(s_out)
