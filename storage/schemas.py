"""Parquet schemas of the pipeline's artifacts (bump :data:`SCHEMA_VERSION` on any change).

Feature shards (``features/part-NNNNN.parquet``), one row per image:

| column | type | meaning |
|---|---|---|
| ``image_id`` | int64 | stable id from the collection table |
| ``status`` | string | ``"ok"`` or ``"error"`` (then ``error`` says why and the arrays are empty) |
| ``error`` | string | null when ok |
| ``width``, ``height`` | int32 | original image size in pixels |
| ``x0, y0, x1, y1`` | float32 | crop box actually used (pixels of the original), NaN when none |
| ``global`` | fixed_size_list<float32, D> | L2-normalised multi-scale GeM descriptor |
| ``local_desc`` | list<fixed_size_list<float16, d>> | local descriptors, strongest first |
| ``local_xy`` | list<fixed_size_list<float32, 2>> | feature centre in pixels of the (cropped) original image |
| ``local_scale`` | list<float32> | HOW: scale factor of the feature's pyramid level; RootSIFT: keypoint size (pixels) |
| ``local_strength`` | list<float32> | HOW: L2 norm of the activation; RootSIFT: detector response |
| ``asmk_words`` | list<int32> | with ASMK* entries (``local_store`` entries or both): the image's words, ascending |
| ``asmk_codes`` | list<fixed_size_list<uint8, d/8>> | the packed signs of each word's aggregated residual Σ(x − q(x)) |

With ``local_store=entries`` the per-feature columns (``local_desc``, ``local_xy``, ``local_scale``,
``local_strength``) are empty and an image costs ~20 B per visual word instead of ~270 B per feature;
a shard's commit record then holds ``entries_codebook_sha1``, the codebook its words belong to.

Key-value metadata of each file: ``schema_version``, ``extractor`` (JSON of the config that made it).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from storage import fs as sfs

SCHEMA_VERSION = 2  # 2: one stage-record shape (job, settings)


def feature_schema(global_dim: int, local_dim: int, metadata: dict | None = None, entries: bool = False) -> pa.Schema:
    """The feature shard schema (module table); ``entries`` adds the ASMK* entry columns."""
    fields = [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        *[pa.field(c, pa.float32()) for c in ("x0", "y0", "x1", "y1")],
        pa.field("global", pa.list_(pa.float32(), global_dim)),
        pa.field("local_desc", pa.list_(pa.list_(pa.float16(), local_dim))),
        pa.field("local_xy", pa.list_(pa.list_(pa.float32(), 2))),
        pa.field("local_scale", pa.list_(pa.float32())),
        pa.field("local_strength", pa.list_(pa.float32())),
    ]
    if entries:
        fields += [
            pa.field("asmk_words", pa.list_(pa.int32())),
            pa.field("asmk_codes", pa.list_(pa.list_(pa.uint8(), local_dim // 8))),
        ]
    meta = {"schema_version": str(SCHEMA_VERSION)}
    if metadata:
        meta.update({k: v if isinstance(v, str) else sfs.dumps(v) for k, v in metadata.items()})
    return pa.schema(fields, metadata=meta)


def _nested(values: list[np.ndarray], width: int, dtype: pa.DataType) -> pa.Array:
    """list<fixed_size_list<dtype, width>> from per-row (n_i, width) arrays, without Python loops over features."""
    lengths = np.array([len(v) for v in values], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([np.asarray(v).reshape(-1, width) for v in values]) if len(values) else np.zeros((0, width))
    np_dtype = dtype.to_pandas_dtype()
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np_dtype).ravel(), type=dtype), width)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def _flat(values: list[np.ndarray], dtype: pa.DataType = pa.float32()) -> pa.Array:
    lengths = np.array([len(v) for v in values], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    np_dtype = dtype.to_pandas_dtype()
    flat = (
        np.concatenate([np.asarray(v, dtype=np_dtype).ravel() for v in values])
        if len(values)
        else np.zeros(0, np_dtype)
    )
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype))


def feature_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a feature shard from per-image dicts (see the module table for keys)."""
    gdim = schema.field("global").type.list_size
    ldim = schema.field("local_desc").type.value_type.list_size
    n = len(rows)
    get = lambda k, d: [r.get(k, d) for r in rows]  # noqa: E731
    glob = (
        np.stack(
            [
                np.asarray(r["global"], np.float32) if r.get("global") is not None else np.zeros(gdim, np.float32)
                for r in rows
            ]
        )
        if n
        else np.zeros((0, gdim), np.float32)
    )
    empty_d, empty_xy, empty_1 = np.zeros((0, ldim)), np.zeros((0, 2)), np.zeros(0)
    cols = {
        "image_id": pa.array(get("image_id", None), pa.int64()),
        "status": pa.array(get("status", "ok"), pa.string()),
        "error": pa.array(get("error", None), pa.string()),
        "width": pa.array(get("width", 0), pa.int32()),
        "height": pa.array(get("height", 0), pa.int32()),
        **{c: pa.array(np.asarray(get(c, np.nan), dtype=np.float32), pa.float32()) for c in ("x0", "y0", "x1", "y1")},
        "global": pa.FixedSizeListArray.from_arrays(pa.array(glob.ravel(), pa.float32()), gdim),
        "local_desc": _nested([r.get("local_desc", empty_d) for r in rows], ldim, pa.float16()),
        "local_xy": _nested([r.get("local_xy", empty_xy) for r in rows], 2, pa.float32()),
        "local_scale": _flat([r.get("local_scale", empty_1) for r in rows]),
        "local_strength": _flat([r.get("local_strength", empty_1) for r in rows]),
    }
    if "asmk_words" in schema.names:
        width = schema.field("asmk_codes").type.value_type.list_size
        cols["asmk_words"] = _flat([r.get("asmk_words", empty_1) for r in rows], pa.int32())
        cols["asmk_codes"] = _nested([r.get("asmk_codes", np.zeros((0, width))) for r in rows], width, pa.uint8())
    return pa.table(cols, schema=schema)


def global_matrix(table: pa.Table) -> np.ndarray:
    """(n, D) float32 view of the ``global`` column."""
    col = table.column("global").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def local_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat local descriptors (N, d) float16, their image ids (N,) and per-image counts."""
    col = table.column("local_desc").combine_chunks()
    d = col.type.value_type.list_size
    offsets = col.offsets.to_numpy()
    desc = col.values.values.to_numpy(zero_copy_only=False).reshape(-1, d)[offsets[0] : offsets[-1]]
    counts = np.diff(offsets)
    ids = np.repeat(table.column("image_id").to_numpy(), counts)
    return desc, ids, counts


def entry_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat ASMK* entries of a shard table: image ids (E,) int64, words (E,) int64, packed codes (E, d/8) uint8."""
    words = table.column("asmk_words").combine_chunks()
    codes = table.column("asmk_codes").combine_chunks()
    offsets = words.offsets.to_numpy()
    w = words.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].astype(np.int64)
    width = codes.type.value_type.list_size
    c_off = codes.offsets.to_numpy()
    c = codes.values.values.to_numpy(zero_copy_only=False).reshape(-1, width)[c_off[0] : c_off[-1]]
    ids = np.repeat(table.column("image_id").to_numpy(), np.diff(offsets))
    return ids, w, np.ascontiguousarray(c, np.uint8)


RESULTS_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.int64(), nullable=False),
        pa.field("query_name", pa.string()),
        pa.field("ids", pa.list_(pa.int64())),
        pa.field("scores", pa.list_(pa.float32())),
    ],
    metadata={"schema_version": str(SCHEMA_VERSION)},
)
"""Search results, one row per query: database ``ids`` ranked best first with their ``scores``."""
