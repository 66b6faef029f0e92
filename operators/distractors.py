"""Synthetic distractor images that compete with real queries, drawn around real donor images.

R1M-like collections cannot be downloaded here, so the scale benchmarks make their own. A distractor is
made in the spaces the index searches, from a pool of real *donor* images unrelated to the queries:

    donors d_1..d_m drawn at random, weights w ~ Dirichlet(1, …, 1);
    entries:  each entry (word c, packed signs b) of donor d_j kept with probability w_j, a fraction
              ``foreign`` more drawn from the whole pool (the donors' word frequencies), one entry per word,
              then ``flip`` of every entry's sign bits flipped (ASMK*'s similarity 1 − 2h/d drops to ≈ 1 − 2·flip);
    global:   g = Σ_j w_j g_{d_j} + ε,  ε ~ N(0, (σ ||Σ_j w_j g_{d_j}||)² / D · I),  then L2-normalised.

So a distractor keeps real images' burstiness (entries per image, words shared between images) and sits
among real global descriptors, between two unrelated images, where a query's false matches live. Each
distractor is a pure function of its generator, which the caller seeds per shard: deterministic, streamed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from operators.constraints import Count, NonNegFinite, Probability


@dataclass
class DistractorParams:
    mix: Count = 2  # donor images per distractor
    flip: Probability = 0.1  # fraction of each entry's sign bits flipped
    foreign: Probability = 0.1  # entries drawn from the whole pool, as a fraction of the kept ones
    global_noise: NonNegFinite = 0.1  # σ: norm of the global noise relative to the mixed descriptor


@dataclass
class DonorPool:
    """Real images' global descriptors and ASMK* entries (grouped by image: ``offsets``)."""

    globals: np.ndarray  # (n, D) float32
    offsets: np.ndarray  # (n + 1,) int64
    words: np.ndarray  # (E,) int32
    codes: np.ndarray  # (E, B) uint8 packed signs

    def __len__(self) -> int:
        return len(self.globals)


def flip_bits(codes: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``codes`` with round(fraction · bits) random bit positions of each row toggled (a position may repeat)."""
    n, width = codes.shape
    count = int(round(fraction * width * 8))
    if count == 0 or n == 0:
        return codes.copy()
    mask = np.zeros((n, width * 8), bool)
    mask[np.repeat(np.arange(n), count), rng.integers(0, width * 8, n * count)] = True
    return codes ^ np.packbits(mask, axis=1)


def make_distractor(
    pool: DonorPool, p: DistractorParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One distractor: (global (D,) float32 unit, words (E,) int32 ascending, codes (E, B) uint8); module doc."""
    donors = rng.choice(len(pool), min(p.mix, len(pool)), replace=False)
    weights = rng.dirichlet(np.ones(len(donors)))
    rows = [np.arange(pool.offsets[d], pool.offsets[d + 1]) for d in donors]
    kept = [r[rng.random(len(r)) < w] for r, w in zip(rows, weights)]
    n_kept = sum(len(k) for k in kept)
    foreign = rng.integers(0, len(pool.words), rng.binomial(n_kept, p.foreign)) if len(pool.words) else []
    take = np.concatenate([*kept, np.asarray(foreign, np.int64)]).astype(np.int64)
    words, first = np.unique(pool.words[take], return_index=True)  # one entry per word: the first drawn
    codes = flip_bits(pool.codes[take[first]], p.flip, rng)
    g = weights @ pool.globals[donors].astype(np.float64)
    g = g + rng.standard_normal(len(g)) * p.global_noise * np.linalg.norm(g) / np.sqrt(len(g))
    return (g / max(np.linalg.norm(g), 1e-12)).astype(np.float32), words.astype(np.int32), codes
