"""The kNN graph of an index root, in the layout the diffusion solvers read.

    ROOT/graph/knn_ids.npy (n, k) int64 node rows (-1: none), knn_sims.npy (n, k) float32, best first
    ROOT/graph/w_indptr.npy, w_indices.npy, w_data.npy   W as CSR (float32), node order
    ROOT/graph/order.npy   a locality (reverse Cuthill-McKee) node order: order[t] = node at position t
    ROOT/graph/ordered_indptr.npy, ordered_indices.npy, ordered_data.npy (W), ordered_s.npy (S)   in that order
    ROOT/graph/asmk_image_offsets.npy, asmk_image_positions.npy   (ASMK source) postings of each image
    ROOT/graph/meta.json   the graph config, degree and component statistics

Nodes are the rows of the global matrix (:mod:`storage.global_index`). Everything large is
memory-mapped by readers, so re-ranking tasks on a node share the page cache.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp

from operators import graph as G
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError


def knn_writer(root: ArtifactRoot, n: int, k: int) -> tuple[np.ndarray, np.ndarray, Callable[[], None]]:
    """Writable (memory-mapped) kNN id and similarity arrays and their ``commit()``."""
    ids, commit_i = root.open_array_writer("graph/knn_ids.npy", (n, k), np.int64)
    sims, commit_s = root.open_array_writer("graph/knn_sims.npy", (n, k), np.float32)

    def commit() -> None:
        commit_i()
        commit_s()

    return ids, sims, commit


def load_knn(root: ArtifactRoot) -> tuple[np.ndarray, np.ndarray]:
    """kNN node rows and similarities (memory-mapped)."""
    return root.load_array("graph/knn_ids.npy"), root.load_array("graph/knn_sims.npy")


def write_csr(root: ArtifactRoot, prefix: str, m: sp.csr_matrix, **more_values: np.ndarray) -> None:
    """``prefix``indptr (int64), indices (int32), data (float32) ``.npy`` artifacts of a CSR matrix, plus
    other value arrays on the same structure (``name=array``)."""
    for name, arr in (
        ("indptr", m.indptr.astype(np.int64)),
        ("indices", m.indices.astype(np.int32)),
        ("data", m.data.astype(np.float32)),
        *((k, v.astype(np.float32)) for k, v in more_values.items()),
    ):
        root.write_array(f"{prefix}{name}.npy", arr)


def load_csr(root: ArtifactRoot, prefix: str, n_cols: int | None = None, values: str = "data") -> sp.csr_matrix:
    """A CSR matrix from :func:`write_csr` artifacts, index and value arrays memory-mapped (no copy)."""
    indptr = np.asarray(root.load_array(f"{prefix}indptr.npy"))
    shape = (len(indptr) - 1, len(indptr) - 1 if n_cols is None else n_cols)
    return sp.csr_matrix(
        (root.load_array(f"{prefix}{values}.npy"), root.load_array(f"{prefix}indices.npy"), indptr),
        shape=shape,
        copy=False,
    )


def write_affinity(root: ArtifactRoot, w: sp.csr_matrix, order: np.ndarray) -> None:
    """W in node order, the locality order, and W and S = D^-1/2 W D^-1/2 in that order, as the
    solvers use them: one CSR structure (sorted indices) and two float32 value arrays."""
    write_csr(root, "graph/w_", w)
    root.write_array("graph/order.npy", order)
    wo = sp.csr_matrix(sp.csr_matrix(w)[order][:, order])
    wo.sort_indices()
    so = G.normalize(wo)  # same structure: D^-1/2 W D^-1/2 keeps W's nonzeros
    write_csr(root, "graph/ordered_", wo, s=so.data)


def load_affinity(root: ArtifactRoot) -> sp.csr_matrix:
    """W from its CSR artifacts, in node order (float64)."""
    return sp.csr_matrix(load_csr(root, "graph/w_"), dtype=np.float64)


def load_ordered(root: ArtifactRoot, values: str = "data") -> sp.csr_matrix:
    """W (``values="data"``) or S (``"s"``) in the locality order, memory-mapped (float32)."""
    return load_csr(root, "graph/ordered_", values=values)


def load_order(root: ArtifactRoot) -> np.ndarray:
    return np.asarray(root.load_array("graph/order.npy", mmap=False))


def write_graph_meta(root: ArtifactRoot, meta: dict) -> None:
    root.write_json("graph/meta.json", meta)


def graph_meta(root: ArtifactRoot) -> dict:
    return root.read_json("graph/meta.json")


def write_asmk_image_index(root: ArtifactRoot, offsets: np.ndarray, positions: np.ndarray) -> None:
    """(ASMK source) the inverted-file positions of each image's postings, grouped by image."""
    root.write_array("graph/asmk_image_offsets.npy", offsets)
    root.write_array("graph/asmk_image_positions.npy", positions)


def load_asmk_image_index(root: ArtifactRoot) -> tuple[np.ndarray, np.ndarray]:
    return root.load_array("graph/asmk_image_offsets.npy"), root.load_array("graph/asmk_image_positions.npy")


def graph_problem(root: ArtifactRoot, spectral: bool = False) -> str | None:
    """Why the index's graph cannot serve diffusion (None: it can) — checked by drivers before any task."""
    from storage.spectral import spectral_meta

    if not root.has_stage("graph"):
        return f"{root.uri} has no kNN graph: run retrieval graph --index {root.uri}"
    meta = spectral_meta(root) if spectral else None
    if not root.exists("graph/ordered_data.npy") or (meta is not None and meta.get("rows") != "locality order"):
        return (
            f"the graph artifacts of {root.uri} predate the solver layout (W, S, U in the locality order); "
            f"rebuild them: retrieval graph --index {root.uri}"
        )
    if spectral and meta is None:
        return (
            f"{root.uri} has no eigenpairs (spectral stage): retrieval graph --index {root.uri} --set stages=[spectral]"
        )
    return None


def load_graph(root: ArtifactRoot, spectral: bool = True, sparse_keep: float = 1.0):
    """The :class:`operators.rerank.Graph` of an index, straight from its artifacts (nothing re-permuted:
    W, S and U are stored in the locality order; large arrays stay memory-mapped, shared by the tasks
    of a node through the page cache). ``sparse_keep`` < 1 asks for SHybrid's U: the stored one when it
    was made with that fraction (else the dense U, sparsified by :func:`operators.rerank.rerank`)."""
    from operators.rerank import Graph
    from storage.spectral import load_spectral

    problem = graph_problem(root, spectral)
    if problem:
        raise ArtifactError(problem)
    order = load_order(root)
    u = lam = decomposed = None
    if spectral:  # present: graph_problem checked
        u, lam, lcc = load_spectral(root, sparse_keep)
        decomposed = np.zeros(len(order), bool)
        decomposed[lcc] = True
    return Graph(load_ordered(root), load_ordered(root, "s"), order, G.inverse_permutation(order), u, lam, decomposed)
