"""Every GPU path of the pipeline against its CPU path, on small real data, with figures.

    .venv/bin/python benchmarks/gpu_check.py [--images 24] [--data DIR] [--nodes 20000] [--dry-run]

Checks (each prints its figures and OK / FAIL; the exit status is the number of failures):
- extraction: the describer on CUDA (batched forward, ``forward_batch`` 16) against CPU on instance-mini
  images: global descriptors' cosine ≥ 0.999, images/s of each;
- faiss k-means on the GPU against the CPU (same sample and seed): quantisation error within 2%;
- codeword assignment (flat index on all GPUs) against the CPU flat index: ≥ 99.9% the same word;
- kNN (``operators.knn.knn_blocks``, faiss ``knn_gpu``) against the CPU: recall@10 ≥ 0.999;
- GSS training (``operators.gss``, torch sparse on CUDA) against the CPU from the same initial weights on a
  synthetic 20k-node graph: per-step losses within 1e-3 (relative), embeddings' cosine ≥ 0.999, ms/step of
  each, and the dense full-batch reference step on the same device (the reference's formulation);
- GRAD-Net training (``operators.gradnet``, dropout 0 so both sides draw nothing) likewise.

``--dry-run`` runs the "GPU" side on the CPU too (checks this script, not the GPU). Without a GPU and without
``--dry-run`` it says so and exits 0. Run it on a GPU machine whenever one is lent, and record its figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instance-mini"


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def report(name: str, ok: bool, figures: str) -> int:
    print(f"{'OK  ' if ok else 'FAIL'} {name}: {figures}", flush=True)
    return 0 if ok else 1


def check_extraction(images: list[np.ndarray], unseen: list[np.ndarray], device: str) -> int:
    """CPU against ``device`` (cuDNN off, the default) on ``images``; then on ``unseen`` (shapes new to both
    describers) images/s with cuDNN off, with cuDNN on first sight of each shape, and again (its plans cached):
    cuDNN plans every new input shape afresh, and retrieval images rarely share one."""
    from operators.describe import Describer, DescriptorConfig

    cpu = Describer(DescriptorConfig(local="none", device="cpu"))
    dev = Describer(DescriptorConfig(local="none", device=device, forward_batch=16))
    with_cudnn = Describer(DescriptorConfig(local="none", device=device, forward_batch=16, cudnn=True))
    dev(images[:2])  # warm-up (CUDA context, kernels)
    with_cudnn(images[:2])
    a, t_cpu = timed(cpu, images)
    b, t_dev = timed(dev, images)
    _, t_off = timed(dev, unseen)
    c, t_new = timed(with_cudnn, unseen)
    _, t_seen = timed(with_cudnn, unseen)
    d = cpu(unseen)
    cos = min(float(np.dot(x["global"], y["global"])) for x, y in zip(a + d, b + c))
    n = len(unseen)
    return report(
        "extraction",
        cos >= 0.999,
        f"min cosine {cos:.5f}; images/s on {len(images)} images: "
        f"{len(images) / t_cpu:.1f} on CPU, {len(images) / t_dev:.1f} on {device}; on {n} more: cuDNN off "
        f"{n / t_off:.1f}, cuDNN on {n / t_new:.1f} (new shapes) and {n / t_seen:.1f} (shapes seen)",
    )


def check_kmeans(x: np.ndarray, gpu: bool) -> int:
    import faiss

    from operators.codebook import train_codebook

    def error(c):
        return float(faiss.knn(x, c, 1)[0].mean())

    c_cpu, t_cpu = timed(train_codebook, x, 1024, 10, gpu=False)
    c_dev, t_dev = timed(train_codebook, x, 1024, 10, gpu=gpu)
    e_cpu, e_dev = error(c_cpu), error(c_dev)
    return report(
        "k-means (k = 1,024)",
        abs(e_dev - e_cpu) <= 0.02 * e_cpu,
        f"quantisation error {e_cpu:.4f} CPU / {e_dev:.4f}; {t_cpu:.2f} s CPU / {t_dev:.2f} s",
    )


def check_assignment(x: np.ndarray, centroids: np.ndarray) -> int:
    import faiss

    from operators.codebook import Quantizer

    cpu = faiss.IndexFlatL2(centroids.shape[1])
    cpu.add(centroids)
    (_, exact), t_cpu = timed(cpu.search, x, 1)
    words, t_dev = timed(Quantizer(centroids), x, 1)  # on every GPU when faiss has GPUs
    same = float((words[:, 0] == exact[:, 0]).mean())
    return report("assignment (flat)", same >= 0.999, f"same word {same:.5f}; {t_cpu:.2f} s CPU / {t_dev:.2f} s")


def check_knn(x: np.ndarray) -> int:
    import faiss

    from operators.global_index import iter_blocks
    from operators.knn import knn_blocks

    xq = x[:2000]
    (_, exact), t_cpu = timed(faiss.knn, xq, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    (_, ids), t_dev = timed(knn_blocks, xq, iter_blocks(np.arange(len(x)), x, 16384), 10)
    recall = float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(exact, ids)]))
    return report(
        "kNN (top-10, inner product)", recall >= 0.999, f"recall {recall:.5f}; {t_cpu:.2f} s CPU / {t_dev:.2f} s"
    )


def synthetic_graph(n: int, d: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors and their exact top-50 lists (the learned re-rankers' benchmark data)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from learned_rerankers import data

    return data(n, d)


def train_on(device: str, make, train, embed, steps: int) -> tuple[list[float], np.ndarray, float, float]:
    """(losses, probe embeddings, ms/step, peak device GiB) of ``steps`` steps of a fresh model on ``device``."""
    import torch

    train(make(device), 2, None)  # warm-up (CUDA context, kernels)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, log = make(device), []
    t = time.perf_counter()
    train(model, steps, lambda i, v: log.append(v))  # the logged loss.item() waits for the device each step
    ms = 1000 * (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return log, embed(model), ms, peak


def compare(name: str, device: str, make, train, embed, steps: int, chaotic: bool = False, extra: str = "") -> int:
    """Train on the CPU and on ``device`` from the same initial weights. The untrained forward passes and the
    first losses must agree; the trajectories too unless ``chaotic`` (hinge terms whose active set flips on
    rounding differences, amplified by Adam: reported, not required)."""
    e0 = [embed(make(side)) for side in ("cpu", device)]
    l_c, e_c, ms_c, _ = train_on("cpu", make, train, embed, steps)
    l_d, e_d, ms_d, peak = train_on(device, make, train, embed, steps)
    rel = np.abs(np.subtract(l_c, l_d)) / np.maximum(np.abs(l_c), 1e-12)
    agree = int(np.argmax(rel > 1e-3)) if (rel > 1e-3).any() else steps
    cos0, cos = float(np.min(np.sum(e0[0] * e0[1], axis=1))), float(np.min(np.sum(e_c * e_d, axis=1)))
    ok = cos0 >= 0.99999 and rel[0] <= 1e-4 and (chaotic or (agree == steps and cos >= 0.999))
    return report(
        name,
        ok,
        f"untrained forward min cosine {cos0:.6f}; first loss rel. diff {rel[0]:.1e}; losses agree "
        f"(1e-3) for {agree} of {steps} steps (max {rel.max():.1e}); trained embedding min cosine {cos:.6f}; "
        f"{ms_c:.1f} ms/step CPU / {ms_d:.1f} on {device} (peak {peak:.2f} GiB){extra}",
    )


def check_gss(x: np.ndarray, nn: np.ndarray, device: str, steps: int = 20) -> int:
    from learned_rerankers import dense_gss_step

    from operators import gss as GSS

    p = GSS.GssParams(k=10, steps=steps)
    a_hat = GSS.normalize_with_self(GSS.gss_adjacency(nn, x, p.k))
    beta = GSS.automatic_beta(GSS.ResidualGCN(x.shape[1], p), a_hat, x, p)
    probe = np.arange(0, len(x), max(1, len(x) // 1000))
    dense = ""
    if device != "cpu" and len(x) <= 40_000:  # n² floats a few times over on the device
        dense = (
            f"; dense full-batch reference step on {device}: {1000 * dense_gss_step(x, a_hat, p, beta, device):.1f} ms"
        )
    return compare(
        f"GSS training ({len(x):,} nodes, {steps} steps, beta {beta:.4f})",
        device,
        lambda dev: GSS.ResidualGCN(x.shape[1], p, dev),
        lambda m, n, log: GSS.train_steps(m, a_hat, x, beta, 0, n, None, log),
        lambda m: GSS.embed_nodes(m, a_hat, x, probe),
        steps,
        extra=dense,
    )


def check_gradnet(x: np.ndarray, nn: np.ndarray, device: str, steps: int = 20) -> int:
    from operators import gradnet as GN
    from operators.codebook import train_codebook

    p = GN.GradNetParams(dropout=0.0)  # no random masks: both sides compute the same function
    a = GN.mutual_adjacency(nn, x, p.k)
    s = GN.sym_normalize(a)
    anchors = train_codebook(x[: 256 * p.anchors], p.anchors, 20, p.seed)
    z = GN.code_matrix(*GN.sparse_codes(x, anchors, p.codes), p.anchors)
    probe = np.arange(0, len(x), max(1, len(x) // 1000))
    return compare(
        f"GRAD-Net training ({len(x):,} nodes, {steps} steps, dropout 0)",
        device,
        lambda dev: GN.GradNet(x.shape[1] + p.anchors, p, dev),
        lambda m, n, log: GN.train_steps(m, s, a, x, z, 0, n, None, log),
        lambda m: GN.embed_nodes(m, s, x, z, probe),
        steps,
        chaotic=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--data", type=Path, default=DATA, help="an instance-mini folder (images.csv, images/)")
    ap.add_argument("--nodes", type=int, default=20_000, help="nodes of the re-rankers' synthetic graph")
    ap.add_argument("--checks", default="extraction,faiss,gss,gradnet", help="comma-separated subset to run")
    ap.add_argument("--dry-run", action="store_true", help="the GPU side on the CPU as well (checks the script)")
    a = ap.parse_args()
    import faiss
    import torch

    gpus, cuda = faiss.get_num_gpus(), torch.cuda.is_available()
    print(f"faiss GPUs: {gpus}; torch CUDA: {cuda} ({torch.cuda.get_device_name(0) if cuda else '-'})", flush=True)
    if not (gpus or cuda or a.dry_run):
        print("no GPU on this machine: nothing to check (--dry-run checks the script on the CPU)")
        return
    checks, device, failures = set(a.checks.split(",")), "cuda" if cuda else "cpu", 0
    if "extraction" in checks and (cuda or a.dry_run):
        from operators.images import decode_image

        files = pd.read_csv(a.data / "images.csv")["file"].head(2 * a.images)
        images = [decode_image((a.data / f).read_bytes()) for f in files]
        failures += check_extraction(images[: a.images], images[a.images :], device)
    if "faiss" in checks and (gpus or a.dry_run):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((100_000, 64)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        failures += check_kmeans(x[:60_000], gpu=bool(gpus))
        failures += check_assignment(x, x[rng.choice(len(x), 4096, replace=False)])
        failures += check_knn(x)
    elif "faiss" in checks:
        print("SKIP faiss: this faiss has no GPUs (faiss-gpu is not installed)", flush=True)
    if {"gss", "gradnet"} & checks and (cuda or a.dry_run):
        xg, nn = synthetic_graph(a.nodes)
        if "gss" in checks:
            failures += check_gss(xg, nn, device)
        if "gradnet" in checks:
            failures += check_gradnet(xg, nn, device)
    print(f"gpu_check: {failures} failure(s)")
    sys.exit(failures)


if __name__ == "__main__":
    main()
