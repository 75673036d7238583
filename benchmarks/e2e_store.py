"""End-to-end training throughput from an activation store on disk (used by train_throughput.py --e2e-images).

Writes a float16 store of planted activations (16 x 16 tokens per image, shards of 256 images),
then runs the real `Trainer.run` loop over it: memory-mapped shards, raw bytes into pinned
buffers on a side thread, upload on a copy stream, shuffle and conversion on the GPU, CUDA-graph
steps. The rate is read from the loop's own metrics (tokens/s per logging interval), after
warm-up, and set beside the in-memory rate of the same configuration measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from usae_core.config import TrainConfig, USAEConfig
from usae_core.store import ActivationStore
from usae_core.train import METRICS_FILE, Trainer

GRID = (16, 16)
SHARD_IMAGES = 256


def write_store(root: Path, dims: dict[str, int], n_images: int, stream) -> ActivationStore:
    tokens = GRID[0] * GRID[1]
    writer = ActivationStore.create(root, models=dims, grid=GRID, image_ids=[f"img-{i:07d}" for i in range(n_images)],
                                    dtype="float16", shard_images=SHARD_IMAGES, overwrite=True)
    for span in writer.spans:
        batch = stream.batch(span.index, span.n_images * tokens)
        writer.write_shard(span.index, {m: a.view(span.n_images, tokens, -1).half().cpu() for m, a in batch.items()})
    return writer.finalize()


def e2e_suite(args, device: torch.device, configs: dict, dims: dict[str, int], stream_cls) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.store_dir or None) as tmp:
        t0 = time.perf_counter()
        stream = stream_cls(dims, device, seed=2)
        store = write_store(Path(tmp) / "store", dims, args.e2e_images, stream)
        written = time.perf_counter() - t0
        gib = store.n_tokens * sum(dims.values()) * 2 / 2**30
        print(f"store: {store.n_tokens} tokens, {gib:.1f} GiB float16, written in {written:.0f} s", flush=True)
        for cname in args.e2e_configs:
            cfg = configs[cname]
            ucfg = USAEConfig(model_dims=dict(dims), n_concepts=cfg["n_concepts"], k=cfg["k"], encoder="mlp_bn")
            tcfg = TrainConfig(steps=args.e2e_steps, batch_size=cfg["batch"], loss="l1", aux="auxk", device=str(device),
                               log_every=max(1, args.e2e_steps // 10), checkpoint_every=0)
            out = Path(tmp) / f"run-{cname}"
            out.mkdir()
            trainer = Trainer(store, out, ucfg, tcfg, [])
            trainer.model.set_stats({m: {"mean": stream.mean[m].cpu(), "scale": stream.scale[m].cpu()} for m in dims})
            t1 = time.perf_counter()
            trainer.run()
            wall = time.perf_counter() - t1
            rates = [json.loads(line)["tokens_per_s"] for line in (out / METRICS_FILE).read_text().splitlines()]
            steady = rates[2:] or rates
            row = {"config": cname, "store_tokens": store.n_tokens, "store_gib": gib, "steps": args.e2e_steps,
                   "tokens_per_s_median": statistics.median(steady), "tokens_per_s_min": min(steady),
                   "wall_s_including_startup_and_final_save": wall, "interval_rates": rates}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows
