"""Exact top-k inner-product search over a database that arrives block by block.

Same pattern as faiss ``contrib/exhaustive_search.knn_ground_truth``: each database block is
searched with faiss (GPU when faiss has GPUs), and a ``faiss.ResultHeap`` keeps only the top-k per
query — memory O(queries × k), never queries × database.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import faiss
import numpy as np

log = logging.getLogger(__name__)


def _block_knn(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, len(xb))
    if faiss.get_num_gpus() > 0:  # pragma: no cover - GPU machines only
        res = faiss.StandardGpuResources()
        return faiss.knn_gpu(res, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)


def knn_blocks(
    xq: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` database items per query by inner product.

    ``blocks`` yields ``(ids, vectors)`` pairs (int64 ids, float32 rows). ``exclude[i]`` is an id
    that query ``i`` must not return (itself, when the query is a database image; -1 for none).
    Returns ``(scores, ids)`` of shape (nq, k), best first, padded with (-inf, -1).
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    extra = 0 if exclude is None else 1
    heap = faiss.ResultHeap(len(xq), k + extra, keep_max=True)
    t0, seen = time.time(), 0
    for ids, xb in blocks:
        if len(xb) == 0:
            continue
        d, i = _block_knn(xq, np.ascontiguousarray(xb, dtype=np.float32), k + extra)
        pad = k + extra - d.shape[1]
        gids = np.where(i >= 0, np.asarray(ids, np.int64)[np.maximum(i, 0)], -1)
        if pad:
            d = np.pad(d, ((0, 0), (0, pad)), constant_values=-np.inf)
            gids = np.pad(gids, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(gids, np.int64))
        seen += len(xb)
        log.debug("knn: %d database items, %.3f s", seen, time.time() - t0)
    heap.finalize()
    scores, ids = heap.D, heap.I
    if exclude is not None:
        scores, ids = drop_ids(scores, ids, np.asarray(exclude, np.int64), k)
    return scores, ids


def drop_ids(scores: np.ndarray, ids: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove ``exclude[i]`` from row i of a ranked list (order kept), truncating to ``k`` columns."""
    hit = (ids == exclude[:, None]) & (exclude[:, None] >= 0)
    order = np.argsort(hit, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def drop_groups(
    scores: np.ndarray, ids: np.ndarray, group: np.ndarray, query_group: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove from row i every item of ``query_group[i]`` (``group[id]`` is an item's group, e.g. the
    image a region belongs to), order kept, truncated to ``k`` columns padded with (−inf, −1)."""
    hit = (ids < 0) | (group[np.maximum(ids, 0)] == query_group[:, None])
    order = np.argsort(hit, axis=1, kind="stable")[:, :k]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    gone = np.take_along_axis(hit, order, 1)
    return np.where(gone, -np.inf, scores).astype(np.float32), np.where(gone, -1, ids)


def build_ivf(
    x: np.ndarray, nlist: int = 0, train_per_list: int = 39, block: int = 65536, seed: int = 0, niter: int = 10
) -> faiss.Index:
    """An IVF-Flat inner-product index over the rows of ``x`` (trained on a sample, added in blocks).

    ``nlist`` 0 picks 4·√n lists. Approximate: used for kNN graphs above a size threshold, searched
    with ``nprobe`` lists per query (T:18570-18575: approximate graphs lose little). The coarse quantiser is
    trained with 39 points a list and 10 iterations: at 1M × 1,280-d, 25 iterations on 64 points a list took
    ~20 minutes on 2 cores, and the lists only need to be compact, not converged.
    """
    n, d = x.shape
    nlist = nlist or max(1, int(4 * np.sqrt(n)))
    pick = np.sort(np.random.default_rng(seed).choice(n, min(n, train_per_list * nlist), replace=False))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = niter
    index.train(np.ascontiguousarray(x[pick], dtype=np.float32))
    for s in range(0, n, block):
        index.add(np.ascontiguousarray(x[s : s + block], dtype=np.float32))
    return index


def search_ivf(
    index: faiss.Index, xq: np.ndarray, k: int, nprobe: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of an IVF index (as :func:`knn_blocks`: scores, ids, best first, ``exclude`` dropped)."""
    index.nprobe = nprobe
    extra = 0 if exclude is None else 1
    scores, ids = index.search(np.ascontiguousarray(xq, dtype=np.float32), k + extra)
    if exclude is not None:
        scores, ids = drop_ids(scores, ids, np.asarray(exclude, np.int64), k)
    return scores, ids
