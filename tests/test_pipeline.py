"""End-to-end jobs on a subset of instance-mini: index -> search -> evaluate, errors, resume, S3."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jobs import evaluate as evaluate_job
from jobs import index as index_job
from jobs import search as search_job
from storage import fs as sfs
from storage.artifacts import ArtifactRoot
from storage.errors import SettingsMismatch
from storage.graph import graph_problem
from storage.results import read_results, read_run
from storage.whitening import read_whitening
from tests.conftest import FAST

pytestmark = pytest.mark.slow  # every test runs jobs on Ray (the session's, or its own)


@pytest.fixture(scope="module")
def collection(mini_subset, tmp_path_factory):
    """The subset plus one corrupt file and one missing file."""
    d = tmp_path_factory.mktemp("coll")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    df = pd.read_csv(mini_subset)
    df = pd.concat(
        [df, pd.DataFrame({"file": [str(d / "corrupt.jpg"), str(d / "missing.jpg")], "group": [None, None]})]
    )
    df.to_csv(d / "collection.csv", index=False)
    return d / "collection.csv"


@pytest.fixture(scope="module")
def built_index(ray_session, collection, tmp_path_factory):
    out = tmp_path_factory.mktemp("index")
    summary = index_job.main(["--collection", str(collection), "--out", str(out), *FAST])
    return out, summary


def test_index_records_errors_and_builds_global(built_index):
    out, summary = built_index
    assert summary["counts"]["images"] == 16
    assert summary["counts"]["images_ok"] == 14 and summary["counts"]["images_error"] == 2
    root = ArtifactRoot(str(out))
    table = root.shards().read_all(["image_id", "status", "error"]).to_pandas()
    errors = table[table.status == "error"].set_index("image_id")["error"]
    assert set(errors.index) == {14, 15}
    assert "ImageDecodeError" in errors[14] and "FileNotFoundError" in errors[15]
    vectors, ids = root.load_array("global/vectors.npy"), root.load_array("global/ids.npy")
    assert vectors.shape == (14, 1280) and sorted(ids.tolist()) == list(range(14))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    meta = root.meta()
    assert meta["schema_version"] == 2 and meta["stages"]["extract"]["settings"]["describe"]["local"] == "rootsift"
    local = root.shards().read_all(["local_desc"]).column("local_desc")
    assert 0 < len(local[0]) <= 300
    # the whole collection is counted and its failures listed, also in a CSV
    assert summary["counts"]["collection_images"] == 16 and summary["counts"]["collection_failed"] == 2
    failed = pd.read_csv(out / "failed-images.csv")
    assert failed["image_id"].tolist() == [14, 15] and failed["file"].str.endswith(".jpg").all()
    assert [f["image_id"] for f in summary["failed_images"]] == [14, 15]


def test_a_resumed_run_counts_the_whole_collection(built_index, collection):
    out, _ = built_index
    again = index_job.main(["--collection", str(collection), "--out", str(out), *FAST, "--set", "stages=[extract]"])
    assert again["counts"]["shards_skipped"] == again["counts"]["shards_total"]
    assert again["counts"].get("images_ok", 0) == 0  # nothing extracted by this run …
    assert again["counts"]["collection_ok"] == 14 and again["counts"]["collection_failed"] == 2  # … all counted


def test_search_in_small_query_blocks_equals_one_block_and_exclude_self(built_index, mini_subset, tmp_path):
    """Offsets between query blocks (query_block = 3 over 14 queries) and exclude_self=false."""
    out, _ = built_index
    q = ["--index", str(out), "--queries", str(mini_subset), "--topk", "5"]
    search_job.main([*q, "--out", str(tmp_path / "one")])
    search_job.main([*q, "--out", str(tmp_path / "blocks"), "--set", "query_block=3", "--set", "db_block=4"])
    one = pd.read_parquet(tmp_path / "one" / "results.parquet")
    blocks = pd.read_parquet(tmp_path / "blocks" / "results.parquet")
    assert one["query_id"].tolist() == blocks["query_id"].tolist()
    assert all(list(a) == list(b) for a, b in zip(one["ids"], blocks["ids"]))
    assert all(np.allclose(a, b) for a, b in zip(one["scores"], blocks["scores"]))
    assert not any(qid in ids for qid, ids in zip(one["query_id"], one["ids"]))  # own image left out
    search_job.main([*q, "--out", str(tmp_path / "self"), "--set", "exclude_self=false"])
    own = pd.read_parquet(tmp_path / "self" / "results.parquet")
    assert [ids[0] for ids in own["ids"]] == own["query_id"].tolist()  # own image first, score ~1
    assert np.allclose([s[0] for s in own["scores"]], 1.0, atol=1e-4)
    run = json.loads((tmp_path / "self" / "run.json").read_text())
    assert run["method"] == "global" and run["rerank"] == "none" and run["index"] == str(out)


def test_rerun_resumes_only_missing_shards(built_index, collection):
    out, _ = built_index
    root = ArtifactRoot(str(out))
    before = root.shards().committed()
    sfs.remove(root.shards().commit_path(1))  # as if the job died while writing shard 1
    summary = index_job.main(["--collection", str(collection), "--out", str(out), *FAST])
    assert summary["counts"]["shards_skipped"] == len(before) - 1 and summary["counts"]["shards_written"] == 1
    assert set(root.shards().committed()) == set(before)


def test_rerun_with_other_settings_is_refused_before_any_work(built_index, collection):
    out, _ = built_index
    root = ArtifactRoot(str(out))
    images_before = (out / "images.parquet").read_bytes()
    with pytest.raises(SettingsMismatch, match="describe.sift_n 300 -> 200"):
        index_job.main(["--collection", str(collection), "--out", str(out), *FAST, "--set", "describe.sift_n=200"])
    assert (out / "images.parquet").read_bytes() == images_before
    assert root.meta()["stages"]["extract"]["settings"]["describe"]["sift_n"] == 300


def test_collection_grows_with_stable_ids(ray_session, mini_subset, tmp_path):
    """Images added to the collection get new ids and new shards; recorded ones keep theirs."""
    df = pd.read_csv(mini_subset)
    first, later = df.iloc[:6], df.iloc[6:9]
    out = tmp_path / "grow"
    args = ["--out", str(out), *FAST, "--set", "stages=[extract,global]"]
    first.to_csv(tmp_path / "v1.csv", index=False)
    index_job.main(["--collection", str(tmp_path / "v1.csv"), *args])
    ids_v1 = ArtifactRoot(str(out)).images().set_index("file")["image_id"]
    pd.concat([later, first]).to_csv(tmp_path / "v2.csv", index=False)  # new images listed first
    # a smaller shard size cuts only the new images; an autoscaling pool of 1…2 actors extracts them
    summary = index_job.main(
        ["--collection", str(tmp_path / "v2.csv"), *args, "--set", "shard_size=2", "--set", "ray.max_actors=2"]
    )
    assert summary["counts"]["shards_skipped"] == 2 and summary["counts"]["shards_written"] == 2
    assert summary["actors"]["min_actors"] == 1 and summary["actors"]["actors"] == 2
    root = ArtifactRoot(str(out))
    images = root.images().set_index("file")
    assert images.loc[ids_v1.index, "image_id"].tolist() == ids_v1.tolist()
    assert sorted(images.loc[later.file, "image_id"]) == [6, 7, 8]
    assert images.loc[later.file, "shard"].tolist() == [2, 2, 3]
    assert sorted(root.load_array("global/ids.npy").tolist()) == list(range(9))
    pd.concat([later, first.iloc[1:]]).to_csv(tmp_path / "v3.csv", index=False)
    with pytest.raises(ValueError, match="1 image\\(s\\) missing now"):
        index_job.main(["--collection", str(tmp_path / "v3.csv"), *args])


def test_global_whitening_applies_to_database_and_queries(built_index, collection, mini_subset, tmp_path):
    """PCA-whitening learned on a sample of the database, applied to queries too; removed when off."""
    out, _ = built_index
    root = ArtifactRoot(str(out))
    raw = root.load_array("global/vectors.npy", mmap=False).copy()
    try:
        summary = index_job.main(
            [
                "--collection",
                str(collection),
                "--out",
                str(out),
                *FAST,
                "--set",
                "stages=[global]",
                "--global-whiten-dim",
                "8",
                "--set",
                "global_whiten_images=10",
            ]
        )
        assert summary["counts"]["global_whitening_sample"] == 10
        white = read_whitening(root, "global")
        assert white.dim == 8 and root.load_array("global/vectors.npy").shape == (14, 8)
        res = tmp_path / "res"
        search_job.main(
            [
                "--index",
                str(out),
                "--queries",
                str(mini_subset),
                "--out",
                str(res),
                "--topk",
                "13",
                "--set",
                "reuse_database_features=false",
            ]
        )
        results = pd.read_parquet(res / "results.parquet").set_index("query_id")
        vectors = dict(zip(root.load_array("global/ids.npy").tolist(), root.load_array("global/vectors.npy")))
        q = 0  # a fresh query extraction, whitened: its own image's whitened vector scores ~1
        assert vectors[results.ids[q][0]] @ vectors[q] == pytest.approx(results.scores[q][0], abs=1e-3)
        # learned on another root: a copy holding only shards 0 and 1 (4 + 4 images)
        other = tmp_path / "other"
        shutil.copytree(out / "features", other / "features")
        for c in (other / "features" / "_commits").glob("part-*.json"):
            if int(c.stem[5:]) > 1:
                c.unlink()
        summary = index_job.main(
            [
                "--collection",
                str(collection),
                "--out",
                str(out),
                *FAST,
                "--set",
                "stages=[global]",
                "--global-whiten-dim",
                "4",
                "--set",
                f"global_whiten_source={other}",
            ]
        )
        assert summary["counts"]["global_whitening_sample"] == 8 and read_whitening(root, "global").dim == 4
    finally:
        index_job.main(["--collection", str(collection), "--out", str(out), *FAST, "--set", "stages=[global]"])
    assert read_whitening(root, "global") is None
    assert np.allclose(root.load_array("global/vectors.npy"), raw)


def test_query_manifest_boxes_crop_the_queries(built_index, mini_subset, tmp_path):
    out, _ = built_index
    q = pd.read_csv(mini_subset).head(3)
    q = q.assign(x0=[10, 20, 30], y0=[5, 6, 7], x1=[200, 210, 220], y1=[150, 160, 170])
    q.to_csv(tmp_path / "queries.csv", index=False)
    res = tmp_path / "res"
    summary = search_job.main(
        ["--index", str(out), "--queries", str(tmp_path / "queries.csv"), "--out", str(res), "--topk", "5"]
    )
    assert summary["counts"].get("queries_reusing_database_features", 0) == 0  # cropped: described anew
    meta = (
        ArtifactRoot(read_run(str(res))["queries_root"])
        .shards()
        .read_all(["image_id", "x0", "y0", "x1", "y1"])
        .to_pandas()
    )
    assert (
        meta.sort_values("image_id")[["x0", "y0", "x1", "y1"]].to_numpy().tolist()
        == q[["x0", "y0", "x1", "y1"]].to_numpy().astype(float).tolist()
    )
    assert len(pd.read_parquet(res / "results.parquet")) == 3


def test_queries_whose_database_image_failed_get_empty_rankings(built_index, collection, tmp_path):
    """The corrupt and the missing database images as queries: described anew, fail, rank nothing."""
    out, _ = built_index
    files = pd.read_csv(collection)["file"].tolist()
    pd.DataFrame({"file": [files[14], files[15], files[0]]}).to_csv(tmp_path / "q.csv", index=False)
    res = tmp_path / "res"
    summary = search_job.main(
        ["--index", str(out), "--queries", str(tmp_path / "q.csv"), "--out", str(res), "--topk", "5"]
    )
    assert summary["counts"]["queries_reusing_database_features"] == 1
    results = pd.read_parquet(res / "results.parquet").set_index("query_id")
    assert len(results.ids[0]) == 0 and len(results.ids[1]) == 0
    assert len(results.ids[2]) == 5 and 0 not in results.ids[2]


def test_local_whitening_sample_replaces_images_it_cannot_describe(ray_session, mini_subset, tmp_path):
    """Six images too small for the network and two good ones; the sample of two must find the good."""
    import cv2

    files = pd.read_csv(mini_subset)["file"].head(2).tolist()
    for i in range(6):
        cv2.imwrite(str(tmp_path / f"tiny{i}.png"), np.full((5 + i, 7, 3), 40 * i, np.uint8))
        files.insert(0, str(tmp_path / f"tiny{i}.png"))
    pd.DataFrame({"file": files}).to_csv(tmp_path / "c.csv", index=False)
    summary = index_job.main(
        [
            "--collection",
            str(tmp_path / "c.csv"),
            "--out",
            str(tmp_path / "idx"),
            *FAST,
            "--set",
            "stages=[extract,global]",
            "--set",
            "describe.local=how",
            "--set",
            "describe.local_scales=[1.0]",
            "--set",
            "describe.local_n=20",
            "--set",
            "local_whiten_images=2",
            "--set",
            "local_whiten_dim=8",
        ]
    )
    assert summary["counts"]["images_ok"] == 2 and summary["counts"]["images_error"] == 6
    assert read_whitening(ArtifactRoot(str(tmp_path / "idx")), "local").dim == 8
    errors = ArtifactRoot(str(tmp_path / "idx")).shards().read_all(["status", "error"]).to_pandas()
    assert errors[errors.status == "error"].error.str.contains("too small").all()


def test_search_and_evaluate_whole_and_cropped(built_index, mini_subset, tmp_path):
    out, _ = built_index
    maps = []
    for crop, floor in ((None, 0.9), (0.4, 0.3)):
        res = tmp_path / f"res-{crop}"
        args = ["--index", str(out), "--queries", str(mini_subset), "--out", str(res), "--topk", "50"]
        search_job.main(args + (["--center-crop", str(crop)] if crop else []))
        results = pd.read_parquet(res / "results.parquet")
        assert len(results) == 14
        for qid, ids, scores in zip(results.query_id, results.ids, results.scores):
            assert qid not in ids, "a database image never ranks itself"
            assert len(ids) == 13 and np.all(np.diff(scores) <= 1e-6)
        metrics = evaluate_job.main(["--results", str(res), "--ground-truth", str(mini_subset)])
        assert metrics["queries"] == 12  # the two distractors have no positives
        assert json.loads((res / "metrics.json").read_text())["mAP"] == pytest.approx(metrics["mAP"])
        assert metrics["mAP"] >= floor, (crop, metrics["mAP"])
        page = (res / "report.html").read_text()  # 12 queries with positives: each + its top 10 as thumbnails
        assert page.count('class="q"') == 12 and page.count("<img ") == 12 * 11
        assert f"{100 * metrics['mAP']:.2f}" in page
        assert page.count("border-color:#2e9e44") + page.count("border-color:#d0342c") == 12 * 10
        maps.append(100 * metrics["mAP"])
    qmeta = (
        ArtifactRoot(read_run(str(tmp_path / "res-0.4"))["queries_root"])
        .shards()
        .read_all(["x0", "x1", "width"])
        .to_pandas()
    )
    assert np.allclose(qmeta.x0, qmeta.width * 0.3, atol=1) and np.allclose(qmeta.x1, qmeta.width * 0.7, atol=1)
    # the comparison page of both: one row each, in the given order, with the evaluated mAP
    from jobs import report as report_job

    report_job.main(["--results", f"{tmp_path / 'res-None'},{tmp_path / 'res-0.4'}", "--out", str(tmp_path / "cmp")])
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert table.queries.tolist() == ["whole", "crop 0.4"] and table.method.tolist() == ["global", "global"]
    assert np.allclose(table.mAP, maps) and (table.ms_per_query > 0).all()
    page = (tmp_path / "cmp" / "comparison.html").read_text()
    assert page.count("<svg") == 3 and "Index: time per stage" in page and f"{maps[1]:.1f} mAP" in page


@pytest.mark.parametrize("method", ["global", "asmk"])
def test_reused_database_features_equal_fresh_extraction(built_index, mini_subset, tmp_path, method):
    """Reused queries read their database image's own shard (global row, local descriptors)."""
    out, _ = built_index
    runs = {}
    for reuse in (True, False):
        res = tmp_path / f"res-{reuse}"
        s = search_job.main(
            [
                "--index",
                str(out),
                "--queries",
                str(mini_subset),
                "--out",
                str(res),
                "--topk",
                "5",
                "--method",
                method,
                "--set",
                f"reuse_database_features={str(reuse).lower()}",
            ]
        )
        assert s["counts"].get("queries_reusing_database_features", 0) == (14 if reuse else 0)
        runs[reuse] = pd.read_parquet(res / "results.parquet")
    a, b = runs[True], runs[False]
    assert a.query_id.tolist() == b.query_id.tolist()
    assert np.allclose(np.stack(a.scores), np.stack(b.scores), atol=1e-4)
    assert [list(x) for x in a.ids] == [list(x) for x in b.ids]


def test_second_search_of_the_same_queries_describes_nothing(built_index, mini_subset, tmp_path):
    out, _ = built_index
    args = ["--index", str(out), "--queries", str(mini_subset), "--topk", "5", "--center-crop", "0.7"]
    first = search_job.main(args + ["--out", str(tmp_path / "a")])
    again = search_job.main(args + ["--out", str(tmp_path / "b"), "--method", "asmk"])
    assert first["counts"]["shards_written"] > 0 and "shards_written" not in again["counts"]
    assert again["counts"]["shards_skipped"] == again["counts"]["shards_total"]
    assert first["query_cache"] == again["query_cache"] and first["query_cache"].startswith(str(out / "query-cache"))
    other = search_job.main(args[:-1] + ["0.6", "--out", str(tmp_path / "c")])  # another crop: another entry
    assert other["query_cache"] != first["query_cache"] and other["counts"]["shards_written"] > 0
    off = search_job.main(args + ["--out", str(tmp_path / "d"), "--set", "query_cache=results"])
    assert off["query_cache"] == str(tmp_path / "d" / "queries") and off["counts"]["shards_written"] > 0
    same = [pd.read_parquet(tmp_path / r / "results.parquet").ids.map(list).tolist() for r in ("a", "d")]
    assert same[0] == same[1]


def test_index_and_search_on_s3(ray_session, mini_subset, s3_server, tmp_path):
    """Index root and results on a real S3 API; images uploaded to S3 too."""
    fs, _ = sfs.filesystem("s3://x", s3_server["options"])
    df = pd.read_csv(mini_subset).head(6)
    bucket = s3_server["bucket"]
    for f in df.file:
        fs.put(f, f"{bucket}/images/{f.rsplit('/', 1)[1]}")
    df["file"] = [f.rsplit("/", 1)[1] for f in df.file]
    fs.pipe(f"{bucket}/images/manifest.csv", df.to_csv(index=False).encode())
    gone = pd.concat([df, pd.DataFrame({"file": ["gone.jpg"], "group": [None]})])  # listed, never uploaded
    fs.pipe(f"{bucket}/images/database.csv", gone.to_csv(index=False).encode())
    opts = ["--set", f"storage={json.dumps(s3_server['options'])}"]
    summary = index_job.main(
        ["--collection", f"s3://{bucket}/images/database.csv", "--out", f"s3://{bucket}/idx", *FAST, *opts]
    )
    assert summary["counts"]["images_ok"] == 6 and summary["counts"]["images_error"] == 1
    assert [f["file"].endswith("gone.jpg") and "FileNotFoundError" in f["error"] for f in summary["failed_images"]] == [
        True
    ]
    search_job.main(
        [
            "--index",
            f"s3://{bucket}/idx",
            "--queries",
            f"s3://{bucket}/images/manifest.csv",
            "--out",
            f"s3://{bucket}/res",
            "--topk",
            "3",
            *opts,
        ]
    )
    metrics = evaluate_job.main(["--results", f"s3://{bucket}/res", "--ground-truth", str(mini_subset), *opts])
    assert metrics["queries"] == 6 and 0 < metrics["mAP"] <= 1
    assert fs.exists(f"{bucket}/res/metrics.json") and fs.exists(f"{bucket}/idx/global/vectors.npy")


def test_how_local_features_with_learned_whitening(ray_session, mini_subset, tmp_path):
    """Deep local features from the stride-16 block: whitening learned on a sample, then applied."""
    out = tmp_path / "how"
    summary = index_job.main(
        [
            "--collection",
            str(mini_subset),
            "--out",
            str(out),
            *FAST,
            "--set",
            "describe.local=how",
            "--set",
            "describe.local_layer=block10",
            "--set",
            "describe.local_scales=[1.0,0.5]",
            "--set",
            "describe.local_n=40",
            "--set",
            "local_whiten_images=6",
            "--set",
            "local_whiten_dim=16",
        ]
    )
    assert summary["counts"]["images_ok"] == 14
    root = ArtifactRoot(str(out))
    white = read_whitening(root, "local")
    assert white is not None and white.proj.shape == (16, 112)
    t = root.shards().read_all(["local_desc", "local_scale", "local_xy", "width", "height"])
    first = np.array(t.column("local_desc")[0].as_py(), np.float32)
    assert first.shape == (40, 16)
    scales = set(np.concatenate([np.asarray(s.as_py()) for s in t.column("local_scale")]).tolist())
    assert scales <= {1.0, 0.5} and len(scales) == 2
    xy = np.concatenate([np.asarray(v.as_py()) for v in t.column("local_xy")])
    assert xy.min() >= 0 and xy[:, 0].max() <= t.column("width").to_numpy().max()


def test_asmk_stage_merge_equals_single_build(built_index):
    """The merged inverted file equals one built in one process from all descriptors."""
    import pyarrow.compute as pc

    from operators.asmk import aggregate, build_inverted_file
    from operators.codebook import Quantizer
    from storage.inverted_file import open_inverted_file
    from storage.schemas import local_arrays

    out, summary = built_index
    root = ArtifactRoot(str(out))
    assert summary["counts"]["asmk_partials_built"] == len(root.shards().committed())
    ivf, meta = open_inverted_file(root)
    centroids = root.load_array("codebook/centroids.npy", mmap=False)
    t = root.shards().read_all(["image_id", "status", "local_desc"])
    t = t.filter(pc.equal(t.column("status"), "ok"))
    desc, ids, _ = local_arrays(t)
    desc = desc.astype(np.float32)
    ref = build_inverted_file(aggregate(desc, ids, Quantizer(centroids)(desc), centroids), len(centroids))
    assert np.array_equal(ivf.offsets, ref.offsets) and np.array_equal(ivf.images, ref.images)
    assert np.array_equal(ivf.entry_image, ref.entry_image) and np.array_equal(ivf.codes, ref.codes)
    assert np.array_equal(ivf.image_entries, ref.image_entries)
    assert meta["bytes_per_entry"] == 20 and meta["entries"] == len(ref.entry_image)
    # HNSW assignment searching as many candidates as there are words finds the exact words: the same index
    collection = root.images()  # the stage reads the committed shards only
    try:
        s = index_job.main(
            [
                "--collection",
                str(out / "unused.csv"),
                "--out",
                str(out),
                *FAST,
                "--set",
                "stages=[asmk]",
                "--set",
                "asmk.assign.method=hnsw",
                "--set",
                f"asmk.assign.ef_search={len(centroids)}",
            ]
        )
        assert s["counts"]["asmk_partials_built"] == len(root.shards().committed())
        hnsw, _ = open_inverted_file(root)
        assert np.array_equal(hnsw.entry_image, ref.entry_image) and np.array_equal(hnsw.codes, ref.codes)
        assert root.stage_settings("asmk")["assign"]["method"] == "hnsw"
    finally:
        index_job.main(["--collection", str(out / "unused.csv"), "--out", str(out), *FAST, "--set", "stages=[asmk]"])
    assert root.images().equals(collection)


def test_asmk_and_fused_search(built_index, mini_subset, tmp_path):
    out, _ = built_index
    maps = {}
    for method in ("global", "asmk", "fused"):
        res = tmp_path / method
        search_job.main(
            [
                "--index",
                str(out),
                "--queries",
                str(mini_subset),
                "--out",
                str(res),
                "--topk",
                "20",
                "--method",
                method,
                "--center-crop",
                "0.6",
            ]
        )
        results = pd.read_parquet(res / "results.parquet")
        assert len(results) == 14
        for qid, ids, scores in zip(results.query_id, results.ids, results.scores):
            assert qid not in ids and np.all(np.diff(scores) <= 1e-6)
        maps[method] = evaluate_job.main(["--results", str(res), "--ground-truth", str(mini_subset)])["mAP"]
    assert maps["asmk"] > 0.5 and maps["fused"] > 0.5, maps


def test_distractor_index_searched_together(built_index, mini_subset, tmp_path):
    """A separately built index (same codebook, other ids) joins the search without rebuilding either."""
    out, _ = built_index
    df = pd.read_csv(mini_subset).tail(4)
    df.to_csv(tmp_path / "distr.csv", index=False)
    distr = tmp_path / "distr"
    index_job.main(
        [
            "--collection",
            str(tmp_path / "distr.csv"),
            "--out",
            str(distr),
            *FAST,
            "--set",
            "id_offset=1000",
            "--set",
            f"codebook.source={out}",
        ]
    )
    both, single = tmp_path / "both", tmp_path / "single"
    q = ["--queries", str(mini_subset), "--topk", "30", "--method", "asmk", "--center-crop", "0.6"]
    search_job.main(["--index", str(out), "--out", str(single), *q])
    search_job.main(["--index", str(out), "--distractors", str(distr), "--out", str(both), *q])
    a, b = pd.read_parquet(single / "results.parquet"), pd.read_parquet(both / "results.parquet")
    assert any(i >= 1000 for ids in b.ids for i in ids), "distractor ids are returned"
    for (ia, sa), (ib, sb) in zip(zip(a.ids, a.scores), zip(b.ids, b.scores)):
        got = dict(zip(ib, sb))
        for i, s in zip(ia, sa):  # scores of the main index do not change (no IDF)
            if i in got:
                assert got[i] == pytest.approx(s, abs=1e-6)


def test_graph_and_spectral_stages(built_index):
    """The index's default graph stage: exact kNN of the global vectors, mutual affinity, eigenpairs on the LCC."""
    from operators.graph import affinity, largest_component, normalize
    from storage.graph import load_affinity, load_graph

    out, summary = built_index
    root = ArtifactRoot(str(out))
    x = np.asarray(root.load_array("global/vectors.npy"))
    nn, sims = root.load_array("graph/knn_ids.npy"), root.load_array("graph/knn_sims.npy")
    assert nn.shape == (14, 13)  # k = min(50, n − 1)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    np.testing.assert_allclose(sims, -np.sort(-full, axis=1)[:, :13], atol=1e-5)
    assert not np.any(nn == np.arange(14)[:, None])
    w = load_affinity(root)
    np.testing.assert_allclose(w.toarray(), affinity(nn, sims).toarray(), rtol=1e-6)
    u, lam = root.load_array("spectral/U.npy"), root.load_array("spectral/lambda.npy")
    order = root.load_array("graph/order.npy")
    position = np.argsort(order)
    u = u[position]  # rows are stored in the locality order: back to node order
    lcc = largest_component(w)
    np.testing.assert_array_equal(np.sort(order[root.load_array("spectral/lcc.npy")]), lcc)
    np.testing.assert_allclose(u[lcc].T @ u[lcc], np.eye(len(lam)), atol=1e-5)
    s = normalize(w[lcc][:, lcc]).toarray()
    np.testing.assert_allclose(s @ u[lcc], u[lcc] * lam, atol=1e-5)
    assert not np.any(np.delete(u, lcc, axis=0))
    g = load_graph(root)  # the solvers' view: W, S and U in the locality order, memory-mapped
    np.testing.assert_allclose(g.w.toarray(), w[order][:, order].toarray(), rtol=1e-6)
    np.testing.assert_allclose(g.s.toarray(), normalize(w[order][:, order]).toarray(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g.position[order], np.arange(14))
    assert np.array_equal(np.flatnonzero(g.decomposed), np.sort(position[lcc]))
    from operators.spectral import sparsify

    shybrid = load_graph(root, sparse_keep=0.01).u  # SHybrid's U, stored by the stage (spectral.sparse_keep)
    assert sp.issparse(shybrid)
    np.testing.assert_array_equal(shybrid.toarray(), sparsify(np.asarray(g.u), 0.01))
    assert not sp.issparse(load_graph(root, sparse_keep=0.5).u)  # not stored: rerank sparsifies the dense U
    assert summary["counts"]["graph_nodes"] == 14


def test_asmk_graph_is_symmetric_ranked_and_excludes_self(built_index, tmp_path):
    import shutil

    from jobs import graph as graph_job

    out = tmp_path / "copy"
    shutil.copytree(built_index[0], out)
    root = ArtifactRoot(str(out))
    exact = np.asarray(root.load_array("graph/knn_ids.npy"))
    # the IVF path (above ivf_threshold) probing every list is exact too
    s = graph_job.main(
        [
            "--index",
            str(out),
            "--rank",
            "0",
            "--set",
            "graph.ivf_threshold=5",
            "--set",
            "graph.nlist=2",
            "--set",
            "graph.nprobe=2",
            "--set",
            "graph.block=6",
        ]
    )
    assert s["graph_knn"] == "ivf"
    np.testing.assert_array_equal(root.load_array("graph/knn_ids.npy"), exact)
    assert not (out / "spectral" / "meta.json").exists()  # the old eigenpairs went with the old graph
    skipped = graph_job.main(["--index", str(out), "--set", "stages=[spectral]", "--set", "spectral.max_nodes=3"])
    assert skipped["spectral"]["skipped"] and not (out / "spectral" / "meta.json").exists()
    # drivers refuse, before any task, what the graph cannot serve — with the command that fixes it
    assert graph_problem(root) is None
    assert "stages=[spectral]" in graph_problem(root, spectral=True)
    (out / "graph" / "ordered_data.npy").rename(out / "graph" / "moved.npy")
    assert "rebuild" in graph_problem(root)
    (out / "graph" / "moved.npy").rename(out / "graph" / "ordered_data.npy")
    graph_job.main(["--index", str(out), "--source", "asmk", "--k", "5", "--rank", "0"])
    nn, sims = root.load_array("graph/knn_ids.npy"), root.load_array("graph/knn_sims.npy")
    assert nn.shape == (14, 5) and not np.any(nn == np.arange(14)[:, None])
    assert np.all(np.diff(sims, axis=1) <= 1e-7)
    pair = {(i, int(j)): s for i in range(14) for j, s in zip(nn[i], sims[i]) if j >= 0}
    both = [(a, b) for a, b in pair if (b, a) in pair]
    assert both and all(pair[a, b] == pytest.approx(pair[b, a], abs=1e-6) for a, b in both)  # MA 1 both ways


def test_search_rerank_methods(built_index, mini_subset, tmp_path):
    out, _ = built_index
    q = ["--index", str(out), "--queries", str(mini_subset), "--topk", "13", "--center-crop", "0.6"]
    search_job.main([*q, "--out", str(tmp_path / "none")])
    initial = pd.read_parquet(tmp_path / "none" / "results.parquet")
    maps = {}
    for name, rr, extra in (
        *((m, m, []) for m in ("alpha-qe", "aqe", "dfs", "truncated-dfs", "fsr", "hybrid", "cas")),
        ("fsrw", "fsr", ["--set", "rerank_params.fsrw=true"]),
    ):
        res = tmp_path / name
        search_job.main([*q, "--out", str(res), "--rerank", rr, "--set", "rerank_params.shortlist=5", *extra])
        results = pd.read_parquet(res / "results.parquet")
        assert len(results) == 14
        for qid, ids, scores in zip(results.query_id, results.ids, results.scores):
            assert qid not in ids and len(set(ids)) == len(ids) and np.all(np.diff(scores) <= 1e-6), rr
        maps[name] = evaluate_job.main(["--results", str(res), "--ground-truth", str(mini_subset)])["mAP"]
        if rr == "truncated-dfs":  # outside its shortlist the initial order is kept
            for a, b in zip(initial.ids, results.ids):
                assert set(a[:5]) == set(b[:5]) and list(a[5:]) == list(b[5:])
    assert min(maps.values()) > 0.3, maps


def test_offline_rerank_resumes_and_matches_direct_diffusion(built_index, tmp_path):
    from jobs import rerank as rerank_job
    from operators.diffusion import temporal, top_k
    from operators.graph import normalize
    from storage.graph import load_affinity

    out, _ = built_index
    res = tmp_path / "offline"
    args = [
        "--index",
        str(out),
        "--out",
        str(res),
        "--method",
        "dfs",
        "--top",
        "6",
        "--set",
        "items_per_task=5",
        "--set",
        "params.dtype=float64",
    ]
    s1 = rerank_job.main(args)
    assert s1["counts"]["parts_total"] == 3 and s1["counts"]["rows_written"] == 14
    sfs.remove(sfs.join(str(res), "parts", "_commits", "part-00001.json"))
    s2 = rerank_job.main(args)
    assert s2["counts"]["parts_skipped"] == 2 and s2["counts"]["rows_written"] == 5
    table, _ = read_results(str(res))
    lists = dict(zip(table.column("query_id").to_pylist(), table.column("ids").to_pylist()))
    ids = np.asarray(ArtifactRoot(str(out)).load_array("global/ids.npy"))
    f = temporal(normalize(load_affinity(ArtifactRoot(str(out)))), np.eye(14), tol=1e-6, maxiter=20)
    _, idx = top_k(f, 6, exclude=np.arange(14))
    for i in range(14):
        reached = [j for j in idx[i] if f[j, i] > 0]
        assert lists[int(ids[i])][: len(reached)] == ids[reached].tolist()


def test_codebook_is_reused_unless_its_config_changes(built_index, collection, tmp_path):
    from storage.codebook import codebook_meta, load_codebook

    out, _ = built_index
    root = ArtifactRoot(str(out))
    before = load_codebook(root).copy()
    again = index_job.main(["--collection", str(collection), "--out", str(out), *FAST, "--set", "stages=[codebook]"])
    assert again["counts"]["codebook_reused"] == 1 and np.array_equal(load_codebook(root), before)
    # another root takes this codebook by reference: copied, not trained
    other = tmp_path / "other"
    shutil.copytree(out / "features", other / "features")
    shutil.copy(out / "images.parquet", other / "images.parquet")
    copied = index_job.main(
        [
            "--collection",
            str(collection),
            "--out",
            str(other),
            *FAST,
            "--set",
            "stages=[codebook]",
            "--set",
            f"codebook.source={out}",
        ]
    )
    assert "codebook_reused" not in copied["counts"]
    assert np.array_equal(load_codebook(ArtifactRoot(str(other))), before)
    assert codebook_meta(ArtifactRoot(str(other)))["source"] == str(out)
    # another seed: trained anew (a different codebook), then its config is the recorded one
    seeded = index_job.main(
        [
            "--collection",
            str(collection),
            "--out",
            str(other),
            *FAST,
            "--set",
            "stages=[codebook]",
            "--set",
            "codebook.seed=7",
        ]
    )
    assert "codebook_reused" not in seeded["counts"] and not np.array_equal(
        load_codebook(ArtifactRoot(str(other))), before
    )


def _exit_line(capsys, main) -> tuple[int, str]:
    """``run_cli(main)``'s exit code and its one ``error:`` line. The failing job asks Ray to shut down (checked);
    the request is recorded, not carried out, so the session's Ray serves the next job."""
    import ray

    from jobs.config import run_cli
    from tests.conftest import ray_shutdowns_recorded

    with ray_shutdowns_recorded() as shutdowns, pytest.raises(SystemExit) as e:
        run_cli(main)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1, err
    assert shutdowns == [1] or not ray.is_initialized(), "the failed job left its Ray running"
    return e.value.code, err[0]


def test_user_mistakes_inside_jobs_exit_2_with_one_line(built_index, mini_subset, tmp_path, capsys):
    """Mistakes only the job can see (files, roots, ground truth) — in-process, on the session's Ray."""
    from jobs import report as report_job

    out, _ = built_index
    base = ["--queries", str(mini_subset), "--out", str(tmp_path / "r")]
    nogroup = tmp_path / "nogroup.csv"
    pd.read_csv(mini_subset)[["file"]].to_csv(nogroup, index=False)
    res = tmp_path / "ok"
    search_job.main(["--index", str(out), *base[:2], "--out", str(res), "--topk", "3"])
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text(json.dumps({"schema_version": 1, "stages": {}}))
    cases = [
        (lambda: search_job.main(["--index", str(tmp_path / "nothing"), *base]), "is not an index (no images.parquet)"),
        (
            lambda: search_job.main(
                ["--index", str(out), "--queries", str(tmp_path / "none"), "--out", str(tmp_path / "r")]
            ),
            "none",
        ),
        (
            lambda: search_job.main(
                ["--index", str(out), *base, "--method", "asmk", "--set", "asmk.params.binary=false"]
            ),
            "asmk.params.binary must match the index",
        ),
        (lambda: search_job.main(["--index", str(old), *base]), "schema version 1"),
        (lambda: evaluate_job.main(["--results", str(res), "--ground-truth", str(nogroup)]), "has no 'group' column"),
        (lambda: report_job.main(["--results", str(res), "--out", str(tmp_path / "cmp")]), "has no metrics.json"),
    ]
    for main, message in cases:
        code, line = _exit_line(capsys, main)
        assert code == 2 and message in line, line


def test_discover_compresses_the_index_and_search_reads_it(built_index, mini_subset, tmp_path):
    from jobs import discover as discover_job
    from storage.centrality import load_centrality
    from storage.global_index import global_ids
    from storage.iasmk import open_compressed

    out, _ = built_index
    root = ArtifactRoot(str(out))
    s = discover_job.main(["--index", str(out), "--tau-g", "3"])
    c = s["counts"]
    assert isinstance(c["asmk_entries"], int) and isinstance(c["iasmk_entries"], int)
    assert c["iasmk_entries"] == c["asmk_entries"] - c["iasmk_vectors_in_components"] + c["iasmk_components"]
    assert c["iasmk_components"] > 0 and c["iasmk_ranges_built"] > 0
    assert json.loads((out / "summary-discover.json").read_text())["counts"]["iasmk_entries"] == c["iasmk_entries"]
    civf, meta = open_compressed(root)
    assert civf.offsets[-1] == c["iasmk_entries"] and meta["params"]["tau_g"] == 3
    scores, modes, cmeta = load_centrality(root)
    assert np.isclose(np.sum(scores["stationary"]), 1.0) and len(scores["katz"]) == len(global_ids(root))
    assert set(modes.tolist()) <= set(global_ids(root).tolist()) and cmeta["modes"] == len(modes) > 0
    again = discover_job.main(["--index", str(out), "--tau-g", "3", "--set", "stages=[iasmk]"])
    assert again["counts"]["iasmk_ranges_built"] == 0 and again["counts"]["iasmk_entries"] == c["iasmk_entries"]
    q = ["--index", str(out), "--queries", str(mini_subset), "--topk", "13"]
    for method in ("iasmk", "fused-iasmk"):
        search_job.main(q + ["--out", str(tmp_path / method), "--method", method])
        results = pd.read_parquet(tmp_path / method / "results.parquet")
        assert len(results) == 14 and all(len(ids) > 0 for ids in results.ids)
        assert read_run(str(tmp_path / method))["params"]["iasmk"]["tau_g"] == 3
    # without components (τ_g beyond any image pair) the compressed index ranks exactly as ASMK*
    discover_job.main(["--index", str(out), "--tau-g", "100000", "--set", "stages=[iasmk]"])
    for method in ("asmk", "iasmk"):
        search_job.main(q + ["--out", str(tmp_path / f"plain-{method}"), "--method", method])
    a, b = (pd.read_parquet(tmp_path / f"plain-{m}" / "results.parquet") for m in ("asmk", "iasmk"))
    assert [list(x) for x in a.ids] == [list(x) for x in b.ids]
    assert np.allclose(np.concatenate(a.scores.tolist()), np.concatenate(b.scores.tolist()))


def test_mine_writes_pairs_a_page_and_resumes(built_index, collection, tmp_path):
    from jobs import discover as discover_job
    from jobs import mine as mine_job
    from storage.global_index import global_ids

    out, _ = built_index
    discover_job.main(["--index", str(out), "--tau-g", "3", "--set", "stages=[iasmk]"])
    pairs = tmp_path / "pairs"
    s = mine_job.main(
        ["--index", str(out), "--out", str(pairs), "--set", "anchors_per_task=2", "--set", "iasmk_min_shared=1"]
    )
    table = pd.concat([pd.read_parquet(p) for p in sorted((pairs / "parts").glob("part-*.parquet"))])
    assert {"anchor_id", "other_id", "label", "score", "source"} <= set(table.columns)
    ids = set(global_ids(ArtifactRoot(str(out))).tolist())
    assert set(table.anchor_id) <= ids and set(table.other_id) <= ids and set(table.label) <= {0, 1}
    assert (table.anchor_id != table.other_id).all() and "iasmk" in set(table.source)
    # 14 images: neighbourhoods of n / 4 = 3, so manifold pools may be empty, but every block is committed
    assert len(list((pairs / "parts" / "_commits").glob("*.json"))) == -(-s["counts"]["anchors"] // 2) + 1
    assert s["counts"]["pairs"] == len(table) and s["counts"]["anchors"] >= 1
    assert (pairs / "pairs.html").read_text().count('class="q"') >= 1
    assert json.loads((pairs / "summary-mine.json").read_text())["counts"]["pairs"] == len(table)
    again = mine_job.main(
        ["--index", str(out), "--out", str(pairs), "--set", "anchors_per_task=2", "--set", "iasmk_min_shared=1"]
    )
    assert again["counts"]["parts_skipped"] >= 1 and again["counts"]["pairs"] == len(table)
    # the closed loop's last step: Lw learned from the pairs re-indexes the global descriptors
    root = ArtifactRoot(str(out))
    try:
        s = index_job.main(
            [
                "--collection",
                str(collection),
                "--out",
                str(out),
                *FAST,
                "--set",
                "stages=[global]",
                "--set",
                f"global_whiten_pairs={pairs}",
                "--global-whiten-dim",
                "4",
            ]
        )
        assert s["counts"]["lw_positive_pairs"] == int((table.label == 1).sum())
        assert read_whitening(root, "global").dim == 4 and root.load_array("global/vectors.npy").shape == (14, 4)
        assert np.allclose(np.linalg.norm(root.load_array("global/vectors.npy"), axis=1), 1, atol=1e-5)
    finally:
        index_job.main(["--collection", str(collection), "--out", str(out), *FAST, "--set", "stages=[global]"])
    assert read_whitening(root, "global") is None


def test_object_discovery_stage_and_os_search(built_index, mini_subset, tmp_path):
    import torch

    from jobs import discover as discover_job
    from operators.gem import multiscale_gem
    from operators.objects import os_boxes, region_search
    from operators.saliency import SaliencyParams, l2n, region_gem
    from storage.extraction import global_describer as _describer
    from storage.global_index import open_global
    from storage.objects import load_katz, open_regions

    out, _ = built_index
    root = ArtifactRoot(str(out))
    s = discover_job.main(["--index", str(out), "--set", "stages=[objects]", "--set", "objects.images_per_task=5"])
    table, regions = open_regions(root)
    g = open_global(root)
    assert s["counts"]["object_regions"] == len(table) == len(regions.ids) == len(load_katz(root)) > len(g.ids)
    assert set(table.image_id) == set(np.asarray(g.ids).tolist())
    assert (table.y1 > table.y0).all() and (table.x1 > table.x0).all()
    os_vec = open_global(root, "objects/global")
    assert np.array_equal(os_vec.ids, g.ids) and os_vec.vectors.shape == g.vectors.shape
    assert np.allclose(np.linalg.norm(os_vec.vectors, axis=1), 1, atol=1e-5)
    assert not np.allclose(os_vec.vectors, g.vectors)
    # one image's descriptor recomputed from the operators equals the stored one
    describer, white = _describer(root)
    row = 3
    file = root.images().set_index("image_id").loc[int(g.ids[row]), "file"]
    from operators.images import decode_image
    from storage.collection import read_image_bytes

    maps = describer.global_maps([decode_image(read_image_bytes(file))])[0]
    p, search = SaliencyParams(), region_search(regions.vectors, None, 0)
    fs, katz_g, owner = table.fs.to_numpy(np.float32), load_katz(root), np.asarray(regions.ids)
    per_scale = [
        l2n(
            region_gem(
                a, os_boxes(a, int(g.ids[row]), search, owner, fs, katz_g, white, p, 3 * p.max_regions), p.gem_p
            ).sum(0)
        )
        for a in maps
    ]
    v = l2n(multiscale_gem([torch.from_numpy(x)[None] for x in per_scale])[0].numpy())
    assert np.allclose(v, os_vec.vectors[row], atol=1e-5)
    again = discover_job.main(["--index", str(out), "--set", "stages=[objects]", "--set", "objects.images_per_task=5"])
    assert again["counts"]["region_parts_skipped"] == 3 and again["counts"]["os_parts_skipped"] == 3
    # the IVF path (many regions) probing every list is the exact search
    exact = np.array(os_vec.vectors)
    discover_job.main(
        [
            "--index",
            str(out),
            "--set",
            "stages=[objects]",
            "--set",
            "objects.knn.ivf_threshold=10",
            "--set",
            "objects.knn.nlist=4",
            "--set",
            "objects.knn.nprobe=4",
        ]
    )
    assert np.allclose(open_global(root, "objects/global").vectors, exact, atol=1e-5)
    search_job.main(
        [
            "--index",
            str(out),
            "--queries",
            str(mini_subset),
            "--topk",
            "13",
            "--out",
            str(tmp_path / "os"),
            "--method",
            "os",
        ]
    )
    results = pd.read_parquet(tmp_path / "os" / "results.parquet")
    assert len(results) == 14 and all(len(ids) == 13 for ids in results.ids)


def test_unusual_images_are_described_and_a_bomb_is_an_error_row(ray_session, mini_subset, tmp_path):
    """Grey, 16-bit, alpha and EXIF-rotated images are indexed like their plain versions; a decompression bomb
    becomes an error row with its reason; no good image is dropped."""
    import cv2

    from tests.test_images import WEBP_BOMB, bomb_png, patched_jpeg, patched_tiff, with_exif_orientation

    photo = cv2.imread(pd.read_csv(mini_subset)["file"].iloc[0])
    photo = cv2.resize(photo, (256, 192), interpolation=cv2.INTER_AREA)
    q100 = [cv2.IMWRITE_JPEG_QUALITY, 100]
    files = {
        "upright.jpg": cv2.imencode(".jpg", photo, q100)[1].tobytes(),
        "exif.jpg": with_exif_orientation(
            cv2.imencode(".jpg", np.ascontiguousarray(np.rot90(photo)), q100)[1].tobytes(), 6
        ),
        "grey.png": cv2.imencode(".png", cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY))[1].tobytes(),
        "deep.png": cv2.imencode(".png", photo.astype(np.uint16) * 257)[1].tobytes(),
        "alpha.png": cv2.imencode(".png", np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)]))[1].tobytes(),
        "bomb.png": bomb_png(60_000, 60_000),
        "bomb.webp": WEBP_BOMB,
        "bomb.tif": patched_tiff(12000, 12000),
        "bomb-fill.jpg": patched_jpeg(12000, 12000, fill=True),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pd.DataFrame({"file": [str(tmp_path / n) for n in files]}).to_csv(tmp_path / "c.csv", index=False)
    summary = index_job.main(
        [
            "--collection",
            str(tmp_path / "c.csv"),
            "--out",
            str(tmp_path / "idx"),
            *FAST,
            "--set",
            "stages=[extract,global]",
            "--set",
            "describe.local=none",
        ]
    )
    assert summary["counts"]["images_ok"] == 5 and summary["counts"]["images_error"] == 4
    root = ArtifactRoot(str(tmp_path / "idx"))
    table = root.shards().read_all(["image_id", "status", "error"]).to_pandas().set_index("image_id")
    assert table.status[5] == "error" and "declared size 60000x60000" in table.error[5]
    for i in (6, 7, 8):  # WebP, TIFF, a JPEG with a fill byte before its frame header: refused from the header
        assert table.status[i] == "error" and "declared size 12000x12000" in table.error[i], table.error[i]
    g = dict(zip(root.load_array("global/ids.npy").tolist(), root.load_array("global/vectors.npy")))
    assert float(g[0] @ g[1]) > 0.99  # EXIF-rotated = upright
    assert float(g[0] @ g[3]) > 0.999 and float(g[0] @ g[4]) > 0.999  # 16-bit and alpha: the same colours
    assert float(g[0] @ g[2]) > 0.9  # grey: the same scene without its colours


def test_entries_instead_of_descriptors_give_the_same_inverted_file(built_index, collection, mini_subset, tmp_path):
    """local_store=entries: extraction writes each image's ASMK* entries of a given codebook (no descriptors),
    the asmk stage merges them without a partial file, and the inverted file and searches equal the
    descriptor-built ones."""
    out, _ = built_index
    entries = tmp_path / "entries"
    s = index_job.main(
        [
            "--collection",
            str(collection),
            "--out",
            str(entries),
            *FAST,
            "--set",
            "local_store=entries",
            "--set",
            f"codebook.source={out}",
            "--set",
            "stages=[extract,global,codebook,asmk]",
        ]
    )
    assert s["counts"]["asmk_shards_of_entries"] == len(ArtifactRoot(str(entries)).shards().indices())
    assert s["counts"].get("asmk_partials_built", 0) == 0
    for name in ("offsets", "entry_image", "codes", "images", "image_entries"):
        a, b = (np.load(r / "asmk" / f"{name}.npy") for r in (out, entries))
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    again = index_job.main(
        [
            "--collection",
            str(collection),
            "--out",
            str(entries),
            *FAST,
            "--set",
            "local_store=entries",
            "--set",
            f"codebook.source={out}",
            "--set",
            "stages=[asmk]",
        ]
    )
    assert again["counts"]["asmk_merge_skipped"] == 1  # unchanged shards: the inverted file is not merged again
    t = ArtifactRoot(str(entries)).shards().read_all(["local_desc", "asmk_words", "asmk_codes"])
    assert sum(len(v) for v in t.column("local_desc").to_pylist()) == 0
    assert t.column("asmk_codes").type.value_type.list_size == 16
    size = lambda r: sum(f.stat().st_size for f in (r / "features").glob("*.parquet"))  # noqa: E731
    assert size(entries) < 0.5 * size(out), (size(entries), size(out))
    q = ["--queries", str(mini_subset), "--topk", "20", "--method", "asmk"]
    search_job.main(["--index", str(out), "--out", str(tmp_path / "a"), *q])
    search_job.main(["--index", str(entries), "--out", str(tmp_path / "b"), *q])
    a, b = (read_results(str(tmp_path / r))[0].to_pandas() for r in "ab")
    assert [list(x) for x in a.ids] == [list(x) for x in b.ids]
    assert np.allclose(np.concatenate(list(a.scores)), np.concatenate(list(b.scores)), atol=1e-6)
    with pytest.raises(Exception, match="codebook.source"):
        index_job.main(
            ["--collection", str(collection), "--out", str(tmp_path / "none"), *FAST, "--set", "local_store=entries"]
        )


def test_synthetic_distractors_join_an_entries_index_deterministically(built_index, collection, mini_subset, tmp_path):
    """jobs.distractors appends images and shards of ASMK* entries (+ global) to a root; the same seed writes
    the same bytes, a rerun writes nothing, and the index stages then cover real images and distractors."""
    from jobs import distractors as distractors_job

    out, _ = built_index
    roots = [tmp_path / "a", tmp_path / "b"]
    args = ["--donors", str(out), "--n", "30", "--set", "shard_size=8"]
    index_job.main(
        [
            "--collection",
            str(collection),
            "--out",
            str(roots[0]),
            *FAST,
            "--set",
            "local_store=entries",
            "--set",
            f"codebook.source={out}",
            "--set",
            "stages=[extract]",
        ]
    )
    shutil.copytree(roots[0], roots[1])  # the same real images in both roots; each gets its own distractors run
    for r in roots:
        s = distractors_job.main([*args, "--out", str(r)])
        assert s["counts"]["distractors_written"] == 30 and s["counts"]["shards_total"] == 4
    images = ArtifactRoot(str(roots[0])).images()
    real = images[~images["file"].str.startswith("synthetic:")]
    synth = images[images["file"].str.startswith("synthetic:")]
    assert len(real) == 16 and len(synth) == 30 and synth["image_id"].min() > real["image_id"].max()
    assert synth["shard"].min() > real["shard"].max()
    for name in sorted(p.name for p in (roots[0] / "features").glob("*.parquet")):
        assert (roots[0] / "features" / name).read_bytes() == (roots[1] / "features" / name).read_bytes(), name
    again = distractors_job.main([*args, "--out", str(roots[0])])
    assert again["counts"].get("distractors_written", 0) == 0 and again["counts"]["shards_skipped"] == 4
    with pytest.raises(SettingsMismatch):
        distractors_job.main(["--donors", str(out), "--n", "31", "--out", str(roots[0])])
    # a rerun of the real collection's extraction keeps the distractors; the stages index both
    s = index_job.main(
        [
            "--collection",
            str(collection),
            "--out",
            str(roots[0]),
            *FAST,
            "--set",
            "local_store=entries",
            "--set",
            f"codebook.source={out}",
            "--set",
            "stages=[extract,global,codebook,asmk]",
        ]
    )
    assert s["counts"]["shards_skipped"] == s["counts"]["shards_total"]
    ivf = np.load(roots[0] / "asmk" / "images.npy")
    assert set(synth["image_id"]) <= set(ivf.tolist()) and s["counts"]["global_vectors"] == 14 + 30
    res = tmp_path / "res"
    search_job.main(
        [
            "--index",
            str(roots[0]),
            "--queries",
            str(mini_subset),
            "--out",
            str(res),
            "--topk",
            "44",
            "--method",
            "fused",
        ]
    )
    ranked = read_results(str(res))[0].to_pandas()
    assert any(i in set(synth["image_id"]) for ids in ranked.ids for i in ids)


def test_gss_trains_resumes_from_its_checkpoint_and_reranks(built_index, mini_subset, tmp_path):
    from jobs import train_reranker
    from storage.learned import load_model as load

    def load_model(r):
        m = load(r, "gss")
        return m.meta, m.weights, m.embeddings

    out = tmp_path / "copy"
    shutil.copytree(built_index[0], out)
    root = ArtifactRoot(str(out))
    args = ["--index", str(out), "--set", "gss.lr=1e-3", "--set", "checkpoint_every=2", "--set", "block=5"]
    first = train_reranker.main([*args, "--steps", "2"])
    assert first["gss"]["steps_run"] == 2 and first["gss"]["resumed_at"] == 0
    longer = train_reranker.main([*args, "--steps", "4"])  # continues from the checkpoint of step 2
    assert longer["gss"]["resumed_at"] == 2 and longer["gss"]["steps_run"] == 2
    _, w_resumed, emb_resumed = load_model(root)
    emb_resumed = np.array(emb_resumed)
    assert train_reranker.main([*args, "--steps", "4"])["counts"]["models_reused"] == 1
    fresh = tmp_path / "fresh"
    shutil.copytree(built_index[0], fresh)
    train_reranker.main([*args[:1], str(fresh), *args[2:], "--steps", "4"])
    meta, w_fresh, emb_fresh = load_model(ArtifactRoot(str(fresh)))
    for k in w_fresh:  # a resumed run ends where an uninterrupted one does
        np.testing.assert_array_equal(w_resumed[k], w_fresh[k])
    np.testing.assert_array_equal(emb_resumed, emb_fresh)
    assert meta["nodes"] == 14 and 0 < meta["beta"] <= 1 + 1e-6  # 14 of the 196 pairs are an item with itself
    assert sorted(p.name for p in (fresh / "gss").glob("*.npy")) == ["degree.npy", "embeddings.npy", "state_1.npy"]
    q = ["--index", str(out), "--queries", str(mini_subset), "--topk", "13", "--center-crop", "0.6"]
    res = tmp_path / "gss"
    search_job.main([*q, "--out", str(res), "--rerank", "gss"])
    results = pd.read_parquet(res / "results.parquet")
    assert len(results) == 14
    for qid, ids, scores in zip(results.query_id, results.ids, results.scores):
        assert qid not in ids and len(set(ids)) == len(ids) and np.all(np.diff(scores) <= 1e-6)
    assert evaluate_job.main(["--results", str(res), "--ground-truth", str(mini_subset)])["mAP"] > 0.3
    # a rebuilt graph invalidates the model; search then says which command makes it
    from jobs import graph as graph_job

    graph_job.main(["--index", str(out), "--rank", "0", "--k", "6"])
    with pytest.raises(Exception, match="train_reranker"):
        search_job.main([*q, "--out", str(tmp_path / "again"), "--rerank", "gss"])


def test_gradnet_trains_and_reranks_by_query_feature_expansion(built_index, mini_subset, tmp_path):
    from jobs import train_reranker
    from storage.learned import load_model

    out = tmp_path / "copy"
    shutil.copytree(built_index[0], out)
    args = [
        "--index",
        str(out),
        "--method",
        "gradnet",
        "--set",
        "gradnet.k=5",
        "--set",
        "gradnet.anchors=6",
        "--set",
        "gradnet.dims=[32,16]",
        "--set",
        "checkpoint_every=3",
        "--set",
        "gradnet.max_steps=5",
    ]
    first = train_reranker.main([*args, "--set", "gradnet.epochs=1"])["gradnet"]  # 1 epoch of 14 sextets: one batch
    assert first["steps"] == 1 and first["nodes"] == 14
    again = train_reranker.main(args)["gradnet"]  # 300 epochs capped at 5 batches: continues from step 1
    assert again["resumed_at"] == 1 and again["steps_run"] == 4
    emb = load_model(ArtifactRoot(str(out)), "gradnet").embeddings
    assert emb.shape == (14, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    q = ["--index", str(out), "--queries", str(mini_subset), "--topk", "13", "--center-crop", "0.6"]
    res = tmp_path / "gradnet"
    search_job.main([*q, "--out", str(res), "--rerank", "gradnet"])
    results = pd.read_parquet(res / "results.parquet")
    for qid, ids, scores in zip(results.query_id, results.ids, results.scores):
        assert qid not in ids and len(set(ids)) == len(ids) and np.all(np.diff(scores) <= 1e-6)
    assert evaluate_job.main(["--results", str(res), "--ground-truth", str(mini_subset)])["mAP"] > 0.2


# ------------------------------------------------------------------------------------------
# Nothing runs, nothing leaks, nothing crashes (a built index, in-process on the session's Ray)
# ------------------------------------------------------------------------------------------
def _tampered_copy(out, tmp_path, **describe) -> str:
    """A copy of the built root whose recorded extraction settings say ``describe``."""
    root = tmp_path / "tampered"
    shutil.copytree(out, root)
    for record in (root / "index.json", root / "stages" / "extract.json"):
        data = json.loads(record.read_text())
        stage = data["stages"]["extract"] if "stages" in data else data
        stage["settings"]["describe"].update(describe)
        record.write_text(json.dumps(data))
    return str(root)


def test_a_tampered_root_runs_no_code_and_reaches_no_file_outside_it(built_index, mini_subset, tmp_path, capsys):
    import pickle

    from tests.test_security import Evil

    out, _ = built_index
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"state_dict": Evil(str(target))}))
    queries = ["--queries", str(mini_subset), "--out", str(tmp_path / "r"), "--center-crop", "0.5"]
    inside = _tampered_copy(out, tmp_path, backbone="resnet50", checkpoint=str(tmp_path / "tampered" / "ckpt.pth"))
    shutil.copy(evil, tmp_path / "tampered" / "ckpt.pth")
    code, line = _exit_line(capsys, lambda: search_job.main(["--index", inside, *queries]))
    assert code == 2 and "needs Python objects unpickled" in line and "describe.checkpoint" in line, line
    shutil.rmtree(tmp_path / "tampered")
    outside = _tampered_copy(out, tmp_path, backbone="resnet50", checkpoint=str(evil))
    code, line = _exit_line(capsys, lambda: search_job.main(["--index", outside, *queries]))
    assert code == 2 and "outside the root" in line, line
    assert not target.exists()


def test_a_root_whose_artifacts_disagree_is_refused(built_index, mini_subset, tmp_path, capsys):
    out, _ = built_index
    root = tmp_path / "negated"
    shutil.copytree(out, root)
    ids = np.load(root / "global" / "ids.npy")
    np.save(root / "global" / "ids.npy", -ids - 1)
    code, line = _exit_line(
        capsys,
        lambda: search_job.main(["--index", str(root), "--queries", str(mini_subset), "--out", str(tmp_path / "r")]),
    )
    assert code == 2 and "is inconsistent" in line and f"{len(ids)} row(s) name no image" in line, line


def test_identical_queries_are_described_once(built_index, mini_subset, tmp_path):
    out, _ = built_index
    q = pd.read_csv(mini_subset)[["file"]].head(2)
    q["x0"], q["y0"], q["x1"], q["y1"] = 5.0, 5.0, 300.0, 200.0
    q = pd.concat([q, q.iloc[[0] * 300]], ignore_index=True)
    q.to_csv(tmp_path / "q.csv", index=False)
    s = search_job.main(
        ["--index", str(out), "--queries", str(tmp_path / "q.csv"), "--out", str(tmp_path / "r"), "--topk", "5"]
    )
    assert s["counts"]["queries"] == 302 and s["counts"]["queries_repeated"] == 300
    assert s["counts"]["images_ok"] == 2 and s["counts"]["queries_described"] == 2
    table, _ = read_results(str(tmp_path / "r"))
    lists = table.to_pandas().sort_values("query_id")["ids"].map(tuple).tolist()
    assert len(lists) == 302 and len(lists[0]) == 5 and lists[2:] == [lists[0]] * 300 and lists[1] != lists[0]


def test_every_failure_of_the_queries_is_one_line(built_index, mini_subset, s3_server, tmp_path, capsys):
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    out, _ = built_index
    pd.DataFrame({"file": [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]}).to_csv(
        tmp_path / "gone.csv", index=False
    )
    code, line = _exit_line(
        capsys,
        lambda: search_job.main(
            ["--index", str(out), "--queries", str(tmp_path / "gone.csv"), "--out", str(tmp_path / "r")]
        ),
    )
    assert code == 2 and "none of the 2 queries could be described" in line and "a.jpg" in line, line
    fs, _ = sfs.filesystem("s3://x", s3_server["options"])
    fs.pipe(f"{s3_server['bucket']}/q/manifest.csv", pd.read_csv(mini_subset).head(2).to_csv(index=False).encode())
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(
        RAY_AUTH_MODE="disabled",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_EC2_METADATA_DISABLED="true",
    )
    base = [sys.executable, "-m", "jobs.search", "--index", str(out), "--queries", f"s3://{s3_server['bucket']}/q/"]
    cases = [
        (["--set", f"storage={{client_kwargs: {{endpoint_url: '{s3_server['endpoint']}'}}}}"], 2, "credentials"),
        (
            [
                "--set",
                f"storage={{key: k, secret: s, client_kwargs: {{endpoint_url: 'http://127.0.0.1:{free_port()}'}},"
                " config_kwargs: {retries: {max_attempts: 1}}}",
            ],
            1,
            "storage cannot be reached",
        ),
    ]
    runs = [
        subprocess.Popen(
            base + ["--out", str(tmp_path / f"r{i}"), *extra],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i, (extra, _, _) in enumerate(cases)
    ]
    for run, (_, want, text) in zip(runs, cases):  # both at once: each is an interpreter and a Ray starting
        _, stderr = run.communicate(timeout=300)
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
        assert run.returncode == want and len(errors) == 1 and text in errors[0], stderr[-3000:]
        assert "Traceback" not in stderr


def test_no_file_or_line_a_job_writes_holds_a_credential(built_index, mini_subset, tmp_path, capsys):
    from jobs import mine as mine_job
    from jobs import rerank as rerank_job

    out, _ = built_index
    secret = "Sup3rSecretValue"
    storage = ["--set", f"storage={{key: AKIA{secret}, secret: {secret}, token: {secret}, password: {secret}}}"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    search_job.main(["--index", str(out), "--queries", str(mini_subset), "--out", str(tmp_path / "s"), *storage])
    evaluate_job.main(["--results", str(tmp_path / "s"), "--ground-truth", str(mini_subset), *storage])
    rerank_job.main(["--index", str(out), "--out", str(tmp_path / "o"), "--top", "5", *storage])
    mine_job.main(["--index", str(out), "--out", str(tmp_path / "m"), "--set", "iasmk_min_shared=1", *storage])
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    written += [p for p in out.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns]
    assert len(written) > 10 and sum(p.name == "run.json" for p in written) == 2
    leaked = [str(p) for p in written if secret.encode() in p.read_bytes()]
    captured = capsys.readouterr()
    assert not leaked and secret not in captured.out + captured.err, leaked
