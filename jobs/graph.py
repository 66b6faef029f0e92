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

    ROOT/graph/knn_ids.npy (n, k) int64 node rows (-1: none), knn_sims.npy (n, k) float32, best first
    ROOT/graph/w_indptr.npy, w_indices.npy, w_data.npy   W as CSR (float32), meta.json
    ROOT/graph/order.npy   a locality (reverse Cuthill-McKee) node order used by the solvers: order[t] = node at t
    ROOT/graph/ordered_indptr.npy, ordered_indices.npy, ordered_data.npy (W), ordered_s.npy (S)   in that order
    ROOT/graph/asmk_image_offsets.npy, asmk_image_positions.npy   (ASMK source) postings of each image
    ROOT/spectral/U.npy (n, r) float32, rows in the locality order (0 outside the LCC), lambda.npy (r,),
                  lcc.npy (LCC positions in that order), meta.json; sparse_*.npy + sparse.json: SHybrid's U
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp

from cluster.ray_env import RayConfig, connect
from jobs.config import parse, run_cli, to_dict
from jobs.summary import JobSummary
from operators import graph as G
from operators.global_index import iter_blocks
from operators.knn import build_ivf, knn_blocks, search_ivf
from operators.spectral import eigenpairs
from storage import fs as sfs
from storage.artifacts import ArtifactRoot


@dataclass
class GraphConfig:
    source: str = "global"          # global | asmk
    k: int = 50                     # neighbours per item (T:18677-18684)
    mode: str = "mutual"            # mutual | union (spec §1)
    gamma: float = 3.0              # s = [vᵀz]₊^γ
    block: int = 4096               # items per Ray task
    ivf_threshold: int = 200_000    # global source: IVF (approximate) above this many items, exact below
    nlist: int = 0                  # IVF lists (0: 4·√n)
    nprobe: int = 32


@dataclass
class SpectralConfig:
    rank: int = 400                 # r eigenpairs (T:20419-20422); 0 disables the stage
    method: str = "chebyshev"       # chebyshev (filtered subspace iteration) | lanczos | simultaneous (FSR Alg. 1)
    oversample: int = 100           # block methods: p extra vectors
    iters: int = 30                 # chebyshev: at most this many outer iterations; simultaneous: q
    degree: int = 32                # chebyshev: filter polynomial degree
    tol: float = 1e-3               # chebyshev: max ||S u − λ u||; lanczos: relative accuracy (0: machine precision)
    sparse_keep: float = 0.01       # also store SHybrid's U keeping this fraction of entries (T:20425-20431); 1: no
    max_nodes: int = 2_000_000      # skip (with a warning) above this many LCC nodes: the block methods hold
                                    # ~5 blocks of n × (r + p) float32 (10 GB at 1M nodes, r + p = 500)


@dataclass
class GraphJobConfig:
    index: str = ""
    stages: list[str] = field(default_factory=lambda: ["graph", "spectral"])
    graph: GraphConfig = field(default_factory=GraphConfig)
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Ray tasks
# ------------------------------------------------------------------------------------------
def global_knn_task(uri: str, options: dict, start: int, stop: int, k: int, index_bytes: bytes | None,
                    nprobe: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Top-k neighbours (node rows, similarities) of items ``start:stop`` by global descriptor."""
    import faiss

    root = ArtifactRoot(uri, options)
    x = root.load_array("global/vectors.npy")
    xq = np.asarray(x[start:stop], np.float32)
    rows = np.arange(start, stop)
    if index_bytes is None:
        sims, nn = knn_blocks(xq, iter_blocks(np.arange(len(x)), x), k, exclude=rows)
    else:
        index = faiss.deserialize_index(np.frombuffer(index_bytes, np.uint8))
        sims, nn = search_ivf(index, xq, k, nprobe, exclude=rows)
    return start, nn, sims


def asmk_knn_task(uri: str, options: dict, start: int, stop: int, k: int, params: dict,
                  buffer_mb: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Top-k neighbours of items ``start:stop`` by ASMK: their own inverted-file entries as queries."""
    from jobs.asmk import open_inverted_file
    from operators.asmk import AsmkParams, idf_weights, image_postings, search

    root = ArtifactRoot(uri, options)
    node_ids = np.asarray(root.load_array("global/ids.npy"))
    ivf, _ = open_inverted_file(root)
    p = AsmkParams(**params)
    want = node_ids[start:stop]
    dense = np.clip(np.searchsorted(ivf.images, want), 0, len(ivf.images) - 1)
    dense = dense[ivf.images[dense] == want]
    query = image_postings(ivf, root.load_array("graph/asmk_image_offsets.npy"),
                           root.load_array("graph/asmk_image_positions.npy"), dense)  # this block's postings only
    weight = idf_weights(ivf.counts, len(ivf.images)) if p.use_idf else None
    qids, scores, ids = search(ivf, query, p, k, {int(i): int(i) for i in want}, weight,
                               buffer_bytes=buffer_mb * 2**20)
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
    import ray
    from tqdm import tqdm

    n = len(root.load_array("global/ids.npy"))
    k = min(cfg.k, n - 1)
    if cfg.source == "global":
        index_bytes = _ivf_index(cfg, root) if n > cfg.ivf_threshold else None
        index_ref = ray.put(index_bytes)  # stored once in the object store, not copied per task
        task = ray.remote(num_cpus=1)(global_knn_task)
        futures = [task.remote(root.uri, root.options, s, min(n, s + cfg.block), k, index_ref, cfg.nprobe)
                   for s in range(0, n, cfg.block)]
        summary.info["graph_knn"] = "ivf" if index_bytes is not None else "exact"
    elif cfg.source == "asmk":
        from jobs.asmk import open_inverted_file
        from operators.asmk import entries_by_image

        meta = sfs.read_json(root.path("asmk", "meta.json"), root.options)
        offsets, positions = entries_by_image(open_inverted_file(root)[0])  # rebuilt with every graph build
        root.write_array("graph/asmk_image_offsets.npy", offsets)
        root.write_array("graph/asmk_image_positions.npy", positions)
        del positions
        task = ray.remote(num_cpus=1)(asmk_knn_task)
        futures = [task.remote(root.uri, root.options, s, min(n, s + cfg.block), k, meta["params"], 256)
                   for s in range(0, n, cfg.block)]
    else:
        raise SystemExit(f"graph.source must be global or asmk, not {cfg.source!r}")
    ids, commit_i = root.open_array_writer("graph/knn_ids.npy", (n, k), np.int64)
    sims, commit_s = root.open_array_writer("graph/knn_sims.npy", (n, k), np.float32)
    with tqdm(total=n, desc=f"kNN graph ({cfg.source})", unit="item") as bar:
        while futures:
            done, futures = ray.wait(futures)
            for start, nn, s in ray.get(done):
                ids[start:start + len(nn)], sims[start:start + len(nn)] = nn, s
                bar.update(len(nn))
    commit_i(), commit_s()
    return root.load_array("graph/knn_ids.npy"), root.load_array("graph/knn_sims.npy")


def _ivf_index(cfg: GraphConfig, root: ArtifactRoot) -> bytes:
    """An IVF-Flat inner-product index over all global vectors (trained on a sample), serialised."""
    import faiss

    return faiss.serialize_index(build_ivf(root.load_array("global/vectors.npy"), cfg.nlist)).tobytes()


def build_graph(cfg: GraphConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    """kNN lists → W (CSR artifacts) and the graph's statistics."""
    t = time.time()
    nn, sims = build_knn(cfg, root, summary)
    summary.info["graph_knn_s"] = round(time.time() - t, 2)
    w = G.affinity(nn, sims, k=cfg.k, gamma=cfg.gamma, mode=cfg.mode)
    write_csr(root, "graph/w_", w)
    order = G.locality_order(w)
    root.write_array("graph/order.npy", order)
    write_ordered(root, w, order)
    if sfs.exists(root.path("spectral", "meta.json"), root.options):  # eigenpairs of the old graph: invalid now
        sfs.remove(root.path("spectral", "meta.json"), root.options)
    n_comp, labels = G.components(w)
    sizes = np.bincount(labels)
    meta = {**asdict(cfg), "nodes": int(w.shape[0]), "nnz": int(w.nnz), "mean_degree": float(w.nnz / max(1, w.shape[0])),
            "components": int(n_comp), "largest_component": int(sizes.max()), "isolated": int((sizes == 1).sum())}
    sfs.write_json(root.path("graph", "meta.json"), meta, root.options)
    summary.add(graph_nodes=meta["nodes"], graph_edges=meta["nnz"])
    summary.info["graph"] = {k: meta[k] for k in ("mean_degree", "components", "largest_component", "isolated")}
    return meta


def write_csr(root: ArtifactRoot, prefix: str, m: sp.csr_matrix, **more_values: np.ndarray) -> None:
    """``prefix``indptr (int64), indices (int32), data (float32) ``.npy`` artifacts of a CSR matrix, plus
    other value arrays on the same structure (``name=array``)."""
    for name, arr in (("indptr", m.indptr.astype(np.int64)), ("indices", m.indices.astype(np.int32)),
                      ("data", m.data.astype(np.float32)),
                      *((k, v.astype(np.float32)) for k, v in more_values.items())):
        root.write_array(f"{prefix}{name}.npy", arr)


def load_csr(root: ArtifactRoot, prefix: str, n_cols: int | None = None, values: str = "data") -> sp.csr_matrix:
    """A CSR matrix from :func:`write_csr` artifacts, index and value arrays memory-mapped (no copy)."""
    indptr = np.asarray(root.load_array(f"{prefix}indptr.npy"))
    shape = (len(indptr) - 1, len(indptr) - 1 if n_cols is None else n_cols)
    return sp.csr_matrix((root.load_array(f"{prefix}{values}.npy"), root.load_array(f"{prefix}indices.npy"), indptr),
                         shape=shape, copy=False)


def load_affinity(root: ArtifactRoot) -> sp.csr_matrix:
    """W from its CSR artifacts, in node order (float64)."""
    return sp.csr_matrix(load_csr(root, "graph/w_"), dtype=np.float64)


def write_ordered(root: ArtifactRoot, w: sp.csr_matrix, order: np.ndarray) -> None:
    """W and S = D^-1/2 W D^-1/2 with nodes in the locality order, as the solvers use them: one CSR
    structure (sorted indices) and two float32 value arrays, memory-mapped by every re-ranking task."""
    wo = sp.csr_matrix(sp.csr_matrix(w)[order][:, order])
    wo.sort_indices()
    so = G.normalize(wo)  # same structure: D^-1/2 W D^-1/2 keeps W's nonzeros
    write_csr(root, "graph/ordered_", wo, s=so.data)


def load_ordered(root: ArtifactRoot, values: str = "data") -> sp.csr_matrix:
    """W (``values="data"``) or S (``"s"``) in the locality order, memory-mapped (float32)."""
    return load_csr(root, "graph/ordered_", values=values)


def graph_problem(root: ArtifactRoot, spectral: bool = False) -> str | None:
    """Why the index's graph cannot serve diffusion (None: it can) — checked by drivers before any task."""
    if "graph" not in root.meta().get("stages", {}):
        return f"{root.uri} has no kNN graph: run python -m jobs.graph --index {root.uri}"
    meta_uri = root.path("spectral", "meta.json")
    spectral_meta = sfs.read_json(meta_uri, root.options) if spectral and sfs.exists(meta_uri, root.options) else None
    if not sfs.exists(root.path("graph", "ordered_data.npy"), root.options) or (
            spectral_meta is not None and spectral_meta.get("rows") != "locality order"):
        return (f"the graph artifacts of {root.uri} predate the solver layout (W, S, U in the locality order); "
                f"rebuild them: python -m jobs.graph --index {root.uri}")
    if spectral and spectral_meta is None:
        return (f"{root.uri} has no eigenpairs (spectral stage): "
                f"python -m jobs.graph --index {root.uri} --set stages=[spectral]")
    return None


def write_sparse_u(root: ArtifactRoot, keep: float) -> None:
    """SHybrid's U (all but the ``keep`` fraction of largest |entries| zeroed) as CSR artifacts, so no
    re-ranking task sparsifies the (n, r) U again."""
    from operators.spectral import sparsify

    us = sparsify(np.asarray(root.load_array("spectral/U.npy")), keep, as_csr=True)
    write_csr(root, "spectral/sparse_", us)
    sfs.write_json(root.path("spectral", "sparse.json"), {"keep": keep, "shape": list(us.shape), "nnz": int(us.nnz)},
                   root.options)


def load_sparse_u(root: ArtifactRoot, keep: float) -> sp.csr_matrix | None:
    """The stored SHybrid U if it was made with ``keep`` (None otherwise), memory-mapped."""
    if not sfs.exists(root.path("spectral", "sparse.json"), root.options):
        return None
    info = sfs.read_json(root.path("spectral", "sparse.json"), root.options)
    if info["keep"] != keep:
        return None
    return load_csr(root, "spectral/sparse_", n_cols=info["shape"][1])


def load_graph(root: ArtifactRoot, spectral: bool = True, sparse_keep: float = 1.0):
    """The :class:`operators.rerank.Graph` of an index, straight from its artifacts (nothing re-permuted:
    W, S and U are stored in the locality order; large arrays stay memory-mapped, shared by the tasks
    of a node through the page cache). ``sparse_keep`` < 1 asks for SHybrid's U: the stored one when it
    was made with that fraction (else the dense U, sparsified by :func:`operators.rerank.rerank`)."""
    from operators.rerank import Graph

    problem = graph_problem(root, spectral)
    if problem:
        raise ValueError(problem)
    order = np.asarray(root.load_array("graph/order.npy", mmap=False))
    u = lam = decomposed = None
    if spectral:  # present: graph_problem checked
        u = root.load_array("spectral/U.npy")
        lam = np.asarray(root.load_array("spectral/lambda.npy"), np.float64)
        decomposed = np.zeros(len(order), bool)
        decomposed[np.asarray(root.load_array("spectral/lcc.npy"))] = True
        if sparse_keep < 1:
            stored = load_sparse_u(root, sparse_keep)
            u = u if stored is None else stored
    return Graph(load_ordered(root), load_ordered(root, "s"), order, G.inverse_permutation(order), u, lam, decomposed)


def build_spectral(cfg: SpectralConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    """Top-r eigenpairs of S on the LCC, stored as (n, r) U (zero rows elsewhere; rows in the locality
    order, so the solver's sparse products are cache-friendly here too) and λ."""
    w = load_ordered(root)
    lcc = G.largest_component(w)  # positions, ascending: the LCC keeps the locality order
    if len(lcc) > cfg.max_nodes:
        import warnings
        warnings.warn(f"spectral stage skipped: the largest component has {len(lcc)} nodes > spectral.max_nodes="
                      f"{cfg.max_nodes}; --rerank fsr/hybrid need it (set spectral.max_nodes to force)")
        summary.info["spectral"] = {"skipped": True, "lcc": int(len(lcc))}
        return summary.info["spectral"]
    s = G.normalize(sp.csr_matrix(w[lcc][:, lcc], dtype=np.float64))
    r = min(cfg.rank, len(lcc) - 1)
    method = cfg.method if len(lcc) > 2000 else "dense"  # small graphs: exact dense eigh
    t = time.time()
    lam, u_lcc = eigenpairs(s, r, method=method, oversample=cfg.oversample, iters=cfg.iters, tol=cfg.tol,
                            degree=cfg.degree, dtype=np.float64 if method == "lanczos" else np.float32)
    del s
    u, commit = root.open_array_writer("spectral/U.npy", (w.shape[0], r), np.float32)
    u[:] = 0
    u[lcc] = u_lcc
    commit()
    root.write_array("spectral/lambda.npy", lam.astype(np.float64))
    root.write_array("spectral/lcc.npy", lcc.astype(np.int64))
    if cfg.sparse_keep < 1:
        write_sparse_u(root, cfg.sparse_keep)
    meta = {**asdict(cfg), "rank": int(r), "method_used": method, "lcc": int(len(lcc)), "rows": "locality order",
            "seconds": round(time.time() - t, 2), "lambda_min": float(lam.min()) if r else None}
    sfs.write_json(root.path("spectral", "meta.json"), meta, root.options)
    summary.info["spectral"] = meta
    return meta


def run_stages(cfg: GraphJobConfig, root: ArtifactRoot, summary: JobSummary) -> None:
    """The ``graph`` and ``spectral`` stages named in ``cfg.stages`` (shared with ``jobs.index``)."""
    if "graph" in cfg.stages:
        with summary.stage("graph"):
            build_graph(cfg.graph, root, summary)
        root.record_stage("graph", to_dict(cfg.graph))
    if "spectral" in cfg.stages and cfg.spectral.rank > 0:
        with summary.stage("spectral"):
            meta = build_spectral(cfg.spectral, root, summary)
        if not meta.get("skipped"):
            root.record_stage("spectral", to_dict(cfg.spectral))


FLAGS = {
    "--index": ("index", str, "artifact root written by jobs.index"),
    "--source": ("graph.source", str, "global | asmk"),
    "--k": ("graph.k", int, "neighbours per item"),
    "--rank": ("spectral.rank", int, "eigenpairs for FSR / hybrid (0: no spectral stage)"),
}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(GraphJobConfig, argv, FLAGS, __doc__)
    summary = JobSummary("graph")
    connect(cfg.ray)
    root = ArtifactRoot(cfg.index, cfg.storage)
    run_stages(cfg, root, summary)
    return summary.finish(root.path("summary-graph.json"), cfg.storage)


if __name__ == "__main__":
    run_cli(main)
