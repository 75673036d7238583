"""What every backbone adapter is: a torch module that turns preprocessed images into patch tokens.

An adapter wraps a family's model and implements `features(x)`, returning either a CNN feature map
`[B, C, h, w]` or a token sequence `[B, prefix + h*w, D]` whose first `num_prefix_tokens` entries
are CLS/register tokens. `forward` turns both into `[B, h*w, D]` on the native grid (CLS kept in
front only with `keep_cls`). Geometry is always `usae_core.images.square_view`, so cell (r, c)
is the same image region in every model.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from usae_core.backbones.patch_conv import use_gemm_patch_convs
from usae_core.errors import UsaeError
from usae_core.images import square_view

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_store_name(text: str) -> str:
    """A store model name (`^[A-Za-z0-9][A-Za-z0-9._-]*$`, at most 100 characters) for `text`."""
    name = _UNSAFE.sub("-", text).strip("-._")
    return (name or "model")[:100]


def missing_weights_error(name: str, looked_for: str, how: str = "") -> UsaeError:
    """The one error for absent weights: what was missing, where we looked, and how to fix it."""
    extra = f" {how}" if how else ""
    return UsaeError(
        f"no weights for backbone {name!r}: looked for {looked_for}.{extra} "
        f"Pass a local file or directory with --weights {name}=PATH"
    )


def offline_mode() -> bool:
    """True when downloads must not even be tried (USAE_OFFLINE or HF_HUB_OFFLINE set)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("USAE_OFFLINE", "HF_HUB_OFFLINE"))


def can_download(url: str) -> bool:
    """Whether a download from `url`'s host is worth trying: not offline, and the host resolves
    and accepts a connection within a few seconds (hub clients otherwise retry for minutes)."""
    import socket
    from urllib.parse import urlparse

    if offline_mode():
        return False
    host = urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=3):
            return True
    except OSError:
        return False


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


class _StopForward(Exception):
    """Raised by a capture hook to skip the layers after the one we read."""


@contextmanager
def _hooked(module: nn.Module, box: dict, stop: bool) -> Iterator[None]:
    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        box["out"] = output[0] if isinstance(output, (tuple, list)) else output
        if stop:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_to_layer(model: nn.Module, layer: str, run: Callable[[], object], owner: str = "the model") -> torch.Tensor:
    """Output of submodule `layer` while `run()` calls `model`; later layers are not computed."""
    box: dict = {}
    with _hooked(get_layer(model, layer, owner), box, stop=True):
        try:
            run()
        except _StopForward:
            pass
    if "out" not in box:
        raise UsaeError(f"layer {layer!r} was not reached by the forward pass")
    return box["out"]


def get_layer(model: nn.Module, layer: str, owner: str = "the model") -> nn.Module:
    try:
        return model.get_submodule(layer)
    except AttributeError:
        raise UsaeError(f"{owner} has no layer {layer!r}; {_layers_near(model, layer)}") from None


def _layers_near(model: nn.Module, layer: str) -> str:
    """The layers under the deepest part of `layer` that exists (at worst the model's top
    level), to pick a real one from."""
    parts = layer.split(".")
    depth = len(parts) - 1
    while depth > 0 and not _has_submodule(model, ".".join(parts[:depth])):
        depth -= 1
    parent = ".".join(parts[:depth])
    children = [f"{parent}.{n}" if parent else n for n, _ in model.get_submodule(parent).named_children()]
    if not children:
        return f"{parent} has no layers under it"
    shown = children if len(children) <= 8 else [*children[:3], "...", *children[-3:]]
    return f"the layers under {parent or 'the model'} are {', '.join(shown)}"


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def last_layer_at_stride(model: nn.Module, candidates: Sequence[str], run: Callable[[torch.Tensor], object],
                         input_size: int, stride: int = 16) -> str:
    """The deepest of `candidates` whose feature map is `input_size / stride` on a side.

    Stride 16 gives a 14 x 14 grid at 224 px, the grid the paper aligns models on."""
    shapes: dict[str, tuple[int, ...]] = {}
    want = -(-input_size // stride)

    def recorder(name: str):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            shapes[name] = tuple(output.shape)

        return hook

    model.eval()  # a train-mode probe would overwrite BatchNorm statistics
    handles = [get_layer(model, n).register_forward_hook(recorder(n)) for n in candidates]
    try:
        with torch.no_grad():
            run(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    matching = [n for n in candidates if shapes.get(n, ())[-2:] == (want, want)]
    return matching[-1] if matching else candidates[-1]


def fold_batchnorm(model: nn.Module, pairs: Sequence[tuple[nn.Module, str, str]] = ()) -> None:
    """Fold eval-mode BatchNorm into the convolution before it (about 1.4x faster on a CPU).

    Folds every Conv2d -> BatchNorm2d neighbour pair inside an nn.Sequential, plus explicit
    `(parent, conv_attr, bn_attr)` pairs for models that call them in code. Outputs are unchanged
    up to float rounding; the model must stay in eval mode (it is for feature extraction)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    found = list(pairs)
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            kids = list(parent._modules.items())
            found += [(parent, a, b) for (a, ma), (b, mb) in zip(kids, kids[1:])
                      if isinstance(ma, nn.Conv2d) and isinstance(mb, nn.BatchNorm2d)]
    model.eval()
    for parent, conv_name, bn_name in found:
        conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())


def load_state_dict_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt/.bin (torch) or .safetensors file, unwrapping common nestings."""
    if not path.is_file():
        raise missing_weights_error(name, str(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for bad files
        if "Weights only load failed" in str(exc):  # torch's advice (weights_only=False) would run its code
            raise UsaeError(f"backbone {name!r}: {path} holds pickled Python objects, not only tensors (a whole "
                            "saved model?), and is not loaded, since unpickling can run code; save the model's "
                            "state_dict() with torch.save, or as .safetensors") from None
        raise UsaeError(f"backbone {name!r}: cannot read weights {path}: {exc}".splitlines()[0]) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UsaeError(f"backbone {name!r}: {path} does not hold a state dict")
    return state


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Strict load with a readable error."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UsaeError(
            f"backbone {name!r}: weights {source} do not fit the model "
            f"({len(result.missing_keys)} missing keys, e.g. {result.missing_keys[:3]}; "
            f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:3]})"
        )


class Backbone(nn.Module):
    """A vision model that yields patch tokens `[B, h*w, dim]` of one layer on its native grid."""

    num_prefix_tokens: int = 0
    """CLS/register tokens in front of the patch tokens of `features`' output (token models)."""

    def __init__(self, *, name: str, family: str, model: nn.Module, input_size: int, mean: Sequence[float],
                 std: Sequence[float], interpolation: str, layer: str, default_layer: str, weights_source: str,
                 keep_cls: bool = False, token_grid: tuple[int, int] | None = None, channels_last: bool = False):
        super().__init__()
        self.name = name
        self.family = family
        self.model = model
        # The wrapper too, not just the model: a feature extractor has no train mode, and code that
        # reads `.training` (hooks, callers' checks) must not see one.
        self.eval()
        if not channels_last:  # token models: their patch embedding, measured on ViTs
            use_gemm_patch_convs(self.model)
        # NHWC layout: about 2x faster for CNNs on a CPU, and the fast path for bf16 convs on a GPU.
        self.channels_last = channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.input_size = int(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self.layer = layer
        self.weights_source = weights_source
        self.keep_cls = keep_cls
        self.store_name = safe_store_name(name.split(":", 1)[-1].rstrip("/").split("/")[-1]
                                          + ("" if layer == default_layer else f"-{layer}"))
        # Normalisation folded into one multiply-add on uint8 input: x * scale + shift.
        std_t, mean_t = torch.tensor(self.std), torch.tensor(self.mean)
        self.register_buffer("_scale", (1 / (255 * std_t)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", (-mean_t / std_t).view(1, 3, 1, 1), persistent=False)
        self._token_grid = token_grid
        self.dim, self.native_grid = self._probe()
        if keep_cls and self.num_prefix_tokens == 0:
            raise UsaeError(f"backbone {name!r} has no CLS token to keep")

    # ------------------------------------------------------------------ the adapter's part
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, h, w]` feature map or `[B, prefix + h*w, D]` tokens of the chosen layer.

        By default: the output of submodule `layer` while the model runs on `x` (later layers skipped)."""
        return run_to_layer(self.model, self.layer, lambda: self.model(x), f"backbone {self.name!r}")

    # ------------------------------------------------------------------ common behaviour
    def _probe(self) -> tuple[int, tuple[int, int]]:
        """Output width and native grid, read from one forward pass at the input size."""
        with torch.no_grad():
            out = self.features(self._layout(torch.zeros(1, 3, self.input_size, self.input_size)))
        if out.ndim == 4:
            return int(out.shape[1]), (int(out.shape[2]), int(out.shape[3]))
        if self._token_grid is None:
            raise UsaeError(f"backbone {self.name!r}: token output needs a known patch grid")
        h, w = self._token_grid
        if out.shape[1] != self.num_prefix_tokens + h * w:
            raise UsaeError(f"backbone {self.name!r}: {out.shape[1]} tokens, expected "
                            f"{self.num_prefix_tokens} prefix + {h}x{w} patches")
        return int(out.shape[2]), (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images `[B, 3, H, W]` -> tokens `[B, (1 +) h*w, dim]`, row-major over the grid."""
        out = self.features(self._layout(x))
        if out.ndim == 4:
            return out.flatten(2).transpose(1, 2)
        patches = out[:, self.num_prefix_tokens :]
        return torch.cat([out[:, :1], patches], 1) if self.keep_cls else patches

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 square views `[B, 3, S, S]` -> the float input this model expects."""
        return images.float() * self._scale + self._shift

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """One PIL image -> preprocessed `[3, input_size, input_size]` on the square view."""
        view = pil_to_uint8(square_view(img, self.input_size, self.interpolation))
        return self.normalize(view[None].to(self._scale.device))[0]

    @property
    def tokens_per_image(self) -> int:
        return self.native_grid[0] * self.native_grid[1]

    def info(self) -> dict:
        """What a store records about this backbone."""
        return {
            "family": self.family,
            "registry_name": self.name,
            "layer": self.layer,
            "native_grid": list(self.native_grid),
            "dim": self.dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "weights": self.weights_source,
            "keep_cls": self.keep_cls,
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layer={self.layer!r}, dim={self.dim}, grid={self.native_grid}"
