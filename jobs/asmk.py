"""ASMK stage: partial inverted files built by Ray tasks over feature shards, merged word by word.

Each task reads one committed feature shard, assigns its descriptors to their nearest word
(database single assignment), aggregates per (image, word) and commits a partial inverted file
(a rerun skips committed partials made with the same codebook and parameters); the driver merges
them into the word-partitioned layout of :mod:`storage.inverted_file`, which searching memory-maps.
Several roots built with the same codebook (e.g. a collection and R1M distractors) are searched
together, top-k merged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from cluster.ray_env import task_cpus
from cluster.runner import run_tasks
from jobs.config import from_dict
from jobs.summary import JobSummary
from operators.asmk import AsmkParams, build_index, idf_weights, search
from operators.codebook import AssignConfig, Quantizer
from operators.constraints import Count
from storage.artifacts import ArtifactRoot
from storage.codebook import codebook_hash, load_codebook
from storage.entries import CODEBOOK_KEY
from storage.errors import SettingsMismatch
from storage.iasmk import open_compressed
from storage.inverted_file import (
    has_inverted_file,
    inverted_file_meta,
    merge_partials,
    open_inverted_file,
    partials,
    write_meta,
    write_partial,
)
from storage.schemas import local_arrays


@dataclass
class AsmkConfig:
    params: AsmkParams = field(default_factory=AsmkParams)
    buffer_mb: Count = 1024  # search: score buffer per task (queries × images × 8 B): 128 queries a pass at 1M
    query_block: Count = 256  # search: query images per Ray task
    assign: AssignConfig = field(default_factory=AssignConfig)  # words of database (and query) descriptors:
    # exact flat search, or HNSW (≥ 5× faster at k = 65,536, benchmarks/assignment.py)


def partial_task(root_uri: str, options: dict, shard: int, binary: bool, db_ma: int, assign: dict) -> dict:
    """Quantise, aggregate and commit one shard's partial inverted file (runs in a Ray task)."""
    import pyarrow.compute as pc

    cfg = from_dict(AssignConfig, assign)  # refused before any reading
    root = ArtifactRoot(root_uri, options)
    centroids = load_codebook(root)
    table = root.shards().read_shard(shard, ["image_id", "status", "local_desc"])
    table = table.filter(pc.equal(table.column("status"), "ok"))
    desc, ids, _ = local_arrays(table)
    desc = desc.astype(np.float32)
    ivf = build_index(desc, ids, Quantizer(centroids, cfg)(desc, db_ma), centroids, binary)
    return write_partial(
        root,
        shard,
        ivf,
        {
            "entries": len(ivf.entry_image),
            "descriptors": len(desc),
            "codebook_sha1": codebook_hash(centroids),
            "binary": binary,
            "db_ma": db_ma,
            "assign": assign,
        },
    )


def entry_shards(cfg: AsmkConfig, records: dict[int, dict], sha1: str) -> set[int]:
    """The shards holding ASMK* entries (extracted with ``local_store`` entries/both, or synthetic distractors):
    the merge reads them directly. They must be of this root's codebook, binary, single-assigned."""
    shards = {s for s, rec in records.items() if rec.get(CODEBOOK_KEY)}
    if not shards:
        return shards
    other = sorted(s for s in shards if records[s][CODEBOOK_KEY] != sha1)
    if other:
        raise SettingsMismatch(
            f"{len(other)} feature shard(s) (e.g. part {other[0]}) hold ASMK* entries of another "
            "codebook than this root's (codebook.source must be the root they were made with)"
        )
    if not cfg.params.binary or cfg.params.db_ma != 1:
        raise SettingsMismatch(
            "shards of ASMK* entries are binary and single-assigned: asmk.params.binary=true and "
            "asmk.params.db_ma=1 are the only settings they can be indexed with"
        )
    return shards


def build_asmk(cfg: AsmkConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    centroids = load_codebook(root)
    records = root.shards().committed()
    shards = sorted(records)
    from_entries = entry_shards(cfg, records, codebook_hash(centroids))
    want = {
        "codebook_sha1": codebook_hash(centroids),
        "binary": cfg.params.binary,
        "db_ma": cfg.params.db_ma,
        "assign": dataclasses.asdict(cfg.assign),
    }
    done = partials(root).committed()
    pending = [
        s for s in shards if s not in from_entries and any(done.get(s, {}).get(key) != v for key, v in want.items())
    ]
    run_tasks(
        partial_task,
        [(root.uri, root.options, s, cfg.params.binary, cfg.params.db_ma, want["assign"]) for s in pending],
        options={"num_cpus": 1},
        desc="partial inverted files",
        unit="shard",
    )
    summary.add(
        asmk_partials_built=len(pending),
        asmk_shards_of_entries=len(from_entries),
        asmk_partials_skipped=len(shards) - len(pending) - len(from_entries),
    )
    inputs = merge_inputs(records, partials(root).committed(), want, cfg)
    if has_inverted_file(root) and (root.stages().get("asmk") or {}).get("inputs") == inputs:
        summary.add(asmk_merge_skipped=1)  # the inverted file was merged from these very shards and partials
        return {**inverted_file_meta(root), "inputs": inputs}
    info = merge_partials(root, shards, len(centroids), from_entries)
    meta = {
        **info,
        "k": len(centroids),
        "params": dataclasses.asdict(cfg.params),
        "codebook_sha1": codebook_hash(centroids),
    }
    write_meta(root, meta)
    summary.add(asmk_entries=info["entries"])
    summary.info["asmk_bytes_per_entry"] = info["bytes_per_entry"]
    return {**meta, "inputs": inputs}


def merge_inputs(shards: dict[int, dict], parts: dict[int, dict], want: dict, cfg: AsmkConfig) -> str:
    """A digest of what the merge reads: every shard's and partial's commit, the codebook and the settings
    (the ``asmk`` stage record keeps it, so a rerun over unchanged inputs does not merge again)."""
    import hashlib
    import json

    seen = [[s, shards[s].get("committed_at"), parts.get(s, {}).get("committed_at")] for s in sorted(shards)]
    blob = json.dumps([seen, want, dataclasses.asdict(cfg.params)], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def search_task(
    roots: list[tuple[str, dict]],
    words: np.ndarray,
    codes: np.ndarray,
    qimg: np.ndarray,
    params: dict,
    k: int,
    exclude: dict,
    buffer_mb: int,
    layout: str = "asmk",
):
    """Search aggregated queries in every partition (same codebook) and merge their top-k.

    ``layout``: ``asmk`` (the inverted file) or ``iasmk`` (the i-ASMK* compressed one, jobs.discover).
    """
    from operators.asmk import Aggregated

    p = from_dict(AsmkParams, params)
    opener = open_compressed if layout == "iasmk" else open_inverted_file
    ivfs = [opener(ArtifactRoot(u, o))[0] for u, o in roots]
    weight = None
    if p.use_idf:  # IDF over all partitions together
        weight = idf_weights(sum(ivf.word_images for ivf in ivfs), sum(len(ivf.images) for ivf in ivfs))
    query = Aggregated(qimg, words, codes)
    threads = task_cpus()  # the kernel's threads: the CPUs Ray gave this task
    results = [
        search(ivf, query, p, k, exclude, weight, buffer_bytes=buffer_mb * 2**20, threads=threads) for ivf in ivfs
    ]
    qids = results[0][0]
    scores = np.concatenate([r[1] for r in results], axis=1)
    ids = np.concatenate([r[2] for r in results], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return qids, np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
