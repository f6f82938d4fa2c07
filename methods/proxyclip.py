"""``proxyclip``: the last-block proxy attention of ProxyCLIP (METHODS.md §3), from the store.

Per window, with CLIP tokens entering the last block ``x`` and VFM patch features ``ex`` of the
same (padded) crop::

    v = W_v ln_1(x) + b_v  (CLS dropped), per head, bilinear to the VFM grid (H', W')
    f = l2n(ex) ; S = f f^T ; S = (S - beta * mean(S)) * gamma   (mean: ONE scalar)
    S[S < 0] = -inf ; A = softmax(S, -1)          (one A shared by every head)
    feat = ln_post(out_proj(A v)) @ proj          (no residual, no MLP)

then cosine with the queries on the VFM grid, per-window logits to the window box, windows
averaged (§0.3), and §0.2 scoring. Both feature sets use the same protocol (windows padded
symmetrically to a multiple of 56 px, ProxyCLIP's rule; with CLIP-B/16 the multiple becomes
lcm(56, 16) = 112, identical for full 336 px crops).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.protocol import Protocol
from methods.base import FeatureRequirement, Segmenter, Vocab, register_method, window_logits_to_box


@dataclass
class ProxyCLIPConfig:
    """Options of ``proxyclip`` (defaults: the paper's CLIP ViT-B/16 OpenAI + DINO ViT-B/8).

    Attributes:
        clip_model: CLIP backbone (also the text model).
        vfm_model: the proxy vision foundation model (dino-b8; DINOv2 / DINO v1 names work).
        size, crop, stride, pad_multiple: the protocol shared by both feature sets.
        beta: threshold factor on the mean similarity (1.2).
        gamma: sharpness after thresholding (3.0).
        class_family: class-file family for dataset vocabularies (``proxyclip``).
    """

    clip_model: str = "clip-b16"
    vfm_model: str = "dino-b8"
    size: int = 336
    crop: int = 336
    stride: int = 112
    pad_multiple: int = 56
    beta: float = 1.2
    gamma: float = 3.0
    class_family: str = "proxyclip"

    @property
    def protocol(self) -> Protocol:
        return Protocol(
            resize="short",
            size=self.size,
            crop=self.crop,
            stride=self.stride,
            pad_multiple=self.pad_multiple,
        )

    @property
    def text_model(self) -> str:
        return self.clip_model


def proxy_attention(vfm_tokens: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """ProxyCLIP's attention from VFM patch features ``(N', C)`` -> ``(N', N')`` (rows sum to 1;
    exactly 0 where ``(S - beta * mean S) * gamma < 0``)."""
    f = F.normalize(vfm_tokens.float(), dim=-1)
    s = f @ f.T
    s = (s - beta * s.mean()) * gamma
    s = s.masked_fill(s < 0, float("-inf"))
    return torch.softmax(s, dim=-1)


def proxy_window_features(
    clip_tokens: torch.Tensor,
    clip_grid: tuple[int, int],
    vfm_tokens: torch.Tensor,
    vfm_grid: tuple[int, int],
    block,
    beta: float = 1.2,
    gamma: float = 3.0,
) -> torch.Tensor:
    """One window's ProxyCLIP features ``(H'*W', E)`` on the VFM grid."""
    from methods.clip_dense import attention_output, value_tokens

    v = value_tokens(clip_tokens, block)  # (heads, h*w, hd)
    heads, _, hd = v.shape
    gh, gw = clip_grid
    vh, vw = vfm_grid
    v = v.transpose(1, 2).reshape(heads, hd, gh, gw)
    v = F.interpolate(v, size=(vh, vw), mode="bilinear", align_corners=False)
    v = v.reshape(heads, hd, vh * vw).transpose(1, 2)  # (heads, N', hd)
    attn = proxy_attention(vfm_tokens, beta, gamma)
    o = attention_output(attn.unsqueeze(0), v, block)  # (N', D)
    return block.project(o)


@dataclass(frozen=True)
class ProxyCLIPPreset:
    """ProxyCLIP per dataset (EVAL.md §4.4).

    Attributes:
        size, crop, stride: shorter side S and the sliding windows.
        prob_thd: the background threshold (a scoring preset).
    """

    size: int
    crop: int
    stride: int
    prob_thd: float


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
"""EVAL.md §4.4, one row per benchmark."""

PROXYCLIP_COMMON = {"beta": 1.2, "gamma": 3.0, "logit_scale": 40.0}
"""Settings shared by every dataset config of the reference."""


@register_method
class ProxyCLIPSegmenter(Segmenter):
    name = "proxyclip"
    Config = ProxyCLIPConfig
    doc = "ProxyCLIP: CLIP last-block values with VFM (DINO) proxy attention per window"

    @classmethod
    def requirements(cls, config: ProxyCLIPConfig) -> list[FeatureRequirement]:
        """CLIP last-block inputs and VFM patch features of the same windows."""
        p = config.protocol
        return [
            FeatureRequirement("clip", config.clip_model, p, ("pre_last",), "clip_model"),
            FeatureRequirement("vfm", config.vfm_model, p, ("patch",), "vfm_model"),
        ]

    @classmethod
    def presets(cls, dataset: str) -> dict:
        """EVAL.md §4.4 (``PROXYCLIP_PRESETS``): S, crop, stride, beta, gamma; {} elsewhere."""
        p = PROXYCLIP_PRESETS.get(dataset)
        if p is None:
            return {}
        common = {k: PROXYCLIP_COMMON[k] for k in ("beta", "gamma")}
        return {"size": p.size, "crop": p.crop, "stride": p.stride, **common}

    @classmethod
    def scoring_presets(cls, dataset: str) -> dict:
        p = PROXYCLIP_PRESETS.get(dataset)
        if p is None:
            return {}
        return {"prob_thd": p.prob_thd, "logit_scale": PROXYCLIP_COMMON["logit_scale"]}

    def __init__(self, store, config, device="cpu"):
        super().__init__(store, config, device)
        from methods.clip_dense import LastBlock

        self.block = LastBlock.from_feature_set(self.sets["clip"]).to(self.device)

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        from methods.scoring import merge_window_logits

        c = self.sets["clip"].read(index, names=["pre_last"])
        d = self.sets["vfm"].read(index, names=["patch"])
        if not np.array_equal(c.win_box, d.win_box):
            raise ValueError("CLIP and VFM feature sets disagree on the windows")
        text = F.normalize(vocab.embeddings.float(), dim=-1).to(self.device)
        windows = []
        for w, (cg, vg) in enumerate(
            zip(c.window_tokens("pre_last"), d.window_tokens("patch"), strict=True)
        ):
            ch, cw = cg.shape[:2]
            vh, vw = vg.shape[:2]
            ct = torch.from_numpy(np.asarray(cg, np.float32).reshape(ch * cw, -1))
            vt = torch.from_numpy(np.asarray(vg, np.float32).reshape(vh * vw, -1))
            with torch.inference_mode():
                feat = proxy_window_features(
                    ct.to(self.device),
                    (ch, cw),
                    vt.to(self.device),
                    (vh, vw),
                    self.block,
                    self.config.beta,
                    self.config.gamma,
                )
                cos = F.normalize(feat.float(), dim=-1) @ text.T
            logits = cos.T.reshape(-1, vh, vw)  # merged on the device
            windows.append(window_logits_to_box(logits, d.win_box[w], d.win_pad[w]))
        return merge_window_logits(windows, d.win_box, d.resized_size), d.resized_size
