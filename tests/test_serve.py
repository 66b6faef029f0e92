"""The warm query service (``retrieval serve``): request parsing and answers (quick, no Ray), the engine a replica
holds against ``retrieval search`` (in-process), and one real service over HTTP (a subprocess: its own embedded
Ray, loopback only): answers equal to ``retrieval search``'s, bad requests a 400 with one line, nothing listening
beyond 127.0.0.1, a killed replica replaced with every answer still right, SIGTERM a clean stop."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import psutil
import pytest

from jobs.config import parse
from jobs.serve import FLAGS, ServeConfig
from storage.errors import CollectionError, ConfigError
from storage.search_requests import RequestError, parse_request, respond
from tests.conftest import REPO, free_port

GOOD = {"queries": ["/data/a.jpg", "s3://bucket/b.jpg"], "topk": 5}


def body(obj) -> bytes:
    return json.dumps(obj).encode()


# ------------------------------------------------------------------------------------------
# Quick: the request, the answer, the config
# ------------------------------------------------------------------------------------------
def test_parse_request_takes_queries_and_topk():
    assert parse_request(body(GOOD)) == (GOOD["queries"], 5)
    assert parse_request(body({**GOOD, "topk": 10**12}))[1] == 2**31 - 1  # clamped; the engine cuts to the database


@pytest.mark.parametrize(
    "raw, said",
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),  # nesting deeper than the parser's recursion
        (b'{"queries": ["/a.jpg"], "topk": NaN}', "not JSON"),
        (body([GOOD]), "JSON object"),
        (body({"queries": ["/a.jpg"]}), "missing key(s) ['topk']"),
        (body({"topk": 3}), "missing key(s) ['queries']"),
        (body({**GOOD, "k": 3}), "unknown key(s) ['k']"),
        (body({**GOOD, "topk": 0}), "topk must be an integer >= 1"),
        (body({**GOOD, "topk": -2}), "topk must be"),
        (body({**GOOD, "topk": 2.5}), "topk must be"),
        (body({**GOOD, "topk": "3"}), "topk must be"),
        (body({**GOOD, "topk": True}), "topk must be"),
        (body({**GOOD, "topk": None}), "topk must be"),
        (body({**GOOD, "queries": "/a.jpg"}), "non-empty list"),
        (body({**GOOD, "queries": []}), "non-empty list"),
        (body({**GOOD, "queries": ["/a.jpg", 3]}), "queries[1]"),
        (body({**GOOD, "queries": [""]}), "queries[0]"),
        (body({**GOOD, "queries": ["relative/a.jpg"]}), "absolute file path or a URI"),
        (body({**GOOD, "queries": ["/a\0.jpg"]}), "queries[0]"),
        (body({**GOOD, "queries": ["/a.jpg"] * 65}), "at most 64 per request"),
        (b" " * (2**20 + 1), "at most 1048576"),
    ],
)
def test_parse_request_refuses_a_malformed_body_in_one_line(raw, said):
    with pytest.raises(RequestError) as e:
        parse_request(raw)
    assert said in str(e.value) and "\n" not in str(e.value)


class FakeEngine:
    def __init__(self, fail: BaseException | None = None):
        self.fail, self.calls = fail, []

    def search(self, queries: list[str], topk: int) -> list[dict]:
        self.calls.append((queries, topk))
        if self.fail is not None:
            raise self.fail
        return [{"query": q, "files": ["/db/x.jpg"], "scores": [0.5]} for q in queries]


def test_respond_statuses():
    engine = FakeEngine()
    status, answer = respond(engine, "POST", "/search", body(GOOD))
    assert status == 200 and [r["query"] for r in answer["results"]] == GOOD["queries"]
    assert engine.calls == [(GOOD["queries"], 5)]
    assert respond(engine, "POST", "/search", b"{")[0] == 400
    assert respond(engine, "GET", "/search", b"")[0] == 405
    assert respond(engine, "POST", "/admin", body(GOOD))[0] == 404
    assert "at most 1 per request" in respond(engine, "POST", "/search", body(GOOD), max_queries=1)[1]["error"]
    for fail, code in [
        (RequestError("query 0 (/a.jpg) cannot be read"), 400),
        (CollectionError("a bad image\nsecond line"), 400),
        (KeyError("a bug"), 500),
    ]:
        status, answer = respond(FakeEngine(fail), "POST", "/search", body(GOOD))
        assert status == code and list(answer) == ["error"] and "\n" not in answer["error"], (fail, answer)


def test_config_defaults_and_refusals():
    cfg = parse(ServeConfig, ["--index", "ROOT"], FLAGS)
    assert (cfg.host, cfg.port, cfg.method, cfg.replicas) == ("127.0.0.1", 8000, "global", 1)
    for bad in (["--port", "0"], ["--port", "70000"], ["--method", "iasmk"], ["--replicas", "0"], ["--set", "x=1"]):
        with pytest.raises(ConfigError):
            parse(ServeConfig, ["--index", "ROOT", *bad], FLAGS)
    with pytest.raises(ConfigError):
        parse(ServeConfig, [], FLAGS)  # --index is required


# ------------------------------------------------------------------------------------------
# Slow: against retrieval search
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def queries(six) -> list[str]:
    """Four database images of ``six``: ``retrieval search`` reuses their features (it describes nothing, so it
    takes seconds) and leaves each out of its own ranking."""
    return pd.read_csv(six)["file"].tolist()[:4]


@pytest.fixture(scope="module")
def searched(ray_session, six_index, queries, starting, tmp_path_factory) -> dict[str, dict[str, tuple[list, list]]]:
    """``retrieval search`` (in-process, the session's Ray) of ``queries`` by global and fused, top 4: per method,
    per query file, (database files, scores). The service subprocess boots meanwhile (``starting``)."""
    from jobs import search as search_job
    from storage.artifacts import ArtifactRoot
    from storage.results import read_results

    tmp = tmp_path_factory.mktemp("searched")
    manifest = tmp / "queries.csv"
    pd.DataFrame({"file": queries}).to_csv(manifest, index=False)
    files = ArtifactRoot(str(six_index)).images().set_index("image_id")["file"]
    out = {}
    for method in ("global", "fused"):
        args = ["--index", str(six_index), "--queries", str(manifest), "--method", method, "--topk", "4"]
        search_job.main([*args, "--out", str(tmp / method), "--set", f"query_cache={tmp / 'cache'}"])
        table, _ = read_results(str(tmp / method))
        rows = {r["query_name"]: r for r in table.to_pylist()}  # a manifest's query is named by its file
        assert sorted(rows) == sorted(queries)
        out[method] = {q: (files.loc[r["ids"]].tolist(), r["scores"]) for q, r in rows.items()}
    return out


def same(answer: list[dict], expected: dict[str, tuple[list, list]], queries: list[str]) -> None:
    assert [r["query"] for r in answer] == queries
    for r in answer:
        files, scores = expected[r["query"]]
        assert r["files"] == files, r["query"]
        np.testing.assert_allclose(r["scores"], scores, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def engines(six_index):
    """The engine a replica holds (in-process, no Ray), by method, describing every query from its pixels
    (``reuse_database_features=false``). It runs torch on one thread, as a replica of one CPU does; the session's
    thread count is restored after the module."""
    import torch

    from jobs.serve import QueryEngine

    threads = torch.get_num_threads()
    yield {
        m: QueryEngine(ServeConfig(index=str(six_index), method=m, reuse_database_features=False))
        for m in ("global", "fused")
    }
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_engine_describes_and_ranks_as_retrieval_search(engines, six_index, queries, searched, mini_subset):
    """Described from their pixels, the database images come out as the index's extraction recorded them (global
    vectors, local descriptors), so the engine ranks them as ``retrieval search`` does (which reuses those records);
    a repeated query is answered twice; a deep ``topk`` stops at the database (less the query itself)."""
    outside = pd.read_csv(mini_subset)["file"].tolist()[-1]
    batch = [*queries, queries[1], outside]
    answer = engines["global"].search(batch, 100)
    assert [len(r["files"]) for r in answer] == [5] * 5 + [6]
    top4 = [{**r, "files": r["files"][:4], "scores": r["scores"][:4]} for r in answer[:-1]]
    same(top4, searched["global"], batch[:-1])
    engine = engines["fused"]
    ctx, (desc, qids) = engine.describe(engine.query_table(queries))
    np.testing.assert_allclose(ctx.xq, engine.lookup(ctx.queries["own"].to_numpy()), atol=1e-5)
    stored = engine.local_descriptors(dataclasses.replace(ctx, queries=ctx.queries.assign(reuse=True)), {})
    assert sorted(set(qids)) == sorted(set(stored[1])) == list(range(4))
    for q in range(4):
        np.testing.assert_allclose(desc[qids == q], stored[0][stored[1] == q], atol=1e-3)
    ids, scores = engine.rank(ctx, (desc, qids), 4).lists()
    fused = [{"query": q, "files": engine.files.loc[i].tolist(), "scores": s} for q, i, s in zip(queries, ids, scores)]
    same(fused, searched["fused"], queries)


# ------------------------------------------------------------------------------------------
# Slow: one real service (a subprocess with its own embedded Ray)
# ------------------------------------------------------------------------------------------
def post(url: str, data: bytes, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def replica_pids(pid: int) -> list[int]:
    def is_replica(p: psutil.Process) -> bool:
        try:
            return "ServeReplica:retrieval" in " ".join(p.cmdline())
        except psutil.Error:
            return False

    return [p.pid for p in tree(pid) if is_replica(p)]


@pytest.fixture(scope="module")
def starting(six_index, tmp_path_factory):
    """``python -m jobs.serve --method fused`` on a free port, started (it boots while ``searched`` runs); yields
    (process, port, stderr file); stopped by SIGTERM (exit 0) at the end of the module."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    cmd = [sys.executable, "-m", "jobs.serve", "--index", str(six_index), "--port", str(port), "--method", "fused"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    yield proc, port, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def service(starting):
    """(process, search URL, stderr file) once the service says it is ready."""
    proc, port, log = starting
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1)[0]:
            ready = json.loads(proc.stdout.readline())
            break
    else:
        pytest.fail(f"the service did not start: {log.read_text()[-3000:]}")
    assert ready["url"] == f"http://127.0.0.1:{port}/search"
    return proc, ready["url"], log


@pytest.mark.slow
def test_service_answers_as_retrieval_search_and_refuses_bad_requests(service, queries, searched, engines, mini_subset):
    proc, url, _ = service
    status, answer = post(url, body({"queries": queries, "topk": 4}))
    assert status == 200, answer
    same(answer["results"], searched["fused"], queries)
    outside = pd.read_csv(mini_subset)["file"].tolist()[-3:-1]  # described in the replica
    status, answer = post(url, body({"queries": outside, "topk": 4}))
    assert status == 200, answer
    expected = {r["query"]: (r["files"], r["scores"]) for r in engines["fused"].search(outside, 4)}
    same(answer["results"], expected, outside)
    for bad in (b"nope", body({"queries": queries}), body({"queries": queries, "topk": 0})):
        status, answer = post(url, bad)
        assert status == 400 and list(answer) == ["error"] and "\n" not in answer["error"], answer
    for missing in ("/no/such/image.jpg", str(REPO / "README.md"), str(REPO)):
        status, answer = post(url, body({"queries": [queries[0], missing], "topk": 2}))
        assert status == 400 and f"query 1 ({missing})" in answer["error"], answer


@pytest.mark.slow
def test_service_listens_on_loopback_only(service):
    proc, _, _ = service
    listening = []
    for p in tree(proc.pid):
        try:
            listening += [(p.name(), c.laddr) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    assert listening and all(a.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, a in listening), listening


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_answers_stay_right(service, queries, searched):
    proc, url, log = service
    before = replica_pids(proc.pid)
    assert len(before) == 1, before
    os.kill(before[0], signal.SIGKILL)
    for _ in range(3):  # the first waits for the new replica (Ray Serve holds it); none is answered wrongly
        status, answer = post(url, body({"queries": queries[2:], "topk": 4}))
        assert status == 200, (answer, log.read_text()[-2000:])
        same(answer["results"], searched["fused"], queries[2:])
    after = replica_pids(proc.pid)
    assert len(after) == 1 and after != before


def test_a_port_in_use_is_said_before_ray_starts():
    import socket

    from jobs.serve import check_port

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1:"):
            check_port("127.0.0.1", held.getsockname()[1])
    check_port("127.0.0.1", free_port())


def test_search_settings_default_to_retrieval_search_and_take_ranking_keys_only():
    from jobs.search import SearchConfig
    from jobs.serve import search_config

    made = search_config(ServeConfig(index="ROOT", method="fused"))
    plain = SearchConfig(index="ROOT", queries="Q", out="O")
    assert (made.method, made.fusion, made.fusion_beta, made.db_block) == (
        "fused",
        plain.fusion,
        plain.fusion_beta,
        65536,
    )
    assert search_config(ServeConfig(index="ROOT", search={"fusion_beta": 3})).fusion_beta == 3
    for bad in ({"rerank": "dfs"}, {"index": "OTHER"}, {"method": "asmk"}, {"nope": 1}, {"fusion_beta": "x"}):
        with pytest.raises(ConfigError):
            search_config(ServeConfig(index="ROOT", search=bad))
