"""Mining job: unsupervised training pairs over a built index (:mod:`operators.mining`).

``python -m jobs.mine --index ROOT --out PAIRS``

- ``manifold`` pairs (mining on manifolds, spec search §10): anchors are the strongest modes of the
  stationary distribution π of the index's kNN graph (``jobs.graph``; the paper's graph is the
  reciprocal k = 30 one, ``--set graph.k=30`` at index time) on its largest component; Ray tasks over
  blocks of anchors diffuse from them (one multi-right-hand-side CG solve per block, α = 0.99), find
  their Euclidean neighbours in the global descriptors, and commit each block's positives and
  negatives as one Parquet part.
- ``iasmk`` pairs (when ``jobs.discover`` has run): images sharing an i-ASMK* component are
  positives (score: components shared); an anchor's kNN-graph neighbours that share none are its
  hard negatives.

Writes ``PAIRS/parts`` (:mod:`storage.pairs`), ``PAIRS/pairs.html`` (sample anchors with their
positives and negatives as thumbnails) and ``PAIRS/summary-mine.json``. A rerun skips committed parts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from cluster.ray_env import RayConfig, connect
from cluster.runner import run_tasks
from jobs.config import from_dict, parse, run_cli, to_dict
from jobs.summary import JobSummary
from operators.constraints import Count
from operators.diffusion import temporal, top_k
from operators.global_index import iter_blocks
from operators.knn import knn_blocks
from operators.mining import (
    MiningParams,
    component_positives,
    effective_sizes,
    graph_negatives,
    mode_anchors,
    pools,
    shared_components,
)
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError
from storage.global_index import global_ids, open_global
from storage.graph import graph_problem, load_affinity, load_graph, load_knn
from storage.pairs import pair_parts, pair_table, read_pairs, write_pairs, write_pairs_page


@dataclass(kw_only=True)
class MineConfig:
    index: str  # artifact root with a kNN graph (required)
    out: str  # pairs folder or s3:// prefix (required)
    params: MiningParams = field(default_factory=MiningParams)
    anchor_components: Literal["largest", "all"] = "largest"  # anchors on the largest component (the paper) or on
    # every component of at least ``min_component`` nodes (small, fragmented collections)
    min_component: Count = 3
    anchors_per_task: Count = 64  # columns of one multi-right-hand-side solve
    iasmk: bool = True  # also pairs from i-ASMK* components, when jobs.discover has run
    iasmk_min_shared: Count = 10  # i-ASMK* positives share at least this many components (τ_g of the
    # paper's global-consistency check, applied to components)
    page_anchors: Count = 12  # anchors shown in pairs.html
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


def manifold_task(
    uri: str,
    options: dict,
    out: str,
    part: int,
    anchors: np.ndarray,
    sizes: tuple[int, int],
    params: dict,
    record: dict,
) -> dict:
    """Positives and negatives of one block of anchors (node rows), committed as part ``part``."""
    p = from_dict(MiningParams, params)
    k_pos, k_neg = sizes
    root = ArtifactRoot(uri, options)
    graph = load_graph(root, spectral=False)
    y = np.zeros((graph.n, len(anchors)), np.float32)
    y[graph.position[anchors], np.arange(len(anchors))] = 1.0
    f = temporal(graph.s, y, p.alpha, p.tol, p.maxiter)[graph.position]  # node order
    m_scores, m_rows = top_k(f, k_neg, exclude=anchors)
    g = open_global(root)
    rows = np.arange(len(g.ids), dtype=np.int64)
    e_scores, e_rows = knn_blocks(np.asarray(g.vectors[anchors]), iter_blocks(rows, g.vectors, 65536), k_neg, anchors)
    positives, negatives = pools(m_rows, m_scores, e_rows, e_scores, k_pos, k_neg, p.cap)
    ids = np.asarray(g.ids)
    files = root.image_files()
    tables = []
    for label, pool in ((1, positives), (0, negatives)):
        a = np.concatenate([np.full(len(r), ids[x]) for x, (r, _) in zip(anchors, pool)] or [np.zeros(0, np.int64)])
        o = np.concatenate([ids[r] for r, _ in pool] or [np.zeros(0, np.int64)])
        s = np.concatenate([sc for _, sc in pool] or [np.zeros(0)])
        tables.append(pair_table(a, o, label, s, "manifold", files))
    table = pa.concat_tables(tables)
    return write_pairs(out, part, table, {**record, "positives": len(tables[0]), "negatives": len(tables[1])}, options)


def select_anchors(
    root: ArtifactRoot, n_anchors: int, where: str = "largest", min_component: int = 3
) -> tuple[np.ndarray, dict]:
    """The ``n_anchors`` modes of π with the largest π (node rows), on the graph's largest component
    (``where="largest"``) or on any component of at least ``min_component`` nodes (``"all"``):
    :func:`operators.mining.mode_anchors` of the index's affinity graph."""
    return mode_anchors(load_affinity(root), n_anchors, where, min_component)


def iasmk_pairs(root: ArtifactRoot, cap: int, min_shared: int = 1) -> pa.Table | None:
    """Positives: image pairs sharing ≥ ``min_shared`` i-ASMK* components (score: how many); negatives: each such
    anchor's kNN-graph neighbours sharing none (score: global similarity). None without i-ASMK*."""
    from storage.iasmk import has_iasmk, open_compressed

    if not has_iasmk(root):
        return None
    civf, _ = open_compressed(root)
    key, shared = shared_components(
        np.asarray(civf.entry_indptr), np.asarray(civf.entry_image, np.int64), len(civf.images)
    )
    n_img = len(civf.images)
    key, shared = key[shared >= min_shared], shared[shared >= min_shared]
    if not len(key):
        return None
    a, b, shared = component_positives(key, shared, n_img, cap)
    img = np.asarray(civf.images)
    files = root.image_files()
    pos = pair_table(img[a], img[b], 1, shared, "iasmk", files)
    neg = iasmk_negatives(root, img[np.unique(a)], set(zip(img[a].tolist(), img[b].tolist())), cap, files)
    return pa.concat_tables([pos, neg])


def iasmk_negatives(root: ArtifactRoot, anchors: np.ndarray, positive: set, cap: int, files: pd.Series) -> pa.Table:
    """Each anchor's kNN-graph neighbours (global similarity, best first) that share no component with it
    (:func:`operators.mining.graph_negatives`)."""
    ids = np.asarray(global_ids(root))
    knn_ids, knn_sims = load_knn(root)
    a, o, s = graph_negatives(anchors, ids, knn_ids, knn_sims, positive, cap)
    return pair_table(a, o, 0, s, "iasmk", files)


def run(cfg: MineConfig, summary: JobSummary) -> None:
    root = ArtifactRoot(cfg.index, cfg.storage)
    problem = graph_problem(root)
    if problem:
        raise ArtifactError(f"mining: {problem}")
    n = len(global_ids(root))
    n_anchors, k_pos, k_neg = effective_sizes(cfg.params, n)
    with summary.stage("anchors"):
        anchors, graph_info = select_anchors(root, n_anchors, cfg.anchor_components, cfg.min_component)
    summary.info.update(graph=graph_info, effective={"anchors": n_anchors, "k_pos": k_pos, "k_neg": k_neg})
    summary.add(anchors=len(anchors))
    blocks = [anchors[s : s + cfg.anchors_per_task] for s in range(0, len(anchors), cfg.anchors_per_task)]
    done = pair_parts(cfg.out, cfg.storage).committed()
    params = dataclasses.asdict(cfg.params)
    args = []
    for part, block in enumerate(blocks):
        record = {"source": "manifold", "anchors": block.tolist(), "params": params, "sizes": [k_pos, k_neg]}
        if all(done.get(part, {}).get(k) == v for k, v in record.items()):
            summary.add(parts_skipped=1)
            continue
        args.append((root.uri, root.options, cfg.out, part, block, (k_pos, k_neg), params, record))
    with summary.stage("manifold pairs"):
        run_tasks(manifold_task, args, options={"num_cpus": 1}, desc="anchor blocks", unit="block")
    if cfg.iasmk:
        with summary.stage("i-ASMK* pairs"):
            table = iasmk_pairs(root, cfg.params.cap, cfg.iasmk_min_shared)
            if table is not None:
                write_pairs(cfg.out, len(blocks), table, {"source": "iasmk"}, cfg.storage)


def count_pairs(table: pa.Table, summary: JobSummary) -> None:
    df = table.select(["label", "source"]).to_pandas()
    for (source, label), n in df.groupby(["source", "label"]).size().items():
        summary.counts[f"{source}_{'positives' if label == 1 else 'negatives'}"] = int(n)
    summary.counts["pairs"] = len(df)


FLAGS = {
    "--index": ("index", "artifact root with a kNN graph (jobs.index / jobs.graph)"),
    "--out": ("out", "pairs folder or s3:// prefix"),
    "--anchors": ("params.anchors", "N_a: anchors (modes of π), scaled down for small collections"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    cfg = parse(MineConfig, argv, FLAGS, __doc__, prog)
    summary = JobSummary("mine")
    connect(cfg.ray)
    run(cfg, summary)
    table = read_pairs(cfg.out, cfg.storage)
    count_pairs(table, summary)
    with summary.stage("page"):
        from jobs.report_pages import pairs_page

        summary.info["page"] = write_pairs_page(cfg.out, pairs_page(table, cfg.page_anchors, cfg.storage), cfg.storage)
    summary.info["config"] = to_dict(cfg)
    return summary.finish(cfg.out, cfg.storage)


if __name__ == "__main__":
    run_cli(main)
