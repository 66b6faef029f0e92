"""Generalized-mean (GeM) pooling and its multi-scale combination.

GeM (GeM TPAMI eq.1-3, seed 002 L2590-2640; thesis eq.10 L309-316):
    f_k = ( 1/|X_k| Σ_{x∈X_k} x^p )^{1/p},   p = 3,
with p → ∞ giving MAC and p = 1 SPoC; the result is L2-normalised (L2765-2769).
Multi-scale (L2903-2916, L3497-3503): per-scale descriptors are combined by a generalized mean
with the same p, then L2-normalised; each per-scale vector is L2-normalised first [ext: cirtorch
``extract_ms``].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM over the spatial dims of ``x`` (B, C, H, W) -> (B, C). Activations are clamped at ``eps``."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def l2n(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1, eps=eps)


def multiscale_gem(per_scale: list[torch.Tensor], p: float = 3.0) -> torch.Tensor:
    """Combine per-scale GeM vectors (each (B, C)): L2 each, generalized mean with ``p``, L2."""
    stacked = torch.stack([l2n(v) for v in per_scale])  # (S, B, C), non-negative
    return l2n(stacked.clamp(min=0).pow(p).mean(dim=0).pow(1.0 / p))
