"""Synthetic distractor images that compete with real queries, drawn around real donor images.

R1M-like collections cannot be downloaded here, so the scale benchmarks make their own. A distractor is
made in the spaces the index searches, from a pool of real *donor* images unrelated to the queries, by one of
two kinds (:class:`DistractorParams` ``kind``).

``mosaic`` (:func:`make_mosaic`): real local structure. The unit square is cut into a ``grid`` × ``grid`` of
cells (cut positions drawn: widths, heights ~ Dirichlet(2, …, 2)); cell c (w_c × h_c, area a_c = w_c h_c) takes a
window of ``window`` · (w_c × h_c) at a uniform position of a donor d_c (drawn without replacement while donors last;
with ``sources`` = m > 0, each d_c uniform among m donors drawn for the distractor),
and with it every local feature of d_c whose normalised position lies in the window, each with its real word
q(x) and residual x − q(x) (single assignment to the codebook, made once for the pool). Then

    entries:  V_c' = Σ_{x taken, q(x) = c'} (x − q(x)) per word c', b = sign bits of V_c' (ASMK* aggregation),
              then ``flip`` of the sign bits flipped;
    global:   g = Σ_c a_c g_{d_c} + ε,  ε ~ N(0, (σ ||Σ_c a_c g_{d_c}||)² / D · I),  then L2-normalised.

With ``grid = 1`` and no flip a mosaic is a donor itself. ``mix`` (:func:`make_distractor`), the first scheme:

    donors d_1..d_m drawn at random, weights w ~ Dirichlet(1, …, 1);
    entries:  each entry (word c, packed signs b) of donor d_j kept with probability w_j, a fraction
              ``foreign`` more drawn from the whole pool (the donors' word frequencies), one entry per word,
              then ``flip`` of every entry's sign bits flipped (ASMK*'s similarity 1 − 2h/d drops to ≈ 1 − 2·flip);
    global:   g = Σ_j w_j g_{d_j} + ε,  ε ~ N(0, (σ ||Σ_j w_j g_{d_j}||)² / D · I),  then L2-normalised.

So a ``mix`` distractor keeps real images' burstiness (entries per image, words shared between images) and sits
among real global descriptors, between two unrelated images, where a query's false matches live. Each
distractor is a pure function of its generator, which the caller seeds per shard: deterministic, streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from operators.constraints import Count, NonNegFinite, NonNegInt, Probability


@dataclass
class DistractorParams:
    kind: Literal["mix", "mosaic"] = "mix"  # mix: donors' entries with flipped bits; mosaic: donors' real regions
    grid: Count = 2  # mosaic: grid × grid cells, each a region of a donor
    window: Probability = 1.0  # mosaic: a cell's window side in its donor, relative to the cell's (area: window²)
    sources: NonNegInt = 0  # mosaic: donors a distractor's cells are drawn from (0: a donor a cell, while they last)
    mix: Count = 2  # mix: donor images per distractor
    flip: Probability = 0.1  # fraction of each entry's sign bits flipped
    foreign: Probability = 0.1  # mix: entries drawn from the whole pool, as a fraction of the kept ones
    global_noise: NonNegFinite = 0.1  # σ: norm of the global noise relative to the mixed descriptor


@dataclass
class DonorFeatures:
    """Donors' local features (grouped by image: ``offsets``): word, residual and normalised position."""

    offsets: np.ndarray  # (n + 1,) int64
    words: np.ndarray  # (F,) int32: q(x), single assignment
    residuals: np.ndarray  # (F, d) float32: x − q(x)
    xy: np.ndarray  # (F, 2) float32: position / (width, height), in [0, 1)


@dataclass
class DonorPool:
    """Real images' global descriptors and ASMK* entries (grouped by image: ``offsets``); ``features`` (their
    local features, needed by ``mosaic``) when the donors' shards hold descriptors."""

    globals: np.ndarray  # (n, D) float32
    offsets: np.ndarray  # (n + 1,) int64
    words: np.ndarray  # (E,) int32
    codes: np.ndarray  # (E, B) uint8 packed signs
    features: DonorFeatures | None = None

    def __len__(self) -> int:
        return len(self.globals)

    def subset(self, keep: np.ndarray) -> DonorPool:
        """The donors of the mask ``keep`` (pool order): their globals, entries and local features."""
        idx = np.flatnonzero(keep)
        e, offsets = _rows_of(self.offsets, idx)
        features = None
        if self.features is not None:
            f, f_offsets = _rows_of(self.features.offsets, idx)
            features = DonorFeatures(f_offsets, self.features.words[f], self.features.residuals[f], self.features.xy[f])
        return DonorPool(self.globals[idx], offsets, self.words[e], self.codes[e], features)


def _rows_of(offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of groups ``idx`` of a grouping by ``offsets``, and the offsets of those groups alone."""
    counts = np.diff(offsets)[idx]
    new = np.r_[0, np.cumsum(counts)].astype(np.int64)
    return np.repeat(offsets[idx] - new[:-1], counts) + np.arange(new[-1]), new


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


def feature_entries(words: np.ndarray, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ASMK* entries of one image from its features: (words ascending, sign bits of V_c = Σ_{q(x) = c} (x − q(x)))."""
    if not len(words):
        return np.zeros(0, np.int32), np.zeros((0, residuals.shape[1] // 8), np.uint8)
    order = np.argsort(words, kind="stable")
    w = words[order]
    starts = np.flatnonzero(np.r_[True, w[1:] != w[:-1]])
    v = np.add.reduceat(residuals[order].astype(np.float32), starts, axis=0)
    return w[starts].astype(np.int32), np.packbits(v > 0, axis=1)


def mosaic_cells(grid: int, rng: np.random.Generator) -> np.ndarray:
    """(grid², 4) cells (x0, y0, w, h) tiling the unit square; widths and heights ~ Dirichlet(2, …, 2)."""
    xs = np.r_[0.0, np.cumsum(rng.dirichlet(np.full(grid, 2.0)))[:-1]] if grid > 1 else np.zeros(1)
    ys = np.r_[0.0, np.cumsum(rng.dirichlet(np.full(grid, 2.0)))[:-1]] if grid > 1 else np.zeros(1)
    ws, hs = np.diff(np.r_[xs, 1.0]), np.diff(np.r_[ys, 1.0])
    gx, gy = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.stack([xs[gx.ravel()], ys[gy.ravel()], ws[gx.ravel()], hs[gy.ravel()]], axis=1)


def make_mosaic(
    pool: DonorPool, p: DistractorParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ``mosaic`` distractor (module doc): (global (D,) float32 unit, words (E,) int32 ascending, codes (E, B))."""
    f = pool.features
    if f is None:
        raise ValueError("mosaic distractors need the donors' local features (shards holding descriptors)")
    cells = mosaic_cells(p.grid, rng)
    if p.sources:  # cells of few donors: regions of the same photo, as a real photo repeats its own structure
        chosen = rng.choice(len(pool), min(p.sources, len(pool)), replace=False)
        donors = chosen[rng.integers(0, len(chosen), len(cells))]
    else:
        donors = rng.choice(len(pool), len(cells), replace=len(cells) > len(pool))
    size = cells[:, 2:] * p.window
    origin = rng.random((len(cells), 2)) * (1 - size)  # the window's corner in the donor
    take = []
    for d, (u, v), (w, h) in zip(donors, origin, size):
        rows = np.arange(f.offsets[d], f.offsets[d + 1])
        x, y = f.xy[rows, 0], f.xy[rows, 1]
        take.append(rows[(x >= u) & (x < u + w) & (y >= v) & (y < v + h)])
    take = np.concatenate(take)
    words, codes = feature_entries(f.words[take], f.residuals[take])
    codes = flip_bits(codes, p.flip, rng)
    area = cells[:, 2] * cells[:, 3]
    g = area @ pool.globals[donors].astype(np.float64)
    g = g + rng.standard_normal(len(g)) * p.global_noise * np.linalg.norm(g) / np.sqrt(len(g))
    return (g / max(np.linalg.norm(g), 1e-12)).astype(np.float32), words, codes


def make(pool: DonorPool, p: DistractorParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One distractor of ``p.kind``."""
    return make_mosaic(pool, p, rng) if p.kind == "mosaic" else make_distractor(pool, p, rng)
