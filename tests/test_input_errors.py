"""User mistakes end in one line on stderr and exit 2 (no traceback); ground-truth pickles run nothing."""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, REVISITED

from storage.collection import load_collection, read_revisited
from storage.errors import CollectionError, GroundTruthError, InputError
from storage.safe_pickle import loads_data


class Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_a_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "gnd_evil.pkl"
    evil.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["b"], "gnd": [{"x": Evil(str(target))}]}))
    assert not target.exists()
    with pytest.raises(GroundTruthError, match="refused: the pickle names (posix|os).system"):
        read_revisited(str(evil))
    with pytest.raises(GroundTruthError):  # also as a collection (database or queries role)
        load_collection(str(evil), "queries")
    assert not target.exists()
    # the unrestricted loader would have run it: the test can fail
    pickle.loads(evil.read_bytes())
    assert target.exists()


def test_plain_data_and_numpy_arrays_load():
    gnd = read_revisited(str(REVISITED / "gnd_roxford5k.pkl"))
    assert len(gnd["qimlist"]) == 70 and len(gnd["imlist"]) == 4993
    data = {"gnd": [{"bbx": np.array([1.0, 2.0, 3.0, 4.0]), "easy": np.arange(3), "junk": np.int64(5)}]}
    back = loads_data(pickle.dumps(data))
    np.testing.assert_array_equal(back["gnd"][0]["bbx"], [1, 2, 3, 4])
    assert back["gnd"][0]["junk"] == 5
    with pytest.raises(GroundTruthError, match="cannot be read as a pickle"):
        loads_data(b"not a pickle")
    with pytest.raises(GroundTruthError, match="collections.OrderedDict"):
        loads_data(pickle.dumps({"x": collections.OrderedDict()}))


CLI_MISTAKES = [
    (["-m", "jobs.cli", "nosuchjob"], "unknown job 'nosuchjob'"),
    (
        ["-m", "jobs.cli", "search", "--index", "i", "--queries", "q", "--out", "o", "--topk", "abc"],
        "topk: Input should be a valid integer",
    ),
    (["-m", "jobs.search", "--index", "i", "--out", "o"], "queries: Field required"),
    (["-m", "jobs.index", "--collection", "c", "--out", "o", "--set", "ray=5"], "ray: Input should be"),
    (["-m", "jobs.graph", "--index", "i", "--source", "sift"], "graph.source: Input should be 'global' or 'asmk'"),
    (["-m", "jobs.rerank", "--index", "i", "--out", "o", "--method", "truncated-dfs"], "method: Input should be"),
    (["-m", "jobs.evaluate", "--results", "/nonexistent/res", "--ground-truth", "g.csv"], "holds no results"),
    (["-m", "jobs.synthetic"], "out: Field required"),
]


@pytest.fixture(scope="module")
def cli_mistakes() -> dict:
    """Every case's command, all started at once (each is an interpreter importing the jobs: seconds of CPU)."""
    procs = {
        tuple(args): subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args, _ in CLI_MISTAKES
    }
    done = {}
    for args, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        done[args] = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    return done


@pytest.mark.slow  # a Python subprocess per case
@pytest.mark.parametrize("args, message", CLI_MISTAKES)
def test_command_line_mistakes_print_one_line_and_exit_2(cli_mistakes, args, message):
    p = cli_mistakes[tuple(args)]
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_input_error_raised_inside_a_ray_task_is_one_line(ray_session, capsys):
    from conftest import ray_shutdowns_recorded

    from jobs.config import run_cli
    from storage.errors import ArtifactError

    @ray_session.remote
    def task():
        raise ArtifactError("missing artifact /x/graph/order.npy")

    with ray_shutdowns_recorded() as shutdowns, pytest.raises(SystemExit) as e:  # the session keeps its Ray
        run_cli(lambda: ray_session.get(task.remote()))
    assert e.value.code == 2 and shutdowns == [1]  # the failed job asked for Ray's shutdown
    assert capsys.readouterr().err.strip() == "error: missing artifact /x/graph/order.npy"
    assert issubclass(ArtifactError, InputError)


def test_manifest_paths_leading_out_of_its_folder_are_refused_unless_allowed(tmp_path):

    (tmp_path / "coll").mkdir()
    pd.DataFrame({"file": ["a.jpg", "sub/../b.jpg", "../../etc/passwd"]}).to_csv(
        tmp_path / "coll" / "m.csv", index=False
    )
    with pytest.raises(CollectionError, match=r"1 relative path\(s\) lead outside its folder.*etc/passwd"):
        load_collection(str(tmp_path / "coll" / "m.csv"))
    assert len(load_collection(str(tmp_path / "coll" / "m.csv"), allow_outside=True)) == 3  # sub/../b.jpg stays in
    pd.DataFrame({"file": [str(tmp_path / "elsewhere.jpg")]}).to_csv(tmp_path / "coll" / "abs.csv", index=False)
    assert len(load_collection(str(tmp_path / "coll" / "abs.csv"))) == 1  # an absolute path is explicit
