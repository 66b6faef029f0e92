"""Codebook stage: faiss k-means on a sample of the local descriptors (``python -m jobs.codebook``).

Samples up to ``sample`` descriptors spread evenly over the images of the committed feature
shards, trains k-means in a Ray task (on a GPU when the cluster has one), and stores
``ROOT/codebook/centroids.npy``. ``k`` (default 65,536, seed L7519-7520) is reduced with a warning
when the sample is too small for it. A codebook trained on one collection is reused on another
with ``--set codebook.source=OTHER_ROOT`` (the papers train on a separate set, L7511-7518).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass

import numpy as np

from cluster.ray_env import largest_node_cpus
from cluster.runner import run_tasks
from jobs.summary import JobSummary
from operators.codebook import effective_k, train_codebook
from operators.constraints import AtLeast2, Count, Seed
from storage.artifacts import ArtifactRoot
from storage.codebook import codebook_meta, load_codebook, write_codebook
from storage.schemas import local_arrays

log = logging.getLogger(__name__)


@dataclass
class CodebookConfig:
    k: AtLeast2 = 65536
    sample: Count = 1_000_000  # descriptors sampled for k-means
    niter: Count = 10
    seed: Seed = 0
    source: str | None = None  # reuse the codebook of another artifact root
    cpus: Count | None = None  # CPUs of the k-means task (None: every CPU of the largest node)
    min_points: Count = 39  # sampled descriptors per word below which k is reduced (faiss's own warning
    # threshold; fewer train a coarser codebook, still a valid one)


def sample_descriptors(root: ArtifactRoot, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` local descriptors, the same number from every image, read shard by shard."""
    records = root.shards().committed()
    images = sum(r.get("ok", r.get("rows", 0)) for r in records.values())
    per_image = max(1, int(np.ceil(n / max(1, images))))
    rng = np.random.default_rng(seed)
    parts = []
    for table in root.shards().iter_tables(["image_id", "local_desc"]):
        desc, _, counts = local_arrays(table)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pick = [s + rng.choice(c, min(c, per_image), replace=False) for s, c in zip(starts, counts) if c]
        if pick:
            parts.append(desc[np.concatenate(pick)].astype(np.float32))
    x = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    return x[rng.permutation(len(x))[:n]]


def build_codebook(cfg: CodebookConfig, root: ArtifactRoot, summary: JobSummary, gpus: float = 0) -> np.ndarray:
    """Train (or copy from ``cfg.source``) the codebook of ``root``."""
    meta = codebook_meta(root)
    if meta is not None and meta.get("config") == dataclasses.asdict(cfg):
        summary.add(codebook_reused=1)
        return load_codebook(root)
    if cfg.source:
        centroids = load_codebook(ArtifactRoot(cfg.source, root.options))
        info = {"source": cfg.source}
    else:
        x = sample_descriptors(root, cfg.sample, cfg.seed)
        k = effective_k(len(x), cfg.k, cfg.min_points)
        if k < cfg.k:
            warnings.warn(f"codebook: {len(x)} sampled descriptors are too few for k={cfg.k}; using k={k}")
        cpus = cfg.cpus or largest_node_cpus()  # faiss k-means threads over a whole node
        (centroids,) = run_tasks(
            train_codebook,
            [(x, k, cfg.niter, cfg.seed, None, int(cpus))],  # gpu: None (auto)
            options={"num_cpus": cpus, "num_gpus": gpus},
            desc=f"codebook k-means (k={k}, {len(x):,} descriptors)",
            unit="codebook",
        ).results
        info = {"sample": len(x), "k_requested": cfg.k, "cpus": cpus}
    write_codebook(root, centroids, dataclasses.asdict(cfg), **info)
    summary.add(codebook_k=len(centroids))
    return centroids
