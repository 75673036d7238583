"""Metrics of a trained USAE, as pure functions plus one streaming evaluation pass.

Definitions follow the paper (Thasarathan et al., 2025, eqs. 9-14), with tau the firing
threshold (a concept k fires for model i on a token when Z_k^(i) > tau):

- R^2 (i -> j): 1 - sum ||A_j - A_hat_j||^2 / sum ||A_j - mean(A_j)||^2, with the mean taken per
  dimension. (overcomplete's `r2_score` subtracts one global scalar mean instead, which gives
  higher numbers when dimensions have different means.)
- firing entropy: FE_k = -sum_i p_i log p_i / log M, p_i = fires_i(k) / sum_j fires_j(k); 0 when k
  never fires. 1 = fires equally in every model (universal), 0 = one model only.
- co-fire proportion: CFP_k^(i) = |tokens where k fires in all models| / fires_i(k); we report
  the per-model values and their mean.
- energy: E_k = sum_i |E_x[Z_k^(i)(x)] D_k^(i)|; dictionary rows have unit norm, so it is the
  sum over models of the concept's mean code value (official code: non-squared norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from usae_core.devices import borrowed, resolve_device
from usae_core.errors import UsaeError
from usae_core.store import ActivationStore


def r2_score(x: np.ndarray | torch.Tensor, x_hat: np.ndarray | torch.Tensor) -> float:
    """R^2 with a per-dimension mean, computed in float64."""
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.asarray(x_hat, dtype=np.float64)
    resid = ((x - x_hat) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()
    return float(1.0 - resid / total) if total > 0 else float("nan")


def firing_entropy(fire_counts: np.ndarray) -> np.ndarray:
    """`fire_counts` [models, concepts] -> normalised entropy [concepts] in [0, 1]."""
    counts = np.asarray(fire_counts, dtype=np.float64)
    n_models = counts.shape[0]
    total = counts.sum(0)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    if n_models < 2:
        return np.zeros(counts.shape[1])
    return terms.sum(0) / np.log(n_models)


def cofire_proportion(cofire_counts: np.ndarray, fire_counts: np.ndarray) -> np.ndarray:
    """Per model [models, concepts]: share of model i's firings of k where all models fire."""
    fire = np.asarray(fire_counts, dtype=np.float64)
    co = np.asarray(cofire_counts, dtype=np.float64)[None, :]
    return np.divide(np.broadcast_to(co, fire.shape), fire, out=np.zeros_like(fire), where=fire > 0)


def concept_energy(code_sums: np.ndarray, n_tokens: int) -> np.ndarray:
    """`code_sums` [models, concepts] of Z over n_tokens tokens -> energy [concepts]."""
    return np.abs(np.asarray(code_sums, dtype=np.float64) / n_tokens).sum(0)


class R2Accumulator:
    """Streams sum-of-squares terms in float64 for one R^2 with a per-dimension mean."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum_x = np.zeros(dim, np.float64)
        self.sum_x2 = np.zeros(dim, np.float64)
        self.resid = 0.0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x64, r64 = x.double(), (x.double() - x_hat.double())
        self.n += x.shape[0]
        self.sum_x += x64.sum(0).cpu().numpy()
        self.sum_x2 += x64.square().sum(0).cpu().numpy()
        self.resid += float(r64.square().sum())

    def value(self) -> float:
        total = float((self.sum_x2 - self.sum_x**2 / max(self.n, 1)).sum())
        return 1.0 - self.resid / total if total > 0 else float("nan")


@dataclass
class EvalResult:
    models: list[str]
    n_tokens: int
    tau: float
    r2: np.ndarray
    """[source, target]: variance of model `target` explained when encoding from `source`."""
    fire_counts: np.ndarray
    """[models, concepts]: tokens on which each concept fires, encoding each model's own tokens."""
    cofire_counts: np.ndarray
    """[concepts]: tokens on which the concept fires in every model at once."""
    code_sums: np.ndarray
    """[models, concepts]: sum of Z over all tokens."""
    l0: np.ndarray
    """[models]: mean number of concepts above tau per token."""
    firing_entropy: np.ndarray = field(init=False)
    cofire: np.ndarray = field(init=False)
    energy: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.firing_entropy = firing_entropy(self.fire_counts)
        self.cofire = cofire_proportion(self.cofire_counts, self.fire_counts)
        self.energy = concept_energy(self.code_sums, self.n_tokens)

    @property
    def dead(self) -> np.ndarray:
        """[concepts] bool: the concept fires in no model."""
        return self.fire_counts.sum(0) == 0

    @property
    def dead_fraction(self) -> float:
        return float(self.dead.mean())

    @property
    def r2_self(self) -> float:
        return float(np.mean(np.diag(self.r2)))

    @property
    def r2_cross(self) -> float:
        m = len(self.models)
        if m < 2:
            return float("nan")
        return float(self.r2[~np.eye(m, dtype=bool)].mean())

    def summary(self) -> dict:
        """JSON-ready: a number that is not one (`r2_cross` of a single model) is None, since
        strict JSON readers refuse NaN."""
        return {
            "models": self.models,
            "n_tokens": self.n_tokens,
            "tau": self.tau,
            "r2": [[_number_or_none(v) for v in row] for row in self.r2.tolist()],
            "r2_self": _number_or_none(self.r2_self),
            "r2_cross": _number_or_none(self.r2_cross),
            "l0": dict(zip(self.models, self.l0.tolist())),
            "dead_fraction": self.dead_fraction,
            "live_concepts": int((~self.dead).sum()),
            "n_concepts": int(self.fire_counts.shape[1]),
        }

    def to_dict(self) -> dict:
        return {
            **self.summary(),
            "concepts": {
                "fire_counts": self.fire_counts.tolist(),
                "firing_entropy": self.firing_entropy.tolist(),
                "cofire": self.cofire.tolist(),
                "energy": self.energy.tolist(),
            },
        }


def _number_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def check_tau(tau: float) -> None:
    """Codes are never negative (ReLU, then TopK), so a firing threshold below 0 would count
    every token of every concept as a firing."""
    if not (math.isfinite(tau) and tau >= 0):
        raise UsaeError(f"--tau (the firing threshold) must be a number >= 0, got {tau}")


def evaluate_usae(model, store, *, tau: float = 0.1, batch_images: int = 32, device: str | torch.device = "auto",
                  max_images: int | None = None, progress: bool = True) -> EvalResult:
    """One streaming pass over the store (an ActivationStore, or the path of one): R^2 matrix,
    L0, and per-concept firing statistics. The model computes on `device` ("auto": a GPU when
    there is one) and is handed back where and as it was."""
    store = ActivationStore.of(store)
    check_tau(tau)
    if max_images is not None and max_images < 1:  # 0 read as "no limit" evaluated the whole store
        raise UsaeError(f"max_images must be >= 1 (or None for every image), got {max_images}")
    model.check_store(store)
    device = resolve_device(device)
    with borrowed(model, device):
        return _evaluate(model, store, tau=tau, batch_images=batch_images, device=device, max_images=max_images,
                         progress=progress)


@torch.no_grad()
def _evaluate(model, store: ActivationStore, *, tau: float, batch_images: int, device: torch.device,
              max_images: int | None, progress: bool) -> EvalResult:
    from tqdm.auto import tqdm

    names = model.names
    m, c = len(names), model.cfg.n_concepts
    r2 = [[R2Accumulator(store.dims[t]) for t in names] for _ in names]
    fire = torch.zeros(m, c, dtype=torch.float64, device=device)
    sums = torch.zeros(m, c, dtype=torch.float64, device=device)
    cofire = torch.zeros(c, dtype=torch.float64, device=device)
    active = torch.zeros(m, dtype=torch.float64, device=device)
    n_tokens = 0
    total = min(store.n_images, max_images or store.n_images)
    bar = tqdm(total=total, desc="eval", unit="img", disable=not progress)
    for start, batch in store.iter_images(batch_images):
        if start >= total:
            break
        n_img = min(batch[names[0]].shape[0], total - start)
        x = {n: model.standardize(torch.from_numpy(batch[n][:n_img]).reshape(-1, store.dims[n]).to(device), n)
             for n in names}
        all_fire = None
        for i, src in enumerate(names):
            values, indices = model.encode(x[src], src)
            z = model.dense_codes(values, indices)
            fires = z > tau
            fire[i] += fires.sum(0)
            sums[i] += z.sum(0)
            active[i] += fires.sum()
            all_fire = fires if all_fire is None else all_fire & fires
            for j, tgt in enumerate(names):
                r2[i][j].update(x[tgt], model.decode(values, indices, tgt))
        cofire += all_fire.sum(0)
        n_tokens += x[names[0]].shape[0]
        bar.update(n_img)
    bar.close()
    return EvalResult(
        models=names,
        n_tokens=n_tokens,
        tau=tau,
        r2=np.array([[acc.value() for acc in row] for row in r2]),
        fire_counts=fire.cpu().numpy().astype(np.int64),
        cofire_counts=cofire.cpu().numpy().astype(np.int64),
        code_sums=sums.cpu().numpy(),
        l0=(active / max(n_tokens, 1)).cpu().numpy(),
    )
