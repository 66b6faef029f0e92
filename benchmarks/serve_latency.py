"""Latency and throughput of the warm query service (``retrieval serve``) under a bounded load on 127.0.0.1.

    .venv/bin/python benchmarks/serve_latency.py [--index ROOT] [--method global] [--clients 4] [--seconds 30]
                                                 [--batch 1] [--replicas 1] [--port P]

Without ``--index`` it is self-contained: it writes a synthetic collection (``retrieval synthetic``, 8 objects × 5
views) and indexes it (the tests' small describer: 256 px global, 512 px local; stages extract + global, and
codebook + asmk for ``--method asmk|fused``) under a temporary folder. It starts ``python -m jobs.serve`` (its own
embedded Ray), waits until it is ready, sends one warm-up request, then runs ``--clients`` closed-loop clients for
``--seconds``: each posts ``{"queries": [--batch files], "topk": 100}`` and sends the next request once answered.
Queries are the index's own real images (never a ``synthetic:`` distractor), described from their pixels (the
service runs with ``reuse_database_features=false``, so no query is a look-up of stored features; each is still
left out of its own ranking). Prints the machine, the counts and one line

    serve_latency METHOD: clients C, batch B, p50_ms X, p95_ms Y, requests_per_s R, queries_per_s Q, errors E

Latency is per request (a batch), from the client's send to the parsed answer. State the machine when quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.artifacts import ArtifactRoot  # noqa: E402
from storage.collection import is_synthetic  # noqa: E402

SMALL = ["describe.global_max_side=256", "describe.max_side=512", "describe.sift_n=300", "shard_size=8"]


def run(args: list[str]) -> None:
    """A job as a subprocess (its own embedded Ray); its report on stdout is not needed here."""
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def build_index(folder: Path, method: str) -> Path:
    """A small synthetic index under ``folder`` (see the module doc)."""
    run(["jobs.synthetic", "--out", str(folder / "collection")])
    stages = ["extract", "global"] + (["codebook", "asmk"] if method != "global" else [])
    sets = [x for s in [*SMALL, f"stages=[{','.join(stages)}]", "codebook.k=64"] for x in ("--set", s)]
    root = folder / "root"
    run(["jobs.index", "--collection", str(folder / "collection" / "images.csv"), "--out", str(root), *sets])
    return root


def start_service(index: str, method: str, port: int, replicas: int) -> subprocess.Popen:
    """``python -m jobs.serve`` on ``port``, returned once it prints its ready line."""
    cmd = [sys.executable, "-m", "jobs.serve", "--index", index, "--port", str(port), "--method", method]
    cmd += ["--replicas", str(replicas), "--set", "reuse_database_features=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1)[0]:
            line = proc.stdout.readline().strip()
            if line:
                print("ready:", line, flush=True)
                return proc
    proc.kill()
    raise SystemExit("the service did not start (its stderr is above)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, queries: list[str], topk: int) -> int:
    """One request; its HTTP status."""
    data = json.dumps({"queries": queries, "topk": topk}).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            json.loads(r.read())
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def load(url: str, files: list[str], clients: int, seconds: float, batch: int, topk: int) -> list[tuple[float, int]]:
    """``clients`` closed-loop clients for ``seconds``; (latency s, status) of every request."""
    done: list[tuple[float, int]] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.perf_counter() < stop:
            queries = [files[i] for i in rng.choice(len(files), batch)]
            t0 = time.perf_counter()
            status = post(url, queries, topk)
            with lock:
                done.append((time.perf_counter() - t0, status))

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done


def report(method: str, done: list[tuple[float, int]], seconds: float, clients: int, batch: int) -> None:
    ok = np.array([t for t, s in done if s == 200]) * 1000
    errors = sum(s != 200 for _, s in done)
    mem = psutil.virtual_memory().total / 2**30
    print(f"machine: {os.cpu_count()} cores, {mem:.0f} GB, {platform.processor() or platform.machine()}")
    print(f"requests: {len(done)} ({errors} not 200) in {seconds:.0f} s")
    p50, p95 = (np.percentile(ok, 50), np.percentile(ok, 95)) if len(ok) else (float("nan"),) * 2
    print(
        f"serve_latency {method}: clients {clients}, batch {batch}, p50_ms {p50:.1f}, p95_ms {p95:.1f}, "
        f"requests_per_s {len(ok) / seconds:.2f}, queries_per_s {len(ok) * batch / seconds:.2f}, errors {errors}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", help="an index root (default: build a small synthetic one)")
    ap.add_argument("--method", default="global", choices=["global", "asmk", "fused"])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--batch", type=int, default=1, help="queries per request")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-latency-") as tmp:
        index = a.index or str(build_index(Path(tmp), a.method))
        files = ArtifactRoot(index).images()["file"].astype(str)
        files = files[~is_synthetic(files)].tolist()
        port = a.port or free_port()
        proc = start_service(index, a.method, port, a.replicas)
        try:
            url = f"http://127.0.0.1:{port}/search"
            t0 = time.perf_counter()
            assert post(url, files[: a.batch], a.topk) == 200, "the warm-up request failed"
            print(f"warm-up request: {1000 * (time.perf_counter() - t0):.0f} ms")
            done = load(url, files, a.clients, a.seconds, a.batch, a.topk)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        report(a.method, done, a.seconds, a.clients, a.batch)


if __name__ == "__main__":
    main()
