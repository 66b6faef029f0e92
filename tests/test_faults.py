"""Faults: a job's driver SIGKILLed in the middle of a stage, then the same command rerun.

Each job runs as its own process group (its embedded Ray with it) and is killed with SIGKILL once the
stage under test has begun (or has committed its first piece of work); rerunning the command resumes
from the committed work and ends with artifacts byte-identical to an uninterrupted run. What each
rerun redoes is read from its summary: committed shards and partial inverted files are skipped; the
codebook, graph and spectral stages, which commit as one piece, start over.

The uninterrupted reference index is the session's ``six_index`` (tests/conftest.py, the same SMALL command),
built once: the resumed roots are compared with it, and the re-ranking faults start from copies of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SMALL
from tests.test_cluster import _env, artifact_bytes

pytestmark = pytest.mark.slow  # every test runs jobs in subprocesses, each with its own Ray


def run_here(args: list[str]) -> None:
    """``python -m MODULE ARGS…`` uninterrupted, in this process on the session's Ray (no interpreter and Ray to start):
    the reference a killed and resumed run must equal, and the run that resumes a killed one (only the killed run
    needs a process of its own)."""
    import importlib

    assert args[0] == "-m", args
    importlib.import_module(args[1]).main(args[2:])


def commits(folder: Path) -> int:
    return len(list((folder / "_commits").glob("*.json"))) if (folder / "_commits").is_dir() else 0


def run(args: list[str], log: Path, kill_when=None, timeout: float = 300) -> bool:
    """Run ``python ARGS``; with ``kill_when`` (a predicate over its stderr so far), SIGKILL its whole process
    group as soon as the predicate holds. Returns whether it was killed (False: it ended first)."""
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if kill_when is not None and kill_when(log.read_text(errors="replace")):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(1)  # the embedded Ray's processes share the driver's fate
            return True
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{args[:2]} timed out; see {log}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    return False


def test_a_killed_index_job_resumes_each_stage_and_ends_byte_identical(six, six_index, tmp_path):
    out = tmp_path / "out"
    cmd = ["-m", "jobs.index", "--collection", str(six), *SMALL, "--out", str(out)]
    # extraction: killed once the first shard is committed
    assert run(cmd, tmp_path / "1.log", lambda _: commits(out / "features") >= 1)
    at_kill = commits(out / "features")
    assert 1 <= at_kill < 6
    # codebook: killed once k-means has begun (nothing of it is committed: it starts over)
    assert run(cmd, tmp_path / "2.log", lambda err: "[index] codebook …" in err)
    assert commits(out / "features") == 6 and not (out / "codebook" / "centroids.npy").exists()
    # ASMK*: killed once the first partial inverted file is committed
    assert run(cmd, tmp_path / "3.log", lambda _: commits(out / "asmk" / "partials") >= 1)
    partials = commits(out / "asmk" / "partials")
    # (the graph and spectral stages commit as one piece, as the codebook does: a kill there is the codebook's case)
    run_here(cmd)
    summary = json.loads((out / "summary-index.json").read_text())["counts"]
    assert summary["shards_skipped"] == 6 and summary["asmk_partials_skipped"] >= partials
    assert artifact_bytes(out) == artifact_bytes(six_index)  # the same command, uninterrupted


def test_a_killed_offline_rerank_resumes_from_its_committed_parts(six_index, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(six_index, root)
    rerank = ["-m", "jobs.rerank", "--index", str(root), "--method", "dfs", "--top", "5", "--set", "items_per_task=1"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_here([*rerank, "--out", str(ref)])
    assert run([*rerank, "--out", str(out)], tmp_path / "1.log", lambda _: commits(out / "parts") >= 1)
    done = commits(out / "parts")
    run_here([*rerank, "--out", str(out)])
    summary = json.loads((out / "summary-rerank.json").read_text())["counts"]
    assert summary["parts_skipped"] >= done and summary["parts_total"] == 6
    assert artifact_bytes(out / "parts") == artifact_bytes(ref / "parts")  # run.json names its own --out


def test_a_killed_index_job_on_s3_resumes_and_ends_byte_identical(six, six_index, s3_server, tmp_path):
    """The same on a real S3 API (moto_server): a shard is visible only once committed, so the killed run leaves
    nothing half-written in sight, and the resumed root equals a local uninterrupted one."""
    from storage import fs as sfs

    fs, _ = sfs.filesystem("s3://x", s3_server["options"])
    uri = f"s3://{s3_server['bucket']}/killed"

    def s3_commits(folder: str) -> int:
        fs.invalidate_cache()
        path = f"{s3_server['bucket']}/killed/{folder}/_commits"
        return len(fs.ls(path)) if fs.exists(path) else 0

    index = ["-m", "jobs.index", "--collection", str(six), *SMALL, "--set", "stages=[extract,global,codebook,asmk]"]
    cmd = [*index, "--out", uri, "--set", f"storage={json.dumps(s3_server['options'])}"]
    assert run(cmd, tmp_path / "1.log", lambda _: s3_commits("features") >= 1)
    fs.invalidate_cache()
    shards = fs.ls(f"{s3_server['bucket']}/killed/features")
    assert len([s for s in shards if s.endswith(".parquet")]) >= s3_commits("features")
    run_here(cmd)  # (a kill among the partial inverted files: the local test above)
    fs.get(f"{s3_server['bucket']}/killed/", str(tmp_path / "got"), recursive=True)
    # the uninterrupted local run's artifacts of the same stages (those stages write nothing else)
    ref = {k: v for k, v in artifact_bytes(six_index).items() if k.split("/", 1)[0] not in ("graph", "spectral")}
    assert artifact_bytes(tmp_path / "got") == ref


def test_a_killed_reranker_training_resumes_from_its_checkpoint_and_ends_identical(six_index, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    shutil.copytree(six_index, ref)
    shutil.copytree(six_index, out)
    # 100 steps: killed at its first checkpoint (step 25), 75 steps (~3 s) before its end
    train = [
        "-m",
        "jobs.train_reranker",
        "--method",
        "gss",
        "--steps",
        "100",
        "--set",
        "gss.k=4",
        "--set",
        "checkpoint_every=25",
        "--set",
        "gss.patience=1000",
    ]  # σ tracked (and resumed), no early stop
    run_here([*train, "--index", str(ref)])
    assert run(
        [*train, "--index", str(out)],
        tmp_path / "1.log",
        lambda _: (out / "gss" / "checkpoint" / "state.json").exists(),
    )
    assert not (out / "gss" / "meta.json").exists()
    run_here([*train, "--index", str(out)])
    meta = json.loads((out / "gss" / "meta.json").read_text())
    assert meta["resumed_at"] >= 25 and meta["steps_run"] == 100 - meta["resumed_at"]
    assert meta["early_stop"]["curve"] == json.loads((ref / "gss" / "meta.json").read_text())["early_stop"]["curve"]
    weights = sorted(p.relative_to(ref / "gss") for p in (ref / "gss" / "weights").glob("*.npy"))
    assert weights, "the trained weights are a state folder"
    for name in (*weights, "embeddings.npy", "state_1.npy", "degree.npy"):
        assert (out / "gss" / name).read_bytes() == (ref / "gss" / name).read_bytes(), name
