"""Backbones: shipped EfficientNet-Lite0 weights, torchvision/cirtorch-format ResNet checkpoints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from operators.backbones import EfficientNetLite0, ResNet, build_backbone, load_resnet, to_tensor
from operators.describe import Describer, DescriptorConfig, ImageTooSmall


@pytest.fixture(scope="module")
def lite0():
    return EfficientNetLite0().eval()


def test_efficientnet_maps_and_strides(lite0):
    x = to_tensor([np.zeros((96, 128, 3), np.uint8)])
    out = lite0(x, ("block10", "head"))
    assert out["head"].shape == (1, 1280, 3, 4) and lite0.maps["head"].stride == 32
    assert out["block10"].shape == (1, 112, 6, 8) and lite0.maps["block10"] == lite0.maps["block10"].__class__(112, 16)


def test_imagenet_weights_are_loaded(lite0):
    """The shipped checkpoint, not a random init: trained BN statistics differ from the init (0, 1)."""
    bn = lite0.net._bn1
    assert bn.running_mean.abs().sum() > 0 and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("fmt", ["torchvision", "cirtorch", "dataparallel"])
def test_resnet_checkpoint_formats(tmp_path, fmt):
    torch.manual_seed(0)
    ref = ResNet("resnet50").eval()
    state = ref.state_dict()
    state["fc.weight"] = torch.zeros(1000, 2048)  # classifier head present in torchvision files
    if fmt == "cirtorch":
        idx = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
        state = {
            "state_dict": {
                f"features.{idx[k.split('.')[0]]}.{k.split('.', 1)[1]}": v
                for k, v in state.items()
                if k.split(".")[0] in idx
            }
            | {"pool.p": torch.tensor([3.0])}
        }
    elif fmt == "dataparallel":
        state = {"model": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    net = load_resnet(str(path), "resnet50").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = ref(x, ("layer3", "layer4")), net(x, ("layer3", "layer4"))
    assert b["layer4"].shape == (1, 2048, 2, 2) and b["layer3"].shape == (1, 1024, 4, 4)
    assert torch.allclose(a["layer4"], b["layer4"]) and torch.allclose(a["layer3"], b["layer3"])


def test_resnet_needs_checkpoint_and_right_depth(tmp_path):
    with pytest.raises(ValueError, match="checkpoint"):
        build_backbone("resnet101")
    torch.save(ResNet("resnet50").state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_resnet(str(tmp_path / "r50.pth"), "resnet101")


def test_describer_batches_equal_single(lite0):
    """Batching same-shape images must not change any descriptor."""
    rng = np.random.default_rng(0)
    imgs = [(rng.random((120, 160, 3)) * 255).astype(np.uint8) for _ in range(3)]
    imgs.append((rng.random((90, 160, 3)) * 255).astype(np.uint8))
    d = Describer(
        DescriptorConfig(
            local="how",
            local_layer="block10",
            local_n=50,
            max_side=160,
            global_max_side=160,
            local_scales=[1.0, 0.5],
            forward_batch=8,
        )
    )
    batch = d(imgs)
    for img, row in zip(imgs, batch):
        one = d([img])[0]
        assert np.allclose(one["global"], row["global"], atol=1e-5)
        assert np.allclose(one["local_desc"], row["local_desc"], atol=1e-4)
        assert np.array_equal(one["local_xy"], row["local_xy"])
    assert batch[0]["global"].shape == (1280,) and batch[0]["local_desc"].shape == (50, 112)


def test_describer_skips_scales_below_the_network_input(lite0):
    """A scale whose image is under the network's stride (32 px) is skipped; no scale left is an error."""
    rng = np.random.default_rng(1)
    d = Describer(
        DescriptorConfig(
            local="how",
            local_layer="block10",
            local_n=20,
            max_side=160,
            global_max_side=160,
            local_scales=[1.0, 0.25],
            global_scales=[1.0, 0.25],
        )
    )
    thumb = (rng.random((96, 96, 3)) * 255).astype(np.uint8)
    row = d([thumb])[0]
    assert set(np.unique(row["local_scale"]).tolist()) == {1.0}  # 0.25 → 24 px: skipped
    assert np.allclose(
        row["global"], d.__class__(dataclasses.replace(d.cfg, global_scales=[1.0]))([thumb])[0]["global"], atol=1e-5
    )
    with pytest.raises(ImageTooSmall, match="image 7x5 is too small"):
        d([np.zeros((5, 7, 3), np.uint8)])
    with pytest.raises(ImageTooSmall):
        d([np.zeros((3, 4000, 3), np.uint8)])
