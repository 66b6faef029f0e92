"""Search job: extract the queries, rank the database, write top-K results to Parquet.

``python -m jobs.search --index ROOT --queries Q --out RES --method global --topk K``

Queries (folder, manifest with optional ``x0,y0,x1,y1`` boxes, or revisited ``.pkl`` with its
``bbx``) are cropped and described exactly as the database was (same describer config and
whitening, read from ``ROOT/index.json``). Ranking runs in Ray tasks over blocks of queries; each
task memory-maps the database matrix and streams it in blocks with a top-k heap, so memory is
O(queries × k). A query that is also a database image (same file) is left out of its own ranking.

Output ``RES/results.parquet`` (``storage.schemas.RESULTS_SCHEMA``), ``RES/run.json`` and a summary.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.ray_env import RayConfig, connect
from jobs.config import from_dict, parse, to_dict
from jobs.extract import ExtractConfig, prepare_images, run_extraction
from jobs.summary import JobSummary
from operators.describe import DescriptorConfig
from operators.global_index import iter_blocks
from operators.knn import knn_blocks
from storage import fs as sfs
from storage.artifacts import ArtifactRoot
from storage.schemas import RESULTS_SCHEMA, global_matrix

METHODS = ("global",)


@dataclass
class SearchConfig:
    index: str = ""
    queries: str = ""
    out: str = ""
    method: str = "global"
    topk: int = 100
    role: str = "queries"                 # revisited .pkl: queries (qimlist + bbx) or database
    center_crop: float | None = None      # crop queries without a box to this central fraction
    exclude_self: bool = True
    reuse_database_features: bool = True  # uncropped queries that are database images reuse its features
    query_block: int = 1024               # queries per Ray search task
    db_block: int = 65536                 # database rows per faiss call
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


def global_search_task(index_uri: str, options: dict, xq: np.ndarray, exclude: np.ndarray, k: int, db_block: int):
    """Rank the memory-mapped database for one block of queries (runs in a Ray task)."""
    root = ArtifactRoot(index_uri, options)
    ids, vectors = root.load_array("global/ids.npy"), root.load_array("global/vectors.npy")
    return knn_blocks(xq, iter_blocks(ids, vectors, db_block), k, exclude)


def describe_queries(cfg: SearchConfig, root: ArtifactRoot, summary: JobSummary) -> tuple[pd.DataFrame, ArtifactRoot]:
    """Extract the queries that need it into ``RES/queries`` with the index's describer config.

    A query that is an uncropped database image is not described again: its database features are
    reused (``reuse`` column). Rerunning into a folder made with other query settings is refused.
    """
    built = from_dict(ExtractConfig, {k: v for k, v in root.stage_config("extract").items()
                                      if k in ExtractConfig.__dataclass_fields__})
    qcfg = ExtractConfig(collection=cfg.queries, out=sfs.join(cfg.out, "queries"), role=cfg.role,
                         shard_size=built.shard_size, batch_size=built.batch_size, center_crop=cfg.center_crop,
                         describe=from_dict(DescriptorConfig, to_dict(built.describe)), ray=cfg.ray, storage=cfg.storage)
    qroot = ArtifactRoot(qcfg.out, cfg.storage)
    previous = qroot.meta().get("stages", {}).get("extract", {}).get("config")
    if previous and (previous["describe"] != to_dict(qcfg.describe) or previous["center_crop"] != cfg.center_crop):
        raise SystemExit(f"{cfg.out} holds queries described with other settings; use a new --out")
    queries = prepare_images(qroot, qcfg.collection, qcfg.role, 0, cfg.storage)
    queries["own"] = self_ids(queries, root.images())
    uncropped = queries[["x0", "y0", "x1", "y1"]].isna().all(axis=1).to_numpy() & (cfg.center_crop is None)
    queries["reuse"] = (queries["own"].to_numpy() >= 0) & uncropped & cfg.reuse_database_features
    summary.add(queries_reusing_database_features=int(queries["reuse"].sum()))
    with summary.stage("extract queries"):
        run_extraction(qcfg, queries[~queries["reuse"]], qroot.shards(), root.whitening("local"), summary)
    qroot.record_stage("extract", to_dict(qcfg), images=len(queries))
    return queries, qroot


def self_ids(queries: pd.DataFrame, database: pd.DataFrame) -> np.ndarray:
    """Database id of each query's own image (same file), -1 when the query is not in the database."""
    by_file = dict(zip(database["file"].map(os.path.normpath), database["image_id"]))
    return np.array([by_file.get(os.path.normpath(f), -1) for f in queries["file"]], dtype=np.int64)


def query_globals(root: ArtifactRoot, qroot: ArtifactRoot, queries: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Global descriptors of the successfully described queries, in the database's (whitened) space.

    Returns the query rows (in output order) and their (n, D) matrix.
    """
    parts = []
    if (~queries["reuse"]).any():
        t = qroot.shards().read_all(["image_id", "status", "global"])
        ok = np.array([s == "ok" for s in t.column("status").to_pylist()], bool)
        x = global_matrix(t)[ok]
        white = root.whitening("global")
        parts.append((t.column("image_id").to_numpy()[ok], white(x) if white is not None else x))
    reuse = queries[queries["reuse"]]
    if len(reuse):
        ids, vectors = root.load_array("global/ids.npy"), root.load_array("global/vectors.npy")
        order = np.argsort(ids)
        pos = order[np.searchsorted(ids, reuse["own"].to_numpy(), sorter=order)]
        parts.append((reuse["image_id"].to_numpy(), np.asarray(vectors[pos])))
    qids = np.concatenate([p[0] for p in parts])
    xq = np.concatenate([p[1] for p in parts]).astype(np.float32)
    order = np.argsort(qids)
    return queries.set_index("image_id").loc[qids[order]].reset_index(), xq[order]


def run_global(cfg: SearchConfig, root: ArtifactRoot, qroot: ArtifactRoot, queries: pd.DataFrame,
               summary: JobSummary) -> pa.Table:
    import ray

    rows, xq = query_globals(root, qroot, queries)
    summary.add(queries=len(queries), queries_failed=len(queries) - len(rows))
    exclude = rows["own"].to_numpy() if cfg.exclude_self else np.full(len(rows), -1)
    task = ray.remote(num_cpus=1)(global_search_task)
    futures = [task.remote(cfg.index, cfg.storage, xq[s:s + cfg.query_block], exclude[s:s + cfg.query_block],
                           cfg.topk, cfg.db_block) for s in range(0, len(xq), cfg.query_block)]
    parts = ray.get(futures)
    scores = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, cfg.topk), np.float32)
    ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, cfg.topk), np.int64)
    return results_table(rows["image_id"].to_numpy(), rows["name"].tolist(), ids, scores)


def results_table(qids: np.ndarray, names: list[str], ids: np.ndarray, scores: np.ndarray) -> pa.Table:
    """One row per query; padding (-1) removed from the ranked lists."""
    valid = ids >= 0
    lists_i = [row[m].tolist() for row, m in zip(ids, valid)]
    lists_s = [row[m].astype(np.float32).tolist() for row, m in zip(scores, valid)]
    return pa.table({"query_id": pa.array(qids, pa.int64()), "query_name": pa.array(names, pa.string()),
                     "ids": pa.array(lists_i, pa.list_(pa.int64())), "scores": pa.array(lists_s, pa.list_(pa.float32()))},
                    schema=RESULTS_SCHEMA)


def write_results(cfg: SearchConfig, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    sfs.write_bytes(sfs.join(cfg.out, "results.parquet"), buf.getvalue(), cfg.storage)
    sfs.write_json(sfs.join(cfg.out, "run.json"), {"config": to_dict(cfg), "queries": table.num_rows}, cfg.storage)


def read_results(res: str, options: dict | None = None) -> tuple[pa.Table, dict]:
    table = pq.read_table(io.BytesIO(sfs.read_bytes(sfs.join(res, "results.parquet"), options)))
    return table, sfs.read_json(sfs.join(res, "run.json"), options)


FLAGS = {
    "--index": ("index", str, "artifact root written by jobs.index"),
    "--queries": ("queries", str, "query collection: folder, manifest (with x0,y0,x1,y1 boxes) or revisited .pkl"),
    "--out": ("out", str, "results folder or s3:// prefix"),
    "--method": ("method", str, f"ranking method: {', '.join(METHODS)}"),
    "--topk": ("topk", int, "results kept per query"),
    "--center-crop": ("center_crop", float, "crop queries without a box to this central fraction (e.g. 0.4)"),
}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(SearchConfig, argv, FLAGS, __doc__)
    if cfg.method not in METHODS:
        raise SystemExit(f"unknown method {cfg.method!r}; available: {METHODS}")
    summary = JobSummary("search")
    connect(cfg.ray)
    root = ArtifactRoot(cfg.index, cfg.storage)
    queries, qroot = describe_queries(cfg, root, summary)
    with summary.stage(f"search ({cfg.method})"):
        table = run_global(cfg, root, qroot, queries, summary)
    write_results(cfg, table)
    summary.info["results"] = sfs.join(cfg.out, "results.parquet")
    return summary.finish(sfs.join(cfg.out, "summary-search.json"), cfg.storage)


if __name__ == "__main__":
    main()
