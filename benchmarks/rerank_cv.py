"""Re-ranking parameters for a collection, chosen by leave-one-group-out cross-validation.

    .venv/bin/python benchmarks/rerank_cv.py --index out/demo/index \
        --queries ../shared/data/instance-mini/images.csv \
        [--graph-k 5,10,20,50] [--kq 1,2,3,5,10] [--qe-n 1,2,3,5,10,20,50]

The papers' defaults (αQE n = 50, graph k = 50, k_q = 10) are for collections where an object has
tens to hundreds of images; on a small collection they average or diffuse across objects. This
script picks them for the collection at hand without judging them on the queries they were picked
on: for each group of the ground truth, the setting is chosen on the queries of every other group
(whole and cropped query sets pooled, global / ASMK* / fused initial rankings pooled) and applied to
the held-out group. Printed per initial method: mAP with no re-ranking, the papers' defaults, the
cross-validated mAP, and the setting chosen most often (use it with ``--set graph.k=…`` at index
time and ``--set rerank_params.…`` at search time). Graphs for each k are built in copies of the
index's ``global`` stage under ``--work``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.fusion_cv import cross_validate, per_query_ap  # noqa: E402
from cluster.ray_env import connect  # noqa: E402
from jobs import graph as graph_job  # noqa: E402
from jobs.evaluate import group_ground_truth  # noqa: E402
from jobs.search import SearchConfig, search  # noqa: E402
from jobs.search_queries import build_context  # noqa: E402
from jobs.search_rerank import query_expansion, rerank_in_tasks  # noqa: E402
from jobs.summary import JobSummary  # noqa: E402
from operators.rerank import RerankParams  # noqa: E402
from storage.artifacts import ArtifactRoot  # noqa: E402
from storage.collection import load_collection  # noqa: E402


def graph_copy(index: str, work: Path, k: int) -> ArtifactRoot:
    """A root sharing the index's images and global stage, with its own k-NN graph."""
    dst = work / f"graph-k{k}"
    if not (dst / "graph").exists():
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for name in ("global", "images.parquet", "index.json"):
            src = Path(index) / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / name)
        graph_job.main(["--index", str(dst), "--k", str(k), "--set", "stages=[graph]"])
    return ArtifactRoot(str(dst))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--index", required=True)
    p.add_argument("--queries", required=True, help="collection with a group column (also the ground truth)")
    p.add_argument("--crops", default="whole,0.4")
    p.add_argument("--graph-k", default="5,10,20,50")
    p.add_argument("--kq", default="1,2,3,5,10")
    p.add_argument("--qe-n", default="1,2,3,5,10,20,50")
    p.add_argument("--work", default="out/rerank-cv")
    a = p.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    connect()
    gt = load_collection(a.queries)
    graphs = {k: graph_copy(a.index, Path(a.work), k) for k in ints(a.graph_k)}
    ap: dict[tuple, list[np.ndarray]] = {}  # (method, rerank, setting) -> per-query AP per query set
    groups = []
    for crop in a.crops.split(","):
        for method in ("global", "asmk", "fused"):
            cfg = SearchConfig(
                index=a.index,
                queries=a.queries,
                out=str(Path(a.work) / "queries"),
                method=method,
                topk=1000,
                center_crop=None if crop == "whole" else float(crop),
            )
            ctx = build_context(cfg, JobSummary("rerank-cv"))
            names = ctx.queries.set_index("image_id").loc[ctx.qids, "name"].tolist()
            pos = group_ground_truth(gt, ctx.database, names)["all"][0]
            if method == "global":
                group_of = dict(zip(gt["name"], gt["group"]))
                groups.append(np.array([group_of.get(n, "?") if len(x) else "?" for n, x in zip(names, pos)], object))
            initial = search(ctx, JobSummary("rerank-cv"))
            ap.setdefault((method, "none", ()), []).append(per_query_ap(initial.ids, pos))
            for n in ints(a.qe_n):
                c = dataclasses.replace(
                    ctx, cfg=dataclasses.replace(cfg, rerank="alpha-qe", rerank_params=RerankParams(qe_n=n))
                )
                ap.setdefault((method, "alpha-qe", (n,)), []).append(per_query_ap(query_expansion(c, initial).ids, pos))
            for k, groot in graphs.items():
                for kq in ints(a.kq):
                    c = dataclasses.replace(
                        ctx,
                        parts=[groot],
                        cfg=dataclasses.replace(cfg, rerank="dfs", rerank_params=RerankParams(kq=kq)),
                    )
                    ap.setdefault((method, "dfs", (k, kq)), []).append(
                        per_query_ap(rerank_in_tasks(c, initial).ids, pos)
                    )
            print(f"{crop} {method}: done", file=sys.stderr, flush=True)
    report({s: np.concatenate(v) for s, v in ap.items()}, np.concatenate(groups))


def report(ap: dict, groups_per_set: np.ndarray) -> None:
    """Cross-validated mAP per initial method and re-ranking; one setting for all methods too."""
    methods = ("global", "asmk", "fused")
    groups = groups_per_set
    print(f"{'initial':<8} {'re-ranking':<10} {'none':>7} {'papers':>7} {'CV':>7}  chosen most (hindsight best)")
    for rerank, papers in (("alpha-qe", (50,)), ("dfs", (50, 10))):
        pooled = {}
        for m in methods:
            table = {s[2]: ap[s] for s in ap if s[0] == m and s[1] == rerank}
            held, chosen = cross_validate(table, groups)
            best = max(table, key=lambda s: np.nanmean(table[s]))
            paper = np.nanmean(table[papers]) if papers in table else float("nan")
            print(
                f"{m:<8} {rerank:<10} {100 * np.nanmean(ap[(m, 'none', ())]):>7.2f} {100 * paper:>7.2f} "
                f"{100 * np.nanmean(held):>7.2f}  {Counter(chosen).most_common(1)[0][0]} ({best}: "
                f"{100 * np.nanmean(table[best]):.2f})"
            )
            for s, v in table.items():
                pooled.setdefault(s, []).append(v)
        pooled = {s: np.concatenate(v) for s, v in pooled.items()}
        held, chosen = cross_validate(pooled, np.concatenate([groups] * len(methods)))
        print(
            f"{'all 3':<8} {rerank:<10} {'':>7} {'':>7} {100 * np.nanmean(held):>7.2f}  one setting for every "
            f"method: {Counter(chosen).most_common(1)[0][0]}"
        )


if __name__ == "__main__":
    main()
