"""Synthetic instance images: random textured scenes of shapes, each seen under random homographies, scale and
brightness changes, so views of one scene share local structure the way photos of one landmark do
(``jobs.synthetic`` writes them as a collection: :func:`storage.synthetic_collection.generate`)."""

from __future__ import annotations

from typing import Iterator

import cv2
import numpy as np


def scene(rng: np.random.Generator, size: int = 640) -> np.ndarray:
    img = np.full((size, size, 3), rng.integers(40, 200, 3), np.uint8)
    for _ in range(60):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind, (x, y) = rng.integers(3), rng.integers(0, size, 2)
        if kind == 0:
            cv2.circle(img, (int(x), int(y)), int(rng.integers(5, 60)), color, -1)
        elif kind == 1:
            w, h = rng.integers(10, 120, 2)
            cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), color, -1)
        else:
            pts = rng.integers(0, size, (4, 2)).astype(np.int32)
            cv2.fillPoly(img, [pts], color)
    return cv2.GaussianBlur(img, (3, 3), 0)


def view(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random perspective view of ``img`` with a brightness change."""
    s = img.shape[0]
    src = np.float32([[0, 0], [s, 0], [s, s], [0, s]])
    dst = src + rng.uniform(-0.12, 0.12, (4, 2)).astype(np.float32) * s
    out = cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (s, s), borderMode=cv2.BORDER_REFLECT)
    return np.clip(out.astype(np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)


def views(groups: int, per_group: int, seed: int) -> Iterator[tuple[str, str, np.ndarray]]:
    """(name, group, RGB image) of each view: ``per_group`` random views of each of ``groups`` scenes."""
    rng = np.random.default_rng(seed)
    for g in range(groups):
        base = scene(rng)
        for i in range(per_group):
            yield f"g{g:02d}_{i:02d}", f"g{g:02d}", view(base, rng)
