"""What a describer computes (:class:`DescriptorConfig`): backbone, GeM and local-feature settings.

Apart from :mod:`operators.describe` so that reading, checking or printing a configuration (every
``--help``, a search whose queries are cached, a root's recorded settings) never imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from operators.constraints import Count, NonNegInt, OddCount, PosFinite, Scales

HOW_SCALES = [2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25]
GEM_SCALES = [1.0, 1 / math.sqrt(2), 0.5]


@dataclass
class DescriptorConfig:
    backbone: Literal["efficientnet-lite0", "resnet50", "resnet101"] = "efficientnet-lite0"
    checkpoint: str | None = None  # local weights file (required for resnet50/101)
    global_layer: str = "head"  # map pooled by GeM
    global_scales: Scales = field(default_factory=lambda: list(GEM_SCALES))
    gem_p: PosFinite = 3.0
    global_max_side: Count = 1024  # image max side the global scales are relative to
    max_side: Count = 1024  # image max side the local scales are relative to
    local: Literal["rootsift", "how", "none"] = "rootsift"
    local_layer: str = "head"  # how: map giving local descriptors (head: stride 32; block10: stride 16)
    local_scales: Scales = field(default_factory=lambda: list(HOW_SCALES))
    local_n: Count = 1000  # how: strongest features kept across scales
    local_smoothing: OddCount = 3
    sift_n: Count = 2000  # rootsift: features per image
    device: Literal["auto", "cpu", "cuda"] = "auto"
    forward_batch: NonNegInt = 0  # max same-shape images per forward; 0: 16 on GPU, 1 on CPU
    # (measured on 2 CPU cores: batching is 0.78x, README)
    cudnn: bool = False  # cuDNN convolutions on CUDA: off, as cuDNN plans every new input
    # shape afresh (H200: 0.4 images/s on new shapes against 222 off;
    # benchmarks/gpu_check.py, README "GPU")
