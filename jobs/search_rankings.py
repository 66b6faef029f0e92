"""The initial rankings of ``jobs.search`` (a stage module, not a job), in Ray tasks over blocks of queries:
global (memory-mapped descriptors streamed in blocks with a top-k heap), ASMK / i-ASMK* over every
partition's inverted file, and both fused over the union of their shortlists (:mod:`operators.fusion`)."""

from __future__ import annotations

import dataclasses
import functools
import time
import typing

import numpy as np
import ray

from cluster.ray_env import largest_node_cpus, task_cpus
from jobs.asmk import AsmkConfig
from jobs.asmk import search_task as asmk_search_task
from jobs.config import from_dict
from jobs.search_context import SearchContext, query_locals, vector_set
from operators.ann import fingerprint as ann_fingerprint
from operators.ann import merge_top
from operators.asmk import aggregate
from operators.codebook import Quantizer
from operators.fusion import fuse, null_level, union_candidates
from operators.global_index import iter_blocks
from operators.knn import knn_blocks
from operators.ranking import Ranking
from storage.artifacts import ArtifactRoot
from storage.codebook import codebook_hash, load_codebook
from storage.errors import ConfigError, SettingsMismatch
from storage.global_index import ann_params, open_global, read_ann
from storage.iasmk import iasmk_meta

if typing.TYPE_CHECKING:
    from jobs.search import SearchConfig


def timed(fn):
    """``fn`` returning (its result, the seconds it ran): each search task's service time, for run.json."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        return fn(*args, **kwargs), time.perf_counter() - t0

    return run


def gather(ctx: SearchContext, step: str, futures: list, sizes: list[int]) -> list:
    """The results of timed tasks of ``step`` (``sizes`` queries each); their times go to ``ctx.task_seconds``."""
    got = ray.get(futures)
    ctx.task_seconds.setdefault(step, []).extend([n, round(t, 6)] for n, (_, t) in zip(sizes, got))
    return [r for r, _ in got]


def search_cpus(tasks: int) -> int:
    """CPUs for each of ``tasks`` search tasks: its share of the cluster's, at most one node's (a task threads its
    kernel over them), at least 1."""
    return max(1, min(largest_node_cpus(), int(ray.cluster_resources().get("CPU", 1)) // max(tasks, 1)))


def global_search_task(
    roots: list[tuple[str, dict]],
    xq: np.ndarray,
    exclude: np.ndarray,
    k: int,
    db_block: int,
    name: str = "global",
    ann: list[bool] | None = None,
    nprobe: int = 0,
):
    """Rank the memory-mapped descriptors ``name`` of every partition for one block of queries (a Ray task):
    by brute force, or where ``ann[p]`` through partition p's approximate index, whose shortlist is re-scored
    exactly (:meth:`operators.ann.GlobalAnn.search`); the partitions' top-k merged, ``exclude`` left out.
    faiss runs on the CPUs Ray gave the task."""
    import faiss

    faiss.omp_set_num_threads(task_cpus())
    parts = []
    for p, (uri, options) in enumerate(roots):
        root = ArtifactRoot(uri, options)
        g = open_global(root, name)
        if ann and ann[p]:
            scores, rows = read_ann(root, name).search(xq, g.vectors, k + 1, nprobe)
            parts.append((scores, np.where(rows >= 0, np.asarray(g.ids)[np.maximum(rows, 0)], -1)))
        else:
            parts.append(knn_blocks(xq, iter_blocks(g.ids, g.vectors, db_block), k + 1))
    return merge_top(parts, k, exclude)


def global_plan(ctx: SearchContext, name: str) -> list[bool]:
    """Per partition, whether its approximate index ranks it (``global_search=auto`` and a fresh index: one built
    over the matrix as it is now); decided once per search, recorded in ``ctx.global_used`` (run.json)."""
    if name in ctx.global_used:
        return [p["used"] != "exact" for p in ctx.global_used[name]["partitions"]]
    used = []
    for part in ctx.parts:
        params = ann_params(part, name) if ctx.cfg.global_search == "auto" else None
        entry = {"root": part.uri, "used": "exact"}
        if params is not None:
            g = open_global(part, name)
            if params.get("fingerprint") == ann_fingerprint(g.ids, g.vectors):
                p = params["plan"]
                entry.update(used=p["kind"], nlist=p["nlist"], dim=p["dim"])
                entry["nprobe"] = ctx.cfg.global_nprobe or p["nprobe"]
            else:
                entry["note"] = "approximate index stale (built over another matrix): rebuild the global stage"
        used.append(entry)
    ctx.global_used[name] = {"mode": ctx.cfg.global_search, "partitions": used}
    return [e["used"] != "exact" for e in used]


def global_search(ctx: SearchContext, xq: np.ndarray, k: int) -> Ranking:
    """Top-``k`` by global-descriptor similarity of query vectors ``xq`` (one per ``ctx.qids``)."""
    b, name = ctx.cfg.query_block, vector_set(ctx.cfg.method)
    task = ray.remote(num_cpus=search_cpus(len(ctx.block_starts(b))))(timed(global_search_task))
    ann = global_plan(ctx, name)
    futures = [
        task.remote(
            ctx.roots, xq[s : s + b], ctx.exclude[s : s + b], k, ctx.cfg.db_block, name, ann, ctx.cfg.global_nprobe
        )
        for s in ctx.block_starts(b)
    ]
    got = gather(ctx, "global", futures, [len(xq[s : s + b]) for s in ctx.block_starts(b)])
    return Ranking.concat(
        [Ranking(ctx.qids[s : s + b], ids, scores) for s, (scores, ids) in zip(ctx.block_starts(b), got)]
    )


def asmk_config(cfg: SearchConfig, root: ArtifactRoot) -> AsmkConfig:
    """The search's ASMK settings: ``cfg.asmk`` when given, else the index's own (assignment included)."""
    # the index's stored record, validated (an index built before ``assign`` existed: its default)
    built = from_dict(AsmkConfig, root.stage_settings("asmk"))
    chosen = cfg.asmk or built
    if chosen.params.binary != built.params.binary:
        raise ConfigError("asmk.params.binary must match the index (it decides what the inverted file stores)")
    return chosen


def asmk_search(ctx: SearchContext, k: int, layout: str = "asmk") -> Ranking:
    """Top-``k`` by ASMK over every partition's inverted file (one codebook); ``layout="iasmk"``:
    over their i-ASMK* compressed inverted files (``jobs.discover``)."""
    if layout == "iasmk":
        for part in ctx.parts:
            iasmk_meta(part)  # an ArtifactError before any task when discovery has not run
    centroids = load_codebook(ctx.root)
    for other in ctx.parts[1:]:
        if codebook_hash(load_codebook(other)) != codebook_hash(centroids):
            raise SettingsMismatch(
                f"{other.uri} was built with another codebook; it cannot be searched with {ctx.root.uri}"
            )
    chosen = asmk_config(ctx.cfg, ctx.root)
    params, buffer_mb = chosen.params, chosen.buffer_mb
    desc, qimg = query_locals(ctx)
    agg = aggregate(desc, qimg, Quantizer(centroids, chosen.assign)(desc, params.query_ma), centroids, params.binary)
    exclude = dict(zip(ctx.qids.tolist(), ctx.exclude.tolist()))
    uq = np.unique(agg.image_ids)
    block = (ctx.cfg.asmk or AsmkConfig()).query_block
    task = ray.remote(num_cpus=search_cpus(-(-len(uq) // block)))(timed(asmk_search_task))
    futures = []
    for s in range(0, len(uq), block):
        m = np.isin(agg.image_ids, uq[s : s + block])
        futures.append(
            task.remote(
                ctx.roots,
                agg.words[m],
                agg.codes[m],
                agg.image_ids[m],
                dataclasses.asdict(params),
                k,
                {q: exclude.get(q, -1) for q in uq[s : s + block].tolist()},
                buffer_mb,
                layout,
            )
        )
    sizes = [len(uq[s : s + block]) for s in range(0, len(uq), block)]
    parts = [Ranking(qids, ids, scores) for qids, scores, ids in gather(ctx, layout, futures, sizes)]
    return Ranking.concat(parts).align(ctx.qids).top(k)


def fused_search(ctx: SearchContext, k: int) -> Ranking:
    """ASMK fused with global similarity (:func:`operators.fusion.fuse`) over the union of both shortlists.

    Candidates found by ASMK alone get their global similarity from the memory-mapped matrices.
    """
    shortlist = min(max(ctx.cfg.fusion_shortlist, k), ctx.n_database)
    layout = "iasmk" if ctx.cfg.method == "fused-iasmk" else "asmk"
    a, g = asmk_search(ctx, shortlist, layout), global_search(ctx, ctx.xq, shortlist)
    return fuse_rankings(ctx, a, g, k, ctx.cfg.fusion, ctx.cfg.fusion_beta)


def fuse_rankings(ctx: SearchContext, a: Ranking, g: Ranking, k: int, mode: str, beta: float) -> Ranking:
    """The fused top-``k`` of an ASMK and a global ranking of the same queries (shortlists of equal length); ``z``
    mode standardises each channel by its own null level (:func:`operators.fusion.null_level`)."""
    null = (null_level(a.scores, ctx.n_database, absent=0.0), null_level(g.scores, ctx.n_database))
    ids, scores = fuse(*fusion_candidates(ctx, a, g), beta, k, mode, null)
    return Ranking(ctx.qids, ids, scores)


def fusion_candidates(ctx: SearchContext, a: Ranking, g: Ranking, block: int = 65536) -> tuple[np.ndarray, ...]:
    """:func:`operators.fusion.union_candidates` of the ASMK and global rankings, with the global similarity of the
    candidates only ASMK found looked up (in blocks, bounding the memory of the looked-up rows)."""
    cand, asmk_s, glob = union_candidates(a, g)
    rows, cols = np.nonzero((cand >= 0) & np.isnan(glob))
    for s in range(0, len(rows), block):
        r, c = rows[s : s + block], cols[s : s + block]
        glob[r, c] = np.einsum("nd,nd->n", ctx.lookup(cand[r, c]), ctx.xq[r])
    return cand, asmk_s, glob
