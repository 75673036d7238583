"""A scatter plot whose points can link to pages (concepts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from app.plots.svg import Canvas, Frame, Scale, draw_axes


@dataclass(frozen=True)
class ScatterPoint:
    x: float
    y: float
    tooltip: str
    href: str | None = None
    highlight: bool = False
    group: str = ""
    """A CSS class for the point's colour (a category the page's legend names)."""


def _bounds(values: list[float], log: bool) -> tuple[float, float]:
    if log:
        positive = [v for v in values if v > 0]
        if not positive:
            return 1e-6, 1.0
        return 10 ** math.floor(math.log10(min(positive))), 10 ** math.ceil(math.log10(max(positive)))
    lo, hi = min(values, default=0.0), max(values, default=1.0)
    pad = (hi - lo) * 0.04 or 0.5
    return min(0.0, lo) if lo >= 0 else lo - pad, hi + pad


def scatter(points: Sequence[ScatterPoint], *, title: str, x_label: str, y_label: str,
            log_x: bool = False, log_y: bool = False, diagonal: bool = False,
            width: int = 640, height: int = 380) -> Markup:
    """Points outside a log axis' domain (<= 0) are drawn on the axis floor so none disappear.
    `diagonal` adds the y = x reference line (for A-vs-B comparisons)."""
    canvas = Canvas(width, height, title, "chart chart-scatter")
    frame = Frame(left=64, top=12, right=width - 16, bottom=height - 44)
    if not points:
        canvas.text(width / 2, height / 2, "no concepts to plot", cls="empty", anchor="middle")
        return canvas.markup()
    x_lo, x_hi = _bounds([p.x for p in points], log_x)
    y_lo, y_hi = _bounds([p.y for p in points], log_y)
    if diagonal:
        x_lo = y_lo = min(x_lo, y_lo)
        x_hi = y_hi = max(x_hi, y_hi)
    xs = Scale(x_lo, x_hi, frame.left, frame.right, log=log_x)
    ys = Scale(y_lo, y_hi, frame.bottom, frame.top, log=log_y)
    draw_axes(canvas, frame, xs, ys, x_label=x_label, y_label=y_label)
    if diagonal:
        canvas.plot(f'<line class="reference" x1="{xs(x_lo):.1f}" y1="{ys(y_lo):.1f}" '
                   f'x2="{xs(x_hi):.1f}" y2="{ys(y_hi):.1f}"/>')
    # One tab stop per plot, not one per point (hundreds before the rest of the page): the
    # leftmost linked point takes it, and static/app.js moves it with the arrow keys.
    linked = [p for p in points if p.href]
    entry = min(linked, key=lambda p: (p.x, p.y)) if linked else None
    # Highlighted points last, so they are drawn on top.
    for p in sorted(points, key=lambda p: p.highlight):
        x = xs(max(p.x, x_lo)) if log_x else xs(p.x)
        y = ys(max(p.y, y_lo)) if log_y else ys(p.y)
        classes = " ".join(["point", *(["highlight"] if p.highlight else []), *([p.group] if p.group else [])])
        dot = (f'<circle class="{escape(classes)}" cx="{x:.1f}" cy="{y:.1f}" r="4">'
               f"<title>{escape(p.tooltip)}</title></circle>")
        if p.href:
            canvas.plot(f'<a href="{escape(p.href)}" tabindex="{0 if p is entry else -1}" '
                       f'aria-label="{escape(p.tooltip)}">{dot}</a>')
        else:
            canvas.plot(dot)
    return canvas.markup()
