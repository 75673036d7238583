"""torchvision classification models: `torchvision:NAME` for any name in torchvision.models
(ResNet, MobileNet, EfficientNet, ConvNeXt, RegNet, VGG, ViT ...).

Weights: a local file (`--weights NAME=PATH`), else torch's hub cache
(`$TORCH_HOME/hub/checkpoints/<file>`), else a download when online. CNN layers are module paths
(`layer3`, `features.13`); the default is the deepest stage at stride 16 (14 x 14 at 224 px).
ViT layers are `encoder` (final, normed; the default) or `encoder.layers.encoder_layer_N`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from usae_core.backbones.base import (
    Backbone,
    can_download,
    fold_batchnorm,
    last_layer_at_stride,
    load_state_dict_file,
    load_weights_into,
    missing_weights_error,
    run_to_layer,
)
from usae_core.backbones.registry import did_you_mean, register_backbone
from usae_core.errors import UsaeError

log = logging.getLogger(__name__)
FAMILY = "torchvision"
_VIT_LAYER = "encoder"


def _weights_enum(arch: str):
    from torchvision.models import get_model_weights

    try:
        return list(get_model_weights(arch))
    except (ValueError, KeyError):
        return []


def _cache_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def cached_weights(arch: str) -> str | None:
    """A torchvision weight file for `arch` already in the hub cache (default weights first)."""
    from torchvision.models import get_model_weights

    entries = _weights_enum(arch)
    if not entries:
        return None
    default = get_model_weights(arch).DEFAULT
    for w in [default, *[e for e in entries if e is not default]]:
        if _cache_file(w.url).is_file():
            return str(_cache_file(w.url))
    return None


def _candidate_layers(model: nn.Module) -> list[str]:
    """Stage outputs to choose a layer from, in forward order."""
    if hasattr(model, "features") and isinstance(model.features, nn.Sequential):
        return [f"features.{n}" for n, _ in model.features.named_children()]
    stages = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]
    if hasattr(model, "trunk_output"):  # RegNet
        return [f"trunk_output.{n}" for n, _ in model.trunk_output.named_children()]
    if stages:
        return stages
    raise UsaeError(f"{type(model).__name__} has no feature stages this adapter understands")


class TorchvisionBackbone(Backbone):
    """A torchvision classifier read at one layer."""

    def __init__(self, *, name: str, arch: str, model: nn.Module, layer: str | None, weights_source: str,
                 keep_cls: bool = False, family: str = FAMILY):
        from torchvision.models import VisionTransformer

        self.is_vit = isinstance(model, VisionTransformer)
        self.num_prefix_tokens = 1 if self.is_vit else 0
        input_size, mean, std, interpolation = _preprocessing(arch, model)
        token_grid = None
        if self.is_vit:
            default_layer = _VIT_LAYER
            side = model.image_size // model.patch_size
            token_grid = (side, side)
        else:
            fold_batchnorm(model)
            default_layer = last_layer_at_stride(model, _candidate_layers(model), model, input_size)
        super().__init__(name=name, family=family, model=model, input_size=input_size, mean=mean, std=std,
                         interpolation=interpolation, layer=layer or default_layer, default_layer=default_layer,
                         weights_source=weights_source, keep_cls=keep_cls, token_grid=token_grid,
                         channels_last=not self.is_vit)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_vit:
            return run_to_layer(self.model, self.layer, lambda: self._vit_tokens(x), f"backbone {self.name!r}")
        return super().features(x)

    def _vit_tokens(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        tokens = m._process_input(x)
        tokens = torch.cat([m.class_token.expand(tokens.shape[0], -1, -1), tokens], 1)
        return m.encoder(tokens)


def _preprocessing(arch: str, model: nn.Module) -> tuple[int, tuple, tuple, str]:
    """Input size, mean, std and interpolation of the model's ImageNet weights."""
    entries = _weights_enum(arch)
    if not entries:
        return getattr(model, "image_size", 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"
    from torchvision.models import get_model_weights

    t = get_model_weights(arch).DEFAULT.transforms()
    return int(t.crop_size[0]), tuple(t.mean), tuple(t.std), t.interpolation.value


def build_torchvision(arch: str, *, name: str, weights: str | None, random_init: bool,
                      layer: str | None = None, keep_cls: bool = False, family: str = FAMILY,
                      weights_label: str | None = None) -> TorchvisionBackbone:
    """Construct `arch`, load its weights (local file, cache, or download) and wrap it."""
    import torchvision

    if arch not in _classifiers():
        raise UsaeError(f"torchvision has no classification model {arch!r}{did_you_mean(arch, _classifiers())}")
    model = torchvision.models.get_model(arch, weights=None)
    if random_init:
        source = "random-init"
    elif weights is not None:
        load_weights_into(model, load_state_dict_file(Path(weights), name), name, weights)
        source = weights_label or str(Path(weights).resolve())
    else:
        source = _load_from_hub(model, arch, name)
    return TorchvisionBackbone(name=name, arch=arch, model=model, layer=layer, weights_source=source,
                               keep_cls=keep_cls, family=family)


def _load_from_hub(model: nn.Module, arch: str, name: str) -> str:
    from torchvision.models import get_model_weights

    cached = cached_weights(arch)
    if cached:
        load_weights_into(model, load_state_dict_file(Path(cached), name), name, cached)
        return cached
    if not _weights_enum(arch):
        raise missing_weights_error(name, f"torchvision pretrained weights for {arch} (it has none)")
    default = get_model_weights(arch).DEFAULT
    target = _cache_file(default.url)
    if can_download(default.url):
        try:
            model.load_state_dict(default.get_state_dict(progress=False, check_hash=False))
            return str(target)
        except Exception as exc:  # noqa: BLE001 - urllib raises many kinds of errors offline
            log.info("download of %s failed: %s", default.url, exc)
    raise missing_weights_error(name, f"{target} (downloaded from {default.url} when online)")


def _classifiers() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


@register_backbone("torchvision:*", family=FAMILY, find_weights=lambda: None, default_layer="stride-16 stage",
                   model_names=_classifiers,
                   description="any torchvision classifier (resnet50, mobilenet_v3_large, efficientnet_b0, "
                               "convnext_tiny, vit_b_16 ...); weights from the torch hub cache or --weights")
def torchvision_any(arch: str, *, weights: str | None = None, layer: str | None = None, random_init: bool = False,
                    keep_cls: bool = False) -> TorchvisionBackbone:
    return build_torchvision(arch, name=f"torchvision:{arch}", weights=weights, random_init=random_init,
                             layer=layer, keep_cls=keep_cls)
