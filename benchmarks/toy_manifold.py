"""mAP of plain kNN, GSS, GRAD-Net and CAS on the tests' toy manifold (six closed curves on a sphere).

    .venv/bin/python benchmarks/toy_manifold.py

The settings of ``tests/test_gss.py``, ``tests/test_gradnet.py`` and ``tests/test_cas.py`` (which assert only
a margin over kNN); every 5th point a query (CAS: every 9th, as its test), its curve's other points positive.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_diffusion import curves  # noqa: E402

from operators import gradnet as GN  # noqa: E402
from operators import gss as GSS  # noqa: E402
from operators.cas import CasParams, cas_distances, normalized_distances  # noqa: E402
from operators.knn import knn_blocks  # noqa: E402
from operators.metrics import average_precision, positive_ranks  # noqa: E402


def m_ap(order: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> float:
    ids = np.arange(len(labels))
    return float(
        np.mean(
            [
                average_precision(
                    *positive_ranks(
                        o[o != q], np.flatnonzero((labels == labels[q]) & (ids != q)), np.zeros(0, np.int64)
                    )
                )
                for o, q in zip(order, queries)
            ]
        )
    )


def by_embedding(v: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return knn_blocks(v[queries], [(np.arange(len(v)), v)], len(v) - 1, exclude=queries)[1]


def main() -> None:
    x, labels = curves()
    n, ids = len(x), np.arange(len(x))
    q5 = ids[::5]
    print(f"kNN       {m_ap(by_embedding(x, q5), q5, labels):.3f}")
    _, nn = knn_blocks(x, [(ids, x)], 15, exclude=ids)
    p = GSS.GssParams(k=5, steps=200, lr=1e-3, batch=256)
    model = GSS.ResidualGCN(x.shape[1], p)
    a_hat = GSS.normalize_with_self(GSS.gss_adjacency(nn, x, p.k))
    GSS.train_steps(model, a_hat, x, GSS.automatic_beta(model, a_hat, x, p), 0, p.steps)
    print(f"GSS       {m_ap(by_embedding(GSS.embed_nodes(model, a_hat, x, ids), q5), q5, labels):.3f}")
    g = GN.GradNetParams(k=10, anchors=12, codes=3, dims=[128, 64], lr=3e-3, alpha=0.0, max_steps=400)
    a = GN.mutual_adjacency(nn, x, g.k)
    s = GN.sym_normalize(a)
    near, z = GN.sparse_codes(x, x[np.random.default_rng(0).choice(n, g.anchors, replace=False)], g.codes)
    z = GN.code_matrix(near, z, g.anchors)
    gm = GN.GradNet(x.shape[1] + g.anchors, g)
    GN.train_steps(gm, s, a, x, z, 0, g.max_steps)
    print(f"GRAD-Net  {m_ap(by_embedding(GN.embed_nodes(gm, s, x, z, ids), q5), q5, labels):.3f}  (α = 0)")
    q9 = ids[::9]
    knn_order = np.argsort(normalized_distances(x)[q9], axis=1, kind="stable")
    print(f"kNN       {m_ap(knn_order, q9, labels):.3f}  (CAS's queries)")
    print(f"CAS       {m_ap(np.argsort(cas_distances(x, CasParams(), q9), axis=1, kind='stable'), q9, labels):.3f}")


if __name__ == "__main__":
    main()
