"""A line chart of a few named series over a shared x axis (training curves)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

from app.plots.colors import series_color
from app.plots.svg import Canvas, Frame, Scale, draw_axes, fmt, nice_ticks

Y_TICKS = 5


def line_chart(xs: Sequence[float], series: dict[str, Sequence[float | None]], *, title: str, x_label: str,
               y_label: str, log_y: bool = False, width: int = 600, height: int = 280) -> Markup:
    """One polyline per series (a gap where a value is missing, or not positive on a log axis);
    with more than one series, their colour key follows as HTML (`series_key`)."""
    canvas = Canvas(width, height, title, "chart chart-lines")
    frame = Frame(left=60, top=12, right=width - 14, bottom=height - 40)

    def usable(v: float | None) -> bool:
        return v is not None and math.isfinite(v) and (v > 0 or not log_y)

    values = [v for ys in series.values() for v in ys if usable(v)]
    if not xs or not values:
        canvas.text(width / 2, height / 2, "no data", cls="empty", anchor="middle")
        return canvas.markup()
    lo, hi = min(values), max(values)
    if lo == hi:
        lo, hi = (lo / 2, hi * 2) if log_y else (lo - 1, hi + 1)
    if not log_y:  # end the axis on round ticks, so its top is labelled (R² reaches 1, not 0.97)
        ticks = nice_ticks(lo, hi, Y_TICKS)
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 0
        if step:
            lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    x_scale = Scale(float(min(xs)), float(max(xs)), frame.left, frame.right)
    y_scale = Scale(lo, hi, frame.bottom, frame.top, log=log_y)
    draw_axes(canvas, frame, x_scale, y_scale, x_label=x_label, y_label=y_label, y_ticks=Y_TICKS)
    for i, (name, ys) in enumerate(series.items()):
        colour = series_color(i)
        for run in _runs(xs, ys, usable):
            points = " ".join(f"{x_scale(x):.1f},{y_scale(y):.1f}" for x, y in run)
            if len(run) == 1:
                x, y = run[0]
                canvas.plot(f'<circle cx="{x_scale(x):.1f}" cy="{y_scale(y):.1f}" r="2.5" fill="{colour}"/>')
            else:
                canvas.plot(f'<polyline class="series" points="{points}" fill="none" stroke="{colour}" '
                           f'stroke-width="1.8"><title>{escape(name)}</title></polyline>')
        last = next(((x, y) for x, y in zip(reversed(xs), reversed(ys)) if usable(y)), None)
        if last is not None:  # the final value, where a reader looks first
            canvas.plot(f'<circle cx="{x_scale(last[0]):.1f}" cy="{y_scale(last[1]):.1f}" r="3" fill="{colour}">'
                       f"<title>{escape(f'{name} at step {fmt(last[0])}: {last[1]:.4g}')}</title></circle>")
    chart = canvas.markup()
    return chart + series_key(list(series)) if len(series) > 1 else chart


def series_key(names: Sequence[str]) -> Markup:
    """The colour key of a line chart's series, as page text: it wraps and keeps the page's type
    size at any width (drawn in the SVG, it shrank with the chart to about 7 px on a phone)."""
    keys = "".join(f'<span class="nowrap"><span class="swatch line" style="background: {series_color(i)}"></span> '
                   f"{escape(name)}</span> " for i, name in enumerate(names))
    return Markup(f'<p class="small muted chart-legend series-key">{keys.rstrip()}</p>')


def _runs(xs: Sequence[float], ys: Sequence[float | None], usable) -> list[list[tuple[float, float]]]:
    """Consecutive usable points, split where a value is missing."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(xs, ys):
        if usable(y):
            runs[-1].append((float(x), float(y)))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]
