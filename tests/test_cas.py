"""CAS: the iterative diffusion against direct solves, its divergence and paths by hand, a toy manifold."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
from scipy.sparse.csgraph import floyd_warshall
from test_diffusion import clustered, curves

from operators.cas import (
    CasParams,
    affinity,
    bidirectional_diffusion,
    candidates,
    cas_distances,
    cas_query_distances,
    confident,
    js_divergence,
    normalized_distances,
    path_distances,
    ranking,
    sym_normalize,
)


@pytest.fixture(scope="module")
def problem():
    x = clustered(n=40, d=8, clusters=4, seed=5)
    d = normalized_distances(x)
    rank = ranking(d)
    sim = np.exp(-d / 0.3**2)
    conf = confident(rank, 6)
    return x, d, rank, sim, conf, affinity(sim, rank, conf, 6, 2.0)


def test_diffusion_converges_to_the_direct_lyapunov_solve(problem):
    *_, w = problem
    mu = 0.23
    alpha = 1 / (1 + mu)
    a = np.eye(len(w)) - alpha * sym_normalize(w)
    direct = sla.solve_sylvester(a, a, 2 * (1 - alpha) * np.eye(len(w)))  # (I − αS)F + F(I − αS) = 2(1 − α)I
    np.testing.assert_allclose(bidirectional_diffusion(w, mu, 300), direct, atol=1e-10)
    assert not np.allclose(bidirectional_diffusion(w, mu, 3), direct, atol=1e-3)  # 10 iterations (EXT) do not converge


def loop_candidates(rank: np.ndarray, k2: int) -> np.ndarray:
    """EXT candidate_expansion re-stated as dense passes: for each row's t-th item j that is a candidate, add
    R(j, k2/2) when more than 2/3 of it is already among the row's mutual top-(k2 + 1)."""
    m = len(rank)

    def mutual(k: int) -> np.ndarray:
        top = np.zeros((m, m))
        top[np.repeat(np.arange(m), min(k, m)), rank[:, :k].ravel()] = 1
        return top * top.T

    base, half = mutual(k2 + 1), mutual(k2 // 2 + 1)
    out, rows = base.copy(), np.arange(m)
    for t in range(min(k2 + 1, m)):
        j = rank[:, t]
        ext = half[j]
        grow = (ext * base).sum(1) * base[rows, j] > 2 / 3 * ext.sum(1)
        out[grow] = np.maximum(out[grow], ext[grow])
    return out


@pytest.mark.parametrize("k2", [4, 8, 20, 60])
def test_sparse_candidates_equal_the_reference_expansion(problem, k2):
    x, _, rank, *_ = problem
    rank2 = ranking(normalized_distances(clustered(n=150, d=8, clusters=5, seed=9)))
    for r in (rank, rank2):
        np.testing.assert_array_equal(candidates(r, k2), loop_candidates(r, k2))
    top = np.zeros((150, 150))
    top[np.repeat(np.arange(150), 21), rank2[:, :21].ravel()] = 1
    assert candidates(rank2, 20).sum() > (top * top.T).sum()  # the expansion adds items here


def test_local_diffusion_solves_the_lyapunov_equation_on_the_clusters(problem):
    *_, rank, _, _, w = problem
    mask = candidates(rank, 8)
    assert 0 < mask.mean() < 0.6 and np.all(np.diag(mask) == 1)
    alpha = 1 / (1 + 0.23)
    n = len(w)
    s = sym_normalize(w)
    # vec(F) column-major: vec(SF) = (I ⊗ S) vec F, vec(FS) = (Sᵀ ⊗ I) vec F; keep the mask's unknowns and equations
    op = np.eye(n * n) - 0.5 * alpha * (np.kron(np.eye(n), s) + np.kron(s.T, np.eye(n)))
    on = np.flatnonzero(mask.ravel(order="F"))
    f = np.zeros(n * n)
    f[on] = np.linalg.solve(op[np.ix_(on, on)], (1 - alpha) * np.eye(n).ravel(order="F")[on])
    np.testing.assert_allclose(bidirectional_diffusion(w, 0.23, 300, mask), f.reshape(n, n, order="F"), atol=1e-10)


def test_js_divergence_and_capped_paths_by_hand(problem):
    p, q = np.array([[0.5, 0.5, 0.0]]), np.array([[0.0, 0.5, 0.5]])
    assert js_divergence(p, q)[0] == pytest.approx(0.5)  # ½(½·1 + ½·0) + ½(½·1 + ½·0) in bits
    assert js_divergence(p, p)[0] == 0 and js_divergence(p, np.array([[0, 0, 1.0]]))[0] == pytest.approx(1.0)
    x, d, rank, *_ = problem
    feat = np.abs(np.random.default_rng(0).normal(size=(len(x), len(x)))) ** 3
    feat /= feat.sum(1, keepdims=True)
    # the reference: a dense matrix of 50s, JS on each row's top-k, min with its transpose, all pairs (Floyd–Warshall)
    k = 5
    dense = np.full((len(x), len(x)), 50.0)
    for i in range(len(x)):
        dense[i, rank[i, :k]] = js_divergence(feat[[i]].repeat(k, 0), feat[rank[i, :k]])
    np.fill_diagonal(dense, 0)
    ref = np.minimum(floyd_warshall(np.minimum(dense, dense.T)), 50)
    np.testing.assert_allclose(path_distances(feat, rank, k, 50.0, np.array([0, 7])), ref[[0, 7]], atol=1e-12)


def test_cas_beats_plain_knn_on_a_toy_manifold_and_a_query_sees_its_shortlist():
    from operators.metrics import average_precision, positive_ranks

    x, labels = curves()
    n = len(x)
    queries = np.arange(0, n, 9)
    p = CasParams()
    dist = cas_distances(x, p, queries)
    base_d = normalized_distances(x)[queries]

    def m_ap(dd: np.ndarray) -> float:
        aps = []
        for j, q in enumerate(queries):
            order = np.argsort(dd[j], kind="stable")
            order = order[order != q]
            pos = np.flatnonzero((labels == labels[q]) & (np.arange(n) != q))
            aps.append(average_precision(*positive_ranks(order, pos, np.zeros(0, np.int64))))
        return float(np.mean(aps))

    base, got = m_ap(base_d), m_ap(dist)
    assert got > base + 0.1, (base, got)
    # the query-time form: a query (not in the problem) against its shortlist, row 0 of the same computation
    q = x[0] + 0.01 * np.random.default_rng(1).normal(size=x.shape[1])
    q /= np.linalg.norm(q)
    short = np.argsort(-(x @ q))[:200]
    got_q = cas_query_distances(q, x[short], p)
    np.testing.assert_allclose(got_q, cas_distances(np.vstack([q, x[short]]), p, np.array([0]))[0, 1:])
    assert got_q.shape == (200,) and np.all(got_q >= 0)


def test_js_over_the_support_equals_the_full_sum():
    from operators.cas import js_to_rows

    rng = np.random.default_rng(2)
    a = np.where(rng.random((6, 30)) < 0.4, rng.random((6, 30)), 0)
    a /= a.sum(1, keepdims=True)
    np.testing.assert_allclose(js_to_rows(a[0], a), js_divergence(a[[0]].repeat(6, 0), a), atol=1e-12)


def test_a_problem_smaller_than_the_neighbourhoods_still_ranks_every_item():
    x = clustered(n=9, d=8, clusters=3, seed=6)
    got = cas_distances(x, CasParams(), np.arange(9))
    assert got.shape == (9, 9) and np.all(np.isfinite(got)) and np.all(np.diag(got) <= got.min(1) + 1e-12)


def test_one_query_over_its_whole_database_equals_the_dense_all_pairs_reference():
    """The reference's order (diffusion on the whole matrix, masked once) and all-pairs shortest paths on the
    query and the database in one dense problem; ours: that query's problem, Dijkstra from it alone."""
    from operators.cas import path_graph, propagate, smooth

    x = clustered(n=120, d=8, clusters=4, seed=11)
    p = CasParams(local=False, k2=20, k3=25, k5=30, paths=30)
    d = normalized_distances(x)
    rank = ranking(d)
    sim = np.exp(-d / p.sigma**2)
    conf, cand = confident(rank, p.k1), candidates(rank, p.k2)
    f = bidirectional_diffusion(affinity(sim, rank, conf, p.k1, p.confident_weight), p.mu, p.iters) * cand
    feat = propagate(smooth(f, cand, conf, sim, rank, p.k3, p.beta), rank, conf, p.k4, p.k5, p.kappa)
    path = np.minimum(floyd_warshall(path_graph(feat, rank, p.paths).toarray(), directed=False), p.max_dist)
    dense = (1 - p.lam) * path + p.lam * d
    np.testing.assert_allclose(cas_query_distances(x[0], x[1:], p), dense[0, 1:], atol=1e-12)
