"""Average and α-weighted query expansion on global descriptors (spec search.md §7).

αQE (T:2938-2945): the new query is the weighted average of the query and its top-n results, the
i-th result weighted by (f̄(q)ᵀf̄(i))^α, then ℓ2-normalised and issued again. α = 0 is AQE
(unit weights); defaults α = 3, n = 50 (T:3506-3515). The query itself enters with weight
1 = (f̄(q)ᵀf̄(q))^α, as in AQE's average of the query and its results (standard practice [ext]);
negative similarities get weight 0 for α > 0.
"""

from __future__ import annotations

import numpy as np


def expand(q: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float = 3.0, n: int = 50) -> np.ndarray:
    """New unit query vectors: (q + Σ_{i ≤ n} w_i x_i) / ||·||, w_i = [s_i]₊^α (1 when α = 0).

    ``q`` (m, d) unit queries, ``neighbours`` (m, K, d) their ranked results' vectors, ``sims`` (m, K)
    the similarities of those results (NaN or -inf where a rank is missing: weight 0).
    """
    x = np.asarray(neighbours, np.float64)[:, :n]
    s = np.asarray(sims, np.float64)[:, :n]
    valid = np.isfinite(s)
    w = np.ones_like(s) if alpha == 0 else np.maximum(np.where(valid, s, 0.0), 0.0) ** alpha
    w = np.where(valid, w, 0.0)
    out = np.asarray(q, np.float64) + np.einsum("mk,mkd->md", w, x)
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def expand_ranked(q: np.ndarray, top: np.ndarray, rows: np.ndarray, alpha: float = 3.0) -> np.ndarray:
    """:func:`expand` of unit queries ``q`` (m, d) with their top results ``top`` (m, n) (database ids best
    first, −1: padding), weighted by their global similarity to the query.

    ``rows`` (number of ids ≥ 0 in ``top``, d): the results' vectors, in the order of ``top[top >= 0]``
    (row-major). A padded rank gets a zero vector and similarity −inf (weight 0).
    """
    n = top.shape[1]
    vec = np.zeros((top.size, q.shape[1]), np.float32)
    vec[top.reshape(-1) >= 0] = rows  # padding (−1) stays zero and is masked below
    vec = vec.reshape(len(top), n, -1)
    sims = np.where(top >= 0, np.einsum("mkd,md->mk", vec, q), -np.inf)  # global similarity
    return expand(q, vec, sims, alpha, n)
