"""Diffusion re-ranking of initial rankings on a kNN graph (spec search.md §2-§6).

Inputs are node rows (positions in the graph) of each query's initial ranking and their
similarities. The query never enters the graph: its seeds are y_i = [s(q, x_i)]₊^γ over its
first k_q = 10 results (T:18318-18322). Methods:

- ``dfs``: f = (1 − α)(I − αS)⁻¹ y over the whole graph by CG (:func:`operators.diffusion.temporal`);
- ``truncated-dfs``: the same on the query's top-T shortlist, subgraph re-normalised (T:18576-18583);
- ``fsr``: f = U h(Λ) Uᵀ y (nodes outside the decomposed LCC keep f_i = y_i, T:19618-19622), or FSRw
  (``fsrw``: f_i + (1 − η_i) s(q, x_i) over the initial ranking, T:19561-19580);
- ``hybrid``: U g(Λ) Uᵀ y + a few CG iterations on the residual graph (T:20133-20207).

The new ranking lists the items with f > 0 by f (ties: initial order), then the remaining items of
the initial ranking in their initial order (score 0) — so truncated re-ranking keeps the initial
order outside its shortlist, and nothing the initial search found is lost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from operators.constraints import (
    Count,
    Fraction,
    NonNegFinite,
    NonNegInt,
    OpenUnit,
    PosFinite,
    Tolerance,
)
from operators.diffusion import seeds, temporal, truncated
from operators.graph import index_of, inverse_permutation, locality_order, normalize
from operators.spectral import fsr, fsr_weighted, hybrid, sparsify

DIFFUSION = ("dfs", "truncated-dfs", "fsr", "hybrid")
LEARNED = ("gss", "gradnet")  # trained offline (jobs.train_reranker), applied by jobs.search
SHORTLIST = ("cas",)  # solved per query on its shortlist, from the global descriptors (operators.cas)
METHODS = ("none", "aqe", "alpha-qe", *DIFFUSION, *LEARNED, *SHORTLIST)


@dataclass
class RerankParams:
    alpha: OpenUnit = 0.99  # diffusion α (T:18643-18644)
    kq: Count = 10  # query seeds: first k_q results (T:18683-18684)
    gamma: PosFinite = 3.0  # seed weight [s]₊^γ
    iters: Count = 20  # CG iterations, temporal / truncated (T:18692-18698)
    tol: Tolerance = 1e-6  # CG relative residual [ext]
    shortlist: Count = 1000  # truncated: top-T of the initial ranking
    hybrid_iters: NonNegInt = 5  # hybrid: CG iterations on the residual (T:20419-20422)
    qe_alpha: NonNegFinite = 3.0  # αQE exponent (α = 0: AQE) (T:3506-3515)
    qe_n: Count = 50  # αQE: results averaged
    block: Count = 64  # queries per multi-right-hand-side solve
    dtype: Literal["float32", "float64"] = (
        "float32"  # solver precision: float32 halves memory traffic; float64 for exactness tests
    )
    sparse_keep: Fraction = 1.0  # fsr / hybrid: keep this fraction of U's entries (SHybrid: 0.01, T:20425-20431)
    fsrw: bool = False  # fsr: FSRw, x_i + (1 − η_i) s(q, x_i) over the initial ranking (T:19561-19580)


@dataclass
class Graph:
    """What diffusion needs of the graph, stored in a locality order (:func:`operators.graph.locality_order`).

    Position t holds node ``order[t]``: W and S = D^-1/2 W D^-1/2 are permuted alike, as are the
    rows of U (zero outside the LCC). Use :meth:`build` from matrices in node order.
    """

    w: sp.csr_matrix
    s: sp.csr_matrix
    order: np.ndarray  # (n,) node at each position
    position: np.ndarray  # (n,) position of each node (inverse of ``order``)
    u: np.ndarray | sp.csr_matrix | None = None  # (n, r)
    lam: np.ndarray | None = None  # (r,)
    decomposed: np.ndarray | None = None  # (n,) bool: positions inside the decomposed LCC

    @classmethod
    def build(
        cls, w: sp.spmatrix, u: np.ndarray | None = None, lam: np.ndarray | None = None, order: np.ndarray | None = None
    ) -> "Graph":
        order = locality_order(w) if order is None else np.asarray(order, np.int64)
        position = inverse_permutation(order)
        wp = sp.csr_matrix(sp.csr_matrix(w)[order][:, order])
        wp.sort_indices()
        u = None if u is None else u[order]
        decomposed = None if u is None else np.count_nonzero(u, axis=1) > 0
        return cls(wp, normalize(wp), order, position, u, lam, decomposed)

    @property
    def n(self) -> int:
        return self.w.shape[0]


def rerank(
    method: str, graph: Graph, rows: np.ndarray, sims: np.ndarray, own: np.ndarray, topk: int, p: RerankParams
) -> tuple[np.ndarray, np.ndarray]:
    """New (m, topk) node rows and scores for initial rankings ``rows``/``sims`` (m, K; -1 padding).

    ``own[j]`` is query j's own node row (left out of its ranking), -1 when none.
    """
    if method in ("fsr", "hybrid") and p.sparse_keep < 1 and graph.u is not None and not sp.issparse(graph.u):
        graph = dataclasses.replace(graph, u=sparsify(graph.u, p.sparse_keep, as_csr=True))
    out_r = np.full((len(rows), topk), -1, np.int64)
    out_s = np.full((len(rows), topk), -np.inf)
    for a in range(0, len(rows), p.block):
        b = min(len(rows), a + p.block)
        f_rows, f = _diffuse(method, graph, rows[a:b], sims[a:b], own[a:b], p)
        for j in range(b - a):
            r, s = merge_with_initial(f_rows[j], f[j], rows[a + j], own[a + j], topk)
            out_r[a + j, : len(r)], out_s[a + j, : len(s)] = r, s
    return out_r, out_s


def _diffuse(
    method: str, g: Graph, rows: np.ndarray, sims: np.ndarray, own: np.ndarray, p: RerankParams
) -> tuple[np.ndarray, np.ndarray]:
    """(candidate rows, f) per query: every node for the full-graph methods, the shortlist for truncated."""
    local = np.where(rows >= 0, g.position[np.maximum(rows, 0)], -1)
    if method == "truncated-dfs":
        short = rows[:, : p.shortlist]
        rank = np.arange(short.shape[1])[None, :]
        y = np.where(
            (short >= 0) & (rank < p.kq), np.maximum(np.nan_to_num(sims[:, : p.shortlist], neginf=0), 0) ** p.gamma, 0
        )
        return short, truncated(g.w, local[:, : p.shortlist], y, p.alpha, p.tol, p.iters)
    y = seeds(g.n, local, sims, p.kq, p.gamma, dtype=np.dtype(p.dtype).type)
    if method == "dfs":
        f = temporal(g.s, y, p.alpha, p.tol, p.iters)
    elif method == "fsr":
        _need_spectral(g, method)
        f = fsr(g.u, g.lam, y, p.alpha)
        f[~g.decomposed] = y[~g.decomposed]
        if p.fsrw:  # + (1 − η_i) s(q, x_i) over the initial ranking (η = 0 outside the decomposed LCC)
            fsr_weighted(f, g.u, seeds(g.n, local, sims, rows.shape[1], 1.0, dtype=f.dtype.type))
    elif method == "hybrid":
        _need_spectral(g, method)
        f = hybrid(g.s, g.u, g.lam, y, p.alpha, p.hybrid_iters)
    else:
        raise ValueError(f"unknown diffusion method {method!r}; available: {DIFFUSION}")
    return np.broadcast_to(g.order, (len(rows), g.n)), np.ascontiguousarray(f.T)  # one row per query


def _need_spectral(g: Graph, method: str) -> None:
    if g.u is None or g.lam is None:
        raise ValueError(f"--rerank {method} needs the spectral stage (eigenpairs) of the index")


def merge_with_initial(
    cand: np.ndarray, f: np.ndarray, initial: np.ndarray, own: int, topk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Items with f > 0 by decreasing f (ties: initial order, then row), then the rest of ``initial``."""
    cand, f = np.asarray(cand), np.asarray(f)
    if len(f) > topk + 1:  # only the best topk (+ the query's own row) can be listed: cut a 1M-long f first
        best = np.argpartition(-f, topk)[: topk + 1]
        cand, f = cand[best], f[best]
    f = f.astype(np.float64)
    ok = (cand >= 0) & (f > 0) & (cand != own)  # padding has f = 0
    cand, f = cand[ok], f[ok]
    init = np.asarray(initial)
    init = init[(init >= 0) & (init != own)]
    order = np.lexsort((cand, index_of(init, cand, len(init)), -f))[:topk]
    rows, scores = cand[order], f[order]
    rest = init[~np.isin(init, rows)][: max(0, topk - len(rows))]
    return np.r_[rows, rest].astype(np.int64), np.r_[scores, np.zeros(len(rest))]


def neighbour_cosines(xq: np.ndarray, top: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Global cosine of each query to its database rows ``top`` (−1 padding: 0), gathered from ``x``."""
    near = np.asarray(x[np.maximum(top, 0).ravel()], np.float32).reshape(*top.shape, -1)
    return np.where(top >= 0, np.einsum("qd,qkd->qk", xq, near), 0.0)
