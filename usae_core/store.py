"""ActivationStore: token-aligned activations of several models on the same images.

Row r of every model is the same image and the same grid cell, so one row index addresses
"this patch of this image" in all models at once. Data lives in per-model shards of whole
images, memory-mapped on read, so stores larger than RAM stream in batches. The on-disk
format is documented in docs/formats.md.
"""

from __future__ import annotations

import json
import operator
import os
import re
import shutil
from functools import cached_property
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from usae_core.atomic import atomic_path, atomic_write_json, finish_replacement
from usae_core.errors import UsaeError
from usae_core.npy_direct import save_npy
from usae_core.store_compact import compact_failed_images, finish_compaction
from usae_core.store_layout import (
    ShardSpan,
    done_marker,
    manifest_spans,
    read_done_marker,
    shard_file,
    shard_shape,
    shard_sizes,
    span_of_image,
    write_done_marker,
)

FORMAT = "usae-activation-store"
VERSION = 1
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""The torch dtype of each storage dtype (writers fill buffers of it, readers view shards as it)."""
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_storage_dtype(dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise UsaeError(f"unknown store dtype {dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")


def _numpy_storage_dtype(dtype: str) -> np.dtype:
    # numpy has no bfloat16: bf16 is kept as its raw uint16 bit pattern.
    return np.dtype({"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[dtype])


def to_storage(x: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray:
    """Convert float activations to the on-disk representation of `dtype`."""
    if dtype == "bfloat16":
        t = torch.as_tensor(x).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16)
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    with np.errstate(over="ignore"):  # overflow becomes Inf, which write_shard reports
        return np.asarray(x, dtype=_numpy_storage_dtype(dtype))


def from_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """Convert on-disk values to a writable float32 array in memory."""
    if dtype == "bfloat16":
        return (np.asarray(a, dtype=np.uint32) << 16).view(np.float32)
    return np.array(a, dtype=np.float32, copy=True)


def _all_finite(stored: np.ndarray, dtype: str) -> bool:
    """NaN/Inf check on the stored representation, without converting a whole shard."""
    if dtype == "bfloat16":  # all exponent bits set means Inf or NaN
        return not ((stored & 0x7F80) == 0x7F80).any()
    return bool(np.isfinite(stored).all())


def non_finite_error(shard: int, model: str, dtype: str) -> UsaeError:
    return UsaeError(f"shard {shard}, model {model!r}: activations contain NaN or Inf in {dtype} "
                     "(for values beyond the float16 range, use dtype bfloat16 or float32)")


def check_model_name(name: str) -> None:
    if not _MODEL_NAME.match(name):
        raise UsaeError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (at most 100 characters)"
        )


class StoreWriter:
    """Fills a store shard by shard. Each shard is written atomically and marked done, so an
    interrupted writer resumes by skipping finished shards; several processes may fill
    disjoint shards of one store (distributed extraction).

    A writer may leave images out after all (an extractor's decode failed): it writes zero rows
    for them and names them in the shard's done marker; `finalize` then drops them from the
    store (`usae_core.store_compact`)."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.spans = manifest_spans(manifest)
        """Every shard, empty ones included (a compaction's shard whose images all failed)."""

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def tokens_per_image(self) -> int:
        return self.manifest["tokens_per_image"]

    @property
    def dims(self) -> dict[str, int]:
        return {m["name"]: m["dim"] for m in self.manifest["models"]}

    @property
    def image_ids(self) -> list[str]:
        return json.loads((self.root / "image_ids.json").read_text())

    def is_done(self, index: int) -> bool:
        """The shard's marker exists and every model's file holds the whole shard (shards are
        written without a disk flush, so a power loss can leave a marker before its data)."""
        if not done_marker(self.root, index).exists():
            return False
        rows = self.spans[index].n_images * self.tokens_per_image
        return all(shard_shape(shard_file(self.root, m, index)) == (rows, d) for m, d in self.dims.items())

    def pending(self) -> list[ShardSpan]:
        return [s for s in self.spans if not self.is_done(s.index)]

    def discard_if_unstarted(self, *, keep_folder: bool) -> None:
        """Delete this unfinished store when not one shard of it is done: nothing in it is worth
        resuming, and its manifest left behind would still look like a store. Everything in the
        folder is the store's (a store is only created in a new or empty folder); the folder
        itself stays when `keep_folder` (it was there before)."""
        if any(done_marker(self.root, s.index).exists() for s in self.spans):
            return
        self.discard(keep_folder=keep_folder)

    def discard(self, *, keep_folder: bool) -> None:
        """Delete this unfinished store, finished shards and all (see `discard_if_unstarted`)."""
        for child in self.root.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        if not keep_folder:
            self.root.rmdir()

    def write_shard(self, index: int, arrays: Mapping[str, np.ndarray | torch.Tensor], *,
                    finite_checked: bool = False, failed: Mapping[str, str] | None = None) -> None:
        """Write every model's activations for shard `index`: `[n_images, tokens, dim]` each.

        `finite_checked` skips the NaN/Inf scan for callers that checked the values in storage
        dtype already (the extractor does it on the GPU). `failed` names images of this shard
        that could not be read (image id -> reason): their rows hold zeros, the done marker
        records them, and `finalize` drops them."""
        span = self.spans[index]
        dims = self.dims
        if set(arrays) != set(dims):
            raise UsaeError(f"shard {index}: got models {sorted(arrays)}, store has {sorted(dims)}")
        converted = {}
        for name, arr in arrays.items():
            shape = tuple(arr.shape)
            want = (span.n_images, self.tokens_per_image, dims[name])
            if shape != want:
                raise UsaeError(f"shard {index}, model {name!r}: shape {shape}, expected {want}")
            flat = to_storage(arr, self.dtype).reshape(span.n_images * self.tokens_per_image, dims[name])
            if not finite_checked and not _all_finite(flat, self.dtype):
                raise non_finite_error(index, name, self.dtype)
            converted[name] = flat
        for name, flat in converted.items():
            target = shard_file(self.root, name, index)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target, durable=False) as tmp:
                save_npy(tmp, flat)
        write_done_marker(done_marker(self.root, index), failed)

    def failures(self) -> dict[str, str]:
        """Images that done shards could not read (image id -> reason), in image order."""
        out: dict[str, str] = {}
        for span in self.spans:
            marker = done_marker(self.root, span.index)
            if marker.exists():
                out.update(read_done_marker(marker))
        return out

    def finalize(self) -> "ActivationStore":
        """Mark the store complete once every shard is done; images that failed are dropped
        first (the store is compacted), so no reader ever sees their zero rows."""
        missing = [s.index for s in self.pending()]
        if missing:
            raise UsaeError(f"store {self.root} is missing shards {missing[:8]}{'...' if len(missing) > 8 else ''}")
        failed = self.failures()
        if failed:
            self.manifest = compact_failed_images(self.root, self.manifest, self.image_ids, failed)
        else:
            self.manifest["complete"] = True
            atomic_write_json(self.root / "manifest.json", self.manifest)
        return ActivationStore.open(self.root)


class ActivationStore:
    """Read side of a store. Open with `ActivationStore.open(path)`; create with `create`."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.spans = [s for s in manifest_spans(manifest) if s.n_images]
        """The shards that hold images, in image order. A span's `index` names its files; after a
        compaction emptied a shard, it differs from the span's position in this list."""
        self._image_ids: list[str] | None = None
        self._mmaps: dict[tuple[str, int], np.ndarray] = {}

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        models: Mapping[str, int],
        grid: tuple[int, int],
        image_ids: Sequence[str],
        dtype: str = "float16",
        shard_images: int = 256,
        model_info: Mapping[str, dict] | None = None,
        meta: dict | None = None,
        resume: bool = False,
    ) -> StoreWriter:
        """Start a store in a new or empty folder (or, with `resume`, reopen an unfinished one
        with the same layout). Replacing a store is the caller's business: it builds the new one
        beside the old and swaps them (`usae_core.atomic.swap_in_replacement`).

        A store that dropped images it could not read (`meta["skipped_images"]`) still matches
        the image list it was created with; those images stay left out until it is replaced."""
        root = Path(path)
        if not models:
            raise UsaeError("a store needs at least one model")
        for name in models:
            check_model_name(name)
        check_storage_dtype(dtype)
        if len(grid) != 2 or min(grid) < 1:
            raise UsaeError(f"grid must be two positive integers, got {grid!r}")
        if len(image_ids) == 0:
            raise UsaeError("a store needs at least one image")
        if len(set(image_ids)) != len(image_ids):
            raise UsaeError("image ids must be unique")
        if shard_images < 1:
            raise UsaeError("shard_images must be >= 1")
        model_info = dict(model_info or {})
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "models": [{"name": n, "dim": int(d), "info": model_info.get(n, {})} for n, d in models.items()],
            "grid": [int(grid[0]), int(grid[1])],
            "tokens_per_image": int(grid[0] * grid[1]),
            "dtype": dtype,
            "n_images": len(image_ids),
            "shard_images": int(shard_images),
            "meta": meta or {},
            "complete": False,
        }
        check_folder_path(root)
        if is_unstarted_store(root):
            # A create killed before its manifest was written: nothing in it is worth keeping.
            for child in root.iterdir():
                child.unlink()
        if root.exists() and any(root.iterdir()):
            existing = root / "manifest.json"
            if resume and existing.exists():
                finish_compaction(root)  # a compaction that committed before a crash
                old = json.loads(existing.read_text())
                skipped = old.get("meta", {}).get("skipped_images", {})
                kept = [i for i in image_ids if i not in skipped]
                given = {**{k: manifest[k] for k in ("models", "grid", "dtype", "shard_images")}, "n_images": len(kept)}
                differences = [f"{key} {old.get(key)!r} vs {value!r}" for key, value in given.items()
                               if old.get(key) != value]
                if not differences and json.loads((root / "image_ids.json").read_text()) != kept:
                    differences.append("the image list")
                if differences:
                    raise UsaeError(
                        f"{root} holds a store with a different layout (saved vs given: {'; '.join(differences)}); "
                        "rerun with the settings it was started with to finish it, or pass --overwrite to start again"
                    )
                return StoreWriter(root, old)
            check_replaceable_store(root)  # a folder holding no store is never offered for replacing
            raise UsaeError(f"{root} already exists; pass --overwrite to replace it")
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / "image_ids.json", list(image_ids))
        atomic_write_json(root / "manifest.json", manifest)
        return StoreWriter(root, manifest)

    @classmethod
    def open(cls, path: str | Path) -> "ActivationStore":
        root = Path(path)
        mf = root / "manifest.json"
        if not mf.exists():
            finish_replacement(root)  # a replacement whose swap was cut between its two renames
        if not root.exists():
            beside = sorted(m.parent.name for m in root.parent.glob("*/manifest.json"))
            named = f" (stores beside it: {', '.join(beside)})" if beside else ""
            raise UsaeError(f"there is no activation store at {root}{named}")
        if not mf.exists():
            raise UsaeError(f"{root} is not an activation store (no manifest.json)")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as exc:
            raise UsaeError(f"{mf} is not valid JSON: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise UsaeError(f"{root} is not an activation store (format {manifest.get('format')!r})")
        if manifest.get("version") != VERSION:
            raise UsaeError(f"{root}: store version {manifest.get('version')} is not supported (want {VERSION})")
        if not manifest.get("complete"):
            raise UsaeError(f"activation store {root} is unfinished (its extraction was interrupted or failed); "
                            "rerun the same `usae extract` command to finish it (finished shards are kept)")
        sizes = shard_sizes(manifest)
        if sum(sizes) != manifest["n_images"] or min(sizes, default=0) < 0:
            raise UsaeError(f"{mf}: shard_sizes add up to {sum(sizes)} images, n_images says {manifest['n_images']}")
        return cls(root, manifest)

    @classmethod
    def of(cls, store: "ActivationStore | str | os.PathLike") -> "ActivationStore":
        """`store` itself, or the store opened at that path: what every function taking a store
        (`train_usae`, `evaluate_usae`, `mine_store`, ...) accepts."""
        return cls.open(store) if isinstance(store, (str, os.PathLike)) else store

    def __repr__(self) -> str:
        models = ", ".join(f"{name} ({dim})" for name, dim in self.dims.items())
        return (f"ActivationStore('{self.root}', {self.n_images:,} images, grid {self.grid[0]}x{self.grid[1]}, "
                f"{self.dtype}, models: {models})")

    # ----------------------------------------------------------------- layout
    @property
    def model_names(self) -> list[str]:
        return [m["name"] for m in self.manifest["models"]]

    @property
    def dims(self) -> dict[str, int]:
        return {m["name"]: m["dim"] for m in self.manifest["models"]}

    def model_info(self, name: str) -> dict:
        return next(m.get("info", {}) for m in self.manifest["models"] if m["name"] == name)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.manifest["grid"]
        return int(h), int(w)

    @property
    def tokens_per_image(self) -> int:
        return int(self.manifest["tokens_per_image"])

    @property
    def n_images(self) -> int:
        return int(self.manifest["n_images"])

    @property
    def n_tokens(self) -> int:
        return self.n_images * self.tokens_per_image

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    @property
    def image_ids(self) -> list[str]:
        if self._image_ids is None:
            self._image_ids = json.loads((self.root / "image_ids.json").read_text())
        return self._image_ids

    @cached_property
    def _index_of_id(self) -> dict[str, int]:
        return {image_id: i for i, image_id in enumerate(self.image_ids)}

    # ----------------------------------------------------------------- raw access
    def shard(self, model: str, index: int) -> np.ndarray:
        """Memory-mapped `[shard_tokens, dim]` array in storage dtype."""
        key = (model, index)
        if key not in self._mmaps:
            if model not in self.dims:
                raise UsaeError(f"model {model!r} is not in the store (has {', '.join(self.model_names)})")
            path = shard_file(self.root, model, index)
            try:
                self._mmaps[key] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise UsaeError(f"shard file {path} is missing or damaged ({exc}); rerun the extraction "
                                "to rewrite it") from None
        return self._mmaps[key]

    def image_tokens(self, model: str, image: int | str) -> np.ndarray:
        """float32 `[tokens, dim]` activations of one image: its index (0 <= image < n_images)
        or its id (`image_ids`, the path relative to the image folder)."""
        image_index = self._image_index(image)
        if not 0 <= image_index < self.n_images:
            raise UsaeError(f"image {image_index} is outside the store's {self.n_images} images "
                            f"(0 to {self.n_images - 1})")
        span = span_of_image(self.spans, image_index)
        t = self.tokens_per_image
        local = image_index - span.start
        return from_storage(self.shard(model, span.index)[local * t : (local + 1) * t], self.dtype)

    def _image_index(self, image: int | str) -> int:
        if isinstance(image, str):
            if image not in self._index_of_id:
                example = f", e.g. {self.image_ids[0]!r}" if self.image_ids else ""
                raise UsaeError(f"the store has no image {image!r} (image ids are paths relative to the image "
                                f"folder{example})")
            return self._index_of_id[image]
        try:
            return operator.index(image)
        except TypeError:
            raise UsaeError(f"an image is an index or an image id (str), not {type(image).__name__}") from None

    def iter_images(
        self, batch_images: int = 64, models: Sequence[str] | None = None
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Stream the store in image order: `(first_image_index, {model: float32 [b, tokens, dim]})`."""
        models = list(models or self.model_names)
        t = self.tokens_per_image
        for span in self.spans:
            for start in range(span.start, span.stop, batch_images):
                stop = min(start + batch_images, span.stop)
                lo, hi = (start - span.start) * t, (stop - span.start) * t
                yield start, {
                    m: from_storage(self.shard(m, span.index)[lo:hi], self.dtype).reshape(stop - start, t, -1)
                    for m in models
                }

    # ----------------------------------------------------------------- training stream
    def iter_token_batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        start_batch: int = 0,
        shuffle_shards: int = 4,
        rank: int = 0,
        world_size: int = 1,
        models: Sequence[str] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Endless shuffled token batches `{model: float32 [batch_size, dim]}`, the same rows for
        every model.

        Each epoch visits shards in a seeded order (rank r takes every world_size-th), mixes
        `shuffle_shards` shards at a time and permutes their rows. The stream is a pure function
        of (seed, rank, world_size), so `start_batch` resumes it exactly without reading the
        skipped data.
        """
        models = list(models or self.model_names)
        if world_size > len(self.spans):
            raise UsaeError(f"store has {len(self.spans)} shards, fewer than the {world_size} ranks reading it")
        t = self.tokens_per_image
        skip_rows = start_batch * batch_size
        buf: dict[str, np.ndarray] | None = None
        pos = 0
        epoch = 0
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(len(self.spans))[rank::world_size]
            groups = [order[i : i + shuffle_shards] for i in range(0, len(order), shuffle_shards)]
            for gi, group in enumerate(groups):
                rows = sum(self.spans[s].n_images for s in group) * t
                if skip_rows >= rows:
                    skip_rows -= rows
                    continue
                perm = np.random.default_rng([seed, epoch, gi, rank]).permutation(rows)[skip_rows:]
                skip_rows = 0
                chunk = {
                    m: from_storage(np.concatenate([self.shard(m, self.spans[s].index) for s in group])[perm], self.dtype)
                    for m in models
                }
                if buf is not None and pos < len(buf[models[0]]):
                    chunk = {m: np.concatenate([buf[m][pos:], chunk[m]]) for m in models}
                buf, pos = chunk, 0
                while len(buf[models[0]]) - pos >= batch_size:
                    yield {m: buf[m][pos : pos + batch_size] for m in models}
                    pos += batch_size
            epoch += 1

    # ----------------------------------------------------------------- statistics
    def compute_stats(self, batch_images: int = 256, progress: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """Per-model standardisation statistics, accumulated in float64 over the whole store
        (with `progress`, a bar: on a large store this pass takes minutes before training starts).

        `mean` is per dimension; `scale` is one number per model, the RMS norm of the centred
        activations divided by sqrt(dim), so standardised tokens have unit mean variance per
        dimension while the geometry between dimensions is kept.
        """
        from tqdm.auto import tqdm

        sums = {m: np.zeros(d, np.float64) for m, d in self.dims.items()}
        sqsums = {m: np.zeros(d, np.float64) for m, d in self.dims.items()}
        with tqdm(total=self.n_images, desc="statistics", unit="img", disable=not progress) as bar:
            for _, batch in self.iter_images(batch_images):
                for m, a in batch.items():
                    flat = a.reshape(-1, a.shape[-1]).astype(np.float64)
                    sums[m] += flat.sum(0)
                    sqsums[m] += (flat * flat).sum(0)
                bar.update(next(iter(batch.values())).shape[0])
        n = self.n_tokens
        out = {}
        for m, d in self.dims.items():
            mean = sums[m] / n
            total_var = float(np.maximum(sqsums[m] / n - mean * mean, 0.0).sum())
            scale = max(np.sqrt(total_var / d), 1e-8)
            out[m] = {"mean": mean.astype(np.float32), "scale": np.float32(scale)}
        return out


_UNSTARTED_FILES = ("image_ids.json",)
"""What `ActivationStore.create` writes before the manifest, which it writes last."""


def is_unstarted_store(root: Path) -> bool:
    """Whether `root` holds nothing but what a `create` killed before writing the manifest
    leaves: `image_ids.json` and temporary files of atomic writes, and at least one of them."""
    if not root.is_dir():
        return False
    children = list(root.iterdir())
    return bool(children) and all(
        c.is_file() and not c.is_symlink() and (c.name in _UNSTARTED_FILES or (c.name.startswith(".") and c.name.endswith(".tmp")))
        for c in children)


def check_folder_path(root: Path) -> None:
    """A store is a folder: refuse a path that is a file, or lies under one, before anything
    tries to create it (which would fail with a Python error)."""
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == root else f"lies under {p}, which is a file"
                raise UsaeError(f"{root} {what}, not a folder; choose another path for the store")
            return


def check_replaceable_store(root: Path) -> None:
    """`--overwrite` replaces an activation store, never any other folder or file: a folder
    with files but no store manifest (a typo'd path, the image folder itself) or a file is
    refused untouched."""
    check_folder_path(root)
    if is_unstarted_store(root):
        return  # what a killed start of a store left: `create` clears it
    if root.is_dir() and any(root.iterdir()) and not (root / "manifest.json").exists():
        raise UsaeError(f"{root} is not empty and holds no activation store; --overwrite only replaces a store, "
                        "so write to a new or empty folder")


def _file_head(path: Path, n: int) -> bytes:
    with path.open("rb") as fh:
        return fh.read(n)


def import_activations(
    out: str | Path,
    arrays: Mapping[str, str | Path | np.ndarray],
    *,
    grid: tuple[int, int] | None = None,
    image_ids: Sequence[str] | None = None,
    dtype: str = "float16",
    shard_images: int = 256,
    overwrite: bool = False,
) -> ActivationStore:
    """Build a store from `[n_images, n_tokens, dim]` arrays (or .npy paths), one per model.

    Everything is validated before anything is written, and the store is assembled in a
    temporary directory and moved into place only when complete.
    """
    from usae_core.atomic import atomic_directory

    out = Path(out)
    if not isinstance(arrays, Mapping):
        raise UsaeError("arrays maps each model's name to its activations, e.g. {'vit': array, 'cnn': 'cnn.npy'}; "
                        f"got a {type(arrays).__name__}")
    if not arrays:
        raise UsaeError("give at least one --model NAME=FILE.npy")
    check_folder_path(out)
    loaded: dict[str, np.ndarray] = {}
    for name, src in arrays.items():
        check_model_name(name)
        if isinstance(src, torch.Tensor):  # numpy has no bfloat16: such tensors come as float32
            src = src.detach().cpu()
            src = (src.float() if src.dtype == torch.bfloat16 else src).numpy()
        if isinstance(src, np.ndarray):
            arr = src
        else:
            path = Path(src)
            if not path.exists():
                raise UsaeError(f"model {name!r}: file {path} does not exist")
            if path.is_file() and _file_head(path, 6) != b"\x93NUMPY":
                # numpy would advise allow_pickle=True for any file that is not .npy: never right here
                raise UsaeError(f"model {name!r}: {path} is not a .npy file (one array written by numpy.save)")
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except Exception as exc:  # noqa: BLE001 - numpy raises many types for bad files
                raise UsaeError(f"model {name!r}: cannot read {path} as .npy ({exc})") from None
        if arr.ndim != 3:
            raise UsaeError(
                f"model {name!r}: expected shape [n_images, n_tokens, dim], got rank {arr.ndim} {tuple(arr.shape)}"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise UsaeError(f"model {name!r}: expected floating-point activations, got {arr.dtype}")
        loaded[name] = arr
    first = next(iter(loaded))
    n_img, n_tok = loaded[first].shape[:2]
    for name, arr in loaded.items():
        if arr.shape[0] != n_img:
            raise UsaeError(f"image counts differ: {first!r} has {n_img}, {name!r} has {arr.shape[0]}")
        if arr.shape[1] != n_tok:
            raise UsaeError(f"token counts differ: {first!r} has {n_tok}, {name!r} has {arr.shape[1]}")
    for name, arr in loaded.items():
        for start in range(0, n_img, 1024):
            if not np.isfinite(arr[start : start + 1024]).all():
                raise UsaeError(f"model {name!r}: activations contain NaN or Inf")
    if grid is None:
        side = int(round(np.sqrt(n_tok)))
        grid = (side, side) if side * side == n_tok else (1, n_tok)
    if grid[0] * grid[1] != n_tok:
        raise UsaeError(f"grid {grid[0]}x{grid[1]} does not match {n_tok} tokens per image")
    image_ids = list(image_ids) if image_ids is not None else [f"img-{i:07d}" for i in range(n_img)]
    if len(image_ids) != n_img:
        raise UsaeError(f"{len(image_ids)} image ids for {n_img} images")
    if overwrite:
        check_replaceable_store(Path(out))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ActivationStore.create(
            tmp,
            models={n: int(a.shape[2]) for n, a in loaded.items()},
            grid=grid,
            image_ids=image_ids,
            dtype=dtype,
            shard_images=shard_images,
            meta={"source": "import-activations"},
        )
        for span in writer.spans:
            writer.write_shard(span.index, {n: np.asarray(a[span.start : span.stop]) for n, a in loaded.items()})
        writer.finalize()
    return ActivationStore.open(out)
