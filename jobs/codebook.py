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

from jobs.summary import JobSummary
from operators.codebook import effective_k, train_codebook
from storage import fs as sfs
from storage.artifacts import ArtifactRoot
from storage.schemas import local_arrays

log = logging.getLogger(__name__)


@dataclass
class CodebookConfig:
    k: int = 65536
    sample: int = 1_000_000        # descriptors sampled for k-means
    niter: int = 10
    seed: int = 0
    source: str | None = None      # reuse the codebook of another artifact root


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
    import ray

    meta_uri = root.path("codebook", "meta.json")
    if sfs.exists(meta_uri, root.options) and sfs.read_json(meta_uri, root.options).get("config") == dataclasses.asdict(cfg):
        summary.add(codebook_reused=1)
        return root.load_array("codebook/centroids.npy", mmap=False)
    if cfg.source:
        centroids = ArtifactRoot(cfg.source, root.options).load_array("codebook/centroids.npy", mmap=False)
        info = {"source": cfg.source}
    else:
        x = sample_descriptors(root, cfg.sample, cfg.seed)
        k = effective_k(len(x), cfg.k)
        if k < cfg.k:
            warnings.warn(f"codebook: {len(x)} sampled descriptors are too few for k={cfg.k}; using k={k}")
        task = ray.remote(num_cpus=1, num_gpus=gpus)(train_codebook)
        centroids = ray.get(task.remote(x, k, cfg.niter, cfg.seed))
        info = {"sample": len(x), "k_requested": cfg.k}
    root.write_array("codebook/centroids.npy", centroids)
    sfs.write_json(meta_uri, {"k": len(centroids), "dim": centroids.shape[1], "config": dataclasses.asdict(cfg), **info},
                   root.options)
    summary.add(codebook_k=len(centroids))
    return centroids
