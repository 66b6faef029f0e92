"""ASMK* entries in feature shards (``local_store`` entries/both, synthetic distractors): what a shard's
commit record says about them, reading them (or donors' descriptors and positions) per image, and writing
distractor shards and image rows.

Commit-record keys: ``entries_codebook_sha1`` (the codebook the words belong to) and ``synthetic`` (a shard
of :mod:`jobs.distractors`). Columns: ``asmk_words``, ``asmk_codes`` (:mod:`storage.schemas`).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from storage.artifacts import ArtifactRoot
from storage.collection import BOX_COLUMNS, synthetic_files
from storage.errors import SettingsMismatch
from storage.schemas import entry_arrays, feature_schema, feature_table, global_matrix, local_arrays

CODEBOOK_KEY = "entries_codebook_sha1"


def entries_record(codebook_sha1: str) -> dict:
    """What a shard of entries adds to its commit record."""
    return {CODEBOOK_KEY: codebook_sha1}


def entry_codebooks(root: ArtifactRoot, synthetic: bool = True) -> set[str]:
    """The codebooks (sha1) of the entries the root's committed shards hold (``synthetic=False``: real images only)."""
    return {
        r[CODEBOOK_KEY]
        for r in root.shards().committed().values()
        if r.get(CODEBOOK_KEY) and (synthetic or not r.get("synthetic"))
    }


def donor_images(root: ArtifactRoot, codebook_sha1: str) -> Iterator[tuple[np.ndarray, list, list | None]]:
    """Per committed shard, its described images: (global (n, D), per image its (words, codes) entries of the
    codebook and None — or, when the shards hold descriptors, per image its float32 descriptors and "descriptors")."""
    shards = root.shards()
    has_entries = "asmk_words" in shards.columns()
    if has_entries and entry_codebooks(root) != {codebook_sha1}:
        raise SettingsMismatch(f"{root.uri}: its shards hold entries of another codebook than the distractors'")
    cols = ["image_id", "status", "global", *(["asmk_words", "asmk_codes"] if has_entries else ["local_desc"])]
    for table in shards.iter_tables(cols):
        table = table.filter(pc.equal(table.column("status"), "ok"))
        if has_entries:
            _, w, c = entry_arrays(table)
            cuts = np.cumsum(table.column("asmk_words").combine_chunks().value_lengths().to_numpy())[:-1]
            yield global_matrix(table), list(zip(np.split(w, cuts), np.split(c, cuts))), None
        else:
            desc, _, counts = local_arrays(table)
            yield global_matrix(table), np.split(desc.astype(np.float32), np.cumsum(counts)[:-1]), "descriptors"


def donor_features(root: ArtifactRoot) -> Iterator[tuple[np.ndarray, list, list]]:
    """Per committed shard of descriptors, its described images: (global (n, D), per image its float32 descriptors
    (m_i, d), per image their positions normalised to [0, 1)² by the image's size, or its crop box's when it has
    one). Shards without descriptors (``local_store=entries``) yield nothing."""
    shards = root.shards()
    cols = ["image_id", "status", "global", "local_desc", "local_xy", "width", "height", *BOX_COLUMNS]
    for table in shards.iter_tables(cols):
        table = table.filter(pc.equal(table.column("status"), "ok"))
        desc, _, counts = local_arrays(table)
        xy_col = table.column("local_xy").combine_chunks()
        xy = xy_col.values.values.to_numpy(zero_copy_only=False).reshape(-1, 2)
        xy = xy[xy_col.offsets.to_numpy()[0] : xy_col.offsets.to_numpy()[-1]].astype(np.float64)
        box = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in BOX_COLUMNS], axis=1)
        size = np.stack([table.column("width").to_numpy(), table.column("height").to_numpy()], axis=1).astype(float)
        cropped = np.isfinite(box).all(axis=1)
        size[cropped] = box[cropped, 2:] - box[cropped, :2]
        xy = np.clip(
            xy / np.maximum(np.repeat(size, counts, axis=0), 1.0),
            0.0,
            float(np.nextafter(np.float32(1), np.float32(0))),
        )
        cuts = np.cumsum(counts)[:-1]
        yield global_matrix(table), np.split(desc.astype(np.float32), cuts), np.split(xy.astype(np.float32), cuts)


def append_synthetic(root: ArtifactRoot, tag: str, n: int, shard_size: int) -> tuple[pd.DataFrame, int]:
    """``root``'s image table with ``n`` synthetic images of ``tag`` appended (ids after its largest, shards after
    its last) — once: a rerun finds them. Returns the table and their first id."""
    files = synthetic_files(tag, 0, n)
    recorded = root.images()
    if recorded is not None:
        mine = recorded[recorded["file"].astype(str).str.startswith(files[0][:-8])]
        if len(mine):
            if len(mine) != n:
                raise SettingsMismatch(
                    f"{root.uri} holds {len(mine)} images of {tag}, not {n}; use a new --out (or another seed)"
                )
            return recorded, int(mine["image_id"].min())
    empty = recorded is None or recorded.empty
    first_id = 0 if empty else int(recorded["image_id"].max()) + 1
    first_shard = 0 if empty else int(recorded["shard"].max()) + 1
    rows = pd.DataFrame(
        {
            "image_id": first_id + np.arange(n, dtype=np.int64),
            "file": files,
            "name": [f.split(":", 1)[1] for f in files],
            "group": None,
            **{c: np.full(n, np.nan, np.float32) for c in BOX_COLUMNS},
            "shard": first_shard + np.arange(n) // max(1, shard_size),
        }
    )
    table = (
        rows
        if recorded is None
        else pd.concat([recorded, rows[[c for c in recorded.columns if c in rows]]], ignore_index=True)
    )
    root.write_images(table)
    return table, first_id


def write_synthetic_shard(
    root: ArtifactRoot, shard: int, rows: list[dict], global_dim: int, local_dim: int, record: dict, seconds: float
) -> None:
    """Commit one shard of synthetic images (rows: image_id, global, asmk_words, asmk_codes); ``record`` goes into
    the file's metadata and its commit record, ``seconds`` into the commit record only (the file stays a pure
    function of its content)."""
    schema = feature_schema(global_dim, local_dim, {"synthetic": record}, entries=True)
    root.shards().write(
        shard,
        feature_table(rows, schema),
        {"ok": len(rows), "errors": 0, "synthetic": True, "seconds": seconds, **record},
    )
