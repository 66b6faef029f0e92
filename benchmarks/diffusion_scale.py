"""Graph, FSR, hybrid and diffusion query throughput on a large synthetic graph, in one process.

    .venv/bin/python benchmarks/diffusion_scale.py [--n 1000000] [--d 64] [--k 50] [--rank 400] [--queries 64]

Synthetic clustered unit descriptors (``--n`` items in clusters of ~``--cluster-size``), a kNN
graph (faiss IVF, k = ``--k``), mutual affinity with γ = 3 and S = D^-1/2 W D^-1/2, then:

- offline: graph time, top-r eigenpairs of S on the LCC (Chebyshev-filtered subspace iteration by default), SHybrid's
  99%-sparse U; time and peak RSS of each step (Linux VmHWM, reset before each step);
- online, ``--queries`` unseen queries (database items plus noise) seeded by their 10 nearest items:
  the anchors' way, one query at a time with ``scipy.sparse.linalg.cg`` (20 iterations), against our
  batched CG (one sparse × dense product per iteration for all queries), truncated CG on a top-T
  shortlist, FSR (rank r), hybrid (r, 5 iterations) and SHybrid (sparse U). Per-query latency,
  throughput, the speed-up over the one-at-a-time CG, and top-100 agreement with a converged solve.

State the machine when quoting the figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import reset_peak, rss_mb  # noqa: E402
from operators.diffusion import seeds, shifted_product, temporal, truncated  # noqa: E402
from operators.graph import affinity, inverse_permutation, largest_component, locality_order, normalize  # noqa: E402
from operators.knn import build_ivf, search_ivf  # noqa: E402
from operators.spectral import eigenpairs, fsr, hybrid, sparsify  # noqa: E402


class Step:
    """Times a step and reports its peak RSS above the RSS at its start."""

    rows: list = []

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.base, self.t = reset_peak(), time.time()
        return self

    def __exit__(self, *exc):
        dt, peak = time.time() - self.t, rss_mb("VmHWM")
        Step.rows.append((self.name, dt, peak - self.base))
        print(f"  {self.name:48s} {dt:9.2f} s   +{peak - self.base:8.0f} MB (peak {peak:.0f} MB)", flush=True)


def make_data(n: int, d: int, cluster_size: int, n_queries: int, latent: int = 8, seed: int = 0):
    """Unit descriptors on a curved ``latent``-dimensional manifold with density clusters (a connected
    graph with a giant component, as real collections have: 933k of 1M at R1M, T:20380-20382)."""
    rng = np.random.default_rng(seed)
    centres = 2 * rng.standard_normal((max(1, n // cluster_size), latent), dtype=np.float32)
    lift = rng.standard_normal((latent, d), dtype=np.float32) / np.sqrt(latent)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 1 << 18):
        m = min(1 << 18, n - s)
        z = centres[rng.integers(0, len(centres), m)] + 0.5 * rng.standard_normal((m, latent), dtype=np.float32)
        x[s : s + m] = np.tanh(z @ lift) + 0.05 * rng.standard_normal((m, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, n_queries, replace=False)] + 0.02 * rng.standard_normal((n_queries, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def product_timings(s_random: sp.csr_matrix, s_local: sp.csr_matrix, m: int, reps: int = 3) -> None:
    """One (I − αS)·P with P (n, m): scipy float64 in node and locality order, our kernel float64/float32."""
    p = np.random.default_rng(1).standard_normal((s_local.shape[0], m))
    runs = [
        ("scipy, float64, node order", lambda: p - 0.99 * (s_random @ p)),
        ("scipy, float64, locality order", lambda: p - 0.99 * (s_local @ p)),
    ]
    for dt in (np.float64, np.float32):
        sd, pd_ = s_local.astype(dt), p.astype(dt)
        runs.append(
            (f"compiled kernel, {dt.__name__}, locality order", lambda sd=sd, pd_=pd_: shifted_product(sd, pd_, 0.99))
        )
    print(f"  one (I − αS)·P product, P with {m} columns:")
    for name, fn in runs:
        fn()
        t = time.time()
        for _ in range(reps):
            fn()
        print(f"    {name:44s} {(time.time() - t) / reps:8.3f} s", flush=True)


def overlap(a: np.ndarray, b: np.ndarray, k: int = 100) -> float:
    """Mean |top-k(a) ∩ top-k(b)| / k over columns."""
    ta = np.argpartition(-a, k, axis=0)[:k]
    tb = np.argpartition(-b, k, axis=0)[:k]
    return float(np.mean([len(np.intersect1d(ta[:, j], tb[:, j])) / k for j in range(a.shape[1])]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--cluster-size", type=int, default=100)
    ap.add_argument("--rank", type=int, default=400)
    ap.add_argument("--eig", default="chebyshev", choices=["chebyshev", "lanczos", "simultaneous"])
    ap.add_argument(
        "--eig-tol", type=float, default=1e-3, help="chebyshev: max residual ||Su − λu||; lanczos: relative accuracy"
    )
    ap.add_argument("--power-iters", type=int, default=30, help="chebyshev: max outer iterations; simultaneous: q")
    ap.add_argument("--degree", type=int, default=32, help="chebyshev: filter degree")
    ap.add_argument("--oversample", type=int, default=100)
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--single", type=int, default=8, help="queries run one at a time with scipy cg")
    ap.add_argument("--shortlist", type=int, default=10_000)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="    %(message)s")  # eigen-solver progress
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB; n={a.n:,} d={a.d} k={a.k} "
        f"r={a.rank} queries={a.queries}"
    )
    x, xq = make_data(a.n, a.d, a.cluster_size, a.queries)

    print("offline")
    with Step("kNN graph (faiss IVF build + search)"):
        index = build_ivf(x, 0)
        knn_s, knn_i = np.empty((a.n, a.k), np.float32), np.empty((a.n, a.k), np.int64)
        for s in range(0, a.n, 65536):
            rows = np.arange(s, min(a.n, s + 65536))
            knn_s[rows], knn_i[rows] = search_ivf(index, x[rows], a.k, a.nprobe, exclude=rows)
    with Step("affinity W (mutual, γ=3) + S"):
        w = affinity(knn_i, knn_s, gamma=3.0)
        s_random = normalize(w)
    with Step("locality order (reverse Cuthill-McKee) + permute"):
        order = locality_order(w)
        pos = inverse_permutation(order)
        w = sp.csr_matrix(w[order][:, order])
        s = normalize(w)
    mb = (w.data.nbytes + w.indices.nbytes) * 2 / 2**20
    print(f"  graph: {w.nnz:,} nonzeros, mean degree {w.nnz / a.n:.1f}, W+S {mb:.0f} MB")
    product_timings(s_random, s, a.queries)
    with Step(f"eigenpairs r={a.rank} on the LCC ({a.eig})"):
        lcc = largest_component(w)
        s_lcc = normalize(w[lcc][:, lcc])
        lam, u_lcc = eigenpairs(
            s_lcc,
            a.rank,
            method=a.eig,
            oversample=a.oversample,
            iters=a.power_iters,
            dtype=np.float32,
            tol=a.eig_tol,
            degree=a.degree,
        )
    resid = max(
        np.linalg.norm(
            s_lcc.astype(np.float32) @ u_lcc[:, c : c + 50] - u_lcc[:, c : c + 50] * lam[c : c + 50].astype(np.float32),
            axis=0,
        ).max()
        for c in range(0, len(lam), 50)
    )
    with Step("U on all nodes (zero outside the LCC)"):
        u = np.zeros((a.n, len(lam)), np.float32)
        u[lcc] = u_lcc
        del u_lcc, s_lcc
    print(
        f"  LCC {len(lcc):,} nodes; λ_1 {lam[0]:.4f} … λ_r {lam[-1]:.4f}; ||Su − λu|| ≤ {resid:.1e} for all r; "
        f"U {u.nbytes / 2**20:.0f} MB"
    )
    with Step("SHybrid: U 99% sparse"):
        u_sparse = sparsify(u, keep=0.01, as_csr=True)

    _, qi = search_ivf(index, xq, 10, a.nprobe)
    qs = np.einsum("qkd,qd->qk", x[np.maximum(qi, 0)], xq)
    y64 = seeds(a.n, pos[qi], qs, kq=10)  # positions in the locality order
    y_random = seeds(a.n, qi, qs, kq=10)
    y = y64.astype(np.float32)  # our solvers run in float32 (jobs default)
    print("online (per query; seeds from a faiss IVF 10-NN search, not timed)")
    m = a.single
    single = {}
    for name, mat, rhs in (("node order", s_random, y_random), ("locality order", s, y64)):
        lap = sp.csr_matrix(sp.identity(a.n, format="csr") - 0.99 * mat)  # built once, as the anchors' code does
        with Step(f"one-at-a-time scipy cg, 20 its, {name} ({m} q)"):
            t0 = time.time()
            for j in range(m):
                spla.cg(lap, 0.01 * rhs[:, j], rtol=1e-6, maxiter=20)
            single[name] = (time.time() - t0) / m
        print(f"      → {single[name] * 1000:8.1f} ms/query")
    del lap, s_random
    base = single["node order"]
    results = {}

    def timed(name: str, fn):
        with Step(name) as st:
            out = fn()
        per = Step.rows[-1][1] / a.queries
        results[name] = out
        print(
            f"      → {per * 1000:8.1f} ms/query, {1 / per:7.1f} queries/s, {base / per:6.1f}× one-at-a-time cg "
            f"({single['locality order'] / per:.1f}× the same in locality order)"
        )
        return st

    timed(f"batched CG, 20 its ({a.queries} queries at once)", lambda: temporal(s, y, tol=1e-6, maxiter=20))
    short = (
        np.argsort(-(x @ xq.T), axis=0)[: a.shortlist].T
        if a.n <= 200_000
        else search_ivf(index, xq, a.shortlist, a.nprobe)[1]
    )
    short = np.where(short >= 0, pos[np.maximum(short, 0)], -1)
    ys = np.take_along_axis(y.T, np.maximum(short, 0), 1) * (short >= 0)
    timed(f"truncated CG, T={a.shortlist}", lambda: truncated(w, short, ys, tol=1e-6, maxiter=20))
    timed(f"FSR r={len(lam)}", lambda: fsr(u, lam, y))
    timed(f"FSR.SPARSE r={len(lam)} (99% sparse U)", lambda: fsr(u_sparse, lam, y))
    timed(f"hybrid r={len(lam)}, 5 its", lambda: hybrid(s, u, lam, y, iters=5))
    timed(f"SHybrid r={len(lam)} (99% sparse U), 5 its", lambda: hybrid(s, u_sparse, lam, y, iters=5))
    exact = temporal(s, y64, tol=1e-10, maxiter=200)
    print("top-100 agreement with a converged solve (200 CG its):")
    for name, f in results.items():
        if f.shape == exact.shape:
            print(f"  {name:48s} {overlap(f, exact):.3f}")


if __name__ == "__main__":
    main()
