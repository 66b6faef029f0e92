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
pair of the same word is scored with vectorised popcounts (word by word: the queries' entries of a
word against its contiguous posting slice), accumulated per (query, image) in a chunk-sized buffer,
and only the top-k per query is kept.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from operators.constraints import Count, PosFinite, Similarity
from operators.state import State

CACHE_BYTES = 4 * 2**20  # search: the score buffer's columns filled at a time (queries × images × 8 B): in cache
TILE_IMAGES = 16_384  # ... and at most this many images a tile: for a few queries (a service's batch), a tile's
# norms and buffer rows stay in L2 (1M images, 4 queries: 131,072 → 16,384 a tile, 3.73 → 2.47 s, asmk_kernel.py)


@dataclass
class AsmkParams:
    binary: bool = True  # ASMK* (packed sign bits) or ASMK (unit float vectors)
    alpha: PosFinite = 3.0  # selectivity exponent α
    tau: Similarity = 0.0  # similarity threshold τ
    use_idf: bool = False  # w_c = log(N / n_c)²; HOW drops it (L9209)
    db_ma: Count = 1  # database: single assignment
    query_ma: Count = 5  # query: multiple assignment m


@dataclass
class Aggregated:
    """One row per (image, visual word): grouped by image, words sorted within an image."""

    image_ids: np.ndarray  # (E,) int64
    words: np.ndarray  # (E,) int64
    codes: np.ndarray  # (E, d/8) uint8 packed bits, or (E, d) float32


def binarize(v: np.ndarray) -> np.ndarray:
    """Pack sign bits (1 where v > 0) of each row: (E, d) -> (E, d/8) uint8."""
    return np.packbits(v > 0, axis=1)


def aggregate(
    desc: np.ndarray,
    image_ids: np.ndarray,
    words: np.ndarray,
    centroids: np.ndarray,
    binary: bool = True,
    block_rows: int = 1 << 18,
) -> Aggregated:
    """V(X_c) = Σ residuals per (image, word); a descriptor with m assigned words counts once in each.

    ``desc`` (n, d), ``image_ids`` (n,), ``words`` (n, m) from :class:`operators.codebook.Quantizer`.
    When each image's descriptors are contiguous, they are processed in blocks of whole images of
    about ``block_rows`` rows (bounded memory); the output is grouped by image, words sorted within.
    """
    ids = np.asarray(image_ids)
    parts = [
        _aggregate(desc[a:b], ids[a:b], words[a:b], centroids, binary)
        for a, b in image_blocks(ids, words.shape[1], block_rows)
    ]
    if len(parts) == 1:
        return parts[0]
    return Aggregated(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("image_ids", "words", "codes")))


def image_entries(desc: list[np.ndarray], quantizer, centroids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each image's ASMK* database entries: (words (E_i,) int32 ascending, packed codes (E_i, d/8) uint8).

    The images' descriptors are assigned together (single assignment, ``quantizer`` from
    :class:`operators.codebook.Quantizer`) and aggregated per (image, word) exactly as :func:`build_index`
    aggregates them, so an inverted file built from these entries equals one built from the descriptors.
    """
    counts = np.array([len(d) for d in desc], np.int64)
    if counts.sum() == 0:
        return [(np.zeros(0, np.int32), np.zeros((0, centroids.shape[1] // 8), np.uint8)) for _ in desc]
    x = np.concatenate([np.asarray(d, np.float32).reshape(-1, centroids.shape[1]) for d in desc])
    local = np.repeat(np.arange(len(desc)), counts)
    agg = aggregate(x, local, quantizer(x, 1), centroids, binary=True)
    lo, hi = (
        np.searchsorted(agg.image_ids, np.arange(len(desc)), "left"),
        np.searchsorted(agg.image_ids, np.arange(len(desc)), "right"),
    )
    return [(agg.words[a:b].astype(np.int32), agg.codes[a:b]) for a, b in zip(lo, hi)]


def image_blocks(ids: np.ndarray, m: int, block_rows: int = 1 << 18) -> list[tuple[int, int]]:
    """Row ranges of whole images, about ``block_rows / m`` rows each; one range unless every image's
    rows are contiguous."""
    n = len(ids)
    starts = np.r_[0, np.flatnonzero(ids[1:] != ids[:-1]) + 1] if n else np.zeros(1, np.int64)
    rows_per_block = max(1, block_rows // max(m, 1))
    if n <= rows_per_block or len(np.unique(ids[starts])) != len(starts):
        return [(0, n)]
    block_of_run = starts // rows_per_block
    edges = np.r_[starts[np.flatnonzero(np.r_[True, np.diff(block_of_run) > 0])], n]
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def _groups(image_ids: np.ndarray, words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows (n·m, descriptor-major) sorted by (image, word): order, sorted images, sorted words, group starts."""
    m = words.shape[1]
    w = words.reshape(-1).astype(np.int64)
    img = np.repeat(np.asarray(image_ids, np.int64), m)
    order = _group_order(img, w)
    img_s, w_s = img[order], w[order]
    first = np.flatnonzero(np.r_[True, (img_s[1:] != img_s[:-1]) | (w_s[1:] != w_s[:-1])])
    return order, img_s, w_s, first


def _aggregate(
    desc: np.ndarray, image_ids: np.ndarray, words: np.ndarray, centroids: np.ndarray, binary: bool
) -> Aggregated:
    n, m = words.shape
    d = desc.shape[1]
    width = d // 8 if binary else d
    if n == 0:
        return Aggregated(
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, width), np.uint8 if binary else np.float32)
        )
    order, img_s, w_s, first = _groups(image_ids, words)
    codes = np.empty((len(first), width), np.uint8 if binary else np.float32)
    _sum_residuals(
        np.ascontiguousarray(desc, np.float32),
        np.ascontiguousarray(centroids, np.float32),
        order // m,
        w_s,
        np.r_[first, len(order)].astype(np.int64),
        binary,
        codes,
    )
    return Aggregated(img_s[first], w_s[first], codes)


def build_index(
    desc: np.ndarray,
    image_ids: np.ndarray,
    words: np.ndarray,
    centroids: np.ndarray,
    binary: bool = True,
    block_rows: int = 1 << 18,
) -> "InvertedFile":
    """The inverted file of database descriptors in two streaming passes over blocks of whole images.

    Equal to ``build_inverted_file(aggregate(...))`` but never holds the aggregated entries: pass 1
    only groups rows by (image, word) to count each word's postings, pass 2 aggregates each block
    again and scatters its codes straight into the final arrays.
    """
    ids = np.asarray(image_ids)
    k, d = centroids.shape
    width = d // 8 if binary else d
    blocks = image_blocks(ids, words.shape[1], block_rows)
    counts, block_images = np.zeros(k, np.int64), []
    for a, b in blocks:  # pass 1: postings per word, images per block
        _, img_s, w_s, first = _groups(ids[a:b], words[a:b])
        counts += np.bincount(w_s[first], minlength=k)
        block_images.append(np.unique(img_s[first]))
    images = np.unique(np.concatenate(block_images)) if block_images else np.zeros(0, np.int64)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    entry_image = np.empty(offsets[-1], np.uint32)
    codes = np.empty((offsets[-1], width), np.uint8 if binary else np.float32)
    cursor = offsets[:-1].copy()
    image_entries = np.zeros(len(images), np.int64)
    for a, b in blocks:  # pass 2: aggregate again, scatter
        part = _aggregate(desc[a:b], ids[a:b], words[a:b], centroids, binary)
        dense = np.searchsorted(images, part.image_ids)
        _scatter_by_word(part.words, dense.astype(np.uint32), part.codes, cursor, entry_image, codes)
        image_entries += np.bincount(dense, minlength=len(images))
    return InvertedFile(offsets, entry_image, codes, images, image_entries, binary)


def _group_order(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A stable order of rows by (image, word).

    Images usually arrive as a few contiguous runs and words fit 16 bits: then two stable radix
    sorts (by word, then by run) beat one comparison sort of 64-bit keys several times over.
    """
    run = np.cumsum(np.r_[False, img[1:] != img[:-1]])
    runs_sorted = run[-1] < 2**16 and (np.diff(img[np.r_[0, np.flatnonzero(np.diff(run)) + 1]]) > 0).all()
    if runs_sorted and w.max() < 2**16 and w.min() >= 0:
        by_word = np.argsort(w.astype(np.uint16), kind="stable")
        return by_word[np.argsort(run[by_word].astype(np.uint16), kind="stable")]
    k = int(w.max()) + 1
    if img.min() >= 0 and int(img.max()) < np.iinfo(np.int64).max // k:
        return np.argsort(img * k + w, kind="stable")
    return np.lexsort((w, img))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _sum_residuals(desc, centroids, rows, words, bounds, binary, out):
    """out[g] = code of V_g = Σ_{r ∈ group g} (desc[rows[r]] − centroids[words[r]]), no residual matrix.

    Binary: bit j (MSB first, as ``np.packbits``) set where V_j > 0. Else V / (||V|| + 1e-6).
    """
    d = desc.shape[1]
    v = np.empty(d, np.float32)
    for g in range(len(bounds) - 1):
        v[:] = 0.0
        c = words[bounds[g]]
        for r in range(bounds[g], bounds[g + 1]):
            x = rows[r]
            for j in range(d):
                v[j] += desc[x, j] - centroids[c, j]
        if binary:
            for byte in range(d // 8):
                bits = 0
                for t in range(8):
                    bits = (bits << 1) | (1 if v[8 * byte + t] > 0 else 0)
                out[g, byte] = bits
        else:
            norm = 0.0
            for j in range(d):
                norm += np.float64(v[j]) * v[j]
            scale = 1.0 / (np.sqrt(norm) + 1e-6)
            for j in range(d):
                out[g, j] = v[j] * scale


def selectivity(u: np.ndarray, alpha: float, tau: float) -> np.ndarray:
    """σ_α(u) = sign(u)|u|^α where u ≥ τ, else 0."""
    return np.where(u >= tau, np.sign(u) * np.abs(u) ** alpha, 0.0)


@dataclass
class InvertedFile:
    """Word-partitioned postings (arrays may be memory-mapped); see the module doc."""

    offsets: np.ndarray  # (k+1,) int64
    entry_image: np.ndarray  # (N,) uint32, index into ``images``
    codes: np.ndarray  # (N, B) uint8 or (N, d) float32
    images: np.ndarray  # (n_img,) int64 real image ids, sorted
    image_entries: np.ndarray  # (n_img,) int64 number of postings of each image
    binary: bool = True
    entry_indptr: np.ndarray | None = None  # i-ASMK*: entry e stands for images entry_image[indptr[e]:indptr[e+1]]

    @property
    def k(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def word_images(self) -> np.ndarray:
        """Images holding each word (n_c of the IDF): postings per word, or their members when compressed."""
        if self.entry_indptr is None:
            return self.counts
        return np.diff(np.asarray(self.entry_indptr)[np.asarray(self.offsets)])

    @property
    def dim(self) -> int:
        return self.codes.shape[1] * 8 if self.binary else self.codes.shape[1]

    def bytes_per_entry(self) -> float:
        return self.entry_image.itemsize + self.codes.shape[1] * self.codes.itemsize

    ARRAYS = ("offsets", "entry_image", "codes", "images", "image_entries")

    def state(self) -> State:
        arrays = {a: getattr(self, a) for a in self.ARRAYS}
        if self.entry_indptr is not None:
            arrays["entry_indptr"] = self.entry_indptr
        return State(arrays, {"binary": self.binary})

    @classmethod
    def from_state(cls, state: State) -> "InvertedFile":
        """Rebuilt from :meth:`state` (arrays kept as given: memory-mapped ones stay so)."""
        offsets, entry_image, codes, images, image_entries = state.require(*cls.ARRAYS, what="an inverted file")
        indptr = state.arrays.get("entry_indptr")
        postings = len(entry_image) if indptr is None else len(indptr) - 1
        if offsets.ndim != 1 or len(offsets) < 2 or codes.ndim != 2 or len(codes) != postings:
            raise ValueError(f"an inverted file's offsets {offsets.shape} and codes {codes.shape} disagree")
        if len(images) != len(image_entries):
            raise ValueError(f"an inverted file holds {len(images)} images but {len(image_entries)} entry counts")
        return cls(offsets, entry_image, codes, images, image_entries, bool(state.params.get("binary", True)), indptr)


def build_inverted_file(agg: Aggregated, k: int, binary: bool = True) -> InvertedFile:
    """An in-memory inverted file from aggregated entries (any image order; ids need not be consecutive).

    A counting sort by word (one pass to count, one compiled pass to scatter): postings of a word
    keep the entries' order, and no sort permutation or second copy of the codes is made.
    """
    images, dense = np.unique(agg.image_ids, return_inverse=True)
    words = np.asarray(agg.words, np.int64)
    counts = np.bincount(words, minlength=k)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if len(images) > 1 and (np.diff(agg.image_ids) < 0).any():  # postings in image order within a word
        order = np.argsort(agg.image_ids, kind="stable")
        words, dense, codes = words[order], dense[order], agg.codes[order]
    else:
        codes = agg.codes
    entry_image = np.empty(len(words), np.uint32)
    out_codes = np.empty_like(codes)
    _scatter_by_word(words, dense.astype(np.uint32), codes, offsets[:-1].copy(), entry_image, out_codes)
    return InvertedFile(
        offsets, entry_image, out_codes, images, np.bincount(dense, minlength=len(images)).astype(np.int64), binary
    )


@numba.njit(cache=True, nogil=True)
def _scatter_by_word(words, dense, codes, cursor, entry_image, out_codes):
    """Entry e goes to the next free row of its word's posting list (a stable counting sort)."""
    for e in range(len(words)):
        p = cursor[words[e]]
        cursor[words[e]] = p + 1
        entry_image[p] = dense[e]
        out_codes[p] = codes[e]


def entries_by_image(ivf: InvertedFile) -> tuple[np.ndarray, np.ndarray]:
    """The inverted file transposed: (offsets (n_img + 1,), positions) such that
    ``positions[offsets[i]:offsets[i + 1]]`` are image i's postings, in word order (a counting sort, O(N))."""
    offsets = np.r_[0, np.cumsum(ivf.image_entries)].astype(np.int64)
    positions = np.empty(int(offsets[-1]), np.uint32 if offsets[-1] < 2**32 else np.int64)
    _scatter_by_image(np.asarray(ivf.entry_image), offsets[:-1].copy(), positions)
    return offsets, positions


@numba.njit(cache=True, nogil=True)
def _scatter_by_image(entry_image, cursor, positions):
    for e in range(len(entry_image)):
        i = entry_image[e]
        positions[cursor[i]] = e
        cursor[i] += 1


def image_postings(ivf: InvertedFile, offsets: np.ndarray, positions: np.ndarray, dense: np.ndarray) -> Aggregated:
    """The aggregated entries of images ``dense`` (indices into ``ivf.images``) read back from the
    inverted file through :func:`entries_by_image`, as a query batch (ordered by word)."""
    sel = np.sort(
        np.concatenate(
            [np.asarray(positions[offsets[i] : offsets[i + 1]], np.int64) for i in dense] or [np.empty(0, np.int64)]
        )
    )
    words = np.searchsorted(ivf.offsets, sel, side="right") - 1
    return Aggregated(ivf.images[np.asarray(ivf.entry_image[sel], np.int64)], words, np.asarray(ivf.codes[sel]))


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
    if ivf.entry_indptr is not None:  # one word per member image of each entry
        words = np.repeat(words, np.diff(ivf.entry_indptr))
    return np.bincount(ivf.entry_image, weights=word_weight[words], minlength=len(ivf.images))


def search(
    ivf: InvertedFile,
    query: Aggregated,
    params: AsmkParams,
    k: int,
    exclude: dict[int, int] | None = None,
    word_weight: np.ndarray | None = None,
    norms: np.ndarray | None = None,
    buffer_bytes: int = 256 * 2**20,
    use_numba: bool = True,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` database images for each query image in ``query`` (aggregated, MA applied).

    ``exclude`` maps a query id to a database id left out of its ranking. ``word_weight`` is the
    IDF (None: 1), ``norms`` the images' Σ w_c (computed when not given); ``threads``: the compiled kernel's
    threads (disjoint ranges of images). Returns query ids (sorted),
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
        compiled = ivf.binary and ivf.codes.shape[1] % 8 == 0 and (use_numba or ivf.entry_indptr is not None)
        entries = (query.words[sel], query.codes[sel], q_of_entry[sel] - q0, nq, params, word_weight, inv_sqrt_norm)
        acc = _accumulate_numba(ivf, *entries, threads) if compiled else _accumulate_numpy(ivf, *entries)
        qw = np.ones(len(sel)) if word_weight is None else word_weight[query.words[sel]]
        acc /= np.sqrt(np.bincount(q_of_entry[sel] - q0, weights=qw, minlength=nq))[:, None]
        if exclude:
            for j in range(nq):
                own = exclude.get(int(qids[q0 + j]), -1)
                pos = np.searchsorted(ivf.images, own)
                if own >= 0 and pos < n_img and ivf.images[pos] == own:
                    acc[j, pos] = -np.inf
        s, i = _topk(acc, k)
        out_s[q0 : q0 + nq, : s.shape[1]], out_i[q0 : q0 + nq, : s.shape[1]] = s, np.where(i >= 0, ivf.images[i], -1)
    return qids, out_s, out_i


def _accumulate_numpy(
    ivf: InvertedFile,
    words: np.ndarray,
    codes: np.ndarray,
    q_local: np.ndarray,
    nq: int,
    params: AsmkParams,
    word_weight: np.ndarray | None,
    inv_sqrt_norm: np.ndarray,
    flush_pairs: int = 8_000_000,
) -> np.ndarray:
    """Dense (nq, n_img) score buffer for one chunk of queries: Σ_c w_c σ(u) / sqrt(norm[img]).

    Query entries arrive sorted by word. For each word, all its query entries meet all its postings
    at once (a contiguous slice of the inverted file): (q_c × n_c) popcounts and σ by table look-up
    for binary codes; the weighted pairs of many words are added to the buffer by one bincount.
    """
    n_img = len(ivf.images)
    acc = np.zeros(nq * n_img, np.float64)
    pending_idx, pending_s, pending = [], [], 0

    def flush() -> None:  # one bincount for many words: far cheaper than a fancy-indexed add per word
        nonlocal pending_idx, pending_s, pending
        if pending:
            acc[:] += np.bincount(np.concatenate(pending_idx), np.concatenate(pending_s), minlength=nq * n_img)
        pending_idx, pending_s, pending = [], [], 0

    bounds = np.flatnonzero(np.r_[True, words[1:] != words[:-1], True])
    if ivf.binary:
        table = selectivity(1.0 - 2.0 * np.arange(ivf.dim + 1) / ivf.dim, params.alpha, params.tau)
        lanes = _lanes(codes)  # the packed codes as contiguous uint64 (or uint8) columns
    for a, b in zip(bounds[:-1], bounds[1:]):
        w = words[a]
        lo, hi = ivf.offsets[w], ivf.offsets[w + 1]
        if hi == lo:
            continue
        posting = np.asarray(ivf.codes[lo:hi])
        if ivf.binary:
            h = None
            for q_lane, p_lane in zip(lanes, _lanes(posting, contiguous=False)):
                c = np.bitwise_count(q_lane[a:b, None] ^ p_lane[None, :])
                h = c if h is None else h + c  # uint8 is enough: at most d bits differ
            s = table[h]
        else:
            s = selectivity((codes[a:b] @ posting.T).astype(np.float64), params.alpha, params.tau)
        img = np.asarray(ivf.entry_image[lo:hi]).astype(np.intp)
        s *= inv_sqrt_norm[img] * (1.0 if word_weight is None else word_weight[w])
        pending_idx.append((q_local[a:b, None] * n_img + img[None, :]).ravel())
        pending_s.append(s.ravel())
        pending += s.size
        if pending > flush_pairs:
            flush()
    flush()
    return acc.reshape(nq, n_img)


def _accumulate_numba(
    ivf: InvertedFile,
    words: np.ndarray,
    codes: np.ndarray,
    q_local: np.ndarray,
    nq: int,
    params: AsmkParams,
    word_weight: np.ndarray | None,
    inv_sqrt_norm: np.ndarray,
    threads: int = 1,
) -> np.ndarray:
    """The same buffer as :func:`_accumulate_numpy` for packed codes, by a compiled loop over pairs.

    Without i-ASMK* members, over the images in tiles whose buffer columns fit ``CACHE_BYTES``
    (:func:`_binary_kernel_tiled`; benchmarks/asmk_kernel.py), ``threads`` ranges of images at once."""
    acc = np.zeros((nq, len(ivf.images)), np.float64)
    bounds = np.flatnonzero(np.r_[True, words[1:] != words[:-1], True]).astype(np.int64)
    table = selectivity(1.0 - 2.0 * np.arange(ivf.dim + 1) / ivf.dim, params.alpha, params.tau)
    weight = np.zeros(0) if word_weight is None else np.asarray(word_weight, np.float64)
    args = (
        bounds,
        np.asarray(words, np.int64),
        np.asarray(q_local, np.int64),
        np.ascontiguousarray(codes).view(np.uint64),
        np.asarray(ivf.offsets, np.int64),
    )
    if ivf.entry_indptr is None:
        tile = tile_images(nq)
        rest = (ivf.entry_image, ivf.codes.view(np.uint64), table, inv_sqrt_norm, weight, acc, tile)
        cuts = np.linspace(0, acc.shape[1], max(1, threads) + 1).astype(np.int64)
        with ThreadPoolExecutor(len(cuts) - 1) as pool:  # the kernel releases the GIL: disjoint image ranges
            list(pool.map(lambda r: _binary_kernel_tiled(*args, *rest, *r), zip(cuts[:-1], cuts[1:])))
    else:
        _binary_kernel_members(
            *args,
            np.asarray(ivf.entry_indptr, np.int64),
            ivf.entry_image,
            ivf.codes.view(np.uint64),
            table,
            inv_sqrt_norm,
            weight,
            acc,
        )
    return acc


def tile_images(nq: int, cache_bytes: int = CACHE_BYTES, most: int = TILE_IMAGES) -> int:
    """Images a tile of the tiled kernel covers for ``nq`` queries: its buffer (tile × nq × 8 B) within
    ``cache_bytes``, at most ``most`` images, at least 256."""
    return max(256, min(most, cache_bytes // (8 * max(nq, 1))))


def _lanes(codes: np.ndarray, contiguous: bool = True) -> list[np.ndarray]:
    """Columns of packed codes as 64-bit words when the width allows (else bytes)."""
    view = codes.view(np.uint64) if codes.shape[1] % 8 == 0 else codes
    return [np.ascontiguousarray(view[:, j]) if contiguous else view[:, j] for j in range(view.shape[1])]


def _topk(acc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns per row, best first (ties by column index, at the cut too).

    Row by row: the k-th best value t by one partition of the row's values, then the columns above t and the first
    columns equal to t; no (rows × n) index array or negated copy (those took 8.2 s of 113 × 1M)."""
    n = acc.shape[1]
    k = min(k, n)
    scores, idx = np.full((len(acc), k), -np.inf), np.full((len(acc), k), -1, np.int64)
    for r, row in enumerate(acc if k else []):
        if k < n:
            t = np.partition(row, n - k)[n - k]
            above = np.flatnonzero(row > t)
            cand = np.concatenate([above, np.flatnonzero(row == t)[: k - len(above)]])
        else:
            cand = np.arange(n)
        cand = cand[np.lexsort((cand, -row[cand]))]
        scores[r], idx[r] = row[cand], cand
    return scores, np.where(np.isfinite(scores), idx, -1)


@intrinsic
def _popcount64(typingctx, x):
    """Set bits of a uint64: LLVM's ctpop intrinsic, one POPCNT instruction where the CPU has it."""

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@numba.njit(cache=True, nogil=True)
def _binary_kernel(bounds, words, q_local, qcodes, offsets, entry_image, pcodes, table, inv_sqrt_norm, weight, acc):
    """acc[q, img] += w_c σ(1 − 2h/d) / sqrt(norm[img]) for every (query entry, posting) of the same word."""
    lanes = qcodes.shape[1]
    for g in range(len(bounds) - 1):
        a, b = bounds[g], bounds[g + 1]
        w = words[a]
        ww = weight[w] if weight.size else 1.0
        lo, hi = offsets[w], offsets[w + 1]
        for e in range(a, b):  # one query row at a time: its buffer row is written in image order
            row = acc[q_local[e]]
            for p in range(lo, hi):
                h = np.int64(0)
                for j in range(lanes):
                    h += np.int64(_popcount64(qcodes[e, j] ^ pcodes[p, j]))
                img = entry_image[p]
                row[img] += table[h] * inv_sqrt_norm[img] * ww  # branch-free: σ = 0 adds nothing


@numba.njit(cache=True, nogil=True)
def _binary_kernel_tiled(
    bounds, words, q_local, qcodes, offsets, entry_image, pcodes, table, inv_sqrt_norm, weight, acc, tile, first, last
):
    """:func:`_binary_kernel` over the images in tiles of ``tile``: every word's postings of one tile, then the
    next tile's (a cursor per word; postings are sorted by image within a word). A tile's scores fill a compact
    image-major buffer (tile × nq: a posting's image meets every query entry of its word in one place) that stays
    in cache, then are copied into ``acc``; each posting is still read once, and each (query, image) sum is
    added in the same order (by word), so ``acc`` equals the untiled kernel's to the last bit. Only the images
    ``first ≤ i < last`` (their columns of ``acc``): threads take disjoint ranges."""
    lanes = qcodes.shape[1]
    groups = len(bounds) - 1
    nq = acc.shape[0]
    cursor = np.empty(groups, np.int64)
    for g in range(groups):
        w = words[bounds[g]]
        cursor[g] = offsets[w] + np.searchsorted(entry_image[offsets[w] : offsets[w + 1]], first)
    buf = np.zeros((tile, nq), np.float64)
    for t0 in range(first, last, tile):
        t1 = min(t0 + tile, last)
        for g in range(groups):
            a, b = bounds[g], bounds[g + 1]
            w = words[a]
            ww = weight[w] if weight.size else 1.0
            p, hi = cursor[g], offsets[w + 1]
            while p < hi and entry_image[p] < t1:
                img = entry_image[p]
                inv = inv_sqrt_norm[img]
                row = buf[img - t0]
                for e in range(a, b):
                    h = np.int64(0)
                    for j in range(lanes):
                        h += np.int64(_popcount64(qcodes[e, j] ^ pcodes[p, j]))
                    row[q_local[e]] += table[h] * inv * ww  # branch-free: σ = 0 for ~half the pairs, unpredictably
                p += 1
            cursor[g] = p
        for i in range(t1 - t0):
            for q in range(nq):
                acc[q, t0 + i] = buf[i, q]
                buf[i, q] = 0.0


@numba.njit(cache=True, nogil=True)
def _binary_kernel_members(
    bounds, words, q_local, qcodes, offsets, indptr, members, pcodes, table, inv_sqrt_norm, weight, acc
):
    """:func:`_binary_kernel` for entries that stand for several images (i-ASMK* components): the
    similarity of a (query entry, posting) pair is added to every member image of the posting."""
    lanes = qcodes.shape[1]
    for g in range(len(bounds) - 1):
        a, b = bounds[g], bounds[g + 1]
        w = words[a]
        ww = weight[w] if weight.size else 1.0
        lo, hi = offsets[w], offsets[w + 1]
        for e in range(a, b):
            row = acc[q_local[e]]
            for p in range(lo, hi):
                h = np.int64(0)
                for j in range(lanes):
                    h += np.int64(_popcount64(qcodes[e, j] ^ pcodes[p, j]))
                s = table[h] * ww
                if s != 0.0:
                    for m in range(indptr[p], indptr[p + 1]):
                        img = members[m]
                        row[img] += s * inv_sqrt_norm[img]
