"""Generate a small synthetic instance collection (used when ``../shared/data`` is absent).

``python -m jobs.synthetic --out DIR [--groups 8 --per-group 5]`` writes ``DIR/images/*.jpg`` and
``DIR/images.csv`` (``file, group``). Each group is one random "object" (a textured scene of
shapes) seen under random homographies, scale and brightness changes, so images of a group
share local structure the way photos of one landmark do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from jobs.config import parse, report_stream, run_cli
from operators.constraints import Count, Seed
from storage.collection import write_collection


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


def generate(out: str, groups: int = 8, per_group: int = 5, seed: int = 0) -> str:
    """Write the collection under ``out`` (:func:`storage.collection.write_collection`); returns its manifest."""
    return write_collection(out, views(groups, per_group, seed))


@dataclass(kw_only=True)
class SyntheticConfig:
    out: str  # folder to write (required)
    groups: Count = 8  # objects
    per_group: Count = 5  # views of each object
    seed: Seed = 0


FLAGS = {
    "--out": ("out", "folder to write"),
    "--groups": ("groups", "objects"),
    "--per-group": ("per_group", "views of each object"),
    "--seed": ("seed", "random seed"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> str:
    cfg = parse(SyntheticConfig, argv, FLAGS, __doc__, prog)
    path = generate(cfg.out, cfg.groups, cfg.per_group, cfg.seed)
    print(path, file=report_stream())
    return path


if __name__ == "__main__":
    run_cli(main)
