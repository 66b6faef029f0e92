"""Do synthetic distractors compete like real unrelated photos? Per-query top distractor scores, both kinds.

    .venv/bin/python benchmarks/distractor_calibration.py --root DIR [--growth-max 100000]

Self-contained under ``DIR``:

1. real photographs unrelated to the queries: the photo wallpapers of Debian's background packages
   (``benchmarks/donor_photos.sh DIR/photos``, installed with apt-get), cut into tiles of about ``--tile`` px at
   their native resolution (at most ``--tiles-per-photo`` a photo); the photos are split (seeded, whole photos)
   into *held-out* ones (at least ``--heldout`` tiles: the real distractors) and *donor* ones;
2. ``DIR/donors``: ``jobs.index`` of the donors — the donor tiles and instance-mini's never-queried groups
   (``benchmarks/scale.py``'s split) — RootSIFT ``--sift-n`` an image, global descriptors, a codebook of up to
   ``--codebook-k`` words trained on their descriptors; ``DIR/others``: ``jobs.index`` extraction of the held-out
   tiles and of the queries (instance-mini's other 113 images, whole);
3. N = the held-out count synthetic distractors of each kind (``mix``: the first scheme; ``mosaic``:
   :mod:`operators.distractors`, with ``benchmarks/scale.py``'s ``MOSAIC`` parameters) drawn from the donor pool
   exactly as ``jobs.distractors`` draws them (shard s of 1,000 from ``default_rng([seed, s])``); ``--pool photos``
   draws them from the donor photos' tiles only, the held-out photos' own population (the generator judged apart
   from which images it is given);
4. per query, the top-1 and the 10th best distractor score among the N synthetic and among the N real held-out
   images: global cosine (raw GeM descriptors) and the ASMK* score (query multiple assignment 5, no IDF: the
   index's defaults). Ratios synthetic / real per query, median over the queries with local features.

``--growth-max M``: the top-1 scores (median over queries) as N grows from 100 to M for both synthetic kinds
(and the real held-out set up to its size), written to ``DIR/growth.csv`` and ``DIR/growth.png``.
Last line: ``calibration: global top1 ratio R, asmk top1 ratio A`` (the ``mosaic`` kind). ``--mosaic grid=2 …``
overrides :data:`benchmarks.scale.MOSAIC` to try other parameters.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory import run_job  # noqa: E402
from benchmarks.scale import DATA, MOSAIC, split  # noqa: E402
from jobs.distractors import donor_pool  # noqa: E402
from operators.asmk import Aggregated, AsmkParams, aggregate, build_inverted_file, search  # noqa: E402
from operators.codebook import AssignConfig, Quantizer  # noqa: E402
from operators.distractors import DistractorParams, DonorPool, make  # noqa: E402
from storage.artifacts import ArtifactRoot  # noqa: E402
from storage.codebook import load_codebook  # noqa: E402
from storage.schemas import global_matrix, local_arrays  # noqa: E402

TOPK = 10


def tiles(photos_csv: Path, out: Path, side: int, cap: int) -> pd.DataFrame:
    """Each photo cut into nx × ny equal tiles of at least ``side`` px (nx = ⌊W / side⌋), at most ``cap`` of them
    (evenly spread); JPEG files under ``out``, one group per photo."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for f, group in pd.read_csv(photos_csv)[["file", "group"]].itertuples(index=False):
        img = Image.open(photos_csv.parent / f).convert("RGB")
        w, h = img.size
        nx, ny = max(1, w // side), max(1, h // side)
        cells = [(i, j) for j in range(ny) for i in range(nx)]
        for i, j in [cells[c] for c in np.linspace(0, len(cells) - 1, min(cap, len(cells))).round().astype(int)]:
            path = out / f"{group}__{i}_{j}.jpg"
            if not path.exists():
                box = (i * w // nx, j * h // ny, (i + 1) * w // nx, (j + 1) * h // ny)
                img.crop(box).save(path, quality=90)
            rows.append({"file": str(path), "group": group})
    return pd.DataFrame(rows)


def split_photos(t: pd.DataFrame, heldout: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Whole photos, in a seeded order, go to the held-out set until it has ``heldout`` tiles; the rest are donors."""
    groups = np.random.default_rng(seed).permutation(sorted(t["group"].unique()))
    sizes = t.groupby("group").size()[groups]
    held = set(groups[: int(np.searchsorted(np.cumsum(sizes.to_numpy()), heldout)) + 1])
    mask = t["group"].isin(held)
    return t[~mask], t[mask]


def read_root(root: ArtifactRoot) -> tuple[pd.Series, np.ndarray, list[np.ndarray]]:
    """Described images of a root: files (by row), global (n, D), per image its float32 descriptors."""
    files = root.images().set_index("image_id")["file"]
    ids, globs, desc = [], [], []
    for table in root.shards().iter_tables(["image_id", "status", "global", "local_desc"]):
        table = table.filter(pc.equal(table.column("status"), "ok"))
        d, _, counts = local_arrays(table)
        ids += table.column("image_id").to_pylist()
        globs.append(global_matrix(table))
        desc += np.split(d.astype(np.float32), np.cumsum(counts)[:-1])
    return files.loc[ids].reset_index(drop=True), np.concatenate(globs), desc


def entries_of(desc: list[np.ndarray], quantizer: Quantizer, centroids: np.ndarray, ma: int) -> Aggregated:
    """ASMK* entries of images (ids 0..n−1) with ``ma`` words per descriptor."""
    counts = np.array([len(d) for d in desc])
    x = np.concatenate(desc)
    return aggregate(x, np.repeat(np.arange(len(desc)), counts), quantizer(x, ma), centroids, binary=True)


def asmk_top(db: Aggregated, queries: Aggregated, k: int, nq: int) -> np.ndarray:
    """(nq, TOPK) ASMK* scores of each query's best database images (NaN for a query without entries)."""
    ivf = build_inverted_file(db, k)
    qids, s, _ = search(ivf, queries, AsmkParams(), TOPK)
    out = np.full((nq, TOPK), np.nan)
    out[qids] = np.where(np.isfinite(s), s, 0.0)
    return out


def global_top(db: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(nq, TOPK) best cosines: −sort of the top of q dbᵀ."""
    s = q @ db.T
    return -np.sort(-np.partition(s, -min(TOPK, s.shape[1]), axis=1)[:, -TOPK:], axis=1)


def synthetic(pool: DonorPool, p: DistractorParams, first: int, n: int, seed: int = 0) -> list[tuple]:
    """Distractors ``first .. first + n`` of the stream ``jobs.distractors`` writes (shards of 1,000)."""
    out = []
    for shard in range(first // 1000, (first + n + 999) // 1000):
        rng = np.random.default_rng([seed, shard])
        made = [make(pool, p, rng) for _ in range(1000)]
        out += made[max(0, first - shard * 1000) : first + n - shard * 1000]
    return out


def as_aggregated(rows: list[tuple]) -> tuple[np.ndarray, Aggregated]:
    counts = [len(w) for _, w, _ in rows]
    return np.stack([g for g, _, _ in rows]), Aggregated(
        np.repeat(np.arange(len(rows)), counts),
        np.concatenate([w for _, w, _ in rows]).astype(np.int64),
        np.concatenate([c for _, _, c in rows]),
    )


def scores(rows_g: np.ndarray, rows_a: Aggregated, qg: np.ndarray, qa: Aggregated, k: int) -> dict[str, np.ndarray]:
    g, a = global_top(rows_g, qg), asmk_top(rows_a, qa, k, len(qg))
    return {"global top1": g[:, 0], "global top10": g[:, -1], "asmk top1": a[:, 0], "asmk top10": a[:, -1]}


def growth(pool, kinds, real, qg, qa, k, n_max, out: Path) -> pd.DataFrame:
    """Median over queries of the top-1 scores among the first N distractors, N = 100 … n_max."""
    marks = [n for n in (100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000) if n <= n_max]
    rows = []
    for kind, p in kinds.items():
        best_g, best_a, done = np.full(len(qg), -np.inf), np.full(len(qg), -np.inf), 0
        for n in marks:
            for first in range(done, n, 10000):
                gs, agg = as_aggregated(synthetic(pool, p, first, min(10000, n - first)))
                top = scores(gs, agg, qg, qa, k)
                best_g, best_a = np.fmax(best_g, top["global top1"]), np.fmax(best_a, top["asmk top1"])
            done = n
            rows.append({"kind": kind, "n": n, "global_top1": np.median(best_g), "asmk_top1": np.nanmedian(best_a)})
            print(f"  growth {kind:>6} N {n:>7}: global {rows[-1]['global_top1']:.4f} asmk {rows[-1]['asmk_top1']:.4f}")
    rg, ra = real
    for n in [m for m in marks if m <= len(rg)] + [len(rg)]:
        top = scores(rg[:n], subset(ra, n), qg, qa, k)
        rows.append(
            {
                "kind": "real",
                "n": n,
                "global_top1": np.median(top["global top1"]),
                "asmk_top1": np.nanmedian(top["asmk top1"]),
            }
        )
    df = pd.DataFrame(rows)
    df.to_csv(out / "growth.csv", index=False)
    plot(df, out / "growth.png")
    return df


def subset(a: Aggregated, n: int) -> Aggregated:
    keep = a.image_ids < n
    return Aggregated(a.image_ids[keep], a.words[keep], a.codes[keep])


def plot(df: pd.DataFrame, path: Path, size: tuple[int, int] = (480, 320)) -> None:
    """Two panels (global, ASMK* top-1 against log N), one line per kind, drawn with Pillow (no matplotlib here)."""
    from PIL import Image, ImageDraw

    colours = {"mix": (200, 60, 40), "mosaic": (40, 90, 200), "real": (30, 150, 60)}
    w, h, m = *size, 48
    img = Image.new("RGB", (2 * w, h), "white")
    draw = ImageDraw.Draw(img)
    lx = np.log10(df["n"].to_numpy(float))
    for p, col in enumerate(("global_top1", "asmk_top1")):
        y = df[col].to_numpy(float)
        lo, hi = np.nanmin(y), np.nanmax(y)
        fx = lambda v: p * w + m + (v - lx.min()) / max(np.ptp(lx), 1e-9) * (w - 2 * m)  # noqa: E731
        fy = lambda v: h - m - (v - lo) / max(hi - lo, 1e-12) * (h - 2 * m)  # noqa: E731
        draw.rectangle([p * w + m, m, (p + 1) * w - m, h - m], outline="black")
        draw.text((p * w + m, 8), f"{col.replace('_', ' ')} (median over queries) vs log10 N", fill="black")
        draw.text((p * w + m, h - m + 6), f"{lx.min():.0f}", fill="black")
        draw.text(((p + 1) * w - m - 12, h - m + 6), f"{lx.max():.1f}", fill="black")
        draw.text((p * w + 2, m), f"{hi:.3g}", fill="black")
        draw.text((p * w + 2, h - m - 10), f"{lo:.3g}", fill="black")
        for i, (kind, d) in enumerate(df.groupby("kind")):
            pts = [(fx(np.log10(n)), fy(v)) for n, v in zip(d["n"], d[col])]
            draw.line(pts, fill=colours.get(kind, "black"), width=2) if len(pts) > 1 else None
            for x, yy in pts:
                draw.ellipse([x - 3, yy - 3, x + 3, yy + 3], fill=colours.get(kind, "black"))
            draw.text((p * w + m + 6, m + 6 + 12 * i), kind, fill=colours.get(kind, "black"))
    img.save(path)


def prepare(a: argparse.Namespace, base: Path) -> None:
    """Photos, tiles, the donors' and the others' roots (resumable: finished jobs skip their work)."""
    if not (base / "photos" / "photos.csv").exists():
        subprocess.run(["bash", str(REPO / "benchmarks" / "donor_photos.sh"), str(base / "photos")], check=True)
    t = tiles(base / "photos" / "photos.csv", base / "tiles", a.tile, a.tiles_per_photo)
    donor_tiles, held = split_photos(t, a.heldout, a.seed)
    mini_donors, queries = split(Path(a.collection).resolve(), base / "instance-mini")
    donors = pd.concat([pd.read_csv(mini_donors)[["file", "group"]], donor_tiles], ignore_index=True)
    donors.to_csv(base / "donors.csv", index=False)
    others = pd.concat([held.assign(role="heldout"), pd.read_csv(queries)[["file", "group"]].assign(role="query")])
    others.to_csv(base / "others.csv", index=False)
    print(
        f"photos {t['group'].nunique()} -> tiles {len(t)}: donors {len(donors)} images ({len(donor_tiles)} tiles of "
        f"{donor_tiles['group'].nunique()} photos + {len(donors) - len(donor_tiles)} instance-mini), held-out real "
        f"{len(held)} tiles of {held['group'].nunique()} photos, queries {int((others.role == 'query').sum())}",
        flush=True,
    )
    sift = ["--set", f"describe.sift_n={a.sift_n}"]
    for name, args in (
        (
            "donors",
            [
                *("--collection", str(base / "donors.csv"), "--out", str(base / "donors"), *sift),
                *("--set", "stages=[extract,global,codebook]", "--set", f"codebook.k={a.codebook_k}"),
            ],
        ),
        (
            "others",
            [
                "--collection",
                str(base / "others.csv"),
                "--out",
                str(base / "others"),
                *sift,
                "--set",
                "stages=[extract]",
            ],
        ),
    ):
        wall, peak = run_job(["-m", "jobs.index", *args], log=str(base / f"{name}.log"))
        print(f"  index {name}: {wall:.0f} s, peak RSS {peak / 1024:.2f} GB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--heldout", type=int, default=200, help="held-out real tiles at least (N of the comparison)")
    ap.add_argument("--tile", type=int, default=640, help="tile side (px) at the photos' native resolution")
    ap.add_argument("--tiles-per-photo", type=int, default=12)
    ap.add_argument("--sift-n", type=int, default=1000)
    ap.add_argument("--codebook-k", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--growth-max", type=int, default=0, help="top-1 growth with N up to this many (0: none)")
    ap.add_argument("--collection", default=str(DATA))
    ap.add_argument(
        "--pool",
        choices=["all", "photos"],
        default="all",
        help="the donors drawn from: all (instance-mini's never-queried images and the donor photos' tiles, as "
        "scale.py draws them) or photos (the donor photos' tiles only: the held-out photos' own population)",
    )
    ap.add_argument("--mosaic", nargs="*", default=[], help="KEY=VALUE overrides of the mosaic parameters (MOSAIC)")
    a = ap.parse_args()
    mosaic = {**MOSAIC, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.mosaic)}}
    base = Path(a.root).resolve()
    t0 = time.time()
    prepare(a, base)
    donors_root = ArtifactRoot(str(base / "donors"))
    centroids = load_codebook(donors_root)
    k = len(centroids)
    pool = donor_pool(donors_root, centroids, AssignConfig(), features=True)
    if a.pool == "photos":  # read_root walks the shards as donor_pool does: its files are in pool order
        pool = pool.subset(read_root(donors_root)[0].str.contains("/tiles/").to_numpy())
    files, glob, desc = read_root(ArtifactRoot(str(base / "others")))
    role = pd.read_csv(base / "others.csv").set_index("file")["role"].reindex(files.to_numpy()).to_numpy()
    quantizer = Quantizer(centroids)
    qi, hi = np.flatnonzero(role == "query"), np.flatnonzero(role == "heldout")
    qg, qa = glob[qi], entries_of([desc[i] for i in qi], quantizer, centroids, AsmkParams().query_ma)
    real = (glob[hi], entries_of([desc[i] for i in hi], quantizer, centroids, 1))
    n = len(hi)
    print(f"codebook k = {k}; donor pool {len(pool)} images, {len(pool.features.words):,} features; N = {n}")
    kinds = {"mix": DistractorParams(), "mosaic": DistractorParams(**mosaic)}
    table = {"real": scores(*real, qg, qa, k)}
    entries = {"real": len(real[1].words) / n}
    for kind, p in kinds.items():
        made = as_aggregated(synthetic(pool, p, 0, n, a.seed))
        table[kind], entries[kind] = scores(*made, qg, qa, k), len(made[1].words) / n
    print("ASMK* entries an image (mean): " + ", ".join(f"{kind} {e:.0f}" for kind, e in entries.items()))
    ratios = {}
    for kind in kinds:
        for col in table["real"]:
            r = table[kind][col] / table["real"][col]
            ratios[kind, col] = float(np.nanmedian(r[np.isfinite(r)]))
    print(f"\nper query (median over {len(qi)} queries) at N = {n}: score of real / mix / mosaic; ratio to real")
    for col in table["real"]:
        med = {kind: float(np.nanmedian(v[col])) for kind, v in table.items()}
        print(
            f"  {col:<12} real {med['real']:.4f}  mix {med['mix']:.4f} ({ratios['mix', col]:.3f})  "
            f"mosaic {med['mosaic']:.4f} ({ratios['mosaic', col]:.3f})"
        )
    if a.growth_max:
        growth(pool, kinds, real, qg, qa, k, a.growth_max, base)
        print(f"  growth: {base / 'growth.csv'}, {base / 'growth.png'}")
    print(f"wall {time.time() - t0:.0f} s; mosaic parameters {mosaic}; donor pool: {a.pool}")
    print(
        f"calibration: global top1 ratio {ratios['mosaic', 'global top1']:.3f}, "
        f"asmk top1 ratio {ratios['mosaic', 'asmk top1']:.3f}"
    )


if __name__ == "__main__":
    main()
