"""Resampling an absolute position embedding to a window's patch grid, by a named rule.

A ViT trained at one input size has learned position vectors on a ``g0 x g0`` grid; at any other
window size the patch part is resampled bicubically to the window's grid ``(gh, gw)``. Where the
sampling points sit depends on how ``torch.nn.functional.interpolate`` is called, so the rule is
part of what a feature set is (``info.extra["pos_interp"]``, compared when a set is reopened):

- ``offset`` (the authors'): ``F.interpolate(patch_pos, scale_factor=((gh + 0.1) / g0,
  (gw + 0.1) / g0), mode="bicubic", align_corners=False)`` (no antialiasing,
  ``recompute_scale_factor`` left at ``None``, so the kernel maps output pixel ``i`` to input
  ``(i + 0.5) * g0 / (g + 0.1) - 0.5``; the output size ``floor(g0 * (g + 0.1) / g0)`` is ``g``).
  This is, line for line, DINO v1's ``VisionTransformer.interpolate_pos_encoding``
  (facebookresearch/dino ``vision_transformer.py``), DINOv2's
  ``DinoVisionTransformer.interpolate_pos_encoding`` (facebookresearch/dinov2
  ``dinov2/models/vision_transformer.py``, ``interpolate_offset=0.1``, ``interpolate_antialias=
  False``: the hub models without registers, ``dinov2/hub/backbones.py``), ProxyCLIP's and
  Trident's ``VisionTransformer.interpolate_pos_encoding`` (mc-lan/ProxyCLIP and
  YuHengsss/Trident ``open_clip/transformer.py``) and SCLIP's, ClearCLIP's and NACLIP's
  (``clip/model.py``, e.g. wangf3014/SCLIP). The ``+ 0.1`` is DINO's "avoid floating point
  error" kludge (facebookresearch/dino issue 8); it shifts every sampling point by a fraction of
  a patch.
- ``size``: ``F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", align_corners=False)``, no
  antialiasing (sampling point ``(i + 0.5) * g0 / g - 0.5``). ovss's CLIP rule before the
  authors' rule became the default.
- ``size-aa``: the same with ``antialias=True``: timm's ``resample_abs_pos_embed`` and DINOv2's
  hub models *with* registers (``interpolate_offset=0.0``, ``interpolate_antialias=True``).
  ovss's DINO / DINOv2 rule before.

At the native grid every rule returns the embedding unchanged (the authors skip interpolation
there too). All rules interpolate in float32 and cast back to the input dtype; the class (and
any other prefix) position is never resampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OFFSET, SIZE, SIZE_AA = "offset", "size", "size-aa"
POS_INTERP_RULES: dict[str, str] = {
    OFFSET: "bicubic, scale_factor (g + 0.1) / g0, align_corners=False, no antialias (authors')",
    SIZE: "bicubic to size (gh, gw), align_corners=False, no antialias",
    SIZE_AA: "bicubic to size (gh, gw), align_corners=False, antialias (timm's)",
}
# What feature sets written before the rule was recorded were made with, by family.
_LEGACY_RULE = {"clip": SIZE, "dino": SIZE_AA, "dinov2": SIZE_AA}
# The value recorded for backbones without an absolute position embedding (RoPE, SAM's fixed
# grid): no rule applies.
NO_RULE = "none"


def check_rule(rule: str, model: str) -> str:
    """``rule`` if it names a rule, else an ``OvssError`` listing them."""
    if rule not in POS_INTERP_RULES:
        from featurestore.errors import OvssError

        raise OvssError(
            f"pos_interp '{rule}' is not a rule for {model}; choose from "
            f"{', '.join(POS_INTERP_RULES)}"
        )
    return rule


def resample_patch_grid(patch_pos: torch.Tensor, grid: tuple[int, int], rule: str) -> torch.Tensor:
    """Resample ``(1, D, gh0, gw0)`` patch positions to ``(1, D, gh, gw)`` under ``rule``.

    ``offset`` uses ``(g + 0.1) / g0`` per axis with that axis's native size (the authors'
    models are square, ``g0 = sqrt(N)``; [ours] a non-square native grid uses each side).
    Returns the input itself at the native grid. Computed in float32, cast back.
    """
    gh, gw = int(grid[0]), int(grid[1])
    gh0, gw0 = int(patch_pos.shape[-2]), int(patch_pos.shape[-1])
    if (gh, gw) == (gh0, gw0):
        return patch_pos
    x = patch_pos.float()
    if rule == OFFSET:
        out = F.interpolate(
            x,
            scale_factor=((gh + 0.1) / gh0, (gw + 0.1) / gw0),
            mode="bicubic",
            align_corners=False,
        )
        if tuple(out.shape[-2:]) != (gh, gw):  # cannot happen for g >= 1; kept as the authors'
            raise AssertionError(f"offset rule gave {tuple(out.shape[-2:])}, not {(gh, gw)}")
    elif rule in (SIZE, SIZE_AA):
        out = F.interpolate(
            x, size=(gh, gw), mode="bicubic", align_corners=False, antialias=rule == SIZE_AA
        )
    else:
        raise ValueError(f"unknown position-embedding rule {rule!r}")
    return out.to(patch_pos.dtype)


def resample_tokens(
    pos: torch.Tensor,
    native_grid: tuple[int, int],
    grid: tuple[int, int],
    rule: str,
    num_prefix: int = 1,
) -> torch.Tensor:
    """Resample a token-major position embedding ``(..., num_prefix + gh0*gw0, D)``.

    The leading ``num_prefix`` rows (class position) are kept; the patch rows (row-major over
    ``native_grid``) are resampled to ``grid`` by ``resample_patch_grid``. Leading batch
    dimensions, if any, must be 1 or absent. Returns ``(..., num_prefix + gh*gw, D)``; the input
    itself at the native grid.
    """
    if tuple(grid) == tuple(native_grid):
        return pos
    lead = pos.shape[:-2]
    width = pos.shape[-1]
    flat = pos.reshape(-1, width)
    prefix, patch = flat[:num_prefix], flat[num_prefix:]
    gh0, gw0 = native_grid
    patch = patch.reshape(1, gh0, gw0, width).permute(0, 3, 1, 2)
    patch = resample_patch_grid(patch, grid, rule)
    patch = patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)
    out = torch.cat([prefix, patch], dim=0)
    return out.reshape(*lead, out.shape[0], width)


def pos_interp_of(backbone_provenance: dict) -> str | None:
    """The rule a feature set was made with, from its provenance ``backbone`` dict.

    Sets written before the rule was recorded name it by family (CLIP ``size``, DINO / DINOv2
    ``size-aa``: what ovss did then). ``None`` when the family has no such rule on record.
    """
    extra = backbone_provenance.get("extra") or {}
    if "pos_interp" in extra:
        return str(extra["pos_interp"])
    return _LEGACY_RULE.get(str(backbone_provenance.get("family", "")))
