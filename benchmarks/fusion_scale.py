"""Fusion as distractors grow: ASMK* alone, global alone, rank fusion and z fusion on the same shortlists.

    .venv/bin/python benchmarks/fusion_scale.py --index /tmp/fus/n10000 --queries /tmp/fus/database.csv

Roots as ``benchmarks/scale.py --n N --root DIR --index-stages global,codebook,asmk`` makes them (``DIR/n<N>``,
queries ``DIR/database.csv``), or any index with a grouped collection as queries. For whole and 40%-crop
queries it searches once with ASMK* and once with the global descriptor (shortlists of 1,000) and fuses them
offline with the modes of :mod:`operators.fusion`; every mAP is of the full fused ranking. No setting is chosen
here: the z rows use the library's defaults (β and NULL_START) beside a few others for context. Last line:
``fusion N: asmk A, global G, rank R, z Z`` (40% crops).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.fusion_cv import candidates, per_query_ap  # noqa: E402
from cluster.ray_env import connect  # noqa: E402
from jobs.evaluate import group_ground_truth  # noqa: E402
from jobs.search import SearchConfig  # noqa: E402
from operators.fusion import fuse  # noqa: E402
from storage.collection import load_collection  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--index", required=True)
    p.add_argument("--queries", required=True, help="collection with a group column (also the ground truth)")
    p.add_argument("--crops", default="whole,0.4")
    p.add_argument("--betas", default="1,2,3", help="z fusion's β shown beside the default")
    a = p.parse_args()
    default = SearchConfig(index=a.index, queries=a.queries, out="")
    connect(default.ray)
    gt = load_collection(a.queries)
    last = {}
    for crop in a.crops.split(","):
        crop_fraction = None if crop == "whole" else float(crop)
        cfg = SearchConfig(index=a.index, queries=a.queries, out="/tmp/fusion-scale", center_crop=crop_fraction)
        ctx, ra, rg, (cand, asmk_s, glob, null) = candidates(cfg, 1000)
        names = ctx.queries.set_index("image_id").loc[ctx.qids, "name"].tolist()
        positives = group_ground_truth(gt, ctx.database, names)["all"][0]
        keep = np.array([len(x) > 0 for x in positives])

        def m_ap(ids: np.ndarray) -> float:
            return 100 * float(np.nanmean(per_query_ap(ids, positives)[keep]))

        k = ctx.n_database
        rows = {"ASMK* alone": m_ap(ra.ids), "global alone": m_ap(rg.ids)}
        rows["rank fusion, β 1.5"] = m_ap(fuse(cand, asmk_s, glob, 1.5, k, "rank")[0])
        for beta in sorted({float(b) for b in a.betas.split(",")} | {default.fusion_beta}):
            tag = " (default)" if beta == default.fusion_beta else ""
            rows[f"z fusion, β {beta:g}{tag}"] = m_ap(fuse(cand, asmk_s, glob, beta, k, "z", null)[0])
        print(f"\n== {crop} queries: {int(keep.sum())} with positives, database {ctx.n_database:,} ==")
        for name, value in rows.items():
            print(f"  {name:<24} mAP {value:6.2f}")
        last = {
            "asmk": rows["ASMK* alone"],
            "global": rows["global alone"],
            "rank": rows["rank fusion, β 1.5"],
            "z": rows[f"z fusion, β {default.fusion_beta:g} (default)"],
        }
    print(f"fusion {len(ctx.database)}: " + ", ".join(f"{k} {v:.2f}" for k, v in last.items()))


if __name__ == "__main__":
    main()
