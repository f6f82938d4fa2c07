"""PAMR: pixel-adaptive mask refinement of dense scores with the image (NACLIP's refinement).

The refinement (Araslanov & Roth's PAMR, as NACLIP's ``pamr.py`` runs it), for scores ``m``
``(C, h, w)`` and a guide image ``I`` ``(K, H, W)``:

1. ``m`` is resized bilinearly with ``align_corners=True`` to ``(H, W)``;
2. for each dilation ``d`` (default 8 and 16) the 8 neighbours ``p + d·δ``,
   ``δ ∈ {-1, 0, 1}² \\ {0}`` (replicate padding): 16 neighbours in all;
3. per channel of ``I``, ``std(p)`` = the unbiased standard deviation of the 18 samples of the
   two 3x3 stencils (centre included, once per dilation);
4. affinity ``a_δ(p)`` = softmax over the 16 neighbours of the channel mean of
   ``-|I(p) - I(p + d·δ)| / (1e-8 + 0.1·std(p))``;
5. ``steps`` times (default 10): ``m(p) ← Σ_δ a_δ(p) · m(p + d·δ)`` (the centre is not a
   neighbour; ``m`` replicate-padded).

The result is ``(C, H, W)``. Memory is ``O((C + 16 + 18 K) H W)``: the 16 shifted copies of
``m`` are accumulated one at a time ([ours]: the authors' module materialises all 16 at once,
``16 C H W`` floats, which needs gigabytes on ADE20K-size images; the sums are the same up to
float rounding order).

Any segmenter can use it through its config (``PAMRConfig``'s fields: ``pamr``,
``pamr_steps``, ``pamr_dilations``): the shared driver (``methods.segment.segment_image``) calls
``refine_cosine`` on the cosine logits, which then works at the original image size, before
the scoring. NACLIP's guide (``naclip_guide``) is the network input (the image resized to the
protocol's canvas and normalised with the CLIP mean/std) resized bilinearly
(``align_corners=False``) back to the original size; the image is read from the path the
store records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.errors import OvssError

__all__ = [
    "PAMRConfig",
    "naclip_guide",
    "pamr",
    "pamr_reference",
    "parse_dilations",
    "refine_cosine",
]

NEIGHBOURS: tuple[tuple[int, int], ...] = tuple(
    (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
)
"""The 8 unit offsets of a 3x3 stencil (row-major, centre left out)."""


@dataclass
class PAMRConfig:
    """The PAMR refinement options a method config can inherit.

    Attributes:
        pamr: refine the cosine logits with PAMR at the original image size (on/off); it reads
            each image from the path the store records.
        pamr_steps: PAMR iterations (10, as NACLIP).
        pamr_dilations: PAMR neighbourhood dilations in pixels, comma-separated ("8,16", as
            NACLIP).
    """

    pamr: bool = False
    pamr_steps: int = 10
    pamr_dilations: str = "8,16"


def parse_dilations(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"8,16"`` -> ``(8, 16)``; an ``OvssError`` naming the option for anything else than
    positive integers."""
    if not isinstance(text, str):
        vals = tuple(int(v) for v in text)
    else:
        try:
            vals = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
        except ValueError:
            vals = ()
    if not vals or any(v <= 0 for v in vals):
        raise OvssError(
            f"option pamr_dilations expects comma-separated positive integers, got {text!r}"
        )
    return vals


def _shift(padded: torch.Tensor, d: int, dy: int, dx: int, hw: tuple[int, int]) -> torch.Tensor:
    """``x(p + d·(dy, dx))`` from ``x`` padded by ``d`` on every side: ``(..., H, W)``."""
    h, w = hw
    y0, x0 = d + d * dy, d + d * dx
    return padded[..., y0 : y0 + h, x0 : x0 + w]


def _pad(x: torch.Tensor, d: int) -> torch.Tensor:
    """Replicate padding of the last two dims by ``d`` (any leading shape)."""
    lead = x.shape[:-2]
    y = F.pad(x.reshape(1, -1, *x.shape[-2:]), (d, d, d, d), mode="replicate")
    return y.reshape(*lead, *y.shape[-2:])


def pamr_affinity(guide: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """The neighbour weights ``(16, H, W)`` (for two dilations) of a guide ``(K, H, W)``: a
    softmax over the neighbour axis, in ``NEIGHBOURS`` order per dilation."""
    hw = (int(guide.shape[-2]), int(guide.shape[-1]))
    samples, diffs = [], []
    for d in dilations:
        gp = _pad(guide, d)
        samples.append(guide)  # the stencil's centre, once per dilation
        for dy, dx in NEIGHBOURS:
            s = _shift(gp, d, dy, dx, hw)
            samples.append(s)
            diffs.append((guide - s).abs())
    std = torch.stack(samples, dim=1).std(dim=1)  # (K, H, W), unbiased over 9 per dilation
    scale = 1e-8 + 0.1 * std
    logits = torch.stack([(-a / scale).mean(dim=0) for a in diffs])  # (16, H, W)
    return torch.softmax(logits, dim=0)


def pamr(
    guide: torch.Tensor,
    scores: torch.Tensor,
    steps: int = 10,
    dilations: Sequence[int] = (8, 16),
) -> torch.Tensor:
    """PAMR of ``scores`` ``(C, h, w)`` with the image ``guide`` ``(K, H, W)``: ``(C, H, W)``
    (the module doc). Runs in the dtype of ``guide`` (the scores are cast to it)."""
    if guide.dim() != 3 or scores.dim() != 3:
        raise ValueError(
            f"pamr needs a (K, H, W) guide and (C, h, w) scores, got {tuple(guide.shape)} "
            f"and {tuple(scores.shape)}"
        )
    if steps < 0:
        raise OvssError(f"option pamr_steps must be >= 0, got {steps}")
    hw = (int(guide.shape[-2]), int(guide.shape[-1]))
    m = F.interpolate(scores.to(guide.dtype)[None], size=hw, mode="bilinear", align_corners=True)[0]
    aff = pamr_affinity(guide, dilations)
    for _ in range(steps):
        out = torch.zeros_like(m)
        k = 0
        for d in dilations:
            mp = _pad(m, d)
            for dy, dx in NEIGHBOURS:
                out += aff[k] * _shift(mp, d, dy, dx, hw)
                k += 1
        m = out
    return m


def pamr_reference(
    guide: torch.Tensor,
    scores: torch.Tensor,
    steps: int = 10,
    dilations: Sequence[int] = (8, 16),
) -> torch.Tensor:
    """The same refinement as the authors' module computes it (one 3x3 dilated convolution per
    dilation with the shift kernels, every neighbour materialised): the definition ``pamr``
    is tested against. ``(K, H, W)`` guide, ``(C, h, w)`` scores -> ``(C, H, W)``."""
    dt = guide.dtype

    def kernel(centre: float, neighbour: float, with_centre: bool) -> torch.Tensor:
        rows = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if (dy, dx) == (0, 0) and not with_centre:
                    continue
                w = torch.zeros(3, 3, dtype=dt)
                w[1, 1] += centre
                w[dy + 1, dx + 1] += neighbour
                rows.append(w)
        return torch.stack(rows)[:, None]  # (P, 1, 3, 3)

    def local(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # (N, H, W) -> (N, P*D, H, W)
        x = x[:, None]
        outs = [
            F.conv2d(F.pad(x, [d] * 4, mode="replicate"), weight, dilation=d) for d in dilations
        ]
        return torch.cat(outs, dim=1)

    hw = guide.shape[-2:]
    m = F.interpolate(scores.to(dt)[None], size=hw, mode="bilinear", align_corners=True)[0]
    x_std = local(guide, kernel(0.0, 1.0, True)).std(dim=1, keepdim=True)  # (K, 1, H, W)
    x = -local(guide, kernel(1.0, -1.0, False)).abs() / (1e-8 + 0.1 * x_std)  # (K, 16, H, W)
    aff = torch.softmax(x.mean(dim=0), dim=0)  # (16, H, W)
    copy = kernel(0.0, 1.0, False)
    for _ in range(steps):
        m = (local(m, copy) * aff[None]).sum(dim=1)
    return m


# -- the generic refinement step of the shared driver -----------------------------------------


def naclip_guide(
    image: np.ndarray,
    resized_hw: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """NACLIP's PAMR guide ``(3, H, W)`` float32 of an RGB uint8 image ``(H, W, 3)``: resized
    bilinearly (``align_corners=False``, no antialiasing, as the extraction does) to the
    canvas ``resized_hw``, normalised with ``mean``/``std`` (fractions of 255), resized back to
    ``(H, W)`` the same way."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    h, w = int(x.shape[1]), int(x.shape[2])
    rh, rw = (int(v) for v in resized_hw)
    if (rh, rw) != (h, w):
        x = F.interpolate(x[None], size=(rh, rw), mode="bilinear", align_corners=False)[0]
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0
    x = (x - m) / s
    if (rh, rw) != (h, w):
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return x


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _guide_for(seg: Any, index: int) -> torch.Tensor:
    """The guide of image ``index`` of a segmenter's store: its first feature set's canvas and
    normalisation (CLIP's OpenAI statistics when the set records none)."""
    from featurestore.images import load_image_rgb
    from methods.pnp_ovss import ImagesUnreadableError

    rec = seg.store.image_records()[index]
    try:
        image = load_image_rgb(rec.path)
    except (OvssError, OSError) as e:
        gone = not Path(rec.path).exists()
        raise ImagesUnreadableError(
            f"{seg.name}: PAMR refines with the image, and image {rec.image_id!r} of store "
            f"{seg.store.path} cannot be read at {rec.path}"
            + (" (moved or deleted)" if gone else f": {e}")
            + "; turn the refinement off with pamr=off",
            store=str(seg.store.path),
            image_id=rec.image_id,
            path=rec.path,
        ) from None
    fs = next(iter(seg.sets.values()))
    backbone = fs.provenance.get("backbone", {})
    mean = backbone.get("mean") or OPENAI_MEAN
    std = backbone.get("std") or OPENAI_STD
    size = fs.image_sizes[index]
    if tuple(int(v) for v in image.shape[:2]) != (int(size[0]), int(size[1])):
        raise OvssError(
            f"{seg.name}: image {rec.image_id!r} at {rec.path} is {image.shape[0]}x"
            f"{image.shape[1]} now, but the store recorded {int(size[0])}x{int(size[1])}"
        )
    resized = fs.protocol.resized_size(int(size[0]), int(size[1]))
    return naclip_guide(image, resized, mean, std)


def refine_cosine(seg: Any, index: int, cos: torch.Tensor, out_hw: Sequence[int]) -> torch.Tensor:
    """The shared driver's refinement step: ``cos`` ``(Q, h, w)`` unchanged when the method's
    config has no ``pamr`` field or it is off; else the logits upsampled to the original
    size ``out_hw`` (bilinear, ``align_corners=False``) and refined by PAMR there:
    ``(Q, H, W)`` float32."""
    cfg = seg.config
    if not getattr(cfg, "pamr", False):
        return cos
    from methods.scoring import upsample_bilinear

    dilations = parse_dilations(cfg.pamr_dilations)
    up = upsample_bilinear(cos.float(), tuple(int(v) for v in out_hw))
    guide = _guide_for(seg, index).to(up.device)
    return pamr(guide, up, int(cfg.pamr_steps), dilations)
