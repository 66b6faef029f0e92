"""Every GPU path of the pipeline against its CPU path, on small real data, with figures.

    .venv/bin/python benchmarks/gpu_check.py [--images 24] [--dry-run]

Checks (each prints its figures and OK / FAIL; the exit status is the number of failures):
- extraction: the describer on CUDA (batched forward, ``forward_batch`` 16) against CPU on instance-mini
  images: global descriptors' cosine ≥ 0.999, images/s of each;
- faiss k-means on the GPU against the CPU (same sample and seed): quantisation error within 2%;
- codeword assignment (flat index on all GPUs) against the CPU flat index: ≥ 99.9% the same word;
- kNN (``operators.knn.knn_blocks``, faiss ``knn_gpu``) against the CPU: recall@10 ≥ 0.999.

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


def check_extraction(images: list[np.ndarray], device: str) -> int:
    from operators.describe import DescriptorConfig, Describer

    cpu = Describer(DescriptorConfig(local="none", device="cpu"))
    dev = Describer(DescriptorConfig(local="none", device=device, forward_batch=16))
    dev(images[:2])  # warm-up (CUDA context, kernels)
    a, t_cpu = timed(cpu, images)
    b, t_dev = timed(dev, images)
    cos = min(float(np.dot(x["global"], y["global"])) for x, y in zip(a, b))
    return report("extraction", cos >= 0.999, f"min cosine {cos:.5f}; {len(images) / t_cpu:.1f} images/s on CPU, "
                  f"{len(images) / t_dev:.1f} on {device}")


def check_kmeans(x: np.ndarray, gpu: bool) -> int:
    import faiss

    from operators.codebook import train_codebook

    def error(c):
        return float(faiss.knn(x, c, 1)[0].mean())
    c_cpu, t_cpu = timed(train_codebook, x, 1024, 10, gpu=False)
    c_dev, t_dev = timed(train_codebook, x, 1024, 10, gpu=gpu)
    e_cpu, e_dev = error(c_cpu), error(c_dev)
    return report("k-means (k = 1,024)", abs(e_dev - e_cpu) <= 0.02 * e_cpu,
                  f"quantisation error {e_cpu:.4f} CPU / {e_dev:.4f}; {t_cpu:.2f} s CPU / {t_dev:.2f} s")


def check_assignment(x: np.ndarray, centroids: np.ndarray) -> int:
    import faiss

    from operators.codebook import Quantizer

    cpu = faiss.IndexFlatL2(centroids.shape[1])
    cpu.add(centroids)
    (_, exact), t_cpu = timed(cpu.search, x, 1)
    words, t_dev = timed(Quantizer(centroids), x, 1)  # on every GPU when faiss has GPUs
    same = float((words[:, 0] == exact[:, 0]).mean())
    return report("assignment (flat)", same >= 0.999,
                  f"same word {same:.5f}; {t_cpu:.2f} s CPU / {t_dev:.2f} s")


def check_knn(x: np.ndarray) -> int:
    import faiss

    from operators.global_index import iter_blocks
    from operators.knn import knn_blocks

    xq = x[:2000]
    (_, exact), t_cpu = timed(faiss.knn, xq, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    (_, ids), t_dev = timed(knn_blocks, xq, iter_blocks(np.arange(len(x)), x, 16384), 10)
    recall = float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(exact, ids)]))
    return report("kNN (top-10, inner product)", recall >= 0.999, f"recall {recall:.5f}; {t_cpu:.2f} s CPU / {t_dev:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--dry-run", action="store_true", help="the GPU side on the CPU as well (checks the script)")
    a = ap.parse_args()
    import faiss
    import torch

    gpus, cuda = faiss.get_num_gpus(), torch.cuda.is_available()
    print(f"faiss GPUs: {gpus}; torch CUDA: {cuda} ({torch.cuda.get_device_name(0) if cuda else '-'})", flush=True)
    if not (gpus or cuda or a.dry_run):
        print("no GPU on this machine: nothing to check (--dry-run checks the script on the CPU)")
        return
    from operators.images import decode_image

    files = pd.read_csv(DATA / "images.csv")["file"].head(a.images)
    images = [decode_image((DATA / f).read_bytes()) for f in files]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100_000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    failures = 0
    if cuda or a.dry_run:
        failures += check_extraction(images, "cuda" if cuda else "cpu")
    if gpus or a.dry_run:
        centroids = x[rng.choice(len(x), 4096, replace=False)]
        failures += check_kmeans(x[:60_000], gpu=bool(gpus))
        failures += check_assignment(x, centroids)
        failures += check_knn(x)
    print(f"gpu_check: {failures} failure(s)")
    sys.exit(failures)


if __name__ == "__main__":
    main()
