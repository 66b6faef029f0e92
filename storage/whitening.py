"""PCA-whitening artifacts: ``ROOT/whitening/{local,global}.npz`` (:class:`operators.whitening.Whitening`).

``local``: HOW's whitening of local descriptors, learned once at extraction; ``global``: the
optional PCA-whitening of global descriptors (its presence whitens queries, so a raw rebuild
removes it).
"""

from __future__ import annotations

from typing import Literal

from operators.whitening import Whitening
from storage.artifacts import ArtifactRoot

Kind = Literal["local", "global"]


def _rel(kind: Kind) -> str:
    return f"whitening/{kind}.npz"


def read_whitening(root: ArtifactRoot, kind: Kind) -> Whitening | None:
    """The stored whitening of ``kind``, None when the root has none."""
    return Whitening.from_bytes(root.read_bytes(_rel(kind))) if root.exists(_rel(kind)) else None


def write_whitening(root: ArtifactRoot, kind: Kind, w: Whitening) -> None:
    root.write_bytes(_rel(kind), w.to_bytes())


def remove_whitening(root: ArtifactRoot, kind: Kind) -> None:
    root.remove(_rel(kind))
