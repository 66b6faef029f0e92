"""The index at R1M-like scale on this machine: instance-mini's real images among synthetic distractors.

    .venv/bin/python benchmarks/scale.py --n 100000 --root /tmp/scale [--codebook-k 8192]

Split (fixed, by group): the *donor* groups (strecha_herz, ocv_calib and the single-image distr_*) are
never queried; the distractors (:mod:`operators.distractors`) are drawn around them. The other groups'
images are the real database and the queries (whole, and 40% centre crops; a query's positives are
the other images of its group). Every step is a job of the product, run as a subprocess on an embedded
local Ray:

1. ``DIR/donors``: ``jobs.index`` of the donor images (with ``--donor-photos PHOTOS``: also the photographs of
   ``benchmarks/donor_photos.sh PHOTOS``, cut into tiles as ``benchmarks/distractor_calibration.py`` cuts them;
   RootSIFT, ``--sift-n`` = 1,000 features an image as R1M's ~1,000; global; a codebook of up to ``--codebook-k``
   words trained on them, at least ``--min-points`` descriptors a word: the codebook comes from other images than
   the indexed ones, as in the papers; with ``--codebook-sift-n`` above ``--sift-n``, the codebook is trained in
   ``DIR/codebook`` on the donors described with that many features, for a codebook of ≥ 32k real words);
2. ``DIR/n<N>``: ``jobs.index --set local_store=entries`` of the real database (ASMK* entries of the donors'
   codebook, no descriptors stored), ``jobs.distractors`` up to N database images (``--distractors``: ``mosaic``,
   the default, with the calibrated :data:`MOSAIC` parameters, or ``mix``), then ``jobs.index``
   stages global, codebook, asmk, graph (k = ``--graph-k``), spectral (rank ``--rank``);
3. ``--train gss,gradnet``: ``jobs.train_reranker`` on the root's graph (GRAD-Net's K = ``--graph-k``);
4. searches: global, asmk, fused; dfs and SHybrid (hybrid, sparse U 1%) re-ranking of the global ranking (and
   any of ``--reranks``: gss, gradnet, cas, …); each on whole and cropped queries, evaluated against the groups.

Prints each step's wall time and peak RSS of its process tree (Ray workers included), bytes on disk per
artifact, per method mAP, throughput (queries / search wall time of the search stage) and latency p50/p95
(the service time of one query: searches run one query per Ray task; diffusion tasks take blocks, whose
time is divided by their queries). Before the last line, one per searched method (crop queries):
``latency METHOD: p50_ms P, map_crops M`` (METHOD ``global``, ``fused``, ``global+dfs``, …). Last line:
``scale N: peak_rss_gb X, index_gb Y, build_s Z, map_crops M`` (M: fused, 40% crops; Y: DIR/n<N> without its
query cache; Z: the root's jobs, the donors' index left out). State the machine when quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory import run_job  # noqa: E402

DONOR_GROUPS = ("strecha_herz", "ocv_calib")
# The distractors' parameters (operators.distractors), calibrated against real unrelated photos by
# benchmarks/distractor_calibration.py; ``--distractors mix`` gives the first scheme's defaults.
MOSAIC = {"kind": "mosaic", "grid": 3, "window": 1.0, "flip": 0.0, "global_noise": 0.8}
DATA = REPO.parent / "shared" / "data" / "instance-mini" / "images.csv"


def split(collection: Path, out: Path, photos: Path | None = None) -> tuple[Path, Path]:
    """donors.csv (donor groups + distr_*, + the tiles of ``photos/photos.csv`` when given) and database.csv (the
    rest), absolute paths."""
    df = pd.read_csv(collection)
    df["file"] = [str((collection.parent / f).resolve()) for f in df["file"]]
    donor = df["group"].isin(DONOR_GROUPS) | df["group"].astype(str).str.startswith("distr_")
    out.mkdir(parents=True, exist_ok=True)
    donors = df[donor]
    if photos is not None:
        from benchmarks.distractor_calibration import tiles

        donors = pd.concat(
            [donors[["file", "group"]], tiles(photos / "photos.csv", out / "donor-tiles", 640, 12)], ignore_index=True
        )
    donors.to_csv(out / "donors.csv", index=False)
    df[~donor].to_csv(out / "database.csv", index=False)
    return out / "donors.csv", out / "database.csv"


def du_gb(path: Path, skip: str = "query-cache") -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and skip not in f.parts) / 2**30


class Steps:
    """Runs jobs, keeping each one's wall time and peak RSS (and a log under ``DIR/logs``)."""

    def __init__(self, logs: Path):
        self.logs, self.rows = logs, []
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, args: list[str], build: bool = True) -> None:
        wall, peak = run_job(args, log=str(self.logs / f"{name}.log"))
        self.rows.append({"step": name, "wall_s": wall, "peak_rss_mb": peak, "build": build})
        print(f"  {name:<28} {wall:8.1f} s   peak RSS {peak / 1024:6.2f} GB", flush=True)


def latency(run: dict) -> tuple[float, float, float]:
    """p50, p95 of the per-query service time (ms) and queries per second of a search's run.json.

    A query's time is the sum over the search's steps (global, asmk, a re-ranking) of its task's time, divided
    by the queries that task took (one, but for re-ranking blocks); steps whose query counts differ (a query
    with no local feature has no ASMK task) are added as their means."""
    steps = [
        np.repeat([t / n for n, t in step if n], [n for n, _ in step if n])
        for step in run.get("task_seconds", {}).values()
    ]
    counts = {len(s) for s in steps}
    if not steps:
        per_query = np.full(1, np.nan)
    elif len(counts) == 1:
        per_query = np.sum(steps, axis=0)
    else:
        longest = max(steps, key=len)
        per_query = longest + sum(s.mean() for s in steps if s is not longest)
    search_s = sum(v for k, v in run["timings_s"].items() if k.startswith(("search", "re-rank")))
    p50, p95 = np.percentile(per_query, [50, 95]) * 1000
    return p50, p95, run["queries"] / max(search_s, 1e-9)


def exact_global(run: dict) -> bool:
    """Whether a search ranked by brute force on request (``global_search=exact``) in a root with an approximate
    global index (run.json's ``global_search``: the mode asked and what ranked each partition)."""
    return any(v.get("mode") == "exact" for v in run.get("global_search", {}).values())


def recall_at(root: Path, crop: str, k: int = 100) -> float | None:
    """Mean over queries of |top-k approximate ∩ top-k exact| / min(k, exact list): the global search by the root's
    approximate index against brute force, when both ran (``--exact-global``)."""
    runs = [root / "search" / f"{crop}-global-none", root / "search" / f"{crop}-global_exact-none"]
    if not all((r / "results.parquet").exists() for r in runs):
        return None
    approx, exact = (pd.read_parquet(r / "results.parquet").set_index("query_id")["ids"] for r in runs)
    hits = [len(set(approx[q][:k]) & set(e[:k])) / max(1, min(k, len(e))) for q, e in exact.items()]
    return float(np.mean(hits))


def print_recall(root: Path, crops: str) -> None:
    for crop in crops.split(","):
        if (r := recall_at(root, crop)) is not None:
            print(f"recall@100 global ({crop} queries): {r:.4f} (the approximate index against brute force)")


def report(root: Path) -> pd.DataFrame:
    """The method table of a finished run, read back from its results (``--report``: no job runs)."""
    rows = []
    for res in sorted((root / "search").iterdir()) if (root / "search").is_dir() else []:
        if not (res / "metrics.json").exists():
            continue
        run = json.loads((res / "run.json").read_text())
        p50, p95, qps = latency(run)
        rows.append(
            {
                "queries": "whole" if run["center_crop"] is None else str(run["center_crop"]),
                "method": run["method"] + ("/exact" if exact_global(run) else ""),
                "rerank": run["rerank"],
                "mAP": 100 * json.loads((res / "metrics.json").read_text())["mAP"],
                "p50_ms": p50,
                "p95_ms": p95,
                "qps": qps,
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, required=True, help="database images (real + distractors)")
    ap.add_argument("--root", required=True)
    ap.add_argument("--codebook-k", type=int, default=8192)
    ap.add_argument("--min-points", type=int, default=16, help="codebook: descriptors per word (k is reduced below)")
    ap.add_argument("--graph-k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=8, help="graph: IVF lists searched per item (above 200,000 items)")
    ap.add_argument("--rank", type=int, default=400)
    ap.add_argument("--sift-n", type=int, default=1000, help="RootSIFT features per image (R1M-like: ~1,000)")
    ap.add_argument(
        "--codebook-sift-n", type=int, help="RootSIFT features per donor for the codebook (default: --sift-n)"
    )
    ap.add_argument("--collection", default=str(DATA))
    ap.add_argument("--distractors", choices=["mosaic", "mix"], default="mosaic", help="the distractors' kind")
    ap.add_argument("--donor-photos", help="a folder of benchmarks/donor_photos.sh: its photos' tiles join the donors")
    ap.add_argument(
        "--index-stages",
        default="global,codebook,asmk,graph,spectral",
        help="stages of the last index step (a resumed run may leave out finished ones)",
    )
    ap.add_argument("--crops", default="whole,0.4", help="query sets searched: whole and/or centre-crop fractions")
    ap.add_argument("--methods", default="global,asmk,fused", help="initial rankings searched (without re-ranking)")
    ap.add_argument(
        "--reranks",
        default="dfs,hybrid",
        help="re-rankings of the global ranking ('' for none; gss / gradnet need --train)",
    )
    ap.add_argument("--train", default="", help="learned re-rankers trained on the graph first (gss,gradnet)")
    ap.add_argument(
        "--batched",
        action="store_true",
        help="searches in the jobs' default query blocks (one pass "
        "over the database for many queries) instead of one query per task; latency is then per block",
    )
    ap.add_argument(
        "--exact-global",
        action="store_true",
        help="also the global search by brute force (global_search=exact): its latency, and recall@100 of the default",
    )
    ap.add_argument("--report", action="store_true", help="print the table of a finished run (no job runs)")
    a = ap.parse_args()
    if a.report:
        root = Path(a.root).resolve() / f"n{a.n}"
        print(report(root).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        print_recall(root, a.crops)
        return
    base = Path(a.root).resolve()
    photos = Path(a.donor_photos).resolve() if a.donor_photos else None
    donors_csv, db_csv = split(Path(a.collection).resolve(), base, photos)
    n_real = len(pd.read_csv(db_csv))
    root = base / f"n{a.n}"
    steps = Steps(root / "logs")
    print(
        f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB; "
        f"database {a.n:,} = {n_real} real + {max(0, a.n - n_real):,} synthetic",
        flush=True,
    )
    donors = base / "donors"
    codebook_root = train_codebook(steps, a, base, donors_csv)
    steps.run(
        "donors: index",
        [
            *("-m", "jobs.index", "--collection", str(donors_csv), "--out", str(donors)),
            *("--set", f"describe.sift_n={a.sift_n}"),
            *(
                ("--set", "stages=[extract,global,codebook]", "--set", f"codebook.k={a.codebook_k}")
                if codebook_root == donors
                else ("--set", "stages=[extract,global]")
            ),
            *("--set", f"codebook.min_points={a.min_points}"),
        ],
        build=False,
    )
    k = json.loads((codebook_root / "codebook" / "meta.json").read_text())["k"]
    print(f"  codebook: k = {k} trained on the donors' descriptors", flush=True)
    common = [
        "--collection",
        str(db_csv),
        "--out",
        str(root),
        "--set",
        "local_store=entries",
        "--set",
        f"describe.sift_n={a.sift_n}",
        "--set",
        f"codebook.source={codebook_root}",
    ]
    steps.run("extract (entries)", ["-m", "jobs.index", *common, "--set", "stages=[extract]"])
    if a.n > n_real:
        steps.run(
            "distractors",
            [
                *("-m", "jobs.distractors", "--donors", str(donors), "--out", str(root), "--n", str(a.n - n_real)),
                *("--set", f"codebook={codebook_root}"),
                *(
                    x
                    for k, v in (MOSAIC if a.distractors == "mosaic" else {}).items()
                    for x in ("--set", f"params.{k}={v}")
                ),
            ],
        )
    if a.index_stages != "none":
        steps.run(
            a.index_stages.replace(",", "+"),
            [
                "-m",
                "jobs.index",
                *common,
                "--set",
                f"graph.k={a.graph_k}",
                "--set",
                f"graph.nprobe={a.nprobe}",
                "--set",
                f"spectral.rank={a.rank}",
                "--set",
                f"stages=[{a.index_stages}]",
            ],
        )
    stages = (
        json.loads((root / "summary-index.json").read_text())["timings_s"]
        if (root / "summary-index.json").exists()
        else {}
    )
    print(f"  index stages (s): {json.dumps(stages)}")
    sizes = {
        p.name: du_gb(p)
        for p in sorted(root.iterdir())
        if p.is_dir() and p.name not in ("query-cache", "logs", "search")
    }
    index_gb = du_gb(root)
    print(
        "  disk (GB): " + ", ".join(f"{k} {v:.3f}" for k, v in sizes.items()) + f"; total {index_gb:.3f}"
        f" ({index_gb * 2**30 / a.n / 1024:.1f} KB per image)"
    )
    for method in filter(None, a.train.split(",")):  # K of GRAD-Net: the graph's list length
        steps.run(
            f"train {method}",
            ["-m", "jobs.train_reranker", "--index", str(root), "--method", method, "--set", f"gradnet.k={a.graph_k}"],
        )
    runs = [*((m, "none") for m in a.methods.split(",") if m), *(("global", r) for r in a.reranks.split(",") if r)]
    runs += [("global_exact", "none")] if a.exact_global else []
    for crop in a.crops.split(","):
        for method, rerank in runs:
            name = f"{crop}-{method}-{rerank}"
            res = root / "search" / name
            args = [
                "-m",
                "jobs.search",
                "--index",
                str(root),
                "--queries",
                str(db_csv),
                "--out",
                str(res),
                "--topk",
                "100",
                "--method",
                method.removesuffix("_exact"),
                "--rerank",
                rerank,
            ]
            if not a.batched:
                args += ["--set", "query_block=1", "--set", "asmk.query_block=1", "--set", "rerank_params.block=4"]
            if method.endswith("_exact"):
                args += ["--set", "global_search=exact"]
            if rerank == "hybrid":
                args += ["--set", "rerank_params.sparse_keep=0.01"]
            if crop != "whole":
                args += ["--center-crop", crop]
            steps.run(f"search {name}", args, build=False)
            steps.run(
                f"evaluate {name}",
                [
                    "-m",
                    "jobs.evaluate",
                    "--results",
                    str(res),
                    "--ground-truth",
                    str(db_csv),
                    "--set",
                    "report.enabled=false",
                ],
                build=False,
            )
    df = report(root)
    table = df.to_dict("records")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    build_s = sum(r["wall_s"] for r in steps.rows if r["build"])
    peak_gb = max(r["peak_rss_mb"] for r in steps.rows) / 1024
    fused = df[(df.queries == "0.4") & (df.method == "fused") & (df.rerank == "none")] if len(df) else df
    crops = f"{fused['mAP'].iloc[0]:.2f}" if len(fused) else "-"  # no fused crop search (--methods, --crops)
    (root / "scale.json").write_text(
        json.dumps(
            {"n": a.n, "steps": steps.rows, "disk_gb": sizes, "table": table, "index_stages_s": stages}, indent=1
        )
    )
    for line in latency_lines(df):
        print(line)
    print_recall(root, a.crops)
    print(f"scale {a.n}: peak_rss_gb {peak_gb:.2f}, index_gb {index_gb:.2f}, build_s {build_s:.0f}, map_crops {crops}")


def train_codebook(steps: Steps, a: argparse.Namespace, base: Path, donors_csv: Path) -> Path:
    """The root whose codebook indexes everything: the donors' own (``DIR/donors``), or with ``--codebook-sift-n``
    above ``--sift-n`` a root ``DIR/codebook`` of the donors described with more features, trained there."""
    if (a.codebook_sift_n or a.sift_n) <= a.sift_n:
        return base / "donors"
    root = base / "codebook"
    steps.run(
        "codebook: index",
        [
            *("-m", "jobs.index", "--collection", str(donors_csv), "--out", str(root)),
            *("--set", f"describe.sift_n={a.codebook_sift_n}", "--set", "stages=[extract,codebook]"),
            *("--set", f"codebook.k={a.codebook_k}", "--set", f"codebook.min_points={a.min_points}"),
        ],
        build=False,
    )
    return root


def latency_lines(df: pd.DataFrame) -> list[str]:
    """``latency METHOD: p50_ms P, map_crops M`` per searched method (``global+dfs`` for a re-ranking), of its 40%
    crop queries: p50 of one query's service time (batched runs: its block's time over the block's queries)."""
    crops = df[df.queries == "0.4"] if len(df) else df
    return [
        f"latency {r.method if r.rerank == 'none' else f'{r.method}+{r.rerank}'}: p50_ms {r.p50_ms:.1f}, "
        f"map_crops {r.mAP:.2f}"
        for r in crops.itertuples()
    ]


if __name__ == "__main__":
    main()
