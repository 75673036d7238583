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


PHONE_WIDTH = 290
"""CSS px a phone gives a chart: a 320 to 430 px screen less the page's and the panel's padding
leaves 255 to 365 (static/app.css switches to the phone layout at 600 px and below)."""


@dataclass(frozen=True)
class Type:
    """Font sizes of a chart's tick labels and axis titles, in the chart's own units."""

    tick: float = 11.0
    label: float = 12.0

    @classmethod
    def for_phone(cls, width: float) -> Type:
        """The sizes that a chart `width` units wide, drawn PHONE_WIDTH px wide, shows at 11 px (ticks)
        and 11.5 px (bold titles): drawn narrower than designed, its text shrinks with it (the designed
        11 units were 6 px on a phone)."""
        k = max(width, PHONE_WIDTH) / PHONE_WIDTH
        return cls(tick=math.ceil(110 * k) / 10, label=math.ceil(115 * k) / 10)  # as app.css gets them


DESKTOP = Type()
"""The sizes static/app.css gives a chart's text; the designed layouts place text for them."""

# Advance widths in em of DejaVu Sans, the widest of the fonts a browser picks for the page's
# sans-serif stack (Chromium on Linux falls back to it); others default to an upper-case width.
_EM = {**dict.fromkeys("0123456789", 0.636), **dict.fromkeys(".,:;' ", 0.318), "i": 0.278, "j": 0.278,
       "l": 0.278, "f": 0.352, "t": 0.392, "r": 0.411, "s": 0.521, "z": 0.525, "c": 0.55, "k": 0.579,
       "v": 0.592, "x": 0.592, "y": 0.592, "a": 0.613, "e": 0.615, "o": 0.612, "w": 0.818, "m": 0.974,
       "-": 0.361, "_": 0.5, "(": 0.39, ")": 0.39, "=": 0.838, "+": 0.838, "²": 0.401, "%": 0.95,
       "–": 0.5, "→": 0.838, "#": 0.838, "·": 0.318}
_EM.update(dict.fromkeys("bdghnpqu", 0.634))


def text_width(text: str, size: float, *, bold: bool = False) -> float:
    """A generous estimate of `text`'s width at font size `size` (bold text is about 13% wider)."""
    return sum(_EM.get(ch, 0.72) for ch in text) * size * (1.15 if bold else 1.0)


def wrap(text: str, size: float, width: float, *, bold: bool = False) -> list[str]:
    """`text` in lines of at most `width` (between words; a single longer word keeps its line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(f"{lines[-1]} {word}", size, bold=bold) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


@dataclass
class Canvas:
    """An SVG document scaled to its container's width (viewBox), with an accessible title.

    Charts on x/y axes (`draw_axes`) hold two layouts: the designed one, and one for phones with
    larger text in wider margins; static/app.css shows one of them. Their marks (points, bars,
    lines: `plot`) are drawn once, for the designed frame, and scaled into the phone's frame by
    a CSS transform (uniform, so points stay round)."""

    width: int | float
    height: int | float
    title: str
    css_class: str = "chart"
    parts: list[str] = field(default_factory=list)
    plot_parts: list[str] = field(default_factory=list)
    phone_transform: str | None = None

    def add(self, element: str) -> None:
        self.parts.append(element)

    def plot(self, element: str) -> None:
        """A mark of the data, inside the plot area (moved with it in the phone layout)."""
        self.plot_parts.append(element)

    def text(self, x: float, y: float, content: str, *, cls: str = "", anchor: str = "start",
             rotate: float | None = None, fill: str | None = None) -> None:
        self.add(_text(x, y, content, cls=cls, anchor=anchor, rotate=rotate, fill=fill))

    def markup(self) -> Markup:
        # Never drawn wider than designed (app.css reads --chart-w), so text keeps its size;
        # narrower containers scale it down. Below 600 px app.css sets the phone layout's text
        # (its axes, a "no data") at --phone-tick and --phone-label.
        phone = Type.for_phone(self.width)
        head = (f'<svg class="{self.css_class}" viewBox="0 0 {_num(self.width)} {_num(self.height)}" role="img" '
                f'style="--chart-w: {_num(self.width)}px; --phone-tick: {phone.tick:.1f}px; '
                f'--phone-label: {phone.label:.1f}px" xmlns="http://www.w3.org/2000/svg" '
                f'preserveAspectRatio="xMidYMid meet"><title>{escape(self.title)}</title>')
        plot = ""
        if self.plot_parts:
            style = f' style="--phone-plot: {self.phone_transform}"' if self.phone_transform else ""
            plot = f'<g class="plot"{style}>' + "".join(self.plot_parts) + "</g>"
        return Markup(head + "".join(self.parts) + plot + "</svg>")


def _num(value: float) -> str:
    return f"{round(value, 2):g}"


def _text(x: float, y: float, content: str, *, cls: str = "", anchor: str = "start",
          rotate: float | None = None, fill: str | None = None) -> str:
    extra = f' transform="rotate({rotate:.0f} {x:.1f} {y:.1f})"' if rotate is not None else ""
    if fill:
        extra += f' fill="{fill}"'
    return (f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}" text-anchor="{anchor}"{extra}>'
            f"{escape(content)}</text>")


def _lines(x: float, y: float, lines: list[str], step: float, *, cls: str, anchor: str = "middle",
           rotate: float | None = None) -> str:
    """Lines of one title, the first at (x, y), each next one `step` further (down, or right when
    rotated by -90 degrees)."""
    if len(lines) == 1:
        return _text(x, y, lines[0], cls=cls, anchor=anchor, rotate=rotate)
    dx, dy = (step, 0.0) if rotate is not None else (0.0, step)
    return "".join(_text(x + i * dx, y + i * dy, line, cls=cls, anchor=anchor, rotate=rotate)
                   for i, line in enumerate(lines))


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


# Where axis text sits, in ems of its font (at the designed 11 and 12 units these are the
# layouts' original offsets: tick labels 6 left of the y axis and 4 below their line, x tick
# labels' baseline 17 below the axis, the x title's 6 above the bottom, the y title's at 14).
_Y_TICK_GAP, _Y_TICK_DROP = 6 / 11, 4 / 11
_X_TICK_MARK, _X_TICK_DROP = 4.0, 13 / 11
_X_TITLE_RISE, _Y_TITLE_IN = 0.5, 14 / 12
_ASCENT, _DESCENT, _LEADING = 0.93, 0.24, 1.2


@dataclass
class _Label:
    at: float
    """Where along its axis (the tick's position)."""
    lo: float
    hi: float
    """Its extent along the axis."""
    text: str
    anchor: str = "middle"


def _thin(labels: list[_Label], gap: float) -> list[_Label]:
    """Every label, or every second, third... from the first, so that none run into the next."""
    for stride in range(1, len(labels) + 1):
        kept = labels[::stride]
        if all(a.hi + gap <= b.lo for a, b in zip(kept, kept[1:])):
            return kept
    return labels[:1]


def _axes(frame: Frame, xs: Scale, ys: Scale, type_: Type, *, width: float, height: float,
          x_title: list[str], y_title: list[str], x_ticks: int, y_ticks: int,
          inset: tuple[float, float] = (0.0, 0.0)) -> list[str]:
    """Grid lines, tick labels and axis titles for one layout of an x/y chart; the titles sit
    `inset` in from the chart's left and bottom edges."""
    t, out = type_.tick, []
    y_labels = []
    for v in ys.ticks(y_ticks):
        y = ys(v)
        out.append(f'<line class="grid" x1="{frame.left:.1f}" x2="{frame.right:.1f}" y1="{y:.1f}" y2="{y:.1f}"/>')
        # A label's extent up the axis (its line box around the baseline), so that the axis keeps
        # its lowest label when thinned.
        base = y + _Y_TICK_DROP * t
        y_labels.append(_Label(y, -(base + _DESCENT * t), -(base - _ASCENT * t), fmt(v), "end"))
    for label in _thin(sorted(y_labels, key=lambda lb: lb.lo), 0.1 * t):
        out.append(_text(frame.left - _Y_TICK_GAP * t, label.at + _Y_TICK_DROP * t, label.text, cls="tick", anchor="end"))
    x_labels = []
    for v in xs.ticks(x_ticks):
        x = xs(v)
        out.append(f'<line class="tickmark" x1="{x:.1f}" x2="{x:.1f}" y1="{frame.bottom:.1f}" '
                   f'y2="{frame.bottom + _X_TICK_MARK:.1f}"/>')
        # A label on the y axis starts there, clear of the y axis's lowest label ("0.0001" over
        # "0.0001" at a log-log origin); one on the right edge ends there, inside the chart.
        anchor = "start" if x - frame.left < 1 else "end" if frame.right - x < 1 else "middle"
        w = text_width(fmt(v), t)
        lo = x if anchor == "start" else x - w if anchor == "end" else x - w / 2
        # A centred label that would reach into the y axis's labels or past the chart's edge is left out.
        if anchor == "middle" and (lo < frame.left - 0.3 * t or lo + w > width):
            continue
        x_labels.append(_Label(x, lo, lo + w, fmt(v), anchor))
    for label in _thin(x_labels, 0.6 * t):
        out.append(_text(label.at, frame.bottom + _X_TICK_MARK + _X_TICK_DROP * t, label.text, cls="tick",
                         anchor=label.anchor))
    out.append(f'<line class="axis" x1="{frame.left:.1f}" x2="{frame.right:.1f}" '
               f'y1="{frame.bottom:.1f}" y2="{frame.bottom:.1f}"/>')
    out.append(f'<line class="axis" x1="{frame.left:.1f}" x2="{frame.left:.1f}" '
               f'y1="{frame.top:.1f}" y2="{frame.bottom:.1f}"/>')
    f, step = type_.label, _LEADING * type_.label
    if x_title:
        # Centred under the plot, or as near as the chart's edges allow.
        half = max(text_width(line, f, bold=True) for line in x_title) / 2 + 0.25 * f
        centre = min(max((frame.left + frame.right) / 2, half), width - half)
        out.append(_lines(centre, height - inset[1] - _X_TITLE_RISE * f - (len(x_title) - 1) * step, x_title,
                          step, cls="axis-label"))
    if y_title:
        # Beside the plot, and never lower than its x axis (the x title may reach under it).
        half = max(text_width(line, f, bold=True) for line in y_title) / 2 + 0.25 * f
        centre = max(min((frame.top + frame.bottom) / 2, frame.bottom - half), half)
        out.append(_lines(inset[0] + _Y_TITLE_IN * f, centre, y_title, step, cls="axis-label", rotate=-90))
    return out


@dataclass
class _PhoneLayout:
    frame: Frame
    x_title: list[str]
    y_title: list[str]
    inset: tuple[float, float]
    """How far the titles move in from the left and the bottom edge, with the plot they go with."""


def _phone_layout(frame: Frame, ys: Scale, type_: Type, *, width: float, height: float, x_label: str,
                  y_label: str, y_ticks: int) -> _PhoneLayout:
    """The phone layout's plot area and axis titles (in lines): margins that fit `type_`'s text,
    the designed frame scaled uniformly into the rest, the whole centred on the canvas."""
    t, f = type_.tick, type_.label
    x_title = wrap(x_label, f, width - f, bold=True) if x_label else []
    bottom = _X_TICK_MARK + (_X_TICK_DROP + _DESCENT) * t
    bottom += (0.3 + _ASCENT + _X_TITLE_RISE) * f + (len(x_title) - 1) * _LEADING * f if x_title else 0.2 * t
    # The y title runs along the y axis, above the x axis's labels (the x title may reach under it).
    y_title = wrap(y_label, f, height - bottom - f, bold=True) if y_label else []
    widest = max((text_width(fmt(v), t) for v in ys.ticks(y_ticks)), default=0.0)
    left = widest + _Y_TICK_GAP * t
    left += (_Y_TITLE_IN + _DESCENT + 0.4) * f + (len(y_title) - 1) * _LEADING * f if y_title else 0.3 * t
    # The top tick label reaches above its line by about half its size.
    right, top = width - frame.right, max(frame.top, 0.6 * t)
    # Never larger than designed: text that needs no more room than the design leaves it some spare.
    scale = min((width - right - left) / frame.width, (height - bottom - top) / frame.height, 1.0)
    dx = (width - right - left - scale * frame.width) / 2
    dy = (height - bottom - top - scale * frame.height) / 2
    phone = Frame(left + dx, top + dy, left + dx + scale * frame.width, top + dy + scale * frame.height)
    return _PhoneLayout(phone, x_title, y_title, (dx, dy))


def draw_axes(canvas: Canvas, frame: Frame, xs: Scale, ys: Scale, *, x_label: str, y_label: str,
              x_ticks: int = 5, y_ticks: int = 4) -> None:
    """Grid lines, tick labels and axis titles for an x/y chart: the designed layout, and the
    phone's (`Type.for_phone`), where the plot's marks (`canvas.plot`) are scaled into a frame
    that leaves the larger text its room."""
    w, h = canvas.width, canvas.height
    designed = _axes(frame, xs, ys, DESKTOP, width=w, height=h, x_title=[x_label] if x_label else [],
                     y_title=[y_label] if y_label else [], x_ticks=x_ticks, y_ticks=y_ticks)
    type_ = Type.for_phone(w)
    layout = _phone_layout(frame, ys, type_, width=w, height=h, x_label=x_label, y_label=y_label, y_ticks=y_ticks)
    phone = layout.frame
    s = phone.width / frame.width
    on_phone = [Scale(xs.lo, xs.hi, phone.left, phone.right, log=xs.log),
                Scale(ys.lo, ys.hi, phone.bottom, phone.top, log=ys.log)]
    small = _axes(phone, *on_phone, type_, width=w, height=h, x_title=layout.x_title, y_title=layout.y_title,
                  x_ticks=x_ticks, y_ticks=y_ticks, inset=layout.inset)
    canvas.add('<g class="axes-designed">' + "".join(designed) + "</g>")
    canvas.add('<g class="axes-phone">' + "".join(small) + "</g>")
    canvas.phone_transform = (f"matrix({s:.4f}, 0, 0, {s:.4f}, {phone.left - s * frame.left:.2f}, "
                              f"{phone.top - s * frame.top:.2f})")
