"""End-to-end training throughput from an activation store on disk (used by train_throughput.py --e2e-images).

Writes a float16 store of planted activations (16 x 16 tokens per image, shards of 256 images),
then runs the real `Trainer.run` loop over it: memory-mapped shards, raw bytes into pinned
buffers on a side thread, upload on a copy stream, shuffle and conversion on the GPU, CUDA-graph
steps. At every logging step a callback synchronises the GPU and stamps the time; the rate is
tokens over time between the stamps after the first two intervals (warm-up, graph capture), set
beside the in-memory rate of the same configuration measured in the same run. (The loop's own
`tokens_per_s` stops its clock before the logging sync, so with asynchronous GPU work it shows
the host's dispatch rate; it is reported too, as `loop_reported`.)
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
                                    dtype="float16", shard_images=SHARD_IMAGES)
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
            stamps: list[tuple[float, int]] = []

            def stamp(record: dict, stamps=stamps) -> None:
                torch.cuda.synchronize(device)
                stamps.append((time.perf_counter(), record["step"]))

            trainer = Trainer(store, out, ucfg, tcfg, [stamp] if device.type == "cuda" else [])
            trainer.model.set_stats({m: {"mean": stream.mean[m].cpu(), "scale": stream.scale[m].cpu()} for m in dims})
            t1 = time.perf_counter()
            trainer.run()
            wall = time.perf_counter() - t1
            reported = [json.loads(line)["tokens_per_s"] for line in (out / METRICS_FILE).read_text().splitlines()]
            synced = [(s1 - s0) * cfg["batch"] / (t1 - t0) for (t0, s0), (t1, s1) in zip(stamps[1:], stamps[2:])]
            (t_first, s_first), (t_last, s_last) = (stamps[1], stamps[-1]) if len(stamps) > 2 else ((0, 0), (1, 0))
            row = {"config": cname, "store_tokens": store.n_tokens, "store_gib": gib, "steps": args.e2e_steps,
                   "tokens_per_s": (s_last - s_first) * cfg["batch"] / max(t_last - t_first, 1e-9),
                   "interval_min": min(synced, default=None), "interval_median": statistics.median(synced) if synced else None,
                   "wall_s_including_startup_and_final_save": wall, "loop_reported": reported}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows
