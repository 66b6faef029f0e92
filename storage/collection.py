"""Image collections: a folder (local or ``s3://`` prefix), a CSV/Parquet manifest, or revisited ground truth.

A collection is normalised to one table, :data:`COLLECTION_COLUMNS`:

- ``image_id`` (int64): stable integer id. Taken from the manifest's ``image_id`` column when present,
  else ``id_offset + row order`` (folders are listed in sorted order). Jobs record the table once
  under the index root (``images.parquet``, with each image's shard) and reuse it on reruns, so ids
  never change; images added to the collection later get new ids (``storage.extraction.prepare_images``).
- ``file``: absolute path or URI of the image (relative folders and manifests are resolved);
  ``name``: the key it is known by (manifest path as written, path relative to the folder, or the revisited image name).
- ``group``: instance label (same group = same object), may be null.
- ``x0, y0, x1, y1``: query crop box in pixels of the original image, NaN when absent.

Revisited ground truth (``gnd_roxford5k.pkl``: ``imlist``, ``qimlist``, ``gnd[i].bbx``) is read with
the images expected in ``<pkl folder>/jpg/<name>.jpg`` (the revisitop layout).
"""

from __future__ import annotations

import io
import os
import posixpath
from typing import Iterable

import numpy as np
import pandas as pd

from storage import fs as sfs
from storage.errors import CollectionError, GroundTruthError
from storage.safe_pickle import loads_data

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
BOX_COLUMNS = ["x0", "y0", "x1", "y1"]
COLLECTION_COLUMNS = ["image_id", "file", "name", "group", *BOX_COLUMNS]


def load_collection(
    uri: str,
    role: str = "database",
    options: sfs.StorageOptions | None = None,
    id_offset: int = 0,
    allow_outside: bool = False,
) -> pd.DataFrame:
    """Read a collection as a :data:`COLLECTION_COLUMNS` table.

    ``role`` matters only for revisited ``.pkl`` ground truth: ``"database"`` reads ``imlist``,
    ``"queries"`` reads ``qimlist`` with the ``bbx`` crop boxes. A manifest's relative paths must stay
    inside its folder (``../`` leading out is refused unless ``allow_outside``); absolute paths and
    URIs are explicit and taken as they are.
    """
    uri = sfs.canonical(uri)  # files are recorded absolute: workers on other nodes or folders read them
    lower = uri.lower()
    if lower.endswith(".pkl"):
        df = _from_revisited(uri, role, options)
    elif lower.endswith((".csv", ".parquet", ".pq")):
        df = _from_manifest(uri, options, allow_outside)
    else:
        df = _from_folder(uri, options)
    if df.empty:
        raise CollectionError(f"collection {uri!r} holds no images")
    ids_given = "image_id" in df and not df["image_id"].isna().any()
    if not ids_given:
        df["image_id"] = np.arange(len(df), dtype=np.int64) + id_offset
    df["image_id"] = df["image_id"].astype(np.int64)
    if df["image_id"].duplicated().any():
        raise CollectionError(f"collection {uri!r}: duplicate image_id values")
    if role == "database" and df["file"].duplicated().any():  # queries may repeat a file with other boxes
        dup = df.loc[df["file"].duplicated(), "file"].unique().tolist()
        raise CollectionError(f"collection {uri!r}: {len(dup)} file(s) listed more than once (e.g. {dup[:3]})")
    for col in BOX_COLUMNS:
        df[col] = df[col].astype(float) if col in df else np.nan
    if "group" not in df:
        df["group"] = None
    df["group"] = df["group"].astype(object).where(df["group"].notna(), None)
    out = df[COLLECTION_COLUMNS].reset_index(drop=True)
    out.attrs["ids_given"] = ids_given  # the manifest chose the ids (kept when the collection grows)
    return out


def _from_folder(uri: str, options: sfs.StorageOptions | None) -> pd.DataFrame:
    fs, root = sfs.filesystem(uri, options)
    if not fs.isdir(root):
        raise CollectionError(f"{uri!r} is neither a folder nor a manifest (.csv/.parquet/.pkl)")
    paths = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS))
    names = [posixpath.relpath(p, root) if sfs.protocol(uri) != "file" else os.path.relpath(p, root) for p in paths]
    files = [sfs.join(uri, n) for n in names]
    return pd.DataFrame({"file": files, "name": names})


def _from_manifest(uri: str, options: sfs.StorageOptions | None, allow_outside: bool = False) -> pd.DataFrame:
    data = sfs.read_bytes(uri, options)
    try:
        df = (
            pd.read_parquet(io.BytesIO(data))
            if uri.lower().endswith((".parquet", ".pq"))
            else pd.read_csv(io.BytesIO(data))
        )
    except Exception as e:  # noqa: BLE001 - empty or malformed manifest
        raise CollectionError(f"manifest {uri!r} cannot be read: {type(e).__name__}: {e}") from e
    if "file" not in df:
        raise CollectionError(f"manifest {uri!r} has no 'file' column (columns: {list(df.columns)})")
    empty = df["file"].isna() | (df["file"].astype(str).str.strip() == "")
    if empty.any():
        rows = (np.flatnonzero(empty.to_numpy()) + 1).tolist()
        raise CollectionError(
            f"manifest {uri!r}: {int(empty.sum())} row(s) with an empty 'file' (data rows {rows[:5]})"
        )
    base = uri.rsplit("/", 1)[0] if sfs.protocol(uri) != "file" else os.path.dirname(os.path.abspath(uri))
    df = df.copy()
    df["name"] = df["file"].astype(str)
    df["file"] = [f if sfs.is_absolute(f) else sfs.join(base, f) for f in df["name"]]
    outside = [f for f in df["name"] if not sfs.is_absolute(f) and _escapes(f)]
    if outside and not allow_outside:
        raise CollectionError(
            f"manifest {uri!r}: {len(outside)} relative path(s) lead outside its folder (e.g. "
            f"{outside[:3]}); give them as absolute paths or set allow_outside_root=true"
        )
    return df


def _escapes(relative: str) -> bool:
    """Does a relative path climb out of the folder it is relative to?"""
    norm = posixpath.normpath(relative.replace("\\", "/"))
    return norm == ".." or norm.startswith("../")


def _from_revisited(uri: str, role: str, options: sfs.StorageOptions | None) -> pd.DataFrame:
    gnd = read_revisited(uri, options)
    base = uri.rsplit("/", 1)[0] if sfs.protocol(uri) != "file" else os.path.dirname(os.path.abspath(uri))
    if role == "queries":
        names = list(gnd["qimlist"])
        boxes = np.array([g["bbx"] for g in gnd["gnd"]], dtype=float).reshape(-1, 4)
    elif role == "database":
        names = list(gnd["imlist"])
        boxes = np.full((len(names), 4), np.nan)
    else:
        raise CollectionError(f"role must be 'database' or 'queries', not {role!r}")
    df = pd.DataFrame({"name": names, "file": [sfs.join(base, "jpg", f"{n}.jpg") for n in names]})
    df[BOX_COLUMNS] = boxes
    df["image_id"] = np.arange(len(df), dtype=np.int64)
    return df


SYNTHETIC = "synthetic:"  # file names of synthetic distractors (jobs.distractors): no image behind them


def synthetic_files(tag: str, start: int, count: int) -> list[str]:
    """The file names of synthetic distractors ``start … start + count − 1`` of generator ``tag``."""
    return [f"{SYNTHETIC}{tag}/{i:08d}" for i in range(start, start + count)]


def is_synthetic(files: pd.Series) -> np.ndarray:
    return files.astype(str).str.startswith(SYNTHETIC).to_numpy()


def read_image_bytes(file: str, options: sfs.StorageOptions | None = None) -> bytes:
    """The encoded bytes of one image of a collection (local file or URI)."""
    if str(file).startswith(SYNTHETIC):
        raise FileNotFoundError(f"{file} is a synthetic distractor: it has descriptors, not an image")
    return sfs.read_bytes(file, options)


def read_image(file: str, options: sfs.StorageOptions | None = None) -> np.ndarray:
    """One collection image, read and decoded to RGB uint8 (:func:`operators.images.decode_image`)."""
    from operators.images import decode_image

    return decode_image(read_image_bytes(file, options))


def write_collection(
    out: str, images: Iterable[tuple[str, str, np.ndarray]], options: sfs.StorageOptions | None = None
) -> str:
    """Write ``(name, group, RGB image)`` items as ``out/images/<name>.jpg`` and then the manifest
    ``out/images.csv`` (``file, group``, files relative to it); returns the manifest's URI."""
    from operators.images import encode_jpeg

    rows = []
    for name, group, rgb in images:
        rel = f"images/{name}.jpg"
        sfs.write_bytes(sfs.join(out, rel), encode_jpeg(rgb), options)
        rows.append({"file": rel, "group": group})
    manifest = sfs.join(out, "images.csv")
    sfs.write_bytes(manifest, pd.DataFrame(rows, columns=["file", "group"]).to_csv(index=False).encode(), options)
    return manifest


def file_keys(files: pd.Series) -> pd.Series:
    """Each file in the canonical form in which two spellings of one image compare equal."""
    return files.map(sfs.canonical)


def first_of_same(queries: pd.DataFrame) -> np.ndarray:
    """Per query, the image id of the first query with the same file and box (itself when it is the first):
    a query repeated in the collection is described and ranked once."""
    keys = pd.DataFrame({"file": file_keys(queries["file"]), **{c: queries[c] for c in ("x0", "y0", "x1", "y1")}})
    group = keys.groupby(list(keys.columns), dropna=False, sort=False).ngroup().to_numpy()
    first = pd.Series(np.arange(len(group))).groupby(group).transform("min").to_numpy()
    return queries["image_id"].to_numpy(np.int64)[first]


def file_index(database: pd.DataFrame) -> dict[str, int]:
    """Database image id by canonical file (:func:`file_keys`): build once, look up many batches (at 1M files it
    takes seconds)."""
    return dict(zip(file_keys(database["file"]), database["image_id"].astype(int)))


def self_ids(queries: pd.DataFrame, database: pd.DataFrame | dict[str, int]) -> np.ndarray:
    """Database id of each query's own image (same file), -1 when the query is not in the database; ``database``
    is its table or its :func:`file_index`."""
    by_file = database if isinstance(database, dict) else file_index(database)
    return np.array([by_file.get(f, -1) for f in file_keys(queries["file"])], dtype=np.int64)


def read_revisited(uri: str, options: sfs.StorageOptions | None = None) -> dict:
    """The revisitop ground-truth dict (``imlist``, ``qimlist``, ``gnd``), validated.

    Read with a data-only unpickler (:mod:`storage.safe_pickle`): a file that names any callable
    is refused before anything in it runs.
    """
    gnd = loads_data(sfs.read_bytes(uri, options), repr(uri))
    if not isinstance(gnd, dict):
        raise GroundTruthError(f"{uri!r} is not revisited ground truth: a {type(gnd).__name__}, not a dict")
    missing = {"imlist", "qimlist", "gnd"} - set(gnd)
    if missing:
        raise GroundTruthError(f"{uri!r} is not revisited ground truth: missing keys {sorted(missing)}")
    if (
        not all(isinstance(gnd[k], (list, tuple)) for k in ("imlist", "qimlist", "gnd"))
        or not all(isinstance(g, dict) for g in gnd["gnd"])
        or len(gnd["gnd"]) != len(gnd["qimlist"])
    ):
        raise GroundTruthError(
            f"{uri!r} is not revisited ground truth: imlist, qimlist and gnd must be lists, gnd one dict per query"
        )
    return gnd
