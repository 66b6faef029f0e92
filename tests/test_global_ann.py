"""The approximate global index (:mod:`operators.ann`, ``storage.global_index``'s ``global/ann``, the index job's
``global index`` step and ``jobs.search``'s ``global_search``): plans, recall, exact scores, exclusion, persistence."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import faiss
import numpy as np
import pandas as pd
import pytest

from jobs.summary import JobSummary
from operators.ann import AnnConfig, GlobalAnn, build_ann, merge_top, plan, rescore
from operators.state import State
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError
from storage.global_index import GlobalMeta, global_writer, has_ann, open_global, read_ann, write_ann


def clustered(n: int, d: int = 64, centres: int = 50, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    """Unit rows around ``centres`` random centres (a structure IVF cells can follow)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(xq: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return faiss.knn(xq, x, k, metric=faiss.METRIC_INNER_PRODUCT)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


@pytest.mark.parametrize(
    "n, budget, kind, dim",
    [
        (10_000, 0.5, "exact", 1280),
        (100_000, 0.5, "ivf-flat", 1280),
        (100_000, 0.2, "ivf-sq8", 1280),
        (1_000_000, 0.5, "ivf-sq8", 512),
        (1_000_000, 1.0, "ivf-sq8", 1024),
        (1_000_000, 8.0, "ivf-flat", 1280),
        (1_000_000, 0.05, "ivf-pq", 256),
    ],
)
def test_plan_follows_size_and_memory_budget(n, budget, kind, dim):
    p = plan(n, 1280, AnnConfig(memory_gb=budget, exact_below=50_000))  # the budget's steps, 100k included
    assert plan(n, 1280, AnnConfig()).kind == "exact"  # the default: brute force up to 1.5M rows
    assert plan(2 * n, 1280, AnnConfig()).kind == {10_000: "exact", 100_000: "exact", 1_000_000: "ivf-sq8"}[n]
    assert (p.kind, p.dim) == (kind, dim)
    if kind != "exact":
        assert p.code_bytes <= budget * 2**30 and p.nlist == int(4 * np.sqrt(n)) and 16 <= p.nprobe <= p.nlist
        assert p.shortlist(100) == 1000 and p.shortlist(1000) == 1001


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-sq8", "ivf-pq"])
def test_forced_ivf_recall_and_exact_scores(kind):
    x, q = clustered(4000), clustered(40, seed=1)
    cfg = AnnConfig(
        kind=kind, nlist=32, default_nprobe=16, pca_dim=32 if kind == "ivf-pq" else 0, pq_bytes=16, min_shortlist=400
    )
    p = plan(len(x), x.shape[1], cfg)
    ann = build_ann(x, p, cfg, np.arange(len(x)), block=1000)
    scores, rows = ann.search(q, x, 20)
    truth_s, truth = exact_top(q, x, 20)
    assert recall(rows, truth) >= 0.95
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[rows], q), rtol=0, atol=1e-5)  # exact cosines
    assert (np.diff(scores, axis=1) <= 1e-7).all()
    full_s, _ = ann.search(q, x, 20, nprobe=p.nlist, shortlist=len(x))  # every cell, every row: exact search
    np.testing.assert_allclose(full_s, truth_s, atol=1e-5)


def test_rescore_pads_missing_candidates():
    x = clustered(10)
    rows = np.array([[3, -1, 5, -1], [-1, -1, -1, -1]])
    s, r = rescore(x[:2], x, rows, 3)
    best = [3, 5] if x[0] @ x[3] >= x[0] @ x[5] else [5, 3]
    assert r.tolist() == [[*best, -1], [-1, -1, -1]]
    assert s[0, :2].tolist() == pytest.approx([x[0] @ x[best[0]], x[0] @ x[best[1]]], abs=1e-6)
    assert np.isinf(s[0, 2]) and np.isinf(s[1]).all()


def test_merge_top_leaves_out_the_excluded_id_across_partitions():
    a = (np.array([[0.9, 0.5]], np.float32), np.array([[7, 1]]))
    b = (np.array([[0.8, 0.1]], np.float32), np.array([[4, 9]]))
    s, i = merge_top([a, b], 3, np.array([7]))
    assert i.tolist() == [[4, 1, 9]] and s[0].tolist() == pytest.approx([0.8, 0.5, 0.1])
    s, i = merge_top([a], 3, np.array([-1]))
    assert i.tolist() == [[7, 1, -1]] and np.isinf(s[0, 2])


def test_state_round_trip_is_deterministic(tmp_path):
    x = clustered(3000)
    cfg = AnnConfig(kind="ivf-sq8", nlist=16, pca_dim=32)
    p = plan(len(x), x.shape[1], cfg)
    one, two = (build_ann(x, p, cfg, np.arange(len(x))) for _ in range(2))
    assert bytes(one.state().arrays["index"]) == bytes(two.state().arrays["index"])  # seeded training
    root = ArtifactRoot(str(tmp_path))
    write_ann(root, one)
    back = read_ann(root)
    assert back.plan == one.plan and back.fingerprint == one.fingerprint and back.config == one.config
    q = clustered(5, seed=2)
    for got, want in zip(back.search(q, x, 10), one.search(q, x, 10)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="lacks"):
        GlobalAnn.from_state(State({}, one.state().params))


def write_matrix(root: ArtifactRoot, x: np.ndarray) -> None:
    vectors, ids, commit = global_writer(root, len(x), x.shape[1])
    vectors[:] = x
    ids[:] = np.arange(len(x)) * 10
    commit(GlobalMeta(count=len(x), dim=x.shape[1], whitened=False))


def test_index_step_builds_resumes_and_retires(tmp_path):
    from jobs.index import build_global_ann

    root, x = ArtifactRoot(str(tmp_path)), clustered(1000)
    write_matrix(root, x)
    cfg = AnnConfig(kind="ivf-flat", nlist=8)
    summary = JobSummary("index")
    assert build_global_ann(cfg, root, summary)["kind"] == "ivf-flat" and has_ann(root)
    first = (tmp_path / "global/ann/index.npy").stat().st_mtime_ns
    build_global_ann(cfg, root, summary)  # same matrix, same settings: kept
    assert summary.info["global_index"]["resumed"] and (tmp_path / "global/ann/index.npy").stat().st_mtime_ns == first
    write_matrix(root, x[::-1].copy())  # another matrix: rebuilt
    build_global_ann(cfg, root, summary)
    assert "resumed" not in summary.info["global_index"]
    build_global_ann(replace(cfg, kind="auto"), root, summary)  # 1,000 rows: exact, the index retired
    assert not has_ann(root) and open_global(root).meta.count == 1000


def test_a_corrupt_index_is_an_artifact_error(tmp_path):
    root, x = ArtifactRoot(str(tmp_path)), clustered(500)
    cfg = AnnConfig(kind="ivf-flat", nlist=4)
    write_ann(root, build_ann(x, plan(500, 64, cfg), cfg, np.arange(500)))
    manifest = tmp_path / "global/ann/state.json"
    state = json.loads(manifest.read_text())
    state["params"]["plan"]["n"] = 499
    manifest.write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match="holds 500"):
        read_ann(root)


@pytest.mark.slow
def test_search_uses_a_fresh_index_and_records_it(six_index, six, tmp_path):
    """On a copy of the six-image index with a forced IVF-Flat index visiting every cell, ``global_search=auto``
    ranks as exact search does and says so in run.json (the queries are the indexed images: nothing to describe,
    each left out of its own ranking)."""
    from jobs import search as search_job
    from jobs.index import build_global_ann

    root_dir = tmp_path / "root"
    shutil.copytree(six_index, root_dir)
    root = ArtifactRoot(str(root_dir))
    build_global_ann(AnnConfig(kind="ivf-flat", nlist=1), root, JobSummary("index"))
    common = ["--index", str(root_dir), "--queries", str(six), "--method", "global", "--topk", "5"]
    runs = {}
    for mode in ("auto", "exact"):
        search_job.main([*common, "--out", str(tmp_path / mode), "--set", f"global_search={mode}"])
        runs[mode] = json.loads((tmp_path / mode / "run.json").read_text())
    used = runs["auto"]["global_search"]["global"]["partitions"][0]
    assert used["used"] == "ivf-flat" and runs["exact"]["global_search"]["global"]["partitions"][0]["used"] == "exact"
    a, e = (pd.read_parquet(tmp_path / m / "results.parquet") for m in ("auto", "exact"))
    assert a["ids"].map(list).tolist() == e["ids"].map(list).tolist()
    np.testing.assert_allclose(np.concatenate(a["scores"]), np.concatenate(e["scores"]), atol=1e-5)
