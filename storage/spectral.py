"""Eigenpairs of the graph for FSR / hybrid diffusion.

    ROOT/spectral/U.npy (n, r) float32, rows in the graph's locality order (0 outside the LCC)
    ROOT/spectral/lambda.npy (r,) float64, lcc.npy (LCC positions in that order), meta.json
    ROOT/spectral/sparse_{indptr,indices,data}.npy + sparse.json   SHybrid's U (a fraction of entries kept)

A graph rebuild removes ``meta.json`` (:func:`invalidate_spectral`): eigenpairs of an old graph
are never used with a new one.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp

from storage.artifacts import ArtifactRoot
from storage.graph import load_csr, write_csr


def spectral_meta(root: ArtifactRoot) -> dict | None:
    return root.read_json("spectral/meta.json") if root.exists("spectral/meta.json") else None


def invalidate_spectral(root: ArtifactRoot) -> None:
    root.remove("spectral/meta.json")


def u_writer(root: ArtifactRoot, n: int, r: int) -> tuple[np.ndarray, Callable[[], None]]:
    """A writable (memory-mapped, zeroed) U and its ``commit()``."""
    u, commit = root.open_array_writer("spectral/U.npy", (n, r), np.float32)
    u[:] = 0
    return u, commit


def write_spectral(root: ArtifactRoot, lam: np.ndarray, lcc: np.ndarray, meta: dict) -> None:
    """λ, the decomposed positions and the meta (written last: it marks the eigenpairs valid)."""
    root.write_array("spectral/lambda.npy", lam.astype(np.float64))
    root.write_array("spectral/lcc.npy", lcc.astype(np.int64))
    root.write_json("spectral/meta.json", meta)


def load_u(root: ArtifactRoot) -> np.ndarray:
    return root.load_array("spectral/U.npy")


def write_sparse_u(root: ArtifactRoot, us: sp.csr_matrix, keep: float) -> None:
    write_csr(root, "spectral/sparse_", us)
    root.write_json("spectral/sparse.json", {"keep": keep, "shape": list(us.shape), "nnz": int(us.nnz)})


def load_sparse_u(root: ArtifactRoot, keep: float) -> sp.csr_matrix | None:
    """The stored SHybrid U if it was made with ``keep`` (None otherwise), memory-mapped."""
    if not root.exists("spectral/sparse.json"):
        return None
    info = root.read_json("spectral/sparse.json")
    if info["keep"] != keep:
        return None
    return load_csr(root, "spectral/sparse_", n_cols=info["shape"][1])


def load_spectral(
    root: ArtifactRoot, sparse_keep: float = 1.0
) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray, np.ndarray]:
    """U (SHybrid's stored sparse U when made with ``sparse_keep`` < 1), λ and the LCC positions."""
    u = load_u(root)
    if sparse_keep < 1:
        stored = load_sparse_u(root, sparse_keep)
        u = u if stored is None else stored
    lam = np.asarray(root.load_array("spectral/lambda.npy"), np.float64)
    return u, lam, np.asarray(root.load_array("spectral/lcc.npy"))
