"""Object discovery operators (spec search §9a) against their written-out definitions."""

from __future__ import annotations

import numpy as np
import pytest

from operators.knn import drop_groups
from operators.saliency import egm, feature_saliency, object_saliency, patch_max, region_gem, region_mean


def sparse_map(seed: int = 0, c: int = 16, h: int = 6, w: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((c, h, w)) * (rng.random((c, h, w)) < 0.4)).astype(np.float32)


def test_feature_saliency_is_the_idf_weighted_channel_sum_normalised_as_crow():
    a = sparse_map()
    c, h, w = a.shape
    frac = np.array([(a[j] > 0).sum() / (h * w) for j in range(c)])
    b = np.log((frac + 1e-6).sum() / (frac + 1e-6))  # eq. 1
    f = sum(b[j] * a[j] for j in range(c))  # eq. 2
    f = np.sqrt(f / np.sqrt((f**2).sum()))  # CroW: ℓ2, power 1/2
    assert np.allclose(feature_saliency(a), f / f.max(), atol=1e-6)
    dense = np.ones((3, 4, 4), np.float32)
    dense[0] = 0
    dense[0, 0, 0] = 1
    assert feature_saliency(dense)[0, 0] == 1.0  # the sparse channel is amplified where it fires


def blobs(centres, shape=(24, 32), spread=4.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return sum(h * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * spread)) for y, x, h in centres)


@pytest.mark.parametrize("rho", [1.0, 2.0, 7.0])
def test_egm_finds_one_box_per_separated_blob_strongest_first(rho):
    s = blobs([(6, 8, 1.0), (17, 25, 0.7)])
    boxes = egm(s, sigma=2.5, rho=rho, tau=0.01)
    assert len(boxes) == 2
    for (y, x), (y0, x0, y1, x1) in zip([(6, 8), (17, 25)], boxes):
        assert y0 <= y < y1 and x0 <= x < x1 and (y1 - y0) < 16 and (x1 - x0) < 20


def test_egm_edges_empty_map_single_blob_and_mask():
    assert egm(np.zeros((5, 5)), 2.5, 1, 0.01).shape == (0, 4)
    one = egm(blobs([(10, 10, 1.0)]), 2.5, 1, 0.01)
    assert len(one) == 1 and one[0, 0] <= 10 < one[0, 2]
    # a faint blob below the mask threshold is no region at all
    faint = blobs([(5, 5, 1.0), (18, 26, 0.005)], spread=1.0)
    assert len(egm(faint, 2.5, 1, 0.01)) == 1
    assert len(egm(blobs([(5, 5, 1.0), (18, 26, 0.5)]), 2.5, 1, 0.01, max_regions=1)) == 1


def test_region_gem_and_mean_equal_direct_pooling():
    a = sparse_map(1)
    boxes = np.array([[0, 0, 6, 8], [1, 2, 4, 5], [5, 7, 6, 8]])
    z = region_gem(a, boxes, p=3.0)
    for box, row in zip(boxes, z):
        y0, x0, y1, x1 = box
        g = (np.maximum(a[:, y0:y1, x0:x1], 1e-6).astype(np.float64) ** 3).mean(axis=(1, 2)) ** (1 / 3)
        assert np.allclose(row, g / np.linalg.norm(g), atol=1e-5)
    hole = (np.random.default_rng(0).random((4, 24, 32)) * 6).astype(np.float32)
    hole[:, 10:14, 10:14] = 0  # the summed-area table's differences round below 0 in the silent square
    assert np.isfinite(region_gem(hole, np.array([[10, 10, 14, 14]]))).all()
    f = np.arange(48, dtype=np.float32).reshape(6, 8)
    assert np.allclose(region_mean(f, boxes), [f.mean(), f[1:4, 2:5].mean(), f[5, 7]])


def test_patch_max_is_the_normalised_max_over_each_centred_patch():
    a = sparse_map(2)
    c, h, w = a.shape
    u = patch_max(a, 3)
    for y in range(h):
        for x in range(w):
            m = a[:, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].max(axis=(1, 2))
            assert np.allclose(u[y * w + x], m / max(np.linalg.norm(m), 1e-12), atol=1e-6)


def test_object_saliency_is_eq16():
    rng = np.random.default_rng(3)
    fhat = rng.random((2, 3))
    nb = rng.integers(-1, 5, (6, 4))
    sims = rng.uniform(-0.5, 1, (6, 4))
    f, g = rng.random(5), rng.random(5)
    s = object_saliency(fhat, sims, nb, f, g, beta=3.0, theta=3.0)
    for p in range(6):
        want = fhat.flat[p] ** 3 * sum(
            max(0, sims[p, j]) ** 3 * f[i] ** 3 * g[i] for j, i in enumerate(nb[p]) if i >= 0
        )
        assert np.isclose(s.flat[p], want)


def test_drop_groups_removes_the_querys_own_group_and_pads():
    ids = np.array([[3, 1, 2, 0], [0, -1, 1, 2]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, -np.inf, 0.4, 0.3]], np.float32)
    group = np.array([0, 0, 1, 1])
    s, i = drop_groups(scores, ids, group, np.array([1, 0]), 3)
    assert i.tolist() == [[1, 0, -1], [2, -1, -1]]
    assert s[0, :2].tolist() == pytest.approx([0.8, 0.6]) and s[0, 2] == -np.inf
