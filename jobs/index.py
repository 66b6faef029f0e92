"""Index job: runs every enabled stage over a collection into one artifact root.

``python -m jobs.index --collection C --out ROOT`` runs, in order:

- ``extract``: multi-scale GeM global + local features into Parquet shards (:mod:`jobs.extract`);
- ``global``: the global descriptors gathered into one float32 matrix (optionally PCA-whitened to
  ``global_whiten_dim``), memory-mapped by ``jobs.search``, and its approximate index (``global_index``:
  exact below 200,000 rows, else a faiss IVF chosen by a memory budget, :mod:`operators.ann`);
- ``codebook``: k-means visual codebook on a sample of local descriptors (:mod:`jobs.codebook`);
- ``asmk``: the ASMK / ASMK* inverted file, built in parallel and merged (:mod:`jobs.asmk`);
- ``graph``: the kNN graph of the database (global or ASMK similarities) and its affinity W;
- ``spectral``: the top-r eigenpairs of the normalised graph, for FSR / hybrid (:mod:`jobs.graph`).

Extraction resumes (committed shards are skipped); the cheap ``global`` stage is redone each run.
``--set stages=[global,graph]`` picks stages.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cluster.ray_env import connect
from jobs.asmk import AsmkConfig, build_asmk
from jobs.codebook import CodebookConfig, build_codebook
from jobs.config import parse, run_cli, to_dict
from jobs.extract import FLAGS as EXTRACT_FLAGS
from jobs.extract import ExtractConfig, extract
from jobs.graph import GraphConfig, GraphJobConfig, SpectralConfig
from jobs.graph import run_stages as run_graph_stages
from jobs.summary import JobSummary
from operators.ann import AnnConfig, build_ann, plan
from operators.ann import fingerprint as ann_fingerprint
from operators.constraints import AtLeast2, Count, NonNegFinite, Probability
from operators.whitening import Whitening, learn_lw, learn_pca_whitening
from storage.artifacts import ArtifactRoot
from storage.errors import CollectionError, ConfigError
from storage.global_index import GlobalMeta, ann_params, global_writer, open_global, remove_ann, write_ann
from storage.pairs import read_pairs
from storage.schemas import global_matrix
from storage.whitening import remove_whitening, write_whitening

Stage = Literal["extract", "global", "codebook", "asmk", "graph", "spectral"]
STAGES = typing.get_args(Stage)
LOCAL_STAGES = ("codebook", "asmk")


@dataclass(kw_only=True)
class IndexConfig(ExtractConfig):
    stages: list[Stage] = field(default_factory=lambda: list(STAGES))
    global_whiten_dim: Count | None = None  # PCA-whiten global descriptors (None: keep raw)
    global_whiten_images: AtLeast2 = 5000  # images sampled (from random shards) to learn it
    global_whiten_source: str | None = None  # learn it on another root's shards (independent data)
    global_whiten_shrinkage: Probability = 1.0  # eigenvalue power s/2 (1: plain PCAw; 0.5: HOW's shrinkage)
    global_whiten_pairs: str | None = None  # learned whitening Lw from mined pairs (jobs.mine) instead of PCAw
    global_whiten_negatives: Literal["random", "mined"] = "random"  # Lw's non-matching pairs: random pairs of the
    # collection (C_D = 2Σ, as cirtorch) or the mined negatives
    global_whiten_reg: NonNegFinite = 10.0  # Lw: C_S + reg · tr(C_S)/D · I (few pairs, many dimensions;
    # leave-one-group-out CV on instance-mini, benchmarks/lw_cv.py)
    global_index: AnnConfig = field(default_factory=AnnConfig)  # approximate index of the global matrix
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    asmk: AsmkConfig = field(default_factory=AsmkConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    spectral: SpectralConfig = field(default_factory=SpectralConfig)


def build_global(cfg: IndexConfig, root: ArtifactRoot, summary: JobSummary) -> None:
    """Stream committed shards into ``global/vectors.npy`` (+ ``ids.npy``), never holding all shards."""
    shards = root.shards()
    records = shards.committed()
    n = sum(r["ok"] for r in records.values())
    if n == 0:
        raise CollectionError(f"{root.uri}: no image of the collection could be described (see failed-images.csv)")
    dim = int(shards.read_shard(min(records), ["global"]).schema.field("global").type.list_size)
    whitening = None
    if cfg.global_whiten_pairs:
        whitening = learn_from_pairs(cfg, root, summary)
        write_whitening(root, "global", whitening)
        dim = whitening.dim
    elif cfg.global_whiten_dim:
        source = ArtifactRoot(cfg.global_whiten_source, cfg.storage) if cfg.global_whiten_source else root
        sample = sample_globals(source.shards(), cfg.global_whiten_images)
        whitening = learn_pca_whitening(sample, cfg.global_whiten_dim, cfg.global_whiten_shrinkage)
        write_whitening(root, "global", whitening)
        summary.add(global_whitening_sample=len(sample))
        dim = whitening.dim
    else:  # queries are whitened when this file exists: none may outlive a raw rebuild
        remove_whitening(root, "global")
    vectors, ids, commit = global_writer(root, n, dim)
    at = 0
    for table in shards.iter_tables(["image_id", "status", "global"]):
        table = _ok(table)
        x = global_matrix(table)
        vectors[at : at + len(x)] = whitening(x) if whitening else x
        ids[at : at + len(x)] = table.column("image_id").to_numpy()
        at += len(x)
    commit(GlobalMeta(count=n, dim=dim, whitened=bool(whitening)))
    summary.add(global_vectors=n)


def build_global_ann(cfg: AnnConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    """The approximate index of ``global/`` chosen by :func:`operators.ann.plan` (none when it says exact).

    Resumable: an index whose plan, settings and matrix fingerprint match is kept (``global/`` is rewritten
    with the same rows each run); otherwise the old one is retired before the new one is written."""
    g = open_global(root)
    p = plan(len(g.ids), g.vectors.shape[1], cfg)
    info = {"kind": p.kind, "n": p.n}
    if p.kind == "exact":
        remove_ann(root)
        summary.info["global_index"] = info
        return info
    info.update(factory=p.factory, nprobe=p.nprobe, code_gb=round(p.code_bytes / 2**30, 3))
    fp, old = ann_fingerprint(g.ids, g.vectors), ann_params(root)
    settings = {"plan": dataclasses.asdict(p), "config": dataclasses.asdict(cfg), "fingerprint": fp}
    if old is not None and all(old.get(key) == value for key, value in settings.items()):
        summary.info["global_index"] = {**info, "resumed": True}
        return info
    remove_ann(root)
    write_ann(root, build_ann(g.vectors, p, cfg, g.ids))
    summary.info["global_index"] = info
    return info


def learn_from_pairs(cfg: IndexConfig, root: ArtifactRoot, summary: JobSummary) -> Whitening:
    """Lw (:func:`operators.whitening.learn_lw`) from the mined pairs at ``global_whiten_pairs``: the
    pairs' raw descriptors are gathered, and the mean and covariance of every descriptor are
    accumulated, in one pass over the shards."""
    pairs = read_pairs(cfg.global_whiten_pairs, cfg.storage).select(["anchor_id", "other_id", "label"]).to_pandas()
    wanted = np.unique(np.r_[pairs.anchor_id.to_numpy(), pairs.other_id.to_numpy()])
    ids, rows, n, total, outer = [], [], 0, 0.0, 0.0
    for table in root.shards().iter_tables(["image_id", "status", "global"]):
        table = _ok(table)
        x = global_matrix(table).astype(np.float64)
        n, total, outer = n + len(x), total + x.sum(0), outer + x.T @ x
        i = table.column("image_id").to_numpy()
        keep = np.isin(i, wanted)
        ids.append(i[keep]), rows.append(x[keep])
    ids, x = np.concatenate(ids), np.concatenate(rows)
    mean = total / n
    row_of = {int(v): r for r, v in enumerate(ids)}
    known = pairs[pairs.anchor_id.isin(row_of) & pairs.other_id.isin(row_of)]
    index = np.stack([known.anchor_id.map(row_of), known.other_id.map(row_of)], 1)
    pos, neg = index[known.label.to_numpy() == 1], index[known.label.to_numpy() == 0]
    if len(pos) == 0 or (cfg.global_whiten_negatives == "mined" and len(neg) == 0):
        raise CollectionError(f"{cfg.global_whiten_pairs}: no usable positive (or negative) pairs to learn Lw from")
    summary.add(lw_positive_pairs=len(pos), lw_negative_pairs=len(neg) if cfg.global_whiten_negatives == "mined" else 0)
    cov = outer / n - np.outer(mean, mean)
    negatives = neg if cfg.global_whiten_negatives == "mined" else None
    return learn_lw(x, pos, negatives, cfg.global_whiten_dim or x.shape[1], cfg.global_whiten_reg, mean, cov)


def sample_globals(shards, n: int, seed: int = 0) -> np.ndarray:
    """Global descriptors of ``n`` images drawn at random: whole shards are read in a random order
    until they hold ``n`` successfully described images, then ``n`` of those are kept."""
    rng = np.random.default_rng(seed)
    parts, have = [], 0
    for index in rng.permutation(shards.indices()):
        parts.append(global_matrix(_ok(shards.read_shard(int(index), ["image_id", "status", "global"]))))
        have += len(parts[-1])
        if have >= n:
            break
    x = np.concatenate(parts)
    return x[np.sort(rng.choice(len(x), min(n, len(x)), replace=False))]


def _ok(table):
    import pyarrow.compute as pc

    return table.filter(pc.equal(table.column("status"), "ok"))


def entries_codebook(cfg: IndexConfig) -> None:
    """With ``local_store`` entries or both, extraction assigns words with the codebook the ``codebook``
    stage copies: ``codebook.source`` and ``entries.codebook`` name one root (either may be given)."""
    if cfg.local_store == "descriptors":
        return
    source = cfg.codebook.source or cfg.entries.codebook
    if cfg.codebook.source and cfg.entries.codebook and cfg.codebook.source != cfg.entries.codebook:
        raise ConfigError(
            f"codebook.source={cfg.codebook.source} and entries.codebook={cfg.entries.codebook} differ: "
            "the entries must be of the index's codebook"
        )
    if not source:
        raise ConfigError(
            f"local_store={cfg.local_store} needs codebook.source=ROOT: a codebook trained before "
            'extraction (on a sample or another collection; README "Storage at R1M")'
        )
    cfg.codebook.source = cfg.entries.codebook = source


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    cfg = parse(
        IndexConfig,
        argv,
        EXTRACT_FLAGS
        | {"--global-whiten-dim": ("global_whiten_dim", "PCA-whiten global descriptors to this dimension")},
        __doc__,
        prog,
    )
    entries_codebook(cfg)
    summary = JobSummary("index")
    res = connect(cfg.ray)
    root = ArtifactRoot(cfg.out, cfg.storage)
    if "extract" in cfg.stages:
        extract(cfg, summary, job="index")
    if "global" in cfg.stages:
        with summary.stage("global"):
            build_global(cfg, root, summary)
        with summary.stage("global index"):
            ann = build_global_ann(cfg.global_index, root, summary)
        settings = {k: v for k, v in to_dict(cfg).items() if k.startswith(("global_whiten", "global_index"))}
        root.record_stage("global", "index", settings, global_index=ann)
    stages = [st for st in LOCAL_STAGES if st in cfg.stages and cfg.describe.local != "none"]
    if "codebook" in stages:
        with summary.stage("codebook"):
            build_codebook(cfg.codebook, root, summary, gpus=1 if res.get("GPU") else 0)
        root.record_stage("codebook", "index", to_dict(cfg.codebook))
    if "asmk" in stages:
        with summary.stage("asmk"):
            built = build_asmk(cfg.asmk, root, summary)
        root.record_stage("asmk", "index", to_dict(cfg.asmk), inputs=built["inputs"])
    graph_stages = [st for st in ("graph", "spectral") if st in cfg.stages]
    if graph_stages and not (cfg.graph.source == "asmk" and cfg.describe.local == "none"):
        run_graph_stages(
            GraphJobConfig(
                index=cfg.out,
                stages=graph_stages,
                graph=cfg.graph,
                spectral=cfg.spectral,
                ray=cfg.ray,
                storage=cfg.storage,
            ),
            root,
            summary,
            job="index",
        )
    summary.info["index"] = cfg.out
    return summary.finish(root.uri, cfg.storage)


if __name__ == "__main__":
    run_cli(main)
