"""HOW-style multi-scale deep local descriptors (HOW ECCV'20, seed 002 L9213-9388, L9518-9527).

Per scale s of the image (max side 1024): U = f(I_s) ∈ R^{W×H×D}; strength w(u) = ||u||_2 on the
raw map (L9301-9307); smoothing h = 3×3 average pooling, stride 1 (L9309-9316; [ext] padding 1,
count_include_pad=False); descriptor o(h(u)) with o the PCA-whitening (L9317-9333). Features of
all scales are merged, ranked by w, and the n = 1000 strongest kept (L9374-9382). Descriptors are
not L2-normalised before quantisation. Whitening is linear, so it is applied after the top-n
selection (same result, less work).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def select_local(fmap: torch.Tensor, n: int, smoothing: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``n`` positions of one map (C, H, W) by strength.

    Returns smoothed descriptors (m, C), strengths (m,) and (row, col) positions (m, 2), m ≤ n.
    """
    strength = fmap.norm(dim=0)  # (H, W)
    if smoothing > 1:
        fmap = F.avg_pool2d(fmap[None], smoothing, stride=1, padding=smoothing // 2, count_include_pad=False)[0]
    flat = strength.flatten()
    top = torch.topk(flat, min(n, flat.numel())).indices
    w = strength.shape[1]
    pos = torch.stack([top // w, top % w], dim=1)
    return fmap.flatten(1)[:, top].T, flat[top], pos


def merge_scales(
    per_scale: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]], n: int, stride: int, base_factor: float
) -> dict:
    """Merge (desc, strength, pos, scale) of all scales and keep the ``n`` strongest.

    Positions become pixel centres of the original image: x = (col + 0.5) · stride / (scale · base_factor).
    """
    desc = np.concatenate([p[0] for p in per_scale])
    strength = np.concatenate([p[1] for p in per_scale])
    pos = np.concatenate([p[2] for p in per_scale]).astype(np.float32)
    scale = np.concatenate([np.full(len(p[1]), p[3], np.float32) for p in per_scale])
    order = np.argsort(-strength, kind="stable")[:n]
    xy = (pos[order][:, ::-1] + 0.5) * stride / (scale[order, None] * base_factor)
    return {
        "local_desc": desc[order],
        "local_strength": strength[order],
        "local_xy": xy.astype(np.float32),
        "local_scale": scale[order],
    }
