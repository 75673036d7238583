"""Token-grid resampling: `F.interpolate` on `[B, D, h, w]` maps against `resample_grid`'s matrix product.

    PYTHONPATH=. python benchmarks/resample_grid.py --device cuda

Extraction resamples every batch of the paper's ViT-B/16 models from 16 x 16 to 14 x 14 tokens.
For bf16 tokens `[256, 256, 768]` (a batch of 256, as extraction gets them under autocast) this
times the former way (the reference: transpose to maps, float32, antialiased `F.interpolate`,
back to tokens) and `resample_grid` (one float32 matrix product), each with its cast to the
float16 of the store, and reports the largest difference between the two. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from usae_core.extract import resample_grid
from usae_core.devices import resolve_device


def by_interpolate(tokens: torch.Tensor, native: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    b, _, d = tokens.shape
    maps = tokens.transpose(1, 2).reshape(b, d, *native).float()
    out = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False, antialias=True)
    return out.flatten(2).transpose(1, 2)


def per_batch_ms(fn, repeats: int, cuda: bool) -> float:
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    native, grid = (16, 16), (14, 14)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randn(args.batch_size, 256, args.dim, generator=gen, device=device).bfloat16()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        reference = lambda: by_interpolate(tokens, native, grid).half()  # noqa: E731
        product = lambda: resample_grid(tokens, native, grid).half()  # noqa: E731
        result = {
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "tokens": list(tokens.shape),
            "interpolate_ms": round(per_batch_ms(reference, args.repeats, cuda), 3),
            "matrix_product_ms": round(per_batch_ms(product, args.repeats, cuda), 3),
            "max_abs_diff": (reference().float() - product().float()).abs().max().item(),
            "max_abs_value": reference().float().abs().max().item(),
            "torch": torch.__version__,
        }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
