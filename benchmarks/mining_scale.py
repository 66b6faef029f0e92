"""Mining on manifolds at scale, through ``jobs.graph`` and ``jobs.mine`` on an embedded local Ray.

    .venv/bin/python benchmarks/mining_scale.py --n 1000000 --root /tmp/mine-bench [--anchors 1500]

Writes an index root holding a ``global`` stage of ``--n`` synthetic 64-d descriptors (the curved manifold
with density clusters of ``benchmarks/diffusion_scale.py``) and an image table, builds the paper's graph
(``jobs.graph --k 30 --rank 0``: reciprocal kNN, a = [xᵀy]₊³, no spectral stage), then mines
(``jobs.mine --anchors N_a --set iasmk=false``: modes of π, one multi-right-hand-side CG per block of 64
anchors in Ray tasks, Euclidean top-10,000 by exact blocked search, pools of 50). Prints each job's wall
time (Ray start included), the peak RSS of its process tree (Ray workers included), its stage times,
and the pairs written. State the machine when quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.diffusion_scale import make_data  # noqa: E402
from benchmarks.graph_job_scale import write_index  # noqa: E402
from benchmarks.memory import run_job  # noqa: E402
from storage.artifacts import ArtifactRoot  # noqa: E402


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--anchors", type=int, default=1500)
    ap.add_argument("--root", default="/tmp/mine-bench")
    ap.add_argument("--reuse", action="store_true", help="keep the graph built before: time the mining only")
    a = ap.parse_args()
    print(
        f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB;"
        f" n={a.n:,} anchors={a.anchors}",
        flush=True,
    )
    root, pairs = ArtifactRoot(a.root), Path(a.root, "pairs")
    if not a.reuse:
        x, _ = make_data(a.n, 64, 100, 1)
        write_index(root, x)
        del x
        root.write_images(
            pd.DataFrame({"image_id": np.arange(a.n), "file": [f"synthetic/{i:07d}.jpg" for i in range(a.n)]})
        )
        wall, peak = run_job(["-m", "jobs.graph", "--index", a.root, "--k", "30", "--rank", "0"])
        stages = json.loads(Path(a.root, "summary-graph.json").read_text())["timings_s"]
        print(
            f"jobs.graph (k = 30): {wall:.0f} s wall, peak RSS {peak:.0f} MB; stages {json.dumps(stages)}", flush=True
        )
    for f in pairs.rglob("*"):  # mine from scratch (a rerun would skip committed parts)
        if f.is_file():
            f.unlink()
    wall, peak = run_job(
        ["-m", "jobs.mine", "--index", a.root, "--out", str(pairs), "--anchors", str(a.anchors), "--set", "iasmk=false"]
    )
    summary = json.loads(Path(pairs, "summary-mine.json").read_text())
    print(f"jobs.mine: {wall:.0f} s wall, peak RSS {peak:.0f} MB; stages {json.dumps(summary['timings_s'])}")
    print(
        f"graph: {json.dumps(summary['graph'])}; counts {json.dumps(summary['counts'])}; pairs/ {du_mb(pairs):.1f} MB"
    )


if __name__ == "__main__":
    main()
