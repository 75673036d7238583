"""Synthetic activations with a known answer: several models share sparse concepts.

Every token draws a sparse non-negative code over `n_shared` shared concepts (plus a few
model-specific ones); model m sees  A_m = code @ atoms_m + noise, with its own random unit
atoms in its own dimension. A correct USAE recovers each shared atom at one concept index in
every model's dictionary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PlantedData:
    arrays: dict[str, np.ndarray]
    """model -> [n_images, n_tokens, dim] float32."""
    shared_atoms: dict[str, np.ndarray]
    """model -> [n_shared, dim] unit rows."""
    r2_ceiling: dict[str, float]
    """Best achievable self R^2 per model (the variance that is not noise)."""
    cross_ceiling: dict[str, float]
    """Best achievable R^2 of a model decoded from another one (the shared part only)."""


def make_planted(
    dims: dict[str, int] | None = None,
    n_shared: int = 12,
    n_specific: int = 3,
    n_images: int = 256,
    n_tokens: int = 16,
    active: int = 3,
    noise: float = 0.05,
    seed: int = 0,
) -> PlantedData:
    dims = dims or {"alpha": 24, "beta": 32, "gamma": 40}
    rng = np.random.default_rng(seed)
    n = n_images * n_tokens

    def unit_rows(k: int, d: int) -> np.ndarray:
        a = rng.standard_normal((k, d))
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    # Each token has `active` shared concepts on, with magnitudes in [0.5, 1.5].
    shared_code = np.zeros((n, n_shared))
    for row in range(n):
        on = rng.choice(n_shared, active, replace=False)
        shared_code[row, on] = rng.uniform(0.5, 1.5, active)
    arrays, atoms, ceiling, cross = {}, {}, {}, {}
    for name, d in dims.items():
        shared = unit_rows(n_shared, d)
        specific = unit_rows(n_specific, d)
        spec_code = (rng.random((n, n_specific)) < 0.1) * rng.uniform(0.5, 1.5, (n, n_specific))
        signal = shared_code @ shared + spec_code @ specific
        eps = noise * rng.standard_normal((n, d))
        a = signal + eps
        arrays[name] = a.reshape(n_images, n_tokens, d).astype(np.float32)
        atoms[name] = shared
        total = ((a - a.mean(0)) ** 2).sum()
        ceiling[name] = float(1 - (eps**2).sum() / total)
        private = spec_code @ specific + eps
        cross[name] = float(1 - ((private - private.mean(0)) ** 2).sum() / total)
    return PlantedData(arrays, atoms, ceiling, cross)
