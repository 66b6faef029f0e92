"""Nothing runs, nothing leaks, nothing crashes: the embedded Ray seen from the network, checkpoints,
secrets, strict JSON, one-line failures, interruptions and the temporaries they leave.

The quick tests start no Ray and no subprocess; the ``slow`` ones run real jobs in subprocesses and
send them signals. (Root-level cases on a built index live in ``test_pipeline.py``.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from conftest import FAST, REPO

SECRET = "Sup3rSecretValue"


from test_input_errors import Evil  # noqa: E402 - a pickle whose loading runs ``touch TARGET``


# ------------------------------------------------------------------------------------------
# Checkpoints: data only
# ------------------------------------------------------------------------------------------
def test_a_checkpoint_that_needs_unpickling_is_refused_and_nothing_runs(tmp_path):
    from operators.backbones import CheckpointRefused, load_checkpoint, torchvision_state_dict

    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Evil(str(target))}, evil)
    with pytest.raises(CheckpointRefused, match="needs Python objects unpickled"):
        load_checkpoint(str(evil))
    assert not target.exists()
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"module.conv1.weight": torch.ones(2)}}, good)
    assert torchvision_state_dict(load_checkpoint(str(good)))["conv1.weight"].tolist() == [1.0, 1.0]
    torch.load(evil, weights_only=False)  # the unrestricted loader would have run it: the test can fail
    assert target.exists()


def test_a_root_never_points_a_job_at_a_file_outside_it(tmp_path):
    from storage.artifacts import ArtifactRoot
    from storage.errors import SettingsMismatch
    from storage.extraction import recorded_describer

    root = ArtifactRoot(str(tmp_path / "root"))
    outside, inside = str(tmp_path / "weights.pth"), str(tmp_path / "root" / "weights.pth")
    root.record_stage("extract", "index", {"describe": {"backbone": "resnet50", "checkpoint": outside}})
    with pytest.raises(SettingsMismatch, match="outside the root: name it yourself"):
        recorded_describer(root, None)
    with pytest.raises(SettingsMismatch):
        recorded_describer(root, str(tmp_path / "other.pth"))
    assert recorded_describer(root, outside)["checkpoint"] == outside  # named by the user's own command
    root.record_stage("extract", "index", {"describe": {"backbone": "resnet50", "checkpoint": inside}})
    assert recorded_describer(root, None)["checkpoint"] == inside


# ------------------------------------------------------------------------------------------
# Secrets and strict JSON
# ------------------------------------------------------------------------------------------
def test_records_are_strict_json_with_every_credential_redacted(tmp_path):
    from storage import fs as sfs

    record = {
        "config": {
            "storage": {
                "key": "AKIA" + SECRET,
                "secret": SECRET,
                "client_kwargs": {"endpoint_url": f"http://user:{SECRET}@127.0.0.1:9000", "aws_session_token": SECRET},
            },
            "password": SECRET,
            "center_crop": float("nan"),
            "image_id": 3,
            "gamma": [float("inf"), 1.5],
        }
    }
    sfs.write_json(str(tmp_path / "run.json"), record)
    text = (tmp_path / "run.json").read_text()
    assert SECRET not in text and "NaN" not in text and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))["config"]
    assert back["storage"]["client_kwargs"]["endpoint_url"] == "http://***@127.0.0.1:9000"  # the endpoint stays
    assert back["center_crop"] is None and back["gamma"] == [None, 1.5] and back["image_id"] == 3
    assert record["config"]["storage"]["secret"] == SECRET  # the caller's object is untouched


def test_print_config_redacts_credentials(capsys):
    from jobs import search as search_job

    with pytest.raises(SystemExit):
        search_job.main(
            [
                "--index",
                "i",
                "--queries",
                "q",
                "--out",
                "o",
                "--print-config",
                "--set",
                f"storage={{key: k{SECRET}, secret: {SECRET}}}",
            ]
        )
    assert SECRET not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# One line for every failure, interruptions
# ------------------------------------------------------------------------------------------
def _run_cli(capsys, fn) -> tuple[int, list[str]]:
    from jobs.config import run_cli

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            run_cli(fn)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def _raise(e: BaseException):
    def fn():
        raise e

    return fn


def test_storage_and_ray_failures_are_one_line_with_their_exit_code(capsys):
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from cluster.ray_env import start_failures
    from jobs.config import Interrupted

    def ray_fails():
        with start_failures("the embedded Ray could not start"):
            raise RuntimeError("Failed to start the GCS server\nmore detail")

    def nested():
        try:
            raise NoCredentialsError()
        except NoCredentialsError as e:
            raise ValueError("cannot reshape array of size 0") from e

    cases = [
        (_raise(NoCredentialsError()), 2, "Unable to locate credentials"),
        (nested, 2, "Unable to locate credentials"),
        (_raise(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")), 1, "storage cannot be reached"),
        (ray_fails, 1, "the embedded Ray could not start: RuntimeError: Failed to start the GCS server"),
        (_raise(KeyboardInterrupt()), 130, "interrupted (SIGINT)"),
        (_raise(Interrupted(signal.SIGTERM)), 143, "interrupted (SIGTERM)"),
    ]
    for fn, code, text in cases:
        got, lines = _run_cli(capsys, fn)
        assert got == code and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines


def test_a_swallowed_interrupt_still_stops_the_job(capsys):
    """A library that catches the first SIGINT (``except BaseException``) cannot keep the job running: the
    interrupt is raised again until the job stops, and it exits 130 with the one line."""
    import os
    import time

    steps = []

    def job():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except BaseException:  # noqa: BLE001 - the library under the job swallows it
            pass
        for i in range(40):  # 20 s of work, were it not stopped
            steps.append(i)
            time.sleep(0.5)

    code, lines = _run_cli(capsys, job)
    assert code == 130 and lines == ["error: interrupted (SIGINT); run the same command again to resume"]
    assert len(steps) < 12, steps  # stopped within seconds, not at the end of the work


def test_a_failed_stage_is_never_said_done(capsys):
    from jobs.summary import JobSummary

    summary = JobSummary("t")
    with pytest.raises(KeyboardInterrupt):
        with summary.stage("work"):
            raise KeyboardInterrupt
    assert "done" not in capsys.readouterr().err and "work" not in summary.timings


def test_an_interrupted_write_leaves_no_temporary_and_a_rerun_sweeps_a_killed_ones(tmp_path, monkeypatch):
    from storage import fs as sfs
    from storage.shards import COMMITS, ShardSet

    def interrupted(*_):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sfs.write_bytes(str(tmp_path / "a.bin"), b"x")
    assert os.listdir(tmp_path) == []
    dead = subprocess.Popen(["true"])
    dead.wait()
    parts = ShardSet(str(tmp_path / "parts"))
    (tmp_path / "parts" / COMMITS).mkdir(parents=True)
    host = socket.gethostname()
    killed = [
        tmp_path / "parts" / f".tmp-{host}-{dead.pid}-abc",
        tmp_path / "parts" / COMMITS / f".tmp-{host}-{dead.pid}-d",
    ]
    live = tmp_path / "parts" / f"{sfs.temp_prefix()}live"  # a running writer's (this process) is kept
    for f in (*killed, live):
        f.write_bytes(b"half")
    assert parts.pending([0, 1]) == [0, 1]
    assert not any(f.exists() for f in killed) and live.exists()


# ------------------------------------------------------------------------------------------
# Identical queries, an inconsistent root (no Ray)
# ------------------------------------------------------------------------------------------
def test_identical_queries_point_at_their_first():
    from storage.collection import first_of_same

    nan = float("nan")
    q = pd.DataFrame(
        {
            "image_id": [5, 6, 7, 8, 9],
            "file": ["a.jpg", "a.jpg", "./a.jpg", "a.jpg", "b.jpg"],
            "x0": [nan, nan, nan, 1.0, nan],
            "y0": [nan, nan, nan, 1.0, nan],
            "x1": [nan, nan, nan, 9.0, nan],
            "y1": [nan, nan, nan, 9.0, nan],
        }
    )
    assert first_of_same(q).tolist() == [5, 5, 5, 8, 9]


def test_a_query_finds_its_own_database_image_by_any_spelling_through_a_prebuilt_index():
    from storage.collection import file_index, self_ids

    db = pd.DataFrame({"image_id": [10, 11, 12], "file": ["a.jpg", "d/b.jpg", "s3://bucket/c.jpg"]})
    q = pd.DataFrame({"file": ["./a.jpg", "d/../d/b.jpg", "s3://bucket/c.jpg", "e.jpg"]})
    assert self_ids(q, db).tolist() == [10, 11, 12, -1]
    assert self_ids(q, file_index(db)).tolist() == [10, 11, 12, -1]  # the service builds the index once


def test_a_root_whose_ids_disagree_with_its_images_is_refused(tmp_path):
    from storage.artifacts import ArtifactRoot
    from storage.errors import ArtifactError
    from storage.global_index import GlobalMeta, check_consistent, global_writer

    root = ArtifactRoot(str(tmp_path))
    vectors, ids, commit = global_writer(root, 3, 4)
    vectors[:] = 1.0
    ids[:] = [0, 1, 2]
    commit(GlobalMeta(3, 4, False))
    check_consistent(root, np.arange(5))
    root.write_array("global/ids.npy", -np.arange(3))  # negated, as a tampered root
    with pytest.raises(ArtifactError, match="2 row.s. name no image"):
        check_consistent(root, np.arange(5))
    root.write_array("global/ids.npy", np.array([0, 0, 1]))
    with pytest.raises(ArtifactError, match="more than one row"):
        check_consistent(root, np.arange(5))
    root.write_array("global/ids.npy", np.arange(2))
    with pytest.raises(ArtifactError, match="do not agree"):
        check_consistent(root, np.arange(5))


# ------------------------------------------------------------------------------------------
# Slow: the embedded Ray as the network sees it, signals to real jobs
# ------------------------------------------------------------------------------------------
EMBEDDED = """
import os, sys, time
from cluster.ray_env import RayConfig, connect
connect(RayConfig(num_cpus=1, object_store_mb=100))
print("READY", flush=True)
time.sleep(300)
"""


def _ray_processes(pid: int) -> list[psutil.Process]:
    """The job's descendants but its reaper (which outlives it by design, briefly)."""
    return [p for p in psutil.Process(pid).children(recursive=True) if "cluster.reaper" not in " ".join(p.cmdline())]


def _non_loopback_ipv4() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "AWS_", "RAY_ADDRESS"))}
    return {**env, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}  # what a careless environment has


@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only_with_a_fresh_token_and_dies_with_its_job():
    proc = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED],
        cwd=REPO,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(2)
        ray_procs = _ray_processes(proc.pid)
        listening = [
            (p.name(), c.laddr) for p in ray_procs for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN
        ]
        names = {n for n, _ in listening}
        assert {"gcs_server", "raylet"} <= names and any("Agent" in n for n in names), listening
        assert all(a.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, a in listening), listening
        ip = _non_loopback_ipv4()
        if ip:  # nothing answers on the machine's own address
            for _, a in listening:
                with pytest.raises(OSError):
                    socket.create_connection((ip, a.port), timeout=2).close()
        raylet = next(p for p in ray_procs if p.name() == "raylet").environ()
        assert raylet["RAY_AUTH_MODE"] == "token" and len(raylet["RAY_AUTH_TOKEN"]) == 64
        home_token = Path.home() / ".ray" / "auth_token"
        assert not home_token.exists() or raylet["RAY_AUTH_TOKEN"] not in home_token.read_text()
        proc.kill()  # SIGKILL: no shutdown runs in the job; its reaper ends what Ray left
        proc.wait(10)
        gone, alive = psutil.wait_procs(ray_procs, timeout=30)
        assert not alive, [p.name() for p in alive]
    finally:
        proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_job_ends_with_one_line_and_leaves_no_ray_and_no_temporary(six, tmp_path, sig):
    """(That the same command then resumes is the killed jobs' test, tests/test_faults.py.)"""
    out = tmp_path / "idx"  # six images: two shards (4 + 2), the signal comes before the second
    cmd = [
        sys.executable,
        "-m",
        "jobs.index",
        "--collection",
        str(six),
        "--out",
        str(out),
        *FAST,
        "--set",
        "stages=[extract,global]",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "shards:" in line:  # extraction is under way
            break
    ray_procs = _ray_processes(proc.pid)
    assert ray_procs
    proc.send_signal(sig)
    err = "".join(lines) + proc.stderr.read()
    assert proc.wait(60) == 128 + sig, err
    tail = err[err.rindex("[index] extract …") :]
    assert "Traceback" not in err and "done" not in tail.split("\n", 1)[1], tail
    assert err.strip().splitlines()[-1] == (
        f"error: interrupted ({signal.Signals(sig).name}); run the same command again to resume"
    )
    gone, alive = psutil.wait_procs(ray_procs, timeout=30)
    assert not alive, [p.name() for p in alive]
    assert not list(out.rglob(".tmp-*")), "an interrupted write left its temporary"
