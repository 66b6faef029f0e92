"""Extraction job: images -> Parquet feature shards, streamed through a Ray Data actor pool.

``python -m jobs.extract --collection C --out ROOT`` (also the ``extract`` stage of ``jobs.index``).

The collection is cut into shards of ``shard_size`` images (a shard's content is fixed by the
stable image ids, so reruns cut identically). Ray Data streams the pending shards to a pool of
:class:`ShardExtractor` actors — one per GPU when the cluster has GPUs, else fractional-CPU actors —
each loading the model once. An actor reads and decodes its shard's images in threads, describes
them ``batch_size`` at a time (same-shape images share a forward pass), writes the shard straight
to storage and commits it. Unreadable images become error rows; they never stop the job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import ray

from cluster.ray_env import RayConfig, connect, plan_actors
from cluster.runner import run_tasks
from jobs.config import from_dict, parse, run_cli, to_dict
from jobs.summary import JobSummary
from operators.asmk import image_entries
from operators.backbones import CheckpointRefused, load_checkpoint
from operators.codebook import AssignConfig, Quantizer
from operators.constraints import Count, Fraction, ImageId, NonNegInt
from operators.describe import Describer, DescriptorConfig
from operators.images import center_box, crop
from operators.whitening import Whitening, learn_pca_whitening
from storage import fs as sfs
from storage.artifacts import ArtifactRoot
from storage.codebook import codebook_hash, load_codebook
from storage.collection import file_keys, is_synthetic, load_collection, read_image
from storage.entries import entries_record, entry_codebooks
from storage.errors import CollectionError, ConfigError, SettingsMismatch
from storage.schemas import feature_schema, feature_table
from storage.shards import ShardSet
from storage.summaries import write_failed_images
from storage.whitening import read_whitening, write_whitening

log = logging.getLogger(__name__)


LocalStore = Literal["descriptors", "entries", "both"]
LOCAL_COLUMNS = ("local_desc", "local_xy", "local_scale", "local_strength")


@dataclass
class EntriesConfig:
    """ASMK* entries written by extraction (``local_store`` entries or both)."""

    codebook: str | None = None  # root holding the codebook (jobs.index: codebook.source by default)
    assign: AssignConfig = field(default_factory=AssignConfig)  # exact flat, or HNSW (benchmarks/assignment.py)


@dataclass(kw_only=True)
class ExtractConfig:
    collection: str  # folder, manifest, s3:// prefix or revisited .pkl (required)
    out: str  # artifact root (required)
    role: Literal["database", "queries"] = "database"  # revisited .pkl: imlist or qimlist (with boxes)
    id_offset: ImageId = 0
    shard_size: Count = 32  # images per Parquet shard
    batch_size: Count = 8  # images read ahead and passed per describer call
    center_crop: Fraction | None = None  # crop images without a box to this central fraction
    allow_outside_root: bool = False  # a manifest's relative paths may climb out of its folder (../)
    local_whiten_dim: NonNegInt = 128  # how: PCA-whitening of local descriptors to this dim
    local_whiten_images: Count = 200  # how: images sampled to learn it
    local_store: LocalStore = "descriptors"  # descriptors (float16, ~270 B a feature: codebooks can be trained on
    # them), entries (each image's ASMK* entries of a given codebook, ~20 B
    # a word: what R1M fits in), or both (README "Storage at R1M")
    entries: EntriesConfig = field(default_factory=EntriesConfig)
    describe: DescriptorConfig = field(default_factory=DescriptorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


def _node_id() -> str | None:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return None


# ------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------
def load_image(file: str, box: tuple, center_crop: float | None, options: dict) -> tuple[np.ndarray, dict]:
    """Read, decode and crop one image; returns the image and its size/box record fields."""
    img = read_image(file, options)
    h, w = img.shape[:2]
    if all(np.isnan(box)) and center_crop:
        box = center_box(w, h, center_crop)
    return crop(img, box), {"width": w, "height": h, **dict(zip(("x0", "y0", "x1", "y1"), box))}


class ShardExtractor:
    """Ray Data batch callable over shard rows: describes the shard's images, writes and commits it."""

    def __init__(self, cfg: dict, whitening: bytes | None, shards_uri: str):
        import torch

        self.cfg = cfg
        self.describe_cfg = DescriptorConfig(**cfg["describe"])
        torch.set_num_threads(max(1, int(round(cfg["ray"]["actor_cpus"]))))
        white = Whitening.from_bytes(whitening) if whitening else None
        self.describer = Describer(self.describe_cfg, local_whitening=white)
        self.store = cfg["local_store"]
        self.schema = feature_schema(
            self.describer.global_dim,
            self.describer.local_dim,
            {"extractor": {"describe": cfg["describe"], "center_crop": cfg["center_crop"]}},
            entries=self.store != "descriptors",
        )
        self.shards = ShardSet(shards_uri, cfg["storage"])
        self.settings = settings_digest(cfg)
        self.entries = {}
        if self.store != "descriptors":
            centroids = load_codebook(ArtifactRoot(cfg["entries"]["codebook"], cfg["storage"]))
            self.quantizer = Quantizer(centroids, AssignConfig(**cfg["entries"]["assign"]))
            self.entries = entries_record(codebook_hash(centroids))
        self.io = ThreadPoolExecutor(4)
        self.node = _node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: [] for k in ("shard", "ok", "errors", "seconds", "peak_rss_mb")}
        for shard, items in zip(batch["shard"], batch["items"]):
            t0 = time.time()
            rows = self.extract(json.loads(items))
            n_ok = sum(r["status"] == "ok" for r in rows)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.shards.write(
                int(shard),
                feature_table(rows, self.schema),
                {
                    "ok": n_ok,
                    "errors": len(rows) - n_ok,
                    "seconds": time.time() - t0,
                    "peak_rss_mb": peak,
                    "node": self.node,
                    "settings": self.settings,
                    **self.entries,
                },
            )
            for k, v in zip(out, (int(shard), n_ok, len(rows) - n_ok, time.time() - t0, peak)):
                out[k].append(v)
        return {k: np.asarray(v) for k, v in out.items()}

    def extract(self, items: list[dict]) -> list[dict]:
        """Describe one shard's images; failures become error rows."""
        opts, cc = self.cfg["storage"], self.cfg["center_crop"]

        def load(item):
            try:
                return load_image(item["file"], tuple(item["box"]), cc, opts)
            except Exception as e:  # noqa: BLE001 - any unreadable input becomes an error record
                return e

        rows: list[dict] = []
        bs = self.cfg["batch_size"]
        for start in range(0, len(items), bs):
            chunk = items[start : start + bs]
            loaded = list(self.io.map(load, chunk))
            good = [i for i, x in enumerate(loaded) if not isinstance(x, Exception)]
            described = self._describe([loaded[i][0] for i in good])
            desc_by = dict(zip(good, described))
            for i, item in enumerate(chunk):
                base = {"image_id": item["image_id"]}
                if isinstance(loaded[i], Exception):
                    rows.append({**base, "status": "error", "error": f"{type(loaded[i]).__name__}: {loaded[i]}"})
                elif isinstance(desc_by[i], Exception):
                    rows.append({**base, **loaded[i][1], "status": "error", "error": f"describe: {desc_by[i]}"})
                else:
                    rows.append({**base, **loaded[i][1], **desc_by[i], "status": "ok"})
            if self.store != "descriptors":
                self._add_entries([r for r in rows[len(rows) - len(chunk) :] if r["status"] == "ok"])
        return rows

    def _add_entries(self, rows: list[dict]) -> None:
        """Each row's ASMK* entries from its descriptors as a shard stores them (float16), so they equal the
        entries the ``asmk`` stage makes from stored descriptors; ``entries`` alone drops the features."""
        desc = [np.asarray(r["local_desc"], np.float16).astype(np.float32) for r in rows]
        for row, (words, codes) in zip(rows, image_entries(desc, self.quantizer, self.quantizer.centroids)):
            row["asmk_words"], row["asmk_codes"] = words, codes
            if self.store == "entries":
                for col in LOCAL_COLUMNS:
                    row.pop(col, None)

    def _describe(self, images: list[np.ndarray]) -> list:
        """Describe a batch; on failure retry one by one so one bad image costs only itself."""
        if not images:
            return []
        try:
            return self.describer(images)
        except Exception:  # noqa: BLE001
            out = []
            for img in images:
                try:
                    out.append(self.describer([img])[0])
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out


# ------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------
def shard_items(images: pd.DataFrame, shard_size: int) -> list[tuple[int, str]]:
    """(shard index, JSON list of image records) per shard.

    Shards are the recorded ``shard`` column of the image table (fixed when the images were first
    recorded, so reruns and grown collections cut identically); tables recorded without it are cut
    into consecutive runs of ``shard_size`` images.
    """
    shard = images["shard"].to_numpy() if "shard" in images else np.arange(len(images)) // max(1, shard_size)
    boxes = images[["x0", "y0", "x1", "y1"]].to_numpy(float).tolist()
    records = [
        {"image_id": i, "file": f, "box": b}
        for i, f, b in zip(images["image_id"].astype(int).tolist(), images["file"].tolist(), boxes)
    ]
    order = np.argsort(shard, kind="stable")
    cuts = np.flatnonzero(np.diff(shard[order])) + 1
    return [
        (int(shard[rows[0]]), json.dumps([records[r] for r in rows.tolist()]))
        for rows in (np.split(order, cuts) if len(order) else [])
    ]


def extraction_settings(cfg: dict) -> dict:
    """The settings that make a shard's rows: describer settings (batching, device and cuDNN left out),
    the crop policy and the local whitening's dimension. Shards made under other settings never mix."""
    describe = to_dict(
        from_dict(
            DescriptorConfig,
            {k: v for k, v in cfg.get("describe", {}).items() if k in DescriptorConfig.__dataclass_fields__},
        )
    )
    out = {f"describe.{k}": v for k, v in describe.items() if k not in ("forward_batch", "device", "cudnn")}
    out["center_crop"] = cfg.get("center_crop")
    store = cfg.get("local_store", "descriptors")
    if store != "descriptors":  # older records have no local_store: their digests stay as they were
        entries = to_dict(from_dict(EntriesConfig, cfg.get("entries") or {}))
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


def learn_local_whitening(cfg: ExtractConfig, images: pd.DataFrame) -> Whitening:
    """HOW's P, m: PCA-whitening of single-scale raw local descriptors of a sample (L9317-9333, L9499).

    ``local_whiten_images`` images are drawn at random; images that cannot be described are replaced
    by further random draws until that many are described or the collection is exhausted.
    """

    def sample_descriptors(files: list[str]) -> list[np.ndarray]:
        d = Describer(dataclasses.replace(cfg.describe, local_scales=[1.0], global_scales=[1.0]))
        out = []
        for f in files:
            try:
                img, _ = load_image(f, (np.nan,) * 4, None, cfg.storage)
                out.append(d([img])[0]["local_desc"])
            except Exception:  # noqa: BLE001 - an unreadable sample is replaced by another draw
                continue
        return out

    rng = np.random.default_rng(0)
    target = min(len(images), cfg.local_whiten_images)
    first = np.sort(rng.choice(len(images), target, replace=False))
    order = np.concatenate([first, rng.permutation(np.setdiff1d(np.arange(len(images)), first))])
    files = images["file"].to_numpy()[order]
    parts: list[np.ndarray] = []
    tried = 0
    while len(parts) < target and tried < len(files):
        batch = files[tried : tried + target - len(parts)]
        tried += len(batch)
        chunks = np.array_split(batch, max(1, min(8, len(batch) // 16)))
        for got in run_tasks(
            sample_descriptors, [(list(c),) for c in chunks if len(c)], options={"num_cpus": cfg.ray.actor_cpus}
        ).results:
            parts.extend(got)
    n_desc = sum(len(p) for p in parts)
    if n_desc < 2:
        raise CollectionError(
            f"local whitening: {tried} sampled image(s) gave {n_desc} local descriptor(s); "
            f"at least 2 are needed (e.g. {list(files[:3])})"
        )
    log.info("local whitening: %d descriptors from %d of %d images tried", n_desc, len(parts), tried)
    return learn_pca_whitening(np.concatenate(parts), cfg.local_whiten_dim)


def check_checkpoint(describe: DescriptorConfig) -> None:
    """The describer's checkpoint loads as plain data (here, on the driver, before any actor starts)."""
    if describe.checkpoint:
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


def run_extraction(
    cfg: ExtractConfig, images: pd.DataFrame, shards: ShardSet, whitening: Whitening | None, summary: JobSummary
) -> None:
    """Extract every pending shard of ``images`` into ``shards`` (resumes: committed shards are skipped).

    Callers check first (:func:`check_settings`) that committed shards were made under ``cfg``'s settings.
    """
    from tqdm import tqdm

    all_items = shard_items(images, cfg.shard_size)
    pending = set(shards.pending([s for s, _ in all_items]))
    summary.add(shards_total=len(all_items), shards_skipped=len(all_items) - len(pending))
    if not pending:
        return
    check_checkpoint(cfg.describe)
    items = [{"shard": s, "items": it} for s, it in all_items if s in pending]
    plan = plan_actors(cfg.ray, prefer_gpu=cfg.describe.device != "cpu")
    ctx = ray.data.DataContext.get_current()  # Ray Data loads here, on first use, not with ray itself
    ctx.enable_progress_bars = False  # one tqdm bar over shards instead of Ray Data's log lines
    ctx.issue_detectors_config.detectors = []  # actor memory is reserved explicitly (RayConfig.actor_memory_mb)
    plan.actors = min(plan.actors, len(items))
    summary.info["actors"] = dataclasses.asdict(plan)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardExtractor,
        batch_size=1,
        batch_format="numpy",
        concurrency=plan.concurrency,
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        memory=plan.memory_mb * 2**20 if plan.memory_mb else None,
        resources=plan.resources,
        fn_constructor_kwargs={
            "cfg": to_dict(cfg),
            "whitening": whitening.to_bytes() if whitening else None,
            "shards_uri": shards.uri,
        },
    )
    with tqdm(total=len(items), desc="shards", unit="shard") as bar:
        for row in ds.iter_rows():
            summary.add(images_ok=int(row["ok"]), images_error=int(row["errors"]), shards_written=1)
            summary.worker_peak(float(row["peak_rss_mb"]))
            bar.update(1)


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


def recorded_settings(cfg: ExtractConfig) -> dict:
    """What the ``extract`` stage records: the extraction config alone (no cluster or storage options)."""
    names = [f.name for f in dataclasses.fields(ExtractConfig) if f.name not in ("ray", "storage")]
    return {k: v for k, v in to_dict(cfg).items() if k in names}


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


def count_collection(root: ArtifactRoot, images: pd.DataFrame, summary: JobSummary) -> None:
    """Counts of the whole collection (this run's and earlier runs' shards) and the failed-images list."""
    records = root.shards().committed()
    failed = failed_images(root.shards(), images)
    summary.counts.update(
        collection_images=len(images),
        collection_ok=sum(r.get("ok", 0) for r in records.values()),
        collection_failed=len(failed),
    )
    summary.info["failed_images_csv"] = write_failed_images(root.uri, failed, root.options)
    summary.info["failed_images"] = failed.head(20).to_dict("records")


def check_entries(cfg: ExtractConfig) -> None:
    """``local_store`` entries/both needs local features and a codebook of their dimension (read here, on the
    driver, so a wrong root fails before any image is described)."""
    if cfg.local_store == "descriptors":
        return
    if cfg.describe.local == "none" or not cfg.entries.codebook:
        raise ConfigError(
            f"local_store={cfg.local_store} needs local features and entries.codebook=ROOT "
            "(the root whose codebook assigns them; jobs.index: codebook.source)"
        )
    centroids = load_codebook(ArtifactRoot(cfg.entries.codebook, cfg.storage))
    if cfg.describe.local == "rootsift" and centroids.shape[1] != 128:
        raise SettingsMismatch(
            f"{cfg.entries.codebook}: a {centroids.shape[1]}-d codebook cannot assign 128-d RootSIFT"
        )
    made = entry_codebooks(ArtifactRoot(cfg.out, cfg.storage), synthetic=False)
    if made and made != {codebook_hash(centroids)}:
        raise SettingsMismatch(
            f"{cfg.out} holds entries of another codebook than {cfg.entries.codebook}'s now; use a new --out"
        )


def extract(cfg: ExtractConfig, summary: JobSummary, job: str = "extract") -> ArtifactRoot:
    """Extraction into ``cfg.out`` (with the local whitening it needs)."""
    check_entries(cfg)
    root = ArtifactRoot(cfg.out, cfg.storage)
    previous = root.stage_settings("extract", required=False)
    check_settings(root.shards(), to_dict(cfg), previous)
    images = prepare_images(
        root, cfg.collection, cfg.role, cfg.id_offset, cfg.storage, cfg.shard_size, allow_outside=cfg.allow_outside_root
    )
    summary.add(images=len(images))
    whitening = None
    if cfg.describe.local == "how" and cfg.local_whiten_dim:
        whitening = read_whitening(root, "local")
        if whitening is not None and whitening.dim != min(cfg.local_whiten_dim, len(whitening.mean)):
            raise SettingsMismatch(
                f"{root.uri} holds a {whitening.dim}-d local whitening, not {cfg.local_whiten_dim}-d; use a new --out"
            )
        if whitening is None:
            with summary.stage("learn local whitening"):
                whitening = learn_local_whitening(cfg, images)
                write_whitening(root, "local", whitening)
    with summary.stage("extract"):
        run_extraction(cfg, images, root.shards(), whitening, summary)
    count_collection(root, images, summary)
    root.record_stage("extract", job, recorded_settings(cfg), images=len(images))
    return root


FLAGS = {
    "--collection": ("collection", "folder, CSV/Parquet manifest, s3:// prefix or revisited .pkl"),
    "--out": ("out", "artifact root (local folder or s3:// prefix)"),
    "--role": ("role", "revisited .pkl: database images (imlist) or queries (qimlist with boxes)"),
    "--center-crop": ("center_crop", "crop images without a box to this central fraction"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    cfg = parse(ExtractConfig, argv, FLAGS, __doc__, prog)
    summary = JobSummary("extract")
    connect(cfg.ray)
    extract(cfg, summary)
    return summary.finish(cfg.out, cfg.storage)


if __name__ == "__main__":
    run_cli(main)
