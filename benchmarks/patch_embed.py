"""ViT patch embeddings: the convolution against patchify + GEMM (`PatchConv`), in one run.

    PYTHONPATH=. python benchmarks/patch_embed.py --device cuda [--compile]

For each backbone: the patch-embedding layer alone and the whole `forward_features`, first with
the model's own `nn.Conv2d` (the reference), then after `use_gemm_patch_convs`, on the same
weights and the same input, bf16 autocast on CUDA. With --compile each variant is compiled
(inductor may pick its own convolution kernel, so the reference is compiled too). Also the
relative difference (L2 norm) between the two outputs. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import timm
import torch

from usae_core.backbones.patch_conv import use_gemm_patch_convs
from usae_core.devices import resolve_device

PAPER_BACKBONES = ("vit_small_patch14_dinov2", "vit_base_patch16_siglip_224", "vit_base_patch16_224")


def per_batch_ms(fn, x: torch.Tensor, repeats: int) -> float:
    cuda = x.is_cuda
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for _ in range(3):  # warm-up (and compilation)
            fn(x)
        if cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(x)
        if cuda:
            torch.cuda.synchronize(x.device)
    return (time.perf_counter() - start) / repeats * 1e3


def measure(model: torch.nn.Module, x: torch.Tensor, repeats: int, compile: bool) -> tuple[dict, torch.Tensor]:
    proj = model.patch_embed.proj
    layer = torch.compile(proj) if compile else proj
    whole = torch.compile(model.forward_features) if compile else model.forward_features
    times = {"patch_embedding_ms": per_batch_ms(layer, x, repeats), "forward_ms": per_batch_ms(whole, x, repeats)}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
        out = whole(x).float()
    return times, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(PAPER_BACKBONES), help="comma-separated timm names")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 8 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed batches (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch, repeats = args.batch_size or (256 if cuda else 8), args.repeats or (30 if cuda else 3)
    torch.manual_seed(0)
    rows = {}
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=224).to(device).eval()
        x = torch.randn(batch, 3, 224, 224, device=device)
        conv, conv_out = measure(model, x, repeats, args.compile)
        use_gemm_patch_convs(model)
        gemm, gemm_out = measure(model, x, repeats, args.compile)
        rows[name] = {
            "conv": {k: round(v, 3) for k, v in conv.items()},
            "gemm": {k: round(v, 3) for k, v in gemm.items()},
            "forward_speedup": round(conv["forward_ms"] / gemm["forward_ms"], 3),
            "output_rel_diff": float((gemm_out - conv_out).norm() / conv_out.norm()),
        }
        if cuda:
            torch.compiler.reset()
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "batch_size": batch,
              "compile": args.compile, "torch": torch.__version__, "models": rows}
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
