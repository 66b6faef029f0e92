"""ASMK* scoring kernel: over the images in cache-sized tiles against in one sweep, on one inverted file.

    .venv/bin/python benchmarks/asmk_kernel.py --root ROOT [--queries 113] [--query-entries 3000]
    .venv/bin/python benchmarks/asmk_kernel.py --n 1000000 --entries 100 --k 32768

``--root``: an index root's inverted file, memory-mapped (run it twice: the first run reads it from disk);
otherwise a synthetic one of ``--n`` images with ``--entries`` entries each over ``--k`` words (uniform words,
random 128-bit codes). Queries: ``--queries`` images of ``--query-entries`` entries each (distinct words drawn
by the database's word frequencies, random codes; a query's entries with multiple assignment are ~3,000 at
1,000 features). Both kernels fill the score buffer of all queries at once (one pass over the postings, as the
search does within its buffer); the buffers must be equal to the last bit. Prints each kernel's seconds and
ms a query, and the ratio (the tile as the search sizes it, :func:`operators.asmk.tile_images`; ``--cache-mb``
and ``--max-tile`` override its two bounds); then the top-k of that buffer (k = ``--topk``) by
:func:`operators.asmk._topk` (one partition a row) against a stable full argsort of each row, which must give the
same columns. Last line:
``asmk kernel: untiled S1 s, tiled S2 s, speed-up R``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from operators.asmk import (  # noqa: E402
    CACHE_BYTES,
    TILE_IMAGES,
    AsmkParams,
    InvertedFile,
    _binary_kernel,
    _binary_kernel_tiled,
    _topk,
    image_norms,
    selectivity,
    tile_images,
)


def synthetic(n: int, entries: int, k: int, seed: int = 0) -> InvertedFile:
    """``n`` images of ``entries`` distinct words each, as an inverted file sorted by word then image."""
    rng = np.random.default_rng(seed)
    words = np.concatenate([rng.choice(k, entries, replace=False) for _ in range(n)]) if n < 50_000 else None
    if words is None:  # fast path: words may repeat within an image (harmless for timing)
        words = rng.integers(0, k, n * entries)
    image = np.repeat(np.arange(n, dtype=np.uint32), entries)
    order = np.lexsort((image, words))
    counts = np.bincount(words, minlength=k)
    return InvertedFile(
        offsets=np.r_[0, np.cumsum(counts)].astype(np.int64),
        entry_image=image[order],
        codes=rng.integers(0, 256, (len(words), 16), dtype=np.uint8),
        images=np.arange(n, dtype=np.int64),
        image_entries=np.full(n, entries, np.int64),
    )


def queries(ivf: InvertedFile, nq: int, per_query: int, seed: int = 1) -> tuple[np.ndarray, ...]:
    """Entries of ``nq`` queries sorted by word: (words, q_local, codes as uint64 lanes)."""
    rng = np.random.default_rng(seed)
    freq = np.diff(ivf.offsets).astype(np.float64) + 1.0
    words = np.concatenate([rng.choice(ivf.k, per_query, replace=False, p=freq / freq.sum()) for _ in range(nq)])
    q = np.repeat(np.arange(nq, dtype=np.int64), per_query)
    order = np.lexsort((q, words))
    codes = rng.integers(0, 256, (len(words), ivf.codes.shape[1]), dtype=np.uint8)
    return words[order].astype(np.int64), q[order], np.ascontiguousarray(codes[order]).view(np.uint64)


def topk_line(acc: np.ndarray, k: int) -> None:
    """Times the search's top-k of the score buffer against a stable full argsort of each row (the reference)."""
    t0 = time.perf_counter()
    scores, cols = _topk(acc, k)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = np.stack([np.argsort(-row, kind="stable")[:k] for row in acc])
    full = time.perf_counter() - t0
    assert np.array_equal(np.where(np.isfinite(scores), cols, ref), ref), "top-k differs from the full sort"
    per_query = 1000 * ours / len(acc)
    print(f"  top-{k}: {ours:.2f} s (full sort {full:.2f} s, {full / ours:.1f}x), {per_query:.1f} ms a query")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", help="an index root (its inverted file); else synthetic")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--entries", type=int, default=100)
    ap.add_argument("--k", type=int, default=32768)
    ap.add_argument("--queries", type=int, default=113)
    ap.add_argument("--query-entries", type=int, default=3000)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--cache-mb", type=float, default=CACHE_BYTES / 2**20, help="the tiled kernel's buffer columns")
    ap.add_argument("--max-tile", type=int, default=TILE_IMAGES, help="the tiled kernel's most images a tile")
    a = ap.parse_args()
    if a.root:
        from storage.artifacts import ArtifactRoot
        from storage.inverted_file import open_inverted_file

        ivf, _ = open_inverted_file(ArtifactRoot(a.root))
    else:
        ivf = synthetic(a.n, a.entries, a.k)
    n_img = len(ivf.images)
    print(f"inverted file: {n_img:,} images, {len(ivf.entry_image):,} entries, k = {ivf.k}", flush=True)
    words, q_local, qcodes = queries(ivf, a.queries, a.query_entries)
    bounds = np.flatnonzero(np.r_[True, words[1:] != words[:-1], True]).astype(np.int64)
    table = selectivity(1.0 - 2.0 * np.arange(ivf.dim + 1) / ivf.dim, AsmkParams().alpha, AsmkParams().tau)
    inv = 1.0 / np.sqrt(np.maximum(image_norms(ivf, None), 1e-300))
    args = (bounds, words, q_local, qcodes, np.asarray(ivf.offsets, np.int64))
    rest = (ivf.entry_image, ivf.codes.view(np.uint64), table, inv, np.zeros(0))
    small = (bounds[:2], *args[1:])  # compile both on one word first
    _binary_kernel(*small, *rest, np.zeros((a.queries, n_img)))
    tile = tile_images(a.queries, int(a.cache_mb * 2**20), a.max_tile)
    _binary_kernel_tiled(*small, *rest, np.zeros((a.queries, n_img)), tile, 0, n_img)
    seconds = {}
    for name, fn, extra in (
        ("untiled", _binary_kernel, ()),
        ("tiled", _binary_kernel_tiled, (tile, 0, n_img)),
    ):
        acc = np.zeros((a.queries, n_img))
        t0 = time.perf_counter()
        fn(*args, *rest, acc, *extra)
        seconds[name] = time.perf_counter() - t0
        print(f"  {name}: {seconds[name]:.2f} s, {1000 * seconds[name] / a.queries:.1f} ms a query", flush=True)
        if name == "untiled":
            reference = acc
        else:
            assert np.array_equal(reference, acc), "the two kernels' buffers differ"
    topk_line(acc, a.topk)
    ratio = seconds["untiled"] / seconds["tiled"]
    print(f"asmk kernel: untiled {seconds['untiled']:.2f} s, tiled {seconds['tiled']:.2f} s, speed-up {ratio:.2f}")


if __name__ == "__main__":
    main()
