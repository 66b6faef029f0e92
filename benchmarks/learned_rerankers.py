"""GSS and GRAD-Net training and GSS / GRAD-Net / CAS re-ranking: ours against the dense formulation.

    .venv/bin/python benchmarks/learned_rerankers.py --sizes 5000,20000 [--dense-max 20000] [--dim 128]

Synthetic clustered descriptors (unit vectors around 1 centre per 20 items), their top-50 lists (exact up to
200k items, IVF-Flat with nprobe 16 above, as the graph stage builds large graphs).
For each size: the time of one GSS training step and its peak memory (ru_maxrss growth) — ours (sparse Â,
a batch of ``--batch`` nodes on its receptive field) and the reference's dense formulation (dense Â, the
full N × N similarity loss, full batch) up to ``--dense-max`` items; one GRAD-Net step (64 sextets on their
receptive field); the database embedding (GSS, row blocks); ms per query of GSS (attach + scan), GRAD-Net
(QFE + scan) and CAS (T = ``--shortlist``), and up to ``--cas-dense-max`` items the reference's dense CAS
(queries and database in one problem, all-pairs shortest paths). Prints one line per figure and the dense/ours
ratios. State the machine when quoting.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import cas as CAS  # noqa: E402
from operators import gradnet as GN  # noqa: E402
from operators import gss as GSS  # noqa: E402
from operators.cas import CasParams, cas_query_distances  # noqa: E402
from operators.global_index import iter_blocks  # noqa: E402
from operators.knn import build_ivf, knn_blocks, search_ivf  # noqa: E402

EXACT_MAX = 200_000  # exact top-50 lists up to this size


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 20), d))
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(n)
    if n <= EXACT_MAX:
        _, nn = knn_blocks(x, iter_blocks(ids, x, 65536), 50, exclude=ids)
        return x, nn
    index = build_ivf(x)  # above EXACT_MAX the lists come from IVF-Flat, nprobe 16 (as the graph stage at scale)
    nn = np.concatenate(
        [search_ivf(index, x[s : s + 65536], 50, 16, ids[s : s + 65536])[1] for s in range(0, n, 65536)]
    )
    return x, nn


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def dense_gss_step(x: np.ndarray, a_hat, p: GSS.GssParams, beta: float, device: str = "cpu") -> float:
    """The reference's step: dense Â, full batch, N × N loss (torch, float32) on ``device``; seconds a step."""
    import torch

    model = GSS.ResidualGCN(x.shape[1], p, device)
    a = torch.from_numpy(a_hat.toarray()).to(device)
    xt = torch.from_numpy(x).to(device)
    opt = torch.optim.Adam(list(model.params.values()), lr=p.lr)

    def step() -> None:
        h, pre = xt, None
        for layer in range(1, p.layers + 1):
            pr = a @ h @ model.params[f"w{layer}"] + model.params[f"b{layer}"]
            act = torch.nn.functional.elu(pr)
            h, pre = (act if pre is None else pre + p.layer_decay * act), pr
        loss = GSS.gss_loss(torch.nn.functional.normalize(h, dim=1), beta, p.alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # waits for the device

    return timed(step, 2)


def dense_cas(x: np.ndarray, p: CasParams) -> np.ndarray:
    """The reference's formulation (jifeiluo/reranking): every query and database item in one problem of dense
    (Q+N)² matrices, the diffusion on the whole matrix masked once at the end (EXT order), and all-pairs
    shortest paths (Floyd–Warshall, O(m³)); returns the m × m CAS distances."""
    from scipy.sparse.csgraph import floyd_warshall

    d = CAS.normalized_distances(x)
    rank = CAS.ranking(d)
    sim = np.exp(-d / p.sigma**2)
    conf, cand = CAS.confident(rank, p.k1), CAS.candidates(rank, p.k2)
    f = CAS.bidirectional_diffusion(CAS.affinity(sim, rank, conf, p.k1, p.confident_weight), p.mu, p.iters) * cand
    feat = CAS.propagate(CAS.smooth(f, cand, conf, sim, rank, p.k3, p.beta), rank, conf, p.k4, p.k5, p.kappa)
    path = np.minimum(floyd_warshall(CAS.path_graph(feat, rank, p.paths), directed=False), p.max_dist)
    return (1 - p.lam) * path + p.lam * d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="5000,20000")
    ap.add_argument("--dense-max", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--shortlist", type=int, default=1000)
    ap.add_argument("--cas-dense-max", type=int, default=5000, help="largest N for the dense CAS reference")
    a = ap.parse_args()
    import os

    print(f"machine: {os.cpu_count()} cores; dim {a.dim}")
    for n in map(int, a.sizes.split(",")):
        x, nn = data(n, a.dim)
        p = GSS.GssParams(batch=a.batch)
        adj = GSS.gss_adjacency(nn, x, p.k)
        a_hat = GSS.normalize_with_self(adj)
        model = GSS.ResidualGCN(a.dim, p)
        beta = GSS.automatic_beta(model, a_hat, x, p)
        before = rss_gb()
        ours = timed(lambda: GSS.train_steps(model, a_hat, x, beta, 0, 1))
        print(
            f"n {n}: GSS step ours {ours * 1e3:.1f} ms (batch {min(n, a.batch)}), peak RSS +{rss_gb() - before:.2f} GB"
        )
        if n <= a.dense_max:
            before = rss_gb()
            dense = dense_gss_step(x, a_hat, p, beta)
            print(
                f"n {n}: GSS step dense {dense * 1e3:.1f} ms, peak RSS +{rss_gb() - before:.2f} GB; "
                f"dense/ours {dense / ours:.1f}x (ours: a batch of {min(n, a.batch)}, unbiased; dense: all pairs)"
            )
        t = time.perf_counter()
        states, pre = [x], None
        for layer in range(1, p.layers + 1):
            pre_out, x_out = np.empty_like(x), np.empty_like(x)
            GSS.propagate(model, a_hat, states[-1], layer, pre, pre_out, x_out)
            states.append(x_out)
            pre = pre_out
        emb = np.empty_like(x)
        GSS.normalize_into(states[-1], emb)
        print(f"n {n}: GSS database embedding {time.perf_counter() - t:.2f} s")
        q = np.arange(a.queries)
        sims, top = knn_blocks(x[q], iter_blocks(np.arange(n), x, 65536), p.kq, exclude=q)

        def gss_queries() -> None:
            hq = GSS.embed_queries(model, x[q], top, sims, GSS.degrees(adj), states[:-1])
            knn_blocks(hq, iter_blocks(np.arange(n), emb, 65536), 100, exclude=q)

        print(f"n {n}: GSS re-rank {timed(gss_queries, 1) / len(q) * 1e3:.1f} ms/query")
        gp = GN.GradNetParams(k=15, dims=[256, 128, 64])
        ga = GN.mutual_adjacency(nn, x, gp.k)
        gs = GN.sym_normalize(ga)
        near, z = GN.sparse_codes(x, x[np.random.default_rng(0).choice(n, gp.anchors, replace=False)], gp.codes)
        zc = GN.code_matrix(near, z, gp.anchors)
        gmodel = GN.GradNet(a.dim + gp.anchors, gp)
        print(
            f"n {n}: GRAD-Net step (64 sextets, dims 256-128-64) "
            f"{timed(lambda: GN.train_steps(gmodel, gs, ga, x, zc, 0, 1)) * 1e3:.1f} ms"
        )
        gemb = GN.embed_nodes(gmodel, gs, x, zc, np.arange(n))

        def grad_rerank():
            return knn_blocks(GN.qfe(top, sims, gemb), iter_blocks(np.arange(n), gemb, 65536), 100, exclude=q)

        print(f"n {n}: GRAD-Net re-rank (QFE + scan) {timed(grad_rerank, 1) / len(q) * 1e3:.1f} ms/query")
        short = min(a.shortlist, n - 1)
        _, cand = knn_blocks(x[:4], iter_blocks(np.arange(n), x, 65536), short, exclude=np.arange(4))
        t = time.perf_counter()
        for j in range(4):
            cas_query_distances(x[j], x[cand[j]], CasParams())
        print(f"n {n}: CAS re-rank (T = {short}) {(time.perf_counter() - t) / 4 * 1e3:.0f} ms/query")
        if n <= a.cas_dense_max:
            before, t = rss_gb(), time.perf_counter()
            dense_cas(np.vstack([x[q], x]), CasParams())  # the queries join the database's problem
            total = time.perf_counter() - t
            print(
                f"n {n}: CAS dense reference ({len(q)} queries + {n} items in one problem, Floyd–Warshall) "
                f"{total:.1f} s = {total / len(q) * 1e3:.0f} ms/query, peak RSS +{rss_gb() - before:.2f} GB"
            )
        print(f"n {n}: peak RSS of the whole run so far {rss_gb():.2f} GB (data and graphs included)")


if __name__ == "__main__":
    main()
