"""The embedded demo set: procedural factory-inspection surfaces with ground-truth defect masks,
plus square crops of the natural photos that ship inside scikit-image, scikit-learn and matplotlib.

Everything is a pure function of (seed, image index), so the same seed gives the same bytes, and
images can be rendered in parallel. On disk (see docs/extraction.md):

    DIR/images/00000.png ...   224 x 224 RGB
    DIR/masks/00000.png ...    uint8 label map: 0 = background, i = defect_types[i - 1]
    DIR/demo.json              {"defect_types": [...], "images": {id: {"material", "defects", ...}}}
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from usae_core.atomic import atomic_directory, remove_abandoned_builds
from usae_core.errors import UsaeError
from usae_core.images import DEMO_IMAGES, DEMO_MANIFEST, DEMO_MASKS, is_demo_set

log = logging.getLogger(__name__)

MATERIALS = ["metal", "wood", "fabric", "concrete"]
SIZE = 224
FULL_IMAGES = 2000
SMALL_IMAGES = 300
PHOTO_EVERY = 6
"""Every 6th image is a photo crop; the others are surfaces."""
CLEAN_FRACTION = 0.15
FORMAT_VERSION = 2

Rgb = np.ndarray  # float32 [SIZE, SIZE, 3] in [0, 1]


# ----------------------------------------------------------------------------- noise synthesis
def _upsample(grid: np.ndarray, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """Smoothly resize a float grid to `size` (width, height)."""
    return np.asarray(Image.fromarray(grid.astype(np.float32), "F").resize(size, Image.Resampling.BICUBIC))


def fbm(rng: np.random.Generator, base_cells: int, octaves: int = 4, persistence: float = 0.5) -> np.ndarray:
    """Fractal value noise in roughly [-1, 1]: octaves of upsampled random grids."""
    out = np.zeros((SIZE, SIZE), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = base_cells * 2**o
        out += amp * _upsample(rng.uniform(-1, 1, (cells + 1, cells + 1)))
        total += amp
        amp *= persistence
    return out / total


def _lighting(rng: np.random.Generator, strength: float) -> np.ndarray:
    """A gentle linear light gradient in a random direction."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE - 0.5
    a = rng.uniform(0, 2 * math.pi)
    return 1 + strength * (np.cos(a) * x + np.sin(a) * y)


def metal(rng: np.random.Generator) -> Rgb:
    """Brushed metal: streaks along one axis, fine grain, a soft light gradient."""
    streaks = _upsample(rng.normal(0, 1, (SIZE, 3)), (SIZE, SIZE))
    if rng.random() < 0.5:
        streaks = streaks.T
    grey = rng.uniform(0.5, 0.72) + 0.05 * streaks + 0.06 * fbm(rng, 3, 3) + rng.normal(0, 0.015, (SIZE, SIZE))
    tint = np.array([1.0, 1.0 + rng.uniform(0, 0.03), 1.0 + rng.uniform(0.02, 0.08)], np.float32)
    return (grey * _lighting(rng, 0.3))[..., None] * tint


def wood(rng: np.random.Generator) -> Rgb:
    """Wood: growth rings around a far-away centre, bent by turbulence, with fibre streaks."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    cx, cy = SIZE / 2 + math.cos(a) * rng.uniform(300, 700), SIZE / 2 + math.sin(a) * rng.uniform(300, 700)
    r = np.hypot(x - cx, y - cy) / rng.uniform(9, 16)
    rings = 0.5 + 0.5 * np.sin(2 * math.pi * (r + 1.4 * fbm(rng, 3, 3)))
    fibres = _upsample(rng.normal(0, 1, (4, SIZE)) if abs(math.cos(a)) > 0.7 else rng.normal(0, 1, (SIZE, 4)))
    t = np.clip(rings**1.6 + 0.08 * fibres, 0, 1)[..., None]
    light = np.array([rng.uniform(0.72, 0.85), rng.uniform(0.52, 0.62), rng.uniform(0.3, 0.4)], np.float32)
    dark = light * rng.uniform(0.45, 0.6)
    return light * (1 - t) + dark * t


def fabric(rng: np.random.Generator) -> Rgb:
    """Woven fabric: over-under threads in a plain weave, in a random dye colour."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    period = rng.uniform(5, 9)
    u, v = x / period, y / period
    warp = 0.5 + 0.5 * np.cos(2 * math.pi * (v - np.floor(v) - 0.5))
    weft = 0.5 + 0.5 * np.cos(2 * math.pi * (u - np.floor(u) - 0.5))
    over = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    relief = over * weft + (1 - over) * warp
    hue = rng.uniform(0, 1)
    dye = 0.35 + 0.45 * np.array([abs(math.sin(math.pi * (hue + k / 3))) for k in range(3)], np.float32)
    fuzz = 0.05 * fbm(rng, 16, 2) + rng.normal(0, 0.02, (SIZE, SIZE))
    return (0.65 + 0.35 * relief + fuzz)[..., None] * dye * _lighting(rng, 0.2)[..., None]


def concrete(rng: np.random.Generator) -> Rgb:
    """Concrete: fractal grey with aggregate speckle and small pores."""
    g = rng.uniform(0.5, 0.65) + 0.1 * fbm(rng, 4, 5, 0.6) + rng.normal(0, 0.03, (SIZE, SIZE))
    speck = rng.random((SIZE, SIZE))
    g = np.where(speck < 0.01, g - 0.2, g)
    g = np.where(speck > 0.993, g + 0.15, g)
    warm = rng.uniform(0, 0.04)
    return (g * _lighting(rng, 0.25))[..., None] * np.array([1 + warm, 1 + warm / 2, 1], np.float32)


SURFACES: dict[str, Callable[[np.random.Generator], Rgb]] = {
    "metal": metal, "wood": wood, "fabric": fabric, "concrete": concrete,
}


# ----------------------------------------------------------------------------- defects
def _stroke_alpha(points: list[tuple[float, float]], width: float) -> np.ndarray:
    """Antialiased alpha of a polyline: drawn at 4x and box-downsampled."""
    s = 4
    canvas = Image.new("L", (SIZE * s, SIZE * s), 0)
    ImageDraw.Draw(canvas).line([(x * s, y * s) for x, y in points], fill=255, width=max(1, round(width * s)),
                                joint="curve")
    return np.asarray(canvas.resize((SIZE, SIZE), Image.Resampling.BOX), np.float32) / 255


def _blur(a: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a [0, 1] map (through 8-bit, which is precise enough for shading)."""
    blurred = Image.fromarray((a * 255 + 0.5).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(blurred, np.float32) / 255


def _centre(rng: np.random.Generator, margin: float) -> tuple[float, float]:
    return float(rng.uniform(margin, SIZE - margin)), float(rng.uniform(margin, SIZE - margin))


def crack(img: Rgb, rng: np.random.Generator) -> np.ndarray:
    """A dark, jagged, sometimes branching crack."""
    def walk(x: float, y: float, angle: float, length: float) -> list[tuple[float, float]]:
        pts = [(x, y)]
        for _ in range(int(length / 4)):
            angle += rng.normal(0, 0.35)
            x, y = x + 4 * math.cos(angle), y + 4 * math.sin(angle)
            pts.append((x, y))
        return pts

    x, y = _centre(rng, 40)
    angle = rng.uniform(0, 2 * math.pi)
    main = walk(x, y, angle, rng.uniform(70, 190))
    alpha = _stroke_alpha(main, rng.uniform(1.6, 3.2))
    for _ in range(rng.integers(0, 3)):
        bx, by = main[rng.integers(len(main) // 4, len(main))]
        alpha = np.maximum(alpha, _stroke_alpha(walk(bx, by, angle + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1),
                                                     rng.uniform(20, 60)), rng.uniform(1.0, 2.0)))
    halo = _blur(alpha, 2.0)
    img *= (1 - 0.85 * alpha - 0.25 * np.clip(halo - alpha, 0, 1))[..., None]
    return alpha > 0.3


def scratch(img: Rgb, rng: np.random.Generator) -> np.ndarray:
    """A long, thin, bright, gently curved scratch with a faint shadow line."""
    x0, y0 = _centre(rng, 20)
    angle = rng.uniform(0, math.pi)
    length = rng.uniform(90, 200)
    x2, y2 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
    bend = rng.uniform(-20, 20)
    mx, my = (x0 + x2) / 2 - bend * math.sin(angle), (y0 + y2) / 2 + bend * math.cos(angle)
    pts = [((1 - t) ** 2 * x0 + 2 * (1 - t) * t * mx + t * t * x2, (1 - t) ** 2 * y0 + 2 * (1 - t) * t * my + t * t * y2)
           for t in np.linspace(0, 1, 40)]
    width = rng.uniform(1.8, 3.0)
    alpha = _stroke_alpha(pts, width)
    shadow = _stroke_alpha([(px + 1.5, py + 1.5) for px, py in pts], width)
    img *= (1 - 0.6 * np.clip(shadow - alpha, 0, 1))[..., None]
    shine = rng.uniform(0.88, 1.0)
    img[:] = img * (1 - alpha[..., None]) + shine * alpha[..., None]
    return alpha > 0.3


def _blob(rng: np.random.Generator, radius: float) -> tuple[np.ndarray, float, float]:
    """Signed distance-like field of an irregular blob (< 1 inside), and its centre."""
    cx, cy = _centre(rng, radius + 8)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    theta = np.arctan2(y - cy, x - cx)
    wobble = np.ones_like(theta)
    for k in range(2, 6):
        wobble += rng.uniform(0, 0.22 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return np.hypot(x - cx, y - cy) / (radius * wobble), cx, cy


def stain(img: Rgb, rng: np.random.Generator) -> np.ndarray:
    """An irregular, mottled discoloured patch (rust, oil or water) with a dark dried rim.

    Stain colours are darker than every material's palette (a brown stain must not look like
    wood), so "stain" is a change of colour and a rim, not a texture a material also has."""
    d, _, _ = _blob(rng, rng.uniform(20, 48))
    alpha = np.clip((1.15 - d) / 0.3, 0, 1) * rng.uniform(0.7, 0.9)
    rim = np.exp(-((d - 0.95) ** 2) / 0.005) * 0.5
    colour = [np.array([0.35, 0.14, 0.04]), np.array([0.06, 0.06, 0.09]), np.array([0.25, 0.24, 0.1])][rng.integers(3)]
    # Mottled like dried residue: a blotchy grain no material texture has.
    mottle = 1 + 0.5 * fbm(rng, 24, octaves=2)
    tinted = img * 0.3 + 0.7 * colour.astype(np.float32) * mottle[..., None]
    img[:] = img * (1 - alpha[..., None]) + tinted * alpha[..., None]
    img *= (1 - rim * (d < 1.15))[..., None]
    return d < 1.0


def dent(img: Rgb, rng: np.random.Generator) -> np.ndarray:
    """A smooth depression, lit from one side: one half shadowed, the other highlighted."""
    rx, ry = rng.uniform(14, 38), rng.uniform(14, 38)
    cx, cy = _centre(rng, max(rx, ry) + 6)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    depth = np.exp(-(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) * 2.0)
    gy, gx = np.gradient(depth)
    a = rng.uniform(0, 2 * math.pi)
    shade = (np.cos(a) * gx + np.sin(a) * gy) * max(rx, ry) * rng.uniform(0.8, 1.2)
    img *= np.clip(1 + shade - 0.2 * depth, 0.35, 1.45)[..., None]
    return depth > 0.3


def hole(img: Rgb, rng: np.random.Generator) -> np.ndarray:
    """A round hole: a dark interior darkening towards its centre, with a bright rim."""
    r = rng.uniform(5, 17)
    cx, cy = _centre(rng, r + 6)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    d = np.hypot(x - cx, y - cy) / r
    inside = np.clip((1.0 - d) * r, 0, 1)
    rim = np.clip(1 - np.abs(d - 1.08) * r / 1.5, 0, 1) * 0.35
    img[:] = img * (1 - inside[..., None]) + (0.03 + 0.08 * d)[..., None] * inside[..., None]
    img += rim[..., None]
    return d < 1.0


DEFECTS: dict[str, Callable[[Rgb, np.random.Generator], np.ndarray]] = {
    "crack": crack, "stain": stain, "scratch": scratch, "dent": dent, "hole": hole,
}
DEFECT_TYPES = list(DEFECTS)
"""Label i in a mask is DEFECT_TYPES[i - 1]."""


# ----------------------------------------------------------------------------- photos
def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        return np.asarray(img.convert("RGB"))


def _sklearn_sample(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        img = img[0] if name == "stereo_motorcycle" else img
        return np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]

    return load


# Only photos bundled in the wheels: skimage's others (brain, cells3d, eagle, ...) need a download.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    **{n: _skimage(n) for n in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                                "immunohistochemistry", "camera", "moon", "coins", "stereo_motorcycle")},
    "china": _sklearn_sample("china.jpg"),
    "flower": _sklearn_sample("flower.jpg"),
    "grace_hopper": _grace_hopper,
}


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """One of the photos that ship in packages (PHOTOS), uint8 `[H, W, 3]`, read once per process
    and read-only (every caller shares the array)."""
    pixels = np.ascontiguousarray(PHOTOS[name]())
    pixels.setflags(write=False)
    return pixels


def photo_crop(name: str, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (35-100% of the shorter side), maybe mirrored, at SIZE px."""
    pixels = photo(name)
    h, w = pixels.shape[:2]
    side = int(min(h, w) * rng.uniform(0.35, 1.0))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(pixels[top : top + side, left : left + side]).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


# ----------------------------------------------------------------------------- one image
def render(seed: int, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Image `index` of the set for `seed`: (uint8 RGB, uint8 label map, record)."""
    rng = np.random.default_rng([seed, index])
    labels = np.zeros((SIZE, SIZE), np.uint8)
    if index % PHOTO_EVERY == PHOTO_EVERY - 1:
        names = sorted(PHOTOS)
        name = names[(index // PHOTO_EVERY) % len(names)]
        return photo_crop(name, rng), labels, {"material": "photo", "photo": name, "defects": []}
    material = MATERIALS[(index - index // PHOTO_EVERY) % len(MATERIALS)]
    img = SURFACES[material](rng).astype(np.float32)
    defects: list[str] = []
    if rng.random() >= CLEAN_FRACTION:
        n = 1 if rng.random() < 0.7 else 2
        defects = [str(d) for d in rng.choice(DEFECT_TYPES, size=n, replace=False)]
    for name in defects:
        mask = DEFECTS[name](img, rng)
        labels[mask] = DEFECT_TYPES.index(name) + 1
    # A later defect may paint over an earlier one completely; the record lists what is visible.
    defects = [d for d in defects if (labels == DEFECT_TYPES.index(d) + 1).any()]
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    rgb = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return rgb, labels, {"material": material, "defects": defects}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render_files(args: tuple[int, int]) -> tuple[int, bytes, bytes, dict]:
    seed, index = args
    rgb, labels, record = render(seed, index)
    return index, _png(rgb), _png(labels), record


def image_id(index: int) -> str:
    return f"{DEMO_IMAGES}/{index:05d}.png"


# ----------------------------------------------------------------------------- the set
def demo_set_is_current(out_dir: str | Path, seed: int = 0, small: bool = False, *,
                        n_images: int | None = None) -> bool:
    """True when `out_dir` holds exactly the set `build_demo_set` would write with these
    parameters and this version of the generator."""
    out = Path(out_dir)
    if not is_demo_set(out):
        return False
    params = {"seed": seed, "n_images": n_images or (SMALL_IMAGES if small else FULL_IMAGES), "version": FORMAT_VERSION}
    existing = json.loads((out / DEMO_MANIFEST).read_text())
    return {k: existing.get(k) for k in params} == params


def build_demo_set(out_dir: str | Path, seed: int = 0, small: bool = False, *, n_images: int | None = None,
                   workers: int | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the demo set to `out_dir` (atomically) and return its path.

    An existing set built with the same parameters is reused; a different one needs `overwrite`."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    n = n_images or (SMALL_IMAGES if small else FULL_IMAGES)
    params = {"seed": seed, "n_images": n, "version": FORMAT_VERSION}
    if out.exists() and not out.is_dir():
        raise UsaeError(f"{out} is a file, not a folder; the demo set needs a folder there")
    remove_abandoned_builds(out)  # of builds killed before: the set itself may be complete already
    if is_demo_set(out):
        if demo_set_is_current(out, seed, small, n_images=n_images):
            return out
        if not overwrite:
            raise UsaeError(f"{out} holds a different demo set (another seed or version); pass --overwrite to "
                            "rebuild it (stores extracted from the old set would then show the new images)")
    elif out.exists() and any(out.iterdir()):  # someone's files: never replaced, --overwrite or not
        raise UsaeError(f"{out} exists and is not a demo set; move it away or choose another directory "
                        "(--overwrite only replaces a demo set)")
    workers = workers or min(8, os.cpu_count() or 1)
    for name in PHOTOS:  # load once here; forked workers inherit the cache
        photo(name)
    records: dict[str, dict] = {}
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / DEMO_IMAGES).mkdir()
        (tmp / DEMO_MASKS).mkdir()
        jobs = [(seed, i) for i in range(n)]
        bar = tqdm(total=n, desc="demo set", unit="img", disable=not progress)
        with ProcessPoolExecutor(workers) if workers > 1 else _Serial() as pool:
            for index, image_png, mask_png, record in pool.map(_render_files, jobs, chunksize=16):
                (tmp / image_id(index)).write_bytes(image_png)
                (tmp / DEMO_MASKS / f"{index:05d}.png").write_bytes(mask_png)
                records[image_id(index)] = record
                bar.update(1)
        bar.close()
        manifest = {**params, "defect_types": DEFECT_TYPES, "materials": MATERIALS, "image_size": SIZE,
                    "images": records}
        (tmp / DEMO_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log.info("built demo set of %d images in %s", n, out)
    return out


class _Serial:
    """Stands in for a process pool when one worker is asked for."""

    def __enter__(self) -> "_Serial":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def map(fn, items, chunksize: int = 1):  # noqa: ARG004 - same signature as Executor.map
        return map(fn, items)
