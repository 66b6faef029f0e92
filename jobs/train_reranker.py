"""Train a learned re-ranker on an index's graph: ``python -m jobs.train_reranker --index ROOT [--method gss]``.

``gss`` (:mod:`operators.gss`, spec search.md §12): one Ray task — on a GPU when the cluster has one, else
over every CPU of a node — builds the GSS graph from the kNN lists of the ``graph`` stage (their first
k − 1 neighbours, symmetrised, weights the global cosine), estimates β from sampled pairs, takes ``steps``
Adam steps on sampled batches (each on its exact receptive field) with a checkpoint every
``checkpoint_every`` steps, then computes the database's layer states and embeddings row block by row
block into memory-mapped artifacts (:mod:`storage.gss`). Rerun after a kill: training resumes from the
last checkpoint (same batches, same Adam state: the same weights as an uninterrupted run); a finished
model with the same settings is kept. ``python -m jobs.search --rerank gss`` loads it.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cluster.ray_env import RayConfig, connect, largest_node_cpus
from jobs.config import parse, run_cli, to_dict
from jobs.summary import JobSummary, peak_rss_mb
from operators import gss as GSS
from storage import gss as store
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError
from storage.global_index import open_global
from storage.graph import graph_problem, load_knn


@dataclass(kw_only=True)
class TrainRerankerConfig:
    index: str                                  # artifact root with a graph stage (required)
    method: Literal["gss"] = "gss"
    gss: GSS.GssParams = field(default_factory=GSS.GssParams)
    checkpoint_every: int = 50                  # steps between checkpoints (a killed job resumes from the last)
    block: int = 16384                          # database rows per inference block
    cpus: int | None = None                     # CPU threads of the training task (None: a whole node)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


def checkpoint_settings(p: GSS.GssParams) -> dict:
    """What a checkpoint must share with this run to be resumed: every parameter but the step count."""
    return {k: v for k, v in dataclasses.asdict(p).items() if k != "steps"}


def train_gss_task(uri: str, options: dict, params: dict, every: int, block: int, threads: int) -> dict:
    """Train GSS on the root's graph and write its model, states and embeddings (a Ray task)."""
    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # pragma: no cover - GPU machines only (cuda)
    root, p = ArtifactRoot(uri, options), GSS.GssParams(**params)
    x = open_global(root).vectors
    nn, _ = load_knn(root)
    if nn.shape[1] < p.k - 1:
        raise ArtifactError(f"GSS k={p.k} needs kNN lists of at least {p.k - 1} neighbours; the graph has "
                            f"{nn.shape[1]}: rebuild it with a larger graph.k")
    t0 = time.time()
    a = GSS.gss_adjacency(nn, x, p.k)
    a_hat = GSS.normalize_with_self(a)
    settings, t_graph = checkpoint_settings(p), time.time() - t0
    resumed = store.load_checkpoint(root, settings)
    if resumed is not None:
        step, beta, arrays = resumed
        model, optimizer = GSS.restore_training(x.shape[1], p, arrays, device)
    else:
        model, optimizer, step = GSS.ResidualGCN(x.shape[1], p, device), None, 0
        beta = GSS.automatic_beta(model, a_hat, x, p)
    first, t1 = step, time.time()
    with tqdm(total=p.steps, initial=min(step, p.steps), desc="GSS training", unit="step") as bar:
        while step < p.steps:
            stop = min(p.steps, step + every)
            optimizer = GSS.train_steps(model, a_hat, x, beta, step, stop, optimizer,
                                        log=lambda s, v: (bar.update(1), bar.set_postfix(loss=f"{v:.4f}")))
            step = stop
            store.write_checkpoint(root, step, beta, settings, GSS.training_arrays(model, optimizer))
    t_train, t2 = time.time() - t1, time.time()
    embed_database(root, model, a_hat, x, block)
    meta = {"params": dataclasses.asdict(p), "beta": beta, "nodes": int(a.shape[0]), "edges": int(a.nnz),
            "device": device, "steps_run": step - first, "resumed_at": first,
            "seconds": {"graph": round(t_graph, 2), "train": round(t_train, 2), "embed": round(time.time() - t2, 2)},
            "task_peak_rss_mb": round(peak_rss_mb(), 1)}
    store.write_model(root, model.weights(), GSS.degrees(a), meta)
    return meta


def embed_database(root: ArtifactRoot, model: GSS.ResidualGCN, a_hat, x: np.ndarray, block: int) -> None:
    """States x_1 … x_{L-1} (kept: queries attach to them), then ĥ; pre-activations are scratch arrays."""
    n, d = x.shape
    layers = model.p.layers
    state, pre_prev, scratch = x, None, []
    for layer in range(1, layers + 1):
        pre, commit_pre = store.array_writer(root, f"pre_{layer}", (n, d))
        name = f"state_{layer}" if layer < layers else "final"
        out, commit_out = store.array_writer(root, name, (n, d))
        GSS.propagate(model, a_hat, state, layer, pre_prev, pre, out, block)
        commit_pre(), commit_out()
        scratch += [f"pre_{layer}"] + ([name] if layer == layers else [])
        state, pre_prev = store.load_array(root, name), store.load_array(root, f"pre_{layer}")
    emb, commit = store.array_writer(root, "embeddings", (n, d))
    GSS.normalize_into(state, emb)
    commit()
    for name in scratch:
        store.remove_array(root, name)


def train(cfg: TrainRerankerConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    """Train ``cfg.method`` unless a model with the same settings is there."""
    import ray

    problem = graph_problem(root, spectral=False)
    if problem:
        raise ArtifactError(f"train-reranker: {problem}")
    meta = store.gss_meta(root)
    if meta is not None and meta["params"] == dataclasses.asdict(cfg.gss):
        summary.add(models_reused=1)
        return meta
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    cpus = cfg.cpus or largest_node_cpus()
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(train_gss_task)
    with summary.stage("gss"):
        meta = ray.get(task.remote(root.uri, root.options, dataclasses.asdict(cfg.gss), cfg.checkpoint_every,
                                   cfg.block, int(cpus)))
    root.record_stage("gss", "train_reranker", to_dict(cfg.gss))
    summary.worker_peak(meta["task_peak_rss_mb"])
    summary.add(models_trained=1, steps_run=meta["steps_run"])
    summary.info["gss"] = meta
    return meta


FLAGS = {
    "--index": ("index", "artifact root with a kNN graph (jobs.index or jobs.graph)"),
    "--method": ("method", "learned re-ranker to train"),
    "--steps": ("gss.steps", "GSS: Adam steps"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    cfg = parse(TrainRerankerConfig, argv, FLAGS, __doc__, prog)
    summary = JobSummary("train_reranker")
    connect(cfg.ray)
    root = ArtifactRoot(cfg.index, cfg.storage)
    train(cfg, root, summary)
    return summary.finish(root.uri, cfg.storage)


if __name__ == "__main__":
    run_cli(main)
