"""i-ASMK* discovery at scale on a synthetic ASMK* inverted file, through ``jobs.discover``.

    .venv/bin/python benchmarks/iasmk_scale.py --images 100000 --root /tmp/iasmk-bench

Writes an index root holding only an ASMK* inverted file (``storage.inverted_file`` layout, 128-bit
codes, k = 65,536 words), then runs ``python -m jobs.discover --index ROOT --set stages=[iasmk]`` as a
process on an embedded local Ray and reports its wall time per pass, the peak RSS of the whole process
tree (Ray workers included, sampled every 0.2 s) and the artifact sizes.

The synthetic index: each image holds ``--entries`` words drawn from a Zipf-like distribution over the
vocabulary (s = 0.6, so frequent words have long postings, as real ones do) with uniformly random codes;
``--objects`` objects are planted, each seen by 2 to 6 images sharing 40 of its words with codes at
Hamming ≤ 24 of the object's own (enough matches to pass the global check), so components exist. The
structure is deterministic by ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import run_job  # noqa: E402
from operators.asmk import Aggregated, build_inverted_file  # noqa: E402
from storage.artifacts import ArtifactRoot  # noqa: E402
from storage.inverted_file import ARRAYS, write_meta  # noqa: E402

K = 65536


def synthetic_entries(n_images: int, entries: int, objects: int, seed: int, block: int = 5000):
    """Aggregated entries of the synthetic collection, produced in blocks of images."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, K + 1) ** 0.6
    p /= p.sum()
    vocab = rng.permutation(K)
    owners = rng.integers(0, n_images, (objects, 6))
    sizes = rng.integers(2, 7, objects)
    obj_words = (
        np.stack([rng.choice(K, 40, replace=False) for _ in range(objects)]) if objects else np.zeros((0, 40), int)
    )
    obj_codes = rng.integers(0, 256, (objects, 40, 16), dtype=np.uint8)
    planted: dict[int, list[int]] = {}
    for o in range(objects):
        for img in owners[o, : sizes[o]]:
            planted.setdefault(int(img), []).append(o)
    for s in range(0, n_images, block):
        ids, words, codes = [], [], []
        for img in range(s, min(n_images, s + block)):
            w = np.unique(vocab[rng.choice(K, entries, p=p)])
            c = rng.integers(0, 256, (len(w), 16), dtype=np.uint8)
            for o in planted.get(img, []):
                noise = np.packbits(rng.random((40, 128)) < 0.1, axis=1)  # ~13 bits flipped
                w, keep = np.unique(np.r_[obj_words[o], w], return_index=True)  # the planted code wins
                c = np.r_[obj_codes[o] ^ noise, c][keep]
            ids.append(np.full(len(w), img)), words.append(w), codes.append(c)
        yield Aggregated(np.concatenate(ids), np.concatenate(words), np.concatenate(codes))


def write_index(root: ArtifactRoot, n_images: int, entries: int, objects: int, seed: int) -> int:
    """The synthetic inverted file, built in memory and written in the ASMK* layout; returns its entries."""
    parts = list(synthetic_entries(n_images, entries, objects, seed))
    agg = Aggregated(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("image_ids", "words", "codes")))
    del parts
    ivf = build_inverted_file(agg, K, binary=True)
    for a in ARRAYS:
        root.write_array(f"asmk/{a}.npy", getattr(ivf, a))
    write_meta(
        root,
        {
            "k": K,
            "params": {"binary": True, "alpha": 3.0, "tau": 0.0, "use_idf": False, "db_ma": 1, "query_ma": 5},
            "codebook_sha1": "synthetic",
            "entries": int(ivf.offsets[-1]),
        },
    )
    root.write_json("index.json", {"schema_version": 2, "stages": {}})
    return int(ivf.offsets[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--objects", type=int, default=0, help="planted objects (default: images / 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default="/tmp/iasmk-bench")
    a = ap.parse_args()
    root = ArtifactRoot(a.root)
    t0 = time.time()
    n = write_index(root, a.images, a.entries, a.objects or a.images // 10, a.seed)
    counts = np.diff(np.load(f"{a.root}/asmk/offsets.npy"))
    pairs = (counts.astype(float) ** 2).sum() / 2
    print(
        f"synthetic index: {a.images} images, {n} entries, {time.time() - t0:.0f} s to generate; "
        f"postings per word mean {counts.mean():.0f}, max {counts.max()}, Σn² / 2 = {pairs:.3g} pairs"
    )
    wall, peak = run_job(["-m", "jobs.discover", "--index", a.root, "--set", "stages=[iasmk]"])
    summary = json.loads(Path(a.root, "summary-discover.json").read_text())
    sizes = {
        d: sum(f.stat().st_size for f in Path(a.root, d).rglob("*") if f.is_file()) / 2**20 for d in ("asmk", "iasmk")
    }
    print(f"jobs.discover: {wall:.1f} s wall (Ray start included), passes {summary['timings_s']}")
    print(f"peak RSS of the process tree: {peak:.0f} MB; asmk/ {sizes['asmk']:.0f} MB, iasmk/ {sizes['iasmk']:.0f} MB")
    print("statistics:", json.dumps(summary["iasmk"]))


if __name__ == "__main__":
    main()
