"""CAS: Cluster-Aware Similarity diffusion (ICML'24; spec search.md §13, poster C:77-124).

The poster defines the pieces; their defaults and the glue between them are EXT (jifeiluo/reranking
``cas_reranking.py``, ``distance.py``, called with k1 = 6, k2 = 60, k3 = 70, k4 = 7, k5 = 80):

1. distances d_ij = ‖x_i − x_j‖² / max_j ‖x_i − x_j‖² (EXT), affinity W_ij = 1_ij exp(−d_ij / σ²) on the
   top-(k1 − 1) neighbours, confident (mutual top-k1) edges weighted λ_c, symmetrised (C:77-82);
2. **bidirectional similarity diffusion**: the fixed point of F ← ½α(FS + SF) + (1 − α)I, i.e. the
   Lyapunov equation (I − αS)F + F(I − αS) = 2(1 − α)E (C:87-109), α = 1/(1 + μ), from F = W, restricted
   to each item's local cluster 𝒞_i — its k-reciprocal candidates with expansion (EXT ``candidate_expansion``):
   every iterate is masked to the clusters (``local``; the reference code iterates on the whole matrix and
   masks once at the end: ``local=False``);
3. **neighbour-guided similarity smoothing** of F by transition weights towards the confident neighbours
   (EXT ``sparse_feature_construction``), F̂;
4. the neighbour-enhanced F̃_i = (κ Σ_{j∈ξ[i]} F̂_j/|ξ| + Σ_{j∈N(i,k4)} F̂_j/k4)/(κ + 1) and the extra
   propagation F' = P F̃, P its top-k5 truncated two-step walk (C:113-124, EXT ``markov_expansion``);
5. the Jensen-Shannon divergence of F' rows on each item's top ``paths`` neighbours, shortest paths on
   that graph (capped at 50), final distance (1 − λ)·path + λ·d (EXT).

Scale: nothing here is N × N. :func:`cas_query_distances` solves one query's problem on the query and its
shortlist (m = 1 + T nodes, T = ``shortlist``), and the shortest paths run from the query only (Dijkstra
on the top-``paths`` graph, not all pairs). On a database of T images the result is the reference's for
that query alone (the reference solves all queries and the database together).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import dijkstra

from operators.constraints import Count, NonNegFinite, PosFinite, Probability


@dataclass
class CasParams:
    k1: Count = 6  # confident neighbours: mutual top-k1, self included (EXT)
    k2: Count = 60  # candidates (local cluster 𝒞): k-reciprocal top-k2 with expansion (EXT)
    k3: Count = 70  # transition matrix: top-k3 (self excluded: k3 − 1 neighbours) (EXT)
    k4: Count = 7  # smoothing: top-k4 neighbours, self included (EXT)
    k5: Count = 80  # extra propagation: top-k5 of the two-step walk (EXT)
    sigma: PosFinite = 0.3  # W = exp(−d/σ²) (EXT)
    mu: PosFinite = 0.23  # α = 1/(1 + μ) (EXT)
    confident_weight: NonNegFinite = 2.0  # λ_c: confident edges of W (EXT lambda_value of sparse_feature_construction)
    kappa: NonNegFinite = 2.0  # κ: weight of the confident neighbours ξ in F̃ (EXT lv)
    beta: NonNegFinite = 0.0  # regulariser of the smoothing (EXT beta)
    iters: Count = 10  # diffusion iterations (EXT max_iter)
    local: bool = True  # mask every iterate to the clusters (poster); False: the EXT code's order
    paths: Count = 100  # shortest-path graph: each item's top neighbours (EXT)
    max_dist: PosFinite = 50.0  # path length cap (EXT)
    lam: Probability = 0.3  # final = (1 − λ)·path + λ·d (EXT lambda_value)
    shortlist: Count = 1000  # query-time: the query's top-T items form its problem


def normalized_distances(x: np.ndarray) -> np.ndarray:
    """d_ij = ‖x_i − x_j‖² / max_j ‖x_i − x_j‖² (m × m, m = the problem's items)."""
    x = np.asarray(x, np.float64)
    sq = (x * x).sum(1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)
    return d / np.maximum(d.max(1, keepdims=True), 1e-12)


def ranking(d: np.ndarray) -> np.ndarray:
    """Each row's items by increasing distance (the item itself first)."""
    return np.argsort(d, axis=1, kind="stable")


def top_sparse(rank: np.ndarray, k: int, start: int = 0) -> sp.csr_matrix:
    """M_ij = 1 for j among rank[i, start:k] (k capped at the problem's size), sparse."""
    k, m = min(k, rank.shape[1]), len(rank)
    cols = rank[:, start:k]
    return sp.csr_matrix((np.ones(cols.size), (np.repeat(np.arange(m), cols.shape[1]), cols.ravel())), shape=(m, m))


def top_mask(rank: np.ndarray, k: int, start: int = 0) -> np.ndarray:
    """:func:`top_sparse` as a dense m × m 0/1 matrix (the problem is the shortlist: m = 1 + T)."""
    return top_sparse(rank, k, start).toarray()


def confident(rank: np.ndarray, k1: int) -> np.ndarray:
    """ξ: mutual top-k1 (self included)."""
    m = top_mask(rank, k1)
    return m * m.T


def candidates(rank: np.ndarray, k2: int) -> np.ndarray:
    """𝒞: mutual top-(k2 + 1), expanded by a candidate j's mutual top-(k2/2 + 1) R_j when more than 2/3 of
    R_j is already in (the k-reciprocal expansion of EXT ``candidate_expansion``): with B the mutual
    top-(k2 + 1) and H the mutual top-(k2/2 + 1), j grows row i when B_ij = 1 and (B Hᵀ)_ij > ⅔ |H_j|;
    𝒞 = B ∪ (G H). Sparse: O(m · k2²) instead of the reference's k2 passes over m × m."""
    base = top_sparse(rank, k2 + 1)
    base = base.multiply(base.T).tocsr()
    half = top_sparse(rank, k2 // 2 + 1)
    half = half.multiply(half.T).tocsr()
    overlap = (base @ half.T).multiply(base).tocoo()  # |B_i ∩ H_j| on the candidates j of i
    size = np.asarray(half.sum(1)).ravel()
    grow = overlap.data > 2 / 3 * size[overlap.col]
    g = sp.csr_matrix((np.ones(grow.sum()), (overlap.row[grow], overlap.col[grow])), shape=base.shape)
    return ((base + g @ half).toarray() > 0).astype(np.float64)


def affinity(sim: np.ndarray, rank: np.ndarray, conf: np.ndarray, k1: int, weight: float) -> np.ndarray:
    """W on the top-(k1 − 1) neighbours (self excluded), confident edges × ``weight``, symmetrised."""
    w = top_mask(rank, k1, start=1) * sim
    w = w + (weight - 1) * conf * w
    return (w + w.T) / 2


def sym_normalize(w: np.ndarray) -> np.ndarray:
    d = 1.0 / np.sqrt(np.maximum(w.sum(1), 1e-12))
    s = d[:, None] * w * d[None, :]
    return (s + s.T) / 2


def bidirectional_diffusion(w: np.ndarray, mu: float, iters: int, mask: np.ndarray | None = None) -> np.ndarray:
    """F ← ½α(FS + SF) + (1 − α)I from F = W (× ``mask`` at every step when given): the iterative solve of
    (I − αS)F + F(I − αS) = 2(1 − α)I, restricted to the mask's pattern (C:107-109)."""
    alpha = 1.0 / (1.0 + mu)
    s = sp.csr_matrix(sym_normalize(w))
    if mask is not None:  # sparse on the clusters' pattern (the diagonal is in it: an item is its own candidate)
        on = sp.csr_matrix(mask)
        f, eye = on.multiply(w).tocsr(), sp.identity(len(w), format="csr")
        for _ in range(iters):
            f = on.multiply(0.5 * alpha * (f @ s + s @ f) + (1 - alpha) * eye).tocsr()
        return f.toarray()
    f, eye = w.copy(), np.eye(len(w))
    for _ in range(iters):
        f = 0.5 * alpha * (np.asarray(f @ s) + np.asarray(s @ f)) + (1 - alpha) * eye
    return f


def l1_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.abs(a).sum(1, keepdims=True), 1e-12)


def smooth(
    f: np.ndarray, cand: np.ndarray, conf: np.ndarray, sim: np.ndarray, rank: np.ndarray, k3: int, beta: float
) -> np.ndarray:
    """F̂: each item's cluster similarities pulled towards its confident neighbours by transition weights
    (two-step walk on the top-(k3 − 1) graph); items with ≤ 1 confident or semi-candidate keep F."""
    trans = l1_rows(top_mask(rank, k3, start=1) * sim)
    trans = trans @ trans
    out = f * cand
    semi = cand - conf
    for i in range(len(f)):
        c, s_, all_ = np.flatnonzero(conf[i]), np.flatnonzero(semi[i]), np.flatnonzero(cand[i])
        if len(c) <= 1 or len(s_) <= 1:
            continue
        anchor = trans[c, c].mean()
        tw = np.zeros(len(f))
        tw[c] = anchor
        tw[s_] = np.minimum(trans[np.ix_(s_, c)].mean(1), anchor)
        fc, twc = f[i, all_], tw[all_]
        shift = anchor**2 * fc.mean() - anchor * (fc * twc).mean()
        out[i, all_] = (fc * (anchor * twc + 2 * beta) + shift) / (anchor**2 + 2 * beta)
    return l1_rows(out)


def propagate(feat: np.ndarray, rank: np.ndarray, conf: np.ndarray, k4: int, k5: int, kappa: float) -> np.ndarray:
    """F̃ = (mean of the top-k4's F̂ + κ · mean of the confident neighbours' F̂)/(1 + κ), then the top-k5
    truncated two-step walk P of F̃ and F' = P P (EXT markov_expansion, one iteration)."""
    mixed = feat[rank[:, :k4]].mean(1)
    mixed = l1_rows((mixed + kappa * l1_rows(conf) @ feat) / (1 + kappa))
    walk = mixed @ mixed
    keep = np.argsort(-walk, axis=1, kind="stable")[:, :k5]
    p = np.zeros_like(walk)
    rows = np.repeat(np.arange(len(walk)), keep.shape[1])
    p[rows, keep.ravel()] = walk[rows, keep.ravel()]
    p = l1_rows(p)
    return l1_rows(p @ p)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """½ Σ p log₂(2p/(p+q)) + ½ Σ q log₂(2q/(p+q)) of row pairs (rows are distributions)."""
    m = p + q
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, p * np.log2(2 * p / np.where(m > 0, m, 1)), 0).sum(-1)
        b = np.where(q > 0, q * np.log2(2 * q / np.where(m > 0, m, 1)), 0).sum(-1)
    return 0.5 * (a + b)


def js_to_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JS divergence of the distribution ``p`` to each row of ``q`` (rows summing to 1), over p's support only:
    JS = 1 − ½ Σ_{j: p_j>0} [p_j + q_j − p_j log₂(2p_j/(p_j+q_j)) − q_j log₂(2q_j/(p_j+q_j))]
    (the terms where only one side is positive add up to what the 1 leaves)."""
    on = np.flatnonzero(p > 0)
    a, b = p[on][None, :], q[:, on]
    m = a + b
    with np.errstate(divide="ignore", invalid="ignore"):
        t = m - a * np.log2(2 * a / m) - np.where(b > 0, b * np.log2(2 * b / m), 0)
    return 1.0 - 0.5 * t.sum(1)


@numba.njit(cache=True, nogil=True, parallel=True)
def _js_edges(feat: np.ndarray, xlogx: np.ndarray, nbrs: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """JS(F'_i, F'_j) for each i and j in ``nbrs[i]`` (:func:`js_to_rows`, rewritten over p = F'_i's support
    as 1 − ½ Σ [(p+q) log₂(p+q) − p log₂ p − q log₂ q], ``xlogx`` = F' log₂ F')."""
    n, k = nbrs.shape
    out = np.empty((n, k))
    for i in numba.prange(n):
        on = np.flatnonzero(feat[i] > 0)
        own = 0.0
        for t in on:
            own += xlogx[i, t]
        for r in range(k):
            j = nbrs[i, r]
            acc = 0.0
            for t in on:
                s = feat[i, t] + feat[j, t]
                acc += s * np.log2(s) - xlogx[j, t]
            out[i, r] = 1.0 - 0.5 * (acc - own)
    return out


def path_graph(feat: np.ndarray, rank: np.ndarray, paths: int) -> sp.csr_matrix:
    """The graph of each item's top-``paths`` neighbours, edge length the JS divergence of their F' rows (an
    edge of either direction; JS is symmetric, so both directions carry one length)."""
    n = len(feat)
    k = min(paths, n)
    rows = np.repeat(np.arange(n), k)
    cols = rank[:, :k].ravel()
    feat = np.ascontiguousarray(feat, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        xlogx = np.where(feat > 0, feat * np.log2(feat), 0.0)
    js = np.maximum(_js_edges(feat, xlogx, np.ascontiguousarray(rank[:, :k], np.int64)).ravel(), 1e-12)  # > 0: a
    keep = rows != cols  # stored 0 is no edge
    g = sp.csr_matrix((js[keep], (rows[keep], cols[keep])), shape=(n, n))
    return g.maximum(g.T)


def path_distances(feat: np.ndarray, rank: np.ndarray, paths: int, cap: float, sources: np.ndarray) -> np.ndarray:
    """Shortest-path lengths from ``sources`` on :func:`path_graph` (Dijkstra from the sources only, not
    all pairs), capped at ``cap``."""
    return np.minimum(dijkstra(path_graph(feat, rank, paths), directed=False, indices=sources), cap)


def cas_distances(x: np.ndarray, p: CasParams, sources: np.ndarray) -> np.ndarray:
    """CAS distances from the items ``sources`` to every item of the problem ``x`` (m × D)."""
    d = normalized_distances(x)
    rank = ranking(d)
    sim = np.exp(-d / p.sigma**2)
    conf, cand = confident(rank, p.k1), candidates(rank, p.k2)
    w = affinity(sim, rank, conf, p.k1, p.confident_weight)
    f = bidirectional_diffusion(w, p.mu, p.iters, cand if p.local else None)
    feat = propagate(smooth(f, cand, conf, sim, rank, p.k3, p.beta), rank, conf, p.k4, p.k5, p.kappa)
    path = path_distances(feat, rank, p.paths, p.max_dist, sources)
    return (1 - p.lam) * path + p.lam * d[sources]


def cas_query_distances(xq: np.ndarray, x_short: np.ndarray, p: CasParams) -> np.ndarray:
    """One query's CAS distances to its shortlist: the problem is the query (row 0) and the shortlist."""
    return cas_distances(np.vstack([xq[None, :], x_short]), p, np.array([0]))[0, 1:]


def rerank_shortlist(
    xq: np.ndarray, x_short: np.ndarray, rows: np.ndarray, p: CasParams
) -> tuple[np.ndarray, np.ndarray]:
    """One query's shortlist ``rows`` (−1 padding dropped) re-ordered by CAS distance, scores 1/(1 + distance)."""
    ok = rows >= 0
    rows, x_short = rows[ok], x_short[ok]
    if len(rows) == 0:
        return rows, np.zeros(0)
    dist = cas_query_distances(xq, x_short, p)
    order = np.argsort(dist, kind="stable")
    return rows[order], 1.0 / (1.0 + dist[order])
