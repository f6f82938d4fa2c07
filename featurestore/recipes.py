"""Extraction recipes: exactly what a method needs, with its per-dataset protocol preset.

``ovss extract --for METHOD --dataset NAME`` builds a :class:`Recipe`: a list of
``(role, model, Protocol)`` steps, the dataset's vocabulary and the method's template set. Models
sharing a protocol are extracted in one pass (the ``ExtractConfig`` of ``featurestore.extract``
has one protocol for all its models), then the vocabulary's text embeddings are computed with the
recipe's CLIP text tower and cached in the store (``featurestore.text``).

Presets (EVAL.md §4.2 / §4.4; the full table is in the README, ``ovss extract`` section):

``proxyclip``
    CLIP ViT-B/16 (``clip-b16``, OpenAI) and DINO ViT-B/8 (``dino-b8``, the VFM) over the same
    sliding windows: ``Protocol(short S, crop, stride, pad_multiple=56)``. ProxyCLIP feeds the
    CLIP crop, padded symmetrically to a multiple of 56, to DINO/DINOv2 as is (no resize;
    CLIP's normalisation undone and the VFM's applied, which is what extracting each model from
    the pixels with its own mean/std does). The DINOv2 option of the reference is
    ``dinov2-b14-reg`` (``-m dinov2-b14-reg``). Class files: ProxyCLIP family (``"; "``).
``trident``
    ``clip-b16`` and DINO v1 ViT-B/16 (``dino-b16``; DINOv2 selectable with ``-m``) over the same
    windows on Trident's canvas ``Protocol(resize="trident", S, crop 336, stride,
    pad_multiple=56, align=<CLIP patch>)`` (METHODS.md §4 step 2: the short-side size S, each
    side rounded *up* to a multiple of the CLIP patch and raised to at least the crop, so every
    window is a full crop on the patch grid; key e.g. ``trident448a16-c336s224-pad56``), plus
    SAM per image ``Protocol(resize="long", size=1024, align=<CLIP patch>)`` (``sam-b``;
    ``sam-h`` when the CLIP is ``clip-h14``, as in the paper; key ``long1024-a16``): as in the
    reference (METHODS.md §4 step 1), SAM gets the image resized with OpenCV's bilinear rule so
    that H and W round *up* to multiples of the CLIP patch (16, or 14 for CLIP-L/H), then
    SamPredictor's own resize. Class files: ProxyCLIP family.
    Cityscapes: SAM runs on the left and right halves of that rounded image as in the
    reference, ``Protocol(resize="halves", size=1024, align=<CLIP patch>)`` (key
    ``halves1024-a16``: two SamPredictor inputs per image); the reference's ``--sam-refine``
    decodes against the whole image, which needs the whole-image set ``sam-b@long1024-a16``
    too (a separate ``ovss extract --model sam-b --resize long --size 1024 --align 16`` call;
    not a recipe step, since only the refinement reads it; both noted in the recipe).
``maskclip``
    SCLIP-style: ``clip-b16`` windows ``Protocol(short S, crop 224, stride 112)`` with SCLIP's
    per-dataset S (EVAL.md §4.2); SCLIP family class files.
``fmbseg`` [ours: no public code]
    CLIP ViT-L/14 (``clip-l14``) windows at CLIP-L's native 224 px, ``Protocol(short 448,
    crop 224, stride 112)`` (crops classified by their CLS token, dense features spliced);
    DINOv2 ViT-L/14 (``dinov2-l14``) over the whole image ``Protocol(short 448)`` (the stage-2
    alignment input); SAM ViT-H (``sam-h``, SAM's default model) per image. Templates
    ``single`` ("a photo of a {}.", as in the paper); SCLIP family class files.
``prototype``
    Any feature set already in text space: by default ``clip-b16`` over the whole image
    ``Protocol(short 448)`` (the ``prototype`` method's defaults); ``-m NAME`` picks any model.

Every step can be changed: ``models`` replaces the model of a role (``clip-*`` -> the CLIP role,
``sam-*`` -> SAM, anything else -> the VFM / dense role), ``size``/``crop``/``stride``/
``pad_multiple`` change the window protocol (never SAM's), ``templates``/``text_model``/
``family`` the text side.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from featurestore.errors import OvssError
from featurestore.extract import ExtractConfig, ExtractReport, ModelReport, PlanRow, plan
from featurestore.images import ImageRecord
from featurestore.protocol import Protocol
from featurestore.text import (
    DEFAULT_TEMPLATES,
    ProgressCallback,
    TextSetReport,
    Vocabulary,
    get_templates,
    parse_vocab,
)

# --------------------------------------------------------------------------------------------
# Per-dataset presets (EVAL.md §4.2 and §4.4)
# --------------------------------------------------------------------------------------------

BENCHMARKS = (
    "voc21",
    "voc20",
    "context60",
    "context59",
    "coco_object",
    "coco_stuff171",
    "ade20k",
    "cityscapes",
)


@dataclass(frozen=True)
class ProxyCLIPPreset:
    """ProxyCLIP per dataset (EVAL.md §4.4): shorter side, window, background threshold."""

    size: int
    crop: int
    stride: int
    prob_thd: float


@dataclass(frozen=True)
class TridentPreset:
    """Trident per dataset (EVAL.md §4.4)."""

    size: int
    crop: int
    stride: int
    prob_thd: float
    coarse_thresh: float
    cos_fac: float
    refine_neg_cos: bool
    sam_halves: bool = False  # reference runs SAM on the left/right halves (Cityscapes)


@dataclass(frozen=True)
class SCLIPPreset:
    """SCLIP per dataset (EVAL.md §4.2), the ``maskclip`` protocol: S, logit scale, thresholds."""

    size: int
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None


PROXYCLIP_PRESETS: dict[str, ProxyCLIPPreset] = {
    "voc21": ProxyCLIPPreset(336, 336, 112, 0.2),
    "voc20": ProxyCLIPPreset(336, 336, 112, 0.0),
    "context60": ProxyCLIPPreset(336, 336, 112, 0.15),
    "context59": ProxyCLIPPreset(336, 336, 112, 0.0),
    "coco_object": ProxyCLIPPreset(336, 336, 112, 0.25),
    "coco_stuff171": ProxyCLIPPreset(336, 336, 112, 0.0),
    "ade20k": ProxyCLIPPreset(448, 336, 112, 0.0),
    "cityscapes": ProxyCLIPPreset(448, 224, 112, 0.0),
}
PROXYCLIP_COMMON = {"beta": 1.2, "gamma": 3.0, "logit_scale": 40.0}

TRIDENT_PRESETS: dict[str, TridentPreset] = {
    "voc21": TridentPreset(448, 336, 224, 0.2, 0.2, 1.2, True),
    "voc20": TridentPreset(336, 336, 112, 0.0, 0.2, 0.0, True),
    "context60": TridentPreset(576, 336, 224, 0.15, 0.15, 1.2, True),
    "context59": TridentPreset(576, 336, 224, 0.0, 0.15, 1.2, True),
    "coco_object": TridentPreset(448, 336, 224, 0.25, 0.25, 1.2, True),
    "coco_stuff171": TridentPreset(448, 336, 224, 0.0, 0.05, 1.2, True),
    "ade20k": TridentPreset(576, 336, 224, 0.0, 0.05, 1.2, False),
    "cityscapes": TridentPreset(688, 336, 224, 0.0, 0.10, 3.0, False, sam_halves=True),
}
TRIDENT_COMMON = {
    "beta": 1.2,
    "gamma": 3.0,
    "logit_scale": 40.0,
    "sam_iou_thresh": 0.8,
    "minimal_area": 225,
    "sam_mask_alpha": 0.005,
}

SCLIP_PRESETS: dict[str, SCLIPPreset] = {
    "voc21": SCLIPPreset(336, logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
    "voc20": SCLIPPreset(336),
    "context60": SCLIPPreset(336, logit_scale=50.0, prob_thd=0.1),
    "context59": SCLIPPreset(336),
    "coco_object": SCLIPPreset(336, logit_scale=50.0, prob_thd=0.1),
    "coco_stuff171": SCLIPPreset(448),
    "ade20k": SCLIPPreset(336),
    "cityscapes": SCLIPPreset(560),
}
SCLIP_WINDOW = (224, 112)  # crop, stride
PROXYCLIP_PAD = 56  # ProxyCLIP/Trident pad every crop to a multiple of 56

SAM_PROTOCOL = Protocol(resize="long", size=1024)
# Trident on Cityscapes: SAM on the left and right image halves (EVAL.md §4.4).
SAM_HALVES_PROTOCOL = Protocol(resize="halves", size=1024)
FMBSEG_CLIP_PROTOCOL = Protocol(resize="short", size=448, crop=224, stride=112)
FMBSEG_VFM_PROTOCOL = Protocol(resize="short", size=448)
PROTOTYPE_PROTOCOL = Protocol(resize="short", size=448)

RECIPE_DOCS: dict[str, str] = {
    "proxyclip": "CLIP-B/16 + DINO-B/8 per window (pad 56), ProxyCLIP presets (EVAL §4.4)",
    "trident": "CLIP-B/16 + DINO-B/16 per window (pad 56) + SAM-B per image, Trident presets",
    "maskclip": "CLIP-B/16 windows 224/112 at SCLIP's shorter side (EVAL §4.2)",
    "fmbseg": "[ours] CLIP-L/14 windows + DINOv2-L/14 whole image + SAM-H per image",
    "prototype": "any feature set in text space; default CLIP-B/16 whole image, short 448",
}


def list_recipes() -> list[str]:
    """Methods ``--for`` accepts."""
    return list(RECIPE_DOCS)


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeStep:
    """One feature set a method reads: its role (``clip``, ``vfm``, ``sam``, ``dense``), model
    and protocol."""

    role: str
    model: str
    protocol: Protocol


@dataclass
class Recipe:
    """What ``ovss extract --for METHOD --dataset NAME`` extracts.

    Attributes:
        method: recipe name (``trident``, ...).
        dataset: benchmark whose preset and vocabulary are used.
        steps: feature sets, in extraction order.
        vocab: vocabulary spec (``dataset:<name>/<family>``), see ``featurestore.text``.
        templates: template-set name.
        text_model: CLIP model whose text tower embeds the vocabulary.
        settings: the method's per-dataset settings from the same preset row (S, crop, stride,
            prob_thd, ...), recorded for reference; methods read their own configs.
        notes: deviations and [ours] choices worth knowing.
    """

    method: str
    dataset: str
    steps: list[RecipeStep]
    vocab: str
    templates: str
    text_model: str
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def groups(self) -> list[tuple[Protocol, list[str]]]:
        """Models grouped by protocol, in first-appearance order (one extract pass each)."""
        out: dict[Protocol, list[str]] = {}
        for s in self.steps:
            models = out.setdefault(s.protocol, [])
            if s.model not in models:
                models.append(s.model)
        return list(out.items())

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "dataset": self.dataset,
            "steps": [
                {
                    "role": s.role,
                    "model": s.model,
                    "protocol": s.protocol.to_dict(),
                    "feature_set": f"{s.model}@{s.protocol.key()}",
                }
                for s in self.steps
            ],
            "vocab": self.vocab,
            "templates": self.templates,
            "text_model": self.text_model,
            "settings": dict(self.settings),
            "notes": list(self.notes),
        }


def _role_of(model: str) -> str:
    if model.startswith("clip-"):
        return "clip"
    if model.startswith("sam-"):
        return "sam"
    if model.startswith("blip"):
        raise OvssError(f"'{model}' is not used by any recipe (BLIP is image-level: PnP-OVSS)")
    return "vfm"


def _check_benchmark(method: str, dataset: str) -> str:
    from featurestore.datasets import get_dataset

    if method not in RECIPE_DOCS:
        raise OvssError(f"'{method}' has no recipe; choose from {', '.join(list_recipes())}")
    name = get_dataset(dataset).name
    if name not in BENCHMARKS:
        raise OvssError(
            f"'{dataset}' has no {method} preset; choose from {', '.join(BENCHMARKS)} "
            "(for other images use plain options: --model, --size, --crop, --stride, --vocab)"
        )
    return name


def _patch_size(model: str) -> int:
    """Patch size of a registered backbone (built on the meta device: no weights, no memory)."""
    import torch

    from featurestore.backbones import create_backbone

    with torch.device("meta"):
        return create_backbone(model, random_init=True).info.patch_size


def recipe_for(
    method: str,
    dataset: str,
    models: Sequence[str] = (),
    size: int | None = None,
    crop: int | None = None,
    stride: int | None = None,
    pad_multiple: int | None = None,
    templates: str | None = None,
    text_model: str | None = None,
    family: str | None = None,
) -> Recipe:
    """The recipe of ``method`` on ``dataset`` (see the module doc), with optional changes.

    Args:
        method: ``proxyclip``, ``trident``, ``maskclip``, ``fmbseg`` or ``prototype``.
        dataset: one of the eight benchmarks (aliases accepted).
        models: replace the model of a role: ``clip-*`` the CLIP, ``sam-*`` the SAM, any other
            the VFM (``prototype``: the dense model, whatever it is).
        size, crop, stride, pad_multiple: change the window protocol (not SAM's).
        templates: template set (default: the method's).
        text_model: CLIP whose text tower embeds the vocabulary (default: the recipe's CLIP).
        family: class-file family (default: ``proxyclip`` for proxyclip/trident, else
            ``sclip``).

    Raises:
        OvssError: unknown method or dataset (listing the choices), a model for a role the
            method does not have, or an invalid protocol change.
    """
    ds = _check_benchmark(method, dataset)
    fam = family or ("proxyclip" if method in ("proxyclip", "trident") else "sclip")
    tmpl = templates or ("single" if method == "fmbseg" else DEFAULT_TEMPLATES)
    get_templates(tmpl)
    notes: list[str] = []
    settings: dict[str, Any]
    if method == "proxyclip":
        p = PROXYCLIP_PRESETS[ds]
        settings = {**asdict(p), **PROXYCLIP_COMMON}
        win = Protocol("short", p.size, crop=p.crop, stride=p.stride, pad_multiple=PROXYCLIP_PAD)
        roles = {"clip": ("clip-b16", win), "vfm": ("dino-b8", win)}
    elif method == "trident":
        t = TRIDENT_PRESETS[ds]
        settings = {**asdict(t), **TRIDENT_COMMON}
        win = Protocol("short", t.size, crop=t.crop, stride=t.stride, pad_multiple=PROXYCLIP_PAD)
        roles = {
            "clip": ("clip-b16", win),
            "vfm": ("dino-b16", win),
            "sam": ("sam-b", SAM_HALVES_PROTOCOL if t.sam_halves else SAM_PROTOCOL),
        }
    elif method == "maskclip":
        s = SCLIP_PRESETS[ds]
        settings = {**asdict(s), "crop": SCLIP_WINDOW[0], "stride": SCLIP_WINDOW[1]}
        win = Protocol("short", s.size, crop=SCLIP_WINDOW[0], stride=SCLIP_WINDOW[1])
        roles = {"clip": ("clip-b16", win)}
    elif method == "fmbseg":
        settings = {"clip_protocol": FMBSEG_CLIP_PROTOCOL.key(), "min_crops": 2}
        roles = {
            "clip": ("clip-l14", FMBSEG_CLIP_PROTOCOL),
            "vfm": ("dinov2-l14", FMBSEG_VFM_PROTOCOL),
            "sam": ("sam-h", SAM_PROTOCOL),
        }
        notes.append("[ours] FMbSeg has no public code: windows, sizes and SAM-H are our choice")
    else:  # prototype
        settings = {}
        roles = {"dense": ("clip-b16", PROTOTYPE_PROTOCOL)}

    explicit: dict[str, str] = {}
    for m in models:
        role = "dense" if method == "prototype" else _role_of(m)
        if role not in roles:
            raise OvssError(
                f"{method} has no {role} model (its roles: {', '.join(roles)}); "
                f"'{m}' cannot be used with --for {method}"
            )
        if role in explicit and explicit[role] != m:
            raise OvssError(f"two models for the {role} role: {explicit[role]} and {m}")
        explicit[role] = m
    if method == "trident":
        clip = explicit.get("clip", roles["clip"][0])
        if "sam" not in explicit and clip == "clip-h14":
            explicit["sam"] = "sam-h"
            notes.append("SAM ViT-H paired with CLIP ViT-H/14 (as in the paper)")
        # Trident's canvas (METHODS.md §4 step 2): sides rounded up to the CLIP patch grid and
        # at least the crop; CLIP and the window VFM share it.
        align = _patch_size(clip)
        canvas = Protocol(
            "trident", t.size, crop=t.crop, stride=t.stride, pad_multiple=PROXYCLIP_PAD, align=align
        )
        roles["clip"] = (roles["clip"][0], canvas)
        roles["vfm"] = (roles["vfm"][0], canvas)
        # SAM's image (METHODS.md §4 step 1): H and W rounded up to the same patch grid first.
        sam_proto = dataclasses.replace(roles["sam"][1], align=align)
        roles["sam"] = (roles["sam"][0], sam_proto)
        notes.append(
            f"SAM gets the image resized so H and W round up to multiples of {align} (the "
            f"CLIP patch, as the reference): {sam_proto.key()}"
            + (", on its left and right halves (two SamPredictor inputs)" if t.sam_halves else "")
        )

    changes = {
        k: v
        for k, v in (
            ("size", size),
            ("crop", crop),
            ("stride", stride),
            ("pad_multiple", pad_multiple),
        )
        if v is not None
    }
    steps = []
    for role, (default_model, proto) in roles.items():
        if changes and role != "sam":
            try:
                proto = dataclasses.replace(proto, **changes)
            except ValueError as e:
                raise OvssError(f"invalid protocol change for --for {method}: {e}") from None
        steps.append(RecipeStep(role, explicit.get(role, default_model), proto))
    if changes:
        settings.update(changes)
        notes.append(f"preset changed: {', '.join(f'{k}={v}' for k, v in changes.items())}")
    if method == "trident" and TRIDENT_PRESETS[ds].sam_halves:
        sam_step = next(s for s in steps if s.role == "sam")
        whole = dataclasses.replace(sam_step.protocol, resize="long")
        notes.append(
            f"--sam-refine (refine_sam=whole, the reference) also needs the whole-image SAM set "
            f"{sam_step.model}@{whole.key()}: ovss extract --store STORE --model "
            f"{sam_step.model} --resize long --size {whole.size} --align {whole.align} "
            f"--dataset {ds} --data-root PATH"
        )

    clip_models = [s.model for s in steps if s.model.startswith("clip-")]
    tm = text_model or (clip_models[0] if clip_models else "clip-b16")
    return Recipe(
        method=method,
        dataset=ds,
        steps=steps,
        vocab=f"dataset:{ds}/{fam}",
        templates=tmpl,
        text_model=tm,
        settings=settings,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Jobs: image feature sets + text sets in one call
# --------------------------------------------------------------------------------------------


@dataclass
class ExtractJob:
    """Everything one ``ovss extract`` call does.

    Attributes:
        groups: ``(protocol, models)`` extraction passes, in order.
        vocabs: vocabulary specs (or vocabularies) whose text embeddings are cached.
        template_name: template set of those embeddings.
        text_models: CLIP models whose text towers embed them.
        data_root: the ``custom`` dataset's root, for its ``classes.txt``.
        recipe: the recipe this job came from, if any.
    """

    groups: list[tuple[Protocol, list[str]]]
    vocabs: list[str | Vocabulary] = field(default_factory=list)
    template_name: str = DEFAULT_TEMPLATES
    text_models: list[str] = field(default_factory=list)
    data_root: str | None = None
    recipe: Recipe | None = None

    @property
    def models(self) -> list[str]:
        return [m for _, ms in self.groups for m in ms]


def make_job(
    models: Sequence[str],
    protocol: Protocol,
    method: str | None = None,
    dataset: str | None = None,
    vocabs: Sequence[str] = (),
    templates: str | None = None,
    text_model: str | None = None,
    data_root: str | os.PathLike | None = None,
    protocol_changes: dict[str, int] | None = None,
) -> ExtractJob:
    """The job of one ``ovss extract`` call.

    Without ``method``: one pass of ``models`` under ``protocol``; text sets for ``vocabs``
    with every ``clip-*`` model of the call, or ``text_model`` (default ``clip-b16`` when the call
    has no CLIP model). With ``method``: the recipe's passes, its vocabulary first, then any
    extra ``vocabs``; ``models`` replace recipe roles and ``protocol_changes`` (size, crop,
    stride, pad_multiple) change its window protocol.

    Raises:
        OvssError: unknown method/dataset/template set, or nothing to do.
    """
    root = str(data_root) if data_root is not None else None
    if method:
        if not dataset:
            raise OvssError(f"--for {method} needs --dataset NAME (the preset and vocabulary)")
        changes = dict(protocol_changes or {})
        bad = sorted(set(changes) - {"size", "crop", "stride", "pad_multiple"})
        if bad:
            raise OvssError(
                f"--for {method} fixes the resize rule; {', '.join(bad)} cannot be changed"
            )
        recipe = recipe_for(
            method, dataset, models=models, templates=templates, text_model=text_model, **changes
        )
        return ExtractJob(
            groups=recipe.groups(),
            vocabs=[recipe.vocab, *vocabs],
            template_name=recipe.templates,
            text_models=[recipe.text_model],
            data_root=root,
            recipe=recipe,
        )
    tmpl = templates or DEFAULT_TEMPLATES
    get_templates(tmpl)
    if not models and not vocabs:
        raise OvssError("nothing to extract: give --model NAME, --for METHOD or --vocab SPEC")
    if text_model:
        tms = [text_model]
    else:
        tms = [m for m in models if m.startswith("clip-")] or ["clip-b16"]
    return ExtractJob(
        groups=[(protocol, list(models))] if models else [],
        vocabs=list(vocabs),
        template_name=tmpl,
        text_models=tms if vocabs else [],
        data_root=root,
    )


@dataclass
class TextPlanRow:
    """A text set a job would compute (dry run)."""

    text_model: str
    key: str
    source: str
    classes: int
    queries: int
    template_set: str
    templates: int
    dim: int | None
    bytes: int | None
    cached: bool


@dataclass
class JobPlan:
    """Dry-run result: the recipe (if any), image feature sets and text sets."""

    recipe: dict | None
    feature_sets: list[PlanRow]
    text_sets: list[TextPlanRow]

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "feature_sets": [asdict(r) for r in self.feature_sets],
            "text_sets": [asdict(r) for r in self.text_sets],
        }


@dataclass
class JobReport:
    """What a job did: the extraction report of every pass, merged, and the text sets."""

    store: str
    shard: tuple[int, int]
    models: list[ModelReport]
    text_sets: list[TextSetReport]
    recipe: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _vocabularies(job: ExtractJob) -> list[Vocabulary]:
    return [parse_vocab(v, data_root=job.data_root) for v in job.vocabs]


def _text_options(job: ExtractJob, cfg: ExtractConfig, text_model: str) -> dict:
    """Weights options of a text model: the call's, under the rules of ``--weights``."""
    weights = cfg.weights
    if weights is not None:
        models = job.models
        if models and text_model not in models:
            raise OvssError(
                f"--weights names the checkpoint of the single --model; the text model "
                f"{text_model} needs its own: add the text set in a second call "
                f"(ovss extract --store {cfg.store} --text-model {text_model} --vocab ... "
                "--weights CKPT)"
            )
        if not models and len(job.text_models) > 1:
            raise OvssError("--weights names one checkpoint: use it with a single --text-model")
    return {
        "weights": weights,
        "random_init": cfg.random_init,
        "seed": cfg.seed,
        "arch_overrides": cfg.arch_overrides,
    }


def _text_dim(text_model: str, cfg: ExtractConfig) -> int | None:
    """Embedding width of a text model without loading weights (None if it cannot be told)."""
    import torch

    from featurestore.text import load_text_encoder

    try:
        with torch.device("meta"):
            model, _, _ = load_text_encoder(
                text_model, random_init=True, seed=cfg.seed, arch_overrides=cfg.arch_overrides
            )
    except Exception:  # a dry run reports what it can; the real run raises the real error
        return None
    proj = getattr(model, "text_projection", None)
    if proj is not None:
        return int(proj.shape[-1] if proj.ndim == 2 else proj.out_features)
    return None


def plan_job(records: Sequence[ImageRecord], job: ExtractJob, cfg: ExtractConfig) -> JobPlan:
    """What ``run_job`` would write: one ``PlanRow`` per (model, protocol) (images, windows,
    tokens, bytes) and one row per text set; loads no weights, writes nothing."""
    from featurestore.store import FeatureStore
    from featurestore.text import _group_complete, text_set_key

    rows: list[PlanRow] = []
    for protocol, models in job.groups:
        rows.extend(plan(records, dataclasses.replace(cfg, models=models, protocol=protocol)))
    text_rows = []
    vocabs = _vocabularies(job)
    store = None
    try:
        store = FeatureStore.open(cfg.store)
    except OvssError:
        pass
    for tm in job.text_models:
        dim = _text_dim(tm, cfg)
        for v in vocabs:
            key = text_set_key(tm, v, job.template_name)
            text_rows.append(
                TextPlanRow(
                    text_model=tm,
                    key=key,
                    source=v.source,
                    classes=v.n_classes,
                    queries=v.n_queries,
                    template_set=job.template_name,
                    templates=len(get_templates(job.template_name)),
                    dim=dim,
                    bytes=None if dim is None else v.n_queries * dim * 4,
                    cached=store is not None and _group_complete(store.root, key),
                )
            )
    recipe = job.recipe.to_dict() if job.recipe else None
    return JobPlan(recipe=recipe, feature_sets=rows, text_sets=text_rows)


def run_job(
    records: Sequence[ImageRecord],
    job: ExtractJob,
    cfg: ExtractConfig,
    progress: ProgressCallback | None = None,
) -> JobReport:
    """Run every extraction pass of ``job`` (resuming), then cache its text sets.

    Each pass is ``featurestore.extract.extract`` with ``cfg``'s options and the pass's models
    and protocol. Text sets are computed by shard 0 only (``--shard 0/n`` or torchrun rank 0);
    the other shards report them as skipped. A cached text set made with the same encoder is
    kept (``cfg.overwrite`` recomputes it).

    Raises:
        OvssError: as ``extract`` and ``featurestore.text.get_text_embeddings``; a text-only job
            needs an existing store or images to create it.
    """
    from featurestore.extract import extract, resolve_device, resolve_shard
    from featurestore.store import FeatureStore
    from featurestore.text import get_text_embeddings

    shard = resolve_shard(cfg.shard)
    vocabs = _vocabularies(job)  # fail on a bad --vocab before any long work
    for tm in job.text_models:
        _text_options(job, cfg, tm)
    model_reports: list[ModelReport] = []
    for protocol, models in job.groups:
        rep: ExtractReport = extract(
            records, dataclasses.replace(cfg, models=models, protocol=protocol), progress
        )
        model_reports.extend(rep.models)
    text_reports: list[TextSetReport] = []
    if vocabs and job.text_models:
        if not job.groups and records:
            store = FeatureStore.open_or_create(cfg.store, records)
        else:
            store = FeatureStore.open(cfg.store)
        for tm in job.text_models:
            opts = _text_options(job, cfg, tm)
            for v in vocabs:
                if shard[0] != 0:
                    text_reports.append(
                        TextSetReport(
                            text_model=tm,
                            key="",
                            source=v.source,
                            queries=v.n_queries,
                            classes=v.n_classes,
                            template_set=job.template_name,
                            status=f"skipped: shard {shard[0]}/{shard[1]} (shard 0 computes it)",
                        )
                    )
                    continue
                t0 = time.perf_counter()
                get_text_embeddings(
                    store,
                    tm,
                    v,
                    job.template_name,
                    device=resolve_device(cfg.device),
                    overwrite=cfg.overwrite,
                    progress=progress,
                    report=text_reports,
                    **opts,
                )
                text_reports[-1].seconds = round(time.perf_counter() - t0, 3)
    return JobReport(
        store=cfg.store,
        shard=shard,
        models=model_reports,
        text_sets=text_reports,
        recipe=job.recipe.to_dict() if job.recipe else None,
    )
