"""Temporal diffusion solved by conjugate gradient, full and truncated (spec search.md §2-§3).

    f* = (1 − α) (I − αS)⁻¹ y,  solved as (I − αS) f = (1 − α) y by CG   (T:18222-18229, T:18506-18534)
    α = 0.99; y_i = s_k(x_i | q) = [qᵀx_i]₊^γ over the query's k_q = 10 nearest
    database items (queries never enter the graph)                          (T:18318-18322, T:18683-18684)
    ~20 CG iterations saturate; tolerance [ext] 1e-6                        (T:18692-18698, T:20405-20406)

Many queries are solved at once: the right-hand sides are the columns of a dense (n, m) block, each
column runs its own CG (own step sizes and stopping), and one iteration costs one sparse × dense
product for all of them. Truncation (T:18576-18583) re-ranks a query's top-T shortlist on the
subgraph of W restricted to it, re-normalised; the subgraphs of a batch form one block-diagonal
matrix so their CGs also run together.
"""

from __future__ import annotations

from typing import Callable

import numba
import numpy as np
import scipy.sparse as sp

from operators.graph import normalize
from operators.prefetch import AHEAD, LINE, prefetch

ALPHA = 0.99


def cg(
    matvec: Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    tol: float = 1e-6,
    maxiter: int = 20,
    x0: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Independent conjugate-gradient solves A x_j = b_j for every column j of ``b``.

    ``matvec`` maps an (n, m) block to A times it (A symmetric positive-definite, acting column by
    column). Column j stops when ||r_j|| ≤ tol ||b_j|| (as scipy's ``rtol``). Returns (x, iterations
    per column).
    """
    b = np.asarray(b)
    squeeze = b.ndim == 1
    b = np.ascontiguousarray(b[:, None] if squeeze else b)
    x = np.zeros_like(b) if x0 is None else np.array(x0, dtype=b.dtype).reshape(b.shape)
    r = np.ascontiguousarray(b - matvec(x)) if x0 is not None else b.copy()
    p = r.copy()
    rs = _column_dot(r, r)
    stop = tol * np.sqrt(_column_dot(b, b))
    active = np.sqrt(rs) > stop
    iters = np.zeros(b.shape[1], np.int64)
    for _ in range(maxiter):
        if not active.any():
            break
        ap = np.ascontiguousarray(matvec(p), dtype=b.dtype)
        pap = _column_dot(p, ap)
        step = np.where(active & (pap > 0), rs / np.where(pap > 0, pap, 1), 0.0).astype(b.dtype)
        rs_new = _step(x, r, p, ap, step)  # x += step p; r −= step Ap; returns ||r||² per column
        iters += active
        active &= np.sqrt(rs_new) > stop
        beta = np.where(active, rs_new / np.where(rs > 0, rs, 1), 0.0).astype(b.dtype)
        _direction(p, r, beta)  # p = r + beta p
        rs = rs_new
    return (x[:, 0] if squeeze else x), iters


# The vector updates of CG as single passes over the (n, m) blocks, row-parallel; column sums are
# accumulated in float64 per chunk of rows (the blocks are memory-bound: numpy's separate
# temporaries cost more than the sparse product at 1M nodes).
_CHUNKS = 64


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _column_dot(a, b):
    n, m = a.shape
    part = np.zeros((_CHUNKS, m))
    for c in numba.prange(_CHUNKS):
        for i in range(c * n // _CHUNKS, (c + 1) * n // _CHUNKS):
            for j in range(m):
                part[c, j] += np.float64(a[i, j]) * b[i, j]
    return part.sum(axis=0)


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _step(x, r, p, ap, step):
    n, m = x.shape
    part = np.zeros((_CHUNKS, m))
    for c in numba.prange(_CHUNKS):
        for i in range(c * n // _CHUNKS, (c + 1) * n // _CHUNKS):
            for j in range(m):
                x[i, j] += step[j] * p[i, j]
                r[i, j] -= step[j] * ap[i, j]
                part[c, j] += np.float64(r[i, j]) * r[i, j]
    return part.sum(axis=0)


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _direction(p, r, beta):
    n, m = p.shape
    for i in numba.prange(n):
        for j in range(m):
            p[i, j] = r[i, j] + beta[j] * p[i, j]


def seeds(
    n: int, ids: np.ndarray, sims: np.ndarray, kq: int = 10, gamma: float = 3.0, dtype: type = np.float64
) -> np.ndarray:
    """Dense (n, m) block Y: y_i = [s(q, x_i)]₊^γ for the first ``kq`` neighbours of each query (-1: none)."""
    ids, sims = np.asarray(ids)[:, :kq], np.asarray(sims, np.float64)[:, :kq]
    y = np.zeros((n, len(ids)), dtype)
    q = np.repeat(np.arange(len(ids)), ids.shape[1])
    keep = ids.reshape(-1) >= 0
    np.add.at(y, (ids.reshape(-1)[keep], q[keep]), np.maximum(sims.reshape(-1)[keep], 0.0) ** gamma)
    return y


def temporal(s: sp.spmatrix, y: np.ndarray, alpha: float = ALPHA, tol: float = 1e-6, maxiter: int = 20) -> np.ndarray:
    """f = (1 − α)(I − αS)⁻¹ y for every column of ``y`` by CG (S symmetric-normalised).

    Runs in ``y``'s dtype (float32 halves the memory traffic; rankings are unchanged in practice).
    """
    s = sp.csr_matrix(s, dtype=y.dtype)
    f, _ = cg(lambda p: shifted_product(s, p, alpha), (1 - alpha) * y, tol, maxiter)
    return f


def shifted_product(s: sp.csr_matrix, p: np.ndarray, alpha: float) -> np.ndarray:
    """(I − αS) P for a dense block P (n, m): a compiled, row-parallel sparse × dense product.

    Each row of the result reads the m-rows of P at its nonzeros; with nodes in a locality order
    (:func:`operators.graph.locality_order`) those reads mostly hit cache. scipy's product is
    single-threaded and 2× slower here (measured at 100k nodes, 64 columns).
    """
    p = np.ascontiguousarray(p, dtype=s.dtype)
    out = np.empty_like(p)
    combine_product(s, p, -alpha, 1.0, 0.0, out)
    return out


def combine_product(s: sp.csr_matrix, p: np.ndarray, a: float, b: float, c: float, out: np.ndarray) -> np.ndarray:
    """out ← a·S P + b·P + c·out in one row-parallel pass (c = 0: ``out`` is only written).

    ``out`` may not be ``p`` (rows of P are read at every neighbour); it may be any other block,
    so three-term recurrences (Chebyshev filters) run in two buffers. The row of P needed
    ``AHEAD`` nonzeros later is prefetched (:mod:`operators.prefetch`).
    """
    t = s.dtype.type
    p = np.ascontiguousarray(p, dtype=s.dtype)  # rows of P are gathered: they must be contiguous
    if not (out.flags.c_contiguous and out.dtype == s.dtype):
        raise ValueError("combine_product: out must be a C-contiguous block of S's dtype")
    _spmm_combine(s.indptr, s.indices, s.data, p, t(a), t(b), t(c), out, LINE // p.itemsize)
    return out


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _spmm_combine(indptr, indices, data, p, a, b, c, out, per_line):
    n, m = p.shape
    nnz = len(indices)
    for i in numba.prange(n):
        row, pi = out[i], p[i]
        if c == 0:
            for j in range(m):
                row[j] = b * pi[j]
        else:
            for j in range(m):
                row[j] = b * pi[j] + c * row[j]
        for e in range(indptr[i], indptr[i + 1]):
            if e + AHEAD < nnz:
                ahead = indices[e + AHEAD]
                for j in range(0, m, per_line):
                    prefetch(p, ahead, j)
            v = a * data[e]
            pc = p[indices[e]]
            for j in range(m):
                row[j] += v * pc[j]


def truncated(
    w: sp.spmatrix, shortlists: np.ndarray, y: np.ndarray, alpha: float = ALPHA, tol: float = 1e-6, maxiter: int = 20
) -> np.ndarray:
    """Diffusion of each query on its own shortlist (T:18576-18583, T:19975-19978).

    ``shortlists`` (m, T) database indices (-1 padding), ``y`` (m, T) the query's seeds on them.
    Row j of the result holds f on shortlist j: W restricted to it, re-normalised, solved by CG.
    """
    m, t = shortlists.shape
    blocks = []
    for j in range(m):
        nodes = shortlists[j]
        valid = nodes >= 0
        sub = sp.csr_matrix((t, t))
        if valid.any():
            idx = np.flatnonzero(valid)
            core = normalize(sp.csr_matrix(w)[nodes[idx]][:, nodes[idx]])
            sub = sp.csr_matrix((core.data, idx[core.indices], _expand_indptr(core.indptr, idx, t)), shape=(t, t))
        blocks.append(sub)
    big = sp.block_diag(blocks, format="csr")  # column j of the (T, m) block lives in block j
    rhs = (1 - alpha) * np.asarray(y, np.float64).T  # (T, m)

    def matvec(p: np.ndarray) -> np.ndarray:
        return p - alpha * (big @ p.T.reshape(-1)).reshape(m, t).T

    f, _ = cg(matvec, rhs, tol, maxiter)
    return f.T


def _expand_indptr(indptr: np.ndarray, rows: np.ndarray, t: int) -> np.ndarray:
    """CSR indptr of a (t, ·) matrix whose rows ``rows`` are those of a compact matrix, others empty."""
    counts = np.zeros(t, np.int64)
    counts[rows] = np.diff(indptr)
    return np.r_[0, np.cumsum(counts)]


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` rows of each column of ``scores`` (n, m) → (m, k) scores and indices, best first.

    ``exclude[j]`` is a row left out of column j (-1: none). Ties break by row index.
    """
    sc = np.asarray(scores, np.float64).T.copy()
    if exclude is not None:
        ok = np.asarray(exclude) >= 0
        sc[np.flatnonzero(ok), np.asarray(exclude)[ok]] = -np.inf
    k = min(k, sc.shape[1])
    part = (
        np.argpartition(-sc, k - 1, axis=1)[:, :k] if k < sc.shape[1] else np.tile(np.arange(sc.shape[1]), (len(sc), 1))
    )
    vals = np.take_along_axis(sc, part, 1)
    order = np.lexsort((part, -vals), axis=1)
    idx = np.take_along_axis(part, order, 1)
    return np.take_along_axis(sc, idx, 1), idx
