"""kNN graph and spectral stages: ``python -m jobs.graph --index ROOT`` (also stages of ``jobs.index``).

``graph``: the top-k neighbours of every database item, computed by Ray tasks over blocks of items,
from the global descriptors (faiss: exact blocks with a top-k heap, or an IVF index above
``ivf_threshold`` items; GPU faiss when present) or from ASMK similarities (every database image
searched as a query against the inverted file, single assignment; each task reads its images'
postings through a per-image index of the inverted file). Then the affinity W (mutual or
union kNN, similarities^γ; :mod:`operators.graph`). Nodes are the rows of ``global/ids.npy``.

``spectral``: the r largest eigenpairs of S = D^-1/2 W D^-1/2 on the largest connected component
(Chebyshev-filtered subspace iteration by default — r = 400 at 1M nodes in minutes on 2 cores —,
Lanczos, or FSR's simultaneous iteration; :mod:`operators.spectral`), for FSR and hybrid search.

Artifacts: :mod:`storage.graph` (kNN lists, W, the locality order, W and S in it) and
:mod:`storage.spectral` (U, λ, SHybrid's sparse U).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, NamedTuple

import numpy as np
import ray
import scipy.sparse as sp

from cluster.ray_env import RayConfig, connect, largest_node_cpus
from cluster.runner import run_tasks
from jobs.config import from_dict, parse, run_cli, to_dict
from jobs.summary import JobSummary
from operators import graph as G
from operators.constraints import Count, Fraction, NonNegInt, PosFinite, Tolerance
from operators.global_index import iter_blocks
from operators.knn import build_ivf, knn_blocks, search_ivf
from operators.spectral import eigenpairs, sparsify
from storage.artifacts import ArtifactRoot
from storage.global_index import global_ids, open_global
from storage.graph import (
    knn_writer,
    load_asmk_image_index,
    load_knn,
    load_ordered,
    write_affinity,
    write_asmk_image_index,
    write_graph_meta,
)
from storage.inverted_file import inverted_file_meta, open_inverted_file
from storage.learned import invalidate_learned
from storage.spectral import invalidate_spectral, u_writer, write_sparse_u, write_spectral

MAX_IVF_TASKS = 32  # IVF kNN tasks per graph: each deserialises the whole index, one at a time per node


@dataclass
class GraphConfig:
    source: Literal["global", "asmk"] = "global"
    k: Count = 50  # neighbours per item (T:18677-18684)
    mode: Literal["mutual", "union"] = "mutual"  # spec §1
    gamma: PosFinite = 3.0  # s = [vᵀz]₊^γ
    block: Count = 4096  # items per Ray task
    ivf_threshold: NonNegInt = 200_000  # global source: IVF (approximate) above this many items, exact below
    nlist: NonNegInt = 0  # IVF lists (0: 4·√n)
    nprobe: Count = 32


@dataclass
class SpectralConfig:
    rank: NonNegInt = 400  # r eigenpairs (T:20419-20422); 0 disables the stage
    method: Literal["chebyshev", "lanczos", "simultaneous"] = (
        "chebyshev"  # filtered subspace iteration | eigsh | FSR Alg. 1
    )
    oversample: NonNegInt = 100  # block methods: p extra vectors
    iters: Count = 30  # chebyshev: at most this many outer iterations; simultaneous: q
    degree: Count = 32  # chebyshev: filter polynomial degree
    tol: Tolerance = 1e-3  # chebyshev: max ||S u − λ u||; lanczos: relative accuracy (0: machine precision)
    sparse_keep: Fraction = 0.01  # also store SHybrid's U keeping this fraction of entries (T:20425-20431); 1: no
    max_nodes: Count = 2_000_000  # skip (with a warning) above this many LCC nodes: the block methods hold
    # ~5 blocks of n × (r + p) float32 (10 GB at 1M nodes, r + p = 500)


@dataclass(kw_only=True)
class GraphJobConfig:
    index: str  # artifact root (required)
    stages: list[Literal["graph", "spectral"]] = field(default_factory=lambda: ["graph", "spectral"])
    graph: GraphConfig = field(default_factory=GraphConfig)
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Ray tasks
# ------------------------------------------------------------------------------------------
def global_knn_task(
    uri: str,
    options: dict,
    start: int,
    stop: int,
    k: int,
    index_bytes: np.ndarray | None,
    nprobe: int,
    name: str = "global",
    threads: int = 1,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Top-k neighbours (rows, similarities) of items ``start:stop`` of the vector set ``name`` (the global
    descriptors; object discovery's regions); an IVF search runs on ``threads`` threads."""
    import faiss

    x = open_global(ArtifactRoot(uri, options), name).vectors
    xq = np.asarray(x[start:stop], np.float32)
    rows = np.arange(start, stop)
    if index_bytes is None:
        sims, nn = knn_blocks(xq, iter_blocks(np.arange(len(x)), x), k, exclude=rows)
    else:
        faiss.omp_set_num_threads(threads)
        index = faiss.deserialize_index(np.frombuffer(index_bytes, np.uint8))
        sims, nn = search_ivf(index, xq, k, nprobe, exclude=rows)
    return start, nn, sims


def asmk_knn_task(
    uri: str, options: dict, start: int, stop: int, k: int, params: dict, buffer_mb: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """Top-k neighbours of items ``start:stop`` by ASMK: their own inverted-file entries as queries."""
    from operators.asmk import AsmkParams, idf_weights, image_postings, search

    p = from_dict(AsmkParams, params)  # the inverted file's stored params, refused before any reading
    root = ArtifactRoot(uri, options)
    node_ids = np.asarray(global_ids(root))
    ivf, _ = open_inverted_file(root)
    want = node_ids[start:stop]
    dense = np.clip(np.searchsorted(ivf.images, want), 0, len(ivf.images) - 1)
    dense = dense[ivf.images[dense] == want]
    query = image_postings(ivf, *load_asmk_image_index(root), dense)  # this block's postings only
    weight = idf_weights(ivf.counts, len(ivf.images)) if p.use_idf else None
    qids, scores, ids = search(ivf, query, p, k, {int(i): int(i) for i in want}, weight, buffer_bytes=buffer_mb * 2**20)
    nn = np.full((stop - start, k), -1, np.int64)
    sims = np.full((stop - start, k), -np.inf, np.float32)
    where = {int(q): j for j, q in enumerate(want)}
    at = np.array([where[int(q)] for q in qids], np.int64)
    nn[at] = np.where(ids >= 0, rows_of(node_ids, ids), -1)
    sims[at] = scores
    return start, nn, sims


def rows_of(node_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Node rows of image ``ids`` (-1 where an id is not a node; node ids are ≥ 0, so padding stays -1)."""
    return G.index_of(node_ids, ids, -1)


# ------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------
def build_knn(cfg: GraphConfig, root: ArtifactRoot, summary: JobSummary) -> tuple[np.ndarray, np.ndarray]:
    """kNN lists of every node, computed by Ray tasks over blocks of ``cfg.block`` items."""
    n = len(global_ids(root))
    k = min(cfg.k, n - 1)
    if cfg.source == "global":
        tasks, summary.info["graph_knn"] = vector_knn(cfg, root, k)
    elif cfg.source == "asmk":
        from operators.asmk import entries_by_image

        meta = inverted_file_meta(root)
        write_asmk_image_index(root, *entries_by_image(open_inverted_file(root)[0]))  # rebuilt with every graph build
        tasks = KnnTasks(
            asmk_knn_task,
            {"num_cpus": 1},
            [
                (root.uri, root.options, s, min(n, s + cfg.block), k, meta["params"], 256)
                for s in range(0, n, cfg.block)
            ],
        )
    else:  # unreachable: validated by the config
        raise AssertionError(cfg.source)
    ids, sims, commit = knn_writer(root, n, k)
    gather_knn(tasks, ids, sims, f"kNN graph ({cfg.source})")
    commit()
    return load_knn(root)


class KnnTasks(NamedTuple):
    """Tasks returning ``(start, rows, similarities)`` of a block of items, for :func:`gather_knn`."""

    fn: Callable
    options: dict  # ray.remote's
    args: list[tuple]


def vector_knn(cfg: GraphConfig, root: ArtifactRoot, k: int, name: str = "global") -> tuple[KnnTasks, str]:
    """Ray tasks finding the top-``k`` of every row of the vector set ``name`` (exact blocks, or faiss IVF
    above ``cfg.ivf_threshold`` rows), and which of the two."""
    n = len(global_ids(root, name))
    ivf = n > cfg.ivf_threshold
    index_ref = ray.put(ivf_index(cfg, root, name) if ivf else None)  # once in the object store, not per task
    # an IVF task loads the whole index (n × D floats): one at a time per node, threading over its CPUs,
    # and at most MAX_IVF_TASKS of them
    block = cfg.block if not ivf or n <= cfg.block * MAX_IVF_TASKS else -(-n // MAX_IVF_TASKS)
    cpus = largest_node_cpus() if ivf else 1
    args = [
        (root.uri, root.options, s, min(n, s + block), k, index_ref, cfg.nprobe, name, cpus) for s in range(0, n, block)
    ]
    return KnnTasks(global_knn_task, {"num_cpus": cpus}, args), "ivf" if ivf else "exact"


def gather_knn(tasks: KnnTasks, ids: np.ndarray, sims: np.ndarray, desc: str) -> None:
    """Run ``tasks``, writing their results into ``ids`` / ``sims`` as they finish."""

    def put(got: tuple[int, np.ndarray, np.ndarray]) -> None:
        start, nn, s = got
        ids[start : start + len(nn)], sims[start : start + len(nn)] = nn, s

    run_tasks(
        tasks.fn,
        tasks.args,
        options=tasks.options,
        desc=desc,
        unit="item",
        total=len(ids),
        advance=lambda got: len(got[1]),
        on_result=put,
        keep=False,
    )


def ivf_index(cfg: GraphConfig, root: ArtifactRoot, name: str = "global") -> np.ndarray:
    """An IVF-Flat inner-product index over all vectors of ``name`` (trained on a sample), serialised."""
    import faiss

    return faiss.serialize_index(build_ivf(open_global(root, name).vectors, cfg.nlist))  # uint8 array, no copy


def build_graph(cfg: GraphConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    """kNN lists → W (CSR artifacts) and the graph's statistics."""
    t = time.time()
    nn, sims = build_knn(cfg, root, summary)
    summary.info["graph_knn_s"] = round(time.time() - t, 2)
    w = G.affinity(nn, sims, k=cfg.k, gamma=cfg.gamma, mode=cfg.mode)
    write_affinity(root, w, G.locality_order(w))
    invalidate_spectral(root)  # eigenpairs and learned re-rankers of the old graph: invalid now
    invalidate_learned(root)
    n_comp, labels = G.components(w)
    sizes = np.bincount(labels)
    meta = {
        **asdict(cfg),
        "nodes": int(w.shape[0]),
        "nnz": int(w.nnz),
        "mean_degree": float(w.nnz / max(1, w.shape[0])),
        "components": int(n_comp),
        "largest_component": int(sizes.max()),
        "isolated": int((sizes == 1).sum()),
    }
    write_graph_meta(root, meta)
    summary.add(graph_nodes=meta["nodes"], graph_edges=meta["nnz"])
    summary.info["graph"] = {k: meta[k] for k in ("mean_degree", "components", "largest_component", "isolated")}
    return meta


def build_spectral(cfg: SpectralConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    """Top-r eigenpairs of S on the LCC, stored as (n, r) U (zero rows elsewhere; rows in the locality
    order, so the solver's sparse products are cache-friendly here too) and λ."""
    w = load_ordered(root)
    lcc = G.largest_component(w)  # positions, ascending: the LCC keeps the locality order
    if len(lcc) > cfg.max_nodes:
        import warnings

        warnings.warn(
            f"spectral stage skipped: the largest component has {len(lcc)} nodes > spectral.max_nodes="
            f"{cfg.max_nodes}; --rerank fsr/hybrid need it (set spectral.max_nodes to force)"
        )
        summary.info["spectral"] = {"skipped": True, "lcc": int(len(lcc))}
        return summary.info["spectral"]
    s = G.normalize(sp.csr_matrix(w[lcc][:, lcc], dtype=np.float64))
    r = min(cfg.rank, len(lcc) - 1)
    method = cfg.method if len(lcc) > 2000 else "dense"  # small graphs: exact dense eigh
    t = time.time()
    lam, u_lcc = eigenpairs(
        s,
        r,
        method=method,
        oversample=cfg.oversample,
        iters=cfg.iters,
        tol=cfg.tol,
        degree=cfg.degree,
        dtype=np.float64 if method == "lanczos" else np.float32,
    )
    del s
    u, commit = u_writer(root, w.shape[0], r)
    u[lcc] = u_lcc
    commit()
    if cfg.sparse_keep < 1:  # SHybrid's U, so no re-ranking task sparsifies the (n, r) U again
        write_sparse_u(root, sparsify(np.asarray(u), cfg.sparse_keep, as_csr=True), cfg.sparse_keep)
    meta = {
        **asdict(cfg),
        "rank": int(r),
        "method_used": method,
        "lcc": int(len(lcc)),
        "rows": "locality order",
        "seconds": round(time.time() - t, 2),
        "lambda_min": float(lam.min()) if r else None,
    }
    write_spectral(root, lam, lcc, meta)
    summary.info["spectral"] = meta
    return meta


def run_stages(cfg: GraphJobConfig, root: ArtifactRoot, summary: JobSummary, job: str = "graph") -> None:
    """The ``graph`` and ``spectral`` stages named in ``cfg.stages`` (shared with ``jobs.index``)."""
    if "graph" in cfg.stages:
        with summary.stage("graph"):
            build_graph(cfg.graph, root, summary)
        root.record_stage("graph", job, to_dict(cfg.graph))
    if "spectral" in cfg.stages and cfg.spectral.rank > 0:
        with summary.stage("spectral"):
            meta = build_spectral(cfg.spectral, root, summary)
        if not meta.get("skipped"):
            root.record_stage("spectral", job, to_dict(cfg.spectral))


FLAGS = {
    "--index": ("index", "artifact root written by jobs.index"),
    "--source": ("graph.source", "similarity the kNN lists are built from"),
    "--k": ("graph.k", "neighbours per item"),
    "--rank": ("spectral.rank", "eigenpairs for FSR / hybrid (0: no spectral stage)"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    cfg = parse(GraphJobConfig, argv, FLAGS, __doc__, prog)
    summary = JobSummary("graph")
    connect(cfg.ray)
    root = ArtifactRoot(cfg.index, cfg.storage)
    run_stages(cfg, root, summary)
    return summary.finish(root.uri, cfg.storage)


if __name__ == "__main__":
    run_cli(main)
