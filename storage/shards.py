"""Sharded Parquet datasets with commit records: a shard is visible only once complete.

Layout under a dataset URI (e.g. ``ROOT/features``)::

    part-00012.parquet        # written by a worker (atomic rename locally, single PUT on S3)
    _commits/part-00012.json  # commit record, written after the shard: counts, timings, settings digest

Readers list ``_commits/`` and read only committed shards, so a shard whose writer was killed is
invisible and is simply redone on the next run (``pending`` gives the work left). Each worker
writes its own commit record, so no shared manifest file is ever rewritten concurrently.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage import fs as sfs

COMMITS = "_commits"


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


@dataclass
class ShardSet:
    """A committed-shards dataset at ``uri`` (local folder or ``s3://`` prefix)."""

    uri: str
    options: sfs.StorageOptions = field(default_factory=dict)

    def path(self, index: int) -> str:
        return sfs.join(self.uri, f"{shard_name(index)}.parquet")

    def commit_path(self, index: int) -> str:
        return sfs.join(self.uri, COMMITS, f"{shard_name(index)}.json")

    def indices(self) -> list[int]:
        """Indices of the complete shards, from one listing of ``_commits/`` (no record is read)."""
        names = sfs.listdir(sfs.join(self.uri, COMMITS), self.options)
        return sorted(int(n[5:-5]) for n in names if n.startswith("part-") and n.endswith(".json"))

    def record(self, index: int) -> dict:
        """The commit record of shard ``index``."""
        return sfs.read_json(self.commit_path(index), self.options)

    def committed(self) -> dict[int, dict]:
        """Commit records of the complete shards, by shard index (read concurrently). What a killed
        writer left half-written is removed (:func:`storage.fs.sweep_temporaries`): a rerun leaves none."""
        self.sweep()
        indices = self.indices()
        blobs = sfs.read_many([self.commit_path(i) for i in indices], self.options)
        return {i: json.loads(b) for i, b in zip(indices, blobs)}

    def sweep(self) -> None:
        """Remove the temporaries that killed writers left here (:func:`storage.fs.sweep_temporaries`)."""
        for folder in (self.uri, sfs.join(self.uri, COMMITS)):
            sfs.sweep_temporaries(folder)

    def pending(self, indices: list[int]) -> list[int]:
        """The shards of ``indices`` still to write (a rerun's work; killed writers' temporaries removed)."""
        self.sweep()
        done = set(self.indices())
        return [i for i in indices if i not in done]

    def write(self, index: int, table: pa.Table, record: dict | None = None) -> dict:
        """Write shard ``index`` then its commit record; returns the record."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        sfs.write_bytes(self.path(index), buf.getvalue(), self.options)
        rec = {
            "shard": index,
            "rows": table.num_rows,
            "bytes": buf.tell(),
            "committed_at": time.time(),
            **(record or {}),
        }
        sfs.write_json(self.commit_path(index), rec, self.options)
        return rec

    def write_blob(self, index: int, data: bytes, record: dict | None = None, ext: str = "npz") -> dict:
        """Commit a non-Parquet shard (e.g. a partial inverted file) under the same protocol."""
        uri = sfs.join(self.uri, f"{shard_name(index)}.{ext}")
        sfs.write_bytes(uri, data, self.options)
        rec = {"shard": index, "bytes": len(data), "committed_at": time.time(), **(record or {})}
        sfs.write_json(self.commit_path(index), rec, self.options)
        return rec

    def blob_path(self, index: int, ext: str = "npz") -> str:
        return sfs.join(self.uri, f"{shard_name(index)}.{ext}")

    def read_shard(self, index: int, columns: list[str] | None = None) -> pa.Table:
        data = sfs.read_bytes(self.path(index), self.options)
        return pq.read_table(io.BytesIO(data), columns=columns)

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Committed shards in index order."""
        for index in self.indices():
            yield self.read_shard(index, columns)

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        tables = list(self.iter_tables(columns))
        if not tables:
            raise FileNotFoundError(f"no committed shards under {self.uri}")
        return pa.concat_tables(tables)

    def columns(self) -> list[str]:
        """Column names of the first committed shard (empty when none)."""
        indices = self.indices()
        if not indices:
            return []
        fs, path = sfs.filesystem(self.path(indices[0]), self.options)
        with fs.open(path, "rb") as f:
            return pq.read_schema(f).names

    def schema_metadata(self) -> dict[str, str]:
        """Key-value metadata of the first committed shard's schema."""
        indices = self.indices()
        if not indices:
            return {}
        first = indices[0]
        fs, path = sfs.filesystem(self.path(first), self.options)
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        return {k.decode(): v.decode() for k, v in meta.items()}
