"""Graph centrality on the kNN affinity graph W (spec search §9a.5, §10).

- Stationary distribution of the random walk P = D⁻¹W (mining anchors, T:25257-25276): πP = π.
  For a symmetric W it is exactly π_i = d_i / Σ_j d_j (detailed balance: d_i P_ij = W_ij = d_j P_ji),
  computed in O(nnz); :func:`power_iteration` is the iterative definition the tests compare with.
- PageRank: the left eigenvector of βP + (1 − β) 11ᵀ/n (teleport 1 − β; dangling nodes jump
  uniformly) by power iteration (T:23683-23772).
- Katz centrality, the seed's default for saliency (T:23957-23979): g solving L_α g = 1 with
  L_α = (I − αS)/(1 − α), S = D^-1/2 W D^-1/2, by one CG solve — the sum over all vertices of their
  diffusion vectors.
- Modes: local maxima of π over graph neighbours (T:25265-25276), ties broken by node index,
  ranked by π. Isolated nodes are no modes.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from operators.diffusion import cg, shifted_product
from operators.graph import degrees, normalize


def stationary(w: sp.spmatrix) -> np.ndarray:
    """π = d / Σd of a symmetric W (zeros for an empty graph)."""
    d = degrees(w)
    return d / d.sum() if d.sum() > 0 else np.zeros_like(d)


def transition(w: sp.spmatrix) -> sp.csr_matrix:
    """P = D⁻¹W (rows of isolated nodes stay empty)."""
    d = degrees(w)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    return sp.csr_matrix(sp.diags(inv) @ w)


def power_iteration(w: sp.spmatrix, beta: float = 1.0, tol: float = 1e-12, maxiter: int = 10_000) -> np.ndarray:
    """The left fixed point of βP + (1 − β)11ᵀ/n by power iteration, from the uniform distribution.

    β = 1 is the random walk itself (πP = π); β < 1 is PageRank. Mass of dangling (isolated) nodes
    is spread uniformly. ℓ1 change below ``tol`` stops it.
    """
    p = transition(w)
    n = p.shape[0]
    dangling = np.asarray(p.sum(axis=1)).ravel() == 0
    pt = sp.csr_matrix(p.T)
    x = np.full(n, 1.0 / n)
    for _ in range(maxiter):
        new = beta * (pt @ x + x[dangling].sum() / n) + (1 - beta) / n
        if np.abs(new - x).sum() < tol:
            return new
        x = new
    return x


def pagerank(w: sp.spmatrix, beta: float = 0.85, tol: float = 1e-10) -> np.ndarray:
    return power_iteration(w, beta, tol)


def katz(w: sp.spmatrix, alpha: float = 0.99, tol: float = 1e-6, maxiter: int = 200) -> np.ndarray:
    """g with L_α g = 1, i.e. (I − αS) g = (1 − α) 1, by CG (S symmetric-normalised W)."""
    s = sp.csr_matrix(normalize(w), dtype=np.float64)
    g, _ = cg(lambda x: shifted_product(s, x, alpha), np.full((s.shape[0], 1), 1.0 - alpha), tol, maxiter)
    return g[:, 0]


def modes(w: sp.spmatrix, score: np.ndarray) -> np.ndarray:
    """Nodes whose ``score`` beats every graph neighbour's (ties: the smaller index wins), best first."""
    w = sp.csr_matrix(w)
    n = w.shape[0]
    rank = np.empty(n, np.int64)
    rank[np.lexsort((np.arange(n), -score))] = np.arange(n)  # 0 = best
    beats = w.copy()
    beats.data = (n - rank[beats.indices]).astype(np.float64)  # larger = better neighbour
    best_neighbour = n - np.asarray(beats.max(axis=1).todense()).ravel()  # rank of the best neighbour
    has_neighbours = np.diff(w.indptr) > 0
    is_mode = has_neighbours & (rank < best_neighbour)
    found = np.flatnonzero(is_mode)
    return found[np.argsort(rank[found])]
