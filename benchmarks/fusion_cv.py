"""Fusion of ASMK and global search, judged by leave-one-group-out cross-validation.

    .venv/bin/python benchmarks/fusion_cv.py --index out/demo/index \
        --queries ../shared/data/instance-mini/images.csv [--crops whole,0.4] [--betas 0.1,0.2,...]

For each query set (whole images, centre crops) it searches once with ASMK and once with the
global descriptor (shortlists of ``--shortlist``), then fuses them offline with every mode of
:mod:`operators.fusion` and every β of the grid. β is never judged on the queries it was chosen
on: for each group of the ground truth, β (per mode, and the mode too for ``auto``) is chosen on the
queries of every other group and applied to that group's queries (leave-one-group-out). Printed:
mAP of ASMK alone, global alone, and per fusion mode the cross-validated mAP, the β chosen most
often, the best fixed β in hindsight (an upper bound, not a result), the mAP at the configured
default, and the number of groups where fusion falls more than 5 points below the better
component on that group. Queries are described once and cached (``ROOT/query-cache``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from cluster.ray_env import connect  # noqa: E402
from jobs.evaluate import group_ground_truth  # noqa: E402
from jobs.search import SearchConfig  # noqa: E402
from jobs.search_queries import build_context  # noqa: E402
from jobs.search_rankings import asmk_search, fusion_candidates, global_search  # noqa: E402
from jobs.summary import JobSummary  # noqa: E402
from operators.fusion import fuse, null_level  # noqa: E402
from operators.metrics import evaluate  # noqa: E402
from storage.collection import load_collection  # noqa: E402

MODES = ("z", "score", "rank")


def per_query_ap(ids: np.ndarray, positives: list[np.ndarray]) -> np.ndarray:
    return np.asarray(evaluate([r[r >= 0] for r in ids], positives, [np.zeros(0, np.int64)] * len(ids))["ap"])


def candidates(cfg: SearchConfig, shortlist: int):
    """Described queries, their ASMK and global rankings and the union of both with every score."""
    ctx = build_context(cfg, JobSummary("fusion-cv"))
    a, g = asmk_search(ctx, shortlist), global_search(ctx, ctx.xq, shortlist)
    null = (null_level(a.scores, ctx.n_database, absent=0.0), null_level(g.scores, ctx.n_database))
    return ctx, a, g, (*fusion_candidates(ctx, a, g), null)


def cross_validate(ap: dict, groups: np.ndarray) -> tuple[np.ndarray, list]:
    """Held-out AP per query: the setting maximising mAP on the other groups' queries, applied to this group.

    ``ap``: {setting: per-query AP}. Returns the held-out APs and the setting chosen per group.
    """
    out = np.full(len(groups), np.nan)
    chosen = []
    for grp in np.unique(groups):
        held = groups == grp
        best = max(ap, key=lambda s: np.nanmean(np.where(held, np.nan, ap[s])))  # ties: the first setting
        out[held] = ap[best][held]
        chosen.append(best)
    return out, chosen


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--index", required=True)
    p.add_argument("--queries", required=True, help="collection with a group column (also the ground truth)")
    p.add_argument("--crops", default="whole,0.4")
    p.add_argument("--betas", default="0.05,0.1,0.2,0.3,0.5,0.7,1,1.5,2,3,5")
    p.add_argument("--shortlist", type=int, default=1000)
    p.add_argument(
        "--per-group", default="", help="also print each group's mAP for these settings (score:0.5,rank:1.5)"
    )
    a = p.parse_args()
    betas = [float(b) for b in a.betas.split(",")]
    default = SearchConfig(index=a.index, queries=a.queries, out="")
    connect(default.ray)
    gt = load_collection(a.queries)
    pooled = []
    for crop in a.crops.split(","):
        cfg = SearchConfig(
            index=a.index, queries=a.queries, out="/tmp/fusion-cv", center_crop=None if crop == "whole" else float(crop)
        )
        t0 = time.time()
        ctx, ra, rg, (cand, asmk_s, glob, null) = candidates(cfg, a.shortlist)
        names = ctx.queries.set_index("image_id").loc[ctx.qids, "name"].tolist()
        positives = group_ground_truth(gt, ctx.database, names)["all"][0]
        group_of = dict(zip(gt["name"], gt["group"]))
        groups = np.array([group_of.get(n, "?") if len(p) else "?" for n, p in zip(names, positives)], object)
        ap = {("asmk", 0): per_query_ap(ra.ids, positives), ("global", 0): per_query_ap(rg.ids, positives)}
        ap.update(
            {
                (m, b): per_query_ap(fuse(cand, asmk_s, glob, b, 100, m, null)[0], positives)
                for m in MODES
                for b in betas
            }
        )
        print(
            f"\n== {crop} queries: {int((groups != '?').sum())} with positives in {len(set(groups) - {'?'})} groups "
            f"(searches {time.time() - t0:.1f} s) =="
        )
        report(ap, groups, default, [(m, float(b)) for m, b in (x.split(":") for x in a.per_group.split(",") if x)])
        pooled.append((ap, groups))
    if len(pooled) > 1:
        sets = " + ".join(a.crops.split(","))
        print(f"\n== every query set together ({sets}): beta chosen on other groups' queries of all sets ==")
        report(
            {s: np.concatenate([ap[s] for ap, _ in pooled]) for s in pooled[0][0]},
            np.concatenate([g for _, g in pooled]),
            default,
            [],
        )


def report(ap: dict, groups: np.ndarray, default: SearchConfig, per_group: list[tuple[str, float]]) -> None:
    ap_a, ap_g = ap[("asmk", 0)], ap[("global", 0)]
    print(f"ASMK* alone  mAP {100 * np.nanmean(ap_a):6.2f}")
    print(f"global alone mAP {100 * np.nanmean(ap_g):6.2f}")
    fused = {s: v for s, v in ap.items() if s[0] in MODES}
    real = sorted(set(groups) - {"?"})
    for m in (*MODES, "auto"):
        table = fused if m == "auto" else {s: v for s, v in fused.items() if s[0] == m}
        held, chosen = cross_validate(table, groups)
        hindsight = max(table, key=lambda s: np.nanmean(table[s]))
        at_default = fused.get((m if m != "auto" else default.fusion, default.fusion_beta))
        below = [
            g
            for g in real
            if np.nanmean(held[groups == g]) < max(np.nanmean(ap_a[groups == g]), np.nanmean(ap_g[groups == g])) - 0.05
        ]
        print(
            f"fused {m:<6} cross-validated mAP {100 * np.nanmean(held):6.2f}   chosen most "
            f"{Counter(map(str, chosen)).most_common(1)[0][0]:<14} hindsight {100 * np.nanmean(table[hindsight]):6.2f} "
            f"at {hindsight}   at default beta={default.fusion_beta} {100 * np.nanmean(at_default):6.2f}   "
            f"groups >5 pts below the better component: {below}"
        )
    if per_group:
        print(
            f"{'group':<18} {'queries':>7} {'ASMK*':>6} {'global':>6} "
            + " ".join(f"{m + ' ' + str(b):>10}" for m, b in per_group)
        )
        for g in real:
            sel = groups == g
            print(
                f"{g:<18} {int(sel.sum()):>7} {100 * np.nanmean(ap_a[sel]):>6.1f} {100 * np.nanmean(ap_g[sel]):>6.1f} "
                + " ".join(f"{100 * np.nanmean(fused[(m, b)][sel]):>10.1f}" for m, b in per_group)
            )


if __name__ == "__main__":
    main()
