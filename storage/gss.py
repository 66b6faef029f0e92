"""The trained GSS re-ranker of an index root (:mod:`operators.gss`, ``jobs.train_reranker``).

    ROOT/gss/weights.npz        W_l, b_l (float32; read with allow_pickle=False)
    ROOT/gss/degree.npy         (n,) row sums of A + I of the GSS graph (a query's edge weights need them)
    ROOT/gss/state_<l>.npy      (n, D) float32: the database's input to layer l + 1 (l = 1 … L − 1; l = 0 is the
                                global matrix itself), so a query attaches without recomputing the database
    ROOT/gss/embeddings.npy     (n, D) float32 ĥ, rows = nodes of the graph (= rows of the global matrix)
    ROOT/gss/checkpoint.npz + checkpoint.json   weights and Adam state after some steps (resume)
    ROOT/gss/meta.json          parameters, β, steps, timings — written last: it marks the model valid

A graph rebuild removes ``meta.json`` (:func:`invalidate_gss`), as it does the eigenpairs.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np

from storage.artifacts import ArtifactRoot


def gss_meta(root: ArtifactRoot) -> dict | None:
    return root.read_json("gss/meta.json") if root.exists("gss/meta.json") else None


def invalidate_gss(root: ArtifactRoot) -> None:
    root.remove("gss/meta.json")
    root.remove("gss/checkpoint.json")


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _from_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_checkpoint(root: ArtifactRoot, step: int, beta: float, settings: dict,
                     arrays: dict[str, np.ndarray]) -> None:
    """Weights and optimizer arrays after ``step`` steps; the json (written last) makes it visible."""
    root.write_bytes("gss/checkpoint.npz", _npz(arrays))
    root.write_json("gss/checkpoint.json", {"step": int(step), "beta": float(beta), "settings": settings})


def load_checkpoint(root: ArtifactRoot, settings: dict) -> tuple[int, float, dict[str, np.ndarray]] | None:
    """(step, β, arrays) of a checkpoint made with the same ``settings``; None when there is none."""
    if not root.exists("gss/checkpoint.json"):
        return None
    info = root.read_json("gss/checkpoint.json")
    if info.get("settings") != settings:
        return None
    return info["step"], info["beta"], _from_npz(root.read_bytes("gss/checkpoint.npz"))


def array_writer(root: ArtifactRoot, name: str, shape: tuple) -> tuple[np.ndarray, Callable[[], None]]:
    """A writable memory-mapped float32 array ``gss/<name>.npy`` (state_<l>, embeddings, or a scratch
    pre-activation) and its ``commit()``."""
    return root.open_array_writer(f"gss/{name}.npy", shape, np.float32)


def load_array(root: ArtifactRoot, name: str) -> np.ndarray:
    return root.load_array(f"gss/{name}.npy")


def remove_array(root: ArtifactRoot, name: str) -> None:
    root.remove(f"gss/{name}.npy")


def write_model(root: ArtifactRoot, weights: dict[str, np.ndarray], degree: np.ndarray, meta: dict) -> None:
    """The trained weights, the graph's degrees, then the meta (valid from here on)."""
    root.write_bytes("gss/weights.npz", _npz(weights))
    root.write_array("gss/degree.npy", np.asarray(degree, np.float64))
    root.write_json("gss/meta.json", meta)


def load_model(root: ArtifactRoot) -> tuple[dict, dict[str, np.ndarray], np.ndarray, list[np.ndarray], np.ndarray]:
    """(meta, weights, degree, states 1 … L − 1, embeddings), arrays memory-mapped."""
    meta = root.read_json("gss/meta.json")
    weights = _from_npz(root.read_bytes("gss/weights.npz"))
    states = [load_array(root, f"state_{layer}") for layer in range(1, meta["params"]["layers"])]
    return meta, weights, np.asarray(root.load_array("gss/degree.npy")), states, load_array(root, "embeddings")
