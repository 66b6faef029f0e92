"""Mining on manifolds on two interleaved spirals, where the answer is known: positives lie along
the anchor's own spiral, negatives on the other one."""

from __future__ import annotations

import numpy as np

from operators.centrality import modes, stationary
from operators.diffusion import temporal, top_k
from operators.graph import affinity, normalize
from operators.mining import MiningParams, effective_sizes, pools


def spirals(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.random(n)) * 3 * np.pi + np.pi / 2
    label = np.arange(n) % 2
    r = t / (3 * np.pi)
    x = np.stack([r * np.cos(t + np.pi * label), r * np.sin(t + np.pi * label)], 1)
    return x + rng.normal(0, 0.004, x.shape), label


def test_pools_follow_the_manifold_on_two_spirals():
    x, label = spirals()
    n = len(x)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1)[:, 1:]
    knn = order[:, :10]
    sims = np.exp(-np.take_along_axis(d2, knn, 1) / 0.002)
    w = affinity(knn, sims, gamma=1.0)
    pi = stationary(w)
    anchors = modes(w, pi)[:20]
    assert len(anchors) >= 5
    f = temporal(normalize(w), np.eye(n)[:, anchors], alpha=0.99, tol=1e-8, maxiter=500)
    k_pos, k_neg, cap = 40, 40, 50
    m_scores, m_rows = top_k(f, k_neg, exclude=anchors)
    e_rows = order[anchors][:, :k_neg]  # Euclidean neighbours, self excluded
    e_scores = -np.take_along_axis(d2[anchors], e_rows, 1)
    positives, negatives = pools(m_rows, m_scores, e_rows, e_scores, k_pos, k_neg, cap)
    same = [label[r] == label[a] for a, (r, _) in zip(anchors, positives)]
    across = [label[r] != label[a] for a, (r, _) in zip(anchors, negatives)]
    n_pos, n_neg = sum(len(s) for s in same), sum(len(s) for s in across)
    assert n_pos > 0 and n_neg > 0
    assert np.concatenate(same).mean() > 0.95  # along the anchor's own spiral
    assert np.concatenate(across).mean() > 0.9  # near in the plane, on the other spiral
    for a, (r, s) in zip(anchors, positives):  # set differences and order
        assert not set(r.tolist()) & set(e_rows[list(anchors).index(a)][:k_pos].tolist())
        assert np.all(np.diff(s) <= 0) and a not in r
    # plain Euclidean neighbours at the same rank depth are far less pure across the spirals' gaps
    euclid_same = np.mean([label[e_rows[j][:k_pos]] == label[a] for j, a in enumerate(anchors)])
    assert np.concatenate(same).mean() > euclid_same


def test_pool_set_differences_by_hand():
    m_ids = np.array([[5, 6, 7, 8, -1]])
    m_s = np.array([[0.9, 0.5, 0.4, 0.0, 0.0]])  # 8 not reached (f = 0)
    e_ids = np.array([[6, 9, 10, 8, 5]])
    e_s = np.array([[0.99, 0.98, 0.7, 0.6, 0.5]])
    ((pos, neg),) = zip(*pools(m_ids, m_s, e_ids, e_s, k_pos=3, k_neg=4, cap=50))
    assert pos[0].tolist() == [5, 7]  # manifold top-3 {5,6,7} minus Euclidean top-3 {6,9,10}
    assert neg[0].tolist() == [9, 10, 8]  # Euclidean top-4 minus manifold top-4 (reached: 5,6,7)
    assert effective_sizes(MiningParams(), 1_000_000) == (1500, 50, 10000)
    assert effective_sizes(MiningParams(), 186) == (16, 46, 46)


def test_shared_components_counts_every_image_pair_of_every_component():
    from operators.mining import shared_components

    # components {0,1,2}, {1,2}, {3,4}; one singleton {5}
    indptr = np.array([0, 3, 5, 7, 8])
    members = np.array([2, 0, 1, 1, 2, 4, 3, 5])
    keys, counts = shared_components(indptr, members, 10)
    got = {(int(k) // 10, int(k) % 10): int(c) for k, c in zip(keys, counts)}
    assert got == {(0, 1): 1, (0, 2): 1, (1, 2): 2, (3, 4): 1}


def test_component_positives_both_directions_capped_per_anchor():
    from operators.mining import component_positives

    n = 10  # pairs (0,1) share 3, (0,2) 1, (1,2) 2, (3,4) 1
    key, shared = np.array([0 * n + 1, 0 * n + 2, 1 * n + 2, 3 * n + 4]), np.array([3, 1, 2, 1])
    a, b, s = component_positives(key, shared, n, cap=1)
    assert list(zip(a.tolist(), b.tolist(), s.tolist())) == [(0, 1, 3), (1, 0, 3), (2, 1, 2), (3, 4, 1), (4, 3, 1)]
    a, b, s = component_positives(key, shared, n, cap=5)
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 1), (2, 0), (3, 4), (4, 3)]


def test_graph_negatives_skip_positives_padding_and_unknown_anchors():
    from operators.mining import graph_negatives

    ids = np.array([10, 11, 12, 13])  # image id of each graph row
    knn_ids = np.array([[1, 2, 3], [0, -1, -1], [3, 0, 1], [2, 1, 0]])
    knn_sims = np.array([[0.9, 0.8, 0.7], [0.9, 0, 0], [0.6, 0.5, 0.4], [0.6, 0.3, 0.2]])
    a, o, s = graph_negatives(np.array([10, 11, 99]), ids, knn_ids, knn_sims, {(10, 12)}, cap=1)
    assert a.tolist() == [10, 11] and o.tolist() == [11, 10] and s.tolist() == [0.9, 0.9]
    a, o, _ = graph_negatives(np.array([10]), ids, knn_ids, knn_sims, {(10, 12)}, cap=5)
    assert o.tolist() == [11, 13]


def test_mode_anchors_on_the_largest_component_or_all():
    import scipy.sparse as sp

    from operators.mining import mode_anchors

    # a star around 1 (nodes 0-3) and an edge 4-5: π = degree / 10, modes 1 (π 0.3) and 4 (tie broken by index)
    r, c, v = [1, 1, 1, 4], [0, 2, 3, 5], [1.0, 1.0, 1.0, 2.0]
    w = sp.csr_matrix((v + v, (r + c, c + r)), shape=(6, 6))
    chosen, info = mode_anchors(w, 5)
    assert chosen.tolist() == [1]
    assert info == {"nodes": 6, "lcc": 4, "components": 2, "modes": 2, "eligible_modes": 1}
    assert mode_anchors(w, 5, "all", min_component=2)[0].tolist() == [1, 4]
    assert mode_anchors(w, 1, "all", min_component=2)[0].tolist() == [1]
    assert mode_anchors(w, 5, "all", min_component=3)[0].tolist() == [1]
