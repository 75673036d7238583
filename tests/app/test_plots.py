"""The SVG charts' own rules that pages rely on."""

from __future__ import annotations

from app.plots.heatmap import matrix_heatmap


def test_r2_heatmap_prints_short_values_and_marks_missing_cells():
    svg = str(matrix_heatmap([[-0.215014, 0.5], [None, 1.0]], ["a", "b"], ["a", "b"], title="R²",
                             row_title="from", col_title="into", value_label="R² of reconstruction", lo=-0.215014,
                             hi=1.0))
    assert ">-0.22<" in svg and "0.215014" not in svg  # legend ends, rounded like the cells
    assert ">R² of reconstruction<" in svg  # the colour bar says what it measures
    assert ">0.50<" in svg and ">–<" in svg
    assert "a → b: 0.50" in svg  # each cell names its pair in a tooltip


def test_log_axes_label_narrow_ranges_in_1_2_5_steps():
    from app.plots.svg import Scale

    def ticks(lo, hi):
        return [round(t, 9) for t in Scale(lo, hi, 0, 100, log=True).ticks()]

    assert ticks(0.001, 1000) == [0.001, 0.01, 0.1, 1, 10, 100, 1000]  # wide: powers of ten only
    assert ticks(0.05, 3) == [0.05, 0.1, 0.2, 0.5, 1, 2]  # one decade and a bit: 1-2-5
    assert ticks(0.3, 0.9) == [0.5]


def test_line_chart_draws_each_series_with_gaps_and_a_key():
    from app.plots.lines import line_chart

    svg = str(line_chart([1, 2, 3, 4], {"vit<s>": [0.1, 0.2, None, 0.4], "dino": [0.3, 0.3, 0.3, 0.3]},
                         title="t", x_label="step", y_label="R²"))
    assert svg.count("<polyline") == 2  # vit: a one-point run after the gap is a dot, not a line
    assert ">vit&lt;s&gt;<" in svg and ">dino<" in svg  # key, escaped
    assert "vit&lt;s&gt; at step 4: 0.4" in svg  # the final value is marked
    log = str(line_chart([1, 2, 3], {"loss": [1.0, 0.0, 0.1]}, title="t", x_label="step", y_label="loss", log_y=True))
    assert log.count("<polyline") == 0 and log.count("<circle") == 3  # zero cannot sit on a log axis: 2 dots + end
    assert "no data" in str(line_chart([], {"loss": []}, title="t", x_label="x", y_label="y"))
