"""DINOv3 ViTs (Meta, 2025) on timm's ``Eva`` classes (``vit_*_patch16_dinov3[_qkvb]``).

Registered names (timm architecture, pretrained tag; D = width):

- LVD-1689M: ``dinov3-s16`` (ViT-S/16, 384), ``dinov3-s16plus`` (ViT-S+/16, 384, SwiGLU),
  ``dinov3-b16`` (ViT-B/16, 768), ``dinov3-l16`` (ViT-L/16, 1024), ``dinov3-h16plus``
  (ViT-H+/16, 1280, SwiGLU), ``dinov3-7b16`` (ViT-7B/16, 4096, SwiGLU);
- SAT-493M (satellite imagery): ``dinov3-l16-sat``, ``dinov3-7b16-sat``.

Every model has patch 16, one class token, 4 register ("storage") tokens and RoPE (no absolute
position embedding), so any window whose sides are multiples of 16 works (``dynamic_img_size``)
and no position-embedding rule applies (``info.extra["pos_interp"] = "none"``). The cache holds
the tensors of ``featurestore.backbones.timm_vit.TimmViTBackbone``: ``patch`` (patch tokens after
the final norm; the class token and registers dropped), ``cls`` (window) and ``layer{i}`` for
``--layers``. Mean/std are read from timm's pretrained config of the variant's tag (LVD: ImageNet;
SAT: ``(0.430, 0.411, 0.296)`` / ``(0.213, 0.156, 0.143)``) and recorded in provenance.

**The class follows the checkpoint.** Meta's ViTs (all but 7B) have a qkv bias whose k third is
masked to zero (``LinearKMaskedBias`` in facebookresearch/dinov3 ``dinov3/layers/attention.py``);
timm's ``*_qkvb`` classes hold exactly its q and v parts, the classes without ``_qkvb`` hold no
bias. A file with a qkv bias (Meta's ``blocks.N.attn.qkv.bias`` or timm's ``attn.q_bias``) is
loaded into the ``_qkvb`` class, one without into the plain class; random init builds Meta's
architecture (``_qkvb``, plain for 7B).

**Checkpoints** load in two layouts, both strictly (every tensor of the model, nothing more):

- Meta's official release files ``dinov3_<arch>_pretrain_<lvd1689m|sat493m>-<hash>.pth``
  (key layout of ``DinoVisionTransformer`` in ``dinov3/models/vision_transformer.py``:
  ``cls_token``, ``storage_tokens``, ``mask_token``, ``rope_embed.periods``,
  ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv (+ bias, bias_mask), attn.proj, ls1.gamma,
  norm2, mlp.fc1/fc2 | mlp.w1/w2/w3, ls2.gamma}``, ``norm``, and for 7B / L-SAT the
  training-only ``local_cls_norm``), converted by timm's ``eva.checkpoint_filter_fn``. The
  tensors that filter drops are checked first, so none is lost silently: ``mask_token`` (used
  only for masked training), ``bias_mask`` (must mask exactly the k third), ``rope_embed.periods``
  (must equal timm's, computed from the configuration) and ``local_cls_norm`` ("never used during
  eval", Meta's code).
- timm's hub files (``timm/vit_*_dinov3[_qkvb].<tag>/model.safetensors``).

A file of another layout is a one-line error naming what was found and the layouts accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import timm
import torch
from timm.models.eva import checkpoint_filter_fn

from featurestore.backbones.base import BackboneInfo, register_variants
from featurestore.backbones.posembed import NO_RULE
from featurestore.backbones.timm_vit import (
    HEAD_PREFIXES,
    TINY_ARCH,
    TimmViTBackbone,
    check_patch_kernel,
    create_timm_model,
    jsonable,
    load_exact,
    normalise_layers,
)
from featurestore.errors import OvssError
from featurestore.weights import WeightsSpec, load_state_dict, resolve_weights, sha256_file

META_BASE_URL = "https://dl.fbaipublicfiles.com/dinov3"
# Meta tensors timm's filter drops, each checked before it is (module docstring).
_META_TRAINING_ONLY = ("mask_token", "local_cls_norm.")


@dataclass(frozen=True)
class Dinov3Variant:
    """One registered model.

    Attributes:
        name: our short name, e.g. ``dinov3-s16``.
        arch: timm architecture without ``_qkvb``, e.g. ``vit_small_patch16_dinov3``.
        tag: timm pretrained tag: ``lvd1689m`` or ``sat493m``.
        meta_arch: Meta's compact name in file names, e.g. ``vits16``.
        meta_hash: the 8 hex digits of Meta's release file.
        doc: one line for ``ovss models``.
    """

    name: str
    arch: str
    tag: str
    meta_arch: str
    meta_hash: str
    doc: str

    @property
    def has_qkvb_class(self) -> bool:
        """Whether timm has a ``_qkvb`` class (Meta's 7B has no qkv bias, timm no such class)."""
        return timm.is_model(f"{self.arch}_qkvb")

    def timm_class(self, qkv_bias: bool) -> str:
        return f"{self.arch}_qkvb" if qkv_bias else self.arch

    @property
    def meta_file(self) -> str:
        return f"dinov3_{self.meta_arch}_pretrain_{self.tag}-{self.meta_hash}.pth"


_LVD, _SAT = "lvd1689m", "sat493m"
_TAIL = "4 registers, RoPE"
VARIANTS: tuple[Dinov3Variant, ...] = (
    Dinov3Variant(
        "dinov3-s16",
        "vit_small_patch16_dinov3",
        _LVD,
        "vits16",
        "08c60483",
        f"DINOv3 ViT-S/16 (LVD-1689M), 384-d, {_TAIL}",
    ),
    Dinov3Variant(
        "dinov3-s16plus",
        "vit_small_plus_patch16_dinov3",
        _LVD,
        "vits16plus",
        "4057cbaa",
        f"DINOv3 ViT-S+/16 (LVD-1689M), 384-d, SwiGLU, {_TAIL}",
    ),
    Dinov3Variant(
        "dinov3-b16",
        "vit_base_patch16_dinov3",
        _LVD,
        "vitb16",
        "73cec8be",
        f"DINOv3 ViT-B/16 (LVD-1689M), 768-d, {_TAIL}",
    ),
    Dinov3Variant(
        "dinov3-l16",
        "vit_large_patch16_dinov3",
        _LVD,
        "vitl16",
        "8aa4cbdd",
        f"DINOv3 ViT-L/16 (LVD-1689M), 1024-d, {_TAIL}",
    ),
    Dinov3Variant(
        "dinov3-h16plus",
        "vit_huge_plus_patch16_dinov3",
        _LVD,
        "vith16plus",
        "7c1da9a5",
        f"DINOv3 ViT-H+/16 (LVD-1689M), 1280-d, SwiGLU, {_TAIL}",
    ),
    Dinov3Variant(
        "dinov3-7b16",
        "vit_7b_patch16_dinov3",
        _LVD,
        "vit7b16",
        "a955f4ea",
        f"DINOv3 ViT-7B/16 (LVD-1689M), 4096-d, SwiGLU, {_TAIL}",
    ),
    Dinov3Variant(
        "dinov3-l16-sat",
        "vit_large_patch16_dinov3",
        _SAT,
        "vitl16",
        "eadcf0ff",
        f"DINOv3 ViT-L/16 (SAT-493M satellite), 1024-d, {_TAIL}",
    ),
    Dinov3Variant(
        "dinov3-7b16-sat",
        "vit_7b_patch16_dinov3",
        _SAT,
        "vit7b16",
        "a6675841",
        f"DINOv3 ViT-7B/16 (SAT-493M satellite), 4096-d, SwiGLU, {_TAIL}",
    ),
)


def build_dinov3(
    variant: Dinov3Variant,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    layers: tuple[int, ...] = (),
    arch_overrides: dict | None = None,
    pos_interp: str | None = None,
) -> TimmViTBackbone:
    """Build ``variant`` with real weights or a seeded random initialisation.

    Args:
        variant: one of ``VARIANTS``.
        weights: checkpoint path (Meta's ``.pth`` or timm's ``.safetensors``); ``None`` resolves
            it (``weights_spec``: ``$OVSS_WEIGHTS``, torch.hub and Hugging Face caches, a hub
            download when online).
        random_init: timm's initialisation of Meta's architecture under ``seed``; identity
            ``random-init:<seed>``; the global RNG is left untouched.
        seed: seed of the random initialisation.
        layers: extra block outputs ``layer{i}`` (0-based, negative from the end).
        arch_overrides: keyword arguments of the same timm class (tests: ``depth=2,
            embed_dim=64, num_heads=2``), recorded in provenance; a checkpoint must fit them.
        pos_interp: only ``None`` / ``none``: RoPE has no embedding to resample.

    Raises:
        OvssError: weights with random init, ``pos_interp`` set, a layer out of range, weights
            missing (``WeightsNotFoundError``), a file of another layout, model or size.
    """
    if random_init and weights is not None:
        raise OvssError("--weights and --random-init exclude each other; pass only one")
    if pos_interp not in (None, NO_RULE):
        raise OvssError(
            f"{variant.name} uses RoPE, no absolute position embedding; pos_interp does not apply"
        )
    overrides = dict(arch_overrides or {})
    weights_path = None
    if random_init:
        qkv_bias = variant.has_qkvb_class
        model = _create(variant, qkv_bias, overrides, random_init=True, seed=seed)
        identity = f"random-init:{seed}"
    else:
        weights_path = resolve_weights(weights_spec(variant), weights)
        state = load_state_dict(weights_path)
        layout, qkv_bias = checkpoint_layout(state, weights_path, variant)
        model = _create(variant, qkv_bias, overrides, random_init=False, seed=seed)
        load_checkpoint(model, state, layout, weights_path, variant)
        identity = sha256_file(weights_path)
    model.eval()
    depth = len(model.blocks)
    block_indices = normalise_layers(layers, depth, variant.name)
    cfg = dict(model.pretrained_cfg)
    timm_name = f"{variant.timm_class(qkv_bias)}.{variant.tag}"
    mean, std = cfg["mean"], cfg["std"]
    info = BackboneInfo(
        name=variant.name,
        family="dinov3",
        patch_size=int(model.patch_embed.patch_size[0]),
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
        weights=identity,
        weights_path=str(weights_path) if weights_path is not None else None,
        library={"timm": timm.__version__, "torch": torch.__version__},
        arch=variant.timm_class(qkv_bias),
        extra={
            "timm_name": timm_name,
            "pretrained_tag": variant.tag,
            "qkv_bias": qkv_bias,
            "meta_file": variant.meta_file,
            "num_registers": int(model.num_prefix_tokens) - 1,
            "embed_dim": int(model.embed_dim),
            "depth": depth,
            "layers": list(block_indices),
            "pos_interp": NO_RULE,
            "mean_std_from": f"timm pretrained_cfg {timm_name}",
            "arch_overrides": jsonable(overrides),
        },
    )
    return TimmViTBackbone(model, info, block_indices)


def weights_spec(variant: Dinov3Variant) -> WeightsSpec:
    """Where the checkpoint of ``variant`` may be found: Meta's release file first, then timm's
    hub files of the ``_qkvb`` class (Meta's architecture) and of the plain class."""
    classes = [variant.timm_class(True)] if variant.has_qkvb_class else []
    classes.append(variant.arch)
    hub_ids = [f"timm/{c}.{variant.tag}" for c in classes]
    candidates = [variant.meta_file]
    for hub in hub_ids:
        candidates += [f"{hub}/model.safetensors", f"{hub}/pytorch_model.bin"]
    return WeightsSpec(
        candidates=candidates,
        hub_id=hub_ids[0],
        also_hub_ids=tuple(hub_ids[1:]),
        torch_hub_file=variant.meta_file,
        url_hint=f"{META_BASE_URL}/dinov3_{variant.meta_arch}/{variant.meta_file} (Meta's "
        "license form) or https://huggingface.co/" + hub_ids[0],
        model=variant.name,
    )


def checkpoint_layout(
    state: dict[str, torch.Tensor], path: os.PathLike, variant: Dinov3Variant
) -> tuple[str, bool]:
    """``("meta" | "timm", has qkv bias)`` of a loaded state dict.

    Raises:
        OvssError: neither layout (the keys found are named), or a qkv bias for a model whose
            timm class has none (7B).
    """
    keys = [k for k in state if not k.startswith(HEAD_PREFIXES)]
    if "storage_tokens" in state and "blocks.0.attn.qkv.weight" in state:
        layout, qkv_bias = "meta", "blocks.0.attn.qkv.bias" in state
    elif "reg_token" in state and "blocks.0.attn.qkv.weight" in state:
        layout, qkv_bias = "timm", "blocks.0.attn.q_bias" in state
        if "pos_embed" in state:  # a DINOv2-style ViT, not DINOv3
            layout = ""
    else:
        layout, qkv_bias = "", False
    if not layout:
        found = ", ".join(sorted(keys)[:4]) or "no tensors"
        raise OvssError(
            f"{path} is not a DINOv3 checkpoint (found {found}, ...); {variant.name} loads Meta's "
            "dinov3_*_pretrain_*.pth (storage_tokens, blocks.N.attn.qkv.*) or timm's "
            "vit_*_dinov3 model.safetensors (reg_token, no pos_embed)"
        )
    if qkv_bias and not variant.has_qkvb_class:
        raise OvssError(
            f"{path} has a qkv bias but {variant.name} ({variant.arch}) has none in Meta's or "
            "timm's model; pass the checkpoint of this model"
        )
    return layout, qkv_bias


def load_checkpoint(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    layout: str,
    path: os.PathLike,
    variant: Dinov3Variant,
) -> None:
    """Convert ``state`` (``layout`` from ``checkpoint_layout``) and load it exactly.

    Raises:
        OvssError: a dropped Meta tensor that is not what Meta's eval model ignores, a patch
            kernel of another size, or tensors missing / unexpected / of another shape.
    """
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    what = f"{variant.name} ({type(model).__name__} {variant.timm_class(True)})"
    if layout == "meta":
        state = _check_meta_extras(state, model, path, variant)
    check_patch_kernel(state, model, path, variant.name)
    converted = checkpoint_filter_fn(state, model)
    load_exact(model, converted, path, what)


def _check_meta_extras(
    state: dict[str, torch.Tensor],
    model: torch.nn.Module,
    path: os.PathLike,
    variant: Dinov3Variant,
) -> dict[str, torch.Tensor]:
    """Check, then remove, the Meta tensors timm's filter would drop (module docstring)."""
    out = {}
    for key, value in state.items():
        if key.startswith(_META_TRAINING_ONLY):
            continue
        if key.endswith(".attn.qkv.bias_mask"):
            third = value.numel() // 3
            want = torch.ones_like(value)
            want[third : 2 * third] = 0
            if value.numel() % 3 or not torch.equal(value, want):
                raise OvssError(
                    f"{path}: {key} does not mask exactly the k third of the qkv bias; timm's "
                    f"classes cannot represent it ({variant.name})"
                )
            continue
        if key == "rope_embed.periods":
            mine = dict(model.named_buffers()).get("rope.periods")
            if (
                mine is None
                or mine.shape != value.shape
                or not torch.allclose(mine.float(), value.float(), rtol=1e-6, atol=0)
            ):
                raise OvssError(
                    f"{path}: its RoPE periods {tuple(value.shape)} differ from "
                    f"{variant.name}'s; pass the checkpoint of this model and size"
                )
            continue
        out[key] = value
    return out


def _create(
    variant: Dinov3Variant, qkv_bias: bool, overrides: dict, random_init: bool, seed: int
) -> torch.nn.Module:
    timm_name = f"{variant.timm_class(qkv_bias)}.{variant.tag}"
    return create_timm_model(timm_name, overrides, variant.name, random_init, seed)


register_variants(
    VARIANTS,
    build_dinov3,
    doc=lambda v: f"{v.doc}; timm {v.timm_class(v.has_qkvb_class)}.{v.tag}",
    tiny=TINY_ARCH,
)
