"""ASMK / ASMK*: aggregation per visual word, selective match kernel, inverted file, batch search.

Match kernel (ASMK IJCV eq.21-22, seed 002 L7246-7262; HOW eq.4, L9190-9198):
    K(X, Y) = γ(X) γ(Y) Σ_{c ∈ C_X ∩ C_Y} w_c σ_α( V̂(X_c)ᵀ V̂(Y_c) ),
    V(X_c) = Σ_{x ∈ X_c} (x − q(x)),  V̂ = V / ||V||,
    σ_α(u) = sign(u) |u|^α if u ≥ τ else 0,  α = 3, τ = 0 (L7185-7200, L7581-7590),
    γ(X) = (Σ_{c ∈ C_X} w_c)^{-1/2}  (so K(X, X) = 1, [derived + ext]).
ASMK* binarises V: b = sign(V) packed to d bits, and V̂ᵀV̂' becomes 1 − 2 h(b, b')/d (L7322-7361,
L6936-6950); as in HOW (L9209-9211) there is no random projection and no median. With IDF,
w_c = log(N / n_c)² (N images, n_c entries of word c) [ext: jenicek/asmk, "squared for both images"].
Numerical conventions follow the reference ``asmk`` package so scores agree to 1e-5: the bit of a
dimension is set when V > 0, non-binary vectors are V / (||V|| + 1e-6), σ keeps u ≥ τ.

The inverted file is word-partitioned: postings of word c are rows ``offsets[c]:offsets[c+1]`` of
``entry_image`` (uint32 index into ``images``, the real int64 ids) and ``codes`` (uint8 packed bits,
or float32 unit vectors). Search scores a chunk of queries at once: every (query entry, posting)
pair of the same word is scored with vectorised popcounts, accumulated per (query, image) in a
chunk-sized buffer, and only the top-k per query is kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AsmkParams:
    binary: bool = True          # ASMK* (packed sign bits) or ASMK (unit float vectors)
    alpha: float = 3.0           # selectivity exponent α
    tau: float = 0.0             # similarity threshold τ
    use_idf: bool = False        # w_c = log(N / n_c)²; HOW drops it (L9209)
    db_ma: int = 1               # database: single assignment
    query_ma: int = 5            # query: multiple assignment m


@dataclass
class Aggregated:
    """One row per (image, visual word), sorted by image then word."""

    image_ids: np.ndarray   # (E,) int64
    words: np.ndarray       # (E,) int64
    codes: np.ndarray       # (E, d/8) uint8 packed bits, or (E, d) float32


def binarize(v: np.ndarray) -> np.ndarray:
    """Pack sign bits (1 where v > 0) of each row: (E, d) -> (E, d/8) uint8."""
    return np.packbits(v > 0, axis=1)


def aggregate(desc: np.ndarray, image_ids: np.ndarray, words: np.ndarray, centroids: np.ndarray,
              binary: bool = True) -> Aggregated:
    """V(X_c) = Σ residuals per (image, word); a descriptor with m assigned words counts once in each.

    ``desc`` (n, d), ``image_ids`` (n,), ``words`` (n, m) from :class:`operators.codebook.Quantizer`.
    """
    n, m = words.shape
    d = desc.shape[1]
    if n == 0:
        width = d // 8 if binary else d
        return Aggregated(np.zeros(0, np.int64), np.zeros(0, np.int64),
                          np.zeros((0, width), np.uint8 if binary else np.float32))
    rows = np.repeat(np.arange(n), m)
    w = words.reshape(-1).astype(np.int64)
    img = np.asarray(image_ids, np.int64)[rows]
    order = np.lexsort((w, img))
    rows, w, img = rows[order], w[order], img[order]
    residual = np.asarray(desc, np.float32)[rows] - centroids[w]
    start = np.flatnonzero(np.r_[True, (img[1:] != img[:-1]) | (w[1:] != w[:-1])])
    v = np.add.reduceat(residual, start, axis=0)
    if binary:
        codes = binarize(v)
    else:
        codes = (v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-6)).astype(np.float32)
    return Aggregated(img[start], w[start], codes)


def selectivity(u: np.ndarray, alpha: float, tau: float) -> np.ndarray:
    """σ_α(u) = sign(u)|u|^α where u ≥ τ, else 0."""
    return np.where(u >= tau, np.sign(u) * np.abs(u) ** alpha, 0.0)


@dataclass
class InvertedFile:
    """Word-partitioned postings (arrays may be memory-mapped); see the module doc."""

    offsets: np.ndarray       # (k+1,) int64
    entry_image: np.ndarray   # (N,) uint32, index into ``images``
    codes: np.ndarray         # (N, B) uint8 or (N, d) float32
    images: np.ndarray        # (n_img,) int64 real image ids, sorted
    image_entries: np.ndarray  # (n_img,) int64 number of postings of each image
    binary: bool = True

    @property
    def k(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def dim(self) -> int:
        return self.codes.shape[1] * 8 if self.binary else self.codes.shape[1]

    def bytes_per_entry(self) -> float:
        return (self.entry_image.itemsize + self.codes.shape[1] * self.codes.itemsize)


def build_inverted_file(agg: Aggregated, k: int, binary: bool = True) -> InvertedFile:
    """An in-memory inverted file from aggregated entries (any image order; ids need not be consecutive)."""
    images, dense = np.unique(agg.image_ids, return_inverse=True)
    order = np.lexsort((agg.image_ids, agg.words))
    counts = np.bincount(agg.words, minlength=k)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return InvertedFile(offsets, dense[order].astype(np.uint32), np.ascontiguousarray(agg.codes[order]), images,
                        np.bincount(dense, minlength=len(images)).astype(np.int64), binary)


def idf_weights(counts: np.ndarray, n_images: int) -> np.ndarray:
    """w_c = log(N / n_c)² for non-empty words (1 for empty ones, as the reference)."""
    w = np.ones(len(counts), np.float64)
    nz = counts > 0
    w[nz] = np.log(n_images / counts[nz]) ** 2
    return w


def image_norms(ivf: InvertedFile, word_weight: np.ndarray | None) -> np.ndarray:
    """Σ_{c ∈ C_X} w_c per image (its γ(X)^{-2}); the posting count when there is no IDF."""
    if word_weight is None:
        return ivf.image_entries.astype(np.float64)
    words = np.repeat(np.arange(ivf.k), ivf.counts)
    return np.bincount(ivf.entry_image, weights=word_weight[words], minlength=len(ivf.images))


def _pair_similarity(q_codes: np.ndarray, p_codes: np.ndarray, binary: bool, dim: int) -> np.ndarray:
    """V̂ᵀV̂' of paired rows: 1 − 2h/d for packed bits, dot products for float vectors."""
    if binary:
        x = np.bitwise_xor(q_codes, p_codes)
        if x.shape[1] % 8 == 0:
            h = np.bitwise_count(x.view(np.uint64)).sum(axis=1, dtype=np.int64)
        else:
            h = np.bitwise_count(x).sum(axis=1, dtype=np.int64)
        return 1.0 - 2.0 * h / dim
    return np.einsum("pd,pd->p", q_codes, p_codes, dtype=np.float32).astype(np.float64)


def search(ivf: InvertedFile, query: Aggregated, params: AsmkParams, k: int, exclude: dict[int, int] | None = None,
           word_weight: np.ndarray | None = None, norms: np.ndarray | None = None,
           buffer_bytes: int = 256 * 2**20, max_pairs: int = 4_000_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` database images for each query image in ``query`` (aggregated, MA applied).

    ``exclude`` maps a query id to a database id left out of its ranking. ``word_weight`` is the
    IDF (None: 1), ``norms`` the images' Σ w_c (computed when not given). Returns query ids (sorted),
    scores (nq, k) and image ids (nq, k), padded with (-inf, -1).
    """
    norms = image_norms(ivf, word_weight) if norms is None else norms
    inv_sqrt_norm = 1.0 / np.sqrt(np.maximum(norms, 1e-300))
    qids, q_of_entry = np.unique(query.image_ids, return_inverse=True)
    n_img = len(ivf.images)
    chunk = int(max(1, min(len(qids), buffer_bytes // (8 * max(n_img, 1)))))
    out_s = np.full((len(qids), k), -np.inf)
    out_i = np.full((len(qids), k), -1, np.int64)
    for q0 in range(0, len(qids), chunk):
        sel = np.flatnonzero((q_of_entry >= q0) & (q_of_entry < q0 + chunk))
        sel = sel[np.argsort(query.words[sel], kind="stable")]  # word order: sequential reads of the postings
        nq = min(chunk, len(qids) - q0)
        acc = _accumulate(ivf, query.words[sel], query.codes[sel], q_of_entry[sel] - q0, nq, params,
                          word_weight, inv_sqrt_norm, max_pairs)
        qw = np.ones(len(sel)) if word_weight is None else word_weight[query.words[sel]]
        acc /= np.sqrt(np.bincount(q_of_entry[sel] - q0, weights=qw, minlength=nq))[:, None]
        if exclude:
            for j in range(nq):
                own = exclude.get(int(qids[q0 + j]), -1)
                pos = np.searchsorted(ivf.images, own)
                if own >= 0 and pos < n_img and ivf.images[pos] == own:
                    acc[j, pos] = -np.inf
        s, i = _topk(acc, k)
        out_s[q0:q0 + nq, :s.shape[1]], out_i[q0:q0 + nq, :s.shape[1]] = s, np.where(i >= 0, ivf.images[i], -1)
    return qids, out_s, out_i


def _accumulate(ivf: InvertedFile, words: np.ndarray, codes: np.ndarray, q_local: np.ndarray, nq: int,
                params: AsmkParams, word_weight: np.ndarray | None, inv_sqrt_norm: np.ndarray,
                max_pairs: int) -> np.ndarray:
    """Dense (nq, n_img) score buffer for one chunk of queries: Σ_c w_c σ(u) / sqrt(norm[img])."""
    n_img = len(ivf.images)
    acc = np.zeros(nq * n_img, np.float64)
    start, length = ivf.offsets[words], ivf.offsets[words + 1] - ivf.offsets[words]
    keep = np.flatnonzero(length > 0)
    budget = max_pairs if params.binary else max(1, max_pairs // max(1, ivf.dim // 8))
    if len(keep) == 0:
        return acc.reshape(nq, n_img)
    cum = np.cumsum(length[keep])
    edges = np.unique(np.r_[0, np.searchsorted(cum, np.arange(budget, cum[-1], budget), side="right"), len(keep)])
    for lo, hi in zip(edges[:-1], edges[1:]):
        ent = keep[lo:hi]
        lens = length[ent]
        pair_entry = np.repeat(ent, lens)
        first = np.repeat(start[ent] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        pair_post = first + np.arange(lens.sum())
        u = _pair_similarity(codes[pair_entry], ivf.codes[pair_post], ivf.binary, ivf.dim)
        s = selectivity(u, params.alpha, params.tau)
        if word_weight is not None:
            s = s * word_weight[words[pair_entry]]
        img = ivf.entry_image[pair_post].astype(np.int64)
        s = s * inv_sqrt_norm[img]
        acc += np.bincount(q_local[pair_entry] * n_img + img, weights=s, minlength=nq * n_img)
    return acc.reshape(nq, n_img)


def _topk(acc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns per row, best first (ties by column index)."""
    k = min(k, acc.shape[1])
    if k == 0:
        return np.zeros((acc.shape[0], 0)), np.zeros((acc.shape[0], 0), np.int64)
    part = np.argpartition(-acc, k - 1, axis=1)[:, :k] if k < acc.shape[1] else np.tile(np.arange(acc.shape[1]), (len(acc), 1))
    vals = np.take_along_axis(acc, part, 1)
    order = np.lexsort((part, -vals), axis=1)
    idx = np.take_along_axis(part, order, 1)
    scores = np.take_along_axis(acc, idx, 1)
    return scores, np.where(np.isfinite(scores), idx, -1)
