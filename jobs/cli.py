"""``retrieval``: one command line for every job (``retrieval JOB --help`` shows a job's options
with their defaults and choices). ``python -m jobs.JOB`` runs the same job with the same options,
which is what ``ray job submit --working-dir . -- python -m jobs.JOB …`` uses.

    retrieval index     --collection C --out ROOT          extract, global, codebook, asmk, graph, spectral
    retrieval extract   --collection C --out ROOT          the extraction stage alone
    retrieval graph     --index ROOT                       kNN graph + eigenpairs
    retrieval search    --index ROOT --queries Q --out RES ranking (+ re-ranking)
    retrieval rerank    --index ROOT --out RES             offline database-side diffusion
    retrieval discover  --index ROOT                       i-ASMK* components, graph centrality
    retrieval mine      --index ROOT --out PAIRS           training pairs: mining on manifolds, i-ASMK*
    retrieval train_reranker --index ROOT              learned re-ranker (GSS, GRAD-Net) on the index's graph
    retrieval evaluate  --results RES --ground-truth G     mAP, mP@k, HTML report
    retrieval report    --results RES1,RES2 --out DIR      comparison page of evaluated results
    retrieval synthetic --out DIR                          a small synthetic collection
    retrieval distractors --donors D --out ROOT --n N      R1M-like synthetic distractors joining an index root
    retrieval serve     --index ROOT [--port P]            warm query service (Ray Serve, HTTP POST /search)
"""

from __future__ import annotations

import importlib
import sys

JOBS = {
    "index": "build every stage of an index over a collection",
    "extract": "extract global and local descriptors into Parquet shards",
    "graph": "build the kNN graph and its eigenpairs",
    "search": "rank (and re-rank) queries against an index",
    "rerank": "offline diffusion lists for every database item",
    "discover": "i-ASMK* compressed inverted file and graph centrality of an index",
    "mine": "unsupervised training pairs (mining on manifolds, i-ASMK* components)",
    "train_reranker": "train a learned re-ranker (GSS or GRAD-Net) on the index's kNN graph (also: train-reranker)",
    "evaluate": "mAP / mP@k of results against ground truth, with an HTML report",
    "report": "compare evaluated results: table, mAP-per-method plot, time per stage",
    "synthetic": "write a small synthetic instance collection",
    "distractors": "synthetic distractors (ASMK* entries + global) drawn around real donor images into a root",
    "serve": "a warm query service over an index: batches of query images over HTTP (Ray Serve, 127.0.0.1)",
}


def usage() -> str:
    width = max(map(len, JOBS))
    return (
        "usage: retrieval [--version] JOB [options]   (retrieval JOB --help for the job's options)\n\njobs:\n"
        + "\n".join(f"  {name:<{width}}  {what}" for name, what in JOBS.items())
        + "\n"
    )


def version() -> str:
    """The installed package's version (``pyproject.toml``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("retrieval-pipeline")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        print(f"retrieval {version()}")
        sys.exit(0)
    job, rest = argv[0].replace("-", "_"), argv[1:]  # train-reranker = train_reranker
    if job not in JOBS:
        print(f"error: unknown job {job!r}; one of {', '.join(JOBS)}", file=sys.stderr)
        sys.exit(2)
    from jobs.config import run_cli

    module = importlib.import_module(f"jobs.{job}")
    run_cli(lambda: module.main(rest, prog=f"retrieval {job}"))


if __name__ == "__main__":
    main()
