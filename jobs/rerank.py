"""Offline (database-side) diffusion re-ranking: ``python -m jobs.rerank --index ROOT --out RES``.

For every database item i its diffusion top-L list (spec search.md §8): by default the manifold
similarity column K e_i, K = (1 − α)(I − αS)⁻¹, i.e. diffusion seeded by the item alone
(T:25172-25186); ``--set seed=knn`` seeds it with its k_q graph neighbours as an unseen query
would be. Methods ``dfs`` (CG), ``fsr``, ``hybrid`` (truncation needs a query-time shortlist; it
is a ``jobs.search --rerank`` method only).

Ray tasks over blocks of items each load the graph (memory-mapped artifacts), solve one
multi-right-hand-side system per sub-block and commit a Parquet part (``RES/parts``) in the
results schema of ``jobs.search`` (``query_id`` = the item), so a killed run resumes and
``jobs.evaluate`` reads it unchanged. The item itself is left out of its list. This is also the
input of training-pair mining.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cluster.ray_env import RayConfig, connect
from cluster.runner import run_tasks
from jobs.config import from_dict, parse, run_cli, to_dict
from jobs.summary import JobSummary
from operators.constraints import Count
from operators.rerank import RerankParams, rerank
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError
from storage.global_index import global_ids
from storage.graph import graph_problem, load_graph, load_knn
from storage.results import result_parts, write_run
from storage.schemas import RESULTS_SCHEMA


@dataclass(kw_only=True)
class RerankJobConfig:
    index: str  # artifact root with a kNN graph (required)
    out: str  # results folder (required)
    method: Literal["dfs", "fsr", "hybrid"] = "dfs"
    top: Count = 100  # L: list length per item
    seed: Literal["self", "knn"] = "self"  # self: y = e_i (K e_i, spec §8) | knn: y from the item's k_q neighbours
    items_per_task: Count = 1024
    params: RerankParams = field(default_factory=lambda: RerankParams(block=32))
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


def rerank_items_task(uri: str, options: dict, out: str, part: int, start: int, stop: int, cfg: dict) -> dict:
    """Diffusion lists of items ``start:stop``, committed as part ``part`` of ``out``."""
    import pyarrow as pa

    c = from_dict(RerankJobConfig, {**cfg, "ray": {}})
    root = ArtifactRoot(uri, options)
    graph = load_graph(root, spectral=c.method in ("fsr", "hybrid"), sparse_keep=c.params.sparse_keep)
    node_ids = np.asarray(global_ids(root))
    items = np.arange(start, stop)
    knn_ids, knn_sims = load_knn(root)
    knn_i = np.asarray(knn_ids[start:stop])
    knn_s = np.asarray(knn_sims[start:stop], np.float64)
    rows = np.concatenate([items[:, None], knn_i], axis=1)  # the item first: its own seed, weight 1
    sims = np.concatenate([np.ones((len(items), 1)), knn_s], axis=1)
    kq = 1 if c.seed == "self" else c.params.kq + 1
    p = dataclasses.replace(c.params, kq=kq, gamma=1.0 if c.seed == "self" else c.params.gamma)
    r, s = rerank(c.method, graph, rows, sims, items, c.top, p)
    names = root.images().set_index("image_id")["name"]
    ids = [node_ids[x[x >= 0]].tolist() for x in r]
    scores = [v[np.isfinite(v)][: len(i)].astype(np.float32).tolist() for v, i in zip(s, ids)]
    table = pa.table(
        {
            "query_id": pa.array(node_ids[items], pa.int64()),
            "query_name": pa.array(names.loc[node_ids[items]].astype(str).to_numpy(), pa.string()),
            "ids": pa.array(ids, pa.list_(pa.int64())),
            "scores": pa.array(scores, pa.list_(pa.float32())),
        },
        schema=RESULTS_SCHEMA,
    )
    return result_parts(out, options).write(part, table, {"items": [int(start), int(stop)], "method": c.method})


def run(cfg: RerankJobConfig, summary: JobSummary) -> None:
    root = ArtifactRoot(cfg.index, cfg.storage)
    problem = graph_problem(root, spectral=cfg.method in ("fsr", "hybrid"))
    if problem:
        raise ArtifactError(problem)
    n = len(global_ids(root))
    parts = result_parts(cfg.out, cfg.storage)
    blocks = list(enumerate(range(0, n, cfg.items_per_task)))
    done = parts.committed()
    pending = [(i, s) for i, s in blocks if done.get(i, {}).get("method") != cfg.method]
    summary.add(items=n, parts_total=len(blocks), parts_skipped=len(blocks) - len(pending))
    conf = to_dict(cfg)
    run_tasks(
        rerank_items_task,
        [(root.uri, root.options, cfg.out, i, s, min(n, s + cfg.items_per_task), conf) for i, s in pending],
        options={"num_cpus": 1},
        desc=f"offline {cfg.method}",
        unit="part",
        on_result=lambda rec: summary.add(rows_written=rec["rows"]),
        keep=False,
    )
    write_run(
        cfg.out,
        {
            "config": to_dict(cfg),
            "method": cfg.method,
            "rerank": "offline",
            "index": cfg.index,
            "params": {"top": cfg.top, "seed": cfg.seed, "rerank": dataclasses.asdict(cfg.params)},
            "queries": n,
            "timings_s": dict(summary.timings),
        },
        cfg.storage,
    )


FLAGS = {
    "--index": ("index", "artifact root with a kNN graph (jobs.graph)"),
    "--out": ("out", "results folder or s3:// prefix"),
    "--method": ("method", "diffusion"),
    "--top": ("top", "list length per database item"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    cfg = parse(RerankJobConfig, argv, FLAGS, __doc__, prog)
    summary = JobSummary("rerank")
    connect(cfg.ray)
    with summary.stage(f"offline {cfg.method}"):
        run(cfg, summary)
    summary.info["results"] = result_parts(cfg.out, cfg.storage).uri
    return summary.finish(cfg.out, cfg.storage)


if __name__ == "__main__":
    # run the module's own import, not __main__: Ray then ships its task by reference, and the task's config
    # class keeps the module's globals (pickled by value from __main__, its string annotations lost Literal)
    from jobs import rerank as this

    run_cli(this.main)
