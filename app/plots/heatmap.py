"""A labelled matrix heatmap (the M x M R² matrix)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

from app.plots.colors import blues, hex_color, text_color_on
from app.plots.svg import Canvas


def matrix_heatmap(matrix: Sequence[Sequence[float | None]], row_labels: Sequence[str],
                   col_labels: Sequence[str], *, title: str, row_title: str, col_title: str,
                   value_label: str, lo: float = 0.0, hi: float = 1.0) -> Markup:
    """Cells coloured on [lo, hi] with their value printed inside, a colour legend below named
    `value_label`; missing values are grey."""
    n_rows, n_cols = len(row_labels), len(col_labels)
    cell = 64 if max(n_rows, n_cols) <= 6 else 40
    label_w = 10 + 7 * max((len(s) for s in row_labels), default=4)
    # Column names are drawn at 45 degrees so long model names never run into each other.
    slant = 0.71 * 7 * max((len(s) for s in col_labels), default=4)
    left, top = label_w + 22, 34 + slant
    bottom = top + n_rows * cell
    canvas = Canvas(left + n_cols * cell + 10 + slant, bottom + 44, title, "chart chart-heatmap")
    _legend(canvas, left, bottom + 14, n_cols * cell - 2, lo, hi, value_label)
    canvas.text(left + n_cols * cell / 2, 14, col_title, cls="axis-label", anchor="middle")
    canvas.text(12, top + n_rows * cell / 2, row_title, cls="axis-label", anchor="middle", rotate=-90)
    for j, name in enumerate(col_labels):
        canvas.text(left + (j + 0.5) * cell, top - 8, name, cls="tick", anchor="start", rotate=-45)
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
