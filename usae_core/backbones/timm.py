"""timm models: `timm:NAME` for any timm model name (ViT, DINOv2 `vit_small_patch14_dinov2`,
SigLIP `vit_base_patch16_siglip_224`, ConvNeXt ...), optionally with a pretrained tag
(`timm:vit_small_patch14_dinov2.lvd142m`).

Weights: a local file (`--weights NAME=PATH`, .safetensors/.pth/.bin, or a directory holding
model.safetensors / pytorch_model.bin), else the Hugging Face hub cache, else a download when
online. ViTs run at 224 px (timm resamples position embeddings, so DINOv2 gives 16 x 16 patches).
Layers: `final` (forward_features, normed; the default) or a module path such as `blocks.6` or
`stages.2`. CLS and register tokens (`num_prefix_tokens`) are dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from usae_core.backbones.base import Backbone, can_download, missing_weights_error, run_to_layer
from usae_core.backbones.registry import did_you_mean, register_backbone
from usae_core.errors import UsaeError

log = logging.getLogger(__name__)
FINAL = "final"
DEFAULT_INPUT_SIZE = 224
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class TimmBackbone(Backbone):
    def __init__(self, *, name: str, model: nn.Module, layer: str | None, weights_source: str, keep_cls: bool,
                 input_size: int):
        patch_embed = getattr(model, "patch_embed", None)
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        token_grid = tuple(int(v) for v in patch_embed.grid_size) if patch_embed is not None else None
        cfg = model.pretrained_cfg
        super().__init__(name=name, family="timm", model=model, input_size=input_size, mean=cfg["mean"],
                         std=cfg["std"], interpolation=cfg.get("interpolation", "bicubic"), layer=layer or FINAL,
                         default_layer=FINAL, weights_source=weights_source, keep_cls=keep_cls,
                         token_grid=token_grid, channels_last=patch_embed is None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer == FINAL:
            out = self.model.forward_features(x)
        else:
            out = run_to_layer(self.model, self.layer, lambda: self.model.forward_features(x),
                               f"backbone {self.name!r}")
        return out.permute(0, 3, 1, 2) if self.nhwc and out.ndim == 4 else out


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for fname in _WEIGHT_FILES:
            if (path / fname).is_file():
                return path / fname
        raise missing_weights_error(str(path), f"one of {', '.join(_WEIGHT_FILES)} in {path}")
    return path


def _hub_id(model_name: str) -> str | None:
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    return cfg.hf_hub_id if cfg is not None else None


def cached_weights(model_name: str) -> str | None:
    """The model's weight file in the Hugging Face hub cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = _hub_id(model_name)
    if not hub_id:
        return None
    for fname in _WEIGHT_FILES:
        found = try_to_load_from_cache(hub_id, fname)
        if isinstance(found, str):
            return found
    return None


def _hub_location(model_name: str) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    hub_id = _hub_id(model_name)
    if not hub_id:
        return f"pretrained weights for {model_name} (timm has no hub id for it)"
    return f"{Path(HF_HUB_CACHE) / ('models--' + hub_id.replace('/', '--'))} (hub id {hub_id})"


def build_timm(model_name: str, *, weights: str | None, random_init: bool, layer: str | None, keep_cls: bool,
               input_size: int = DEFAULT_INPUT_SIZE, model_kwargs: dict | None = None) -> TimmBackbone:
    import timm

    name = f"timm:{model_name}"
    if not timm.is_model(model_name.split(".")[0]):
        raise UsaeError(f"timm has no model {model_name!r}{did_you_mean(model_name, timm.list_models())} "
                        "(see timm.list_models())")
    kwargs = {"num_classes": 0, **(model_kwargs or {})}
    cfg = timm.models.get_pretrained_cfg(model_name.split(".")[0])
    if cfg is not None and cfg.fixed_input_size:
        kwargs.setdefault("img_size", input_size)
    local = weights if weights is not None else cached_weights(model_name)
    if random_init:
        model, source = timm.create_model(model_name, pretrained=False, **kwargs), "random-init"
    elif local is not None:
        file = _weights_file(Path(local))
        if not file.is_file():
            raise missing_weights_error(name, str(file))
        try:
            model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs)
        except Exception as exc:  # noqa: BLE001 - timm raises RuntimeError/KeyError for mismatched files
            raise UsaeError(f"backbone {name!r}: cannot load {file}: {exc}".splitlines()[0]) from None
        source = str(file.resolve())
    else:
        if not can_download("https://huggingface.co"):
            raise missing_weights_error(name, _hub_location(model_name))
        try:
            model = timm.create_model(model_name, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types offline
            log.info("timm could not load pretrained %s: %s", model_name, exc)
            raise missing_weights_error(name, _hub_location(model_name)) from None
        source = f"hub {model.pretrained_cfg.get('hf_hub_id') or model.pretrained_cfg.get('url')}"
    return TimmBackbone(name=name, model=model, layer=layer, weights_source=source, keep_cls=keep_cls,
                        input_size=input_size)


def _timm_models() -> list[str]:
    import timm

    return timm.list_models()


@register_backbone("timm:*", family="timm", find_weights=lambda: None, default_layer=FINAL, model_names=_timm_models,
                   description="any timm model (vit_small_patch14_dinov2, vit_base_patch16_siglip_224, "
                               "vit_base_patch16_224, convnext_tiny ...); weights from the HF cache or --weights")
def timm_any(model_name: str, *, weights: str | None = None, layer: str | None = None, random_init: bool = False,
             keep_cls: bool = False, input_size: int = DEFAULT_INPUT_SIZE,
             model_kwargs: dict | None = None) -> TimmBackbone:
    return build_timm(model_name, weights=weights, random_init=random_init, layer=layer, keep_cls=keep_cls,
                      input_size=input_size, model_kwargs=model_kwargs)
