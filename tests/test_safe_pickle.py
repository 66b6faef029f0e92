"""The data-only unpickler is data-only and total.

Object dtypes are refused before numpy sees them (numpy's ``__setstate__`` on a crafted object array
crashes the interpreter); plain arrays, scalars, dicts, lists, strings and numbers load under every
protocol 0-5; and fuzzed pickles (mutated ground truth, random opcode streams) either load as data
or raise ``GroundTruthError`` -- never another exception, never a crash (it runs in this process: a
segfault would kill the test run) and never a call to code.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REVISITED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.collection import read_revisited
from storage.errors import GroundTruthError
from storage.safe_pickle import ALLOWED_GLOBALS, DataOnlyUnpickler, loads_data

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)
# A file an os.system / Popen payload would create; it must never exist.
SENTINEL = Path(tempfile.gettempdir()) / f"safe_pickle_pwned_{os.getpid()}"

# Audit events that running code would raise; the hook records them only inside loads_data.
# ("exec" is also a module import; loads_data imports nothing once the codecs pickle decodes with are loaded.)
FORBIDDEN_EVENTS = {
    "os.system",
    "subprocess.Popen",
    "exec",
    "compile",
    "import",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.remove",
    "open",
    "ctypes.dlopen",
    "pickle.find_class",
}
AUDIT: dict[str, object] = {"active": False, "events": []}


def _audit(event: str, args: tuple) -> None:
    if AUDIT["active"] and event in FORBIDDEN_EVENTS:
        AUDIT["events"].append((event, str(args[0])[:80] if args else ""))


sys.addaudithook(_audit)
for _codec in ("raw-unicode-escape", "unicode-escape", "latin-1", "ascii", "utf-8"):
    codecs.lookup(_codec)


def guarded_loads(data: bytes) -> object:
    """``loads_data`` with a record of any code it runs; asserts it ran none and raised nothing but GroundTruthError."""
    AUDIT["active"], AUDIT["events"] = True, []
    stderr, sys.stderr = sys.stderr, io.StringIO()  # where CPython prints errors it cannot raise
    try:
        return loads_data(data)
    except GroundTruthError:
        return GroundTruthError
    finally:
        AUDIT["active"], printed, sys.stderr = False, sys.stderr.getvalue(), stderr
        assert AUDIT["events"] == [], f"loads_data ran code: {AUDIT['events']}"
        assert not SENTINEL.exists(), "a payload ran"
        assert printed == "", f"loads_data made CPython print: {printed}"


# ---------------------------------------------------------------------------------------------------
# Objects and payloads


def gnd_like(n: int = 3) -> dict:
    """Revisited ground truth's shape, with numpy arrays as some copies hold them."""
    return {
        "imlist": [f"img_{i:04d}" for i in range(n * 3)],
        "qimlist": [f"q_{i}" for i in range(n)],
        "gnd": [
            {
                "bbx": [10.5 * i, 20.0, 30.25, 40.0],
                "easy": np.array([i, i + 1], dtype=np.int64),
                "hard": np.arange(i, dtype=np.int32),
                "junk": np.array([], dtype=np.int64),
            }
            for i in range(n)
        ],
    }


PLAIN = {
    "ints": [0, -1, 2**70, True, False, None],
    "floats": [1.5, -0.0, float("inf")],
    "str": "ünï\x00code",
    "bytes": b"\x00\xff",
    "empty": [b"", "", (), [], {}],
    "tuple": (1, ("a", 2.0)),
    "complex": 1 + 2j,
    "set": {1, "a"},
    "frozenset": frozenset({(1, 2)}),
    "bytearray": bytearray(b"ab"),
    7: {"nested": [[1], {}]},
}

OBJECTS = {
    "plain": PLAIN,
    "gnd": gnd_like(),
    "f4": np.arange(5, dtype=np.float32),
    "f8_2d": np.linspace(0, 1, 12).reshape(3, 4),
    "i4": np.array([-3, 0, 7], dtype=np.int32),
    "i8_fortran": np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
    "u1": np.arange(256, dtype=np.uint8),
    "bool": np.array([[True, False], [False, True]]),
    "unicode": np.array(["ab", "ünï", ""]),
    "bytes_S": np.array([b"x", b"yz"]),
    "zero_d": np.array(2.5),
    "empty": np.zeros(0),
    "empty_2d": np.zeros((0, 3), dtype=np.int64),
    "strided": np.arange(12).reshape(3, 4)[:, ::2],
    "big_endian": np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3)),
    "big_endian_unicode": np.array(["ab", "c"], dtype=">U2"),
    "complex": np.array([1 + 2j, 3j]),
    "float16": np.array([0.5, 1.0], dtype=np.float16),
    "scalars": [np.float64(1.5), np.int64(3), np.float32(2.5), np.bool_(True), np.uint8(255), np.str_("ab")],
    "dtype": np.dtype("<U5"),
}


def same(a: object, b: object) -> None:
    """``a`` and ``b`` hold equal values of the same types (arrays: dtype, shape, memory order, values)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert (a.dtype, a.shape, a.flags.f_contiguous, a.flags.c_contiguous) == (
            b.dtype,
            b.shape,
            b.flags.f_contiguous,
            b.flags.c_contiguous,
        )
        assert b.flags.writeable and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a == b


class Payload:
    """Pickles as ``callable(*args)``: what a malicious ground-truth file holds."""

    def __init__(self, fn: object, *args: object):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


PAYLOADS = {
    "os.system": Payload(os.system, f"touch {SENTINEL}"),
    "eval": Payload(eval, f"__import__('os').system('touch {SENTINEL}')"),
    "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(SENTINEL)]),
}


def object_array_pickle(n: int = 100_000, state: bytes = b"]") -> bytes:
    """The crash reproducer: an object-dtype array of ``n`` elements whose state data is an empty list.

    numpy's ``ndarray.__setstate__`` takes the list for object data and reads ``n`` pointers that are
    not there (exit 139 under the former unpickler).
    """
    return (
        b"\x80\x03cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
        b"(K\x01J" + struct.pack("<i", n) + b"\x85cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R"
        b"(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb\x89" + state + b"tb."
    )


def array_pickle(dtype_spec: bytes, state: bytes, data: bytes, shape: int = 2) -> bytes:
    """``_reconstruct`` + BUILD with a hand-written dtype spec, dtype state and array data (protocol 3)."""
    spec = b"X" + struct.pack("<I", len(dtype_spec)) + dtype_spec
    return (
        b"\x80\x03cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
        b"(K\x01K" + bytes([shape]) + b"\x85cnumpy\ndtype\n" + spec + b"\x89\x88\x87R" + state + b"\x89" + data + b"tb."
    )


F8_STATE = b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"


# ---------------------------------------------------------------------------------------------------
# The crash, and what must load


def test_object_array_reconstruct_is_refused_before_numpy_sees_it():
    data = object_array_pickle()
    assert len(data) < 130  # the "127-byte" data-only ground truth
    with pytest.raises(GroundTruthError, match="refused: dtype 'O8'"):
        loads_data(data)
    for n in (0, 1, 2**31 - 1):
        with pytest.raises(GroundTruthError, match="refused"):
            loads_data(object_array_pickle(n))
    # a plain dtype with a list for data is an object array in disguise
    with pytest.raises(GroundTruthError, match="list of Python objects"):
        loads_data(array_pickle(b"f8", F8_STATE, b"]"))
    # numpy.core.multiarray.scalar(dtype('O'), obj) is the scalar form of the same
    with pytest.raises(GroundTruthError, match="refused: dtype 'O8'"):
        loads_data(b"\x80\x03cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87RN\x86R.")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", OBJECTS)
def test_plain_data_round_trips_under_every_protocol(name, protocol):
    data = pickle.dumps(OBJECTS[name], protocol=protocol)
    same(pickle.loads(data), loads_data(data))  # the original's values, in the memory order numpy's pickle gives


def test_revisited_ground_truth_loads_as_plain_pickle_does():
    for name in ("gnd_roxford5k.pkl", "gnd_rparis6k.pkl"):
        path = REVISITED / name
        assert read_revisited(str(path)) == pickle.loads(path.read_bytes())


def test_no_allowed_global_resolves_to_the_real_callable():
    unpickler = DataOnlyUnpickler(io.BytesIO(b"N."))
    for module, name in ALLOWED_GLOBALS:
        real = getattr(sys.modules.get(module.replace("__builtin__", "builtins")), name, None)
        assert unpickler.find_class(module, name) is not real


# ---------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_code_in_a_pickle_is_refused_and_nothing_runs(payload, protocol):
    data = pickle.dumps({"gnd": [{"x": PAYLOADS[payload]}]}, protocol=protocol)
    with pytest.raises(GroundTruthError, match="refused: the pickle names"):
        loads_data(data)
    assert guarded_loads(data) is GroundTruthError


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_object_and_structured_arrays_are_refused_under_every_protocol(protocol):
    arrays = [
        np.array([1, "a", None], dtype=object),
        np.array([], dtype=object),
        np.zeros(2, dtype=[("a", "O"), ("b", "i4")]),  # a structured dtype with an object field
        np.zeros(2, dtype=[("a", "f8"), ("b", "i4")]),
        np.zeros(2, dtype="V4"),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
    ]
    for array in arrays:
        with pytest.raises(GroundTruthError, match="refused: dtype"):
            loads_data(pickle.dumps({"easy": array}, protocol=protocol))


class WithPid(pickle.Pickler):
    def persistent_id(self, obj):
        return "outside" if obj == "ref" else None


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_persistent_ids_are_refused(protocol):
    buf = io.BytesIO()
    WithPid(buf, protocol=protocol).dump(["ref"])
    with pytest.raises(GroundTruthError, match="PERSID opcode"):
        loads_data(buf.getvalue())


BAD = {  # name: (pickle, what the one-line error says)
    "not_a_pickle": (b"not a pickle", "cannot be read as a pickle"),
    "empty": (b"", "cannot be read as a pickle"),
    "truncated": (pickle.dumps(gnd_like())[:-40], "cannot be read as a pickle"),
    # hashing a million-deep tuple as a dict key overflows the C stack (plain pickle.loads too)
    "deep_tuple_key": (b"\x80\x02}K\x00" + b"\x85" * 1_000_000 + b"Ns.", "tuples nested more than 100 deep"),
    "deep_lists": (b"\x80\x02" + b"]" * 10_000 + b"a" * 9_999 + b".", "containers nested more than 100 deep"),
    # one LONG_BINPUT would make the C unpickler allocate and clear a 32 GiB memo
    "memo_index": (b"\x80\x02K\x00r\xff\xff\xff\x7f.", "memo index 2147483647"),
    "stand_in_as_value": (b"\x80\x02cnumpy\ndtype\n.", "holds numpy.dtype, which is not data"),
    "build_on_stand_in": (b"\x80\x02cnumpy\ndtype\n}b.", "sets state on numpy.dtype"),
    "ndarray_called": (b"\x80\x02cnumpy\nndarray\n)R.", "numpy.ndarray may only be"),
    "codecs_utf7": (
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf_7\x86R.",
        "_codecs.encode other than",
    ),
    "set_of_int": (b"\x80\x02c__builtin__\nset\nK\x01\x85R.", "set built from"),
    "short_data": (array_pickle(b"f8", F8_STATE, b"C\x08" + b"\x00" * 8), "holds 8 bytes; shape"),
    "bool_bytes": (array_pickle(b"b1", b"", b"C\x02\x01\x02"), "bool array data holds bytes other than 0 and 1"),
    "bad_code_points": (array_pickle(b"U1", b"", b"C\x08" + b"\xff" * 8), "invalid code points"),
    "structured_state": (
        array_pickle(b"f8", b"(K\x03X\x01\x00\x00\x00|N(X\x01\x00\x00\x00at}NNK\x00tb", b"C\x00"),
        "structured",
    ),
    "void": (array_pickle(b"V8", b"", b"C\x00"), "refused: dtype 'V8'"),
    "huge_shape": (
        b"\x80\x03cnumpy._core.numeric\n_frombuffer\n(C\x00cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R"
        + b"J\xff\xff\xff\x7fJ\xff\xff\xff\x7f\x86X\x01\x00\x00\x00CtR.",
        "more than 2147483648 elements",
    ),
    # the C unpickler reads BYTEARRAY8's size across the frame's end from the wrong bytes: 3 EB
    "straddles_frame": (
        b"\x80\x04\x95\x04" + bytes(7) + b"\x96\x02" + bytes(9) + b".",
        "reaches past the end of its frame",
    ),
    "newobj": (b"\x80\x02cbuiltins\nobject\n)\x81.", "NEWOBJ opcode"),
    # hashing a tuple DAG (each level two references to the one below) visits 2**60 nodes
    "tuple_dag_key": (b"\x80\x02}K\x00" + b"2\x86" * 60 + b"Ns.", "hashes more than"),
    "tuple_dag_set": (b"\x80\x02c__builtin__\nset\n]K\x00" + b"2\x86" * 60 + b"a\x85R.", "far more data than it holds"),
    # one 100 kB str encoded 100 000 times: 10 GB from a 500 kB pickle
    "encode_amplified": (
        b"\x80\x02c_codecs\nencode\nq\x00X\xa0\x86\x01\x00"
        + b"a" * 100_000
        + b"X\x06\x00\x00\x00latin1\x86q\x01]"
        + b"h\x00h\x01Ra" * 100_000
        + b".",
        "far more data than it holds",
    ),
}


@pytest.mark.parametrize("name", BAD)
def test_malformed_and_resource_bombs_are_one_line_errors(name):
    data, message = BAD[name]
    with pytest.raises(GroundTruthError, match=message) as raised:
        loads_data(data)
    assert "\n" not in str(raised.value)
    assert guarded_loads(data) is GroundTruthError


# ---------------------------------------------------------------------------------------------------
# Fuzz: mutated ground truth and random opcode streams

FUZZ = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SEEDS = [
    pickle.dumps(obj, protocol=p)
    for p in PROTOCOLS
    for obj in (
        gnd_like(2),
        OBJECTS["plain"],
        OBJECTS["i8_fortran"],
        OBJECTS["scalars"],
        OBJECTS["unicode"],
        np.array([1, "a"], dtype=object),
        PAYLOADS["os.system"],
    )
] + [object_array_pickle(1000)]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(0, 2**16), st.just(0)),
)


def mutate(data: bytes, steps: list[tuple[str, int, object]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in steps:
        pos %= len(buf) + 1
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= arg
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "delete":
            del buf[pos : pos + arg]
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)


def assert_data(value: object, seen: set[int] | None = None, depth: int = 0) -> None:
    """A loaded value holds only plain data and numpy arrays, scalars and dtypes."""
    seen = set() if seen is None else seen
    if isinstance(value, (type(None), bool, int, float, complex, str, bytes, bytearray, np.generic, np.dtype)):
        return
    assert depth <= 100 and (isinstance(value, (list, tuple, dict, set, frozenset, np.ndarray))), type(value)
    if id(value) in seen or isinstance(value, np.ndarray):
        assert not isinstance(value, np.ndarray) or value.dtype.kind in "biufcSU"
        return
    seen.add(id(value))
    for item in [*value.keys(), *value.values()] if isinstance(value, dict) else value:
        assert_data(item, seen, depth + 1)


@FUZZ
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # a mutated STRING opcode's invalid escapes
@given(seed=st.sampled_from(SEEDS), steps=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_ground_truth_loads_as_data_or_is_refused(seed, steps):
    result = guarded_loads(mutate(seed, steps))
    if result is not GroundTruthError:
        assert_data(result)


def _length(fmt: str) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=12).map(lambda b: struct.pack(fmt, len(b)) + b)


NAMES = [
    b"numpy.core.multiarray\n_reconstruct\n",
    b"numpy._core.multiarray\nscalar\n",
    b"numpy\ndtype\n",
    b"numpy\nndarray\n",
    b"numpy._core.numeric\n_frombuffer\n",
    b"_codecs\nencode\n",
    b"__builtin__\nset\n",
    b"builtins\ncomplex\n",
    b"posix\nsystem\n",
    b"builtins\neval\n",
    b"subprocess\nPopen\n",
]
WORDS = [
    "O8",
    "f8",
    "i8",
    "b1",
    "U3",
    "S2",
    "V8",
    "<",
    ">",
    "|",
    "latin1",
    "C",
    "F",
    "b",
    "numpy",
    "dtype",
    "numpy._core.multiarray",
    "_reconstruct",
    "os",
    "system",
    "builtins",
    "eval",
]
small = st.integers(-2, 300)
OPCODE = st.one_of(
    st.sampled_from(
        [
            b"(",
            b")",
            b"]",
            b"}",
            b"\x8f",
            b"N",
            b"\x88",
            b"\x89",
            b".",
            b"0",
            b"1",
            b"2",
            b"a",
            b"e",
            b"l",
            b"t",
            b"d",
            b"s",
            b"u",
            b"\x90",
            b"\x91",
            b"\x85",
            b"\x86",
            b"\x87",
            b"R",
            b"b",
            b"\x93",
            b"\x94",
            b"\x81",
            b"\x92",
            b"o",
            b"Q",
            b"\x97",
            b"\x98",
        ]
    ),
    small.map(lambda n: b"K" + bytes([n % 256])),
    small.map(lambda n: b"M" + struct.pack("<H", n % 65536)),
    st.integers(-(2**31), 2**31 - 1).map(lambda n: b"J" + struct.pack("<i", n)),
    small.map(lambda n: b"I%d\n" % n),
    small.map(lambda n: b"L%dL\n" % n),
    st.floats(allow_nan=True).map(lambda f: b"G" + struct.pack(">d", f)),
    small.map(lambda n: b"q" + bytes([n % 256])),
    small.map(lambda n: b"h" + bytes([n % 256])),
    small.map(lambda n: b"r" + struct.pack("<I", n % 2**32)),
    small.map(lambda n: b"j" + struct.pack("<I", n % 2**32)),
    small.map(lambda n: b"p%d\n" % n),
    small.map(lambda n: b"g%d\n" % n),
    st.sampled_from(WORDS).map(lambda w: b"\x8c" + bytes([len(w)]) + w.encode()),
    st.sampled_from(WORDS).map(lambda w: b"X" + struct.pack("<I", len(w)) + w.encode()),
    st.sampled_from(WORDS).map(lambda w: b"V" + w.encode() + b"\n"),
    st.sampled_from(NAMES).map(lambda n: b"c" + n),
    _length("<B").map(lambda b: b"C" + b),
    _length("<I").map(lambda b: b"B" + b),
    _length("<Q").map(lambda b: b"\x96" + b),
    _length("<B").map(lambda b: b"U" + b),
    small.map(lambda n: b"\x8a\x01" + bytes([n % 256])),
    small.map(lambda n: b"\x82" + bytes([n % 256])),
    st.sampled_from([b"Pid\n", b"\x95" + struct.pack("<Q", 4), b"iposix\nsystem\n"]),
)


@FUZZ
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@given(protocol=st.integers(0, 5), ops=st.lists(OPCODE, min_size=1, max_size=40))
def test_random_opcode_streams_load_as_data_or_are_refused(protocol, ops):
    result = guarded_loads(b"\x80" + bytes([protocol]) + b"".join(ops) + b".")
    if result is not GroundTruthError:
        assert_data(result)
