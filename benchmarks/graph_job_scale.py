"""The graph job and a diffusion re-ranking task at scale, through the real artifacts and Ray.

    .venv/bin/python benchmarks/graph_job_scale.py --n 1000000 --root /tmp/graph-bench [--queries 64]

Writes an index root holding only a ``global`` stage (``--n`` synthetic descriptors, as in
``benchmarks/diffusion_scale.py``), runs ``python -m jobs.graph`` on it (kNN by Ray tasks — faiss
IVF above ``graph.ivf_threshold`` —, W, the locality-ordered W/S, r eigenpairs on the LCC), then what
one ``jobs.search --rerank`` task does with ``--queries`` initial rankings: load the graph from the
artifacts (memory-mapped) and re-rank by dfs, hybrid and SHybrid. Prints the job's stage times and
peak memory (its summary) and the task's load and per-query times. State the machine when quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.diffusion_scale import make_data  # noqa: E402
from benchmarks.memory import reset_peak, rss_mb  # noqa: E402
from jobs import graph as graph_job  # noqa: E402
from operators.knn import build_ivf, search_ivf  # noqa: E402
from operators.rerank import RerankParams, rerank  # noqa: E402
from operators.spectral import sparsify  # noqa: E402
from storage.artifacts import ArtifactRoot  # noqa: E402
from storage.global_index import GlobalMeta, global_writer  # noqa: E402
from storage.graph import load_graph  # noqa: E402
from storage.spectral import load_sparse_u, load_u, write_sparse_u  # noqa: E402


def write_index(root: ArtifactRoot, x: np.ndarray) -> None:
    """A root with the ``global`` stage only: ids 0..n−1 and their unit vectors."""
    vec, ids, commit = global_writer(root, len(x), x.shape[1])
    vec[:] = x
    ids[:] = np.arange(len(x))
    commit(GlobalMeta(count=len(x), dim=x.shape[1], whitened=False))
    root.record_stage("global", "benchmark", {"synthetic": True, "n": len(x), "dim": x.shape[1]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--root", default="/tmp/graph-bench")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--rank", type=int, default=400)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--reuse", action="store_true", help="skip the job: time the task on a root built before")
    a = ap.parse_args()
    print(
        f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB; "
        f"n={a.n:,} k={a.k} r={a.rank}",
        flush=True,
    )
    x, xq = make_data(a.n, 64, 100, a.queries)
    root = ArtifactRoot(a.root)
    if not a.reuse:
        write_index(root, x)
        t = time.time()
        summary = graph_job.main(["--index", a.root, "--k", str(a.k), "--rank", str(a.rank)])
        print(
            f"jobs.graph: {time.time() - t:.0f} s; stages {json.dumps(summary['timings_s'])}; driver peak "
            f"{summary['driver_peak_rss_mb']:.0f} MB, worker peak {summary['worker_peak_rss_mb']:.0f} MB",
            flush=True,
        )
    elif load_sparse_u(root, 0.01) is None:  # a root from before the stage stored SHybrid's U
        write_sparse_u(root, sparsify(np.asarray(load_u(root)), 0.01, as_csr=True), 0.01)

    _, ids = search_ivf(build_ivf(x, 0), xq, 1000, 16)  # initial rankings (not timed)
    sims = np.einsum("qkd,qd->qk", x[np.maximum(ids, 0)], xq).astype(np.float64)
    own = np.full(len(ids), -1)
    for name, method, keep in (("dfs (20 CG its)", "dfs", 1.0), ("hybrid", "hybrid", 1.0), ("SHybrid", "hybrid", 0.01)):
        for run in ("first", "second"):  # the first run in a process also loads compiled kernels and pages
            base = reset_peak()
            t = time.time()
            graph = load_graph(root, sparse_keep=keep)
            rerank(method, graph, ids, sims, own, 100, RerankParams(sparse_keep=keep))
            dt = time.time() - t
            print(
                f"task: {name:16s} {run:6s} {dt / len(ids) * 1000:7.1f} ms/query incl. loading the graph and merging "
                f"with the initial ranking ({len(ids)} queries, +{rss_mb('VmHWM') - base:.0f} MB)",
                flush=True,
            )


if __name__ == "__main__":
    main()
