"""Triton kernels for the training hot path, each with a plain-PyTorch fallback.

`use_triton(t)` decides per call: the kernels run on CUDA tensors when Triton imports, and on
CPU tensors only under `TRITON_INTERPRET=1` (how the CPU test-suite checks the kernels
themselves against the plain implementations). Everything else takes the fallback.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it.
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DISABLED = os.environ.get("USAE_DISABLE_TRITON") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return HAVE_TRITON and not _DISABLED and (t.is_cuda or INTERPRET)
