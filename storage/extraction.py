"""What an extraction records besides its shards, and reads back: the settings its shards are made under
(their digest in every shard's commit record), the image table with stable ids and shards, the failed images,
the describer settings a root was extracted with; and the read of one image to describe.

Torch is not imported with this module: :mod:`operators.describe` and :mod:`operators.backbones` load
where they are used, so a job that only checks roots (``jobs.search`` before
it describes, any ``--help``) starts without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import typing
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from operators.codebook import AssignConfig
from operators.descriptor_config import DescriptorConfig
from operators.images import center_box, crop
from storage import fs as sfs
from storage.artifacts import ArtifactRoot
from storage.collection import file_keys, is_synthetic, load_collection, read_image
from storage.errors import ConfigError, SettingsMismatch
from storage.shards import ShardSet
from storage.validation import from_dict
from storage.whitening import read_whitening

if typing.TYPE_CHECKING:
    from operators.describe import Describer
    from operators.whitening import Whitening

log = logging.getLogger(__name__)

T = typing.TypeVar("T")


@dataclass
class EntriesConfig:
    """ASMK* entries written by extraction (``local_store`` entries or both)."""

    codebook: str | None = None  # root holding the codebook (jobs.index: codebook.source by default)
    assign: AssignConfig = field(default_factory=AssignConfig)  # exact flat, or HNSW (benchmarks/assignment.py)


def load_image(file: str, box: tuple, center_crop: float | None, options: dict) -> tuple[np.ndarray, dict]:
    """Read, decode and crop one image; returns the image and its size/box record fields."""
    img = read_image(file, options)
    h, w = img.shape[:2]
    if all(np.isnan(box)) and center_crop:
        box = center_box(w, h, center_crop)
    return crop(img, box), {"width": w, "height": h, **dict(zip(("x0", "y0", "x1", "y1"), box))}


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------
def extraction_settings(cfg: dict) -> dict:
    """The settings that make a shard's rows: describer settings (batching, device and cuDNN left out),
    the crop policy and the local whitening's dimension. Shards made under other settings never mix."""
    describe = dataclasses.asdict(
        from_dict(
            DescriptorConfig,
            {k: v for k, v in cfg.get("describe", {}).items() if k in DescriptorConfig.__dataclass_fields__},
        )
    )
    out = {f"describe.{k}": v for k, v in describe.items() if k not in ("forward_batch", "device", "cudnn")}
    out["center_crop"] = cfg.get("center_crop")
    store = cfg.get("local_store", "descriptors")
    if store != "descriptors":  # older records have no local_store: their digests stay as they were
        entries = dataclasses.asdict(from_dict(EntriesConfig, cfg.get("entries") or {}))
        out.update(local_store=store, entries_codebook=entries["codebook"], entries_assign=entries["assign"])
    if describe["local"] == "how":
        out["local_whiten_dim"] = cfg.get("local_whiten_dim")
    return out


def settings_digest(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(extraction_settings(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_settings(shards: ShardSet, cfg: dict, previous: dict | None = None) -> None:
    """Refuse to add shards made under other settings than the committed ones.

    The first committed shard's record holds the digest of its settings; older records without it
    are compared through ``previous`` (the recorded extract config), when given.
    """
    indices = shards.indices()
    first = next((rec for rec in map(shards.record, indices) if not rec.get("synthetic")), None)
    if first is None:  # no shard, or synthetic distractors alone (jobs.distractors)
        return
    digest = first.get("settings")
    if digest is not None:
        if digest == settings_digest(cfg):
            return
    elif previous is None or extraction_settings(previous) == extraction_settings(cfg):
        return
    changed = ""
    if previous is not None:
        old, new = extraction_settings(previous), extraction_settings(cfg)
        changed = (
            " (changed: "
            + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k))
            + ")"
        )
    raise SettingsMismatch(
        f"{shards.uri} holds {len(indices)} shard(s) extracted with other settings{changed}; "
        "use a new --out (or the settings it was built with)"
    )


# ------------------------------------------------------------------------------------------
# The describer
# ------------------------------------------------------------------------------------------
def check_checkpoint(describe: DescriptorConfig) -> None:
    """The describer's checkpoint loads as plain data (here, on the driver, before any actor starts)."""
    if describe.checkpoint:
        from operators.backbones import CheckpointRefused, load_checkpoint

        try:
            load_checkpoint(describe.checkpoint)
        except CheckpointRefused as e:
            raise ConfigError(f"describe.checkpoint: {e}") from None


def recorded_describer(root: ArtifactRoot, given: str | None) -> dict:
    """The describer settings ``root`` was extracted with. Settings read from a root never point a job at a
    file outside that root unless the user's own command names the same file (``given``): a checkpoint
    outside the root is refused otherwise (a root is data; it must not choose what the job loads)."""
    describe = root.stage_settings("extract")["describe"]
    ckpt = describe.get("checkpoint")
    if ckpt and not sfs.is_inside(ckpt, root.uri) and (not given or sfs.canonical(given) != sfs.canonical(ckpt)):
        raise SettingsMismatch(
            f"{root.uri} was extracted with describe.checkpoint={ckpt!r}, outside the root: "
            f"name it yourself to use it (--set checkpoint={ckpt})"
        )
    return describe


def global_describer(root: ArtifactRoot) -> tuple[Describer, Whitening | None]:
    """The describer ``root`` was extracted with, local features off, and the root's global whitening: what
    describes the root's images again for their global activation maps (``jobs.objects``)."""
    from operators.describe import Describer

    built = root.stage_settings("extract")["describe"]
    return Describer(from_dict(DescriptorConfig, {**built, "local": "none"})), read_whitening(root, "global")


# ------------------------------------------------------------------------------------------
# The image table and the failed images
# ------------------------------------------------------------------------------------------
def prepare_images(
    root: ArtifactRoot,
    collection: str,
    role: str,
    id_offset: int,
    options: dict,
    shard_size: int = 32,
    fresh: pd.DataFrame | None = None,
    allow_outside: bool = False,
) -> pd.DataFrame:
    """The collection table with its stable ids and shards, recorded once under ``root``.

    A rerun reuses the recorded ids. Images added to the collection since are appended: new ids
    after the largest recorded one (or the manifest's own ``image_id``s) and new shards after the
    last, so committed shards keep their content and only the new images are extracted. Images
    removed from the collection are an error (the index still holds them). ``fresh``: the collection
    table when the caller has loaded it already.
    """
    recorded = root.images()
    fresh = load_collection(collection, role, options, id_offset, allow_outside) if fresh is None else fresh.copy()
    if recorded is None:
        fresh["shard"] = np.arange(len(fresh)) // max(1, shard_size)
        root.write_images(fresh)
        return fresh
    known = set(file_keys(recorded["file"]))
    in_fresh = file_keys(fresh["file"])
    removed = (
        known - set(in_fresh) - set(file_keys(recorded["file"][is_synthetic(recorded["file"])]))
    )  # jobs.distractors
    if removed:
        raise SettingsMismatch(
            f"{root.uri} was built from a collection holding {len(removed)} image(s) missing now "
            f"(e.g. {sorted(removed)[:3]}); use a new --out"
        )
    added = fresh[~in_fresh.isin(known)].copy()
    if added.empty:
        return recorded
    if "shard" not in recorded:
        raise SettingsMismatch(f"{root.uri} predates recorded shards and cannot grow; use a new --out")
    if not fresh.attrs.get("ids_given") or added["image_id"].isin(recorded["image_id"]).any():
        added["image_id"] = int(recorded["image_id"].max()) + 1 + np.arange(len(added), dtype=np.int64)
    added["shard"] = int(recorded["shard"].max()) + 1 + np.arange(len(added)) // max(1, shard_size)
    grown = pd.concat([recorded, added[recorded.columns]], ignore_index=True)
    log.info(
        "%s: %d new image(s), ids %d..%d, shards %d..%d",
        root.uri,
        len(added),
        added["image_id"].min(),
        added["image_id"].max(),
        added["shard"].min(),
        added["shard"].max(),
    )
    root.write_images(grown)
    return grown


def failed_images(shards: ShardSet, images: pd.DataFrame) -> pd.DataFrame:
    """image_id, file, error of every image whose extraction failed, over all committed shards
    (only shards whose commit record counts errors are read, and only their small columns)."""
    parts = [
        shards.read_shard(i, ["image_id", "status", "error"]).to_pandas()
        for i, rec in shards.committed().items()
        if rec.get("errors")
    ]
    rows = pd.concat(parts) if parts else pd.DataFrame({"image_id": [], "status": [], "error": []})
    rows = rows[rows["status"] == "error"]
    return rows.merge(images[["image_id", "file"]], on="image_id", how="left")[["image_id", "file", "error"]]
