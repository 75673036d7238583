"""Sparse-code products that touch only the k active rows, with no `[tokens, k, dim]` tensors.

With a code given as `indices, weights` (`[batch, k]` each) and a table `[n_concepts, dim]`:

- `gather_decode`:  out[b]  = sum_j weights[b, j] * table[indices[b, j]]         (decode)
- `row_dot`:        out[b, j] = <rows[b], table[indices[b, j]]>                    (its value gradient)
- `concept_sum`:    out[c]  = sum_{(b, j): indices[b, j] = c} weights[b, j] * rows[b]
  (the table gradient of a decode, and the encoder weight gradient of a TopK code)
- `decode_backward`: both gradients of a decode in one pass (each gradient row read once).
- `concept_totals`: out[c] = sum_{(b, j): indices[b, j] = c} weights[b, j]
- `residual_sq`:    out[b] = || target[b] - sum_j weights[b, j] * table[indices[b, j]] ||^2
  (reconstruction error without materialising the reconstruction; mining's R^2 matrix)
- `decode_loss_terms`: a decode plus bias against a target, reduced to the L1 or MSE loss, the
  squared error, the per-element loss gradient and, when asked, that gradient's row dots with
  the k gathered rows (the value gradient), in one pass: training never writes the
  reconstruction, and its backward is then a `concept_sum` of the gradient.

`concept_sum` and `decode_backward` walk the code sorted by concept (a `ConceptOrder`, built
once per code and shared by every product over it) in work items of at most `_ITEM` entries
of one concept. The weights are put in that order once per call, so a work item reads its
entries' weights (and adds their value gradients) at consecutive addresses instead of one
scattered 4-byte access per entry and column block. Each item adds its partial row with one
float32 atomic row addition, so summation order (and the last bits of the result) may vary
between CUDA runs. The Triton kernels accumulate in float32 whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from usae_core.kernels import HAVE_TRITON, use_triton

_ITEM = 1024
"""Entries per work item of the per-concept kernels: a frequent concept is split over several
programs, so one concept firing on most tokens no longer leaves a single program running long
after the rest (concept frequencies are heavy-tailed)."""


@dataclass(frozen=True)
class ConceptOrder:
    """The entries of a `[batch, k]` code sorted by concept, cut into work items of at most
    `_ITEM` entries of one concept each."""

    slots: torch.Tensor
    """`[batch * k]` int64 flat positions (b * k + j), grouped by concept."""
    tokens: torch.Tensor
    """`[batch * k]` int32: the token (row) of each of those entries, `slots // k`."""
    starts: torch.Tensor
    """`[n_concepts + 1]` int64: concept c owns slots[starts[c]:starts[c + 1]]."""
    items: torch.Tensor
    """`[n_concepts + 1]` int64: concept c owns work items items[c]:items[c + 1]."""

    @classmethod
    def build(cls, indices: torch.Tensor, n_concepts: int) -> "ConceptOrder":
        # int32 keys halve the radix passes of the sort; no host sync anywhere.
        keys, slots = torch.sort(indices.reshape(-1).to(torch.int32))
        tokens = slots.div(indices.shape[1], rounding_mode="floor").to(torch.int32)
        bounds = torch.arange(n_concepts + 1, dtype=torch.int32, device=indices.device)
        starts = torch.searchsorted(keys, bounds).to(torch.int64)
        items = torch.zeros_like(starts)
        torch.cumsum(starts.diff().add_(_ITEM - 1).div_(_ITEM, rounding_mode="floor"), 0, out=items[1:])
        return cls(slots, tokens, starts, items)

    def max_items(self) -> int:
        """An upper bound of the work items, known without reading the device."""
        return self.slots.numel() // _ITEM + len(self.starts) - 1


def concept_totals(order: ConceptOrder, values: torch.Tensor) -> torch.Tensor:
    """float64 `[n_concepts]`: the sum of `values` (`[batch, k]`, laid out like the code) over
    each concept's entries. A difference of float64 prefix sums in concept order: unlike an
    atomic `index_add_` it does not serialise on frequent concepts, and it is deterministic."""
    ordered = values.reshape(-1)[order.slots].to(torch.float64)
    prefix = torch.zeros(ordered.numel() + 1, dtype=torch.float64, device=ordered.device)
    torch.cumsum(ordered, 0, out=prefix[1:])
    return prefix[order.starts[1:]] - prefix[order.starts[:-1]]


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
    """float32 (float64 when rows or weights are float64) `[n_concepts, dim]`; added into `out` when given.

    `rows` may be int8 (the signs an L1 loss leaves, see `decode_loss_terms`)."""
    acc = torch.float64 if torch.float64 in (rows.dtype, weights.dtype) else torch.float32
    if out is None:
        out = torch.zeros(n_concepts, rows.shape[1], dtype=acc, device=rows.device)
    if use_triton(rows) and _kernel_dtypes(weights) and (rows.dtype == torch.int8 or _kernel_dtypes(rows)):
        _concept_sum_triton(order, weights, rows, out)
        return out
    # Fallback: the table gradient of an embedding_bag is exactly this per-concept sum.
    table = torch.zeros(n_concepts, rows.shape[1], dtype=acc, device=rows.device, requires_grad=True)
    with torch.enable_grad():
        bag = F.embedding_bag(indices, table, per_sample_weights=weights.detach().to(acc), mode="sum")
        (grad,) = torch.autograd.grad(bag, table, rows.detach().to(acc))
    return out.add_(grad)


def decode_backward(order: ConceptOrder, indices: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor,
                    table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `gather_decode` given the output gradient: (`row_dot`, `concept_sum`).

    `grad` may be int8 (the signs an L1 loss leaves, see `decode_loss_terms`)."""
    if use_triton(grad) and _kernel_dtypes(weights, table) and (grad.dtype == torch.int8 or _kernel_dtypes(grad)):
        return _decode_backward_triton(order, weights, grad, table)
    n_concepts = table.shape[0]
    rows = grad if grad.is_floating_point() else grad.to(weights.dtype)
    return row_dot(indices, rows, table), concept_sum(order, indices, weights, rows, n_concepts)


def decode_loss_terms(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, bias: torch.Tensor,
                      target: torch.Tensor, kind: str, row_dots: bool = True) -> LossTerms:
    """One pass over a decode and its reconstruction loss, without keeping the reconstruction
    (see `LossTerms`); `row_dots=False` leaves the value gradient to `decode_backward`."""
    if kind not in ("l1", "mse"):
        raise ValueError(f"unknown loss {kind!r}")
    if use_triton(table) and _kernel_dtypes(table, weights, bias, target):
        return _decode_loss_triton(indices, weights, table, bias, target, kind, row_dots)
    acc = torch.float64 if table.dtype == torch.float64 else torch.float32
    decoded = F.embedding_bag(indices, table.to(acc), per_sample_weights=weights.to(acc), mode="sum")
    diff = decoded + bias.to(acc) - target.to(acc)
    sse = diff.square().sum()
    if kind == "l1":
        signs = torch.sign(diff)
        dots = row_dot(indices, signs, table) if row_dots else None
        return LossTerms(diff.abs().sum(), sse, signs.to(torch.int8), signs.sum(0), dots)
    grad = diff.to(table.dtype)
    return LossTerms(sse, sse, grad, diff.sum(0), row_dot(indices, grad, table) if row_dots else None)


class LossTerms(NamedTuple):
    """What `decode_loss_terms` returns. With diff = gather_decode(...) + bias - target, the loss
    gradient per element is known up to its constant factor: sign(diff) for "l1", diff for "mse"."""

    loss: torch.Tensor
    """float32 scalar: `sum |diff|` for "l1", `sum diff^2` for "mse"."""
    sse: torch.Tensor
    """float32 scalar `sum diff^2`."""
    grad: torch.Tensor
    """The per-element gradient: int8 signs for "l1" (exact, and a quarter of float32's bytes for
    the backward to read), diff in `table.dtype` for "mse"."""
    grad_colsum: torch.Tensor
    """float32 `[dim]` column sums of the gradient (the bias gradient)."""
    row_dots: torch.Tensor | None
    """float32 `[batch, k]`: `<gradient row b, table[indices[b, j]]>` (the value gradient), taken
    right after the decode gathered the k rows (None when not asked for)."""


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
    def _gathered_tile(idx_ptr, w_ptr, table_ptr, rows64, rmask, cols, mask, stride_t,
                       K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        """sum_j w[b, j] * table[idx[b, j], cols] for a tile of rows, in float32."""
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for j in range(K):
            c = tl.load(idx_ptr + rows64 * K + j, mask=rmask, other=0)
            w = tl.load(w_ptr + rows64 * K + j, mask=rmask, other=0.0).to(tl.float32)
            t = tl.load(table_ptr + c[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
            acc += w[:, None] * t.to(tl.float32)
        return acc

    @triton.jit
    def _gather_decode_kernel(idx_ptr, w_ptr, table_ptr, out_ptr, B, D, stride_t, stride_o,
                              K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < B
        mask = rmask[:, None] & (cols < D)[None, :]
        rows64 = rows.to(tl.int64)
        acc = _gathered_tile(idx_ptr, w_ptr, table_ptr, rows64, rmask, cols, mask, stride_t, K, BLOCK_B, BLOCK_D)
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
            acc -= _gathered_tile(idx_ptr, w_ptr, table_ptr, rows64, rmask, cols, mask, stride_t, K, BLOCK_B, BLOCK_D)
            total += tl.sum(acc * acc, axis=1)
        tl.store(out_ptr + rows64, total, mask=rmask)

    @triton.jit
    def _concept_item_kernel(items_ptr, starts_ptr, tokens_ptr, w_ptr, rows_ptr, table_ptr, out_ptr, g_w_ptr,
                             C, D, stride_r, stride_t, stride_o,
                             ITEM: tl.constexpr, SEARCH: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_D: tl.constexpr, DOT: tl.constexpr):
        # Program (item, column block): up to ITEM entries e of one concept c (in concept order:
        # w, tokens and g_w are indexed by e) add sum w[e] * rows[tokens[e]] to out[c] (one atomic
        # row addition per item); with DOT also g_w[e] += <rows[tokens[e]], table[c]> over this
        # column block.
        item = tl.program_id(0).to(tl.int64)
        if item >= tl.load(items_ptr + C):
            return  # the grid is an upper bound of the item count
        lo = tl.full([], 0, tl.int64)  # binary search: the concept c with items[c] <= item < items[c + 1]
        hi = tl.full([], 0, tl.int64) + C
        for _ in range(SEARCH):
            mid = (lo + hi) // 2
            right = tl.load(items_ptr + mid) <= item
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        concept = lo
        first = tl.load(starts_ptr + concept) + (item - tl.load(items_ptr + concept)) * ITEM
        last = tl.minimum(first + ITEM, tl.load(starts_ptr + concept + 1))
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        if DOT:
            t = tl.load(table_ptr + concept * stride_t + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
        for e0 in range(first, last, BLOCK_E):
            entries = e0 + tl.arange(0, BLOCK_E)
            emask = entries < last
            token = tl.load(tokens_ptr + entries, mask=emask, other=0).to(tl.int64)
            w = tl.load(w_ptr + entries, mask=emask, other=0.0).to(tl.float32)
            r = tl.load(rows_ptr + token[:, None] * stride_r + cols[None, :],
                        mask=emask[:, None] & cmask[None, :], other=0).to(tl.float32)
            acc += w[:, None] * r
            if DOT:
                tl.atomic_add(g_w_ptr + entries, tl.sum(r * t[None, :], axis=1), mask=emask, sem="relaxed")
        tl.atomic_add(out_ptr + concept * stride_o + cols, tl.sum(acc, axis=0), mask=cmask, sem="relaxed")

    @triton.jit
    def _decode_loss_kernel(idx_ptr, w_ptr, table_ptr, bias_ptr, target_ptr, grad_ptr, part_ptr, colsum_ptr, dots_ptr,
                            B, D, stride_t, stride_x, stride_g,
                            K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                            L1: tl.constexpr, ROW_DOTS: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < B
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        acc = _gathered_tile(idx_ptr, w_ptr, table_ptr, rows64, rmask, cols, mask, stride_t, K, BLOCK_B, BLOCK_D)
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        x = tl.load(target_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        diff = tl.where(mask, acc - x.to(tl.float32), 0.0)
        sq = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
        if L1:
            grad = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
            loss = tl.sum(tl.sum(tl.abs(diff), axis=1), axis=0)
        else:
            grad = diff
            loss = sq
        tl.store(grad_ptr + rows64[:, None] * stride_g + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(colsum_ptr + tl.program_id(0) * D + cols, tl.sum(grad, axis=0), mask=cmask)
        part = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * 2
        tl.store(part_ptr + part, loss)
        tl.store(part_ptr + part + 1, sq)
        if ROW_DOTS:  # the value gradient over this column block
            if not L1:
                grad = grad.to(grad_ptr.dtype.element_ty).to(tl.float32)  # the rounded gradient the backward sums
            slots = tl.arange(0, K_POW2)
            dots = tl.zeros([BLOCK_B, K_POW2], dtype=tl.float32)
            for j in range(K):
                c = tl.load(idx_ptr + rows64 * K + j, mask=rmask, other=0)
                t = tl.load(table_ptr + c[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                dots = tl.where(slots[None, :] == j, tl.sum(grad * t, axis=1)[:, None], dots)
            dots_at = dots_ptr + (tl.program_id(1) * B + rows64[:, None]) * K + slots[None, :]
            tl.store(dots_at, dots, mask=rmask[:, None] & (slots < K)[None, :])


# (rows, columns, warps) per program of the token-major kernels. The loss and residual tiles come
# from a sweep on the H200 (docs/benchmarks.md, 2026-12-03: 16 x 128 on 4 warps beat 32 x 128 on
# 8 by 4% and 16%); the plain decode was not swept.
_DECODE_ROWS = (32, 128, 8)
_LOSS_ROWS = (16, 128, 4)
_RESIDUAL_ROWS = (16, 128, 4)


def _gather_decode_triton(indices, weights, table, out_dtype):
    indices, weights, table = indices.contiguous(), weights.contiguous(), table.contiguous()
    n, k = indices.shape
    d = table.shape[1]
    out = torch.empty(n, d, dtype=out_dtype, device=table.device)
    block_b, block_d, warps = _DECODE_ROWS
    grid = (triton.cdiv(n, block_b), triton.cdiv(d, block_d))
    _gather_decode_kernel[grid](indices, weights, table, out, n, d, table.stride(0), out.stride(0),
                                K=k, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps)
    return out


def _residual_sq_triton(indices, weights, table, target):
    indices, weights, table, target = indices.contiguous(), weights.contiguous(), table.contiguous(), target.contiguous()
    n, k = indices.shape
    out = torch.empty(n, dtype=torch.float32, device=table.device)
    block_b, block_d, warps = _RESIDUAL_ROWS
    _residual_sq_kernel[(triton.cdiv(n, block_b),)](indices, weights, table, target, out, n, table.shape[1],
                                                   table.stride(0), target.stride(0),
                                                   K=k, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps)
    return out


# (columns per program, entries per loop iteration, warps) of a work item, from sweeps on the
# H200 (docs/benchmarks.md): the decode backward also gathers dictionary rows and adds to g_w;
# the plain sum's best tile depends on the row width (2026-12-03: 10-15% over (512, 8, 4)).
_DECODE_TILE = (128, 16, 4)
_SUM_TILE_WIDE = (256, 8, 2)
"""Rows of 512 columns or more."""
_SUM_TILE_NARROW = (128, 32, 4)


def _concept_items(order: ConceptOrder, weights, rows, out, table=None, g_w=None) -> None:
    """`out[c] += sum w * rows` per concept; with `table`, `g_w` (in concept order) gets the row dots."""
    n_concepts, d = len(order.starts) - 1, rows.shape[1]
    dot = table is not None
    weights = weights.reshape(-1)[order.slots]
    tile_d, block_e, warps = _DECODE_TILE if dot else _SUM_TILE_WIDE if d >= 512 else _SUM_TILE_NARROW
    block_d = min(tile_d, max(16, triton.next_power_of_2(d)))
    grid = (max(1, order.max_items()), triton.cdiv(d, block_d))
    _concept_item_kernel[grid](
        order.items, order.starts, order.tokens, weights, rows, table if dot else rows, out, g_w if dot else out,
        n_concepts, d, rows.stride(0), table.stride(0) if dot else 0, out.stride(0),
        ITEM=_ITEM, SEARCH=max(1, n_concepts.bit_length()), BLOCK_E=block_e, BLOCK_D=block_d, DOT=dot,
        num_warps=warps,
    )


def _decode_backward_triton(order, weights, grad, table):
    weights, grad, table = weights.contiguous(), grad.contiguous(), table.contiguous()
    g_w_sorted = torch.zeros(order.slots.numel(), dtype=torch.float32, device=grad.device)
    g_table = torch.zeros(table.shape, dtype=torch.float32, device=grad.device)
    _concept_items(order, weights, grad, g_table, table=table, g_w=g_w_sorted)
    g_w = torch.empty_like(g_w_sorted)
    g_w[order.slots] = g_w_sorted  # back from concept order (slots is a permutation)
    return g_w.view(weights.shape), g_table


def _concept_sum_triton(order, weights, rows, out):
    _concept_items(order, weights.contiguous(), rows.contiguous(), out)


def _decode_loss_triton(indices, weights, table, bias, target, kind, row_dots):
    indices, weights, table, target = indices.contiguous(), weights.contiguous(), table.contiguous(), target.contiguous()
    n, k = indices.shape
    d = table.shape[1]
    l1 = kind == "l1"
    grad = torch.empty(n, d, dtype=torch.int8 if l1 else table.dtype, device=table.device)
    block_b, block_d, warps = _LOSS_ROWS
    grid = (triton.cdiv(n, block_b), triton.cdiv(d, block_d))
    parts = torch.empty(grid[0] * grid[1], 2, dtype=torch.float32, device=table.device)
    colsums = torch.empty(grid[0], d, dtype=torch.float32, device=table.device)
    dots = torch.empty(grid[1] if row_dots else 0, n, k, dtype=torch.float32, device=table.device)
    _decode_loss_kernel[grid](indices, weights, table, bias.contiguous(), target, grad, parts, colsums, dots, n, d,
                              table.stride(0), target.stride(0), grad.stride(0),
                              K=k, K_POW2=triton.next_power_of_2(k), BLOCK_B=block_b, BLOCK_D=block_d, L1=l1,
                              ROW_DOTS=row_dots, num_warps=warps)
    loss, sse = parts.sum(0)
    return LossTerms(loss, sse, grad, colsums.sum(0), dots.sum(0) if row_dots else None)
