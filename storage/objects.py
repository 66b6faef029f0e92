"""Object discovery artifacts (``jobs.discover``'s ``objects`` stage): ``ROOT/objects/``.

- ``region_parts/part-NNNNN.npz`` (+ ``_commits/``): pass 1, one part per block of images: every
  FS.egm region's image id, scale, box, feature saliency and descriptor. Resumable.
- ``regions/`` (the :mod:`storage.global_index` layout: ``vectors.npy`` (n_r, D), ``ids.npy`` = each
  region's image id), ``regions.parquet`` (image_id, scale, y0, x0, y1, x1, fs) and ``katz.npy``
  (each region's Katz centrality on the region graph).
- ``os_parts/part-NNNNN.npz`` (+ ``_commits/``): pass 2, the OS.egm descriptors of a block of images.
- ``global/`` (the global layout): the saliency-based descriptor of every database image, in the
  rows of ``ROOT/global``; ``jobs.search --method os`` ranks them.
- ``meta.json``: parameters and counts.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from operators.graph import index_of
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError
from storage.global_index import GlobalDescriptors, GlobalMeta, global_writer, has_global, open_global
from storage.shards import ShardSet, shard_name
from storage.state import pack, unpack

REGIONS, OBJECTS = "objects/regions", "objects/global"
REGION_COLUMNS = ["image_id", "scale", "y0", "x0", "y1", "x1", "fs"]


def object_parts(root: ArtifactRoot, kind: str) -> ShardSet:
    """The committed parts of pass 1 (``kind="region_parts"``) or pass 2 (``"os_parts"``)."""
    return root.shards(f"objects/{kind}")


def write_part(root: ArtifactRoot, kind: str, part: int, arrays: dict[str, np.ndarray], record: dict) -> dict:
    return object_parts(root, kind).write_blob(part, pack(arrays), record)


def load_part(root: ArtifactRoot, kind: str, part: int) -> dict[str, np.ndarray]:
    rel = f"objects/{kind}/{shard_name(part)}.npz"
    return unpack(root.read_bytes(rel), rel)


def write_regions(root: ArtifactRoot, table: pd.DataFrame, vectors: np.ndarray) -> None:
    """The merged regions: their table (:data:`REGION_COLUMNS`) and descriptors."""
    vec, ids, commit = global_writer(root, len(table), vectors.shape[1], REGIONS)
    vec[:] = vectors
    ids[:] = table["image_id"].to_numpy(np.int64)
    commit(GlobalMeta(count=len(table), dim=vectors.shape[1], whitened=False))
    buf = io.BytesIO()
    table[REGION_COLUMNS].to_parquet(buf, index=False)
    root.write_bytes("objects/regions.parquet", buf.getvalue())


def open_regions(root: ArtifactRoot) -> tuple[pd.DataFrame, GlobalDescriptors]:
    if not has_global(root, REGIONS):
        raise ArtifactError(
            f"{root.uri} has no object regions: run retrieval discover --index {root.uri} --set stages=[objects]"
        )
    return pd.read_parquet(io.BytesIO(root.read_bytes("objects/regions.parquet"))), open_global(root, REGIONS)


def write_katz(root: ArtifactRoot, g: np.ndarray) -> None:
    root.write_array("objects/katz.npy", np.asarray(g, np.float32))


def load_katz(root: ArtifactRoot) -> np.ndarray:
    return np.asarray(root.load_array("objects/katz.npy", mmap=False))


def write_objects_meta(root: ArtifactRoot, meta: dict) -> None:
    root.write_json("objects/meta.json", meta)


def merge_regions(root: ArtifactRoot, parts: list[int]) -> int:
    """Pass 1's parts (in order) into the region table and descriptors; returns the region count."""
    loaded = [load_part(root, "region_parts", i) for i in parts]
    cat = {k: np.concatenate([x[k] for x in loaded]) for k in loaded[0]}
    boxes = cat["boxes"].reshape(-1, 4).astype(np.int64)
    table = pd.DataFrame(
        {
            "image_id": cat["image_id"].astype(np.int64),
            "scale": cat["scale"].astype(np.float32),
            "y0": boxes[:, 0],
            "x0": boxes[:, 1],
            "y1": boxes[:, 2],
            "x1": boxes[:, 3],
            "fs": cat["fs"].astype(np.float32),
        }
    )
    write_regions(root, table, cat["vectors"].astype(np.float32))
    return len(table)


def merge_descriptors(root: ArtifactRoot, parts: list[int]) -> int:
    """Pass 2's descriptors into the rows of ``ROOT/global`` (an image whose pass failed keeps its plain GeM);
    returns how many images got one."""
    g = open_global(root)
    vec, ids, commit = global_writer(root, len(g.ids), g.vectors.shape[1], OBJECTS)
    vec[:], ids[:] = g.vectors, g.ids
    done = 0
    for part in parts:
        x = load_part(root, "os_parts", part)
        vec[index_of(ids, x["image_id"], -1)] = x["vectors"]
        done += len(x["image_id"])
    commit(GlobalMeta(count=len(ids), dim=g.vectors.shape[1], whitened=g.meta.whitened))
    return done
