"""Sequential colour maps and a readable text colour for each cell."""

from __future__ import annotations

# Light to dark blue (the interface's accent hue): values read as "more" the darker they are,
# and the scale survives greyscale printing.
_BLUES = [(239, 244, 255), (198, 214, 250), (140, 170, 238), (84, 124, 220), (47, 91, 211), (30, 58, 138)]


def blues(t: float) -> tuple[int, int, int]:
    return _interpolate(_BLUES, t)


def _interpolate(anchors: list[tuple[int, int, int]], t: float) -> tuple[int, int, int]:
    t = min(1.0, max(0.0, t)) * (len(anchors) - 1)
    i = min(int(t), len(anchors) - 2)
    f = t - i
    a, b = anchors[i], anchors[i + 1]
    return tuple(round(a[k] + f * (b[k] - a[k])) for k in range(3))  # type: ignore[return-value]


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def text_color_on(rgb: tuple[int, int, int]) -> str:
    """Black or white, whichever contrasts more with the background (relative luminance)."""
    r, g, b = (c / 255 for c in rgb)
    return "#111" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "#fff"


SERIES = ["#2f5bd3", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#6b7280"]
"""Line colours for one series per model: the accent blue, then the Okabe-Ito colours, which stay
apart for colour-blind readers."""


def series_color(i: int) -> str:
    return SERIES[i % len(SERIES)]
