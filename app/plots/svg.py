"""Small SVG building blocks shared by the charts: a canvas, linear scales and axis ticks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from markupsafe import Markup, escape


def fmt(value: float) -> str:
    """Compact tick/tooltip number: 0.25, 1.2k, 0.0001, 3e-05 (decimals down to 0.0001, so a
    log axis from 0.0001 to 1 reads alike, not "1e-04" beside "0.001")."""
    if value == 0:
        return "0"
    a = abs(value)
    if a >= 1e6:
        return f"{value / 1e6:.3g}M"
    if a >= 1e3:
        return f"{value / 1e3:.3g}k"
    if a < 1e-4 * (1 - 1e-9):
        return f"{value:.0e}"
    return f"{value:.3g}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi] (steps of 1, 2 or 5 x 10^n)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    # The round step whose number of intervals is nearest `count` (0 to 1.05 in steps of 0.2,
    # not of 0.5: two labelled ticks were too few to read a value off).
    step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda s: abs((hi - lo) / s - count))
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


@dataclass
class Scale:
    """Maps a data interval onto a pixel interval (linear, or log10 for positive data)."""

    lo: float
    hi: float
    px_lo: float
    px_hi: float
    log: bool = False

    def _t(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def __call__(self, value: float) -> float:
        lo, hi = self._t(self.lo), self._t(self.hi)
        frac = 0.5 if hi == lo else (self._t(value) - lo) / (hi - lo)
        return self.px_lo + frac * (self.px_hi - self.px_lo)

    def ticks(self, count: int = 5) -> list[float]:
        if not self.log:
            return nice_ticks(self.lo, self.hi, count)
        first, last = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
        decades = [10.0**e for e in range(first, last + 1)]
        ticks = [t for t in decades if self.lo <= t <= self.hi]
        if len(ticks) < 3:  # a narrow range: 1, 2, 5 steps, so the axis still reads
            ticks = sorted(m * t for t in decades for m in (1, 2, 5) if self.lo <= m * t <= self.hi)
        if len(ticks) < 2:  # narrower still (activations 6.0 to 6.4 had no label): a few round linear steps
            ticks = [t for t in nice_ticks(self.lo, self.hi, 3) if t > 0]
        return ticks


@dataclass
class Canvas:
    """An SVG document scaled to its container's width (viewBox), with an accessible title."""

    width: int
    height: int
    title: str
    css_class: str = "chart"
    parts: list[str] = field(default_factory=list)

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(self, x: float, y: float, content: str, *, cls: str = "", anchor: str = "start",
             rotate: float | None = None, fill: str | None = None) -> None:
        extra = f' transform="rotate({rotate:.0f} {x:.1f} {y:.1f})"' if rotate is not None else ""
        if fill:
            extra += f' fill="{fill}"'
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}" text-anchor="{anchor}"{extra}>'
                 f"{escape(content)}</text>")

    def markup(self) -> Markup:
        # Never drawn wider than designed, so text keeps its size; narrower containers scale it down.
        head = (f'<svg class="{self.css_class}" viewBox="0 0 {self.width} {self.height}" role="img" '
                f'style="max-width: {self.width}px; --chart-w: {self.width}px" xmlns="http://www.w3.org/2000/svg" '
                f'preserveAspectRatio="xMidYMid meet"><title>{escape(self.title)}</title>')
        return Markup(head + "".join(self.parts) + "</svg>")


@dataclass
class Frame:
    """The plotting area inside a canvas, leaving margins for axes and labels."""

    left: float
    top: float
    right: float
    bottom: float

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top


def draw_axes(canvas: Canvas, frame: Frame, xs: Scale, ys: Scale, *, x_label: str, y_label: str,
              x_ticks: int = 5, y_ticks: int = 4) -> None:
    """Grid lines, tick labels and axis titles for an x/y chart."""
    for v in ys.ticks(y_ticks):
        y = ys(v)
        canvas.add(f'<line class="grid" x1="{frame.left:.1f}" x2="{frame.right:.1f}" y1="{y:.1f}" y2="{y:.1f}"/>')
        canvas.text(frame.left - 6, y + 4, fmt(v), cls="tick", anchor="end")
    for v in xs.ticks(x_ticks):
        x = xs(v)
        canvas.add(f'<line class="tickmark" x1="{x:.1f}" x2="{x:.1f}" y1="{frame.bottom:.1f}" '
                   f'y2="{frame.bottom + 4:.1f}"/>')
        # A label on the y axis starts there, clear of the y axis's lowest label ("0.0001" over
        # "0.0001" at a log-log origin); one on the right edge ends there, inside the chart.
        anchor = "start" if x - frame.left < 1 else "end" if frame.right - x < 1 else "middle"
        canvas.text(x, frame.bottom + 17, fmt(v), cls="tick", anchor=anchor)
    canvas.add(f'<line class="axis" x1="{frame.left:.1f}" x2="{frame.right:.1f}" '
               f'y1="{frame.bottom:.1f}" y2="{frame.bottom:.1f}"/>')
    canvas.add(f'<line class="axis" x1="{frame.left:.1f}" x2="{frame.left:.1f}" '
               f'y1="{frame.top:.1f}" y2="{frame.bottom:.1f}"/>')
    canvas.text((frame.left + frame.right) / 2, canvas.height - 6, x_label, cls="axis-label", anchor="middle")
    canvas.text(14, (frame.top + frame.bottom) / 2, y_label, cls="axis-label", anchor="middle", rotate=-90)
