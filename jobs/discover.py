"""Discovery job: i-ASMK* components and graph centrality over a built index.

``python -m jobs.discover --index ROOT`` runs, in order:

- ``iasmk``: the i-ASMK* compressed inverted file (:mod:`operators.iasmk`). Ray tasks over ranges of
  visual words (ranges of about equal matching work, Σ postings²) count locally consistent matches
  per image pair (pass 1, committed per range); the driver sums them and keeps the pairs with at
  least τ_g matches; tasks then recompute each range's matches, keep those of consistent pairs, find
  the components and write the range's compressed postings (pass 2, committed per range); the
  driver appends the ranges into ``ROOT/iasmk`` (:mod:`storage.iasmk`). ``jobs.search --method
  iasmk`` (or ``fused-iasmk``) searches it. Killed runs resume: committed ranges made with the same
  parameters are skipped.
- ``centrality``: stationary distribution, PageRank, Katz centrality and the modes of the index's
  kNN graph (:mod:`operators.centrality`, :mod:`storage.centrality`).
- ``objects`` (not a default: it runs the CNN over the database twice): object discovery by graph
  centrality (:mod:`jobs.objects`): FS.egm regions, the region graph and its Katz centrality, object
  saliency maps and a saliency-based global descriptor that ``jobs.search --method os`` ranks.

Query images must take no part (seed 002 L7463-7476): index the database without them.
Writes ``ROOT/summary-discover.json`` (counts ``asmk_entries``, ``iasmk_entries``, …).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import ray

from cluster.ray_env import RayConfig, connect
from cluster.runner import run_tasks
from jobs.config import from_dict, parse, run_cli, to_dict
from jobs.objects import ObjectsConfig, build_objects
from jobs.summary import JobSummary
from operators.centrality import katz, modes, pagerank, stationary
from operators.constraints import Count, NonNegInt, OpenUnit, Tolerance
from operators.iasmk import IasmkParams, compress_words, image_pair_counts, max_hamming, sum_counts
from storage.artifacts import ArtifactRoot
from storage.centrality import write_centrality
from storage.errors import ArtifactError
from storage.global_index import global_ids
from storage.graph import graph_problem, load_affinity
from storage.iasmk import (
    compressed_parts,
    load_pair_counts,
    merge_compressed,
    pair_count_parts,
    write_compressed_part,
    write_iasmk_meta,
    write_pair_counts,
)
from storage.inverted_file import open_inverted_file

Stage = Literal["iasmk", "centrality", "objects"]


@dataclass
class IasmkConfig:
    params: IasmkParams = field(default_factory=IasmkParams)
    tasks: NonNegInt = 0  # word ranges (0: 4 per CPU of the cluster)
    block_words: Count = 256  # words whose matches a task holds at once


@dataclass
class CentralityConfig:
    pagerank_beta: OpenUnit = 0.85  # PageRank: follow an edge with probability β, else teleport [ext: the usual 0.85]
    katz_alpha: OpenUnit = 0.99  # Katz: L_α g = 1 (α of the diffusion papers)
    katz_tol: Tolerance = 1e-6  # CG relative residual
    katz_maxiter: Count = 500


@dataclass(kw_only=True)
class DiscoverConfig:
    index: str  # artifact root with an ASMK* inverted file (required)
    stages: list[Stage] = field(default_factory=lambda: ["iasmk", "centrality"])
    iasmk: IasmkConfig = field(default_factory=IasmkConfig)
    centrality: CentralityConfig = field(default_factory=CentralityConfig)
    objects: ObjectsConfig = field(default_factory=ObjectsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


def word_ranges(counts: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Consecutive word ranges of about equal matching work Σ n_c² (a word is never split)."""
    work = np.cumsum(np.asarray(counts, np.float64) ** 2)
    if work[-1] == 0:
        return [(0, len(counts))]
    cuts = np.searchsorted(work, work[-1] * np.arange(1, parts) / parts, side="right")
    edges = np.unique(np.r_[0, cuts, len(counts)])
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def count_task(uri: str, options: dict, part: int, lo: int, hi: int, max_h: int, block: int, record: dict) -> dict:
    """Pass 1 for words [lo, hi): match counts per image pair, committed as part ``part``."""
    root = ArtifactRoot(uri, options)
    ivf, _ = open_inverted_file(root)
    keys, counts = image_pair_counts(ivf, lo, hi, max_h, block)
    return write_pair_counts(root, part, keys, counts, {**record, "matches": int(counts.sum()), "pairs": len(keys)})


def compress_task(
    uri: str, options: dict, part: int, lo: int, hi: int, max_h: int, block: int, consistent: np.ndarray, record: dict
) -> dict:
    """Pass 2 for words [lo, hi): components over consistent matches, committed as part ``part``."""
    root = ArtifactRoot(uri, options)
    ivf, _ = open_inverted_file(root)
    cw = compress_words(ivf, lo, hi, max_h, consistent, block)
    return write_compressed_part(
        root,
        part,
        cw,
        {
            **record,
            "entries": len(cw.words),
            "members": len(cw.members),
            "components": len(cw.component_sizes),
            "vectors_in_components": int(cw.component_sizes.sum()),
            "postings": int(ivf.offsets[hi] - ivf.offsets[lo]),
        },
    )


def pending(records: dict[int, dict], n: int, record: dict) -> list[int]:
    """Ranges without a committed part made under ``record``'s settings."""
    return [i for i in range(n) if any(records.get(i, {}).get(k) != v for k, v in record.items())]


def count_pass(root: ArtifactRoot, ranges: list, max_h: int, c: IasmkConfig, record: dict) -> tuple:
    """Pass 1 over every range (committed ones skipped); returns the summed (image-pair keys, counts)."""
    todo = pending(pair_count_parts(root).committed(), len(ranges), record)
    run_tasks(
        count_task,
        [(root.uri, root.options, i, *ranges[i], max_h, c.block_words, record) for i in todo],
        options={"num_cpus": 1},
        desc="pair counts",
        unit="range",
    )
    keys, counts = sum_counts(*zip(*[load_pair_counts(root, i) for i in range(len(ranges))]))
    return keys, counts


def compress_pass(
    root: ArtifactRoot, ranges: list, max_h: int, c: IasmkConfig, record: dict, consistent: np.ndarray
) -> int:
    """Pass 2 over every range (committed ones skipped); returns the ranges built."""
    todo = pending(compressed_parts(root).committed(), len(ranges), record)
    ref = ray.put(consistent)
    run_tasks(
        compress_task,
        [(root.uri, root.options, i, *ranges[i], max_h, c.block_words, ref, record) for i in todo],
        options={"num_cpus": 1},
        desc="components",
        unit="range",
    )
    return len(todo)


def build_iasmk(cfg: DiscoverConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    ivf, meta = open_inverted_file(root)
    if not ivf.binary:
        raise ArtifactError(
            f"{root.uri}: i-ASMK* aggregates binary ASMK* vectors; the index was built with asmk.params.binary=false"
        )
    c = cfg.iasmk
    max_h = max_hamming(c.params.tau_l, ivf.dim)
    ranges = word_ranges(ivf.counts, c.tasks or 4 * int(ray.cluster_resources().get("CPU", 1)))
    record = {
        "tau_l": c.params.tau_l,
        "codebook_sha1": meta.get("codebook_sha1"),  # what pass 1 depends on
        "asmk_entries": int(ivf.offsets[-1]),
        "ranges": [list(r) for r in ranges],
    }
    with summary.stage("i-ASMK* pass 1: matches per image pair"):
        keys, counts = count_pass(root, ranges, max_h, c, record)
    consistent = np.sort(keys[counts >= c.params.tau_g])
    with summary.stage("i-ASMK* pass 2: components"):
        built = compress_pass(
            root, ranges, max_h, c, {**record, "tau_g": c.params.tau_g, "consistent_pairs": len(consistent)}, consistent
        )
        merged = merge_compressed(
            root,
            list(range(len(ranges))),
            ivf.k,
            np.asarray(ivf.images),
            np.asarray(ivf.image_entries),
            ivf.codes.shape[1],
        )
        sizes = merged.pop("component_sizes")
    stats = iasmk_stats(ivf, counts, consistent, sizes, merged, c.params.tau_g)
    write_iasmk_meta(
        root,
        {
            "params": {**meta["params"], **dataclasses.asdict(c.params)},
            "k": ivf.k,
            "codebook_sha1": meta.get("codebook_sha1"),
            "ranges": len(ranges),
            **stats,
        },
    )
    summary.add(
        asmk_entries=int(ivf.offsets[-1]),
        iasmk_entries=merged["entries"],
        iasmk_components=len(sizes),
        iasmk_vectors_in_components=int(sizes.sum()),
        iasmk_matches=stats["matches"],
        iasmk_consistent_matches=stats["consistent_matches"],
        iasmk_ranges_built=built,
    )
    summary.info["iasmk"] = stats
    return stats


def iasmk_stats(ivf, counts: np.ndarray, consistent: np.ndarray, sizes: np.ndarray, merged: dict, tau_g: int) -> dict:
    """What the paper reports on Oxford105k (L7697-7713): matches before/after the global check,
    components, their mean size, the fraction of vectors in one, and how many images they span."""
    n = int(ivf.offsets[-1])
    kept = counts >= tau_g
    hist = np.bincount(np.minimum(sizes, 6), minlength=7)[2:] if len(sizes) else np.zeros(5, np.int64)
    return {
        "matches": int(counts.sum()),
        "consistent_matches": int(counts[kept].sum()),
        "consistent_pairs": len(consistent),
        "asmk_entries": n,
        "iasmk_entries": merged["entries"],
        "entries_ratio": merged["entries"] / max(n, 1),
        "components": len(sizes),
        "mean_component_size": float(sizes.mean()) if len(sizes) else 0.0,
        "fraction_vectors_in_components": float(sizes.sum() / max(n, 1)),
        "component_sizes_2_3_4_5_6plus": hist.tolist(),
    }


def centrality_task(uri: str, options: dict, cfg: dict) -> dict:
    """π, PageRank, Katz and the modes of the index's graph, written to ``ROOT/centrality`` (a Ray task)."""
    c = from_dict(CentralityConfig, cfg)
    root = ArtifactRoot(uri, options)
    w = load_affinity(root)
    scores = {
        "stationary": stationary(w),
        "pagerank": pagerank(w, c.pagerank_beta),
        "katz": katz(w, c.katz_alpha, c.katz_tol, c.katz_maxiter),
    }
    ids = np.asarray(global_ids(root))
    found = ids[modes(w, scores["stationary"])]
    meta = {
        "params": cfg,
        "nodes": w.shape[0],
        "edges": int(w.nnz // 2),
        "modes": len(found),
        "isolated": int((np.diff(w.indptr) == 0).sum()),
    }
    write_centrality(root, scores, found, meta)
    return meta


def build_centrality(cfg: DiscoverConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    (meta,) = run_tasks(
        centrality_task, [(root.uri, root.options, dataclasses.asdict(cfg.centrality))], options={"num_cpus": 1}
    ).results
    summary.add(centrality_nodes=meta["nodes"], modes=meta["modes"])
    return meta


FLAGS = {
    "--index": ("index", "artifact root with an ASMK* inverted file (jobs.index)"),
    "--tau-l": ("iasmk.params.tau_l", "local consistency: similarity threshold (0.375: Hamming 40 of 128)"),
    "--tau-g": ("iasmk.params.tau_g", "global consistency: matches an image pair must share"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    cfg = parse(DiscoverConfig, argv, FLAGS, __doc__, prog)
    summary = JobSummary("discover")
    connect(cfg.ray)
    root = ArtifactRoot(cfg.index, cfg.storage)
    root.meta()
    if "iasmk" in cfg.stages:
        build_iasmk(cfg, root, summary)
        root.record_stage("iasmk", "discover", to_dict(cfg.iasmk))
    if "centrality" in cfg.stages:
        problem = graph_problem(root)
        if problem and len(cfg.stages) == 1:
            raise ArtifactError(f"centrality: {problem}")
        if problem:  # with the defaults, an index without a graph still gets i-ASMK*
            warnings.warn(f"centrality skipped: {problem}")
            summary.info["centrality"] = f"skipped: {problem}"
        else:
            with summary.stage("centrality"):
                build_centrality(cfg, root, summary)
            root.record_stage("centrality", "discover", to_dict(cfg.centrality))
    if "objects" in cfg.stages:
        summary.info["objects"] = build_objects(cfg.objects, root, summary)
        root.record_stage("objects", "discover", to_dict(cfg.objects))
    return summary.finish(root.uri, cfg.storage)


if __name__ == "__main__":
    run_cli(main)
