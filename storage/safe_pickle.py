"""Restricted unpickling of revisitop ground truth (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``).

``pickle.loads`` runs whatever callables a file names, so a crafted ``.pkl`` executes arbitrary
code. Revisited ground truth is plain data: dicts, lists, tuples, strings, bytes, numbers and (in
some copies) numpy arrays and scalars. :func:`loads_data` admits exactly those, under every pickle
protocol (0-5), and nothing else. It is total: whatever the bytes, it returns data or raises
:class:`GroundTruthError` with one line (malformed and truncated pickles, ``MemoryError`` and
``RecursionError`` included), and it neither runs code nor crashes the interpreter.

* **No real global is handed to pickle.** :data:`ALLOWED_GLOBALS` names the globals a data pickle
  uses: numpy's ``_reconstruct``, ``_frombuffer``, ``scalar``, ``ndarray`` and ``dtype``; and
  ``_codecs.encode``, ``bytes``, ``bytearray``, ``set``, ``frozenset`` and ``complex`` (how protocols
  without an opcode for them store bytes, sets and complex numbers). Each resolves to a stand-in
  written here that checks its arguments before numpy or Python sees them; any other global is
  refused before anything is called.
* **Arrays are built here, never by numpy's ``__setstate__``.** ``dtype(...)`` and ``_reconstruct(...)``
  give placeholders whose ``__setstate__`` checks the state tuple. The dtype must be bool, integer,
  float, complex, bytes (``S``) or unicode (``U``): object, structured, void and datetime dtypes are
  refused -- an object array's state is a list of Python objects, and numpy's ``__setstate__`` on a
  crafted one (a 125-byte file) crashes the interpreter. The shape must be a tuple of non-negative
  ints with at most 2**31 elements, the data bytes of exactly ``size * itemsize`` (bools 0 or 1,
  unicode code points valid); the array is ``np.frombuffer(data).reshape(shape, order)`` copied,
  in native byte order as numpy's own unpickling gives it (protocol 5 keeps the stored order).
* **The opcode stream is checked before it runs** (:func:`check_opcodes`, on ``pickletools.genops``):
  opcodes that build arbitrary objects or fetch outside ones (``INST``, ``OBJ``, ``NEWOBJ``, ``EXT*``,
  ``PERSID``, out-of-band buffers) are refused, and so are streams the C unpickler mishandles or
  that make much from little: an opcode reaching past its frame's end (the C unpickler reads a size
  from the wrong bytes), a memo index beyond the file's length (one 5-byte opcode would allocate and
  clear a memo of up to 64 GiB), tuples nested more than :data:`MAX_TUPLE_DEPTH` deep (hashing a
  million-deep tuple as a dict key overflows the C stack, in plain ``pickle.loads`` too) and dict
  keys or set members costing more to hash than a budget proportional to the file's size (a tuple
  of two references to a tuple of two references ... hashes 2**60 nodes).
* **Stand-ins share a budget too**: the bytes and set members they make may not exceed a multiple
  of the file's size (one large string encoded a million times would otherwise fill the memory).
* **The result is checked after** (:func:`_finish`): placeholders become the arrays and dtypes they
  stand for, anything that is not data (a stand-in returned as a value) is refused, and containers
  may nest at most :data:`MAX_DEPTH` deep.
"""

from __future__ import annotations

import contextvars
import io
import math
import pickle
import pickletools
import re
import reprlib
from collections.abc import Callable
from typing import Any

import numpy as np

from storage.errors import GroundTruthError

MAX_ELEMENTS = 2**31
MAX_DIMS = 32
MAX_TUPLE_DEPTH = 100
MAX_DEPTH = 100
_WHAT = "ground truth may hold only dicts, lists, strings, numbers and numpy arrays"


def _refuse(reason: str) -> GroundTruthError:
    return GroundTruthError(f"refused: {reason}")


# what the stand-ins of the load running in this context may still make (bytes, hashed nodes)
_WORK: contextvars.ContextVar[list[int]] = contextvars.ContextVar("safe_pickle_work")


def _charge(units: int) -> None:
    """Charge work a stand-in is about to do to the running load (a pickle may not make much from little)."""
    left = _WORK.get(None)
    if left is None:
        raise _refuse("the stand-ins run only inside DataOnlyUnpickler.load")
    left[0] -= units
    if left[0] < 0:
        raise _refuse("the pickle makes far more data than it holds (it reuses one large value many times)")


# ---------------------------------------------------------------------------------------------------
# Stand-ins for the allowed globals


class _Safe:
    """A named stand-in for an allowed global: calling it runs ``fn``, which checks its arguments.

    Unhashable (so never a dict key or set member) and refusing ``BUILD`` (so a pickle cannot set
    attributes on it).
    """

    __slots__ = ("_fn", "name")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name, self._fn = name, fn

    def __call__(self, *args: Any) -> Any:
        try:
            return self._fn(*args)
        except TypeError:
            raise _refuse(f"{self.name} called with arguments a data pickle never gives it") from None

    def __setstate__(self, state: object) -> None:
        raise _refuse(f"the pickle sets state on {self.name}")


class _Dtype:
    """Placeholder for ``numpy.dtype(spec, align, copy)``: a plain dtype built from a checked spec and state."""

    __slots__ = ("value",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, value: np.dtype):
        self.value = value

    def __setstate__(self, state: object) -> None:
        self.value = _dtype_with_state(self.value, state)


class _Array:
    """Placeholder for ``numpy.core.multiarray._reconstruct(ndarray, ...)``; its state makes the array."""

    __slots__ = ("value",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, value: np.ndarray | None = None):
        self.value = value

    def __setstate__(self, state: object) -> None:
        if self.value is not None:
            raise _refuse("the pickle sets an array's state twice")
        self.value = _array_from_state(state)


_SPEC = re.compile(r"([biufcSU])([0-9]{1,9})\Z")
_NUMERIC_SIZES = {"b": {1}, "i": {1, 2, 4, 8}, "u": {1, 2, 4, 8}, "f": {2, 4, 8, 16}, "c": {8, 16, 32}}


def _plain_dtype(kind: str, size: int, spec: object) -> np.dtype:
    """The dtype ``kind + size`` (numeric size in bytes, ``S`` in bytes, ``U`` in characters)."""
    if size not in _NUMERIC_SIZES.get(kind, range(1, size + 1)):
        raise _refuse(f"dtype {spec!r}: unsupported size")
    try:
        return np.dtype(f"{kind}{size}")
    except TypeError:  # f16 / c32 where the platform has no long double of that size
        raise _refuse(f"dtype {spec!r} does not exist on this platform") from None


def _dtype(spec: object, align: object = False, copy: object = True) -> _Dtype:
    """``numpy.dtype(spec, align, copy)`` for bool, int, uint, float, complex, ``S`` and ``U`` specs only."""
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None or not isinstance(align, int) or not isinstance(copy, int):
        raise _refuse(
            f"dtype {_short(spec)}: only bool, integer, float, complex, bytes and unicode dtypes are data "
            "(object, structured, void and datetime dtypes are not)"
        )
    return _Dtype(_plain_dtype(match[1], int(match[2]), spec))


def _dtype_with_state(dt: np.dtype, state: object) -> np.dtype:
    """``dt`` after numpy's dtype ``__setstate__`` with ``state``: byte order, and ``S``/``U`` item size."""
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] == len(state) - 5):
        raise _refuse(f"dtype state {_short(state)} is not a version 3 or 4 dtype state")
    _, order, subarray, names, fields, elsize, _alignment, flags, *metadata = state
    if any(part is not None for part in (subarray, names, fields, *metadata)):
        raise _refuse("structured, sub-array and metadata-carrying dtypes are not data")
    if order not in ("<", ">", "=", "|") or not isinstance(elsize, int) or not isinstance(flags, int):
        raise _refuse(f"dtype state {_short(state)} is malformed")
    if dt.kind in "SU" and elsize != -1:
        width = 4 if dt.kind == "U" else 1  # bytes per character
        if not 0 < elsize <= MAX_ELEMENTS or elsize % width:
            raise _refuse(f"dtype state gives {dt.kind} an item size of {elsize}")
        dt = np.dtype(f"{dt.kind}{elsize // width}")
    elif elsize not in (-1, dt.itemsize):
        raise _refuse(f"dtype state gives {dt} an item size of {elsize}")
    return dt.newbyteorder(order) if order in "<>" and dt.kind != "S" else dt


def _as_dtype(dtype: object) -> np.dtype:
    if not isinstance(dtype, _Dtype):
        raise _refuse(f"a numpy array or scalar whose dtype is a {type(dtype).__name__}, not a dtype")
    return dtype.value


def _shape(shape: object) -> tuple[int, ...]:
    """``shape`` if it is a tuple of at most :data:`MAX_DIMS` non-negative ints with at most MAX_ELEMENTS."""
    if not (isinstance(shape, tuple) and len(shape) <= MAX_DIMS and all(type(n) is int and n >= 0 for n in shape)):
        raise _refuse(f"array shape {_short(shape)} is not a tuple of at most {MAX_DIMS} non-negative ints")
    size = 1
    for n in shape:
        size *= n
        if size > MAX_ELEMENTS:
            raise _refuse(f"array shape {_short(shape)} has more than {MAX_ELEMENTS} elements")
    return shape


def _build_array(data: object, dt: np.dtype, shape: object, fortran: bool) -> np.ndarray:
    """A new array of ``shape`` and ``dt`` from raw ``data`` (C or Fortran order), after every check."""
    shape = _shape(shape)
    if isinstance(data, list):
        raise _refuse("an array whose data is a list of Python objects (an object array)")
    if not isinstance(data, (bytes, bytearray)):
        raise _refuse(f"array data is a {type(data).__name__}, not bytes")
    size = math.prod(shape)
    if len(data) != size * dt.itemsize:
        raise _refuse(f"array data holds {len(data)} bytes; shape {shape} of {dt} needs {size * dt.itemsize}")
    _charge(len(data))
    flat = np.frombuffer(data, dtype=dt)
    _check_values(flat)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


def _check_values(flat: np.ndarray) -> None:
    """Bools must be 0 or 1 and unicode code points valid: numpy's own values, nothing undefined."""
    if flat.dtype.kind == "b" and flat.size and flat.view(np.uint8).max() > 1:
        raise _refuse("bool array data holds bytes other than 0 and 1")
    if flat.dtype.kind == "U" and flat.size:
        codes = flat.view(np.dtype("u4").newbyteorder(flat.dtype.byteorder))
        if codes.max() > 0x10FFFF:
            raise _refuse("unicode array data holds invalid code points")


def _array_from_state(state: object) -> np.ndarray:
    """The array numpy's ``ndarray.__setstate__((version, shape, dtype, is_fortran, data))`` would make."""
    if isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and type(state[0]) is int:
        state = state[1:]
    if not (isinstance(state, tuple) and len(state) == 4):
        raise _refuse(f"array state {_short(state)} is not (version, shape, dtype, is_fortran, data)")
    shape, dtype, fortran, data = state
    if fortran not in (0, 1) or not isinstance(fortran, int):
        raise _refuse(f"array state's is_fortran is {_short(fortran)}")
    array = _build_array(data, _as_dtype(dtype), shape, bool(fortran))
    # numpy's __setstate__ byte-swaps a non-native array into native order (protocol 5 keeps the order)
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _reconstruct(subtype: object, shape: object, code: object) -> _Array:
    """``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')``: an array awaiting its state."""
    if subtype is not _NDARRAY or not isinstance(shape, tuple) or code not in (b"b", "b"):
        raise _refuse("_reconstruct may only start a plain numpy.ndarray")
    return _Array()


def _frombuffer(buf: object, dtype: object, shape: object, order: object) -> _Array:
    """``numpy.core.numeric._frombuffer(buffer, dtype, shape, order)`` (protocol 5 arrays)."""
    if order not in ("C", "F"):
        raise _refuse(f"_frombuffer order {_short(order)}")
    return _Array(_build_array(buf, _as_dtype(dtype), shape, order == "F"))


def _scalar(dtype: object, data: object = None) -> np.generic:
    """``numpy.core.multiarray.scalar(dtype, raw_bytes)``: a numpy scalar (whose ``BUILD`` is a no-op)."""
    return _build_array(data, _as_dtype(dtype), (), False)[()]


def _latin1(text: object, encoding: object = None) -> bytes:
    """``_codecs.encode(str, 'latin1')``: how protocols 0-2 store bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _refuse("_codecs.encode other than of a str to latin1")
    _charge(len(text))
    return text.encode("latin1")


def _builtin(kind: type, arg_type: type | None = None) -> Callable[..., Any]:
    """``kind()``, or ``kind(x)`` with ``x`` an ``arg_type`` (how protocols 0-3 store sets and bytearrays)."""

    def make(*args: object) -> Any:
        if len(args) > (arg_type is not None) or not all(type(a) is arg_type for a in args):
            raise _refuse(f"{kind.__name__} built from {_short(args)}")
        if args and arg_type is bytes:
            _charge(len(args[0]))
        elif args:
            _charge_hashing(args[0])
        return kind(*args)

    return make


def _charge_hashing(items: list) -> None:
    """Charge hashing ``items`` (tuples followed down) before a set is made of them: 16 units a node, as
    this walk costs about what copying 16 bytes does."""
    pending = list(items)
    while pending:
        item = pending.pop()
        _charge(16)
        if type(item) is tuple:
            pending.extend(item)


def _complex(real: object, imag: object = 0.0) -> complex:
    if not all(type(x) in (int, float) for x in (real, imag)):
        raise _refuse(f"complex built from {_short((real, imag))}")
    return complex(real, imag)


def _refuse_call(*args: object) -> None:
    raise _refuse("numpy.ndarray may only be the first argument of _reconstruct")


_NDARRAY = _Safe("numpy.ndarray", _refuse_call)


def _resolvers() -> dict[tuple[str, str], _Safe]:
    table: dict[tuple[str, str], Callable[..., Any]] = {("numpy", "dtype"): _dtype, ("_codecs", "encode"): _latin1}
    for core in ("numpy.core", "numpy._core"):  # numpy 2 moved numpy.core to numpy._core
        table[core + ".multiarray", "_reconstruct"] = _reconstruct
        table[core + ".multiarray", "scalar"] = _scalar
        table[core + ".numeric", "_frombuffer"] = _frombuffer
    for builtins in ("builtins", "__builtin__"):  # protocols 0-2 write Python 2 names
        table[builtins, "bytes"] = _builtin(bytes)
        table[builtins, "bytearray"] = _builtin(bytearray, bytes)
        table[builtins, "set"] = _builtin(set, list)
        table[builtins, "frozenset"] = _builtin(frozenset, list)
        table[builtins, "complex"] = _complex
    resolved = {key: _Safe(".".join(key), fn) for key, fn in table.items()}
    return {**resolved, ("numpy", "ndarray"): _NDARRAY}


_RESOLVE = _resolvers()
#: The (module, name) pairs a data pickle may name; each resolves to a checking stand-in, never the real global.
ALLOWED_GLOBALS = frozenset(_RESOLVE)


# ---------------------------------------------------------------------------------------------------
# The opcode stream, checked before it runs

_LEAF = frozenset(
    {  # opcodes pushing one value that is not a tuple
        "INT",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG",
        "LONG1",
        "LONG4",
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "BINBYTES",
        "SHORT_BINBYTES",
        "BINBYTES8",
        "BYTEARRAY8",
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "UNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "FLOAT",
        "BINFLOAT",
        "EMPTY_LIST",
        "EMPTY_DICT",
        "EMPTY_SET",
        "GLOBAL",
    }
)
_REFUSED_OPS = frozenset(
    {
        "INST",
        "OBJ",
        "NEWOBJ",
        "NEWOBJ_EX",
        "EXT1",
        "EXT2",
        "EXT4",
        "PERSID",
        "BINPERSID",
        "NEXT_BUFFER",
        "READONLY_BUFFER",
    }
)
_TUPLE_N = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_MEMO_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MEMO_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_Shape = tuple[int, int]  # a value's (tuple nesting depth, nodes hashing it visits)
_ONE: _Shape = (0, 1)  # anything but a tuple: hashing it visits one node
_KEYS, _ALL, _NONE = slice(None, None, 2), slice(None), slice(0)
# which of the values an opcode pops it hashes (dict keys, set members)
_HASHED = {
    "LIST": _NONE,
    "APPENDS": _NONE,
    "APPEND": _NONE,
    "BUILD": _NONE,
    "DICT": _KEYS,
    "SETITEMS": _KEYS,
    "SETITEM": _KEYS,
    "FROZENSET": _ALL,
    "ADDITEMS": _ALL,
}


def _budget(length: int) -> int:
    """Work a ``length``-byte pickle may cause (hashed tuple nodes, bytes its stand-ins make): ample for data,
    too little for a pickle that makes much from little (one large tuple or string used a million times)."""
    return 2**24 + 8 * length


class _Stack:
    """The C unpickler's stack and memo, holding each value's :data:`_Shape` instead of the value."""

    def __init__(self, length: int) -> None:
        self.items: list[_Shape] = []
        self.marks: list[int] = []
        self.memo: dict[int, _Shape] = {}
        self.length, self.hash_budget = length, _budget(length)

    def pop(self, n: int) -> list[_Shape]:
        start = len(self.items) - n
        if start < (self.marks[-1] if self.marks else 0):
            raise pickle.UnpicklingError("unpickling stack underflow")
        popped = self.items[start:]
        del self.items[start:]
        return popped

    def top(self) -> _Shape:
        """The top value, left in place (an underflow if the top is a MARK)."""
        (value,) = self.pop(1)
        self.items.append(value)
        return value

    def pop_mark(self) -> list[_Shape]:
        if not self.marks:
            raise pickle.UnpicklingError("could not find MARK")
        start = self.marks.pop()
        popped = self.items[start:]
        del self.items[start:]
        return popped

    def push_tuple(self, items: list[_Shape]) -> None:
        depth, size = 1 + max((d for d, _ in items), default=0), 1 + sum(n for _, n in items)
        if depth > MAX_TUPLE_DEPTH:
            raise _refuse(f"tuples nested more than {MAX_TUPLE_DEPTH} deep")
        self.items.append((depth, size))

    def hash(self, keys: list[_Shape]) -> None:
        """Charge hashing ``keys`` (dict keys, set members) to the budget."""
        self.hash_budget -= sum(n for _, n in keys)
        if self.hash_budget < 0:
            raise _refuse(f"the pickle hashes more than {_budget(self.length)} tuple elements")


def _step(stack: _Stack, name: str, arg: Any) -> None:
    """Apply one opcode's effect on values' shapes to ``stack``."""
    if name in _LEAF:
        stack.items.append(_ONE)
    elif name in _TUPLE_N:
        stack.push_tuple(stack.pop(_TUPLE_N[name]))
    elif name in ("TUPLE", "EMPTY_TUPLE"):
        stack.push_tuple(stack.pop_mark() if name == "TUPLE" else [])
    elif name in ("STACK_GLOBAL", "REDUCE"):  # a stand-in's result: never a tuple
        stack.pop(2)
        stack.items.append(_ONE)
    elif name in ("LIST", "DICT", "FROZENSET"):
        stack.hash(stack.pop_mark()[_HASHED[name]])
        stack.items.append(_ONE)
    elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
        stack.hash(stack.pop_mark()[_HASHED[name]])
        stack.top()
    elif name in ("APPEND", "BUILD", "SETITEM"):
        stack.hash(stack.pop(2 if name == "SETITEM" else 1)[_HASHED[name]])
        stack.top()
    else:
        _step_other(stack, name, arg)


def _step_other(stack: _Stack, name: str, arg: Any) -> None:
    """The stack and memo opcodes."""
    if name == "MARK":
        stack.marks.append(len(stack.items))
    elif name == "POP_MARK":
        stack.pop_mark()
    elif name == "POP":
        if stack.marks and stack.marks[-1] == len(stack.items):
            stack.marks.pop()
        else:
            stack.pop(1)
    elif name == "DUP":
        stack.items.append(stack.top())
    elif name in _MEMO_GET:
        if arg not in stack.memo:
            raise pickle.UnpicklingError(f"memo value {arg} not found")
        stack.items.append(stack.memo[arg])
    elif name in _MEMO_PUT:
        index = len(stack.memo) if name == "MEMOIZE" else arg
        if not 0 <= index <= stack.length:
            raise _refuse(f"memo index {index} in a {stack.length}-byte pickle")
        stack.memo[index] = stack.top()
    elif name not in ("PROTO", "FRAME", "STOP"):
        raise pickle.UnpicklingError(f"unknown opcode {name}")


def check_opcodes(data: bytes) -> None:
    """Refuse ``data`` unless its opcodes only build data: see the module documentation.

    Raises :class:`GroundTruthError` for a refusal and another exception for a malformed stream.
    """
    stack, frame_end, last = _Stack(len(data)), 0, 0
    for opcode, arg, pos in pickletools.genops(data):
        if opcode.name in _REFUSED_OPS:
            raise _refuse(f"the pickle uses the {opcode.name} opcode; {_WHAT}")
        # An opcode reaching past its frame's end is misread by the C unpickler (a size read from the
        # wrong bytes), whereas pickletools reads it as if there were no frame: refuse both cases.
        if last < frame_end < pos or (opcode.name == "FRAME" and pos < frame_end):
            raise pickle.UnpicklingError("an opcode reaches past the end of its frame")
        if opcode.name == "FRAME":
            frame_end = pos + 9 + arg
        _step(stack, opcode.name, arg)
        last = pos


# ---------------------------------------------------------------------------------------------------
# The result, checked after

_ATOMS = (type(None), bool, int, float, complex, str, bytes, bytearray)
_BUSY = object()


def _finish(obj: object, memo: dict[int, tuple[object, object]], cyclic: set[int], depth: int = 0) -> object:
    """``obj`` with placeholders replaced by their arrays and dtypes; anything not data is refused.

    Lists and dicts are updated in place (sharing and cycles kept); a tuple holding a placeholder is
    rebuilt, which a tuple inside a reference cycle cannot be (refused).
    """
    if type(obj) in _ATOMS or isinstance(obj, np.generic):
        return obj
    seen = memo.get(id(obj))
    if seen is not None:
        if seen[1] is _BUSY:
            cyclic.add(id(obj))
            return obj
        return seen[1]
    if depth >= MAX_DEPTH:
        raise _refuse(f"containers nested more than {MAX_DEPTH} deep")
    memo[id(obj)] = (obj, _BUSY)  # holds obj, so its id is not reused while the walk runs
    done = _finish_one(obj, memo, cyclic, depth + 1)
    memo[id(obj)] = (obj, done)
    return done


def _finish_one(obj: object, memo: dict[int, tuple[object, object]], cyclic: set[int], depth: int) -> object:
    if isinstance(obj, (_Array, _Dtype)):
        if obj.value is None:
            raise _refuse("an array that the pickle never gives its state")
        return obj.value
    if type(obj) is list:
        for i, item in enumerate(obj):
            if (done := _finish(item, memo, cyclic, depth)) is not item:
                obj[i] = done
        return obj
    if type(obj) is dict:
        for key, value in obj.items():
            _finish(key, memo, cyclic, depth)
            if (done := _finish(value, memo, cyclic, depth)) is not value:
                obj[key] = done
        return obj
    if type(obj) in (set, frozenset):
        for item in obj:  # hashable, so no placeholder (those are unhashable) can be inside
            _finish(item, memo, cyclic, depth)
        return obj
    if type(obj) is tuple:
        return _finish_tuple(obj, memo, cyclic, depth)
    raise _refuse(f"the pickle's result holds {getattr(obj, 'name', type(obj).__name__)}, which is not data")


def _finish_tuple(obj: tuple, memo: dict[int, tuple[object, object]], cyclic: set[int], depth: int) -> tuple:
    done = tuple(_finish(item, memo, cyclic, depth) for item in obj)
    if all(a is b for a, b in zip(done, obj)):
        return obj
    if id(obj) in cyclic:
        raise _refuse("a tuple inside a reference cycle holds a numpy array")
    return done


class _Brief(reprlib.Repr):
    """``reprlib`` that also shortens bytes before rendering them (a message never renders a whole file)."""

    def repr_bytes(self, value: bytes | bytearray, level: int) -> str:
        return repr(value[: self.maxstring]) + ("..." if len(value) > self.maxstring else "")

    repr_bytearray = repr_bytes


_BRIEF = _Brief()


def _short(value: object) -> str:
    """A short repr of ``value`` for a message."""
    try:
        return _line(_BRIEF.repr(value), 60)
    except Exception:  # noqa: BLE001 - e.g. an int too long to print
        return f"<{type(value).__name__}>"


def _line(text: str, limit: int) -> str:
    """``text`` on one line of at most ``limit`` characters."""
    text = " ".join(text[: limit + 1].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------


class DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler admitting data only (see the module documentation); ``load()`` returns plain data.

    It reads ``file`` whole, refuses its opcode stream before running it if it is not data-only,
    resolves only :data:`ALLOWED_GLOBALS` (to checking stand-ins) and has no ``persistent_load``.
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO):
        data = file.read()
        check_opcodes(data)
        self._budget = _budget(len(data))
        super().__init__(io.BytesIO(data))

    def find_class(self, module: str, name: str) -> _Safe:
        resolved = _RESOLVE.get((module, name))
        if resolved is None:
            raise GroundTruthError(f"refused: the pickle names {module}.{name}; {_WHAT}")
        return resolved

    def persistent_load(self, pid: object) -> None:
        raise _refuse("the pickle asks for a persistent object")

    def load(self) -> object:
        token = _WORK.set([self._budget])
        try:
            return _finish(super().load(), {}, set())
        finally:
            _WORK.reset(token)


def loads_data(data: bytes, what: str = "pickle") -> object:
    """Unpickle ``data`` admitting plain data only; anything else is a :class:`GroundTruthError`."""
    try:
        return DataOnlyUnpickler(io.BytesIO(data)).load()
    except GroundTruthError as e:
        raise GroundTruthError(f"{what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated or malformed pickles, MemoryError, RecursionError
        raise GroundTruthError(f"{what} cannot be read as a pickle: {type(e).__name__}: {_line(str(e), 200)}") from None
