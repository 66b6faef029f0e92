"""Approximate global search: a faiss IVF index proposes a shortlist, exact inner products rank it.

For unit rows x_i (the global matrix, n × D) and a query q, the exact ranking is by s(q, i) = ⟨q, x_i⟩
(cosine similarity). An IVF index partitions the rows into ``nlist`` Voronoi cells of a coarse k-means; a query
visits its ``nprobe`` nearest cells and scores their rows approximately, ŝ(q, i) = ⟨P q, c(P x_i)⟩, where P is an
optional PCA to ``dim`` dimensions and c(·) the stored code (float32, 8-bit scalar quantiser or product
quantiser). The ``L`` best rows by ŝ form the shortlist S(q), and

    top-k(q) = the k rows of S(q) with the largest exact s(q, i) = ⟨q, x_i⟩, from the float32 rows,

so every reported score is the exact cosine similarity; only a true neighbour missing from S(q) is lost
(recall@k = |top-k ∩ exact top-k| / k).

The kind is chosen from the collection size and a memory budget for the codes (the float32 matrix itself stays
memory-mapped), by :func:`plan`: ``exact`` below ``exact_below`` rows; else the most faithful code that fits,

    ivf-flat  n·D·4 bytes      float32 rows in the lists (ŝ = s)
    ivf-sq8   n·dim bytes      PCA to ``dim`` ≤ D (``pca_dim``; D when it fits), 8 bits per dimension
    ivf-pq    n·m bytes        PCA to ``dim``, m sub-quantisers of 8 bits

with nlist = 4·√n cells and nprobe = max(16, nlist / 64) of them visited. With the default budget of 0.5 GB
and D = 1,280: exact up to 1.5M rows (on the real 1M root no index tried reached recall@100 0.99 faster than
brute force on two threads), IVF-SQ8 on a PCA to 256 dimensions at 2M (0.49 GB), IVF-PQ at 10M. Built from
a seeded sample (deterministic); the index is kept as ``faiss.serialize_index`` bytes in a
:class:`operators.state.State`. Pure: no Ray, no I/O.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import faiss
import numpy as np

from operators.constraints import Count, NonNegInt, PosFinite, Seed
from operators.state import State

Kind = Literal["auto", "exact", "ivf-flat", "ivf-sq8", "ivf-pq"]
ID_BYTES = 8  # faiss stores an int64 id per row in its inverted lists
SQ8_DIMS = (1024, 768, 512, 384, 256, 192, 128, 96, 64)  # PCA dimensions auto tries for SQ8, largest first


@dataclass
class AnnConfig:
    """The index job's ``global_index`` section: which approximate index the ``global`` stage builds."""

    kind: Kind = "auto"  # auto: exact below ``exact_below`` rows, else the most faithful IVF that fits the budget
    memory_gb: PosFinite = 0.5  # RAM for the index's codes and ids (the float32 matrix stays memory-mapped)
    exact_below: NonNegInt = 1_500_000  # auto: brute force below (24-31 ms/query at 1M, 2 threads; recall@100 on
    # the real 1M root: PCA512 IVF-SQ8 0.78-0.91, full-dim IVF-SQ8 0.946 at 9 ms, 0.989 at 20: docs/results.md)
    pca_dim: NonNegInt = 0  # PCA dimensions of sq8 / pq codes (0: D for sq8 when it fits, else the largest fitting)
    pq_bytes: NonNegInt = 0  # ivf-pq: bytes (sub-quantisers) per row (0: the most that fit, at most dim / 2)
    nlist: NonNegInt = 0  # coarse cells (0: 4·√n)
    default_nprobe: NonNegInt = 0  # cells visited per query, the search default (0: max(16, nlist / 64))
    rescore: PosFinite = 1.0  # shortlist re-scored exactly: L = ⌈rescore · k⌉ rows (at least k + 1)
    min_shortlist: Count = 1000  # ... and at least this many rows (behind PCA512, 1M root: 200 → 0.78, 1,000 → 0.89)
    train_per_list: Count = 39  # training rows per cell (faiss's minimum without a warning)
    niter: Count = 10  # k-means iterations (the cells need to be compact, not converged)
    seed: Seed = 0


@dataclass
class AnnPlan:
    """The resolved parameters of one index (:func:`plan`)."""

    kind: str  # exact | ivf-flat | ivf-sq8 | ivf-pq
    n: int
    d: int
    dim: int = 0  # dimensions after the PCA (d: none)
    nlist: int = 0
    nprobe: int = 0
    pq_bytes: int = 0
    rescore: float = 1.0
    min_shortlist: int = 200
    code_bytes: int = 0  # estimated RAM of the codes and ids

    @property
    def factory(self) -> str:
        """The faiss ``index_factory`` description of this plan."""
        pca = f"PCA{self.dim}," if self.dim < self.d else ""
        code = {"ivf-flat": "Flat", "ivf-sq8": "SQ8", "ivf-pq": f"PQ{self.pq_bytes}"}[self.kind]
        return f"{pca}IVF{self.nlist},{code}"

    def shortlist(self, k: int) -> int:
        """L = max(⌈rescore · k⌉, k + 1, min_shortlist), at most n."""
        return min(self.n, max(math.ceil(self.rescore * k), k + 1, self.min_shortlist))


def code_bytes(kind: str, n: int, d: int, dim: int, pq_bytes: int = 0) -> int:
    """Bytes of an index's lists: n · (code + id), code = 4·d (flat), dim (sq8) or pq_bytes (pq)."""
    per_row = {"ivf-flat": 4 * d, "ivf-sq8": dim, "ivf-pq": pq_bytes}[kind]
    return n * (per_row + ID_BYTES)


def _auto_kind(n: int, d: int, cfg: AnnConfig, budget: int) -> tuple[str, int, int]:
    """(kind, dim, pq_bytes) of the most faithful code within ``budget`` bytes (see the module doc)."""
    if code_bytes("ivf-flat", n, d, d) <= budget:
        return "ivf-flat", d, 0
    for dim in [cfg.pca_dim] if cfg.pca_dim else [d, *(x for x in SQ8_DIMS if x < d)]:
        if code_bytes("ivf-sq8", n, d, dim) <= budget:
            return "ivf-sq8", dim, 0
    dim = cfg.pca_dim or min(d, 256)
    return "ivf-pq", dim, cfg.pq_bytes or _pq_bytes(n, dim, budget)


def _pq_bytes(n: int, dim: int, budget: int) -> int:
    """The most sub-quantisers (a divisor of ``dim``, at most dim / 2, at least 4) whose codes fit ``budget``."""
    fits = [m for m in range(4, dim // 2 + 1) if dim % m == 0 and code_bytes("ivf-pq", n, dim, dim, m) <= budget]
    return max(fits) if fits else min(m for m in range(4, dim + 1) if dim % m == 0)


def plan(n: int, d: int, cfg: AnnConfig) -> AnnPlan:
    """The index for ``n`` rows of ``d`` dimensions under ``cfg`` (kind, PCA dims, nlist, nprobe, code size)."""
    budget = int(cfg.memory_gb * 2**30)
    kind, dim, pq = cfg.kind, min(cfg.pca_dim or d, d), cfg.pq_bytes
    if kind == "auto":
        if n < max(cfg.exact_below, 1):
            return AnnPlan("exact", n, d, d)
        kind, dim, pq = _auto_kind(n, d, cfg, budget)
    if kind == "exact":
        return AnnPlan("exact", n, d, d)
    if kind == "ivf-flat":
        dim = d
    elif kind == "ivf-pq":
        dim = cfg.pca_dim or min(d, 256)
        pq = pq or _pq_bytes(n, dim, budget)
        if dim % pq:
            raise ValueError(f"global_index.pq_bytes={pq} must divide the PCA dimensions {dim}")
    nlist = cfg.nlist or max(1, int(4 * math.sqrt(n)))
    nlist = min(nlist, max(1, n // 4))
    nprobe = min(nlist, cfg.default_nprobe or max(16, nlist // 64))
    return AnnPlan(kind, n, d, dim, nlist, nprobe, pq, cfg.rescore, cfg.min_shortlist, code_bytes(kind, n, d, dim, pq))


def fingerprint(ids: np.ndarray, vectors: np.ndarray, samples: int = 1024) -> str:
    """A digest of the matrix an index was built over: its shape, every id and ``samples`` evenly spaced rows
    (cheap on a memory-mapped matrix; a rebuilt or changed matrix gives another digest)."""
    n = len(ids)
    h = hashlib.sha256(f"{n}x{vectors.shape[1]}".encode())
    h.update(np.ascontiguousarray(ids, np.int64).tobytes())
    if n:
        h.update(np.ascontiguousarray(vectors[:: max(1, n // samples)], np.float32).tobytes())
    return h.hexdigest()[:32]


def train_sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted row indexes of a seeded sample of ``size`` rows (all of them when ``size ≥ n``)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _seed(index: faiss.Index, seed: int, niter: int) -> faiss.IndexIVF:
    """The IVF part of ``index`` with its k-means (and its PQ's) seeded, ``niter`` iterations."""
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed, ivf.cp.niter = seed, niter
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.pq.cp.seed, ivf.pq.cp.niter = seed, niter
        ivf.do_polysemous_training = False  # minutes of training for Hamming filtering, which search does not use
    return ivf


@dataclass
class GlobalAnn:
    """An IVF index over the rows of one global matrix (faiss ids = row positions), with its plan and the
    fingerprint of the matrix it was built over."""

    index: faiss.Index
    plan: AnnPlan
    fingerprint: str
    config: dict = field(default_factory=dict)  # the AnnConfig it was built with (as a dict)

    def state(self) -> State:
        """The index as ``faiss.serialize_index`` bytes (uint8); plan, config and fingerprint as parameters."""
        blob = np.asarray(faiss.serialize_index(self.index), np.uint8)
        params = {"plan": asdict(self.plan), "config": self.config, "fingerprint": self.fingerprint}
        return State({"index": blob}, params)

    @classmethod
    def from_state(cls, state: State) -> GlobalAnn:
        (blob,) = state.require("index", what="global ANN index")
        try:
            p = AnnPlan(**state.params["plan"])
            fp = str(state.params["fingerprint"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"global ANN parameters are incomplete ({e})") from None
        index = faiss.deserialize_index(np.ascontiguousarray(blob, np.uint8))
        if index.ntotal != p.n or index.d != p.d:
            raise ValueError(f"the index holds {index.ntotal} × {index.d}, its plan says {p.n} × {p.d}")
        return cls(index, p, fp, dict(state.params.get("config", {})))

    def search(
        self, xq: np.ndarray, vectors: np.ndarray, k: int, nprobe: int = 0, shortlist: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query: the shortlist of L = ``shortlist`` (0: :meth:`AnnPlan.shortlist`) rows by
        the index's approximate scores with ``nprobe`` (0: the plan's) cells, re-scored exactly on ``vectors``
        (:func:`rescore`); IVF-Flat's own scores are the exact ⟨q, x_i⟩ already (float32 rows), its top-k is
        returned as it is. Returns (scores, row positions), best first, padded with (−inf, −1)."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        faiss.extract_index_ivf(self.index).nprobe = nprobe or self.plan.nprobe
        if self.plan.kind == "ivf-flat":  # its lists hold the float32 rows: ŝ = s, nothing to re-score
            scores, rows = self.index.search(xq, min(k, self.plan.n))
            return np.where(rows >= 0, scores, -np.inf).astype(np.float32), rows.astype(np.int64)
        L = min(self.plan.n, max(shortlist, k) if shortlist else self.plan.shortlist(k))
        _, rows = self.index.search(xq, L)
        return rescore(xq, vectors, rows, k)


def build_ann(x: np.ndarray, p: AnnPlan, cfg: AnnConfig, ids: np.ndarray, block: int = 65536) -> GlobalAnn:
    """The index of plan ``p`` over the rows of ``x`` (memory-mapped: read in blocks of ``block`` rows),
    trained on a seeded sample of ``train_per_list · nlist`` rows (at least 39 · 256 for a PQ)."""
    if p.kind == "exact":
        raise ValueError("an exact plan has no index to build")
    index = faiss.index_factory(p.d, p.factory, faiss.METRIC_INNER_PRODUCT)
    _seed(index, cfg.seed, cfg.niter)
    size = max(cfg.train_per_list * p.nlist, 39 * 256 if p.kind == "ivf-pq" else 0)
    pick = train_sample(p.n, size, cfg.seed)
    index.train(np.ascontiguousarray(x[pick], dtype=np.float32))
    for s in range(0, p.n, block):
        index.add(np.ascontiguousarray(x[s : s + block], dtype=np.float32))
    return GlobalAnn(index, p, fingerprint(ids, x), asdict(cfg))


def rescore(xq: np.ndarray, vectors: np.ndarray, rows: np.ndarray, k: int, chunk: int = 16) -> tuple[np.ndarray, ...]:
    """The ``k`` best of each query's candidate ``rows`` (−1: none) by the exact s(q, i) = ⟨q, x_i⟩ on ``vectors``
    (memory-mapped: each chunk of queries reads the union of its candidates once, in row order).
    Returns (scores float32, rows int64), best first, padded with (−inf, −1)."""
    nq, L = rows.shape
    scores = np.full((nq, L), -np.inf, np.float32)
    for s in range(0, nq, chunk):
        r = rows[s : s + chunk]
        valid = r >= 0
        if not valid.any():
            continue
        uniq, inv = np.unique(r[valid], return_inverse=True)
        sim = xq[s : s + chunk] @ np.asarray(vectors[uniq], dtype=np.float32).T  # (chunk, U)
        block = np.full(r.shape, -np.inf, np.float32)
        block[valid] = sim[np.nonzero(valid)[0], inv]
        scores[s : s + chunk] = block
    k = min(k, L)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out_s, out_r = np.take_along_axis(scores, top, 1), np.take_along_axis(rows, top, 1)
    return out_s, np.where(np.isfinite(out_s), out_r, -1).astype(np.int64)


def merge_top(parts: list[tuple[np.ndarray, np.ndarray]], k: int, exclude: np.ndarray | None = None) -> tuple:
    """The top-``k`` per query of several (scores, ids) rankings of disjoint databases (partitions), ``exclude[i]``
    (an id, −1: none) left out of row i; padded with (−inf, −1) to ``k`` columns."""
    scores = np.concatenate([s for s, _ in parts], axis=1).astype(np.float32)
    ids = np.concatenate([i for _, i in parts], axis=1).astype(np.int64)
    if exclude is not None:
        exclude = np.asarray(exclude, np.int64)[:, None]
        gone = (ids == exclude) & (exclude >= 0)
        scores, ids = np.where(gone, -np.inf, scores).astype(np.float32), np.where(gone, -1, ids)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    pad = k - scores.shape[1]
    scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores, np.pad(np.where(np.isfinite(scores[:, : k - pad]), ids, -1), ((0, 0), (0, pad)), constant_values=-1)
