"""The real cluster paths: ``ray job submit`` against a local head, and a multi-node cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

from storage.artifacts import ArtifactRoot
from tests.conftest import FAST, REPO, free_port

BIN = Path(sys.executable).parent


def _env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
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
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             "--include-dashboard=true", "--disable-usage-stats",
                             f"--dashboard-agent-listen-port={free_port()}",  # 52365 may be another Ray's
                             f"--temp-dir={tempfile.mkdtemp(prefix='r', dir='/tmp')}"],  # short: socket paths
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)
    return head, dash


def _submit(dash: int, env: dict, entrypoint: list[str], working_dir: Path | None = None) -> subprocess.CompletedProcess:
    """``ray job submit`` (retried while the head's job agent is still coming up)."""
    cmd = ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}",
           *(["--working-dir", str(working_dir)] if working_dir else []), "--", *entrypoint]
    for _ in range(60):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        if not any(s in proc.stderr for s in ("No available agent to submit job", "Connection refused",
                                              "Failed to connect")):
            break
        time.sleep(2)
    return proc


def test_ray_job_submit_against_local_head(mini_subset, tmp_path):
    head, dash = _start_head(tmp_path / "head.log", _env())
    try:
        out = tmp_path / "index"
        proc = _submit(dash, _env(), ["python", "-m", "jobs.index", "--collection", str(mini_subset), "--out", str(out),
                                      *FAST, "--set", "describe.local=none"], REPO)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (tmp_path / "head.log").read_text()[-2000:]
        assert "succeeded" in proc.stdout
        assert ArtifactRoot(str(out)).load_array("global/vectors.npy").shape == (14, 1280)
    finally:
        os.killpg(head.pid, 15)
        head.wait(60)


def test_a_head_with_token_authentication_refuses_submissions_without_the_token(tmp_path):
    """The cluster's door: with RAY_AUTH_MODE=token only a client holding the token may submit (run code)."""
    import secrets

    token = secrets.token_hex(16)
    home = tmp_path / "home"  # no ~/.ray/auth_token of the machine's user is read
    home.mkdir()
    server = dict(_env(), HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head, dash = _start_head(tmp_path / "head.log", server)
    try:
        probe = ["python", "-c", "print('ran on the cluster')"]
        allowed = _submit(dash, server, probe)
        assert allowed.returncode == 0 and "succeeded" in allowed.stdout, allowed.stderr[-3000:]
        for name, client in (("no token", dict(_env(), HOME=str(home))),
                             ("a wrong token", dict(server, RAY_AUTH_TOKEN=secrets.token_hex(16)))):
            refused = _submit(dash, client, probe)
            assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, (name, refused.stderr[-2000:])
            assert "succeeded" not in refused.stdout
    finally:
        os.killpg(head.pid, 15)
        head.wait(60)


def test_ray_config_keeps_the_door_closed():
    cfg = yaml.safe_load((REPO / "ray_config.yaml").read_text())
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert not any("0.0.0.0" in c for c in starts) and any("--dashboard-host=127.0.0.1" in c for c in starts)
    assert "/home/ubuntu/.ray/auth_token" in cfg["file_mounts"]


def test_multi_node_cluster_spreads_extraction(mini_subset, tmp_path):
    """Two Ray nodes (ray.cluster_utils.Cluster); extraction actors must run on both, and every artifact of the
    whole index (shards, global, codebook, ASMK*, graph, spectral) equals a one-node run's byte for byte.

    Each node offers one ``extract`` resource and each actor asks for it, so placement is forced
    (two 0.5-CPU actors would otherwise both fit on the head node).
    """
    out = tmp_path / "index"
    script = textwrap.dedent(f"""
        import json, sys
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "resources": {{"extract": 1}}}})
        cluster.add_node(num_cpus=1, resources={{"extract": 1}})
        cluster.wait_for_nodes()
        import ray
        ray.init(address=cluster.address)
        from jobs import index
        s = index.main(["--collection", {str(mini_subset)!r}, "--out", {str(out)!r},
                        *{FAST!r},
                        "--set", "ray.actor_resources={{extract: 1}}"])
        print("SUMMARY", json.dumps(s["counts"]))
        ray.shutdown(); cluster.shutdown()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(proc.stdout.split("SUMMARY", 1)[1].splitlines()[0])
    assert counts["images_ok"] == 14
    nodes = {r["node"] for r in ArtifactRoot(str(out)).shards().committed().values()}
    assert len(nodes) == 2, nodes
    # the same command on one node (its own embedded Ray) writes byte-identical artifacts
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "jobs.index", "--collection", str(mini_subset), "--out", str(single),
                           *FAST], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert artifact_bytes(out) == artifact_bytes(single)


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
    return {str(f.relative_to(root)): content(f) for f in sorted(root.rglob("*")) if f.is_file()
            and not set(f.relative_to(root).parts) & set(skip) and f.name != "index.json"
            and not f.name.startswith("summary-")}


def test_plan_actors_sizes_to_the_cluster():
    from cluster.ray_env import RayConfig, plan_actors

    gib = 2**30
    assert plan_actors(RayConfig(), {"CPU": 2, "memory": 20 * gib}).actors == 2      # 0.5-CPU actors, one CPU spare
    assert plan_actors(RayConfig(), {"CPU": 16, "memory": 8 * gib}).actors == 2      # memory-bound
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


def test_worker_nodes_lost_mid_extraction_and_mid_asmk_cost_nothing(mini_subset, tmp_path):
    """Head + 2 worker nodes (``ray.cluster_utils.Cluster``); one worker node dies (SIGKILLed processes) once the
    first feature shard is committed, the other once the first partial inverted file is: the job completes
    on what is left, every image is in exactly one shard, and every artifact equals a one-node run's."""
    import pandas as pd

    six = tmp_path / "six.csv"
    pd.read_csv(mini_subset).head(6).to_csv(six, index=False)
    out, single = tmp_path / "index", tmp_path / "single"
    args = ["--collection", str(six), *FAST, "--set", "shard_size=1", "--set", "codebook.k=16",
            "--set", "stages=[extract,global,codebook,asmk]"]
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
        s = index.main(["--out", str(out), *{args!r}, "--set", "ray.actor_resources={{extract: 1}}"])
        print("SUMMARY", json.dumps({{"lost": lost, **s["counts"]}}), flush=True)
        os._exit(0)  # the removed nodes' processes are gone: Cluster.shutdown would trip over them
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=500)
    assert "SUMMARY" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(proc.stdout.split("SUMMARY", 1)[1].splitlines()[0])
    assert [folder for folder, _ in counts["lost"]] == ["features", "asmk/partials"], counts
    assert all(at < 6 for _, at in counts["lost"]), counts  # both nodes died with work left
    assert counts["images_ok"] == 6 and counts["asmk_partials_built"] == 6
    shards = ArtifactRoot(str(out)).shards()
    ids = [i for t in shards.iter_tables(["image_id"]) for i in t.column("image_id").to_pylist()]
    assert sorted(ids) == list(range(6))  # no image missing, none twice
    proc = subprocess.run([sys.executable, "-m", "jobs.index", "--out", str(single), *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert artifact_bytes(out) == artifact_bytes(single)
