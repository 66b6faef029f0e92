"""Centrality against dense eigenvectors, power iteration and direct solves on small graphs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from operators.centrality import katz, modes, pagerank, power_iteration, stationary, transition
from operators.graph import normalize


def random_graph(n: int = 60, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    a = sp.random(n, n, density=0.08, random_state=rng, data_rvs=lambda k: rng.random(k) + 0.1)
    w = sp.csr_matrix(a + a.T)
    w.setdiag(0)
    w.eliminate_zeros()
    w = w.tolil()
    w[n - 1, :] = 0  # one isolated node
    w[:, n - 1] = 0
    return sp.csr_matrix(w)


def test_stationary_distribution_is_degree_over_total():
    w = random_graph()
    pi = stationary(w)
    p = transition(w).toarray()
    assert pi.sum() == pytest.approx(1.0) and np.allclose(pi @ p, pi, atol=1e-15)
    # the dense left eigenvector of P for eigenvalue 1, restricted to a connected component
    from scipy.sparse.csgraph import connected_components

    _, label = connected_components(w, directed=False)
    big = np.flatnonzero(label == np.bincount(label).argmax())
    vals, vecs = np.linalg.eig(p[np.ix_(big, big)].T)
    v = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
    assert np.allclose(v / v.sum(), pi[big] / pi[big].sum(), atol=1e-10)
    # power iteration from the uniform start on a connected, aperiodic graph (self-loops) reaches it
    conn = sp.csr_matrix(w[big][:, big] + sp.eye(len(big)))
    assert np.allclose(power_iteration(conn, tol=1e-14), stationary(conn), atol=1e-10)


def test_pagerank_is_the_google_matrix_eigenvector():
    w = random_graph(seed=1)
    n = w.shape[0]
    p = transition(w).toarray()
    p[p.sum(axis=1) == 0] = 1.0 / n  # dangling: uniform jump
    g = 0.85 * p + 0.15 / n
    vals, vecs = np.linalg.eig(g.T)
    v = np.real(vecs[:, np.argmax(np.real(vals))])
    assert np.allclose(pagerank(w, 0.85, tol=1e-14), v / v.sum(), atol=1e-10)


def test_katz_matches_a_direct_solve():
    w = random_graph(seed=2)
    n = w.shape[0]
    s = normalize(w)
    direct = spla.spsolve(sp.csc_matrix(sp.eye(n) - 0.9 * s), np.full(n, 0.1))
    assert np.allclose(katz(w, alpha=0.9, tol=1e-12), direct, rtol=1e-8, atol=1e-12)
    assert katz(w, alpha=0.9)[n - 1] == pytest.approx(0.1)  # an isolated node: only its own term


def test_modes_are_local_maxima_with_ties_to_the_smaller_index():
    # path 0-1-2-3-4-5 and a separate edge 6-7, scores with a tie between 6 and 7; node 8 isolated
    edges = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (6, 7)]
    r, c = zip(*edges)
    w = sp.csr_matrix((np.ones(len(edges)), (r, c)), shape=(9, 9))
    w = w + w.T
    score = np.array([0.1, 0.5, 0.2, 0.3, 0.9, 0.1, 0.4, 0.4, 1.0])
    assert modes(w, score).tolist() == [4, 1, 6]  # best first; 8 has no neighbour
