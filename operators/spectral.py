"""Fast spectral ranking and hybrid spectral-temporal diffusion (spec search.md §5-§6).

Filter view (T:19049-19078, T:19987-20002): f* = h_α(S) y, h_α(λ) = (1 − α)/(1 − αλ).

FSR (T:19112-19168): S ≈ U Λ Uᵀ from its r largest eigenpairs; x = U h(Λ) Uᵀ y. As embeddings
(T:19405-19439): database row i is (U h(Λ)^½)_i, a query is h(Λ)^½ Uᵀ y, and ranking is a dot product.

Hybrid (T:20133-20207): h_α(S) = U g_α(Λ) Uᵀ + h_α(S − UΛUᵀ), g_α(λ) = h_α(λ) − h_α(0) = (1−α)αλ/(1−αλ).
x = x_s + x_t with x_s = U g(Λ) Uᵀ y and x_t from a few CG iterations on
L_α(S − UΛUᵀ) x_t = y, L_α(A) = (I − αA)/(1 − α). SHybrid zeroes the 99% smallest entries of U
(T:20425-20431). Defaults r = 400, 5 iterations (T:20419-20422).

Eigenpairs: Lanczos (``scipy.sparse.linalg.eigsh``) or FSR's randomised simultaneous iteration
(T:19112-19161) — run on (S + I)/2, whose spectrum is S's shifted into [0, 1], so power iteration
finds the algebraically largest eigenvalues of S (the ones a nondecreasing h needs, T:19257-19285)
and not the negative ones of largest modulus.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from operators.diffusion import ALPHA, cg, shifted_product


def h_filter(lam: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """h_α(λ) = (1 − α)/(1 − αλ)."""
    return (1 - alpha) / (1 - alpha * np.asarray(lam, np.float64))


def g_filter(lam: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """g_α(λ) = h_α(λ) − h_α(0) = (1 − α) α λ / (1 − αλ)."""
    lam = np.asarray(lam, np.float64)
    return (1 - alpha) * alpha * lam / (1 - alpha * lam)


def eigenpairs(s: sp.spmatrix, r: int, method: str = "lanczos", oversample: int = 50, iters: int = 10,
               seed: int = 0, dtype: type = np.float64, tol: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The ``r`` algebraically largest eigenpairs (λ descending, U (n, r) orthonormal) of symmetric S.

    ``dtype`` float32 halves the memory of simultaneous iteration (n × (r + p) blocks) at large n;
    ``tol`` is Lanczos' relative accuracy (0: machine precision; 1e-4 is several times faster).
    """
    n = s.shape[0]
    r = min(r, n)
    if method == "dense" or (method == "lanczos" and r >= n - 1):
        lam, u = np.linalg.eigh(np.asarray(s.todense(), np.float64))
    elif method == "lanczos":
        s64 = sp.csr_matrix(s, dtype=np.float64)
        op = spla.LinearOperator((n, n), matvec=lambda v: shifted_product(s64, v.reshape(n, -1), -1.0) - v.reshape(n, -1),
                                 dtype=np.float64)  # S v by the parallel kernel: (I + S) v − v
        lam, u = spla.eigsh(op, k=r, which="LA", tol=tol, v0=np.random.default_rng(seed).standard_normal(n))
    elif method == "simultaneous":
        lam, u = _simultaneous_iteration(sp.csr_matrix(s, dtype=dtype), r, oversample, iters, seed)
    else:
        raise ValueError(f"eigen method must be lanczos, simultaneous or dense, not {method!r}")
    order = np.argsort(-lam)[:r]
    return lam[order], np.ascontiguousarray(u[:, order])


def _simultaneous_iteration(s: sp.csr_matrix, r: int, p: int, q: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """FSR Algorithm 1 (T:19112-19161) on A = (S + I)/2: B ~ N(0,1); Q R = B; B = A Q (q times); eig QᵀAQ."""
    n = s.shape[0]
    rh = min(n, r + p)
    b = np.random.default_rng(seed).standard_normal((n, rh), dtype=s.dtype.type)
    for _ in range(max(1, q)):
        qm, _ = scipy.linalg.qr(b, mode="economic", overwrite_a=True, check_finite=False)  # in b's dtype
        del b
        b = shifted_product(s, qm, -1.0)  # (I + S) Q by the parallel kernel
        b *= 0.5
    c = (qm.T @ b).astype(np.float64)
    mu, v = np.linalg.eigh(0.5 * (c + c.T))
    return 2 * mu - 1, qm @ v.astype(qm.dtype)  # eigenvalues of S = 2μ − 1


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


def fsr(u: np.ndarray, lam: np.ndarray, y: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """x = U h(Λ) Uᵀ y for every column of y (n, m), in y's dtype."""
    return u @ (h_filter(lam, alpha).astype(y.dtype)[:, None] * (u.T @ y))


def hybrid(s: sp.spmatrix, u: np.ndarray, lam: np.ndarray, y: np.ndarray, alpha: float = ALPHA,
           iters: int = 5, tol: float = 0.0) -> np.ndarray:
    """x = U g(Λ) Uᵀ y + x_t, x_t by ``iters`` CG iterations on L_α(S − UΛUᵀ) x_t = y (T:20158-20207)."""
    y = np.asarray(y)
    dt = y.dtype if y.dtype in (np.float32, np.float64) else np.float64
    y = y.astype(dt, copy=False)
    s = sp.csr_matrix(s, dtype=dt)
    u = u.astype(dt, copy=False)
    lam = np.asarray(lam, dt)
    x_s = u @ (g_filter(lam, alpha).astype(dt)[:, None] * (u.T @ y))

    def matvec(z: np.ndarray) -> np.ndarray:  # L_α(S − UΛUᵀ) z = ((I − αS) z + α U Λ Uᵀ z) / (1 − α)
        return (shifted_product(s, z, alpha) + alpha * (u @ (lam[:, None] * (u.T @ z)))) / (1 - alpha)

    x_t, _ = cg(matvec, y, tol, iters) if iters > 0 else (np.zeros_like(y), None)
    return x_s + x_t
