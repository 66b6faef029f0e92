"""Graphs, diffusion, FSR, hybrid and αQE against hand-computed graphs, direct solves and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from operators.diffusion import cg, combine_product, seeds, temporal, top_k, truncated
from operators.graph import affinity, components, largest_component, normalize
from operators.knn import knn_blocks
from operators.qe import expand
from operators.spectral import (
    chebyshev_filter,
    eigenpairs,
    fsr,
    fsr_embeddings,
    fsr_weighted,
    h_filter,
    hybrid,
    project,
    reconstruct,
    sparsify,
)


def clustered(n: int = 240, d: int = 16, clusters: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(clusters, d))[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def knn_graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(len(x))
    sims, nn = knn_blocks(x, [(ids, x)], k, exclude=ids)
    return nn, sims


@pytest.fixture(scope="module")
def graph():
    x = clustered()
    nn, sims = knn_graph(x, 10)
    w = affinity(nn, sims, gamma=3.0)
    return x, nn, sims, w, normalize(w)


def test_affinity_mutual_union_gamma_and_normalisation_by_hand():
    # 4 items; kNN lists (k = 2) with similarities chosen by hand
    ids = np.array([[1, 2], [0, 3], [0, 1], [1, 0]])
    sims = np.array([[0.9, 0.5], [0.9, 0.4], [0.5, 0.3], [0.4, 0.2]])
    w = affinity(ids, sims, gamma=3.0, mode="mutual").toarray()
    # mutual pairs: (0,1) both ways 0.9; (0,2) both ways 0.5; (1,3) both ways 0.4; 2→1 but not 1→2; 3→0 not 0→3
    expect = np.zeros((4, 4))
    for i, j, s in [(0, 1, 0.9), (0, 2, 0.5), (1, 3, 0.4)]:
        expect[i, j] = expect[j, i] = s**3
    np.testing.assert_allclose(w, expect)
    u = affinity(ids, sims, gamma=1.0, mode="union").toarray()
    assert u[2, 1] == pytest.approx(0.3) and u[1, 2] == pytest.approx(0.3)  # one direction only: A + Aᵀ
    assert u[0, 1] == pytest.approx(1.8)
    s = normalize(sp.csr_matrix(expect)).toarray()
    d = expect.sum(1)
    np.testing.assert_allclose(s, expect / np.sqrt(np.outer(d, d)))
    assert np.allclose(s, s.T) and np.all(np.diag(s) == 0)
    # an isolated node keeps a zero row (0/0 = 0)
    iso = normalize(sp.csr_matrix(np.pad(expect, ((0, 1), (0, 1))))).toarray()
    assert np.all(iso[4] == 0) and np.isfinite(iso).all()
    assert components(sp.csr_matrix(expect))[0] == 1


def test_cg_equals_direct_sparse_solve(graph):
    _, nn, sims, w, s = graph
    n = s.shape[0]
    y = seeds(n, nn[:7], sims[:7], kq=10)
    f = temporal(s, y, alpha=0.99, tol=1e-12, maxiter=2000)
    direct = spla.spsolve(sp.csc_matrix(sp.identity(n) - 0.99 * s), 0.01 * y)
    np.testing.assert_allclose(f, direct, atol=1e-6 * np.abs(direct).max(), rtol=0)


def test_batched_cg_follows_scipy_cg_iterate_by_iterate(graph):
    _, nn, sims, _, s = graph
    n = s.shape[0]
    y = seeds(n, nn[:4], sims[:4])
    a = sp.identity(n) - 0.99 * s
    for iters in (1, 3, 8):
        ours = temporal(s, y, tol=0.0, maxiter=iters)
        for j in range(y.shape[1]):
            ref, _ = spla.cg(a, 0.01 * y[:, j], rtol=0.0, atol=0.0, maxiter=iters)
            np.testing.assert_allclose(ours[:, j], ref, rtol=1e-9, atol=1e-12)


def test_cg_stops_per_column():
    a = sp.diags(np.linspace(1, 2, 50)).tocsr()
    b = np.zeros((50, 2))
    b[0, 0] = 1.0  # converges in one iteration (an eigenvector)
    b[:, 1] = 1.0
    x, iters = cg(lambda p: a @ p, b, tol=1e-10, maxiter=100)
    assert iters[0] == 1 and iters[1] > 1
    np.testing.assert_allclose(a @ x, b, atol=1e-8)


def test_truncated_on_whole_database_equals_full_and_renormalises_subgraph(graph):
    _, nn, sims, w, s = graph
    n = s.shape[0]
    y = seeds(n, nn[:3], sims[:3])
    full = temporal(s, y, tol=1e-12, maxiter=2000)
    every = np.tile(np.arange(n), (3, 1))
    np.testing.assert_allclose(truncated(w, every, y.T, tol=1e-12, maxiter=2000).T, full, atol=1e-9)
    # a shortlist (in an arbitrary order, padded): the subgraph of W, re-normalised, solved directly
    rng = np.random.default_rng(1)
    short = np.stack([rng.permutation(n)[:60] for _ in range(3)])
    short[1, -5:] = -1
    ys = np.take_along_axis(y.T, np.maximum(short, 0), 1) * (short >= 0)
    got = truncated(w, short, ys, tol=1e-12, maxiter=2000)
    for j in range(3):
        nodes = short[j][short[j] >= 0]
        sub = normalize(w[nodes][:, nodes])
        ref = spla.spsolve(sp.csc_matrix(sp.identity(len(nodes)) - 0.99 * sub), 0.01 * ys[j, : len(nodes)])
        np.testing.assert_allclose(got[j, : len(nodes)], ref, atol=1e-8)
        assert np.all(got[j, len(nodes) :] == 0)


def test_full_rank_fsr_equals_closed_form(graph):
    _, nn, sims, _, s = graph
    n = s.shape[0]
    y = seeds(n, nn[:5], sims[:5])
    lam, u = eigenpairs(s, n, method="dense")
    closed = 0.01 * np.linalg.solve(np.eye(n) - 0.99 * s.toarray(), y)
    np.testing.assert_allclose(fsr(u, lam, y), closed, atol=1e-9)
    e = fsr_embeddings(u, lam)
    np.testing.assert_allclose(e @ (e.T @ y), closed, atol=1e-9)  # the embedding view: K = ΦᵀΦ
    assert np.all(np.diff(lam) <= 1e-12) and lam[0] == pytest.approx(1.0)


def test_lanczos_and_simultaneous_iteration_find_the_top_eigenpairs(graph):
    w = graph[3]
    lcc = largest_component(w)  # eigenvalue 1 is simple there; Lanczos misses repeated ones
    assert 20 < len(lcc) < w.shape[0]
    s = normalize(w[lcc][:, lcc])
    exact = np.linalg.eigvalsh(s.toarray())[::-1][:20]
    lam_l, u_l = eigenpairs(s, 20, method="lanczos")
    np.testing.assert_allclose(lam_l, exact, atol=1e-8)
    lam_s, u_s = eigenpairs(s, 20, method="simultaneous", oversample=30, iters=60)
    np.testing.assert_allclose(lam_s, exact, atol=1e-3)
    np.testing.assert_allclose(u_l.T @ u_l, np.eye(20), atol=1e-8)
    for dtype, tol in ((np.float64, 1e-7), (np.float32, 1e-4)):
        lam_c, u_c = eigenpairs(s, 20, method="chebyshev", oversample=10, iters=200, tol=tol, dtype=dtype, degree=8)
        assert u_c.dtype == dtype
        resid = np.linalg.norm(s.astype(dtype) @ u_c - u_c * lam_c.astype(dtype), axis=0)
        assert resid.max() <= tol * 1.01
        np.testing.assert_allclose(lam_c, exact, atol=10 * tol)
        np.testing.assert_allclose(
            u_c.T @ u_c, np.eye(20), atol=100 * np.finfo(dtype).eps ** 0.5 if dtype == np.float32 else 1e-10
        )


def test_chebyshev_filter_and_fused_product(graph):
    s = graph[4]
    n = s.shape[0]
    rng = np.random.default_rng(3)
    p, out = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
    want = 0.3 * (s @ p) - 2.0 * p + 0.7 * out
    np.testing.assert_allclose(combine_product(s, p, 0.3, -2.0, 0.7, out), want, atol=1e-12)
    np.testing.assert_allclose(combine_product(s, np.asfortranarray(p), 1.0, 0.0, 0.0, out), s @ p, atol=1e-12)
    with pytest.raises(ValueError):
        combine_product(s, p, 1.0, 0.0, 0.0, np.asfortranarray(out))
    # the scaled recurrence equals T_d(t(S)) X / T_d(t(1)) computed on the eigenvalues
    lam, v = np.linalg.eigh(s.toarray())
    x = rng.normal(size=(n, 2))
    cut, deg = 0.5, 7

    def t_d(x):  # T_d(t(x)), t mapping [−1, cut] onto [−1, 1]
        return np.polynomial.chebyshev.chebval((2 * x - cut + 1) / (cut + 1), [0] * deg + [1])

    cheb = t_d(lam) / t_d(1.0)
    np.testing.assert_allclose(chebyshev_filter(s, x.copy(), deg, cut), v @ (cheb[:, None] * (v.T @ x)), atol=1e-10)


def test_sparse_low_rank_products_equal_dense():
    rng = np.random.default_rng(4)
    u = sparsify(rng.normal(size=(500, 30)), keep=0.1)
    z, c = rng.normal(size=(500, 7)), rng.normal(size=(30, 7))
    csr = sp.csr_matrix(u)
    np.testing.assert_allclose(project(csr, z), u.T @ z, atol=1e-12)
    np.testing.assert_allclose(reconstruct(csr, c), u @ c, atol=1e-12)
    out = rng.normal(size=(500, 7))
    np.testing.assert_allclose(reconstruct(csr, c, out.copy()), out + u @ c, atol=1e-12)
    np.testing.assert_allclose(fsr(csr, np.linspace(0.9, 0.1, 30), z), fsr(u, np.linspace(0.9, 0.1, 30), z), atol=1e-12)


def test_hybrid_converges_to_the_exact_solution(graph):
    _, nn, sims, _, s = graph
    n = s.shape[0]
    y = seeds(n, nn[:5], sims[:5])
    exact = 0.01 * np.linalg.solve(np.eye(n) - 0.99 * s.toarray(), y)
    lam, u = eigenpairs(s, 30, method="lanczos")
    errs = [np.abs(hybrid(s, u, lam, y, iters=it) - exact).max() for it in (0, 2, 5, 10, 40, 200)]
    assert errs[-1] < 1e-8 * np.abs(exact).max()
    assert all(b <= a * 1.0001 for a, b in zip(errs, errs[1:])), errs
    # with the top eigenpairs removed, few CG iterations reach what temporal CG needs many more for
    temporal_err = np.abs(temporal(s, y, tol=0.0, maxiter=5) - exact).max()
    assert errs[2] < temporal_err


def test_shybrid_is_basis_independent_and_approaches_hybrid_as_more_of_u_is_kept():
    """SHybrid: a sparsified U is no longer an exact eigenbasis, so the split is an approximation
    (T:20425-20431). Tested on a connected graph (the spectral stage decomposes the largest
    component), where the top eigenvalues are simple: then U — and what sparsifying keeps — is the
    same whichever solver or LAPACK / ARPACK build computed it. (On a graph of many components λ = 1
    repeats and any basis of its eigenspace is returned; SHybrid's error there moved from 0.004 to
    0.069 between builds.)"""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 16))[rng.integers(0, 12, 240)] + 0.8 * rng.normal(size=(240, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    w = affinity(*knn_graph(x, 10), gamma=3.0)
    lcc = largest_component(w)
    s = normalize(sp.csr_matrix(w[lcc][:, lcc]))
    n = s.shape[0]
    y = np.zeros((n, 3))
    y[[0, n // 2, n - 1], [0, 1, 2]] = 1.0
    exact = 0.01 * np.linalg.solve(np.eye(n) - 0.99 * s.toarray(), y)
    lam, u = eigenpairs(s, 30, method="lanczos")
    lam_d, u_d = eigenpairs(s, 30, method="dense")
    assert np.all(-np.diff(lam) > 1e-5)  # simple eigenvalues: the basis is unique up to signs
    np.testing.assert_allclose(
        hybrid(s, sparsify(u, 0.3), lam, y, iters=5), hybrid(s, sparsify(u_d, 0.3), lam_d, y, iters=5), atol=1e-8
    )
    us = sparsify(u, keep=0.3)
    assert np.count_nonzero(us) <= 0.31 * us.size
    np.testing.assert_allclose(
        hybrid(s, sp.csr_matrix(us), lam, y, iters=5), hybrid(s, us, lam, y, iters=5), atol=1e-12
    )
    scale = np.abs(exact).max()
    errs = [
        np.abs(hybrid(s, sparsify(u, keep), lam, y, iters=400) - exact).max() / scale for keep in (0.1, 0.3, 0.7, 1.0)
    ]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-8
    # 5 iterations with 30% of U beat 5 iterations of temporal CG (measured: 0.155 vs 0.256)
    shybrid5 = np.abs(hybrid(s, us, lam, y, iters=5) - exact).max() / scale
    assert shybrid5 < np.abs(temporal(s, y, tol=0.0, maxiter=5) - exact).max() / scale


def test_filters_and_top_k():
    assert h_filter(np.array([1.0]), 0.99)[0] == pytest.approx(1.0)
    f = np.array([[0.1, 0.5], [0.9, 0.5], [0.3, 0.7]])
    s, i = top_k(f, 2, exclude=np.array([1, -1]))
    np.testing.assert_array_equal(i, [[2, 0], [2, 0]])  # column 1: tie 0.5/0.5 broken by index
    np.testing.assert_allclose(s, [[0.3, 0.1], [0.7, 0.5]])


def test_alpha_qe_by_hand():
    q = np.array([[1.0, 0.0]])
    nb = np.array([[[0.0, 1.0], [np.sqrt(0.5), np.sqrt(0.5)]]])
    sims = np.array([[0.5, -0.2]])
    got = expand(q, nb, sims, alpha=3.0, n=50)
    want = np.array([1.0, 0.125])  # q + 0.5³·x₁ + 0·x₂ (negative similarity)
    np.testing.assert_allclose(got[0], want / np.linalg.norm(want), rtol=1e-6)
    aqe = expand(q, nb, sims, alpha=0.0, n=1)  # AQE over the first result only
    np.testing.assert_allclose(aqe[0], np.array([1.0, 1.0]) / np.sqrt(2), rtol=1e-6)


def curves(n_curves: int = 6, per: int = 80, d: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points along smooth random closed curves on the sphere: a manifold per object, curves close to each other."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 2 * np.pi, per, endpoint=False)
    xs, labels = [], []
    base = rng.normal(size=d)
    for c in range(n_curves):
        a, b = rng.normal(size=(2, d))
        x = base + 0.6 * np.outer(np.cos(t), a) + 0.6 * np.outer(np.sin(t), b) + 0.02 * rng.normal(size=(per, d))
        xs.append(x), labels.append(np.full(per, c))
    x = np.concatenate(xs)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.concatenate(labels)


def test_diffusion_helps_on_manifolds_and_truncation_keeps_the_initial_tail():
    from operators.metrics import average_precision, positive_ranks
    from operators.rerank import Graph, RerankParams, rerank

    x, labels = curves()
    n = len(x)
    nn, sims = knn_graph(x, 10)
    w = affinity(nn, sims)
    s = normalize(w)
    lam, u = eigenpairs(s, 40, method="dense")
    g = Graph.build(w, u, lam)
    queries = np.arange(0, n, 7)
    init_s, init_r = knn_blocks(x[queries], [(np.arange(n), x)], n - 1, exclude=queries)

    def m_ap(rows: np.ndarray) -> float:
        aps = []
        for j, q in enumerate(queries):
            pos = np.flatnonzero((labels == labels[q]) & (np.arange(n) != q))
            ranks, n_pos = positive_ranks(rows[j][rows[j] >= 0], pos, np.zeros(0, np.int64))
            aps.append(average_precision(ranks, n_pos))
        return float(np.mean(aps))

    p = RerankParams(shortlist=100)
    base = m_ap(init_r)
    got = {
        m: m_ap(rerank(m, g, init_r, init_s, queries, n - 1, p)[0]) for m in ("dfs", "truncated-dfs", "fsr", "hybrid")
    }
    got["shybrid"] = m_ap(rerank("hybrid", g, init_r, init_s, queries, n - 1, RerankParams(sparse_keep=0.05))[0])
    assert min(got["dfs"], got["fsr"], got["hybrid"], got["shybrid"]) > base + 0.3, (base, got)  # 0.49 → 1.0 measured
    assert got["truncated-dfs"] > base + 0.01, (base, got)  # limited by its shortlist
    # truncated: the items beyond the shortlist keep their initial order
    r, _ = rerank("truncated-dfs", g, init_r, init_s, queries, n - 1, p)
    for j in range(len(queries)):
        assert set(r[j, :100]) == set(init_r[j, :100])
        np.testing.assert_array_equal(r[j, 100:], init_r[j, 100:])
    assert not np.any(r == queries[:, None])


def test_fsrw_blends_manifold_and_euclidean_scores_by_row_norm():
    u = np.array([[1.0, 0.0], [0.6, 0.0], [0.0, 0.0]])  # η = 1, 0.6, 0 (a row outside the decomposition)
    x = np.array([[0.5], [0.2], [0.0]])
    q_sims = np.array([[0.9], [0.8], [0.7]])
    want = x + np.array([[0.0], [0.4 * 0.8], [0.7]])  # x_i + (1 − η_i) v_iᵀq (T:19561-19580)
    np.testing.assert_allclose(fsr_weighted(x.copy(), u, q_sims), want)
    np.testing.assert_allclose(fsr_weighted(x.copy(), sp.csr_matrix(u), q_sims), want)
