"""``sclip``, ``clearclip``, ``naclip``: the training-free last-block baselines from the CLIP cache.

Each replaces the attention of CLIP's last block and runs it on the cached block input ``x``
(``pre_last_cls`` then ``pre_last``: ``T = 1 + gh·gw`` tokens, CLS first, patches row-major),
with the block's own weights (``methods.clip_dense.LastBlock``). Per head, ``s = head_dim^-0.5``,
``y = ln_1(x)``, ``q, k, v = split(W_in y + b_in)`` (biases included):

- **SCLIP** (wangf3014/SCLIP ``custom_attn``): ``A = softmax(s q qᵀ) + softmax(s k kᵀ)`` (a plain
  sum: rows sum to 2); ``o = x + out_proj(A v)`` (residual kept); ``o = o + MLP(ln_2(o))``
  (FFN kept);
- **ClearCLIP** (mc-lan/ClearCLIP, the ``ClearCLIP`` branch with ``ignore_residual``):
  ``A = softmax(s q qᵀ)``; ``o = out_proj(A v)``: no residual, no FFN;
- **NACLIP** (sinahmr/NACLIP, ``arch='reduced'``, ``attn_strategy='naclip'``):
  ``A = softmax(s k kᵀ + Ω)``, ``Ω[p, p'] = exp(-((r - r')² + (c - c')²) / (2σ²))`` over every
  pair of patches (rows ``r`` = H/16, columns ``c`` = W/16 of the window; σ = 5), ``Ω = 0`` in
  the CLS row and column, the same for every head and not scaled by ``s``;
  ``o = out_proj(A v)``: no residual, no FFN.

Then ``feat = ln_post(o) @ proj`` per token, the CLS row dropped (after the projection), cosine
with the queries on the window's patch grid, bilinear to the window, windows averaged on the
canvas (the sliding-window rule of the reference repos), and the shared SCLIP-lineage scoring.
NACLIP refines its logits with PAMR at the original size (``methods.pamr``; on by default, as
its README results), SCLIP and ClearCLIP do not (``--set pamr=on`` turns it on for any of
them).

Presets per dataset: SCLIP's and NACLIP's repository configs; ClearCLIP's (S 448, windows
448 / 224, Cityscapes 224 / 224, ``logit_scale`` 50, ``prob_thd`` VOC21 0.5, Context60 0.15,
COCO-Object 0.4, a literal ``background`` query for those three: the ``clearclip`` class files).
[ours] Off the benchmarks: S 336 with 224 / 112 windows (SCLIP, NACLIP) and ClearCLIP's 448 /
448 / 224; ClearCLIP's ``logit_scale`` 50 applies to every named dataset, ``custom`` included.

Position embeddings: the authors resample them with DINO's offset rule; a feature set made with
another rule (recorded in its provenance) is refused unless ``pos_interp`` names that rule, and
such a run is never compared with a published number.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.backbones.posembed import OFFSET, POS_INTERP_RULES, pos_interp_of
from featurestore.errors import MissingFeatureSetError
from featurestore.protocol import Protocol
from methods.base import (
    FeatureRequirement,
    Segmenter,
    Vocab,
    VocabularyDefaults,
    register_method,
    window_logits_to_box,
)
from methods.clip_dense import ArrayLike, LastBlock, _tokens
from methods.maskclip import SCLIP_PRESETS, SCLIP_WINDOW
from methods.pamr import PAMRConfig

__all__ = [
    "ATTENTIONS",
    "CLEARCLIP_PRESETS",
    "NACLIP_PRESETS",
    "ClearCLIPConfig",
    "NACLIPConfig",
    "SCLIPConfig",
    "clearclip_dense",
    "gaussian_omega",
    "last_block_attention",
    "last_block_features",
    "naclip_dense",
    "qkv_heads",
    "sclip_dense",
]

ATTENTIONS = ("sclip", "clearclip", "naclip")
"""The last-block variants of this module (also their method names)."""


# --------------------------------------------------------------------------------------------
# The formulas
# --------------------------------------------------------------------------------------------


def qkv_heads(x: torch.Tensor, block: LastBlock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(T, D)`` block inputs -> ``q, k, v`` of ``(heads, T, hd)`` each (``W_in ln_1(x) +
    b_in``, split in q, k, v, then in heads)."""
    qkv = F.linear(block.ln_1(x), block.in_proj_weight, block.in_proj_bias)
    t = x.shape[0]
    heads = qkv.reshape(t, 3, block.num_heads, block.head_dim).permute(1, 2, 0, 3)
    return heads[0], heads[1], heads[2]


@functools.lru_cache(maxsize=32)
def _omega64(rows: int, cols: int, sigma: float) -> torch.Tensor:
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)
    d2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    out = torch.zeros(1 + rows * cols, 1 + rows * cols, dtype=torch.float64)
    out[1:, 1:] = torch.exp(-d2 / (2.0 * sigma * sigma))
    return out


def gaussian_omega(
    rows: int, cols: int, sigma: float = 5.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """NACLIP's neighbourhood term ``Ω`` ``(1 + rows·cols, 1 + rows·cols)``: 0 in the CLS row
    and column, ``exp(-((r - r')² + (c - c')²) / (2σ²))`` between patches (row-major; 1 on the
    diagonal, every pair, no truncation). Computed in float64, then cast to ``dtype``."""
    if rows <= 0 or cols <= 0 or not sigma > 0:
        raise ValueError(f"NACLIP's Ω needs a positive grid and sigma, got {rows}x{cols}, {sigma}")
    return _omega64(int(rows), int(cols), float(sigma)).to(dtype)


def last_block_attention(
    variant: str,
    q: torch.Tensor,
    k: torch.Tensor,
    grid: tuple[int, int] | None = None,
    sigma: float = 5.0,
) -> torch.Tensor:
    """The attention weights ``(heads, T, T)`` of a variant from ``q``, ``k`` ``(heads, T, hd)``
    (``grid`` = the window's patch grid ``(rows, cols)``, needed by ``naclip``)."""
    s = q.shape[-1] ** -0.5
    if variant == "sclip":
        return torch.softmax(s * q @ q.transpose(-1, -2), -1) + torch.softmax(
            s * k @ k.transpose(-1, -2), -1
        )
    if variant == "clearclip":
        return torch.softmax(s * q @ q.transpose(-1, -2), -1)
    if variant == "naclip":
        if grid is None:
            raise ValueError("naclip's attention needs the window's patch grid")
        omega = gaussian_omega(grid[0], grid[1], sigma, dtype=k.dtype).to(k.device)
        if omega.shape[-1] != k.shape[-2]:
            raise ValueError(f"grid {tuple(grid)} does not match {k.shape[-2]} tokens (CLS first)")
        return torch.softmax(s * k @ k.transpose(-1, -2) + omega, -1)
    raise ValueError(f"variant must be one of {', '.join(ATTENTIONS)}, not {variant!r}")


def last_block_features(
    variant: str,
    tokens: ArrayLike,
    cls: ArrayLike,
    grid: tuple[int, int],
    block: LastBlock,
    sigma: float = 5.0,
) -> torch.Tensor:
    """One window's features ``(N, E)`` (not normalised) of a variant (module doc).

    Args:
        variant: ``sclip``, ``clearclip`` or ``naclip``.
        tokens: ``(N, D)`` patch tokens entering the last block (``pre_last``), row-major over
            ``grid``.
        cls: ``(D,)`` the class token entering the last block (``pre_last_cls``).
        grid: the window's patch grid ``(rows, cols)``, ``rows · cols = N``.
        block: the last block; the computation runs in its dtype and device.
        sigma: NACLIP's Gaussian σ in patches.
    """
    x = _tokens(tokens, block)
    c = _tokens(cls, block, name="cls", ndims=(1,))
    if x.ndim != 2 or x.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"tokens {tuple(x.shape)} do not fill the grid {tuple(grid)}")
    x = torch.cat([c[None], x], dim=0)  # (T, D): CLS first, it takes part in the attention
    q, k, v = qkv_heads(x, block)
    attn = last_block_attention(variant, q, k, grid, sigma)
    o = (attn @ v).transpose(0, 1).reshape(x.shape[0], block.width)
    o = block.out_proj(o)
    if variant == "sclip":
        o = x + o
        o = o + block.mlp(block.ln_2(o))
    return block.project(o)[1:]  # CLS dropped after the projection


def sclip_dense(tokens: ArrayLike, cls: ArrayLike, grid: tuple[int, int], block: LastBlock):
    """SCLIP's features ``(N, E)``: ``last_block_features("sclip", ...)``."""
    return last_block_features("sclip", tokens, cls, grid, block)


def clearclip_dense(tokens: ArrayLike, cls: ArrayLike, grid: tuple[int, int], block: LastBlock):
    """ClearCLIP's features ``(N, E)``: ``last_block_features("clearclip", ...)``."""
    return last_block_features("clearclip", tokens, cls, grid, block)


def naclip_dense(
    tokens: ArrayLike, cls: ArrayLike, grid: tuple[int, int], block: LastBlock, sigma: float = 5.0
):
    """NACLIP's features ``(N, E)``: ``last_block_features("naclip", ..., sigma)``."""
    return last_block_features("naclip", tokens, cls, grid, block, sigma)


# --------------------------------------------------------------------------------------------
# Configs and presets
# --------------------------------------------------------------------------------------------

_RULES = tuple(POS_INTERP_RULES)


@dataclass
class LastBlockConfig(PAMRConfig):
    """Options shared by ``sclip``, ``clearclip`` and ``naclip``.

    Attributes:
        clip_model: CLIP backbone of the feature set (also the text model).
        size, crop, stride: the feature set's protocol (shorter side S, sliding windows; crop 0:
            the whole resized image).
        pos_interp: the position-embedding rule the cached set must have been made with: the
            authors' ``offset`` (a set made with another rule is refused; naming its rule here
            reads it, and such a run is never compared with a published number).
        class_family: class-file family for dataset vocabularies.
    """

    clip_model: str = "clip-b16"
    size: int = 336
    crop: int = SCLIP_WINDOW[0]
    stride: int = SCLIP_WINDOW[1]
    pos_interp: str = field(default=OFFSET, metadata={"choices": _RULES})
    class_family: str = "sclip"

    @property
    def protocol(self) -> Protocol:
        return Protocol(resize="short", size=self.size, crop=self.crop, stride=self.stride)

    @property
    def text_model(self) -> str:
        return self.clip_model


@dataclass
class SCLIPConfig(LastBlockConfig):
    """Options of ``sclip`` (SCLIP's repository defaults: OpenAI CLIP-B/16, windows 224 / 112,
    no refinement; S [ours] 336 off the benchmarks)."""


@dataclass
class ClearCLIPConfig(LastBlockConfig):
    """Options of ``clearclip`` (ClearCLIP's defaults: S 448, windows 448 / 224, no
    refinement, its own class files)."""

    size: int = 448
    crop: int = 448
    stride: int = 224
    class_family: str = "clearclip"


@dataclass
class NACLIPConfig(LastBlockConfig):
    """Options of ``naclip`` (NACLIP's README runs: windows 224 / 112, σ 5, PAMR on).

    Attributes:
        sigma: standard deviation of NACLIP's Gaussian neighbourhood, in patches (5).
    """

    pamr: bool = True
    sigma: float = 5.0


@dataclass(frozen=True)
class LastBlockPreset:
    """One dataset's settings of a last-block baseline.

    Attributes:
        size, crop, stride: shorter side S and the sliding windows (crop 0: whole image).
        logit_scale, prob_thd, area_thd: the scoring presets.
    """

    size: int
    crop: int = SCLIP_WINDOW[0]
    stride: int = SCLIP_WINDOW[1]
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None


SCLIP_LAST_BLOCK_PRESETS: dict[str, LastBlockPreset] = {
    name: LastBlockPreset(p.size, *SCLIP_WINDOW, p.logit_scale, p.prob_thd, p.area_thd)
    for name, p in SCLIP_PRESETS.items()
}
"""SCLIP's repository configs per benchmark (``methods.maskclip.SCLIP_PRESETS``)."""

NACLIP_PRESETS: dict[str, LastBlockPreset] = {
    "voc21": LastBlockPreset(336, crop=0, stride=0, prob_thd=0.1),
    "voc20": LastBlockPreset(336, crop=0, stride=0),
    "context60": LastBlockPreset(336, prob_thd=0.1),
    "context59": LastBlockPreset(336),
    "coco_object": LastBlockPreset(336, prob_thd=0.1),
    "coco_stuff171": LastBlockPreset(336),
    "ade20k": LastBlockPreset(336),
    "cityscapes": LastBlockPreset(560),
}
"""NACLIP's repository configs per benchmark (VOC20/VOC21: the whole image, no windows)."""

CLEARCLIP_LOGIT_SCALE = 50.0
CLEARCLIP_PRESETS: dict[str, LastBlockPreset] = {
    "voc21": LastBlockPreset(448, 448, 224, CLEARCLIP_LOGIT_SCALE, 0.5),
    "voc20": LastBlockPreset(448, 448, 224, CLEARCLIP_LOGIT_SCALE),
    "context60": LastBlockPreset(448, 448, 224, CLEARCLIP_LOGIT_SCALE, 0.15),
    "context59": LastBlockPreset(448, 448, 224, CLEARCLIP_LOGIT_SCALE),
    "coco_object": LastBlockPreset(448, 448, 224, CLEARCLIP_LOGIT_SCALE, 0.4),
    "coco_stuff171": LastBlockPreset(448, 448, 224, CLEARCLIP_LOGIT_SCALE),
    "ade20k": LastBlockPreset(448, 448, 224, CLEARCLIP_LOGIT_SCALE),
    "cityscapes": LastBlockPreset(448, 224, 224, CLEARCLIP_LOGIT_SCALE),
}
"""ClearCLIP's repository configs per benchmark (``configs/cfg_*.py`` + constructor defaults)."""


# --------------------------------------------------------------------------------------------
# The segmenters
# --------------------------------------------------------------------------------------------


class LastBlockSegmenter(Segmenter):
    """The shared driver of the three baselines: one CLIP feature set, one formula per window."""

    variant: ClassVar[str] = ""
    PRESETS: ClassVar[dict[str, LastBlockPreset]] = {}
    default_scoring: ClassVar[dict] = {}

    @classmethod
    def requirements(cls, config: LastBlockConfig) -> list[FeatureRequirement]:
        """One CLIP feature set (block inputs, CLS included) under the config's protocol;
        a ``ValueError`` for an invalid option (the caller makes it one line)."""
        from methods.pamr import parse_dilations

        parse_dilations(config.pamr_dilations)
        if config.pamr_steps < 0:
            raise ValueError(f"pamr_steps must be >= 0, not {config.pamr_steps}")
        sigma = getattr(config, "sigma", 1.0)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a positive number, not {sigma}")
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
        p = cls.PRESETS.get(dataset)
        if p is None:
            return {}
        return {"size": p.size, "crop": p.crop, "stride": p.stride}

    @classmethod
    def scoring_presets(cls, dataset: str) -> dict:
        p = cls.PRESETS.get(dataset)
        if p is None:
            return dict(cls.default_scoring)
        return {"logit_scale": p.logit_scale, "prob_thd": p.prob_thd, "area_thd": p.area_thd}

    @classmethod
    def recipe_notes(cls, config: LastBlockConfig) -> list[str]:
        notes = [
            f"position embeddings: the '{config.pos_interp}' rule"
            + (" (the authors')" if config.pos_interp == OFFSET else " (not the authors')")
        ]
        if config.pamr:
            notes.append("PAMR refinement reads the images at segmentation time")
        return notes

    @classmethod
    def vocabulary_defaults(cls, config: LastBlockConfig) -> VocabularyDefaults:
        return VocabularyDefaults(config.clip_model, "openai80", config.class_family)

    def __init__(self, store, config, device="cpu"):
        super().__init__(store, config, device)
        fs = self.sets["clip"]
        rule = pos_interp_of(fs.provenance.get("backbone", {}))
        if rule != config.pos_interp:
            raise MissingFeatureSetError(
                f"feature set '{fs.key}' was made with the position-embedding rule "
                f"'{rule}', not '{config.pos_interp}' (the rule {self.name} asks for; "
                f"pos_interp={rule} reads it anyway, never compared with published numbers)",
                store=str(store.path),
                model=config.clip_model,
                protocol=config.protocol,
                tensors=("pre_last", "pre_last_cls"),
                reason="mismatch",
                role="clip",
                needed_by=self.name,
            )
        self.block = LastBlock.from_feature_set(fs).to(self.device)

    def missing_set(self, requirement, error):
        if isinstance(error, MissingFeatureSetError) and not error.needed_by:
            return error.with_message(str(error), needed_by=self.name)
        return error

    def window_features(self, tokens: torch.Tensor, cls: torch.Tensor, grid: tuple[int, int]):
        """``(N, E)`` features of one window."""
        return last_block_features(self.variant, tokens, cls, grid, self.block)

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        from methods.scoring import merge_window_logits

        f = self.sets["clip"].read(index, names=["pre_last", "pre_last_cls"])
        text = F.normalize(vocab.embeddings.float(), dim=-1).to(self.device)
        windows = []
        for w, grid in enumerate(f.window_tokens("pre_last")):
            gh, gw = grid.shape[:2]
            tokens = torch.from_numpy(np.asarray(grid, np.float32).reshape(gh * gw, -1))
            cls = torch.from_numpy(np.asarray(f.tensors["pre_last_cls"][w], np.float32))
            with torch.inference_mode():
                feat = self.window_features(tokens.to(self.device), cls.to(self.device), (gh, gw))
                cos = F.normalize(feat.float(), dim=-1) @ text.T
            logits = cos.T.reshape(-1, gh, gw)  # merged on the device
            windows.append(window_logits_to_box(logits, f.win_box[w], f.win_pad[w]))
        return merge_window_logits(windows, f.win_box, f.resized_size), f.resized_size


@register_method
class SCLIPSegmenter(LastBlockSegmenter):
    name = "sclip"
    variant = "sclip"
    Config = SCLIPConfig
    PRESETS = SCLIP_LAST_BLOCK_PRESETS
    doc = (
        "SCLIP: correlative self-attention (q-q + k-k) in CLIP's last block, residual and FFN kept"
    )


@register_method
class ClearCLIPSegmenter(LastBlockSegmenter):
    name = "clearclip"
    variant = "clearclip"
    Config = ClearCLIPConfig
    PRESETS = CLEARCLIP_PRESETS
    default_scoring = {"logit_scale": CLEARCLIP_LOGIT_SCALE}
    doc = "ClearCLIP: q-q attention in CLIP's last block, no residual, no FFN"


@register_method
class NACLIPSegmenter(LastBlockSegmenter):
    name = "naclip"
    variant = "naclip"
    Config = NACLIPConfig
    PRESETS = NACLIP_PRESETS
    doc = (
        "NACLIP: k-k attention + Gaussian neighbourhood in CLIP's last block, no residual/FFN, PAMR"
    )

    def window_features(self, tokens: torch.Tensor, cls: torch.Tensor, grid: tuple[int, int]):
        return last_block_features(self.variant, tokens, cls, grid, self.block, self.config.sigma)
