"""The artifact layout under one root URI (local folder or ``s3://`` prefix).

    ROOT/index.json            schema version, the config of every stage run, stage records
    ROOT/images.parquet        the collection table with its stable image ids (written once)
    ROOT/features/             feature shards + commit records (storage.shards.ShardSet)
    ROOT/whitening/{local,global}.npz   PCA-whitening learned on a sample
    ROOT/global/vectors.npy, ids.npy    global descriptors (float32, row i ↔ ids[i]), memory-mapped at query time
    ROOT/global/meta.json

Every artifact carries the schema version and the config that made it. Later stages (codebook,
ASMK inverted files, kNN graphs, spectral embeddings) add their own folders next to these.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from operators.whitening import Whitening
from storage import fs as sfs
from storage.schemas import SCHEMA_VERSION
from storage.shards import ShardSet


class ArtifactError(RuntimeError):
    """An artifact is missing or was made by an incompatible schema version."""


@dataclass
class ArtifactRoot:
    uri: str
    options: sfs.StorageOptions = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return sfs.join(self.uri, *parts)

    # -- metadata ---------------------------------------------------------------------------
    def meta(self) -> dict:
        uri = self.path("index.json")
        if not sfs.exists(uri, self.options):
            return {"schema_version": SCHEMA_VERSION, "stages": {}}
        meta = sfs.read_json(uri, self.options)
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(f"{self.uri}: schema version {meta.get('schema_version')} != {SCHEMA_VERSION}; rebuild it")
        return meta

    def record_stage(self, stage: str, config: dict, **info) -> None:
        meta = self.meta()
        meta.setdefault("stages", {})[stage] = {"config": config, "done_at": time.time(), **info}
        sfs.write_json(self.path("index.json"), meta, self.options)

    def stage_config(self, stage: str) -> dict:
        stages = self.meta().get("stages", {})
        if stage not in stages:
            raise ArtifactError(f"{self.uri}: stage {stage!r} has not run (have: {sorted(stages)})")
        return stages[stage]["config"]

    # -- collection table -------------------------------------------------------------------
    def images(self) -> pd.DataFrame | None:
        uri = self.path("images.parquet")
        if not sfs.exists(uri, self.options):
            return None
        return pd.read_parquet(io.BytesIO(sfs.read_bytes(uri, self.options)))

    def write_images(self, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        sfs.write_bytes(self.path("images.parquet"), buf.getvalue(), self.options)

    # -- shards and small artifacts ---------------------------------------------------------
    def shards(self, name: str = "features") -> ShardSet:
        return ShardSet(self.path(name), self.options)

    def whitening(self, kind: str) -> Whitening | None:
        uri = self.path("whitening", f"{kind}.npz")
        return Whitening.from_bytes(sfs.read_bytes(uri, self.options)) if sfs.exists(uri, self.options) else None

    def write_whitening(self, kind: str, w: Whitening) -> None:
        sfs.write_bytes(self.path("whitening", f"{kind}.npz"), w.to_bytes(), self.options)

    # -- arrays -----------------------------------------------------------------------------
    def write_array(self, rel: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, array)
        sfs.write_bytes(self.path(rel), buf.getvalue(), self.options)

    def open_array_writer(self, rel: str, shape: tuple, dtype) -> tuple[np.memmap, callable]:
        """A writable ``.npy`` memmap for ``rel`` and a ``commit()`` that publishes it.

        Local roots write in place (to a temporary name, renamed on commit); S3 roots write a local
        temporary file and upload it on commit. Arrays larger than memory never need to fit in RAM.
        """
        target = self.path(rel)
        if sfs.protocol(self.uri) == "file":
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp"
        else:
            tmp = tempfile.mktemp(suffix=".npy")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)

        def commit() -> None:
            arr.flush()
            if sfs.protocol(self.uri) == "file":
                os.replace(tmp, target)
            else:
                fs, path = sfs.filesystem(target, self.options)
                fs.put(tmp, path)
                os.remove(tmp)
        return arr, commit

    def load_array(self, rel: str, mmap: bool = True) -> np.ndarray:
        """A (memory-mapped) ``.npy`` artifact; remote ones are cached locally first."""
        uri = self.path(rel)
        if not sfs.exists(uri, self.options):
            raise ArtifactError(f"missing artifact {uri}")
        return np.load(sfs.local_copy(uri, self.options), mmap_mode="r" if mmap else None)
