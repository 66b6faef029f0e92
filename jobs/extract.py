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
import json
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cluster.ray_env import RayConfig, connect, plan_actors
from jobs.config import parse, to_dict
from jobs.summary import JobSummary
from operators.describe import DescriptorConfig, Describer
from operators.images import center_box, crop, decode_image
from operators.whitening import Whitening, learn_pca_whitening
from storage import fs as sfs
from storage.artifacts import ArtifactRoot
from storage.collection import load_collection
from storage.schemas import feature_schema, feature_table
from storage.shards import ShardSet


@dataclass
class ExtractConfig:
    collection: str = ""
    out: str = ""
    role: str = "database"                 # revisited .pkl: database (imlist) or queries (qimlist)
    id_offset: int = 0
    shard_size: int = 32                   # images per Parquet shard
    batch_size: int = 8                    # images read ahead and passed per describer call
    center_crop: float | None = None       # crop images without a box to this central fraction
    local_whiten_dim: int = 128            # how: PCA-whitening of local descriptors to this dim
    local_whiten_images: int = 200         # how: images sampled to learn it
    describe: DescriptorConfig = field(default_factory=DescriptorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return None


# ------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------
def load_image(file: str, box: tuple, center_crop: float | None, options: dict) -> tuple[np.ndarray, dict]:
    """Read, decode and crop one image; returns the image and its size/box record fields."""
    img = decode_image(sfs.read_bytes(file, options))
    h, w = img.shape[:2]
    if any(np.isnan(box)) and center_crop:
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
        self.schema = feature_schema(self.describer.global_dim, self.describer.local_dim,
                                     {"extractor": {"describe": cfg["describe"], "center_crop": cfg["center_crop"]}})
        self.shards = ShardSet(shards_uri, cfg["storage"])
        self.io = ThreadPoolExecutor(4)
        self.node = _node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: [] for k in ("shard", "ok", "errors", "seconds", "peak_rss_mb")}
        for shard, items in zip(batch["shard"], batch["items"]):
            t0 = time.time()
            rows = self.extract(json.loads(items))
            n_ok = sum(r["status"] == "ok" for r in rows)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.shards.write(int(shard), feature_table(rows, self.schema),
                              {"ok": n_ok, "errors": len(rows) - n_ok, "seconds": time.time() - t0, "peak_rss_mb": peak,
                               "node": self.node})
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
            chunk = items[start:start + bs]
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
        return rows

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
    """(shard index, JSON list of image records) for consecutive runs of ``shard_size`` images."""
    out = []
    for s, start in enumerate(range(0, len(images), shard_size)):
        part = images.iloc[start:start + shard_size]
        items = [{"image_id": int(r.image_id), "file": r.file, "box": [r.x0, r.y0, r.x1, r.y1]} for r in part.itertuples()]
        out.append((s, json.dumps(items)))
    return out


def learn_local_whitening(cfg: ExtractConfig, images: pd.DataFrame) -> Whitening:
    """HOW's P, m: PCA-whitening of single-scale raw local descriptors of a sample (L9317-9333, L9499)."""
    import ray

    @ray.remote(num_cpus=cfg.ray.actor_cpus)
    def sample_descriptors(files: list[str]) -> np.ndarray:
        d = Describer(dataclasses.replace(cfg.describe, local_scales=[1.0], global_scales=[1.0]))
        out = []
        for f in files:
            try:
                img, _ = load_image(f, (np.nan,) * 4, None, cfg.storage)
                out.append(d([img])[0]["local_desc"])
            except Exception:  # noqa: BLE001 - skip unreadable samples
                continue
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

    rng = np.random.default_rng(0)
    pick = images.iloc[np.sort(rng.choice(len(images), min(len(images), cfg.local_whiten_images), replace=False))]
    chunks = np.array_split(pick["file"].to_numpy(), max(1, min(8, len(pick) // 16)))
    x = np.concatenate(ray.get([sample_descriptors.remote(list(c)) for c in chunks if len(c)]))
    return learn_pca_whitening(x, cfg.local_whiten_dim)


def run_extraction(cfg: ExtractConfig, images: pd.DataFrame, shards: ShardSet, whitening: Whitening | None,
                   summary: JobSummary) -> None:
    """Extract every pending shard of ``images`` into ``shards`` (resumes: committed shards are skipped)."""
    import ray
    from tqdm import tqdm

    all_items = shard_items(images, cfg.shard_size)
    pending = set(shards.pending([s for s, _ in all_items]))
    summary.add(shards_total=len(all_items), shards_skipped=len(all_items) - len(pending))
    if not pending:
        return
    items = [{"shard": s, "items": it} for s, it in all_items if s in pending]
    plan = plan_actors(cfg.ray, prefer_gpu=cfg.describe.device != "cpu")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False          # one tqdm bar over shards instead of Ray Data's log lines
    ctx.issue_detectors_config.detectors = []  # actor memory is reserved explicitly (RayConfig.actor_memory_mb)
    summary.info["actors"] = dataclasses.asdict(plan)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardExtractor, batch_size=1, batch_format="numpy", concurrency=min(plan.actors, len(items)),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
        memory=plan.memory_mb * 2**20 if plan.memory_mb else None, resources=plan.resources,
        fn_constructor_kwargs={"cfg": to_dict(cfg), "whitening": whitening.to_bytes() if whitening else None,
                               "shards_uri": shards.uri})
    with tqdm(total=len(items), desc="shards", unit="shard") as bar:
        for row in ds.iter_rows():
            summary.add(images_ok=int(row["ok"]), images_error=int(row["errors"]), shards_written=1)
            summary.worker_peak(float(row["peak_rss_mb"]))
            bar.update(1)


def prepare_images(root: ArtifactRoot, collection: str, role: str, id_offset: int, options: dict) -> pd.DataFrame:
    """The collection table, recorded once under ``root`` so image ids stay stable across reruns."""
    recorded = root.images()
    fresh = load_collection(collection, role, options, id_offset)
    if recorded is None:
        root.write_images(fresh)
        return fresh
    if len(recorded) != len(fresh) or (recorded["file"].to_numpy() != fresh["file"].to_numpy()).any():
        raise ValueError(f"{root.uri} was built from a different collection; use a new --out")
    return recorded


def extract(cfg: ExtractConfig, summary: JobSummary) -> ArtifactRoot:
    """Extraction into ``cfg.out`` (with the local whitening it needs)."""
    root = ArtifactRoot(cfg.out, cfg.storage)
    images = prepare_images(root, cfg.collection, cfg.role, cfg.id_offset, cfg.storage)
    summary.add(images=len(images))
    whitening = None
    if cfg.describe.local == "how" and cfg.local_whiten_dim:
        whitening = root.whitening("local")
        if whitening is None:
            with summary.stage("learn local whitening"):
                whitening = learn_local_whitening(cfg, images)
                root.write_whitening("local", whitening)
    with summary.stage("extract"):
        run_extraction(cfg, images, root.shards(), whitening, summary)
    root.record_stage("extract", to_dict(cfg), images=len(images))
    return root


FLAGS = {
    "--collection": ("collection", str, "folder, CSV/Parquet manifest, s3:// prefix or revisited .pkl"),
    "--out": ("out", str, "artifact root (local folder or s3:// prefix)"),
    "--role": ("role", str, "revisited .pkl: database or queries"),
    "--center-crop": ("center_crop", float, "crop images without a box to this central fraction"),
}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(ExtractConfig, argv, FLAGS, __doc__)
    summary = JobSummary("extract")
    connect(cfg.ray)
    extract(cfg, summary)
    return summary.finish(sfs.join(cfg.out, "summary-extract.json"), cfg.storage)


if __name__ == "__main__":
    main()
