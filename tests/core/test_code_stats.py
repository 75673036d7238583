"""Fused code statistics: the histogram thresholds against bucketize(log), and the Triton
kernels (run on the CPU in Triton's interpreter) against the PyTorch fallback, on codes with
planted ties, values on the histogram edges, zeros and several images, alone and inside mine_store."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from usae_core.errors import UsaeError
from usae_core.kernels import HAVE_TRITON
from usae_core.kernels.code_stats import CodeStats, log_bin_thresholds

ROOT = Path(__file__).resolve().parents[2]


def _log_edges(hist_min: float, hist_max: float, bins: int) -> torch.Tensor:
    """As mining builds them: float32 logs of the inner geometric edges."""
    return torch.as_tensor(np.log(np.geomspace(hist_min, hist_max, bins + 1)[1:-1]), dtype=torch.float32)


def _near(values: torch.Tensor, ulps: int) -> torch.Tensor:
    """Every float32 within `ulps` of each (non-negative) value."""
    steps = torch.arange(-ulps, ulps + 1, dtype=torch.int32)
    bits = (values.float().view(torch.int32)[:, None] + steps[None, :]).clamp_min(0)
    return bits.reshape(-1).view(torch.float32)


@pytest.mark.parametrize("hist_min, hist_max, bins", [(1e-3, 1e3, 48), (1e-2, 1e2, 6), (0.5, 2.0, 1), (1e-38, 1e-20, 5)])
def test_thresholds_bin_every_value_like_bucketize_of_the_log(hist_min, hist_max, bins):
    edges = _log_edges(hist_min, hist_max, bins)
    thresholds = log_bin_thresholds(edges)
    assert thresholds.shape == (bins,) and thresholds[-1] == torch.inf
    on_edges = torch.as_tensor(np.geomspace(hist_min, hist_max, bins + 1), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([
        _near(thresholds[:-1], 64),  # both sides of every threshold
        _near(on_edges, 8),  # the edges themselves, as float32
        _near(torch.tensor([1e-30, 1.2e-38, 1e-44]), 8),  # the log floor, the smallest normals, subnormals
        torch.tensor([0.0, torch.inf, 3.4e38]),
        torch.exp(torch.empty(5000).uniform_(-100, 80, generator=gen)),
    ])
    values = values[values > 0]  # a zero is never binned (its weight is 0)
    want = torch.bucketize(values.clamp_min(1e-30).log(), edges)
    got = (values[:, None] >= thresholds[None, :-1]).sum(1)
    assert torch.equal(got, want)


def _planted_codes(gen: torch.Generator, n_images: int, tokens_per_image: int, k: int, n_concepts: int,
                   thresholds: torch.Tensor, on_edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes `[n_images * tokens_per_image, k]` with distinct indices per token, few distinct
    values (many per-image ties), values on and next to every histogram edge, and zeros."""
    n = n_images * tokens_per_image
    indices = torch.stack([torch.randperm(n_concepts, generator=gen)[:k] for _ in range(n)])
    levels = torch.cat([torch.tensor([0.0, 0.05, 0.1, 0.3, 7.0, 900.0]), on_edges, _near(thresholds[:-1], 1)])
    values = levels[torch.randint(len(levels), (n, k), generator=gen)]
    # A tie at an image's maximum: one concept at the same top value on three tokens of image 1.
    concept = int(indices[tokens_per_image, 0])
    for token in (tokens_per_image + 1, tokens_per_image + 2, 2 * tokens_per_image - 1):
        row = indices[token]
        slot = int((row == concept).nonzero()[0]) if (row == concept).any() else 0
        row[slot], values[token, slot] = concept, 5e4
    values[tokens_per_image, 0] = 5e4
    values[2 * tokens_per_image:3 * tokens_per_image] = 0.0  # an image with no active code at all
    return values, indices


def _both_paths(batches, n_models, n_concepts, log_edges, tau, n_defects, tokens_per_image):
    """Feed the same batches to the fused and the plain CodeStats; return both and every
    per-image result."""
    runs = []
    for fused in (True, False):
        stats = CodeStats(n_models, n_concepts, log_edges, tau, n_defects, fused=fused)
        per_image = []
        for codes, cover in batches:
            for model, (values, indices) in enumerate(codes):
                per_image.append(stats.add(model, values, indices, tokens_per_image, cover))
            stats.add_cofire(codes)
        runs.append((stats, per_image))
    return runs


def _check_kernels_against_fallback() -> None:
    gen = torch.Generator().manual_seed(1)
    for n_models, n_images, tpi, k, n_concepts, bins, n_defects in [(3, 4, 6, 5, 12, 6, 2), (2, 3, 5, 4, 9, 1, 0),
                                                                      (1, 2, 4, 3, 7, 4, 1)]:
        log_edges = _log_edges(1e-2, 1e2, bins)
        thresholds = log_bin_thresholds(log_edges)
        on_edges = torch.as_tensor(np.geomspace(1e-2, 1e2, bins + 1), dtype=torch.float32)
        batches = []
        for _ in range(2):  # two batches: the per-batch buffers fold into the running totals
            codes = [_planted_codes(gen, n_images, tpi, k, n_concepts, thresholds, on_edges) for _ in range(n_models)]
            # Models often agree on a token's concepts, so co-firing is common.
            for values, indices in codes[1:]:
                same = torch.rand(indices.shape[0], generator=gen) < 0.5
                indices[same] = codes[0][1][same]
            cover = (torch.rand(n_images * tpi, n_defects, generator=gen) < 0.4).float() if n_defects else None
            batches.append((codes, cover))
        (fused, fused_images), (plain, plain_images) = _both_paths(batches, n_models, n_concepts, log_edges, 0.1,
                                                                    n_defects, tpi)
        assert fused.fused and not plain.fused
        shape = f"models={n_models} bins={bins} defects={n_defects}"
        for name in ("fire", "max_act", "hist", "intersection", "cofire"):
            assert torch.equal(getattr(fused, name), getattr(plain, name)), f"{name} {shape}"
        torch.testing.assert_close(fused.code_sums, plain.code_sums, rtol=1e-6, atol=0)
        assert plain.hist.sum() > 0 and plain.fire.sum() > 0 and (n_models == 1 or plain.cofire.sum() > 0)
        for (best, where), (want_best, want_where) in zip(fused_images, plain_images):
            assert torch.equal(best, want_best), shape
            assert torch.equal(where, want_where), shape
        assert (plain_images[0][1] > 0).any(), "some maximum sits past an image's first token"


def _mine_fused_and_plain() -> None:
    """mine_store with the fused statistics against mine_store with the fallback."""
    from tests.core.planted_concept import build_planted
    from usae_core.kernels import code_stats, gather, topk
    from usae_core.mining import DefectMasks, MiningConfig, mine_store

    # The encoder and R^2 kernels (checked in test_sparse) take their fallbacks: slow in the
    # interpreter, and the same in both passes either way.
    topk.use_triton = gather.use_triton = lambda t: False
    assert code_stats.CodeStats(1, 2, torch.zeros(1), 0.1).fused

    with tempfile.TemporaryDirectory() as tmp:
        planted = build_planted(Path(tmp), n_images=20, images=(11, 3, 17))
        cells = {r * planted.store.grid[1] + c for r, c in planted.cells}

        def load(image: int):
            if image not in planted.images:
                return None
            scratch = np.zeros((16, 16), bool)
            for token in cells:
                scratch[token // 4 * 4:(token // 4 + 1) * 4, token % 4 * 4:(token % 4 + 1) * 4] = True
            return {"scratch": scratch}

        cfg = MiningConfig(top_n=4, batch_images=6, hist_bins=12)
        masks = DefectMasks(["scratch"], load)
        fused = mine_store(planted.model, planted.store, cfg, masks=masks)
        use_triton = code_stats.use_triton
        code_stats.use_triton = lambda t: False
        try:
            plain = mine_store(planted.model, planted.store, cfg, masks=masks)
        finally:
            code_stats.use_triton = use_triton
    for name in ("top_values", "top_images", "top_tokens", "max_activation", "hist_counts", "defect_iou"):
        assert np.array_equal(getattr(fused, name), getattr(plain, name)), name
    for name in ("fire_counts", "cofire_counts", "l0"):
        assert np.array_equal(getattr(fused.stats, name), getattr(plain.stats, name)), name
    np.testing.assert_allclose(fused.stats.code_sums, plain.stats.code_sums, rtol=1e-6)
    assert fused.defect_iou[:, planted.concept, 0].min() == 1.0


def kernel_checks(which: str) -> None:
    """Run in a subprocess with TRITON_INTERPRET=1, so the Triton kernels themselves run on the CPU."""
    from usae_core.kernels import use_triton

    assert use_triton(torch.zeros(1)), "interpreter mode did not enable the kernels"
    {"kernels": _check_kernels_against_fallback, "mine": _mine_fused_and_plain}[which]()


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("which", ["kernels", "mine"])
def test_triton_statistics_match_the_fallback_in_the_interpreter(which):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("USAE_DISABLE_TRITON", None)
    done = subprocess.run(
        [sys.executable, "-c", f"from tests.core.test_code_stats import kernel_checks; kernel_checks({which!r})"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_plain_statistics_of_a_tiny_code_by_hand():
    # Two images of two tokens, k = 2, three concepts, tau = 0.5, bins split at 1.0.
    values = torch.tensor([[2.0, 0.25], [2.0, 0.0], [0.75, 3.0], [1.5, 3.0]])
    indices = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 2]])
    cover = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    stats = CodeStats(1, 3, torch.tensor([0.0]), 0.5, n_defects=1, fused=False)
    best, where = stats.add(0, values, indices, 2, cover)
    assert stats.fire.tolist() == [[3.0, 1.0, 2.0]]
    assert stats.active.tolist() == [6.0]
    assert stats.code_sums[0].tolist() == [5.5, 1.0, 6.0]
    assert stats.max_act.tolist() == [[2.0, 0.75, 3.0]]
    assert stats.hist.view(3, 2).tolist() == [[0.0, 3.0], [2.0, 0.0], [0.0, 2.0]]
    assert stats.intersection.view(3, 2).tolist() == [[0.0, 2.0], [2.0, 0.0], [0.0, 2.0]]
    assert best.tolist() == [[2.0, 0.25, 0.0], [1.5, 0.75, 3.0]]
    assert where.tolist() == [[0, 0, 0], [1, 0, 0]]  # the ties at 2.0 and at 3.0 keep the first token
    other = (torch.tensor([[0.9, 0.0], [2.0, 1.0], [1.0, 1.0], [0.0, 0.0]]), torch.tensor([[0, 1], [2, 0], [2, 1], [1, 2]]))
    stats.add_cofire([(values, indices), other])
    assert stats.cofire.tolist() == [2.0, 1.0, 1.0]
    with pytest.raises(UsaeError, match="whole images"):
        stats.add(0, values[:3], indices[:3], 2)
