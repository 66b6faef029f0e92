"""The evaluator on hand-made rankings and on the real revisited ROxford ground truth."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pandas as pd
import pytest

from jobs import evaluate as evaluate_job
from operators.metrics import average_precision, evaluate, positive_ranks, precision_at, revisited_setups
from operators.ranking import Ranking
from storage import fs as sfs
from storage.results import results_table
from tests.conftest import REVISITED


def test_ap_by_hand():
    # ranking p, n, p: ranks 0 and 2; AP = ((1+1)/2 + (1/2 + 2/3)/2) / 2
    ranks, n = positive_ranks(np.array([10, 11, 12]), np.array([10, 12]), np.array([], int))
    assert ranks.tolist() == [0, 2]
    assert average_precision(ranks, n) == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2)
    # a missing positive halves the recall
    assert average_precision(np.array([0]), 2) == pytest.approx(0.5)
    # ignored images are removed before ranking
    ranks, _ = positive_ranks(np.array([99, 10, 98, 12]), np.array([10, 12]), np.array([98, 99]))
    assert ranks.tolist() == [0, 1]
    assert precision_at(np.array([0, 2]), (1, 2, 5)).tolist() == [1.0, 0.5, 2 / 3]


def _ap_offset(n: int, offset: int) -> float:
    """AP when the n positives occupy ranks offset … offset+n−1 (derived from the trapezoid rule)."""
    j = np.arange(n)
    return float(np.sum((j / (offset + j) + (j + 1) / (offset + j + 1)) / 2) / n)


@pytest.fixture(scope="module")
def roxford():
    with open(REVISITED / "gnd_roxford5k.pkl", "rb") as f:
        return pickle.load(f)


def _ranking(gnd, q, order: str) -> np.ndarray:
    g = gnd["gnd"][q]
    e, h, u = (np.asarray(g[k], np.int64) for k in ("easy", "hard", "junk"))
    rest = np.setdiff1d(np.arange(len(gnd["imlist"])), np.concatenate([e, h, u]))
    parts = {"E": e, "H": h, "U": u, "R": rest}
    return np.concatenate([parts[c] for c in order])


def test_revisited_perfect_reversed_and_junk_moves(roxford):
    setups = revisited_setups(roxford["gnd"])
    nq = len(roxford["gnd"])
    for order, expect in [("EHUR", "perfect"), ("UEHR", "perfect"), ("RUHE", "reversed")]:
        rankings = [_ranking(roxford, q, order) for q in range(nq)]
        for setup, (pos, ign) in setups.items():
            m = evaluate(rankings, pos, ign)
            assert m["queries"] == sum(len(p) > 0 for p in pos)
            if expect == "perfect":
                assert m["mAP"] == pytest.approx(1.0) and m["mP@10"] == pytest.approx(1.0)
                continue
            # reversed: R first; ignored images vanish, so positives start right after R
            aps = []
            for q in range(nq):
                g = roxford["gnd"][q]
                n_rest = len(roxford["imlist"]) - len(g["easy"]) - len(g["hard"]) - len(g["junk"])
                n_pos = {"easy": len(g["easy"]), "medium": len(g["easy"]) + len(g["hard"]), "hard": len(g["hard"])}[
                    setup
                ]
                if n_pos:
                    aps.append(_ap_offset(n_pos, n_rest))
            assert m["mAP"] == pytest.approx(np.mean(aps), rel=1e-9)


def test_junk_position_never_matters(roxford):
    setups = revisited_setups(roxford["gnd"])
    q = 0
    g = roxford["gnd"][q]
    e, h, u = (np.asarray(g[k]) for k in ("easy", "hard", "junk"))
    rest = np.setdiff1d(np.arange(len(roxford["imlist"])), np.concatenate([e, h, u]))
    # interleave: E, then half the rest, then H, then the rest; junk moved to three places
    base = [e, rest[:100], h, rest[100:]]
    variants = [
        np.concatenate([u] + base),
        np.concatenate(base + [u]),
        np.concatenate([e, u, rest[:100], h, rest[100:]]),
    ]
    pos, ign = setups["medium"]
    maps = [evaluate([v], pos[:1], ign[:1])["mAP"] for v in variants]
    assert maps[0] == pytest.approx(maps[1]) == pytest.approx(maps[2])
    assert maps[0] == pytest.approx(
        np.mean(
            [
                (j / r if r else 1) / 2 + (j + 1) / (r + 1) / 2
                for j, r in enumerate(list(range(len(e))) + list(range(len(e) + 100, len(e) + 100 + len(h))))
            ]
        )
        * 1.0,
        rel=1e-9,
    )


def test_evaluate_job_on_revisited_pkl(roxford, tmp_path):
    """jobs.evaluate end to end: results + index image table -> metrics.json per protocol."""
    index = tmp_path / "index"
    index.mkdir()
    pd.DataFrame(
        {
            "image_id": np.arange(len(roxford["imlist"])) + 1000,
            "name": roxford["imlist"],
            "file": [f"/x/{n}.jpg" for n in roxford["imlist"]],
        }
    ).to_parquet(index / "images.parquet")
    rankings = [_ranking(roxford, q, "EHUR") + 1000 for q in range(len(roxford["qimlist"]))]
    rankings[0] = _ranking(roxford, 0, "RUHE")[:300] + 1000  # truncated: its positives are cut off
    rankings[0] = np.pad(rankings[0], (0, len(rankings[1]) - 300), constant_values=-1)
    queries = pd.DataFrame({"image_id": np.arange(70), "name": list(roxford["qimlist"])})
    table = results_table(queries, Ranking(np.arange(70), np.stack(rankings), np.zeros((70, len(rankings[1])))))
    res = tmp_path / "res"
    buf = io.BytesIO()
    import pyarrow.parquet as pq

    pq.write_table(table, buf)
    sfs.write_bytes(str(res / "results.parquet"), buf.getvalue())
    sfs.write_json(str(res / "run.json"), {"config": {"index": str(index)}})
    evaluate_job.main(["--results", str(res), "--ground-truth", str(REVISITED / "gnd_roxford5k.pkl")])
    metrics = json.loads((res / "metrics.json").read_text())
    page = (res / "report.html").read_text()  # images that cannot be read show as empty frames
    assert page.count('class="q"') == 24 and "<img " not in page and "AP per query (medium)" in page
    # query 0 keeps only 300 non-positives (padding dropped) -> AP 0; the others are perfect
    for setup in ("easy", "medium", "hard"):
        n = metrics[setup]["queries"]
        has0 = (
            len(
                {
                    "easy": roxford["gnd"][0]["easy"],
                    "medium": roxford["gnd"][0]["easy"] + roxford["gnd"][0]["hard"],
                    "hard": roxford["gnd"][0]["hard"],
                }[setup]
            )
            > 0
        )
        assert metrics[setup]["mAP"] == pytest.approx((n - has0) / n)


def test_revisited_positives_missing_from_the_database_count_as_never_retrieved(roxford):
    """Half of imlist indexed: a perfect ranking of what is there recalls only the indexed positives.

    By hand (trapezoid rule): the m indexed positives at ranks 0…m−1 each add 1/n, so AP = m / n with
    n the full positive count (revisitop divides by len(qgnd)).
    """
    imlist = list(roxford["imlist"])
    kept = np.arange(0, len(imlist), 2)
    database = pd.DataFrame({"image_id": kept + 10, "name": [imlist[i] for i in kept]})
    setups = evaluate_job.revisited_ground_truth(roxford, database, list(roxford["qimlist"]))
    pos, ign = setups["medium"]
    expect, rankings = [], []
    for q, g in enumerate(roxford["gnd"]):
        p = np.asarray(g["easy"] + g["hard"], np.int64)
        indexed = p[p % 2 == 0] + 10
        rest = np.setdiff1d(kept + 10, indexed)
        rankings.append(np.concatenate([indexed, rest]))
        expect.append(len(indexed) / len(p))
    m = evaluate(rankings, pos, ign)
    assert m["mAP"] == pytest.approx(np.mean(expect), rel=1e-12)
    assert m["mAP"] < 0.7  # merging the missing positives into one id had reported ~0.97


def test_group_ground_truth_matches_folder_names_in_full():
    """Folder collections (class/0001.jpg) share stems across folders: names match in full."""
    names = ["a/0001.jpg", "a/0002.jpg", "b/0001.jpg", "b/0002.jpg", "b/0003.jpg"]
    database = pd.DataFrame({"image_id": np.arange(5) + 100, "name": names})
    gt = pd.DataFrame({"name": names, "group": ["a", "a", "b", "b", "b"]})
    ((pos, ign),) = evaluate_job.group_ground_truth(gt, database, names).values()
    assert [sorted(p.tolist()) for p in pos] == [[101], [100], [103, 104], [102, 104], [102, 103]]
    # a query manifest elsewhere names the same images by another path: stems decide (unique here)
    flat = pd.DataFrame({"image_id": [7, 8], "name": ["x/q1.jpg", "x/q2.jpg"]})
    gt2 = pd.DataFrame({"name": ["q1.jpg", "q2.jpg"], "group": ["g", "g"]})
    ((pos, _),) = evaluate_job.group_ground_truth(gt2, flat, ["../queries/q1.png"]).values()
    assert pos[0].tolist() == [8]
