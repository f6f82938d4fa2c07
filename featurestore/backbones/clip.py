"""CLIP ViTs through open_clip: the tokens entering the last block, cached for every dense variant.

Registered names (open_clip model name / pretrained tag):

- ``clip-b16``: ``ViT-B-16-quickgelu`` / ``openai`` (native 224 px, 768-d tokens, 512-d embedding);
- ``clip-l14``: ``ViT-L-14-quickgelu`` / ``openai`` (224 px, 1024-d, 768-d);
- ``clip-l14-336``: ``ViT-L-14-336-quickgelu`` / ``openai`` (336 px, 1024-d, 768-d);
- ``clip-h14``: ``ViT-H-14`` / ``laion2b_s32b_b79k`` (224 px, 1280-d, 1024-d);
- ``openclip:<model_name>:<pretrained_tag>``: any other open_clip name/tag pair whose image tower
  is open_clip's ``VisionTransformer`` with a class token and plain pre-norm blocks, e.g.
  ``openclip:ViT-B-16:laion2b_s34b_b88k``.

OpenAI weights were trained with QuickGELU, so their names use open_clip's ``-quickgelu`` configs
(plain ``ViT-B-16`` + ``openai`` builds GELU and open_clip only warns; ovss refuses such a pair).
Mean/std come from open_clip's pretrained config of the tag (``spec/METHODS.md`` §0.4) and are
recorded in ``info.mean``/``info.std``; the activation, heads, model name and tag in
``info.extra``.

**What a feature set caches** (``spec/METHODS.md`` §0.5), per window of the protocol:

- ``pre_last`` (token, ``(D,)``): patch tokens *entering* the last transformer block;
- ``pre_last_cls`` (window, ``(D,)``): the class token entering the last block;
- ``global`` (window, ``(E,)``): the window's ordinary CLIP image embedding
  (last block, ``ln_post`` on the class token, ``@ proj``; not normalised);

per image ``global_image`` (image, ``(E,)``): the embedding of the whole image squashed to the
model's native square size (see ``CLIPBackbone.preprocess_image``); and once per feature set
(``static_tensors``) the last block's parameters, ``ln_post`` and ``proj`` as float32 arrays, so
MaskCLIP / ClearCLIP / PixelCLIP / ProxyCLIP / Trident last-block variants all run from the store
(``methods.clip_dense``).

Windows of any size that is a multiple of the patch size work: the patch part of the absolute
position embedding is resampled to the window's grid (``interpolate_pos_embed``; the class
position is kept) by the rule ``pos_interp`` (``featurestore.backbones.posembed``, recorded in
``info.extra["pos_interp"]``). The default is the authors' ``offset`` rule, as in ProxyCLIP's and
Trident's ``VisionTransformer.interpolate_pos_encoding`` (``open_clip/transformer.py``) and
SCLIP's / ClearCLIP's / NACLIP's (``clip/model.py``): ``F.interpolate(patch_pos,
scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0), mode="bicubic")``. ``pos_interp="size"`` (the
output size given exactly, no antialiasing) reproduces feature sets ovss made before; ``size-aa``
adds antialiasing. At the native grid the embedding is used as is under every rule. [ours] A
non-native grid with the native token count (e.g. 7x28 for B/16) is resampled; the authors'
``x.shape[1] != positional_embedding.shape[0]`` test would add the unresampled 14x14 embedding.

Checkpoints load through open_clip's own loader (``open_clip.create_model(name,
pretrained=<file>)``): open_clip's ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``
and OpenAI's TorchScript release files (``ViT-B-16.pt``, ...), which ``torch.load`` hands to
``torch.jit.load`` (only files that are TorchScript archives are read that way; everything else
with ``weights_only=True``).

**Tiny models** (tests): ``arch_overrides`` holds open_clip model-config
keys. ``vision_cfg`` and ``text_cfg`` are dicts merged key by key into the named model's config
(fields of ``open_clip.model.CLIPVisionCfg`` / ``CLIPTextCfg``); every other key (e.g.
``embed_dim``) replaces the config value. ``vision_cfg`` also accepts ``heads``, translated to
open_clip's ``head_width = width // heads``. Example, a 2-block 64-wide CLIP of the real class::

    {"embed_dim": 32,
     "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
     "text_cfg": {"layers": 2, "width": 64, "heads": 2}}
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
import warnings
import zipfile
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.backbones.base import (
    Backbone,
    BackboneInfo,
    TensorSpec,
    register_backbone_prefix,
    register_variants,
)
from featurestore.backbones.posembed import OFFSET, POS_INTERP_RULES, check_rule, resample_tokens
from featurestore.errors import OvssError, WeightsNotFoundError
from featurestore.protocol import ImageGeometry
from featurestore.weights import WeightsSpec, resolve_weights, sha256_file

if TYPE_CHECKING:  # open_clip is an optional dependency (pip install 'ovss[clip]')
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

logger = logging.getLogger(__name__)

PREFIX = "openclip:"
PREFIX_SYNTAX = "openclip:<model_name>:<pretrained_tag>"
# Where open_clip (and OpenAI's clip package) store files downloaded from a plain URL.
OPENAI_CACHE_DIR = Path("~/.cache/clip")
# File names open_clip uses in Hugging Face hub repos (safetensors first, as open_clip does).
OPEN_CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# Parameters of the last visual block, named as in open_clip's ResidualAttentionBlock; stored as
# ``last_block.<name>`` next to ``ln_post.weight``, ``ln_post.bias`` and ``proj``.
LAST_BLOCK_PARAMS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
HEAD_PARAMS = ("ln_post.weight", "ln_post.bias", "proj")
STATIC_NAMES = tuple(f"last_block.{n}" for n in LAST_BLOCK_PARAMS) + HEAD_PARAMS

DEFAULT_POS_INTERP = OFFSET  # the authors' rule for every CLIP variant
IMAGE_INPUT_RULE = (
    "whole image resized to the native square size (aspect not kept), bicubic with "
    "antialiasing, clamped to [0, 255], then CLIP mean/std"
)


@dataclass(frozen=True)
class ClipVariant:
    """One registered model: our short name and the open_clip model name + pretrained tag."""

    name: str
    model: str  # open_clip model config name, e.g. "ViT-B-16-quickgelu"
    tag: str  # open_clip pretrained tag, e.g. "openai"
    doc: str


VARIANTS: tuple[ClipVariant, ...] = (
    ClipVariant("clip-b16", "ViT-B-16-quickgelu", "openai", "CLIP ViT-B/16 (OpenAI), 224 px"),
    ClipVariant("clip-l14", "ViT-L-14-quickgelu", "openai", "CLIP ViT-L/14 (OpenAI), 224 px"),
    ClipVariant(
        "clip-l14-336", "ViT-L-14-336-quickgelu", "openai", "CLIP ViT-L/14 (OpenAI), 336 px"
    ),
    ClipVariant(
        "clip-h14", "ViT-H-14", "laion2b_s32b_b79k", "CLIP ViT-H/14 (LAION-2B s32B b79K), 224 px"
    ),
)


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    native_grid: tuple[int, int],
    grid: tuple[int, int],
    rule: str = DEFAULT_POS_INTERP,
) -> torch.Tensor:
    """Resample an absolute position embedding to another patch grid.

    Args:
        pos_embed: ``(1 + gh0 * gw0, D)``: the class position, then the patch positions in
            row-major order over the native grid ``(gh0, gw0)``.
        native_grid: ``(gh0, gw0)``.
        grid: the target grid ``(gh, gw)``.
        rule: ``offset`` (default, the authors': ``scale_factor = (g + 0.1) / g0``), ``size`` or
            ``size-aa`` (``featurestore.backbones.posembed``).

    Returns:
        ``(1 + gh * gw, D)``: the class position unchanged, the patch part resampled bicubically
        (``align_corners=False``) in float32 and cast back to the input dtype. At the native grid
        the input itself is returned (the identity, exactly).
    """
    return resample_tokens(pos_embed, native_grid, grid, rule, num_prefix=1)


class CLIPBackbone(Backbone):
    """The image tower of an open_clip CLIP returning the tensors of the last-block cache.

    Outputs of ``forward_dense`` for windows ``(B, 3, H, W)`` with grid ``gh, gw = H/p, W/p``
    (``D`` = transformer width, ``E`` = embedding size, token order row-major over the grid):

    - ``pre_last``: ``(B, gh*gw, D)`` patch tokens entering the last block;
    - ``pre_last_cls``: ``(B, D)`` class token entering the last block;
    - ``global``: ``(B, E)`` the CLIP image embedding of each window (not normalised);
    - ``layer{i}``: ``(B, gh*gw, D)`` patch tokens output by block ``i`` (0-based; the raw
      residual stream, no ``ln_post``), for each requested layer;
    - ``layer{i}_cls``: ``(B, D)`` the class token output by block ``i``, for each requested
      layer (with ``layer{i}``, the whole input of block ``i + 1``: a method can run the
      blocks after ``i`` from the store).

    ``forward_image`` returns ``global_image``: ``(B, E)`` for whole-image inputs at the native
    size (``preprocess_image``).
    """

    def __init__(self, visual: VisionTransformer, info: BackboneInfo, layers: tuple[int, ...]):
        super().__init__()
        self.visual = visual
        self.info = info
        self.layers = layers  # sorted, unique, non-negative block indices
        self.width = int(visual.transformer.width)
        self.embed_dim = int(visual.proj.shape[1])
        self.depth = len(visual.transformer.resblocks)
        self.native_grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.native_size = (int(visual.image_size[0]), int(visual.image_size[1]))
        self.pos_interp = str(info.extra.get("pos_interp", DEFAULT_POS_INTERP))

    def tensor_specs(self) -> list[TensorSpec]:
        d, e = self.width, self.embed_dim
        specs = [
            TensorSpec("pre_last", "token", (d,), "patch tokens entering the last block"),
            TensorSpec("pre_last_cls", "window", (d,), "class token entering the last block"),
            TensorSpec("global", "window", (e,), "CLIP image embedding of the window"),
            TensorSpec(
                "global_image", "image", (e,), "CLIP image embedding of the whole image (native)"
            ),
        ]
        for i in self.layers:
            specs.append(
                TensorSpec(f"layer{i}", "token", (d,), f"patch tokens output by block {i}")
            )
            specs.append(
                TensorSpec(f"layer{i}_cls", "window", (d,), f"class token output by block {i}")
            )
        return specs

    def static_tensors(self) -> dict[str, np.ndarray]:
        """The last block's parameters (``last_block.<open_clip name>``), ``ln_post.weight``,
        ``ln_post.bias`` and ``proj`` ``(D, E)`` as float32 arrays (see ``STATIC_NAMES``)."""
        block = self.visual.transformer.resblocks[-1]
        params = dict(block.named_parameters())
        out = {f"last_block.{n}": _to_numpy(params[n]) for n in LAST_BLOCK_PARAMS}
        out["ln_post.weight"] = _to_numpy(self.visual.ln_post.weight)
        out["ln_post.bias"] = _to_numpy(self.visual.ln_post.bias)
        out["proj"] = _to_numpy(self.visual.proj)
        return out

    def preprocess_image(self, image: np.ndarray, geometry: ImageGeometry) -> torch.Tensor:
        """``(H, W, 3)`` uint8 original image -> ``(3, S, S)`` input of ``global_image``.

        [ours] The whole image is resized to the native square size ``S`` (224 or 336) without
        keeping the aspect ratio, so every part of it is in the embedding (CLIP's own transform
        centre-crops instead). Bicubic with antialiasing (close to PIL's ``BICUBIC``, which
        CLIP's transform uses), clamped to [0, 255], then normalised with the CLIP mean/std.
        """
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]
        if tuple(x.shape[-2:]) != self.native_size:
            x = F.interpolate(
                x, size=self.native_size, mode="bicubic", align_corners=False, antialias=True
            ).clamp_(0.0, 255.0)
        mean = torch.tensor(self.info.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.info.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return ((x - mean) / std)[0].contiguous()

    def forward_image(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` from ``preprocess_image`` -> ``{"global_image": (B, E)}``."""
        self._check_input(x)
        with torch.inference_mode():
            tokens = self.pre_last_tokens(x)
            final = self.visual.transformer.resblocks[-1](tokens)
            return {"global_image": self._head(final[:, 0]).contiguous()}

    def pre_last_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` windows -> ``(B, 1 + gh*gw, D)`` tokens entering the last block
        (class token first), with the position embedding interpolated to the window's grid."""
        return self._run_blocks(x, stop=self.depth - 1)[0]

    def forward_dense(
        self, x: torch.Tensor, grids: list[tuple[int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the image tower on ``(B, 3, H, W)`` windows; H, W multiples of the patch size.

        ``grids`` is ignored (windows are never padded beyond their valid region here). Returns
        the dict described in the class docstring; tensors are contiguous inference tensors with
        the model's dtype and device.
        """
        self._check_input(x)
        with torch.inference_mode():
            tokens, taken = self._run_blocks(x, stop=self.depth - 1)
            final = self.visual.transformer.resblocks[-1](tokens)
            out = {
                "pre_last": tokens[:, 1:].contiguous(),
                "pre_last_cls": tokens[:, 0].contiguous(),
                "global": self._head(final[:, 0]).contiguous(),
            }
            taken[self.depth - 1] = final
        for i in self.layers:
            out[f"layer{i}"] = taken[i][:, 1:].contiguous()
            out[f"layer{i}_cls"] = taken[i][:, 0].contiguous()
        return out

    def _run_blocks(
        self, x: torch.Tensor, stop: int
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Embed ``x`` and run blocks ``0 .. stop-1``; also returns the requested layers'
        outputs among them (``(B, 1 + gh*gw, D)``, class token first)."""
        visual = self.visual
        p = self.info.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        tokens = visual.conv1(x)  # (B, D, gh, gw)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, gh*gw, D), row-major over the grid
        cls = visual.class_embedding.to(tokens.dtype).view(1, 1, -1).expand(len(tokens), 1, -1)
        pos = interpolate_pos_embed(
            visual.positional_embedding, self.native_grid, grid, self.pos_interp
        )
        tokens = torch.cat([cls, tokens], dim=1) + pos.to(tokens.dtype)
        tokens = visual.ln_pre(visual.patch_dropout(tokens))
        taken = {}
        for i, block in enumerate(visual.transformer.resblocks[:stop]):
            tokens = block(tokens)
            if i in self.layers:
                taken[i] = tokens
        return tokens, taken

    def _head(self, cls_out: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(cls_out) @ self.visual.proj

    def _check_input(self, x: torch.Tensor) -> None:
        p = self.info.patch_size
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h < p or w < p or h % p or w % p:
            raise ValueError(f"window {h}x{w} is not a positive multiple of the patch size {p}")


# --------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------


def load_open_clip(
    name: str,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    arch_overrides: dict | None = None,
) -> tuple[CLIP, Any, BackboneInfo]:
    """Build a whole open_clip CLIP (image and text towers), its tokenizer and its identity.

    Args:
        name: a registered short name (``clip-b16``, ``clip-l14``, ``clip-l14-336``,
            ``clip-h14``) or ``openclip:<model_name>:<pretrained_tag>``.
        weights: checkpoint file (open_clip's ``.safetensors``/``.bin`` or OpenAI's TorchScript
            ``.pt``); ``None`` resolves it: ``$OVSS_WEIGHTS`` (OpenAI's file name, e.g.
            ``ViT-B-16.pt``, or ``<hub id>/open_clip_model.safetensors`` /
            ``<hub id>/open_clip_pytorch_model.bin``), the torch.hub cache, open_clip's URL cache
            ``~/.cache/clip``, the huggingface_hub cache, then a hub download when online.
        random_init: skip weights; open_clip's own initialisation under ``seed`` (the global
            RNG is left untouched); the weights identity becomes ``random-init:<seed>``.
        seed: seed of the random initialisation.
        arch_overrides: architecture changes of the same class (module docstring), recorded in
            ``info.extra``.

    Returns:
        ``(model, tokenizer, info)``: the model in eval mode on the CPU (on the meta device when
        built under ``torch.device("meta")`` with ``random_init``), open_clip's tokenizer for it
        (``tokenizer(list_of_str) -> (n, context_length)`` int64 ids; built once per process and
        shared) and a ``BackboneInfo``
        (family ``clip``; ``info.extra`` records open_clip model/tag, activation, heads, sizes).

    Raises:
        OvssError: unknown name/tag, ``weights`` together with ``random_init``, an image tower
            ovss cannot cache, weights missing offline (``WeightsNotFoundError`` naming the file)
            or not fitting the architecture.
    """
    variant = resolve_variant(name)
    model, info = _build(variant, weights, random_init, seed, arch_overrides)
    return model, _tokenizer(variant.model, int(model.context_length)), info


def build_clip(
    variant: ClipVariant,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    layers: tuple[int, ...] = (),
    arch_overrides: dict | None = None,
    pos_interp: str | None = None,
) -> CLIPBackbone:
    """Build the ``CLIPBackbone`` of ``variant`` (arguments as ``load_open_clip``).

    Args:
        layers: extra block outputs to return as ``layer{i}`` (patch tokens) and
            ``layer{i}_cls`` (class token) (0-based; negative counts from the end). Stored sorted and non-negative in ``info.extra["layers"]``.
        pos_interp: position-embedding rule at non-native grids: ``None`` or ``offset`` (the
            authors', default), ``size`` (ovss's rule before; byte-identical to sets made then),
            ``size-aa``. Recorded in ``info.extra["pos_interp"]`` (and described in
            ``info.extra["pos_embed_interpolation"]``), so a set made under another rule is never
            reopened as this one.

    Only the image tower is kept; the text tower is dropped (``load_open_clip`` gives it).
    """
    rule = check_rule(pos_interp or DEFAULT_POS_INTERP, variant.name)
    model, info = _build(variant, weights, random_init, seed, arch_overrides)
    depth = len(model.visual.transformer.resblocks)
    block_indices = _normalise_layers(layers, depth, variant.name)
    info.extra["layers"] = list(block_indices)
    info.extra["pos_interp"] = rule
    info.extra["pos_embed_interpolation"] = f"{POS_INTERP_RULES[rule]}; class position kept"
    return CLIPBackbone(model.visual, info, block_indices)


def resolve_variant(name: str) -> ClipVariant:
    """The ``ClipVariant`` of a registered short name or an ``openclip:<model>:<tag>`` name."""
    for v in VARIANTS:
        if v.name == name:
            return v
    if not name.startswith(PREFIX):
        known = ", ".join(v.name for v in VARIANTS)
        raise OvssError(f"'{name}' is not a CLIP model; choose from {known} or {PREFIX_SYNTAX}")
    model_name, sep, tag = name[len(PREFIX) :].rpartition(":")
    if not sep or not model_name or not tag:
        raise OvssError(
            f"'{name}' is not of the form {PREFIX_SYNTAX}, e.g. openclip:ViT-B-16:laion2b_s34b_b88k"
        )
    return ClipVariant(name, model_name, tag, f"open_clip {model_name} ({tag})")


def weights_spec(variant: ClipVariant) -> WeightsSpec:
    """Where the checkpoint of ``variant`` may be found (module doc of ``load_open_clip``)."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(variant.model, variant.tag) or {}
    url = cfg.get("url", "")
    hub = cfg.get("hf_hub", "")
    hub_id, hub_file = os.path.split(hub) if hub else ("", "")
    hub_files = OPEN_CLIP_HUB_FILES
    if hub_file:  # a hub entry naming its file, e.g. "org/repo/model.bin"
        stem = hub_file.rsplit(".", 1)[0]
        hub_files = (f"{stem}.safetensors", hub_file)
    url_file = PurePosixPath(urlparse(url).path).name if url else None
    candidates = [url_file] if url_file else []
    if hub_id:
        candidates += [f"{hub_id}/{f}" for f in hub_files]
    hint = url or (f"https://huggingface.co/{hub_id}" if hub_id else "")
    return WeightsSpec(
        candidates=candidates,
        hub_id=hub_id or None,
        torch_hub_file=url_file,
        url_hint=hint,
        model=variant.name,
        hub_files=hub_files,
    )


def resolve_clip_weights(variant: ClipVariant, explicit: str | os.PathLike | None = None) -> Path:
    """``featurestore.weights.resolve_weights`` with open_clip's URL cache (``~/.cache/clip``)
    searched after ``$OVSS_WEIGHTS`` and the torch.hub cache, before the huggingface_hub cache and
    any download."""
    spec = weights_spec(variant)
    if explicit is not None:
        return resolve_weights(spec, explicit)
    try:
        return resolve_weights(dataclasses.replace(spec, hub_id=None))  # no hub: local only
    except WeightsNotFoundError:
        pass
    if spec.torch_hub_file:
        cached = OPENAI_CACHE_DIR.expanduser() / spec.torch_hub_file
        if cached.is_file():
            logger.info("using weights %s (from open_clip's URL cache)", cached)
            return cached
    return resolve_weights(spec)


def _build(
    variant: ClipVariant,
    weights: str | os.PathLike | None,
    random_init: bool,
    seed: int,
    arch_overrides: dict | None,
) -> tuple[CLIP, BackboneInfo]:
    if random_init and weights is not None:
        raise OvssError("--weights and --random-init exclude each other; pass only one")
    open_clip = _import_open_clip()
    from open_clip.pretrained import get_pretrained_cfg

    base_cfg = open_clip.get_model_config(variant.model)
    if base_cfg is None:
        close = difflib.get_close_matches(variant.model, open_clip.list_models(), n=5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise OvssError(f"'{variant.model}' is not an open_clip model{hint}")
    tags = open_clip.list_pretrained_tags_by_model(variant.model)
    tag_cfg = get_pretrained_cfg(variant.model, variant.tag)
    if not tag_cfg:
        raise OvssError(
            f"open_clip has no pretrained tag '{variant.tag}' for {variant.model}; "
            f"its tags: {', '.join(tags) or 'none'}"
        )
    _check_activation(variant, base_cfg, tag_cfg, open_clip.list_models())
    overrides = _normalise_overrides(arch_overrides or {}, base_cfg)
    cfg = _merged_config(base_cfg, overrides)
    _check_supported_config(variant, cfg)

    weights_path = None
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _construct(cfg)
        identity = f"random-init:{seed}"
    else:
        weights_path = resolve_clip_weights(variant, weights)
        with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the RNG
            model = _load(variant, weights_path, overrides)
        identity = sha256_file(weights_path)
    model.eval()
    _check_supported_visual(variant, model.visual)

    visual = model.visual
    block = visual.transformer.resblocks[-1]
    mean, std = tag_cfg.get("mean"), tag_cfg.get("std")
    if mean is None or std is None:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    activation = "quick_gelu" if isinstance(block.mlp.gelu, _quick_gelu_class()) else "gelu"
    info = BackboneInfo(
        name=variant.name,
        family="clip",
        patch_size=int(visual.patch_size[0]),
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
        weights=identity,
        weights_path=str(weights_path) if weights_path is not None else None,
        library={"open_clip": open_clip.__version__, "torch": torch.__version__},
        arch=variant.model,
        extra={
            "open_clip_model": variant.model,
            "pretrained_tag": variant.tag,
            "activation": activation,
            "num_heads": int(block.attn.num_heads),
            "width": int(visual.transformer.width),
            "embed_dim": int(visual.proj.shape[1]),
            "depth": len(visual.transformer.resblocks),
            "ln_eps": float(block.ln_1.eps),
            "image_size": [int(s) for s in visual.image_size],
            "pos_embed_grid": [int(g) for g in visual.grid_size],
            "image_input": IMAGE_INPUT_RULE,
            "layers": [],
            "arch_overrides": _jsonable(arch_overrides or {}),
        },
    )
    return model, info


@functools.lru_cache(maxsize=8)
def _tokenizer(model_name: str, context_length: int) -> Any:
    """open_clip's tokenizer of ``model_name``, built once per process (its BPE tables take about
    0.4 s to build; the tokenizer is a pure function of its input)."""
    return _import_open_clip().get_tokenizer(model_name, context_length=context_length)


def _construct(cfg: dict) -> CLIP:
    """open_clip's model class for ``cfg``, built with its own initialisation on the current
    default device (``torch.device("meta")`` works: ``extract.plan`` builds shapes only).

    This is the constructor ``open_clip.create_model`` calls; it is called directly so that a
    deliberate random initialisation does not log open_clip's "no pretrained weights" warning.
    """
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = deepcopy(cfg)
    custom_text = bool(cfg.pop("custom_text", False))
    return (CustomTextCLIP if custom_text else CLIP)(**cfg)


def _load(variant: ClipVariant, path: Path, overrides: dict) -> CLIP:
    """open_clip's own loader; TorchScript archives (OpenAI's release format) go through
    ``torch.jit.load``, every other file through ``torch.load(weights_only=True)`` or safetensors."""
    open_clip = _import_open_clip()
    torchscript = _is_torchscript_archive(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated.*")
            model = open_clip.create_model(
                variant.model,
                pretrained=str(path),
                weights_only=not torchscript,
                device="cpu",
                **overrides,
            )
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as exc:
        summary = " ".join(str(exc).split())
        if len(summary) > 300:
            summary = summary[:300] + " ..."
        raise OvssError(
            f"{path} does not fit {variant.name} (open_clip {variant.model}): {summary}"
        ) from exc
    return model


def _is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript zip (it holds a ``constants.pkl`` record), e.g. OpenAI's ``.pt``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in zf.namelist())


def _check_activation(variant: ClipVariant, base_cfg: dict, tag_cfg: dict, models: list) -> None:
    wants = bool(tag_cfg.get("quick_gelu", False))
    has = bool(base_cfg.get("quick_gelu", False))
    if wants == has:
        return
    if wants:
        fix = f"{variant.model}-quickgelu"
        why = "was trained with QuickGELU"
    else:
        fix = variant.model.removesuffix("-quickgelu")
        why = "was trained with GELU"
    use = f"; use {PREFIX}{fix}:{variant.tag}" if fix in models else ""
    raise OvssError(
        f"open_clip tag '{variant.tag}' {why} but {variant.model} builds the other activation{use}"
    )


def _normalise_overrides(overrides: dict, base_cfg: dict) -> dict:
    """Check ``arch_overrides`` and translate ``vision_cfg.heads`` to ``head_width``; returns the
    keyword arguments for ``open_clip.create_model`` (whole merged ``*_cfg`` dicts)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    out: dict = {}
    for key, value in overrides.items():
        if key in ("vision_cfg", "text_cfg"):
            if not isinstance(value, dict):
                raise ValueError(f"arch_overrides['{key}'] must be a dict, not {value!r}")
            cls = CLIPVisionCfg if key == "vision_cfg" else CLIPTextCfg
            allowed = {f.name for f in dataclasses.fields(cls)}
            sub = dict(value)
            if key == "vision_cfg" and "heads" in sub:
                heads = int(sub.pop("heads"))
                width = int(sub.get("width", base_cfg["vision_cfg"].get("width", 768)))
                if heads <= 0 or width % heads:
                    raise ValueError(f"vision width {width} is not divisible by heads={heads}")
                sub["head_width"] = width // heads
            unknown = sorted(set(sub) - allowed)
            if unknown:
                raise ValueError(
                    f"arch_overrides['{key}'] has unknown keys {unknown}; "
                    f"they must be fields of open_clip's {cls.__name__}"
                )
            out[key] = {**base_cfg.get(key, {}), **sub}
        elif key in ("quick_gelu", "custom_text"):
            raise ValueError(f"arch_overrides cannot change '{key}': it is fixed by the weights")
        else:
            out[key] = value
    return out


def _merged_config(base_cfg: dict, overrides: dict) -> dict:
    cfg = deepcopy(base_cfg)
    cfg.update(deepcopy(overrides))
    return cfg


def _check_supported_config(variant: ClipVariant, cfg: dict) -> None:
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    problems = []
    if vision.get("timm_model_name"):
        problems.append(f"a timm image tower ({vision['timm_model_name']})")
    if isinstance(vision.get("layers"), (list, tuple)):
        problems.append("a ResNet image tower")
    if text.get("hf_model_name"):
        problems.append(f"a Hugging Face text tower ({text['hf_model_name']})")
    if "multimodal_cfg" in cfg:
        problems.append("a CoCa decoder")
    if problems:
        raise OvssError(
            f"{variant.name} ({variant.model}) has {' and '.join(problems)}; ovss caches open_clip "
            "ViTs with a class token and plain pre-norm blocks only"
        )


def _check_supported_visual(variant: ClipVariant, visual: torch.nn.Module) -> None:
    """Refuse image towers whose last block the cache layout cannot represent."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    problems = []
    if not isinstance(visual, VisionTransformer):
        problems.append(f"image tower {type(visual).__name__}")
    else:
        if visual.attn_pool is not None:
            problems.append("attentional pooling")
        if visual.pool_type != "tok" or visual.final_ln_after_pool:
            problems.append(f"pooling '{visual.pool_type}'")
        if visual.proj is None:
            problems.append("no projection")
        if not visual.transformer.batch_first:
            problems.append("sequence-first blocks")
        block = visual.transformer.resblocks[-1]
        if type(block) is not ResidualAttentionBlock:
            problems.append(f"{type(block).__name__} blocks")
        else:
            if not isinstance(block.ls_1, torch.nn.Identity) or not isinstance(
                block.ls_2, torch.nn.Identity
            ):
                problems.append("layer scale")
            act = block.mlp.gelu
            plain_gelu = type(act) is torch.nn.GELU and act.approximate == "none"
            if not (plain_gelu or type(act) is _quick_gelu_class()):
                problems.append(f"activation {act!r}")
    if problems:
        raise OvssError(
            f"{variant.name} ({variant.model}) has {', '.join(problems)}; ovss caches open_clip "
            "ViTs with a class token and plain pre-norm blocks only"
        )


def _quick_gelu_class() -> type:
    from open_clip.transformer import QuickGELU

    return QuickGELU


def _import_open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise OvssError(
            f"CLIP backbones need open_clip ({exc}); install it with pip install 'ovss[clip]'"
        ) from exc
    return open_clip


def _normalise_layers(layers: tuple[int, ...], depth: int, name: str) -> tuple[int, ...]:
    out = set()
    for i in layers:
        if not -depth <= i < depth:
            raise OvssError(f"layer {i} does not exist in {name}; it has blocks 0..{depth - 1}")
        out.add(i % depth)
    return tuple(sorted(out))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def _jsonable(value: object) -> object:
    return json.loads(
        json.dumps(value, default=lambda o: list(o) if isinstance(o, tuple) else repr(o))
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def build_openclip(
    name: str,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    layers: tuple[int, ...] = (),
    arch_overrides: dict | None = None,
    pos_interp: str | None = None,
) -> CLIPBackbone:
    """Any ``openclip:<model_name>:<pretrained_tag>`` pair; arguments as ``build_clip``."""
    return build_clip(
        resolve_variant(name), weights, random_init, seed, layers, arch_overrides, pos_interp
    )


# The smallest CLIP of the real classes (module docstring); the tests build every variant so.
TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
    "text_cfg": {"layers": 2, "width": 64, "heads": 2},
}

register_variants(
    VARIANTS,
    build_clip,
    doc=lambda v: f"{v.doc}; open_clip {v.model} / {v.tag}",
    tiny=TINY_ARCH,
)
register_backbone_prefix(PREFIX, build_openclip, syntax=PREFIX_SYNTAX)
