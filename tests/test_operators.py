"""Unit tests of the pure operators on small arrays."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.gem import gem, multiscale_gem
from operators.how import merge_scales, select_local
from operators.images import BadBoxError, ImageDecodeError, center_box, crop, decode_image, resize_max_side
from operators.knn import knn_blocks
from operators.rootsift import RootSift, rootsift
from operators.whitening import Whitening, learn_pca_whitening


def test_gem_limits():
    x = torch.rand(2, 5, 4, 3) + 0.1
    assert torch.allclose(gem(x, p=1.0), x.mean(dim=(-2, -1)), atol=1e-6)
    # p -> inf tends to MAC: max * n^(-1/p) <= GeM_p <= max
    big, mx = gem(x, p=200.0), x.amax(dim=(-2, -1))
    assert torch.all(big <= mx + 1e-6) and torch.all(big >= mx * 12 ** (-1 / 200) - 1e-6)
    # p = 3 by hand for one channel
    v = x[0, 0].flatten()
    assert torch.isclose(gem(x)[0, 0], v.pow(3).mean().pow(1 / 3), atol=1e-6)


def test_multiscale_gem_is_normalised_generalized_mean():
    a, b = torch.rand(1, 8), torch.rand(1, 8)
    out = multiscale_gem([a, b], p=3.0)
    an, bn = a / a.norm(), b / b.norm()
    ref = ((an ** 3 + bn ** 3) / 2) ** (1 / 3)
    assert torch.allclose(out, ref / ref.norm(), atol=1e-6)


def test_whitening_decorrelates_and_roundtrips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16)) + 3.0
    w = learn_pca_whitening(x, 8)
    y = w(x, normalize=False)
    assert y.shape == (2000, 8)
    assert np.allclose(np.cov(y.T, bias=True), np.eye(8), atol=1e-3)
    w2 = Whitening.from_bytes(w.to_bytes())
    assert np.allclose(w2(x[:5]), w(x[:5]))
    assert np.allclose(np.linalg.norm(w(x[:5]), axis=1), 1.0, atol=1e-5)


def test_rootsift_is_hellinger_map():
    d = np.abs(np.random.default_rng(1).normal(size=(10, 128))).astype(np.float32)
    r = rootsift(d)
    assert np.allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-4)
    assert np.allclose(r ** 2, d / d.sum(1, keepdims=True), atol=1e-5)


def test_rootsift_extractor_on_texture():
    rng = np.random.default_rng(2)
    img = (rng.random((200, 300, 3)) * 255).astype(np.uint8)
    img = np.repeat(np.repeat(img[::4, ::4], 4, 0), 4, 1)[:200, :300]
    out = RootSift(max_side=150, n=50).describe(img)
    assert 0 < len(out["local_desc"]) <= 50
    assert np.all(np.diff(out["local_strength"]) <= 0), "strongest first"
    # coordinates are in the given image's pixels even though SIFT ran on a half-size copy
    assert out["local_xy"][:, 0].max() > 150 and out["local_xy"][:, 0].max() <= 300


def test_images_crop_resize_decode():
    img = np.zeros((100, 200, 3), np.uint8)
    assert crop(img, center_box(200, 100, 0.4)).shape == (40, 80, 3)
    assert crop(img, (np.nan,) * 4).shape == img.shape
    assert crop(img, (-10, -10, 20, 5)).shape == (5, 20, 3)  # clipped to the image
    for bad in ((50, np.nan, 100, np.nan), (100, 10, 50, 80), (300, 0, 400, 50), (-20, -20, -1, -1)):
        with pytest.raises(BadBoxError):
            crop(img, bad)
    small, f = resize_max_side(img, 50)
    assert small.shape[:2] == (25, 50) and f == 0.25
    assert resize_max_side(img, 400)[1] == 1.0, "never enlarges by default"
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image")


def test_select_local_and_merge_positions():
    fmap = torch.zeros(3, 4, 5)
    fmap[:, 1, 2] = torch.tensor([3.0, 0.0, 4.0])   # strength 5 at (row 1, col 2)
    fmap[:, 3, 0] = torch.tensor([0.0, 1.0, 0.0])   # strength 1 at (row 3, col 0)
    d, w, p = select_local(fmap, n=2, smoothing=1)
    assert w.tolist() == [5.0, 1.0] and p.tolist() == [[1, 2], [3, 0]]
    assert torch.equal(d[0], fmap[:, 1, 2])
    merged = merge_scales([(d.numpy(), w.numpy(), p.numpy(), 0.5), (d.numpy() * 0, w.numpy() * 2, p.numpy(), 1.0)],
                          n=3, stride=32, base_factor=0.5)
    assert merged["local_strength"].tolist() == [10.0, 5.0, 2.0]
    assert merged["local_scale"].tolist() == [1.0, 0.5, 1.0]
    # scale 1 of a half-size base: x = (col + 0.5) * 32 / (1.0 * 0.5)
    assert merged["local_xy"][0].tolist() == [2.5 * 64, 1.5 * 64]
    assert merged["local_xy"][1].tolist() == [2.5 * 128, 1.5 * 128]


@pytest.mark.parametrize("block", [7, 50, 1000])
def test_knn_blocks_matches_brute_force(block):
    rng = np.random.default_rng(3)
    xb = rng.normal(size=(230, 16)).astype(np.float32)
    xq = rng.normal(size=(9, 16)).astype(np.float32)
    ids = np.arange(230, dtype=np.int64) * 10 + 5  # non-consecutive ids
    blocks = ((ids[s:s + block], xb[s:s + block]) for s in range(0, 230, block))
    scores, got = knn_blocks(xq, blocks, k=12)
    sims = xq @ xb.T
    ref = np.argsort(-sims, axis=1)[:, :12]
    assert np.array_equal(got, ids[ref])
    assert np.allclose(scores, np.take_along_axis(sims, ref, 1), atol=1e-4)


def test_knn_blocks_excludes_self_and_keeps_k():
    rng = np.random.default_rng(4)
    xb = rng.normal(size=(40, 8)).astype(np.float32)
    ids = np.arange(40, dtype=np.int64)
    exclude = np.array([3, -1, 39], dtype=np.int64)
    scores, got = knn_blocks(xb[[3, 5, 39]], [(ids, xb)], k=5, exclude=exclude)
    assert got.shape == (3, 5)
    assert 3 not in got[0] and 39 not in got[2] and got[1, 0] == 5
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_knn_blocks_pads_when_database_is_small():
    xb = np.eye(3, dtype=np.float32)
    scores, ids = knn_blocks(xb[:1], [(np.arange(3), xb)], k=5)
    assert ids[0, :3].tolist()[0] == 0 and ids[0, 3:].tolist() == [-1, -1]
