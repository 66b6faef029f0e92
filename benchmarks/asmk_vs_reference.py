"""ASMK* build and batch search: ours vs the reference PyPI ``asmk`` package, same data and centroids.

    .venv/bin/python benchmarks/asmk_vs_reference.py [--images 1000] [--per-image 1000] [--k 4096] [--queries 100]
        [--assign flat|hnsw] [--data synthetic|rootsift]

Synthetic clustered 128-d local descriptors (images × per-image), a shared faiss codebook. Each side
runs in its own process (same seeded data and codebook) so peak RSS is its own. Reported separately: codeword assignment
(the same faiss flat search in both), aggregation + inverted-file build, and batch search of
``--queries`` query images with multiple assignment 5 (α = 3, τ = 0, binary, no IDF). Scores of the
two are compared at the end (max abs difference). Our search time includes the queries'
aggregation (the reference's includes it too); the one-off numba compilation or cache load is
warmed up on one image and reported apart. ``--assign hnsw``: our side assigns with the HNSW quantizer
(:class:`operators.codebook.AssignConfig`; its build is counted in the assignment time, and the fraction of
descriptors given the exact word is printed). ``--data rootsift``: instance-mini's real RootSIFT (186 images,
``--per-image`` each) with ``--k`` words drawn from them, instead of the synthetic modes. State the machine when
quoting the figures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import reset_peak, rss_mb  # noqa: E402


def make_data(n_images: int, per_image: int, k: int, n_queries: int, seed: int = 0):
    import faiss

    rng = np.random.default_rng(seed)
    modes = rng.normal(size=(4 * k, 128)).astype(np.float32)

    def draw(n, block=1 << 18):  # float32 in blocks: the data, not its generation, sets the baseline memory
        out = np.empty((n, 128), np.float32)
        for s in range(0, n, block):
            m = min(block, n - s)
            out[s : s + m] = modes[rng.integers(0, len(modes), m)]
            out[s : s + m] += 0.35 * rng.standard_normal((m, 128), dtype=np.float32)
        return out

    xb = draw(n_images * per_image)
    ib = np.repeat(np.arange(n_images), per_image)
    xq = draw(n_queries * per_image)
    iq = np.repeat(np.arange(n_queries), per_image)
    km = faiss.Kmeans(128, k, niter=5, seed=1)
    km.train(xb[rng.choice(len(xb), min(len(xb), 50 * k), replace=False)])
    return km.centroids, xb, ib, xq, iq


def real_data(n_images: int, per_image: int, k: int, n_queries: int, seed: int = 0):
    """``--data rootsift``: real RootSIFT descriptors of instance-mini's images (up to ``per_image`` each; the
    collection bounds ``n_images``), queries = the first ``n_queries`` images, ``k`` words drawn from the
    descriptors (as :mod:`benchmarks.assignment`). Cached beside the data's first use (``/tmp``)."""
    from benchmarks.assignment import DATA
    from operators.images import decode_image
    from operators.rootsift import RootSift

    cache = Path(f"/tmp/asmk-vs-reference-rootsift-{per_image}.npz")
    if not cache.exists():
        import pandas as pd

        sift = RootSift(1024, per_image)
        files = pd.read_csv(DATA / "images.csv")["file"]
        parts = [sift.describe(decode_image((DATA / f).read_bytes()))["local_desc"].astype(np.float32) for f in files]
        np.savez(cache, x=np.concatenate(parts), counts=[len(p) for p in parts])
    z = np.load(cache)
    counts = z["counts"][:n_images]
    xb = z["x"][: counts.sum()]
    ib = np.repeat(np.arange(len(counts)), counts)
    nq = int(counts[:n_queries].sum())
    rng = np.random.default_rng(seed)
    return xb[np.sort(rng.choice(len(xb), k, replace=False))], xb, ib, xb[:nq].copy(), ib[:nq].copy()


def peak_mb() -> float:
    return rss_mb("VmHWM")


def run_ours(args, out, assign: str = "flat"):
    from operators.asmk import AsmkParams, aggregate, build_index, search
    from operators.codebook import AssignConfig, Quantizer

    centroids, xb, ib, xq, iq = load(*args)
    t = time.time()
    quant = Quantizer(centroids, AssignConfig(assign))
    t_quant = time.time() - t
    n0 = int(np.searchsorted(ib, 1))  # warm-up on one image: compiles (or loads the cached) numba kernels
    t = time.time()
    w0 = quant(xb[:n0], 5)
    warm = build_index(xb[:n0], ib[:n0], w0[:, :1], centroids)
    search(warm, aggregate(xb[:n0], ib[:n0], w0, centroids), AsmkParams(), k=1)
    t_jit = time.time() - t
    base = reset_peak()
    t = time.time()
    words = quant(xb)
    t_assign = time.time() - t + t_quant
    t = time.time()
    ivf = build_index(xb, ib, words, centroids)
    t_build = time.time() - t
    t = time.time()
    qw = quant(xq, 5)
    t_qassign = time.time() - t
    t = time.time()
    qids, scores, ids = search(ivf, aggregate(xq, iq, qw, centroids), AsmkParams(), k=100)
    t_search = time.time() - t
    out.put(
        {
            "assign": t_assign,
            "build": t_build,
            "query_assign": t_qassign,
            "search": t_search,
            "peak_mb": peak_mb(),
            "base_mb": base,
            "top": (ids[:, :10], scores[:, :10]),
            "jit": t_jit,
            "bytes_per_entry": ivf.bytes_per_entry(),
            "entries": len(ivf.entry_image),
            "agreement": float((Quantizer(centroids)(xb) == words).mean()) if assign != "flat" else 1.0,
        }
    )


def run_reference(args, out):
    from asmk import codebook as cdb_pkg
    from asmk import index as idx_pkg
    from asmk import inverted_file as ivf_pkg
    from asmk import kernel as kern_pkg
    from asmk.asmk_method import ASMKMethod

    centroids, xb, ib, xq, iq = load(*args)
    base = reset_peak()
    cdb = cdb_pkg.Codebook(idx_pkg.initialize_index(None), size=len(centroids))
    cdb.index(np.ascontiguousarray(centroids))
    t = time.time()
    _, words = cdb.quantize(xb, multiple_assignment=1)
    t_assign = time.time() - t
    kern = kern_pkg.ASMKKernel(cdb, binary=True)
    t = time.time()
    agg = kern.aggregate(xb, words, ib)
    ivf = ivf_pkg.IVF.initialize_empty(use_idf=False, codebook_size=len(centroids))
    ivf.add(*agg)
    t_build = time.time() - t
    params = {
        "quantize": {"multiple_assignment": 5},
        "aggregate": {},
        "search": {"topk": 100},
        "similarity": {"similarity_threshold": 0.0, "alpha": 3.0},
    }
    t = time.time()
    cdb.quantize(xq, multiple_assignment=5)
    t_qassign = time.time() - t
    t = time.time()
    _, ranks, scores = ASMKMethod.accumulate_scores(cdb, kern, ivf, xq, iq, params=params)
    t_search = time.time() - t - t_qassign  # accumulate_scores assigns again inside
    out.put(
        {
            "assign": t_assign,
            "build": t_build,
            "query_assign": t_qassign,
            "search": t_search,
            "peak_mb": peak_mb(),
            "base_mb": base,
            "top": (ranks[:, :10], scores[:, :10]),
        }
    )


def load(n_images: int, per_image: int, k: int, n_queries: int, data: str = "synthetic"):
    return (real_data if data == "rootsift" else make_data)(n_images, per_image, k, n_queries)


def in_child(fn, data, *extra):
    ctx = mp.get_context("spawn")  # fork after OpenMP (faiss) can deadlock; each child regenerates the data
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(data, q, *extra))
    p.start()
    while True:
        try:
            r = q.get(timeout=5)
            break
        except Exception:  # noqa: BLE001 - queue.Empty: is the child still alive?
            if not p.is_alive():
                raise RuntimeError(f"{fn.__name__} failed (exit code {p.exitcode})")
    p.join()
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--per-image", type=int, default=1000)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--assign", choices=["flat", "hnsw"], default="flat", help="our codeword assignment")
    ap.add_argument(
        "--data",
        choices=["synthetic", "rootsift"],
        default="synthetic",
        help="rootsift: instance-mini's real descriptors (at most 186 images), k words drawn from them",
    )
    a = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {a.images} images x {a.per_image} descriptors, "
        f"k={a.k}, {a.queries} queries (MA 5)"
    )
    data = (a.images, a.per_image, a.k, a.queries, a.data)
    ours, ref = in_child(run_ours, data, a.assign), in_child(run_reference, data)
    n, nq = a.images, a.queries
    rows = [
        (f"codeword assignment (ours: {a.assign})", "assign", "s"),
        ("aggregation + inverted file", "build", "s"),
        (f"query assignment MA 5 (ours: {a.assign})", "query_assign", "s"),
        ("batch search", "search", "s"),
    ]
    for side in (ours, ref):
        side["end_build"] = side["assign"] + side["build"]
        side["end_search"] = side["query_assign"] + side["search"]
    rows += [
        ("build end to end (assignment included)", "end_build", "s"),
        ("search end to end (assignment included)", "end_search", "s"),
    ]
    print(f"{'':40s} {'ours':>10s} {'reference':>10s} {'ratio':>8s}")
    for label, key, unit in rows:
        print(f"{label:40s} {ours[key]:9.2f}{unit} {ref[key]:9.2f}{unit} {ref[key] / max(ours[key], 1e-9):7.1f}x")
    print(f"{'images/s indexed (aggregation+ivf)':40s} {n / ours['build']:10.0f} {n / ref['build']:10.0f}")
    print(
        f"{'queries/s (search, excl. assignment)':40s} {nq / ours['search']:10.1f} {nq / ref['search']:10.1f} "
        f"{ref['search'] / ours['search']:7.1f}x"
    )
    print(
        f"{'peak RSS of the child (MB)':40s} {ours['peak_mb']:10.0f} {ref['peak_mb']:10.0f} "
        f"{ours['peak_mb'] / ref['peak_mb']:7.2f}x"
    )
    added = [r["peak_mb"] - r["base_mb"] for r in (ours, ref)]
    print(
        f"{'  of which over data + imports (MB)':40s} {added[0]:10.0f} {added[1]:10.0f} "
        f"{added[0] / max(added[1], 1):7.2f}x"
    )
    print(f"one-off numba compile/cache load (ours, not in the figures above): {ours['jit']:.2f}s")
    print(f"index: {ours['entries']} entries, {ours['bytes_per_entry']} bytes per entry")
    same = np.array_equal(ours["top"][0], ref["top"][0])
    diff = np.abs(ours["top"][1] - ref["top"][1]).max()
    print(
        f"top-10 ids identical: {same}; max |score difference| {diff:.2e}"
        + (f"; descriptors given the exact word by {a.assign}: {ours['agreement']:.4f}" if a.assign != "flat" else "")
    )


if __name__ == "__main__":
    main()
