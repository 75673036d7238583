"""Configuration dataclasses. Every field is documented; `__post_init__` rejects bad values."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

from usae_core.errors import UsaeError

EncoderKind = Literal["linear", "mlp_bn"]
LossKind = Literal["l1", "mse"]
AuxKind = Literal["paper", "auxk", "none"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UsaeError(msg)


@dataclass
class USAEConfig:
    """Shape of a Universal Sparse Autoencoder."""

    model_dims: dict[str, int]
    """Activation dimension of each model, in a fixed order (the order of the store). Integral
    NumPy scalars (a dimension read from an array's shape) are kept as plain ints."""
    n_concepts: int = 6144
    """Size of the shared code Z (the dictionary size)."""
    k: int = 32
    """Active concepts per token (TopK)."""
    encoder: EncoderKind = "mlp_bn"
    """`mlp_bn`: Linear + BatchNorm + ReLU as in the paper; `linear`: Linear + ReLU."""

    def __post_init__(self) -> None:
        _check(len(self.model_dims) >= 1, "a USAE needs at least one model")
        for name, dim in self.model_dims.items():
            # numbers.Integral takes NumPy's integers too (np.bool_ is not one); bool is an int to Python
            _check(isinstance(dim, numbers.Integral) and not isinstance(dim, bool) and dim > 0,
                   f"model {name!r} has invalid dim {dim!r}")
        # plain ints: config.json is written with the json module, which refuses NumPy scalars
        self.model_dims = {name: int(dim) for name, dim in self.model_dims.items()}
        for name in ("n_concepts", "k"):
            value = getattr(self, name)
            _check(isinstance(value, numbers.Integral) and not isinstance(value, bool),
                   f"{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        _check(self.n_concepts >= 1, f"--concepts (n_concepts) must be >= 1, got {self.n_concepts}")
        _check(1 <= self.k <= self.n_concepts,
               f"--k (k) must be in [1, --concepts (n_concepts) = {self.n_concepts}], got {self.k}")
        _check(self.encoder in ("linear", "mlp_bn"), f"unknown encoder {self.encoder!r} (linear|mlp_bn)")

    @property
    def model_names(self) -> list[str]:
        return list(self.model_dims)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "USAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def automatic_warmup_steps(steps: int) -> int:
    """The warm-up a run gets when none is given: a tenth of its steps, at most 100."""
    return min(100, steps // 10)


@dataclass
class TrainConfig:
    """How to train. Defaults follow the paper where it is specific and work on a CPU otherwise."""

    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 4096
    """Tokens per step (the same rows for every model)."""
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-5
    warmup_steps: int | None = None
    """Steps of linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio`; at most `steps`.
    None means min(100, steps // 10), set when the config is made (config.json keeps the number):
    a fixed 100 would spend most of a short run warming up."""
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    loss: LossKind = "l1"
    """Reconstruction loss summed over target models: `l1` (the paper) or `mse`."""
    aux: AuxKind = "auxk"
    """Dead-latent revival: `paper` (top-half of unused latents predict the residual),
    `auxk` (only dead latents, OpenAI TopK SAE), or `none`."""
    aux_coef: float | None = None
    """Weight of the auxiliary term; None means 0.1 for `paper` (official code) and 1/32 for `auxk`."""
    aux_k: int = 256
    """Latents used by the AuxK term."""
    dead_after_tokens: int = 1_000_000
    """A latent that has not fired for this many training tokens counts as dead (AuxK)."""
    fire_threshold: float = 0.1
    """tau: a concept fires on a token when Z_k > tau (metrics and logging)."""
    seed: int = 0
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`."""
    autocast: bool | None = None
    """bf16 autocast; None means on for CUDA and off for CPU."""
    log_every: int = 50
    """Steps between JSONL metric lines (the only host syncs in the loop)."""
    checkpoint_every: int = 500
    """Steps between checkpoints; 0 writes only the final one."""
    shuffle_shards: int = 4
    """Shards mixed together when shuffling (bigger mixes better, costs RAM)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"--steps (steps) must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"--batch-size (batch_size) must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"--lr (lr) must be > 0, got {self.lr}")
        if self.warmup_steps is None:
            self.warmup_steps = automatic_warmup_steps(self.steps)
        _check(self.warmup_steps >= 0, f"--warmup-steps (warmup_steps) must be >= 0, got {self.warmup_steps}")
        _check(self.warmup_steps <= self.steps,
               f"--warmup-steps (warmup_steps) {self.warmup_steps} is more than --steps (steps) {self.steps}, so the "
               f"learning rate would never reach --lr (lr); pass at most {self.steps}, or leave it out for "
               f"min(100, steps // 10) = {automatic_warmup_steps(self.steps)}")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        _check(self.grad_clip >= 0, "grad_clip must be >= 0")
        # codes are never negative: below 0 every latent would fire on every token, none ever dead
        _check(self.fire_threshold >= 0, f"fire_threshold must be >= 0, got {self.fire_threshold}")
        _check(self.dead_after_tokens >= 0, f"dead_after_tokens must be >= 0, got {self.dead_after_tokens}")
        _check(self.loss in ("l1", "mse"), f"unknown loss {self.loss!r} (l1|mse)")
        _check(self.aux in ("paper", "auxk", "none"), f"unknown aux loss {self.aux!r} (paper|auxk|none)")
        _check(self.log_every >= 1, "log_every must be >= 1")
        _check(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        _check(self.shuffle_shards >= 1, "shuffle_shards must be >= 1")

    @property
    def aux_weight(self) -> float:
        if self.aux_coef is not None:
            return self.aux_coef
        return {"paper": 0.1, "auxk": 1 / 32, "none": 0.0}[self.aux]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """The config of a saved run, as it trained. One saved before warmup_steps was checked
        against steps (the old fixed default 100 in a shorter run) loads unchanged too."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in d.items() if k in names}
        warmup, steps = given.get("warmup_steps"), given.get("steps", cls.steps)
        if isinstance(warmup, int) and isinstance(steps, int) and warmup > steps >= 1:
            cfg = cls(**{**given, "warmup_steps": 0})  # every other check still applies
            cfg.warmup_steps = warmup
            return cfg
        return cls(**given)
