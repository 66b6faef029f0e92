"""GSS against a dense re-statement of the reference (layer6ai-labs/GSS: dense N×N graph, full-batch loss)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_diffusion import clustered, curves

from operators.gss import (
    EarlyStop,
    GssParams,
    ResidualGCN,
    automatic_beta,
    checkpoint_weights,
    degrees,
    embed_nodes,
    embed_queries,
    gss_adjacency,
    gss_loss,
    normalize_into,
    normalize_with_self,
    propagate,
    receptive_field,
    restore_optimizer,
    separation,
    separation_sample,
    to_torch_sparse,
    train_steps,
    train_until,
    training_arrays,
)
from operators.knn import knn_blocks


def dense_reference_graph(q: np.ndarray, x: np.ndarray, kq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """EXT utils/helper.py gen_graph + combine_graph + preprocess_graph, as dense matrices: the (Q+N)² Â."""
    q_sim, x_sim = q @ x.T, x @ x.T
    nq, n = len(q), len(x)
    q_adj = np.zeros((nq, n))
    for i, top in enumerate(np.argpartition(q_sim, -kq, 1)[:, -kq:]):
        q_adj[i, top] = q_sim[i, top]
    x_adj = np.zeros((n, n))
    for i, top in enumerate(np.argpartition(x_sim, -k, 1)[:, -k:]):
        x_adj[i, top] = x_sim[i, top]
        x_adj[top, i] = x_sim[i, top]
        x_adj[i, i] = 0
    all_adj = np.zeros((nq + n, nq + n))
    all_adj[:nq, nq:], all_adj[nq:, nq:] = q_adj, x_adj

    def pre(a: np.ndarray) -> np.ndarray:
        a = a + np.eye(len(a))
        d = a.sum(1) ** -0.5
        return d[:, None] * a * d[None, :]

    return pre(all_adj), pre(x_adj)


def dense_forward(a: torch.Tensor, x: torch.Tensor, weights: dict, p: GssParams) -> torch.Tensor:
    """EXT model.py network(): dense Â, float64; returns ĥ (ℓ2-normalised rows)."""
    residual = None
    for layer in range(1, p.layers + 1):
        pre = a @ x @ weights[f"w{layer}"] + weights[f"b{layer}"]
        x = torch.nn.functional.elu(pre)
        if residual is not None:
            x = residual + p.layer_decay * x
        residual = pre
    return torch.nn.functional.normalize(x, dim=1)


@pytest.fixture(scope="module")
def small():
    x = clustered(n=90, d=12, clusters=6, seed=3)
    q = clustered(n=7, d=12, clusters=6, seed=4)
    ids = np.arange(len(x))
    _, nn = knn_blocks(x, [(ids, x)], 10, exclude=ids)
    return q, x, nn


def test_database_and_query_embeddings_equal_the_dense_transductive_reference(small):
    q, x, nn = small
    p = GssParams(k=5, kq=4, layers=3, init_std=0.05)  # a visibly non-identity W and a third (residual) layer
    model = ResidualGCN(x.shape[1], p)
    a = gss_adjacency(nn, x, p.k)
    a_hat = normalize_with_self(a)
    all_hat, x_hat = dense_reference_graph(q.astype(np.float64), x.astype(np.float64), p.kq, p.k)
    np.testing.assert_allclose(a_hat.toarray(), x_hat, rtol=1e-5, atol=1e-7)
    w64 = {k: torch.tensor(v, dtype=torch.float64) for k, v in model.weights().items()}
    ref = dense_forward(torch.tensor(all_hat), torch.tensor(np.r_[q, x], dtype=torch.float64), w64, p).numpy()
    # database: layer by layer over row blocks (as the job runs it over memory-mapped arrays)
    n, d = x.shape
    states, pre = [x], None
    for layer in range(1, p.layers + 1):
        pre_out, x_out = np.empty((n, d), np.float32), np.empty((n, d), np.float32)
        propagate(model, a_hat, states[-1], layer, pre, pre_out, x_out, block=16)
        states.append(x_out)
        pre = pre_out
    h = np.empty((n, d), np.float32)
    normalize_into(states[-1], h)
    np.testing.assert_allclose(h, ref[len(q) :], atol=2e-5)
    np.testing.assert_allclose(embed_nodes(model, a_hat, x, np.array([3, 40, 7])), ref[len(q) :][[3, 40, 7]], atol=2e-5)
    # queries: attached by their top-k_q, inductively (the database's states unchanged)
    sims, top = knn_blocks(q, [(np.arange(n), x)], p.kq)
    hq = embed_queries(model, q, top, sims, degrees(a), states[:-1])
    np.testing.assert_allclose(hq, ref[: len(q)], atol=2e-5)


def test_a_database_item_attached_as_a_query_by_its_own_edges_gets_its_embedding(small):
    _, x, nn = small
    p = GssParams(init_std=0.05)
    model = ResidualGCN(x.shape[1], p)
    a = gss_adjacency(nn, x, p.k)
    a_hat = normalize_with_self(a)
    states = [x]
    pre = None
    for layer in range(1, p.layers):
        pre_out, x_out = np.empty_like(x), np.empty_like(x)
        propagate(model, a_hat, states[-1], layer, pre, pre_out, x_out)
        states.append(x_out)
        pre = pre_out
    items = np.array([0, 17, 55])
    width = max(a[i].nnz for i in items)
    nb = np.full((len(items), width), -1)
    wt = np.zeros((len(items), width))
    for j, i in enumerate(items):
        row = a[i]
        nb[j, : row.nnz], wt[j, : row.nnz] = row.indices, row.data
    got = embed_queries(model, x[items], nb, wt, degrees(a), states)
    np.testing.assert_allclose(got, embed_nodes(model, a_hat, x, items), atol=1e-5)


def test_loss_and_gradient_equal_the_dense_full_batch_reference(small):
    _, x, nn = small
    p = GssParams(init_std=0.05, batch=4096, weight_decay=1e-3)
    model = ResidualGCN(x.shape[1], p)
    a_hat = normalize_with_self(gss_adjacency(nn, x, p.k))
    beta = automatic_beta(model, a_hat, x, p)
    # dense reference: β = 98th percentile of the whole initial ĤĤᵀ, full-batch loss + λ Σ‖W‖²/2
    w64 = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in model.weights().items()}
    h = dense_forward(torch.tensor(a_hat.toarray(), dtype=torch.float64), torch.tensor(x, dtype=torch.float64), w64, p)
    assert beta == pytest.approx(np.percentile((h @ h.T).detach().numpy(), 98), abs=1e-5)
    ref = (-0.5 * p.alpha * (torch.relu(h @ h.T) - beta) ** 2).mean() + p.weight_decay * sum(
        (w64[f"w{i}"] ** 2).sum() / 2 for i in (1, 2)
    )
    ref.backward()
    # ours: the sparse receptive-field path, one full batch
    sets, blocks = receptive_field(a_hat, np.arange(len(x)), p.layers)
    hs = torch.nn.functional.normalize(
        model.forward([to_torch_sparse(b) for b in blocks], torch.from_numpy(x[sets[0]])), dim=1
    )
    loss = gss_loss(hs, beta, p.alpha) + p.weight_decay * model.regularizer()
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for k, v in model.params.items():
        np.testing.assert_allclose(v.grad.numpy(), w64[k].grad.numpy(), rtol=1e-3, atol=1e-8)


def test_a_sampled_batch_gets_its_exact_embeddings_from_its_receptive_field(small):
    _, x, nn = small
    p = GssParams(init_std=0.05)
    model = ResidualGCN(x.shape[1], p)
    a_hat = normalize_with_self(gss_adjacency(nn, x, p.k))
    full = embed_nodes(model, a_hat, x, np.arange(len(x)))
    nodes = np.array([5, 9, 60, 88])
    sets, _ = receptive_field(a_hat, nodes, p.layers)
    assert len(sets[0]) < len(x) and np.array_equal(sets[-1], nodes)
    np.testing.assert_allclose(embed_nodes(model, a_hat, x, nodes), full[nodes], atol=1e-6)


def test_gss_beats_plain_knn_on_a_toy_manifold_and_training_lowers_the_loss():
    from operators.metrics import average_precision, positive_ranks

    x, labels = curves()
    n = len(x)
    ids = np.arange(n)
    _, nn = knn_blocks(x, [(ids, x)], 10, exclude=ids)
    p = GssParams(k=5, steps=200, lr=1e-3, batch=256)  # mini-batches (n = 480 > batch); mAP: benchmarks/toy_manifold.py
    model = ResidualGCN(x.shape[1], p)
    a_hat = normalize_with_self(gss_adjacency(nn, x, p.k))
    beta = automatic_beta(model, a_hat, x, p)
    losses: list[float] = []
    train_steps(model, a_hat, x, beta, 0, p.steps, log=lambda s, v: losses.append(v))
    h = embed_nodes(model, a_hat, x, ids)

    def m_ap(v: np.ndarray) -> float:
        _, rows = knn_blocks(v, [(ids, v)], n - 1, exclude=ids)
        aps = []
        for i in range(0, n, 5):
            pos = np.flatnonzero((labels == labels[i]) & (ids != i))
            aps.append(average_precision(*positive_ranks(rows[i], pos, np.zeros(0, np.int64))))
        return float(np.mean(aps))

    base, got = m_ap(x), m_ap(h)
    assert got > base + 0.04, (base, got)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses


def test_separation_is_the_mean_edge_similarity_minus_the_mean_pair_similarity(small):
    _, x, nn = small
    p = GssParams(k=5, eval_nodes=40)
    a = gss_adjacency(nn, x, p.k)
    a_hat = normalize_with_self(a)
    model = ResidualGCN(x.shape[1], p)
    train_steps(model, a_hat, x, 0.9, 0, 3)  # weights off the identity
    sample = separation_sample(len(x), p)
    h = embed_nodes(model, a_hat, x, np.arange(len(x)))
    s = np.maximum(h @ h.T, 0)
    r, c = a[sample].nonzero()
    inner = s[np.ix_(sample, sample)]
    want = s[sample[r], c].mean() - (inner.sum() - np.trace(inner)) / (40 * 39)
    assert len(sample) == 40 and len(r) > 40
    assert separation(model, a_hat, x, sample) == pytest.approx(want, abs=1e-6)


def test_early_stopping_resumed_from_checkpoints_equals_an_uninterrupted_run(small):
    _, x, nn = small
    p = GssParams(k=5, steps=80, eval_every=4, patience=2, lr=3e-2)
    a_hat = normalize_with_self(gss_adjacency(nn, x, p.k))
    beta = automatic_beta(ResidualGCN(x.shape[1], p), a_hat, x, p)
    sample = separation_sample(len(x), p)

    def run(chunks: list[tuple[int, int]]) -> EarlyStop:
        model, opt, tracker = ResidualGCN(x.shape[1], p), None, EarlyStop()
        for start, stop in chunks:
            if tracker.done(p):
                break
            opt = train_until(model, a_hat, x, beta, start, stop, opt, None, tracker, sample)
            arrays, info = {**training_arrays(model, opt), **tracker.arrays()}, json.loads(json.dumps(tracker.info()))
            model = ResidualGCN(x.shape[1], p, weights=checkpoint_weights(arrays))  # a checkpoint, reloaded
            opt, tracker = restore_optimizer(model, arrays, p.lr), EarlyStop.load(info, arrays)
        return tracker

    one, parts = run([(0, 80)]), run([(0, 7), (7, 30), (30, 80)])
    assert one.done(p) and one.curve[-1][0] < 80  # stopped early: `patience` measurements without a better σ
    assert one.curve == parts.curve and one.best_step == parts.best_step
    assert one.curve[0][0] == 0 and max(v for _, v in one.curve) == pytest.approx(one.best, abs=1e-6)
    for k, v in one.weights.items():
        np.testing.assert_array_equal(v, parts.weights[k])
