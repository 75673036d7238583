"""Hugging Face transformers vision towers: `hf:ID_OR_DIR` for Dinov2Model (also with registers),
SiglipVisionModel, CLIPVisionModel and ViTModel, e.g. `hf:facebook/dinov2-small` or
`hf:/models/siglip-base-patch16-224`.

Weights and config: a local directory (the name itself, or `--weights NAME=DIR`), else the hub
cache, else a download when online. Preprocessing comes from the directory's
preprocessor_config.json when present, else the model type's standard values. Layers: `final`
(last_hidden_state; the default) or `N`, the N-th entry of hidden_states (0 = embeddings).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from usae_core.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, can_download, missing_weights_error
from usae_core.backbones.registry import register_backbone
from usae_core.errors import UsaeError

log = logging.getLogger(__name__)
FINAL = "final"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}

# model_type -> (class name, standard mean, std, interpolation, input size or None for config.image_size)
_TOWERS = {
    "dinov2": ("Dinov2Model", IMAGENET_MEAN, IMAGENET_STD, "bicubic", 224),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", IMAGENET_MEAN, IMAGENET_STD, "bicubic", 224),
    "siglip": ("SiglipVisionModel", (0.5,) * 3, (0.5,) * 3, "bicubic", None),
    "siglip_vision_model": ("SiglipVisionModel", (0.5,) * 3, (0.5,) * 3, "bicubic", None),
    "clip": ("CLIPVisionModel", CLIP_MEAN, CLIP_STD, "bicubic", None),
    "clip_vision_model": ("CLIPVisionModel", CLIP_MEAN, CLIP_STD, "bicubic", None),
    "vit": ("ViTModel", (0.5,) * 3, (0.5,) * 3, "bilinear", None),
}


def _vision_config(config):
    return getattr(config, "vision_config", None) or config


def _preprocessor_config(source: str) -> dict:
    """preprocessor_config.json of a local directory or a cached hub repo ({} when absent)."""
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "preprocessor_config.json") if not Path(source).exists() else None
        path = Path(found) if isinstance(found, str) else path
    return json.loads(path.read_text()) if path.is_file() else {}


def _side(value: object) -> int | None:
    """An image side from a processor's `size`/`crop_size` entry (int or dict)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("height", "shortest_edge"):
            if key in value:
                return int(value[key])
    return None


def _preprocessing(model_type: str, config, processor: dict) -> tuple[int, tuple, tuple, str]:
    _, mean, std, interpolation, size = _TOWERS[model_type]
    size = size or int(config.image_size)
    crop = _side(processor.get("crop_size")) if processor.get("do_center_crop", True) else None
    size = crop or _side(processor.get("size")) or size
    mean = tuple(processor.get("image_mean", mean))
    std = tuple(processor.get("image_std", std))
    interpolation = _PIL_RESAMPLE.get(processor.get("resample"), interpolation)
    return size, mean, std, interpolation


class HFBackbone(Backbone):
    def __init__(self, *, name: str, model: nn.Module, model_type: str, layer: str | None, weights_source: str,
                 keep_cls: bool, processor: dict):
        config = _vision_config(model.config)
        input_size, mean, std, interpolation = _preprocessing(model_type, config, processor)
        side = input_size // int(config.patch_size)
        # Position embeddings are resized when the input differs from the size trained at.
        self.interpolate_pos = input_size != int(config.image_size) and not model_type.startswith("dinov2")
        layer = layer or FINAL
        if layer != FINAL and not layer.isdigit():
            raise UsaeError(f"backbone {name!r}: layer must be 'final' or a hidden-state index, got {layer!r}")
        self._hidden_index = None if layer == FINAL else int(layer)
        self.num_prefix_tokens = self._count_prefix(model, input_size, side)
        super().__init__(name=name, family="transformers", model=model, input_size=input_size, mean=mean, std=std,
                         interpolation=interpolation, layer=layer, default_layer=FINAL,
                         weights_source=weights_source, keep_cls=keep_cls, token_grid=(side, side))

    def _run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate_pos else {}
        if self._hidden_index is None:
            return model(pixel_values=x, **kwargs).last_hidden_state
        hidden = model(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states
        if self._hidden_index >= len(hidden):
            raise UsaeError(f"backbone {self.name!r} has hidden states 0..{len(hidden) - 1}, not {self._hidden_index}")
        return hidden[self._hidden_index]

    def _count_prefix(self, model: nn.Module, input_size: int, side: int) -> int:
        """CLS/register tokens: whatever the sequence holds beyond the patch grid."""
        with torch.no_grad():
            return int(self._run(model.eval(), torch.zeros(1, 3, input_size, input_size)).shape[1]) - side * side

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.model, x)


def build_hf(source: str, *, name: str, weights: str | None, random_init: bool, layer: str | None,
             keep_cls: bool) -> HFBackbone:
    import transformers
    from huggingface_hub.constants import HF_HUB_CACHE

    source = weights or source
    local = Path(source).is_dir()
    where = f"{source}/config.json and model.safetensors" if local else \
        f"{Path(HF_HUB_CACHE) / ('models--' + source.replace('/', '--'))} (hub id {source})"
    offline = local or not can_download("https://huggingface.co")
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as exc:
        log.info("no config for %s: %s", source, exc)
        raise missing_weights_error(name, where) from None
    model_type = config.model_type
    if model_type not in _TOWERS:
        raise UsaeError(f"backbone {name!r}: model type {model_type!r} is not supported "
                        f"(supported: {', '.join(sorted(_TOWERS))})")
    cls = getattr(transformers, _TOWERS[model_type][0])
    extra = {"add_pooling_layer": False} if model_type == "vit" else {}
    if random_init:
        model, weights_source = cls(_vision_config(config), **extra), "random-init"
    else:
        try:
            model, loading = cls.from_pretrained(source, local_files_only=offline, output_loading_info=True, **extra)
        except (OSError, ValueError) as exc:
            log.info("no weights for %s: %s", source, exc)
            raise missing_weights_error(name, where) from None
        missing = list(loading.get("missing_keys", []))
        if missing:  # transformers would quietly leave these at their random init
            raise UsaeError(f"backbone {name!r}: {source} lacks {len(missing)} weights of a {cls.__name__} "
                            f"(e.g. {sorted(missing)[:3]}); refusing to run partly random")
        weights_source = str(Path(source).resolve()) if local else f"hub {source}"
    return HFBackbone(name=name, model=model.float(), model_type=model_type, layer=layer,
                      weights_source=weights_source, keep_cls=keep_cls, processor=_preprocessor_config(source))


@register_backbone("hf:*", family="transformers", find_weights=lambda: None, default_layer=FINAL,
                   description="a transformers vision tower by hub id or local directory (Dinov2Model, "
                               "SiglipVisionModel, CLIPVisionModel, ViTModel)")
def hf_any(source: str, *, weights: str | None = None, layer: str | None = None, random_init: bool = False,
           keep_cls: bool = False) -> HFBackbone:
    return build_hf(source, name=f"hf:{source}", weights=weights, random_init=random_init, layer=layer,
                    keep_cls=keep_cls)
