"""Precision of mined pairs against a collection's ``group`` labels, next to plain Euclidean neighbours.

    .venv/bin/python benchmarks/mining_precision.py --index ROOT --pairs PAIRS \
        --ground-truth ../shared/data/instance-mini/images.csv

A positive is right when it shares the anchor's group, a negative when it does not (images without
a group, the distractors, are their own group). For each source and anchor with n positives, the
baseline is the anchor's n nearest Euclidean neighbours (global descriptors, itself excluded); for
negatives the baseline is the same number of the anchor's nearest neighbours taken as negatives.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.evaluate import name_key  # noqa: E402
from storage.artifacts import ArtifactRoot  # noqa: E402
from storage.collection import load_collection  # noqa: E402
from storage.global_index import open_global  # noqa: E402
from storage.pairs import read_pairs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--index", required=True)
    p.add_argument("--pairs", required=True)
    p.add_argument("--ground-truth", required=True)
    a = p.parse_args()
    root = ArtifactRoot(a.index)
    db = root.images()
    gt = load_collection(a.ground_truth)
    key = name_key(db["name"].tolist(), gt["name"].tolist(), db["name"].tolist())
    group_of = dict(zip(gt["name"].map(key), gt["group"]))
    group = {i: group_of.get(key(n)) or f"_{i}" for i, n in zip(db["image_id"], db["name"])}
    pairs = read_pairs(a.pairs).to_pandas()
    g = open_global(root)
    row_of = {int(i): r for r, i in enumerate(np.asarray(g.ids))}
    vectors = np.asarray(g.vectors)
    print(f"{'source':<9} {'kind':<9} {'pairs':>6} {'anchors':>7} {'precision':>9} {'Euclidean NN':>12}")
    for (source, label), rows in pairs.groupby(["source", "label"]):
        right = [(group[x] == group[y]) == (label == 1) for x, y in zip(rows.anchor_id, rows.other_id)]
        base = []
        for anchor, mine in rows.groupby("anchor_id"):
            sims = vectors @ vectors[row_of[anchor]]
            sims[row_of[anchor]] = -np.inf
            nearest = np.asarray(g.ids)[np.argsort(-sims, kind="stable")[: len(mine)]]
            base += [(group[anchor] == group[int(o)]) == (label == 1) for o in nearest]
        kind = "positive" if label == 1 else "negative"
        print(
            f"{source:<9} {kind:<9} {len(rows):>6} {rows.anchor_id.nunique():>7} {100 * np.mean(right):>8.1f}% "
            f"{100 * np.mean(base):>11.1f}%"
        )


if __name__ == "__main__":
    pd.set_option("display.width", 200)
    main()
