"""Sparse-code primitives on the training hot path.

`sparse_decode` is the plain reference (one `embedding_bag`). The fused training path is
`topk_encode` + `SparseCode.decode_loss` (or `SparseCode.decode` when the reconstruction itself
is needed, as AuxK's residual is): the encoder output is computed once, TopK'd in one pass, and
every gradient is formed from the k selected entries per token only:

- decode: gather k dictionary rows per token; backward gathers them again for the value
  gradient and sums `value * grad` per concept for the dictionary gradient. `decode_loss`
  reduces the decode to its L1 / MSE loss in the same pass and keeps only the per-element loss
  gradient (an int8 sign for L1); for codes with few entries per concept it takes the value
  gradient there too (`ROW_DOTS_IN_FORWARD_BELOW`), leaving the per-concept sum to the backward;
- encoder: TopK passes gradient only to the selected pre-activations, so the weight gradient
  is `G^T X` with G k-sparse per row (a per-concept sum, not a dense `[tokens, n_concepts]` GEMM).
  BatchNorm (train mode) is folded in analytically: its batch statistics come from the input
  mean and covariance (`mean_h = W mu + b`, `var_h = diag(W Cov W^T)`), so the encoder GEMM
  emits the normalised pre-activation directly, and the BatchNorm backward reduces to the
  closed form  dW = (gamma / s) * (G^T Xc - (dgamma / s) * (W Cov)),  db = 0.

Every product runs a Triton kernel on CUDA and a PyTorch fallback elsewhere
(usae_core/kernels); tests/core/test_sparse.py checks both against the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from usae_core.kernels.gather import (ConceptOrder, concept_sum, concept_totals, decode_backward, decode_loss_terms,
                                      gather_decode)
from usae_core.kernels.topk import TopK, relu_topk


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """sum_k values[b, k] * dictionary[indices[b, k]] -> [batch, dim], touching only k rows per token."""
    return F.embedding_bag(indices, dictionary, per_sample_weights=values.to(dictionary.dtype), mode="sum")


@dataclass
class SparseCode:
    """A TopK code on the fused path: differentiable `values` at `indices` (`[batch, k]`)."""

    values: torch.Tensor
    indices: torch.Tensor
    order: ConceptOrder
    n_concepts: int

    def decode(self, dictionary: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """`[batch, dim]` reconstruction; gradients flow to `values` and `dictionary`."""
        return _SparseDecode.apply(self.values, dictionary, self, out_dtype or dictionary.dtype)

    def decode_loss(self, dictionary: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, kind: str,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean "l1" or "mse" loss of `decode(dictionary) + bias` against `target`, and the
        sum of squared errors (no gradient), in one pass that never writes the reconstruction;
        gradients flow to `values`, `dictionary` and `bias`."""
        return _SparseDecodeLoss.apply(self.values, dictionary, bias, self, target, kind, dtype or dictionary.dtype)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, dictionary, code: SparseCode, out_dtype: torch.dtype):
        table = dictionary.detach().to(out_dtype)  # gathers read a compute-dtype copy (bf16 on GPU)
        ctx.code, ctx.table, ctx.dict_dtype = code, table, dictionary.dtype
        ctx.save_for_backward(values)
        return gather_decode(code.indices, values.detach(), table, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        (values,) = ctx.saved_tensors
        code = ctx.code
        g_values, g_dict = decode_backward(code.order, code.indices, values, grad.contiguous(), ctx.table)
        return g_values, g_dict.to(ctx.dict_dtype), None, None


ROW_DOTS_IN_FORWARD_BELOW = 224
"""Take the value gradient in the loss kernel while a code has fewer entries per concept
(tokens x k / concepts) than this, else in the concept-major backward. The backward reads one
dictionary row per work item, which pays off only over many entries of a concept; the loss
kernel gathers every token's k rows a second time. Measured on the H200 (docs/benchmarks.md,
2026-12-03): the forward wins at 24-196 entries per concept (up to 35% less time for both
passes), the backward at 261 and 523."""


class _SparseDecodeLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, dictionary, bias, code: SparseCode, target, kind: str, compute_dtype: torch.dtype):
        table = dictionary.detach().to(compute_dtype)
        row_dots = values.numel() < ROW_DOTS_IN_FORWARD_BELOW * code.n_concepts
        terms = decode_loss_terms(code.indices, values.detach(), table, bias.detach(), target.detach(), kind,
                                  row_dots=row_dots)
        n = target.numel()
        ctx.code, ctx.terms, ctx.table = code, terms, None if row_dots else table
        ctx.dtypes = (values.dtype, dictionary.dtype, bias.dtype)
        ctx.scale = (1.0 if kind == "l1" else 2.0) / n  # d(mean |diff|) = sign / n, d(mean diff^2) = 2 diff / n
        ctx.save_for_backward(values)
        ctx.mark_non_differentiable(terms.sse)
        return terms.loss / n, terms.sse

    @staticmethod
    def backward(ctx, g_loss, _g_sse):
        (values,) = ctx.saved_tensors
        code, terms = ctx.code, ctx.terms
        if terms.row_dots is not None:
            g_values = terms.row_dots
            g_dict = concept_sum(code.order, code.indices, values, terms.grad, code.n_concepts)
        else:
            g_values, g_dict = decode_backward(code.order, code.indices, values, terms.grad, ctx.table)
        scale = g_loss * ctx.scale  # a device scalar: no host sync
        values_dtype, dict_dtype, bias_dtype = ctx.dtypes
        return ((g_values * scale).to(values_dtype), (g_dict * scale).to(dict_dtype),
                (terms.grad_colsum * scale).to(bias_dtype),
                None, None, None, None)


@dataclass
class _EncodeState:
    """What the encoder backward needs, kept from the forward."""

    rows: torch.Tensor
    """The encoder input (centred by the batch mean under BatchNorm), compute dtype."""
    selections: list[tuple[TopK, ConceptOrder]]
    scale: torch.Tensor | None = None
    """BatchNorm: s = sqrt(var_h + eps) per concept."""
    w_cov: torch.Tensor | None = None
    """BatchNorm: W @ Cov(x), `[n_concepts, dim]`."""


def topk_encode(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    bn: nn.BatchNorm1d | None,
    k: int,
    dead: torch.Tensor | None = None,
    k_aux: int = 0,
    sync_stats: bool = False,
) -> tuple[SparseCode, SparseCode | None]:
    """TopK(ReLU(bn(x W^T + b))) as sparse codes, plus the AuxK code over `dead` columns.

    Computes in `x.dtype` (pass bf16 on the GPU; parameters stay float32). BatchNorm must be in
    train mode; its running statistics are updated as `nn.BatchNorm1d` would. With
    `sync_stats` the batch statistics are those of the global batch across all ranks.
    """
    n_concepts = weight.shape[0]
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        if bn is not None:
            if not bn.training or bn.momentum is None:
                raise ValueError("the fused encoder needs BatchNorm in train mode with a fixed momentum")
            h, state = _normalised_preactivation(x, weight, bias, bn, sync_stats)
            gamma, beta = bn.weight, bn.bias
        else:
            h = torch.addmm(bias.to(x.dtype), x, weight.to(x.dtype).t())
            state, gamma, beta = _EncodeState(x, []), None, None
        main, aux = relu_topk(h, k, gamma, beta, dead, k_aux)
        del h
        codes = [main] + ([aux] if aux is not None else [])
        state.selections = [(c, ConceptOrder.build(c.indices, n_concepts)) for c in codes]
    aux_values = aux.values if aux is not None else main.values.new_zeros(main.values.shape[0], 0)
    params = (weight, bias, gamma, beta) if bn is not None else (weight, bias, None, None)
    values, aux_values = _TopKEncodeGrad.apply(*params, main.values, aux_values, state)
    out = [SparseCode(v, c.indices, order, n_concepts) for v, (c, order) in zip((values, aux_values), state.selections)]
    return out[0], (out[1] if aux is not None else None)


def _normalised_preactivation(x, weight, bias, bn, sync_stats):
    """x_hat = (x W^T + b - mean_h) / s from the input moments; updates bn's running stats."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    count = torch.full((), float(x.shape[0]), dtype=acc, device=x.device)  # no host copy: CUDA-graph safe
    total = x.sum(0, dtype=acc)  # no float32 copy of the batch
    if sync_stats:
        dist.all_reduce(total)
        dist.all_reduce(count)
    mu = total / count
    xc = (x - mu.to(x.dtype)).to(x.dtype)
    cov = (xc.t() @ xc).to(acc)
    if sync_stats:
        dist.all_reduce(cov)
    cov /= count
    w_cov = (weight.to(x.dtype) @ cov.to(x.dtype)).to(acc)
    var = (weight.to(acc) * w_cov).sum(1).clamp_min(0)
    scale = torch.sqrt(var + bn.eps)
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        bn.running_mean.lerp_((weight.to(acc) @ mu + bias.to(acc)).to(bn.running_mean.dtype), bn.momentum)
        unbiased = var * count / (count - 1).clamp_min(1)
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), bn.momentum)
    h = xc @ (weight.to(acc) / scale[:, None]).to(x.dtype).t()
    return h, _EncodeState(xc, [], scale, w_cov)


class _TopKEncodeGrad(torch.autograd.Function):
    """Identity on the selected values; its backward forms the encoder parameter gradients."""

    @staticmethod
    def forward(ctx, weight, bias, gamma, beta, values, aux_values, state: _EncodeState):
        ctx.state, ctx.gamma = state, gamma
        ctx.shapes = (weight.shape, weight.dtype)
        return values.view_as(values), aux_values.view_as(aux_values)

    @staticmethod
    def backward(ctx, g_values, g_aux):
        state = ctx.state
        (n_concepts, dim), dtype = ctx.shapes
        acc = torch.float64 if state.rows.dtype == torch.float64 else torch.float32
        dev = state.rows.device
        g_rows = torch.zeros(n_concepts, dim, dtype=acc, device=dev)  # sum_b g[b, c] * rows[b]
        g_beta = torch.zeros(n_concepts, dtype=acc, device=dev)  # sum of g per concept
        g_gamma = torch.zeros(n_concepts, dtype=acc, device=dev)  # sum of g * x_hat per concept
        for g, (sel, order) in zip((g_values, g_aux), state.selections):
            if g is None:
                continue
            g = g.to(acc) * (sel.values > 0)  # ReLU: a selected zero passes no gradient
            concept_sum(order, sel.indices, g, state.rows, n_concepts, out=g_rows)
            g_beta += concept_totals(order, g)
            if state.scale is not None:
                g_gamma += concept_totals(order, g * sel.pre.to(acc))
        if state.scale is None:  # Linear + ReLU: d/dW = G^T x, d/db = column sums of G
            return g_rows.to(dtype), g_beta.to(dtype), None, None, None, None, None
        # BatchNorm: y = gamma * x_hat + beta with x_hat = (h - mean_h) / s from this batch. Its
        # backward, pushed through h = x W^T + b, leaves (module docstring)
        #   dW = (gamma / s) * (G^T xc - (dgamma / s) * W Cov),  db = 0.
        gamma = ctx.gamma.detach().to(acc)
        g_weight = (gamma / state.scale)[:, None] * (g_rows - (g_gamma / state.scale)[:, None] * state.w_cov)
        g_bias = torch.zeros(n_concepts, dtype=dtype, device=dev)
        return g_weight.to(dtype), g_bias, g_gamma.to(dtype), g_beta.to(dtype), None, None, None
