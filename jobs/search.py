"""Search job: describe the queries, rank the database, write top-K results to Parquet.

``python -m jobs.search --index ROOT --queries Q --out RES --method {global,asmk,fused} --topk K``

Queries (folder, manifest with optional ``x0,y0,x1,y1`` boxes, or revisited ``.pkl`` with its
``bbx``) are cropped and described exactly as the database was (same describer config and local
whitening, read from ``ROOT/index.json``). Described queries are cached per index and query
settings (:mod:`storage.query_cache`): a second search of the same queries describes nothing. A
query that is an uncropped database image reuses that image's features, read from its own shard.

Everything one search reads is read once into a :class:`SearchContext`; every stage takes and
returns a :class:`operators.ranking.Ranking` (queries × k arrays). Ranking runs in Ray tasks over
blocks of queries:

- ``global``: each task memory-maps the descriptor matrices and streams them in blocks with a
  top-k heap (memory O(queries × k));
- ``asmk``: queries are quantised with multiple assignment and aggregated; each task scores its
  block against the memory-mapped inverted files (:func:`operators.asmk.search`);
- ``fused``: ASMK and global rankings fused over the union of their shortlists (:mod:`operators.fusion`);
- ``iasmk`` / ``fused-iasmk``: the same over the i-ASMK* compressed inverted file (``jobs.discover``),
  where a component's match scores every image of the component.
- ``os``: as ``global``, over the saliency-based descriptors of the database (object discovery,
  ``jobs.discover --set stages=[objects]``); queries keep their plain GeM.

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

# The search's stages are modules of their own (stage modules, not jobs: no ``main``, never run with -m):
# jobs.search_queries (its context, the queries described or cached, their descriptors read through pyarrow),
# jobs.search_rankings (the initial rankings in Ray tasks) and jobs.search_rerank (re-ranking: query expansion
# and the Ray re-ranking tasks). This module holds the job's config, its flags and the flow.
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import pyarrow as pa

from cluster.ray_env import RayConfig, connect
from jobs.asmk import AsmkConfig
from jobs.config import parse, run_cli, to_dict
from jobs.search_context import SearchContext
from jobs.search_queries import build_context, check_index
from jobs.search_rankings import asmk_config, asmk_search, fused_search, global_search
from jobs.search_rerank import initial_depth, query_expansion, rerank_in_tasks
from jobs.summary import JobSummary
from operators.cas import CasParams
from operators.constraints import Count, Fraction, NonNegFinite, NonNegInt
from operators.fusion import Mode as FusionMode
from operators.ranking import Ranking
from operators.rerank import DIFFUSION, LEARNED, SHORTLIST, RerankParams
from operators.rerank import METHODS as RERANK_METHODS
from storage.iasmk import iasmk_meta
from storage.results import results_table
from storage.results import write_results as store_results

Method = Literal["global", "asmk", "fused", "iasmk", "fused-iasmk", "os"]
Rerank = Literal["none", "aqe", "alpha-qe", "dfs", "truncated-dfs", "fsr", "hybrid", "gss", "gradnet", "cas"]
METHODS = typing.get_args(Method)
assert typing.get_args(Rerank) == RERANK_METHODS


@dataclass(kw_only=True)
class SearchConfig:
    index: str  # artifact root written by jobs.index (required)
    queries: str  # query collection (required)
    out: str  # results folder (required)
    method: Method = "global"
    topk: Count = 1000  # results kept per query; a shorter list than the database is scored as truncated
    distractors: list[str] = field(default_factory=list)  # more index roots searched with ``index``
    role: Literal["queries", "database"] = "queries"  # revisited .pkl: queries (qimlist + bbx) or database
    center_crop: Fraction | None = None  # crop queries without a box to this central fraction
    allow_outside_root: bool = False  # the query manifest's relative paths may climb out of its folder (../)
    exclude_self: bool = True
    reuse_database_features: bool = True  # uncropped queries that are database images reuse its features
    query_cache: str = (
        "index"  # described queries: "index" (ROOT/query-cache), "results" (RES/queries, no reuse) or a folder
    )
    query_block: Count = 1024  # queries per Ray search task (global)
    db_block: Count = 65536  # database rows per faiss call
    global_search: Literal["auto", "exact"] = "auto"  # auto: a partition's approximate index when it has a fresh one
    global_nprobe: NonNegInt = 0  # cells an approximate index visits per query (0: the index's own choice)
    asmk: AsmkConfig | None = None  # ASMK search parameters (None: those the index was built with)
    fusion: FusionMode = "z"  # fused: z (each channel standardised by its own null level), rank (RRF) or score
    fusion_beta: NonNegFinite = 2.0  # fused: weight of the global term (z: leave-one-group-out on instance-mini)
    fusion_shortlist: Count = 1000  # fused: shortlist of each method
    rerank: Rerank = "none"
    rerank_params: RerankParams = field(default_factory=RerankParams)
    cas: CasParams = field(default_factory=CasParams)  # --rerank cas (EXT defaults, operators.cas)
    checkpoint: str | None = None  # the describer's weights, when the index names a file outside its root
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def write_results(ctx: SearchContext, table: pa.Table, timings: dict) -> str:
    """Results with what made them: method, re-ranking and its parameters, index, queries, timings."""
    cfg = ctx.cfg
    params = {"topk": cfg.topk}
    if cfg.method != "global":
        params["asmk"] = dataclasses.asdict(asmk_config(cfg, ctx.root).params)
    if "iasmk" in cfg.method:
        params["iasmk"] = iasmk_meta(ctx.root)["params"]
    if cfg.method.startswith("fused"):
        params.update(fusion=cfg.fusion, fusion_beta=cfg.fusion_beta, fusion_shortlist=cfg.fusion_shortlist)
    if cfg.rerank != "none":
        params["rerank"] = dataclasses.asdict(cfg.cas if cfg.rerank == "cas" else cfg.rerank_params)
    run = {
        "config": to_dict(cfg),
        "method": cfg.method,
        "rerank": cfg.rerank,
        "params": params,
        "index": cfg.index,
        "queries": table.num_rows,
        "queries_root": ctx.qroot.uri,
        "center_crop": cfg.center_crop,
        "timings_s": timings,
        "task_seconds": ctx.task_seconds,
        "global_search": ctx.global_used,
    }
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


def search(ctx: SearchContext, summary: JobSummary) -> Ranking:
    """The initial ranking of ``ctx.cfg.method``, re-ranked by ``ctx.cfg.rerank``, top ``topk``."""
    cfg = ctx.cfg
    depth = initial_depth(cfg, ctx.n_database)
    initial = {
        "global": lambda: global_search(ctx, ctx.xq, depth),
        "os": lambda: global_search(ctx, ctx.xq, depth),
        "asmk": lambda: asmk_search(ctx, depth),
        "iasmk": lambda: asmk_search(ctx, depth, "iasmk"),
        "fused": lambda: fused_search(ctx, depth),
        "fused-iasmk": lambda: fused_search(ctx, depth),
    }[cfg.method]
    with summary.stage(f"search ({cfg.method})"):
        ranked = initial()
    if cfg.rerank in ("aqe", "alpha-qe"):
        with summary.stage(f"re-rank ({cfg.rerank})"):
            ranked = query_expansion(ctx, ranked)
    elif cfg.rerank in (*DIFFUSION, *LEARNED, *SHORTLIST):
        with summary.stage(f"re-rank ({cfg.rerank})"):
            ranked = rerank_in_tasks(ctx, ranked)
    return ranked.top(ctx.topk)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    cfg = parse(SearchConfig, argv, FLAGS, __doc__, prog)
    summary = JobSummary("search")
    check_index(cfg)  # what the index lacks is said before Ray starts
    connect(cfg.ray)
    ctx = build_context(cfg, summary)
    every = pd.concat([ctx.queries[["image_id", "name", "source"]], ctx.repeats], ignore_index=True)
    table = results_table(every, search(ctx, summary))
    summary.add(
        queries=len(every),
        queries_described=len(ctx.qids),
        queries_without_results=int(sum(len(x) == 0 for x in table.column("ids").to_pylist())),
    )
    summary.info["results"] = write_results(ctx, table, dict(summary.timings))
    return summary.finish(cfg.out, cfg.storage)


if __name__ == "__main__":
    run_cli(main)
