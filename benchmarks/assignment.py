"""Approximate codeword assignment (faiss HNSW over the centroids) against the exact flat search, in one run.

    .venv/bin/python benchmarks/assignment.py [--k 65536] [--queries 20000] [--ef 64] [--niter 0]

Real RootSIFT descriptors of instance-mini (``operators.rootsift``, 2,000 per image, no Ray), a codebook of
``--k`` words (``--niter 0``: words drawn from the descriptors, as k-means starts; more: that many faiss
k-means iterations on them), and ``--queries`` held-out descriptors assigned by both quantizers
(:class:`operators.codebook.Quantizer`, ``flat`` and ``hnsw``). Prints the build and assignment times,
the fraction given the same word (single assignment) and the overlap of the 5 words of multiple
assignment; the last line is ``speedup S agreement A`` (single assignment, HNSW build not counted: it is
built once per task). State the machine when quoting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.codebook import AssignConfig, Quantizer, train_codebook  # noqa: E402
from operators.images import decode_image  # noqa: E402
from operators.rootsift import RootSift  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instance-mini"


def rootsift(collection: Path, per_image: int) -> np.ndarray:
    files = pd.read_csv(collection / "images.csv")["file"]
    sift = RootSift(1024, per_image)
    out = [sift.describe(decode_image((collection / f).read_bytes()))["local_desc"] for f in files]
    return np.concatenate(out).astype(np.float32)


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--collection", type=Path, default=DATA)
    ap.add_argument("--k", type=int, default=65536)
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--ef", type=int, default=AssignConfig.ef_search)
    ap.add_argument("--niter", type=int, default=0)
    a = ap.parse_args()
    if not (a.collection / "images.csv").exists():
        raise SystemExit(f"error: no images.csv in {a.collection}")
    print(f"machine: {os.cpu_count()} cores; k={a.k:,} queries={a.queries:,} ef_search={a.ef}", flush=True)
    x, t = timed(rootsift, a.collection, 2000)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    xq, xb = x[perm[: a.queries]], x[perm[a.queries :]]
    if a.niter:
        centroids = train_codebook(xb, a.k, a.niter)
    else:
        centroids = xb[rng.choice(len(xb), a.k, replace=False)]
    print(f"{len(x):,} RootSIFT descriptors in {t:.0f} s; codebook of {a.k:,} words ({a.niter} k-means iterations)")
    flat = Quantizer(centroids)
    hnsw, t_build = timed(Quantizer, centroids, AssignConfig("hnsw", ef_search=a.ef))
    exact, t_flat = timed(flat, xq, 1)
    approx, t_hnsw = timed(hnsw, xq, 1)
    exact5, t_flat5 = timed(flat, xq, 5)
    approx5, t_hnsw5 = timed(hnsw, xq, 5)
    overlap = np.mean([len(np.intersect1d(e, h)) / 5 for e, h in zip(exact5, approx5)])
    agreement = float((exact[:, 0] == approx[:, 0]).mean())
    print(f"flat (exact): {t_flat:.2f} s, {t_flat / len(xq) * 1e6:.0f} µs a descriptor; MA-5 {t_flat5:.2f} s")
    print(
        f"hnsw: built in {t_build:.2f} s; {t_hnsw:.2f} s, {t_hnsw / len(xq) * 1e6:.0f} µs a descriptor; MA-5 "
        f"{t_hnsw5:.2f} s ({t_flat5 / t_hnsw5:.1f}x), MA-5 words shared with the exact 5: {overlap:.4f}"
    )
    print(f"speedup {t_flat / t_hnsw:.1f} agreement {agreement:.4f}")


if __name__ == "__main__":
    main()
