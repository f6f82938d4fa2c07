"""``trident``: splice-then-segment with a SAM affinity (Trident, paper 004; METHODS.md §4).

Everything runs from three feature sets of one store (``ovss extract --for trident --dataset
NAME``): CLIP's last-block inputs per window (``pre_last``), DINO patch features of the same
windows (``patch``), and per image SAM's last global-attention block (``q``/``k``/``v``/
``attn_log_mass``, plus the neck ``embedding`` for ``--sam-refine``).

Per image (``N'`` VFM tokens per window, ``D`` CLIP width, ``E`` embedding width, ``n = vh*vw``
tokens of SAM's valid grid, ``H`` heads)::

    SAM      : the image resized (cv2 INTER_LINEAR) so H and W round up to multiples of the CLIP
               patch, then SamPredictor's input of it (§4 step 1; sets ``long1024-a16``)
    canvas   : the short-side image rounded up to the CLIP patch grid, each side >= crop (§4.2);
               windows crop/stride on that grid
    per window w: v_w = W_v ln_1(x_w) + b_v, per head, bilinear to the VFM grid
               S_w = l2n(dino_w) l2n(dino_w)^T ; m = mean of ALL S_w of the image (one scalar)
               A_w = softmax(mask_{<0}((S_w - beta*m) * gamma)) ; o_w = A_w v_w  (before out_proj)
    splice   : o_w onto the canvas token grid, averaged where windows overlap     (Th, Tw, D)
    resize   : bilinear to SAM's valid grid (vh, vw) = input_size // 16          (n, D)
    affinity : sv = l2n(SAM v per head) ; cos_h = sv_h sv_h^T
               thr_i = min(cos_fac * mean_h mean_k cos_h[i, k], 0.9)   (refine_neg_cos off:
               thr_i < 0 -> 0.6) ; Am = mean_h where(cos_h > thr, attn_h, 0) ; W = Am / rowsum
    aggregate: feat = ln_post(out_proj(W @ x)) @ proj ; cos = l2n(feat) . text   (Q, vh, vw)

The driver (``methods.segment``) resizes ``(Q, vh, vw)`` bilinearly to the original image and
applies §0.2 scoring. ``TridentSegmenter.refine`` is the optional SAM refinement of §4 step 7
(prompts decoded from a cached embedding, no encoder pass). With ``sam_halves`` (Cityscapes) the
affinity comes from the halves set, and the refinement, as in the reference, decodes against the
whole image: the whole-image SAM set ``<sam>@long<sam_size>-a<patch>`` (only its ``embedding``)
is read too (``refine_sam="whole"``; ``"halves"`` refines each half with its own embedding
[ours]). The refinement's SAM image is the rounded one, as in the reference: masks are decoded
at its size and resized bilinearly to the original (``refine_with_sam``).
Ablations: ``paradigm``, ``correlation``, ``window_attention``,
``threshold_mean`` and ``refine_prompts`` (see ``TridentConfig``). Every tensor-level step
is a public function of this module with its shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.errors import MissingFeatureSetError, OvssError, ProvenanceMismatchError
from featurestore.protocol import Protocol, half_columns
from featurestore.store import set_key
from methods.base import FeatureRequirement, Segmenter, Vocab, register_method

__all__ = [
    "ClassPrompts",
    "RefinementPrompts",
    "SamPart",
    "SamTokens",
    "TridentConfig",
    "TridentSegmenter",
    "cosine_thresholds",
    "image_proxy_attention",
    "mask_prompt",
    "refine_with_sam",
    "refinement_prompts",
    "resample_matrix",
    "sam_affinity",
    "sam_tokens",
    "splice_ratio",
    "splice_windows",
    "window_outputs",
]

PARADIGMS = ("splice-then-segment", "segment-then-splice")
CORRELATIONS = ("aff", "attn", "cos", "none")
WINDOW_ATTENTIONS = ("proxy", "none")
THRESHOLD_MEANS = ("image", "window")
CANVASES = ("trident", "short")
PROMPT_KINDS = ("point", "box", "mask")
REFINE_SAMS = ("whole", "halves")
# Patch size of each CLIP backbone: the canvas grid (METHODS.md §4 step 2).
CLIP_PATCH = {"clip-b16": 16, "clip-l14": 14, "clip-l14-336": 14, "clip-h14": 14}
DEFAULT_SAM = {"clip-h14": "sam-h"}  # the paper pairs CLIP-H/14 with SAM-H, else SAM-B


@dataclass
class TridentConfig:
    """Options of ``trident`` (defaults: the paper's CLIP-B/16 OpenAI + DINO-B/16 + SAM-B).

    Per-dataset presets (EVAL.md §4.4, ``TRIDENT_PRESETS`` below) set ``size``,
    ``crop``, ``stride``, ``coarse_thresh``, ``cos_fac``, ``refine_neg_cos`` and ``sam_halves``;
    ``prob_thd`` is a scoring preset. Every value can be overridden (``--set key=value``) and is
    recorded in results.

    Attributes:
        clip_model: CLIP backbone (also the text model): ``clip-b16``, ``clip-l14``, ``clip-h14``.
        vfm_model: window VFM: ``dino-b16`` (DINO v1 ViT-B/16, the reference's); DINOv2 names
            (``dinov2-b14``...) work too.
        sam_model: ``auto`` (``sam-h`` with ``clip-h14``, else ``sam-b``), or a SAM name.
        size: shorter side S before the canvas rounding (per-dataset presets:
            docs/methods/trident.md).
        crop, stride: sliding windows on the canvas (336 / 224; VOC20 stride 112).
        pad_multiple: windows padded symmetrically to a multiple of this (56, the reference's
            rule; a no-op for full 336 px windows).
        canvas: ``trident`` (``Protocol(resize="grid")``, the short-side size
            rounded *up* to multiples of the CLIP patch and each side >= crop [ours: round up,
            one bilinear resize from the original image]) or ``short`` (the plain mmseg
            short-side canvas; windows then need not lie on the patch grid and are resampled
            onto it, see ``splice_windows``).
        sam_size: SAM's input side (1024; the SAM set's ``Protocol(resize="long")``, or
            ``Protocol(resize="halves")`` with ``sam_halves``).
        sam_round_up: SAM's image is the original resized so that H and W round *up* to
            multiples of the CLIP patch (docs/methods/trident.md, the reference's ``cv2.resize``;
            the SAM sets carry ``align=<CLIP patch>``, keys ``long1024-a16`` /
            ``halves1024-a16``), then ``SamPredictor``'s own resize; with ``sam_halves`` that
            rounded image is split at its width // 2. Off [ours]: SAM gets the original image
            (sets ``long1024`` / ``halves1024``, e.g. stores made before this rule).
        beta, gamma: ProxyCLIP's threshold factor and sharpness (1.2, 3.0).
        threshold_mean: ``image`` (Trident: the mean of the DINO similarities over all windows
            of the image at once) or ``window`` (ProxyCLIP's per-window mean; ablation).
        window_attention: ``proxy`` (DINO proxy attention per window) or ``none`` (identity:
            each token keeps its own value, the MaskCLIP-style baseline of the paper's Tab. 3
            without residual/MLP [ours]; no VFM set needed).
        paradigm: ``splice-then-segment`` (Trident) or ``segment-then-splice`` (ablation: with
            ``correlation="none"`` per-window logits are averaged on the canvas exactly as
            ProxyCLIP does; with a SAM correlation each window is resampled to the SAM tokens
            whose centres fall inside it, aggregated with an affinity computed among those
            tokens only, scored, and the logits averaged per SAM token [ours]).
        correlation: ``aff`` (Trident's affinity), ``attn`` (SAM attention averaged over heads),
            ``cos`` (per head softmax over the keys with ``cos > thr`` of the SAM value cosines,
            averaged over heads [ours: same adaptive threshold as ``aff``]) or ``none``
            (identity). Every correlation is row-normalised [ours for ``attn``/``cos``], so
            ``out_proj`` (affine) commutes with it and is applied once, after the aggregation
            [ours: placement; the spec's "no out_proj here" read as "not a second time"].
        apply_out_proj: apply the last block's ``out_proj`` (on, see ``correlation``); off is
            the literal reading of the method's step 6 (``ln_post`` straight after ``W @ x``),
            kept as a switch because the spec is ambiguous there.
        cos_fac: factor on the mean cosine of the per-query threshold (1.2; Cityscapes 3.0,
            VOC20 0.0).
        cos_cap: upper bound of the threshold (0.9).
        refine_neg_cos: when off, a negative threshold becomes ``neg_cos_thr``.
        neg_cos_thr: that replacement (0.6).
        sam_halves: Cityscapes (docs/methods/trident.md): SAM runs on the left (columns ``[0, W // 2)``)
            and right (``[W // 2, W)``) halves of its image (the rounded one, width ``W``, with
            ``sam_round_up``) separately: the SAM set is ``Protocol(resize="halves",
            size=sam_size)`` (two SamPredictor inputs per image,
            ``featurestore.backbones.sam``). Each half gets its own SAM floor grid
            ``(vh_k, vw_k)``, affinity (its own q/k/v, thresholds and normalisation) and
            aggregation: the spliced CLIP canvas is sampled bilinearly (``align_corners=False``
            convention, ``resample_matrix``) at the centres of ``vh_k x vw_k`` cells tiling that
            half's canvas region (``[x1 * Wc / W, x2 * Wc / W)`` x ``[0, Hc)``; the whole-image
            case of this is exactly ``resize_grid``), aggregated with the half's ``W``, scored,
            and the two halves' logits are placed side by side: ``(Q, vh, vw_l + vw_r)`` with
            ``vh = max(vh_l, vh_r)`` (a half with fewer rows, possible only for odd widths of
            images wider than twice their height, is first resized bilinearly to ``vh`` rows).
            That grid is then resized to the original size as usual [ours: the combination
            rule]. Segment-then-splice does the same per half (windows resampled onto each
            half's SAM token centres in canvas pixels). With ``sam_refine`` the refinement
            runs on the whole image or per half, see ``refine_sam``.
        sam_refine: run the SAM refinement (docs/methods/trident.md; ``--sam-refine``; off, as the
            reference's ``base_config``; its README evaluates with it on).
        refine_sam: which SAM embedding the refinement decodes against when ``sam_halves`` is
            on (without ``sam_halves`` there is one SAM set and this option changes nothing):
            ``whole`` (default, the reference: its Cityscapes code computes the affinity from
            the halves but calls ``set_image`` on the whole image for the refinement): prompts
            from the whole probability map, decoded with the embedding of the whole-image set
            ``<sam_model>@long<sam_size>-a<patch>`` (``Protocol(resize="long", size=sam_size,
            align=<CLIP patch>)``, read besides the halves set; role ``sam_refine`` in
            results); or ``halves`` [ours]: the probabilities at original size are split at
            column ``W // 2`` of the original width, each half is refined on its own (prompts
            from that half's probabilities, decoded with that half's cached embedding of the
            halves set, its image size and SamPredictor input size) and the two refined label
            maps are placed side by side. In both, as in the reference, the predictor's image
            is the one SAM encoded (the rounded image, or its half): prompts are mapped from
            the reduced probability map by ``ResizeLongestSide.apply_coords`` (as the
            reference, relative to the reduced map's own size), and the decoded mask logits,
            at the rounded size, are resized bilinearly to the probabilities' size.
        coarse_thresh: refinement: pixels whose best class probability is below it become a
            void label; classes whose best probability is below it get no prompt.
        minimal_area: refinement: smallest 8-connected region (pixels at the reduced
            resolution) that becomes a prompt (225).
        refine_down: refinement works at ``1 / refine_down`` of the original size (2).
        sam_mask_alpha: scale of the dense mask prompt (0.005).
        sam_iou_thresh: keep SAM masks whose predicted IoU is strictly above it (0.8).
        refine_prompts: comma-separated subset of ``point,box,mask`` (ablation; default all).
            Without point and box prompts, one mask prompt per class is decoded.
        sam_weights: SAM checkpoint for the refinement's mask decoder (default: resolved like
            extraction; must be the file the SAM set was made with).
        class_family: class-file family for dataset vocabularies (``proxyclip``).

    Other [ours] choices: the diagonal of every attention/affinity is always kept (it is
    anyway for non-degenerate inputs: a self-cosine of 1 exceeds every threshold <= 0.9), and
    a row with no mass left becomes an identity row, so degenerate inputs give no NaN; window
    outputs are resampled onto the canvas grid by bilinear weights at the canvas token centres
    (exactly a copy when windows lie on the grid, as in the ``trident`` canvas).
    """

    clip_model: str = "clip-b16"
    vfm_model: str = "dino-b16"
    sam_model: str = "auto"
    size: int = 448
    crop: int = 336
    stride: int = 224
    pad_multiple: int = 56
    canvas: str = "trident"
    sam_size: int = 1024
    sam_round_up: bool = True
    beta: float = 1.2
    gamma: float = 3.0
    threshold_mean: str = "image"
    window_attention: str = "proxy"
    paradigm: str = "splice-then-segment"
    correlation: str = "aff"
    apply_out_proj: bool = True
    cos_fac: float = 1.2
    cos_cap: float = 0.9
    refine_neg_cos: bool = True
    neg_cos_thr: float = 0.6
    sam_halves: bool = False
    sam_refine: bool = False
    refine_sam: str = "whole"
    coarse_thresh: float = 0.2
    minimal_area: int = 225
    refine_down: int = 2
    sam_mask_alpha: float = 0.005
    sam_iou_thresh: float = 0.8
    refine_prompts: str = "point,box,mask"
    sam_weights: str | None = None
    class_family: str = "proxyclip"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("canvas", CANVASES),
            ("threshold_mean", THRESHOLD_MEANS),
            ("window_attention", WINDOW_ATTENTIONS),
            ("paradigm", PARADIGMS),
            ("correlation", CORRELATIONS),
            ("refine_sam", REFINE_SAMS),
        ):
            if getattr(self, name) not in allowed:
                raise OvssError(
                    f"trident: {name} must be one of {', '.join(allowed)}, "
                    f"not {getattr(self, name)!r}"
                )
        if self.clip_model not in CLIP_PATCH:
            raise OvssError(
                f"trident: clip_model must be one of {', '.join(CLIP_PATCH)}, not {self.clip_model!r}"
            )
        if self.sam_model == "auto":
            self.sam_model = DEFAULT_SAM.get(self.clip_model, "sam-b")
        if not self.sam_model.startswith("sam-"):
            raise OvssError(
                f"trident: sam_model must be a SAM model (sam-b, sam-l, sam-h), not {self.sam_model!r}"
            )
        bad = [p for p in self.prompts if p not in PROMPT_KINDS]
        if bad or not self.prompts:
            raise OvssError(
                f"trident: refine_prompts must be a comma-separated subset of {','.join(PROMPT_KINDS)}, "
                f"not {self.refine_prompts!r}"
            )
        if self.refine_down < 1 or self.minimal_area < 0:
            raise OvssError("trident: refine_down must be >= 1 and minimal_area >= 0")

    @property
    def clip_patch(self) -> int:
        """Patch size of ``clip_model``: the canvas grid."""
        return CLIP_PATCH[self.clip_model]

    @property
    def prompts(self) -> tuple[str, ...]:
        """``refine_prompts`` as a tuple, e.g. ``("point", "box", "mask")``."""
        return tuple(p.strip() for p in str(self.refine_prompts).split(",") if p.strip())

    @property
    def window_protocol(self) -> Protocol:
        """The protocol of the CLIP and VFM feature sets (the same windows)."""
        if self.canvas == "trident":
            return Protocol(
                resize="grid",
                size=self.size,
                crop=self.crop,
                stride=self.stride,
                pad_multiple=self.pad_multiple,
                align=self.clip_patch,
            )
        return Protocol(
            resize="short",
            size=self.size,
            crop=self.crop,
            stride=self.stride,
            pad_multiple=self.pad_multiple,
        )

    @property
    def sam_align(self) -> int:
        """SAM's pre-rounding (``Protocol.align``): the CLIP patch with ``sam_round_up``, else 0."""
        return self.clip_patch if self.sam_round_up else 0

    @property
    def sam_protocol(self) -> Protocol:
        """The protocol of the SAM feature set (``SamPredictor``'s input of the rounded image,
        see ``sam_round_up``; with ``sam_halves`` one input per half of it,
        ``Protocol(resize="halves")``)."""
        return Protocol(
            resize="halves" if self.sam_halves else "long",
            size=self.sam_size,
            align=self.sam_align,
        )

    @property
    def refine_whole_image(self) -> bool:
        """The refinement reads the whole-image SAM set besides the halves set: ``sam_refine``
        with ``sam_halves`` and ``refine_sam="whole"``."""
        return self.sam_refine and self.sam_halves and self.refine_sam == "whole"

    @property
    def refine_protocol(self) -> Protocol:
        """The protocol of the SAM set whose ``embedding`` the refinement decodes against."""
        if self.refine_whole_image:
            return Protocol(resize="long", size=self.sam_size, align=self.sam_align)
        return self.sam_protocol

    @property
    def needs_sam(self) -> bool:
        """Splice-then-segment (SAM's grid is the output grid), a SAM correlation, refinement."""
        return (
            self.paradigm == "splice-then-segment" or self.correlation != "none" or self.sam_refine
        )

    @property
    def text_model(self) -> str:
        return self.clip_model


# --------------------------------------------------------------------------------------------
# Geometry: resampling window grids onto canvas / SAM token centres
# --------------------------------------------------------------------------------------------


def resample_matrix(
    centres: Sequence[Fraction], start: int, length: int, n_in: int, dtype: torch.dtype
) -> torch.Tensor:
    """Bilinear weights ``(len(centres), n_in)`` that sample a grid of ``n_in`` cells spanning
    pixels ``[start, start + length)`` at the pixel coordinates ``centres``.

    The convention is ``F.interpolate(..., align_corners=False)``'s (source coordinate
    ``(c - start) * n_in / length - 0.5``, clamped at 0 and at the last cell), computed in exact
    rational arithmetic: a centre that falls on a cell centre gets the weight 1.0 on that cell
    and 0.0 elsewhere, so aligned windows are copied bit for bit.
    """
    m = torch.zeros(len(centres), n_in, dtype=dtype)
    for r, c in enumerate(centres):
        u = (Fraction(c) - start) * n_in / length - Fraction(1, 2)
        u = max(u, Fraction(0))
        i0 = min(math.floor(u), n_in - 1)
        frac = u - i0 if i0 < n_in - 1 else Fraction(0)
        i1 = min(i0 + 1, n_in - 1)
        m[r, i0] += float(1 - frac)
        m[r, i1] += float(frac)
    return m


def _token_centres(n_tokens: int, patch: int | Fraction, limit: int) -> list[Fraction]:
    """Pixel centres of ``n_tokens`` cells of ``patch`` pixels (a fraction for the ``r`` x
    canvas of ``splice_windows``), the last ones clamped inside ``[0, limit)``."""
    return [
        min(Fraction(patch * (2 * t + 1), 2), Fraction(2 * limit - 1, 2)) for t in range(n_tokens)
    ]


def _covered(centres: Sequence[Fraction], lo: int, hi: int) -> list[int]:
    return [t for t, c in enumerate(centres) if lo <= c < hi]


def splice_ratio(
    window_feats: Sequence[torch.Tensor], pads: np.ndarray, boxes: np.ndarray, patch: int
) -> int:
    """``r`` of §4 step 4: ``round(window grid side / CLIP tokens per window side)``, at least 1.

    Read from the first window (every window of a canvas has one size and one grid): its grid
    rows ``gh`` against its padded height in CLIP patches. ``r = 1`` for DINO-B/16 on CLIP-B/16
    (and for DINOv2-B/14 on CLIP-B/16: 24 / 21 rounds to 1), ``r = 2`` for DINO-B/8 (42 / 21).
    """
    y1, _, y2, _ = (int(v) for v in np.asarray(boxes)[0])
    top, _, bottom, _ = (int(v) for v in np.asarray(pads)[0])
    clip_side = Fraction(y2 - y1 + top + bottom, patch)
    return max(1, round(Fraction(int(window_feats[0].shape[0])) / clip_side))


def splice_windows(
    window_feats: Sequence[torch.Tensor],
    boxes: np.ndarray,
    pads: np.ndarray,
    canvas_hw: tuple[int, int],
    patch: int,
    ratio: int | None = None,
) -> torch.Tensor:
    """Splice per-window feature grids into one canvas grid, averaging overlaps (§4 step 4).

    Args:
        window_feats: per window ``(gh, gw, D)`` features on a grid that spans the *padded*
            window (the VFM grid for ProxyCLIP outputs).
        boxes: ``(n, 4)`` window boxes ``(y1, x1, y2, x2)`` in canvas pixels.
        pads: ``(n, 4)`` symmetric padding ``(top, left, bottom, right)`` of each window.
        canvas_hw: ``(Hc, Wc)`` canvas size in pixels.
        patch: canvas patch size (the CLIP patch).
        ratio: ``r``, canvas cells per CLIP token side; ``None``: :func:`splice_ratio` (the
            window grid over the CLIP grid, rounded).

    Returns:
        ``(r * ceil(Hc / patch), r * ceil(Wc / patch), D)``: the canvas at ``r`` x the CLIP
        token canvas (cells of ``patch / r`` pixels). Each canvas cell takes, from every window
        whose box contains its centre, the window grid sampled bilinearly
        (``align_corners=False``, exact rational weights) at that centre, and the mean over
        those windows. On the ``trident`` canvas (windows on the patch grid, no padding) window
        ``k`` covers rows ``[r * y1_tok, r * y2_tok)`` and columns ``[r * x1_tok, r * x2_tok)``:
        a grid of exactly ``(r * h_tok, r * w_tok)`` is copied there bit for bit, and any other
        grid is resized bilinearly to that size on the way (sampling at the cell centres *is*
        that resize), the rule of §4 step 4. With ``r = 1`` this is the token canvas of
        earlier releases, unchanged.

    Raises:
        OvssError: a canvas cell no window covers.
    """
    hc, wc = canvas_hw
    r = splice_ratio(window_feats, pads, boxes, patch) if ratio is None else int(ratio)
    if r < 1:
        raise ValueError(f"splice ratio must be >= 1, not {r}")
    cell = Fraction(patch, r)
    th, tw = r * -(-hc // patch), r * -(-wc // patch)
    cy, cx = _token_centres(th, cell, hc), _token_centres(tw, cell, wc)
    d = window_feats[0].shape[-1]
    dtype, device = window_feats[0].dtype, window_feats[0].device
    acc = torch.zeros(th, tw, d, dtype=dtype, device=device)
    count = torch.zeros(th, tw, dtype=dtype, device=device)
    for f, (y1, x1, y2, x2), (top, left, bottom, right) in zip(
        window_feats, np.asarray(boxes).tolist(), np.asarray(pads).tolist(), strict=True
    ):
        rows, cols = _covered(cy, y1, y2), _covered(cx, x1, x2)
        if not rows or not cols:
            continue
        ph, pw = y2 - y1 + top + bottom, x2 - x1 + left + right
        my = resample_matrix([cy[t] for t in rows], y1 - top, ph, f.shape[0], dtype)
        mx = resample_matrix([cx[t] for t in cols], x1 - left, pw, f.shape[1], dtype)
        part = torch.einsum("ty,yxd,sx->tsd", my.to(device), f, mx.to(device))
        acc[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] += part
        count[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] += 1
    if bool((count == 0).any()):
        raise OvssError(f"the windows do not cover the canvas grid {th}x{tw}")
    return acc / count[..., None]


def resize_grid(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """``(h, w, D)`` -> ``(H, W, D)`` bilinear, ``align_corners=False`` (the spliced canvas to
    SAM's valid grid, §4 step 4). Returned unchanged when the sizes already agree."""
    if tuple(x.shape[:2]) == tuple(out_hw):
        return x
    y = F.interpolate(x.permute(2, 0, 1)[None], size=out_hw, mode="bilinear", align_corners=False)
    return y[0].permute(1, 2, 0)


# --------------------------------------------------------------------------------------------
# Per-window ProxyCLIP attention with the image-level threshold (§4 step 3)
# --------------------------------------------------------------------------------------------


def image_proxy_attention(
    vfm_windows: Sequence[torch.Tensor], beta: float, gamma: float, threshold_mean: str = "image"
) -> list[torch.Tensor]:
    """ProxyCLIP attention of every window, thresholded with one mean for the whole image.

    Args:
        vfm_windows: per window ``(N'_w, C)`` VFM patch features.
        beta, gamma: ProxyCLIP's factor and sharpness.
        threshold_mean: ``image`` (Trident: ``m`` = the mean of all entries of all windows'
            cosine matrices, one scalar) or ``window`` (ProxyCLIP: each window's own mean).

    Returns:
        Per window ``(N'_w, N'_w)``: ``softmax`` over keys of ``(S - beta * m) * gamma`` with
        entries ``< 0`` set to ``-inf`` (the diagonal always kept, see ``TridentConfig``);
        rows sum to 1.
    """
    sims = []
    for t in vfm_windows:
        f = F.normalize(t, dim=-1)
        sims.append(f @ f.T)
    if threshold_mean == "image":
        total = sum(s.sum() for s in sims)
        mean = total / sum(s.numel() for s in sims)
        means = [mean] * len(sims)
    else:
        means = [s.mean() for s in sims]
    out = []
    for s, m in zip(sims, means, strict=True):
        z = (s - beta * m) * gamma
        drop = z < 0
        drop.fill_diagonal_(False)
        out.append(torch.softmax(z.masked_fill(drop, float("-inf")), dim=-1))
    return out


def window_outputs(
    clip_windows: Sequence[torch.Tensor],
    vfm_windows: Sequence[torch.Tensor] | None,
    block: Any,
    beta: float = 1.2,
    gamma: float = 3.0,
    threshold_mean: str = "image",
) -> list[torch.Tensor]:
    """Each window's last-block attention output *before* ``out_proj`` (heads merged).

    Args:
        clip_windows: per window ``(gh, gw, D)`` CLIP tokens entering the last block.
        vfm_windows: per window ``(vh, vw, C)`` VFM features of the same padded crop, or
            ``None`` for the identity attention (``window_attention="none"``).
        block: ``methods.clip_dense.LastBlock``.

    Returns:
        Per window ``(vh, vw, D)`` = ``A v`` on the VFM grid (ProxyCLIP: values bilinearly
        resized to the VFM grid, one attention shared by every head), or ``(gh, gw, D)`` = ``v``
        without a VFM.
    """
    from methods.clip_dense import value_tokens

    if vfm_windows is None:
        return [
            block.values(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1) for x in clip_windows
        ]
    attns = image_proxy_attention(
        [t.reshape(-1, t.shape[-1]) for t in vfm_windows], beta, gamma, threshold_mean
    )
    out = []
    for x, t, a in zip(clip_windows, vfm_windows, attns, strict=True):
        gh, gw = x.shape[:2]
        vh, vw = t.shape[:2]
        v = value_tokens(x.reshape(gh * gw, -1), block)  # (heads, gh*gw, hd)
        heads, _, hd = v.shape
        v = v.transpose(1, 2).reshape(heads, hd, gh, gw)
        if (vh, vw) != (gh, gw):
            v = F.interpolate(v, size=(vh, vw), mode="bilinear", align_corners=False)
        v = v.reshape(heads, hd, vh * vw).transpose(1, 2)  # (heads, N', hd)
        o = (a.to(v.dtype) @ v).transpose(0, 1).reshape(vh, vw, heads * hd)
        out.append(o)
    return out


# --------------------------------------------------------------------------------------------
# SAM affinity (§4 step 5)
# --------------------------------------------------------------------------------------------


@dataclass
class SamTokens:
    """SAM's last global-attention block on Trident's valid grid, for one image.

    Attributes:
        grid: ``(vh, vw)`` = ``input_size // patch`` (floor), ``n = vh * vw``.
        values: ``(H, n, hd)`` per-head values.
        attn_head: ``h -> (n, n)`` softmax attention of head ``h`` among the valid tokens,
            normalised over the whole padded grid as inside the encoder (Trident's crop of the
            encoder's attention, not renormalised); computed one head at a time.
        factors: optional ``methods.sam_affinity.SamAttentionFactors`` (the cached ``q``,
            ``k``, ``attn_log_mass``, rel-pos tables, cached grid and valid-row map) behind
            ``attn_head``: with them ``sam_affinity`` takes the fused, query-chunked path
            (``methods.sam_affinity.fused_affinity``) that never builds an ``(n, n)`` head.
    """

    grid: tuple[int, int]
    values: torch.Tensor
    attn_head: Callable[[int], torch.Tensor]
    factors: Any = None

    @property
    def num_heads(self) -> int:
        return int(self.values.shape[0])


@dataclass
class SamPart:
    """One SAM input of an image and the columns it covers: the whole image
    (``Protocol(resize="long")``), or one half (``sam_halves``).

    Attributes:
        tokens: its values and attention on its own floor grid.
        cols: ``(x1, x2)`` columns of the part in the image SAM was given (the rounded image
            with ``sam_round_up``, else the original).
        width: the width of that image (``cols / width`` is the part's share of every image
            of the same scene, the CLIP canvas included).
    """

    tokens: SamTokens
    cols: tuple[int, int]
    width: int


def sam_tokens(
    features: Any,
    static: dict,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SamTokens:
    """``SamTokens`` of one image of a SAM feature set (``FeatureSet.read(i)`` with ``q``, ``k``,
    ``v``, ``attn_log_mass``) and its static arrays (``methods.sam_cache.sam_static``).

    Raises:
        OvssError: the valid grid is empty (a resized side shorter than one patch).
    """
    from featurestore.backbones.sam import top_left_rows
    from methods.sam_affinity import factors_from_arrays
    from methods.sam_cache import _one_window, crop_token_rows, sam_attention, trident_grid

    _one_window(features)
    patch = int(np.asarray(static["patch_size"]).reshape(-1)[0])
    cached = tuple(int(g) for g in features.win_grid[0])
    vh, vw = trident_grid(features.resized_size, patch)
    if vh == 0 or vw == 0:
        raise OvssError(
            f"image {features.image_id} resizes to {features.resized_size} for SAM: Trident's "
            f"valid grid (input size // {patch}) is empty"
        )
    t = features.tensors
    q, k, lm = (
        torch.from_numpy(np.asarray(t[n])).to(device, dtype) for n in ("q", "k", "attn_log_mass")
    )
    rows = top_left_rows((vh, vw), cached[1], device)
    v = torch.from_numpy(np.asarray(crop_token_rows(np.asarray(t["v"]), cached, (vh, vw))))
    values = v.to(device, dtype).permute(1, 0, 2).contiguous()

    def attn_head(h: int) -> torch.Tensor:
        a = sam_attention(
            q, k, cached, static, heads=[h], normalise="full", attn_log_mass=lm, dtype=dtype
        )[0]
        return a.index_select(0, rows).index_select(1, rows)

    factors = factors_from_arrays(
        q, k, lm, static, cached, rows=rows, dtype=dtype, device=device, valid=(vh, vw)
    )
    return SamTokens(grid=(vh, vw), values=values, attn_head=attn_head, factors=factors)


def cosine_thresholds(
    unit_values: torch.Tensor,
    cos_fac: float,
    cos_cap: float = 0.9,
    refine_neg_cos: bool = True,
    neg_cos_thr: float = 0.6,
) -> torch.Tensor:
    """Trident's adaptive per-query threshold ``(m,)`` from unit-norm values ``(H, m, hd)``.

    ``thr_i = cos_fac * mean_h mean_k cos_h[i, k]`` (computed as ``sv_h[i] . mean_k sv_h[k]``,
    no ``m x m`` matrix), then ``min(thr, cos_cap)``; with ``refine_neg_cos`` off a negative
    threshold becomes ``neg_cos_thr``.
    """
    mean_keys = torch.einsum("hid,hd->hi", unit_values, unit_values.mean(dim=1))
    thr = cos_fac * mean_keys.mean(dim=0)
    thr = thr.clamp(max=cos_cap)
    if not refine_neg_cos:
        thr = torch.where(thr < 0, torch.full_like(thr, neg_cos_thr), thr)
    return thr


def sam_affinity(
    sam: SamTokens,
    groups: Sequence[torch.Tensor | None],
    correlation: str = "aff",
    cos_fac: float = 1.2,
    cos_cap: float = 0.9,
    refine_neg_cos: bool = True,
    neg_cos_thr: float = 0.6,
) -> list[torch.Tensor]:
    """Row-normalised correlation matrices among groups of SAM tokens (§4 step 5).

    Args:
        sam: the image's SAM values and attention.
        groups: token index tensors ``(m_g,)`` (``None`` = all ``n`` tokens); each group gets
            its own matrix, thresholds and normalisation (the per-window ablation). Attention is computed once per head for all groups.
        correlation: ``aff``: ``mean_h where(cos_h > thr, attn_h, 0)``; ``attn``:
            ``mean_h attn_h``; ``cos``: ``mean_h softmax_keys(cos_h masked to cos_h > thr)``.
            ``cos_h = sv_h sv_h^T`` with ``sv = l2n(values)``; ``thr`` from
            ``cosine_thresholds`` over the group's own keys; ``>`` is strict.
        cos_fac, cos_cap, refine_neg_cos, neg_cos_thr: see ``cosine_thresholds``.

    Returns:
        Per group ``(m_g, m_g)`` in ``sam.values``' dtype; rows sum to 1 and the diagonal is
        kept (a row whose mass vanished becomes an identity row).
    """
    if correlation not in ("aff", "attn", "cos"):
        raise ValueError(f"correlation must be aff, attn or cos here, not {correlation!r}")
    sv = F.normalize(sam.values, dim=-1)
    if sam.factors is not None and correlation != "cos" and len(groups) == 1 and groups[0] is None:
        from methods.sam_affinity import fused_affinity

        thr = cosine_thresholds(sv, cos_fac, cos_cap, refine_neg_cos, neg_cos_thr)
        return [fused_affinity(sam.factors, sv, thr, correlation)]
    n = sv.shape[1]
    idx = [torch.arange(n, device=sv.device) if g is None else g.to(sv.device) for g in groups]
    thr = [cosine_thresholds(sv[:, i], cos_fac, cos_cap, refine_neg_cos, neg_cos_thr) for i in idx]
    acc = [sv.new_zeros(len(i), len(i)) for i in idx]
    full = [g is None for g in groups]
    for h in range(sam.num_heads):
        attn = sam.attn_head(h).to(sv.dtype) if correlation != "cos" else None
        for g, i in enumerate(idx):
            a = None
            if attn is not None:
                a = attn if full[g] else attn.index_select(0, i).index_select(1, i)
            if correlation == "attn":
                acc[g] += a
                continue
            s = sv[h].index_select(0, i)
            cos = s @ s.T
            keep = cos > thr[g][:, None]
            keep.fill_diagonal_(True)
            if correlation == "aff":
                acc[g] += torch.where(keep, a, torch.zeros_like(a))
            else:
                acc[g] += torch.softmax(cos.masked_fill(~keep, float("-inf")), dim=-1)
    out = []
    for a in acc:
        a = a / sam.num_heads
        mass = a.sum(dim=-1, keepdim=True)
        dead = mass[:, 0] <= 0
        if bool(dead.any()):
            a[dead] = 0
            a[dead, dead.nonzero()[:, 0]] = 1
            mass = a.sum(dim=-1, keepdim=True)
        out.append(a / mass)
    return out


# --------------------------------------------------------------------------------------------
# SAM refinement (§4 step 7)
# --------------------------------------------------------------------------------------------


@dataclass
class ClassPrompts:
    """One class's prompts at the reduced resolution.

    Attributes:
        cls: class index.
        regions: ``(R, h, w)`` bool 8-connected regions of the class (area >= minimal_area).
        points: ``(R, 2)`` float ``(x, y)``: per region, the pixel of highest class probability
            (first in row-major order on ties).
        boxes: ``(R, 4)`` float ``(x1, y1, x2, y2)``: each region's bounding box, max
            coordinates inclusive (``torchvision.ops.masks_to_boxes``).
    """

    cls: int
    regions: np.ndarray
    points: np.ndarray
    boxes: np.ndarray


@dataclass
class RefinementPrompts:
    """Everything the refinement decodes for one image.

    Attributes:
        reduced_size: ``(h, w)`` = original size // ``refine_down``.
        probs: ``(C, h, w)`` class probabilities bilinearly reduced.
        labels: ``(h, w)`` coarse labels (nearest), void (= C) where the best probability is
            below ``coarse_thresh`` (when ``coarse_thresh > 0``).
        classes: the classes with at least one region.
    """

    reduced_size: tuple[int, int]
    probs: torch.Tensor
    labels: torch.Tensor
    classes: list[ClassPrompts] = field(default_factory=list)


def refinement_prompts(
    probs: torch.Tensor,
    labels: torch.Tensor,
    coarse_thresh: float = 0.2,
    minimal_area: int = 225,
    down: int = 2,
) -> RefinementPrompts:
    """Point and box prompts from a coarse segmentation (§4 step 7, the reference's
    ``split_connected_regions``).

    Args:
        probs: ``(C, H, W)`` class probabilities at the original size.
        labels: ``(H, W)`` coarse labels (after ``prob_thd``).
        coarse_thresh: void threshold on the reduced best probability, and the minimum of a
            class's reduced best probability for it to get prompts.
        minimal_area: regions smaller than this (reduced pixels) get no prompt.
        down: reduction factor (2): ``(H // down, W // down)``, probabilities bilinear
            (``align_corners=False``), labels nearest.
    """
    from scipy import ndimage

    c, h, w = probs.shape
    dh, dw = max(1, h // down), max(1, w // down)
    p = probs.float()
    lab = labels.to(torch.float32)
    if (dh, dw) != (h, w):
        p = F.interpolate(p[None], size=(dh, dw), mode="bilinear", align_corners=False)[0]
        lab = F.interpolate(lab[None, None], size=(dh, dw), mode="nearest")[0, 0]
    lab = lab.long()
    if coarse_thresh > 0:
        lab[p.max(dim=0).values < coarse_thresh] = c
    out = RefinementPrompts(reduced_size=(dh, dw), probs=p, labels=lab)
    lab_np = lab.cpu().numpy()
    eight = np.ones((3, 3), dtype=bool)
    for k in range(c):
        pk = p[k]
        if float(pk.max()) < coarse_thresh:
            continue
        components, count = ndimage.label(lab_np == k, structure=eight)
        regions, points, boxes = [], [], []
        pk_np = pk.cpu().numpy()
        for r in range(1, count + 1):
            region = components == r
            if int(region.sum()) < minimal_area:
                continue
            ys, xs = np.nonzero(region)  # row-major order
            best = int(np.argmax(pk_np[ys, xs]))
            regions.append(region)
            points.append((float(xs[best]), float(ys[best])))
            boxes.append((float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())))
        if regions:
            out.classes.append(
                ClassPrompts(
                    cls=k,
                    regions=np.stack(regions),
                    points=np.asarray(points, dtype=np.float32),
                    boxes=np.asarray(boxes, dtype=np.float32),
                )
            )
    return out


def mask_prompt(
    prob: torch.Tensor,
    original_size: tuple[int, int],
    side: int,
    coarse_thresh: float,
    alpha: float,
) -> torch.Tensor:
    """The dense mask prompt of one class: ``(side, side)`` (SAM's low-res mask frame, 256).

    The reduced class probability ``(h, w)`` is resized bilinearly to the letterboxed size of
    ``original_size`` (longer side ``side``, ``ResizeLongestSide`` rounding), zero-padded at
    the bottom/right, and becomes ``alpha * p`` where ``p > coarse_thresh``, else 0.
    ``original_size`` is the predictor's image (``SamPredictor.original_size``; the rounded
    image with ``sam_frame``), so the prompt lies in the frame of the decoded masks.
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    nh, nw = ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], side)
    m = F.interpolate(
        prob[None, None].float(), size=(nh, nw), mode="bilinear", align_corners=False
    )[0, 0]
    m = F.pad(m, (0, side - nw, 0, side - nh), value=0.0)
    return torch.where(m > coarse_thresh, alpha * m, torch.zeros_like(m))


def refine_with_sam(
    predictor: Any,
    probs: torch.Tensor,
    labels: torch.Tensor,
    prompts: RefinementPrompts,
    kinds: Sequence[str] = PROMPT_KINDS,
    *,
    coarse_thresh: float = 0.2,
    alpha: float = 0.005,
    iou_thresh: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the prompts with SAM and re-label (§4 step 7, the reference's ``sam_refinement``).

    Args:
        predictor: a ``methods.sam_cache.CachedSamPredictor`` set to the image. Its
            ``original_size`` ``(H', W')`` may differ from ``(H, W)`` (the rounded image SAM
            encoded, ``methods.sam_cache.sam_frame``). The prompts are given in its frame:
            point and box coordinates, found on the reduced map ``(h, w)``, are scaled by
            ``(W' / w, H' / h)`` to that image's pixels, then SAM's transform maps them to its
            input; the dense mask prompt is letterboxed as ``(H', W')`` (``mask_prompt``). The
            mask logits decoded at ``(H', W')`` are resized bilinearly (``align_corners=False``)
            to ``(H, W)`` before they are used, as the reference does.
        probs: ``(C, H, W)`` class probabilities at the original size.
        labels: ``(H, W)`` coarse labels.
        prompts: from ``refinement_prompts``.
        kinds: prompt types used (``point``, ``box``, ``mask``); without point and box one mask
            prompt per class is decoded.
        iou_thresh: keep masks whose predicted IoU is strictly above it.

    Returns:
        ``(labels, scores)``: ``(H, W)`` int64 and ``(C, H, W)`` refined scores: per class the
        max over its kept masks of ``sigmoid(mask logit) * class probability``, zero outside the
        union of the kept masks; labels = argmax of the scores, and the coarse label wherever no
        class has a refined score.
    """
    c, h, w = probs.shape
    device = predictor.device
    side = int(predictor.model.prompt_encoder.mask_input_size[0])
    scores = torch.zeros((c, h, w), dtype=torch.float32, device=device)
    probs_d = probs.to(device, torch.float32)
    # Every prompt in the predictor's frame: its image (``original_size``, the rounded one with
    # ``sam_frame``) and the letterbox of it. Points and boxes, found on the reduced map, are
    # scaled to that image's pixels (x by W' / w_reduced, y by H' / h_reduced) before SAM's
    # own transform; the mask prompt is letterboxed as that image.
    frame = tuple(int(s) for s in predictor.original_size)
    (rh, rw), (fh, fw) = prompts.reduced_size, frame
    to_frame = torch.tensor([fw / rw, fh / rh], dtype=torch.float32, device=device)
    for cp in prompts.classes:
        n = len(cp.regions) if ("point" in kinds or "box" in kinds) else 1
        coords = point_labels = boxes = mask = None
        if "point" in kinds:
            pts = torch.from_numpy(cp.points).to(device) * to_frame
            coords = predictor.transform.apply_coords_torch(pts, frame)[:, None, :]
            point_labels = torch.ones((n, 1), device=device)
        if "box" in kinds:
            b = torch.from_numpy(cp.boxes).to(device) * to_frame.repeat(2)
            boxes = predictor.transform.apply_boxes_torch(b, frame)
        if "mask" in kinds:
            m = mask_prompt(prompts.probs[cp.cls], frame, side, coarse_thresh, alpha)
            mask = m.to(device)[None, None].expand(n, 1, side, side)
        with torch.inference_mode():
            logits, iou, _ = predictor.predict_torch(
                coords, point_labels, boxes, mask, multimask_output=False, return_logits=True
            )
        keep = iou[:, 0] > iou_thresh
        if not bool(keep.any()):
            continue
        kept = logits[keep, 0].float()  # (K, H', W') at the predictor's image size
        if tuple(kept.shape[1:]) != (h, w):
            kept = F.interpolate(kept[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        union = (kept > predictor.model.mask_threshold).any(dim=0)
        best = (torch.sigmoid(kept) * probs_d[cp.cls]).max(dim=0).values
        scores[cp.cls] = best * union
    refined = scores.argmax(dim=0)
    none = scores.sum(dim=0) == 0
    out = torch.where(none, labels.to(device), refined)
    return out, scores


# --------------------------------------------------------------------------------------------
# The segmenter
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Per-dataset presets (EVAL.md §4.4) and the recipe's notes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TridentPreset:
    """Trident per dataset (EVAL.md §4.4): shorter side S, windows, thresholds.

    Attributes:
        size, crop, stride: shorter side S and the sliding windows of the canvas.
        prob_thd: the background threshold (a scoring preset).
        coarse_thresh, cos_fac, refine_neg_cos: the ``TridentConfig`` fields of that name.
        sam_halves: SAM on the left and right image halves (Cityscapes, as the reference).
    """

    size: int
    crop: int
    stride: int
    prob_thd: float
    coarse_thresh: float
    cos_fac: float
    refine_neg_cos: bool
    sam_halves: bool = False


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
"""EVAL.md §4.4, one row per benchmark."""

TRIDENT_COMMON = {
    "beta": 1.2,
    "gamma": 3.0,
    "logit_scale": 40.0,
    "sam_iou_thresh": 0.8,
    "minimal_area": 225,
    "sam_mask_alpha": 0.005,
}
"""The settings every Trident config of the reference shares (EVAL.md §4.4)."""


@register_method
class TridentSegmenter(Segmenter):
    name = "trident"
    Config = TridentConfig
    doc = (
        "Trident: CLIP+DINO windows spliced, then aggregated with SAM's affinity "
        "(--set sam_refine=on: SAM prompt refinement)"
    )

    @classmethod
    def requirements(cls, config: TridentConfig) -> list[FeatureRequirement]:
        """CLIP (``pre_last``) and, with proxy attention, VFM (``patch``) windows on the canvas;
        SAM per image (``q``/``k``/``v``/``attn_log_mass``, plus ``embedding`` to refine). With
        ``sam_halves`` the whole-image SAM set the refinement decodes against
        (``refine_sam="whole"``) is required with ``sam_refine`` and listed as optional without
        it (``extract --for trident`` then names it without extracting it)."""
        win = config.window_protocol
        reqs = [FeatureRequirement("clip", config.clip_model, win, ("pre_last",), "clip_model")]
        if config.window_attention == "proxy":
            reqs.append(FeatureRequirement("vfm", config.vfm_model, win, ("patch",), "vfm_model"))
        if config.needs_sam:
            tensors = ("q", "k", "v", "attn_log_mass")
            if config.sam_refine and not config.refine_whole_image:
                tensors += ("embedding",)
            reqs.append(
                FeatureRequirement(
                    "sam", config.sam_model, config.sam_protocol, tensors, "sam_model"
                )
            )
        if (
            config.sam_halves
            and config.needs_sam
            and (config.refine_whole_image or not config.sam_refine)
        ):
            whole = Protocol(resize="long", size=config.sam_size, align=config.sam_align)
            reqs.append(
                FeatureRequirement(
                    "sam_refine",
                    config.sam_model,
                    whole,
                    ("embedding",),
                    "sam_model",
                    optional=not config.sam_refine,
                )
            )
        return reqs

    @classmethod
    def recipe_notes(cls, config: TridentConfig) -> list[str]:
        """What ``extract --for trident`` should say about its sets (SAM pairing, rounding)."""
        notes = []
        if config.sam_model == DEFAULT_SAM.get(config.clip_model):
            notes.append(
                f"SAM {config.sam_model} paired with {config.clip_model} (as in the paper)"
            )
        if config.needs_sam and config.sam_round_up:
            halves = config.sam_halves
            notes.append(
                f"SAM gets the image resized so H and W round up to multiples of "
                f"{config.sam_align} (the CLIP patch, as the reference): "
                f"{config.sam_protocol.key()}"
                + (", on its left and right halves (two SamPredictor inputs)" if halves else "")
            )
        if config.sam_halves and not config.sam_refine:
            notes.append(
                "--set sam_refine=on (refine_sam=whole, the reference) also reads the "
                "whole-image SAM set (role sam_refine, listed as optional)"
            )
        return notes

    @classmethod
    def presets(cls, dataset: str) -> dict:
        """EVAL.md §4.4 (``TRIDENT_PRESETS`` and ``TRIDENT_COMMON``); {} off the benchmarks."""
        row = TRIDENT_PRESETS.get(dataset)
        if row is None:
            return {}
        common = TRIDENT_COMMON
        return {
            "size": row.size,
            "crop": row.crop,
            "stride": row.stride,
            "coarse_thresh": row.coarse_thresh,
            "cos_fac": row.cos_fac,
            "refine_neg_cos": row.refine_neg_cos,
            "sam_halves": row.sam_halves,
            "beta": common["beta"],
            "gamma": common["gamma"],
            "sam_iou_thresh": common["sam_iou_thresh"],
            "minimal_area": common["minimal_area"],
            "sam_mask_alpha": common["sam_mask_alpha"],
        }

    @classmethod
    def scoring_presets(cls, dataset: str) -> dict:
        row = TRIDENT_PRESETS.get(dataset)
        if row is None:
            return {}
        return {"prob_thd": row.prob_thd, "logit_scale": TRIDENT_COMMON["logit_scale"]}

    def __init__(self, store: Any, config: TridentConfig, device: str | torch.device = "cpu"):
        super().__init__(store, config, device)
        from methods.clip_dense import LastBlock

        self.block = LastBlock.from_feature_set(self.sets["clip"]).to(self.device)
        self._sam_static: dict | None = None
        self._predictor: Any = None

    def missing_set(
        self, requirement: FeatureRequirement, error: ProvenanceMismatchError
    ) -> ProvenanceMismatchError:
        """A message per role: the window/SAM sets come from one ``--for trident`` call, the
        whole-image refinement set does not."""
        if requirement.role == "sam_refine":
            message = (
                "trident --sam-refine with SAM halves decodes against the whole image "
                "as the reference does (refine_sam=whole; --set refine_sam=halves "
                f"refines each half with its own embedding instead): {error}"
            )
            if isinstance(error, MissingFeatureSetError):  # keeps the facts the CLI renders
                return error.with_message(message, role=requirement.role)
            return ProvenanceMismatchError(message)
        return self._extract_hint(self.store, self.config, error)

    @staticmethod
    def _extract_hint(
        store: Any, config: TridentConfig, e: ProvenanceMismatchError
    ) -> ProvenanceMismatchError:
        """A missing window or SAM set: the store's message plus the ``--for trident`` call."""
        models = [
            f"--model {m}"
            for m in (config.clip_model, config.vfm_model, config.sam_model)
            if m not in ("clip-b16", "dino-b16", "sam-b")
        ]
        extra = (" " + " ".join(models)) if models else ""
        hint = ""
        if config.canvas == "trident":
            short = dataclasses.replace(config, canvas="short").window_protocol
            if set_key(config.clip_model, short) in store.feature_sets():
                hint = (
                    f"\n(the store has {set_key(config.clip_model, short)}, the short-side "
                    "canvas: --set canvas=short reads it)"
                )
        if config.needs_sam and config.sam_round_up:
            unrounded = dataclasses.replace(config, sam_round_up=False).sam_protocol
            key = set_key(config.sam_model, unrounded)
            wanted = set_key(config.sam_model, config.sam_protocol)
            sets = store.feature_sets()
            if key in sets and wanted not in sets:
                hint += (
                    f"\n(the store has {key}, SAM on the original image rather than on the "
                    "image rounded up to the CLIP patch grid: --set sam_round_up=off reads it)"
                )
        message = (
            f"{e}\nTrident reads CLIP and {config.vfm_model} windows and {config.sam_model} "
            f"per image; extract them together with: ovss extract --store {store.path} "
            f"--for trident --dataset NAME{extra}{hint}"
        )
        if isinstance(e, MissingFeatureSetError):  # keeps the facts the CLI renders
            return e.with_message(message)
        return ProvenanceMismatchError(message)

    # -- reading ---------------------------------------------------------------------------------
    def _windows(self, index: int) -> tuple[Any, list[torch.Tensor], list[torch.Tensor] | None]:
        c = self.sets["clip"].read(index, names=["pre_last"])
        clip = [
            torch.from_numpy(np.asarray(g, np.float32)).to(self.device)
            for g in c.window_tokens("pre_last")
        ]
        vfm = None
        if "vfm" in self.sets:
            d = self.sets["vfm"].read(index, names=["patch"])
            if not np.array_equal(c.win_box, d.win_box) or not np.array_equal(c.win_pad, d.win_pad):
                raise OvssError("CLIP and VFM feature sets disagree on the windows")
            vfm = [
                torch.from_numpy(np.asarray(g, np.float32)).to(self.device)
                for g in d.window_tokens("patch")
            ]
        return c, clip, vfm

    def _sam(self, index: int) -> SamTokens:
        """The image's SAM tokens (a one-window ``long`` set)."""
        (part,) = self._sam_parts(index)
        return part.tokens

    def _sam_parts(self, index: int) -> list[SamPart]:
        """Per SAM window of the image its tokens and columns (in SAM's image, ``sam_frame``):
        one part for a ``long`` set, the left and right halves for a ``halves`` set
        (``sam_halves``)."""
        from methods.sam_cache import sam_frame, sam_static, sam_window

        fs = self.sets["sam"]
        if self._sam_static is None:
            self._sam_static = sam_static(fs)
        f = sam_frame(fs.read(index, names=["q", "k", "v", "attn_log_mass"]), fs.protocol)
        n = len(f.win_grid)
        if n != (2 if self.config.sam_halves else 1):
            raise OvssError(
                f"image {f.image_id} has {n} SAM window(s) in {fs.key}; expected "
                f"{2 if self.config.sam_halves else 1}"
            )
        w = f.original_size[1]
        cols = half_columns(w) if n == 2 else [(0, w)]
        return [
            SamPart(
                sam_tokens(sam_window(f, k), self._sam_static, torch.float32, self.device),
                cols[k],
                w,
            )
            for k in range(n)
        ]

    def _part_centres(
        self, part: SamPart, canvas_hw: tuple[int, int]
    ) -> tuple[list[Fraction], list[Fraction]]:
        """Canvas-pixel centres of the part's ``vh x vw`` SAM cells, which tile the part's
        region of the canvas (rows ``[0, Hc)``, columns ``[x1 * Wc / W, x2 * Wc / W)`` with
        ``W`` = ``part.width``)."""
        hc, wc = canvas_hw
        vh, vw = part.tokens.grid
        a = Fraction(part.cols[0] * wc, part.width)
        b = Fraction(part.cols[1] * wc, part.width)
        cy = [Fraction((2 * r + 1) * hc, 2 * vh) for r in range(vh)]
        cx = [a + (2 * s + 1) * (b - a) / (2 * vw) for s in range(vw)]
        return cy, cx

    @staticmethod
    def _side_by_side(logits: list[torch.Tensor]) -> torch.Tensor:
        """Per-half logits ``(Q, vh_k, vw_k)`` -> ``(Q, max vh_k, sum vw_k)``, left then right;
        a half with fewer rows is resized bilinearly to the common height first."""
        vh = max(x.shape[1] for x in logits)
        out = []
        for x in logits:
            if x.shape[1] != vh:
                x = F.interpolate(
                    x[None], size=(vh, x.shape[2]), mode="bilinear", align_corners=False
                )[0]
            out.append(x)
        return torch.cat(out, dim=2)

    def _affinities(self, sam: SamTokens, groups: list[torch.Tensor | None]) -> list[torch.Tensor]:
        cfg = self.config
        return sam_affinity(
            sam,
            groups,
            cfg.correlation,
            cfg.cos_fac,
            cfg.cos_cap,
            cfg.refine_neg_cos,
            cfg.neg_cos_thr,
        )

    def _features_to_cos(self, o: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``(m, D)`` attention outputs -> ``(m, Q)`` cosines: ``ln_post(out_proj(o)) @ proj``
        (without ``out_proj`` when ``apply_out_proj`` is off)."""
        if self.config.apply_out_proj:
            o = self.block.out_proj(o)
        feat = self.block.project(o)
        return F.normalize(feat.float(), dim=-1) @ text.T

    # -- the method ------------------------------------------------------------------------------
    #: Options only the SAM affinity reads (``late_stage``): a sweep over them computes
    #: ``early_stage`` (window outputs and splice) once per image (``methods.sweep``).
    late_fields: ClassVar[tuple[str, ...]] = ("cos_fac", "cos_cap", "refine_neg_cos", "neg_cos_thr")

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        """Cosine logits ``(Q, vh, vw)`` on SAM's valid grid (splice-then-segment; segment-then-
        splice with a SAM correlation), or ``(Q, Hc, Wc)`` on the canvas (segment-then-splice
        without one), and that size: ``late_stage(early_stage(index), index, vocab)``."""
        return self.late_stage(self.early_stage(index), index, vocab)

    def early_stage(self, index: int) -> tuple[Any, list[torch.Tensor], torch.Tensor | None]:
        """What does not depend on ``late_fields`` nor on the vocabulary: the windows read,
        their proxy-attention outputs ``(gh, gw, D)`` each, and (splice-then-segment) their
        splice ``(Th, Tw, D)`` (None for segment-then-splice)."""
        cfg = self.config
        with torch.inference_mode():
            c, clip, vfm = self._windows(index)
            outs = window_outputs(clip, vfm, self.block, cfg.beta, cfg.gamma, cfg.threshold_mean)
            spliced = None
            if cfg.paradigm != "segment-then-splice":
                spliced = splice_windows(outs, c.win_box, c.win_pad, c.resized_size, cfg.clip_patch)
        return c, outs, spliced

    def late_stage(
        self, state: tuple[Any, list[torch.Tensor], torch.Tensor | None], index: int, vocab: Vocab
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The affinity aggregation and the scores of an ``early_stage`` (not modified)."""
        cfg = self.config
        c, outs, spliced = state
        text = F.normalize(vocab.embeddings.float(), dim=-1).to(self.device)
        with torch.inference_mode():
            if cfg.paradigm == "segment-then-splice":
                return self._segment_then_splice(c, outs, text)
            if cfg.sam_halves:
                return self._halves_splice_then_segment(c, spliced, text)
            sam = self._sam(index)
            vh, vw = sam.grid
            x = resize_grid(spliced, (vh, vw)).reshape(vh * vw, -1)
            if cfg.correlation != "none":
                (wmat,) = self._affinities(sam, [None])
                x = wmat @ x
            cos = self._features_to_cos(x, text)
        return cos.T.reshape(-1, vh, vw).cpu(), (vh, vw)

    def _halves_splice_then_segment(
        self, c: Any, spliced: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """``sam_halves``: each half's canvas region sampled onto its own SAM grid, aggregated
        with its own affinity, scored; the halves' logits side by side (``TridentConfig``)."""
        cfg = self.config
        hc, wc = c.resized_size
        th, tw, d = spliced.shape
        logits = []
        for part in self._sam_parts(c.index):
            vh, vw = part.tokens.grid
            cy, cx = self._part_centres(part, (hc, wc))
            my = resample_matrix(cy, 0, hc, th, spliced.dtype).to(spliced.device)
            mx = resample_matrix(cx, 0, wc, tw, spliced.dtype).to(spliced.device)
            x = torch.einsum("ty,yxd,sx->tsd", my, spliced, mx).reshape(vh * vw, d)
            if cfg.correlation != "none":
                (wmat,) = self._affinities(part.tokens, [None])
                x = wmat @ x
            logits.append(self._features_to_cos(x, text).T.reshape(-1, vh, vw))
        out = self._side_by_side(logits).cpu()
        return out, tuple(out.shape[1:])

    def _segment_then_splice(
        self, c: Any, outs: list[torch.Tensor], text: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        from methods.base import window_logits_to_box
        from methods.scoring import merge_window_logits

        cfg = self.config
        if cfg.correlation == "none":
            logits = []
            for w, o in enumerate(outs):
                gh, gw = o.shape[:2]
                cos = self._features_to_cos(o.reshape(gh * gw, -1), text)
                grid = cos.T.reshape(-1, gh, gw)  # merged on the device
                logits.append(window_logits_to_box(grid, c.win_box[w], c.win_pad[w]))
            return merge_window_logits(logits, c.win_box, c.resized_size), c.resized_size
        parts = self._sam_parts(c.index)
        logits = [self._segment_then_splice_part(c, outs, text, part) for part in parts]
        out = logits[0] if len(logits) == 1 else self._side_by_side(logits)
        return out, tuple(out.shape[1:])

    def _segment_then_splice_part(
        self, c: Any, outs: list[torch.Tensor], text: torch.Tensor, part: SamPart
    ) -> torch.Tensor:
        """Segment-then-splice with a SAM correlation on one SAM part (the whole image or one
        half): each window resampled to the part's SAM tokens whose centres it covers,
        aggregated with the affinity among those tokens, scored, averaged per token."""
        sam = part.tokens
        vh, vw = sam.grid
        cy, cx = self._part_centres(part, c.resized_size)
        groups, feats = [], []
        for o, (y1, x1, y2, x2), (top, left, bottom, right) in zip(
            outs, c.win_box.tolist(), c.win_pad.tolist(), strict=True
        ):
            rows, cols = _covered(cy, y1, y2), _covered(cx, x1, x2)
            if not rows or not cols:
                continue
            my = resample_matrix(
                [cy[r] for r in rows], y1 - top, y2 - y1 + top + bottom, o.shape[0], o.dtype
            )
            mx = resample_matrix(
                [cx[s] for s in cols], x1 - left, x2 - x1 + left + right, o.shape[1], o.dtype
            )
            x = torch.einsum("ty,yxd,sx->tsd", my.to(o.device), o, mx.to(o.device))
            rr = torch.tensor(rows, device=self.device)[:, None]
            ss = torch.tensor(cols, device=self.device)[None, :]
            groups.append((rr * vw + ss).reshape(-1))
            feats.append(x.reshape(-1, x.shape[-1]))
        q = text.shape[0]
        acc = torch.zeros(q, vh * vw, device=self.device)
        count = torch.zeros(vh * vw, device=self.device)
        for g, x, wmat in zip(groups, feats, self._affinities(sam, groups), strict=True):
            acc[:, g] += self._features_to_cos(wmat @ x, text).T
            count[g] += 1
        if bool((count == 0).any()):
            raise OvssError("the windows do not cover SAM's valid grid")
        return (acc / count).reshape(q, vh, vw).cpu()

    # -- refinement -------------------------------------------------------------------------------
    def refine(
        self,
        index: int,
        cos: torch.Tensor,
        labels: np.ndarray,
        max_prob: np.ndarray,
        vocab: Vocab,
        scoring: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        """SAM refinement of one image's labels (§4 step 7); a no-op unless ``sam_refine``.

        The prompts of the whole probability map (``refinement_prompts``) are decoded
        (``refine_with_sam``) with a predictor set to the image's cached SAM embedding: of the
        SAM set, or with ``sam_halves`` (``refine_sam="whole"``, the reference) of the
        whole-image set ``sets["sam_refine"]``. With ``sam_halves`` and ``refine_sam="halves"``
        [ours] the refinement runs on the left (original columns ``[0, W // 2)``) and right
        (``[W // 2, W)``) halves separately: each half's slice of the probabilities and coarse
        labels gets its own prompts (at ``1 / refine_down`` of the half's size) and is decoded
        with a predictor set to that half's cached embedding (``sam_window``: image size =
        the half's of SAM's image, input size = its ``halves_layout`` size); the refined halves
        are placed side by side. The predictor's image is the one SAM encoded
        (``sam_frame``: the rounded image with ``sam_round_up``), so the masks are decoded at
        its size and resized to the probabilities' (``refine_with_sam``), as the reference.

        Args:
            index: image index.
            cos: ``(Q, h, w)`` cosine logits from ``cosine_logits``.
            labels: ``(H, W)`` coarse labels at the original size (after ``prob_thd``).
            max_prob: ``(H, W)`` their probability.
            vocab: the vocabulary (synonyms are merged on probabilities as in §0.2).
            scoring: the ``ScoringConfig`` (``logit_scale``).

        Returns:
            ``(labels, max_prob)``: refined labels, and the refined score of the chosen class
            where a class was refined (the coarse probability elsewhere).
        """
        if not self.config.sam_refine:
            return labels, max_prob
        from methods.sam_cache import sam_frame, sam_window
        from methods.segment import class_probabilities

        cfg = self.config
        h, w = labels.shape
        probs = class_probabilities(cos, (h, w), vocab, scoring)
        coarse = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        fs = self.sets["sam_refine"] if cfg.refine_whole_image else self.sets["sam"]
        if cfg.sam_halves and cfg.refine_sam == "halves":
            parts = [
                (probs[:, :, a:b].contiguous(), coarse[:, a:b].contiguous())
                for a, b in half_columns(w)
            ]
        else:
            parts = [(probs, coarse)]
        prompts = [
            refinement_prompts(p, c, cfg.coarse_thresh, cfg.minimal_area, cfg.refine_down)
            for p, c in parts
        ]
        if not any(pr.classes for pr in prompts):
            return labels, max_prob
        f = sam_frame(fs.read(index, names=["embedding"]), fs.protocol)
        if len(f.win_grid) != len(parts):
            raise OvssError(
                f"image {f.image_id} has {len(f.win_grid)} SAM window(s) in {fs.key}; "
                f"expected {len(parts)}"
            )
        predictor = self._sam_predictor(fs)
        new_parts, score_parts = [], []
        for k, ((p, c), pr) in enumerate(zip(parts, prompts, strict=True)):
            if not pr.classes:  # nothing to decode: the half keeps its coarse labels
                new_parts.append(c.to(predictor.device))
                score_parts.append(torch.zeros(p.shape, device=predictor.device))
                continue
            predictor.set_features(sam_window(f, k) if len(parts) == 2 else f)
            new, scores = refine_with_sam(
                predictor,
                p,
                c,
                pr,
                cfg.prompts,
                coarse_thresh=cfg.coarse_thresh,
                alpha=cfg.sam_mask_alpha,
                iou_thresh=cfg.sam_iou_thresh,
            )
            new_parts.append(new)
            score_parts.append(scores)
        new_labels = torch.cat(new_parts, dim=1) if len(parts) == 2 else new_parts[0]
        scores = torch.cat(score_parts, dim=2) if len(parts) == 2 else score_parts[0]
        best = scores.max(dim=0).values.cpu()
        prob = torch.where(best > 0, best, torch.from_numpy(np.asarray(max_prob, np.float32)))
        return new_labels.cpu().numpy(), prob.numpy()

    def _sam_predictor(self, fs: Any) -> Any:
        """The cached-embedding predictor with the decoder of the SAM set ``fs`` (loaded once)."""
        if self._predictor is None:
            from methods.sam_cache import CachedSamPredictor, load_sam_decoder_for

            model = load_sam_decoder_for(fs, self.config.sam_weights)
            self._predictor = CachedSamPredictor(model.to(self.device))
        return self._predictor
