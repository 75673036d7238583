"""Sparse-code products that touch only the k active rows, with no `[tokens, k, dim]` tensors.

With a code given as `indices, weights` (`[batch, k]` each) and a table `[n_concepts, dim]`:

- `gather_decode`:  out[b]  = sum_j weights[b, j] * table[indices[b, j]]         (decode)
- `row_dot`:        out[b, j] = <rows[b], table[indices[b, j]]>                    (its value gradient)
- `concept_sum`:    out[c]  = sum_{(b, j): indices[b, j] = c} weights[b, j] * rows[b]
  (the table gradient of a decode, and the encoder weight gradient of a TopK code)
- `decode_backward`: both gradients of a decode in one pass (each gradient row read once).
- `residual_sq`:    out[b] = || target[b] - sum_j weights[b, j] * table[indices[b, j]] ||^2
  (reconstruction error without materialising the reconstruction; mining's R^2 matrix)

`concept_sum` and `decode_backward` walk the code sorted by concept (a `ConceptOrder`, built
once per code and shared by every product over it), so each output row is summed by one
program, without atomics. The Triton kernels accumulate in float32 whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from usae_core.kernels import HAVE_TRITON, use_triton



@dataclass(frozen=True)
class ConceptOrder:
    """The entries of a `[batch, k]` code sorted by concept."""

    slots: torch.Tensor
    """`[batch * k]` int64 flat positions (b * k + j), grouped by concept."""
    starts: torch.Tensor
    """`[n_concepts + 1]` int64: concept c owns slots[starts[c]:starts[c + 1]]."""

    @classmethod
    def build(cls, indices: torch.Tensor, n_concepts: int) -> "ConceptOrder":
        # int32 keys halve the radix passes of the sort; no host sync anywhere.
        keys, slots = torch.sort(indices.reshape(-1).to(torch.int32))
        bounds = torch.arange(n_concepts + 1, dtype=torch.int32, device=indices.device)
        return cls(slots, torch.searchsorted(keys, bounds).to(torch.int64))


def gather_decode(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    out_dtype = out_dtype or table.dtype
    if use_triton(table) and _kernel_dtypes(table, weights):
        return _gather_decode_triton(indices, weights, table, out_dtype)
    out = F.embedding_bag(indices, table, per_sample_weights=weights.to(table.dtype), mode="sum")
    return out.to(out_dtype)


def row_dot(indices: torch.Tensor, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float32 (float64 for float64 input) `[batch, k]` (PyTorch; the CUDA path is `decode_backward`)."""
    # Fallback: the per-sample-weight gradient of an embedding_bag is exactly this product.
    acc = torch.float64 if table.dtype == torch.float64 else torch.float32
    weights = torch.zeros(indices.shape, dtype=acc, device=indices.device, requires_grad=True)
    with torch.enable_grad():
        bag = F.embedding_bag(indices, table.detach().to(acc), per_sample_weights=weights, mode="sum")
        (out,) = torch.autograd.grad(bag, weights, rows.detach().to(acc))
    return out


def concept_sum(order: ConceptOrder, indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                n_concepts: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (float64 for float64 input) `[n_concepts, dim]`; added into `out` when given."""
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.zeros(n_concepts, rows.shape[1], dtype=acc, device=rows.device)
    if use_triton(rows) and _kernel_dtypes(rows, weights):
        _concept_sum_triton(order, weights, rows, out, indices.shape[1])
        return out
    # Fallback: the table gradient of an embedding_bag is exactly this per-concept sum.
    table = torch.zeros(n_concepts, rows.shape[1], dtype=acc, device=rows.device, requires_grad=True)
    with torch.enable_grad():
        bag = F.embedding_bag(indices, table, per_sample_weights=weights.detach().to(acc), mode="sum")
        (grad,) = torch.autograd.grad(bag, table, rows.detach().to(acc))
    return out.add_(grad)


def decode_backward(order: ConceptOrder, indices: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor,
                    table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `gather_decode` given the output gradient: (`row_dot`, `concept_sum`)."""
    if use_triton(grad) and _kernel_dtypes(grad, weights, table):
        return _decode_backward_triton(order, weights, grad, table, indices.shape[1])
    n_concepts = table.shape[0]
    return row_dot(indices, grad, table), concept_sum(order, indices, weights, grad, n_concepts)


def residual_sq(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
    """float32 `[batch]` squared error of the decode against `target` `[batch, dim]`."""
    if use_triton(table) and _kernel_dtypes(table, weights, target):
        return _residual_sq_triton(indices, weights, table, target)
    decoded = F.embedding_bag(indices, table.float(), per_sample_weights=weights.float(), mode="sum")
    return (target.float() - decoded).square().sum(1)


def _kernel_dtypes(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_decode_kernel(idx_ptr, w_ptr, table_ptr, out_ptr, B, D, stride_t, stride_o,
                              K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < B
        mask = rmask[:, None] & (cols < D)[None, :]
        rows64 = rows.to(tl.int64)
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for j in range(K):
            c = tl.load(idx_ptr + rows64 * K + j, mask=rmask, other=0)
            w = tl.load(w_ptr + rows64 * K + j, mask=rmask, other=0.0).to(tl.float32)
            t = tl.load(table_ptr + c[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
            acc += w[:, None] * t.to(tl.float32)
        tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _residual_sq_kernel(idx_ptr, w_ptr, table_ptr, target_ptr, out_ptr, B, D, stride_t, stride_x,
                            K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        total = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = rmask[:, None] & (cols < D)[None, :]
            acc = tl.load(target_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            for j in range(K):
                c = tl.load(idx_ptr + rows64 * K + j, mask=rmask, other=0)
                w = tl.load(w_ptr + rows64 * K + j, mask=rmask, other=0.0).to(tl.float32)
                t = tl.load(table_ptr + c[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
                acc -= w[:, None] * t.to(tl.float32)
            total += tl.sum(acc * acc, axis=1)
        tl.store(out_ptr + rows64, total, mask=rmask)

    @triton.jit
    def _decode_backward_kernel(starts_ptr, slots_ptr, w_ptr, grad_ptr, table_ptr, g_table_ptr, g_w_ptr,
                                D, stride_g, stride_t, stride_gt,
                                K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per concept c, over the whole row: every gradient row grad[b] gathered for
        # an entry (b, j) of c feeds both  g_table[c] += w[b, j] * grad[b]  and  g_w[b, j] = <grad[b], table[c]>.
        concept = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        t = tl.load(table_ptr + concept * stride_t + cols, mask=cmask, other=0.0).to(tl.float32)
        first = tl.load(starts_ptr + concept)
        last = tl.load(starts_ptr + concept + 1)
        acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
        for e0 in range(first, last, BLOCK_E):
            entries = e0 + tl.arange(0, BLOCK_E)
            emask = entries < last
            slot = tl.load(slots_ptr + entries, mask=emask, other=0)
            w = tl.load(w_ptr + slot, mask=emask, other=0.0).to(tl.float32)
            r = tl.load(grad_ptr + (slot // K)[:, None] * stride_g + cols[None, :],
                        mask=emask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += w[:, None] * r
            tl.store(g_w_ptr + slot, tl.sum(r * t[None, :], axis=1), mask=emask)
        tl.store(g_table_ptr + concept * stride_gt + cols, tl.sum(acc, axis=0), mask=cmask)

    @triton.jit
    def _concept_sum_kernel(starts_ptr, slots_ptr, w_ptr, rows_ptr, out_ptr, D, stride_r, stride_o,
                            K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per concept, over the whole row (as _decode_backward_kernel, without the dot).
        concept = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        first = tl.load(starts_ptr + concept)
        last = tl.load(starts_ptr + concept + 1)
        acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
        for e0 in range(first, last, BLOCK_E):
            entries = e0 + tl.arange(0, BLOCK_E)
            emask = entries < last
            slot = tl.load(slots_ptr + entries, mask=emask, other=0)
            w = tl.load(w_ptr + slot, mask=emask, other=0.0).to(tl.float32)
            r = tl.load(rows_ptr + (slot // K)[:, None] * stride_r + cols[None, :],
                        mask=emask[:, None] & cmask[None, :], other=0.0)
            acc += w[:, None] * r.to(tl.float32)
        out_at = out_ptr + concept * stride_o + cols
        tl.store(out_at, tl.load(out_at, mask=cmask, other=0.0) + tl.sum(acc, axis=0), mask=cmask)


_BLOCK_D = 128


def _gather_decode_triton(indices, weights, table, out_dtype):
    indices, weights, table = indices.contiguous(), weights.contiguous(), table.contiguous()
    n, k = indices.shape
    d = table.shape[1]
    out = torch.empty(n, d, dtype=out_dtype, device=table.device)
    block_b = 32
    grid = (triton.cdiv(n, block_b), triton.cdiv(d, _BLOCK_D))
    _gather_decode_kernel[grid](indices, weights, table, out, n, d, table.stride(0), out.stride(0),
                                K=k, BLOCK_B=block_b, BLOCK_D=_BLOCK_D, num_warps=8)
    return out


def _residual_sq_triton(indices, weights, table, target):
    indices, weights, table, target = indices.contiguous(), weights.contiguous(), table.contiguous(), target.contiguous()
    n, k = indices.shape
    out = torch.empty(n, dtype=torch.float32, device=table.device)
    block_b = 32
    _residual_sq_kernel[(triton.cdiv(n, block_b),)](indices, weights, table, target, out, n, table.shape[1],
                                                   table.stride(0), target.stride(0),
                                                   K=k, BLOCK_B=block_b, BLOCK_D=_BLOCK_D, num_warps=8)
    return out


def _decode_backward_triton(order, weights, grad, table, k):
    weights, grad, table = weights.contiguous(), grad.contiguous(), table.contiguous()
    n_concepts, d = table.shape
    g_w = torch.empty(weights.shape, dtype=torch.float32, device=grad.device)
    g_table = torch.empty(n_concepts, d, dtype=torch.float32, device=grad.device)
    block_d = triton.next_power_of_2(d)
    _decode_backward_kernel[(n_concepts,)](order.starts, order.slots, weights, grad, table, g_table, g_w,
                                           d, grad.stride(0), table.stride(0), g_table.stride(0),
                                           K=k, BLOCK_E=max(1, 8192 // block_d), BLOCK_D=block_d, num_warps=8)
    return g_w, g_table


def _concept_sum_triton(order, weights, rows, out, k):
    weights, rows = weights.contiguous(), rows.contiguous()
    n_concepts, d = out.shape
    block_d = triton.next_power_of_2(d)
    _concept_sum_kernel[(n_concepts,)](order.starts, order.slots, weights, rows, out, d, rows.stride(0), out.stride(0),
                                       K=k, BLOCK_E=max(1, 8192 // block_d), BLOCK_D=block_d, num_warps=8)
