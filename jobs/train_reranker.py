"""Train a learned re-ranker on an index's graph: ``python -m jobs.train_reranker --index ROOT --method gss|gradnet``.

One Ray task — on a GPU when the cluster has one, else over every CPU of a node — reads the kNN lists of
the ``graph`` stage and the global descriptors, trains with a checkpoint every ``checkpoint_every`` steps,
then writes the database's embeddings (memory-mapped, :mod:`storage.learned`). Rerun after a kill: training
resumes from the last checkpoint (same batches, same optimizer state: the weights of an uninterrupted run);
a finished model with the same settings is kept; more steps continue from the checkpoint of fewer.
``python -m jobs.search --rerank gss|gradnet`` loads the model.

- ``gss`` (:mod:`operators.gss`): the GSS graph (first k − 1 neighbours, symmetrised, cosine weights), β from
  sampled pairs, Adam steps on sampled batches (each on its exact receptive field) until the graph's
  separation σ stops improving (``gss.stop=separation``, at most ``gss.steps``; the best σ's weights are kept)
  or for all ``gss.steps`` (``gss.stop=steps``), then the database's layer states (a query attaches to them)
  and embeddings, layer by layer over row blocks.
- ``gradnet`` (:mod:`operators.gradnet`): the mutual kNN graph (K = 15), B k-means anchors and each item's
  simplex-constrained sparse code, sextet batches on their 2L-hop receptive fields, then the embeddings of
  every node, layer by layer over row blocks (queries: QFE over their initial top-K at search time).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import ray

from cluster.ray_env import RayConfig, connect, largest_node_cpus
from cluster.runner import run_tasks
from jobs.config import from_dict, parse, run_cli, to_dict
from jobs.summary import JobSummary, peak_rss_mb
from operators import gradnet as GN
from operators import gss as GSS
from operators.codebook import train_codebook
from operators.constraints import Count
from storage import learned as store
from storage.artifacts import ArtifactRoot
from storage.errors import ArtifactError
from storage.global_index import open_global
from storage.graph import graph_problem, load_knn


@dataclass(kw_only=True)
class TrainRerankerConfig:
    index: str  # artifact root with a graph stage (required)
    method: Literal["gss", "gradnet"] = "gss"
    gss: GSS.GssParams = field(default_factory=GSS.GssParams)
    gradnet: GN.GradNetParams = field(default_factory=GN.GradNetParams)
    checkpoint_every: Count = 50  # steps between checkpoints (a killed job resumes from the last)
    block: Count = 16384  # database rows per inference block
    cpus: Count | None = None  # CPU threads of the training task (None: a whole node)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: dict = field(default_factory=dict)


LENGTH = ("steps", "epochs", "max_steps")  # how long to train: not part of a checkpoint's identity


def checkpoint_settings(params) -> dict:
    """What a checkpoint must share with this run to be resumed: every parameter but the training length."""
    return {k: v for k, v in dataclasses.asdict(params).items() if k not in LENGTH}


def task_setup(uri: str, options: dict, threads: int, k_needed: int, method: str):
    """(root, device, global vectors, kNN lists) of a training task, the lists checked long enough."""
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # pragma: no cover - GPU machines only (cuda)
    root = ArtifactRoot(uri, options)
    nn, _ = load_knn(root)
    if nn.shape[1] < k_needed:
        raise ArtifactError(
            f"{method} needs kNN lists of at least {k_needed} neighbours; the graph has "
            f"{nn.shape[1]}: rebuild it with a larger graph.k"
        )
    return root, device, open_global(root).vectors, nn


def train_loop(
    root: ArtifactRoot,
    method: str,
    settings: dict,
    start: int,
    total: int,
    every: int,
    train: Callable[[int, int, Callable], bool | None],
    snapshot: Callable[[], dict],
    info: Callable[[], dict] = dict,
) -> None:
    """Steps ``start`` … ``total`` − 1 in chunks of ``every``, a checkpoint (arrays ``snapshot()``, fields
    ``info()``) after each chunk, until ``train`` says it is done."""
    from tqdm import tqdm

    step = start
    with tqdm(total=total, initial=min(step, total), desc=f"{method} training", unit="step", mininterval=10) as bar:
        while step < total:
            stop = min(total, step + every)
            done = train(step, stop, lambda s, v: (bar.update(1), bar.set_postfix(loss=f"{v:.4f}")))
            step = stop
            store.write_checkpoint(root, method, step, settings, snapshot(), **info())
            if done:  # early stopping: the checkpoint says so, a resumed run trains no further
                break


def train_gss_task(uri: str, options: dict, params: dict, every: int, block: int, threads: int) -> dict:
    """Train GSS on the root's graph and write its model, states and embeddings (a Ray task)."""
    p = from_dict(GSS.GssParams, params)
    root, device, x, nn = task_setup(uri, options, threads, p.k - 1, "gss")
    t0 = time.time()
    a = GSS.gss_adjacency(nn, x, p.k)
    a_hat = GSS.normalize_with_self(a)
    settings, t_graph = checkpoint_settings(p), time.time() - t0
    resumed = store.load_checkpoint(root, "gss", settings)
    if resumed is not None:
        info, arrays = resumed
        step, beta, tracker = info["step"], info["beta"], GSS.EarlyStop.load(info["early_stop"], arrays)
        model = GSS.ResidualGCN(x.shape[1], p, device, GSS.checkpoint_weights(arrays))
        optimizer = GSS.restore_optimizer(model, arrays, p.lr)
    else:
        model, optimizer, step, tracker = GSS.ResidualGCN(x.shape[1], p, device), None, 0, GSS.EarlyStop()
        beta = GSS.automatic_beta(model, a_hat, x, p)
    holder, first, t1, sample = {"opt": optimizer}, step, time.time(), GSS.separation_sample(len(x), p)

    def train(start: int, stop: int, log: Callable) -> bool:
        holder["opt"] = GSS.train_until(model, a_hat, x, beta, start, stop, holder["opt"], log, tracker, sample)
        return tracker.done(p)

    if not tracker.done(p):
        train_loop(
            root,
            "gss",
            settings,
            step,
            p.steps,
            every,
            train,
            lambda: {**GSS.training_arrays(model, holder["opt"]), **tracker.arrays()},
            lambda: {"beta": beta, "early_stop": tracker.info()},
        )
    last = tracker.curve[-1][0] if tracker.done(p) else p.steps
    kept = GSS.keep_best(model, a_hat, x, sample, tracker, last) if p.stop == "separation" else last
    t_train, t2 = time.time() - t1, time.time()
    embed_database(root, model, a_hat, x, block)
    meta = {
        "params": dataclasses.asdict(p),
        "beta": beta,
        "nodes": int(a.shape[0]),
        "edges": int(a.nnz),
        "device": device,
        "steps_run": max(0, last - first),
        "resumed_at": first,
        "early_stop": {**tracker.info(), "stopped_at": last, "kept_step": kept} if p.stop == "separation" else None,
        "seconds": {"graph": round(t_graph, 2), "train": round(t_train, 2), "embed": round(time.time() - t2, 2)},
        "task_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    store.write_model(root, "gss", model.weights(), meta, degree=GSS.degrees(a))
    return meta


def train_gradnet_task(uri: str, options: dict, params: dict, every: int, block: int, threads: int) -> dict:
    """Train GRAD-Net on the root's graph and write its model and embeddings (a Ray task)."""
    p = from_dict(GN.GradNetParams, params)
    root, device, x, nn = task_setup(uri, options, threads, p.k, "gradnet")
    n = len(x)
    t0 = time.time()
    a = GN.mutual_adjacency(nn, x, p.k)
    s = GN.sym_normalize(a)
    settings = checkpoint_settings(p)
    resumed = store.load_checkpoint(root, "gradnet", settings)
    if resumed is not None:  # the anchors travel with the checkpoint: the codes stay those it trained on
        info, arrays = resumed
        step, anchors = info["step"], arrays.pop("anchors")
        model = GN.GradNet(x.shape[1] + p.anchors, p, device, GSS.checkpoint_weights(arrays))
        optimizer = GSS.restore_optimizer(model, arrays, p.lr)
    else:
        sample = np.sort(np.random.default_rng(p.seed).choice(n, min(n, 256 * p.anchors), replace=False))
        anchors = train_codebook(
            np.asarray(x[sample], np.float32), min(p.anchors, len(sample)), 20, p.seed, threads=threads
        )
        model, optimizer, step = GN.GradNet(x.shape[1] + p.anchors, p, device), None, 0
    codes = [GN.sparse_codes(x[b : b + block], anchors, p.codes) for b in range(0, n, block)]
    z = GN.code_matrix(np.concatenate([c[0] for c in codes]), np.concatenate([c[1] for c in codes]), p.anchors)
    t_graph, holder, first, t1 = time.time() - t0, {"opt": optimizer}, step, time.time()

    def train(start: int, stop: int, log: Callable) -> None:
        holder["opt"] = GN.train_steps(model, s, a, x, z, start, stop, holder["opt"], log)

    total = GN.total_steps(n, p)
    train_loop(
        root,
        "gradnet",
        settings,
        step,
        total,
        every,
        train,
        lambda: {**GSS.training_arrays(model, holder["opt"]), "anchors": anchors},
    )
    t_train, t2 = time.time() - t1, time.time()
    width = (x.shape[1] + p.anchors + sum(p.dims)) if p.concat else p.dims[-1]
    out, commit = store.embeddings_writer(root, "gradnet", (n, width))
    GN.embed_all(model, s, x, z, out, store.scratch_array, block)  # layer by layer over row blocks
    commit()
    meta = {
        "params": dataclasses.asdict(p),
        "nodes": n,
        "edges": int(a.nnz),
        "isolated": int((np.diff(a.indptr) == 0).sum()),
        "device": device,
        "steps": total,
        "steps_run": max(0, total - first),
        "resumed_at": first,
        "seconds": {"graph_codes": round(t_graph, 2), "train": round(t_train, 2), "embed": round(time.time() - t2, 2)},
        "task_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    store.write_model(root, "gradnet", model.weights(), meta, anchors=np.asarray(anchors, np.float32))
    return meta


def embed_database(root: ArtifactRoot, model: GSS.ResidualGCN, a_hat, x: np.ndarray, block: int) -> None:
    """States x_1 … x_{L-1} (kept: queries attach to them), then ĥ; pre-activations and x_L are scratch."""
    n, d = x.shape
    layers = model.p.layers
    state, pre_prev = x, None
    for layer in range(1, layers + 1):
        pre = store.scratch_array((n, d))
        out, commit = (
            store.gss_state_writer(root, layer, (n, d)) if layer < layers else (store.scratch_array((n, d)), None)
        )
        GSS.propagate(model, a_hat, state, layer, pre_prev, pre, out, block)
        if commit is not None:
            commit()  # the memmap stays readable: the next layer reads it
        state, pre_prev = out, pre
    emb, commit = store.embeddings_writer(root, "gss", (n, d))
    GSS.normalize_into(state, emb)
    commit()


def train(cfg: TrainRerankerConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    """Train ``cfg.method`` unless a model with the same settings is there."""
    problem = graph_problem(root, spectral=False)
    if problem:
        raise ArtifactError(f"train-reranker: {problem}")
    method = cfg.method
    params = dataclasses.asdict(getattr(cfg, method))
    meta = store.learned_meta(root, method)
    if meta is not None and meta["params"] == params:
        summary.add(models_reused=1)
        return meta
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    cpus = cfg.cpus or largest_node_cpus()
    fn = {"gss": train_gss_task, "gradnet": train_gradnet_task}[method]
    with summary.stage(method):
        (meta,) = run_tasks(
            fn,
            [(root.uri, root.options, params, cfg.checkpoint_every, cfg.block, int(cpus))],
            options={"num_cpus": cpus, "num_gpus": gpus},
        ).results
    root.record_stage(method, "train_reranker", to_dict(getattr(cfg, method)))
    summary.worker_peak(meta["task_peak_rss_mb"])
    summary.add(models_trained=1, steps_run=meta["steps_run"])
    summary.info[method] = meta
    return meta


FLAGS = {
    "--index": ("index", "artifact root with a kNN graph (jobs.index or jobs.graph)"),
    "--method": ("method", "learned re-ranker to train"),
    "--steps": ("gss.steps", "GSS: Adam steps (at most, with gss.stop=separation)"),
    "--epochs": ("gradnet.epochs", "GRAD-Net: epochs of N sextets (at most gradnet.max_steps batches)"),
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
