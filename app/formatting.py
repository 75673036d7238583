"""Number formats shared by the pages and the charts' tooltips."""

from __future__ import annotations


def measure(value: float) -> str:
    """A measured value (energy, an activation) to three significant digits, trailing zeros kept
    so that a column of them lines up (0.270 beside 0.0829 and 1.07); whole numbers from 1,000
    on (999.7 rounds to 1,000, never to 1.00e+03)."""
    rounded = float(f"{value:.3g}")
    if abs(rounded) >= 1000:
        return f"{value:,.0f}"
    return f"{rounded:#.3g}".rstrip(".")


def short_name(name: str, limit: int = 13) -> str:
    """`name` cut in the middle to `limit` characters, as a thumbnail caption shows a model:
    names of one family share their start (vit_base_patch16_224, vit_base_patch16_siglip_224),
    so the end is kept too, where an ellipsis at the end left them alike."""
    if len(name) <= limit:
        return name
    head = 5
    return f"{name[:head]}…{name[len(name) - (limit - head - 1):]}"
