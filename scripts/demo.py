"""The demo (``./scripts/demo.sh``): index a collection once, search it with every method and re-ranking on
whole and 40%-cropped queries, evaluate each and compare them — every job in this one process, on one
embedded Ray (jobs reuse the Ray that is up), each search's output in its own log next to its results.

    python scripts/demo.py COLLECTION OUT [index options…]
"""

from __future__ import annotations

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs import evaluate, index, report, search  # noqa: E402
from jobs.config import run_cli  # noqa: E402

METHODS = ("global", "asmk", "fused")
RERANKS = ("none", "alpha-qe", "dfs", "hybrid")


def logged(log: str, job, args: list[str]) -> None:
    """Run ``job.main(args)`` with its output in ``log`` (printed whole when it fails)."""
    with open(log, "a") as f:
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                job.main(args)
        except BaseException:
            f.flush()
            sys.stderr.write(open(log).read())
            raise


def demo(collection: str, out: str, index_args: list[str]) -> None:
    index.main(["--collection", collection, "--out", f"{out}/index", "--set", "graph.k=10", *index_args])
    os.makedirs(f"{out}/search", exist_ok=True)
    results = []
    for crop in ("whole", "0.4"):
        for method in METHODS:
            for rerank in RERANKS:
                res = f"{out}/search/{crop}-{method}-{rerank}"
                print(f"== {crop} queries, {method} + {rerank} ==", file=sys.stderr, flush=True)
                args = [
                    "--index",
                    f"{out}/index",
                    "--queries",
                    collection,
                    "--out",
                    res,
                    "--method",
                    method,
                    "--rerank",
                    rerank,
                    "--set",
                    "rerank_params.qe_n=2",
                ]
                if os.path.exists(f"{res}.log"):
                    os.remove(f"{res}.log")
                logged(f"{res}.log", search, args + ([] if crop == "whole" else ["--center-crop", crop]))
                logged(f"{res}.log", evaluate, ["--results", res, "--ground-truth", collection])
                results.append(res)
    report.main(["--results", ",".join(results), "--out", out, "--title", "instance retrieval demo"])


if __name__ == "__main__":
    run_cli(lambda: demo(sys.argv[1], sys.argv[2], sys.argv[3:]))
