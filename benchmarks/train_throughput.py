"""Training throughput (tokens/s) of our USAE trainer side by side with the published loop.

    PYTHONPATH=. python benchmarks/train_throughput.py --device cuda --out results.json
    PYTHONPATH=. python benchmarks/train_throughput.py --device cpu --configs paper --steps 3 --warmup 1

Suites (all in one process, so every figure has its reference measured in the same run):
- throughput: GPU-resident synthetic activations, only the trainer is timed;
- quality (--quality-tokens N): ours and the reference trained on the same N tokens of the same
  planted data, then both R^2 matrices (source -> target) on held-out tokens;
- e2e (--e2e-images N): ours reading an activation store from disk through `train_usae`'s loop;
- profile (--profile CONFIG): the CUDA kernels of a few of our steps, by total time.
Results go to --out as JSON; a markdown table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_loop import ReferenceUSAE  # noqa: E402

from usae_core.config import TrainConfig, USAEConfig  # noqa: E402
from usae_core.train import Trainer, source_for_step  # noqa: E402

PAPER_DIMS = {"dinov2": 384, "siglip": 768, "vit": 768}
CONFIGS = {
    "paper": {"n_concepts": 6144, "k": 32, "batch": 6272},
    "paper-50k": {"n_concepts": 6144, "k": 32, "batch": 50176},
    "paper-100k": {"n_concepts": 6144, "k": 32, "batch": 100352},
    "wide": {"n_concepts": 32768, "k": 64, "batch": 12544},
    "wide-50k": {"n_concepts": 32768, "k": 64, "batch": 50176},
    "wide-100k": {"n_concepts": 32768, "k": 64, "batch": 100352},
}
IMPLS = ("ours", "ours-eager", "ours-plain", "ours-dead10", "reference-fp32", "reference-bf16")


class PlantedStream:
    """Deterministic synthetic activations: every token mixes a few shared concepts, each with its
    own direction in every model, plus noise; standardised so each model has unit variance."""

    def __init__(self, dims: dict[str, int], device: torch.device, n_true: int = 4096, k_true: int = 16,
                 noise: float = 0.3, seed: int = 0):
        self.dims, self.device, self.k_true, self.noise, self.seed = dims, device, k_true, noise, seed
        gen = torch.Generator(device).manual_seed(seed)
        self.atoms = {m: F.normalize(torch.randn(n_true, d, generator=gen, device=device), dim=1) for m, d in dims.items()}
        ranks = torch.arange(1, n_true + 1, device=device, dtype=torch.float32)
        self.popularity = ranks.pow(-0.7)  # a few frequent concepts, a long tail
        probe = self._raw(10**6, 8192)
        self.mean = {m: a.mean(0) for m, a in probe.items()}
        self.scale = {m: (a - a.mean(0)).square().sum(1).mean().div(a.shape[1]).sqrt() for m, a in probe.items()}

    def _raw(self, index: int, size: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + index)
        idx = torch.multinomial(self.popularity, size * self.k_true, replacement=True, generator=gen).view(size, -1)
        vals = torch.empty(size, self.k_true, device=self.device).exponential_(generator=gen)
        return {
            m: F.embedding_bag(idx, atoms, per_sample_weights=vals, mode="sum")
            + self.noise * torch.randn(size, atoms.shape[1], generator=gen, device=self.device)
            for m, atoms in self.atoms.items()
        }

    def batch(self, index: int, size: int) -> dict[str, torch.Tensor]:
        return {m: (a - self.mean[m]) / self.scale[m] for m, a in self._raw(index, size).items()}


def make_ours(cfg: dict, device: torch.device, *, plain: bool = False, steps: int = 10**6, lr: float = 3e-4,
              seed: int = 0, warmup_tokens: int = 100 * 6272) -> Trainer:
    ucfg = USAEConfig(model_dims=dict(PAPER_DIMS), n_concepts=cfg["n_concepts"], k=cfg["k"], encoder="mlp_bn")
    tcfg = TrainConfig(steps=steps, batch_size=cfg["batch"], lr=lr, loss="l1", aux="auxk", device=str(device),
                       seed=seed, log_every=50, warmup_steps=min(steps, max(1, round(warmup_tokens / cfg["batch"]))))
    trainer = Trainer(None, Path(tempfile.gettempdir()), ucfg, tcfg, [])
    trainer.model.train()
    trainer.fused = not plain
    return trainer


def make_reference(cfg: dict, device: torch.device, *, bf16: bool, steps: int = 10**6, lr: float = 3e-4,
                   seed: int = 0) -> ReferenceUSAE:
    return ReferenceUSAE(dict(PAPER_DIMS), cfg["n_concepts"], cfg["k"], lr=lr, steps=steps // len(PAPER_DIMS),
                         device=str(device), bf16=bf16, seed=seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_impl(name: str, cfg: dict, batches: list, device: torch.device, steps: int, warmup: int) -> dict:
    names = list(PAPER_DIMS)
    if name.startswith("ours"):
        trainer = make_ours(cfg, device, plain=name == "ours-plain")
        trainer.cuda_graphs = trainer.cuda_graphs and name != "ours-eager"
        if name == "ours-dead10":  # AuxK active on every step: a tenth of the latents are dead
            trainer.since_fired[:: 10] = 10**12
        step = trainer.train_step
        if trainer.batch_dtype is not None:  # converted before timing, as standardising always was:
            # train_step's conversion of the loop's float32 batches runs outside its CUDA graph
            batches = [{m: t.to(trainer.batch_dtype) for m, t in b.items()} for b in batches]
    else:
        step = make_reference(cfg, device, bf16=name.endswith("bf16")).train_step
    sources = [names[source_for_step(0, s, len(names))] for s in range(warmup + steps)]
    for s in range(warmup):
        step(batches[s % len(batches)], sources[s])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step(batches[s % len(batches)], sources[s])
    sync(device)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"impl": name, "tokens_per_s": steps * cfg["batch"] / elapsed, "step_ms": 1000 * elapsed / steps,
            "steps": steps, "peak_gib": peak}


def throughput_suite(args, device: torch.device) -> list[dict]:
    rows = []
    for cname in args.configs:
        cfg = CONFIGS[cname]
        stream = PlantedStream(PAPER_DIMS, device)
        batches = [stream.batch(i, cfg["batch"]) for i in range(args.batches)]
        for impl in args.impls:
            steps = args.steps if impl.startswith("ours") else max(2, args.steps // args.reference_divisor)
            try:
                row = time_impl(impl, cfg, batches, device, steps, args.warmup)
            except torch.OutOfMemoryError as exc:
                row = {"impl": impl, "error": f"out of memory: {exc}"[:200]}
            row["config"] = cname
            rows.append(row)
            print(json.dumps(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del batches
    return rows


@torch.no_grad()
def r2_matrix(reconstruct, batches: list[dict]) -> list[list[float]]:
    """R^2 (per-dimension mean, float64) of every source -> target over the held-out batches."""
    names = list(PAPER_DIMS)
    out = []
    for src in names:
        row = []
        for tgt in names:
            x = torch.cat([b[tgt] for b in batches]).double()
            xh = torch.cat([reconstruct(b[src], src, tgt) for b in batches]).double()
            row.append(float(1 - (x - xh).square().sum() / (x - x.mean(0)).square().sum()))
        out.append(row)
    return out


def quality_suite(args, device: torch.device) -> dict:
    """Same planted tokens, same learning-rate schedule shape: compare R^2 after training.

    The reference trains on the batches of `--quality-reference` (the paper's 6272 tokens by
    default) at lr 3e-4; ours on the batches of `--quality-config` at `--quality-lr`, with the
    same dictionary (a large-batch run sees the same tokens in fewer steps: token i of the stream
    is the same for both)."""
    ref_cfg, our_cfg = CONFIGS[args.quality_reference], CONFIGS[args.quality_config]
    if (ref_cfg["n_concepts"], ref_cfg["k"]) != (our_cfg["n_concepts"], our_cfg["k"]):
        raise SystemExit(f"--quality-config {args.quality_config} and --quality-reference {args.quality_reference} "
                         "must have the same concepts and k")
    names = list(PAPER_DIMS)
    stream = PlantedStream(PAPER_DIMS, device, seed=1)
    unit = ref_cfg["batch"]
    if our_cfg["batch"] % unit:
        raise SystemExit(f"--quality-config batch must be a multiple of {unit}")
    chunks = args.quality_tokens // our_cfg["batch"] * (our_cfg["batch"] // unit)  # stream chunks of 6272 tokens
    held_out = [stream.batch(10**7 + i, 8192) for i in range(4)]
    results = {"tokens": chunks * unit, "reference_batch": unit, "ours_batch": our_cfg["batch"], "ours_lr": args.quality_lr}
    runs = {"ours": (make_ours(our_cfg, device, steps=chunks * unit // our_cfg["batch"], lr=args.quality_lr), our_cfg),
            "reference-bf16": (make_reference(ref_cfg, device, bf16=True, steps=chunks), ref_cfg)}
    steps_ours = chunks * unit // our_cfg["batch"]
    # R^2 at evenly spaced token counts, both runs at the same counts: a learning curve that
    # still says something when a long run is cut short.
    marks = sorted({steps_ours * (i + 1) // args.quality_checkpoints for i in range(args.quality_checkpoints)} - {0})
    for label, (impl, cfg) in runs.items():
        t0 = time.perf_counter()
        per_step = cfg["batch"] // unit
        curve = []
        for s in range(chunks // per_step):
            parts = [stream.batch(s * per_step + i, unit) for i in range(per_step)]
            batch = {m: torch.cat([p[m] for p in parts]) for m in names}
            impl.train_step(batch, names[source_for_step(0, s, len(names))])
            done_tokens = (s + 1) * cfg["batch"]
            if done_tokens % our_cfg["batch"] == 0 and done_tokens // our_cfg["batch"] in marks:
                r2 = r2_matrix(reconstruction(label, impl), held_out)
                curve.append({"tokens": done_tokens, **r2_summary(r2)})
                print(label, json.dumps(curve[-1]), flush=True)
        sync(device)
        results[label] = {**curve[-1], "curve": curve, "seconds_including_data": time.perf_counter() - t0}
        print(label, json.dumps(results[label]), flush=True)
    return results


def reconstruction(label: str, impl):
    """source -> target reconstruction of a trainer in the quality suite (eval mode)."""
    if label != "ours":
        return impl.reconstruct
    model = impl.model

    def recon(x, src, tgt):
        model.eval()
        values, indices = model.encode(x, src)
        out = model.decode(values, indices, tgt)
        model.train()
        return out
    return recon


def r2_summary(r2: list[list[float]]) -> dict:
    n = len(r2)
    return {"r2": r2, "self_mean": sum(r2[i][i] for i in range(n)) / n,
            "cross_mean": sum(r2[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)}


def profile_suite(args, device: torch.device) -> str:
    cfg = CONFIGS[args.profile]
    stream = PlantedStream(PAPER_DIMS, device)
    batches = [stream.batch(i, cfg["batch"]) for i in range(2)]
    trainer = make_ours(cfg, device)
    trainer.cuda_graphs = False  # kernels one by one, as launched
    names = list(PAPER_DIMS)
    for s in range(3):
        trainer.train_step(batches[s % 2], names[s % 3])
    sync(device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for s in range(6):
            trainer.train_step(batches[s % 2], names[s % 3])
        sync(device)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)


def ceilings(device: torch.device) -> dict:
    """Measured limits: the encoder-shaped bf16 GEMM (50,176 x 768 x 6144) and a device copy."""
    def timed(fn, reps=20):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / reps

    a = torch.randn(50176, 768, device=device, dtype=torch.bfloat16)
    w = torch.randn(6144, 768, device=device, dtype=torch.bfloat16)
    gemm = timed(lambda: a @ w.T)
    src = torch.randn(2**28, device=device)
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src))
    return {"encoder_gemm_tflops": 2 * 50176 * 768 * 6144 / gemm / 1e12,
            "copy_tb_per_s": 2 * src.numel() * 4 / copy / 1e12}


def hardware(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def markdown(rows: list[dict]) -> str:
    lines = ["| config | impl | tokens/s | step ms | peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['impl']} | {r['error'][:40]} | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        lines.append(f"| {r['config']} | {r['impl']} | {r['tokens_per_s'] / 1e6:.3f} M | {r['step_ms']:.2f} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", default="paper,paper-50k,wide", type=lambda s: s.split(","))
    parser.add_argument("--impls", default="ours,reference-fp32,reference-bf16", type=lambda s: s.split(","))
    parser.add_argument("--steps", type=int, default=30, help="timed steps of ours")
    parser.add_argument("--reference-divisor", type=int, default=3, help="the reference times steps // this")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3, help="distinct resident batches, rotated")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--quality-tokens", type=int, default=0)
    parser.add_argument("--quality-config", default="paper", help="our batch size for the quality suite")
    parser.add_argument("--quality-reference", default="paper",
                        help="the reference's configuration in the quality suite (same concepts and k as ours)")
    parser.add_argument("--quality-lr", type=float, default=3e-4, help="our learning rate for the quality suite")
    parser.add_argument("--quality-checkpoints", type=int, default=1,
                        help="R^2 of both runs at this many evenly spaced token counts")
    parser.add_argument("--e2e-images", type=int, default=0, help="images in the on-disk store (256 tokens each)")
    parser.add_argument("--e2e-configs", default="paper-50k", type=lambda s: s.split(","))
    parser.add_argument("--e2e-steps", type=int, default=100)
    parser.add_argument("--store-dir", default="", help="where the e2e store is written (default: temp dir)")
    parser.add_argument("--profile", default="")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    unknown = ([i for i in args.impls if i not in IMPLS]
               + [c for c in [*args.configs, args.quality_config, args.quality_reference] if c not in CONFIGS])
    if unknown:
        parser.error(f"unknown impls/configs: {unknown}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "hardware": hardware(device)}
    if device.type == "cuda":
        result["ceilings"] = ceilings(device)
        print(json.dumps(result["ceilings"]), flush=True)
    if not args.skip_throughput:
        result["throughput"] = throughput_suite(args, device)
    if args.quality_tokens:
        result["quality"] = quality_suite(args, device)
    if args.e2e_images:
        from e2e_store import e2e_suite

        result["e2e"] = e2e_suite(args, device, CONFIGS, PAPER_DIMS, PlantedStream)
    if args.profile:
        result["profile"] = profile_suite(args, device)
        print(result["profile"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if "throughput" in result:
        print(markdown(result["throughput"]))


if __name__ == "__main__":
    main()
