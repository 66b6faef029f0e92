"""One artifact root (local folder or ``s3://`` prefix): its record and the primitives artifacts use.

    ROOT/index.json            schema version and one record per stage run (:meth:`ArtifactRoot.record_stage`)
    ROOT/stages/<stage>.json   each stage's record alone, written first (concurrent jobs lose no record)
    ROOT/images.parquet        the collection table with its stable image ids and shards
    ROOT/features/             feature shards + commit records (:mod:`storage.shards`)

Each other artifact has its own module, which alone knows its files and format:
:mod:`storage.whitening`, :mod:`storage.global_index`, :mod:`storage.codebook`,
:mod:`storage.inverted_file`, :mod:`storage.graph`, :mod:`storage.spectral`,
:mod:`storage.results`, :mod:`storage.summaries`. Jobs and Ray tasks call those modules; the array
and JSON primitives below are for them.

Every stage record has one shape: ``{"job": …, "settings": {…}, "done_at": …}`` plus counts, where
``settings`` are the settings of that stage alone (the extraction config for ``extract``, the
``codebook`` section for ``codebook``…). A root written by another schema version is refused on open.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from storage import fs as sfs
from storage.errors import ArtifactError
from storage.schemas import SCHEMA_VERSION
from storage.shards import ShardSet

__all__ = ["ArtifactError", "ArtifactRoot"]


@dataclass
class ArtifactRoot:
    uri: str
    options: sfs.StorageOptions = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return sfs.join(self.uri, *parts)

    # -- metadata ---------------------------------------------------------------------------
    def meta(self) -> dict:
        """``index.json`` with every stage record of ``stages/`` laid over it (see :meth:`record_stage`)."""
        uri = self.path("index.json")
        meta = {"schema_version": SCHEMA_VERSION, "stages": {}}
        if sfs.exists(uri, self.options):
            try:
                meta = sfs.read_json(uri, self.options)
            except ValueError as e:
                raise ArtifactError(f"{uri} is not a readable index record ({e}); rebuild the root") from None
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{self.uri} was made by schema version {meta.get('schema_version')}, this code reads "
                f"{SCHEMA_VERSION}: rebuild it into a new --out"
            )
        stages = meta.setdefault("stages", {})
        for name, record in self._stage_files().items():
            if record.get("done_at", 0) >= stages.get(name, {}).get("done_at", 0):
                stages[name] = record
        return meta

    def _stage_files(self) -> dict[str, dict]:
        """The records of ``stages/<stage>.json``, by stage name."""
        return {
            name[:-5]: sfs.read_json(self.path("stages", name), self.options)
            for name in sfs.listdir(self.path("stages"), self.options)
            if name.endswith(".json")
        }

    def stages(self) -> dict[str, dict]:
        """Every stage record (see module doc), by stage name."""
        return self.meta().get("stages", {})

    def has_stage(self, stage: str) -> bool:
        return stage in self.stages()

    def record_stage(self, stage: str, job: str, settings: dict, **info) -> None:
        """Record that ``stage`` ran (by ``job``) with ``settings``, the settings of that stage alone.

        The record is first written alone, as ``stages/<stage>.json`` (one object, written whole), then
        ``index.json`` is rewritten with every record: two jobs recording stages of one root at once cannot
        lose a record (:meth:`meta` reads ``stages/`` too, so a stale ``index.json`` loses nothing)."""
        record = {"job": job, "settings": settings, "done_at": time.time(), **info}
        sfs.write_json(self.path("stages", f"{stage}.json"), record, self.options)
        sfs.write_json(self.path("index.json"), self.meta(), self.options)

    def stage_settings(self, stage: str, required: bool = True) -> dict | None:
        """The settings ``stage`` last ran with (None, or an :class:`ArtifactError`, when it has not run)."""
        stages = self.stages()
        if stage not in stages:
            if not required:
                return None
            raise ArtifactError(f"{self.uri}: stage {stage!r} has not run (have: {sorted(stages)})")
        return stages[stage]["settings"]

    # -- collection table -------------------------------------------------------------------
    def images(self) -> pd.DataFrame | None:
        uri = self.path("images.parquet")
        if not sfs.exists(uri, self.options):
            return None
        return pd.read_parquet(io.BytesIO(sfs.read_bytes(uri, self.options)))

    def image_files(self) -> pd.Series:
        """Each indexed image's file, by image id."""
        return self.images().set_index("image_id")["file"]

    def write_images(self, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        sfs.write_bytes(self.path("images.parquet"), buf.getvalue(), self.options)

    # -- shards and small artifacts ---------------------------------------------------------
    def shards(self, name: str = "features") -> ShardSet:
        return ShardSet(self.path(name), self.options)

    # -- primitives for the artifact modules -----------------------------------------------
    def exists(self, rel: str) -> bool:
        return sfs.exists(self.path(rel), self.options)

    def existing(self, rel: str) -> str:
        """The URI of ``rel``; an :class:`ArtifactError` when it does not exist."""
        uri = self.path(rel)
        if not sfs.exists(uri, self.options):
            raise ArtifactError(f"missing artifact {uri}")
        return uri

    def read_json(self, rel: str) -> dict:
        return sfs.read_json(self.existing(rel), self.options)

    def write_json(self, rel: str, obj: dict) -> None:
        sfs.write_json(self.path(rel), obj, self.options)

    def read_bytes(self, rel: str) -> bytes:
        return sfs.read_bytes(self.existing(rel), self.options)

    def write_bytes(self, rel: str, data: bytes) -> None:
        sfs.write_bytes(self.path(rel), data, self.options)

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            sfs.remove(self.path(rel), self.options)

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
        """A (memory-mapped) ``.npy`` artifact; remote ones are cached locally first. Never unpickles:
        an array of Python objects is an ArtifactError."""
        path = sfs.local_copy(self.existing(rel), self.options)
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as e:
            raise ArtifactError(f"{self.path(rel)} is not a plain array: {e}") from None
