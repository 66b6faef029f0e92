"""Search and re-ranking results: ``RES/results.parquet`` (one row per query,
:data:`storage.schemas.RESULTS_SCHEMA`) or committed ``RES/parts/`` (offline re-ranking, resumable),
and ``RES/run.json`` (the config that made them: method, re-ranking, parameters, index)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from operators.ranking import Ranking
from storage import fs as sfs
from storage.errors import ArtifactError
from storage.schemas import RESULTS_SCHEMA
from storage.shards import ShardSet


def results_table(queries: pd.DataFrame, ranked: Ranking) -> pa.Table:
    """One row per query (in query-id order); padding removed, empty when the query has no result. A query
    with a ``source`` column takes the ranking of that query (a repeat of it)."""
    queries = queries.sort_values("image_id")
    source = queries["source"] if "source" in queries else queries["image_id"]
    ids, scores = ranked.align(source.to_numpy(np.int64)).lists()
    return pa.table(
        {
            "query_id": pa.array(queries["image_id"], pa.int64()),
            "query_name": pa.array(queries["name"].astype(str), pa.string()),
            "ids": pa.array(ids, pa.list_(pa.int64())),
            "scores": pa.array(scores, pa.list_(pa.float32())),
        },
        schema=RESULTS_SCHEMA,
    )


def write_results(out: str, table: pa.Table, run: dict, options: dict | None = None) -> str:
    """Write ``RES/results.parquet`` and ``RES/run.json``; returns the results URI."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = sfs.join(out, "results.parquet")
    sfs.write_bytes(uri, buf.getvalue(), options)
    write_run(out, run, options)
    return uri


def write_run(out: str, run: dict, options: dict | None = None) -> None:
    sfs.write_json(sfs.join(out, "run.json"), run, options)


def result_parts(out: str, options: dict | None = None) -> ShardSet:
    """The committed parts of an offline re-ranking (``RES/parts``)."""
    return ShardSet(sfs.join(out, "parts"), options or {})


def read_run(res: str, options: dict | None = None) -> dict:
    uri = sfs.join(res, "run.json")
    if not sfs.exists(uri, options):
        raise ArtifactError(
            f"{res} holds no results (no run.json): give a folder written by jobs.search or jobs.rerank"
        )
    return sfs.read_json(uri, options)


def read_results(res: str, options: dict | None = None) -> tuple[pa.Table, dict]:
    """``RES/results.parquet`` (jobs.search), or the committed ``RES/parts`` (jobs.rerank), and run.json."""
    info = read_run(res, options)
    single = sfs.join(res, "results.parquet")
    if sfs.exists(single, options):
        return pq.read_table(io.BytesIO(sfs.read_bytes(single, options))), info
    return result_parts(res, options).read_all(), info


def write_metrics(res: str, metrics: dict, options: dict | None = None) -> str:
    """``RES/metrics.json`` (jobs.evaluate): the figures and the run that made the results."""
    uri = sfs.join(res, "metrics.json")
    sfs.write_json(uri, metrics, options)
    return uri


def report_page_uri(res: str) -> str:
    """Where the gallery of results ``res`` lives (``RES/report.html``)."""
    return sfs.join(res, "report.html")


def write_report_page(res: str, page: str, options: dict | None = None) -> str:
    """``RES/report.html`` (jobs.evaluate's report)."""
    uri = report_page_uri(res)
    sfs.write_bytes(uri, page.encode(), options)
    return uri


def write_comparison(out: str, page: str, table: pa.Table, options: dict | None = None) -> str:
    """``OUT/comparison.html`` and ``OUT/comparison.csv`` (``retrieval report``); returns the page's URI."""
    import pyarrow.csv as pcsv

    buf = io.BytesIO()
    pcsv.write_csv(table, buf)
    sfs.write_bytes(sfs.join(out, "comparison.csv"), buf.getvalue(), options)
    uri = sfs.join(out, "comparison.html")
    sfs.write_bytes(uri, page.encode(), options)
    return uri


def read_metrics(res: str, options: dict | None = None) -> dict:
    uri = sfs.join(res, "metrics.json")
    if not sfs.exists(uri, options):
        raise ArtifactError(f"{res} has no metrics.json: run retrieval evaluate --results {res} --ground-truth …")
    return sfs.read_json(uri, options)
