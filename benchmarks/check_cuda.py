"""CUDA-path checks of the fused training path (run on a GPU machine; CI runs the CPU twins).

    PYTHONPATH=. python benchmarks/check_cuda.py

At training sizes: the Triton kernels against their PyTorch fallbacks, the fused encoder's
gradients against autograd through the plain modules, and fused training steps against plain
ones; a CAM run on CUDA against the same seed on the CPU; ViT patch embeddings as GEMMs against
the float64 convolution; and an extraction on CUDA (bf16, rows copied on a side stream), eager
and compiled, against the same extraction on the CPU. Prints one line per check and exits
non-zero if any failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from usae_core.config import TrainConfig, USAEConfig
from usae_core.kernels import gather, topk
from usae_core.sparse import topk_encode
from usae_core.train import Trainer


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


FAILURES: list[str] = []


def check(name: str, err: float, tol: float) -> None:
    ok = err == err and err <= tol  # NaN fails
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.2e} (tol {tol:.0e})", flush=True)
    if not ok:
        FAILURES.append(name)


def kernels(dev: torch.device) -> None:
    gen = torch.Generator(dev).manual_seed(0)
    for n, c, k, k_aux in [(4096, 6144, 32, 256), (1000, 32768, 64, 64), (333, 1000, 7, 3)]:
        h = torch.randn(n, c, generator=gen, device=dev).to(torch.bfloat16)
        gamma = torch.rand(c, generator=gen, device=dev) + 0.5
        beta = 0.1 * torch.randn(c, generator=gen, device=dev)
        dead = torch.rand(c, generator=gen, device=dev) < 0.2
        main, aux = topk.relu_topk(h, k, gamma, beta, dead, k_aux)
        alone, _ = topk.relu_topk(h, k, gamma, beta)  # the warp-per-row kernel
        ref_main, ref_aux = topk._relu_topk_torch(h, k, gamma, beta, dead, k_aux)
        for label, got, want in (("main", main, ref_main), ("aux", aux, ref_aux), ("warp", alone, ref_main)):
            # 1e-6: the kernel may fuse gamma * h + beta into one FMA (one rounding fewer)
            check(f"topk {label} values n={n} c={c} k={k}",
                  rel_err(got.values.sort(1).values, want.values.sort(1).values), 1e-6)
            y = torch.relu(h.float() * gamma + beta) * (dead if label == "aux" else 1)
            check(f"topk {label} values at indices", rel_err(got.values, y.gather(1, got.indices)), 1e-6)
            check(f"topk {label} pre at indices", rel_err(got.pre, h.float().gather(1, got.indices)), 0)
            distinct = torch.sort(got.indices, 1).values.diff(dim=1).ne(0).all()
            check(f"topk {label} distinct indices", 0.0 if bool(distinct) else 1.0, 0)

    for n, c, k, d in [(6272, 6144, 32, 768), (20000, 6144, 32, 384), (2000, 32768, 64, 384), (100, 50, 5, 150)]:
        idx = torch.stack([torch.randperm(c, device=dev, generator=gen)[:k] for _ in range(n)])
        w = torch.randn(n, k, generator=gen, device=dev)
        table = torch.randn(c, d, generator=gen, device=dev)
        rows = torch.randn(n, d, generator=gen, device=dev).to(torch.bfloat16)
        order = gather.ConceptOrder.build(idx, c)
        t16 = table.to(torch.bfloat16)
        dense_ref = torch.nn.functional.embedding_bag(idx, t16.float(), per_sample_weights=w, mode="sum")
        check(f"gather_decode n={n} c={c} d={d}", rel_err(gather.gather_decode(idx, w, t16, torch.float32), dense_ref), 1e-5)
        want_dot = (rows.float() @ t16.float().T).gather(1, idx)
        z = torch.zeros(n, c, device=dev).scatter_(1, idx, w)
        want_sum = (z.double().T @ rows.double())
        check(f"concept_sum n={n} c={c} d={d}", rel_err(gather.concept_sum(order, idx, w, rows, c), want_sum), 1e-5)
        g_w, g_table = gather.decode_backward(order, idx, w, rows, t16)
        check(f"decode_backward values n={n} c={c} d={d}", rel_err(g_w, want_dot), 1e-5)
        check(f"decode_backward table n={n} c={c} d={d}", rel_err(g_table, want_sum), 1e-5)
        signs = torch.sign(rows).to(torch.int8)
        g_w, g_table = gather.decode_backward(order, idx, w, signs, t16)
        check(f"decode_backward int8 values n={n}", rel_err(g_w, (signs.float() @ t16.float().T).gather(1, idx)), 1e-5)
        check(f"decode_backward int8 table n={n}", rel_err(g_table, z.double().T @ signs.double()), 1e-5)
        bias = torch.randn(d, generator=gen, device=dev)
        target = torch.randn(n, d, generator=gen, device=dev)
        diff = z.double() @ t16.double() + bias.double() - target.double()
        for kind in ("l1", "mse"):
            loss, sse, grad, colsum, row_dots = gather.decode_loss_terms(idx, w, t16, bias, target, kind)
            want_loss = diff.abs().sum() if kind == "l1" else diff.square().sum()
            check(f"decode_loss_terms {kind} loss n={n} d={d}", rel_err(loss, want_loss), 1e-5)
            check(f"decode_loss_terms {kind} sse n={n} d={d}", rel_err(sse, diff.square().sum()), 1e-5)
            want_grad = torch.sign(diff) if kind == "l1" else diff
            # a sign may flip where |diff| is at float32 rounding; bf16 rounding for mse
            check(f"decode_loss_terms {kind} grad n={n} d={d}", rel_err(grad, want_grad), 1e-3 if kind == "l1" else 1e-2)
            check(f"decode_loss_terms {kind} column sums n={n} d={d}", rel_err(colsum, want_grad.sum(0)), 1e-3)
            check(f"decode_loss_terms {kind} row dots n={n} d={d}",
                  rel_err(row_dots, (grad.double() @ t16.double().T).gather(1, idx)), 1e-5)
            g_table = gather.concept_sum(order, idx, w, grad, c)
            check(f"concept_sum of the {kind} gradient n={n} d={d}", rel_err(g_table, z.double().T @ grad.double()), 1e-5)
        target = torch.randn(n, d, generator=gen, device=dev)
        want_err = (target.double() - z.double() @ table.double()).square().sum(1)
        check(f"residual_sq n={n} c={c} d={d}", rel_err(gather.residual_sq(idx, w, table, target), want_err), 1e-5)


def mining_rows(dev: torch.device) -> None:
    """Mining's one-pass standardisation against float64."""
    from usae_core.kernels.standardize import standardize_rows

    gen = torch.Generator(dev).manual_seed(4)
    raw = (torch.randn(65536, 768, generator=gen, device=dev) * 3 + 1).to(torch.float16)
    mean = torch.randn(768, generator=gen, device=dev)
    scale = torch.tensor(2.0, device=dev)
    bias = 0.1 * torch.randn(768, generator=gen, device=dev)
    got = standardize_rows(raw, mean, scale, bias, torch.bfloat16)
    x64 = (raw.double() - mean.double()) / scale.double()
    check("standardize_rows x (bf16)", rel_err(got.x, x64), 5e-3)
    check("standardize_rows target", rel_err(got.target, x64 - bias.double()), 1e-6)
    check("standardize_rows column sums", rel_err(got.col_sum, x64.sum(0)), 1e-5)
    check("standardize_rows column sums of squares", rel_err(got.col_sq, x64.square().sum(0)), 1e-5)


def mining_pass(dev: torch.device) -> None:
    """A whole mining pass on CUDA (float32 encoders) against the CPU pass, and at two batch sizes
    (the first batches ramp up, results must not depend on where batches are cut)."""
    import tempfile

    import numpy as np
    from mine_throughput import PAPER_DIMS, synthetic_store

    from usae_core.mining import MiningConfig, mine_store
    from usae_core.model import USAE

    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp) / "s", 300, (4, 4), "float16", shard_images=128, device=torch.device("cpu"))
        torch.manual_seed(0)
        model = USAE(USAEConfig(model_dims=PAPER_DIMS, n_concepts=512, k=8, encoder="mlp_bn")).eval()
        results = {(d, b): mine_store(model, store, MiningConfig(top_n=8, batch_images=b, autocast=False), device=d,
                                       progress=False)
                   for d, b in (("cpu", 64), (dev, 64), (dev, 7))}
    cpu, gpu, small = results[("cpu", 64)], results[(dev, 64)], results[(dev, 7)]
    for label, other in (("CUDA vs CPU", gpu), ("CUDA batch 7 vs 64", small)):
        ref = cpu if other is gpu else gpu
        check(f"mining {label}: R^2", rel_err(torch.from_numpy(other.stats.r2), torch.from_numpy(ref.stats.r2)), 1e-4)
        check(f"mining {label}: fire counts (fraction differing)",
              float(np.mean(other.stats.fire_counts != ref.stats.fire_counts)), 0.01)
        check(f"mining {label}: top images (fraction differing)",
              float(np.mean(other.top_images != ref.top_images)), 0.01)
        check(f"mining {label}: top values", rel_err(torch.from_numpy(other.top_values),
                                                     torch.from_numpy(ref.top_values)), 1e-4)
        check(f"mining {label}: neighbours (fraction differing)",
              float(np.mean(other.neighbours != ref.neighbours)), 0.01)


def inference_encode(dev: torch.device) -> None:
    """Eval-mode `USAE.encode` (BatchNorm folded into the Triton TopK) against the plain modules."""
    from usae_core.model import USAE

    torch.manual_seed(0)
    model = USAE(USAEConfig(model_dims={"a": 384}, n_concepts=6144, k=32, encoder="mlp_bn")).to(dev)
    bn = model.encoders[0].bn
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(4096, 384, device=dev)
    plain = torch.topk(model.pre_codes(x, "a").detach(), 32, dim=1).values
    with torch.no_grad():
        values, _ = model.encode(x, "a")
    check("inference encode (folded BatchNorm) values", rel_err(values.sort(1, descending=True).values, plain), 1e-5)


def encoder_gradients(dev: torch.device) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(1)
    n, dim, c, k = 4096, 384, 2048, 32
    x = torch.randn(n, dim, device=dev) * 1.5 + 0.2
    for batchnorm in (True, False):
        lin = nn.Linear(dim, c).to(dev)
        bn = nn.BatchNorm1d(c).to(dev) if batchnorm else None
        params = [lin.weight, lin.bias] + ([bn.weight, bn.bias] if bn is not None else [])
        y = torch.relu(bn(lin(x)) if bn is not None else lin(x))
        values, indices = torch.topk(y, k, dim=1)
        g = torch.randn(n, k, device=dev)
        want = torch.autograd.grad((values * g).sum(), params)
        code, _ = topk_encode(x, lin.weight, lin.bias, bn, k)
        match = (code.indices[:, :, None] == indices[:, None, :]).float()
        got = torch.autograd.grad((code.values * torch.einsum("bij,bj->bi", match, g)).sum(), params)
        for name, a, b in zip(("weight", "bias", "gamma", "beta"), got, want):
            if name == "bias" and batchnorm:
                check("encoder grad bias (bn: exactly zero)", float(a.abs().max()), 0)
                continue
            check(f"encoder grad {name} bn={batchnorm} fp32", rel_err(a, b), 1e-3)


def training_steps(dev: torch.device) -> None:
    """First-step gradients and parameters after six float32 steps, fused vs plain (AuxK active, then none).

    Under bf16 both paths differ from float32 by ~15% at initialisation (rounding flips TopK
    choices among near-equal pre-activations), so the fused bf16 gradient must be as close to the
    float32 one as the plain bf16 gradient is. Parameters are compared in float32 only: Adam's
    first steps move each parameter by about lr * sign(grad), which rounding noise scrambles."""
    ucfg = USAEConfig(model_dims={"a": 384, "b": 768, "c": 768}, n_concepts=2048, k=16, encoder="mlp_bn")
    gen = torch.Generator(dev).manual_seed(2)
    batches = [{m: torch.randn(2048, d, generator=gen, device=dev) for m, d in ucfg.model_dims.items()}
               for _ in range(6)]
    from usae_core import sparse

    below = sparse.ROW_DOTS_IN_FORWARD_BELOW
    # AuxK active; the fused decode + loss path with its value gradient in the loss kernel (16
    # entries per concept here), then in the backward.
    for dead, dots_in_forward in ((True, True), (False, True), (False, False)):
        sparse.ROW_DOTS_IN_FORWARD_BELOW = below if dots_in_forward else 0
        _training_steps(dev, ucfg, batches, dead, "AuxK" if dead else
                        f"no dead latents, value gradient in the {'forward' if dots_in_forward else 'backward'}")
    sparse.ROW_DOTS_IN_FORWARD_BELOW = below


def _training_steps(dev, ucfg, batches, dead: bool, label: str) -> None:
    grads, params = {}, {}
    for autocast in (False, True):
        tcfg = TrainConfig(steps=100, batch_size=2048, device=str(dev), aux="auxk", aux_k=64,
                           dead_after_tokens=0 if dead else 10**12, warmup_steps=0, log_every=4, autocast=autocast)
        for fused in (False, True):
            trainer = Trainer(None, Path("unused"), ucfg, tcfg, [])
            trainer.model.train()
            trainer.fused, trainer.cuda_graphs = fused, False
            if dead:
                trainer.since_fired[::5] = 10**9  # AuxK active
            for i, b in enumerate(batches):
                trainer.train_step(b, "abc"[i % 3])
                if i == 0:
                    grads[autocast, fused] = torch.cat(
                        [p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
            params[autocast, fused] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    reference = grads[False, False]
    check(f"[{label}] fused vs plain: first-step gradients, float32", rel_err(grads[False, True], reference), 1e-4)
    plain_bf16 = rel_err(grads[True, False], reference)
    print(f"     plain bf16 gradient vs float32: {plain_bf16:.2e}")
    check(f"[{label}] fused bf16 gradient vs float32 (tol: 1.2 x plain bf16's)", rel_err(grads[True, True], reference),
          1.2 * plain_bf16 + 1e-3)
    initial = torch.cat([p.detach().flatten() for p in Trainer(None, Path("unused"), ucfg, tcfg, []).model.parameters()])
    check(f"[{label}] fused vs plain: float32 parameters after 6 steps (error / distance travelled)",
          float((params[False, True] - params[False, False]).norm() / (params[False, False] - initial).norm()), 1e-3)


def graph_steps(dev: torch.device) -> None:
    """Steps replayed from CUDA graphs equal eager steps, the learning rate follows the schedule,
    and a change of AuxK width (a new graph) keeps them equal."""
    ucfg = USAEConfig(model_dims={"a": 384, "b": 768, "c": 768}, n_concepts=2048, k=16, encoder="mlp_bn")
    tcfg = TrainConfig(steps=40, batch_size=2048, device=str(dev), aux="auxk", aux_k=64, lr=1e-3,
                       dead_after_tokens=4096, warmup_steps=5, log_every=4)
    gen = torch.Generator(dev).manual_seed(3)
    batches = [{m: torch.randn(2048, d, generator=gen, device=dev) for m, d in ucfg.model_dims.items()}
               for _ in range(4)]
    trajectories, lrs = [], []
    for graphs in (False, True):
        trainer = Trainer(None, Path("unused"), ucfg, tcfg, [])
        trainer.model.train()
        trainer.cuda_graphs = graphs
        trainer.since_fired[::7] = 10**9  # dead latents from the start: AuxK widths change over time
        losses = torch.tensor([float(trainer.train_step(batches[i % 4], "abc"[i % 3])["loss"]) for i in range(24)])
        trajectories.append(losses)
        lrs.append((float(trainer.optimizer.param_groups[0]["lr"]), float(trainer.scheduler.get_last_lr()[0])))
        print(f"     graphs={graphs}: {len(trainer._graphs)} graphs, last losses {losses[-3:].tolist()}")
    # Parameters are not compared: float atomics (index_add_) make even two eager runs differ, and
    # Adam amplifies that on tiny gradients; the loss trajectories must agree.
    check("graph replay vs eager: 24 losses (max relative difference)",
          float(((trajectories[1] - trajectories[0]).abs() / trajectories[0].abs()).max()), 1e-4)
    from usae_core.train import lr_factor

    want = tcfg.lr * lr_factor(24, tcfg)
    check("graph replay: optimizer lr follows the schedule", abs(lrs[1][0] - want) / want, 1e-6)
    check("graph replay: scheduler's last lr", abs(lrs[1][1] - want) / want, 1e-6)


def cam_on_cuda(dev: torch.device) -> None:
    """Coordinated activation maximisation on CUDA follows the CPU run of the same seed: its random
    draws come from CPU generators, so only the arithmetic differs (TF32 and kernel choices)."""
    import numpy as np

    from usae_core.backbones import create_backbone
    from usae_core.cam import CamConfig, coordinated_activation_maximization
    from usae_core.model import USAE

    torch.manual_seed(0)
    backbone = create_backbone("timm:vit_small_patch14_dinov2", random_init=True).eval()
    name = backbone.store_name
    usae = USAE(USAEConfig(model_dims={name: backbone.dim}, n_concepts=64, k=8, encoder="linear")).eval()
    runs = {}
    for device in ("cpu", str(dev)):
        cfg = CamConfig(steps=8, image_size=64, crops=4, device=device)
        runs[device] = coordinated_activation_maximization(usae, {name: backbone}, 5, cfg, grids={name: (16, 16)})[name]
    cpu, gpu = runs["cpu"], runs[str(dev)]
    check("CAM on CUDA vs CPU: activation trace (max relative difference)",
          max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(gpu.activation_trace, cpu.activation_trace)), 5e-2)
    check("CAM on CUDA vs CPU: image (mean absolute difference, 0-255)",
          float(np.abs(gpu.image.astype(np.float64) - cpu.image).mean()), 4.0)
    check("CAM on CUDA climbs (final <= start counts as error 1)", float(gpu.final_activation <= gpu.start_activation), 0)


def extraction_rows(dev: torch.device) -> None:
    """`extract_store` on CUDA against the CPU run: every row where it belongs, with batches
    that straddle shards, a short last batch and an unreadable file dropped."""
    import tempfile

    import numpy as np
    from extract_throughput import write_images

    from usae_core.backbones import create_backbone
    from usae_core.extract import extract_store

    torch.manual_seed(0)
    models = [create_backbone(n, random_init=True) for n in ("timm:vit_small_patch14_dinov2", "torchvision:resnet18")]
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        write_images(images, 333)
        (images / "0000100.jpg").write_bytes(b"not a jpeg")
        runs = {"cpu": ("cpu", False), "CUDA": (str(dev), False), "compiled CUDA": (str(dev), True)}
        stores = {run: extract_store(images, models, Path(tmp) / f"store-{i}", batch_size=64, shard_images=100,
                                     device=d, num_workers=4, progress=False, compile=compile)
                  for i, (run, (d, compile)) in enumerate(runs.items())}
        cpu = stores.pop("cpu")
        for run, gpu in stores.items():
            check(f"extraction {run} vs CPU: image lists differ, or the unreadable file was kept",
                  float(cpu.image_ids != gpu.image_ids or len(gpu.image_ids) != 332), 0)
            for name in cpu.model_names:
                got, want = (torch.from_numpy(np.concatenate([b[name] for _, b in s.iter_images(512, [name])]))
                             for s in (gpu, cpu))
                check(f"extraction {run} vs CPU: {name} rows", rel_err(got, want), 3e-2)


def patch_embeddings(dev: torch.device) -> None:
    """ViT patch embeddings as patchify + GEMM against the float64 convolution, in float32 and
    under bf16 autocast, at the paper backbones' shapes (batch 256); gradients too (CAM)."""
    from torch.nn import functional as F

    from usae_core.backbones.patch_conv import PatchConv

    gen = torch.Generator(dev).manual_seed(0)
    for patch, dim in ((14, 384), (16, 768)):
        gemm = PatchConv(3, dim, patch, stride=patch).to(dev)
        with torch.no_grad():
            gemm.weight.copy_(torch.randn(gemm.weight.shape, generator=gen, device=dev) * 0.02)
            gemm.bias.copy_(torch.randn(dim, generator=gen, device=dev) * 0.02)
        x = torch.randn(256, 3, 224, 224, generator=gen, device=dev)
        want = F.conv2d(x.double(), gemm.weight.double(), gemm.bias.double(), stride=patch)
        with torch.no_grad():
            check(f"patch embedding {patch}px float32", rel_err(gemm(x), want), 1e-5)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                check(f"patch embedding {patch}px bf16 autocast", rel_err(gemm(x), want), 1e-2)
        small = x[:8].clone().requires_grad_(True)
        out = gemm(small)
        grad_out = torch.randn(out.shape, generator=gen, device=dev)
        (got,) = torch.autograd.grad(out, small, grad_out)
        ref = small.detach().double().requires_grad_(True)
        (wanted,) = torch.autograd.grad(F.conv2d(ref, gemm.weight.double(), gemm.bias.double(), stride=patch),
                                        ref, grad_out.double())
        check(f"patch embedding {patch}px input gradient", rel_err(got, wanted), 1e-5)


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), torch.__version__)
    kernels(dev)
    mining_rows(dev)
    mining_pass(dev)
    inference_encode(dev)
    encoder_gradients(dev)
    training_steps(dev)
    graph_steps(dev)
    cam_on_cuda(dev)
    patch_embeddings(dev)
    extraction_rows(dev)
    if FAILURES:
        print(f"{len(FAILURES)} CUDA checks failed: {FAILURES}")
        sys.exit(1)
    print("all CUDA checks passed")


if __name__ == "__main__":
    from usae_core.extract import use_fast_pinning

    use_fast_pinning()  # pin host memory as the `usae` command does
    main()
