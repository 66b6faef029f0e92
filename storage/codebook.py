"""The visual codebook: ``ROOT/codebook/centroids.npy`` (k, d) float32 and ``meta.json``
(k, d, the codebook config that made it, the sample size or the source root it was copied from)."""

from __future__ import annotations

import hashlib

import numpy as np

from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError
from storage.state import read_arrays, write_arrays


def codebook_hash(centroids: np.ndarray) -> str:
    """Identity of a codebook (inverted files built with one can only be searched with it)."""
    return hashlib.sha1(np.ascontiguousarray(centroids, np.float32).tobytes()).hexdigest()


def codebook_meta(root: ArtifactRoot) -> dict | None:
    return root.read_json("codebook/meta.json") if root.exists("codebook/meta.json") else None


def load_codebook(root: ArtifactRoot) -> np.ndarray:
    if not root.exists("codebook/centroids.npy"):
        raise ArtifactError(
            f"{root.uri} has no codebook: run the codebook stage "
            f"(retrieval index … --out {root.uri} --set stages=[codebook])"
        )
    return np.asarray(read_arrays(root, "codebook", ["centroids"], mmap=False)["centroids"], np.float32)


def write_codebook(root: ArtifactRoot, centroids: np.ndarray, config: dict, **info) -> None:
    write_arrays(root, "codebook", {"centroids": np.ascontiguousarray(centroids, np.float32)})
    root.write_json(
        "codebook/meta.json",
        {
            "k": len(centroids),
            "dim": int(centroids.shape[1]),
            "config": config,
            "sha1": codebook_hash(centroids),
            **info,
        },
    )
