"""The charts of each page, built from the page's data (templates call these by name)."""

from __future__ import annotations

from markupsafe import Markup

from app.formatting import measure
from app.plots import ScatterPoint, histogram, line_chart, matrix_heatmap, scatter
from app.schemas.compare import Comparison
from app.schemas.concepts import ModelColumn
from app.schemas.runs import RunOverview
from app.urls import Urls


def _name(index: int, label: str) -> str:
    return f"#{index} {label}" if label else f"#{index}"


def r2_matrix(overview: RunOverview) -> Markup:
    names = [m.name for m in overview.run.models]
    values = [v for row in overview.r2 for v in row if v is not None]
    return matrix_heatmap(overview.r2, names, names, title="R² matrix: encode from the row model, decode into the column model",
                          row_title="encode from", col_title="decode into", value_label="R²",
                          lo=min([0.0, *values]), hi=1.0)


def training_loss(overview: RunOverview) -> Markup:
    t = overview.training
    positive = [v for v in t.loss if v is not None and v > 0]
    # A log axis only where the loss spans more than 20x; a narrow range reads better linear.
    log = bool(positive) and max(positive) > 20 * min(positive)
    return line_chart(t.step, {"loss": t.loss}, title="Training loss at each logged step", x_label="step",
                      y_label="loss (log)" if log else "loss", log_y=log)


def training_r2(overview: RunOverview) -> Markup:
    t = overview.training
    return line_chart(t.step, t.r2, title="Batch R² of each model at each logged step (from that step's source model)",
                      x_label="step", y_label="batch R²")


def entropy_histogram(overview: RunOverview) -> Markup:
    h = overview.entropy_histogram
    return histogram(h.counts, h.edges, title="Firing entropy of the live concepts", y_label="concepts",
                     x_label="firing entropy (0 = one model, 1 = all models equally)", width=460, height=300,
                     highlight_from=overview.universal_threshold)


def cofire_energy(overview: RunOverview, urls: Urls) -> Markup:
    points = [ScatterPoint(c.energy, c.cofire,
                           f"{_name(c.index, c.label)} · energy {measure(c.energy)} · co-fire {c.cofire:.2f}",
                           urls.concept(overview.run.id, c.index),
                           highlight=c.firing_entropy >= overview.universal_threshold)
              for c in overview.cofire_energy]
    return scatter(points, title="Co-fire proportion against energy, one point per concept",
                   x_label="energy (log scale)", y_label="co-fire proportion", log_x=True, width=460, height=320)


def activation_histogram(column: ModelColumn, columns: list[ModelColumn]) -> Markup:
    """One model's histogram on the axes of every model of the page (`columns`): the activation
    range of them all, and the height of their tallest bar. The same activation then sits at the
    same place and the same token count draws the same height in every column, so a model that
    rarely fires shows low bars, not full ones (each model's range and height had its own axes)."""
    drawn = [c for c in columns if c.histogram_counts]
    tallest = max((max(c.histogram_counts) for c in drawn), default=1)
    span = (min(c.histogram_edges[0] for c in drawn), max(c.histogram_edges[-1] for c in drawn)) if drawn else None
    return histogram(column.histogram_counts, column.histogram_edges, compact=True, log_x=True, width=440,
                     height=140, title=f"Distribution of this concept's non-zero activations in {column.model}",
                     x_label="activation", y_label="tokens", y_max=tallest, x_span=span)


def frequency_scatter(comparison: Comparison, urls: Urls) -> Markup:
    a, b = comparison.model_a, comparison.model_b
    points = [ScatterPoint(p.frequency_a, p.frequency_b,
                           f"{_name(p.index, p.label)} · {a} {p.frequency_a:.2%} · {b} {p.frequency_b:.2%}",
                           urls.concept(comparison.run.id, p.index), group=p.group.replace("_", "-") or "between")
              for p in comparison.points]
    return scatter(points, title=f"Per-concept firing frequency in {a} against {b}", x_label=f"firing frequency in {a}",
                   y_label=f"firing frequency in {b}", log_x=True, log_y=True, diagonal=True, width=620, height=520)
