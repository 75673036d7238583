"""Backbone registry, in the spirit of timm's `create_model(name)`.

Adding a model means adding one decorated factory. A name is either an exact entry
("mobilenet_v2") or a family pattern ending in `*` ("timm:*"), whose factory gets the rest of the
name ("timm:vit_small_patch14_dinov2" -> "vit_small_patch14_dinov2") as its first argument.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from usae_core.backbones.base import Backbone
from usae_core.errors import UsaeError

Factory = Callable[..., Backbone]
_FAMILY_MODULES = ("offline", "torchvision", "timm", "hf")


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    family: str
    description: str
    factory: Factory
    find_weights: Callable[[], str | None]
    """Where the weights are on this machine (a path), or None when they are not here."""
    default_layer: str
    default: bool = False
    """Part of the embedded default set (real weights that ship inside packages)."""
    model_names: Callable[[], Sequence[str]] | None = None
    """A pattern's known model names (what follows its prefix), for suggestions on a typo."""

    @property
    def is_pattern(self) -> bool:
        return self.name.endswith("*")


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, *, family: str, description: str, find_weights: Callable[[], str | None],
                      default_layer: str = "", default: bool = False,
                      model_names: Callable[[], Sequence[str]] | None = None) -> Callable[[Factory], Factory]:
    """Decorator: register `factory(**options) -> Backbone` (patterns: `factory(rest, **options)`;
    `model_names()` lists what may follow the pattern's prefix, for suggestions)."""

    def wrap(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = BackboneEntry(name, family, description, factory, find_weights, default_layer, default,
                                        model_names)
        return factory

    return wrap


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(f"usae_core.backbones.{module}")


def list_backbones() -> list[BackboneEntry]:
    """Every registered entry: named backbones first (defaults leading), then family patterns."""
    _load_families()
    return sorted(_REGISTRY.values(), key=lambda e: (e.is_pattern, not e.default, e.name))


def _lookup(name: str) -> tuple[BackboneEntry, str | None]:
    _load_families()
    if name in _REGISTRY and not _REGISTRY[name].is_pattern:
        return _REGISTRY[name], None
    for entry in _REGISTRY.values():
        prefix = entry.name[:-1]
        if entry.is_pattern and name.startswith(prefix) and len(name) > len(prefix):
            return entry, name[len(prefix):]
    known = ", ".join(e.name for e in list_backbones())
    raise UsaeError(f"unknown backbone {name!r}{_suggestion(name)}; known: {known}")


def _cached_or_packaged(weights: Path) -> bool:
    """Whether recorded weights are a hub cache's or a package's file rather than one the user
    gave: those are found again by name on any machine (its own cache or packages), where the
    extracting machine's path may not exist (another machine, a rebuilt container)."""
    parts = set(weights.parts)
    return bool(parts & {".cache", "site-packages", "dist-packages"}) or any(
        weights.is_relative_to(root) for root in _cache_roots())


def _cache_roots() -> list[Path]:
    roots = []
    try:
        import torch.hub

        roots.append(Path(torch.hub.get_dir()))
    except Exception:  # noqa: BLE001 - no torch hub directory to speak of
        pass
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        roots.append(Path(HF_HUB_CACHE))
    except ImportError:
        pass
    return roots


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """"; did you mean A or B?" naming the candidates closest to a mistyped `name`, or ""."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.75)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _suggestion(name: str) -> str:
    """For an unknown name: the families that have it as a model (`resnet50` is
    `torchvision:resnet50`), else the closest registered or family names."""
    families = {}
    for entry in _REGISTRY.values():
        if entry.is_pattern and entry.model_names is not None:
            try:
                families[entry.name[:-1]] = set(entry.model_names())
            except Exception:  # noqa: BLE001 - a family whose package is missing or broken suggests nothing
                continue
    exact = [prefix + name for prefix, names in families.items() if name in names]
    if exact:
        return f"; did you mean {' or '.join(exact)}?"
    bare = name.split(":", 1)[-1]
    candidates = {}
    for prefix, names in families.items():
        candidates.update({model: prefix + model for model in names})
    candidates.update({e.name: e.name for e in _REGISTRY.values() if not e.is_pattern})  # the embedded ones first
    close = difflib.get_close_matches(bare, list(candidates), n=3, cutoff=0.75)
    return f"; did you mean {' or '.join(candidates[c] for c in close)}?" if close else ""


def create_backbone(name: str, weights: str | None = None, layer: str | None = None, random_init: bool = False,
                    keep_cls: bool = False, seed: int = 0, **options: object) -> Backbone:
    """Build a backbone by registry name, in eval mode on the CPU.

    `weights`: a local file or directory (else the package / hub cache). `layer`: which layer's tokens
    (family-specific, see docs/extraction.md). `random_init`: skip loading weights (tests and
    benchmarks only; never done silently), drawing them from `seed` so that the same name and
    seed give the same weights, without touching torch's global random state. `options`: family
    extras, e.g. `model_kwargs` for timm.
    """
    entry, rest = _lookup(name)
    if weights is not None and random_init:
        raise UsaeError(f"backbone {name!r}: give either weights or random_init, not both")
    kwargs = dict(weights=weights, layer=layer, random_init=random_init, keep_cls=keep_cls, **options)
    args = () if rest is None else (rest,)
    if not random_init:
        return entry.factory(*args, **kwargs)
    with torch.random.fork_rng(devices=[]):  # built on the CPU: only its generator is drawn from
        torch.manual_seed(seed)
        return entry.factory(*args, **kwargs)


def default_backbones() -> list[str]:
    """The embedded default: real pretrained backbones whose weights ship inside pip packages."""
    return [e.name for e in list_backbones() if e.default]


RANDOM_INIT = "random-init"
"""The weights a backbone built with `random_init` records (`Backbone.weights_source`)."""


def store_backbones(store, models: Sequence[str] | None = None, *,
                    weights: Mapping[str, str] | None = None) -> dict[str, Backbone]:
    """The backbones that produced a store's activations, rebuilt from what its manifest records
    (`store.model_info(model)`: registry name, layer, weights), in eval mode on the CPU, keyed by
    the store's model names (which are the USAE's): what CAM and new images need.

    A store names its models by alias (`timm:vit_small_patch14_dinov2` is `vit_small_patch14_dinov2`
    there, a non-default layer adds `-LAYER`), so `create_backbone(store_model_name)` only works for
    the embedded backbones at their default layer. `models` (default: every model of the store)
    chooses some. Weights come from the file or folder the extraction recorded when it read one
    the user gave, else from where `create_backbone` looks (a hub cache's or a package's file is
    found again by name: that path may be another machine's); `weights={model: path}` overrides that. A
    UsaeError says which model cannot be rebuilt and why: imported activations record no backbone,
    random-init weights were never saved, a recorded weights file that is gone is not replaced by
    other weights, and a rebuilt backbone whose token width or grid differs from the store's is refused."""
    names = list(store.model_names if models is None else models)
    weights = dict(weights or {})
    unknown = [m for m in [*names, *weights] if m not in store.model_names]
    if unknown:
        raise UsaeError(f"the store has no model {', '.join(sorted(set(unknown)))} "
                        f"(it has {', '.join(store.model_names)})")
    return {model: recorded_backbone(model, store.model_info(model), weights=weights.get(model)) for model in names}


def recorded_backbone(model: str, info: Mapping[str, object], *, weights: str | None = None) -> Backbone:
    """One store model's backbone, rebuilt from what the store records of it (`info`:
    `store.model_info(model)`, which a run also keeps), in eval mode on the CPU; see
    `store_backbones` for the rules. `weights` overrides the recorded weights."""
    registry_name = info.get("registry_name")
    if not registry_name:
        raise UsaeError(f"the store records no backbone for {model!r} (its activations were imported); "
                        "build that backbone yourself, e.g. with create_backbone")
    recorded = str(info.get("weights") or "")
    path = weights
    if path is None and recorded == RANDOM_INIT:
        raise UsaeError(f"{model!r} was extracted with random weights ({registry_name}, random_init), which were "
                        "not saved: rebuilding it would give other weights. Use the Backbone objects the store "
                        "was extracted with, or pass weights={" + repr(model) + ": PATH}")
    if path is None and Path(recorded).is_absolute() and not _cached_or_packaged(Path(recorded)):
        if not Path(recorded).exists():
            raise UsaeError(f"{model!r} was extracted with the weights {recorded}, which are no longer there; "
                            "pass weights={" + repr(model) + ": PATH} with where they are now")
        path = recorded
    backbone = create_backbone(str(registry_name), weights=path, layer=info.get("layer"))
    dim, grid = info.get("dim"), info.get("native_grid")  # checked where recorded
    if (dim is not None and backbone.dim != dim) or (grid and list(backbone.native_grid) != list(grid)):
        raise UsaeError(f"{registry_name} (layer {backbone.layer}) gives {backbone.dim}-dim tokens on a "
                        f"{backbone.native_grid} grid, but the store's {model!r} has {dim}-dim tokens on "
                        f"{tuple(grid or ())}; is it the same model and layer?")
    return backbone.eval()
