"""Backbone registry, in the spirit of timm's `create_model(name)`.

Adding a model means adding one decorated factory. A name is either an exact entry
("mobilenet_v2") or a family pattern ending in `*` ("timm:*"), whose factory gets the rest of the
name ("timm:vit_small_patch14_dinov2" -> "vit_small_patch14_dinov2") as its first argument.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

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

    @property
    def is_pattern(self) -> bool:
        return self.name.endswith("*")


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, *, family: str, description: str, find_weights: Callable[[], str | None],
                      default_layer: str = "", default: bool = False) -> Callable[[Factory], Factory]:
    """Decorator: register `factory(**options) -> Backbone` (patterns: `factory(rest, **options)`)."""

    def wrap(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = BackboneEntry(name, family, description, factory, find_weights, default_layer, default)
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
    raise UsaeError(f"unknown backbone {name!r}; known: {known}")


def create_backbone(name: str, weights: str | None = None, layer: str | None = None, random_init: bool = False,
                    keep_cls: bool = False, **options: object) -> Backbone:
    """Build a backbone by registry name, in eval mode on the CPU.

    `weights`: a local file or directory (else the package / hub cache). `layer`: which layer's tokens
    (family-specific, see docs/extraction.md). `random_init`: skip loading weights (tests and
    benchmarks only; never done silently). `options`: family extras, e.g. `model_kwargs` for timm.
    """
    entry, rest = _lookup(name)
    if weights is not None and random_init:
        raise UsaeError(f"backbone {name!r}: give either weights or random_init, not both")
    kwargs = dict(weights=weights, layer=layer, random_init=random_init, keep_cls=keep_cls, **options)
    return entry.factory(rest, **kwargs) if rest is not None else entry.factory(**kwargs)


def default_backbones() -> list[str]:
    """The embedded default: real pretrained backbones whose weights ship inside pip packages."""
    return [e.name for e in list_backbones() if e.default]
