"""Any timm ViT with dense patch tokens, by name: ``timm:<model>[.<pretrained tag>]``.

``ovss extract -m timm:vit_base_patch14_reg4_dinov2.lvd142m`` builds ``timm.create_model(name,
num_classes=0, dynamic_img_size=True)`` (so any window whose sides are multiples of the patch
size works) and caches, per window:

- ``patch`` (token, ``(D,)``): the patch tokens after the final norm, prefix tokens (class token,
  registers) dropped;
- ``cls`` (window, ``(D,)``): the class token after the final norm (models with one);
- ``layer{i}`` (token, ``(D,)``): patch tokens of block ``i`` with the final norm, for
  ``--layers``.

Patch size, prefix-token count, mean and std come from the model (its ``patch_embed`` and its
pretrained config of the tag) and are recorded in provenance with the timm name and tag. A model
without ViT patch tokens (ConvNeXt, ResNet: no ``patch_embed`` / prefix tokens, or no dynamic
input size) is refused in one line.

Weights: ``--weights FILE`` (timm's ``model.safetensors`` / ``pytorch_model.bin``, or any layout
the model's own timm ``checkpoint_filter_fn`` converts), else ``$OVSS_WEIGHTS/<hub id>/
model.safetensors``, the Hugging Face cache of the model's hub id, a hub download when online.
The converted state dict must fit the model exactly: a file with missing, unexpected or
wrongly-shaped tensors is refused, never loaded half. ``load_exact`` is shared with the DINOv3
family.

Position embeddings: models with a learned absolute embedding resample it with timm's own
``resample_abs_pos_embed`` (``pos_interp="size-aa"``, the default); timm's ``VisionTransformer``
class also takes ``offset`` and ``size`` (``featurestore.backbones.posembed``). Models with RoPE
or no position embedding record ``pos_interp="none"``.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Iterable

import timm
import torch

from featurestore.backbones.base import (
    Backbone,
    BackboneInfo,
    TensorSpec,
    register_backbone_prefix,
    timm_vit_tokens,
)
from featurestore.backbones.posembed import NO_RULE, POS_INTERP_RULES, SIZE_AA, check_rule
from featurestore.errors import OvssError
from featurestore.weights import WeightsSpec, load_state_dict, resolve_weights, sha256_file

PREFIX = "timm:"
PREFIX_SYNTAX = "timm:<model>[.<tag>]"
# Checkpoint keys of classifier / distillation heads: never part of a backbone with num_classes=0.
HEAD_PREFIXES = ("head.", "head_dist.", "dino_head.", "ibot_head.")
# Buffers a model computes from its configuration (RoPE frequencies): timm's filters drop them
# from files, so they are never expected from one.
COMPUTED_BUFFERS = ("rope.",)
TINY_ARCH = {"depth": 2, "embed_dim": 64, "num_heads": 2}


class TimmViTBackbone(Backbone):
    """A timm ViT (``VisionTransformer``, ``Eva``, ...) returning named dense tensors.

    Outputs of ``forward_dense`` for ``(B, 3, H, W)`` windows, grid ``gh, gw = H/p, W/p``
    (``D`` = embed dim, token order row-major over the grid):

    - ``patch``: ``(B, gh*gw, D)`` patch tokens after the final norm;
    - ``cls``: ``(B, D)`` class token after the final norm (when the model has one);
    - ``layer{i}``: ``(B, gh*gw, D)`` patch tokens of block ``i`` with the final norm applied.

    Registers (and any other prefix tokens) are dropped.
    """

    def __init__(self, model: torch.nn.Module, info: BackboneInfo, layers: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.info = info
        self.layers = layers  # sorted, unique, non-negative block indices
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.has_cls = getattr(model, "cls_token", None) is not None
        self.embed_dim = int(model.embed_dim)

    def tensor_specs(self) -> list[TensorSpec]:
        d = self.embed_dim
        specs = [TensorSpec("patch", "token", (d,), "patch tokens after the final norm")]
        if self.has_cls:
            specs.append(TensorSpec("cls", "window", (d,), "class token after the final norm"))
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
        """Run the ViT on ``(B, 3, H, W)`` windows (H, W multiples of the patch size); ``grids``
        is ignored. Returns the class docstring's dict as contiguous inference tensors."""
        check_window(x, self.info.patch_size)
        final, layer_tokens = timm_vit_tokens(self.model, x, self.layers)
        # final: (B, P + gh*gw, D), the P prefix tokens (cls first, then registers) leading.
        p = self.num_prefix_tokens
        out = {"patch": final[:, p:].contiguous()}
        if self.has_cls:
            out["cls"] = final[:, 0].contiguous()
        for i, tokens in zip(self.layers, layer_tokens, strict=True):
            out[f"layer{i}"] = tokens.contiguous()
        return out


def check_window(x: torch.Tensor, p: int) -> None:
    """``ValueError`` unless ``x`` is ``(B, 3, H, W)`` with H, W positive multiples of ``p``."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h < p or w < p or h % p or w % p:
        raise ValueError(f"window {h}x{w} is not a positive multiple of the patch size {p}")


def normalise_layers(layers: Iterable[int], depth: int, name: str) -> tuple[int, ...]:
    """Block indices sorted, unique, non-negative (``-1`` = last); ``OvssError`` when out of
    range."""
    out = set()
    for i in layers:
        if not -depth <= i < depth:
            raise OvssError(f"layer {i} does not exist in {name}; it has blocks 0..{depth - 1}")
        out.add(i % depth)
    return tuple(sorted(out))


def create_timm_model(
    timm_name: str, overrides: dict, model: str, random_init: bool, seed: int
) -> torch.nn.Module:
    """``timm.create_model(timm_name, num_classes=0, dynamic_img_size=True, **overrides)``
    without weights, seeded under ``seed`` when ``random_init`` (global RNG untouched).

    Raises:
        OvssError: the architecture takes no dynamic input size (no ViT patch tokens).
        ValueError: ``overrides`` the class rejects.
    """

    def create() -> torch.nn.Module:
        return timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            dynamic_img_size=True,
            use_naflex=False,  # the classic class whatever TIMM_USE_NAFLEXVIT says
            **overrides,
        )

    try:
        if random_init:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return create()
        return create()
    except TypeError as exc:
        if "dynamic_img_size" in str(exc) or "use_naflex" in str(exc):
            raise OvssError(
                f"{model}: timm model {timm_name} has no ViT patch tokens (it takes no dynamic "
                "input size); ovss caches ViT-style timm models (patch_embed + prefix tokens)"
            ) from None
        raise ValueError(
            f"cannot build {timm_name} with arch_overrides={overrides}: {exc}"
        ) from exc
    except (AssertionError, ValueError) as exc:
        raise ValueError(
            f"cannot build {timm_name} with arch_overrides={overrides}: {exc!r}"
        ) from exc


def check_patch_kernel(state: dict, model: torch.nn.Module, path: os.PathLike, name: str) -> None:
    """Refuse a file whose patch kernel differs from the model's (timm's filters would resample
    it silently; a wrong file is likelier)."""
    kernel = state.get("patch_embed.proj.weight")
    model_kernel = tuple(model.patch_embed.proj.weight.shape[-2:])
    if kernel is not None and kernel.ndim == 4 and tuple(kernel.shape[-2:]) != model_kernel:
        raise OvssError(
            f"{path} has {tuple(kernel.shape[-2:])} patches but {name} uses {model_kernel}; "
            f"pass the checkpoint of {name}"
        )


def load_exact(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    path: os.PathLike,
    what: str,
    computed: tuple[str, ...] = COMPUTED_BUFFERS,
) -> None:
    """Load ``state`` (already in the model's key layout) into ``model`` only if it fits exactly.

    Keys under ``computed`` (RoPE frequencies) may be absent from the file; everything else of
    the model must be there with its shape, and nothing more.

    Raises:
        OvssError: one line counting missing, unexpected and wrongly-shaped tensors, with
            examples.
    """
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(state) if not k.startswith(computed))
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
        raise OvssError(f"{path} does not fit {what}: {'; '.join(problems)}")
    full = {k: state.get(k, v) for k, v in expected.items()}
    model.load_state_dict(full, strict=True)


def _filter_fn(model: torch.nn.Module) -> Callable | None:
    """The ``checkpoint_filter_fn`` of the timm module that defines the model's class."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def weights_spec(timm_name: str, hub_id: str | None, model: str) -> WeightsSpec:
    """Where the checkpoint of a timm model may be found: timm's hub files."""
    hub = hub_id or f"timm/{timm_name}"
    return WeightsSpec(
        candidates=[
            f"{hub}/model.safetensors",
            f"{hub}/pytorch_model.bin",
            f"{timm_name}.safetensors",
        ],
        hub_id=hub,
        url_hint=f"https://huggingface.co/{hub}",
        model=model,
    )


def resolve_timm_name(name: str) -> tuple[str, str]:
    """``timm:<model>[.<tag>]`` -> ``(timm name as given, architecture)``.

    Raises:
        OvssError: no model named, or timm knows no such architecture (close names listed).
    """
    timm_name = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if not timm_name:
        raise OvssError(f"'{name}' names no timm model; use {PREFIX_SYNTAX}")
    arch, _tag = timm.models.split_model_name_tag(timm_name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise OvssError(f"'{arch}' is not a timm model{hint}")
    return timm_name, arch


def build_timm(
    name: str,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    layers: tuple[int, ...] = (),
    arch_overrides: dict | None = None,
    pos_interp: str | None = None,
) -> TimmViTBackbone:
    """Build ``timm:<model>[.<tag>]`` (module docstring).

    Args:
        name: ``timm:`` followed by a timm model name, optionally with its pretrained tag.
        weights: checkpoint file; ``None`` resolves timm's hub file ($OVSS_WEIGHTS, HF cache,
            download when online).
        random_init: timm's own initialisation under ``seed``; identity ``random-init:<seed>``.
        seed: seed of the random initialisation.
        layers: extra block outputs ``layer{i}`` (negative counts from the end).
        arch_overrides: keyword arguments of the same timm class (tests: ``depth=2,
            embed_dim=64, num_heads=2``), recorded in provenance.
        pos_interp: ``None`` (timm's ``size-aa``), or for timm's ``VisionTransformer`` any rule
            of ``featurestore.backbones.posembed``; models without an absolute embedding take
            only ``None``/``none``.

    Raises:
        OvssError: unknown name, a model without ViT patch tokens, weights and random init
            together, missing weights (``WeightsNotFoundError``) or a file that does not fit.
    """
    from timm.models.vision_transformer import VisionTransformer

    if random_init and weights is not None:
        raise OvssError("--weights and --random-init exclude each other; pass only one")
    timm_name, arch = resolve_timm_name(name)
    overrides = dict(arch_overrides or {})
    model = create_timm_model(timm_name, overrides, name, random_init, seed)
    patch_embed = getattr(model, "patch_embed", None)
    if (
        patch_embed is None
        or not hasattr(model, "num_prefix_tokens")
        or not hasattr(model, "forward_intermediates")
        or not hasattr(model, "blocks")
    ):
        raise OvssError(
            f"{name}: timm model {arch} ({type(model).__name__}) has no ViT patch tokens; ovss "
            "caches ViT-style timm models (patch_embed + prefix tokens)"
        )
    ph, pw = (int(s) for s in patch_embed.patch_size)
    if ph != pw:
        raise OvssError(f"{name}: non-square patches {ph}x{pw} are not supported")

    has_abs_pos = getattr(model, "pos_embed", None) is not None
    if not has_abs_pos:
        if pos_interp not in (None, NO_RULE):
            raise OvssError(f"{name} has no absolute position embedding; pos_interp does not apply")
        rule = NO_RULE
    else:
        rule = check_rule(pos_interp or SIZE_AA, name)
        if rule != SIZE_AA:
            if not isinstance(model, VisionTransformer):
                raise OvssError(
                    f"{name} ({type(model).__name__}) resamples its position embedding with "
                    f"timm's rule only; pos_interp must be {SIZE_AA}"
                )
            from featurestore.backbones.dino import use_pos_rule

            use_pos_rule(model, rule)

    depth = len(model.blocks)
    block_indices = normalise_layers(layers, depth, name)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    weights_path = None
    if random_init:
        identity = f"random-init:{seed}"
    else:
        weights_path = resolve_weights(weights_spec(timm_name, cfg.get("hf_hub_id"), name), weights)
        state = load_state_dict(weights_path)
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
        check_patch_kernel(state, model, weights_path, name)
        filter_fn = _filter_fn(model)
        if filter_fn is not None:
            state = filter_fn(state, model)
            state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
        load_exact(model, state, weights_path, f"{name} ({type(model).__name__})")
        identity = sha256_file(weights_path)
    model.eval()
    info = BackboneInfo(
        name=name,
        family="timm",
        patch_size=ph,
        mean=_triple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=_triple(cfg.get("std", (0.229, 0.224, 0.225))),
        weights=identity,
        weights_path=str(weights_path) if weights_path is not None else None,
        library={"timm": timm.__version__, "torch": torch.__version__},
        arch=arch,
        extra={
            "timm_name": timm_name,
            "pretrained_tag": str(cfg.get("tag") or ""),
            "timm_class": type(model).__name__,
            "num_prefix_tokens": int(model.num_prefix_tokens),
            "has_cls_token": getattr(model, "cls_token", None) is not None,
            "embed_dim": int(model.embed_dim),
            "depth": depth,
            "layers": list(block_indices),
            "pos_interp": rule,
            "pos_embed_interpolation": POS_INTERP_RULES.get(rule, "no absolute embedding"),
            "mean_std_from": "timm pretrained_cfg",
            "arch_overrides": jsonable(overrides),
        },
    )
    return TimmViTBackbone(model, info, block_indices)


def _triple(values: Iterable[float]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def jsonable(value: object) -> object:
    """``value`` with tuples as lists and anything unusual as its ``repr`` (for provenance)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


register_backbone_prefix(PREFIX, build_timm, syntax=PREFIX_SYNTAX)
