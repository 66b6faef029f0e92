"""kNN affinity graphs for diffusion (spec search.md §1).

A kNN list is two (n, k) arrays — neighbour indices (``-1`` padding) and similarities, best first —
i.e. a CSR matrix with a constant row length, which is how it is stored and memory-mapped.

    s(v, z) = [vᵀz]₊^γ, γ = 3                                   (T:18641-18642, T:19090-19094)
    s_k(x | z) = s(x, z) if x ∈ NN_k(z) else 0                   (T:18268-18276)
    mutual:  w_ij = min(s_k(x_i | x_j), s_k(x_j | x_i))          (T:18279-18283, T:19094-19096)
    union:   W = A + Aᵀ, a_ij = s_k(x_i | x_j)                   (label propagation, T:26059-26077)
    S = D^-1/2 W D^-1/2, D = diag(W 1), 0/0 = 0                 (T:18190-18201)

The diagonal is always zero (an item is never its own neighbour in W).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, reverse_cuthill_mckee


def knn_to_sparse(ids: np.ndarray, sims: np.ndarray, n: int, k: int | None = None, gamma: float = 3.0) -> sp.csr_matrix:
    """A = [s]₊^γ restricted to the first ``k`` neighbours: row i holds i's neighbours (no self-loops)."""
    k = ids.shape[1] if k is None else min(k, ids.shape[1])
    ids, sims = np.asarray(ids[:, :k]), np.asarray(sims[:, :k])
    vals = np.maximum(sims, 0).astype(np.float64) ** gamma
    keep = (ids >= 0) & (ids != np.arange(len(ids))[:, None]) & (vals > 0)
    indptr = np.r_[0, np.cumsum(keep.sum(axis=1))].astype(np.int64)  # rows arrive in order: CSR directly
    indptr = np.r_[indptr, np.full(n - len(ids), indptr[-1])]  # items without lists: empty rows
    a = sp.csr_matrix((vals[keep], ids[keep].astype(np.int32 if n < 2**31 else np.int64), indptr), shape=(n, n))
    a.sort_indices()
    a.sum_duplicates()
    return a


def affinity(
    ids: np.ndarray,
    sims: np.ndarray,
    n: int | None = None,
    k: int | None = None,
    gamma: float = 3.0,
    mode: str = "mutual",
) -> sp.csr_matrix:
    """Symmetric affinity W from kNN lists: ``mutual`` (min of both directions) or ``union`` (A + Aᵀ)."""
    n = len(ids) if n is None else n
    a = knn_to_sparse(ids, sims, n, k, gamma)
    if mode == "mutual":
        w = a.minimum(a.T)
    elif mode == "union":
        w = a + a.T
    else:
        raise ValueError(f"affinity mode must be 'mutual' or 'union', not {mode!r}")
    w = sp.csr_matrix(w)
    w.eliminate_zeros()
    w.sort_indices()
    return w


def degrees(w: sp.spmatrix) -> np.ndarray:
    """D = diag(W 1) as a vector."""
    return np.asarray(w.sum(axis=1)).ravel()


def normalize(w: sp.spmatrix) -> sp.csr_matrix:
    """S = D^-1/2 W D^-1/2 with 0/0 = 0 (isolated items keep an empty row)."""
    d = degrees(w)
    inv = np.zeros_like(d)
    inv[d > 0] = 1.0 / np.sqrt(d[d > 0])
    s = sp.diags(inv) @ w @ sp.diags(inv)
    return sp.csr_matrix(s)


def subgraph(w: sp.spmatrix, nodes: np.ndarray) -> sp.csr_matrix:
    """W restricted to ``nodes`` (rows and columns, in that order) — re-normalise it with :func:`normalize`."""
    w = sp.csr_matrix(w)
    return w[nodes][:, nodes]


def components(w: sp.spmatrix) -> tuple[int, np.ndarray]:
    """Connected components (count, label per node) of the undirected graph W."""
    return connected_components(w, directed=False)


def largest_component(w: sp.spmatrix) -> np.ndarray:
    """Sorted node indices of the largest connected component (LCC): where the spectral
    decomposition runs (T:19618-19622, T:20380-20382); other nodes are diffused by CG only."""
    _, labels = components(w)
    return np.flatnonzero(labels == np.argmax(np.bincount(labels)))


def locality_order(w: sp.spmatrix) -> np.ndarray:
    """A node order that puts neighbours close together (reverse Cuthill-McKee, O(nnz)).

    Diffusion multiplies S by dense (n, m) blocks; in a random node order every nonzero gathers an
    m-row from anywhere in memory, in this order mostly from cache (measured 4.2× faster at 100k
    nodes, benchmarks/diffusion_scale.py). ``order[t]`` is the node stored at position t.
    """
    return np.asarray(reverse_cuthill_mckee(sp.csr_matrix(w), symmetric_mode=True), np.int64)


def index_of(table: np.ndarray, values: np.ndarray, missing: int) -> np.ndarray:
    """Position of each of ``values`` (any shape) in ``table`` (distinct entries); ``missing`` where absent."""
    table, values = np.asarray(table), np.asarray(values)
    if len(table) == 0:
        return np.full(values.shape, missing, np.int64)
    by_value = np.argsort(table)
    at = by_value[np.minimum(np.searchsorted(table, values, sorter=by_value), len(table) - 1)]
    return np.where(table[at] == values, at, missing)


def inverse_permutation(order: np.ndarray) -> np.ndarray:
    """position[order[t]] = t: where each node sits in a node order."""
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return position
