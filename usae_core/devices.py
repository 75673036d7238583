"""Where tensors compute: the one place a `--device` / `device=` value is checked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from usae_core.errors import UsaeError


def resolve_device(spec: str | torch.device) -> torch.device:
    """"auto" (a GPU when there is one), "cpu", "cuda" or "cuda:N", or a torch.device, as a
    torch.device that exists here: a GPU that is not there is a UsaeError, not torch's
    "Found no NVIDIA driver" from deep inside the first tensor moved to it."""
    if isinstance(spec, str) and spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UsaeError(f"unknown device {spec!r} (auto|cpu|cuda|cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsaeError(f"--device {spec} (device={str(spec)!r}) was asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsaeError(f"--device {spec} (device={str(spec)!r}): this machine has {torch.cuda.device_count()} "
                            "CUDA device(s), numbered from 0")
    return device


@contextmanager
def borrowed(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`model` on `device` in eval mode for the block, then back on the device and in the mode it
    came in: a library call must not leave a caller's model elsewhere (its next CPU tensor would
    meet a GPU model). A model already on `device` is not copied."""
    home = next((p.device for p in model.parameters()), None)
    training = model.training
    model.to(device).eval()
    try:
        yield model
    finally:
        if home is not None:
            model.to(home)
        model.train(training)
