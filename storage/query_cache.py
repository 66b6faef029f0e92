"""Described queries, cached per index and query settings: ``ROOT/query-cache/<key>/``.

A cache entry is an artifact root of its own (``images.parquet``, ``features/`` shards and
``index.json``, as :mod:`jobs.extract` writes them) holding the queries that could not reuse a
database image's features. Its key digests everything that makes those shards: the index (its
location, extraction settings, local whitening and size), the query table (ids, files, boxes),
the role, the centre crop and whether database features are reused. A second search of the same
queries against the same index therefore describes nothing; any change makes a new entry.
Entries live under the index root by default, or under another folder (a read-only index).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from operators.state import State
from storage import fs as sfs
from storage.artifacts import ArtifactRoot

FOLDER = "query-cache"


def query_cache_key(
    index: ArtifactRoot, settings: dict, queries: pd.DataFrame, whitening: State | None, database_size: int
) -> str:
    """16 hex digits of the SHA-1 of what makes the cached shards (see module doc)."""
    table = queries[["image_id", "file", "x0", "y0", "x1", "y1"]].astype({"file": str})
    table = table.assign(file=table["file"].map(sfs.canonical))
    digest = hashlib.sha1()
    digest.update(
        json.dumps(
            {"index": sfs.canonical(index.uri), "settings": settings, "database": database_size},
            sort_keys=True,
            default=str,
        ).encode()
    )
    digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    for name, arr in sorted((whitening.arrays if whitening else {}).items()):  # the local whitening's state
        digest.update(name.encode() + np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()[:16]


def results_query_root(out: str, options: dict | None = None) -> ArtifactRoot:
    """Described queries kept with the results instead (``RES/queries``, no reuse across searches)."""
    return ArtifactRoot(sfs.join(out, "queries"), options or {})


def query_cache_root(index: ArtifactRoot, key: str, folder: str | None = None) -> ArtifactRoot:
    """The cache entry ``key``: under ``index`` (``folder`` None) or under ``folder``."""
    base = index.path(FOLDER) if folder is None else folder
    return ArtifactRoot(sfs.join(base, key), index.options)
