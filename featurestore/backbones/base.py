"""The backbone contract: every model the store can cache is a ``Backbone`` in one registry.

A backbone takes a batch of normalised windows ``(B, 3, H, W)`` (all windows of a batch share one
size) and returns *named dense tensors* (a dict, DINOv2-style), each described by a ``TensorSpec``
so the store can lay it out without knowing the model.

**Adding a backbone family** = one module that defines a ``Backbone`` subclass, a table of
variants (frozen dataclasses with at least ``name`` and ``doc``) and one builder
``build(variant, weights=None, random_init=False, seed=0, layers=(), arch_overrides=None,
pos_interp=None, ...)``, then calls ``register_variants(VARIANTS, build, tiny=...)`` at import
(``tiny``: the smallest ``arch_overrides`` of the real class, which the registry-wide tests
build), plus one import line in ``_import_families`` below. Families whose names are open-ended
(``openclip:<model>:<tag>``, ``timm:<name>``) call ``register_backbone_prefix`` instead.
``pos_interp`` names the position-embedding resampling rule (``featurestore.backbones.posembed``);
``create_backbone`` passes it only when the caller sets it, and refuses it for a family whose
builder does not take it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from featurestore.protocol import ImageGeometry, Protocol, image_geometry, preprocess_windows
from featurestore.specs import UNITS, TensorSpec  # noqa: F401  (re-exported)

# UNITS and TensorSpec live in the torch-free featurestore.specs (the store imports them).


@dataclass
class BackboneInfo:
    """Identity and preprocessing of a built backbone (recorded in feature-set provenance)."""

    name: str
    family: str
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str  # "sha256:<hex>" of the checkpoint file, or "random-init:<seed>"
    weights_path: str | None = None
    library: dict[str, str] = field(default_factory=dict)  # e.g. {"timm": "1.0.31"}
    arch: str = ""  # library architecture name, e.g. "vit_small_patch14_dinov2"
    extra: dict = field(default_factory=dict)  # family-specific facts (activation, layers, ...)


class Backbone(torch.nn.Module):
    """Base class. Subclasses set ``self.info`` and implement ``tensor_specs``/``forward_dense``."""

    info: BackboneInfo

    def tensor_specs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def static_tensors(self) -> dict[str, np.ndarray]:
        """Arrays stored once per feature set (e.g. CLIP's last-block weights, SAM's
        relative-position tables), so methods can run from the store alone. Default: none."""
        return {}

    def geometry(self, protocol: Protocol, height: int, width: int) -> ImageGeometry:
        """Windows, padding and token grids of one image (default: the protocol's rule with
        symmetric padding to the patch size, see ``featurestore.protocol``)."""
        return image_geometry(protocol, height, width, self.info.patch_size)

    def preprocess(self, image: np.ndarray, geometry: ImageGeometry) -> list[torch.Tensor]:
        """``(H, W, 3)`` uint8 image -> one normalised ``(3, h, w)`` float tensor per window."""
        return preprocess_windows(image, geometry, self.info.mean, self.info.std)

    def preprocess_image(self, image: np.ndarray, geometry: ImageGeometry) -> torch.Tensor | None:
        """Input ``(3, h, w)`` for the ``image``-unit tensors (one per image, e.g. CLIP's
        whole-image embedding), or None. Only called when a spec has unit ``image``."""
        return None

    def forward_image(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, h, w)`` whole-image inputs -> ``image``-unit tensors ``(B, *row)``."""
        raise NotImplementedError(f"{type(self).__name__} declares no image-level tensors")

    def forward_dense(
        self, x: torch.Tensor, grids: list[tuple[int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the model on normalised windows.

        Args:
            x: ``(B, 3, H, W)`` float tensor from ``preprocess`` (all windows of a batch share
               one shape).
            grids: per window, its valid token grid ``(gh, gw)`` from the geometry; backbones
               whose input is padded beyond the valid region (SAM) use it, others ignore it.

        Returns:
            A dict with one entry per ``TensorSpec``: ``token`` tensors as ``(B, N, *row)``
            whose first ``gh*gw`` rows of sample k are its tokens in row-major patch order,
            ``window`` tensors as ``(B, *row)``. ``image`` tensors come from ``forward_image``.
        """
        raise NotImplementedError


def timm_vit_tokens(
    model: torch.nn.Module, x: torch.Tensor, layers: tuple[int, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a timm ``VisionTransformer`` on ``(B, 3, H, W)`` windows under inference mode.

    Returns ``final`` (``(B, P + gh*gw, D)``: the P prefix tokens, cls first then registers,
    leading; final norm applied) and, for each of ``layers`` in order, that block's normed patch
    tokens ``(B, gh*gw, D)`` (``forward_intermediates``; none when ``layers`` is empty).
    """
    with torch.inference_mode():
        if layers:
            final, intermediates = model.forward_intermediates(
                x,
                indices=list(layers),
                norm=True,
                output_fmt="NLC",
                return_prefix_tokens=True,
            )
        else:
            final, intermediates = model.forward_features(x), []
    # forward_intermediates returns (patch tokens, prefix tokens) pairs in block order.
    return final, [tokens for tokens, _prefix in intermediates]


BackboneBuilder = Callable[..., Backbone]
_REGISTRY: dict[str, BackboneBuilder] = {}
_DOCS: dict[str, str] = {}
# Name prefix -> (builder(name, **kw), syntax shown in messages), e.g. "openclip:".
_PREFIXES: dict[str, tuple[BackboneBuilder, str]] = {}
# Short name -> the smallest arch_overrides of its real class (tests, demos).
_TINY: dict[str, dict] = {}


def register_backbone(name: str, doc: str = "") -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: register ``builder(weights=None, random_init=False, seed=0, layers=(), **kw)``."""

    def deco(fn: BackboneBuilder) -> BackboneBuilder:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = fn
        _DOCS[name] = doc or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        return fn

    return deco


def register_backbone_prefix(prefix: str, builder: BackboneBuilder, syntax: str = "") -> None:
    """Route every unregistered name starting with ``prefix`` to ``builder(name, **kw)`` (e.g.
    ``openclip:<model_name>:<pretrained_tag>``); ``syntax`` is shown in unknown-name messages."""
    if prefix in _PREFIXES:
        raise ValueError(f"backbone prefix {prefix!r} registered twice")
    _PREFIXES[prefix] = (builder, syntax or f"{prefix}...")


def register_variants(
    variants: Iterable[Any],
    builder: Callable[..., Backbone],
    doc: Callable[[Any], str] | None = None,
    tiny: dict | Callable[[Any], dict] | None = None,
) -> None:
    """Register one builder per variant of a family table.

    Args:
        variants: the family's table; each item has ``name`` and ``doc`` attributes.
        builder: ``builder(variant, **kwargs) -> Backbone``; each registered name calls it with
            its variant and the keyword arguments of ``create_backbone``.
        doc: one line per variant for ``ovss models`` (default: ``variant.doc``).
        tiny: the smallest ``arch_overrides`` of the real class, one dict for the family or a
            function of the variant; ``tiny_arch_overrides(name)`` returns it.

    Raises:
        ValueError: a name registered twice.
    """
    params = list(inspect.signature(builder).parameters.values())[1:]
    for variant in variants:
        line = doc(variant) if doc is not None else str(variant.doc)

        def build(_variant: Any = variant, **kwargs: Any) -> Backbone:
            return builder(_variant, **kwargs)

        build.__name__ = build.__qualname__ = f"build_{variant.name.replace('-', '_')}"
        build.__doc__ = f"{line}; arguments as ``{builder.__name__}``."
        build.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        register_backbone(variant.name, doc=line)(build)
        if tiny is not None:
            _TINY[variant.name] = dict(tiny(variant) if callable(tiny) else tiny)


def tiny_arch_overrides(name: str) -> dict:
    """The smallest ``arch_overrides`` of ``name``'s real class, as its family registered it.

    Raises:
        KeyError: the family registered none.
    """
    _import_families()
    if name not in _TINY:
        raise KeyError(f"backbone {name!r} registered no tiny arch_overrides")
    return dict(_TINY[name])


def list_backbones() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def backbone_doc(name: str) -> str:
    _import_families()
    return _DOCS.get(name, "")


def create_backbone(name: str, **kwargs) -> Backbone:
    """Build a registered backbone by short name (``dinov2-s14``, ``dino-b16``, ...) or by a
    registered prefix (``openclip:<model_name>:<pretrained_tag>``).

    Unknown names raise ``OvssError`` listing what exists.
    """
    from featurestore.errors import OvssError

    _import_families()
    if name not in _REGISTRY:
        for prefix, (builder, _) in _PREFIXES.items():
            if name.startswith(prefix):
                _check_kwargs(name, builder, kwargs, skip=1)
                return builder(name, **kwargs)
        also = "".join(f" or {syntax}" for _, syntax in _PREFIXES.values())
        raise OvssError(
            f"'{name}' is not a known model; choose from {', '.join(sorted(_REGISTRY))}{also}"
        )
    _check_kwargs(name, _REGISTRY[name], kwargs)
    return _REGISTRY[name](**kwargs)


def _check_kwargs(name: str, builder: BackboneBuilder, kwargs: dict, skip: int = 0) -> None:
    """A one-line error for an option the family's builder does not take (e.g. ``pos_interp``
    for a model without a position-embedding rule), instead of a ``TypeError``."""
    from featurestore.errors import OvssError

    try:
        params = list(inspect.signature(builder).parameters.values())[skip:]
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise OvssError(f"{name} takes no {', '.join(unknown)} option")


def _import_families() -> None:
    # Importing a family module registers its builders (one line per family).
    import featurestore.backbones.blip
    import featurestore.backbones.clip
    import featurestore.backbones.dino
    import featurestore.backbones.dinov3
    import featurestore.backbones.sam
    import featurestore.backbones.timm_vit  # noqa: F401
