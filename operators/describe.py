"""The image describer: one batch callable producing the global and local descriptors of images.

``Describer(cfg)`` loads its model once; ``describer(images)`` maps a list of RGB uint8 arrays to
per-image dicts with ``global`` (L2-normalised multi-scale GeM, optionally PCA-whitened) and the
local features of the chosen extractor (``rootsift`` or HOW-style ``how`` deep features). The same
object serves a unit test, a plain loop and Ray Data's ``map_batches``.

Images are resized to ``global_max_side`` / ``max_side`` (shrink only) and rescaled by each scale;
a (side, scale) pass needed by both the global and the local descriptor runs once, and images
whose rescaled shapes agree are forwarded as one batch.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from operators.backbones import build_backbone, to_tensor
from operators.descriptor_config import GEM_SCALES, HOW_SCALES, DescriptorConfig  # noqa: F401 - re-exported
from operators.gem import gem, multiscale_gem
from operators.how import merge_scales, select_local
from operators.images import rescale, resize_max_side
from operators.rootsift import RootSift
from operators.whitening import Whitening


class ImageTooSmall(ValueError):
    """No scale of the image is large enough for the network."""


class Describer:
    """Batch callable: list of RGB images -> list of descriptor dicts (see module doc)."""

    def __init__(
        self, cfg: DescriptorConfig, local_whitening: Whitening | None = None, global_whitening: Whitening | None = None
    ):
        self.cfg = cfg
        self.device = torch.device(
            "cuda"
            if cfg.device == "auto" and torch.cuda.is_available()
            else ("cpu" if cfg.device == "auto" else cfg.device)
        )
        self.net = build_backbone(cfg.backbone, cfg.checkpoint).to(self.device)
        for name in (cfg.global_layer, cfg.local_layer):
            if name not in self.net.maps:
                raise ValueError(f"{cfg.backbone} has no map {name!r}; choose from {sorted(self.net.maps)}")
        self.sift = RootSift(cfg.max_side, cfg.sift_n) if cfg.local == "rootsift" else None
        self.min_side = max(m.stride for m in self.net.maps.values())  # smallest input the network takes
        self.local_whitening, self.global_whitening = local_whitening, global_whitening

    @property
    def global_dim(self) -> int:
        return self.global_whitening.dim if self.global_whitening else self.net.maps[self.cfg.global_layer].channels

    @property
    def local_dim(self) -> int:
        if self.cfg.local == "rootsift":
            return RootSift.dim
        if self.cfg.local == "how":
            return self.local_whitening.dim if self.local_whitening else self.net.maps[self.cfg.local_layer].channels
        return 1

    def __call__(self, images: list[np.ndarray]) -> list[dict]:
        cfg = self.cfg
        rows: list[dict] = [{} for _ in images]
        gem_parts: dict[int, list[torch.Tensor]] = defaultdict(list)
        local_parts: dict[int, list] = defaultdict(list)
        with torch.inference_mode():
            for (side, scale), names in self._plan().items():
                bases = [resize_max_side(img, side) for img in images]
                for idx, maps in self._forward_scale([b[0] for b in bases], scale, names):
                    if cfg.global_layer in maps and side == cfg.global_max_side and scale in cfg.global_scales:
                        gem_parts[idx].append(gem(maps[cfg.global_layer][None], cfg.gem_p)[0])
                    if cfg.local == "how" and side == cfg.max_side and scale in cfg.local_scales:
                        d, w, p = select_local(maps[cfg.local_layer], cfg.local_n, cfg.local_smoothing)
                        local_parts[idx].append(
                            (d.float().cpu().numpy(), w.float().cpu().numpy(), p.cpu().numpy(), scale, bases[idx][1])
                        )
        for i, row in enumerate(rows):
            self._check_scales(images[i], gem_parts[i], local_parts[i])
            g = multiscale_gem([v[None].float() for v in gem_parts[i]], cfg.gem_p)[0].cpu().numpy()
            row["global"] = self.global_whitening(g[None])[0] if self.global_whitening else g
            if cfg.local == "how":
                stride = self.net.maps[cfg.local_layer].stride
                row.update(merge_scales([p[:4] for p in local_parts[i]], cfg.local_n, stride, local_parts[i][0][4]))
                if self.local_whitening:
                    row["local_desc"] = self.local_whitening(row["local_desc"], normalize=False)
            elif self.sift is not None:
                row.update(self.sift.describe(images[i]))
        return rows

    def global_maps(self, images: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Per image, the global layer's activation map (C, H, W) float32 at each global scale the image
        is large enough for (the maps GeM pools; object discovery reads them)."""
        cfg = self.cfg
        out: list[list[np.ndarray]] = [[] for _ in images]
        bases = [resize_max_side(img, cfg.global_max_side)[0] for img in images]
        with torch.inference_mode():
            for scale in cfg.global_scales:
                for idx, maps in self._forward_scale(bases, scale, (cfg.global_layer,)):
                    out[idx].append(maps[cfg.global_layer].float().cpu().numpy())
        return out

    def _check_scales(self, image: np.ndarray, gem_parts: list, local_parts: list) -> None:
        """Scales whose image is below the network's smallest input are skipped; an image left with
        no global scale (or, for HOW, no local scale) is an error."""
        missing = [] if gem_parts else ["global"]
        if self.cfg.local == "how" and not local_parts:
            missing.append("local")
        if missing:
            h, w = image.shape[:2]
            raise ImageTooSmall(
                f"image {w}x{h} is too small: no {' or '.join(missing)} scale gives both sides >= {self.min_side} px"
            )

    def _plan(self) -> dict[tuple[int, float], tuple[str, ...]]:
        """Maps needed at each (max side, scale); a pass shared by global and local runs once."""
        cfg, plan = self.cfg, defaultdict(list)
        for s in cfg.global_scales:
            plan[(cfg.global_max_side, s)].append(cfg.global_layer)
        if cfg.local == "how":
            for s in cfg.local_scales:
                plan[(cfg.max_side, s)].append(cfg.local_layer)
        return {k: tuple(dict.fromkeys(v)) for k, v in sorted(plan.items(), reverse=True)}

    def _forward_scale(self, bases: list[np.ndarray], scale: float, names: tuple[str, ...]):
        """Yield (image index, {name: (C, H, W)}) at one scale, batching images of equal shape."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        scaled = [rescale(b, scale) for b in bases]
        for i, img in enumerate(scaled):
            if min(img.shape[:2]) >= self.min_side:  # smaller ones skip this scale (_check_scales)
                groups[img.shape].append(i)
        step = self.cfg.forward_batch or (16 if self.device.type == "cuda" else 1)
        chunks = [idxs[s : s + step] for idxs in groups.values() for s in range(0, len(idxs), step)]
        cudnn = torch.backends.cudnn
        for idxs in chunks:
            x = to_tensor([scaled[i] for i in idxs], self.device)
            with cudnn.flags(
                enabled=self.cfg.cudnn, benchmark=False, deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32
            ):
                out = self.net(x, names)
            for j, i in enumerate(idxs):
                yield i, {n: m[j] for n, m in out.items()}
