"""DINO and DINOv2 ViTs through timm (``vit_*_dinov2.lvd142m``, ``vit_*_224.dino``).

Registered names: ``dinov2-{s,b,l,g}14``, ``dinov2-{s,b,l,g}14-reg`` (4 register tokens),
``dino-s16``, ``dino-b16``, ``dino-b8``. Each is timm's ``VisionTransformer`` built with
``dynamic_img_size=True``, so any window whose sides are multiples of the patch size works; the
absolute position embedding (37x37 grid for DINOv2, 14x14 for DINO /16, 28x28 for /8) is
resampled to the window's grid on every call by the rule ``pos_interp``
(``featurestore.backbones.posembed``, recorded in ``info.extra["pos_interp"]``). Defaults are the
authors' hub code: ``offset`` (``scale_factor = (g + 0.1) / g0``, no antialiasing) for DINO v1
(facebookresearch/dino ``vision_transformer.py VisionTransformer.interpolate_pos_encoding``) and
DINOv2 without registers (facebookresearch/dinov2 ``dinov2/models/vision_transformer.py
DinoVisionTransformer.interpolate_pos_encoding`` with the hub's ``interpolate_offset=0.1``,
``interpolate_antialias=False``); ``size-aa`` (``size=(gh, gw)``, antialiased, exactly timm's
``resample_abs_pos_embed``) for DINOv2 with registers (the hub's ``interpolate_offset=0.0``,
``interpolate_antialias=True``). Sets made by ovss before the rule existed used ``size-aa`` for
every variant; ``pos_interp="size-aa"`` reproduces them.

Checkpoints load in either layout: timm's (hub ``model.safetensors``) or Meta's official release
files (``dinov2_vits14_pretrain.pth``, ``dino_deitsmall16_pretrain.pth``, ...). timm's own
``checkpoint_filter_fn`` converts the Meta layout (drops ``mask_token``, folds the first position
embedding into ``cls_token`` for register models, renames SwiGLU ``w12``/``w3``), then the state
dict must fit the model exactly.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from featurestore.backbones.base import (
    Backbone,
    BackboneInfo,
    TensorSpec,
    register_variants,
    timm_vit_tokens,
)
from featurestore.backbones.posembed import (
    OFFSET,
    POS_INTERP_RULES,
    SIZE_AA,
    check_rule,
    resample_patch_grid,
)
from featurestore.errors import OvssError
from featurestore.weights import WeightsSpec, load_state_dict, resolve_weights, sha256_file

# Checkpoint keys that belong to classifier / self-distillation heads, never to the backbone.
HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.")


@dataclass(frozen=True)
class DinoVariant:
    """One registered model: our short name and the timm architecture + pretrained tag."""

    name: str
    arch: str  # timm architecture, e.g. "vit_small_patch14_dinov2"
    tag: str  # timm pretrained tag, e.g. "lvd142m"
    family: str  # "dinov2" or "dino"
    doc: str

    @property
    def timm_name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def default_pos_interp(self) -> str:
        """The authors' rule: ``size-aa`` for DINOv2 with registers, ``offset`` otherwise."""
        return SIZE_AA if "_reg" in self.arch else OFFSET


_V2 = "dinov2"
_REG = "with 4 registers"
VARIANTS: tuple[DinoVariant, ...] = (
    DinoVariant("dinov2-s14", "vit_small_patch14_dinov2", "lvd142m", _V2, "DINOv2 ViT-S/14, 384-d"),
    DinoVariant("dinov2-b14", "vit_base_patch14_dinov2", "lvd142m", _V2, "DINOv2 ViT-B/14, 768-d"),
    DinoVariant(
        "dinov2-l14", "vit_large_patch14_dinov2", "lvd142m", _V2, "DINOv2 ViT-L/14, 1024-d"
    ),
    DinoVariant(
        "dinov2-g14", "vit_giant_patch14_dinov2", "lvd142m", _V2, "DINOv2 ViT-g/14, 1536-d"
    ),
    DinoVariant(
        "dinov2-s14-reg", "vit_small_patch14_reg4_dinov2", "lvd142m", _V2, f"DINOv2 ViT-S/14 {_REG}"
    ),
    DinoVariant(
        "dinov2-b14-reg", "vit_base_patch14_reg4_dinov2", "lvd142m", _V2, f"DINOv2 ViT-B/14 {_REG}"
    ),
    DinoVariant(
        "dinov2-l14-reg", "vit_large_patch14_reg4_dinov2", "lvd142m", _V2, f"DINOv2 ViT-L/14 {_REG}"
    ),
    DinoVariant(
        "dinov2-g14-reg", "vit_giant_patch14_reg4_dinov2", "lvd142m", _V2, f"DINOv2 ViT-g/14 {_REG}"
    ),
    DinoVariant("dino-s16", "vit_small_patch16_224", "dino", "dino", "DINO ViT-S/16, 384-d"),
    DinoVariant("dino-b16", "vit_base_patch16_224", "dino", "dino", "DINO ViT-B/16, 768-d"),
    DinoVariant("dino-b8", "vit_base_patch8_224", "dino", "dino", "DINO ViT-B/8, 768-d"),
)


class DinoBackbone(Backbone):
    """A timm DINO/DINOv2 ViT that returns named dense tensors.

    Outputs of ``forward_dense`` for a batch ``(B, 3, H, W)`` with grid ``gh, gw = H/p, W/p``
    (``D`` = embed dim, ``R`` = register count, token order row-major over the grid):

    - ``patch``: ``(B, gh*gw, D)`` patch tokens after the final LayerNorm;
    - ``cls``: ``(B, D)`` class token after the final LayerNorm;
    - ``reg``: ``(B, R, D)`` register tokens after the final LayerNorm (register models only);
    - ``layer{i}``: ``(B, gh*gw, D)`` patch tokens output by block ``i`` (0-based) with the final
      LayerNorm applied to them, for each requested layer.
    """

    def __init__(self, model: VisionTransformer, info: BackboneInfo, layers: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.info = info
        self.layers = layers  # sorted, unique, non-negative block indices
        self.num_registers = int(model.num_reg_tokens)
        self.num_prefix_tokens = int(model.num_prefix_tokens)  # cls + registers
        self.embed_dim = int(model.embed_dim)

    def tensor_specs(self) -> list[TensorSpec]:
        d = self.embed_dim
        specs = [
            TensorSpec("patch", "token", (d,), "patch tokens after the final norm"),
            TensorSpec("cls", "window", (d,), "class token after the final norm"),
        ]
        if self.num_registers:
            specs.append(
                TensorSpec(
                    "reg", "window", (self.num_registers, d), "register tokens after the final norm"
                )
            )
        for i in self.layers:
            specs.append(
                TensorSpec(
                    f"layer{i}", "token", (d,), f"patch tokens of block {i}, final norm applied"
                )
            )
        return specs

    def forward_dense(
        self, x: torch.Tensor, grids: list[tuple[int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the ViT on ``(B, 3, H, W)`` windows; H, W multiples of the patch size.

        Returns the dict described in the class docstring; all tensors are contiguous, have the
        model's dtype and device, and are inference tensors (computed without autograd).
        """
        self._check_input(x)
        final, layer_tokens = timm_vit_tokens(self.model, x, self.layers)
        # final: (B, P + gh*gw, D) with P = 1 cls token followed by R register tokens.
        p = self.num_prefix_tokens
        out = {"patch": final[:, p:].contiguous(), "cls": final[:, 0].contiguous()}
        if self.num_registers:
            out["reg"] = final[:, 1:p].contiguous()
        for i, tokens in zip(self.layers, layer_tokens, strict=True):
            out[f"layer{i}"] = tokens.contiguous()
        return out

    def _check_input(self, x: torch.Tensor) -> None:
        p = self.info.patch_size
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h < p or w < p or h % p or w % p:
            raise ValueError(f"window {h}x{w} is not a positive multiple of the patch size {p}")


def build_dino(
    variant: DinoVariant,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    layers: tuple[int, ...] = (),
    arch_overrides: dict | None = None,
    pos_interp: str | None = None,
) -> DinoBackbone:
    """Build ``variant`` with real weights or a seeded random initialisation.

    Args:
        variant: which model (one of ``VARIANTS``).
        weights: checkpoint path (timm or Meta layout); ``None`` resolves it through
            ``featurestore.weights.resolve_weights`` ($OVSS_WEIGHTS, library caches, hub).
        random_init: skip weights and initialise with timm's initialiser under ``seed``; the
            weights identity becomes ``random-init:<seed>``. The global RNG is left untouched.
        seed: seed of the random initialisation.
        layers: extra block outputs to return as ``layer{i}`` (0-based; negative counts from the
            end, e.g. ``-1`` is the last block). Stored sorted and non-negative in
            ``info.extra["layers"]``.
        arch_overrides: keyword arguments passed on to ``timm.create_model`` to change the
            architecture of the same class (tests use ``dict(depth=2, embed_dim=64,
            num_heads=2)``); recorded in ``info.extra``. For the giant (SwiGLU) models
            ``int(embed_dim * mlp_ratio)`` must be even.
        pos_interp: position-embedding rule at non-native grids (module docstring): ``None``
            (the variant's authors' rule), ``offset``, ``size`` or ``size-aa``; recorded in
            ``info.extra["pos_interp"]``.

    Raises:
        OvssError: both ``weights`` and ``random_init`` given, a layer index out of range, weights
            missing (``WeightsNotFoundError``) or not fitting the architecture.
    """
    if random_init and weights is not None:
        raise OvssError("--weights and --random-init exclude each other; pass only one")
    rule = check_rule(pos_interp or variant.default_pos_interp, variant.name)
    overrides = dict(arch_overrides or {})
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create_model(variant, overrides)
    else:
        model = _create_model(variant, overrides)
    use_pos_rule(model, rule)
    depth = len(model.blocks)
    block_indices = _normalise_layers(layers, depth, variant.name)

    weights_path = None
    if random_init:
        identity = f"random-init:{seed}"
    else:
        weights_path = resolve_weights(weights_spec(variant), weights)
        _load_checkpoint(model, weights_path, variant)
        identity = sha256_file(weights_path)
    model.eval()

    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]  # ImageNet's
    info = BackboneInfo(
        name=variant.name,
        family=variant.family,
        patch_size=int(model.patch_embed.patch_size[0]),
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
        weights=identity,
        weights_path=str(weights_path) if weights_path is not None else None,
        library={"timm": timm.__version__, "torch": torch.__version__},
        arch=variant.arch,
        extra={
            "timm_name": variant.timm_name,
            "num_registers": int(model.num_reg_tokens),
            "embed_dim": int(model.embed_dim),
            "depth": depth,
            "layers": list(block_indices),
            "pos_embed_grid": list(model.patch_embed.grid_size),
            "pos_interp": rule,
            "pos_embed_interpolation": POS_INTERP_RULES[rule],
            "arch_overrides": {k: _jsonable(v) for k, v in overrides.items()},
        },
    )
    return DinoBackbone(model, info, block_indices)


def use_pos_rule(model: VisionTransformer, rule: str) -> None:
    """Make ``model`` resample its position embedding by ``rule`` at every call.

    timm's ``VisionTransformer._pos_embed`` (dynamic size) calls ``resample_abs_pos_embed``
    (the ``size-aa`` rule); that is kept as is for ``size-aa``. Any other rule replaces the
    instance's ``_pos_embed`` (used by ``forward_features`` and ``forward_intermediates``) with
    the same steps around ``resample_patch_grid``.
    """
    if rule == SIZE_AA:
        return
    if not model.dynamic_img_size or model.pos_embed is None:
        raise ValueError("the position rule needs a dynamic-size ViT with an absolute embedding")
    model._pos_embed = functools.partial(_pos_embed_by_rule, model, rule)


def _pos_embed_by_rule(model: VisionTransformer, rule: str, x: torch.Tensor) -> torch.Tensor:
    """timm's ``_pos_embed`` for ``(B, gh, gw, D)`` patch embeddings with the patch positions
    resampled by ``rule``; returns ``(B, P + gh*gw, D)`` (cls, registers, patches)."""
    b, gh, gw, d = x.shape
    prefix_pos = 0 if model.no_embed_class else model.num_prefix_tokens
    pos = model.pos_embed  # (1, prefix_pos + gh0*gw0, D)
    gh0, gw0 = model.patch_embed.grid_size
    patch = pos[:, prefix_pos:].reshape(1, gh0, gw0, d).permute(0, 3, 1, 2)
    patch = resample_patch_grid(patch, (gh, gw), rule).permute(0, 2, 3, 1).reshape(1, gh * gw, d)
    pos = torch.cat([pos[:, :prefix_pos], patch], dim=1)
    x = x.reshape(b, gh * gw, d)
    to_cat = []
    if model.cls_token is not None:
        to_cat.append(model.cls_token.expand(b, -1, -1))
    if model.reg_token is not None:
        to_cat.append(model.reg_token.expand(b, -1, -1))
    if model.no_embed_class:  # registers: positions of the patches only, then the prefix
        x = torch.cat([*to_cat, x + pos], dim=1)
    else:  # cls position first: concatenate, then add
        x = torch.cat([*to_cat, x], dim=1) + pos
    return model.pos_drop(x)


def weights_spec(variant: DinoVariant) -> WeightsSpec:
    """Where the checkpoint of ``variant`` may be found (Meta's file and timm's hub files)."""
    cfg = get_pretrained_cfg(variant.timm_name)
    url = cfg.url if cfg is not None else ""
    hub_id = (cfg.hf_hub_id if cfg is not None else None) or f"timm/{variant.timm_name}"
    official = PurePosixPath(urlparse(url).path).name if url else None
    candidates = [official] if official else []
    candidates += [
        f"{variant.timm_name}.safetensors",
        f"{hub_id}/model.safetensors",
        f"{hub_id}/pytorch_model.bin",
    ]
    return WeightsSpec(
        candidates=candidates,
        hub_id=hub_id,
        torch_hub_file=official,
        url_hint=url,
        model=variant.name,
    )


def _create_model(variant: DinoVariant, overrides: dict) -> VisionTransformer:
    try:
        model = timm.create_model(
            variant.timm_name,
            pretrained=False,
            dynamic_img_size=True,
            num_classes=0,
            use_naflex=False,  # the classic ViT whatever TIMM_USE_NAFLEXVIT says
            **overrides,
        )
    except (AssertionError, TypeError, ValueError) as exc:
        raise ValueError(
            f"cannot build {variant.timm_name} with arch_overrides={overrides}: {exc!r}"
        ) from exc
    return model


def _normalise_layers(layers: tuple[int, ...], depth: int, name: str) -> tuple[int, ...]:
    out = set()
    for i in layers:
        if not -depth <= i < depth:
            raise OvssError(f"layer {i} does not exist in {name}; it has blocks 0..{depth - 1}")
        out.add(i % depth)
    return tuple(sorted(out))


def _load_checkpoint(model: VisionTransformer, path: os.PathLike, variant: DinoVariant) -> None:
    state = load_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    kernel = state.get("patch_embed.proj.weight")
    model_kernel = tuple(model.patch_embed.proj.weight.shape[-2:])
    if kernel is not None and kernel.ndim == 4 and tuple(kernel.shape[-2:]) != model_kernel:
        # checkpoint_filter_fn would silently resample the kernel; a wrong file is likelier.
        raise OvssError(
            f"{path} has {tuple(kernel.shape[-2:])} patches but {variant.name} uses "
            f"{model_kernel}; pass the checkpoint of {variant.name}"
        )
    state = checkpoint_filter_fn(state, model)
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(state) if expected[k].shape != state[k].shape
    )
    if missing or unexpected or wrong_shape:
        problems = []
        named = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        for label, keys in named:
            if keys:
                problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise OvssError(
            f"{path} does not fit {variant.name} ({variant.timm_name}): {'; '.join(problems)}"
        )
    model.load_state_dict(state, strict=True)


def _jsonable(value: object) -> object:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


TINY_ARCH = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def _tiny(variant: DinoVariant) -> dict:
    # SwiGLU (giant) needs an even int(embed_dim * mlp_ratio).
    return dict(TINY_ARCH, mlp_ratio=4.0) if "giant" in variant.arch else dict(TINY_ARCH)


register_variants(
    VARIANTS,
    build_dino,
    doc=lambda v: f"{v.doc}; timm {v.timm_name}",
    tiny=_tiny,
)
