"""mAP of the reference ``asmk`` package (PyPI, jenicek/asmk) on our extracted local features.

    .venv/bin/python benchmarks/reference_asmk_map.py --index ROOT --queries RES/queries \
        --ground-truth ../shared/data/instance-mini/images.csv [--codebook 4096]

Trains the codebook on the database's local descriptors, builds the ASMK* inverted file (binary,
database single assignment), queries with multiple assignment 5, α = 3, τ = 0 (the seeds'
defaults), excludes each query's own image, and evaluates with ``operators.metrics``. Used to
compare local extractors and layers before our own ASMK exists (issue 3) and, later, as its
reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.evaluate import group_ground_truth  # noqa: E402
from operators.metrics import evaluate  # noqa: E402
from storage.artifacts import ArtifactRoot  # noqa: E402
from storage.collection import load_collection, self_ids  # noqa: E402
from storage.schemas import local_arrays  # noqa: E402


def ok_local(root: ArtifactRoot):
    t = root.shards().read_all(["image_id", "status", "local_desc"])
    import pyarrow.compute as pc

    t = t.filter(pc.equal(t.column("status"), "ok"))
    desc, ids, _ = local_arrays(t)
    return desc.astype(np.float32), ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True, help="RES/queries folder written by jobs.search")
    ap.add_argument("--ground-truth", required=True)
    ap.add_argument("--codebook", type=int, default=4096)
    ap.add_argument("--ma", type=int, default=5)
    a = ap.parse_args()
    from asmk import asmk_method

    db_root, q_root = ArtifactRoot(a.index), ArtifactRoot(a.queries)
    xb, ib = ok_local(db_root)
    xq, iq = ok_local(q_root)
    print(
        f"database {len(np.unique(ib))} images, {len(xb)} descriptors of dim {xb.shape[1]}; "
        f"queries {len(np.unique(iq))} images"
    )
    params = {
        "index": {"gpu_id": None},
        "train_codebook": {"codebook": {"size": a.codebook}},
        "build_ivf": {
            "kernel": {"binary": True},
            "ivf": {"use_idf": False},
            "quantize": {"multiple_assignment": 1},
            "aggregate": {},
        },
        "query_ivf": {
            "quantize": {"multiple_assignment": a.ma},
            "aggregate": {},
            "search": {"topk": None},
            "similarity": {"similarity_threshold": 0.0, "alpha": 3.0},
        },
    }
    t = time.time()
    method = asmk_method.ASMKMethod.initialize_untrained(params).train_codebook(xb)
    method = method.build_ivf(xb, ib)
    _, qids, ranks, _ = method.query_ivf(xq, iq)
    print(f"reference asmk: {time.time() - t:.1f} s")
    queries = q_root.images().set_index("image_id").loc[qids].reset_index()
    own = self_ids(queries, db_root.images())
    rankings = [r[r != o] for r, o in zip(ranks, own)]
    gt = load_collection(a.ground_truth)
    ((pos, ign),) = group_ground_truth(gt, db_root.images(), queries["name"].tolist()).values()
    m = evaluate(rankings, pos, ign)
    print(f"ASMK* (reference, codebook {a.codebook}, MA {a.ma}): mAP {100 * m['mAP']:.2f} over {m['queries']} queries")


if __name__ == "__main__":
    main()
