"""Image sources and the canonical square view every backbone sees.

`square_view` crops the centre square and resizes it, so token-grid cell (r, c) covers the same
image region in every model, and mining draws heatmaps on the same view. `FolderSource` reads a
folder of images (recursively) with stable relative-path ids; unreadable files are skipped and
named in a warning instead of stopping a long extraction (found by a test decode when the source
is opened, or, in extraction, by the one decode extraction does anyway). A folder that holds a
`demo.json` is a demo set (see `usae_core.demo_images`): its images live in `images/` and its
per-defect ground-truth masks in `masks/`.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from usae_core.errors import UsaeError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 100_000_000
"""Images above this many pixels are refused (decompression-bomb guard)."""
DEMO_MANIFEST = "demo.json"
DEMO_IMAGES = "images"
DEMO_MASKS = "masks"

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resample_filter(name: str) -> Image.Resampling:
    try:
        return _RESAMPLE[name]
    except KeyError:
        raise UsaeError(f"unknown interpolation {name!r}; choose one of {', '.join(_RESAMPLE)}") from None


def square_view(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Centre crop to the shorter side, then resize to `size` x `size` (RGB)."""
    return centre_square(img.convert("RGB") if img.mode != "RGB" else img, size, interpolation)


def centre_square(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """`square_view` geometry without the RGB conversion (label maps keep their mode)."""
    w, h = img.size
    side = min(w, h)
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), resample_filter(interpolation))
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright RGB: EXIF orientation applied, transparency composited on white, grey expanded."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High-bit-depth grey: stretch to 8 bits rather than let convert() clip it.
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), "L")
    if img.mode == "P" or img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None) -> Image.Image:
    """Decode one image file to upright RGB.

    `min_size` lets JPEG decoding skip detail that a `min_size` square view would discard."""
    with Image.open(path) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise ValueError(f"{w}x{h} pixels exceeds the limit of {max_pixels:,} (decompression-bomb guard)")
        if min_size is not None and img.format == "JPEG":
            img.draft("RGB", (min_size, min_size))
        img.load()
        return to_rgb(img)


def is_demo_set(root: str | Path) -> bool:
    return (Path(root) / DEMO_MANIFEST).is_file()


def _read_demo_manifest(root: Path) -> dict:
    try:
        return json.loads((root / DEMO_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsaeError(f"{root / DEMO_MANIFEST} is unreadable: {exc}") from None


def list_image_files(folder: Path, root: Path) -> list[str]:
    """Image files under `folder`, recursively, as sorted POSIX paths relative to `root`; as
    `Path.rglob` walks, linked folders are not entered (so no link cycle can trap the walk),
    hidden files and unreadable folders are left out.

    `os.scandir` reads each entry's type from the directory listing; `Path.rglob` + `is_file`
    (a stat and several path objects per file) took ten times longer (docs/benchmarks.md)."""
    prefix = len(str(root)) + 1
    found: list[str] = []
    pending = [str(folder)]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif (not entry.name.startswith(".") and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
                          and entry.is_file()):
                        found.append(entry.path[prefix:].replace(os.sep, "/"))
        except PermissionError:
            log.warning("cannot read folder %s: permission denied", directory)
    return sorted(found)


class FolderSource:
    """Images under `root`, recursively, as stable relative POSIX ids (sorted).

    With `check` (the default) every file is test-decoded once at construction (in threads or
    processes); files that cannot be decoded are left out of `ids`, listed in `skipped`
    (id -> reason) and named in one warning. `check=False` only lists the files: `ids` may then
    hold unreadable ones, for callers that decode every image anyway and handle failures there
    (extraction does, so each image is decoded once, not twice).
    """

    def __init__(self, root: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, check: bool = True,
                 check_threads: int | None = None):
        self.root = Path(root).resolve()
        if self.root.exists() and not self.root.is_dir():
            raise UsaeError(f"image folder {root} is a file, not a folder; give the folder that holds the images")
        if not self.root.is_dir():
            raise UsaeError(f"image folder {root} does not exist")
        self.max_pixels = max_pixels
        self.is_demo = is_demo_set(self.root)
        scan_root = self.root / DEMO_IMAGES if self.is_demo else self.root
        candidates = list_image_files(scan_root, self.root)
        self.skipped: dict[str, str] = {}
        if check:
            problems = _check_files([str(self.root / i) for i in candidates], max_pixels, check_threads)
            self.skipped = {i: p for i, p in zip(candidates, problems) if p is not None}
        self.ids = [i for i in candidates if i not in self.skipped]
        warn_skipped(self.root, self.skipped)
        if not self.ids:
            raise UsaeError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, image_id: str) -> Path:
        return self.root / image_id

    def load(self, image_id: str, min_size: int | None = None) -> Image.Image:
        try:
            return load_image(self.path(image_id), max_pixels=self.max_pixels, min_size=min_size)
        except Exception as exc:  # noqa: BLE001
            raise UsaeError(f"cannot read image {self.path(image_id)}: {exc}") from None


def warn_skipped(root: Path, skipped: dict[str, str]) -> None:
    """One warning naming the skipped files (the first ten) and why."""
    if skipped:
        names = ", ".join(f"{i} ({why})" for i, why in list(skipped.items())[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        log.warning("skipped %d unreadable image%s in %s: %s%s", len(skipped), "s" if len(skipped) != 1 else "",
                    root, names, more)


def failure_reason(exc: BaseException) -> str:
    """A decoder failure as one short line: `ExceptionType: message`."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _file_problem(path: str, max_pixels: int) -> str | None:
    """Why `path` cannot be used as an image, or None when it decodes."""
    try:
        # Decoding at a small draft size still reads every byte of a JPEG, so truncation shows.
        load_image(path, max_pixels=max_pixels, min_size=64)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "skip this file"
        return failure_reason(exc)
    return None


def _file_problems(paths: list[str], max_pixels: int) -> list[str | None]:
    return [_file_problem(p, max_pixels) for p in paths]


_PROCESS_CHECK_FILES = 2000
"""From this many files on, the test decode runs in worker processes: per-file Python work
holds the GIL, so threads top out near 2,000 files/s whatever the core count."""


def _check_files(paths: list[str], max_pixels: int, threads: int | None) -> list[str | None]:
    """`_file_problem` of every path, in order, spread over threads or (many files) processes."""
    cores = os.cpu_count() or 1
    if len(paths) >= _PROCESS_CHECK_FILES and cores > 2 and threads is None:
        chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
        with ProcessPoolExecutor(min(cores, 32)) as pool:
            return [p for part in pool.map(_file_problems, chunks, [max_pixels] * len(chunks)) for p in part]
    with ThreadPoolExecutor(threads or min(32, cores * 2)) as pool:
        return list(pool.map(_file_problem, paths, [max_pixels] * len(paths)))


def defect_types(root: str | Path) -> list[str]:
    """Defect labels of a demo set, in label-map order (empty for a plain folder)."""
    root = Path(root)
    if not is_demo_set(root):
        return []
    return list(_read_demo_manifest(root)["defect_types"])


def mask_path(root: str | Path, image_id: str) -> Path:
    return Path(root) / DEMO_MASKS / Path(image_id).name


def load_masks(root: str | Path, image_id: str, size: int | None = None, *,
               types: Sequence[str] | None = None) -> dict[str, np.ndarray] | None:
    """Ground-truth masks of one demo image: {defect type: bool [H, W]} in its square view.

    Every defect type of the set is present (all False when the image lacks it). `size` resizes
    the masks (nearest) to a square view of that size. None for images outside a demo set.
    `types`: the set's `defect_types(root)`, when the caller read them once for many images
    (otherwise demo.json, which lists every image, is parsed again for each)."""
    root = Path(root)
    types = defect_types(root) if types is None else list(types)
    path = mask_path(root, image_id)
    if not types or not path.exists():
        return None
    with Image.open(path) as m:
        label_map = np.asarray(centre_square(m, size or min(m.size), "nearest"))
    return {t: label_map == i for i, t in enumerate(types, start=1)}
