"""The ASMK inverted file, partitioned by visual word, and the per-shard partials it is merged from.

    ROOT/asmk/partials/part-NNNNN.npz (+ _commits/)   one feature shard's partial inverted file
    ROOT/asmk/offsets.npy (k+1 int64)  entry_image.npy (uint32)  codes.npy (uint8 packed bits or float32)
    ROOT/asmk/images.npy (int64 ids)   image_entries.npy (int64)  meta.json

Entries of word c are ``offsets[c]:offsets[c+1]``; ``entry_image`` indexes ``images``. The merge
places every partial's postings of word c after those of the partials before it, writing straight
into memory-mapped output arrays, one partial in memory at a time, so partials merge in any order
and image ids need not be consecutive. Readers memory-map the arrays (local, or cached from S3).
"""

from __future__ import annotations

import numpy as np

from operators.asmk import Aggregated, InvertedFile, build_inverted_file
from operators.state import State
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError
from storage.schemas import entry_arrays
from storage.shards import ShardSet, shard_name
from storage.state import pack, read_arrays, unpack, write_arrays

ARRAYS = InvertedFile.ARRAYS


def partials(root: ArtifactRoot) -> ShardSet:
    return root.shards("asmk/partials")


def write_partial(root: ArtifactRoot, shard: int, ivf: InvertedFile, record: dict) -> dict:
    """Commit one shard's partial inverted file (with its commit ``record``)."""
    return partials(root).write_blob(shard, pack({a: getattr(ivf, a) for a in ARRAYS}), record)


def load_partial(root: ArtifactRoot, shard: int) -> dict[str, np.ndarray]:
    rel = f"asmk/partials/{shard_name(shard)}.npz"
    return unpack(root.read_bytes(rel), rel)


def entries_partial(root: ArtifactRoot, shard: int, k: int) -> dict[str, np.ndarray]:
    """A feature shard's partial inverted file made from its ASMK* entry columns (no descriptor is read)."""
    import pyarrow.compute as pc

    table = root.shards().read_shard(shard, ["image_id", "status", "asmk_words", "asmk_codes"])
    ids, words, codes = entry_arrays(table.filter(pc.equal(table.column("status"), "ok")))
    ivf = build_inverted_file(Aggregated(ids, words, codes), k, binary=True)
    return {a: getattr(ivf, a) for a in ARRAYS}


def merge_partials(root: ArtifactRoot, shards: list[int], k: int, from_entries: set[int] = frozenset()) -> dict:
    """Merge committed partials into the word-partitioned layout (see module doc); the shards in
    ``from_entries`` contribute their entry columns instead (:func:`entries_partial`: no partial file)."""

    def part(s: int) -> dict[str, np.ndarray]:
        return entries_partial(root, s, k) if s in from_entries else load_partial(root, s)

    from tqdm import tqdm

    parts_images, counts = [], np.zeros(k, np.int64)
    width, dtype = None, None
    for s in tqdm(shards, desc="merge: count", unit="shard"):  # pass 1: images, postings per word
        p = part(s)
        parts_images.append(p["images"])
        counts += np.diff(p["offsets"])
        width, dtype = p["codes"].shape[1], p["codes"].dtype
    images = np.unique(np.concatenate(parts_images)) if parts_images else np.zeros(0, np.int64)
    del parts_images
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    entry_image, commit_e = root.open_array_writer("asmk/entry_image.npy", (n,), np.uint32)
    codes, commit_c = root.open_array_writer("asmk/codes.npy", (n, width or 16), dtype or np.uint8)
    image_entries = np.zeros(len(images), np.int64)
    cursor = offsets[:-1].copy()
    for s in tqdm(shards, desc="merge: scatter", unit="shard"):  # pass 2: scatter
        p = part(s)
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
    write_arrays(root, "asmk", {"offsets": offsets, "images": images, "image_entries": image_entries})
    return {
        "entries": n,
        "images": len(images),
        "bytes_per_entry": 4 + (width or 16) * np.dtype(dtype or np.uint8).itemsize,
    }


def write_meta(root: ArtifactRoot, meta: dict) -> None:
    root.write_json("asmk/meta.json", meta)


def has_inverted_file(root: ArtifactRoot) -> bool:
    return root.exists("asmk/meta.json")


def inverted_file_meta(root: ArtifactRoot) -> dict:
    if not root.exists("asmk/meta.json"):
        raise ArtifactError(
            f"{root.uri} has no ASMK inverted file: run the asmk stage "
            f"(retrieval index … --out {root.uri} --set stages=[codebook,asmk])"
        )
    return root.read_json("asmk/meta.json")


def open_inverted_file(root: ArtifactRoot) -> tuple[InvertedFile, dict]:
    """The merged inverted file (arrays memory-mapped) and its meta."""
    meta = inverted_file_meta(root)
    arrays = read_arrays(root, "asmk", ARRAYS)
    return InvertedFile.from_state(State(arrays, {"binary": meta["params"]["binary"]})), meta
