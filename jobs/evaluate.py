"""Evaluation job: mAP and mP@k of search results against ground truth.

``python -m jobs.evaluate --results RES --ground-truth G``

Ground truth is either a manifest with a ``group`` column (positives of a query = the other
database images of its group; nothing ignored) or revisited ``gnd_*.pkl`` (Easy / Medium / Hard
setups with their ignored sets, :mod:`operators.metrics`). Queries and database images are matched
to the ground truth by name: in full where the names agree, else without folder or extension. Prints a
table and writes ``RES/metrics.json`` and the HTML report ``RES/report.html`` (:mod:`jobs.report`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from jobs.config import parse, run_cli
from jobs.report import ReportConfig, write_report
from operators.constraints import Count
from operators.metrics import evaluate, revisited_setups
from storage.artifacts import ArtifactRoot
from storage.collection import load_collection, read_revisited
from storage.errors import GroundTruthError
from storage.global_index import global_ids, has_global
from storage.results import read_results, write_metrics


@dataclass(kw_only=True)
class EvaluateConfig:
    results: str  # results folder written by jobs.search / jobs.rerank (required)
    ground_truth: str  # manifest with a group column, or revisited gnd_*.pkl (required)
    ks: list[Count] = field(default_factory=lambda: [1, 5, 10])
    report: ReportConfig = field(default_factory=ReportConfig)  # RES/report.html (report.enabled=false: none)
    storage: dict = field(default_factory=dict)


def stem(name: str) -> str:
    return os.path.splitext(os.path.basename(str(name)))[0]


def full_name(name: str) -> str:
    return os.path.normpath(str(name)).replace(os.sep, "/")


def name_key(database_names: list[str], reference_names: list[str], query_names: list[str]):
    """How names are matched: in full (``class/0001.jpg``) when the ground truth names every query
    and the database and ground truth agree (one holds the other), else by stem (no folder or
    extension, as revisited ``imlist``)."""
    db, ref = {full_name(n) for n in database_names}, {full_name(n) for n in reference_names}
    if {full_name(q) for q in query_names} <= ref and (ref <= db or db <= ref):
        return full_name
    return stem


def _id_by_name(database: pd.DataFrame, key) -> dict[str, int]:
    keys = database["name"].map(key)
    if keys.duplicated().any():
        raise GroundTruthError(
            f"image names are ambiguous once reduced to {key.__name__}: {keys[keys.duplicated()].tolist()[:5]}"
        )
    return dict(zip(keys, database["image_id"]))


def group_ground_truth(gt: pd.DataFrame, database: pd.DataFrame, query_names: list[str]):
    """Positives per query: database images of the query's group except the query's own image."""
    key = name_key(database["name"].tolist(), gt["name"].tolist(), query_names)
    group_of = dict(zip(gt["name"].map(key), gt["group"]))
    db = database.assign(group=database["name"].map(key).map(group_of))
    members = db.dropna(subset=["group"]).groupby("group")["image_id"].apply(np.asarray).to_dict()
    own = _id_by_name(database, key)
    positives, ignore = [], []
    for q in query_names:
        g = group_of.get(key(q))
        pos = members.get(g, np.zeros(0, np.int64)) if g is not None else np.zeros(0, np.int64)
        positives.append(pos[pos != own.get(key(q), -1)])
        ignore.append(np.zeros(0, np.int64))
    return {"all": (positives, ignore)}


def revisited_ground_truth(gnd: dict, database: pd.DataFrame, query_names: list[str]):
    """E/M/H positives and ignored sets per result row, mapped to database ids by image name.

    A ground-truth image absent from the database gets its own placeholder id (−1 − its imlist
    index) that no ranking holds: as a positive it counts as never retrieved (revisitop divides by
    the full ``len(qgnd)``), as an ignored image it changes nothing.
    """
    db_id = _id_by_name(database, stem)
    to_id = np.array([db_id.get(n, -1 - i) for i, n in enumerate(gnd["imlist"])], dtype=np.int64)
    qpos = {n: i for i, n in enumerate(gnd["qimlist"])}
    missing = [q for q in query_names if stem(q) not in qpos]
    if missing:
        raise GroundTruthError(f"queries not in the ground truth's qimlist: {missing[:5]}")
    rows = [qpos[stem(q)] for q in query_names]
    out = {}
    for setup, (pos, ign) in revisited_setups(gnd["gnd"]).items():
        out[setup] = ([to_id[pos[r]] for r in rows], [to_id[ign[r]] for r in rows])
    return out


def run(cfg: EvaluateConfig) -> dict:
    table, run_info = read_results(cfg.results, cfg.storage)
    database = ArtifactRoot(run_info["config"]["index"], cfg.storage).images()
    names = table.column("query_name").to_pylist()
    rankings = [np.asarray(r, np.int64) for r in table.column("ids").to_pylist()]
    if cfg.ground_truth.lower().endswith(".pkl"):
        setups = revisited_ground_truth(read_revisited(cfg.ground_truth, cfg.storage), database, names)
    else:
        gt = load_collection(cfg.ground_truth, "database", cfg.storage, allow_outside=True)  # no image is read
        if gt["group"].isna().all():
            raise GroundTruthError(f"{cfg.ground_truth} has no 'group' column: it cannot serve as ground truth")
        setups = group_ground_truth(gt, database, names)
    metrics = {s: evaluate(rankings, pos, ign, tuple(cfg.ks)) for s, (pos, ign) in setups.items()}
    per_query = {s: [None if np.isnan(a) else a for a in m.pop("ap")] for s, m in metrics.items()}
    if "all" in metrics:  # group ground truth: one setup
        out = {**metrics["all"], "per_query_ap": dict(zip(names, per_query["all"]))}
    else:  # revisited: easy / medium / hard
        out = {**metrics, "per_query_ap": {s: dict(zip(names, v)) for s, v in per_query.items()}}
    out["run"] = {
        k: run_info.get(k) for k in ("method", "rerank", "params", "index", "queries", "center_crop", "timings_s")
    }
    out["ranking_depth"] = ranking_depth(run_info, cfg.storage)
    if out["ranking_depth"]["truncated"]:
        print(f"note: {out['ranking_depth']['note']}", file=sys.stderr)
        run_info = {**run_info, "ranking_depth": out["ranking_depth"]["note"]}
    write_metrics(cfg.results, out, cfg.storage)
    print_table(metrics, cfg.ks)
    if cfg.report.enabled:
        setup = "all" if "all" in setups else "medium"
        rows = pd.DataFrame(
            {
                "query_id": table.column("query_id").to_pylist(),
                "query_name": names,
                "ids": rankings,
                "ap": [np.nan if a is None else a for a in per_query[setup]],
            }
        )
        uri = write_report(
            cfg.results, cfg.storage, cfg.report, metrics, cfg.ks, setup, rows, *setups[setup], database, run_info
        )
        print(f"report: {uri}")
    return out


def ranking_depth(run_info: dict, options: dict) -> dict:
    """How deep the evaluated rankings go against the database they rank: a ranking shorter than the database
    (``--topk`` below its size) scores positives below its end as never retrieved, so its mAP is a lower bound."""
    params, config = run_info.get("params") or {}, run_info.get("config") or {}
    roots = [
        ArtifactRoot(r, options) for r in [run_info.get("index") or config["index"], *config.get("distractors", [])]
    ]
    database = sum(len(global_ids(r)) if has_global(r) else len(r.images()) for r in roots)
    depth = int(params.get("topk") or params.get("top") or database)
    truncated = depth < database - 1  # a query's own image is left out of its ranking
    note = (
        (
            f"the rankings hold the top {depth} of {database} database items: positives ranked below are counted as "
            f"missed (mAP is a lower bound); search with --topk {database} to score whole rankings"
        )
        if truncated
        else ""
    )
    return {"depth": depth, "database": database, "truncated": truncated, "note": note}


def print_table(metrics: dict, ks: list[int]) -> None:
    head = f"{'setup':<8} {'queries':>7} {'mAP':>7} " + " ".join(f"{'mP@' + str(k):>7}" for k in ks)
    print(head)
    for setup, m in metrics.items():
        print(
            f"{setup:<8} {m['queries']:>7} {100 * m['mAP']:>7.2f} "
            + " ".join(f"{100 * m[f'mP@{k}']:>7.2f}" for k in ks)
        )


FLAGS = {
    "--results": ("results", "results folder written by jobs.search"),
    "--ground-truth": ("ground_truth", "manifest with a group column, or revisited gnd_*.pkl"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    return run(parse(EvaluateConfig, argv, FLAGS, __doc__, prog))


if __name__ == "__main__":
    run_cli(main)
