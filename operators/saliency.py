"""Object discovery by graph centrality: feature saliency, EGM regions, object saliency and the
saliency-based global descriptor (spec search §9a; seed 002 T:23380-23880, "Graph-based object
saliency": FS.egm / OS.egm).

One image's activation map A (C, H, W) ≥ 0 at one scale:

- Feature saliency (T:23394-23436): b_j = log(((a + ε)ᵀ1) / (a_j + ε)), a_j the fraction of non-zero
  positions of channel j; F = Σ_j b_j A_j; F̂ = F normalised as CroW does (ℓ2, then square root),
  here also divided by its maximum so that the mask threshold τ is relative.
- Regions (T:23445-23549): the expanding Gaussian mixture (EGM) of :func:`egm` on the map masked
  at τ and raised to ρ (T:23919-23924).
- Region descriptor z = GeM of A over the region (p = 3, eq. 10), ν(z) and the index's whitening w;
  region feature saliency f = mean of F̂ over the region (eq. 9).
- Object saliency (eq. 16, T:23786-23822): S_p = F̂_p^θ Σ_{i∈N_p} s(v_i, u_p) f_i^θ g*_i, with u_p = w(max
  over the a × a patch at p), N_p its nearest regions of the dataset, s = [vᵀu]₊^β and g* the
  regions' Katz centrality (the graph is built by the job).
- Saliency-based descriptor (T:23824-23865): Σ over EGM regions of the OS map of ν(GeM), whitened
  once (whitening is the caller's, after combining the scales as the index does).

Where the seed is silent the choices are ours and documented in :class:`SaliencyParams`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from operators.constraints import Count, OpenUnit, PosFinite, Probability


@dataclass
class SaliencyParams:
    fs_rho: PosFinite = 7.0  # FS detection exponent ρ (T:23946-23951)
    os_rho: PosFinite = 2.0  # OS detection exponent ρ (T:23981-23988)
    sigma: PosFinite = 2.5  # EGM scale σ, both maps (T:23951-23955, T:23988)
    tau: Probability = 0.01  # mask threshold τ (journal, T:23919-23922), relative to the map's maximum
    theta: PosFinite = 3.0  # θ = Θ of eq. 16 (journal, T:23926-23927)
    gem_p: PosFinite = 3.0  # GeM exponent of region descriptors (the index's p)
    egm_iters: Count = 30  # EGM iterations at most (stops earlier when no component is purged)
    max_regions: Count = 10  # strongest EGM regions kept per image and scale (ours: bounds the region graph)
    patch: Count = 3  # a: patch side in map cells (ours; not stated in the seed)
    patch_neighbours: Count = 10  # |N_p| (ours; not stated)
    k: Count = 10  # region graph: mutual kNN (ours; not stated)
    beta: PosFinite = 3.0  # s = [vᵀu]₊^β (ours: the image graphs' γ)
    alpha: OpenUnit = 0.99  # Katz: L_α g = 1 (the diffusion α)


def feature_saliency(a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """F̂ (H, W) in [0, 1] of an activation map (C, H, W) ≥ 0 (eq. 1-2, CroW normalisation)."""
    nonzero = (a > 0).mean(axis=(1, 2))
    b = np.log((nonzero + eps).sum() / (nonzero + eps))
    f = np.tensordot(b.astype(a.dtype), a, axes=1)
    f = np.sqrt(f / max(float(np.linalg.norm(f)), 1e-12))  # CroW: ℓ2 normalise, power 1/2
    return f / max(float(f.max()), 1e-12)


def _gauss(d2: np.ndarray, var_y: np.ndarray, var_x: np.ndarray) -> np.ndarray:
    """N(0 | ·, diag(var_y, var_x)) given the squared offsets d2 = (dy², dx²) broadcast."""
    return np.exp(-0.5 * (d2[0] / var_y + d2[1] / var_x)) / (2 * np.pi * np.sqrt(var_y * var_x))


def _overlap(mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """⟨N(·|μ_k, Σ_k), N(·|μ_j, Σ_j)⟩ = N(μ_k | μ_j, Σ_k + Σ_j) for every pair (diagonal Σ)."""
    d2 = (mu[:, None, :] - mu[None, :, :]) ** 2
    v = var[:, None, :] + var[None, :, :]
    return _gauss((d2[..., 0], d2[..., 1]), v[..., 0], v[..., 1])


def egm(
    s: np.ndarray, sigma: float, rho: float, tau: float, iters: int = 30, max_regions: int | None = None
) -> np.ndarray:
    """Rectangular regions (m, 4) as [y0, x0, y1, x1) map cells, strongest first, by the expanding
    Gaussian mixture of a saliency map ``s`` (H, W) (T:23445-23549).

    Samples are the cells p_i with s ≥ τ·max s, of mass m_i = (s_i / max s)^ρ, each the function
    m_i N(x | p_i, σI) (eq. 3); components q_k = π_k N(x | μ_k, Σ_k), Σ_k diagonal, start as the samples
    (eq. 4). E-step: γ_ik ∝ ⟨s_i, q_k⟩ = m_i π_k N(p_i | μ_k, Σ_k + σI) (eq. 5). M-step (eq. 6-8) with
    each sample weighted by its mass (the sums of eq. 6-8 over functions rather than points):
    π_k ∝ Σ_i m_i γ_ik, μ_k, and Σ_k = the weighted scatter + σI (a sample function's own spread).
    P-step: in descending π, component k is purged when the components kept so far explain it more
    than it explains itself: Σ_{j kept} ⟨q_k, q_j⟩ > ⟨q_k, q_k⟩ (a generalized responsibility < ½). The
    mixture stops when an iteration purges nothing. A component becomes the box μ ± √3·std (the
    spread of a uniform rectangle).
    """
    peak = float(s.max()) if s.size else 0.0
    if peak <= 0:
        return np.zeros((0, 4), np.int64)
    keep = s >= tau * peak
    ys, xs = np.nonzero(keep)
    p = np.stack([ys, xs], 1).astype(np.float64)
    mass = (s[keep] / peak).astype(np.float64) ** rho
    mu, var, pi = p.copy(), np.full_like(p, sigma), mass / mass.sum()
    for _ in range(iters):
        d2 = (p[:, None, :] - mu[None, :, :]) ** 2
        lik = pi[None, :] * _gauss((d2[..., 0], d2[..., 1]), var[None, :, 0] + sigma, var[None, :, 1] + sigma)
        gamma = lik / np.maximum(lik.sum(1, keepdims=True), 1e-300)
        w = gamma * mass[:, None]
        n_k = np.maximum(w.sum(0), 1e-300)
        pi = n_k / n_k.sum()
        mu = (w.T @ p) / n_k[:, None]
        var = np.stack([(w * (p[:, None, d] - mu[None, :, d]) ** 2).sum(0) for d in (0, 1)], 1) / n_k[:, None] + sigma
        kept = _purge(mu, var, pi)
        purged = len(kept) < len(pi)
        mu, var, pi = mu[kept], var[kept], pi[kept] / pi[kept].sum()
        if not purged:
            break
    return _boxes(mu, var, pi, s.shape, max_regions)


def _purge(mu: np.ndarray, var: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Indices of the components the P-step keeps, in descending π."""
    order = np.argsort(-pi, kind="stable")
    inner = _overlap(mu[order], var[order]) * pi[order][None, :]  # ⟨q_k, q_j⟩ / π_k
    kept: list[int] = []
    for r in range(len(order)):
        if not kept or inner[r, kept].sum() <= inner[r, r]:
            kept.append(r)
    return order[kept]


def _boxes(mu: np.ndarray, var: np.ndarray, pi: np.ndarray, shape: tuple[int, int], limit: int | None) -> np.ndarray:
    order = np.argsort(-pi, kind="stable")[:limit]
    half = np.sqrt(3 * var[order])
    lo = np.clip(np.floor(mu[order] - half + 0.5), 0, np.array(shape) - 1)
    hi = np.clip(np.ceil(mu[order] + half + 0.5), lo + 1, np.array(shape))
    return np.concatenate([lo, hi], 1).astype(np.int64)


def region_gem(a: np.ndarray, boxes: np.ndarray, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    """ν(GeM) of A (C, H, W) over each box (m, 4) → (m, C) (eq. 10), through summed-area tables."""
    sat = np.zeros((a.shape[0], a.shape[1] + 1, a.shape[2] + 1))
    sat[:, 1:, 1:] = np.maximum(a, eps).astype(np.float64) ** p
    sat = sat.cumsum(1).cumsum(2)
    y0, x0, y1, x1 = boxes.T
    total = sat[:, y1, x1] - sat[:, y0, x1] - sat[:, y1, x0] + sat[:, y0, x0]
    z = np.maximum(total / ((y1 - y0) * (x1 - x0)), eps**p) ** (1.0 / p)  # differences can round below 0
    return l2n(z.T.astype(np.float32))


def region_mean(f: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mean of a map (H, W) over each box: the regions' feature saliency (eq. 9)."""
    return np.array([f[y0:y1, x0:x1].mean() for y0, x0, y1, x1 in boxes], np.float32)


def patch_max(a: np.ndarray, side: int) -> np.ndarray:
    """ν(max of A over the side × side patch centred at each position) → (H·W, C), row-major."""
    c, h, w = a.shape
    r = side // 2
    pad = np.pad(a, ((0, 0), (r, side - 1 - r), (r, side - 1 - r)), constant_values=0)
    win = np.lib.stride_tricks.sliding_window_view(pad, (side, side), axis=(1, 2))  # (C, H, W, side, side)
    return l2n(win.max(axis=(-2, -1)).reshape(c, h * w).T.astype(np.float32))


def object_saliency(
    fhat: np.ndarray, sims: np.ndarray, neighbours: np.ndarray, f: np.ndarray, g: np.ndarray, beta: float, theta: float
) -> np.ndarray:
    """S (H, W) of eq. 16 from each position's nearest regions: ``sims``/``neighbours`` (H·W, n), −1 where
    none; ``f``, ``g`` the regions' feature saliency and centrality."""
    valid = neighbours >= 0
    nb = np.where(valid, neighbours, 0)
    terms = np.maximum(sims, 0) ** beta * f[nb] ** theta * g[nb]
    return fhat**theta * np.where(valid, terms, 0).sum(1).reshape(fhat.shape)


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
