"""Per-concept statistics of sparse TopK codes, accumulated batch by batch (what mining counts).

For the code `values, indices` `[tokens, k]` of whole images (`tokens_per_image` rows each),
`CodeStats.add` accumulates per concept and model:

- fire counts (values > tau) and code sums,
- the largest code,
- a histogram of the non-zero codes over geometric bins and, given a defect coverage
  `[tokens, defect types]`, per bin the coverage of those tokens (the defect intersection),

and returns each image's largest code per concept with the first token holding it.
`CodeStats.add_cofire` counts the tokens on which a concept fires in every model at once.

With Triton (see `usae_core.kernels.use_triton`) one kernel walks the `[tokens, k]` entries
once, with atomics into int32 / float32 per-batch buffers that are folded into the float64
totals once per batch, and a second compares each token's k indices across the models for the
co-fire count. The fallback is the plain scatter / index_add version of the same statistics.
"""

from __future__ import annotations

from typing import Sequence

import torch

from usae_core.errors import UsaeError
from usae_core.kernels import HAVE_TRITON, use_triton

# The histogram bins the log of a code clamped to this, so a zero lands in bin 0 (with weight 0).
_LOG_FLOOR = 1e-30


class CodeStats:
    """Running per-concept statistics of several models' sparse codes (float64 totals)."""

    def __init__(self, n_models: int, n_concepts: int, log_edges: torch.Tensor, tau: float,
                 n_defects: int = 0, fused: bool | None = None):
        """`log_edges`: float32 `[bins - 1]` ascending logs of the inner histogram edges, on the
        device of the codes. `fused`: the Triton kernels (None: whenever `use_triton` allows)."""
        device = log_edges.device
        self.n_concepts, self.n_bins, self.tau = n_concepts, len(log_edges) + 1, tau
        self.log_edges = log_edges
        self.fused = use_triton(log_edges) if fused is None else fused
        f64 = dict(dtype=torch.float64, device=device)
        self.fire = torch.zeros(n_models, n_concepts, **f64)
        self.code_sums = torch.zeros(n_models, n_concepts, **f64)
        self.max_act = torch.zeros(n_models, n_concepts, device=device)
        self.cofire = torch.zeros(n_concepts, **f64)
        self.hist = torch.zeros(n_models, n_concepts * self.n_bins, **f64)
        """`[models, concepts * bins]` counts of non-zero codes per (concept, bin)."""
        self.intersection = torch.zeros(n_models, n_concepts * self.n_bins, n_defects, **f64)
        """`[models, concepts * bins, defect types]` summed coverage of the tokens in each bin."""
        # The kernel bins by comparing codes with these, not by taking logs (see log_bin_thresholds).
        self.thresholds = log_bin_thresholds(log_edges) if self.fused else None

    @property
    def active(self) -> torch.Tensor:
        """`[models]` codes above tau over all tokens (each is one fire count of its concept)."""
        return self.fire.sum(1)

    def add(self, model: int, values: torch.Tensor, indices: torch.Tensor, tokens_per_image: int,
            cover: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate model `model`'s code of a batch of images; returns each image's largest
        code per concept and the first token (within the image) holding it, both
        `[images, concepts]` (0 where the concept is off)."""
        if values.shape[0] % tokens_per_image:
            raise UsaeError(f"{values.shape[0]} code rows are not whole images of {tokens_per_image} tokens")
        if self.fused and values.dtype == torch.float32:
            return self._add_fused(model, values, indices, tokens_per_image, cover)
        return self._add_plain(model, values, indices, tokens_per_image, cover)

    def add_cofire(self, codes: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Accumulate co-firing from every model's `(values, indices)` code of the same tokens."""
        if self.fused and len(codes) > 1:
            self.cofire += _cofire_triton(codes, self.tau, self.n_concepts)
        else:
            self.cofire += cofire_counts([(indices, values > self.tau) for values, indices in codes], self.n_concepts)

    def _add_plain(self, model, values, indices, tokens_per_image, cover):
        flat = indices.reshape(-1)
        self.fire[model].index_add_(0, flat, (values > self.tau).reshape(-1).double())
        self.code_sums[model].index_add_(0, flat, values.reshape(-1).double())
        self.max_act[model].scatter_reduce_(0, flat, values.reshape(-1), reduce="amax")
        bins = torch.bucketize(values.clamp_min(_LOG_FLOOR).log(), self.log_edges)
        binned = (indices * self.n_bins + bins).reshape(-1)
        self.hist[model].index_add_(0, binned, (values > 0).reshape(-1).double())
        if cover is not None:
            hits = cover[:, None, :] * (values > 0)[:, :, None]  # [tokens, k, defect types]
            self.intersection[model].index_add_(0, binned, hits.reshape(len(binned), -1).double())
        return per_image_max(values, indices, values.shape[0] // tokens_per_image, tokens_per_image, self.n_concepts)

    def _add_fused(self, model, values, indices, tokens_per_image, cover):
        c, bins = self.n_concepts, self.n_bins
        n_defects = cover.shape[1] if cover is not None else 0
        # One zeroed int32 buffer holds every per-batch statistic; the float ones are bit views.
        sizes = [c, c, c, c * bins, c * bins * n_defects]
        fire, sums, top, hist, inter = torch.zeros(sum(sizes), dtype=torch.int32, device=values.device).split(sizes)
        n_images = values.shape[0] // tokens_per_image
        # Per (image, concept): code bits << 32 | (tokens_per_image - 1 - token), so one atomic
        # max keeps the largest code and, among equal codes, the earliest token.
        keys = torch.zeros(n_images * c, dtype=torch.int64, device=values.device)
        _code_stats_triton(values, indices, self.thresholds, cover, self.tau, tokens_per_image, c, bins,
                           fire, sums.view(torch.float32), top, hist, inter.view(torch.float32), keys)
        self.fire[model] += fire
        self.code_sums[model] += sums.view(torch.float32)
        torch.maximum(self.max_act[model], top.view(torch.float32), out=self.max_act[model])
        self.hist[model] += hist
        if n_defects:
            self.intersection[model] += inter.view(torch.float32).view(c * bins, n_defects)
        best = (keys >> 32).to(torch.int32).view(torch.float32)
        where = torch.where(keys > 0, (tokens_per_image - 1) - (keys & 0xFFFFFFFF), 0)
        return best.view(n_images, c), where.view(n_images, c)


def log_bin_thresholds(log_edges: torch.Tensor) -> torch.Tensor:
    """float32 `[len(log_edges) + 1]`: per edge e, the smallest positive float32 v with
    `log(max(v, 1e-30)) > e` as `torch.log` computes it on `log_edges`' device, then +inf.

    A positive code v then lies in bucket `sum(v >= thresholds[:-1])`, exactly the bucket that
    `torch.bucketize(log(v), log_edges)` gives it (log is monotone), with no log in the kernel
    whose rounding could differ from PyTorch's. Found by bisection over the float32 bit
    patterns of all edges at once. The +inf end keeps a one-bin histogram's tensor non-empty."""
    lo = torch.ones(log_edges.shape, dtype=torch.int32, device=log_edges.device)  # smallest subnormal
    hi = torch.full_like(lo, 0x7F800000)  # +inf, whose log exceeds every finite edge
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        above = mid.view(torch.float32).clamp_min(_LOG_FLOOR).log() > log_edges
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid + 1)
    return torch.cat([lo.view(torch.float32), torch.full((1,), torch.inf, device=log_edges.device)])


def per_image_max(values: torch.Tensor, indices: torch.Tensor, n_images: int, tokens_per_image: int,
                  n_concepts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From sparse codes `[n_images * tokens, k]`: each image's largest code per concept and the
    first token holding it, both `[n_images, n_concepts]` (0 where the concept is off)."""
    token = torch.arange(values.shape[0], device=values.device)
    image = (token // tokens_per_image)[:, None].expand_as(indices)
    flat = (image * n_concepts + indices).reshape(-1)
    best = torch.zeros(n_images * n_concepts, device=values.device)
    best.scatter_reduce_(0, flat, values.reshape(-1), reduce="amax", include_self=True)
    local = (token % tokens_per_image)[:, None].expand_as(indices).reshape(-1)
    # Tokens not at their image's maximum offer `tokens_per_image`, which never wins the min.
    at_max = torch.where(values.reshape(-1) >= best[flat], local, tokens_per_image)
    where = torch.full((n_images * n_concepts,), tokens_per_image, dtype=torch.long, device=values.device)
    where.scatter_reduce_(0, flat, at_max, reduce="amin", include_self=True)
    where = torch.where(best > 0, where, 0)
    return best.view(n_images, n_concepts), where.view(n_images, n_concepts)


def cofire_counts(firing: list[tuple[torch.Tensor, torch.Tensor]], n_concepts: int) -> torch.Tensor:
    """Per concept, the tokens on which it fires in every model at once (float64 `[n_concepts]`).

    `firing` holds each model's `(indices, fires)` `[tokens, k]` for the same tokens. A concept
    firing in the first model co-fires when it is also among each other model's firing
    indices of that token (a k x k comparison per token, no sorting)."""
    indices0, all_fire = firing[0]
    for indices, fires in firing[1:]:
        all_fire = all_fire & ((indices0[:, :, None] == indices[:, None, :]) & fires[:, None, :]).any(-1)
    counts = torch.zeros(n_concepts, dtype=torch.float64, device=indices0.device)
    return counts.index_add_(0, indices0.reshape(-1), all_fire.reshape(-1).double())


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _code_stats_kernel(val_ptr, idx_ptr, thr_ptr, cover_ptr, fire_ptr, sums_ptr, top_ptr, hist_ptr,
                           inter_ptr, key_ptr, tau, n_entries, n_edges, n_concepts, n_bins, n_defects,
                           tokens_per_image, K: tl.constexpr, HAS_COVER: tl.constexpr, BLOCK: tl.constexpr):
        # One lane per (token, slot) entry; every statistic is an atomic into a per-batch buffer.
        entry = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = entry < n_entries
        v = tl.load(val_ptr + entry, mask=valid, other=0.0)
        concept = tl.load(idx_ptr + entry, mask=valid, other=0).to(tl.int64)
        on = valid & (v > 0)
        tl.atomic_add(fire_ptr + concept, 1, mask=valid & (v > tau), sem="relaxed")
        tl.atomic_add(sums_ptr + concept, v, mask=valid & (v != 0), sem="relaxed")
        # Non-negative float32 values order like their int32 bit patterns.
        bits = v.to(tl.int32, bitcast=True)
        tl.atomic_max(top_ptr + concept, bits, mask=on, sem="relaxed")
        bucket = tl.zeros([BLOCK], dtype=tl.int64)
        for e in range(n_edges):
            bucket += (v >= tl.load(thr_ptr + e)).to(tl.int64)
        slot = concept * n_bins + bucket
        tl.atomic_add(hist_ptr + slot, 1, mask=on, sem="relaxed")
        token = entry // K
        image = token // tokens_per_image
        key = (bits.to(tl.int64) << 32) | (tokens_per_image - 1 - (token - image * tokens_per_image))
        tl.atomic_max(key_ptr + image * n_concepts + concept, key, mask=on, sem="relaxed")
        if HAS_COVER:
            for d in range(n_defects):
                cov = tl.load(cover_ptr + token * n_defects + d, mask=on, other=0.0)
                tl.atomic_add(inter_ptr + slot * n_defects + d, cov, mask=on & (cov != 0), sem="relaxed")

    @triton.jit
    def _cofire_kernel(idx0_ptr, val0_ptr, idx_ptr, val_ptr, alive_ptr, count_ptr, tau, n_tokens,
                       K: tl.constexpr, K_PAD: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                       BLOCK_T: tl.constexpr):
        # Narrows "fires in every model so far" for the first model's entries by one more model:
        # from the first model's own firing (FIRST) or `alive`, into `alive` or, for the last
        # model, straight into the per-concept counts.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < n_tokens
        cols = tl.arange(0, K_PAD)
        mask = rmask[:, None] & (cols < K)[None, :]
        at = rows[:, None] * K + cols[None, :]
        concept0 = tl.load(idx0_ptr + at, mask=mask, other=-1)
        if FIRST:
            alive = tl.load(val0_ptr + at, mask=mask, other=0.0) > tau
        else:
            alive = tl.load(alive_ptr + at, mask=mask, other=0) != 0
        found = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int1)
        for j in range(K):
            other = tl.load(idx_ptr + rows * K + j, mask=rmask, other=-2)
            fires = tl.load(val_ptr + rows * K + j, mask=rmask, other=0.0) > tau
            found = found | ((concept0 == other[:, None]) & fires[:, None])
        alive = alive & found & mask
        if LAST:
            tl.atomic_add(count_ptr + concept0, 1, mask=alive, sem="relaxed")
        else:
            tl.store(alive_ptr + at, alive.to(tl.int8), mask=mask)


_BLOCK = 1024


def _code_stats_triton(values, indices, thresholds, cover, tau, tokens_per_image, n_concepts, n_bins,
                       fire, sums, top, hist, inter, keys):
    values, indices = values.contiguous(), indices.contiguous()
    k = values.shape[1]
    n = values.numel()
    has_cover = cover is not None
    cover = cover.contiguous() if has_cover else values  # never read without coverage
    _code_stats_kernel[(triton.cdiv(n, _BLOCK),)](
        values, indices, thresholds, cover, fire, sums, top, hist, inter if has_cover else sums, keys,
        float(tau), n, n_bins - 1, n_concepts, n_bins, cover.shape[1] if has_cover else 0, tokens_per_image,
        K=k, HAS_COVER=has_cover, BLOCK=_BLOCK, num_warps=4)


def _cofire_triton(codes, tau, n_concepts):
    """int32 `[n_concepts]` co-fire counts of one batch; one launch per model after the first."""
    values0, indices0 = (t.contiguous() for t in codes[0])
    n_tokens, k = indices0.shape
    counts = torch.zeros(n_concepts, dtype=torch.int32, device=indices0.device)
    alive = torch.empty((n_tokens, k), dtype=torch.int8, device=indices0.device) if len(codes) > 2 else counts
    block_t = 64
    for m, (values, indices) in enumerate(codes[1:], start=1):
        _cofire_kernel[(triton.cdiv(n_tokens, block_t),)](
            indices0, values0, indices.contiguous(), values.contiguous(), alive, counts, float(tau), n_tokens,
            K=k, K_PAD=triton.next_power_of_2(k), FIRST=m == 1, LAST=m == len(codes) - 1, BLOCK_T=block_t,
            num_warps=4)
    return counts
