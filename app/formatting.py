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
