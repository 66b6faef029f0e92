"""PCA-whitening artifacts: ``ROOT/whitening/{local,global}/`` (the state of
:class:`operators.whitening.Whitening`: ``mean.npy``, ``proj.npy``, ``state.json``; :mod:`storage.state`).

``local``: HOW's whitening of local descriptors, learned once at extraction; ``global``: the
optional PCA-whitening of global descriptors (its presence whitens queries, so a raw rebuild
removes it). Roots written before the state protocol hold ``whitening/<kind>.npz``: still read.
"""

from __future__ import annotations

from typing import Literal

from operators.state import State
from operators.whitening import Whitening
from storage import state as st
from storage.artifacts import ArtifactRoot

Kind = Literal["local", "global"]


def _folder(kind: Kind) -> str:
    return f"whitening/{kind}"


def read_whitening(root: ArtifactRoot, kind: Kind) -> Whitening | None:
    """The stored whitening of ``kind``, None when the root has none."""
    if st.has_state(root, _folder(kind)):
        return st.load(root, _folder(kind), Whitening, mmap=False)
    legacy = f"{_folder(kind)}.npz"
    if root.exists(legacy):
        return Whitening.from_state(State(st.unpack(root.read_bytes(legacy), legacy)))
    return None


def write_whitening(root: ArtifactRoot, kind: Kind, w: Whitening) -> None:
    st.save(root, _folder(kind), w)
    root.remove(f"{_folder(kind)}.npz")


def remove_whitening(root: ArtifactRoot, kind: Kind) -> None:
    """Removing the manifest removes the whitening (its arrays are overwritten by the next one)."""
    root.remove(f"{_folder(kind)}/{st.MANIFEST}")
    root.remove(f"{_folder(kind)}.npz")
