"""Published numbers (EVAL.md §8) and the rule for comparing a result with them.

A result is comparable only with a row whose method, backbones and protocol match; otherwise
``check_reference`` says why not and lists the rows that exist for the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DATASET_COLUMNS = (
    "voc21",
    "context60",
    "coco_object",
    "voc20",
    "context59",
    "coco_stuff171",
    "cityscapes",
    "ade20k",
)


@dataclass(frozen=True)
class ReferenceRow:
    """One published configuration and its mIoU per dataset.

    Attributes:
        method: our method name that reproduces it.
        setting, source: what was published, and where.
        miou: mIoU per dataset column.
        requires: backbone models or config values that must match (``role`` or config field
            -> value).
        pos_interp: the position-embedding rule every cached backbone must have been made with
            (None: not checked).
        preset: the run must use the method's own per-dataset presets (protocol and scoring),
            its default template set and class family.
    """

    method: str
    setting: str
    source: str
    miou: dict[str, float]
    requires: dict[str, Any] = field(default_factory=dict)
    pos_interp: str | None = None
    preset: bool = False


def _row(method, setting, source, values, pos_interp=None, preset=False, **requires):
    miou = {k: v for k, v in zip(DATASET_COLUMNS, values, strict=True) if v is not None}
    return ReferenceRow(method, setting, source, miou, requires, pos_interp, preset)


REFERENCES: tuple[ReferenceRow, ...] = (
    _row(
        "aligned",
        "FMbSeg, DINOv2 ViT-L/14 + CLIP ViT-L/14, trained on COCO-Stuff images",
        "FMbSeg paper, Table 1",
        (67.73, None, 57.63, 85.65, 42.72, 29.88, 28.36, 16.25),
        dense="dinov2-l14",
        text_model="clip-l14",
    ),
    _row(
        "pnp-ovss",
        "PnP-OVSS + BLIP Flickr, 768 px",
        "PnP-OVSS paper (Luo et al., 2024), Table 3",
        (None, None, 31.8, 54.1, 42.8, 32.5, None, 23.5),
    ),
    _row(
        "pnp-ovss",
        "PnP-OVSS + BLIP COCO, 768 px",
        "PnP-OVSS paper (Luo et al., 2024), Table 3",
        (None, None, 33.8, 55.7, 41.9, 32.6, None, 23.2),
    ),
    _row(
        "pixelclip",
        "PixelCLIP ViT-B/16, SAM masks (detectron2 protocol, VOC = VOC20)",
        "PixelCLIP paper (Shin et al., 2024), Table 1",
        (None, None, None, 85.9, 37.9, 23.6, 27.2, 18.7),
    ),
    _row(
        "pixelclip",
        "PixelCLIP ViT-B/16, DINO masks",
        "PixelCLIP paper (Shin et al., 2024), Table 1",
        (None, None, None, 83.8, 34.3, 22.2, 22.9, 17.4),
    ),
    _row(
        "sclip",
        "SCLIP repo default (OpenAI ViT-B/16)",
        "SCLIP README",
        (59.63, 31.74, 33.52, 81.54, 34.46, 22.77, 32.34, 16.45),
        pos_interp="offset",
        preset=True,
        clip="clip-b16",
        pamr=False,
    ),
    _row(
        "naclip",
        "NACLIP repo (ViT-B/16, PAMR on)",
        "NACLIP README",
        (64.07, 34.99, 36.19, 83.03, 38.35, 25.69, 38.27, 19.05),
        pos_interp="offset",
        preset=True,
        clip="clip-b16",
        pamr=True,
        pamr_steps=10,
        pamr_dilations="8,16",
        sigma=5.0,
    ),
    _row(
        "clearclip",
        "ClearCLIP (OpenAI ViT-B/16, no refinement)",
        "ClearCLIP paper (ECCV 2024), Table 1",
        # Context60, COCO-Object and Context59 left out until read from the paper itself.
        (51.8, None, None, 80.9, None, 23.9, 30.0, 16.7),
        pos_interp="offset",
        preset=True,
        clip="clip-b16",
        pamr=False,
    ),
)


def check_reference(result) -> dict[str, Any]:
    """Compare an ``EvalResult`` with the published row that matches its configuration."""
    ds = result.dataset
    proto = result.protocol or {}
    method = proto.get("method")
    rows = [r for r in REFERENCES if ds in r.miou]
    listing = [f"{r.setting}: {r.miou[ds]} ({r.source})" for r in rows]
    cands = [r for r in rows if r.method == method]
    if not cands:
        return {
            "matched": False,
            "reason": f"no published {ds} number for method '{method}'",
            "available": listing,
        }
    backbones = proto.get("backbones", {})
    models = {role: b.get("model") for role, b in backbones.items()}
    cfg = proto.get("config", {})
    for r in cands:
        ok = all(models.get(k) == v or cfg.get(k) == v for k, v in r.requires.items())
        weights_real = all(
            not str(b.get("weights", "")).startswith("random-init") for b in backbones.values()
        )
        if ok and weights_real and r.pos_interp is not None:
            rules = {role: b.get("pos_interp") for role, b in backbones.items()}
            other = {role: rule for role, rule in rules.items() if rule != r.pos_interp}
            if other:
                return {
                    "matched": False,
                    "reason": f"the published {ds} number of '{method}' was made with the "
                    f"'{r.pos_interp}' position-embedding rule; this run's features used "
                    + ", ".join(
                        f"'{rule or 'unrecorded'}' ({role})" for role, rule in other.items()
                    ),
                    "available": listing,
                }
        if ok and weights_real and r.preset:
            diff = _preset_differences(method, ds, proto)
            if diff:
                return {
                    "matched": False,
                    "reason": f"the published {ds} number of '{method}' uses its preset; this "
                    "run differs in " + ", ".join(diff),
                    "available": listing,
                }
        if ok and weights_real:
            ours = result.metrics.get("mIoU")
            return {
                "matched": True,
                "setting": r.setting,
                "source": r.source,
                "published": r.miou[ds],
                "ours": ours,
                "difference": None if ours is None else round(ours - r.miou[ds], 2),
            }
    return {
        "matched": False,
        "reason": f"method '{method}' has published {ds} numbers, but not for these "
        "backbones/weights (random-init weights never match)",
        "available": listing,
    }


def _preset_differences(method: str, dataset: str, proto: dict[str, Any]) -> list[str]:
    """``name (ours vs published)`` for every preset setting a run changed: the method's
    per-dataset config and scoring presets, its default template set and class family."""
    from methods.base import build_config, config_to_dict, get_method

    cls = get_method(method)
    expected = config_to_dict(build_config(cls, dataset))
    cfg = proto.get("config", {})
    out = []
    for k in cls.presets(dataset) or {}:
        if cfg.get(k) != expected.get(k):
            out.append(f"{k} ({cfg.get(k)} vs {expected.get(k)})")
    scoring = proto.get("scoring", {})
    for k, v in cls.scoring_presets(dataset).items():
        if scoring.get(k) != v:
            out.append(f"{k} ({scoring.get(k)} vs {v})")
    defaults = cls.vocabulary_defaults(build_config(cls, dataset))
    if proto.get("templates") != defaults.templates:
        out.append(f"templates ({proto.get('templates')} vs {defaults.templates})")
    vocab = f"dataset:{dataset}/{defaults.family}"
    if not str(proto.get("vocabulary", "")).startswith(vocab):
        out.append(f"vocabulary ({proto.get('vocabulary')} vs {vocab})")
    return out
