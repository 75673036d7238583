"""Mining throughput: tokens/s of the streaming pass of `usae mine` (usae_core.mining.mine_store)
over an activation store on disk, and heatmaps/s of the rendering step after it.

    PYTHONPATH=. python benchmarks/mine_throughput.py --device cpu --images 64
    PYTHONPATH=. python benchmarks/mine_throughput.py --device cuda --images 4096 --batch-images 256 --repeat 3
    PYTHONPATH=. python benchmarks/mine_throughput.py --device cuda --images 16384 --batch-images 256 --repeat 3
        # a 4 M-token store: per-pass fixed costs (first batch, results to the host) weigh less
    PYTHONPATH=. python benchmarks/mine_throughput.py --device cuda --images 4096 --batch-images 256 \
        --breakdown 4 --trace mine_trace.json        # where a pass's time goes

Defaults are the paper's configuration: three models of dims 384 / 768 / 768 (DINOv2-S, SigLIP,
ViT-B), 6144 concepts, k = 32, a 16 x 16 token grid, a float16 store. The store holds random
activations (written once into --store-dir and reused while its layout matches) and the USAE
has random weights: the pass does the same work whatever the numbers are. The store is read
once untimed first, so timings see it in the page cache. Results go to --out as JSON, plus a
markdown row on stdout for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from usae_core import render  # noqa: E402
from usae_core.config import USAEConfig  # noqa: E402
from usae_core.errors import UsaeError  # noqa: E402
from usae_core import mining  # noqa: E402
from usae_core.mining import MiningConfig, mine_store, nearest_concepts, top_image_heatmaps  # noqa: E402
from usae_core.model import USAE  # noqa: E402
from usae_core.store import ActivationStore, check_replaceable_store  # noqa: E402
from usae_core.devices import resolve_device  # noqa: E402

PAPER_DIMS = {"dinov2": 384, "siglip": 768, "vit": 768}


def synthetic_store(root: Path, n_images: int, grid: tuple[int, int], dtype: str, shard_images: int,
                    device: torch.device) -> ActivationStore:
    """Open the store at `root` if its layout matches, else write random activations there
    (drawn on `device` in the store's dtype: a 16,384-image store is 8 G values)."""
    try:
        store = ActivationStore.open(root)
        if store.n_images == n_images and store.grid == grid and store.dims == PAPER_DIMS and store.dtype == dtype:
            return store
    except UsaeError:
        pass
    check_replaceable_store(root)  # a benchmark store of another layout is rewritten, never any other folder
    shutil.rmtree(root, ignore_errors=True)
    writer = ActivationStore.create(root, models=PAPER_DIMS, grid=grid, dtype=dtype, shard_images=shard_images,
                                    image_ids=[f"bench-{i:07d}" for i in range(n_images)])
    gen = torch.Generator(device=device).manual_seed(0)
    t = grid[0] * grid[1]
    for span in writer.spans:
        shard = {}
        for m, d in PAPER_DIMS.items():
            values = torch.randn((span.n_images, t, d), generator=gen, device=device).to(getattr(torch, dtype)).cpu()
            shard[m] = values if dtype == "bfloat16" else values.numpy()  # numpy has no bfloat16
        writer.write_shard(span.index, shard)
    return writer.finalize()


def _timed(device: torch.device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def pass_breakdown(model, store, cfg: MiningConfig, device: torch.device, rounds: int, neighbours_s: float) -> dict:
    """Where a pass's time goes, in tokens/s (medians over `rounds` alternated rounds):

    - `full`: `mine_store` as users run it;
    - `compute_only`: the same with every batch already on the device (the store read and the
      uploads taken out), i.e. the pace the pipeline could reach if reading were free;
    - `read_only`: the batches read and uploaded with no compute, i.e. the data path alone.

    `full` near `compute_only` means the kernels set the pace; `full` well below both means
    the two interfere. Needs device memory for the whole store (it is held for compute_only)."""
    held = [(first, n, {m: t.clone() for m, t in batch.items()})
            for first, n, batch in mining.iter_image_batches(store, cfg.batch_images, device)]

    def compute_only(*_args, **_kwargs):
        return iter(held)

    def read_only() -> None:
        for _ in mining.iter_image_batches(store, cfg.batch_images, device):
            pass

    seconds: dict[str, list[float]] = {"full": [], "compute_only": [], "read_only": []}
    for _ in range(rounds):
        seconds["full"].append(_timed(device, lambda: mine_store(model, store, cfg, device=device, progress=False)))
        # The benchmark swaps the batch source; mine_store itself has no such switch.
        with mock.patch.object(mining, "iter_image_batches", compute_only):
            seconds["compute_only"].append(_timed(device, lambda: mine_store(model, store, cfg, device=device, progress=False)))
        seconds["read_only"].append(_timed(device, read_only))
    del held
    rates = {}
    for name, values in seconds.items():
        work = statistics.median(values) - (0.0 if name == "read_only" else neighbours_s)
        rates[name] = {"seconds": [round(v, 4) for v in values], "tokens_per_s": round(store.n_tokens / max(work, 1e-9))}
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--images", type=int, default=64, help="images in the synthetic store")
    ap.add_argument("--grid", type=int, default=16, help="tokens per side")
    ap.add_argument("--concepts", type=int, default=6144)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--top-n", type=int, default=16)
    ap.add_argument("--batch-images", type=int, default=16)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--repeat", type=int, default=2, help="timed passes (the median is reported)")
    ap.add_argument("--render-concepts", type=int, default=8,
                    help="concepts whose top images are rendered to time the heatmap step (0: skip)")
    ap.add_argument("--store-dir", type=Path, default=None, help="where to keep the synthetic store")
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    ap.add_argument("--breakdown", type=int, default=0, metavar="ROUNDS",
                    help="also time ROUNDS rounds of full / compute-only / read-only passes, alternated")
    ap.add_argument("--trace", type=Path, default=None, help="write a torch profiler trace of one pass here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    store_dir = args.store_dir or Path(tempfile.gettempdir()) / "usae-mine-bench-store"
    store = synthetic_store(store_dir, args.images, (args.grid, args.grid), args.dtype, shard_images=256,
                            device=device)
    # On the device before timing: mine_store hands a model back where it found it, so a CPU
    # model would be copied to the GPU and back inside every timed pass (and the neighbours
    # below would run on the CPU).
    model = USAE(USAEConfig(model_dims=PAPER_DIMS, n_concepts=args.concepts, k=args.k,
                            encoder="mlp_bn")).to(device).eval()
    cfg = MiningConfig(top_n=args.top_n, batch_images=args.batch_images)

    mine_store(model, store, cfg, device=device, progress=False)  # warm-up: page cache, kernels, allocator
    results = []
    seconds = [_timed(device, lambda: results.append(mine_store(model, store, cfg, device=device, progress=False)))
               for _ in range(args.repeat)]
    result = results[-1]
    pass_s = statistics.median(seconds)
    # The decoder-cosine neighbours are a fixed cost per mine, not per token: time them apart.
    start = time.perf_counter()
    nearest_concepts(model, cfg.neighbours)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    neighbours_s = time.perf_counter() - start
    tokens_per_s = store.n_tokens / max(pass_s - neighbours_s, 1e-9)

    breakdown = pass_breakdown(model, store, cfg, device, args.breakdown, neighbours_s) if args.breakdown else None
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            _timed(device, lambda: mine_store(model, store, cfg, device=device, progress=False))
        prof.export_chrome_trace(str(args.trace))

    heatmaps_per_s = None
    if args.render_concepts:
        concepts = list(range(min(args.render_concepts, args.concepts)))
        start = time.perf_counter()
        heat = top_image_heatmaps(model, store, result, concepts, cfg, device=device)
        square = render.placeholder(224)
        for (i, c, _), h in heat.items():
            render.heatmap_overlay(square, h, float(result.top_values[i, c, 0])).save(
                io.BytesIO(), format="PNG", compress_level=1)
        heatmaps_per_s = len(heat) / (time.perf_counter() - start)

    report = {
        "benchmark": "mine_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "dims": PAPER_DIMS,
        "concepts": args.concepts,
        "k": args.k,
        "top_n": args.top_n,
        "images": store.n_images,
        "tokens": store.n_tokens,
        "store_dtype": store.dtype,
        "batch_images": args.batch_images,
        "pass_seconds": seconds,
        "neighbours_seconds": neighbours_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_with_neighbours": store.n_tokens / pass_s,
        "heatmaps_per_s": heatmaps_per_s,
        "breakdown": breakdown,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"| {report['device']} | {args.concepts} / k {args.k} | {store.n_tokens:,} tokens, batch {args.batch_images} img "
          f"| {tokens_per_s:,.0f} tokens/s | {heatmaps_per_s or 0:,.0f} heatmaps/s |")


if __name__ == "__main__":
    main()
