"""The extraction's actor pool: Ray Data streams shard rows to :class:`ShardExtractor` actors.

Each actor loads the describer once (torch is imported there, in the actor, not with this module), reads and
decodes its shard's images in threads, describes them ``batch_size`` at a time (same-shape images share a forward
pass), writes the shard straight to storage and commits it. Unreadable images become error rows; they never stop
the job. :func:`shard_items` cuts an image table into the rows the pool takes; :func:`extract_shards` runs the pool.
"""

from __future__ import annotations

import json
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pandas as pd
import ray

from cluster.ray_env import ActorPlan
from operators.asmk import image_entries
from operators.codebook import AssignConfig, Quantizer
from operators.descriptor_config import DescriptorConfig
from operators.state import State
from operators.whitening import Whitening
from storage.artifacts import ArtifactRoot
from storage.codebook import codebook_hash, load_codebook
from storage.entries import entries_record
from storage.extraction import load_image, settings_digest
from storage.schemas import feature_schema, feature_table
from storage.shards import ShardSet
from storage.validation import from_dict

LOCAL_COLUMNS = ("local_desc", "local_xy", "local_scale", "local_strength")


def _node_id() -> str | None:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return None


class ShardExtractor:
    """Ray Data batch callable over shard rows: describes the shard's images, writes and commits it."""

    def __init__(self, cfg: dict, whitening: State | None, shards_uri: str):
        import torch

        from operators.describe import Describer

        self.cfg = cfg
        self.describe_cfg = from_dict(DescriptorConfig, cfg["describe"])
        torch.set_num_threads(max(1, int(round(cfg["ray"]["actor_cpus"]))))
        white = Whitening.from_state(whitening) if whitening else None
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
            self.quantizer = Quantizer(centroids, from_dict(AssignConfig, cfg["entries"]["assign"]))
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
def shard_of(images: pd.DataFrame, shard_size: int) -> np.ndarray:
    """Each image's shard: the recorded ``shard`` column, else consecutive runs of ``shard_size`` images."""
    return images["shard"].to_numpy() if "shard" in images else np.arange(len(images)) // max(1, shard_size)


def shard_items(images: pd.DataFrame, shard_size: int) -> list[tuple[int, str]]:
    """(shard index, JSON list of image records) per shard.

    Shards are the recorded ``shard`` column of the image table (fixed when the images were first
    recorded, so reruns and grown collections cut identically); tables recorded without it are cut
    into consecutive runs of ``shard_size`` images.
    """
    shard = shard_of(images, shard_size)
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


def extract_shards(
    cfg: dict, items: list[dict], shards_uri: str, whitening: Whitening | None, plan: ActorPlan
) -> Iterator[dict]:
    """Stream ``items`` (``{"shard", "items"}`` rows from :func:`shard_items`) through ``plan``'s pool of
    :class:`ShardExtractor` actors built from ``cfg`` (the extract config as a dict); yields each written shard's
    row (``shard``, ``ok``, ``errors``, ``seconds``, ``peak_rss_mb``) as it completes."""
    ctx = ray.data.DataContext.get_current()  # Ray Data loads here, on first use, not with ray itself
    ctx.enable_progress_bars = False  # the caller shows one bar over shards instead of Ray Data's log lines
    ctx.issue_detectors_config.detectors = []  # actor memory is reserved explicitly (RayConfig.actor_memory_mb)
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
            "cfg": cfg,
            "whitening": whitening.state() if whitening else None,
            "shards_uri": shards_uri,
        },
    )
    yield from ds.iter_rows()
