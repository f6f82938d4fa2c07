"""Backbone registry: ``create_backbone(name)`` builds any registered model."""

from featurestore.backbones.base import (
    Backbone,
    BackboneInfo,
    TensorSpec,
    create_backbone,
    list_backbones,
    register_backbone,
    register_variants,
    tiny_arch_overrides,
)

__all__ = [
    "Backbone",
    "BackboneInfo",
    "TensorSpec",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "register_variants",
    "tiny_arch_overrides",
]
