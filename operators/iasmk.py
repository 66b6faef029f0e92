"""i-ASMK*: inter-image aggregation of the indexed binary ASMK* vectors (spec representation §5.4).

Offline, over the database only (query images take no part, seed 002 L7463-7476):

1. Local consistency: within each visual word, every pair of indexed vectors b̂, b̂' whose
   similarity b̂ᵀb̂'/d = 1 − 2h/d is ≥ τ_l is a match (h the Hamming distance; τ_l = 0.375 ⇔
   h ≤ 40 of 128) (L7389-7393).
2. Global consistency: a match survives only if its two images share at least τ_g = 10 matches
   over all words (L7393-7395, defaults L7648-7652).
3. Connected components of the surviving matches (L7402-7407). Matches join vectors of one word
   only, so every component lies in one word and components are found word partition by word
   partition.
4. A component G is indexed once, b̂_G = sign(Σ_{x∈G} b̂_x), a per-dimension majority vote with
   ties → +1 (eq. 25, L7409-7418), with the list of all its images; vectors outside any component
   stay individual. A query vector matching b̂_G scores every image of G (L7419-7424).

Work is split by contiguous ranges of words. Pass 1 counts matches per image pair
(:func:`image_pair_counts`); the counts of every range are summed to find the consistent pairs;
pass 2 recomputes the matches of a range, keeps those of consistent pairs and compresses the range
(:func:`compress_words`). Matches are never all held at once: a range's matches are computed by a
compiled kernel in blocks of words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from operators.asmk import InvertedFile, _popcount64
from operators.constraints import Count, Similarity


@dataclass
class IasmkParams:
    tau_l: Similarity = 0.375  # local consistency: similarity ≥ τ_l (0.375 ⇔ Hamming ≤ 40 of 128)
    tau_g: Count = 10  # global consistency: matches an image pair must share


def max_hamming(tau_l: float, dim: int) -> int:
    """Largest Hamming distance h with 1 − 2h/d ≥ τ_l."""
    return int(np.floor(dim * (1.0 - tau_l) / 2.0 + 1e-9))


@numba.njit(cache=True, nogil=True)
def _matches(offsets, codes, w_lo, w_hi, max_h, out_a, out_b):
    """Pairs (a < b) of postings of the same word in [w_lo, w_hi) within ``max_h`` bits, written to
    ``out_a``/``out_b`` while they have room; returns how many there are (a caller whose buffers were
    too small calls again with larger ones)."""
    lanes = codes.shape[1]
    cap = out_a.size
    n = 0
    for w in range(w_lo, w_hi):
        lo, hi = offsets[w], offsets[w + 1]
        for a in range(lo, hi):
            x0 = codes[a, 0]
            x1 = codes[a, 1] if lanes > 1 else np.uint64(0)
            for b in range(a + 1, hi):
                if lanes == 2:  # 128-bit codes, the ASMK* default: two popcounts, unrolled
                    h = np.int64(_popcount64(x0 ^ codes[b, 0])) + np.int64(_popcount64(x1 ^ codes[b, 1]))
                else:
                    h = np.int64(0)
                    for j in range(lanes):
                        h += np.int64(_popcount64(codes[a, j] ^ codes[b, j]))
                if h <= max_h:
                    if n < cap:
                        out_a[n] = a
                        out_b[n] = b
                    n += 1
    return n


def word_matches(
    ivf: InvertedFile, w_lo: int, w_hi: int, max_h: int, capacity: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray]:
    """Posting positions (a, b), a < b, of every locally consistent match in words [w_lo, w_hi)."""
    codes = np.ascontiguousarray(ivf.codes[ivf.offsets[w_lo] : ivf.offsets[w_hi]]).view(np.uint64)
    local = np.asarray(ivf.offsets[w_lo : w_hi + 1], np.int64) - ivf.offsets[w_lo]
    a, b = np.empty(capacity, np.int64), np.empty(capacity, np.int64)
    n = _matches(local, codes, 0, w_hi - w_lo, max_h, a, b)
    if n > capacity:  # rare: more matches than the buffer holds; once more with room for all
        a, b = np.empty(n, np.int64), np.empty(n, np.int64)
        _matches(local, codes, 0, w_hi - w_lo, max_h, a, b)
    return a[:n] + ivf.offsets[w_lo], b[:n] + ivf.offsets[w_lo]


def pair_keys(ivf: InvertedFile, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One int64 key per match: its image pair (dense indices i < j) as i · n_images + j."""
    ia = np.asarray(ivf.entry_image[a], np.int64)
    ib = np.asarray(ivf.entry_image[b], np.int64)
    return np.minimum(ia, ib) * len(ivf.images) + np.maximum(ia, ib)


def image_pair_counts(
    ivf: InvertedFile, w_lo: int, w_hi: int, max_h: int, block_words: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1: (image-pair keys, match counts) over words [w_lo, w_hi), summed over blocks of words."""
    keys, counts = [], []
    for s in range(w_lo, w_hi, block_words):
        a, b = word_matches(ivf, s, min(w_hi, s + block_words), max_h)
        k, c = np.unique(pair_keys(ivf, a, b), return_counts=True)
        keys.append(k), counts.append(c)
    return sum_counts(keys, counts)


def sum_counts(keys: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Counts of equal keys added (the reduction of pass 1)."""
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    k, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    return k, np.bincount(inverse, weights=np.concatenate(counts), minlength=len(k)).astype(np.int64)


@dataclass
class CompressedWords:
    """The compressed postings of a range of words, in word order (entries of one word contiguous)."""

    words: np.ndarray  # (E,) word of each entry
    codes: np.ndarray  # (E, B) uint8: the vector's own code, or the component's majority vote
    indptr: np.ndarray  # (E + 1,) entry e stands for members[indptr[e]:indptr[e+1]]
    members: np.ndarray  # (M,) uint32 dense image indices (into the inverted file's ``images``)
    component_sizes: np.ndarray  # (C,) vectors in each component (size ≥ 2)


def compress_words(
    ivf: InvertedFile, w_lo: int, w_hi: int, max_h: int, consistent: np.ndarray, block_words: int = 256
) -> CompressedWords:
    """Pass 2: components of the matches between consistent image pairs (sorted ``consistent`` keys),
    one majority-vote entry per component, every other vector kept as it is."""
    base, end = int(ivf.offsets[w_lo]), int(ivf.offsets[w_hi])
    edges_a, edges_b = [], []
    for s in range(w_lo, w_hi, block_words):
        a, b = word_matches(ivf, s, min(w_hi, s + block_words), max_h)
        keys = pair_keys(ivf, a, b)
        pos = np.clip(np.searchsorted(consistent, keys), 0, max(len(consistent) - 1, 0))
        keep = consistent[pos] == keys if len(consistent) else np.zeros(len(keys), bool)
        edges_a.append(a[keep] - base), edges_b.append(b[keep] - base)
    n = end - base
    ea, eb = np.concatenate(edges_a or [np.zeros(0, np.int64)]), np.concatenate(edges_b or [np.zeros(0, np.int64)])
    graph = sp.coo_matrix((np.ones(len(ea), np.int8), (ea, eb)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    return _compress(ivf, base, end, label)


def _compress(ivf: InvertedFile, base: int, end: int, label: np.ndarray) -> CompressedWords:
    """One entry per component (at its first posting), entries in posting order, hence word order."""
    n = end - base
    by_label = np.argsort(label, kind="stable")
    heads = by_label[np.r_[0, np.flatnonzero(np.diff(label[by_label])) + 1]] if n else np.zeros(0, np.int64)
    rep_of_label = np.empty(int(label.max()) + 1 if n else 0, np.int64)
    rep_of_label[label[heads]] = heads  # a component's first posting
    rep = rep_of_label[label]
    order = np.argsort(rep, kind="stable")  # components in posting order, members in order
    first = np.r_[0, np.flatnonzero(np.diff(rep[order])) + 1] if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[first, n]).astype(np.int64)
    codes = np.asarray(ivf.codes[base:end])
    voted = codes[order[first]].copy()
    multi = np.flatnonzero(sizes > 1)
    if len(multi):  # majority vote, ties → +1 (eq. 25)
        in_multi = np.repeat(sizes > 1, sizes)
        bits = np.unpackbits(codes[order[in_multi]], axis=1)
        starts = np.r_[0, np.cumsum(sizes[multi])[:-1]]
        ones = np.add.reduceat(bits, starts, axis=0, dtype=np.int32)
        voted[multi] = np.packbits(2 * ones >= sizes[multi, None], axis=1)
    word_of = np.searchsorted(np.asarray(ivf.offsets), base + order[first], side="right") - 1
    return CompressedWords(
        words=word_of.astype(np.int64),
        codes=voted,
        indptr=np.r_[0, np.cumsum(sizes)].astype(np.int64),
        members=np.asarray(ivf.entry_image[base:end])[order].astype(np.uint32),
        component_sizes=sizes[multi],
    )


def compressed_inverted_file(
    parts: list[CompressedWords], k: int, images: np.ndarray, image_entries: np.ndarray
) -> InvertedFile:
    """The parts of consecutive word ranges (in order) as one inverted file whose entries stand for
    several images (``entry_indptr``); ``image_entries`` keeps each image's own word count (its norm)."""
    words = np.concatenate([p.words for p in parts])
    offsets = np.r_[0, np.cumsum(np.bincount(words, minlength=k))].astype(np.int64)
    sizes = np.concatenate([np.diff(p.indptr) for p in parts])
    return InvertedFile(
        offsets,
        np.concatenate([p.members for p in parts]),
        np.concatenate([p.codes for p in parts]),
        np.asarray(images),
        np.asarray(image_entries),
        True,
        entry_indptr=np.r_[0, np.cumsum(sizes)].astype(np.int64),
    )
