"""Helpers for the global-descriptor index: block iteration over a (memory-mapped) matrix."""

from __future__ import annotations

from typing import Iterator

import numpy as np


def iter_blocks(ids: np.ndarray, vectors: np.ndarray, block: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(ids, rows)`` in blocks of ``block`` rows; memory-mapped rows are read lazily."""
    for start in range(0, len(ids), block):
        yield np.asarray(ids[start : start + block]), np.asarray(vectors[start : start + block], dtype=np.float32)
