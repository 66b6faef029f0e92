"""ASMK stage: partial inverted files built by Ray tasks over feature shards, merged word by word.

Each task reads one committed feature shard, assigns its descriptors to their nearest word
(database single assignment), aggregates per (image, word) and commits a partial inverted file
(``ROOT/asmk/partials/part-NNNNN.npz``; a rerun skips committed partials). The merge places every
partial's postings of word c after those of the partials before it, writing straight into
memory-mapped output arrays, one partial in memory at a time, so partials merge in any order and
image ids need not be consecutive:

    ROOT/asmk/offsets.npy (k+1 int64)  entry_image.npy (uint32)  codes.npy (uint8 packed bits or float32)
    ROOT/asmk/images.npy (int64 ids)   image_entries.npy (int64)  meta.json

Searching loads these memory-mapped (local or cached from S3); several roots built with the same
codebook (e.g. a collection and R1M distractors) are searched together, top-k merged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass, field

import numpy as np

from jobs.summary import JobSummary
from operators.asmk import AsmkParams, InvertedFile, build_index, idf_weights, search
from operators.codebook import Quantizer
from storage import fs as sfs
from storage.artifacts import ArtifactRoot
from storage.schemas import local_arrays

ARRAYS = ("offsets", "entry_image", "codes", "images", "image_entries")


@dataclass
class AsmkConfig:
    params: AsmkParams = field(default_factory=AsmkParams)
    buffer_mb: int = 256           # search: score buffer per task (queries × images × 8 B)
    query_block: int = 256         # search: query images per Ray task


def partial_task(root_uri: str, options: dict, shard: int, binary: bool, db_ma: int) -> dict:
    """Quantise, aggregate and commit one shard's partial inverted file (runs in a Ray task)."""
    import pyarrow.compute as pc

    root = ArtifactRoot(root_uri, options)
    centroids = root.load_array("codebook/centroids.npy", mmap=False)
    table = root.shards().read_shard(shard, ["image_id", "status", "local_desc"])
    table = table.filter(pc.equal(table.column("status"), "ok"))
    desc, ids, _ = local_arrays(table)
    desc = desc.astype(np.float32)
    ivf = build_index(desc, ids, Quantizer(centroids)(desc, db_ma), centroids, binary)
    buf = io.BytesIO()
    np.savez(buf, **{a: getattr(ivf, a) for a in ARRAYS})
    return root.shards("asmk/partials").write_blob(shard, buf.getvalue(), {
        "entries": len(ivf.entry_image), "descriptors": len(desc), "codebook_sha1": codebook_hash(centroids),
        "binary": binary, "db_ma": db_ma})


def load_partial(root: ArtifactRoot, shard: int) -> dict[str, np.ndarray]:
    data = sfs.read_bytes(root.shards("asmk/partials").blob_path(shard), root.options)
    z = np.load(io.BytesIO(data))
    return {a: z[a] for a in ARRAYS}


def merge_partials(root: ArtifactRoot, shards: list[int], k: int, binary: bool) -> dict:
    """Merge committed partials into the word-partitioned layout (see module doc)."""
    parts_images = [load_partial(root, s)["images"] for s in shards]
    images = np.unique(np.concatenate(parts_images)) if parts_images else np.zeros(0, np.int64)
    counts = np.zeros(k, np.int64)
    width, dtype = None, None
    for s in shards:
        p = load_partial(root, s)
        counts += np.diff(p["offsets"])
        width, dtype = p["codes"].shape[1], p["codes"].dtype
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    entry_image, commit_e = root.open_array_writer("asmk/entry_image.npy", (n,), np.uint32)
    codes, commit_c = root.open_array_writer("asmk/codes.npy", (n, width or 16), dtype or np.uint8)
    image_entries = np.zeros(len(images), np.int64)
    cursor = offsets[:-1].copy()
    for s in shards:
        p = load_partial(root, s)
        pc = np.diff(p["offsets"])
        words = np.repeat(np.arange(k), pc)
        rank = np.arange(len(words)) - np.repeat(p["offsets"][:-1], pc)
        dest = cursor[words] + rank
        gidx = np.searchsorted(images, p["images"])
        entry_image[dest] = gidx[p["entry_image"]]
        codes[dest] = p["codes"]
        image_entries[gidx] += p["image_entries"]
        cursor += pc
    commit_e(), commit_c()
    root.write_array("asmk/offsets.npy", offsets)
    root.write_array("asmk/images.npy", images)
    root.write_array("asmk/image_entries.npy", image_entries)
    return {"entries": n, "images": len(images), "bytes_per_entry": 4 + (width or 16) * np.dtype(dtype or np.uint8).itemsize}


def build_asmk(cfg: AsmkConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    import ray
    from tqdm import tqdm

    centroids = root.load_array("codebook/centroids.npy", mmap=False)
    shards = sorted(root.shards().committed())
    want = {"codebook_sha1": codebook_hash(centroids), "binary": cfg.params.binary, "db_ma": cfg.params.db_ma}
    done = root.shards("asmk/partials").committed()
    pending = [s for s in shards if any(done.get(s, {}).get(key) != v for key, v in want.items())]
    task = ray.remote(num_cpus=1)(partial_task)
    futures = [task.remote(root.uri, root.options, s, cfg.params.binary, cfg.params.db_ma) for s in pending]
    with tqdm(total=len(futures), desc="partial inverted files", unit="shard") as bar:
        while futures:
            done, futures = ray.wait(futures)
            ray.get(done)
            bar.update(len(done))
    summary.add(asmk_partials_built=len(pending), asmk_partials_skipped=len(shards) - len(pending))
    info = merge_partials(root, shards, len(centroids), cfg.params.binary)
    meta = {**info, "k": len(centroids), "params": dataclasses.asdict(cfg.params),
            "codebook_sha1": codebook_hash(centroids)}
    sfs.write_json(root.path("asmk", "meta.json"), meta, root.options)
    summary.add(asmk_entries=info["entries"])
    summary.info["asmk_bytes_per_entry"] = info["bytes_per_entry"]
    return meta


def codebook_hash(centroids: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(centroids, np.float32).tobytes()).hexdigest()


def open_inverted_file(root: ArtifactRoot) -> tuple[InvertedFile, dict]:
    meta = sfs.read_json(root.path("asmk", "meta.json"), root.options)
    arrays = {a: root.load_array(f"asmk/{a}.npy") for a in ARRAYS}
    return InvertedFile(**arrays, binary=meta["params"]["binary"]), meta


def search_task(roots: list[tuple[str, dict]], words: np.ndarray, codes: np.ndarray, qimg: np.ndarray,
                params: dict, k: int, exclude: dict, buffer_mb: int):
    """Search aggregated queries in every partition (same codebook) and merge their top-k."""
    from operators.asmk import Aggregated

    p = AsmkParams(**params)
    ivfs = [open_inverted_file(ArtifactRoot(u, o))[0] for u, o in roots]
    weight = None
    if p.use_idf:  # IDF over all partitions together
        weight = idf_weights(sum(ivf.counts for ivf in ivfs), sum(len(ivf.images) for ivf in ivfs))
    query = Aggregated(qimg, words, codes)
    results = [search(ivf, query, p, k, exclude, weight, buffer_bytes=buffer_mb * 2**20) for ivf in ivfs]
    qids = results[0][0]
    scores = np.concatenate([r[1] for r in results], axis=1)
    ids = np.concatenate([r[2] for r in results], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return qids, np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
