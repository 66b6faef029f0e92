"""The queries of ``jobs.search`` (a stage module, not a job): described exactly as the database was into
their cache entry (:mod:`storage.query_cache`), or reusing a database image's features, then read once
into the search's :class:`jobs.search_context.SearchContext`."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pandas as pd

from jobs.config import from_dict, to_dict
from jobs.extract import ExtractConfig, recorded_settings, run_extraction
from jobs.search_context import SearchContext, query_globals, vector_set
from jobs.search_rerank import rerank_problem
from jobs.summary import JobSummary
from operators.descriptor_config import DescriptorConfig
from storage.artifacts import ArtifactRoot
from storage.collection import first_of_same, load_collection, self_ids
from storage.errors import ArtifactError, CollectionError, ConfigError
from storage.extraction import check_settings, extraction_settings, failed_images, prepare_images, recorded_describer
from storage.global_index import GlobalLookup, check_consistent, global_ids
from storage.iasmk import iasmk_meta
from storage.inverted_file import inverted_file_meta
from storage.query_cache import query_cache_key, query_cache_root, results_query_root
from storage.whitening import read_whitening

if typing.TYPE_CHECKING:
    from jobs.search import SearchConfig


def check_index(cfg: SearchConfig) -> tuple[list[ArtifactRoot], pd.DataFrame]:
    """What the search needs of its roots, checked before Ray starts (one line, exit 2, in seconds): the
    schema, the image table, consistent global descriptors, and what the method and re-ranking read."""
    parts = [ArtifactRoot(u, cfg.storage) for u in [cfg.index, *cfg.distractors]]
    root = parts[0]
    root.meta()  # a root of another schema version is refused first
    database = root.images()
    if database is None:
        raise ArtifactError(f"{root.uri} is not an index (no images.parquet): run retrieval index first")
    for part in parts:
        images = database if part is root else part.images()
        check_consistent(part, None if images is None else images["image_id"].to_numpy())
        if "iasmk" in cfg.method:
            iasmk_meta(part)
    if cfg.method in ("asmk", "fused"):
        inverted_file_meta(root)
    if cfg.method == "os":
        global_ids(root, vector_set(cfg.method))
    problem = rerank_problem(cfg, root)
    if problem:
        raise (ConfigError if cfg.distractors else ArtifactError)(problem)
    return parts, database


def build_context(cfg: SearchConfig, summary: JobSummary) -> SearchContext:
    parts, database = check_index(cfg)
    root = parts[0]
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


def query_extract_config(cfg: SearchConfig, root: ArtifactRoot, out: str) -> ExtractConfig:
    """The index's extraction settings applied to the queries (their crop policy and role)."""
    built = from_dict(ExtractConfig, root.stage_settings("extract"))
    return ExtractConfig(
        collection=cfg.queries,
        out=out,
        role=cfg.role,
        shard_size=built.shard_size,
        batch_size=built.batch_size,
        center_crop=cfg.center_crop,
        local_whiten_dim=built.local_whiten_dim,
        describe=from_dict(DescriptorConfig, recorded_describer(root, cfg.checkpoint)),
        ray=cfg.ray,
        storage=cfg.storage,
    )


def describe_queries(
    cfg: SearchConfig, root: ArtifactRoot, database: pd.DataFrame, summary: JobSummary
) -> tuple[pd.DataFrame, ArtifactRoot]:
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
        key = query_cache_key(
            root,
            {**extraction_settings(to_dict(qcfg)), "role": cfg.role, "reuse": reusable},
            fresh,
            whitening.state() if whitening else None,
            len(db_ids),
        )
        qroot = query_cache_root(root, key, None if cfg.query_cache == "index" else cfg.query_cache)
    qcfg = dataclasses.replace(qcfg, out=qroot.uri)
    check_settings(qroot.shards(), to_dict(qcfg), qroot.stage_settings("extract", required=False))
    queries = prepare_images(
        qroot,
        qcfg.collection,
        qcfg.role,
        0,
        cfg.storage,
        qcfg.shard_size,
        fresh=fresh.drop(columns=["own", "reuse", "source"]),
    )
    queries = queries.merge(fresh[["image_id", "own", "reuse", "source"]], on="image_id", how="left")
    distinct = queries["source"] == queries["image_id"]
    summary.add(
        queries_reusing_database_features=int((queries["reuse"] & distinct).sum()),
        queries_repeated=int((~distinct).sum()),
    )
    summary.info["query_cache"] = qroot.uri
    with summary.stage("extract queries"):
        run_extraction(qcfg, queries[~queries["reuse"] & distinct], qroot.shards(), whitening, summary)
    qroot.record_stage("extract", "search", recorded_settings(qcfg), images=len(queries))
    return queries, qroot
