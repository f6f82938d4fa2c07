"""The segmenter contract: one registry of methods, each a typed config + declared features.

A method turns one image's cached tensors into *cosine logits* ``(Q, H, W)`` over the queries
of a vocabulary, on the resized-image canvas of its protocol (sliding windows already merged).
The shared driver (``methods.segment``) then resizes to the original size and applies the
SCLIP-lineage scoring of METHODS.md §0.2. Adding a method = one module with a ``Segmenter``
subclass and ``@register_method``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from featurestore.errors import OvssError, ProvenanceMismatchError
from featurestore.protocol import Protocol
from methods.config import build_config as _build_config
from methods.config import config_to_dict

if TYPE_CHECKING:  # torch and zarr are imported where they run: ``import methods.base`` stays light
    import torch

    from featurestore.store import FeatureSet, FeatureStore


@dataclass(frozen=True)
class FeatureRequirement:
    """A cached feature set a method or trainer reads: model, protocol, tensors, its role.

    Attributes:
        role: what the set is for the owner (``clip``, ``vfm``, ``sam``, ``dense``...).
        model: backbone name (``featurestore.backbones`` registry).
        protocol: the set's protocol.
        tensors: tensors that must be present.
        model_field: the owner's config field that names ``model`` ('' if fixed): the
            planner maps ``extract --for M -m NAME`` onto it.
        optional: read when present, never required (e.g. a set only some options use).
        layers: intermediate block outputs the set must cache (``extract --layers``; block
            indices, default none).
    """

    role: str
    model: str
    protocol: Protocol
    tensors: tuple[str, ...]
    model_field: str = ""
    optional: bool = False
    layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class LiveModelRequirement:
    """A model the owner runs itself on pixels (with gradients), e.g. PnP-OVSS's BLIP.

    Such an owner needs the images: from ``--images`` or from the paths a store records (a
    clear error when they cannot be read). ``cached`` names an optional feature set holding a
    first pass of the same model (used when present, never required).

    Attributes:
        role: what the model is for the owner (``blip``...).
        model: the model's registry name.
        cached: an optional cached first pass (a :class:`FeatureRequirement`), or None.
        model_field: the owner's config field that names ``model`` ('' if fixed).
    """

    role: str
    model: str
    cached: FeatureRequirement | None = None
    model_field: str = ""


Requirement = FeatureRequirement | LiveModelRequirement


@dataclass(frozen=True)
class VocabularyDefaults:
    """How an owner embeds a vocabulary when the user does not say.

    Attributes:
        text_model: the text encoder (a registry name, e.g. ``clip-b16``).
        templates: the template-set name (``openai80``...).
        family: the class-file family of dataset vocabularies (``sclip`` or ``proxyclip``).
    """

    text_model: str = "clip-b16"
    templates: str = "openai80"
    family: str = "sclip"


class Component:
    """What methods and trainers share: a name, a typed ``Config`` (a dataclass, see
    ``methods.config``), per-dataset presets, declared requirements and vocabulary defaults.
    The extraction planner (``extract --for NAME``, ``segment --images``) reads only these."""

    kind: ClassVar[str] = ""  # "method" or "trainer"
    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    doc: ClassVar[str] = ""

    @classmethod
    def requirements(cls, config: Any) -> list[Requirement]:
        raise NotImplementedError

    @classmethod
    def presets(cls, dataset: str) -> dict[str, Any]:
        """Per-dataset config overrides (EVAL presets). Default: none."""
        return {}

    @classmethod
    def recipe_notes(cls, config: Any) -> list[str]:
        """Lines ``extract --for NAME`` prints with the recipe (pairings, [ours] choices).
        Default: none."""
        return []

    @classmethod
    def vocabulary_defaults(cls, config: Any) -> VocabularyDefaults:
        """Default text model, templates and class family; the default reads the config's
        ``text_model`` / ``templates`` / ``class_family`` fields or properties if it has
        them."""
        base = VocabularyDefaults()
        return VocabularyDefaults(
            text_model=getattr(config, "text_model", None) or base.text_model,
            templates=getattr(config, "templates", None) or base.templates,
            family=getattr(config, "class_family", None) or base.family,
        )


@dataclass
class ScoringConfig:
    """§0.2 post-processing, shared by every method (recorded in every result).

    Attributes:
        logit_scale: softmax temperature applied to cosine logits (40 in every reference repo).
        prob_thd: pixels whose best class probability is below it become class 0 (only for
            datasets with a background class).
        area_thd: SCLIP's VOC21 area rule (None: off).
    """

    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None


@dataclass
class Vocab:
    """Query embeddings of a vocabulary: ``embeddings`` (Q, E) unit norm, ``query_to_class``."""

    class_names: list[list[str]]
    embeddings: torch.Tensor
    query_to_class: torch.Tensor
    source: str = ""
    templates: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Segmenter(Component):
    """Base class. Subclasses define ``name``, ``Config`` (a dataclass), ``requirements`` and
    ``cosine_logits``; ``presets`` gives per-dataset overrides of the config."""

    kind: ClassVar[str] = "method"

    def __init__(self, store: FeatureStore, config: Any, device: str | torch.device = "cpu"):
        import torch

        self.store = store
        self.config = config
        self.device = torch.device(device)
        try:
            reqs = self.requirements(config)
        except ValueError as e:  # e.g. an invalid protocol from --set
            raise OvssError(f"method {self.name}: {e}") from None
        self.sets: dict[str, FeatureSet] = {}
        for r in reqs:
            cached = r.cached if isinstance(r, LiveModelRequirement) else r
            if cached is None:
                continue
            try:
                self.sets[cached.role] = store.require(
                    cached.model, cached.protocol, tensors=cached.tensors
                )
            except ProvenanceMismatchError as e:
                if cached.optional or isinstance(r, LiveModelRequirement):
                    continue  # optional: used when present
                raise self.missing_set(cached, e) from None

    def missing_set(
        self, requirement: FeatureRequirement, error: ProvenanceMismatchError
    ) -> Exception:
        """The error raised when a required feature set is missing or does not match; methods
        override it to add how to extract what they need. Default: the store's message."""
        return error

    @classmethod
    def scoring_presets(cls, dataset: str) -> dict[str, Any]:
        """Per-dataset ``ScoringConfig`` overrides (``prob_thd``, ``logit_scale``...)."""
        return {}

    @property
    def text_model(self) -> str:
        """The CLIP model whose text tower embeds the vocabulary."""
        return getattr(self.config, "text_model", "clip-b16")

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        """Cosine logits ``(Q, H, W)`` of image ``index`` and the size ``(H, W)`` they live on
        (the resized canvas); the driver resizes them to the original image size."""
        raise NotImplementedError


_METHODS: dict[str, type[Segmenter]] = {}


def register_method(cls: type[Segmenter]) -> type[Segmenter]:
    if not cls.name or cls.name in _METHODS:
        raise ValueError(f"method name {cls.name!r} empty or registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_methods() -> None:
    """Fill the registry: ``methods.load_components`` imports every method module."""
    from methods import load_components

    load_components()


def list_methods() -> list[str]:
    """Registered method names (the first call imports every method module, see
    ``methods/__init__.py``)."""
    _load_methods()
    return sorted(_METHODS)


def get_method(name: str) -> type[Segmenter]:
    _load_methods()
    if name not in _METHODS:
        raise OvssError(
            f"'{name}' is not a known method; choose from {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[name]


def build_config(
    cls: type[Segmenter], dataset: str | None = None, overrides: dict[str, Any] | None = None
) -> Any:
    """The method's config: defaults, then the dataset preset, then user overrides (coerced to
    the field types; an unknown key or a bad value is a ``ConfigError`` naming the field)."""
    return _build_config(
        cls.Config, cls.presets(dataset) if dataset else {}, overrides, owner=f"method {cls.name}"
    )


# Helpers shared by window-based methods ---------------------------------------------------


def l2n(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    import torch

    return torch.nn.functional.normalize(x, dim=dim)


def window_cosines(window_feats: list[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
    """Per window ``(gh, gw, E)`` features -> cosine logits ``(Q, gh, gw)``."""
    import torch

    t = l2n(text.float())
    return [torch.einsum("hwe,qe->qhw", l2n(f.float()), t) for f in window_feats]


def window_logits_to_box(logits: torch.Tensor, box: np.ndarray, pad: np.ndarray) -> torch.Tensor:
    """Token-grid logits ``(Q, gh, gw)`` of a padded window -> logits on its box ``(Q, h, w)``.

    As the reference repos do: bilinear (align_corners=False) upsampling to the padded window's
    pixel size, then the symmetric padding is cropped off.
    """
    from methods.scoring import upsample_bilinear

    y1, x1, y2, x2 = (int(v) for v in box)
    top, left, bottom, right = (int(v) for v in pad)
    h, w = y2 - y1, x2 - x1
    up = upsample_bilinear(logits, (h + top + bottom, w + left + right))
    return up[..., top : top + h, left : left + w]


__all__ = [
    "Component",
    "FeatureRequirement",
    "LiveModelRequirement",
    "Requirement",
    "VocabularyDefaults",
    "ScoringConfig",
    "Segmenter",
    "Vocab",
    "build_config",
    "config_to_dict",
    "get_method",
    "list_methods",
    "register_method",
]
