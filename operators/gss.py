"""GSS: Guided Similarity Separation — a residual GCN trained without labels (spec search.md §12).

The seed gives the idea and the results (P0:22-42, P1:29-75: "raise s_ij above β, lower it below —
a clustering effect"); the formulas are EXT (layer6ai-labs/GSS ``model.py``, ``train.py``,
``utils/helper.py``), reproduced here:

- graph: the top-k of every database item (itself included, so k − 1 neighbours), symmetrised, weights
  the raw cosine similarity; Â = D^-1/2 (A + I) D^-1/2 with D the row sums of A + I;
- layer l: pre_l = Â x_{l-1} W_l + b_l; x_1 = ELU(pre_1), x_l = pre_{l-1} + decay · ELU(pre_l) (l ≥ 2);
  W_l starts at the identity plus N(0, ε²) off the diagonal (so the width is the descriptor's dimension);
- embedding ĥ = x_L / ‖x_L‖; similarity s_ij = [ĥ_iᵀ ĥ_j]₊;
- loss L = mean_ij −½ α (s_ij − β)² + λ Σ_l ‖W_l‖² / 2, β = the 98th percentile of ĥ_iᵀĥ_j of the
  untrained network ("automatic β", P0:48); Adam, lr 1e-4, 200 steps.

What scales here and not there: the reference forms Â, the similarities and the loss as dense N × N
matrices and takes full-batch steps. Here Â is sparse; a step samples ``batch`` nodes and computes their
embeddings *exactly* on their L-hop receptive field (:func:`receptive_field`), so the loss over the batch's
pairs is an unbiased estimate of the full mean and a graph of n ≤ ``batch`` nodes takes the reference's
full-batch step; β is the percentile of sampled pairs. Queries never join training: a query attaches to
its top-k_q database items (edges query → item only, as the reference's query rows), so every database
state is unchanged by it and its embedding (:func:`embed_queries`) is what the reference's transductive
forward pass gives it. No model selection on test labels (the reference keeps the best test mAP):
either a fixed number of steps, or (default) label-free early stopping on the *separation* σ — the mean
similarity of the graph's edges minus the mean similarity of all pairs, over a fixed node sample — keeping
the weights of the best σ (:class:`EarlyStop`): the loss's own aim (neighbours above β, the rest below)
measured on the edges the method trusts, which stops improving when training starts to tear the graph's
neighbourhoods apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import numpy as np
import scipy.sparse as sp

from operators.constraints import (
    AtLeast2,
    Count,
    NonNegFinite,
    NonNegInt,
    Percentile,
    PosFinite,
    Seed,
)


@dataclass
class GssParams:
    k: AtLeast2 = 5  # database graph: top-k of each item, itself included (EXT gen_graph: k = 5 ROxf/RPar)
    kq: Count = 5  # a query attaches to its top-k_q database items (EXT: 5 ROxf, 15 RPar)
    layers: Count = 2  # EXT num_layers
    layer_decay: NonNegFinite = 0.3  # EXT layer_decay
    init_std: NonNegFinite = 1e-5  # ε: off-diagonal std of the initial W (EXT init_weights)
    alpha: PosFinite = 1.0  # α_gss
    beta: NonNegFinite = 0.0  # > 0: fixed β; 0: automatic, the beta_percentile of the initial similarities
    beta_percentile: Percentile = 98.0
    beta_pairs: Count = 1_000_000  # pairs sampled for the automatic β (never an N × N matrix)
    lr: PosFinite = 1e-4  # Adam
    weight_decay: NonNegFinite = 1e-5  # λ of λ Σ‖W‖²/2 (EXT regularizer_scale, tf l2_regularizer)
    steps: NonNegInt = 200  # Adam steps at most (EXT: 200 full-batch epochs; INSTRE 500)
    stop: Literal["separation", "steps"] = "separation"  # label-free early stopping on the graph's separation
    # (:func:`separation`), or all ``steps`` (the reference instead keeps the
    # epoch of best *test* mAP, which a user does not have)
    eval_every: Count = 10  # steps between separation measurements
    patience: Count = 5  # measurements without a better separation before training stops
    eval_nodes: Count = 1024  # nodes whose graph edges and pairs measure the separation
    batch: Count = 2048  # nodes a step; the whole graph (the reference's full batch) when n ≤ batch
    seed: Seed = 0


# ------------------------------------------------------------------------------------------
# Graph
# ------------------------------------------------------------------------------------------
def gss_adjacency(nn: np.ndarray, x: np.ndarray, k: int, block: int = 65536) -> sp.csr_matrix:
    """A: item i linked to the first k − 1 items of its kNN list ``nn`` (self excluded, −1 padding) and back,
    weights the cosine x_iᵀx_j of the (ℓ2-normalised) descriptors (EXT gen_graph)."""
    n = len(nn)
    nn = np.asarray(nn[:, : max(0, k - 1)], np.int64)
    rows = np.repeat(np.arange(n), nn.shape[1]).reshape(nn.shape)
    ok = (nn >= 0) & (nn != rows)
    r, c = rows[ok], nn[ok]
    w = np.empty(len(r), np.float32)
    for s in range(0, len(r), block):  # row-block dot products: never more than ``block`` gathered pairs
        w[s : s + block] = np.einsum(
            "ij,ij->i", np.asarray(x[r[s : s + block]], np.float32), np.asarray(x[c[s : s + block]], np.float32)
        )
    a = sp.csr_matrix((w, (r, c)), shape=(n, n))
    a.sum_duplicates()
    return a.maximum(a.T).tocsr()


def normalize_with_self(a: sp.csr_matrix) -> sp.csr_matrix:
    """Â = D^-1/2 (A + I) D^-1/2, D = diag((A + I) 1) (EXT preprocess_graph)."""
    a1 = sp.csr_matrix(a + sp.eye(a.shape[0], dtype=a.dtype, format="csr"))
    d = np.asarray(a1.sum(1)).ravel()
    inv = 1.0 / np.sqrt(np.maximum(d, 1e-12))
    out = sp.csr_matrix(sp.diags(inv) @ a1 @ sp.diags(inv), dtype=np.float32)
    out.sort_indices()
    return out


def query_rows(neighbours: np.ndarray, weights: np.ndarray, degree: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's row of Â: its self weight 1/d_q and a_qj / √(d_q d_j) over its ``neighbours``
    (−1 padding: weight 0), d_q = 1 + Σ_j a_qj; ``degree`` is the database's row sums of A + I (the query
    adds no edge to a database item, EXT combine_graph)."""
    w = np.where(neighbours >= 0, np.asarray(weights, np.float64), 0.0)
    dq = 1.0 + w.sum(1)
    dj = np.where(neighbours >= 0, degree[np.maximum(neighbours, 0)], 1.0)
    return 1.0 / dq, w / np.sqrt(dq[:, None] * dj)


def degrees(a: sp.csr_matrix) -> np.ndarray:
    """Row sums of A + I."""
    return np.asarray(a.sum(1)).ravel() + 1.0


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


class ResidualGCN:
    """The residual GCN of EXT model.py; weights as torch tensors (``params``), forward on sparse blocks."""

    def __init__(self, dim: int, p: GssParams, device: str = "cpu", weights: dict[str, np.ndarray] | None = None):
        torch = _torch()
        self.p, self.dim, self.device = p, dim, device
        if weights is None:
            rng = np.random.default_rng(p.seed)
            weights = {}
            for layer in range(1, p.layers + 1):
                w = rng.standard_normal((dim, dim)) * p.init_std
                np.fill_diagonal(w, 1.0)
                weights[f"w{layer}"], weights[f"b{layer}"] = w.astype(np.float32), np.zeros(dim, np.float32)
        self.params = {
            k: torch.tensor(np.asarray(v, np.float32), device=device, requires_grad=True) for k, v in weights.items()
        }

    def weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.params.items()}

    def layer(self, layer: int, a_block, x_in, residual):
        """(pre_l, x_l) on the rows of ``a_block`` (a torch sparse (m, |x_in|) block of Â)."""
        torch = _torch()
        pre = torch.sparse.mm(a_block, x_in) @ self.params[f"w{layer}"] + self.params[f"b{layer}"]
        act = torch.nn.functional.elu(pre)
        return pre, act if residual is None else residual + self.p.layer_decay * act

    def forward(self, blocks: list, x0) -> "object":
        """x_L on the rows of the last block; ``blocks[l-1]`` maps layer l−1's rows to layer l's, each row
        set a prefix of the one before (:func:`receptive_field`)."""
        x, pre = x0, None
        for layer, a in enumerate(blocks, 1):
            m = a.shape[0]
            pre, x = self.layer(layer, a, x, None if pre is None else pre[:m])
        return x

    def regularizer(self):
        return sum((self.params[f"w{layer}"] ** 2).sum() for layer in range(1, self.p.layers + 1)) / 2


def to_torch_sparse(m: sp.csr_matrix, device: str = "cpu"):
    torch = _torch()
    m = sp.coo_matrix(m, dtype=np.float32)
    index = torch.from_numpy(np.vstack([m.row, m.col]).astype(np.int64))
    return torch.sparse_coo_tensor(
        index, torch.from_numpy(m.data), size=m.shape, device=device, check_invariants=False
    ).coalesce()


def receptive_field(
    a_hat: sp.csr_matrix, nodes: np.ndarray, layers: int
) -> tuple[list[np.ndarray], list[sp.csr_matrix]]:
    """Row sets T_L = ``nodes`` ⊂ T_{L-1} ⊂ … ⊂ T_0 (each a prefix of the next: T_{l-1} = T_l, then the new
    neighbours of T_l) and the blocks Â[T_l, T_{l-1}], so an L-layer GCN computes x_L on ``nodes`` exactly."""
    sets = [np.asarray(nodes, np.int64)]
    for _ in range(layers):
        cur = sets[-1]
        nb = np.unique(a_hat[cur].indices)
        sets.append(np.r_[cur, nb[~np.isin(nb, cur)]])
    sets = sets[::-1]  # T_0 … T_L
    blocks = [sp.csr_matrix(a_hat[sets[layer + 1]][:, sets[layer]]) for layer in range(layers)]
    return sets, blocks


def normalized_rows(x):
    torch = _torch()
    return torch.nn.functional.normalize(x, dim=1)


def gss_loss(h_hat, beta: float, alpha: float):
    """mean_ij −½ α ([ĥ_iᵀĥ_j]₊ − β)² over the rows of ``h_hat`` (EXT GSS_loss on ReLU(ĤĤᵀ))."""
    torch = _torch()
    s = torch.relu(h_hat @ h_hat.T)
    return (-0.5 * alpha * (s - beta) ** 2).mean()


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def batch_nodes(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    """The nodes of step ``step``: all of them when n ≤ batch, else ``batch`` drawn without replacement
    (a function of (seed, step) only, so a resumed run draws what an uninterrupted one would)."""
    if n <= batch:
        return np.arange(n)
    return np.sort(np.random.default_rng((seed, step)).choice(n, batch, replace=False))


def automatic_beta(model: ResidualGCN, a_hat: sp.csr_matrix, x: np.ndarray, p: GssParams) -> float:
    """β: the ``beta_percentile`` of ĥ_iᵀĥ_j of the untrained network over sampled pairs (all pairs when
    n² ≤ beta_pairs — the reference's exact percentile), EXT train.py."""
    n = a_hat.shape[0]
    if p.beta > 0:
        return float(p.beta)
    rng = np.random.default_rng((p.seed, 2**32 - 1))  # a stream no step uses
    nodes = (
        np.arange(n)
        if n * n <= p.beta_pairs
        else np.sort(rng.choice(n, min(n, int(np.sqrt(p.beta_pairs))), replace=False))
    )
    h = embed_nodes(model, a_hat, x, nodes)
    return float(np.percentile((h @ h.T).ravel(), p.beta_percentile))


def embed_nodes(model: ResidualGCN, a_hat: sp.csr_matrix, x: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """ĥ of ``nodes`` (exact, on their receptive field), without gradients."""
    torch = _torch()
    with torch.no_grad():
        sets, blocks = receptive_field(a_hat, nodes, model.p.layers)
        x0 = torch.from_numpy(np.asarray(x[sets[0]], np.float32)).to(model.device)
        h = model.forward([to_torch_sparse(b, model.device) for b in blocks], x0)
        return normalized_rows(h).cpu().numpy()


def train_steps(
    model: ResidualGCN,
    a_hat: sp.csr_matrix,
    x: np.ndarray,
    beta: float,
    start: int,
    stop: int,
    optimizer=None,
    log: Callable[[int, float], None] | None = None,
):
    """Adam steps ``start``..``stop`` − 1 of the GSS loss on sampled batches; returns the optimizer (its
    state is part of a checkpoint)."""
    torch = _torch()
    p = model.p
    if optimizer is None:
        optimizer = torch.optim.Adam(list(model.params.values()), lr=p.lr)
    for step in range(start, stop):
        sets, blocks = receptive_field(a_hat, batch_nodes(a_hat.shape[0], p.batch, p.seed, step), p.layers)
        x0 = torch.from_numpy(np.asarray(x[sets[0]], np.float32)).to(model.device)
        h = normalized_rows(model.forward([to_torch_sparse(b, model.device) for b in blocks], x0))
        adam_step(optimizer, gss_loss(h, beta, p.alpha) + p.weight_decay * model.regularizer(), step, log)
    return optimizer


def separation_sample(n: int, p: GssParams) -> np.ndarray:
    """The fixed nodes σ is measured on: all when n ≤ ``eval_nodes``, else a seeded sample no step draws."""
    if n <= p.eval_nodes:
        return np.arange(n)
    return np.sort(np.random.default_rng((p.seed, 2**32 - 2)).choice(n, p.eval_nodes, replace=False))


def separation(model: ResidualGCN, a_hat: sp.csr_matrix, x: np.ndarray, sample: np.ndarray) -> float:
    """σ = mean_{i∈S, j∈N(i)} s_ij − mean_{i≠j∈S} s_ij, s_ij = [ĥ_iᵀĥ_j]₊ (the loss's similarity), N(i) the
    graph neighbours of i (Â's off-diagonal row) and S ``sample``: no labels, only the graph."""
    rows = a_hat[sample].tocoo()
    keep = sample[rows.row] != rows.col
    src, dst = sample[rows.row[keep]], rows.col[keep]
    nodes = np.unique(np.r_[sample, dst])
    h = embed_nodes(model, a_hat, x, nodes)
    hs = h[np.searchsorted(nodes, sample)]
    edge = np.maximum(np.einsum("ij,ij->i", h[np.searchsorted(nodes, src)], h[np.searchsorted(nodes, dst)]), 0).mean()
    pairs = np.maximum(hs @ hs.T, 0)
    m = len(sample)
    rest = (pairs.sum() - np.trace(pairs)) / max(1, m * (m - 1))
    return float(edge - rest) if len(src) else 0.0


@dataclass
class EarlyStop:
    """The best separation so far, its step and weights, and the measurements made since (label-free early
    stopping); ``curve`` keeps every (step, σ). Saves and loads itself with a checkpoint."""

    best: float = -np.inf
    best_step: int = -1
    since: int = 0
    curve: list = field(default_factory=list)
    weights: dict | None = None

    def update(self, step: int, value: float, model: ResidualGCN) -> None:
        self.curve.append([int(step), round(float(value), 6)])
        if value > self.best:
            self.best, self.best_step, self.since, self.weights = float(value), int(step), 0, model.weights()
        else:
            self.since += 1

    def done(self, p: GssParams) -> bool:
        return p.stop == "separation" and self.since >= p.patience

    def info(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since": self.since, "curve": self.curve}

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"best.{k}": v for k, v in (self.weights or {}).items()}

    @classmethod
    def load(cls, info: dict, arrays: dict[str, np.ndarray]) -> "EarlyStop":
        weights = {k[len("best.") :]: v for k, v in arrays.items() if k.startswith("best.")} or None
        return cls(info["best"], info["best_step"], info["since"], info["curve"], weights)


def train_until(
    model: ResidualGCN,
    a_hat: sp.csr_matrix,
    x: np.ndarray,
    beta: float,
    start: int,
    stop: int,
    optimizer,
    log,
    tracker: EarlyStop,
    sample: np.ndarray,
):
    """:func:`train_steps` from ``start`` to ``stop``, σ measured before the first step and after every
    ``eval_every``-th (with ``stop="separation"``); returns early once ``tracker`` is done."""
    p = model.p
    if p.stop != "separation":
        return train_steps(model, a_hat, x, beta, start, stop, optimizer, log)
    if start == 0 and tracker.best_step < 0:
        tracker.update(0, separation(model, a_hat, x, sample), model)
    step = start
    while step < stop and not tracker.done(p):
        nxt = min(stop, (step // p.eval_every + 1) * p.eval_every)
        optimizer = train_steps(model, a_hat, x, beta, step, nxt, optimizer, log)
        step = nxt
        if step % p.eval_every == 0:
            tracker.update(step, separation(model, a_hat, x, sample), model)
    return optimizer


def keep_best(
    model: ResidualGCN, a_hat: sp.csr_matrix, x: np.ndarray, sample: np.ndarray, tracker: EarlyStop, step: int
) -> int:
    """After training to ``step``: leave in ``model`` the weights of the best σ among the measured ones and the
    final ones (measured here unless they were; not recorded, so a longer run resumes the same tracker).
    Returns the step whose weights are kept."""
    measured = tracker.curve and tracker.curve[-1][0] == step
    if not tracker.done(model.p) and not measured and separation(model, a_hat, x, sample) > tracker.best:
        return step
    set_weights(model, tracker.weights)
    return tracker.best_step


def set_weights(model, weights: dict[str, np.ndarray]) -> None:
    """Copy ``weights`` into the model's tensors (e.g. the best ones of :class:`EarlyStop`)."""
    torch = _torch()
    with torch.no_grad():
        for k, v in weights.items():
            model.params[k].copy_(torch.from_numpy(np.asarray(v, np.float32)))


def adam_step(optimizer, loss, step: int, log: Callable[[int, float], None] | None) -> None:
    """One optimizer step on ``loss``, reported to ``log``."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if log is not None:
        log(step, loss.item())


def training_arrays(model, optimizer) -> dict[str, np.ndarray]:
    """A model's weights (``param.<name>``) and Adam's state (``adam.<name>.<key>``) as arrays: a checkpoint
    (any model keeping its tensors in ``params``: :class:`ResidualGCN`, :class:`operators.gradnet.GradNet`)."""
    out = {f"param.{k}": v for k, v in model.weights().items()}
    for name, t in model.params.items():
        for key, val in optimizer.state.get(t, {}).items():
            out[f"adam.{name}.{key}"] = val.detach().cpu().numpy()
    return out


def checkpoint_weights(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len("param.") :]: v for k, v in arrays.items() if k.startswith("param.")}


def restore_optimizer(model, arrays: dict[str, np.ndarray], lr: float):
    """Adam over ``model.params`` with the state of a checkpoint from :func:`training_arrays`."""
    torch = _torch()
    optimizer = torch.optim.Adam(list(model.params.values()), lr=lr)
    for name, t in model.params.items():
        prefix = f"adam.{name}."
        state = {k[len(prefix) :]: torch.tensor(v, device=t.device) for k, v in arrays.items() if k.startswith(prefix)}
        if state:
            optimizer.state[t] = state
    return optimizer


# ------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------
def row_blocks(n: int, block: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, block):
        yield s, min(n, s + block)


def propagate(
    model: ResidualGCN,
    a_hat: sp.csr_matrix,
    x_in: np.ndarray,
    layer: int,
    pre_prev: np.ndarray | None,
    pre_out: np.ndarray,
    x_out: np.ndarray,
    block: int = 16384,
) -> None:
    """Layer ``layer`` over every database row, in row blocks: ``pre_out`` = Â x_in W + b and ``x_out`` its
    activation (+ the residual ``pre_prev``); arrays may be memory-mapped, none is held whole."""
    torch = _torch()
    w, b = (model.params[f"{k}{layer}"].detach().cpu() for k in ("w", "b"))
    for s, e in row_blocks(a_hat.shape[0], block):
        ax = a_hat[s:e] @ x_in  # sparse rows × (memory-mapped) dense: gathers the neighbours' rows
        with torch.no_grad():
            pre = torch.from_numpy(np.asarray(ax, np.float32)) @ w + b
            act = torch.nn.functional.elu(pre)
            out = (
                act
                if pre_prev is None
                else torch.from_numpy(np.asarray(pre_prev[s:e], np.float32)) + model.p.layer_decay * act
            )
        pre_out[s:e], x_out[s:e] = pre.numpy(), out.numpy()


def normalize_into(x: np.ndarray, out: np.ndarray, block: int = 65536) -> None:
    """ĥ = x / ‖x‖, row block by row block."""
    for s, e in row_blocks(len(x), block):
        v = np.asarray(x[s:e], np.float32)
        out[s:e] = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def embed_queries(
    model: ResidualGCN,
    xq: np.ndarray,
    neighbours: np.ndarray,
    weights: np.ndarray,
    degree: np.ndarray,
    states: list[np.ndarray],
) -> np.ndarray:
    """ĥ of queries attached to their ``neighbours`` (database rows, −1 padding) with edge ``weights``.

    ``states[l]`` is the database's input to layer l + 1 (states[0] = the descriptors x_0, then x_1 …
    x_{L-1}); the database's states do not depend on queries (no edge points to a query), so
    pre_{q,l} = (Â_qq x_{q,l-1} + Σ_j Â_qj x_{j,l-1}) W_l + b_l is the reference's forward pass.
    """
    torch = _torch()
    self_w, nb_w = query_rows(neighbours, weights, degree)
    safe = np.maximum(neighbours, 0)
    x, pre = np.asarray(xq, np.float32), None
    with torch.no_grad():
        for layer in range(1, model.p.layers + 1):
            db = np.asarray(states[layer - 1][safe.ravel()], np.float32).reshape(*safe.shape, -1)
            ax = self_w[:, None] * x + np.einsum("qk,qkd->qd", nb_w, db)
            w, b = model.params[f"w{layer}"].detach().cpu(), model.params[f"b{layer}"].detach().cpu()
            p_l = torch.from_numpy(np.asarray(ax, np.float32)) @ w + b
            act = torch.nn.functional.elu(p_l)
            x_t = act if pre is None else pre + model.p.layer_decay * act
            pre, x = p_l, x_t.numpy()
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
