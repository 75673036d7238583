"""The SVG charts' own rules that pages rely on."""

from __future__ import annotations

import re

import pytest

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
    # Narrower than one 1-2-5 step: round linear steps (a concept's activations from 6.0 to 6.37
    # used to leave its histogram's x axis without a single label).
    assert ticks(0.3, 0.9) == [0.4, 0.6, 0.8]
    assert ticks(6.0, 6.37) == [6.0, 6.1, 6.2, 6.3]


def test_line_chart_draws_each_series_with_gaps_and_a_key():
    from app.plots.lines import line_chart

    svg = str(line_chart([1, 2, 3, 4], {"vit<s>": [0.1, 0.2, None, 0.4], "dino": [0.3, 0.3, 0.3, 0.3]},
                         title="t", x_label="step", y_label="R²"))
    assert svg.count("<polyline") == 2  # vit: a one-point run after the gap is a dot, not a line
    key = svg[svg.index('<p class="small muted chart-legend series-key">'):]  # page text after the chart
    assert svg.index("</svg>") < svg.index(key) and " vit&lt;s&gt;</span>" in key and " dino</span>" in key
    colours = re.findall(r'<polyline class="series" points="[^"]+" fill="none" stroke="([^"]+)"', svg)
    assert re.findall(r'style="background: ([^"]+)"', key) == [colours[0], colours[-1]]  # in series order
    assert "chart-legend" not in str(line_chart([1, 2], {"loss": [1.0, 0.5]}, title="t", x_label="x", y_label="y"))
    assert "vit&lt;s&gt; at step 4: 0.4" in svg  # the final value is marked
    log = str(line_chart([1, 2, 3], {"loss": [1.0, 0.0, 0.1]}, title="t", x_label="step", y_label="loss", log_y=True))
    assert log.count("<polyline") == 0 and log.count("<circle") == 3  # zero cannot sit on a log axis: 2 dots + end
    assert "no data" in str(line_chart([], {"loss": []}, title="t", x_label="x", y_label="y"))


def test_line_chart_axis_ends_on_a_label():
    from app.plots.lines import line_chart

    series = {"vit": [0.1, 0.5, 0.93], "dino": [0.0, 0.45, 0.91], "clip": [0.05, 0.4, 0.9]}
    svg = str(line_chart([0, 10, 20], series, title="t", x_label="step", y_label="R²"))
    assert ">1<" in svg and ">0<" in svg  # R² of 0 to 0.93 is drawn on 0 to 1, both ends labelled


def test_a_chart_tells_css_its_designed_width():
    svg = str(matrix_heatmap([[1.0]], ["a"], ["a"], title="t", row_title="r", col_title="c", value_label="v"))
    width = re.search(r'viewBox="0 0 ([\d.]+) ', svg).group(1)
    # app.css reads it as the chart's max-width: never drawn wider than designed, so text keeps its size.
    assert f"--chart-w: {width}px" in svg


def test_linear_ticks_are_round_and_about_as_many_as_asked():
    from app.plots.svg import nice_ticks

    assert nice_ticks(0, 1.05) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]  # was 0, 0.5, 1: too few to read a value off
    assert nice_ticks(0, 60) == [0, 10, 20, 30, 40, 50, 60]
    for lo, hi in ((0, 0.88), (0, 7), (0, 13), (-3, 250), (0.3, 0.31), (1e-3, 2e-3)):
        ticks = nice_ticks(lo, hi)
        steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:])}
        assert 3 <= len(ticks) <= 8 and len(steps) == 1, (lo, hi, ticks)
        assert lo <= ticks[0] and ticks[-1] <= hi * (1 + 1e-9) + 1e-12, (lo, hi, ticks)


def test_tick_labels_read_alike_along_a_log_axis():
    from app.plots.svg import fmt

    assert [fmt(v) for v in (1e-4, 1e-3, 0.01, 0.25, 1, 1200, 3e6)] == ["0.0001", "0.001", "0.01", "0.25", "1", "1.2k", "3M"]
    assert fmt(3e-5) == "3e-05" and fmt(0) == "0"


def test_measured_values_keep_three_significant_digits_with_their_zeros():
    """A column of energies or activations lines up: 0.270, not 0.27, beside 0.0829 and 1.07."""
    from app.formatting import measure

    values = [0.27, 0.0829, 1.07, 150.0, 999.7, -999.9, 1234.5, 0.0, 12.345, 0.000123, -0.5]
    assert [measure(v) for v in values] == ["0.270", "0.0829", "1.07", "150", "1,000", "-1,000", "1,234", "0.00",
                                            "12.3", "0.000123", "-0.500"]


def test_thumbnail_captions_keep_both_ends_of_a_long_model_name():
    """Names of one family differ at the end: cut at the end they read alike ("vit_base_p…")."""
    from app.formatting import short_name

    names = ["vit_small_patch14_dinov2", "vit_base_patch16_siglip_224", "vit_base_patch16_224", "efficientnet_lite0",
             "mobilenet_v2", "hed_vgg16"]
    short = [short_name(n) for n in names]
    assert short == ["vit_s…_dinov2", "vit_b…lip_224", "vit_b…h16_224", "effic…t_lite0", "mobilenet_v2", "hed_vgg16"]
    assert len(set(short)) == len(names) and all(len(s) <= 13 for s in short)


def test_percentages_keep_one_rule_for_digits():
    from app.templating import _percent

    values = (0, 0.0999, 0.11, 0.0123, 0.004, 0.0046, 0.00999, 0.000171, 0.26)
    assert [_percent(v) for v in values] == ["0%", "10%", "11%", "1.2%", "0.40%", "0.46%", "1.0%", "0.017%", "26%"]


def _bar_heights(svg: str) -> list[float]:
    return [float(h) for h in re.findall(r'<rect class="bar"[^>]* height="([\d.]+)"', svg)]


def test_a_concepts_histograms_share_one_activation_axis_and_one_height_scale():
    """The concept page's columns compare: one activation axis over every model's bins (0.2-5
    beside 0.02-5 before), and one token count draws one height in every column (122 tokens drew
    as tall as 8,801)."""
    from app.charts import activation_histogram
    from app.schemas.concepts import ModelColumn, ModelFiring

    def column(name: str, edges: list[float], counts: list[int]) -> ModelColumn:
        return ModelColumn(model=name, family="f", top_images=[], neighbours=[], cam_image=None,
                           firing=ModelFiring(model=name, fire_count=sum(counts), frequency=0.1, share=0.5, cofire=0.0,
                                              max_activation=1.0),
                           histogram_edges=edges, histogram_counts=counts)

    edges = [0.01 * 2 ** i for i in range(13)]
    rare = column("rare", edges[7:10], [600, 620])  # as mined: each model's bins trimmed to its own
    busy = column("busy", edges[3:11], [5, 40, 800, 4000, 3000, 900, 56])
    never = column("never", [], [])
    columns = [rare, busy, never]
    rare_svg, busy_svg = (str(activation_histogram(c, columns)) for c in (rare, busy))
    assert max(_bar_heights(busy_svg)) / max(_bar_heights(rare_svg)) == pytest.approx(4000 / 620, rel=0.01)

    def bar_spans(svg: str) -> list[tuple[float, float]]:
        return [(float(x), float(x) + float(w)) for x, w in
                re.findall(r'<rect class="bar" x="([\d.]+)" y="[\d.]+" width="([\d.]+)"', svg)]

    # The same bin lands on the same pixels in both charts.
    assert bar_spans(rare_svg) == pytest.approx(bar_spans(busy_svg)[4:6], abs=0.15)
    alone = str(activation_histogram(rare, [rare]))  # on its own axes it fills the width instead
    assert bar_spans(alone)[0][0] < bar_spans(rare_svg)[0][0] - 100


def test_a_bin_with_a_few_tokens_stays_visible_beside_a_far_taller_one_and_empty_bins_stay_empty():
    """Concept pages share one height scale: a model that fires on 10 tokens beside one that
    fires on 12,000 drew an empty frame."""
    from app.plots.histogram import MIN_BAR_PX, histogram

    svg = str(histogram([10, 0, 3], [0.1, 0.2, 0.4, 0.8], title="t", x_label="x", y_max=12_000, height=140,
                        compact=True))
    heights = _bar_heights(svg)
    assert heights[0] == pytest.approx(MIN_BAR_PX) and heights[2] == pytest.approx(MIN_BAR_PX) and heights[1] == 0
    tall = _bar_heights(str(histogram([12_000, 6_000], [1, 2, 3], title="t", x_label="x", height=140, compact=True)))
    assert tall[0] == pytest.approx(2 * tall[1], rel=0.01)  # proportional where the bars are visible anyway


def test_the_entropy_histogram_colours_the_universal_bins_as_the_scatter_does():
    from app.plots.histogram import histogram

    edges = [i / 20 for i in range(21)]  # np.histogram's edges: 0.8 may come out as 0.8000000000000002
    edges[16] = 0.7999999999999999
    svg = str(histogram([1] * 20, edges, title="t", x_label="x", highlight_from=0.8))
    classes = re.findall(r'<rect class="([^"]+)" x=', svg)
    assert classes == ["bar"] * 16 + ["bar highlight"] * 4


def test_a_scatter_is_one_tab_stop_entered_at_its_leftmost_linked_point():
    from app.plots.scatter import ScatterPoint, scatter

    points = [ScatterPoint(0.5, 0.2, "concept 1 <b>", href="/c/1"), ScatterPoint(0.1, 0.9, "concept 2", href="/c/2"),
              ScatterPoint(0.05, 0.3, "no page"), ScatterPoint(0.1, 0.4, "concept 4", href="/c/4")]
    svg = str(scatter(points, title="t", x_label="x", y_label="y"))
    stops = re.findall(r'<a href="([^"]+)" tabindex="(-?\d)"', svg)
    assert sorted(stops) == [("/c/1", "-1"), ("/c/2", "-1"), ("/c/4", "0")]  # leftmost, then lowest
    assert 'aria-label="concept 1 &lt;b&gt;"' in svg  # a screen reader hears what the tooltip says
    assert "<b>" not in svg


def _phone_text(svg: str) -> tuple[float, float, list[tuple[str, float, list[float]]]]:
    """A chart's size and its phone layout's text (the `axes-phone` group) as (text, font size,
    [left, right, top, bottom]) in chart units, from the layout's own width estimates."""
    from app.plots.svg import text_width

    width, height = (float(v) for v in re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg).groups())
    sizes = {"tick": float(re.search(r"--phone-tick: ([\d.]+)px", svg).group(1)),
             "axis-label": float(re.search(r"--phone-label: ([\d.]+)px", svg).group(1))}
    group = re.search(r'<g class="axes-phone">(.*?)</g>', svg).group(1)
    texts = []
    for x, y, cls, anchor, rotated, content in re.findall(
            r'<text x="([\d.-]+)" y="([\d.-]+)" class="([^"]+)" text-anchor="(\w+)"( transform="rotate\(-90[^"]*")?>([^<]*)</text>',
            group):
        x, y, size = float(x), float(y), sizes[cls]
        w = text_width(content, size, bold=cls == "axis-label")
        start = {"start": 0.0, "middle": -w / 2, "end": -w}[anchor]
        across = [-0.93 * size, 0.24 * size]  # the line box around the baseline
        if rotated:  # reads upwards: along the text is up the chart, its glyphs left of the baseline
            box = [x + across[0], x + across[1], y - start - w, y - start]
        else:
            box = [x + start, x + start + w, y + across[0], y + across[1]]
        texts.append((content, size, box))
    return width, height, texts


@pytest.mark.parametrize("chart", ["compare", "cofire", "entropy", "loss", "r2", "activation"])
def test_a_charts_phone_layout_sets_its_text_larger_and_keeps_every_label_clear(chart):
    """A chart drawn about 290 px wide on a phone showed its text at 6 or 7 px; set larger in the
    designed margins, its axis labels ran into each other. Its phone layout sets the text at 11 px
    (at 290 px) in margins made for it, and scales the plot into the rest, uniformly."""
    from app.plots import histogram, line_chart, scatter
    from app.plots.scatter import ScatterPoint
    from app.plots.svg import PHONE_WIDTH

    points = [ScatterPoint(10 ** (-4 + i / 10), 10 ** (-3.5 + i / 12), f"#{i}", href=f"/c/{i}") for i in range(40)]
    svg = str({
        "compare": lambda: scatter(points, title="t", x_label="firing frequency in efficientnet_lite0",
                                   y_label="firing frequency in hed_vgg16", log_x=True, log_y=True, diagonal=True,
                                   width=620, height=520),
        "cofire": lambda: scatter([ScatterPoint(0.001 * 3 ** i, i / 20, "p") for i in range(15)], title="t",
                                  x_label="energy (log scale)", y_label="co-fire proportion", log_x=True, width=460,
                                  height=320),
        "entropy": lambda: histogram([3, 5, 60, 1200, 12], [0, 0.2, 0.4, 0.6, 0.8, 1.0], title="t", y_label="concepts",
                                     x_label="firing entropy (0 = one model, 1 = all models equally)", width=460,
                                     height=300),
        "loss": lambda: line_chart(list(range(50, 650, 50)), {"loss": [1.9 - i / 20 for i in range(12)]}, title="t",
                                   x_label="step", y_label="loss"),
        "r2": lambda: line_chart(list(range(50, 650, 50)), {m: [i / 12 - 0.2 for i in range(12)] for m in "abc"},
                                 title="t", x_label="step", y_label="batch R²"),
        "activation": lambda: histogram([4, 4000, 12_000, 90], [0.05, 0.2, 1, 3, 6], title="t", x_label="activation",
                                        y_label="tokens", compact=True, log_x=True, width=440, height=140),
    }[chart]())
    width, height, texts = _phone_text(svg)
    assert len(texts) >= 5
    for content, size, _ in texts:
        assert size * PHONE_WIDTH / width >= 11 - 1e-6, (content, size)  # at least 11 px when drawn 290 px wide
    for content, _, (left, right, top, bottom) in texts:
        assert 0 <= left and right <= width and 0 <= top and bottom <= height, (content, left, right, top, bottom)
    clashes = [(a, b) for i, (a, _, p) in enumerate(texts) for b, _, q in texts[i + 1:]
               if p[0] < q[1] and q[0] < p[1] and p[2] < q[3] and q[2] < p[3]]
    assert not clashes, clashes
    # The plot's marks, drawn once, go into the phone's frame by one uniform scale (points stay round).
    a, d = re.search(r"--phone-plot: matrix\(([\d.]+), 0, 0, ([\d.]+),", svg).groups()
    assert a == d and 0.5 < float(a) <= 1
    # The designed layout is the one it always was: y title 14 from the left, x title 6 above the bottom.
    designed = re.search(r'<g class="axes-designed">(.*?)</g>', svg).group(1)
    if chart != "activation":
        assert f'<text x="14.0" y=' in designed and f'y="{height - 6:.1f}" class="axis-label"' in designed


def test_the_r2_matrix_has_a_phone_twin_with_upright_names_at_the_page_size():
    """At a readable size on a phone the 45-degree names left the cells no room: the twin drawn for
    the phone's width writes them upwards and keeps the cells large enough for their values."""
    from app.plots.svg import PHONE_WIDTH

    names = ["efficientnet_lite0", "hed_vgg16", "mobilenet_v2"]
    both = str(matrix_heatmap([[0.6, 0.3, 0.5]] * 3, names, names, title="t", row_title="encode from",
                              col_title="decode into", value_label="R²"))
    designed, phone = re.findall(r"<svg .*?</svg>", both)
    assert 'class="chart chart-heatmap layout-designed"' in designed and "rotate(-45" in designed
    assert 'class="chart chart-heatmap layout-phone"' in phone and "rotate(-45" not in phone
    assert phone.count("rotate(-90") == 4  # the row title and the three column names
    width = float(re.search(r'viewBox="0 0 ([\d.]+) ', phone).group(1))
    cell = float(re.search(r'<rect x="[\d.]+" y="[\d.]+" width="([\d.]+)" height="[\d.]+" rx="3"', phone).group(1))
    assert width <= PHONE_WIDTH and cell >= 40  # drawn at the page's type sizes; "0.62" fits a cell
