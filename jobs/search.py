"""Search job: extract the queries, rank the database, write top-K results to Parquet.

``python -m jobs.search --index ROOT --queries Q --out RES --method {global,asmk,fused} --topk K``

Queries (folder, manifest with optional ``x0,y0,x1,y1`` boxes, or revisited ``.pkl`` with its
``bbx``) are cropped and described exactly as the database was (same describer config and
whitening, read from ``ROOT/index.json``). Ranking runs in Ray tasks over blocks of queries:

- ``global``: each task memory-maps the descriptor matrices and streams them in blocks with a
  top-k heap (memory O(queries × k));
- ``asmk``: queries are quantised with multiple assignment and aggregated; each task scores its
  block against the memory-mapped inverted files (:func:`operators.asmk.search`);
- ``fused``: ASMK score + β × cubed global similarity, normalised per query (:mod:`operators.fusion`).

``--rerank`` re-ranks the initial ranking (:mod:`operators.rerank`): ``aqe`` / ``alpha-qe`` expand
the query's global descriptor with its top results and search again; ``dfs``, ``truncated-dfs``,
``fsr`` and ``hybrid`` diffuse on the index's kNN graph (``jobs.graph``), seeded by the first k_q
results weighted by their initial scores, in Ray tasks over blocks of queries.

``--distractors ROOT2 …`` adds indexes built separately (same codebook) that are searched together
with ``--index``. A query that is also a database image (same file) is left out of its own ranking.
Every query gets a row (an empty ranking when it could not be described).

Output ``RES/results.parquet`` (``storage.schemas.RESULTS_SCHEMA``), ``RES/run.json`` and a summary.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cluster.ray_env import RayConfig, connect
from jobs.asmk import AsmkConfig, search_task as asmk_search_task
from jobs.config import from_dict, parse, run_cli, to_dict
from jobs.extract import ExtractConfig, check_settings, prepare_images, recorded_settings, run_extraction
from jobs.summary import JobSummary
from operators.asmk import AsmkParams, aggregate
from operators.codebook import Quantizer
from operators.describe import DescriptorConfig
from operators.fusion import fuse
from operators.global_index import iter_blocks
from operators.knn import knn_blocks
from operators.qe import expand
from operators.rerank import DIFFUSION, METHODS as RERANK_METHODS, RerankParams, rerank
from operators.graph import index_of
from storage import fs as sfs
from storage.artifacts import ArtifactRoot
from storage.codebook import codebook_hash, load_codebook
from storage.global_index import GlobalLookup, global_ids, open_global
from storage.graph import graph_problem, load_graph
from storage.results import write_results as store_results
from storage.whitening import read_whitening
from storage.errors import ArtifactError, ConfigError, SettingsMismatch
from storage.schemas import RESULTS_SCHEMA, global_matrix, local_arrays

Method = Literal["global", "asmk", "fused"]
Rerank = Literal["none", "aqe", "alpha-qe", "dfs", "truncated-dfs", "fsr", "hybrid"]
METHODS = typing.get_args(Method)
assert typing.get_args(Rerank) == RERANK_METHODS


@dataclass(kw_only=True)
class SearchConfig:
    index: str                            # artifact root written by jobs.index (required)
    queries: str                          # query collection (required)
    out: str                              # results folder (required)
    method: Method = "global"
    topk: int = 100
    distractors: list[str] = field(default_factory=list)  # more index roots searched with ``index``
    role: Literal["queries", "database"] = "queries"  # revisited .pkl: queries (qimlist + bbx) or database
    center_crop: float | None = None      # crop queries without a box to this central fraction
    exclude_self: bool = True
    reuse_database_features: bool = True  # uncropped queries that are database images reuse its features
    query_block: int = 1024               # queries per Ray search task (global)
    db_block: int = 65536                 # database rows per faiss call
    asmk: AsmkConfig | None = None        # ASMK search parameters (None: those the index was built with)
    fusion_beta: float = 0.5              # fused: weight of the global term (measured, operators/fusion.py)
    fusion_shortlist: int = 1000          # fused: shortlist of each method
    rerank: Rerank = "none"
    rerank_params: RerankParams = field(default_factory=RerankParams)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


def partitions(cfg: SearchConfig) -> list[ArtifactRoot]:
    return [ArtifactRoot(u, cfg.storage) for u in [cfg.index, *cfg.distractors]]


def global_search_task(roots: list[tuple[str, dict]], xq: np.ndarray, exclude: np.ndarray, k: int, db_block: int):
    """Rank the memory-mapped descriptors of every partition for one block of queries (a Ray task)."""
    def blocks():
        for uri, options in roots:
            root = ArtifactRoot(uri, options)
            g = open_global(root)
            yield from iter_blocks(g.ids, g.vectors, db_block)
    return knn_blocks(xq, blocks(), k, exclude)


def describe_queries(cfg: SearchConfig, root: ArtifactRoot, summary: JobSummary) -> tuple[pd.DataFrame, ArtifactRoot]:
    """Extract the queries that need it into ``RES/queries`` with the index's describer config.

    A query that is an uncropped database image is not described again: its database features are
    reused (``reuse`` column). Rerunning into a folder made with other query settings is refused.
    """
    built = from_dict(ExtractConfig, root.stage_settings("extract"))
    qcfg = ExtractConfig(collection=cfg.queries, out=sfs.join(cfg.out, "queries"), role=cfg.role,
                         shard_size=built.shard_size, batch_size=built.batch_size, center_crop=cfg.center_crop,
                         local_whiten_dim=built.local_whiten_dim,
                         describe=from_dict(DescriptorConfig, to_dict(built.describe)), ray=cfg.ray, storage=cfg.storage)
    qroot = ArtifactRoot(qcfg.out, cfg.storage)
    previous = qroot.stage_settings("extract", required=False)
    check_settings(qroot.shards(), to_dict(qcfg), previous)
    queries = prepare_images(qroot, qcfg.collection, qcfg.role, 0, cfg.storage, qcfg.shard_size)
    queries["own"] = self_ids(queries, root.images())
    uncropped = queries[["x0", "y0", "x1", "y1"]].isna().all(axis=1).to_numpy() & (cfg.center_crop is None)
    described = np.isin(queries["own"].to_numpy(), global_ids(root))  # own image described ok
    queries["reuse"] = described & uncropped & cfg.reuse_database_features
    summary.add(queries_reusing_database_features=int(queries["reuse"].sum()))
    with summary.stage("extract queries"):
        run_extraction(qcfg, queries[~queries["reuse"]], qroot.shards(), read_whitening(root, "local"), summary)
    qroot.record_stage("extract", "search", recorded_settings(qcfg), images=len(queries))
    return queries, qroot


def self_ids(queries: pd.DataFrame, database: pd.DataFrame) -> np.ndarray:
    """Database id of each query's own image (same file), -1 when the query is not in the database."""
    by_file = dict(zip(database["file"].map(sfs.canonical), database["image_id"]))
    return np.array([by_file.get(sfs.canonical(f), -1) for f in queries["file"]], dtype=np.int64)


def query_globals(root: ArtifactRoot, qroot: ArtifactRoot, queries: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Global descriptors of the successfully described queries, in the database's (whitened) space.

    Returns the query rows (in output order) and their (n, D) matrix.
    """
    parts = []
    if (~queries["reuse"]).any():
        t = qroot.shards().read_all(["image_id", "status", "global"])
        ok = np.array([s == "ok" for s in t.column("status").to_pylist()], bool)
        x = global_matrix(t)[ok]
        white = read_whitening(root, "global")
        parts.append((t.column("image_id").to_numpy()[ok], white(x) if white is not None else x))
    reuse = queries[queries["reuse"]]
    if len(reuse):
        parts.append((reuse["image_id"].to_numpy(), GlobalLookup([root])(reuse["own"].to_numpy())))
    if not parts:
        return queries.iloc[:0], np.zeros((0, 1), np.float32)
    qids = np.concatenate([p[0] for p in parts])
    xq = np.concatenate([p[1] for p in parts]).astype(np.float32)
    order = np.argsort(qids)
    return queries.set_index("image_id").loc[qids[order]].reset_index(), xq[order]


def run_global(cfg: SearchConfig, queries: pd.DataFrame, qroot: ArtifactRoot, k: int,
               described: tuple[pd.DataFrame, np.ndarray] | None = None) -> dict[int, tuple]:
    """{query id: (ids, scores)} by global-descriptor similarity (``described``: rows and vectors if already read)."""
    import ray

    rows, xq = described or query_globals(partitions(cfg)[0], qroot, queries)
    exclude = rows["own"].to_numpy() if cfg.exclude_self else np.full(len(rows), -1)
    roots = [(r.uri, r.options) for r in partitions(cfg)]
    task = ray.remote(num_cpus=1)(global_search_task)
    futures = [task.remote(roots, xq[s:s + cfg.query_block], exclude[s:s + cfg.query_block], k, cfg.db_block)
               for s in range(0, len(xq), cfg.query_block)]
    out = {}
    for s0, (scores, ids) in zip(range(0, len(xq), cfg.query_block), ray.get(futures)):
        for j, q in enumerate(rows["image_id"].to_numpy()[s0:s0 + cfg.query_block]):
            out[int(q)] = (ids[j], scores[j])
    return out


def query_locals(root: ArtifactRoot, qroot: ArtifactRoot, queries: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Local descriptors of the queries (float32) and their query ids; reused ones come from the index."""
    descs, ids = [], []

    def take(table: pa.Table) -> None:
        table = table.filter(pc.equal(table.column("status"), "ok"))
        d, i, _ = local_arrays(table)
        descs.append(d.astype(np.float32)), ids.append(i)

    if (~queries["reuse"]).any():
        take(qroot.shards().read_all(["image_id", "status", "local_desc"]))
    reuse = queries[queries["reuse"]]
    if len(reuse):
        to_query = dict(zip(reuse["own"], reuse["image_id"]))
        for table in root.shards().iter_tables(["image_id", "status", "local_desc"]):
            table = table.filter(pc.is_in(table.column("image_id"), pa.array(list(to_query), pa.int64())))
            if table.num_rows:
                n = len(descs)
                take(table)
                if len(descs) > n:
                    ids[-1] = np.array([to_query[int(i)] for i in ids[-1]], np.int64)
    if not descs:
        return np.zeros((0, 1), np.float32), np.zeros(0, np.int64)
    return np.concatenate(descs), np.concatenate(ids)


def asmk_params(cfg: SearchConfig, root: ArtifactRoot) -> tuple[AsmkParams, int]:
    built = root.stage_settings("asmk")
    chosen = cfg.asmk or from_dict(AsmkConfig, {**built, "params": AsmkParams(**built["params"])})
    if chosen.params.binary != built["params"]["binary"]:
        raise ConfigError("asmk.params.binary must match the index (it decides what the inverted file stores)")
    return chosen.params, chosen.buffer_mb


def run_asmk(cfg: SearchConfig, queries: pd.DataFrame, qroot: ArtifactRoot, k: int) -> dict[int, tuple]:
    """{query id: (ids, scores)} by ASMK over every partition's inverted file."""
    import ray

    parts = partitions(cfg)
    root = parts[0]
    centroids = load_codebook(root)
    for other in parts[1:]:
        if codebook_hash(load_codebook(other)) != codebook_hash(centroids):
            raise SettingsMismatch(f"{other.uri} was built with another codebook; it cannot be searched with {root.uri}")
    params, buffer_mb = asmk_params(cfg, root)
    desc, qimg = query_locals(root, qroot, queries)
    agg = aggregate(desc, qimg, Quantizer(centroids)(desc, params.query_ma), centroids, params.binary)
    exclude = dict(zip(queries["image_id"], queries["own"])) if cfg.exclude_self else {}
    uq = np.unique(agg.image_ids)
    block = (cfg.asmk or AsmkConfig()).query_block
    task = ray.remote(num_cpus=1)(asmk_search_task)
    roots = [(r.uri, r.options) for r in parts]
    futures = []
    for s in range(0, len(uq), block):
        m = np.isin(agg.image_ids, uq[s:s + block])
        futures.append(task.remote(roots, agg.words[m], agg.codes[m], agg.image_ids[m], dataclasses.asdict(params),
                                   k, {q: exclude[q] for q in uq[s:s + block].tolist()}, buffer_mb))
    out = {}
    for qids, scores, ids in ray.get(futures):
        for j, q in enumerate(qids.tolist()):
            out[q] = (ids[j], scores[j])
    return out


def run_fused(cfg: SearchConfig, queries: pd.DataFrame, qroot: ArtifactRoot) -> dict[int, tuple]:
    """ASMK + β · global (see :mod:`operators.fusion`) over the union of both shortlists."""
    shortlist = max(cfg.fusion_shortlist, cfg.topk)
    rows, xq = query_globals(partitions(cfg)[0], qroot, queries)
    a, g = run_asmk(cfg, queries, qroot, shortlist), run_global(cfg, queries, qroot, shortlist, (rows, xq))
    row_of = {int(q): j for j, q in enumerate(rows["image_id"])}
    lookup = GlobalLookup(partitions(cfg))
    out = {}
    for q in set(a) | set(g):
        a_ids, a_s = a.get(q, (np.zeros(0, np.int64), np.zeros(0)))
        cand = np.unique(np.concatenate([a_ids[a_ids >= 0], g.get(q, (np.zeros(0, np.int64),))[0]]))
        cand = cand[cand >= 0]
        sims = lookup(cand) @ xq[row_of[q]] if q in row_of and len(cand) else np.zeros(len(cand))
        out[q] = fuse(a_ids, a_s, cand, sims, cfg.fusion_beta, cfg.topk)
    return out


def initial_depth(cfg: SearchConfig) -> int:
    """How deep the initial ranking must go for the chosen re-ranking."""
    p = cfg.rerank_params
    need = {"none": 0, "aqe": p.qe_n, "alpha-qe": p.qe_n, "dfs": p.kq, "fsr": p.kq, "hybrid": p.kq,
            "truncated-dfs": p.shortlist}[cfg.rerank]
    return max(cfg.topk, need)


def run_query_expansion(cfg: SearchConfig, queries: pd.DataFrame, qroot: ArtifactRoot,
                        ranked: dict[int, tuple]) -> dict[int, tuple]:
    """AQE / αQE: expand each query's global descriptor with its top results, then search again."""
    p = cfg.rerank_params
    alpha = 0.0 if cfg.rerank == "aqe" else p.qe_alpha
    rows, xq = query_globals(partitions(cfg)[0], qroot, queries)
    lookup = GlobalLookup(partitions(cfg))
    top = np.full((len(rows), p.qe_n), -1, np.int64)
    for j, q in enumerate(rows["image_id"].to_numpy()):
        ids = np.asarray(ranked.get(int(q), (np.zeros(0, np.int64),))[0])
        ids = ids[ids >= 0][:p.qe_n]
        top[j, :len(ids)] = ids
    vec = np.zeros((top.size, xq.shape[1]), np.float32)
    vec[top.reshape(-1) >= 0] = lookup(top[top >= 0])  # padding (−1) stays zero and is masked below
    vec = vec.reshape(len(rows), p.qe_n, -1)
    sims = np.where(top >= 0, np.einsum("mkd,md->mk", vec, xq), -np.inf)  # global similarity, whatever ranked them
    return run_global(cfg, queries, qroot, cfg.topk, (rows, expand(xq, vec, sims, alpha, p.qe_n)))


def rerank_task(uri: str, options: dict, method: str, rows: np.ndarray, sims: np.ndarray, own: np.ndarray,
                topk: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion re-ranking of one block of queries on the index's graph (a Ray task)."""
    p = RerankParams(**params)
    graph = load_graph(ArtifactRoot(uri, options), spectral=method in ("fsr", "hybrid"), sparse_keep=p.sparse_keep)
    return rerank(method, graph, rows, sims, own, topk, p)


def run_diffusion(cfg: SearchConfig, queries: pd.DataFrame, ranked: dict[int, tuple]) -> dict[int, tuple]:
    """Diffusion re-ranking of every query's initial ranking (node rows of the index's graph)."""
    import ray

    if cfg.distractors:
        raise ConfigError("diffusion re-ranking needs one graph over the whole database; build the index over the "
                         "collection and its distractors together instead of --distractors")
    root = partitions(cfg)[0]
    problem = graph_problem(root, spectral=cfg.rerank in ("fsr", "hybrid"))
    if problem:
        raise ArtifactError(f"--rerank {cfg.rerank}: {problem}")
    node_ids = np.asarray(global_ids(root))
    qids = [int(q) for q in queries.sort_values("image_id")["image_id"] if int(q) in ranked]
    depth = initial_depth(cfg)
    ids = np.full((len(qids), depth), -1, np.int64)
    sims = np.full((len(qids), depth), -np.inf)
    for j, q in enumerate(qids):
        i, sc = (np.asarray(a)[:depth] for a in ranked[q])
        ids[j, :len(i)], sims[j, :len(sc)] = i, sc
    own_id = dict(zip(queries["image_id"].astype(int), queries["own"].astype(int)))
    own_ids = np.array([own_id[q] if cfg.exclude_self else -1 for q in qids], np.int64)
    rows, own = index_of(node_ids, ids, -1), index_of(node_ids, own_ids, -1)  # one id → row lookup for all queries
    task = ray.remote(num_cpus=1)(rerank_task)
    block = 4 * cfg.rerank_params.block
    params = dataclasses.asdict(cfg.rerank_params)
    futures = [task.remote(root.uri, root.options, cfg.rerank, rows[s:s + block], sims[s:s + block],
                           own[s:s + block], cfg.topk, params) for s in range(0, len(qids), block)]
    out = {}
    for s0, (r, sc) in zip(range(0, len(qids), block), ray.get(futures)):
        for j, q in enumerate(qids[s0:s0 + block]):
            out[q] = (np.where(r[j] >= 0, node_ids[np.maximum(r[j], 0)], -1), sc[j])
    return out


def results_table(queries: pd.DataFrame, ranked: dict[int, tuple[np.ndarray, np.ndarray]]) -> pa.Table:
    """One row per query (in query-id order); padding (-1) removed, empty when the query has no result."""
    queries = queries.sort_values("image_id")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
    lists_i, lists_s = [], []
    for q in queries["image_id"].tolist():
        ids, scores = ranked.get(int(q), empty)
        ids, scores = np.asarray(ids), np.asarray(scores)
        keep = (ids >= 0) & np.isfinite(scores)
        lists_i.append(ids[keep].tolist()), lists_s.append(scores[keep].astype(np.float32).tolist())
    return pa.table({"query_id": pa.array(queries["image_id"], pa.int64()),
                     "query_name": pa.array(queries["name"].astype(str), pa.string()),
                     "ids": pa.array(lists_i, pa.list_(pa.int64())), "scores": pa.array(lists_s, pa.list_(pa.float32()))},
                    schema=RESULTS_SCHEMA)


def write_results(cfg: SearchConfig, table: pa.Table, timings: dict | None = None) -> str:
    """Results with what made them: method, re-ranking and its parameters, index, timings."""
    run = {"config": to_dict(cfg), "method": cfg.method, "rerank": cfg.rerank, "index": cfg.index,
           "queries": table.num_rows, "timings_s": timings or {}}
    return store_results(cfg.out, table, run, cfg.storage)


FLAGS = {
    "--index": ("index", "artifact root written by jobs.index"),
    "--queries": ("queries", "query collection: folder, manifest (with x0,y0,x1,y1 boxes) or revisited .pkl"),
    "--out": ("out", "results folder or s3:// prefix"),
    "--method": ("method", "ranking method"),
    "--topk": ("topk", "results kept per query"),
    "--center-crop": ("center_crop", "crop queries without a box to this central fraction (e.g. 0.4)"),
    "--rerank": ("rerank", "re-ranking of the initial ranking"),
    "--distractors": ("distractors", "comma-separated index roots searched together with --index (same codebook)"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    cfg = parse(SearchConfig, argv, FLAGS, __doc__, prog)
    summary = JobSummary("search")
    connect(cfg.ray)
    root = ArtifactRoot(cfg.index, cfg.storage)
    queries, qroot = describe_queries(cfg, root, summary)
    depth = initial_depth(cfg)
    with summary.stage(f"search ({cfg.method})"):
        if cfg.method == "global":
            ranked = run_global(cfg, queries, qroot, depth)
        elif cfg.method == "asmk":
            ranked = run_asmk(cfg, queries, qroot, depth)
        else:
            ranked = run_fused(dataclasses.replace(cfg, topk=depth), queries, qroot)
    if cfg.rerank in ("aqe", "alpha-qe"):
        with summary.stage(f"re-rank ({cfg.rerank})"):
            ranked = run_query_expansion(cfg, queries, qroot, ranked)
    elif cfg.rerank in DIFFUSION:
        with summary.stage(f"re-rank ({cfg.rerank})"):
            ranked = run_diffusion(cfg, queries, ranked)
    else:
        ranked = {q: (np.asarray(i)[:cfg.topk], np.asarray(s)[:cfg.topk]) for q, (i, s) in ranked.items()}
    table = results_table(queries, ranked)
    summary.add(queries=len(queries), queries_without_results=int(sum(len(x) == 0 for x in table.column("ids").to_pylist())))
    summary.info["results"] = write_results(cfg, table, dict(summary.timings))
    return summary.finish(cfg.out, cfg.storage)


if __name__ == "__main__":
    run_cli(main)
