"""Index job: runs every enabled stage over a collection into one artifact root.

``python -m jobs.index --collection C --out ROOT`` runs, in order:

- ``extract``: multi-scale GeM global + local features into Parquet shards (:mod:`jobs.extract`);
- ``global``: the global descriptors gathered into one float32 matrix (optionally PCA-whitened to
  ``global_whiten_dim``), memory-mapped by ``jobs.search``;
- ``codebook``: k-means visual codebook on a sample of local descriptors (:mod:`jobs.codebook`);
- ``asmk``: the ASMK / ASMK* inverted file, built in parallel and merged (:mod:`jobs.asmk`);
- ``graph``: the kNN graph of the database (global or ASMK similarities) and its affinity W;
- ``spectral``: the top-r eigenpairs of the normalised graph, for FSR / hybrid (:mod:`jobs.graph`).

Extraction resumes (committed shards are skipped); the cheap ``global`` stage is redone each run.
``--set stages=[global,graph]`` picks stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cluster.ray_env import connect
from jobs.asmk import AsmkConfig, build_asmk
from jobs.codebook import CodebookConfig, build_codebook
from jobs.config import parse, run_cli, to_dict
from jobs.extract import FLAGS as EXTRACT_FLAGS, ExtractConfig, extract
from jobs.graph import GraphConfig, GraphJobConfig, SpectralConfig, run_stages as run_graph_stages
from jobs.summary import JobSummary
from operators.whitening import learn_pca_whitening
from storage import fs as sfs
from storage.artifacts import ArtifactRoot
from storage.schemas import global_matrix

STAGES = ("extract", "global", "codebook", "asmk", "graph", "spectral")
LOCAL_STAGES = ("codebook", "asmk")


@dataclass
class IndexConfig(ExtractConfig):
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    global_whiten_dim: int | None = None              # PCA-whiten global descriptors (None: keep raw)
    global_whiten_images: int = 5000                  # images sampled (from random shards) to learn it
    global_whiten_source: str | None = None           # learn it on another root's shards (independent data)
    global_whiten_shrinkage: float = 1.0              # eigenvalue power s/2 (1: plain PCAw; 0.5: HOW's shrinkage)
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
        raise RuntimeError(f"{root.uri}: no successfully extracted images to index")
    dim = int(shards.read_shard(min(records), ["global"]).schema.field("global").type.list_size)
    whitening = None
    if cfg.global_whiten_dim:
        source = ArtifactRoot(cfg.global_whiten_source, cfg.storage) if cfg.global_whiten_source else root
        sample = sample_globals(source.shards(), cfg.global_whiten_images)
        whitening = learn_pca_whitening(sample, cfg.global_whiten_dim, cfg.global_whiten_shrinkage)
        root.write_whitening("global", whitening)
        summary.add(global_whitening_sample=len(sample))
        dim = whitening.dim
    else:  # queries are whitened when this file exists: none may outlive a raw rebuild
        sfs.remove(root.path("whitening", "global.npz"), root.options)
    vectors, commit_v = root.open_array_writer("global/vectors.npy", (n, dim), np.float32)
    ids = np.empty(n, np.int64)
    at = 0
    for table in shards.iter_tables(["image_id", "status", "global"]):
        table = _ok(table)
        x = global_matrix(table)
        vectors[at:at + len(x)] = whitening(x) if whitening else x
        ids[at:at + len(x)] = table.column("image_id").to_numpy()
        at += len(x)
    commit_v()
    root.write_array("global/ids.npy", ids)
    sfs.write_json(root.path("global", "meta.json"), {"count": n, "dim": dim, "whitened": bool(whitening)}, root.options)
    summary.add(global_vectors=n)


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


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(IndexConfig, argv, EXTRACT_FLAGS | {
        "--global-whiten-dim": ("global_whiten_dim", int, "PCA-whiten global descriptors to this dimension")},
        __doc__)
    unknown = set(cfg.stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; known: {STAGES}")
    summary = JobSummary("index")
    res = connect(cfg.ray)
    root = ArtifactRoot(cfg.out, cfg.storage)
    if "extract" in cfg.stages:
        extract(cfg, summary)
    if "global" in cfg.stages:
        with summary.stage("global"):
            build_global(cfg, root, summary)
        root.record_stage("global", to_dict(cfg))
    stages = [st for st in LOCAL_STAGES if st in cfg.stages and cfg.describe.local != "none"]
    if "codebook" in stages:
        with summary.stage("codebook"):
            build_codebook(cfg.codebook, root, summary, gpus=1 if res.get("GPU") else 0)
        root.record_stage("codebook", to_dict(cfg))
    if "asmk" in stages:
        with summary.stage("asmk"):
            build_asmk(cfg.asmk, root, summary)
        root.record_stage("asmk", to_dict(cfg))
    graph_stages = [st for st in ("graph", "spectral") if st in cfg.stages]
    if graph_stages and not (cfg.graph.source == "asmk" and cfg.describe.local == "none"):
        run_graph_stages(GraphJobConfig(cfg.out, graph_stages, cfg.graph, cfg.spectral, cfg.ray, cfg.storage),
                         root, summary)
    summary.info["index"] = cfg.out
    return summary.finish(root.path("summary-index.json"), cfg.storage)


if __name__ == "__main__":
    run_cli(main)
