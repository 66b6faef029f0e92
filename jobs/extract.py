"""Extraction job: images -> Parquet feature shards, streamed through a Ray Data actor pool.

``python -m jobs.extract --collection C --out ROOT`` (also the ``extract`` stage of ``jobs.index``).

The collection is cut into shards of ``shard_size`` images (a shard's content is fixed by the
stable image ids, so reruns cut identically). Ray Data streams the pending shards to a pool of
:class:`cluster.shard_extraction.ShardExtractor` actors — one per GPU when the cluster has GPUs, else
fractional-CPU actors — each loading the model once. An actor reads and decodes its shard's images in
threads, describes them ``batch_size`` at a time (same-shape images share a forward pass), writes the
shard straight to storage and commits it. Unreadable images become error rows; they never stop the job.
What a root records of its extraction (settings digest, image table, failed images): :mod:`storage.extraction`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from cluster.ray_env import RayConfig, connect, fit_to_work, plan_actors
from cluster.runner import run_tasks
from cluster.shard_extraction import extract_shards, shard_items, shard_of
from jobs.config import parse, run_cli, to_dict
from jobs.summary import JobSummary
from operators.constraints import Count, Fraction, ImageId, NonNegInt
from operators.descriptor_config import DescriptorConfig
from operators.whitening import Whitening, learn_pca_whitening
from storage.artifacts import ArtifactRoot
from storage.codebook import codebook_hash, load_codebook
from storage.entries import entry_codebooks
from storage.errors import CollectionError, ConfigError, SettingsMismatch
from storage.extraction import (
    EntriesConfig,
    check_checkpoint,
    check_settings,
    failed_images,
    load_image,
    prepare_images,
)
from storage.shards import ShardSet
from storage.summaries import write_failed_images
from storage.whitening import read_whitening, write_whitening

log = logging.getLogger(__name__)


LocalStore = Literal["descriptors", "entries", "both"]


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


def learn_local_whitening(cfg: ExtractConfig, images: pd.DataFrame) -> Whitening:
    """HOW's P, m: PCA-whitening of single-scale raw local descriptors of a sample (L9317-9333, L9499).

    ``local_whiten_images`` images are drawn at random; images that cannot be described are replaced
    by further random draws until that many are described or the collection is exhausted.
    """

    def sample_descriptors(files: list[str]) -> list[np.ndarray]:
        from operators.describe import Describer  # torch: loaded only when a whitening is learned

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


def run_extraction(
    cfg: ExtractConfig, images: pd.DataFrame, shards: ShardSet, whitening: Whitening | None, summary: JobSummary
) -> None:
    """Extract every pending shard of ``images`` into ``shards`` (resumes: committed shards are skipped).

    Callers check first (:func:`storage.extraction.check_settings`) that committed shards were made under
    ``cfg``'s settings.
    """
    from tqdm import tqdm

    all_items = shard_items(images, cfg.shard_size)
    pending = set(shards.pending([s for s, _ in all_items]))
    summary.add(shards_total=len(all_items), shards_skipped=len(all_items) - len(pending))
    if not pending:
        return
    check_checkpoint(cfg.describe)
    items = [{"shard": s, "items": it} for s, it in all_items if s in pending]
    todo = int(np.isin(shard_of(images, cfg.shard_size), list(pending)).sum())
    plan = fit_to_work(plan_actors(cfg.ray, prefer_gpu=cfg.describe.device != "cpu"), cfg.ray, len(items), todo)
    summary.info["actors"] = dataclasses.asdict(plan)
    with tqdm(total=len(items), desc="shards", unit="shard") as bar:
        for row in extract_shards(to_dict(cfg), items, shards.uri, whitening, plan):
            summary.add(images_ok=int(row["ok"]), images_error=int(row["errors"]), shards_written=1)
            summary.worker_peak(float(row["peak_rss_mb"]))
            bar.update(1)


def recorded_settings(cfg: ExtractConfig) -> dict:
    """What the ``extract`` stage records: the extraction config alone (no cluster or storage options)."""
    names = [f.name for f in dataclasses.fields(ExtractConfig) if f.name not in ("ray", "storage")]
    return {k: v for k, v in to_dict(cfg).items() if k in names}


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
