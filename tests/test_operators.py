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
    ref = ((an**3 + bn**3) / 2) ** (1 / 3)
    assert torch.allclose(out, ref / ref.norm(), atol=1e-6)


def test_whitening_decorrelates_and_roundtrips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16)) + 3.0
    w = learn_pca_whitening(x, 8)
    y = w(x, normalize=False)
    assert y.shape == (2000, 8)
    assert np.allclose(np.cov(y.T, bias=True), np.eye(8), atol=1e-3)
    w2 = Whitening.from_state(w.state())
    assert np.allclose(w2(x[:5]), w(x[:5]))
    assert np.allclose(np.linalg.norm(w(x[:5]), axis=1), 1.0, atol=1e-5)


def test_rootsift_is_hellinger_map():
    d = np.abs(np.random.default_rng(1).normal(size=(10, 128))).astype(np.float32)
    r = rootsift(d)
    assert np.allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-4)
    assert np.allclose(r**2, d / d.sum(1, keepdims=True), atol=1e-5)


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
    fmap[:, 1, 2] = torch.tensor([3.0, 0.0, 4.0])  # strength 5 at (row 1, col 2)
    fmap[:, 3, 0] = torch.tensor([0.0, 1.0, 0.0])  # strength 1 at (row 3, col 0)
    d, w, p = select_local(fmap, n=2, smoothing=1)
    assert w.tolist() == [5.0, 1.0] and p.tolist() == [[1, 2], [3, 0]]
    assert torch.equal(d[0], fmap[:, 1, 2])
    merged = merge_scales(
        [(d.numpy(), w.numpy(), p.numpy(), 0.5), (d.numpy() * 0, w.numpy() * 2, p.numpy(), 1.0)],
        n=3,
        stride=32,
        base_factor=0.5,
    )
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
    blocks = ((ids[s : s + block], xb[s : s + block]) for s in range(0, 230, block))
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


def test_ranking_align_top_concat_and_lists():
    from operators.ranking import Ranking

    r = Ranking([5, 2], [[7, 8, -1], [9, -1, -1]], [[0.9, 0.5, 3.0], [0.7, 1.0, 2.0]])
    assert np.isneginf(r.scores[0, 2]) and np.isneginf(r.scores[1, 1:]).all()  # padding scores are −inf
    a = r.align(np.array([2, 4, 5]))  # 4 is not held: an empty row
    assert a.ids.tolist() == [[9, -1, -1], [-1, -1, -1], [7, 8, -1]]
    assert r.top(1).ids.tolist() == [[7], [9]] and r.top(4).ids.shape == (2, 4)
    both = Ranking.concat([r.top(1), Ranking([3], [[1, 2, 3, 4]], [[4, 3, 2, 1]])])
    assert both.qids.tolist() == [5, 2, 3] and both.ids[0].tolist() == [7, -1, -1, -1]
    assert r.lists() == ([[7, 8], [9]], [[pytest.approx(0.9), pytest.approx(0.5)], [pytest.approx(0.7)]])


def _fuse_by_hand(ids, asmk, glob, beta, mode):
    """One query, written out: the formulas of operators.fusion."""
    valid = [i for i in range(len(ids)) if ids[i] >= 0]
    if mode == "score":
        a = {i: max(asmk[i], 0) if np.isfinite(asmk[i]) else 0.0 for i in valid}
        g = {i: max(glob[i], 0) ** 3 for i in valid}
        am, gm = max(a.values()), max(g.values())
        s = {i: (a[i] / am if am > 0 else 0) + beta * (g[i] / gm if gm > 0 else 0) for i in valid}
    else:
        in_a = sorted((i for i in valid if np.isfinite(asmk[i])), key=lambda i: -asmk[i])
        by_g = sorted(valid, key=lambda i: -glob[i])
        s = {i: (1 / (60 + in_a.index(i) + 1) if i in in_a else 0) + beta / (60 + by_g.index(i) + 1) for i in valid}
    order = sorted(valid, key=lambda i: (-s[i], ids[i]))
    return [ids[i] for i in order], [s[i] for i in order]


@pytest.mark.parametrize("mode", ["score", "rank"])
def test_fusion_matches_the_formula_per_query(mode):
    from operators.fusion import fuse

    rng = np.random.default_rng(0)
    m, c = 5, 12
    ids = rng.permutation(100)[: m * c].reshape(m, c)
    ids[:, -2:] = -1  # padding
    asmk = rng.random((m, c)) * 3
    asmk[rng.random((m, c)) < 0.4] = -np.inf  # outside the ASMK shortlist
    glob = rng.random((m, c)) * 2 - 0.5  # negative similarities count as 0 in score mode
    got_ids, got_s = fuse(ids, asmk, glob, beta=0.7, k=8, mode=mode)
    for q in range(m):
        want_ids, want_s = _fuse_by_hand(ids[q], asmk[q], glob[q], 0.7, mode)
        assert got_ids[q].tolist() == want_ids[:8]
        assert np.allclose(got_s[q], want_s[:8])


def test_union_candidates_keeps_each_id_once_with_both_scores():
    from operators.fusion import union_candidates
    from operators.ranking import Ranking

    a = Ranking([0], [[3, 1, -1]], [[2.0, 1.0, 0]])
    g = Ranking([0], [[1, 4, 5]], [[0.9, 0.8, 0.1]])
    ids, asmk, glob = union_candidates(a, g)
    got = {int(i): (s, t) for i, s, t in zip(ids[0], asmk[0], glob[0]) if i >= 0}
    assert set(got) == {1, 3, 4, 5}
    assert got[1] == (1.0, pytest.approx(0.9)) and got[3][0] == 2.0 and np.isnan(got[3][1])
    assert np.isneginf(got[4][0]) and got[5][1] == pytest.approx(0.1)


def test_null_level_is_the_tail_of_the_shortlist():
    from operators.fusion import NULL_START, null_level

    scores = np.array([[9.0, 8.0, *np.linspace(1.0, 0.0, 98)]])  # two related items above a tail of unrelated ones
    level = null_level(scores, n_database=100)
    tail = scores[0, int(np.ceil(NULL_START * 100)) :]
    assert level.mu[0] == pytest.approx(tail.mean()) and level.sd[0] == pytest.approx(tail.std())
    # padding: left out, or counted as the channel's floor (ASMK: 0) when told
    padded = np.array([[3.0, 2.0, 1.0, -np.inf, -np.inf]])
    assert null_level(padded, 5).mu[0] == pytest.approx(1.5)  # ranks from ⌈0.05 · 5⌉ = 1 on
    assert null_level(padded, 5, absent=0.0).mu[0] == pytest.approx(np.mean([2.0, 1.0, 0, 0]))
    assert np.all(level.z(np.array([[tail.mean(), -5.0]])) == 0)  # at or below the null level: no evidence


def test_z_fusion_follows_the_channel_that_stands_out_of_its_null_level():
    """Per query, a channel whose candidates do not rise above its own unrelated images adds nothing: fused ranks
    follow the other channel, whichever it is, with no weight set for it."""
    from operators.fusion import fuse, null_level

    rng = np.random.default_rng(0)
    n = 200
    cand = np.tile(np.arange(n), (2, 1))
    sharp = np.where(np.arange(n) < 5, 10.0, 0.0) + rng.normal(0, 0.1, n)  # five items far above the rest
    flat = rng.normal(0.5, 0.05, n)  # nothing stands out
    asmk = np.stack([sharp, flat])  # query 0: ASMK is sure; query 1: global is (below)
    glob = np.stack([flat[::-1], sharp[::-1]])
    srt = lambda x: -np.sort(-x, axis=1)  # noqa: E731  the channels' own shortlists, best first
    null = (null_level(srt(asmk), n, absent=0.0), null_level(srt(glob), n))
    ids, _ = fuse(cand, asmk, glob, 1.0, 5, "z", null)
    assert set(ids[0]) == set(range(5)) and set(ids[1]) == set(range(n - 5, n))
    with pytest.raises(ValueError, match="null levels"):
        fuse(cand, asmk, glob, 1.0, 5, "z")


def test_expand_ranked_gathers_the_top_results_and_masks_padding():
    from operators.qe import expand, expand_ranked

    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[[0, 5]] + 0.1
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    top = np.array([[0, 3, 7], [5, -1, -1]])
    got = expand_ranked(q, top, x[top[top >= 0]], alpha=3.0)
    # by hand: padded ranks take weight 0, i.e. only the results that exist enter
    want = np.stack(
        [expand(q[j : j + 1], x[t[t >= 0]][None], (x[t[t >= 0]] @ q[j])[None], 3.0, 3)[0] for j, t in enumerate(top)]
    )
    assert got.dtype == np.float32 and np.allclose(got, want, atol=1e-6)


def test_neighbour_cosines_gathers_rows_and_zeroes_padding():
    from operators.rerank import neighbour_cosines

    rng = np.random.default_rng(1)
    x, xq = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
    top = np.array([[4, 0, -1], [2, -1, -1]])
    got = neighbour_cosines(xq, top, x)
    assert np.allclose(got, [[xq[0] @ x[4], xq[0] @ x[0], 0], [xq[1] @ x[2], 0, 0]], atol=1e-6)


def test_learned_whitening_whitens_matches_and_diagonalises_non_matches():
    from operators.whitening import learn_lw

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    pos, neg = rng.integers(0, 300, (200, 2)), rng.integers(0, 300, (150, 2))
    w = learn_lw(x, pos, neg, dim=4)
    diff = lambda p: x[p[:, 0]] - x[p[:, 1]]  # noqa: E731
    cs = diff(pos).T @ diff(pos) / len(pos)
    cd = diff(neg).T @ diff(neg) / len(neg)
    p = w.proj.astype(np.float64)
    assert np.allclose(p @ cs @ p.T, np.eye(4), atol=1e-4)
    m = p @ cd @ p.T
    assert np.allclose(m, np.diag(np.diag(m)), atol=1e-4) and np.all(np.diff(np.diag(m)) <= 1e-6)
    # the generalised eigenvalues of (C_D, C_S), largest first
    import scipy.linalg

    assert np.allclose(np.diag(m), np.sort(scipy.linalg.eigh(cd, cs, eigvals_only=True))[::-1][:4], rtol=1e-4)
    assert np.allclose(w.mean, x.mean(0), atol=1e-5) and w(x).shape == (300, 4)


def test_hnsw_assignment_agrees_with_the_exact_words():
    from operators.codebook import AssignConfig, Quantizer

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((4096, 8)).astype(np.float32)
    lift = rng.standard_normal((8, 32)).astype(np.float32)
    centroids = np.tanh(latent @ lift)  # words on a low-dimensional manifold
    x = centroids[rng.integers(0, len(centroids), 2000)] + 0.05 * rng.standard_normal((2000, 32)).astype(np.float32)
    exact = Quantizer(centroids)(x, 5)
    approx = Quantizer(centroids, AssignConfig("hnsw"))(x, 5)
    assert approx.shape == exact.shape == (2000, 5)
    assert (approx[:, 0] == exact[:, 0]).mean() >= 0.98
    assert Quantizer(centroids, AssignConfig("hnsw"))(x[:0]).shape == (0, 1)


def test_synthetic_distractors_mix_donors_and_are_deterministic():
    from operators.distractors import DistractorParams, DonorPool, flip_bits, make_distractor

    rng = np.random.default_rng(0)
    counts = rng.integers(50, 200, 6)
    words = np.concatenate([np.sort(rng.choice(500, c, replace=False)) for c in counts]).astype(np.int32)
    pool = DonorPool(
        rng.random((6, 32)).astype(np.float32),
        np.r_[0, np.cumsum(counts)],
        words,
        rng.integers(0, 256, (counts.sum(), 16), dtype=np.uint8),
    )
    codes = rng.integers(0, 256, (1000, 16), dtype=np.uint8)
    flipped = np.unpackbits(codes ^ flip_bits(codes, 0.1, rng), axis=1).sum(1)
    assert 10 <= flipped.mean() <= 13 and flipped.max() <= 13  # 13 positions drawn per row, a few repeat
    p = DistractorParams()
    a = make_distractor(pool, p, np.random.default_rng([7, 3]))
    b = make_distractor(pool, p, np.random.default_rng([7, 3]))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    g, w, c = a
    assert np.isclose(np.linalg.norm(g), 1, atol=1e-5) and np.all(np.diff(w) > 0) and len(w) == len(c)
    assert set(w.tolist()) <= set(words.tolist())
    sims = pool.globals @ g / np.linalg.norm(pool.globals, axis=1)
    assert sims.max() > 0.9  # near the donors it mixes
