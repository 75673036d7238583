"""Concept mining: one streaming pass over a store that turns a trained USAE into browsable
per-concept records.

For every concept and model it finds the top-N images by the concept's largest token code in
the image (a streaming top-k merge, so memory depends on the number of concepts, never on the
store size), a histogram of the concept's non-zero codes, firing / co-firing / energy
statistics with the R^2 matrix (definitions in usae_core.metrics), the nearest concepts by
decoder cosine, and, when defect masks are given, the IoU of where the concept fires with
each defect type. `top_image_heatmaps` then re-encodes just the top images to get their
per-token heatmaps.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from usae_core.devices import borrowed, resolve_device
from usae_core.errors import UsaeError
from usae_core.host_copy import SideStreamUpload, read_rows
from usae_core.images import defect_types, load_masks
from usae_core.kernels.code_stats import CodeStats
from usae_core.kernels.gather import residual_sq
from usae_core.kernels.standardize import standardize_rows
from usae_core.metrics import EvalResult, check_tau
from usae_core.prefetch import prefetch
from usae_core.store import TORCH_DTYPES, ActivationStore


@dataclass
class MiningConfig:
    top_n: int = 16
    """Images kept per concept per model."""
    tau: float = 0.1
    """A concept fires on a token when its code exceeds tau (as in usae_core.metrics)."""
    batch_images: int = 64
    """Images encoded at once."""
    hist_bins: int = 48
    """Geometric histogram bins between hist_min and hist_max (values outside are clamped)."""
    hist_min: float = 1e-3
    hist_max: float = 1e3
    neighbours: int = 8
    """Nearest concepts kept per concept per model."""
    defect_cell_fraction: float = 0.1
    """A token cell counts as showing a defect when the defect covers at least this fraction of
    it. Binary cells keep thin defects (cracks, scratches) from capping the IoU far below 1."""
    autocast: bool | None = None
    """bf16 encoder matmuls; None means on for CUDA, off for CPU (see `compute_dtype`)."""

    def __post_init__(self) -> None:
        if self.top_n < 1:
            raise UsaeError(f"--top-n must be >= 1, got {self.top_n}")
        if self.batch_images < 1:
            raise UsaeError(f"batch_images must be >= 1, got {self.batch_images}")
        check_tau(self.tau)
        if not 0 < self.defect_cell_fraction <= 1:
            raise UsaeError(f"defect_cell_fraction must be in (0, 1], got {self.defect_cell_fraction}")
        if self.hist_bins < 1 or not 0 < self.hist_min < self.hist_max:
            raise UsaeError("histogram needs hist_bins >= 1 and 0 < hist_min < hist_max")
        if self.neighbours < 0:
            raise UsaeError(f"neighbours must be >= 0, got {self.neighbours}")

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The encoder's input dtype on `device`: bfloat16 under autocast, else float32."""
        autocast = self.autocast if self.autocast is not None else device.type == "cuda"
        return torch.bfloat16 if autocast else torch.float32

    def hist_edges(self) -> np.ndarray:
        return np.geomspace(self.hist_min, self.hist_max, self.hist_bins + 1)


class NoDefectMasks(UsaeError):
    """A store whose images are no demo set (or are not there): it has no defect masks."""


@dataclass
class DefectMasks:
    """Where defects are, per image of the store: `load(image_index)` gives
    `{defect_type: bool [H, W]}` at the image's own resolution, or None for an image without
    annotated defects (counted as defect-free)."""

    defect_types: list[str]
    load: Callable[[int], dict[str, np.ndarray] | None]

    @classmethod
    def from_store(cls, store) -> "DefectMasks":
        """The ground-truth masks of a store extracted from a demo set (`build_demo_set`), read
        image by image from the folder it was extracted from (`store.meta["image_root"]`).
        UsaeError when that folder is not a demo set (or is gone): other images have no masks."""
        root = store.meta.get("image_root")
        types = defect_types(root) if root and Path(root).is_dir() else []
        if not types:
            where = (f"its images ({root}) are not a demo set (build_demo_set)" if root and Path(root).is_dir() else
                     f"the folder it was extracted from ({root}) is not there" if root else
                     "its activations were imported")
            raise NoDefectMasks(f"the store {store.root} has no defect masks: {where}; mine it without masks")
        image_ids = store.image_ids
        return cls(types, lambda index: load_masks(root, image_ids[index], types=types))


@dataclass
class MiningResult:
    stats: EvalResult
    """R^2, L0, firing counts, co-fire, entropy, energy and dead flags."""
    n_images: int
    top_values: np.ndarray
    """[models, concepts, top_n] float32, descending; 0 past the images where it is active."""
    top_images: np.ndarray
    """[models, concepts, top_n] int64 store image index; -1 where there is no image."""
    top_tokens: np.ndarray
    """[models, concepts, top_n] int64 token (row-major grid cell) of the maximum."""
    max_activation: np.ndarray
    """[models, concepts] float32 largest code over all tokens."""
    hist_edges: np.ndarray
    """[bins + 1] float64 geometric edges."""
    hist_counts: np.ndarray
    """[models, concepts, bins] int64 counts of non-zero codes."""
    neighbours: np.ndarray
    """[models, concepts, K] int64 nearest other concepts by decoder cosine."""
    neighbour_cosine: np.ndarray
    """[models, concepts, K] float32."""
    defect_types: list[str]
    defect_iou: np.ndarray | None
    """[models, concepts, defect types] float64 dataset IoU, or None without masks."""

    @property
    def models(self) -> list[str]:
        return self.stats.models

    @property
    def n_concepts(self) -> int:
        return self.top_values.shape[1]

    @property
    def nonzero_counts(self) -> np.ndarray:
        """[models, concepts] tokens with a non-zero code (the histogram totals)."""
        return self.hist_counts.sum(-1)

    def defect_concepts(self, defect: str, top: int = 5) -> dict[str, list[tuple[int, float]]]:
        """The concepts whose firing overlaps `defect`'s masks most, per model: `{model: [(concept,
        IoU), ...]}`, best first (ties to the lower concept), `top` per model. A concept that
        comes first in every model is one detector of that defect shared by all of them."""
        if self.defect_iou is None:
            raise UsaeError("this mine had no defect masks: pass masks=DefectMasks.from_store(store) to mine_store")
        if defect not in self.defect_types:
            raise UsaeError(f"no defect type {defect!r} in this mine (it has {', '.join(self.defect_types)})")
        if top < 1:
            raise UsaeError(f"top must be >= 1, got {top}")
        iou = self.defect_iou[:, :, self.defect_types.index(defect)]
        order = np.argsort(-iou, axis=1, kind="stable")[:, :top]
        return {model: [(int(c), float(iou[m, c])) for c in order[m]] for m, model in enumerate(self.models)}


# --------------------------------------------------------------------------- reading the store


def batch_bounds(spans, batch_images: int) -> Iterator[tuple[int, int, int]]:
    """`(span index, first image, stop)` of each batch in store order: batches never cross a
    shard, and the first ones are smaller (1/8, 1/4, 1/2 of `batch_images`) so the device
    starts computing after a fraction of a full batch's read instead of waiting for all of it."""
    size = max(1, batch_images // 8)
    for span_i, span in enumerate(spans):
        start = span.start
        while start < span.stop:
            stop = min(start + size, span.stop)
            yield span_i, start, stop
            start, size = stop, min(batch_images, size * 2)


def iter_image_batches(store, batch_images: int, device: torch.device,
                       read_threads: int | None = None) -> Iterator[tuple[int, int, dict]]:
    """`(first_image, n_images, {model: [n_images * tokens, dim]})` in store order (see
    `batch_bounds`), in the store's dtype (bfloat16 rows as torch.bfloat16).

    A side thread copies the next batches out of the memory-mapped shards while the current
    one computes. On CUDA the upload runs on a copy stream, one batch ahead."""
    t = store.tokens_per_image
    cuda = device.type == "cuda"
    dtype = TORCH_DTYPES[store.dtype]
    threads = read_threads or (min(8, os.cpu_count() or 1) if cuda else 1)

    def read(pool: ThreadPoolExecutor) -> Iterator[tuple[int, int, dict]]:
        for span_i, start, stop in batch_bounds(store.spans, batch_images):
            span = store.spans[span_i]
            lo, hi = (start - span.start) * t, (stop - span.start) * t
            parts = {m: [store.shard(m, span.index)[lo:hi]] for m in store.model_names}
            yield start, stop - start, read_rows(pool, parts, dtype, cuda)

    uploads = SideStreamUpload(device)
    with ThreadPoolExecutor(threads) as pool:
        batches = prefetch(read(pool), depth=3)
        try:
            started = ((first, n, uploads.start(host)) for first, n, host in batches)
            pending = next(started, None)
            while pending is not None:
                first, n, upload = pending
                raw = uploads.ready(upload)
                pending = next(started, None)  # the next upload overlaps this batch's compute
                yield first, n, raw
        finally:  # stop the reader before its pool shuts down under it
            batches.close()


def load_image_tokens(store, model: str, image_indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """float32 `[len(image_indices) * tokens, dim]` of the given images, in that order."""
    return torch.from_numpy(np.concatenate([store.image_tokens(model, int(i)) for i in image_indices])).to(device)


def encode(model, x_std: torch.Tensor, name: str, cfg: MiningConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes `(values float32, indices)` `[tokens, k]`, with bf16 matmuls when configured."""
    autocast = cfg.compute_dtype(x_std.device) == torch.bfloat16
    with torch.autocast(x_std.device.type, dtype=torch.bfloat16, enabled=autocast):
        values, indices = model.encode(x_std, name)
    return values.float(), indices


# --------------------------------------------------------------------------- geometry


def mask_grid_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each token cell covered by `mask` (bool [H, W]), as float32 `[gh * gw]`.

    The mask is centre-cropped to its shorter side first, like the image's square view that
    the token grid covers."""
    h, w = mask.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(mask[top : top + side, left : left + side], dtype=np.float32)
    cells = Image.fromarray(square, mode="F").resize((grid[1], grid[0]), Image.Resampling.BOX)
    return np.asarray(cells, dtype=np.float32).reshape(-1)


# --------------------------------------------------------------------------- streaming top-k


class StreamingTopImages:
    """Top-N images per concept by a per-image score, merged batch by batch in O(concepts x N)."""

    def __init__(self, n_concepts: int, top_n: int, device: torch.device):
        self.values = torch.zeros(n_concepts, top_n, device=device)
        self.images = torch.full((n_concepts, top_n), -1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(n_concepts, top_n, dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, tokens: torch.Tensor, first_image: int) -> None:
        """`scores` / `tokens` `[batch_images, concepts]`: each image's best value and where."""
        n = scores.shape[0]
        ids = torch.arange(first_image, first_image + n, device=scores.device).expand(scores.shape[1], n)
        values = torch.cat([self.values, scores.T], dim=1)
        images = torch.cat([self.images, ids], dim=1)
        toks = torch.cat([self.tokens, tokens.T], dim=1)
        # Ties (mostly zeros) keep the earlier image: candidates are ordered old-first, and a
        # stable descending sort preserves that order.
        order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, : self.values.shape[1]]
        self.values = values.gather(1, order)
        self.images = torch.where(self.values > 0, images.gather(1, order), -1)
        self.tokens = toks.gather(1, order)


# --------------------------------------------------------------------------- the pass


class _Accumulators:
    def __init__(self, model, store, cfg: MiningConfig, device: torch.device, n_defects: int):
        m, c = len(model.names), model.cfg.n_concepts
        f64 = dict(dtype=torch.float64, device=device)
        self.top = [StreamingTopImages(c, cfg.top_n, device) for _ in range(m)]
        # Firing, sums, maxima, co-firing, and per histogram bin the counts and defect overlap,
        # so the IoU can be read at every threshold after the pass.
        edges = torch.as_tensor(np.log(cfg.hist_edges()[1:-1]), dtype=torch.float32, device=device)
        self.codes = CodeStats(m, c, edges, cfg.tau, n_defects)
        # R^2 parts: per-dimension sums of each target (shared by all sources) and residuals.
        self.sum_x = [torch.zeros(store.dims[t], **f64) for t in model.names]
        self.sum_x2 = [torch.zeros(store.dims[t], **f64) for t in model.names]
        self.resid = torch.zeros(m, m, **f64)
        self.mask_total = torch.zeros(n_defects, **f64)


def best_threshold_iou(hist: torch.Tensor, intersection: torch.Tensor, mask_total: torch.Tensor) -> torch.Tensor:
    """IoU of "code >= threshold" with each defect, at the best threshold among the histogram
    bin edges: `[models, concepts, defect types]`.

    `hist[m, c, b]` counts tokens whose code falls in bin b, `intersection[m, c, b, d]` those of
    them that show defect d, so suffix sums over bins give the firing region and its overlap for
    the threshold at bin b's lower edge. Taking the best threshold keeps a concept's weak
    background activity from hiding where it fires strongly."""
    fired = hist.flip(-1).cumsum(-1).flip(-1)[..., None]
    inter = intersection.flip(-2).cumsum(-2).flip(-2)
    union = fired + mask_total - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), 0.0).amax(dim=-2)


def _defect_coverage(masks: DefectMasks, first: int, n: int, grid: tuple[int, int],
                     device: torch.device, min_fraction: float) -> torch.Tensor:
    """`[n * tokens, defect types]` 1.0 where a cell shows that defect type (covered by at
    least `min_fraction`), for a batch of images."""
    cov = np.zeros((n, grid[0] * grid[1], len(masks.defect_types)), np.float32)
    for i in range(n):
        found = masks.load(first + i) or {}
        for j, kind in enumerate(masks.defect_types):
            if kind in found:
                cov[i, :, j] = mask_grid_coverage(np.asarray(found[kind], dtype=bool), grid) >= min_fraction
    return torch.from_numpy(cov.reshape(n * grid[0] * grid[1], -1)).to(device)


def mine_store(model, store, cfg: MiningConfig | None = None, *, device: str | torch.device = "auto",
               masks: DefectMasks | None = None, progress: bool = True) -> MiningResult:
    """Stream the store (an ActivationStore, or the path of one) once and gather everything per
    concept (see the module docstring). The model computes on `device` ("auto": a GPU when
    there is one) and is handed back where and as it was."""
    cfg = cfg or MiningConfig()
    store = ActivationStore.of(store)
    device = resolve_device(device)
    model.check_store(store)
    with borrowed(model, device):
        return _mine(model, store, cfg, device, masks, progress)


@torch.no_grad()
def _mine(model, store: ActivationStore, cfg: MiningConfig, device: torch.device, masks: DefectMasks | None,
          progress: bool) -> MiningResult:
    names = list(model.names)
    t = store.tokens_per_image
    acc = _Accumulators(model, store, cfg, device, len(masks.defect_types) if masks else 0)
    # The R^2 decodes gather k dictionary rows per token and source; on CUDA they read bf16 rows
    # (half the bytes; the rounding moves R^2 by ~1e-5) and accumulate in float32.
    tables = [d.detach().to(torch.bfloat16 if device.type == "cuda" else torch.float32) for d in model.dictionaries]
    n_tokens = 0
    bar = tqdm(total=store.n_images, desc="mine", unit="img", disable=not progress)
    compute = cfg.compute_dtype(device)
    for first, n_img, batch in iter_image_batches(store, cfg.batch_images, device):
        # Encoder inputs, reconstruction targets (the decoder bias comes off once, not once per
        # source model) and the R^2 denominator's sums, in one pass over the stored rows.
        rows = {m: standardize_rows(batch[m], *model.standardization(m), model.decoder_biases[j], compute)
                for j, m in enumerate(names)}
        cover = _defect_coverage(masks, first, n_img, store.grid, device, cfg.defect_cell_fraction) if masks else None
        codes = []
        # Nothing below reads a result back to the host, so the loop never waits for the device.
        for i, m in enumerate(names):
            values, indices = encode(model, rows[m].x, m, cfg)
            best, where = acc.codes.add(i, values, indices, t, cover)
            acc.top[i].update(best, where, first)
            for j, target in enumerate(names):
                err = residual_sq(indices, values, tables[j], rows[target].target)
                acc.resid[i, j] += err.sum(dtype=torch.float64)
            codes.append((values, indices))
        acc.codes.add_cofire(codes)
        for j, target in enumerate(names):
            acc.sum_x[j] += rows[target].col_sum.double()
            acc.sum_x2[j] += rows[target].col_sq.double()
        if cover is not None:
            acc.mask_total += cover.sum(0).double()
        n_tokens += n_img * t
        bar.update(n_img)
    bar.close()
    return _finish(model, store, cfg, acc, n_tokens, masks)


def _finish(model, store, cfg: MiningConfig, acc: _Accumulators, n_tokens: int,
            masks: DefectMasks | None) -> MiningResult:
    names = list(model.names)
    codes = acc.codes
    shape = (len(names), model.cfg.n_concepts, cfg.hist_bins)
    on_device = dict(
        r2=_r2_matrix(acc, n_tokens),
        fire=codes.fire, cofire=codes.cofire, code_sums=codes.code_sums, l0=codes.active / max(n_tokens, 1),
        top_values=torch.stack([tk.values for tk in acc.top]),
        top_images=torch.stack([tk.images for tk in acc.top]),
        top_tokens=torch.stack([tk.tokens for tk in acc.top]),
        max_act=codes.max_act, hist=codes.hist.view(shape),
    )
    if masks:
        on_device["iou"] = best_threshold_iou(codes.hist.view(shape), codes.intersection.view(*shape, -1),
                                              acc.mask_total)
    host = to_host(on_device)
    stats = EvalResult(
        models=names,
        n_tokens=n_tokens,
        tau=cfg.tau,
        r2=host["r2"],
        fire_counts=host["fire"].astype(np.int64),
        cofire_counts=host["cofire"].astype(np.int64),
        code_sums=host["code_sums"],
        l0=host["l0"],
    )
    neighbours, cosine = nearest_concepts(model, cfg.neighbours)
    return MiningResult(
        stats=stats,
        n_images=store.n_images,
        top_values=host["top_values"],
        top_images=host["top_images"],
        top_tokens=host["top_tokens"],
        max_activation=host["max_act"],
        hist_edges=cfg.hist_edges(),
        hist_counts=host["hist"].astype(np.int64),
        neighbours=neighbours,
        neighbour_cosine=cosine,
        defect_types=list(masks.defect_types) if masks else [],
        defect_iou=host.get("iou"),
    )


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every tensor as a NumPy array, with one wait for the device instead of one per tensor:
    CUDA tensors are copied into pinned memory asynchronously, then the stream is synchronised."""
    cuda = [t.device for t in tensors.values() if t.device.type == "cuda"]
    if not cuda:
        return {key: t.numpy() for key, t in tensors.items()}
    host = {}
    for key, t in tensors.items():
        host[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host[key].copy_(t, non_blocking=True)
    torch.cuda.current_stream(cuda[0]).synchronize()
    return {key: t.numpy() for key, t in host.items()}


def _r2_matrix(acc: _Accumulators, n_tokens: int) -> torch.Tensor:
    """R^2 [source, target] with a per-dimension mean (usae_core.metrics.r2_score, streamed)."""
    total = torch.stack([(s2 - s * s / max(n_tokens, 1)).sum() for s, s2 in zip(acc.sum_x, acc.sum_x2)])
    r2 = 1.0 - acc.resid / total[None, :]
    return torch.where(total[None, :] > 0, r2, torch.nan)


@torch.no_grad()
def nearest_concepts(model, k: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per model, the k other concepts whose decoder rows have the highest cosine similarity:
    indices `[models, concepts, k]` and cosines, computed in row chunks."""
    c = model.cfg.n_concepts
    k = min(k, c - 1)
    idx, cos = [], []
    for name in model.names:
        d = model.dictionary(name).float()
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        for lo in range(0, c, chunk):
            sim = d[lo : lo + chunk] @ d.T
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + lo] = -math.inf  # never your own neighbour
            top = torch.topk(sim, k, dim=1)
            idx.append(top.indices)
            cos.append(top.values)
    m = len(model.names)
    host = to_host({"idx": torch.cat(idx).view(m, c, k), "cos": torch.cat(cos).view(m, c, k)})
    return host["idx"], host["cos"]


# --------------------------------------------------------------------------- heatmaps


def top_image_heatmaps(model, store, result: MiningResult, concepts: Sequence[int], cfg: MiningConfig | None = None,
                       *, device: str | torch.device = "auto") -> dict[tuple[int, int, int], np.ndarray]:
    """Per-token heatmaps of the top images of `concepts`: `{(model_index, concept, rank): [gh, gw]}`.

    Only the images in those top lists are re-encoded, a batch at a time, so memory follows
    len(concepts) x top_n, not the store (an ActivationStore, or the path of one). The model
    is handed back where and as it was (called in a loop, move it to `device` first)."""
    cfg = cfg or MiningConfig()
    store = ActivationStore.of(store)
    device = resolve_device(device)
    with borrowed(model, device):
        return _heatmaps(model, store, result, concepts, cfg, device)


@torch.no_grad()
def _heatmaps(model, store: ActivationStore, result: MiningResult, concepts: Sequence[int], cfg: MiningConfig,
              device: torch.device) -> dict[tuple[int, int, int], np.ndarray]:
    t, grid = store.tokens_per_image, store.grid
    heatmaps: dict[tuple[int, int, int], np.ndarray] = {}
    for i, name in enumerate(model.names):
        wanted = [(int(cpt), r, int(result.top_images[i, cpt, r]))
                  for cpt in concepts for r in range(result.top_images.shape[2]) if result.top_images[i, cpt, r] >= 0]
        unique = sorted({img for _, _, img in wanted})
        for lo in range(0, len(unique), cfg.batch_images):
            chunk = unique[lo : lo + cfg.batch_images]
            position = {img: p for p, img in enumerate(chunk)}
            x = model.standardize(load_image_tokens(store, name, chunk, device), name)
            values, indices = encode(model, x, name, cfg)
            values = values.view(len(chunk), t, -1)
            indices = indices.view(len(chunk), t, -1)
            pairs = [(cpt, r, img) for cpt, r, img in wanted if img in position]
            rows = torch.tensor([position[img] for _, _, img in pairs], device=device)
            cpts = torch.tensor([cpt for cpt, _, _ in pairs], device=device)
            heat = ((indices[rows] == cpts[:, None, None]) * values[rows]).sum(-1)
            for (cpt, r, _), h in zip(pairs, heat.cpu().numpy()):
                heatmaps[(i, cpt, r)] = h.reshape(grid)
    return heatmaps
