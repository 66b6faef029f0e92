"""One image's regions for object discovery (``jobs.objects``), built on :mod:`operators.saliency`: FS.egm
regions with their feature saliency and descriptors (pass 1), the search over every region and OS.egm regions
from the object-saliency map (pass 2), and the combination of an image's per-scale descriptors.
"""

from __future__ import annotations

import numpy as np

from operators.global_index import iter_blocks
from operators.knn import drop_groups, knn_blocks, search_ivf
from operators.saliency import (
    SaliencyParams,
    egm,
    feature_saliency,
    l2n,
    object_saliency,
    patch_max,
    region_gem,
    region_mean,
)
from operators.whitening import Whitening


def whiten(x: np.ndarray, white: Whitening | None) -> np.ndarray:
    """The index's global whitening of ``x``, or ℓ2-normalisation when the index has none."""
    return white(x) if white is not None else l2n(x)


def _boxes_or_whole(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """EGM's boxes, or the whole map when the map held nothing above the mask."""
    return boxes if len(boxes) else np.array([[0, 0, shape[0], shape[1]]], np.int64)


def fs_regions(a: np.ndarray, p: SaliencyParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FS.egm on one activation map (C, H, W): boxes, their feature saliency and ν(GeM) descriptors."""
    fhat = feature_saliency(a)
    boxes = _boxes_or_whole(egm(fhat, p.sigma, p.fs_rho, p.tau, p.egm_iters, p.max_regions), fhat.shape)
    return boxes, region_mean(fhat, boxes), region_gem(a, boxes, p.gem_p)


def region_search(vectors: np.ndarray, index_bytes: bytes | None, nprobe: int):
    """``search(u, k) -> (sims, region rows)`` over every region: exact blocks, or the faiss IVF index the
    driver built when the regions are many (``objects.knn.ivf_threshold``)."""
    if index_bytes is None:
        return lambda u, k: knn_blocks(u, iter_blocks(np.arange(len(vectors)), vectors), k)
    import faiss

    index = faiss.deserialize_index(np.frombuffer(index_bytes, np.uint8))
    return lambda u, k: search_ivf(index, u, k, nprobe)


def os_boxes(
    a: np.ndarray,
    image_id: int,
    search,
    region_image: np.ndarray,
    f: np.ndarray,
    g: np.ndarray,
    white: Whitening | None,
    p: SaliencyParams,
    extra: int,
) -> np.ndarray:
    """OS.egm regions of one activation map: S from each patch's nearest regions of other images (eq. 16)."""
    fhat = feature_saliency(a)
    u = whiten(patch_max(a, p.patch), white)
    sims, nb = search(u, p.patch_neighbours + extra)
    sims, nb = drop_groups(sims, nb, region_image, np.full(len(u), image_id), p.patch_neighbours)
    s = object_saliency(fhat, sims, nb, f, g, p.beta, p.theta)
    return _boxes_or_whole(egm(s, p.sigma, p.os_rho, p.tau, p.egm_iters, p.max_regions), fhat.shape)


def combine_scales(per_scale: list[np.ndarray], gem_p: float) -> np.ndarray:
    """An image's per-scale descriptors combined by GeM as the index combines its scales (torch loads here)."""
    import torch

    from operators.gem import multiscale_gem

    return multiscale_gem([torch.from_numpy(np.asarray(x, np.float32))[None] for x in per_scale], gem_p)[0].numpy()
