"""Pure tests of the synthetic distractors' ``mosaic`` kind (operators.distractors; quick tier)."""

from __future__ import annotations

import numpy as np
import pytest

from operators.asmk import aggregate
from operators.distractors import (
    DistractorParams,
    DonorFeatures,
    DonorPool,
    feature_entries,
    make,
    make_mosaic,
    mosaic_cells,
)


def feature_pool(n: int = 5, d: int = 16, k: int = 40, seed: int = 0) -> DonorPool:
    """``n`` donors with 100–300 features each (words of a k-word codebook, residuals, positions)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(100, 300, n)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    words = rng.integers(0, k, offsets[-1]).astype(np.int32)
    residuals = rng.standard_normal((offsets[-1], d)).astype(np.float32)
    xy = rng.random((offsets[-1], 2)).astype(np.float32)
    entries = [feature_entries(words[a:b], residuals[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    return DonorPool(
        rng.standard_normal((n, 32)).astype(np.float32),
        np.r_[0, np.cumsum([len(w) for w, _ in entries])].astype(np.int64),
        np.concatenate([w for w, _ in entries]),
        np.concatenate([c for _, c in entries]),
        DonorFeatures(offsets, words, residuals, xy),
    )


def test_feature_entries_aggregate_as_the_index_does():
    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((30, 16)).astype(np.float32)
    words = rng.integers(0, 30, 200)
    x = centroids[words] + rng.standard_normal((200, 16)).astype(np.float32)
    w, c = feature_entries(words.astype(np.int32), x - centroids[words])
    agg = aggregate(x, np.zeros(200, np.int64), words[:, None], centroids, binary=True)
    assert np.array_equal(w, agg.words) and np.array_equal(c, agg.codes)
    empty_w, empty_c = feature_entries(np.zeros(0, np.int32), np.zeros((0, 16), np.float32))
    assert empty_w.shape == (0,) and empty_c.shape == (0, 2)


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_mosaic_cells_tile_the_unit_square(grid):
    cells = mosaic_cells(grid, np.random.default_rng(grid))
    assert cells.shape == (grid * grid, 4) and np.isclose((cells[:, 2] * cells[:, 3]).sum(), 1)
    assert (cells[:, :2] >= 0).all() and np.allclose((cells[:, :2] + cells[:, 2:]).max(0), 1)


def test_a_one_cell_mosaic_is_its_donor():
    pool = feature_pool(n=1)
    p = DistractorParams(kind="mosaic", grid=1, flip=0.0, global_noise=0.0)
    g, w, c = make_mosaic(pool, p, np.random.default_rng(0))
    assert np.array_equal(w, pool.words) and np.array_equal(c, pool.codes)
    assert np.allclose(g, pool.globals[0] / np.linalg.norm(pool.globals[0]), atol=1e-6)


def test_mosaics_take_real_regions_and_are_deterministic():
    pool = feature_pool()
    p = DistractorParams(kind="mosaic", grid=2, flip=0.0, global_noise=0.05)
    a = make(pool, p, np.random.default_rng([7, 3]))
    b = make(pool, p, np.random.default_rng([7, 3]))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    g, w, c = a
    assert np.isclose(np.linalg.norm(g), 1, atol=1e-5) and np.all(np.diff(w) > 0) and len(w) == len(c)
    # about one donor's worth of features (4 windows covering a unit of area), real words of the pool
    assert set(w.tolist()) <= set(pool.features.words.tolist()) and 10 <= len(w) <= 40
    sims = pool.globals @ g / np.linalg.norm(pool.globals, axis=1)
    assert np.sort(sims)[-2:].min() > 0.2  # a mix of several donors' globals
    other = make(pool, p, np.random.default_rng([7, 4]))
    assert not np.array_equal(other[1], w) or not np.array_equal(other[2], c)


def test_mosaic_windows_keep_the_features_inside_them():
    """A donor whose features lie in its left half only: a window of a 1×1 grid takes all of them, and a
    mosaic never holds more features than its donors' windows hold."""
    pool = feature_pool(n=1)
    pool.features.xy[:, 0] *= 0.5
    p = DistractorParams(kind="mosaic", grid=3, flip=0.0, global_noise=0.0)
    for s in range(5):
        _, w, _ = make_mosaic(pool, p, np.random.default_rng(s))
        assert set(w.tolist()) <= set(pool.words.tolist())


def test_mosaic_needs_features_and_mix_stays_the_default():
    pool = feature_pool()
    pool.features = None
    assert DistractorParams().kind == "mix"
    with pytest.raises(ValueError, match="local features"):
        make(pool, DistractorParams(kind="mosaic"), np.random.default_rng(0))
    g, w, c = make(pool, DistractorParams(), np.random.default_rng(0))
    assert len(w) == len(c) > 0


def test_feature_pool_reads_donor_shards_consistently(tmp_path):
    """jobs.distractors' mosaic pool from a shard of descriptors: positions normalised by the image's size (or its
    crop box), and the entries it makes equal those the mix pool makes from the same descriptors."""
    from jobs.distractors import donor_pool
    from operators.codebook import AssignConfig
    from storage.artifacts import ArtifactRoot
    from storage.schemas import feature_schema, feature_table

    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((20, 16)).astype(np.float32)
    rows = []
    for i, (w, h, box) in enumerate([(200, 100, None), (400, 300, (100.0, 50.0, 300.0, 250.0))]):
        span = np.array([w, h]) if box is None else np.array([box[2] - box[0], box[3] - box[1]])
        rows.append(
            {
                "image_id": i,
                "global": rng.standard_normal(8).astype(np.float32),
                "width": w,
                "height": h,
                **dict(zip(("x0", "y0", "x1", "y1"), box or (np.nan,) * 4)),
                "local_desc": rng.standard_normal((50, 16)).astype(np.float16),
                "local_xy": (rng.random((50, 2)) * span).astype(np.float32),
            }
        )
    root = ArtifactRoot(str(tmp_path / "donors"))
    root.shards().write(0, feature_table(rows, feature_schema(8, 16)), {"ok": 2, "errors": 0})
    pool = donor_pool(root, centroids, AssignConfig(), features=True)
    plain = donor_pool(root, centroids, AssignConfig())
    assert np.array_equal(pool.words, plain.words) and np.array_equal(pool.codes, plain.codes)
    assert np.array_equal(pool.features.offsets, [0, 50, 100]) and pool.features.residuals.shape == (100, 16)
    assert 0.5 < pool.features.xy.max() < 1 and pool.features.xy.min() >= 0


def test_smaller_windows_take_fewer_features():
    pool = feature_pool(n=4)
    sizes = [
        np.mean(
            [
                len(make_mosaic(pool, DistractorParams(kind="mosaic", window=w), np.random.default_rng(s))[1])
                for s in range(20)
            ]
        )
        for w in (1.0, 0.5)
    ]
    assert sizes[1] < 0.8 * sizes[0]


def test_a_subset_of_the_pool_keeps_each_kept_donors_entries_and_features():
    pool = feature_pool(n=4)
    sub = pool.subset(np.array([True, False, False, True]))
    assert len(sub) == 2 and np.array_equal(sub.globals, pool.globals[[0, 3]])
    for new, old in ((0, 0), (1, 3)):
        a, b = pool.offsets[old : old + 2]
        assert np.array_equal(sub.words[sub.offsets[new] : sub.offsets[new + 1]], pool.words[a:b])
        assert np.array_equal(sub.codes[sub.offsets[new] : sub.offsets[new + 1]], pool.codes[a:b])
        f, g = pool.features.offsets[old : old + 2]
        s, t = sub.features.offsets[new : new + 2]
        assert np.array_equal(sub.features.residuals[s:t], pool.features.residuals[f:g])
        assert np.array_equal(sub.features.xy[s:t], pool.features.xy[f:g])
    assert len(pool.subset(np.zeros(4, bool)).words) == 0


def test_a_mosaic_of_one_source_takes_every_cell_from_one_donor():
    pool = feature_pool(n=6, k=10)
    pool.features.words[:] = pool.features.words % 10 + 10 * np.repeat(np.arange(6), np.diff(pool.features.offsets))
    one = DistractorParams(kind="mosaic", grid=3, sources=1, flip=0.0)
    spread = DistractorParams(kind="mosaic", grid=3, flip=0.0)
    for seed in range(5):
        _, w, _ = make(pool, one, np.random.default_rng(seed))
        assert len(np.unique(w // 10)) == 1  # the words of a single donor
        _, w, _ = make(pool, spread, np.random.default_rng(seed))
        assert len(np.unique(w // 10)) > 1
