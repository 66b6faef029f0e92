"""Synthetic distractors: an R1M-like collection written straight into an index root's feature shards.

``python -m jobs.distractors --donors DONORS --out ROOT --n 1000000``

Each distractor (:mod:`operators.distractors`) is drawn around real *donor* images (the committed shards of
``DONORS``: their global descriptors and ASMK* entries, quantised with the codebook when the donors hold
descriptors), of ``--set params.kind=``: ``mix`` (the default) a mix of two donors' entries with flipped sign
bits and words drawn from the pool, and a noisy mix of their global descriptors; ``mosaic`` spatial regions of
several donors with their real local descriptors, re-aggregated (the donors' shards must hold descriptors and
positions), and the donors' global descriptors mixed by region area. Donors must be unrelated to the queries the
index will be evaluated on (``benchmarks/scale.py`` uses instance-mini groups that are never queried).

The distractors join ``ROOT``'s image table (ids after its largest, files ``synthetic:distractor/<seed>/…``,
shards after its last) and are written by Ray tasks as feature shards of ASMK* entries (no local
descriptors): the same shards ``local_store=entries`` extraction writes, so ``jobs.index --set
stages=[global,codebook,asmk,graph,spectral]`` indexes real images and distractors together. A shard is a
pure function of (seed, shard), streamed and committed on its own; a rerun writes only missing shards.
Run it after the root's extraction (a later extraction of the real collection keeps the distractors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field

import numpy as np
import ray

from cluster.ray_env import RayConfig, connect
from cluster.runner import run_tasks
from jobs.config import from_dict, parse, run_cli, to_dict
from jobs.summary import JobSummary
from operators.asmk import image_entries
from operators.codebook import AssignConfig, Quantizer
from operators.constraints import Count, Seed
from operators.distractors import DistractorParams, DonorFeatures, DonorPool, feature_entries, make
from storage.artifacts import ArtifactRoot
from storage.codebook import codebook_hash, load_codebook
from storage.entries import append_synthetic, donor_features, donor_images, entries_record, write_synthetic_shard
from storage.errors import CollectionError


@dataclass(kw_only=True)
class DistractorConfig:
    donors: str  # root whose committed shards are the donor images (required)
    out: str  # root the distractors join (required)
    n: Count  # distractor images (required)
    seed: Seed = 0
    shard_size: Count = 1000  # distractors per feature shard
    shards_per_task: Count = 4  # shards per Ray task
    codebook: str | None = None  # root of the codebook of the entries (default: the donors root's)
    assign: AssignConfig = field(default_factory=AssignConfig)  # donors holding descriptors: their words
    params: DistractorParams = field(default_factory=DistractorParams)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


def donor_pool(donors: ArtifactRoot, centroids: np.ndarray, assign: AssignConfig, features: bool = False) -> DonorPool:
    """Global descriptors and ASMK* entries of every described donor image (entries of ``centroids``: read
    from the shards that hold them, else made from the stored descriptors); ``features``: with the donors' local
    features too (words, residuals and positions, for ``mosaic``; the shards must hold descriptors)."""
    if features:
        return feature_pool(donors, centroids, assign)
    quantizer = None
    globs, per_image = [], []
    for glob, images, kind in donor_images(donors, codebook_hash(centroids)):
        if kind == "descriptors":
            quantizer = quantizer or Quantizer(centroids, assign)
            images = image_entries(images, quantizer, centroids)
        globs.append(glob)
        per_image += images
    return pool_of(donors, globs, per_image)


def pool_of(donors: ArtifactRoot, globs: list, per_image: list, features: DonorFeatures | None = None) -> DonorPool:
    counts = [len(w) for w, _ in per_image]
    if not counts or sum(counts) == 0:
        raise CollectionError(f"{donors.uri}: no described donor image with local features")
    return DonorPool(
        np.concatenate(globs),
        np.r_[0, np.cumsum(counts)].astype(np.int64),
        np.concatenate([w for w, _ in per_image]).astype(np.int32),
        np.concatenate([c for _, c in per_image]),
        features,
    )


def feature_pool(donors: ArtifactRoot, centroids: np.ndarray, assign: AssignConfig) -> DonorPool:
    """The pool with its :class:`DonorFeatures`: each descriptor's word q(x) (single assignment) and x − q(x)."""
    quantizer = Quantizer(centroids, assign)
    globs, per_image, feats, counts = [], [], [], []
    for glob, desc, xy in donor_features(donors):
        x = np.concatenate(desc) if desc else np.zeros((0, centroids.shape[1]), np.float32)
        words = quantizer(x, 1)[:, 0].astype(np.int32)
        residuals = (x - centroids[words]).astype(np.float32)
        cuts = np.cumsum([len(d) for d in desc])[:-1]
        per_image += [feature_entries(w, r) for w, r in zip(np.split(words, cuts), np.split(residuals, cuts))]
        globs.append(glob)
        counts += [len(d) for d in desc]
        feats.append((words, residuals, np.concatenate(xy) if xy else np.zeros((0, 2), np.float32)))
    if not sum(counts):
        raise CollectionError(f"{donors.uri}: mosaic distractors need donors whose shards hold local descriptors")
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    return pool_of(donors, globs, per_image, DonorFeatures(offsets, *(np.concatenate(c) for c in zip(*feats))))


def shard_task(
    root_uri: str,
    options: dict,
    pool: DonorPool,
    params: dict,
    seed: int,
    local_dim: int,
    jobs: list[tuple[int, int, int]],
    record: dict,
) -> int:
    """Write the shards ``(shard, first image id, count)`` of distractors (a Ray task); returns images written."""
    p = from_dict(DistractorParams, params)
    root, written = ArtifactRoot(root_uri, options), 0
    for shard, first, count in jobs:
        t0, rng = time.time(), np.random.default_rng([seed, shard])
        rows = []
        for image_id in range(first, first + count):
            g, words, codes = make(pool, p, rng)
            rows.append({"image_id": image_id, "global": g, "asmk_words": words, "asmk_codes": codes})
        write_synthetic_shard(root, shard, rows, pool.globals.shape[1], local_dim, record, time.time() - t0)
        written += count
    return written


def generate(cfg: DistractorConfig, summary: JobSummary) -> None:
    donors, root = ArtifactRoot(cfg.donors, cfg.storage), ArtifactRoot(cfg.out, cfg.storage)
    centroids = load_codebook(ArtifactRoot(cfg.codebook or cfg.donors, cfg.storage))
    with summary.stage("donor pool"):
        pool = donor_pool(donors, centroids, cfg.assign, features=cfg.params.kind == "mosaic")
    summary.add(donors=len(pool), donor_entries=len(pool.words))
    if pool.features is not None:
        summary.add(donor_features=len(pool.features.words))
    table, first_id = append_synthetic(root, f"distractor/{cfg.seed}", cfg.n, cfg.shard_size)
    mine = table[(table["image_id"] >= first_id) & (table["image_id"] < first_id + cfg.n)]
    by_shard = mine.groupby("shard")["image_id"].agg(["min", "size"])
    pending = set(root.shards().pending(by_shard.index.tolist()))
    work = [(int(s), int(r["min"]), int(r["size"])) for s, r in by_shard.iterrows() if s in pending]
    settings = {k: v for k, v in to_dict(cfg).items() if k in ("seed", "params", "donors", "assign")}
    record = {
        **entries_record(codebook_hash(centroids)),
        "settings": "synthetic-" + hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16],
    }
    summary.add(distractors=cfg.n, shards_total=len(by_shard), shards_skipped=len(by_shard) - len(work))
    pool_ref, step = ray.put(pool), max(1, cfg.shards_per_task)
    args = [
        (
            root.uri,
            root.options,
            pool_ref,
            dataclasses.asdict(cfg.params),
            cfg.seed,
            centroids.shape[1],
            work[i : i + step],
            record,
        )
        for i in range(0, len(work), step)
    ]
    with summary.stage("distractors"):
        run_tasks(
            shard_task,
            args,
            options={"num_cpus": 1},
            desc="distractors",
            unit="img",
            total=sum(c for *_, c in work),
            advance=lambda n: n,
            on_result=lambda n: summary.add(distractors_written=n),
        )
    root.record_stage("distractors", "distractors", settings, images=cfg.n, first_id=first_id)


FLAGS = {
    "--donors": ("donors", "root whose images the distractors are drawn around"),
    "--out": ("out", "root the distractors join"),
    "--n": ("n", "distractor images"),
    "--seed": ("seed", "random seed"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    cfg = parse(DistractorConfig, argv, FLAGS, __doc__, prog)
    summary = JobSummary("distractors")
    connect(cfg.ray)
    generate(cfg, summary)
    return summary.finish(cfg.out, cfg.storage)


if __name__ == "__main__":
    run_cli(main)
