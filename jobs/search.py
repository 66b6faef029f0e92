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

import dataclasses
import functools
import time
import typing
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cluster.ray_env import RayConfig, connect, task_cpus
from jobs.asmk import AsmkConfig, search_task as asmk_search_task
from jobs.config import from_dict, parse, run_cli, to_dict
from jobs.extract import (ExtractConfig, check_settings, extraction_settings, failed_images, prepare_images,
                          recorded_describer, recorded_settings, run_extraction)
from jobs.summary import JobSummary
from operators.asmk import AsmkParams, aggregate
from operators.codebook import AssignConfig, Quantizer
from operators.constraints import Count, Fraction, NonNegFinite
from operators.describe import DescriptorConfig
from operators.fusion import Mode as FusionMode, fuse
from operators.global_index import iter_blocks
from operators.graph import index_of
from operators.knn import knn_blocks
from operators.qe import expand
from operators.ranking import Ranking
from operators.cas import CasParams
from operators.rerank import DIFFUSION, LEARNED, METHODS as RERANK_METHODS, SHORTLIST, RerankParams, merge_with_initial, rerank
from storage.artifacts import ArtifactRoot
from storage.codebook import codebook_hash, load_codebook
from storage.collection import file_keys, load_collection
from storage.errors import ArtifactError, CollectionError, ConfigError, SettingsMismatch
from storage.global_index import GlobalLookup, check_consistent, global_ids, open_global
from storage.objects import OBJECTS
from storage.graph import graph_problem, load_graph
from storage.iasmk import iasmk_meta
from storage.query_cache import query_cache_key, query_cache_root, results_query_root
from storage.results import write_results as store_results
from storage.schemas import RESULTS_SCHEMA, global_matrix, local_arrays
from storage.whitening import read_whitening

Method = Literal["global", "asmk", "fused", "iasmk", "fused-iasmk", "os"]
Rerank = Literal["none", "aqe", "alpha-qe", "dfs", "truncated-dfs", "fsr", "hybrid", "gss", "gradnet", "cas"]
METHODS = typing.get_args(Method)
assert typing.get_args(Rerank) == RERANK_METHODS


@dataclass(kw_only=True)
class SearchConfig:
    index: str                            # artifact root written by jobs.index (required)
    queries: str                          # query collection (required)
    out: str                              # results folder (required)
    method: Method = "global"
    topk: Count = 100
    distractors: list[str] = field(default_factory=list)  # more index roots searched with ``index``
    role: Literal["queries", "database"] = "queries"  # revisited .pkl: queries (qimlist + bbx) or database
    center_crop: Fraction | None = None      # crop queries without a box to this central fraction
    allow_outside_root: bool = False      # the query manifest's relative paths may climb out of its folder (../)
    exclude_self: bool = True
    reuse_database_features: bool = True  # uncropped queries that are database images reuse its features
    query_cache: str = "index"            # described queries: "index" (ROOT/query-cache), "results" (RES/queries, no reuse) or a folder
    query_block: Count = 1024               # queries per Ray search task (global)
    db_block: Count = 65536                 # database rows per faiss call
    asmk: AsmkConfig | None = None        # ASMK search parameters (None: those the index was built with)
    fusion: FusionMode = "rank"           # fused: rank (reciprocal rank fusion) or score (normalised sum)
    fusion_beta: NonNegFinite = 1.5              # fused: weight of the global term (group-wise cross-validated, README "Fusion")
    fusion_shortlist: Count = 1000          # fused: shortlist of each method
    rerank: Rerank = "none"
    rerank_params: RerankParams = field(default_factory=RerankParams)
    cas: CasParams = field(default_factory=CasParams)  # --rerank cas (EXT defaults, operators.cas)
    checkpoint: str | None = None         # the describer's weights, when the index names a file outside its root
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


@dataclass
class SearchContext:
    """What one search reads once and passes down: partitions, queries, their global vectors.

    Every :class:`Ranking` of the search has one row per described query, in ``qids`` order.
    """

    cfg: SearchConfig
    parts: list[ArtifactRoot]   # the index, then the distractor roots
    database: pd.DataFrame      # the index's image table (ids, files, shards)
    queries: pd.DataFrame       # every distinct query: image_id, name, file, box, own (database id or −1), reuse
    repeats: pd.DataFrame       # queries repeating one above (same file and box): image_id, name, source (its id)
    qroot: ArtifactRoot         # the described queries (cache entry)
    qids: np.ndarray            # (m,) described queries, sorted
    xq: np.ndarray              # (m, D) their global descriptors, in the database's (whitened) space
    exclude: np.ndarray         # (m,) database id left out of each query's ranking (−1: none)
    lookup: GlobalLookup        # global descriptors by database id, over every partition
    db_lookup: GlobalLookup     # the database vectors the method ranks (``os``: the saliency-based ones)
    task_seconds: dict = field(default_factory=dict)  # step -> [[queries, seconds]] of each Ray task (run.json)

    @property
    def root(self) -> ArtifactRoot:
        return self.parts[0]

    @property
    def roots(self) -> list[tuple[str, dict]]:
        """(uri, options) of every partition, as Ray tasks take them."""
        return [(r.uri, r.options) for r in self.parts]

    @property
    def n_database(self) -> int:
        """Rows the search ranks, over every partition: no ranking is deeper."""
        return max(1, sum(len(ids) for ids, _, _ in self.db_lookup.parts))

    @property
    def topk(self) -> int:
        """``cfg.topk``, at most the database's size (the arrays a search allocates are queries × topk)."""
        return min(self.cfg.topk, self.n_database)

    def block_starts(self, block: int) -> range:
        return range(0, len(self.qids), block)


# ------------------------------------------------------------------------------------------
# The context: queries described (or cached) and read once
# ------------------------------------------------------------------------------------------
def build_context(cfg: SearchConfig, summary: JobSummary) -> SearchContext:
    parts = [ArtifactRoot(u, cfg.storage) for u in [cfg.index, *cfg.distractors]]
    root = parts[0]
    root.meta()  # a root of another schema version is refused first
    database = root.images()
    if database is None:
        raise ArtifactError(f"{root.uri} is not an index (no images.parquet): run python -m jobs.index first")
    for part in parts:
        images = database if part is root else part.images()
        check_consistent(part, None if images is None else images["image_id"].to_numpy())
    every, qroot = describe_queries(cfg, root, database, summary)
    distinct = (every["source"] == every["image_id"]).to_numpy()
    queries, repeats = every[distinct].reset_index(drop=True), every[~distinct][["image_id", "name", "source"]]
    lookup = GlobalLookup(parts)
    qids, xq = query_globals(root, qroot, queries, lookup)
    if len(queries) and not len(qids):
        failed = failed_images(qroot.shards(), queries)
        first = f": {failed['file'].iloc[0]}: {failed['error'].iloc[0]}" if len(failed) else ""
        raise CollectionError(f"none of the {len(every)} queries could be described{first}")
    own = queries.set_index("image_id").loc[qids, "own"].to_numpy(np.int64)
    exclude = own if cfg.exclude_self else np.full(len(qids), -1, np.int64)
    db_lookup = GlobalLookup(parts, vector_set(cfg.method)) if cfg.method == "os" else lookup
    return SearchContext(cfg, parts, database, queries, repeats, qroot, qids, xq, exclude, lookup, db_lookup)


def vector_set(method: str) -> str:
    """The database vectors a global ranking of ``method`` reads (:mod:`storage.global_index` names)."""
    return OBJECTS if method == "os" else "global"


def query_extract_config(cfg: SearchConfig, root: ArtifactRoot, out: str) -> ExtractConfig:
    """The index's extraction settings applied to the queries (their crop policy and role)."""
    built = from_dict(ExtractConfig, root.stage_settings("extract"))
    return ExtractConfig(collection=cfg.queries, out=out, role=cfg.role, shard_size=built.shard_size,
                         batch_size=built.batch_size, center_crop=cfg.center_crop,
                         local_whiten_dim=built.local_whiten_dim,
                         describe=from_dict(DescriptorConfig, recorded_describer(root, cfg.checkpoint)), ray=cfg.ray,
                         storage=cfg.storage)


def describe_queries(cfg: SearchConfig, root: ArtifactRoot, database: pd.DataFrame,
                     summary: JobSummary) -> tuple[pd.DataFrame, ArtifactRoot]:
    """Describe the queries that need it into their cache entry; returns the query table and the entry.

    A query that is an uncropped database image is not described: its database features are reused
    (``reuse`` column). Queries already in the cache entry are not described again.
    """
    qcfg = query_extract_config(cfg, root, "")
    fresh = load_collection(cfg.queries, cfg.role, cfg.storage, allow_outside=cfg.allow_outside_root)
    whitening = read_whitening(root, "local")
    db_ids = global_ids(root)
    fresh["own"] = self_ids(fresh, database)
    uncropped = fresh[["x0", "y0", "x1", "y1"]].isna().all(axis=1).to_numpy() & (cfg.center_crop is None)
    # an index of ASMK* entries alone keeps no descriptors to reuse (queries take multiple assignment)
    reusable = cfg.reuse_database_features and root.stage_settings("extract").get("local_store") != "entries"
    fresh["reuse"] = np.isin(fresh["own"].to_numpy(), db_ids) & uncropped & reusable
    fresh["source"] = first_of_same(fresh)
    if cfg.query_cache == "results":
        qroot = results_query_root(cfg.out, cfg.storage)
    else:
        key = query_cache_key(root, {**extraction_settings(to_dict(qcfg)), "role": cfg.role,
                                     "reuse": reusable},
                              fresh, whitening.to_bytes() if whitening else None, len(db_ids))
        qroot = query_cache_root(root, key, None if cfg.query_cache == "index" else cfg.query_cache)
    qcfg = dataclasses.replace(qcfg, out=qroot.uri)
    check_settings(qroot.shards(), to_dict(qcfg), qroot.stage_settings("extract", required=False))
    queries = prepare_images(qroot, qcfg.collection, qcfg.role, 0, cfg.storage, qcfg.shard_size,
                             fresh=fresh.drop(columns=["own", "reuse", "source"]))
    queries = queries.merge(fresh[["image_id", "own", "reuse", "source"]], on="image_id", how="left")
    distinct = queries["source"] == queries["image_id"]
    summary.add(queries_reusing_database_features=int((queries["reuse"] & distinct).sum()),
                queries_repeated=int((~distinct).sum()))
    summary.info["query_cache"] = qroot.uri
    with summary.stage("extract queries"):
        run_extraction(qcfg, queries[~queries["reuse"] & distinct], qroot.shards(), whitening, summary)
    qroot.record_stage("extract", "search", recorded_settings(qcfg), images=len(queries))
    return queries, qroot


def first_of_same(queries: pd.DataFrame) -> np.ndarray:
    """Per query, the image id of the first query with the same file and box (itself when it is the first):
    a query repeated in the collection is described and ranked once."""
    keys = pd.DataFrame({"file": file_keys(queries["file"]), **{c: queries[c] for c in ("x0", "y0", "x1", "y1")}})
    group = keys.groupby(list(keys.columns), dropna=False, sort=False).ngroup().to_numpy()
    first = pd.Series(np.arange(len(group))).groupby(group).transform("min").to_numpy()
    return queries["image_id"].to_numpy(np.int64)[first]


def self_ids(queries: pd.DataFrame, database: pd.DataFrame) -> np.ndarray:
    """Database id of each query's own image (same file), -1 when the query is not in the database."""
    by_file = dict(zip(file_keys(database["file"]), database["image_id"]))
    return np.array([by_file.get(f, -1) for f in file_keys(queries["file"])], dtype=np.int64)


def _ok(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table.column("status"), "ok"))


def query_globals(root: ArtifactRoot, qroot: ArtifactRoot, queries: pd.DataFrame,
                  lookup: GlobalLookup) -> tuple[np.ndarray, np.ndarray]:
    """Ids (sorted) and global descriptors, in the database's (whitened) space, of the described queries."""
    ids, vectors = [], []
    if (~queries["reuse"]).any():
        t = _ok(qroot.shards().read_all(["image_id", "status", "global"]))
        if t.num_rows:
            white = read_whitening(root, "global")
            x = global_matrix(t)
            ids.append(t.column("image_id").to_numpy()), vectors.append(white(x) if white is not None else x)
    reuse = queries[queries["reuse"]]
    if len(reuse):
        ids.append(reuse["image_id"].to_numpy()), vectors.append(lookup(reuse["own"].to_numpy()))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, lookup.dim), np.float32)
    qids = np.concatenate(ids).astype(np.int64)
    order = np.argsort(qids)
    return qids[order], np.concatenate(vectors).astype(np.float32)[order]


def query_locals(ctx: SearchContext) -> tuple[np.ndarray, np.ndarray]:
    """Local descriptors (float32) of the queries and their query ids.

    Described queries come from the cache entry; reused ones from their database images' own shards
    (only those shards are read).
    """
    descs, ids = [], []

    def take(table: pa.Table, to_query: dict | None = None) -> None:
        d, i, _ = local_arrays(_ok(table))
        descs.append(d.astype(np.float32))
        ids.append(i if to_query is None else np.array([to_query[int(x)] for x in i], np.int64))

    q = ctx.queries
    if (~q["reuse"]).any():
        take(ctx.qroot.shards().read_all(["image_id", "status", "local_desc"]))
    reuse = q[q["reuse"]]
    if len(reuse):
        to_query = dict(zip(reuse["own"].astype(int), reuse["image_id"].astype(int)))
        shard_of = ctx.database.set_index("image_id")["shard"]
        wanted = pa.array(list(to_query), pa.int64())
        for shard in sorted(set(shard_of.loc[list(to_query)].astype(int))):
            table = ctx.root.shards().read_shard(shard, ["image_id", "status", "local_desc"])
            take(table.filter(pc.is_in(table.column("image_id"), wanted)), to_query)
    if not descs:
        return np.zeros((0, 1), np.float32), np.zeros(0, np.int64)
    return np.concatenate(descs), np.concatenate(ids)


# ------------------------------------------------------------------------------------------
# Initial rankings
# ------------------------------------------------------------------------------------------
def timed(fn):
    """``fn`` returning (its result, the seconds it ran): each search task's service time, for run.json."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        return fn(*args, **kwargs), time.perf_counter() - t0
    return run


def gather(ctx: SearchContext, step: str, futures: list, sizes: list[int]) -> list:
    """The results of timed tasks of ``step`` (``sizes`` queries each); their times go to ``ctx.task_seconds``."""
    import ray

    got = ray.get(futures)
    ctx.task_seconds.setdefault(step, []).extend([n, round(t, 6)] for n, (_, t) in zip(sizes, got))
    return [r for r, _ in got]


def global_search_task(roots: list[tuple[str, dict]], xq: np.ndarray, exclude: np.ndarray, k: int, db_block: int,
                       name: str = "global"):
    """Rank the memory-mapped descriptors ``name`` of every partition for one block of queries (a Ray task)."""
    def blocks():
        for uri, options in roots:
            g = open_global(ArtifactRoot(uri, options), name)
            yield from iter_blocks(g.ids, g.vectors, db_block)
    return knn_blocks(xq, blocks(), k, exclude)


def global_search(ctx: SearchContext, xq: np.ndarray, k: int) -> Ranking:
    """Top-``k`` by global-descriptor similarity of query vectors ``xq`` (one per ``ctx.qids``)."""
    import ray

    task = ray.remote(num_cpus=1)(timed(global_search_task))
    b = ctx.cfg.query_block
    futures = [task.remote(ctx.roots, xq[s:s + b], ctx.exclude[s:s + b], k, ctx.cfg.db_block, vector_set(ctx.cfg.method))
               for s in ctx.block_starts(b)]
    got = gather(ctx, "global", futures, [len(xq[s:s + b]) for s in ctx.block_starts(b)])
    return Ranking.concat([Ranking(ctx.qids[s:s + b], ids, scores) for s, (scores, ids) in zip(ctx.block_starts(b), got)])


def asmk_config(cfg: SearchConfig, root: ArtifactRoot) -> AsmkConfig:
    """The search's ASMK settings: ``cfg.asmk`` when given, else the index's own (assignment included)."""
    built = root.stage_settings("asmk")
    chosen = cfg.asmk or from_dict(AsmkConfig, {**built, "params": AsmkParams(**built["params"]),
                                                "assign": AssignConfig(**built.get("assign", {}))})
    if chosen.params.binary != built["params"]["binary"]:
        raise ConfigError("asmk.params.binary must match the index (it decides what the inverted file stores)")
    return chosen


def asmk_search(ctx: SearchContext, k: int, layout: str = "asmk") -> Ranking:
    """Top-``k`` by ASMK over every partition's inverted file (one codebook); ``layout="iasmk"``:
    over their i-ASMK* compressed inverted files (``jobs.discover``)."""
    import ray

    if layout == "iasmk":
        for part in ctx.parts:
            iasmk_meta(part)  # an ArtifactError before any task when discovery has not run
    centroids = load_codebook(ctx.root)
    for other in ctx.parts[1:]:
        if codebook_hash(load_codebook(other)) != codebook_hash(centroids):
            raise SettingsMismatch(f"{other.uri} was built with another codebook; it cannot be searched with {ctx.root.uri}")
    chosen = asmk_config(ctx.cfg, ctx.root)
    params, buffer_mb = chosen.params, chosen.buffer_mb
    desc, qimg = query_locals(ctx)
    agg = aggregate(desc, qimg, Quantizer(centroids, chosen.assign)(desc, params.query_ma), centroids, params.binary)
    exclude = dict(zip(ctx.qids.tolist(), ctx.exclude.tolist()))
    uq = np.unique(agg.image_ids)
    block = (ctx.cfg.asmk or AsmkConfig()).query_block
    task = ray.remote(num_cpus=1)(timed(asmk_search_task))
    futures = []
    for s in range(0, len(uq), block):
        m = np.isin(agg.image_ids, uq[s:s + block])
        futures.append(task.remote(ctx.roots, agg.words[m], agg.codes[m], agg.image_ids[m], dataclasses.asdict(params),
                                   k, {q: exclude.get(q, -1) for q in uq[s:s + block].tolist()}, buffer_mb, layout))
    sizes = [len(uq[s:s + block]) for s in range(0, len(uq), block)]
    parts = [Ranking(qids, ids, scores) for qids, scores, ids in gather(ctx, layout, futures, sizes)]
    return Ranking.concat(parts).align(ctx.qids).top(k)


def fused_search(ctx: SearchContext, k: int) -> Ranking:
    """ASMK fused with global similarity (:func:`operators.fusion.fuse`) over the union of both shortlists.

    Candidates found by ASMK alone get their global similarity from the memory-mapped matrices.
    """
    shortlist = min(max(ctx.cfg.fusion_shortlist, k), ctx.n_database)
    layout = "iasmk" if ctx.cfg.method == "fused-iasmk" else "asmk"
    a, g = asmk_search(ctx, shortlist, layout), global_search(ctx, ctx.xq, shortlist)
    ids, scores = fuse(*fusion_candidates(ctx, a, g), ctx.cfg.fusion_beta, k, ctx.cfg.fusion)
    return Ranking(ctx.qids, ids, scores)


def fusion_candidates(ctx: SearchContext, a: Ranking, g: Ranking, block: int = 65536) -> tuple[np.ndarray, ...]:
    """:func:`union_candidates` of the ASMK and global rankings, with the global similarity of the
    candidates only ASMK found looked up (in blocks, bounding the memory of the looked-up rows)."""
    cand, asmk_s, glob = union_candidates(a, g)
    rows, cols = np.nonzero((cand >= 0) & np.isnan(glob))
    for s in range(0, len(rows), block):
        r, c = rows[s:s + block], cols[s:s + block]
        glob[r, c] = np.einsum("nd,nd->n", ctx.lookup(cand[r, c]), ctx.xq[r])
    return cand, asmk_s, glob


def union_candidates(a: Ranking, g: Ranking) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, the union of two rankings' ids: (ids, ASMK score or −inf, global score or NaN), (m, ka + kg).

    Each id appears once (padding −1); an id of both keeps ``a``'s score and takes ``g``'s similarity.
    """
    ids = np.concatenate([a.ids, g.ids], 1)
    asmk = np.concatenate([a.scores, np.full(g.scores.shape, -np.inf, np.float32)], 1).astype(np.float64)
    glob = np.concatenate([np.full(a.scores.shape, np.nan), g.scores], 1).astype(np.float64)
    order = np.argsort(ids, axis=1, kind="stable")  # an id of both: a's entry first, g's next to it
    ids, asmk, glob = (np.take_along_axis(x, order, 1) for x in (ids, asmk, glob))
    dup = np.zeros(ids.shape, bool)
    dup[:, 1:] = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)
    first = np.roll(dup, -1, axis=1)  # the a-entry of a duplicated id
    glob[first] = glob[dup]
    ids[dup] = -1
    return ids, asmk, glob


# ------------------------------------------------------------------------------------------
# Re-ranking
# ------------------------------------------------------------------------------------------
def initial_depth(cfg: SearchConfig, n_database: int) -> int:
    """How deep the initial ranking must go for the chosen re-ranking (GSS, GRAD-Net: the trained model's k_q or
    K neighbours of a query, read by the task; 100 covers them), never deeper than the database."""
    p = cfg.rerank_params
    need = {"none": 0, "aqe": p.qe_n, "alpha-qe": p.qe_n, "dfs": p.kq, "fsr": p.kq, "hybrid": p.kq,
            "truncated-dfs": p.shortlist, "gss": 100, "gradnet": 100, "cas": cfg.cas.shortlist}[cfg.rerank]
    return min(max(cfg.topk, need), n_database)


def query_expansion(ctx: SearchContext, ranked: Ranking, block: int = 256) -> Ranking:
    """AQE / αQE: expand each query's global descriptor with its top results, then search again."""
    p = ctx.cfg.rerank_params
    alpha = 0.0 if ctx.cfg.rerank == "aqe" else p.qe_alpha
    n = min(p.qe_n, ctx.n_database)
    top = ranked.top(n).ids
    expanded = np.empty_like(ctx.xq)
    for s in ctx.block_starts(block):  # blocks bound the (block, n, D) neighbour vectors
        t = top[s:s + block]
        vec = np.zeros((t.size, ctx.xq.shape[1]), np.float32)
        vec[t.reshape(-1) >= 0] = ctx.db_lookup(t[t >= 0])  # padding (−1) stays zero and is masked below
        vec = vec.reshape(len(t), n, -1)
        sims = np.where(t >= 0, np.einsum("mkd,md->mk", vec, ctx.xq[s:s + block]), -np.inf)  # global similarity
        expanded[s:s + block] = expand(ctx.xq[s:s + block], vec, sims, alpha, n)
    return global_search(ctx, expanded, ctx.topk)


def diffusion_task(uri: str, options: dict, method: str, xq: np.ndarray, rows: np.ndarray, sims: np.ndarray,
                   own: np.ndarray, topk: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion re-ranking of one block of queries on the index's graph (a Ray task)."""
    p = RerankParams(**params)
    graph = load_graph(ArtifactRoot(uri, options), spectral=method in ("fsr", "hybrid"), sparse_keep=p.sparse_keep)
    return rerank(method, graph, rows, sims, own, topk, p)


def neighbour_cosines(xq: np.ndarray, top: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Global cosine of each query to its database rows ``top`` (−1 padding: 0), gathered from ``x``."""
    near = np.asarray(x[np.maximum(top, 0).ravel()], np.float32).reshape(*top.shape, -1)
    return np.where(top >= 0, np.einsum("qd,qkd->qk", xq, near), 0.0)


def gss_task(uri: str, options: dict, method: str, xq: np.ndarray, rows: np.ndarray, sims: np.ndarray,
             own: np.ndarray, topk: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """GSS re-ranking of one block of queries (a Ray task): each query attaches to the first k_q items of
    its initial ranking (edge weights: global cosine), its embedding follows the database's stored states,
    and the whole database is ranked by ĥ_qᵀĥ_x (the reference ranks everything by the embedding)."""
    from operators.gss import GssParams, ResidualGCN, embed_queries
    from storage.learned import load_model

    root = ArtifactRoot(uri, options)
    m = load_model(root, "gss")
    p = GssParams(**m.meta["params"])
    x = open_global(root).vectors
    top = rows[:, :p.kq]
    hq = embed_queries(ResidualGCN(m.embeddings.shape[1], p, weights=m.weights), xq, top, neighbour_cosines(xq, top, x),
                       m.degree, [x, *m.states])
    scores, ids = knn_blocks(hq, iter_blocks(np.arange(len(m.embeddings)), m.embeddings), topk, exclude=own)
    return ids, np.where(ids >= 0, np.maximum(scores, 0), -np.inf)  # s = [ĥ_qᵀĥ_x]₊


def gradnet_task(uri: str, options: dict, method: str, xq: np.ndarray, rows: np.ndarray, sims: np.ndarray,
                 own: np.ndarray, topk: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """GRAD-Net re-ranking of one block of queries (a Ray task): QFE (eq. 22) over the first K items of the
    initial ranking, weights their global cosine (a second round, when asked, in the learned space), then the
    whole database ranked by the cosine of the learned features."""
    from operators.gradnet import GradNetParams, qfe
    from storage.learned import load_model

    root = ArtifactRoot(uri, options)
    m = load_model(root, "gradnet")
    p, emb, x = GradNetParams(**m.meta["params"]), m.embeddings, open_global(root).vectors
    top = rows[:, :p.k]
    hq = qfe(top, neighbour_cosines(xq, top, x), emb)
    for _ in range(p.qfe_rounds - 1):
        s2, top2 = knn_blocks(hq, iter_blocks(np.arange(len(emb)), emb), p.k, exclude=own)
        hq = qfe(top2, np.maximum(s2, 0), emb)
    scores, ids = knn_blocks(hq, iter_blocks(np.arange(len(emb)), emb), topk, exclude=own)
    return ids, np.where(ids >= 0, scores, -np.inf)


def cas_task(uri: str, options: dict, method: str, xq: np.ndarray, rows: np.ndarray, sims: np.ndarray,
             own: np.ndarray, topk: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """CAS re-ranking of one block of queries (a Ray task): each query's problem is itself and its top-T
    rows (global descriptors, memory-mapped); the rest of its initial ranking follows in its order."""
    import numba

    from operators.cas import rerank_shortlist

    numba.set_num_threads(min(numba.config.NUMBA_NUM_THREADS, task_cpus()))  # the JS kernel: the task's CPUs only
    p = CasParams(**params)
    x = open_global(ArtifactRoot(uri, options)).vectors
    out_r = np.full((len(rows), topk), -1, np.int64)
    out_s = np.full((len(rows), topk), -np.inf)
    for j in range(len(rows)):
        short = rows[j, :p.shortlist]
        short = short[(short >= 0) & (short != own[j])]
        cand, score = rerank_shortlist(xq[j], np.asarray(x[short], np.float32), short, p)
        r, s = merge_with_initial(cand, score, rows[j], own[j], topk)
        out_r[j, :len(r)], out_s[j, :len(s)] = r, s
    return out_r, out_s


def rerank_problem(ctx: SearchContext) -> str | None:
    """Why ``--rerank`` cannot run on this index (None when it can), said before any task starts."""
    cfg = ctx.cfg
    if cfg.distractors:
        return (f"--rerank {cfg.rerank} needs one root over the whole database; build the index over the "
                "collection and its distractors together instead of --distractors")
    if cfg.rerank in DIFFUSION:
        problem = graph_problem(ctx.root, spectral=cfg.rerank in ("fsr", "hybrid"))
        return f"--rerank {cfg.rerank}: {problem}" if problem else None
    if cfg.rerank in LEARNED:
        from storage.learned import learned_meta
        if learned_meta(ctx.root, cfg.rerank) is None:
            return (f"--rerank {cfg.rerank}: no trained model in {ctx.root.uri}: run "
                    f"python -m jobs.train_reranker --index {ctx.root.uri} --method {cfg.rerank}")
    return None


def rerank_in_tasks(ctx: SearchContext, ranked: Ranking) -> Ranking:
    """Re-rank every query's initial ranking (node rows: rows of the global matrix and the graph) by
    ``cfg.rerank`` in Ray tasks over blocks of queries: diffusion on the graph, GSS, or CAS."""
    import ray

    cfg = ctx.cfg
    problem = rerank_problem(ctx)
    if problem:
        raise (ConfigError if cfg.distractors else ArtifactError)(problem)
    fn, block, params = ((diffusion_task, 4 * cfg.rerank_params.block, dataclasses.asdict(cfg.rerank_params))
                         if cfg.rerank in DIFFUSION else
                         ({"gss": gss_task, "gradnet": gradnet_task}[cfg.rerank], cfg.query_block, {})
                         if cfg.rerank in LEARNED else
                         (cas_task, cfg.rerank_params.block, dataclasses.asdict(cfg.cas)))
    node_ids = np.asarray(global_ids(ctx.root))
    initial = ranked.top(initial_depth(cfg, ctx.n_database))
    rows, own = index_of(node_ids, initial.ids, -1), index_of(node_ids, ctx.exclude, -1)
    sims = initial.scores.astype(np.float64)
    task = ray.remote(num_cpus=1)(timed(fn))
    starts = ctx.block_starts(block)
    futures = [task.remote(ctx.root.uri, ctx.root.options, cfg.rerank, ctx.xq[s:s + block], rows[s:s + block],
                           sims[s:s + block], own[s:s + block], ctx.topk, params) for s in starts]
    got = gather(ctx, cfg.rerank, futures, [len(rows[s:s + block]) for s in starts])
    r, scores = (np.concatenate(x) for x in zip(*got)) if futures else (
        np.zeros((0, ctx.topk), np.int64), np.zeros((0, ctx.topk)))
    return Ranking(ctx.qids, np.where(r >= 0, node_ids[np.maximum(r, 0)], -1), scores)


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def results_table(queries: pd.DataFrame, ranked: Ranking) -> pa.Table:
    """One row per query (in query-id order); padding removed, empty when the query has no result. A query
    with a ``source`` column takes the ranking of that query (a repeat of it)."""
    queries = queries.sort_values("image_id")
    source = queries["source"] if "source" in queries else queries["image_id"]
    ids, scores = ranked.align(source.to_numpy(np.int64)).lists()
    return pa.table({"query_id": pa.array(queries["image_id"], pa.int64()),
                     "query_name": pa.array(queries["name"].astype(str), pa.string()),
                     "ids": pa.array(ids, pa.list_(pa.int64())), "scores": pa.array(scores, pa.list_(pa.float32()))},
                    schema=RESULTS_SCHEMA)


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
    run = {"config": to_dict(cfg), "method": cfg.method, "rerank": cfg.rerank, "params": params, "index": cfg.index,
           "queries": table.num_rows, "queries_root": ctx.qroot.uri, "center_crop": cfg.center_crop,
           "timings_s": timings, "task_seconds": ctx.task_seconds}
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
    initial = {"global": lambda: global_search(ctx, ctx.xq, depth), "os": lambda: global_search(ctx, ctx.xq, depth), "asmk": lambda: asmk_search(ctx, depth),
               "iasmk": lambda: asmk_search(ctx, depth, "iasmk"), "fused": lambda: fused_search(ctx, depth),
               "fused-iasmk": lambda: fused_search(ctx, depth)}[cfg.method]
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
    connect(cfg.ray)
    ctx = build_context(cfg, summary)
    every = pd.concat([ctx.queries[["image_id", "name", "source"]], ctx.repeats], ignore_index=True)
    table = results_table(every, search(ctx, summary))
    summary.add(queries=len(every), queries_described=len(ctx.qids),
                queries_without_results=int(sum(len(x) == 0 for x in table.column("ids").to_pylist())))
    summary.info["results"] = write_results(ctx, table, dict(summary.timings))
    return summary.finish(cfg.out, cfg.storage)


if __name__ == "__main__":
    run_cli(main)
