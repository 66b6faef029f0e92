"""The i-ASMK* compressed inverted file and the word-range parts it is made from (:mod:`operators.iasmk`).

    ROOT/iasmk/pair_counts/part-NNNNN.npz (+ _commits/)  pass 1: match counts per image pair of a word range
    ROOT/iasmk/parts/part-NNNNN.npz (+ _commits/)        pass 2: the compressed postings of a word range
    ROOT/iasmk/offsets.npy (k+1)  entry_indptr.npy (E+1)  entry_image.npy (M uint32: member images)
    ROOT/iasmk/codes.npy (E, B)   images.npy  image_entries.npy (each image's own word count)  meta.json

Entry e of word c (``offsets[c] <= e < offsets[c+1]``) stands for the images
``images[entry_image[entry_indptr[e]:entry_indptr[e+1]]]``: one image for a vector outside any
component, all of a component's images otherwise. Parts cover consecutive word ranges, so the
merge appends them in order, streaming into memory-mapped arrays.
"""

from __future__ import annotations

import numpy as np

from operators.asmk import InvertedFile
from operators.iasmk import CompressedWords
from operators.state import State
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError
from storage.shards import ShardSet, shard_name
from storage.state import pack, read_arrays, unpack, write_arrays


def pair_count_parts(root: ArtifactRoot) -> ShardSet:
    return root.shards("iasmk/pair_counts")


def compressed_parts(root: ArtifactRoot) -> ShardSet:
    return root.shards("iasmk/parts")


def write_pair_counts(root: ArtifactRoot, part: int, keys: np.ndarray, counts: np.ndarray, record: dict) -> dict:
    return pair_count_parts(root).write_blob(part, pack({"keys": keys, "counts": counts}), record)


def load_pair_counts(root: ArtifactRoot, part: int) -> tuple[np.ndarray, np.ndarray]:
    rel = f"iasmk/pair_counts/{shard_name(part)}.npz"
    z = unpack(root.read_bytes(rel), rel)
    return z["keys"], z["counts"]


def write_compressed_part(root: ArtifactRoot, part: int, cw: CompressedWords, record: dict) -> dict:
    arrays = {a: getattr(cw, a) for a in ("words", "codes", "indptr", "members", "component_sizes")}
    return compressed_parts(root).write_blob(part, pack(arrays), record)


def load_compressed_part(root: ArtifactRoot, part: int) -> CompressedWords:
    rel = f"iasmk/parts/{shard_name(part)}.npz"
    z = unpack(root.read_bytes(rel), rel)
    return CompressedWords(z["words"], z["codes"], z["indptr"], z["members"], z["component_sizes"])


def merge_compressed(
    root: ArtifactRoot, parts: list[int], k: int, images: np.ndarray, image_entries: np.ndarray, width: int
) -> dict:
    """Append the parts (consecutive word ranges, in order) into the compressed inverted file; returns
    its entry and member counts and every part's component sizes (read once, here)."""
    records = compressed_parts(root).committed()
    n_entries = sum(records[p]["entries"] for p in parts)
    n_members = sum(records[p]["members"] for p in parts)
    members, commit_m = root.open_array_writer("iasmk/entry_image.npy", (n_members,), np.uint32)
    codes, commit_c = root.open_array_writer("iasmk/codes.npy", (n_entries, width), np.uint8)
    counts = np.zeros(k, np.int64)
    sizes = np.zeros(n_entries, np.int64)
    component_sizes = []
    e = m = 0
    for p in parts:
        cw = load_compressed_part(root, p)
        component_sizes.append(cw.component_sizes)
        ne, nm = len(cw.words), len(cw.members)
        codes[e : e + ne], members[m : m + nm] = cw.codes, cw.members
        sizes[e : e + ne] = np.diff(cw.indptr)
        counts += np.bincount(cw.words, minlength=k)
        e, m = e + ne, m + nm
    commit_m(), commit_c()
    write_arrays(
        root,
        "iasmk",
        {
            "offsets": np.r_[0, np.cumsum(counts)].astype(np.int64),
            "entry_indptr": np.r_[0, np.cumsum(sizes)].astype(np.int64),
            "images": np.asarray(images, np.int64),
            "image_entries": np.asarray(image_entries, np.int64),
        },
    )
    return {
        "entries": n_entries,
        "members": n_members,
        "component_sizes": np.concatenate(component_sizes or [np.zeros(0, np.int64)]),
    }


def write_iasmk_meta(root: ArtifactRoot, meta: dict) -> None:
    root.write_json("iasmk/meta.json", meta)


def has_iasmk(root: ArtifactRoot) -> bool:
    return root.exists("iasmk/meta.json")


def iasmk_meta(root: ArtifactRoot) -> dict:
    if not has_iasmk(root):
        raise ArtifactError(f"{root.uri} has no i-ASMK* inverted file: run retrieval discover --index {root.uri}")
    return root.read_json("iasmk/meta.json")


def open_compressed(root: ArtifactRoot) -> tuple[InvertedFile, dict]:
    """The compressed inverted file (arrays memory-mapped) and its meta."""
    meta = iasmk_meta(root)
    arrays = read_arrays(root, "iasmk", (*InvertedFile.ARRAYS, "entry_indptr"))
    return InvertedFile.from_state(State(arrays, {"binary": True})), meta
