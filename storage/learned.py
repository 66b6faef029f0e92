"""Trained re-rankers of an index root (``jobs.train_reranker``): GSS (:mod:`operators.gss`) and GRAD-Net
(:mod:`operators.gradnet`), each in its own folder ``ROOT/<method>/``:

    weights.npz        the model's tensors (float32; read with allow_pickle=False)
    <name>.npy         (n, ·) float32 arrays, rows = graph nodes (= rows of the global matrix): ``embeddings``
                       (ℓ2-normalised, what search ranks by), GSS's ``state_<l>`` (the database's input to layer
                       l + 1, so a query attaches without recomputing the database) and ``degree``, GRAD-Net's
                       ``anchors``; scratch arrays of the inference are removed when it ends
    checkpoint.npz + checkpoint.json   weights and optimizer state after some steps (a killed job resumes)
    meta.json          parameters, β, steps, timings — written last: it marks the model valid

A graph rebuild removes every ``meta.json`` and checkpoint (:func:`invalidate_learned`), as it does the eigenpairs.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np

from storage.artifacts import ArtifactRoot

METHODS = ("gss", "gradnet")


def learned_meta(root: ArtifactRoot, method: str) -> dict | None:
    return root.read_json(f"{method}/meta.json") if root.exists(f"{method}/meta.json") else None


def invalidate_learned(root: ArtifactRoot) -> None:
    for method in METHODS:
        root.remove(f"{method}/meta.json")
        root.remove(f"{method}/checkpoint.json")


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _from_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_checkpoint(root: ArtifactRoot, method: str, step: int, settings: dict, arrays: dict[str, np.ndarray],
                     **info) -> None:
    """Weights and optimizer arrays after ``step`` steps; the json (written last) makes it visible."""
    root.write_bytes(f"{method}/checkpoint.npz", _npz(arrays))
    root.write_json(f"{method}/checkpoint.json", {"step": int(step), "settings": settings, **info})


def load_checkpoint(root: ArtifactRoot, method: str, settings: dict) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(info with its ``step``, arrays) of a checkpoint made with the same ``settings``; None when there is none."""
    if not root.exists(f"{method}/checkpoint.json"):
        return None
    info = root.read_json(f"{method}/checkpoint.json")
    if info.get("settings") != settings:
        return None
    return info, _from_npz(root.read_bytes(f"{method}/checkpoint.npz"))


def array_writer(root: ArtifactRoot, method: str, name: str, shape: tuple) -> tuple[np.ndarray, Callable[[], None]]:
    """A writable memory-mapped float32 array ``<method>/<name>.npy`` and its ``commit()``."""
    return root.open_array_writer(f"{method}/{name}.npy", shape, np.float32)


def write_array(root: ArtifactRoot, method: str, name: str, array: np.ndarray) -> None:
    root.write_array(f"{method}/{name}.npy", array)


def load_array(root: ArtifactRoot, method: str, name: str) -> np.ndarray:
    return root.load_array(f"{method}/{name}.npy")


def remove_array(root: ArtifactRoot, method: str, name: str) -> None:
    root.remove(f"{method}/{name}.npy")


def write_model(root: ArtifactRoot, method: str, weights: dict[str, np.ndarray], meta: dict) -> None:
    """The trained weights, then the meta (valid from here on); write the model's arrays before."""
    root.write_bytes(f"{method}/weights.npz", _npz(weights))
    root.write_json(f"{method}/meta.json", meta)


def load_weights(root: ArtifactRoot, method: str) -> dict[str, np.ndarray]:
    return _from_npz(root.read_bytes(f"{method}/weights.npz"))
