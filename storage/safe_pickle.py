"""Restricted unpickling of revisitop ground truth (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``).

``pickle.loads`` runs whatever callables a file names, so a crafted ``.pkl`` executes arbitrary
code. Revisited ground truth is plain data: dicts, lists, strings, numbers and (in some copies)
numpy arrays. :class:`DataOnlyUnpickler` admits exactly those — numpy's array and scalar
reconstructors and ``dtype`` are the only globals it resolves — and refuses every other global
before anything is called, so nothing in a refused file runs.
"""
from __future__ import annotations

import io
import pickle

from storage.errors import GroundTruthError

# (module, name) pairs a numpy array / scalar pickle needs; numpy 2 moved numpy.core to numpy._core.
ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` (no ``persistent_load`` either)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise GroundTruthError(f"refused: the pickle names {module}.{name}; ground truth may hold only dicts, "
                                   "lists, strings, numbers and numpy arrays")
        return super().find_class(module, name)


def loads_data(data: bytes, what: str = "pickle") -> object:
    """Unpickle ``data`` admitting plain data only; anything else is a :class:`GroundTruthError`."""
    try:
        return DataOnlyUnpickler(io.BytesIO(data)).load()
    except GroundTruthError as e:
        raise GroundTruthError(f"{what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated or malformed pickles
        raise GroundTruthError(f"{what} cannot be read as a pickle: {type(e).__name__}: {e}") from None
