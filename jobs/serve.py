"""Serve job: a warm query service over an index, on Ray Serve — batches of query images answered over HTTP
without a job's start-up (Ray, the model and the index are loaded once).

``retrieval serve --index ROOT [--port 8000] [--method {global,asmk,fused}]`` (``python -m jobs.serve`` too)

The service listens on 127.0.0.1 only (``--set host=…`` to choose another address: the service has no
authentication). It answers ``POST /search`` with a JSON body ``{"queries": [file or URI, …], "topk": K}`` by
``{"results": [{"query": …, "files": […], "scores": […]}, …]}`` in query order, ``files`` the database images'
files as in the index's image table, best first. A malformed body (not JSON, a missing or mistyped field,
``topk`` < 1, an unknown key, too many queries) or a query image that cannot be read or described is answered
HTTP 400 with ``{"error": "one line"}``; a request is only ever read as data.

Queries are described exactly as ``retrieval search`` describes them (the describer and whitening recorded in
the index, ``center_crop`` the service's), and ranked by the same operators: a query that is an uncropped
database image reuses that image's features and is left out of its own ranking. Each replica (a Ray Serve
replica actor, ``replicas`` of them) loads the describer once, memory-maps the global descriptors and answers
one batch at a time; Ray Serve replaces a replica that dies. SIGINT / SIGTERM stop the service (exit 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from cluster.ray_env import RayConfig, connect
from jobs.config import Interrupted, from_dict, parse, report_stream, run_cli
from jobs.search import SearchConfig
from jobs.search_context import SearchContext
from jobs.search_queries import check_index
from operators.constraints import Count, Fraction, PosFinite
from operators.ranking import Ranking
from storage.errors import ConfigError
from storage.search_requests import RequestError, error_line

if typing.TYPE_CHECKING:
    from operators.describe import Describer

Port = Annotated[int, Field(ge=1, le=65535)]
ServeMethod = Literal["global", "asmk", "fused"]


@dataclass(kw_only=True)
class ServeConfig:
    index: str  # artifact root written by jobs.index (required)
    port: Port = 8000  # HTTP port of the service
    host: str = "127.0.0.1"  # address the HTTP proxy binds (loopback: reachable from this machine only)
    method: ServeMethod = "global"
    distractors: list[str] = field(default_factory=list)  # more index roots searched with ``index``
    center_crop: Fraction | None = None  # crop every query to this central fraction
    exclude_self: bool = True  # a query that is a database image is left out of its own ranking
    reuse_database_features: bool = True  # uncropped queries that are database images reuse its features
    replicas: Count = 1  # Ray Serve replicas, each holding the describer and the memory-mapped index
    replica_cpus: PosFinite = 1.0  # CPUs reserved per replica (the describer's torch threads)
    max_ongoing_requests: Count = 8  # requests a replica holds at once (it answers them one at a time)
    max_queries: Count = 64  # queries per request; more is a 400
    max_body_kb: Count = 1024  # request body size; more is a 400
    search: dict = field(default_factory=dict)  # ranking settings of jobs.search (asmk, fusion, fusion_beta,
    # fusion_shortlist, db_block, global_search, global_nprobe…); unset: retrieval search's own defaults
    checkpoint: str | None = None  # the describer's weights, when the index names a file outside its root
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


FLAGS = {
    "--index": ("index", "artifact root written by jobs.index"),
    "--port": ("port", "HTTP port (the service binds 127.0.0.1 unless --set host=… says otherwise)"),
    "--method": ("method", "ranking method"),
    "--center-crop": ("center_crop", "crop every query to this central fraction (e.g. 0.4)"),
    "--replicas": ("replicas", "Ray Serve replicas"),
    "--distractors": ("distractors", "comma-separated index roots searched together with --index (same codebook)"),
}


NOT_RANKING = ("index", "queries", "out", "topk", "role", "query_cache", "query_block", "allow_outside_root", "rerank")


def search_config(cfg: ServeConfig) -> SearchConfig:
    """The search settings of the service: what ``retrieval search`` ranks with, its own defaults where
    ``cfg.search`` says nothing. A key there that is no ranking setting (or one the service sets) is a ConfigError."""
    own = {f.name for f in dataclasses.fields(ServeConfig)}
    taken = sorted(k for k in cfg.search if k in own or k in NOT_RANKING or k.startswith(("rerank", "cas")))
    if taken:
        raise ConfigError(f"search.{taken[0]}: not a ranking setting the service takes from search.*")
    served = dict(
        index=cfg.index,
        queries="(request)",
        out="",
        method=cfg.method,
        distractors=list(cfg.distractors),
        center_crop=cfg.center_crop,
        exclude_self=cfg.exclude_self,
        reuse_database_features=cfg.reuse_database_features,
        checkpoint=cfg.checkpoint,
        ray=dataclasses.asdict(cfg.ray),
        storage=cfg.storage,
    )
    return from_dict(SearchConfig, {**cfg.search, **served})


# ------------------------------------------------------------------------------------------
# The engine a replica holds
# ------------------------------------------------------------------------------------------
class QueryEngine:
    """The index (global descriptors memory-mapped; ASMK* settings and codebook when the method needs them) and
    the describer the index was extracted with, loaded once; :meth:`search` answers a batch of query files."""

    def __init__(self, cfg: ServeConfig, torch_threads: int = 1):
        import torch  # the describer's: loaded in the replica, never with the command line

        from jobs.search_rankings import asmk_config
        from operators.codebook import Quantizer
        from operators.describe import Describer
        from operators.descriptor_config import DescriptorConfig
        from storage.codebook import load_codebook
        from storage.collection import file_index
        from storage.extraction import recorded_describer
        from storage.global_index import GlobalLookup, open_global
        from storage.whitening import read_whitening

        torch.set_num_threads(max(1, torch_threads))
        self.cfg, self.search_cfg = cfg, search_config(cfg)
        self.parts, self.database = check_index(self.search_cfg)
        root = self.parts[0]
        self.globals = [open_global(p) for p in self.parts]  # memory-mapped, held by the replica
        self.lookup = GlobalLookup(self.parts)
        self.n_database = max(1, sum(len(g.ids) for g in self.globals))
        self.anns = self._approximate_indexes()
        self.files = self._files()
        self.by_file = file_index(self.database)  # a query's own database image, found without rescanning 1M files
        self.white = read_whitening(root, "global")
        self.describer: Describer = Describer(
            from_dict(DescriptorConfig, recorded_describer(root, cfg.checkpoint)),
            local_whitening=read_whitening(root, "local"),
        )
        self.reusable = cfg.reuse_database_features and root.stage_settings("extract").get("local_store") != "entries"
        self.asmk = self.quantizer = None
        if cfg.method != "global":
            self.asmk = asmk_config(self.search_cfg, root)
            self.quantizer = Quantizer(load_codebook(root), self.asmk.assign)
        self.io = ThreadPoolExecutor(4)

    def _approximate_indexes(self) -> list:
        """Per partition, the approximate global index that ranks it (held), or None (exact), as
        :func:`jobs.search_rankings.global_plan` decides for ``retrieval search``."""
        from jobs.search_rankings import global_plan
        from storage.global_index import read_ann

        empty = np.zeros(0, np.int64)
        ctx = SearchContext(
            self.search_cfg, self.parts, self.database, pd.DataFrame(), pd.DataFrame(), self.parts[0], empty,
            np.zeros((0, self.lookup.dim), np.float32), empty, self.lookup, self.lookup,
        )  # fmt: skip
        return [read_ann(p) if used else None for p, used in zip(self.parts, global_plan(ctx, "global"))]

    def _files(self) -> pd.Series:
        """The file of every database image id, over every partition."""
        tables = [self.database] + [p.images() for p in self.parts[1:]]
        every = pd.concat([t[["image_id", "file"]] for t in tables if t is not None], ignore_index=True)
        return every.drop_duplicates("image_id").set_index("image_id")["file"].astype(str)

    def search(self, queries: list[str], topk: int) -> list[dict]:
        """Per query (in order): its file, the top ``topk`` database files and their scores."""
        table = self.query_table(queries)
        ctx, local = self.describe(table)
        ranked = self.rank(ctx, local, min(topk, self.n_database))
        ids, scores = ranked.align(table["source"].to_numpy(np.int64)).lists()
        return [{"query": q, "files": self.files.loc[i].tolist(), "scores": s} for q, i, s in zip(queries, ids, scores)]

    def query_table(self, queries: list[str]) -> pd.DataFrame:
        """The batch as ``jobs.search`` tables its queries: ids 0…n−1, no box; ``own`` (the database image it is,
        −1: none), ``reuse`` (its database features are reused) and ``source`` (the first query of the same file)."""
        from storage.collection import first_of_same, self_ids

        nan = np.full(len(queries), np.nan)
        table = pd.DataFrame(
            {"image_id": np.arange(len(queries)), "name": queries, "file": queries, "x0": nan, "y0": nan}
        ).assign(x1=nan, y1=nan)
        table["own"] = self_ids(table, self.by_file)
        uncropped = self.cfg.center_crop is None
        table["reuse"] = np.isin(table["own"], self.globals[0].ids) & uncropped & self.reusable
        table["source"] = first_of_same(table)
        return table

    def describe(self, table: pd.DataFrame) -> tuple[SearchContext, tuple[np.ndarray, np.ndarray] | None]:
        """The search context of the batch's distinct queries (their global vectors, as ``jobs.search`` has them)
        and, for ASMK*, their local descriptors (float16 as stored, then float32) and query ids."""
        distinct = table[table["source"] == table["image_id"]].reset_index(drop=True)
        rows = self.describe_images(distinct[~distinct["reuse"]])
        qids = distinct["image_id"].to_numpy(np.int64)
        xq = np.zeros((len(qids), self.lookup.dim), np.float32)
        if rows:
            x = np.stack([np.asarray(r["global"], np.float32) for r in rows.values()])
            xq[np.isin(qids, list(rows))] = self.white(x) if self.white is not None else x
        reuse = distinct["reuse"].to_numpy(bool)
        if reuse.any():
            xq[reuse] = self.lookup(distinct["own"].to_numpy(np.int64)[reuse])
        own = distinct["own"].to_numpy(np.int64)
        exclude = own if self.cfg.exclude_self else np.full(len(qids), -1, np.int64)
        ctx = SearchContext(
            self.search_cfg, self.parts, self.database, distinct, distinct.iloc[:0], self.parts[0], qids, xq, exclude,
            self.lookup, self.lookup,
        )  # fmt: skip
        return ctx, (self.local_descriptors(ctx, rows) if self.asmk is not None else None)

    def local_descriptors(self, ctx: SearchContext, rows: dict[int, dict]) -> tuple[np.ndarray, np.ndarray]:
        """Local descriptors (float32 of the stored float16) and their query ids: described ones from ``rows``,
        reused ones from their database images' shards (:func:`jobs.search_context.query_locals`)."""
        import dataclasses

        from jobs.search_context import query_locals

        desc = [np.asarray(r["local_desc"], np.float16).astype(np.float32) for r in rows.values()]
        ids = [np.full(len(d), q, np.int64) for q, d in zip(rows, desc)]
        if ctx.queries["reuse"].any():
            d, i = query_locals(dataclasses.replace(ctx, queries=ctx.queries[ctx.queries["reuse"]]))
            desc.append(d), ids.append(i)
        if not desc:
            return np.zeros((0, self.describer.local_dim), np.float32), np.zeros(0, np.int64)
        return np.concatenate(desc), np.concatenate(ids)

    def describe_images(self, todo: pd.DataFrame) -> dict[int, dict]:
        """Descriptor rows of ``todo``'s images by query id, read in threads and described in one call; an image
        that cannot be read or described is a :class:`RequestError` naming it."""
        from storage.extraction import load_image

        def load(file: str):
            try:
                return load_image(file, (np.nan,) * 4, self.cfg.center_crop, self.cfg.storage)[0]
            except Exception as e:  # noqa: BLE001 - any unreadable query is the request's fault
                return e

        qids, files = todo["image_id"].tolist(), todo["file"].tolist()
        images = list(self.io.map(load, files))
        for q, f, img in zip(qids, files, images):
            if isinstance(img, Exception):
                raise RequestError(f"query {q} ({f}) cannot be read: {type(img).__name__}: {error_line(img)}")
        if not images:
            return {}
        try:
            return dict(zip(qids, self.describer(images)))
        except Exception:  # noqa: BLE001 - find the image at fault, one by one
            for q, f, img in zip(qids, files, images):
                try:
                    self.describer([img])
                except Exception as e:  # noqa: BLE001
                    raise RequestError(f"query {q} ({f}) cannot be described: {error_line(e)}") from None
            raise

    def rank(self, ctx: SearchContext, local: tuple[np.ndarray, np.ndarray] | None, k: int) -> Ranking:
        """The top ``k`` of the service's method for ``ctx``'s queries, as ``jobs.search`` ranks them."""
        from jobs.search_rankings import fuse_rankings

        if self.cfg.method == "global":
            return self.rank_global(ctx, k)
        if self.cfg.method == "asmk":
            return self.rank_asmk(ctx, local, k)
        cfg = self.search_cfg
        shortlist = min(max(cfg.fusion_shortlist, k), self.n_database)
        a, g = self.rank_asmk(ctx, local, shortlist), self.rank_global(ctx, shortlist)
        return fuse_rankings(ctx, a, g, k, cfg.fusion, cfg.fusion_beta)

    def rank_global(self, ctx: SearchContext, k: int) -> Ranking:
        """Top ``k`` by global similarity over the held matrices, as :func:`jobs.search_rankings.global_search_task`
        ranks them: exact (streamed in blocks) or through a partition's held approximate index, merged."""
        from operators.ann import merge_top
        from operators.global_index import iter_blocks
        from operators.knn import knn_blocks

        parts = []
        for g, ann in zip(self.globals, self.anns):
            if ann is not None:
                scores, rows = ann.search(ctx.xq, g.vectors, k + 1, self.search_cfg.global_nprobe)
                parts.append((scores, np.where(rows >= 0, np.asarray(g.ids)[np.maximum(rows, 0)], -1)))
            else:
                parts.append(knn_blocks(ctx.xq, iter_blocks(g.ids, g.vectors, self.search_cfg.db_block), k + 1))
        scores, ids = merge_top(parts, k, ctx.exclude)
        return Ranking(ctx.qids, ids, scores)

    def rank_asmk(self, ctx: SearchContext, local: tuple[np.ndarray, np.ndarray] | None, k: int) -> Ranking:
        """Top ``k`` by ASMK* over every partition's inverted file (:func:`jobs.asmk.search_task`, in-process)."""
        import dataclasses

        from jobs.asmk import search_task
        from operators.asmk import aggregate

        assert local is not None and self.asmk is not None and self.quantizer is not None
        desc, qimg = local
        params = self.asmk.params
        words = self.quantizer(desc, params.query_ma)
        agg = aggregate(desc, qimg, words, self.quantizer.centroids, params.binary)
        exclude = dict(zip(ctx.qids.tolist(), ctx.exclude.tolist()))
        uq = np.unique(agg.image_ids).tolist()
        if not uq:
            return Ranking.empty(ctx.qids, k)
        found = search_task(
            ctx.roots, agg.words, agg.codes, agg.image_ids, dataclasses.asdict(params), k,
            {q: exclude.get(q, -1) for q in uq}, self.asmk.buffer_mb,
        )  # fmt: skip
        qids, scores, ids = found
        return Ranking(qids, ids, scores).align(ctx.qids).top(k)


# ------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------
def wait_until_stopped() -> None:
    """Sleep until SIGINT or SIGTERM (``jobs.config.run_cli`` turns both into :class:`Interrupted`); stopping on
    it is this job's answer, not a failure (exit 0)."""
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, Interrupted) as e:
        if isinstance(e, Interrupted):
            e.acknowledge()
        print(f"[serve] stopping ({type(e).__name__})", file=sys.stderr, flush=True)


def check_port(host: str, port: int) -> None:
    """A :class:`ConfigError` when this machine cannot listen on ``host:port`` (in use, not an address of it): said
    in a second, before Ray starts, instead of Ray Serve's proxy retrying for a minute."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from None


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    cfg = parse(ServeConfig, argv, FLAGS, __doc__, prog)
    check_index(search_config(cfg))  # what the index lacks is said before Ray starts
    import ray  # loaded with cluster.ray_env already

    embedded = not ray.is_initialized() and not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if embedded:  # the proxy runs on this machine
        check_port(cfg.host, cfg.port)
    connect(cfg.ray)
    from cluster import serving  # Ray Serve (starlette, uvicorn): loaded to serve, not for --help

    url = serving.start(cfg)
    ready = {"job": "serve", "url": url, "index": cfg.index, "method": cfg.method, "replicas": cfg.replicas}
    print(json.dumps(ready), file=report_stream(), flush=True)
    try:
        wait_until_stopped()
    finally:
        if not embedded:  # a joined cluster keeps running: take the application off it
            serving.stop()
    return ready  # an embedded Ray ends with the job, Ray Serve's actors with it


if __name__ == "__main__":
    run_cli(main)
