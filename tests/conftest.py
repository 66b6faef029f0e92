"""Shared fixtures: one Ray instance per test session, a moto S3 server, small real data."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
INSTANCE_MINI = DATA / "instance-mini"
REVISITED = DATA / "revisited"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Small, fast describer settings for tests (the defaults are the papers').
FAST = ["--set", "describe.global_max_side=256", "--set", "describe.max_side=512",
        "--set", "describe.sift_n=300", "--set", "shard_size=4", "--set", "batch_size=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False,
             ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def instance_mini() -> Path:
    if not (INSTANCE_MINI / "images.csv").exists():
        pytest.fail(f"real test data missing: {INSTANCE_MINI}")
    return INSTANCE_MINI


@pytest.fixture(scope="session")
def mini_subset(instance_mini, tmp_path_factory) -> Path:
    """A 14-image manifest from instance-mini: 3 groups of 4 plus 2 distractors, absolute paths."""
    df = pd.read_csv(instance_mini / "images.csv")
    parts = [df[df.group == g].head(4) for g in ("strecha_herz", "sceaux", "sacre_coeur")]
    parts.append(df[df.group.str.startswith("distr_")].head(2))
    sub = pd.concat(parts)[["file", "group"]]
    sub["file"] = [str(instance_mini / f) for f in sub["file"]]
    path = tmp_path_factory.mktemp("subset") / "subset.csv"
    sub.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API: moto_server on 127.0.0.1, with a bucket ``test-bucket``."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    os.environ.update(env)
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    import s3fs

    s3fs.S3FileSystem(**options).mkdir("test-bucket")
    yield {"endpoint": endpoint, "options": options, "bucket": "test-bucket", "env": env}
    proc.terminate()
    proc.wait(10)
