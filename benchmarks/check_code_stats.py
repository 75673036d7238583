"""CUDA check and timing of mining's fused code statistics (usae_core.kernels.code_stats).

    PYTHONPATH=. python benchmarks/check_code_stats.py [--repeat 20]

1. The histogram thresholds against `torch.bucketize(log(v))` on every positive float32.
2. At mining sizes (65536 tokens = 256 images x 256 tokens, k = 32, 6144 concepts, 48 bins,
   3 defect types, 3 models, 2 batches): the Triton path of `CodeStats` against its PyTorch
   fallback (the statistics mining computed before) on skewed codes with planted per-image
   ties, values on and next to the histogram edges, and zeros; the top images that follow.
3. Time per batch of both paths (torch.cuda.Event), and per million tokens.

Prints one line per check and exits non-zero on any mismatch (CI runs the CPU twins in
tests/core/test_code_stats.py, with the kernels in Triton's interpreter).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from usae_core.kernels.code_stats import CodeStats, log_bin_thresholds  # noqa: E402
from usae_core.mining import MiningConfig, StreamingTopImages  # noqa: E402

TOKENS_PER_IMAGE, IMAGES, K, CONCEPTS, DEFECTS, MODELS, TAU = 256, 256, 32, 6144, 3, 3, 0.1
FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)


def exhaustive_binning(dev: torch.device, log_edges: torch.Tensor) -> None:
    """Every positive float32 (and +inf) lands in the same bin both ways."""
    thresholds = log_bin_thresholds(log_edges)[:-1]
    mismatches = torch.zeros((), dtype=torch.int64, device=dev)
    step = 1 << 27
    for lo in range(1, 0x7F800001, step):
        v = torch.arange(lo, min(lo + step, 0x7F800001), dtype=torch.int32, device=dev).view(torch.float32)
        by_log = torch.bucketize(v.clamp_min(1e-30).log(), log_edges)
        by_threshold = torch.bucketize(v, thresholds, right=True)  # thresholds <= v
        mismatches += (by_log != by_threshold).sum()
    check("histogram bins of all 2^31 positive float32 values", int(mismatches) == 0, f"{int(mismatches)} differ")


def synthetic_batch(gen: torch.Generator, dev: torch.device, thresholds: torch.Tensor, on_edges: torch.Tensor):
    """Codes of MODELS models for one batch, and a defect coverage."""
    n = IMAGES * TOKENS_PER_IMAGE
    # Skewed concept frequencies, as in a trained USAE: 8 concepts on about half the tokens (the
    # atomics' worst contention), a tenth of them a few times more frequent than the rest.
    popularity = torch.where(torch.rand(CONCEPTS, generator=gen, device=dev) < 0.1, 0.01, 0.0)
    popularity[:8] = 0.5
    levels = torch.cat([on_edges, thresholds, thresholds.nextafter(torch.zeros_like(thresholds)),
                        torch.tensor([0.0, TAU, 0.5, 2.0], device=dev)])
    codes = []
    for m in range(MODELS):
        indices = (torch.rand(n, CONCEPTS, generator=gen, device=dev) + popularity).topk(K, dim=1).indices
        if m:  # half the tokens share the first model's concepts, so co-firing is common
            same = torch.rand(n, generator=gen, device=dev) < 0.5
            indices = torch.where(same[:, None], codes[0][1], indices)
        # Log-uniform over the histogram's range on a grid of 360 values: many exact ties.
        values = torch.exp(torch.round(torch.empty(n, K, device=dev).uniform_(-9, 9, generator=gen) * 20) / 20)
        planted = torch.rand(n, K, generator=gen, device=dev) < 0.1
        values = torch.where(planted, levels[torch.randint(len(levels), (n, K), generator=gen, device=dev)], values)
        values[torch.rand(n, K, generator=gen, device=dev) < 0.1] = 0.0
        # A tie at the maximum: every third token of the first images holds the first token's
        # concepts, the first of them at the same top value.
        tied = slice(0, 4 * TOKENS_PER_IMAGE, 3)
        indices[tied] = indices[0]
        values[tied, 0] = 1e5
        codes.append((values.contiguous(), indices.contiguous()))
    cover = (torch.rand(n, DEFECTS, generator=gen, device=dev) < 0.05).float()
    return codes, cover


def run_batch(stats: CodeStats, codes, cover, first_image: int, tops: list[StreamingTopImages]) -> list:
    per_image = []
    for m, (values, indices) in enumerate(codes):
        best, where = stats.add(m, values, indices, TOKENS_PER_IMAGE, cover)
        tops[m].update(best, where, first_image)
        per_image.append((best, where))
    stats.add_cofire(codes)
    return per_image


def compare(dev: torch.device, log_edges: torch.Tensor, batches) -> None:
    runs = []
    for fused in (True, False):
        stats = CodeStats(MODELS, CONCEPTS, log_edges, TAU, DEFECTS, fused=fused)
        tops = [StreamingTopImages(CONCEPTS, 16, dev) for _ in range(MODELS)]
        per_image = [run_batch(stats, codes, cover, b * IMAGES, tops) for b, (codes, cover) in enumerate(batches)]
        runs.append((stats, tops, per_image))
    (fused, fused_tops, fused_images), (plain, plain_tops, plain_images) = runs
    check("the fused path runs the Triton kernels", fused.fused)
    for name in ("fire", "max_act", "hist", "intersection", "cofire"):
        a, b = getattr(fused, name), getattr(plain, name)
        check(f"{name} identical", torch.equal(a, b), f"{int((a != b).sum())} of {a.numel()} differ, total {float(b.sum()):.0f}")
    rel = ((fused.code_sums - plain.code_sums).abs() / plain.code_sums.abs().clamp_min(1e-30)).max()
    check("code sums to float32 rounding", float(rel) <= 1e-4, f"max relative error {float(rel):.1e}")
    for b, (got, want) in enumerate(zip(fused_images, plain_images)):
        for m, ((best, where), (want_best, want_where)) in enumerate(zip(got, want)):
            check(f"per-image max batch {b} model {m}", torch.equal(best, want_best) and torch.equal(where, want_where),
                  f"{int((best != want_best).sum())} values, {int((where != want_where).sum())} tokens differ")
    for m, (a, b) in enumerate(zip(fused_tops, plain_tops)):
        same = all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("values", "images", "tokens"))
        check(f"top images model {m}", same)


def timing(dev: torch.device, log_edges: torch.Tensor, batches, repeat: int) -> None:
    codes, cover = batches[0]
    tokens = IMAGES * TOKENS_PER_IMAGE
    for label, fused in (("fused", True), ("PyTorch passes", False)):
        for with_cover in (False, True):
            stats = CodeStats(MODELS, CONCEPTS, log_edges, TAU, DEFECTS if with_cover else 0, fused=fused)
            tops = [StreamingTopImages(CONCEPTS, 16, dev) for _ in range(MODELS)]
            c = cover if with_cover else None
            run_batch(stats, codes, c, 0, tops)  # warm up (compiles the kernels)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(dev)
            start.record()
            for _ in range(repeat):
                for m, (values, indices) in enumerate(codes):
                    stats.add(m, values, indices, TOKENS_PER_IMAGE, c)
                stats.add_cofire(codes)
            end.record()
            torch.cuda.synchronize(dev)
            ms = start.elapsed_time(end) / repeat
            print(f"time {label:>15} {'with' if with_cover else 'without'} defects: {ms:7.3f} ms per batch of "
                  f"{tokens} tokens x {MODELS} models = {ms * 1e6 / tokens:6.1f} ms per 1M tokens", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    cfg = MiningConfig()
    edges = cfg.hist_edges()
    log_edges = torch.as_tensor(np.log(edges[1:-1]), dtype=torch.float32, device=dev)
    exhaustive_binning(dev, log_edges)
    gen = torch.Generator(dev).manual_seed(0)
    thresholds = log_bin_thresholds(log_edges)[:-1]
    on_edges = torch.as_tensor(edges, dtype=torch.float32, device=dev)
    batches = [synthetic_batch(gen, dev, thresholds, on_edges) for _ in range(2)]
    compare(dev, log_edges, batches)
    timing(dev, log_edges, batches, args.repeat)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed: {', '.join(FAILURES)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
