"""Approximate global search against exact brute force: build time, ms/query, recall@100, memory.

    .venv/bin/python benchmarks/global_ann.py --n 1000000 [--dim 1280] [--memory-gb 0.5] [--kind auto]

Vectors (the model of :mod:`operators.distractors`' global part, the R1M-like root's distractors): ``--donors``
synthetic donor descriptors d ~ N(0, diag(j^−decay)), j = 1..D (``--decay``, 1 by default: a decaying spectrum,
as CNN descriptors have; 0.5 is a flatter, harder one), unit length;
each database row mixes two donors, g = w d_a + (1 − w) d_b + ε with w ~ U(0, 1) and ε ~ N(0, (σ‖·‖)²/D · I),
σ = 0.1, then L2-normalised. Queries are new rows of the same model: *whole-like* with σ = 0.1, *crop-like* with
σ = 0.5 (a crop shares less with its image: lower, flatter top scores). The rows are written memory-mapped under
``--work`` (5.1 GB at 1M × 1,280), read as the search job reads ``global/vectors.npy``.

Exact: :func:`operators.knn.knn_blocks` over the memory-mapped rows in 65,536-row blocks, all queries at once (the
``global`` search task). Approximate: :func:`operators.ann.plan` from (n, D, budget), :func:`operators.ann.build_ann`,
then :meth:`GlobalAnn.search` (shortlist re-scored exactly from the memory-mapped rows), all queries at once, at
depth k = 100 and k = 1,000 (the search job's default ``topk``); recall@100 = |top-100 ∩ exact top-100| / 100.
The last line: ``global_ann N: kind K, build_s B, ms_whole W, ms_crop C, recall_whole R, recall_crop R, exact_ms E``.

``--root DIR`` measures on an index root's own global matrix instead (``global/vectors.npy``, memory-mapped): its
real images (those with a file that is not ``synthetic:``) are the queries, whole only; ``--kind`` and
``--shortlist`` (comma-separated L) choose what to try, e.g. ``--root R --kind ivf-sq8 --nprobe 62,256
--shortlist 200,1000``. ``--threads``: faiss's threads for every search, exact included (the search task's CPUs).
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.ann import AnnConfig, build_ann, plan  # noqa: E402
from operators.global_index import iter_blocks  # noqa: E402
from operators.knn import knn_blocks  # noqa: E402


def donors(m: int, d: int, rng: np.random.Generator, decay: float = 1.0) -> np.ndarray:
    """``m`` unit donor descriptors with variances decaying as j^−decay."""
    x = rng.standard_normal((m, d), dtype=np.float32) * (np.arange(1, d + 1, dtype=np.float32) ** (-decay / 2))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mixes(pool: np.ndarray, count: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` unit rows g = w d_a + (1 − w) d_b + ε (module doc)."""
    a, b = rng.integers(0, len(pool), count), rng.integers(0, len(pool), count)
    w = rng.random((count, 1), dtype=np.float32)
    g = w * pool[a] + (1 - w) * pool[b]
    noise = rng.standard_normal(g.shape, dtype=np.float32)
    g += noise * (sigma * np.linalg.norm(g, axis=1, keepdims=True) / np.sqrt(g.shape[1]))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def database(path: Path, n: int, pool: np.ndarray, seed: int, block: int = 65536) -> np.ndarray:
    """The memory-mapped rows (made once per (n, D, donors, seed); reused when the file exists)."""
    if path.exists():
        return np.load(path, mmap_mode="r")
    tmp = path.with_suffix(".tmp.npy")
    x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, pool.shape[1]))
    for s in range(0, n, block):
        x[s : s + block] = mixes(pool, min(block, n - s), 0.1, np.random.default_rng([seed, s]))
    x.flush()
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 100) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / k."""
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth)]))


def exact(x: np.ndarray, queries: dict) -> tuple[dict, dict]:
    """Exact top-100 ids and ms/query of every query set (the ``global`` search task's brute force)."""
    ids = np.arange(len(x), dtype=np.int64)
    truth, ms = {}, {}
    for name, q in queries.items():
        t0 = time.perf_counter()
        scores, truth[name] = knn_blocks(q, iter_blocks(ids, x), 100)
        ms[name] = (time.perf_counter() - t0) / len(q) * 1e3
        top1, top100 = scores[:, 0].mean(), scores[:, -1].mean()
        print(f"exact {name}: {ms[name]:.1f} ms/query, top-1 {top1:.3f}, top-100 {top100:.3f}")
    return truth, ms


def approximate(
    ann, x: np.ndarray, queries: dict, truth: dict, exact_ms: dict, nprobes: list[int], shortlists: list[int]
) -> dict:
    """ms/query and recall@100 of every query set at depths 100 and 1,000, for each nprobe and shortlist L (0: the
    plan's) (the last kept)."""
    last = {}
    for nprobe, L, k in itertools.product(nprobes, shortlists, (100, 1000)):
        for name, q in queries.items():
            ann.search(q[:8], x, k, nprobe, L)  # warm
            t0 = time.perf_counter()
            _, rows = ann.search(q, x, k, nprobe, L)
            ms = (time.perf_counter() - t0) / len(q) * 1e3
            last[name] = (ms, recall_at(rows, truth[name]))
            print(
                f"nprobe {nprobe} L {L or ann.plan.shortlist(k)} k {k} {name}: {ms:.2f} ms/query, "
                f"recall@100 {last[name][1]:.4f}, {exact_ms[name] / ms:.1f}× faster than exact"
            )
    return last


def root_rows(root: str) -> tuple[np.ndarray, dict]:
    """An index root's memory-mapped global rows and its real images' rows as ``whole`` queries."""
    from storage.artifacts import ArtifactRoot
    from storage.collection import is_synthetic
    from storage.global_index import open_global

    g = open_global(ArtifactRoot(root), "global")
    images = ArtifactRoot(root).images()
    real = images["image_id"][~is_synthetic(images["file"])].to_numpy()
    rows = np.flatnonzero(np.isin(np.asarray(g.ids), real))
    return g.vectors, {"whole": np.ascontiguousarray(g.vectors[rows], np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, help="rows (synthetic; required without --root)")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--donors", type=int, default=1000)
    ap.add_argument("--decay", type=float, default=1.0, help="donor variances decay as j^-decay")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--memory-gb", type=float, default=AnnConfig.memory_gb)
    ap.add_argument("--kind", default="auto")
    ap.add_argument("--nprobe", default="", help="comma-separated nprobe values to try (default: the plan's)")
    ap.add_argument("--work", default="/tmp/global-ann-bench")
    ap.add_argument("--root", help="an index root: its own global rows, its real images as queries")
    ap.add_argument("--shortlist", default="0", help="comma-separated shortlist lengths L (0: the plan's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="faiss's threads")
    args = ap.parse_args()
    if not (args.root or args.n):
        ap.error("--n is required without --root")
    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.root:
        x, queries = root_rows(args.root)
        args.n, args.dim = x.shape
    else:
        rng = np.random.default_rng(0)
        pool = donors(args.donors, args.dim, rng, args.decay)
        Path(args.work).mkdir(parents=True, exist_ok=True)
        x = database(Path(args.work) / f"x-{args.n}-{args.dim}-{args.donors}-{args.decay}.npy", args.n, pool, 1)
        queries = {"whole": mixes(pool, args.queries, 0.1, rng), "crop": mixes(pool, args.queries, 0.5, rng)}
    print(f"rows: {args.n} × {args.dim} ({x.nbytes / 2**30:.2f} GB) ready in {time.perf_counter() - t0:.1f} s")
    truth, exact_ms = exact(x, queries)
    cfg = AnnConfig(kind=args.kind, memory_gb=args.memory_gb)
    p = plan(args.n, args.dim, cfg)
    print(f"plan: {p.factory if p.kind != 'exact' else 'exact'} nprobe {p.nprobe}, codes {p.code_bytes / 2**30:.3f} GB")
    if p.kind == "exact":
        print(f"global_ann {args.n}: kind exact, exact_ms {exact_ms['whole']:.1f}")
        return
    t0 = time.perf_counter()
    ann = build_ann(x, p, cfg, np.arange(args.n, dtype=np.int64))
    build_s = time.perf_counter() - t0
    blob_gb = len(ann.state().arrays["index"]) / 2**30
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"build: {build_s:.1f} s, serialised index {blob_gb:.3f} GB, peak RSS {rss_gb:.2f} GB")
    nprobes = [int(v) for v in args.nprobe.split(",") if v] or [p.nprobe]
    shortlists = [int(v) for v in args.shortlist.split(",")]
    last = approximate(ann, x, queries, truth, exact_ms, nprobes, shortlists)
    (mw, rw), (mc, rc) = last["whole"], last.get("crop", (float("nan"), float("nan")))
    print(
        f"global_ann {args.n}: kind {p.kind} {p.factory}, build_s {build_s:.0f}, ms_whole {mw:.2f}, ms_crop {mc:.2f}, "
        f"recall_whole {rw:.4f}, recall_crop {rc:.4f}, exact_ms {exact_ms['whole']:.1f}"
    )


if __name__ == "__main__":
    main()
