"""The re-ranking stage of ``jobs.search`` (a stage module, not a job): query expansion (AQE / αQE,
:mod:`operators.qe`) searching again, and, in Ray tasks over blocks of queries, the bodies of the
diffusion (:mod:`operators.rerank`), GSS, GRAD-Net and CAS re-ranking tasks."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import ray

from cluster.ray_env import task_cpus
from jobs.config import from_dict
from jobs.search_context import SearchContext
from jobs.search_rankings import gather, global_search, timed
from operators.cas import CasParams
from operators.global_index import iter_blocks
from operators.graph import index_of
from operators.knn import knn_blocks
from operators.qe import expand_ranked
from operators.ranking import Ranking
from operators.rerank import DIFFUSION, LEARNED, RerankParams, merge_with_initial, neighbour_cosines, rerank
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError, ConfigError
from storage.global_index import global_ids, open_global
from storage.graph import graph_problem, load_graph

if typing.TYPE_CHECKING:
    from jobs.search import SearchConfig

T = typing.TypeVar("T")


def initial_depth(cfg: SearchConfig, n_database: int) -> int:
    """How deep the initial ranking must go for the chosen re-ranking (GSS, GRAD-Net: the trained model's k_q or
    K neighbours of a query, read by the task; 100 covers them), never deeper than the database."""
    p = cfg.rerank_params
    need = {
        "none": 0,
        "aqe": p.qe_n,
        "alpha-qe": p.qe_n,
        "dfs": p.kq,
        "fsr": p.kq,
        "hybrid": p.kq,
        "truncated-dfs": p.shortlist,
        "gss": 100,
        "gradnet": 100,
        "cas": cfg.cas.shortlist,
    }[cfg.rerank]
    return min(max(cfg.topk, need), n_database)


def query_expansion(ctx: SearchContext, ranked: Ranking, block: int = 256) -> Ranking:
    """AQE / αQE: expand each query's global descriptor with its top results, then search again."""
    p = ctx.cfg.rerank_params
    alpha = 0.0 if ctx.cfg.rerank == "aqe" else p.qe_alpha
    top = ranked.top(min(p.qe_n, ctx.n_database)).ids
    expanded = np.empty_like(ctx.xq)
    for s in ctx.block_starts(block):  # blocks bound the (block, n, D) neighbour vectors
        t = top[s : s + block]
        expanded[s : s + block] = expand_ranked(ctx.xq[s : s + block], t, ctx.db_lookup(t[t >= 0]), alpha)
    return global_search(ctx, expanded, ctx.topk)


def diffusion_task(
    uri: str,
    options: dict,
    method: str,
    xq: np.ndarray,
    rows: np.ndarray,
    sims: np.ndarray,
    own: np.ndarray,
    topk: int,
    params: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion re-ranking of one block of queries on the index's graph (a Ray task)."""
    p = from_dict(RerankParams, params)
    graph = load_graph(ArtifactRoot(uri, options), spectral=method in ("fsr", "hybrid"), sparse_keep=p.sparse_keep)
    return rerank(method, graph, rows, sims, own, topk, p)


def model_params(cls: type[T], method: str, meta: dict) -> T:
    """The parameters the stored ``method`` model was trained with (its ``meta.json``), validated: a file
    from storage, refused with a one-line :class:`ConfigError` (unknown key, NaN, out of range)."""
    if not isinstance(meta.get("params"), dict):
        raise ConfigError(f"the stored {method} model's meta.json has no params")
    try:
        return from_dict(cls, meta["params"])
    except ConfigError as e:
        raise ConfigError(f"the stored {method} model's params: {e}") from None


def gss_task(
    uri: str,
    options: dict,
    method: str,
    xq: np.ndarray,
    rows: np.ndarray,
    sims: np.ndarray,
    own: np.ndarray,
    topk: int,
    params: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """GSS re-ranking of one block of queries (a Ray task): each query attaches to the first k_q items of
    its initial ranking (edge weights: global cosine), its embedding follows the database's stored states,
    and the whole database is ranked by ĥ_qᵀĥ_x (the reference ranks everything by the embedding)."""
    from operators.gss import GssParams, ResidualGCN, embed_queries
    from storage.learned import load_model

    root = ArtifactRoot(uri, options)
    m = load_model(root, "gss")
    p = model_params(GssParams, "gss", m.meta)
    x = open_global(root).vectors
    top = rows[:, : p.kq]
    hq = embed_queries(
        ResidualGCN(m.embeddings.shape[1], p, weights=m.weights),
        xq,
        top,
        neighbour_cosines(xq, top, x),
        m.degree,
        [x, *m.states],
    )
    scores, ids = knn_blocks(hq, iter_blocks(np.arange(len(m.embeddings)), m.embeddings), topk, exclude=own)
    return ids, np.where(ids >= 0, np.maximum(scores, 0), -np.inf)  # s = [ĥ_qᵀĥ_x]₊


def gradnet_task(
    uri: str,
    options: dict,
    method: str,
    xq: np.ndarray,
    rows: np.ndarray,
    sims: np.ndarray,
    own: np.ndarray,
    topk: int,
    params: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """GRAD-Net re-ranking of one block of queries (a Ray task): QFE (eq. 22) over the first K items of the
    initial ranking, weights their global cosine (a second round, when asked, in the learned space), then the
    whole database ranked by the cosine of the learned features."""
    from operators.gradnet import GradNetParams, qfe
    from storage.learned import load_model

    root = ArtifactRoot(uri, options)
    m = load_model(root, "gradnet")
    p, emb, x = model_params(GradNetParams, "gradnet", m.meta), m.embeddings, open_global(root).vectors
    top = rows[:, : p.k]
    hq = qfe(top, neighbour_cosines(xq, top, x), emb)
    for _ in range(p.qfe_rounds - 1):
        s2, top2 = knn_blocks(hq, iter_blocks(np.arange(len(emb)), emb), p.k, exclude=own)
        hq = qfe(top2, np.maximum(s2, 0), emb)
    scores, ids = knn_blocks(hq, iter_blocks(np.arange(len(emb)), emb), topk, exclude=own)
    return ids, np.where(ids >= 0, scores, -np.inf)


def cas_task(
    uri: str,
    options: dict,
    method: str,
    xq: np.ndarray,
    rows: np.ndarray,
    sims: np.ndarray,
    own: np.ndarray,
    topk: int,
    params: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """CAS re-ranking of one block of queries (a Ray task): each query's problem is itself and its top-T
    rows (global descriptors, memory-mapped); the rest of its initial ranking follows in its order."""
    import numba

    from operators.cas import rerank_shortlist

    p = from_dict(CasParams, params)
    numba.set_num_threads(min(numba.config.NUMBA_NUM_THREADS, task_cpus()))  # the JS kernel: the task's CPUs only
    x = open_global(ArtifactRoot(uri, options)).vectors
    out_r = np.full((len(rows), topk), -1, np.int64)
    out_s = np.full((len(rows), topk), -np.inf)
    for j in range(len(rows)):
        short = rows[j, : p.shortlist]
        short = short[(short >= 0) & (short != own[j])]
        cand, score = rerank_shortlist(xq[j], np.asarray(x[short], np.float32), short, p)
        r, s = merge_with_initial(cand, score, rows[j], own[j], topk)
        out_r[j, : len(r)], out_s[j, : len(s)] = r, s
    return out_r, out_s


def rerank_problem(cfg: SearchConfig, root: ArtifactRoot) -> str | None:
    """Why ``--rerank`` cannot run on the index ``root`` (None when it can): checked before Ray starts."""
    if cfg.rerank not in ("none", "aqe", "alpha-qe") and cfg.distractors:  # the graph and models span one root
        return (
            f"--rerank {cfg.rerank} needs one root over the whole database; build the index over the "
            "collection and its distractors together instead of --distractors"
        )
    if cfg.rerank in DIFFUSION:
        problem = graph_problem(root, spectral=cfg.rerank in ("fsr", "hybrid"))
        return f"--rerank {cfg.rerank}: {problem}" if problem else None
    if cfg.rerank in LEARNED:
        from storage.learned import learned_meta

        if learned_meta(root, cfg.rerank) is None:
            return (
                f"--rerank {cfg.rerank}: no trained model in {root.uri}: run "
                f"retrieval train_reranker --index {root.uri} --method {cfg.rerank}"
            )
    return None


def rerank_in_tasks(ctx: SearchContext, ranked: Ranking) -> Ranking:
    """Re-rank every query's initial ranking (node rows: rows of the global matrix and the graph) by
    ``cfg.rerank`` in Ray tasks over blocks of queries: diffusion on the graph, GSS, or CAS."""
    cfg = ctx.cfg
    problem = rerank_problem(cfg, ctx.root)
    if problem:
        raise (ConfigError if cfg.distractors else ArtifactError)(problem)
    fn, block, params = (
        (diffusion_task, 4 * cfg.rerank_params.block, dataclasses.asdict(cfg.rerank_params))
        if cfg.rerank in DIFFUSION
        else ({"gss": gss_task, "gradnet": gradnet_task}[cfg.rerank], cfg.query_block, {})
        if cfg.rerank in LEARNED
        else (cas_task, cfg.rerank_params.block, dataclasses.asdict(cfg.cas))
    )
    node_ids = np.asarray(global_ids(ctx.root))
    initial = ranked.top(initial_depth(cfg, ctx.n_database))
    rows, own = index_of(node_ids, initial.ids, -1), index_of(node_ids, ctx.exclude, -1)
    sims = initial.scores.astype(np.float64)
    task = ray.remote(num_cpus=1)(timed(fn))
    starts = ctx.block_starts(block)
    futures = [
        task.remote(
            ctx.root.uri,
            ctx.root.options,
            cfg.rerank,
            ctx.xq[s : s + block],
            rows[s : s + block],
            sims[s : s + block],
            own[s : s + block],
            ctx.topk,
            params,
        )
        for s in starts
    ]
    got = gather(ctx, cfg.rerank, futures, [len(rows[s : s + block]) for s in starts])
    r, scores = (
        (np.concatenate(x) for x in zip(*got))
        if futures
        else (np.zeros((0, ctx.topk), np.int64), np.zeros((0, ctx.topk)))
    )
    return Ranking(ctx.qids, np.where(r >= 0, node_ids[np.maximum(r, 0)], -1), scores)
