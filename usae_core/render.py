"""Pictures for the explorer: heatmap overlays and thumbnails (Pillow + NumPy only).

Functions take and return PIL images; reading and writing files is the caller's job. A token
heatmap `[grid_h, grid_w]` covers the square view of its image evenly (cell (r, c) is the
r-th band from the top and c-th from the left), the same geometry the activations were
extracted with.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchor colours of matplotlib's "inferno" map (dark purple -> orange -> pale yellow),
# interpolated linearly: perceptually ordered and readable in greyscale print-outs.
_INFERNO = np.array(
    [
        [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99],
        [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164],
    ],
    dtype=np.float32,
)
PLACEHOLDER_GREY = (128, 128, 128)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 colours `[..., 3]`."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * (len(_INFERNO) - 1)
    lo = np.floor(v).astype(np.int64).clip(0, len(_INFERNO) - 2)
    frac = (v - lo)[..., None]
    return np.round(_INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac).astype(np.uint8)


def upsample_heat(heat: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a token grid to `size x size` pixels, cell centres kept exact."""
    grid = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32), mode="F")
    return np.asarray(grid.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def heatmap_overlay(square: Image.Image, heat: np.ndarray, vmax: float, *, max_alpha: float = 0.7) -> Image.Image:
    """Blend the colour-mapped heat over `square` (the image's square view, any size).

    Opacity grows with heat / vmax, so where the concept is off the image shows through
    unchanged; `vmax` is shared by all images of one concept so their overlays compare.
    """
    size = square.width
    if square.height != size:
        raise ValueError(f"heatmap_overlay needs a square image, got {square.width}x{square.height}")
    norm = np.clip(upsample_heat(heat, size) / max(float(vmax), 1e-12), 0.0, 1.0)
    alpha = (max_alpha * norm)[..., None]
    base = np.asarray(square.convert("RGB"), dtype=np.float32)
    blended = base * (1 - alpha) + colormap(norm).astype(np.float32) * alpha
    return Image.fromarray(np.round(blended).astype(np.uint8), mode="RGB")


def heatmap_layer(heat: np.ndarray, vmax: float, size: int = 64, *, max_alpha: float = 0.75) -> Image.Image:
    """The colour-mapped heat alone, as an RGBA image whose opacity grows with heat / vmax.

    The explorer stacks it over the image's thumbnail (the browser scales both), so one
    thumbnail per image serves every concept and a layer is a few hundred bytes of PNG.
    Composited over the square view it equals `heatmap_overlay` at the same size.
    """
    norm = np.clip(upsample_heat(heat, size) / max(float(vmax), 1e-12), 0.0, 1.0)
    rgba = np.concatenate([colormap(norm), np.round(255 * max_alpha * norm)[..., None].astype(np.uint8)], axis=-1)
    return Image.fromarray(rgba, mode="RGBA")


def thumbnail(square: Image.Image, size: int) -> Image.Image:
    """A `size x size` RGB thumbnail of a square view."""
    return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def placeholder(size: int) -> Image.Image:
    """A plain grey square, drawn under heatmaps when the image file is not available."""
    return Image.new("RGB", (size, size), PLACEHOLDER_GREY)
