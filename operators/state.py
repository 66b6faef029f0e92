"""One state protocol for stateful operator objects: named arrays + JSON parameters.

A whitening, an inverted file, a trained model's weights … each gives its state as
:class:`State` (``arrays``: name → numeric ndarray, any size, possibly memory-mapped;
``params``: JSON-serialisable scalars, lists and dicts) and is rebuilt from one with
``from_state``. :mod:`storage.state` persists any state one way (an ``.npy`` per array,
memory-mappable, read with ``allow_pickle=False``; the parameters as JSON), and the same state
crosses the Ray boundary as it is. This module is pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, TypeVar

import numpy as np

T = TypeVar("T", bound="Stateful")


@dataclass(frozen=True)
class State:
    """Named numeric arrays and JSON parameters: all a stateful object needs to be rebuilt."""

    arrays: Mapping[str, np.ndarray]
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, arr in self.arrays.items():
            check_array(name, arr)

    def require(self, *names: str, what: str = "state") -> list[np.ndarray]:
        """The arrays ``names`` in that order; ValueError naming what is missing."""
        missing = [n for n in names if n not in self.arrays]
        if missing:
            raise ValueError(f"{what} lacks the array(s) {', '.join(missing)} (has {', '.join(self.arrays) or 'none'})")
        return [self.arrays[n] for n in names]


class Stateful(Protocol):
    """An operator object that gives its :class:`State` and is rebuilt from one."""

    def state(self) -> State: ...

    @classmethod
    def from_state(cls: type[T], state: State) -> T: ...


def check_array(name: str, arr: np.ndarray) -> None:
    """A state array has a file-safe name and a plain numeric or boolean dtype (no objects, no records)."""
    if not name or not all(c.isalnum() or c in "._-" for c in name) or name.startswith("."):
        raise ValueError(f"state array name {name!r}: use letters, digits, '.', '_' or '-'")
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf" or arr.dtype.fields is not None:
        kind = getattr(arr, "dtype", type(arr).__name__)
        raise ValueError(f"state array {name!r} has dtype {kind}: only numbers and booleans are state")
