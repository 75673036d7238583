"""A labelled matrix heatmap (the M x M R² matrix)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

from app.plots.colors import blues, hex_color, text_color_on
from app.plots.svg import DESKTOP, PHONE_WIDTH, Canvas, text_width


def matrix_heatmap(matrix: Sequence[Sequence[float | None]], row_labels: Sequence[str],
                   col_labels: Sequence[str], *, title: str, row_title: str, col_title: str,
                   value_label: str, lo: float = 0.0, hi: float = 1.0) -> Markup:
    """Cells coloured on [lo, hi] with their value printed inside, a colour legend below named
    `value_label`; missing values are grey. Drawn twice, as designed and for phones (static/app.css
    shows one): on a phone the designed matrix shrank its names to about 8 px, and at a readable
    size their 45-degree slant leaves the cells no room, so there they run upwards."""
    args = (matrix, row_labels, col_labels)
    kwargs = dict(title=title, row_title=row_title, col_title=col_title, value_label=value_label, lo=lo, hi=hi)
    return _heatmap(*args, **kwargs, phone=False) + _heatmap(*args, **kwargs, phone=True)


def _heatmap(matrix: Sequence[Sequence[float | None]], row_labels: Sequence[str], col_labels: Sequence[str], *,
             title: str, row_title: str, col_title: str, value_label: str, lo: float, hi: float,
             phone: bool) -> Markup:
    n_rows, n_cols = len(row_labels), len(col_labels)
    if phone:
        # Laid out for the phone's width at the page's type sizes: each name's estimated width,
        # the column names upright, the cells as large as the rest of the width allows.
        label_w = 10 + math.ceil(max((text_width(s, DESKTOP.tick) for s in row_labels), default=30))
        names_h = math.ceil(max((text_width(s, DESKTOP.tick) for s in col_labels), default=30))
        left, top = label_w + 22, 34 + names_h
        cell = min(64, max(44, int((PHONE_WIDTH - left - 10) / max(n_cols, 1))))
        width, angle, css = left + n_cols * cell + 10, -90, "chart chart-heatmap layout-phone"
    else:
        cell = 64 if max(n_rows, n_cols) <= 6 else 40
        label_w = 10 + 7 * max((len(s) for s in row_labels), default=4)
        # Column names are drawn at 45 degrees so long model names never run into each other.
        slant = 0.71 * 7 * max((len(s) for s in col_labels), default=4)
        left, top = label_w + 22, 34 + slant
        # Only names that run past the last column widen the chart (a short last name, as
        # mobilenet_v2 after efficientnet_lite0, left a blank strip that pushed the matrix off centre).
        reach = max((left + (j + 0.5) * cell + 0.71 * 7 * len(s) for j, s in enumerate(col_labels)), default=0)
        width, angle, css = max(left + n_cols * cell, reach) + 10, -45, "chart chart-heatmap layout-designed"
    bottom = top + n_rows * cell
    canvas = Canvas(width, bottom + 44, title, css)
    _legend(canvas, left, bottom + 14, n_cols * cell - 2, lo, hi, value_label)
    canvas.text(left + n_cols * cell / 2, 14, col_title, cls="axis-label", anchor="middle")
    canvas.text(12, top + n_rows * cell / 2, row_title, cls="axis-label", anchor="middle", rotate=-90)
    for j, name in enumerate(col_labels):
        # Upright, a name's glyphs lie left of its baseline: moved right to centre them over the column.
        x = left + (j + 0.5) * cell + (0.35 * DESKTOP.tick if phone else 0)
        canvas.text(x, top - 8, name, cls="tick", anchor="start", rotate=angle)
    for i, name in enumerate(row_labels):
        canvas.text(left - 6, top + (i + 0.5) * cell + 4, name, cls="tick", anchor="end")
        for j in range(n_cols):
            value = matrix[i][j]
            x, y = left + j * cell, top + i * cell
            if value is None or not math.isfinite(value):
                fill, ink, shown = "#e5e7eb", "#6b7280", "–"
            else:
                rgb = blues((value - lo) / (hi - lo) if hi > lo else 0.5)
                fill, ink, shown = hex_color(rgb), text_color_on(rgb), f"{value:.2f}"
            tip = escape(f"{name} → {col_labels[j]}: {shown}")
            canvas.add(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" rx="3" fill="{fill}">'
                       f"<title>{tip}</title></rect>")
            canvas.text(x + (cell - 2) / 2, y + (cell - 2) / 2 + 4, shown, cls="cell-value", anchor="middle", fill=ink)
    return canvas.markup()


def _legend(canvas: Canvas, x: float, y: float, width: float, lo: float, hi: float, label: str,
            steps: int = 24) -> None:
    """A colour bar from lo to hi with its end values and, between them, what it measures."""
    step_w = width / steps
    for i in range(steps):
        colour = hex_color(blues(i / (steps - 1)))
        canvas.add(f'<rect x="{x + i * step_w:.1f}" y="{y:.1f}" width="{step_w + 0.5:.1f}" height="8" fill="{colour}"/>')
    canvas.text(x, y + 22, f"{lo:.2g}", cls="tick")  # the ends are data values: -0.215014 reads as noise
    canvas.text(x + width, y + 22, f"{hi:.2g}", cls="tick", anchor="end")
    canvas.text(x + width / 2, y + 22, label, cls="axis-label", anchor="middle")
