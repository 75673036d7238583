"""A bar histogram from precomputed bin counts and edges."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

from app.plots.svg import Canvas, Frame, Scale, draw_axes, fmt


MIN_BAR_PX = 2.0


def histogram(counts: Sequence[float], edges: Sequence[float], *, title: str, x_label: str,
              y_label: str = "count", width: int = 560, height: int = 240, compact: bool = False,
              log_x: bool = False, y_max: float | None = None,
              x_span: tuple[float, float] | None = None, highlight_from: float | None = None) -> Markup:
    """`edges` has one more entry than `counts` (positive, for `log_x`, e.g. geometric bins).
    `compact` draws a small chart without axis titles (used once per model on the concept page);
    `y_max` and `x_span` put several charts on the same axes (covering at least their own bars).
    Bins from `highlight_from` up are drawn in the highlight colour (the scatter's). A bin with
    any count is at least `MIN_BAR_PX` tall: on axes shared with a far taller chart, a model
    that fires on a few tokens would otherwise show an empty frame."""
    if len(edges) != len(counts) + 1:
        raise ValueError(f"histogram needs len(edges) == len(counts) + 1, got {len(edges)} and {len(counts)}")
    canvas = Canvas(width, height, title, "chart chart-histogram" + (" compact" if compact else ""))
    frame = Frame(left=44 if compact else 60, top=10, right=width - 12, bottom=height - (24 if compact else 40))
    if not counts:
        canvas.text(width / 2, height / 2, "no data", cls="empty", anchor="middle")
        return canvas.markup()
    x_lo, x_hi = float(edges[0]), float(edges[-1])
    if x_span is not None:
        x_lo, x_hi = min(x_lo, float(x_span[0])), max(x_hi, float(x_span[1]))
    xs = Scale(x_lo, x_hi, frame.left, frame.right, log=log_x)
    ys = Scale(0.0, max(float(max(counts)), float(y_max or 0), 1.0), frame.bottom, frame.top)
    draw_axes(canvas, frame, xs, ys, x_label="" if compact else x_label, y_label="" if compact else y_label,
              x_ticks=4 if compact else 6, y_ticks=3 if compact else 4)
    for count, left_edge, right_edge in zip(counts, edges[:-1], edges[1:]):
        x0, x1 = xs(float(left_edge)), xs(float(right_edge))
        y = min(ys(float(count)), frame.bottom - MIN_BAR_PX) if count > 0 else frame.bottom
        tip = escape(f"{fmt(float(left_edge))}–{fmt(float(right_edge))}: {fmt(float(count))}")
        cls = "bar highlight" if highlight_from is not None and left_edge >= highlight_from - 1e-9 else "bar"
        canvas.plot(f'<rect class="{cls}" x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 0.5):.1f}" '
                   f'height="{frame.bottom - y:.1f}"><title>{tip}</title></rect>')
    return canvas.markup()
