"""The SVG charts' own rules that pages rely on."""

from __future__ import annotations

from app.plots.heatmap import matrix_heatmap


def test_r2_heatmap_prints_short_values_and_marks_missing_cells():
    svg = str(matrix_heatmap([[-0.215014, 0.5], [None, 1.0]], ["a", "b"], ["a", "b"], title="R²",
                             row_title="from", col_title="into", lo=-0.215014, hi=1.0))
    assert ">-0.22<" in svg and "0.215014" not in svg  # legend ends, rounded like the cells
    assert ">0.50<" in svg and ">–<" in svg
    assert "a → b: 0.50" in svg  # each cell names its pair in a tooltip
