"""One state protocol: every stateful object round-trips through storage.state as .npy + JSON,
memory-mapped where asked, and nothing that is not plain numbers is ever loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from operators.asmk import Aggregated, InvertedFile, build_inverted_file
from operators.state import State
from operators.whitening import Whitening, learn_pca_whitening
from storage import state as st
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError
from storage.inverted_file import load_partial, write_partial
from storage.learned import load_checkpoint, write_checkpoint
from storage.whitening import read_whitening, remove_whitening, write_whitening


@pytest.fixture
def root(tmp_path) -> ArtifactRoot:
    return ArtifactRoot(str(tmp_path / "root"))


def _ivf(rng) -> InvertedFile:
    n = 60
    agg = Aggregated(
        rng.integers(0, 9, n), rng.integers(0, 16, n).astype(np.int32), rng.integers(0, 255, (n, 16), np.uint8)
    )
    return build_inverted_file(agg, 16, binary=True)


def test_whitening_and_inverted_file_round_trip_memory_mapped(root):
    rng = np.random.default_rng(0)
    w = learn_pca_whitening(rng.normal(size=(50, 8)), 4)
    st.save(root, "x/white", w)
    back = st.load(root, "x/white", Whitening)
    assert np.array_equal(back.proj, w.proj) and np.array_equal(back.mean, w.mean)
    ivf = _ivf(rng)
    st.save(root, "x/ivf", ivf)
    again = st.load(root, "x/ivf", InvertedFile)
    assert again.binary and isinstance(again.codes, np.memmap)
    for a in InvertedFile.ARRAYS:
        assert np.array_equal(getattr(again, a), getattr(ivf, a)), a
    write_whitening(root, "local", w)
    assert np.array_equal(read_whitening(root, "local").proj, w.proj)
    remove_whitening(root, "local")
    assert read_whitening(root, "local") is None


def test_a_root_written_before_the_protocol_still_reads(root):
    w = learn_pca_whitening(np.random.default_rng(1).normal(size=(30, 6)), 3)
    root.write_bytes("whitening/global.npz", st.pack({"mean": w.mean, "proj": w.proj}))
    assert np.array_equal(read_whitening(root, "global").proj, w.proj)
    write_whitening(root, "global", w)  # the new layout replaces the old file
    assert not root.exists("whitening/global.npz") and st.has_state(root, "whitening/global")


def test_checkpoints_and_parts_are_states_and_blobs(root):
    arrays = {"W0": np.ones((3, 2), np.float32), "adam.W0.step": np.array(4.0, np.float32)}
    write_checkpoint(root, "gss", 25, {"k": 4}, arrays, beta=0.5)
    info, back = load_checkpoint(root, "gss", {"k": 4})
    assert info["step"] == 25 and info["beta"] == 0.5 and set(back) == set(arrays)
    assert load_checkpoint(root, "gss", {"k": 5}) is None, "other settings never resume"
    ivf = _ivf(np.random.default_rng(2))
    write_partial(root, 0, ivf, {})
    assert all(np.array_equal(v, getattr(ivf, k)) for k, v in load_partial(root, 0).items())


def test_objects_never_become_state_and_are_never_loaded(root, tmp_path):
    with pytest.raises(ValueError, match="only numbers"):
        State({"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="name"):
        State({"../up": np.zeros(2)})
    # a tampered root: an object array where a whitening's projection was (numpy would unpickle it)
    st.save(root, "whitening/local", Whitening(np.zeros(2, np.float32), np.eye(2, dtype=np.float32)))
    np.save(tmp_path / "root" / "whitening" / "local" / "proj.npy", np.array([object()]), allow_pickle=True)
    with pytest.raises(ArtifactError, match="not a plain array"):
        read_whitening(root, "local")
    evil = tmp_path / "evil.npz"
    np.savez(evil, x=np.array([object()], dtype=object))
    with pytest.raises(ArtifactError, match="not a valid array blob"):
        st.unpack(evil.read_bytes())


def test_a_state_changed_after_it_was_written_is_refused(root, tmp_path):
    st.save(root, "w", Whitening(np.zeros(3, np.float32), np.eye(3, dtype=np.float32)))
    np.save(tmp_path / "root" / "w" / "proj.npy", np.eye(2, dtype=np.float32))
    with pytest.raises(ArtifactError, match="manifest says"):
        st.load(root, "w", Whitening)
    st.save(root, "v", Whitening(np.zeros(3, np.float32), np.eye(3, dtype=np.float32)))
    manifest = json.loads((tmp_path / "root" / "v" / "state.json").read_text())
    manifest["arrays"].pop("mean")
    (tmp_path / "root" / "v" / "state.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lacks the array"):
        st.load(root, "v", Whitening)
    with pytest.raises(ArtifactError, match="no nowhere"):
        st.read_state(root, "nowhere")
