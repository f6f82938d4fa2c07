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
    """One published configuration and its mIoU per dataset."""

    method: str  # our method name that reproduces it
    setting: str
    source: str
    miou: dict[str, float]
    requires: dict[str, Any] = field(default_factory=dict)  # backbone models that must match


def _row(method, setting, source, values, **requires) -> ReferenceRow:
    miou = {k: v for k, v in zip(DATASET_COLUMNS, values, strict=True) if v is not None}
    return ReferenceRow(method, setting, source, miou, requires)


REFERENCES: tuple[ReferenceRow, ...] = (
    _row(
        "aligned",
        "FMbSeg, DINOv2 ViT-L/14 + CLIP ViT-L/14, trained on COCO-Stuff images",
        "paper 000, Table 1",
        (67.73, None, 57.63, 85.65, 42.72, 29.88, 28.36, 16.25),
        dense="dinov2-l14",
        text_model="clip-l14",
    ),
    _row(
        "pnp-ovss",
        "PnP-OVSS + BLIP Flickr, 768 px",
        "paper 003, Table 3",
        (None, None, 31.8, 54.1, 42.8, 32.5, None, 23.5),
    ),
    _row(
        "pnp-ovss",
        "PnP-OVSS + BLIP COCO, 768 px",
        "paper 003, Table 3",
        (None, None, 33.8, 55.7, 41.9, 32.6, None, 23.2),
    ),
    _row(
        "pixelclip",
        "PixelCLIP ViT-B/16, SAM masks (detectron2 protocol, VOC = VOC20)",
        "paper 002, Table 1",
        (None, None, None, 85.9, 37.9, 23.6, 27.2, 18.7),
    ),
    _row(
        "pixelclip",
        "PixelCLIP ViT-B/16, DINO masks",
        "paper 002, Table 1",
        (None, None, None, 83.8, 34.3, 22.2, 22.9, 17.4),
    ),
    _row(
        "sclip",
        "SCLIP repo default (OpenAI ViT-B/16)",
        "SCLIP README",
        (59.63, 31.74, 33.52, 81.54, 34.46, 22.77, 32.34, 16.45),
    ),
    _row(
        "naclip",
        "NACLIP repo (ViT-B/16, PAMR on)",
        "NACLIP README",
        (64.07, 34.99, 36.19, 83.03, 38.35, 25.69, 38.27, 19.05),
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
