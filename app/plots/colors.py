"""Perceptually ordered colour map (viridis anchors) and a readable text colour for each cell."""

from __future__ import annotations

# Eight evenly spaced samples of matplotlib's viridis; linear interpolation between them is
# visually indistinguishable from the full table at chart sizes.
_VIRIDIS = [
    (68, 1, 84), (70, 50, 127), (54, 92, 141), (39, 127, 142),
    (31, 161, 135), (74, 194, 109), (159, 218, 58), (253, 231, 37),
]


def viridis(t: float) -> tuple[int, int, int]:
    t = min(1.0, max(0.0, t)) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(round(a[k] + f * (b[k] - a[k])) for k in range(3))  # type: ignore[return-value]


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def text_color_on(rgb: tuple[int, int, int]) -> str:
    """Black or white, whichever contrasts more with the background (relative luminance)."""
    r, g, b = (c / 255 for c in rgb)
    return "#111" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "#fff"
