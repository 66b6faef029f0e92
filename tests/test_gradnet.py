"""GRAD-Net: the diffusion layer against its dense formula, exact receptive fields, codes on the simplex,
a toy manifold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_diffusion import clustered, curves

from operators.gradnet import (
    GradNet,
    GradNetParams,
    code_matrix,
    embed_all,
    embed_nodes,
    features,
    mutual_adjacency,
    project_simplex,
    qfe,
    sextets,
    sparse_codes,
    sym_normalize,
    train_steps,
)
from operators.gss import receptive_field, to_torch_sparse
from operators.knn import knn_blocks


@pytest.fixture(scope="module")
def small():
    x = clustered(n=80, d=12, clusters=5, seed=7)
    ids = np.arange(len(x))
    _, nn = knn_blocks(x, [(ids, x)], 10, exclude=ids)
    a = mutual_adjacency(nn, x, 8)
    near, z = sparse_codes(x, x[::10], 3)
    return x, a, sym_normalize(a), code_matrix(near, z, 8)


def test_layers_equal_the_dense_formula_and_a_batch_its_receptive_field(small):
    x, a, s, z = small
    p = GradNetParams(dims=[16, 8], concat=True)
    model = GradNet(x.shape[1] + 8, p)
    h0 = features(x, z, np.arange(len(x))).astype(np.float64)
    sd = s.toarray().astype(np.float64)
    w = {k: v.astype(np.float64) for k, v in model.weights().items()}
    h, outs = h0, [h0]
    for layer in (1, 2):  # eq. 16, then ℓ2 normalisation (no dropout at inference)
        pre = (h + sd @ h) @ w[f"w1_{layer}"] + sd @ ((sd @ h) * h) @ w[f"w2_{layer}"]
        h = np.where(pre > 0, pre, 0.01 * pre)
        h = h / np.linalg.norm(h, axis=1, keepdims=True)
        outs.append(h)
    ref = np.hstack(outs)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(embed_nodes(model, s, x, z, np.arange(len(x))), ref, atol=1e-5)
    nodes = np.array([3, 30, 77])
    sets, _ = receptive_field(s, nodes, 4)  # two hops a layer
    assert len(sets[0]) < len(x) or a.nnz > 0
    np.testing.assert_allclose(embed_nodes(model, s, x, z, nodes), ref[nodes], atol=1e-5)


@pytest.mark.parametrize("concat", [False, True])
def test_streamed_inference_over_row_blocks_equals_the_receptive_field_forward(small, concat):
    x, a, s, z = small
    model = GradNet(x.shape[1] + 8, GradNetParams(dims=[16, 8], concat=concat))
    train_steps(model, s, a, x, z, 0, 3)  # weights off their initial values
    want = embed_nodes(model, s, x, z, np.arange(len(x)))
    allocated: list[tuple] = []

    def scratch(shape: tuple) -> np.ndarray:
        allocated.append(shape)
        return np.full(shape, np.nan, np.float32)  # nothing may be read before it is written

    out = np.full(want.shape, np.nan, np.float32)
    embed_all(model, s, x, z, out, scratch, block=7)  # blocks that cut across every neighbourhood
    np.testing.assert_allclose(out, want, atol=2e-6)
    assert max(shape[1] for shape in allocated) == x.shape[1] + 8  # the widest array: the input features


def test_sparse_codes_lie_on_the_simplex_and_beat_any_single_anchor():
    rng = np.random.default_rng(0)
    assert np.allclose(project_simplex(np.array([[0.2, 0.9, -1.0]])), [[0.15, 0.85, 0.0]])
    u = rng.normal(size=(20, 6))
    x = 0.5 * u[3] + 0.3 * u[7] + 0.2 * u[11] + 0.01 * rng.normal(size=6)
    near, z = sparse_codes(x[None], u, 20)  # every anchor allowed: the mixture is recovered
    assert np.isclose(z.sum(), 1) and np.all(z >= 0)
    assert np.linalg.norm(x - z[0] @ u[near[0]]) < 0.05
    near, z = sparse_codes(x[None], u, 4)  # four nearest: the constrained optimum (against a generic solver)
    from scipy.optimize import minimize

    uc = u[near[0]]
    ref = minimize(
        lambda w: ((x - w @ uc) ** 2).sum(),
        np.full(4, 0.25),
        method="SLSQP",
        bounds=[(0, 1)] * 4,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        options={"ftol": 1e-14},
    )
    assert ((x - z[0] @ uc) ** 2).sum() <= ref.fun + 1e-8 and np.isclose(z.sum(), 1) and np.all(z >= 0)


def test_sextets_take_neighbours_and_non_neighbours(small):
    _, a, *_ = small
    six = sextets(a, 200, np.random.default_rng(1))
    for i, j, k, m, u, v in six:
        assert a[i, j] != 0 and a[k, m] != 0 and a[i, u] == 0 and a[k, v] == 0 and u != i and v != k


def test_gradnet_beats_plain_knn_on_a_toy_manifold_and_qfe_follows_the_database():
    from operators.metrics import average_precision, positive_ranks

    x, labels = curves()
    n, ids = len(x), np.arange(len(x))
    _, nn = knn_blocks(x, [(ids, x)], 15, exclude=ids)
    # α = 0: the quadruplet term's 1e5 suits descriptors whose unrelated pairs have cosine ≈ 0; here every pair
    # has ≈ 0.98 and the term swamps BPR (mAP with these settings: benchmarks/toy_manifold.py)
    p = GradNetParams(k=10, anchors=12, codes=3, dims=[128, 64], lr=3e-3, alpha=0.0, max_steps=400)
    a = mutual_adjacency(nn, x, p.k)
    s = sym_normalize(a)
    near, z = sparse_codes(x, x[np.random.default_rng(0).choice(n, p.anchors, replace=False)], p.codes)
    z = code_matrix(near, z, p.anchors)
    model = GradNet(x.shape[1] + p.anchors, p)
    losses: list[float] = []
    train_steps(model, s, a, x, z, 0, p.max_steps, log=lambda t, v: losses.append(v))
    h = embed_nodes(model, s, x, z, ids)

    def m_ap(v: np.ndarray, queries: np.ndarray, qv: np.ndarray) -> float:
        _, rows = knn_blocks(qv, [(ids, v)], n - 1, exclude=queries)
        return float(
            np.mean(
                [
                    average_precision(
                        *positive_ranks(
                            rows[j], np.flatnonzero((labels == labels[q]) & (ids != q)), np.zeros(0, np.int64)
                        )
                    )
                    for j, q in enumerate(queries)
                ]
            )
        )

    queries = ids[::5]
    base, got = m_ap(x, queries, x[queries]), m_ap(h, queries, h[queries])
    assert got > base + 0.1, (base, got)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    sims, top = knn_blocks(x[queries], [(ids, x)], p.k, exclude=queries)  # QFE: each query by its K neighbours
    assert m_ap(h, queries, qfe(top, sims, h)) > base + 0.1
    with torch.no_grad():  # dropout is a training-time thing only
        blocks = [to_torch_sparse(s)] * 4
        x0 = torch.from_numpy(features(x, z, ids))
        assert torch.equal(model.forward(blocks, x0), model.forward(blocks, x0))
