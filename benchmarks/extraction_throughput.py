"""Extraction throughput: the Ray Data pipeline vs a one-image-per-forward loop, in one process.

    .venv/bin/python benchmarks/extraction_throughput.py [--images 48] [--local rootsift|how|none]

Runs on the first N images of ../shared/data/instance-mini (mixed sizes, up to 1024 px):
1. reference: a plain loop, one image per forward (torch using all cores), decode included;
2. in-process describer with same-shape images batched per forward (forward_batch = 8);
3. the ``jobs.extract`` pipeline on an embedded Ray (actor pool, sharded Parquet output).
Prints images/s and the ratio against the reference. State the machine when quoting figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.describe import Describer, DescriptorConfig  # noqa: E402
from operators.images import decode_image  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instance-mini"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--local", default="rootsift")
    a = ap.parse_args()
    df = pd.read_csv(DATA / "images.csv").sample(frac=1.0, random_state=0).head(a.images)
    files = [str(DATA / f) for f in df.file]
    cfg = DescriptorConfig(local=a.local)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; {len(files)} images; local={a.local}"
    )

    d = Describer(cfg)
    d([decode_image(open(files[0], "rb").read())])  # warm-up
    t = time.time()
    for f in files:
        d([decode_image(open(f, "rb").read())])
    ref = len(files) / (time.time() - t)
    print(f"reference loop (1 image / forward): {ref:.2f} images/s")

    d.cfg.forward_batch = 8
    t = time.time()
    imgs = [decode_image(open(f, "rb").read()) for f in files]
    for s in range(0, len(imgs), 8):
        d(imgs[s : s + 8])
    batched = len(files) / (time.time() - t)
    print(f"in-process, same-shape images batched (≤ 8 / forward): {batched:.2f} images/s  ({batched / ref:.2f}x)")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from jobs import extract

    tmp = tempfile.mkdtemp()
    pd.DataFrame({"file": files}).to_csv(f"{tmp}/c.csv", index=False)
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    t = time.time()
    extract.main(
        [
            "--collection",
            f"{tmp}/c.csv",
            "--out",
            f"{tmp}/out",
            "--set",
            f"describe.local={a.local}",
            "--set",
            "shard_size=8",
        ]
    )
    pipe = len(files) / (time.time() - t)
    print(f"jobs.extract on Ray (actors, incl. start-up and Parquet writes): {pipe:.2f} images/s  ({pipe / ref:.2f}x)")
    ray.shutdown()
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
