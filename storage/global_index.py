"""The global descriptor matrix: ``ROOT/global/vectors.npy`` (n, D) float32, ``ids.npy`` (n,) int64
(row i ↔ image ids[i]; these rows are also the nodes of the kNN graph) and ``meta.json``; optionally its
approximate index ``global/ann/`` (:class:`operators.ann.GlobalAnn` as a state: ``index.npy``, the
``faiss.serialize_index`` bytes, and ``state.json`` with the plan and the fingerprint of the matrix).

Written once per ``global`` stage by streaming shards into a memory-mapped file
(:func:`global_writer`); read memory-mapped by search and graph tasks (:func:`open_global`).
:class:`GlobalLookup` fetches rows by image id across several roots (partitions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from operators.ann import GlobalAnn
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError
from storage.state import MANIFEST, has_state, load, read_state, save


@dataclass
class GlobalMeta:
    count: int
    dim: int
    whitened: bool


@dataclass
class GlobalDescriptors:
    ids: np.ndarray  # (n,) int64, memory-mapped
    vectors: np.ndarray  # (n, D) float32, memory-mapped
    meta: GlobalMeta


def global_writer(
    root: ArtifactRoot, n: int, dim: int, name: str = "global"
) -> tuple[np.ndarray, np.ndarray, Callable[[GlobalMeta], None]]:
    """Writable ``vectors`` (memory-mapped) and ``ids`` arrays for ``n`` rows, and a ``commit(meta)``
    that publishes vectors, ids and meta together. ``name``: the folder; other vector sets in this
    layout (the object-saliency descriptors and regions of :mod:`storage.objects`) name their own."""
    vectors, commit_vectors = root.open_array_writer(f"{name}/vectors.npy", (n, dim), np.float32)
    ids = np.empty(n, np.int64)

    def commit(meta: GlobalMeta) -> None:
        commit_vectors()
        root.write_array(f"{name}/ids.npy", ids)
        root.write_json(f"{name}/meta.json", asdict(meta))

    return vectors, ids, commit


def has_global(root: ArtifactRoot, name: str = "global") -> bool:
    return root.exists(f"{name}/ids.npy") and root.exists(f"{name}/vectors.npy")


def global_ids(root: ArtifactRoot, name: str = "global") -> np.ndarray:
    """Image id of each row (memory-mapped); an :class:`ArtifactError` when the stage has not run."""
    if not has_global(root, name):
        hint = (
            "run retrieval index --collection … --out " + root.uri
            if name == "global"
            else "run retrieval discover --index " + root.uri + " --set stages=[objects]"
        )
        raise ArtifactError(f"{root.uri} has no {name} descriptors: {hint}")
    return root.load_array(f"{name}/ids.npy")


def check_consistent(root: ArtifactRoot, image_ids: np.ndarray | None, name: str = "global") -> None:
    """Refuse (:class:`ArtifactError`) a root whose descriptor matrix disagrees with itself or with its image
    table: row counts of ids, vectors and meta, duplicated ids, ids of no image (``image_ids``; None: not checked)."""
    g = open_global(root, name)
    problem = None
    if g.ids.ndim != 1 or g.vectors.ndim != 2 or len(g.ids) != len(g.vectors) or g.meta.count != len(g.ids):
        problem = f"{len(g.ids)} ids, {len(g.vectors)} vectors and a count of {g.meta.count} do not agree"
    elif len(np.unique(g.ids)) != len(g.ids):
        problem = "an image id appears in more than one row"
    elif image_ids is not None and not np.isin(g.ids, image_ids).all():
        problem = f"{int((~np.isin(g.ids, image_ids)).sum())} row(s) name no image of images.parquet"
    if problem:
        raise ArtifactError(
            f"{root.uri}/{name} is inconsistent ({problem}): the root was changed after it was "
            "built; rebuild it (retrieval index … --out a new root)"
        )


def open_global(root: ArtifactRoot, name: str = "global") -> GlobalDescriptors:
    ids = global_ids(root, name)
    vectors = root.load_array(f"{name}/vectors.npy")
    meta = (
        root.read_json(f"{name}/meta.json")
        if root.exists(f"{name}/meta.json")
        else {"count": len(ids), "dim": vectors.shape[1], "whitened": False}
    )
    return GlobalDescriptors(ids, vectors, GlobalMeta(**meta))


class GlobalLookup:
    """Global descriptors by image id across partitions (memory-mapped rows)."""

    def __init__(self, roots: list[ArtifactRoot], name: str = "global"):
        self.parts = []
        for r in roots:
            g = open_global(r, name)
            order = np.argsort(g.ids)
            self.parts.append((np.asarray(g.ids)[order], order, g.vectors))

    @property
    def dim(self) -> int:
        return self.parts[0][2].shape[1]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids``; an id in no partition (not indexed, or its image failed) is an ArtifactError."""
        ids = np.asarray(ids, np.int64)
        out = np.zeros((len(ids), self.dim), np.float32)
        found = np.zeros(len(ids), bool)
        for sorted_ids, order, vec in self.parts:
            if not len(sorted_ids):
                continue
            pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
            hit = sorted_ids[pos] == ids
            out[hit] = np.asarray(vec[order[pos[hit]]])
            found |= hit
        if not found.all():
            raise ArtifactError(
                f"{int((~found).sum())} image id(s) have no global descriptor in the index "
                f"(not indexed, or their extraction failed), e.g. {ids[~found][:5].tolist()}"
            )
        return out


def ann_folder(name: str = "global") -> str:
    return f"{name}/ann"


def has_ann(root: ArtifactRoot, name: str = "global") -> bool:
    """Whether a complete approximate index exists (its manifest is written last)."""
    return has_state(root, ann_folder(name))


def ann_params(root: ArtifactRoot, name: str = "global") -> dict | None:
    """The parameters (plan, build config, fingerprint) of the approximate index; None when there is none."""
    return dict(read_state(root, ann_folder(name)).params) if has_ann(root, name) else None


def remove_ann(root: ArtifactRoot, name: str = "global") -> None:
    """Retire the approximate index: its manifest first (a half-removed index is no index)."""
    root.remove(f"{ann_folder(name)}/{MANIFEST}")
    root.remove(f"{ann_folder(name)}/index.npy")


def write_ann(root: ArtifactRoot, ann: GlobalAnn, name: str = "global") -> None:
    """Write the index once: the old manifest is removed first, the new one written last (commit)."""
    remove_ann(root, name)
    save(root, ann_folder(name), ann)


def read_ann(root: ArtifactRoot, name: str = "global") -> GlobalAnn | None:
    """The approximate index (deserialised into memory), or None when the root has none."""
    return load(root, ann_folder(name), GlobalAnn) if has_ann(root, name) else None
