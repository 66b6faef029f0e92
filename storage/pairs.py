"""Mined training pairs: ``PAIRS/parts/part-NNNNN.parquet`` (+ ``_commits/``, one part per block of
anchors, so a killed run resumes), ``PAIRS/pairs.html`` (sample pairs) and ``PAIRS/summary-mine.json``.

Columns (:data:`PAIRS_SCHEMA`): ``anchor_id``, ``other_id`` (the index's image ids), ``label``
(1 positive, 0 negative), ``score`` (manifold similarity for positives, Euclidean for negatives,
shared components for i-ASMK* positives), ``source`` (``manifold`` or ``iasmk``), and both images'
files, ready for a training loader.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from storage import fs as sfs
from storage.errors import ArtifactError
from storage.shards import ShardSet

PAIRS_SCHEMA = pa.schema(
    [
        ("anchor_id", pa.int64()),
        ("other_id", pa.int64()),
        ("label", pa.int8()),
        ("score", pa.float32()),
        ("source", pa.string()),
        ("anchor_file", pa.string()),
        ("other_file", pa.string()),
    ]
)


def pair_table(
    anchors: np.ndarray, others: np.ndarray, label: int, scores: np.ndarray, source: str, files: pd.Series
) -> pa.Table:
    """Rows of one kind of pair; ``files`` maps image id → file."""
    return pa.table(
        {
            "anchor_id": anchors.astype(np.int64),
            "other_id": others.astype(np.int64),
            "label": np.full(len(anchors), label, np.int8),
            "score": np.asarray(scores, np.float32),
            "source": [source] * len(anchors),
            "anchor_file": files.loc[anchors].to_numpy(str),
            "other_file": files.loc[others].to_numpy(str),
        },
        schema=PAIRS_SCHEMA,
    )


def pair_parts(out: str, options: dict | None = None) -> ShardSet:
    return ShardSet(sfs.join(out, "parts"), options or {})


def write_pairs(out: str, part: int, table: pa.Table, record: dict, options: dict | None = None) -> dict:
    return pair_parts(out, options).write(part, table.cast(PAIRS_SCHEMA), record)


def read_pairs(out: str, options: dict | None = None) -> pa.Table:
    parts = pair_parts(out, options)
    if not parts.indices():
        raise ArtifactError(f"{out} holds no mined pairs: run retrieval mine --index ROOT --out {out}")
    return parts.read_all()


def write_pairs_page(out: str, page: str, options: dict | None = None) -> str:
    uri = sfs.join(out, "pairs.html")
    sfs.write_bytes(uri, page.encode(), options)
    return uri
