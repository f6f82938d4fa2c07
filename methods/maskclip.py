"""``maskclip``: CLIP dense features from the cached last-block inputs (METHODS.md §0.5).

Per window: the value path of the last block (``maskclip`` default; ``bare`` = ClearCLIP-style
bare value path; ``pixelclip`` = PixelCLIP's dense block) -> cosine with the queries on the
window's patch grid -> bilinear to the window -> windows averaged on the canvas (§0.3).

Presets [ours]: no reference repo evaluates plain MaskCLIP with the mmseg protocol, so the
per-dataset short side S, ``logit_scale``, ``prob_thd`` and ``area_thd`` follow SCLIP's configs
(EVAL.md §4.2; same CLIP-B/16, crop 224, stride 112; ``SCLIP_PRESETS`` below).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featurestore.protocol import Protocol
from methods.base import FeatureRequirement, Segmenter, Vocab, register_method, window_logits_to_box

VARIANTS = ("maskclip", "bare", "pixelclip")


@dataclass
class MaskCLIPConfig:
    """Options of ``maskclip``.

    Attributes:
        clip_model: CLIP backbone of the feature set (also the text model).
        size, crop, stride: the feature set's protocol (shorter side S, sliding windows).
        variant: ``maskclip`` (value path + residual + MLP, MaskCLIP's code), ``bare`` (value
            path only: FMbSeg's description), ``pixelclip`` (PixelCLIP's dense block).
        class_family: class-file family for dataset vocabularies (``sclip``).
    """

    clip_model: str = "clip-b16"
    size: int = 448
    crop: int = 224
    stride: int = 112
    variant: str = "maskclip"
    class_family: str = "sclip"

    @property
    def protocol(self) -> Protocol:
        return Protocol(resize="short", size=self.size, crop=self.crop, stride=self.stride)

    @property
    def text_model(self) -> str:
        return self.clip_model


@dataclass(frozen=True)
class SCLIPPreset:
    """SCLIP per dataset (EVAL.md §4.2), the ``maskclip`` presets.

    Attributes:
        size: shorter side S (windows 224 / 112: ``SCLIP_WINDOW``).
        logit_scale, prob_thd, area_thd: the scoring presets.
    """

    size: int
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None


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
"""EVAL.md §4.2, SCLIP's column, one row per benchmark."""

SCLIP_WINDOW = (224, 112)
"""SCLIP's sliding window on every dataset: crop, stride."""


@register_method
class MaskCLIPSegmenter(Segmenter):
    name = "maskclip"
    Config = MaskCLIPConfig
    doc = "CLIP last-block value path (MaskCLIP / bare / PixelCLIP variants) per window"

    @classmethod
    def requirements(cls, config: MaskCLIPConfig) -> list[FeatureRequirement]:
        if config.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}")
        return [
            FeatureRequirement(
                "clip",
                config.clip_model,
                config.protocol,
                ("pre_last", "pre_last_cls"),
                "clip_model",
            )
        ]

    @classmethod
    def presets(cls, dataset: str) -> dict:
        """EVAL.md §4.2 (``SCLIP_PRESETS``): S, and SCLIP's windows; {} off the benchmarks."""
        p = SCLIP_PRESETS.get(dataset)
        if p is None:
            return {}
        return {"size": p.size, "crop": SCLIP_WINDOW[0], "stride": SCLIP_WINDOW[1]}

    @classmethod
    def scoring_presets(cls, dataset: str) -> dict:
        p = SCLIP_PRESETS.get(dataset)
        if p is None:
            return {}
        return {"logit_scale": p.logit_scale, "prob_thd": p.prob_thd, "area_thd": p.area_thd}

    def __init__(self, store, config, device="cpu"):
        super().__init__(store, config, device)
        from methods.clip_dense import LastBlock

        self.block = LastBlock.from_feature_set(self.sets["clip"]).to(self.device)

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        from methods.clip_dense import bare_value_dense, maskclip_dense, pixelclip_dense
        from methods.scoring import merge_window_logits

        fn = {"maskclip": maskclip_dense, "bare": bare_value_dense, "pixelclip": pixelclip_dense}[
            self.config.variant
        ]
        f = self.sets["clip"].read(index)
        text = torch.nn.functional.normalize(vocab.embeddings.float(), dim=-1).to(self.device)
        windows = []
        for w, grid in enumerate(f.window_tokens("pre_last")):
            gh, gw = grid.shape[:2]
            tokens = torch.from_numpy(np.asarray(grid, np.float32).reshape(gh * gw, -1))
            cls = torch.from_numpy(np.asarray(f.tensors["pre_last_cls"][w], np.float32))
            with torch.inference_mode():
                feat = fn(tokens.to(self.device), cls.to(self.device), self.block)
                cos = torch.nn.functional.normalize(feat.float(), dim=-1) @ text.T
            logits = cos.T.reshape(-1, gh, gw)  # merged on the device
            windows.append(window_logits_to_box(logits, f.win_box[w], f.win_pad[w]))
        return merge_window_logits(windows, f.win_box, f.resized_size), f.resized_size
