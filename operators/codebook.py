"""Visual codebook: flat k-means with faiss, and (multiple) assignment of descriptors to words.

q(x) = nearest centroid (ASMK IJCV L6835-6848); k = 65,536 by default (L7519-7520, L9520).
Multiple assignment replicates a query descriptor to its m nearest words (m = 5, L7537-7542,
L9524); the database uses single assignment. k-means runs faiss (GPU when faiss sees GPUs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

from operators.constraints import AtLeast2, Count

log = logging.getLogger(__name__)


def effective_k(n_samples: int, k: int, min_points_per_centroid: int = 39) -> int:
    """``k`` reduced (to a power of two) when the sample is too small for it; faiss wants ≥ 39 points per centroid."""
    if n_samples >= k * min_points_per_centroid:
        return k
    reduced = 2 ** int(np.floor(np.log2(max(2, n_samples // min_points_per_centroid))))
    return max(2, min(k, reduced))


def train_codebook(
    x: np.ndarray, k: int, niter: int = 10, seed: int = 1234, gpu: bool | None = None, threads: int | None = None
) -> np.ndarray:
    """k-means centroids (k, d) float32 of samples ``x`` (L2 k-means, like the reference asmk);
    ``threads``: faiss's OpenMP threads (a Ray worker starts with as many as its task's CPUs)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if threads:
        faiss.omp_set_num_threads(threads)
    use_gpu = faiss.get_num_gpus() > 0 if gpu is None else gpu
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, gpu=bool(use_gpu), verbose=False)
    t0 = time.time()
    km.train(x)
    log.info("k-means k=%d on %s in %.1f s", k, x.shape, time.time() - t0)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


@dataclass
class AssignConfig:
    """How descriptors find their nearest words: ``flat`` (exact, faiss brute force) or ``hnsw`` (faiss
    HNSW graph over the centroids: approximate, several times faster on a 64k codebook; see
    ``benchmarks/assignment.py`` for the agreement with the exact words)."""

    method: Literal["flat", "hnsw"] = "flat"
    hnsw_m: AtLeast2 = 32  # HNSW: links per node
    ef_construction: Count = 80  # HNSW: candidate list while building
    ef_search: Count = 64  # HNSW: candidate list per search (at least m of multiple assignment)


class Quantizer:
    """Nearest-word assignment: a faiss index over the centroids, exact (flat L2) or HNSW (:class:`AssignConfig`)."""

    def __init__(self, centroids: np.ndarray, cfg: AssignConfig | None = None):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.cfg = cfg or AssignConfig()
        d = self.centroids.shape[1]
        if self.cfg.method == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.cfg.hnsw_m)
            index.hnsw.efConstruction = self.cfg.ef_construction
        else:
            index = faiss.IndexFlatL2(d)
            if faiss.get_num_gpus() > 0:  # pragma: no cover - GPU machines only
                index = faiss.index_cpu_to_all_gpus(index)
        index.add(self.centroids)
        self.index = index

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    def __call__(self, x: np.ndarray, m: int = 1) -> np.ndarray:
        """Word ids (n, m) of the m nearest centroids of each row of ``x``."""
        if len(x) == 0:
            return np.zeros((0, m), np.int64)
        if self.cfg.method == "hnsw":
            self.index.hnsw.efSearch = max(self.cfg.ef_search, m)
        _, words = self.index.search(np.ascontiguousarray(x, dtype=np.float32), m)
        return words
