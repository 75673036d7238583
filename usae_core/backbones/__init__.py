"""Vision backbones behind one registry: `create_backbone(name)` gives a module whose forward
returns patch tokens `[batch, tokens, dim]` of one layer on its native grid."""

from usae_core.backbones.base import Backbone
from usae_core.backbones.registry import (
    BackboneEntry,
    create_backbone,
    default_backbones,
    list_backbones,
    recorded_backbone,
    register_backbone,
    store_backbones,
)

__all__ = ["Backbone", "BackboneEntry", "create_backbone", "default_backbones", "list_backbones",
           "recorded_backbone", "register_backbone", "store_backbones"]
