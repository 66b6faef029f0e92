"""Every stateful object's state, persisted one way (:mod:`operators.state`).

    FOLDER/<name>.npy   one memory-mappable array per name (``numpy.save``; read with ``allow_pickle=False``)
    FOLDER/state.json   {"params": …, "arrays": {name: {"dtype", "shape"}}}: written last, so it marks
                        the state complete; reading checks every array against it

Shard parts that many tasks commit (an inverted file's partials, i-ASMK* and object-discovery parts)
are one blob per part instead: :func:`pack` / :func:`unpack` (the arrays of an ``.npz``, read with
``allow_pickle=False``), committed through :class:`storage.shards.ShardSet`.
"""

from __future__ import annotations

import io
from typing import TypeVar

import numpy as np

from operators.state import State, Stateful, check_array
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError

T = TypeVar("T", bound=Stateful)
MANIFEST = "state.json"


def write_arrays(root: ArtifactRoot, folder: str, arrays: dict[str, np.ndarray]) -> None:
    """Each array as ``FOLDER/<name>.npy``."""
    for name, arr in arrays.items():
        check_array(name, np.asarray(arr))
        root.write_array(f"{folder}/{name}.npy", np.asarray(arr))


def read_arrays(root: ArtifactRoot, folder: str, names, mmap: bool = True) -> dict[str, np.ndarray]:
    """The arrays ``names`` of ``folder`` (memory-mapped unless ``mmap=False``)."""
    return {n: root.load_array(f"{folder}/{n}.npy", mmap=mmap) for n in names}


def write_state(root: ArtifactRoot, folder: str, state: State) -> None:
    """The arrays, then the manifest (the state exists from here on)."""
    write_arrays(root, folder, dict(state.arrays))
    shapes = {n: {"dtype": np.asarray(a).dtype.str, "shape": list(np.shape(a))} for n, a in state.arrays.items()}
    root.write_json(f"{folder}/{MANIFEST}", {"params": dict(state.params), "arrays": shapes})


def has_state(root: ArtifactRoot, folder: str) -> bool:
    return root.exists(f"{folder}/{MANIFEST}")


def read_state(root: ArtifactRoot, folder: str, mmap: bool = True) -> State:
    """The state in ``folder``; ArtifactError when it is absent or an array disagrees with the manifest."""
    if not has_state(root, folder):
        raise ArtifactError(f"{root.uri} has no {folder} (no {folder}/{MANIFEST})")
    manifest = root.read_json(f"{folder}/{MANIFEST}")
    shapes = manifest.get("arrays")
    if not isinstance(shapes, dict) or not isinstance(manifest.get("params", {}), dict):
        raise ArtifactError(f"{folder}/{MANIFEST} of {root.uri} is not a state manifest")
    arrays = read_arrays(root, folder, shapes, mmap)
    for name, arr in arrays.items():
        want = shapes[name]
        if not isinstance(want, dict) or arr.dtype.str != want.get("dtype") or list(arr.shape) != want.get("shape"):
            raise ArtifactError(
                f"{folder}/{name}.npy of {root.uri} is {arr.dtype.str} {list(arr.shape)}, "
                f"its manifest says {want}: the state was changed after it was written"
            )
    return State(arrays, manifest.get("params", {}))


def save(root: ArtifactRoot, folder: str, obj: Stateful) -> None:
    write_state(root, folder, obj.state())


def load(root: ArtifactRoot, folder: str, cls: type[T], mmap: bool = True) -> T:
    """``cls`` rebuilt from the state in ``folder``."""
    state = read_state(root, folder, mmap)
    try:
        return cls.from_state(state)
    except ValueError as e:
        raise ArtifactError(f"{folder} of {root.uri}: {e}") from None


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as one blob (a shard part)."""
    for name, arr in arrays.items():
        check_array(name, np.asarray(arr))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(data: bytes, what: str = "part") -> dict[str, np.ndarray]:
    """The arrays of a :func:`pack` blob (never unpickles: object arrays are refused)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{what} is not a valid array blob: {e}") from None
