"""The real cluster paths: ``ray job submit`` against a local head, and a multi-node cluster.

One local head (token authentication, as ray_config.yaml starts heads) serves the module's submissions; the
multi-node run is compared with the session's one-node ``six_index`` (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from storage.artifacts import ArtifactRoot
from tests.conftest import FAST, REPO, SMALL, free_port

BIN = Path(sys.executable).parent


def _env() -> dict:
    env = dict(
        os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{os.environ.get('PATH', '')}"
    )
    env.pop("RAY_ADDRESS", None)
    return env


def test_ray_config_is_a_valid_cluster_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "ray_config.yaml").read_text())
    validate_config(prepare_config(cfg))
    assert any("pip install" in c and "retrieval-pipeline" in c for c in cfg["setup_commands"])


def _start_head(log: Path, env: dict) -> tuple[subprocess.Popen, int]:
    """A local head on free ports (its dashboard on loopback); returns the process and the dashboard port."""
    port, dash = free_port(), free_port()
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}",  # 52365 may be another Ray's
            f"--temp-dir={tempfile.mkdtemp(prefix='r', dir='/tmp')}",
        ],  # short: socket paths
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        start_new_session=True,
    )
    return head, dash


def _submit(
    dash: int, env: dict, entrypoint: list[str], working_dir: Path | None = None
) -> subprocess.CompletedProcess:
    """``ray job submit`` (retried while the head's job agent is still coming up)."""
    cmd = [
        "ray",
        "job",
        "submit",
        "--address",
        f"http://127.0.0.1:{dash}",
        *(["--working-dir", str(working_dir)] if working_dir else []),
        "--",
        *entrypoint,
    ]
    for _ in range(60):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        if not any(
            s in proc.stderr for s in ("No available agent to submit job", "Connection refused", "Failed to connect")
        ):
            break
        time.sleep(2)
    return proc


def test_ray_config_keeps_the_door_closed():
    cfg = yaml.safe_load((REPO / "ray_config.yaml").read_text())
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert not any("0.0.0.0" in c for c in starts) and any("--dashboard-host=127.0.0.1" in c for c in starts)
    assert "/home/ubuntu/.ray/auth_token" in cfg["file_mounts"]


@pytest.fixture(scope="module")
def cluster_run(six, tmp_path_factory) -> dict:
    """One index of ``six`` (every stage) on a ``ray.cluster_utils.Cluster`` of a head and two worker nodes, started
    in a subprocess (this process holds the session's Ray). Every node offers one ``extract`` resource and every
    extraction actor asks for it, so placement is forced (two 0.5-CPU actors would otherwise both fit on the head
    node). One worker node dies (SIGKILLed processes) once the first feature shard is committed, the other once the
    first partial inverted file is; the graph and spectral stages run on the head alone."""
    out = tmp_path_factory.mktemp("cluster") / "root"
    script = textwrap.dedent(f"""
        import json, os, threading, time
        from pathlib import Path
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "resources": {{"extract": 1}}}})
        workers = [cluster.add_node(num_cpus=1, resources={{"extract": 1}}) for _ in range(2)]
        cluster.wait_for_nodes()
        import ray
        ray.init(address=cluster.address)
        from jobs import index
        out, lost = Path({str(out)!r}), []
        def watch():
            for folder, node in zip(("features", "asmk/partials"), workers):
                while not list((out / folder / "_commits").glob("*.json")):
                    time.sleep(0.02)
                lost.append([folder, len(list((out / folder / "_commits").glob("*.json")))])
                cluster.remove_node(node, allow_graceful=False)
        threading.Thread(target=watch, daemon=True).start()
        pinned = ["--set", "ray.actor_resources={{extract: 1}}", "--set", "ray.actors=3"]  # one actor a node
        s = index.main(["--collection", {str(six)!r}, *{SMALL!r}, *pinned, "--out", str(out)])
        print("SUMMARY", json.dumps({{"lost": lost, **s["counts"]}}), flush=True)
        os._exit(0)  # the removed nodes' processes are gone: Cluster.shutdown would trip over them
    """)
    # the pool starts dispatching shards once all its actors are up (Ray Data's default starts with the first one
    # ready, which may then take every one-image shard before the other nodes' actors have imported torch)
    env = dict(_env(), RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="300")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=700
    )
    counts = [json.loads(line.split(None, 1)[1]) for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
    return {"root": out, "counts": counts[0] if counts else None, "output": proc.stdout[-3000:] + proc.stderr[-3000:]}


@pytest.mark.slow
def test_a_multi_node_cluster_spreads_extraction_and_loses_worker_nodes_at_no_cost(cluster_run, six_index):
    """Extraction actors run on more than one node; losing a worker node mid-extraction and another mid-ASMK*
    costs nothing: the job completes on what is left, every image is in exactly one shard, and every artifact of
    the whole index (shards, global, codebook, ASMK*, graph, spectral) equals a one-node run's byte for byte."""
    assert cluster_run["counts"], cluster_run["output"]
    out, counts = cluster_run["root"], cluster_run["counts"]
    assert [folder for folder, _ in counts["lost"]] == ["features", "asmk/partials"], counts
    assert all(at < 6 for _, at in counts["lost"]), counts  # both nodes died with work left
    assert counts["images_ok"] == 6 and counts["asmk_partials_built"] == 6
    shards = ArtifactRoot(str(out)).shards()
    assert len({r["node"] for r in shards.committed().values()}) >= 2
    ids = [i for t in shards.iter_tables(["image_id"]) for i in t.column("image_id").to_pylist()]
    assert sorted(ids) == list(range(6))  # no image missing, none twice
    assert artifact_bytes(out) == artifact_bytes(six_index)  # the same command on one node (the session's Ray)


def artifact_bytes(root: Path) -> dict[str, bytes]:
    """Every artifact file of a root, leaving out the records of when and where work ran (commit records,
    stage records, summaries, a stage's seconds and threads)."""
    skip = ("_commits", "stages", "query-cache")

    def content(f: Path) -> bytes:
        if f.suffix != ".json":
            return f.read_bytes()
        record = json.loads(f.read_text())
        record.pop("seconds", None), record.pop("cpus", None)  # how long a stage took, on how many threads
        return json.dumps(record, sort_keys=True).encode()

    return {
        str(f.relative_to(root)): content(f)
        for f in sorted(root.rglob("*"))
        if f.is_file()
        and not set(f.relative_to(root).parts) & set(skip)
        and f.name != "index.json"
        and not f.name.startswith("summary-")
    }


def test_plan_actors_sizes_to_the_cluster():
    from cluster.ray_env import RayConfig, plan_actors

    gib = 2**30
    assert plan_actors(RayConfig(), {"CPU": 2, "memory": 20 * gib}).actors == 2  # 0.5-CPU actors, one CPU spare
    assert plan_actors(RayConfig(), {"CPU": 16, "memory": 8 * gib}).actors == 2  # memory-bound
    gpu = plan_actors(RayConfig(), {"CPU": 16, "GPU": 4, "memory": 64 * gib})
    assert (gpu.actors, gpu.num_gpus) == (4, 1.0)
    pinned = plan_actors(RayConfig(actor_resources={"extract": 1}), {"CPU": 8, "extract": 3, "memory": 64 * gib})
    assert (pinned.actors, pinned.resources) == (3, {"extract": 1})
    # an autoscaling cluster before any worker is up (ray_config.yaml: CPU-only head, GPU workers from 0)
    auto = plan_actors(RayConfig(actor_gpus=1, max_actors=8), {"CPU": 0.0, "memory": 16 * gib})
    assert (auto.concurrency, auto.num_gpus, auto.num_cpus) == ((1, 8), 1.0, 1.0)
    assert plan_actors(RayConfig(max_actors=4), {"CPU": 2, "memory": 20 * gib}).concurrency == (1, 4)
    cpu_only = plan_actors(RayConfig(actor_gpus=0), {"CPU": 16, "GPU": 4, "memory": 64 * gib})
    assert cpu_only.num_gpus == 0 and cpu_only.num_cpus == 0.5
    assert plan_actors(RayConfig(actor_gpus=0.5), {"CPU": 16, "GPU": 2, "memory": 64 * gib}).actors == 4


def test_a_small_extraction_starts_few_actors():
    """No more actors than shards; one per IMAGES_PER_ACTOR images unless the pool was set by the user."""
    from cluster.ray_env import IMAGES_PER_ACTOR, RayConfig, fit_to_work, plan_actors

    big = plan_actors(RayConfig(), {"CPU": 16, "memory": 64 * 2**30})
    assert big.actors >= 4
    assert fit_to_work(big, RayConfig(), shards=3, images=12).actors == 1  # a few queries: one start-up
    assert fit_to_work(big, RayConfig(), shards=50, images=3 * IMAGES_PER_ACTOR).actors == 3
    assert fit_to_work(big, RayConfig(), shards=2, images=10_000).actors == 2
    assert fit_to_work(big, RayConfig(), shards=500, images=10_000).actors == big.actors
    assert fit_to_work(big, RayConfig(actors=6), shards=3, images=12).actors == 3  # set by the user: shards only
    pinned = RayConfig(actor_resources={"extract": 1})
    assert fit_to_work(plan_actors(pinned, {"CPU": 8, "extract": 3}), pinned, shards=6, images=6).actors == 3


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A local head with token authentication; ``env`` holds the token (the server's and a rightful client's)."""
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token of the machine's user is read
    log = home.parent / "head.log"
    server = dict(_env(), HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    proc, dash = _start_head(log, server)
    try:
        yield {"dash": dash, "env": server, "home": home, "log": log}
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """End a ``ray start --block`` head and every process it started: SIGKILL to its process group (SIGTERM makes
    the head stop each process in turn, ~30 s), then whatever runs outside the group (its workers) ends with it."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, 9)
    except (psutil.NoSuchProcess, ProcessLookupError):
        family = []
    proc.wait(60)
    _, alive = psutil.wait_procs(family, timeout=30)
    for p in alive:
        p.kill()


@pytest.mark.slow
def test_ray_job_submit_against_local_head(head, six, tmp_path):
    out = tmp_path / "index"
    proc = _submit(
        head["dash"],
        head["env"],
        [
            "python",
            "-m",
            "jobs.index",
            "--collection",
            str(six),
            "--out",
            str(out),
            *FAST,
            "--set",
            "describe.local=none",
        ],
        REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + head["log"].read_text()[-2000:]
    assert "succeeded" in proc.stdout
    assert ArtifactRoot(str(out)).load_array("global/vectors.npy").shape == (6, 1280)


@pytest.mark.slow
def test_a_head_with_token_authentication_refuses_submissions_without_the_token(head):
    """The cluster's door: with RAY_AUTH_MODE=token only a client holding the token may submit (run code)."""
    server = head["env"]
    probe = ["python", "-c", "print('ran on the cluster')"]
    allowed = _submit(head["dash"], server, probe)
    assert allowed.returncode == 0 and "succeeded" in allowed.stdout, allowed.stderr[-3000:]
    for name, client in (
        ("no token", dict(_env(), HOME=str(head["home"]))),
        ("a wrong token", dict(server, RAY_AUTH_TOKEN=secrets.token_hex(16))),
    ):
        refused = _submit(head["dash"], client, probe)
        assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, (name, refused.stderr[-2000:])
        assert "succeeded" not in refused.stdout
