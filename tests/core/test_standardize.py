"""Mining's one-pass standardisation (usae_core/kernels/standardize.py) against float64 math,
as PyTorch and as the Triton kernel in the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from usae_core.kernels import HAVE_TRITON
from usae_core.kernels.standardize import standardize_rows

ROOT = Path(__file__).resolve().parents[2]


def _check(stored: torch.dtype, compute: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    rows, dim = 70, 150  # several 32-row and 128-column blocks, with ragged edges
    raw = (torch.randn(rows, dim, generator=gen) * 3 + 5).to(stored)
    mean = torch.randn(dim, generator=gen) + 5
    scale = torch.tensor(2.5)
    bias = 0.1 * torch.randn(dim, generator=gen)
    got = standardize_rows(raw, mean, scale, bias, compute)
    x64 = (raw.double() - mean.double()) / scale.double()
    assert got.x.dtype == compute and got.target.dtype == torch.float32
    torch.testing.assert_close(got.x.double(), x64.to(compute).double(), rtol=1e-2 if compute == torch.bfloat16 else 1e-6,
                               atol=1e-2 if compute == torch.bfloat16 else 1e-6)
    torch.testing.assert_close(got.target.double(), x64 - bias.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.col_sum.double(), x64.sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.col_sq.double(), x64.square().sum(0), rtol=1e-5, atol=1e-4)
    # Exactly USAE.standardize's rounding, so mining encodes the same inputs as before.
    torch.testing.assert_close(got.target + bias, (raw.float() - mean) / scale, rtol=0, atol=1e-6)


def test_pytorch_path_matches_float64():
    for stored in (torch.float16, torch.bfloat16, torch.float32):
        _check(stored, torch.float32)


def kernel_checks() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1, so the Triton kernel itself runs on the CPU."""
    from usae_core.kernels import use_triton

    assert use_triton(torch.zeros(1)), "interpreter mode did not enable the kernels"
    for stored in (torch.float16, torch.bfloat16, torch.float32):
        for compute in (torch.float32, torch.bfloat16):
            _check(stored, compute)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_triton_kernel_matches_float64_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("USAE_DISABLE_TRITON", None)
    done = subprocess.run([sys.executable, "-c", "from tests.core.test_standardize import kernel_checks; kernel_checks()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
