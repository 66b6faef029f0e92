"""Our ASMK / ASMK* against the reference PyPI ``asmk`` package: same centroids, same scores.

Random data with clustered descriptors, and real RootSIFT descriptors of instance-mini; binary
and non-binary, with and without IDF, with and without query multiple assignment. Scores must
agree to 1e-5 and the rankings of all matched images must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest

from operators.asmk import AsmkParams, aggregate, build_inverted_file, idf_weights, search
from operators.codebook import Quantizer

asmk_method = pytest.importorskip("asmk.asmk_method")
from asmk import codebook as cdb_pkg  # noqa: E402
from asmk import index as idx_pkg  # noqa: E402


def reference(centroids, xb, ib, xq, iq, p: AsmkParams):
    cdb = cdb_pkg.Codebook(idx_pkg.initialize_index(None), size=len(centroids))
    cdb.index(np.ascontiguousarray(centroids))
    params = {
        "build_ivf": {
            "kernel": {"binary": p.binary},
            "ivf": {"use_idf": p.use_idf},
            "quantize": {"multiple_assignment": p.db_ma},
            "aggregate": {},
        },
        "query_ivf": {
            "quantize": {"multiple_assignment": p.query_ma},
            "aggregate": {},
            "search": {"topk": None},
            "similarity": {"similarity_threshold": p.tau, "alpha": p.alpha},
        },
    }
    method = asmk_method.ASMKMethod(params, {}, codebook=cdb).build_ivf(xb, ib.copy())
    _, qids, ranks, scores = method.query_ivf(xq, iq)
    return qids, ranks, scores


def ours(centroids, xb, ib, xq, iq, p: AsmkParams):
    quant = Quantizer(centroids)
    ivf = build_inverted_file(aggregate(xb, ib, quant(xb, p.db_ma), centroids, p.binary), len(centroids), p.binary)
    weight = idf_weights(ivf.counts, len(ivf.images)) if p.use_idf else None
    q = aggregate(xq, iq, quant(xq, p.query_ma), centroids, p.binary)
    return search(ivf, q, p, k=len(ivf.images), word_weight=weight, buffer_bytes=4096)  # small chunks: several per run


def compare(centroids, xb, ib, xq, iq, p: AsmkParams):
    rq, rranks, rscores = reference(centroids, xb, ib, xq, iq, p)
    qids, scores, ids = ours(centroids, xb, ib, xq, iq, p)
    assert np.array_equal(rq, qids)
    matched = 0
    for j in range(len(qids)):
        ref = dict(zip(rranks[j].tolist(), rscores[j].tolist()))
        got = dict(zip(ids[j].tolist(), scores[j].tolist()))
        assert set(ref) == set(got)
        for img, s in ref.items():
            assert got[img] == pytest.approx(s, abs=1e-5), (j, img)
        pos = rscores[j] > 1e-9
        matched += pos.sum()
        # identical ranking of the matched images (tied scores may come in either order): the same
        # images, and the reference's scores never increase along our ranking
        ours_top = ids[j][: pos.sum()]
        assert set(ours_top.tolist()) == set(rranks[j][pos].tolist())
        assert np.all(np.diff([ref[i] for i in ours_top.tolist()]) <= 1e-9)
    assert matched > 0


def clustered(rng, n_images, per_image, centroids, noise=0.25):
    ids = np.repeat(np.arange(n_images), per_image)
    base = centroids[rng.integers(0, len(centroids), len(ids))]
    x = base + noise * rng.normal(size=base.shape)
    return x.astype(np.float32), ids


@pytest.fixture(scope="module")
def random_data():
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(64, 128)).astype(np.float32)
    xb, ib = clustered(rng, 40, 30, centroids)
    xq, iq = clustered(rng, 6, 25, centroids)
    return centroids, xb, ib, xq, iq


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("use_idf", [False, True])
@pytest.mark.parametrize("query_ma", [1, 5])
def test_random_descriptors(random_data, binary, use_idf, query_ma):
    compare(*random_data, AsmkParams(binary=binary, use_idf=use_idf, query_ma=query_ma))


def test_threshold_and_alpha(random_data):
    compare(*random_data, AsmkParams(binary=True, alpha=2.0, tau=0.25, query_ma=3))


@pytest.fixture(scope="module")
def real_rootsift(instance_mini):
    """RootSIFT of 16 instance-mini images (4 groups); 4 of them, cropped, as queries."""
    import pandas as pd

    from operators.codebook import train_codebook
    from operators.images import center_box, crop, decode_image
    from operators.rootsift import RootSift

    df = pd.read_csv(instance_mini / "images.csv")
    df = pd.concat([df[df.group == g].head(4) for g in ("strecha_herz", "sceaux", "sacre_coeur", "ocv_calib")])
    sift = RootSift(max_side=512, n=300)
    xb, ib, xq, iq = [], [], [], []
    for i, f in enumerate(df.file):
        img = decode_image((instance_mini / f).read_bytes())
        d = sift.describe(img)["local_desc"]
        xb.append(d), ib.append(np.full(len(d), i))
        if i % 4 == 0:
            h, w = img.shape[:2]
            dq = sift.describe(crop(img, center_box(w, h, 0.6)))["local_desc"]
            xq.append(dq), iq.append(np.full(len(dq), i))
    xb, ib = np.concatenate(xb).astype(np.float32), np.concatenate(ib)
    centroids = train_codebook(xb, 128, seed=0)
    return centroids, xb, ib, np.concatenate(xq).astype(np.float32), np.concatenate(iq)


@pytest.mark.parametrize(
    "binary,use_idf,query_ma", [(True, False, 5), (False, False, 5), (True, True, 1), (False, True, 3)]
)
def test_real_rootsift(real_rootsift, binary, use_idf, query_ma):
    compare(*real_rootsift, AsmkParams(binary=binary, use_idf=use_idf, query_ma=query_ma))


@pytest.mark.parametrize("shuffle", [False, True])
def test_blocked_aggregation_equals_one_pass(random_data, shuffle):
    from operators.asmk import aggregate

    centroids, xb, ib, _, _ = random_data
    ids = ib.copy()
    if shuffle:  # an image split over two runs: the one-pass path must be taken
        ids[:5] = ids[-1]
    words = Quantizer(centroids)(xb, 2)
    a, b = aggregate(xb, ids, words, centroids, block_rows=97), aggregate(xb, ids, words, centroids, block_rows=10**9)
    for f in ("image_ids", "words", "codes"):
        assert np.array_equal(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("binary,block_rows", [(True, 97), (False, 97), (True, 10**9)])
def test_two_pass_build_equals_aggregate_then_build(random_data, binary, block_rows):
    from operators.asmk import aggregate, build_index

    centroids, xb, ib, _, _ = random_data
    words = Quantizer(centroids)(xb)
    ref = build_inverted_file(aggregate(xb, ib, words, centroids, binary), len(centroids), binary)
    got = build_index(xb, ib, words, centroids, binary, block_rows=block_rows)
    for f in ("offsets", "entry_image", "codes", "images", "image_entries"):
        assert np.array_equal(getattr(got, f), getattr(ref, f)), f


@pytest.mark.parametrize("use_idf,tau", [(False, 0.0), (True, 0.2)])
def test_compiled_and_numpy_accumulation_agree(random_data, use_idf, tau):
    from operators.asmk import aggregate

    centroids, xb, ib, xq, iq = random_data
    p = AsmkParams(use_idf=use_idf, tau=tau)
    quant = Quantizer(centroids)
    ivf = build_inverted_file(aggregate(xb, ib, quant(xb), centroids), len(centroids))
    weight = idf_weights(ivf.counts, len(ivf.images)) if use_idf else None
    q = aggregate(xq, iq, quant(xq, 5), centroids)
    a = search(ivf, q, p, k=10, word_weight=weight, use_numba=True)
    b = search(ivf, q, p, k=10, word_weight=weight, use_numba=False)
    assert np.array_equal(a[2], b[2]) and np.allclose(a[1], b[1], atol=1e-12)
    c = search(ivf, q, p, k=10, word_weight=weight, threads=3)
    assert np.array_equal(a[1], c[1]) and np.array_equal(a[2], c[2])


def test_postings_read_back_per_image_equal_the_aggregation(random_data):
    """The transposed inverted file gives back exactly each image's aggregated entries (ASMK graph queries)."""
    from operators.asmk import aggregate, entries_by_image, image_postings

    centroids, xb, ib, _, _ = random_data
    agg = aggregate(xb, ib, Quantizer(centroids)(xb), centroids)
    ivf = build_inverted_file(agg, len(centroids))
    offsets, positions = entries_by_image(ivf)
    assert np.array_equal(np.diff(offsets), ivf.image_entries)
    assert np.array_equal(positions, np.argsort(ivf.entry_image, kind="stable"))
    dense = np.array([3, 0, 17])
    got = image_postings(ivf, offsets, positions, dense)
    for img in ivf.images[dense]:
        mine, theirs = got.image_ids == img, agg.image_ids == img
        order = np.argsort(got.words[mine])
        assert np.array_equal(got.words[mine][order], agg.words[theirs])
        assert np.array_equal(got.codes[mine][order], agg.codes[theirs])
    assert set(got.image_ids.tolist()) == set(ivf.images[dense].tolist())


@pytest.mark.parametrize("tile_images", [256, 7, 1])
def test_the_tiled_kernel_fills_the_buffer_of_the_untiled_one_bit_for_bit(random_data, tile_images):
    """Over the images in tiles (the search's kernel) or in one sweep: the same sums, added in the same order."""
    from operators.asmk import _binary_kernel, _binary_kernel_tiled, aggregate, image_norms, selectivity

    centroids, xb, ib, xq, iq = random_data
    quant = Quantizer(centroids)
    ivf = build_inverted_file(aggregate(xb, ib, quant(xb), centroids), len(centroids))
    q = aggregate(xq, iq, quant(xq, 5), centroids)
    order = np.lexsort((q.image_ids, q.words))
    words, qimg = q.words[order].astype(np.int64), np.unique(q.image_ids, return_inverse=True)[1][order]
    bounds = np.flatnonzero(np.r_[True, words[1:] != words[:-1], True]).astype(np.int64)
    table = selectivity(1.0 - 2.0 * np.arange(ivf.dim + 1) / ivf.dim, 3.0, 0.0)
    weight = idf_weights(ivf.counts, len(ivf.images))
    args = (bounds, words, qimg.astype(np.int64), np.ascontiguousarray(q.codes[order]).view(np.uint64))
    rest = (np.asarray(ivf.offsets, np.int64), ivf.entry_image, ivf.codes.view(np.uint64), table)
    rest += (1.0 / np.sqrt(image_norms(ivf, weight)), weight)
    nq = int(qimg.max()) + 1
    a, b = np.zeros((nq, len(ivf.images))), np.zeros((nq, len(ivf.images)))
    _binary_kernel(*args, *rest, a)
    _binary_kernel_tiled(*args, *rest, b, tile_images, 0, len(ivf.images))
    assert np.array_equal(a, b) and (a > 0).any()
    c = np.zeros_like(b)  # two threads' disjoint image ranges, each from its own cursors
    for first, last in ((0, 17), (17, len(ivf.images))):
        _binary_kernel_tiled(*args, *rest, c, tile_images, first, last)
    assert np.array_equal(a, c)


@pytest.mark.parametrize("k", [0, 1, 5, 40, 60])
def test_topk_is_a_stable_sort_cut_at_k_ties_by_smaller_column(k):
    from operators.asmk import _topk

    rng = np.random.default_rng(k)
    acc = rng.integers(0, 4, (6, 50)).astype(np.float64)  # many ties, at the cut too
    acc[0] = 0.0
    acc[1, 3] = -np.inf  # an excluded image
    scores, idx = _topk(acc, k)
    ref = np.argsort(-acc, axis=1, kind="stable")[:, : min(k, 50)]
    assert np.array_equal(np.where(idx >= 0, idx, ref), ref)
    assert np.array_equal(scores, np.take_along_axis(acc, ref, 1))
    assert ((idx == -1) == ~np.isfinite(scores)).all()
