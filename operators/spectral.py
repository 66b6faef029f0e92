"""Fast spectral ranking and hybrid spectral-temporal diffusion (spec search.md §5-§6).

Filter view (T:19049-19078, T:19987-20002): f* = h_α(S) y, h_α(λ) = (1 − α)/(1 − αλ).

FSR (T:19112-19168): S ≈ U Λ Uᵀ from its r largest eigenpairs; x = U h(Λ) Uᵀ y. As embeddings
(T:19405-19439): database row i is (U h(Λ)^½)_i, a query is h(Λ)^½ Uᵀ y, and ranking is a dot product.

Hybrid (T:20133-20207): h_α(S) = U g_α(Λ) Uᵀ + h_α(S − UΛUᵀ), g_α(λ) = h_α(λ) − h_α(0) = (1−α)αλ/(1−αλ).
x = x_s + x_t with x_s = U g(Λ) Uᵀ y and x_t from a few CG iterations on
L_α(S − UΛUᵀ) x_t = y, L_α(A) = (I − αA)/(1 − α). SHybrid zeroes the 99% smallest entries of U
(T:20425-20431). Defaults r = 400, 5 iterations (T:20419-20422).

Eigenpairs: Lanczos (``scipy.sparse.linalg.eigsh``), FSR's randomised simultaneous iteration
(T:19112-19161) — run on (S + I)/2, whose spectrum is S's shifted into [0, 1], so power iteration
finds the algebraically largest eigenvalues of S (the ones a nondecreasing h needs, T:19257-19285)
and not the negative ones of largest modulus — or the same simultaneous iteration with a Chebyshev
polynomial of S in place of the power ([ext] Zhou & Saad 2007, "Chebyshev-filtered subspace
iteration"): it damps the whole unwanted interval [−1, λ_cut] at once, where (S + I)/2 barely
separates λ_r from λ_{r+p} near 1. This is what reaches r = 400 at a million nodes.
"""

from __future__ import annotations

import logging
import time

import numba
import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from operators.diffusion import ALPHA, cg, combine_product, shifted_product

log = logging.getLogger(__name__)


def h_filter(lam: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """h_α(λ) = (1 − α)/(1 − αλ)."""
    return (1 - alpha) / (1 - alpha * np.asarray(lam, np.float64))


def g_filter(lam: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """g_α(λ) = h_α(λ) − h_α(0) = (1 − α) α λ / (1 − αλ)."""
    lam = np.asarray(lam, np.float64)
    return (1 - alpha) * alpha * lam / (1 - alpha * lam)


def eigenpairs(
    s: sp.spmatrix,
    r: int,
    method: str = "lanczos",
    oversample: int = 50,
    iters: int = 10,
    seed: int = 0,
    dtype: type = np.float64,
    tol: float = 0.0,
    degree: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``r`` algebraically largest eigenpairs (λ descending, U (n, r) orthonormal) of symmetric S.

    ``dtype`` float32 halves the memory of the block methods (n × (r + p) blocks) at large n;
    ``tol`` is Lanczos' relative accuracy (0: machine precision; 1e-4 is several times faster), or
    the Chebyshev iteration's bound on the residuals ||S u − λ u|| (default 1e-3), whose filter
    has polynomial ``degree``; ``iters`` bounds its (or simultaneous iteration's) outer iterations.
    """
    n = s.shape[0]
    r = min(r, n)
    if method == "dense" or (method == "lanczos" and r >= n - 1):
        lam, u = np.linalg.eigh(np.asarray(s.todense(), np.float64))
    elif method == "lanczos":
        s64 = sp.csr_matrix(s, dtype=np.float64)
        op = spla.LinearOperator(
            (n, n), matvec=lambda v: shifted_product(s64, v.reshape(n, -1), -1.0) - v.reshape(n, -1), dtype=np.float64
        )  # S v by the parallel kernel: (I + S) v − v
        lam, u = spla.eigsh(op, k=r, which="LA", tol=tol, v0=np.random.default_rng(seed).standard_normal(n))
    elif method == "simultaneous":
        lam, u = _simultaneous_iteration(sp.csr_matrix(s, dtype=dtype), r, oversample, iters, seed)
    elif method == "chebyshev":
        lam, u = chebyshev_iteration(sp.csr_matrix(s, dtype=dtype), r, oversample, iters, degree, tol or 1e-3, seed)
    else:
        raise ValueError(f"eigen method must be lanczos, chebyshev, simultaneous or dense, not {method!r}")
    order = np.argsort(-lam)[:r]
    return lam[order], np.ascontiguousarray(u[:, order])


def _simultaneous_iteration(s: sp.csr_matrix, r: int, p: int, q: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """FSR Algorithm 1 (T:19112-19161) on A = (S + I)/2: B ~ N(0,1); Q R = B; B = A Q (q times); eig QᵀAQ."""
    n = s.shape[0]
    rh = min(n, r + p)
    b = np.random.default_rng(seed).standard_normal((n, rh), dtype=s.dtype.type)
    for _ in range(max(1, q)):
        qm = _orthonormal(b)  # in b's dtype
        del b
        b = shifted_product(s, qm, -1.0)  # (I + S) Q by the parallel kernel
        b *= 0.5
    c = (qm.T @ b).astype(np.float64)
    mu, v = np.linalg.eigh(0.5 * (c + c.T))
    return 2 * mu - 1, qm @ v.astype(qm.dtype)  # eigenvalues of S = 2μ − 1


def chebyshev_iteration(
    s: sp.csr_matrix,
    r: int,
    p: int = 50,
    max_iters: int = 20,
    degree: int = 16,
    tol: float = 1e-3,
    seed: int = 0,
    lower: float = -1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-r eigenpairs of symmetric S (spectrum in [``lower``, 1]) by Chebyshev-filtered subspace iteration.

    Each outer iteration replaces the block Q (n × (r + p)) by T_d(t(S)) Q / T_d(t(1)), with
    t(λ) = (2λ − λ_cut − lower)/(λ_cut − lower) mapping the unwanted [lower, λ_cut] onto [−1, 1],
    where |T_d| ≤ 1, and the wanted end far above it; then QR and Rayleigh-Ritz. λ_cut is the
    smallest Ritz value of the block, so the filter sharpens as the block converges. Stops when the
    r largest Ritz pairs have residuals ||S u − μ u|| ≤ ``tol`` (or after ``max_iters``).
    Works in S's dtype; two n × (r + p) blocks besides the QR's.
    """
    n = s.shape[0]
    k = min(n, r + p)
    block = np.random.default_rng(seed).standard_normal((n, k), dtype=s.dtype.type)
    q = _orthonormal(block)
    del block
    mu, res = _rayleigh_ritz(s, q)
    for it in range(max_iters):
        if res[:r].max() <= tol:
            break
        t = time.time()
        q = _orthonormal(chebyshev_filter(s, q, degree, cut=float(mu[-1]), lower=lower))
        mu, res = _rayleigh_ritz(s, q)
        log.info(
            "chebyshev iteration %d: λ_1 %.6f, λ_r %.6f, cut %.6f, max residual of the top r %.1e (%.1f s)",
            it + 1,
            mu[0],
            mu[r - 1],
            mu[-1],
            res[:r].max(),
            time.time() - t,
        )
    return mu[:r].astype(np.float64), q[:, :r]


def chebyshev_filter(
    s: sp.csr_matrix, x: np.ndarray, degree: int, cut: float, lower: float = -1.0, top: float = 1.0
) -> np.ndarray:
    """T_d(t(S)) X / T_d(t(top)) by the scaled three-term recurrence, overwriting X.

    With σ_j = T_{j−1}(τ)/T_j(τ), τ = t(top): Y_{j+1} = σ_{j+1}(2 t(S) Y_j − σ_j Y_{j−1}), σ_{j+1} = 1/(2τ − σ_j),
    so the wanted end stays O(1) in float32 while the unwanted interval shrinks by T_d(τ).
    """
    e, c = (cut - lower) / 2, (cut + lower) / 2
    tau = (top - c) / e
    sigma = 1 / tau
    prev, cur = x, np.zeros_like(x)
    combine_product(s, prev, sigma / e, -sigma * c / e, 0.0, cur)  # Y_1 = σ_1 t(S) Y_0
    for _ in range(1, degree):
        nxt = 1 / (2 * tau - sigma)
        combine_product(s, cur, 2 * nxt / e, -2 * nxt * c / e, -nxt * sigma, prev)  # into Y_{j−1}'s buffer
        prev, cur, sigma = cur, prev, nxt
    return cur


def _orthonormal(b: np.ndarray) -> np.ndarray:
    """An orthonormal basis of b's columns, row-major for the sparse products (b is overwritten).

    CholeskyQR2 ([ext] Fukaya et al. 2014): b ← b R⁻¹ with RᵀR = bᵀb, twice, the Gram in float64 —
    matrix products only: 15 s against 35 s for LAPACK's Householder QR on a 1M × 500 float32 block.
    Householder QR (LAPACK) when the Gram is numerically singular or the first pass left b far from
    orthonormal (an ill-conditioned block).
    """
    b = np.ascontiguousarray(b)
    try:
        _cholesky_qr_pass(b)
        _cholesky_qr_pass(b, max_departure=0.5)
        return b
    except np.linalg.LinAlgError:
        q = scipy.linalg.qr(b, mode="economic", overwrite_a=True, check_finite=False)[0]
        del b
        return np.ascontiguousarray(q)


def _cholesky_qr_pass(b: np.ndarray, max_departure: float = np.inf, rows: int = 1 << 14) -> None:
    """b ← b R⁻¹ in place, RᵀR = bᵀb (float64 Gram over row chunks); LinAlgError if that is unsafe."""
    g = np.zeros((b.shape[1], b.shape[1]))
    for a in range(0, b.shape[0], rows):
        c = b[a : a + rows].astype(np.float64)
        g += c.T @ c
    if not np.all(np.isfinite(g)) or np.abs(g - np.eye(len(g))).max() > max_departure:
        raise np.linalg.LinAlgError("block too far from orthonormal for Cholesky QR")
    r = np.linalg.cholesky(g).T  # upper triangular, raises LinAlgError unless g is positive definite
    r_inv = scipy.linalg.solve_triangular(r, np.eye(len(r)), check_finite=False).astype(b.dtype)
    for a in range(0, b.shape[0], rows):
        b[a : a + rows] = b[a : a + rows] @ r_inv


def _rayleigh_ritz(s: sp.csr_matrix, q: np.ndarray, rows: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Rotate orthonormal Q (in place) onto the Ritz vectors of S in span(Q); return Ritz values
    (descending) and residual norms ||S u − μ u||, without a third n × k block (rows in chunks)."""
    sq = combine_product(s, q, 1.0, 0.0, 0.0, np.empty_like(q))
    c = (q.T @ sq).astype(np.float64)
    mu, v = np.linalg.eigh(0.5 * (c + c.T))
    mu, v = mu[::-1], np.ascontiguousarray(v[:, ::-1]).astype(q.dtype)
    res2 = np.zeros(len(mu))
    for a in range(0, q.shape[0], rows):
        qv = q[a : a + rows] @ v
        res2 += (((sq[a : a + rows] @ v) - qv * mu.astype(q.dtype)) ** 2).sum(axis=0, dtype=np.float64)
        q[a : a + rows] = qv
    return mu, np.sqrt(res2)


def sparsify(u: np.ndarray, keep: float = 0.01, as_csr: bool = False) -> np.ndarray | sp.csr_matrix:
    """SHybrid / FSR.SPARSE: zero all but the ``keep`` fraction of entries of U with largest |value|.

    ``as_csr`` returns a sparse matrix, so the products with U cost O(nnz) in :func:`hybrid`.
    """
    if keep >= 1:
        return sp.csr_matrix(u) if as_csr else u
    flat = np.abs(u).ravel()
    n_keep = max(1, int(round(keep * flat.size)))
    thresh = np.partition(flat, flat.size - n_keep)[flat.size - n_keep]
    if as_csr:
        rows, cols = np.nonzero(np.abs(u) >= thresh)
        return sp.csr_matrix((u[rows, cols], (rows, cols)), shape=u.shape)
    return np.where(np.abs(u) >= thresh, u, 0.0)


def fsr_embeddings(u: np.ndarray, lam: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Database embeddings U h(Λ)^½ (T:19405-19439): scores are their dot products with a query's."""
    return u * np.sqrt(h_filter(lam, alpha))[None, :]


def fsr(u: np.ndarray | sp.csr_matrix, lam: np.ndarray, y: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """x = U h(Λ) Uᵀ y for every column of y (n, m), in y's dtype (U dense, or CSR for FSR.SPARSE)."""
    return reconstruct(u, h_filter(lam, alpha).astype(y.dtype)[:, None] * project(u, y))


def fsr_weighted(x: np.ndarray, u: np.ndarray | sp.csr_matrix, q_sims: np.ndarray) -> np.ndarray:
    """FSRw (T:19561-19580): x'_i = x_i + (1 − η_i) v_iᵀq, η_i the ℓ2 norm of row i of U, in place.

    A blend of manifold and Euclidean search: rows well represented by the rank-r basis (η → 1)
    keep their FSR score, uncommon ones (η → 0, e.g. outside the decomposed component) fall back
    to their similarity ``q_sims`` (n, m) to the query ("essential at large scale", T:19716-19721).
    """
    eta = np.sqrt(np.asarray(u.multiply(u).sum(axis=1)).ravel() if sp.issparse(u) else np.einsum("ij,ij->i", u, u))
    x += (1 - eta).astype(x.dtype)[:, None] * q_sims
    return x


def hybrid(
    s: sp.spmatrix,
    u: np.ndarray | sp.csr_matrix,
    lam: np.ndarray,
    y: np.ndarray,
    alpha: float = ALPHA,
    iters: int = 5,
    tol: float = 0.0,
) -> np.ndarray:
    """x = U g(Λ) Uᵀ y + x_t, x_t by ``iters`` CG iterations on L_α(S − UΛUᵀ) x_t = y (T:20158-20207).

    U dense, or CSR for SHybrid (its products then cost O(nnz(U)) by compiled kernels). Per CG
    iteration: one sparse product with S fused with the shift, and Uᵀz, U(ΛUᵀz) — except the first,
    whose direction p₀ = r₀ = y has Uᵀy computed once for x_s as well.
    """
    y = np.asarray(y)
    dt = y.dtype if y.dtype in (np.float32, np.float64) else np.float64
    y = np.ascontiguousarray(y, dtype=dt)
    s = sp.csr_matrix(s, dtype=dt)
    u = u.astype(dt, copy=False)
    lam = np.asarray(lam, dt)
    uty = project(u, y)
    known = [uty]  # Uᵀp₀ for CG's first product

    def matvec(z: np.ndarray) -> np.ndarray:  # L_α(S − UΛUᵀ) z = ((I − αS) z + α U Λ Uᵀ z) / (1 − α)
        utz = known.pop() if known else project(u, z)
        out = combine_product(s, z, -alpha / (1 - alpha), 1 / (1 - alpha), 0.0, np.empty_like(z))
        return reconstruct(u, (alpha / (1 - alpha)) * lam[:, None] * utz, out)

    x_t, _ = cg(matvec, y, tol, iters) if iters > 0 else (np.zeros_like(y), None)
    return reconstruct(u, g_filter(lam, alpha).astype(dt)[:, None] * uty, x_t)  # x_t + x_s


def project(u: np.ndarray | sp.csr_matrix, z: np.ndarray) -> np.ndarray:
    """Uᵀ Z (r, m) for dense or CSR U (n, r)."""
    if not sp.issparse(u):
        return u.T @ z
    u = sp.csr_matrix(u)
    z = np.ascontiguousarray(z, dtype=u.dtype)
    return _csr_project(u.indptr, u.indices, u.data, z, u.shape[1])


def reconstruct(u: np.ndarray | sp.csr_matrix, c: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """U C (n, m) for dense or CSR U (n, r); with ``out``, out += U C in place (and returned)."""
    if not sp.issparse(u):
        return u @ c if out is None else np.add(out, u @ c, out=out)
    u = sp.csr_matrix(u)
    if out is None:
        out = np.zeros((u.shape[0], c.shape[1]), np.result_type(u.dtype, c.dtype))
    _csr_expand_add(u.indptr, u.indices, u.data, np.ascontiguousarray(c, dtype=out.dtype), out)
    return out


_CHUNKS = 64


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _csr_project(indptr, indices, data, z, r):
    n, m = z.shape
    part = np.zeros((_CHUNKS, r, m), z.dtype)
    for c in numba.prange(_CHUNKS):
        acc = part[c]
        for i in range(c * n // _CHUNKS, (c + 1) * n // _CHUNKS):
            zi = z[i]
            for e in range(indptr[i], indptr[i + 1]):
                v, row = data[e], acc[indices[e]]
                for j in range(m):
                    row[j] += v * zi[j]
    return part.sum(axis=0)


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _csr_expand_add(indptr, indices, data, c, out):
    n, m = out.shape
    for i in numba.prange(n):
        oi = out[i]
        for e in range(indptr[i], indptr[i + 1]):
            v, ci = data[e], c[indices[e]]
            for j in range(m):
                oi[j] += v * ci[j]
