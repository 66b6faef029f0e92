"""i-ASMK*: components on hand-built codes, thresholds at their edges, and search of the compressed
inverted file against brute-force scoring of its component vectors."""

from __future__ import annotations

import numpy as np
import pytest

from operators.asmk import Aggregated, AsmkParams, build_inverted_file, search, selectivity
from operators.iasmk import compress_words, compressed_inverted_file, image_pair_counts, max_hamming, word_matches

K, D = 12, 128


def flip(code: np.ndarray, bits: np.ndarray) -> np.ndarray:
    b = np.unpackbits(code)
    b[bits] ^= 1
    return np.packbits(b)


def toy_index(rng: np.random.Generator):
    """Images 0 (A), 1 (B), 2 (C), 3 (D), 4 (E) over 12 words:

    words 0-9: B = A with 40 bits flipped (Hamming 40: a match), E = A with 30 other bits flipped;
               C = complement of A, D = C with 40 bits flipped — C–D match in words 0-8 only (9 < τ_g);
    word 10:   A and C at Hamming 41 (no match); word 11: A alone.
    """
    rows = []
    for w in range(K):
        a = np.packbits(rng.integers(0, 2, D))
        bits = rng.permutation(D)
        if w < 10:
            rows += [(0, w, a), (1, w, flip(a, bits[:40])), (4, w, flip(a, bits[40:70])), (2, w, ~a)]
            d = flip(~a, bits[70:110]) if w < 9 else flip(~a, bits[:64])
            rows.append((3, w, d))
        elif w == 10:
            rows += [(0, w, a), (2, w, flip(a, bits[:41]))]
        else:
            rows.append((0, w, a))
    rows.sort(key=lambda r: (r[0], r[1]))
    agg = Aggregated(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), np.stack([r[2] for r in rows]))
    return build_inverted_file(agg, K), {(r[0], r[1]): r[2] for r in rows}


def compress(ivf, tau_g: int = 10, split: int = 6):
    keys, counts = image_pair_counts(ivf, 0, K, max_hamming(0.375, D))
    consistent = np.sort(keys[counts >= tau_g])
    parts = [
        compress_words(ivf, 0, split, 40, consistent, block_words=4),
        compress_words(ivf, split, K, 40, consistent, block_words=4),
    ]
    return compressed_inverted_file(parts, K, ivf.images, ivf.image_entries), parts, (keys, counts)


def test_thresholds_and_components_on_hand_built_codes():
    assert max_hamming(0.375, 128) == 40 and max_hamming(0.25, 128) == 48 and max_hamming(0.5, 128) == 32
    ivf, codes = toy_index(np.random.default_rng(0))
    a, b = word_matches(ivf, 10, 11, 40)
    assert len(a) == 0  # Hamming 41: out
    a, b = word_matches(ivf, 0, 1, 40)
    pairs = {tuple(sorted(ivf.images[ivf.entry_image[[x, y]]])) for x, y in zip(a, b)}
    assert {(0, 1), (0, 4), (2, 3)} <= pairs  # Hamming 40: in
    keys, counts = image_pair_counts(ivf, 0, K, 40)
    n = len(ivf.images)
    count = dict(zip(keys.tolist(), counts.tolist()))
    assert count[0 * n + 1] == 10 and count[0 * n + 4] == 10 and count[2 * n + 3] == 9
    civf, parts, _ = compress(ivf)
    sizes = np.concatenate([p.component_sizes for p in parts])
    # words 0-9: one component {A, B, E} (E joins through A even where B–E is farther than 40); C–D dropped (9 < 10)
    assert sorted(sizes.tolist()) == [3] * 10 and civf.offsets[-1] == ivf.offsets[-1] - 20
    for w in range(10):
        lo, hi = civf.offsets[w], civf.offsets[w + 1]
        groups = sorted(
            tuple(sorted(civf.images[civf.entry_image[civf.entry_indptr[e] : civf.entry_indptr[e + 1]]]))
            for e in range(lo, hi)
        )
        assert groups == [(0, 1, 4), (2,), (3,)]
        e = next(e for e in range(lo, hi) if civf.entry_indptr[e + 1] - civf.entry_indptr[e] == 3)
        votes = sum(np.unpackbits(codes[(i, w)]).astype(int) for i in (0, 1, 4))
        assert np.array_equal(np.unpackbits(civf.codes[e]), (2 * votes >= 3).astype(np.uint8))
    # with τ_g = 9 the C–D matches of words 0-8 survive: 9 more components of two
    _, parts9, _ = compress(ivf, tau_g=9)
    assert sorted(np.concatenate([p.component_sizes for p in parts9]).tolist()) == [2] * 9 + [3] * 10


def test_majority_vote_ties_go_to_plus_one():
    ivf, codes = toy_index(np.random.default_rng(1))
    civf, _, _ = compress(ivf, tau_g=9)
    w = 0
    for e in range(civf.offsets[w], civf.offsets[w + 1]):
        members = civf.images[civf.entry_image[civf.entry_indptr[e] : civf.entry_indptr[e + 1]]].tolist()
        if sorted(members) == [2, 3]:  # two vectors: every disagreement is a tie → bit set (+1)
            assert np.array_equal(civf.codes[e], codes[(2, w)] | codes[(3, w)])
            return
    raise AssertionError("no C–D component")


def brute_force(civf, query: Aggregated, params: AsmkParams) -> dict[int, np.ndarray]:
    """Scores written out: Σ over query entries and compressed entries of the same word, σ added to
    every member image, divided by √(query words) and √(image words)."""
    out = {}
    for q in np.unique(query.image_ids):
        sel = query.image_ids == q
        s = np.zeros(len(civf.images))
        for word, code in zip(query.words[sel], query.codes[sel]):
            for e in range(civf.offsets[word], civf.offsets[word + 1]):
                h = int(np.unpackbits(code ^ civf.codes[e]).sum())
                sim = selectivity(np.array([1 - 2 * h / D]), params.alpha, params.tau)[0]
                for m in civf.entry_image[civf.entry_indptr[e] : civf.entry_indptr[e + 1]]:
                    s[m] += sim
        out[int(q)] = s / np.sqrt(civf.image_entries) / np.sqrt(sel.sum())
    return out


@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_compressed_search_equals_brute_force(tau):
    rng = np.random.default_rng(2)
    ivf, codes = toy_index(rng)
    civf, _, _ = compress(ivf)
    # queries: noisy copies of A's and C's vectors in some words
    rows = [(100, w, flip(codes[(0, w)], rng.permutation(D)[:20])) for w in (0, 3, 5, 10, 11)]
    rows += [(101, w, flip(codes[(2, w)], rng.permutation(D)[:10])) for w in (1, 2, 10)]
    query = Aggregated(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), np.stack([r[2] for r in rows]))
    params = AsmkParams(tau=tau)
    qids, scores, ids = search(civf, query, params, k=5)
    want = brute_force(civf, query, params)
    for q, s, i in zip(qids, scores, ids):
        ref = want[int(q)]
        got = dict(zip(i[i >= 0].tolist(), s[i >= 0].tolist()))
        for img, val in got.items():
            assert val == pytest.approx(ref[np.searchsorted(civf.images, img)], abs=1e-12)
        assert sorted(got.values(), reverse=True) == pytest.approx(sorted(ref, reverse=True)[: len(got)], abs=1e-12)


def test_without_components_the_compressed_index_scores_as_asmk():
    ivf, codes = toy_index(np.random.default_rng(3))
    civf, parts, _ = compress(ivf, tau_g=1000)
    assert civf.offsets[-1] == ivf.offsets[-1] and all(len(p.component_sizes) == 0 for p in parts)
    rows = [(100, w, codes[(0, w)]) for w in range(K)]
    query = Aggregated(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), np.stack([r[2] for r in rows]))
    a, b = search(ivf, query, AsmkParams(), 5), search(civf, query, AsmkParams(), 5)
    assert np.array_equal(a[2], b[2]) and np.allclose(a[1], b[1])
