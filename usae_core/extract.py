"""Activation extraction: image files -> backbones -> one token-aligned ActivationStore.

DataLoader workers decode each image once and cut its square view(s) as uint8; the device
normalises them per model, runs the backbones (bf16 autocast on CUDA), and resamples every
model's token grid to one common grid (antialiased bilinear, as the paper does for DINOv2's
16 x 16 -> 14 x 14). Results are copied back asynchronously and written shard by shard on a
side thread, so decoding, compute and writing overlap. Finished shards survive an interruption
and a rerun skips them. Under torchrun, rank r extracts shards r, r + world_size, ... and rank 0
finalises the store after a barrier.

There is no up-front test decode of the folder: a file that fails to decode in a worker gets
zero rows and is named in its shard's done marker, and finalising the store drops those images
(`usae_core.store_compact`: only the shards that held them are rewritten; under torchrun every
rank rewrites its share of those first), so every image is decoded once.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from usae_core.atomic import (
    finish_replacement,
    remove_stale_temp_files,
    replacement_folders,
    start_replacement,
    swap_in_replacement,
)
from usae_core.backbones import Backbone, create_backbone
from usae_core.backbones.base import pil_to_uint8
from usae_core.devices import resolve_device
from usae_core.distributed import barrier, rank_and_world_size
from usae_core.errors import UsaeError
from usae_core.images import FolderSource, defect_types, failure_reason, load_image, square_view, warn_skipped
from usae_core.locks import exclusive_lock
from usae_core.npy_direct import BLOCK
from usae_core.store import (
    TORCH_DTYPES,
    ActivationStore,
    ShardSpan,
    StoreWriter,
    check_folder_path,
    check_replaceable_store,
    check_storage_dtype,
    is_unstarted_store,
    non_finite_error,
)
from usae_core.store_compact import NoImageReadable, plan_compaction, stage_shards, start_staging
from usae_core.store_layout import done_marker, span_of_image

log = logging.getLogger(__name__)

View = tuple[int, str]
"""(side, interpolation) of a square view some backbone reads."""


@dataclass
class ExtractTimings:
    """Where an extraction's time went, in seconds; filled in by `extract_store(timings=...)`.

    The loop is fast when `backbones` is close to `loop`: then the device never waits for
    images (more `--workers` help when `waiting_for_images` is large) or for the writers."""

    images: int = 0
    loop: float = 0.0
    """From starting the image loader to the last shard written."""
    first_batch: float = 0.0
    """Until the first batch of decoded images arrived (worker start-up, one batch decoded). On a
    GPU the backbones' warm-up on zeros is queued meanwhile and counts here when it takes longer:
    with --compile, a process's first extraction compiles the backbones in it (seconds)."""
    waiting_for_images: float = 0.0
    """After the first batch: the loop blocked on the image loader."""
    backbones: float = 0.0
    """Device time of the forward passes and grid resampling (CUDA events on a GPU)."""
    backbones_first_batch: float = 0.0
    """The first batch's part of `backbones` on a GPU (large when its call still compiled)."""
    waiting_for_writes: float = 0.0
    """The loop blocked on a free shard buffer, and on the last writes at the end."""
    setup: float = 0.0
    """Before the loop: listing the folder, opening the store, moving the models, the loader."""
    stopping_loader: float = 0.0
    """After the loop: shutting the image loader's worker processes down."""
    finalizing: float = 0.0
    """After the loop: finalising the store (dropping failed images) and reopening it."""

    def summary(self) -> str:
        rate = self.images / self.loop if self.loop > 0 else 0.0
        return (f"{self.images:,} images in {self.loop:.1f} s ({rate:,.0f} images/s): backbones {self.backbones:.1f} s, "
                f"first batch {self.first_batch:.1f} s, waiting for images {self.waiting_for_images:.1f} s, "
                f"waiting for writes {self.waiting_for_writes:.1f} s; around the loop: setup {self.setup:.1f} s, "
                f"stopping the loader {self.stopping_loader:.1f} s, finalising {self.finalizing:.1f} s")


FAST_PINNING = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
"""PyTorch allocator options: pin host memory by registering it from 8 threads."""


def use_fast_pinning(environ: dict | None = None) -> None:
    """Have CUDA pin host memory (the shard buffers, the loader's batches) with `FAST_PINNING`,
    unless the allocator settings already say how to pin. Pinning the usual way cost an H200
    extraction ~0.45 s of its 6 s (docs/benchmarks.md). Read when CUDA starts, so the `usae`
    command calls this first thing. The options join whichever of PYTORCH_CUDA_ALLOC_CONF and
    the newer PYTORCH_ALLOC_CONF is set (torch reads only the first when both are)."""
    environ = os.environ if environ is None else environ
    names = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    if any("pinned_" in environ.get(n, "") for n in names):
        return
    name = next((n for n in names if environ.get(n)), names[0])
    conf = environ.get(name, "")
    environ[name] = f"{conf},{FAST_PINNING}" if conf else FAST_PINNING


def resample_grid(tokens: torch.Tensor, native: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """`[B, h*w, D]` tokens on `native` -> `[B, H*W, D]` on `grid` (antialiased bilinear, in float32).

    The resampling is one fixed linear map of the token axis, applied as a matrix product: no
    transposes of the `[B, D, h, w]` layout that `F.interpolate` needs, and the device runs it
    as one GEMM."""
    if tuple(native) == tuple(grid):
        return tokens
    t, (h, w) = tokens.shape[1], native
    if t != h * w:
        raise UsaeError(f"{t} tokens do not form a {h}x{w} grid")
    dtype = torch.promote_types(tokens.dtype, torch.float32)
    return _resampled(tokens, resample_matrix(tuple(native), tuple(grid), tokens.device, dtype))


def _resampled(tokens: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    with torch.autocast(tokens.device.type, enabled=False):  # autocast would run the product in bf16
        return torch.matmul(matrix, tokens.to(matrix.dtype))


@functools.lru_cache(maxsize=64)
def resample_matrix(native: tuple[int, int], grid: tuple[int, int], device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """The `[H*W, h*w]` matrix of antialiased bilinear resampling from `native` to `grid`
    (`F.interpolate`'s, align_corners=False), for row-major token order. Antialiased bilinear
    resizing is separable, so the matrix is the Kronecker product of one matrix per axis."""
    def axis(n_in: int, n_out: int) -> torch.Tensor:
        # n_in one-hot channels, 2 pixels wide: torch's CPU antialiased kernel (2.14) gets maps
        # 1 pixel wide wrong when their strides also read as channels-last.
        basis = torch.eye(n_in, dtype=torch.float64)[None, :, :, None].expand(1, n_in, n_in, 2).contiguous()
        out = F.interpolate(basis, size=(n_out, 2), mode="bilinear", align_corners=False, antialias=True)
        return out[0, :, :, 0].T.contiguous()  # [n_out, n_in]
    # A cached inference tensor could not be saved for a later backward pass (CAM), so the
    # matrix is an ordinary tensor even when first asked for under inference mode.
    with torch.inference_mode(False):
        return torch.kron(axis(native[0], grid[0]), axis(native[1], grid[1])).to(device, dtype)


class NormalizedBackbone(nn.Module):
    """uint8 square views -> normalise -> backbone tokens: the part of extraction's step that
    `torch.compile` makes one graph (the normalisation fuses into the first layer)."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.backbone.normalize(views))


class GridRows(nn.Module):
    """One backbone's step of extraction: uint8 square views `[B, 3, S, S]` -> (the store's rows
    `[B, H*W, D]` on `grid` in `storage` dtype, one NaN/Inf flag per image `[B]`).

    With `compile`, only normalisation and backbone are compiled; the resampling product, the
    cast and the flags run eagerly after it. Compiling them into the same graph made the H200's
    extraction 22% slower (3,090-3,224 against 3,984-4,036 images/s, docs/benchmarks.md)."""

    def __init__(self, backbone: Backbone, grid: tuple[int, int], storage: torch.dtype, compile: bool | str = False):
        super().__init__()
        self.tokens = normalized_tokens(backbone, compile)
        self.storage = storage
        matrix = None
        if tuple(backbone.native_grid) != tuple(grid):
            matrix = resample_matrix(tuple(backbone.native_grid), tuple(grid), torch.device("cpu"), torch.float32)
        self.register_buffer("matrix", matrix, persistent=False)  # moves with .to(device)

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens(views)
        if self.matrix is not None:
            tokens = _resampled(tokens, self.matrix)
        rows = tokens.to(self.storage)
        return rows, ~torch.isfinite(rows).flatten(1).all(1)


class _SquareViews(Dataset):
    """Store image `i` -> (i, uint8 square views [3, S, S], one per distinct view, failure).

    `failure` is "" when the image decoded, else why not ("ExceptionType: message"); the views
    are then zeros, so the batch keeps its shape and the main loop zeroes that image's rows."""

    def __init__(self, source: FolderSource, image_ids: Sequence[str], indices: Sequence[int],
                 views: Sequence[View]):
        self.source = source
        self.image_ids = image_ids
        self.indices = list(indices)
        self.views = list(views)
        self.draft = max(side for side, _ in self.views)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, list[torch.Tensor], str]:
        index = self.indices[i]
        try:
            img = load_image(self.source.path(self.image_ids[index]), max_pixels=self.source.max_pixels,
                             min_size=self.draft)
            return index, [pil_to_uint8(square_view(img, side, interp)) for side, interp in self.views], ""
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "leave this image out"
            return index, [torch.zeros(3, side, side, dtype=torch.uint8) for side, _ in self.views], \
                failure_reason(exc)


class ExtractInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `extract_store`; the message says how far it got and what a rerun does."""


def _check_model_options(backbones: Sequence[str | Backbone], weights: Mapping[str, str],
                         layers: Mapping[str, str]) -> None:
    """--weights and --layer name models of --models: a typo would silently use the packaged
    weights or the default layer instead."""
    names = [b.name if isinstance(b, Backbone) else b for b in backbones]
    for option, given in (("--weights", weights), ("--layer", layers)):
        unknown = [n for n in given if n not in names]
        if unknown:
            raise UsaeError(f"{option} names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} "
                            f"not one of the models: {', '.join(names)}")
    for name, path in weights.items():
        _check_weights_file(name, Path(path))


def _check_weights_file(name: str, path: Path) -> None:
    """A --weights file that is not a PyTorch checkpoint would fail in `torch.load` with advice
    about `weights_only` that does not apply; say what is wrong instead. Directories (Hugging
    Face checkpoints) and .safetensors files are left to the backbone's loader."""
    if not path.exists():
        raise UsaeError(f"--weights {name}={path}: there is no such file or folder")
    if not path.is_file() or path.suffix == ".safetensors":
        return
    import zipfile

    with open(path, "rb") as fh:
        head = fh.read(2)
    # torch.save writes a zip archive; files of torch < 1.6 are a pickle (protocol byte 0x80).
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise UsaeError(f"--weights {name}={path} is not a PyTorch checkpoint (.pth/.pt/.bin) or .safetensors "
                        f"file of that model")


def build_backbones(backbones: Sequence[str | Backbone], weights: Mapping[str, str] | None = None,
                    layers: Mapping[str, str] | None = None, random_init: bool = False) -> list[Backbone]:
    """The backbones an extraction would run, built (weights loaded) and checked to fit one
    store: callers that have slow work to do first (building the demo set) call this before it,
    so that a mistyped name or missing weights fail in seconds, and pass the result on."""
    weights, layers = weights or {}, layers or {}
    _check_model_options(backbones, weights, layers)
    built = []
    for b in backbones:
        if isinstance(b, Backbone):
            built.append(b)
        else:
            built.append(create_backbone(b, weights=weights.get(b), layer=layers.get(b), random_init=random_init))
    names = [b.store_name for b in built]
    if len(set(names)) != len(names):
        raise UsaeError(f"two backbones share a store name: {names}; choose different models or layers")
    for b in built:
        if b.keep_cls:
            raise UsaeError(f"backbone {b.name!r}: keep_cls tokens do not fit a store's token grid")
    return built


class _ShardAssembler:
    """Collects result rows into whole shards and writes each full shard on a side thread.

    On CUDA the rows go straight from the device into pinned shard buffers, copied on a side
    stream so that they overlap the next batch's compute (0.3 s of 5.5 s on the H200,
    docs/benchmarks.md); a full shard is handed to a writer with an event that
    the writer waits on, so the main thread never waits for a copy. The NaN/Inf check runs on
    the device too, into one flag per shard, instead of a host scan of every stored value.
    Shard buffers come from a fixed ring (writers + 2 sets), recycled once written: memory stays
    bounded and pinned memory is allocated a few times, not once per shard. (Filling the ring
    on a side thread as the loop starts delayed the first batch by ~1.1 s on the H200.)"""

    def __init__(self, writer: StoreWriter, spans: Sequence[ShardSpan], models: Sequence[Backbone], dtype: str,
                 write_threads: int, pin: bool):
        self.writer = writer
        self.spans = {s.index: s for s in spans}
        self.buffer_images = max(s.n_images for s in spans)
        """Images in a buffer set: the largest shard to fill."""
        self.dims = {m.store_name: m.dim for m in models}
        self.dtype = TORCH_DTYPES[dtype]
        self.pin = pin
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}
        self.non_finite: dict[int, dict[str, torch.Tensor]] = {}
        self.failed: dict[int, dict[str, str]] = {}
        self.filled: dict[int, int] = {}
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        self.allocated, self.capacity = 0, write_threads + 2
        self.pool = ThreadPoolExecutor(max_workers=write_threads)
        self.futures: list[Future] = []
        self.waited = 0.0
        """Seconds the caller spent blocked on a free buffer or on the last writes."""
        self.copy_stream = torch.cuda.Stream() if pin else None
        """Device-to-host copies run here, beside the next batch's compute (CUDA only)."""

    def add(self, image_indices: Sequence[int], outputs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
            failed: Sequence[tuple[int, str, str]] = ()) -> None:
        """Store the rows of one batch; its images are consecutive, in shard order. `outputs` maps
        a model to (rows, one NaN/Inf flag per image), as `GridRows` returns them. `failed`
        names its images that could not be read, as (image index, image id, reason)."""
        for index, image_id, reason in failed:
            self.failed.setdefault(self._shard_of(index), {})[image_id] = reason
        with self._copying(outputs):
            row = 0
            while row < len(image_indices):
                shard = self._shard_of(image_indices[row])
                span = self.spans[shard]
                start = image_indices[row] - span.start
                take = min(len(image_indices) - row, span.n_images - start)
                if shard not in self.buffers:
                    self.buffers[shard] = self._free_buffers()
                buffers = self.buffers[shard]
                flags = self.non_finite.setdefault(shard, {})
                for name, (out, non_finite) in outputs.items():
                    bad = non_finite[row : row + take].any()
                    flags[name] = bad if name not in flags else flags[name] | bad
                    buffers[name][start : start + take].copy_(out[row : row + take], non_blocking=self.pin)
                self.filled[shard] = self.filled.get(shard, 0) + take
                row += take
                if self.filled[shard] == span.n_images:
                    self._submit(shard)

    def _copying(self, outputs: Mapping[str, torch.Tensor]):
        """On CUDA: the copy stream, once the compute queued so far has run, with `outputs`
        kept from reuse until the copies are done; elsewhere nothing to switch."""
        if self.copy_stream is None:
            return nullcontext()
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        for out in outputs.values():
            for t in out:
                t.record_stream(self.copy_stream)
        return torch.cuda.stream(self.copy_stream)

    def _shard_of(self, image_index: int) -> int:
        return span_of_image(self.writer.spans, image_index).index

    def _free_buffers(self) -> dict[str, torch.Tensor]:
        """A whole-shard buffer set: a recycled one, a new one while the ring is not full, or
        the next one a writer returns (re-raising a writer's error instead of waiting forever)."""
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        if self.allocated < self.capacity:
            self.allocated += 1
            return self._new_buffers()
        started = time.perf_counter()
        try:
            while True:
                try:
                    return self.free.get(timeout=0.5)
                except queue.Empty:
                    for f in self.futures:
                        if f.done() and f.exception() is not None:
                            raise f.exception()
        finally:
            self.waited += time.perf_counter() - started

    def _new_buffers(self) -> dict[str, torch.Tensor]:
        """One allocation holding each model's rows at a page-aligned offset, so that writers
        can send the rows to the disk directly (`usae_core.npy_direct`)."""
        rows = self.buffer_images * self.writer.tokens_per_image
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        offsets, end = {}, 0
        for name, dim in self.dims.items():
            offsets[name] = end
            end += -(-rows * dim * itemsize // BLOCK) * BLOCK
        flat = torch.empty(end + BLOCK, dtype=torch.uint8, pin_memory=self.pin)
        flat = flat[-flat.data_ptr() % BLOCK :]  # no allocator promises page alignment
        return {name: flat[offsets[name] : offsets[name] + rows * dim * itemsize].view(self.dtype)
                .view(self.buffer_images, self.writer.tokens_per_image, dim) for name, dim in self.dims.items()}

    def _submit(self, shard: int) -> None:
        """Hand a full shard to a writer; runs inside `add`'s copy stream."""
        flags = {n: f.to("cpu", non_blocking=self.pin) for n, f in self.non_finite.pop(shard).items()}
        copied = None
        if self.pin:
            copied = torch.cuda.Event()
            copied.record()
        self.futures = [f for f in self.futures if not f.done() or f.exception() is not None]
        self.futures.append(self.pool.submit(self._write, shard, self.buffers.pop(shard), flags, copied,
                                             self.failed.pop(shard, {})))

    def _write(self, shard: int, buffers: dict[str, torch.Tensor], non_finite: dict[str, torch.Tensor],
               copied: torch.cuda.Event | None, failed: dict[str, str]) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            for name, flag in non_finite.items():
                if flag.item():
                    raise non_finite_error(shard, name, self.writer.dtype)
            n = self.spans[shard].n_images
            # numpy views for float16/float32 avoid a copy; numpy has no bfloat16, the store converts it.
            self.writer.write_shard(shard, {name: (t[:n] if t.dtype == torch.bfloat16 else t[:n].numpy())
                                            for name, t in buffers.items()}, finite_checked=True, failed=failed)
        finally:
            self.free.put(buffers)

    def close(self) -> None:
        started = time.perf_counter()
        try:
            for f in self.futures:
                f.result()
        finally:
            self.pool.shutdown(wait=True)
            self.waited += time.perf_counter() - started


MAX_GRID_FACTOR = 4
"""A --grid side may be at most this many times the finest model grid's side: beyond it the rows
are only interpolation, and the store and each batch's buffers outgrow memory (--grid 1000x1000
on 7x7 models was killed by the kernel, leaving an unfinished store)."""


def _check_grid(grid: tuple[int, int], models: Sequence[Backbone]) -> None:
    """A grid finer than every model's own holds no more information, only interpolated rows:
    allowed (a store to match another's grid), but said, since it multiplies the store's size;
    one more than MAX_GRID_FACTOR times finer on a side is refused before anything is written."""
    finest = max((tuple(m.native_grid) for m in models), key=lambda g: g[0] * g[1])
    limit = (MAX_GRID_FACTOR * finest[0], MAX_GRID_FACTOR * finest[1])
    if grid[0] > limit[0] or grid[1] > limit[1]:
        raise UsaeError(f"--grid (grid) {grid[0]}x{grid[1]} is more than {MAX_GRID_FACTOR}x finer than the finest "
                        f"model grid ({finest[0]}x{finest[1]}): at most {limit[0]}x{limit[1]}; its rows would only "
                        "be interpolated, and the store would not fit in memory")
    if grid[0] * grid[1] > finest[0] * finest[1]:
        smallest = min((tuple(m.native_grid) for m in models), key=lambda g: g[0] * g[1])
        log.warning("--grid %dx%d has more cells than any model's own grid (the finest is %dx%d): its rows are "
                    "interpolated, and the store is %.3gx the size of one on the default grid (%dx%d)",
                    *grid, *finest, grid[0] * grid[1] / (smallest[0] * smallest[1]), *smallest)


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
"""`torch.compile` modes for backbones. The CUDA-graph modes are left out: a graph replay
overwrites the outputs of the last one, which the shard copies may still be reading."""


def normalized_tokens(backbone: Backbone, compile: bool | str) -> nn.Module:
    """`NormalizedBackbone(backbone)`, compiled when asked. A backbone keeps its compiled wrapper
    (one per mode): a second extraction in the same process, or the benchmark's bare forward
    before it, then reuses the compiled graphs; a fresh wrapper made Dynamo trace it again in
    the first batch."""
    if not compile:
        return NormalizedBackbone(backbone)
    mode = compile if isinstance(compile, str) else None
    kept = backbone.__dict__.setdefault("_compiled_tokens", {})  # a plain dict: not a submodule
    if mode not in kept:
        kept[mode] = torch.compile(NormalizedBackbone(backbone), mode=mode)
    return kept[mode]


def extract_store(
    source: FolderSource | str | Path,
    backbones: Sequence[str | Backbone],
    out: str | Path,
    *,
    grid: tuple[int, int] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int | None = None,
    dtype: str = "float16",
    shard_images: int = 256,
    overwrite: bool = False,
    progress: bool = True,
    weights: Mapping[str, str] | None = None,
    layers: Mapping[str, str] | None = None,
    random_init: bool = False,
    compile: bool | str = False,
    timings: ExtractTimings | None = None,
) -> ActivationStore:
    """Extract every image of `source` through every backbone into the store at `out`.

    `backbones` are registry names or built Backbone objects; `weights`/`layers` map a name to a
    local weight path / layer. `grid` defaults to the smallest native grid. A rerun resumes an
    unfinished store with the same layout; `overwrite` starts again, building the new store
    beside an existing one, which is replaced only once the new one is complete. A folder path is only
    listed, not test-decoded: files that fail to decode during extraction are dropped from the
    store, listed in `meta["skipped_images"]` and named in one warning. `timings`, when given,
    is filled in with where this rank's extraction loop spent its time. `compile` is True or a
    `torch.compile` mode of COMPILE_MODES.
    """
    called = time.perf_counter()
    timings = timings if timings is not None else ExtractTimings()
    if batch_size < 1:
        raise UsaeError(f"--batch-size must be >= 1, got {batch_size}")
    if not backbones:
        raise UsaeError("give at least one backbone (--models)")
    check_storage_dtype(dtype)
    if isinstance(compile, str) and compile not in COMPILE_MODES:
        raise UsaeError(f"unknown compile mode {compile!r}; choose one of {', '.join(COMPILE_MODES)}")
    source = source if isinstance(source, FolderSource) else FolderSource(source, check=False)
    check_folder_path(Path(out))
    store_root = Path(out).resolve()
    if store_root.is_relative_to(source.root) or source.root.is_relative_to(store_root):
        raise UsaeError(f"the store {out} and the image folder {source.root} overlap; write the store elsewhere")
    models = build_backbones(backbones, weights, layers, random_init)
    grid = tuple(grid) if grid else min((m.native_grid for m in models), key=lambda g: g[0] * g[1])
    _check_grid(grid, models)
    rank, world_size = rank_and_world_size()
    meta = {
        "source": "extract",
        "image_root": str(source.root),
        "image_size": max(m.input_size for m in models),
        "demo": source.is_demo,
        "defect_types": defect_types(source.root),
        "skipped_images": source.skipped,
        "grid_resampling": "bilinear, antialiased",
    }
    layout = dict(models={m.store_name: m.dim for m in models}, grid=grid, image_ids=source.ids, dtype=dtype,
                  shard_images=shard_images, model_info={m.store_name: m.info() for m in models}, meta=meta)
    out = Path(out)
    with exclusive_lock(out, "usae extract", held=rank == 0):
        replacing = _replaces_a_store(out, overwrite, rank, world_size)
        # --overwrite builds the new store beside the old one, which stays whole until the swap.
        build = replacement_folders(out)[0] if replacing else out
        existed = build.exists()
        if rank == 0:
            if replacing:
                start_replacement(out)
            ActivationStore.create(build, **layout, resume=not replacing)
            # Temporary files of shard writes a killed run left (we hold the lock, and the other
            # ranks write nothing before the barrier).
            remove_stale_temp_files(build)
        barrier(world_size)
        writer = ActivationStore.create(build, **layout, resume=True)
        try:
            finishing = _fill(source, models, writer, rank, world_size, grid=grid, batch_size=batch_size,
                              device=device, num_workers=num_workers, progress=progress, compile=compile,
                              timings=timings, called=called)
        except NoImageReadable as exc:
            # Every rank fails here, after the last shard was written: nothing is still writing.
            # A store of nothing but failures is useless, and a rerun would only repeat them.
            if rank == 0:
                _discard_failed_build(writer, replacing=replacing, existed=existed, everything=True)
            raise UsaeError(f"{exc}; no store was written{'' if replacing else f' to {out}'}") from None
        except BaseException as exc:
            if world_size == 1:  # under torchrun other ranks may still be writing
                _discard_failed_build(writer, replacing=replacing, existed=existed)
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, ExtractInterrupted):
                raise ExtractInterrupted(_interrupted_message(writer, replacing, out)) from None
            raise
        if rank == 0 and replacing:
            swap_in_replacement(out)
        barrier(world_size)
        store = ActivationStore.open(out)
        timings.finalizing = time.perf_counter() - finishing
    return store


def _interrupted_message(writer: StoreWriter, replacing: bool, out: Path) -> str:
    """What Ctrl-C left: finished shards are kept for a rerun (a replacement is deleted)."""
    total = sum(s.n_images for s in writer.spans)
    if replacing:
        return f"interrupted; the store {out} is unchanged, and rerunning the same command starts its replacement again"
    done = sum(s.n_images for s in writer.spans if done_marker(writer.root, s.index).exists())
    return f"interrupted after {done:,} of {total:,} images; rerun the same command to continue"


def _discard_failed_build(writer: StoreWriter, *, replacing: bool, existed: bool, everything: bool = False) -> None:
    """What a failed extraction leaves: a replacement is deleted (the old store is untouched,
    and --overwrite starts again anyway), and so is a new store without one finished shard, or
    (`everything`) one whose every image failed. A store with finished shards stays, marked
    unfinished, for a rerun to resume."""
    try:
        if replacing:
            shutil.rmtree(writer.root, ignore_errors=True)
        elif everything:
            writer.discard(keep_folder=existed)
        else:
            writer.discard_if_unstarted(keep_folder=existed)
    except OSError as exc:  # the extraction's own error matters more
        log.warning("could not remove the unfinished store %s (%s)", writer.root, exc)


def _replaces_a_store(out: Path, overwrite: bool, rank: int, world_size: int) -> bool:
    """Whether this extraction replaces a store already at `out` (only ever a store), decided
    the same on every rank before rank 0 writes anything. A swap an earlier --overwrite left
    cut between its renames is finished first."""
    if rank == 0:
        finish_replacement(out)
    barrier(world_size)
    # What a run killed before writing the manifest left is no store to replace: `create` clears it.
    replacing = overwrite and out.is_dir() and any(out.iterdir()) and not is_unstarted_store(out)
    if replacing:
        check_replaceable_store(out)
    barrier(world_size)
    return replacing


def _fill(source: FolderSource, models: list[Backbone], writer: StoreWriter, rank: int, world_size: int, *,
          grid: tuple[int, int], batch_size: int, device: str, num_workers: int | None, progress: bool,
          compile: bool | str, timings: ExtractTimings, called: float) -> float:
    """Extract this rank's unfinished shards, then (rank 0) finalise the store; returns when
    finalising began (time.perf_counter)."""
    mine = [s for s in writer.spans if s.index % world_size == rank and not writer.is_done(s.index)]
    for span in mine:
        if not span.n_images:  # a shard a compaction emptied, its file lost since: nothing to extract
            writer.write_shard(span.index, {n: torch.zeros(0, writer.tokens_per_image, d)
                                            for n, d in writer.dims.items()})
    mine = [s for s in mine if s.n_images]
    # images of this rank's shards a run before this one finished: where a resumed bar starts
    already = sum(s.n_images for s in writer.spans if s.index % world_size == rank and writer.is_done(s.index))
    if mine:
        dev = resolve_device(device)
        # The copy stream, its events and the compute stream must all be the device's (--device cuda:1).
        with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
            _run(source, models, writer, mine, grid=grid, batch_size=batch_size, device=dev,
                 num_workers=num_workers, progress=progress and rank == 0, compile=compile, timings=timings,
                 called=called, already=already)
    barrier(world_size)
    finishing = time.perf_counter()
    if world_size > 1:
        _stage_compaction_on_every_rank(writer, rank, world_size)
    if rank == 0:
        store = writer.finalize()
        warn_skipped(source.root, {i: why for i, why in store.meta.get("skipped_images", {}).items()
                                   if i not in source.skipped})  # a checked source named its own
    return finishing


def _stage_compaction_on_every_rank(writer: StoreWriter, rank: int, world_size: int) -> None:
    """When some images failed, every rank writes its share of the compacted shards before
    rank 0 finalises: the rewrite is split over the ranks, and none waits at a barrier for all
    of it. Every rank reads the same done markers, so all take the same branch."""
    failed = writer.failures()
    if not failed:
        return
    plan = plan_compaction(writer.manifest, writer.image_ids, failed)
    if rank == 0:
        start_staging(writer.root, plan)
    barrier(world_size)
    stage_shards(writer.root, writer.manifest, plan, rank=rank, world_size=world_size)
    barrier(world_size)


def _run(source: FolderSource, models: list[Backbone], writer: StoreWriter, spans: list[ShardSpan], *,
         grid: tuple[int, int], batch_size: int, device: torch.device, num_workers: int | None, progress: bool,
         compile: bool | str, timings: ExtractTimings, called: float, already: int = 0) -> None:
    """Extract the images of `spans`; the progress bar counts `already` (images an earlier run
    finished) as done, so a resumed extraction shows how far the whole store is."""
    cuda = device.type == "cuda"
    views: list[View] = sorted({(m.input_size, m.interpolation) for m in models})
    view_of = {m.store_name: views.index((m.input_size, m.interpolation)) for m in models}
    indices = [i for s in spans for i in range(s.start, s.stop)]
    image_ids = writer.image_ids
    if num_workers is None:
        # On a GPU 8 workers decode ~6,000 images/s, enough for the backbones, and leave cores to
        # the main thread and the writers (16 were slower on the H200, docs/benchmarks.md); on a
        # small CPU the backbones need every core, and decoding in the main process costs less
        # than feeding a worker.
        cores = os.cpu_count() or 1
        num_workers = min(8, cores) if cuda else (0 if cores <= 4 else 2)
    # Workers decode quarter batches, joined on the device: the first batch then takes four
    # workers a quarter of the time, instead of one worker a whole batch (~0.5 s at 256 images).
    # Only exact quarters: joined batches stay whole, so compiled graphs see one shape unpadded.
    chunk = batch_size // 4 if num_workers > 1 and batch_size % 4 == 0 else batch_size
    loader = DataLoader(_SquareViews(source, image_ids, indices, views), batch_size=chunk,
                        num_workers=num_workers, pin_memory=cuda, prefetch_factor=4 if num_workers else None,
                        persistent_workers=False)
    storage = TORCH_DTYPES[writer.dtype]
    runners = {m.store_name: GridRows(m, grid, storage, compile).to(device).eval() for m in models}
    # Writers turn full shards into files; on a GPU several of them keep up with the backbones.
    assembler = _ShardAssembler(writer, spans, models, writer.dtype, write_threads=8 if cuda else 1, pin=cuda)
    bar = tqdm(total=already + len(indices), initial=already, desc="extract", unit="img", disable=not progress,
               smoothing=0.1)
    clock = _DeviceClock(device)
    started = time.perf_counter()
    timings.setup = started - called
    warm_up = _warm_up(runners, models, batch_size, device) if cuda else None
    batches = _joined_batches(loader, device, batch_size, warm_up)
    try:
        while True:
            waiting = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            if timings.images:
                timings.waiting_for_images += time.perf_counter() - waiting
            else:
                timings.first_batch = time.perf_counter() - started
            image_indices, on_device, failures = batch
            n = len(image_indices)
            failed = [(i, image_ids[i], why) for i, why in zip(image_indices, failures) if why]
            if compile and n < batch_size:  # keep one batch shape so compiled graphs are reused
                on_device = [torch.cat([v, v[-1:].expand(batch_size - n, *v.shape[1:])]) for v in on_device]
            outputs = {}
            with clock, torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                for m in models:
                    rows, non_finite = runners[m.store_name](on_device[view_of[m.store_name]])
                    outputs[m.store_name] = rows[:n], non_finite[:n]
                if failed:  # zero rows until finalize drops them, and their values do not count
                    bad = torch.tensor([bool(why) for why in failures], device=device)
                    outputs = {name: (rows.masked_fill(bad[:, None, None], 0), non_finite & ~bad)
                               for name, (rows, non_finite) in outputs.items()}
            assembler.add(image_indices, outputs, failed)
            timings.images += n
            bar.update(n)
    finally:
        bar.close()
        try:
            assembler.close()
        finally:
            loop_end = time.perf_counter()
            batches.close()  # the loader's workers stop now, on errors too, and the time is counted apart
    timings.loop = loop_end - started
    timings.stopping_loader = time.perf_counter() - loop_end
    timings.backbones = clock.seconds()
    timings.backbones_first_batch = clock.first_seconds()
    timings.waiting_for_writes = assembler.waited


def _warm_up(runners: dict[str, nn.Module], models: list[Backbone], batch_size: int, device: torch.device
             ) -> Callable[[], None]:
    """Queue every backbone once on a batch of zeros: the first call of each pays one-time costs
    (Dynamo's first guard checks, cuBLAS and cuDNN set-up, the allocator's first blocks) that
    would otherwise delay the first real batch; queued while the loader's workers decode it,
    the device pays them in time it would spend waiting."""
    def warm_up() -> None:
        # Made outside inference mode, as the loader's batches are: Dynamo guards on whether an
        # input is an inference tensor, and such zeros cost a full recompile (6.5 s on an H100).
        zeros = {size: torch.zeros(batch_size, 3, size, size, dtype=torch.uint8, device=device)
                 for size in {m.input_size for m in models}}
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for m in models:
                runners[m.store_name](zeros[m.input_size])
    return warm_up


def _joined_batches(loader: DataLoader, device: torch.device, batch_size: int,
                    warm_up: Callable[[], None] | None = None
                    ) -> Iterator[tuple[list[int], list[torch.Tensor], list[str]]]:
    """The loader's chunks moved to the device (asynchronously from pinned memory) and joined
    into batches of at most `batch_size` consecutive images: (image indices, views, failures).
    `warm_up` runs once the loader's workers have started, before the first chunk is awaited."""
    parts: list[tuple[list[int], list[torch.Tensor], list[str]]] = []
    count = 0
    chunks = iter(loader)
    try:
        if warm_up is not None:
            warm_up()
        for indices, views, failures in chunks:
            parts.append((indices.tolist(), [v.to(device, non_blocking=True) for v in views], list(failures)))
            count += len(indices)
            if count + loader.batch_size > batch_size:  # the next chunk would not fit
                yield _join(parts)
                parts, count = [], 0
        if parts:
            yield _join(parts)
    finally:
        del chunks  # the workers stop as soon as the consumer does


def _join(parts: list[tuple[list[int], list[torch.Tensor], list[str]]]) -> tuple[list[int], list[torch.Tensor], list[str]]:
    if len(parts) == 1:
        return parts[0]
    views = [torch.cat([p[1][v] for p in parts]) for v in range(len(parts[0][1]))]
    return [i for p in parts for i in p[0]], views, [f for p in parts for f in p[2]]


class _DeviceClock:
    """Summed time of the `with` blocks as the device ran them: CUDA events on a GPU (read once
    at the end, so timing adds no synchronisation), the wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.total = 0.0

    def __enter__(self) -> None:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self.started = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.total += time.perf_counter() - self.started

    def seconds(self) -> float:
        if self.cuda and self.events:
            self.events[-1][1].synchronize()
            return self.total + sum(a.elapsed_time(b) for a, b in self.events) / 1000
        return self.total

    def first_seconds(self) -> float:
        """The first `with` block's time on a GPU (0 elsewhere: the wall clock keeps only a sum)."""
        if self.cuda and self.events:
            self.events[0][1].synchronize()
            return self.events[0][0].elapsed_time(self.events[0][1]) / 1000
        return 0.0
