"""GRAD-Net: graph diffusion networks with sparse coding (spec search.md §14; G:1-500). No public code.

- **Graphs** (G:130-145): the local graph A, mutual kNN (K = 15) with the cosine as weight, S = D^-1/2 A D^-1/2
  (G:88-90); the global bipartite graph Z (N × B): B k-means anchors U, and per item the simplex-constrained
  sparse code min ‖x_i − Uz_i‖² s.t. 1ᵀz_i = 1, z_i ≥ 0, |z_i| = c (eq. 9), concatenated to the input
  features (G:136-145).
- **Layer** (eq. 16, G:183-187): H^{l+1} = LeakyReLU((I + S)H^l W₁ + S(SH^l ⊙ H^l) W₂), each output ℓ2-normalised
  then dropout 0.3 (G:256); output H^L (or the concatenation of every layer's, eq. 17); s_ij = cos(h_i, h_j).
- **Losses** (eq. 19-23): BPR −ln σ(s_ij − s_iu) (j a neighbour of i, u not) and the quadruplet term
  ln(1 + a_ij a_kl s_ki s_li (s_ki − s_lj)²), on sextets (i, k uniform; j, l their neighbours; u, v not),
  64 a batch: L = mean[BPR(i,j,u) + BPR(k,l,v)] + α mean[quad(i,j,k,l)] + λ‖Θ‖² (eq. 23's form, α = 1e5,
  λ = 1e-5: eq. 21 names the terms the other way round, spec §17; we weight the quadruplet term by α as eq. 23).
- **Mini-batches** as the paper's BFS (G:254): only the nodes a batch's sextets depend on are computed — a
  layer reaches two hops (SH, then S(SH ⊙ H)), so L layers need the 2L-hop receptive field, exactly.
- **Inductive query (QFE, eq. 22)**: h_q = Σ_{x ∈ N_q} s_qx h_x over the query's K nearest database items
  (initial similarity), optionally a second time in the learned space.

Open in the paper, our choices: the sparse-coding solver of [46] (we solve eq. 9 on the c nearest anchors by
projected gradient on the simplex), B and c (B = 100, the "dimension limit 100" of G:300; c = 5), the epoch
count (an epoch = N sextets; ``epochs``, capped at ``max_steps`` batches), QFE's K (= the graph's K).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp

from operators.constraints import Count, NonNegFinite, PosFinite, Rate, Seed, Widths
from operators.gss import adam_step, receptive_field, row_blocks, to_torch_sparse


@dataclass
class GradNetParams:
    k: Count = 15  # mutual kNN (G:256; Paris6k 60, G:317)
    anchors: Count = 100  # B k-means anchors (G:300 "dimension limit 100")
    codes: Count = 5  # c: nonzero codes per item (not in the paper)
    dims: Widths = field(default_factory=lambda: [1024, 256, 128])  # layer widths (G:256)
    concat: bool = False  # output every layer's features concatenated (eq. 17) instead of H^L
    dropout: Rate = 0.3
    leaky: NonNegFinite = 0.01  # LeakyReLU slope (torch default; not in the paper)
    alpha: NonNegFinite = 1e5  # weight of the quadruplet term (G:256)
    weight_decay: NonNegFinite = 1e-5  # λ‖Θ‖²
    lr: PosFinite = 3e-4  # Adam (G:300)
    batch: Count = 64  # sextets a batch (G:256)
    epochs: PosFinite = 300  # an epoch = N sextets (G:250, G:300)
    max_steps: Count = 2000  # cap on batches (large N)
    qfe_rounds: Count = 1  # QFE applications (G:234-238: "can be applied twice")
    seed: Seed = 0


# ------------------------------------------------------------------------------------------
# Graphs and codes
# ------------------------------------------------------------------------------------------
def mutual_adjacency(nn: np.ndarray, x: np.ndarray, k: int) -> sp.csr_matrix:
    """A: a_ij = cos(x_i, x_j) when i and j are in each other's first k neighbours (``nn``, self excluded)."""
    n = len(nn)
    nn = np.asarray(nn[:, :k], np.int64)
    rows = np.repeat(np.arange(n), nn.shape[1]).reshape(nn.shape)
    ok = (nn >= 0) & (nn != rows)
    r, c = rows[ok], nn[ok]
    m = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n, n))
    m = m.multiply(m.T).tocoo()  # mutual
    w = np.einsum("ij,ij->i", np.asarray(x[m.row], np.float32), np.asarray(x[m.col], np.float32))
    return sp.csr_matrix((w, (m.row, m.col)), shape=(n, n))


def sym_normalize(a: sp.csr_matrix) -> sp.csr_matrix:
    """S = D^-1/2 A D^-1/2 (isolated nodes: zero rows)."""
    d = np.asarray(a.sum(1)).ravel()
    inv = np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1e-12)), 0)
    return sp.csr_matrix(sp.diags(inv) @ a @ sp.diags(inv), dtype=np.float32)


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Rows of ``v`` projected onto the probability simplex (sort-based, Duchi et al.)."""
    u = -np.sort(-v, axis=1)
    css = np.cumsum(u, axis=1) - 1
    idx = np.arange(1, v.shape[1] + 1)
    rho = np.count_nonzero(u - css / idx > 0, axis=1)
    theta = css[np.arange(len(v)), rho - 1] / rho
    return np.maximum(v - theta[:, None], 0)


def sparse_codes(x: np.ndarray, anchors: np.ndarray, c: int, iters: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 9 on each item's c nearest anchors: z ≥ 0, Σz = 1 minimising ‖x − U_c z‖² (projected gradient,
    step 1/L with L the largest eigenvalue of U_cᵀU_c per item). Returns (anchor ids (n, c), codes (n, c))."""
    x = np.asarray(x, np.float64)
    u = np.asarray(anchors, np.float64)
    d2 = (x * x).sum(1)[:, None] - 2 * x @ u.T + (u * u).sum(1)[None, :]
    near = np.argsort(d2, axis=1, kind="stable")[:, :c]
    uc = u[near]  # (n, c, d)
    gram = np.einsum("ncd,nkd->nck", uc, uc)
    lin = np.einsum("ncd,nd->nc", uc, x)
    step = 1.0 / np.maximum(np.linalg.eigvalsh(gram)[:, -1], 1e-12)
    z = np.full((len(x), c), 1.0 / c)
    for _ in range(iters):
        grad = np.einsum("nck,nk->nc", gram, z) - lin
        z = project_simplex(z - step[:, None] * grad)
    return near, z


def code_matrix(near: np.ndarray, z: np.ndarray, b: int) -> sp.csr_matrix:
    """Z (n × B) from :func:`sparse_codes`."""
    n, c = near.shape
    return sp.csr_matrix((z.ravel(), (np.repeat(np.arange(n), c), near.ravel())), shape=(n, b))


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


class GradNet:
    """Graph diffusion layers (eq. 16) as torch tensors (``params``); forward on receptive-field blocks."""

    def __init__(
        self, dim_in: int, p: GradNetParams, device: str = "cpu", weights: dict[str, np.ndarray] | None = None
    ):
        torch = _torch()
        self.p, self.device = p, device
        if weights is None:
            gen = torch.Generator().manual_seed(p.seed)
            weights, d = {}, dim_in
            for layer, out in enumerate(p.dims, 1):
                bound = float(np.sqrt(6.0 / (d + out)))  # Glorot uniform
                for name in ("w1", "w2"):
                    weights[f"{name}_{layer}"] = ((torch.rand(d, out, generator=gen) * 2 - 1) * bound).numpy()
                d = out
        self.params = {
            k: torch.tensor(np.asarray(v, np.float32), device=device, requires_grad=True) for k, v in weights.items()
        }

    def weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.params.items()}

    def layer(self, layer: int, s_in, s_mid, h, training: bool):
        """H^{l+1} on the rows of ``s_mid`` from H^l on the columns of ``s_in``: s_in maps the input rows to the
        middle rows (those within one hop of the output), s_mid the middle rows to the output rows; each row
        set is a prefix of the one before."""
        torch = _torch()
        sh = torch.sparse.mm(s_in, h)  # SH on the middle rows
        second = torch.sparse.mm(s_mid, sh * h[: sh.shape[0]])  # S(SH ⊙ H) on the output rows
        m = s_mid.shape[0]
        first = h[:m] + sh[:m]  # (I + S)H
        out = torch.nn.functional.leaky_relu(
            first @ self.params[f"w1_{layer}"] + second @ self.params[f"w2_{layer}"], self.p.leaky
        )
        out = torch.nn.functional.normalize(out, dim=1)
        return torch.nn.functional.dropout(out, self.p.dropout, training=training)

    def forward(self, blocks: list, x0, training: bool = False):
        """Output features on the last block's rows; ``blocks`` are the 2L blocks of :func:`receptive_field`."""
        torch = _torch()
        h, outs = x0, []
        for layer in range(1, len(self.p.dims) + 1):
            h = self.layer(layer, blocks[2 * layer - 2], blocks[2 * layer - 1], h, training)
            outs.append(h)
        if not self.p.concat:
            return h
        m = h.shape[0]
        return torch.cat([x0[:m], *(o[:m] for o in outs)], dim=1)

    def regularizer(self):
        return sum((v**2).sum() for v in self.params.values())


def features(x: np.ndarray, z: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """Input features of ``rows``: the descriptor concatenated with its sparse code (G:136-145)."""
    return np.hstack([np.asarray(x[rows], np.float32), z[rows].toarray().astype(np.float32)])


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def sextets(a: sp.csr_matrix, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, 6) rows (i, j, k, l, u, v): i, k uniform over nodes with a neighbour, j, l one of their neighbours,
    u, v uniform non-neighbours (G:244-252)."""
    deg = np.diff(a.indptr)
    nodes = np.flatnonzero(deg > 0)
    out = np.empty((size, 6), np.int64)
    for col, nb_col, far_col in ((0, 1, 4), (2, 3, 5)):
        i = nodes[rng.integers(0, len(nodes), size)]
        out[:, col] = i
        out[:, nb_col] = a.indices[a.indptr[i] + rng.integers(0, deg[i])]
        far = rng.integers(0, a.shape[0], size)
        bad = (far == i) | (np.asarray(a[i, far]).ravel() != 0)
        while bad.any():  # rejection: a handful of redraws at most on a sparse graph
            far[bad] = rng.integers(0, a.shape[0], int(bad.sum()))
            bad = (far == i) | (np.asarray(a[i, far]).ravel() != 0)
        out[:, far_col] = far
    return out


def sextet_loss(h, six, a_ij, a_kl, p: GradNetParams):
    """Eq. 23 on the output features ``h`` of the batch's distinct nodes (``six`` indexes into them)."""
    torch = _torch()
    h = torch.nn.functional.normalize(h, dim=1)

    def s(x, y):
        return (h[six[:, x]] * h[six[:, y]]).sum(1)

    bpr = -torch.nn.functional.logsigmoid(s(0, 1) - s(0, 4)) - torch.nn.functional.logsigmoid(s(2, 3) - s(2, 5))
    s_ki, s_li, s_lj = s(2, 0), s(3, 0), s(3, 1)
    quad = torch.log1p(a_ij * a_kl * s_ki * s_li * (s_ki - s_lj) ** 2)
    return bpr.mean() + p.alpha * quad.mean()


def total_steps(n: int, p: GradNetParams) -> int:
    """Batches of ``epochs`` epochs of N sextets, at most ``max_steps``."""
    return int(min(p.max_steps, np.ceil(p.epochs * n / p.batch)))


def train_steps(
    model: GradNet,
    s_hat: sp.csr_matrix,
    a: sp.csr_matrix,
    x: np.ndarray,
    z: sp.csr_matrix,
    start: int,
    stop: int,
    optimizer=None,
    log=None,
):
    """Adam steps ``start``..``stop`` − 1 (batch of step t drawn from (seed, t): a resumed run draws the same)."""
    torch = _torch()
    p = model.p
    if optimizer is None:
        optimizer = torch.optim.Adam(list(model.params.values()), lr=p.lr)
    hops = 2 * len(p.dims)
    for step in range(start, stop):
        rng = np.random.default_rng((p.seed, step))
        six = sextets(a, p.batch, rng)
        nodes, inv = np.unique(six, return_inverse=True)
        sets, blocks = receptive_field(s_hat, nodes, hops)
        torch.manual_seed(p.seed * 1_000_003 + step)  # dropout masks: a function of the step too
        h = model.forward(
            [to_torch_sparse(b, model.device) for b in blocks],
            torch.from_numpy(features(x, z, sets[0])).to(model.device),
            training=True,
        )
        a_ij = torch.from_numpy(np.asarray(a[six[:, 0], six[:, 1]], np.float32).ravel()).to(model.device)
        a_kl = torch.from_numpy(np.asarray(a[six[:, 2], six[:, 3]], np.float32).ravel()).to(model.device)
        loss = sextet_loss(h, inv.reshape(six.shape), a_ij, a_kl, p) + p.weight_decay * model.regularizer()
        adam_step(optimizer, loss, step, log)
    return optimizer


# ------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------
def embed_nodes(model: GradNet, s_hat: sp.csr_matrix, x: np.ndarray, z: sp.csr_matrix, nodes: np.ndarray) -> np.ndarray:
    """ℓ2-normalised output features of ``nodes`` (exact, on their receptive field; no dropout)."""
    torch = _torch()
    with torch.no_grad():
        sets, blocks = receptive_field(s_hat, np.asarray(nodes, np.int64), 2 * len(model.p.dims))
        h = model.forward(
            [to_torch_sparse(b, model.device) for b in blocks],
            torch.from_numpy(features(x, z, sets[0])).to(model.device),
        )
        return torch.nn.functional.normalize(h, dim=1).cpu().numpy()


def propagate_layer(
    model: GradNet,
    s_hat: sp.csr_matrix,
    h: np.ndarray,
    layer: int,
    sh: np.ndarray,
    prod: np.ndarray,
    out: np.ndarray,
    block: int = 65536,
) -> None:
    """H^{l+1} of every node into ``out`` from H^l (``h``), over row blocks: SH into ``sh``, SH ⊙ H into
    ``prod``, then LeakyReLU((H + SH)W₁ + S(SH ⊙ H)W₂) row-normalised (eq. 16; no dropout). Each array may be
    a memory map: no whole-graph activation is held in memory."""
    torch = _torch()
    n = len(h)
    for a, b in row_blocks(n, block):
        sh[a:b] = s_hat[a:b] @ np.asarray(h)
        prod[a:b] = sh[a:b] * h[a:b]
    w1, w2 = (model.params[f"{w}_{layer}"].detach().cpu().numpy() for w in ("w1", "w2"))
    for a, b in row_blocks(n, block):
        pre = (np.asarray(h[a:b]) + sh[a:b]) @ w1 + (s_hat[a:b] @ np.asarray(prod)) @ w2
        act = torch.nn.functional.leaky_relu(torch.from_numpy(np.ascontiguousarray(pre, np.float32)), model.p.leaky)
        out[a:b] = torch.nn.functional.normalize(act, dim=1).numpy()


def embed_all(
    model: GradNet,
    s_hat: sp.csr_matrix,
    x: np.ndarray,
    z: sp.csr_matrix,
    out: np.ndarray,
    scratch: Callable[[tuple], np.ndarray],
    block: int = 65536,
) -> None:
    """:func:`embed_nodes` of every node into ``out`` (n × output width), layer by layer over row blocks;
    ``scratch(shape)`` gives the float32 arrays of the intermediate activations (memory maps at scale)."""
    n = len(x)
    h = scratch((n, x.shape[1] + z.shape[1]))
    for a, b in row_blocks(n, block):
        h[a:b] = features(x, z, np.arange(a, b))
    col = 0
    if model.p.concat:
        out[:, : h.shape[1]] = h
        col = h.shape[1]
    for layer, width in enumerate(model.p.dims, 1):
        sh, prod = scratch((n, h.shape[1])), scratch((n, h.shape[1]))
        nxt = scratch((n, width)) if layer < len(model.p.dims) or model.p.concat else out
        propagate_layer(model, s_hat, h, layer, sh, prod, nxt, block)
        if model.p.concat:
            out[:, col : col + width] = nxt
            col += width
        del sh, prod
        h = nxt
    if model.p.concat:  # the concatenation, ℓ2-normalised (each layer's output already is)
        for a, b in row_blocks(n, block):
            out[a:b] /= np.maximum(np.linalg.norm(out[a:b], axis=1, keepdims=True), 1e-12)


def qfe(neighbours: np.ndarray, sims: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """Eq. 22: h_q = Σ_{x ∈ N_q} s_qx h_x (−1 padding: no term), ℓ2-normalised."""
    safe = np.maximum(neighbours, 0)
    h = np.asarray(emb[safe.ravel()], np.float32).reshape(*safe.shape, -1)
    w = np.where(neighbours >= 0, sims, 0.0).astype(np.float32)
    hq = np.einsum("qk,qkd->qd", w, h)
    return hq / np.maximum(np.linalg.norm(hq, axis=1, keepdims=True), 1e-12)
