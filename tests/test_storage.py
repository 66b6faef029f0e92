"""Storage against a local folder and a real S3 API (moto_server)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from storage import fs as sfs
from storage.artifacts import ArtifactRoot
from storage.collection import CollectionError, load_collection
from storage.schemas import SCHEMA_VERSION, feature_schema, feature_table, global_matrix, local_arrays
from storage.shards import ShardSet
from tests.conftest import REVISITED


def _rows(n: int, gdim=4, ldim=3):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        k = i + 1
        rows.append(
            {
                "image_id": 100 + i,
                "status": "ok",
                "width": 10,
                "height": 20,
                "global": rng.normal(size=gdim),
                "local_desc": rng.normal(size=(k, ldim)),
                "local_xy": rng.normal(size=(k, 2)),
                "local_scale": np.ones(k),
                "local_strength": np.arange(k)[::-1],
            }
        )
    rows.append({"image_id": 999, "status": "error", "error": "cannot decode image"})
    return rows


def test_feature_table_roundtrip():
    rows = _rows(3)
    t = feature_table(rows, feature_schema(4, 3, {"extractor": {"local": "rootsift"}}))
    assert t.schema.metadata[b"schema_version"] == str(SCHEMA_VERSION).encode() == b"2"
    assert np.allclose(global_matrix(t)[:3], np.stack([r["global"] for r in rows[:3]]), atol=1e-6)
    desc, ids, counts = local_arrays(t)
    assert counts.tolist() == [1, 2, 3, 0] and ids.tolist() == [100, 101, 101, 102, 102, 102]
    assert desc.dtype == np.float16 and np.allclose(desc[1:3], rows[1]["local_desc"], atol=1e-2)
    assert t.column("error").to_pylist()[-1] == "cannot decode image"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])  # s3: moto_server
def root_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root"), {}
    s3 = request.getfixturevalue("s3_server")
    return f"s3://{s3['bucket']}/{tmp_path.name}/root", s3["options"]


def test_shards_commit_and_resume(root_uri):
    uri, opts = root_uri
    shards = ShardSet(sfs.join(uri, "features"), opts)
    table = feature_table(_rows(2), feature_schema(4, 3))
    shards.write(0, table, {"ok": 2})
    # a shard file without its commit record (a killed writer) is invisible
    sfs.write_bytes(shards.path(1), b"partial garbage", opts)
    assert set(shards.committed()) == {0}
    assert shards.pending([0, 1, 2]) == [1, 2]
    shards.write(2, table)
    assert shards.read_all().num_rows == 2 * table.num_rows
    assert shards.schema_metadata()["schema_version"] == str(SCHEMA_VERSION)


def test_artifacts_arrays_and_meta(root_uri):
    uri, opts = root_uri
    root = ArtifactRoot(uri, opts)
    arr, commit = root.open_array_writer("global/vectors.npy", (5, 3), np.float32)
    arr[:] = np.arange(15).reshape(5, 3)
    assert not sfs.exists(root.path("global", "vectors.npy"), opts), "invisible before commit"
    commit()
    assert np.array_equal(root.load_array("global/vectors.npy"), np.arange(15).reshape(5, 3))
    root.record_stage("extract", "test", {"a": 1})
    assert root.stage_settings("extract") == {"a": 1} and root.stages()["extract"]["job"] == "test"


def test_collection_formats(tmp_path, instance_mini):
    # folder
    for n in ("b.jpg", "a.png", "sub/c.jpeg", "notes.txt"):
        p = tmp_path / "imgs" / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    df = load_collection(str(tmp_path / "imgs"), id_offset=10)
    assert df["name"].tolist() == ["a.png", "b.jpg", "sub/c.jpeg"] and df["image_id"].tolist() == [10, 11, 12]
    # manifest: relative paths resolve against the manifest folder, boxes and groups kept
    pd.DataFrame(
        {
            "file": ["b.jpg", "/abs/x.jpg"],
            "group": ["g", None],
            "x0": [1, None],
            "y0": [2, None],
            "x1": [3, None],
            "y1": [4, None],
        }
    ).to_csv(tmp_path / "imgs" / "m.csv", index=False)
    m = load_collection(str(tmp_path / "imgs" / "m.csv"))
    assert m["file"].tolist() == [str(tmp_path / "imgs" / "b.jpg"), "/abs/x.jpg"]
    assert m["group"].tolist() == ["g", None] and m.loc[0, ["x0", "y1"]].tolist() == [1.0, 4.0]
    assert np.isnan(m.loc[1, "x0"])
    # the real instance-mini manifest
    mini = load_collection(str(instance_mini / "images.csv"))
    raw = pd.read_csv(instance_mini / "images.csv")
    assert len(mini) == len(raw) == 186 and mini["group"].tolist() == raw["group"].tolist()
    # revisited ground truth as a collection
    q = load_collection(str(REVISITED / "gnd_roxford5k.pkl"), role="queries")
    assert len(q) == 70 and q.loc[0, "name"] == "all_souls_000013" and q.loc[0, "x0"] == pytest.approx(136.5)
    assert q.loc[0, "file"].endswith("revisited/jpg/all_souls_000013.jpg")
    assert len(load_collection(str(REVISITED / "gnd_roxford5k.pkl"))) == 4993
    with pytest.raises(CollectionError):
        load_collection(str(tmp_path / "imgs" / "notes.txt"))


def test_relative_collections_record_absolute_files(tmp_path, monkeypatch):
    """Workers on other nodes (or under ``ray job submit --working-dir``) must find the files."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    pd.DataFrame({"file": ["a.jpg"]}).to_csv(tmp_path / "imgs" / "m.csv", index=False)
    monkeypatch.chdir(tmp_path)
    for uri in ("imgs", "./imgs/", "imgs/m.csv", "file://imgs"):
        df = load_collection(uri)
        assert df["file"].tolist() == [str(tmp_path / "imgs" / "a.jpg")], uri
        assert df["name"].tolist() == ["a.jpg"]


@pytest.mark.slow
def test_collection_from_s3_prefix(s3_server, instance_mini):
    fs, _ = sfs.filesystem("s3://x", s3_server["options"])
    for name in ("one.jpg", "two.jpg"):
        fs.put(str(next((instance_mini / "images").glob("sceaux*"))), f"{s3_server['bucket']}/coll/{name}")
    df = load_collection(f"s3://{s3_server['bucket']}/coll", options=s3_server["options"])
    assert df["file"].tolist() == [
        f"s3://{s3_server['bucket']}/coll/one.jpg",
        f"s3://{s3_server['bucket']}/coll/two.jpg",
    ]


def test_bad_manifests_are_clear_errors(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    pd.DataFrame({"file": ["a.jpg", None, "b.jpg"], "group": ["x", "y", "z"]}).to_csv(
        tmp_path / "hole.csv", index=False
    )
    pd.DataFrame({"file": ["a.jpg", "b.jpg", "a.jpg"]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(CollectionError, match="cannot be read"):
        load_collection(str(tmp_path / "empty.csv"))
    with pytest.raises(CollectionError, match=r"1 row\(s\) with an empty 'file' \(data rows \[2\]\)"):
        load_collection(str(tmp_path / "hole.csv"))
    with pytest.raises(CollectionError, match="listed more than once"):
        load_collection(str(tmp_path / "dup.csv"))
    # a query manifest may list one image twice (two boxes)
    assert len(load_collection(str(tmp_path / "dup.csv"), role="queries")) == 3


def test_reading_a_non_regular_file_fails_instead_of_blocking(tmp_path):
    import threading

    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "dir.jpg").mkdir()
    errors = []

    def read(name):
        try:
            sfs.read_bytes(str(tmp_path / name))
        except OSError as e:
            errors.append(e)

    for name in ("pipe.jpg", "dir.jpg"):
        t = threading.Thread(target=read, args=(name,), daemon=True)  # a blocked open must not hang the tests
        t.start()
        t.join(10)
        assert not t.is_alive(), f"reading {name} blocked"
    assert len(errors) == 2 and all("not a regular file" in str(e) for e in errors)


def test_concurrent_stage_records_are_never_lost(tmp_path):
    """Jobs recording stages of one root at once (index.json was read-modify-write) keep every record."""
    from concurrent.futures import ThreadPoolExecutor

    from storage.artifacts import ArtifactRoot

    root = ArtifactRoot(str(tmp_path / "root"))
    root.record_stage("extract", "index", {"a": 1})
    stages = [f"stage{i}" for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: ArtifactRoot(root.uri).record_stage(s, "job", {"name": s}), stages))
    records = ArtifactRoot(root.uri).stages()
    assert set(records) == {"extract", *stages} and all(records[s]["settings"] == {"name": s} for s in stages)
    assert root.stage_settings("extract") == {"a": 1}
    root.record_stage("extract", "index", {"a": 2})  # a rerun replaces its stage's record
    assert ArtifactRoot(root.uri).stage_settings("extract") == {"a": 2}


@pytest.mark.slow
def test_an_interrupted_s3_upload_leaves_no_object(s3_server, monkeypatch):
    """A multipart upload that fails after its first part is aborted: the key never appears (moto)."""
    import s3fs

    from storage import fs as sfs

    monkeypatch.setattr(sfs, "S3_PART", 5 * 2**20)  # S3's smallest part: 12 MB take three parts
    uri = f"s3://{s3_server['bucket']}/partial/vectors.npy"
    real, parts = s3fs.S3FileSystem._call_s3, []

    async def failing(self, method, *args, **kwargs):
        if method == "upload_part":
            parts.append(kwargs["PartNumber"])
            if len(parts) == 2:
                raise ConnectionError("the network went away")
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", failing)
    with pytest.raises(ConnectionError):
        sfs.write_bytes(uri, b"x" * (12 * 2**20), s3_server["options"])
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", real)
    assert len(parts) >= 2 and not sfs.exists(uri, s3_server["options"])
    sfs.write_bytes(uri, b"y" * (12 * 2**20), s3_server["options"])  # the retry lands whole
    assert sfs.read_bytes(uri, s3_server["options"]) == b"y" * (12 * 2**20)
