"""Sparse hot path: kernels and fallbacks against dense closed forms, the fused encoder and
decoder against autograd through the plain modules, and a fused training step against the plain one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from usae_core import sparse
from usae_core.config import TrainConfig, USAEConfig
from usae_core.kernels import HAVE_TRITON
from usae_core.kernels import gather
from usae_core.kernels.gather import (ConceptOrder, concept_sum, concept_totals, decode_backward, decode_loss_terms,
                                      gather_decode, residual_sq, row_dot)
from usae_core.kernels.topk import relu_topk
from usae_core.losses import auxk_loss, auxk_residual_loss
from usae_core.sparse import sparse_decode, topk_encode
from usae_core.train import Trainer

ROOT = Path(__file__).resolve().parents[2]


def _random_code(gen: torch.Generator, batch: int, n_concepts: int, k: int) -> torch.Tensor:
    return torch.stack([torch.randperm(n_concepts, generator=gen)[:k] for _ in range(batch)])


def _dense(indices: torch.Tensor, weights: torch.Tensor, n_concepts: int) -> torch.Tensor:
    return torch.zeros(indices.shape[0], n_concepts, dtype=weights.dtype).scatter_(1, indices, weights)


def test_plain_sparse_decode_is_the_dense_product():
    gen = torch.Generator().manual_seed(0)
    idx = _random_code(gen, 30, 25, 4)
    values = torch.rand(30, 4, generator=gen, dtype=torch.float64)
    table = torch.randn(25, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(sparse_decode(values, idx, table), _dense(idx, values, 25) @ table)


def _check_products(dtype: torch.dtype, table_dtype: torch.dtype, tol: float) -> None:
    """gather_decode / row_dot / concept_sum / decode_backward / decode_loss_terms against dense
    float64 products."""
    gen = torch.Generator().manual_seed(1)
    batch, n_concepts, k, dim = 37, 50, 5, 150  # dim spans two 128-wide column blocks
    idx = _random_code(gen, batch, n_concepts, k)
    others = torch.tensor([c for c in range(n_concepts) if c != 7])
    for b in range(20):  # a frequent concept: its entries run across several windows
        idx[b] = torch.cat([torch.tensor([7]), others[torch.randperm(len(others), generator=gen)[: k - 1]]])
    w = torch.randn(batch, k, generator=gen)
    table = torch.randn(n_concepts, dim, generator=gen)
    rows = torch.randn(batch, dim, generator=gen)
    z = _dense(idx, w.double(), n_concepts)
    t64, r64 = table.to(table_dtype).double(), rows.to(dtype).double()

    decoded = gather_decode(idx, w, table.to(table_dtype), torch.float32)
    torch.testing.assert_close(decoded.double(), z @ t64, rtol=tol, atol=tol)
    dots = row_dot(idx, rows.to(dtype), table.to(table_dtype))
    torch.testing.assert_close(dots.double(), (r64 @ t64.T).gather(1, idx), rtol=tol, atol=tol)
    for item in (1024, 4):  # one work item per concept, and several for the frequent one
        gather._ITEM = item
        order = ConceptOrder.build(idx, n_concepts)
        summed = concept_sum(order, idx, w, rows.to(dtype), n_concepts)
        torch.testing.assert_close(summed.double(), z.T @ r64, rtol=tol, atol=tol)
        twice = concept_sum(order, idx, w, rows.to(dtype), n_concepts, out=summed.clone())
        torch.testing.assert_close(twice.double(), 2 * z.T @ r64, rtol=tol, atol=tol)
        g_w, g_table = decode_backward(order, idx, w, rows.to(dtype), table.to(table_dtype))
        torch.testing.assert_close(g_w.double(), (r64 @ t64.T).gather(1, idx), rtol=tol, atol=tol)
        torch.testing.assert_close(g_table.double(), z.T @ r64, rtol=tol, atol=tol)
        signs = torch.sign(rows).to(torch.int8)  # what an L1 loss leaves for the backward
        g_w, g_table = decode_backward(order, idx, w, signs, table.to(table_dtype))
        torch.testing.assert_close(g_w.double(), (signs.double() @ t64.T).gather(1, idx), rtol=tol, atol=tol)
        torch.testing.assert_close(g_table.double(), z.T @ signs.double(), rtol=tol, atol=tol)
        summed = concept_sum(order, idx, w, signs, n_concepts)  # the L1 loss backward's dictionary gradient
        torch.testing.assert_close(summed.double(), z.T @ signs.double(), rtol=tol, atol=tol)
        totals = concept_totals(order, w)  # per-concept sums of the code's values (BatchNorm's beta gradient)
        assert totals.dtype == torch.float64
        torch.testing.assert_close(totals, z.sum(0), rtol=1e-12, atol=1e-12)
    gather._ITEM = 1024
    err = residual_sq(idx, w, table.to(table_dtype), rows.to(dtype))
    torch.testing.assert_close(err.double(), (r64 - z @ t64).square().sum(1), rtol=tol, atol=tol)
    bias = torch.randn(dim, generator=gen)
    diff = z @ t64 + bias.double() - r64
    for kind, want_loss, want_grad in (("l1", diff.abs().sum(), torch.sign(diff)), ("mse", diff.square().sum(), diff)):
        loss, sse, grad, colsum, row_dots = decode_loss_terms(idx, w, table.to(table_dtype), bias, rows.to(dtype), kind)
        torch.testing.assert_close(colsum.double(), want_grad.sum(0), rtol=tol * 10, atol=tol * 10)
        # The value gradient, of the gradient as returned (bf16-rounded for mse on a bf16 table).
        torch.testing.assert_close(row_dots.double(), (grad.double() @ t64.T).gather(1, idx), rtol=tol, atol=tol)
        alone = decode_loss_terms(idx, w, table.to(table_dtype), bias, rows.to(dtype), kind, row_dots=False)
        assert alone.row_dots is None and torch.equal(alone.grad, grad) and torch.equal(alone.loss, loss)
        torch.testing.assert_close(loss.double(), want_loss, rtol=tol, atol=tol)
        torch.testing.assert_close(sse.double(), diff.square().sum(), rtol=tol, atol=tol)
        if kind == "l1":
            assert grad.dtype == torch.int8 and torch.equal(grad.double(), want_grad)
        else:
            torch.testing.assert_close(grad.double(), want_grad, rtol=tol * 100 if table_dtype == torch.bfloat16 else tol,
                                       atol=tol * 100 if table_dtype == torch.bfloat16 else tol)


def _check_topk() -> None:
    """relu_topk is a valid torch.topk of ReLU(gamma * h + beta), ties and padding included."""
    gen = torch.Generator().manual_seed(2)
    for n_concepts, k, k_aux in [(50, 5, 8), (33, 33, 4), (600, 7, 20)]:
        h = torch.randn(5, n_concepts, generator=gen)
        h[:2] = torch.round(h[:2] * 2) / 2  # many exact ties
        h[2] = -1.0  # fewer than k positive values: zeros fill the code
        # Rows 1 (ties) and 3: the winners share one column slot (column mod 128), more than the
        # 4 a slot holds; the kernel must notice and take its exact fallback.
        h[[1, 3], ::128] = 10.0 + torch.arange(len(range(0, n_concepts, 128)), dtype=h.dtype)
        gamma = torch.rand(n_concepts, generator=gen) + 0.5
        beta = 0.1 * torch.randn(n_concepts, generator=gen)
        dead = torch.rand(n_concepts, generator=gen) < 0.3
        for affine in (True, False):
            g, b = (gamma, beta) if affine else (None, None)
            y = torch.relu(h * gamma + beta) if affine else torch.relu(h)
            alone, _ = relu_topk(h, k, g, b)
            main, aux = relu_topk(h, k, g, b, dead, k_aux)
            for sel, source, width in ((alone, y, k), (main, y, k), (aux, y * dead, k_aux)):
                want = torch.topk(source, width, dim=1).values
                torch.testing.assert_close(sel.values.sort(1, descending=True).values, want)
                torch.testing.assert_close(sel.values, source.gather(1, sel.indices))
                torch.testing.assert_close(sel.pre, h.gather(1, sel.indices))
                assert all(len(set(r.tolist())) == width for r in sel.indices)


def kernel_checks() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1, so the Triton kernels themselves run on the CPU."""
    from usae_core.kernels import topk, use_triton

    assert use_triton(torch.zeros(1)), "interpreter mode did not enable the kernels"
    _check_topk()
    topk._CANDIDATES = 4  # a fallback overflows the candidate buffer: the streamed exact search
    _check_topk()
    _check_products(torch.float32, torch.float32, 1e-4)
    _check_products(torch.bfloat16, torch.bfloat16, 1e-4)


def test_fallbacks_match_dense_products():
    _check_topk()
    _check_products(torch.float32, torch.float32, 1e-4)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_triton_kernels_match_dense_products_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("USAE_DISABLE_TRITON", None)
    done = subprocess.run(
        [sys.executable, "-c", "from tests.core.test_sparse import kernel_checks; kernel_checks()"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _aligned(order_from: torch.Tensor, order_to: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Re-order per-row entries of g (laid out like order_to) to the layout of order_from."""
    match = (order_from[:, :, None] == order_to[:, None, :]).to(g.dtype)
    return torch.einsum("bij,bj->bi", match, g)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_fused_encoder_gradients_match_autograd_through_the_plain_modules(batchnorm):
    torch.manual_seed(3)
    batch, dim, n_concepts, k, k_aux = 64, 12, 40, 5, 7
    x = (torch.randn(batch, dim) * 2 + 0.5).double()
    lin = nn.Linear(dim, n_concepts).double()
    bn = nn.BatchNorm1d(n_concepts).double() if batchnorm else None
    if bn is not None:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    dead = torch.rand(n_concepts) < 0.4
    params = [lin.weight, lin.bias] + ([bn.weight, bn.bias] if bn is not None else [])

    y = torch.relu(bn(lin(x)) if bn is not None else lin(x))
    values, indices = torch.topk(y, k, dim=1)
    aux_values, aux_indices = torch.topk(y * dead, k_aux, dim=1)
    g, g_aux = torch.randn(batch, k).double(), torch.randn(batch, k_aux).double()
    want = torch.autograd.grad((values * g).sum() + (aux_values * g_aux).sum(), params)
    want_running = [bn.running_mean.clone(), bn.running_var.clone()] if bn is not None else []
    if bn is not None:
        bn.reset_running_stats()

    main, aux = topk_encode(x, lin.weight, lin.bias, bn, k, dead, k_aux)
    torch.testing.assert_close(main.values, _aligned(main.indices, indices, values))
    torch.testing.assert_close(aux.values, _aligned(aux.indices, aux_indices, aux_values))
    loss = (main.values * _aligned(main.indices, indices, g)).sum() + (
        aux.values * _aligned(aux.indices, aux_indices, g_aux)).sum()
    got = torch.autograd.grad(loss, params)
    for w, gt in zip(want, got):
        torch.testing.assert_close(gt, w, rtol=1e-9, atol=1e-9)
    if bn is not None:
        torch.testing.assert_close([bn.running_mean, bn.running_var], want_running)


def test_fused_decode_gradients_match_embedding_bag():
    torch.manual_seed(4)
    lin = nn.Linear(10, 30).double()
    x = torch.randn(48, 10).double()
    code, _ = topk_encode(x, lin.weight, lin.bias, None, 4)
    table = torch.randn(30, 9).double().requires_grad_()
    out = code.decode(table)
    plain = sparse_decode(code.values, code.indices, table)
    torch.testing.assert_close(out, plain)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [table, lin.weight])
    want = torch.autograd.grad((plain * g).sum(), [table, lin.weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_auxk_width_above_the_dead_count_gives_the_exact_auxk_loss():
    torch.manual_seed(5)
    pre = torch.relu(torch.randn(20, 64)).double()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 9, 17, 40, 41]] = True
    table = torch.randn(64, 6).double()
    residual = torch.randn(20, 6).double()
    full = auxk_loss(pre, dead, residual, table, k_aux=32)
    main, aux = relu_topk(pre, 4, dead=dead, k_aux=8)  # 8 >= 5 dead latents
    narrow = auxk_residual_loss(sparse_decode(aux.values, aux.indices, table), residual, dead)
    torch.testing.assert_close(narrow, full)


@pytest.mark.parametrize("encoder,loss,dead,dots_in_forward", [
    ("mlp_bn", "l1", True, True), ("linear", "l1", True, True), ("mlp_bn", "l1", False, True),
    ("mlp_bn", "mse", False, True), ("mlp_bn", "l1", False, False), ("mlp_bn", "mse", False, False)])
def test_fused_training_step_matches_the_plain_step(encoder, loss, dead, dots_in_forward, monkeypatch):
    """With dead latents (AuxK active) and without (the fused decode + loss path, its value
    gradient taken in the loss pass or in the backward)."""
    monkeypatch.setattr(sparse, "ROW_DOTS_IN_FORWARD_BELOW", 10**9 if dots_in_forward else 0)
    ucfg = USAEConfig(model_dims={"a": 12, "b": 20, "c": 8}, n_concepts=40, k=4, encoder=encoder)
    tcfg = TrainConfig(steps=10, batch_size=64, lr=1e-2, device="cpu", aux="auxk", aux_k=16, loss=loss,
                       dead_after_tokens=0 if dead else 10**9, warmup_steps=0, log_every=3)
    gen = torch.Generator().manual_seed(6)
    batches = [{m: torch.randn(64, d, generator=gen, dtype=torch.float64) for m, d in ucfg.model_dims.items()} for _ in range(5)]
    finals = []
    for fused in (False, True):
        trainer = Trainer(None, Path("unused"), ucfg, tcfg, [])
        trainer.model.double().train()
        trainer.fused = fused
        trainer.since_fired[::3] = 100  # with dead=True a third of the concepts start dead: AuxK is active
        outs = [trainer.train_step(b, "abc"[i % 3]) for i, b in enumerate(batches)]
        losses = [float(o["loss"]) for o in outs] + [float(o["sse"][m]) for o in outs for m in "abc"]
        finals.append((losses, {**dict(trainer.model.named_parameters()), **dict(trainer.model.named_buffers())}))
    (plain_losses, plain), (fused_losses, fused) = finals
    assert plain_losses == pytest.approx(fused_losses, rel=1e-9)
    for name, tensor in plain.items():
        torch.testing.assert_close(fused[name].double(), tensor.double(), rtol=1e-8, atol=1e-8, msg=name)


def test_bf16_steps_train_on_the_batch_rounded_to_bf16():
    """Where the fused step computes in bf16 it converts the batch to bf16 first (its loss kernels
    then read half the bytes, as does a CUDA graph's input copy): a float32 batch and the same
    batch rounded to bf16 give the same step, bit for bit. float32 compute keeps the batch."""
    ucfg = USAEConfig(model_dims={"a": 12, "b": 20}, n_concepts=40, k=4)
    gen = torch.Generator().manual_seed(3)
    batch = {m: torch.randn(64, d, generator=gen) * 3 + 1 for m, d in ucfg.model_dims.items()}
    rounded = {m: t.bfloat16().float() for m, t in batch.items()}
    assert any(not torch.equal(batch[m], rounded[m]) for m in batch)
    results = []
    for given in (batch, rounded):
        tcfg = TrainConfig(steps=10, batch_size=64, lr=1e-2, device="cpu", autocast=True, warmup_steps=0)
        trainer = Trainer(None, Path("unused"), ucfg, tcfg, [])
        trainer.model.train()
        assert trainer.batch_dtype == torch.bfloat16
        out = trainer.train_step(given, "a")
        results.append((float(out["loss"]), {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    assert results[0][0] == results[1][0]
    for name, tensor in results[0][1].items():
        assert torch.equal(tensor, results[1][1][name]), name
    plain = Trainer(None, Path("unused"), ucfg, TrainConfig(steps=10, batch_size=64, device="cpu"), [])
    assert plain.batch_dtype is None


def test_logged_r2_of_a_bf16_batch_is_taken_in_float32():
    """A bf16 target far from zero mean: centring it in bf16 would cost ~1% of its variance."""
    from usae_core.train import _batch_r2

    gen = torch.Generator().manual_seed(4)
    target = (torch.randn(4096, 16, generator=gen, dtype=torch.float64) * 3 + 100).bfloat16()
    exact = target.double()
    total = (exact - exact.mean(0)).square().sum()
    sse = 0.25 * total
    assert _batch_r2(sse.float(), target) == pytest.approx(0.75, abs=1e-5)
