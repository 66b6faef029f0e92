"""Trained re-rankers of an index root (``jobs.train_reranker``): GSS (:mod:`operators.gss`) and GRAD-Net
(:mod:`operators.gradnet`), each in its own folder ``ROOT/<method>/``:

    weights/           the model's tensors, one state folder (:mod:`storage.state`: ``<name>.npy`` + ``state.json``)
    embeddings.npy     (n, D) float32, ℓ2-normalised, rows = graph nodes (= rows of the global matrix): what
                       search ranks by
    state_<l>.npy      GSS: (n, D) the database's input to layer l + 1, so a query attaches without recomputing
                       the database; degree.npy (n,) row sums of A + I
    anchors.npy        GRAD-Net: the k-means anchors of the sparse codes
                       (intermediate activations live in anonymous temporary files: :func:`scratch_array`)
    checkpoint/        a state folder: weights and optimizer arrays after some steps, params {step, settings, …}
                       (a killed job resumes)
    meta.json          parameters, β, steps, timings — written last: it marks the model valid

A graph rebuild removes every ``meta.json`` and checkpoint (:func:`invalidate_learned`), as it does the eigenpairs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from operators.state import State
from storage import state as st
from storage.artifacts import ArtifactRoot

METHODS = ("gss", "gradnet")


def learned_meta(root: ArtifactRoot, method: str) -> dict | None:
    return root.read_json(f"{method}/meta.json") if root.exists(f"{method}/meta.json") else None


def invalidate_learned(root: ArtifactRoot) -> None:
    for method in METHODS:
        root.remove(f"{method}/meta.json")
        root.remove(f"{method}/checkpoint/{st.MANIFEST}")


def write_checkpoint(
    root: ArtifactRoot, method: str, step: int, settings: dict, arrays: dict[str, np.ndarray], **info
) -> None:
    """Weights and optimizer arrays after ``step`` steps; the manifest (written last) makes it visible."""
    st.write_state(root, f"{method}/checkpoint", State(arrays, {"step": int(step), "settings": settings, **info}))


def load_checkpoint(root: ArtifactRoot, method: str, settings: dict) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(info with its ``step``, arrays) of a checkpoint made with the same ``settings``; None when there is none."""
    if not st.has_state(root, f"{method}/checkpoint"):
        return None
    state = st.read_state(root, f"{method}/checkpoint", mmap=False)
    if state.params.get("settings") != settings:
        return None
    return dict(state.params), dict(state.arrays)


def embeddings_writer(root: ArtifactRoot, method: str, shape: tuple) -> tuple[np.ndarray, Callable[[], None]]:
    """The writable (memory-mapped) embeddings of ``method`` and their ``commit()``."""
    return root.open_array_writer(f"{method}/embeddings.npy", shape, np.float32)


def gss_state_writer(root: ArtifactRoot, layer: int, shape: tuple) -> tuple[np.ndarray, Callable[[], None]]:
    """The writable database state x_layer of GSS (a query attaches through it) and its ``commit()``."""
    return root.open_array_writer(f"gss/state_{layer}.npy", shape, np.float32)


def scratch_array(shape: tuple) -> np.ndarray:
    """A float32 array backed by an anonymous local temporary file (gone when the array is): intermediate
    activations larger than memory that are no artifact."""
    return np.memmap(tempfile.TemporaryFile(), dtype=np.float32, mode="w+", shape=shape)


def write_model(
    root: ArtifactRoot, method: str, weights: dict[str, np.ndarray], meta: dict, **arrays: np.ndarray
) -> None:
    """The trained weights and the model's small arrays (GSS: ``degree``; GRAD-Net: ``anchors``), then the meta
    (valid from here on); the embeddings and states are committed before."""
    st.write_state(root, f"{method}/weights", State(weights))
    st.write_arrays(root, method, arrays)
    root.write_json(f"{method}/meta.json", meta)


@dataclass
class LearnedModel:
    """A trained re-ranker as search reads it (arrays memory-mapped)."""

    meta: dict
    weights: dict[str, np.ndarray]
    embeddings: np.ndarray  # (n, D) ℓ2-normalised, rows = graph nodes
    degree: np.ndarray | None = None  # GSS: row sums of A + I
    states: list[np.ndarray] = field(default_factory=list)  # GSS: x_1 … x_{L-1}
    anchors: np.ndarray | None = None  # GRAD-Net: the k-means anchors


def _weights(root: ArtifactRoot, method: str) -> dict[str, np.ndarray]:
    """The trained tensors (``weights/``; roots trained before the state protocol hold ``weights.npz``)."""
    if st.has_state(root, f"{method}/weights"):
        return dict(st.read_state(root, f"{method}/weights", mmap=False).arrays)
    return st.unpack(root.read_bytes(f"{method}/weights.npz"), f"{method}/weights.npz")


def load_model(root: ArtifactRoot, method: str) -> LearnedModel:
    meta = root.read_json(f"{method}/meta.json")
    model = LearnedModel(meta, _weights(root, method), root.load_array(f"{method}/embeddings.npy"))
    if method == "gss":
        model.degree = np.asarray(root.load_array("gss/degree.npy"))
        model.states = [root.load_array(f"gss/state_{layer}.npy") for layer in range(1, meta["params"]["layers"])]
    else:
        model.anchors = root.load_array(f"{method}/anchors.npy")
    return model
