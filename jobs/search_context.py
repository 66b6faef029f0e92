"""The context of ``jobs.search`` (a stage module, not a job): the :class:`SearchContext` one search reads
once and passes down, and the queries' global and local descriptors read through pyarrow (from the
described queries' cache entry, or from the database's own shards for the queries that reuse them)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from storage.artifacts import ArtifactRoot
from storage.global_index import GlobalLookup
from storage.objects import OBJECTS
from storage.schemas import global_matrix, local_arrays
from storage.whitening import read_whitening

if typing.TYPE_CHECKING:
    from jobs.search import SearchConfig


@dataclass
class SearchContext:
    """What one search reads once and passes down: partitions, queries, their global vectors.

    Every :class:`Ranking` of the search has one row per described query, in ``qids`` order.
    """

    cfg: SearchConfig
    parts: list[ArtifactRoot]  # the index, then the distractor roots
    database: pd.DataFrame  # the index's image table (ids, files, shards)
    queries: pd.DataFrame  # every distinct query: image_id, name, file, box, own (database id or −1), reuse
    repeats: pd.DataFrame  # queries repeating one above (same file and box): image_id, name, source (its id)
    qroot: ArtifactRoot  # the described queries (cache entry)
    qids: np.ndarray  # (m,) described queries, sorted
    xq: np.ndarray  # (m, D) their global descriptors, in the database's (whitened) space
    exclude: np.ndarray  # (m,) database id left out of each query's ranking (−1: none)
    lookup: GlobalLookup  # global descriptors by database id, over every partition
    db_lookup: GlobalLookup  # the database vectors the method ranks (``os``: the saliency-based ones)
    task_seconds: dict = field(default_factory=dict)  # step -> [[queries, seconds]] of each Ray task (run.json)
    global_used: dict = field(default_factory=dict)  # vector set -> how each partition was ranked (run.json)

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


def vector_set(method: str) -> str:
    """The database vectors a global ranking of ``method`` reads (:mod:`storage.global_index` names)."""
    return OBJECTS if method == "os" else "global"


def _ok(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table.column("status"), "ok"))


def query_globals(
    root: ArtifactRoot, qroot: ArtifactRoot, queries: pd.DataFrame, lookup: GlobalLookup
) -> tuple[np.ndarray, np.ndarray]:
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
