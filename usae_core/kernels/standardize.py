"""One pass from stored activation rows to what mining needs of them.

Mining reads each batch of a model's rows once and needs: the standardised rows in the
encoder's compute dtype, the reconstruction target (standardised rows minus the decoder bias,
float32), and the per-dimension sums of the standardised rows and their squares (the R^2
denominator). In PyTorch that is a conversion, a subtraction, a division, another subtraction,
a cast and three reductions over the batch, each a pass over memory; the Triton kernel reads the
stored rows once and writes the two outputs, with column sums per row block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from usae_core.kernels import HAVE_TRITON, use_triton


class StandardizedRows(NamedTuple):
    x: torch.Tensor
    """`(raw - mean) / scale` in the compute dtype, `[rows, dim]`."""
    target: torch.Tensor
    """float32 `x - bias` (computed before the cast to the compute dtype)."""
    col_sum: torch.Tensor
    """float32 `[dim]` sum of x over the rows."""
    col_sq: torch.Tensor
    """float32 `[dim]` sum of x^2 over the rows."""


def standardize_rows(raw: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                     compute_dtype: torch.dtype) -> StandardizedRows:
    """Standardise stored rows (`float16`, `bfloat16` or `float32`) for mining (module docstring)."""
    if use_triton(raw) and raw.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return _standardize_triton(raw, mean, scale, bias, compute_dtype)
    x = (raw.float() - mean) / scale
    return StandardizedRows(x.to(compute_dtype), x - bias.detach(), x.sum(0), x.square().sum(0))


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _standardize_kernel(raw_ptr, mean_ptr, scale_ptr, bias_ptr, x_ptr, target_ptr, sum_ptr, sq_ptr,
                            B, D, stride_r, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = (rows < B)[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        raw = tl.load(raw_ptr + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
        scale = tl.load(scale_ptr + cols, mask=cmask, other=1.0)
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        x = tl.where(mask, (raw - mean[None, :]) / scale[None, :], 0.0)  # as USAE.standardize rounds
        at = rows64[:, None] * D + cols[None, :]
        tl.store(x_ptr + at, x.to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(target_ptr + at, x - bias[None, :], mask=mask)
        out = tl.program_id(0) * D + cols
        tl.store(sum_ptr + out, tl.sum(x, axis=0), mask=cmask)
        tl.store(sq_ptr + out, tl.sum(x * x, axis=0), mask=cmask)


def _standardize_triton(raw, mean, scale, bias, compute_dtype) -> StandardizedRows:
    raw = raw if raw.stride(1) == 1 else raw.contiguous()
    n, d = raw.shape
    block_b, block_d = 32, 128
    grid = (triton.cdiv(n, block_b), triton.cdiv(d, block_d))
    x = torch.empty(n, d, dtype=compute_dtype, device=raw.device)
    target = torch.empty(n, d, dtype=torch.float32, device=raw.device)
    sums = torch.empty(2, grid[0], d, dtype=torch.float32, device=raw.device)
    per_column = scale.float().reshape(-1).expand(d).contiguous()  # USAE keeps one scale per model
    _standardize_kernel[grid](raw, mean.float().contiguous(), per_column, bias.detach().float().contiguous(),
                              x, target, sums[0], sums[1], n, d, raw.stride(0),
                              BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4)
    col = sums.sum(1)
    return StandardizedRows(x, target, col[0], col[1])
