"""Learned whitening Lw from mined pairs: its regularisation and dimension by leave-one-group-out CV.

    .venv/bin/python benchmarks/lw_cv.py --index OUT/index --pairs OUT/pairs --results OUT/before \
        --ground-truth ../shared/data/instance-mini/images.csv

Uses the index's raw global descriptors, the queries described for ``--results`` (a global search,
e.g. the closed loop's "before"), and exhaustive search in memory (small collections only). For every
(reg, dim, negatives) of the grid it computes each query's AP after Lw; the setting is then chosen per
group on the other groups' queries (the labels of the held-out group are never used to choose it).
Prints raw mAP, the cross-validated mAP, the setting chosen most often, and the best in hindsight.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fusion_cv import cross_validate  # noqa: E402
from jobs.evaluate import group_ground_truth  # noqa: E402
from operators.metrics import evaluate  # noqa: E402
from operators.whitening import learn_lw  # noqa: E402
from storage.artifacts import ArtifactRoot  # noqa: E402
from storage.collection import load_collection  # noqa: E402
from storage.pairs import read_pairs  # noqa: E402
from storage.results import read_run  # noqa: E402
from storage.schemas import global_matrix  # noqa: E402


def described(root: ArtifactRoot) -> tuple[np.ndarray, np.ndarray]:
    t = root.shards().read_all(["image_id", "status", "global"])
    t = t.filter(pc.equal(t.column("status"), "ok"))
    return t.column("image_id").to_numpy(), global_matrix(t).astype(np.float64)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--index", required=True)
    p.add_argument("--pairs", required=True)
    p.add_argument("--results", required=True, help="a global search's results folder (its described queries)")
    p.add_argument("--ground-truth", required=True)
    p.add_argument("--regs", default="0.01,0.1,0.3,1,3,10")
    p.add_argument("--dims", default="64,256,1280")
    a = p.parse_args()
    root = ArtifactRoot(a.index)
    ids, x = described(root)
    qids, q = described(ArtifactRoot(read_run(a.results)["queries_root"]))
    db, gt = root.images(), load_collection(a.ground_truth)
    names = db.set_index("image_id").loc[qids, "name"].tolist()
    pos = group_ground_truth(gt, db, names)["all"][0]
    group_of = dict(zip(gt["name"], gt["group"]))
    groups = np.array([group_of.get(n, "?") if len(ps) else "?" for n, ps in zip(names, pos)], object)

    def ap(xw: np.ndarray, qw: np.ndarray) -> np.ndarray:
        s = qw @ xw.T
        ranks = [ids[np.argsort(-s[j], kind="stable")] for j in range(len(qids))]
        return np.asarray(
            evaluate([r[r != qq] for r, qq in zip(ranks, qids)], pos, [np.zeros(0, np.int64)] * len(pos))["ap"]
        )

    pairs = read_pairs(a.pairs).to_pandas()
    row = {int(v): r for r, v in enumerate(ids)}
    pairs = pairs[pairs.anchor_id.isin(row) & pairs.other_id.isin(row)]
    index = np.stack([pairs.anchor_id.map(row), pairs.other_id.map(row)], 1)
    label = pairs.label.to_numpy()
    mean, cov = x.mean(0), np.cov(x.T, bias=True)
    table = {}
    for neg in ("random", "mined"):
        for reg in map(float, a.regs.split(",")):
            for dim in map(int, a.dims.split(",")):
                w = learn_lw(x, index[label == 1], index[label == 0] if neg == "mined" else None, dim, reg, mean, cov)
                table[(neg, reg, dim)] = ap(w(x), w(q))
    raw = ap(x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True))
    held, chosen = cross_validate(table, groups)
    best = max(table, key=lambda s: np.nanmean(table[s]))
    print(f"pairs: {int((label == 1).sum())} positive, {int((label == 0).sum())} negative")
    print(
        f"raw mAP {100 * np.nanmean(raw):.2f}; Lw cross-validated {100 * np.nanmean(held):.2f} "
        f"(chosen most: {Counter(chosen).most_common(1)[0][0]}); "
        f"best in hindsight {100 * np.nanmean(table[best]):.2f} at {best}"
    )


if __name__ == "__main__":
    main()
