"""Segment Anything (SAM ViT-B/L/H) image encoders through ``segment_anything``.

Registered names: ``sam-b``, ``sam-l``, ``sam-h``. Each builds the library's real ``Sam``
(``ImageEncoderViT`` + ``PromptEncoder`` + ``MaskDecoder``) with the configuration of the official
release (``build_sam_vit_b/l/h``) and loads Meta's checkpoint files ``sam_vit_b_01ec64.pth``,
``sam_vit_l_0b3195.pth`` and ``sam_vit_h_4b8939.pth`` (a flat ``Sam`` state dict) strictly.

Preprocessing is ``SamPredictor.set_image``'s: the longer side resized to ``img_size`` (1024) with
``ResizeLongestSide`` (PIL bilinear through torchvision), SAM's pixel mean/std (ImageNet x 255),
zero padding at the bottom/right to ``img_size`` x ``img_size``. The protocols accepted are
therefore ``Protocol(resize="long", size=img_size)``: one window per image, box ``(0, 0, h, w)``
of the resized image, padding ``(0, 0, img_size - h, img_size - w)``; and
``Protocol(resize="halves", size=img_size)`` (key ``halves1024``, Trident's Cityscapes rule):
two windows per image, the left half ``[0, W // 2)`` and the right half ``[W // 2, W)`` of the
image, each preprocessed exactly as ``SamPredictor.set_image`` on that half (see
``SamBackbone.geometry``). Window-unit tensors then have two rows per image and token-unit
tensors the left half's valid tokens followed by the right half's.

Either may carry ``align`` (keys ``long1024-a16``, ``halves1024-a16``): Trident's input (METHODS.md
§4 step 1), the image first resized to ``Protocol.rounded_size`` (each side rounded *up* to a
multiple of ``align``, the CLIP patch size) with OpenCV's ``INTER_LINEAR`` rule
(``featurestore.resize.resize_linear_u8``, byte for byte ``cv2.resize``), then given to
``SamPredictor.set_image`` (``halves``: split at the rounded width // 2 first). The geometry's
``original`` stays the original size; ``resized`` / boxes / grids are those of the rounded
image's SamPredictor input(s).

What is cached per image (``S = img_size / 16`` = 64, ``H`` heads, ``hd`` head dim):

- ``embedding`` (unit *window*, row ``(256, S, S)``): the neck output, i.e. exactly
  ``SamPredictor.features`` (what the prompt decoder consumes);
- ``q``, ``k``, ``v`` (unit *token*, row ``(H, hd)``): the last global-attention block's
  ``qkv`` projection split per head, for the valid tokens only; ``q`` is *unscaled* (as the real
  ``Attention`` keeps it: the logits use ``q * scale``, the relative-position terms use ``q``);
- ``attn_log_mass`` (unit *token*, row ``(H,)``): per valid query and head, the log of the
  attention mass the real block (softmax over *all* ``S*S`` keys, padding included) puts on the
  valid keys: ``logsumexp(valid logits) - logsumexp(all logits)``, <= 0, exactly 0 without
  padding. The attention among valid tokens as the encoder normalises it (what Trident crops) is
  ``softmax over valid keys * exp(attn_log_mass)``; without it that needs the padded keys
  (``S*S`` rows). A log-mass near 0 keeps float16 precision, a raw log-sum-exp (~10) would not.
- ``layer{i}`` (unit *token*, row ``(D,)``, only when asked for): the output of encoder block
  ``i`` (before the neck) for the valid tokens.

The valid token region of an image whose resized size is ``(h, w)`` is
``ceil(h / 16) x ceil(w / 16)``: every token that sees at least one image pixel. Trident and
``METHODS.md`` §0.4 use ``floor`` (``input_size // 16``), which is the top-left sub-grid of it
(equal when ``h`` and ``w`` are multiples of 16, one row/column less otherwise);
``methods.sam_cache`` crops to it. ``ceil`` also keeps images whose short side resizes below
16 px (floor would give no token at all).

Per-set static arrays: ``rel_pos_h``/``rel_pos_w`` ``(2S - 1, hd)`` (that block's decomposed
relative-position tables), ``scale`` ``(1,)`` (``hd ** -0.5``) and ``patch_size`` ``(1,)``.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.backbones.base import Backbone, BackboneInfo, TensorSpec, register_variants
from featurestore.errors import OvssError
from featurestore.protocol import ImageGeometry, Protocol, WindowGeometry, half_columns
from featurestore.weights import WeightsSpec, load_state_dict, resolve_weights, sha256_file

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# SamPredictor's normalisation (Sam's default pixel_mean / pixel_std, in 0..255 units).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
STATIC_NAMES = ("rel_pos_h", "rel_pos_w", "scale", "patch_size")


@dataclass(frozen=True)
class SamConfig:
    """Architecture of a ``Sam``; the defaults are the official ones shared by ViT-B/L/H.

    ``arch_overrides`` keys are these field names (tests use a tiny config of the same classes,
    e.g. ``dict(depth=2, embed_dim=64, num_heads=2, global_attn_indexes=(1,), window_size=4,
    img_size=256, out_chans=32, decoder_mlp_dim=64, decoder_num_heads=2,
    iou_head_hidden_dim=32, mask_in_chans=8)``).

    Attributes:
        depth: image-encoder blocks.
        embed_dim: image-encoder width ``D``.
        num_heads: image-encoder heads ``H`` (``D`` must be divisible by it).
        global_attn_indexes: blocks with global attention (the others use windows); the last
            of them is the block whose q/k/v are cached.
        img_size: square input side; the longer image side is resized to it.
        patch_size: patch side in pixels (``img_size`` must be a multiple).
        window_size: window side (tokens) of the windowed-attention blocks.
        mlp_ratio: encoder MLP hidden width / ``D``.
        out_chans: neck channels = prompt embedding width (256 in SAM).
        decoder_depth: two-way transformer blocks of the mask decoder.
        decoder_mlp_dim: MLP width of the mask decoder's transformer.
        decoder_num_heads: heads of the mask decoder's transformer.
        mask_in_chans: hidden channels of the prompt encoder's mask branch (divisible by 4).
        iou_head_hidden_dim: width of the IoU prediction head.
    """

    depth: int
    embed_dim: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    out_chans: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    mask_in_chans: int = 16
    iou_head_hidden_dim: int = 256

    @property
    def embedding_size(self) -> int:
        """Token grid side ``S = img_size / patch_size`` (64 for the official models)."""
        return self.img_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def attn_block(self) -> int:
        """Index of the last global-attention block (whose q/k/v are cached)."""
        return max(self.global_attn_indexes)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if self.img_size <= 0 or self.patch_size <= 0 or self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by {self.num_heads}")
        if not self.global_attn_indexes:
            raise ValueError("global_attn_indexes is empty; SAM caches a global-attention block")
        if not all(0 <= i < self.depth for i in self.global_attn_indexes):
            raise ValueError(
                f"global_attn_indexes {self.global_attn_indexes} not in 0..{self.depth - 1}"
            )
        if self.window_size <= 0:
            raise ValueError("window_size must be positive")
        if self.out_chans % self.decoder_num_heads or self.out_chans % 8:
            raise ValueError(
                f"out_chans {self.out_chans} must be divisible by 8 and by decoder_num_heads"
            )
        if self.mask_in_chans % 4:
            raise ValueError(f"mask_in_chans {self.mask_in_chans} is not divisible by 4")


@dataclass(frozen=True)
class SamVariant:
    """One registered model: our short name, segment_anything's name and the release file."""

    name: str
    arch: str  # segment_anything's registry key, e.g. "vit_b"
    checkpoint: str  # official file name
    config: SamConfig
    doc: str


VARIANTS: tuple[SamVariant, ...] = (
    SamVariant(
        "sam-b",
        "vit_b",
        "sam_vit_b_01ec64.pth",
        SamConfig(depth=12, embed_dim=768, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
        "SAM ViT-B image encoder (768-d, 12 heads), embeddings + last global-attention q/k/v",
    ),
    SamVariant(
        "sam-l",
        "vit_l",
        "sam_vit_l_0b3195.pth",
        SamConfig(depth=24, embed_dim=1024, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
        "SAM ViT-L image encoder (1024-d, 16 heads), embeddings + last global-attention q/k/v",
    ),
    SamVariant(
        "sam-h",
        "vit_h",
        "sam_vit_h_4b8939.pth",
        SamConfig(depth=32, embed_dim=1280, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
        "SAM ViT-H image encoder (1280-d, 16 heads), embeddings + last global-attention q/k/v",
    ),
)
_BY_NAME = {v.name: v for v in VARIANTS}


def sam_variant(name: str) -> SamVariant:
    """The registered variant called ``name`` (``OvssError`` listing the names otherwise)."""
    if name not in _BY_NAME:
        raise OvssError(f"'{name}' is not a SAM model; choose from {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def sam_config(variant: SamVariant, arch_overrides: Mapping | None = None) -> SamConfig:
    """The variant's official config with ``arch_overrides`` (``SamConfig`` field names) applied.

    Raises:
        ValueError: an unknown key, or a config that does not fit together.
    """
    overrides = dict(arch_overrides or {})
    known = {f.name for f in fields(SamConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown SAM arch_overrides {unknown}; allowed keys: {', '.join(sorted(known))}"
        )
    if "global_attn_indexes" in overrides:
        overrides["global_attn_indexes"] = tuple(int(i) for i in overrides["global_attn_indexes"])
    config = replace(variant.config, **overrides)
    config.validate()
    return config


# --------------------------------------------------------------------------------------------
# Building the real segment_anything modules
# --------------------------------------------------------------------------------------------


def _segment_anything():
    try:
        import segment_anything
    except ImportError as exc:
        raise OvssError(
            "SAM models need the segment-anything package: pip install 'ovss[sam]'"
        ) from exc
    return segment_anything


class _NoImageEncoder(torch.nn.Module):
    """Stands in for ``ImageEncoderViT`` in a decoder-only ``Sam`` (see ``load_sam_decoder``).

    It carries ``img_size`` (read by ``SamPredictor`` and ``Sam.postprocess_masks``), holds no
    weights, and refuses to run.
    """

    def __init__(self, img_size: int):
        super().__init__()
        self.img_size = img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise OvssError(
            "this Sam was built without its image encoder (load_sam_decoder): set a cached "
            "embedding with CachedSamPredictor.set_cached instead of set_image"
        )


def _image_encoder(config: SamConfig) -> torch.nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(
        depth=config.depth,
        embed_dim=config.embed_dim,
        img_size=config.img_size,
        mlp_ratio=config.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=config.num_heads,
        patch_size=config.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=config.global_attn_indexes,
        window_size=config.window_size,
        out_chans=config.out_chans,
    )


def _prompt_encoder(config: SamConfig) -> torch.nn.Module:
    from segment_anything.modeling import PromptEncoder

    s = config.embedding_size
    return PromptEncoder(
        embed_dim=config.out_chans,
        image_embedding_size=(s, s),
        input_image_size=(config.img_size, config.img_size),
        mask_in_chans=config.mask_in_chans,
    )


def _mask_decoder(config: SamConfig) -> torch.nn.Module:
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.out_chans,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_num_heads,
        ),
        transformer_dim=config.out_chans,
        iou_head_depth=3,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )


def build_sam_model(config: SamConfig, seed: int = 0, with_image_encoder: bool = True) -> Sam:
    """The real ``segment_anything.modeling.Sam`` for ``config``, seeded, in eval mode.

    Each part (image encoder, prompt encoder, mask decoder) is initialised under
    ``torch.manual_seed(seed)`` of its own, so a decoder-only build draws the same decoder
    weights as a full one. The encoder's absolute position embedding and relative-position
    tables, which segment_anything initialises to zero, are drawn from a truncated normal
    (std 0.02, ViTDet's non-zero option) [ours], so random-init models have position-dependent
    attention. The global RNG is left untouched.

    Args:
        config: the architecture.
        seed: seed of the random initialisation (irrelevant when a checkpoint is loaded next).
        with_image_encoder: ``False`` puts a weightless placeholder (``img_size`` only) in place
            of ``ImageEncoderViT``: for prompt decoding from cached embeddings.
    """
    _segment_anything()
    from segment_anything.modeling import Sam

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if with_image_encoder:
            encoder = _image_encoder(config)
            for name, param in encoder.named_parameters():
                if name == "pos_embed" or name.endswith(("rel_pos_h", "rel_pos_w")):
                    torch.nn.init.trunc_normal_(param, std=0.02)
        else:
            encoder = _NoImageEncoder(config.img_size)
        torch.manual_seed(seed)
        prompt_encoder = _prompt_encoder(config)
        torch.manual_seed(seed)
        mask_decoder = _mask_decoder(config)
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam.eval()


# --------------------------------------------------------------------------------------------
# SAM's global attention, from its factors
# --------------------------------------------------------------------------------------------


def attention_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    q_grid: tuple[int, int],
    k_grid: tuple[int, int],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Pre-softmax logits of SAM's global attention between two top-left sub-grids of tokens.

    The block works on an ``S x S`` token grid; queries are the tokens of its top-left
    ``q_grid = (qh, qw)`` sub-grid and keys those of ``k_grid = (kh, kw)`` (row-major each).
    The terms are those of segment_anything's ``Attention.forward`` with
    ``add_decomposed_rel_pos``: ``(q * scale) . k + q . R_h[y_q - y_k] + q . R_w[x_q - x_k]``
    with ``R[d] = rel_pos[d + S - 1]`` (the tables belong to the block's own ``S x S`` grid, so
    they are indexed, never interpolated), added in the library's order.

    Args:
        q: ``(qh*qw, H, hd)`` unscaled queries.
        k: ``(kh*kw, H, hd)`` keys.
        q_grid: ``(qh, qw)``, at most ``(S, S)``.
        k_grid: ``(kh, kw)``, at most ``(S, S)``.
        rel_pos_h: ``(2S - 1, hd)`` height table of the block.
        rel_pos_w: ``(2S - 1, hd)`` width table of the block.
        scale: ``hd ** -0.5``.

    Returns:
        ``(H, qh*qw, kh*kw)`` logits in ``q``'s dtype.
    """
    qh, qw = q_grid
    kh, kw = k_grid
    span_h, span_w = (rel_pos_h.shape[0] + 1) // 2, (rel_pos_w.shape[0] + 1) // 2
    if max(qh, kh) > span_h or max(qw, kw) > span_w:
        raise ValueError(f"grids {q_grid}/{k_grid} exceed the block's {span_h}x{span_w} grid")
    if q.shape[0] != qh * qw or k.shape[0] != kh * kw:
        raise ValueError(
            f"{q.shape[0]} queries / {k.shape[0]} keys do not fill grids {q_grid} / {k_grid}"
        )
    device, dtype = q.device, q.dtype
    dy = torch.arange(qh, device=device)[:, None] - torch.arange(kh, device=device)[None, :]
    dx = torch.arange(qw, device=device)[:, None] - torch.arange(kw, device=device)[None, :]
    table_h = rel_pos_h.to(device, dtype)[dy + span_h - 1]  # (qh, kh, hd)
    table_w = rel_pos_w.to(device, dtype)[dx + span_w - 1]  # (qw, kw, hd)
    heads = q.shape[1]
    qt = q.permute(1, 0, 2)  # (H, nq, hd)
    logits = (qt * scale) @ k.to(dtype).permute(1, 2, 0)  # (H, nq, nk)
    q_grid_t = qt.reshape(heads, qh, qw, -1)
    rel_h = torch.einsum("nyxc,ykc->nyxk", q_grid_t, table_h)  # (H, qh, qw, kh)
    rel_w = torch.einsum("nyxc,xkc->nyxk", q_grid_t, table_w)  # (H, qh, qw, kw)
    logits = logits.view(heads, qh, qw, kh, kw) + rel_h[..., None] + rel_w[..., None, :]
    return logits.view(heads, qh * qw, kh * kw)


def valid_token_grid(input_size: tuple[int, int], patch_size: int = 16) -> tuple[int, int]:
    """Tokens that see image pixels: ``ceil(h / p) x ceil(w / p)`` for a resized ``(h, w)``."""
    h, w = input_size
    return -(-h // patch_size), -(-w // patch_size)


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------


class SamBackbone(Backbone):
    """A SAM image encoder that returns the embedding and its last global-attention factors.

    Outputs of ``forward_dense`` for a batch ``(B, 3, img, img)`` (see the module docstring for
    the meaning; ``N`` = the largest ``gh*gw`` of the batch, rows past a sample's own
    ``gh*gw`` are zero):

    - ``embedding``: ``(B, C, S, S)``;
    - ``q``, ``k``, ``v``: ``(B, N, H, hd)``;
    - ``attn_log_mass``: ``(B, N, H)`` (float32 arithmetic, whatever the autocast);
    - ``layer{i}``: ``(B, N, D)`` for each requested block.

    ``self.model`` is the whole real ``Sam`` (the prompt encoder and mask decoder ride along,
    ~4M parameters, so ``SamPredictor(backbone.model)`` works).
    """

    def __init__(self, model: Sam, config: SamConfig, info: BackboneInfo, layers: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.config = config
        self.info = info
        self.layers = layers
        self.attn_block = config.attn_block
        self._mean = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(SAM_PIXEL_STD, dtype=torch.float32).view(3, 1, 1)

    # -- specs -------------------------------------------------------------------------------
    def tensor_specs(self) -> list[TensorSpec]:
        c, s = self.config.out_chans, self.config.embedding_size
        h, hd = self.config.num_heads, self.config.head_dim
        b = self.attn_block
        specs = [
            TensorSpec("embedding", "window", (c, s, s), "neck output (SamPredictor.features)"),
            TensorSpec("q", "token", (h, hd), f"block {b} queries per head (unscaled)"),
            TensorSpec("k", "token", (h, hd), f"block {b} keys per head"),
            TensorSpec("v", "token", (h, hd), f"block {b} values per head"),
            TensorSpec(
                "attn_log_mass",
                "token",
                (h,),
                f"block {b} log attention mass on valid keys (softmax over all {s}x{s})",
            ),
        ]
        for i in self.layers:
            specs.append(
                TensorSpec(f"layer{i}", "token", (self.config.embed_dim,), f"block {i} output")
            )
        return specs

    def static_tensors(self) -> dict[str, np.ndarray]:
        """The cached block's relative-position tables ``(2S - 1, hd)`` (float32), its scale
        ``(1,)`` (float64, the Python float the block multiplies by) and the patch size."""
        attn = self.model.image_encoder.blocks[self.attn_block].attn
        return {
            "rel_pos_h": attn.rel_pos_h.detach().float().cpu().numpy().copy(),
            "rel_pos_w": attn.rel_pos_w.detach().float().cpu().numpy().copy(),
            "scale": np.array([attn.scale], dtype=np.float64),
            "patch_size": np.array([self.config.patch_size], dtype=np.int64),
        }

    # -- geometry and preprocessing ----------------------------------------------------------
    def geometry(self, protocol: Protocol, height: int, width: int) -> ImageGeometry:
        """SamPredictor's input geometry.

        ``Protocol(resize="long", size=img_size)``: one window, the resized image ``(h, w)``
        (longer side = ``img_size``, SAM's rounding, at least 1 px) padded at the bottom/right
        to ``img_size``; grid ``ceil(h/p) x ceil(w/p)``.

        ``Protocol(resize="halves", size=img_size)`` (Trident's Cityscapes rule): two windows,
        the left half (columns ``[0, W // 2)``) and the right half (``[W // 2, W)``), each
        exactly a SamPredictor input of its own (its own ``ResizeLongestSide`` to
        ``img_size``, bottom/right padding, ``ceil`` grid). The "resized image" is the two
        resized halves side by side (``Protocol.halves_layout``): the left window's box is
        ``(0, 0, h_l, w_l)``, the right one's ``(0, w_l, h_r, w_l + w_r)``, so each box's
        extent is that half's SamPredictor ``input_size``.

        With ``align`` both rules start from the rounded image ``(H', W') =
        protocol.rounded_size(H, W)`` (``W`` above is then ``W'``), recorded as
        ``geometry.rounded``; ``geometry.original`` is ``(H, W)``.

        Raises:
            OvssError: any other protocol, or a ``halves`` image narrower than 2 px.
        """
        img = self.config.img_size
        if (
            protocol.resize not in ("long", "halves")
            or protocol.size != img
            or protocol.crop
            or protocol.pad_multiple
        ):
            raise OvssError(
                f"{self.info.name} takes SamPredictor's input only: the protocol must be "
                f"Protocol(resize='long', size={img}) (--resize long --size {img}, no crop or "
                f"padding options; --align N rounds the image up to multiples of N first) or "
                f"its two-halves form Protocol(resize='halves', size={img}), not "
                f"{protocol.key()}"
            )
        src_h, src_w = protocol.rounded_size(height, width)
        if protocol.resize == "halves":
            if src_w < 2:
                raise OvssError(f"a {height}x{width} image has no left and right halves for SAM")
            sizes = [(rh, rw) for _, _, rh, rw in protocol.halves_layout(height, width)]
        else:
            # ResizeLongestSide.get_preprocess_shape's rule (``tests/test_sam.py`` checks it)
            sizes = [protocol.resized_size(height, width)]
        windows, x0 = [], 0
        for rh, rw in sizes:
            windows.append(
                WindowGeometry(
                    box=(0, x0, rh, x0 + rw),
                    pad=(0, 0, img - rh, img - rw),
                    grid=valid_token_grid((rh, rw), self.config.patch_size),
                )
            )
            x0 += rw
        resized = (max(rh for rh, _ in sizes), x0)
        rounded = (src_h, src_w) if (src_h, src_w) != (height, width) else None
        return ImageGeometry(
            original=(height, width), resized=resized, windows=windows, rounded=rounded
        )

    def preprocess(self, image: np.ndarray, geometry: ImageGeometry) -> list[torch.Tensor]:
        """``(H, W, 3)`` uint8 RGB -> per window ``(3, img, img)`` float32, as
        ``SamPredictor.set_image`` on that window's image (the whole image, or the left/right
        half): PIL bilinear resize via torchvision, ``(x - mean) / std``, zero pad bottom/right.
        With ``geometry.rounded`` the image is first resized to it as ``cv2.resize`` does
        (``INTER_LINEAR``), and that rounded image is the one split and given to SAM."""
        from torchvision.transforms.functional import resize, to_pil_image

        if geometry.rounded is not None:
            from featurestore.resize import resize_linear_u8

            image = resize_linear_u8(np.ascontiguousarray(image), *geometry.rounded)
        width = image.shape[1]
        if len(geometry.windows) == 2:
            sources = half_columns(width)
        else:
            sources = [(0, width)]
        img = self.config.img_size
        out = []
        for (x1, x2), win in zip(sources, geometry.windows, strict=True):
            y1b, x1b, y2b, x2b = win.box
            rh, rw = y2b - y1b, x2b - x1b
            part = np.ascontiguousarray(image[:, x1:x2])
            resized = np.array(resize(to_pil_image(part), [rh, rw]))
            x = torch.from_numpy(resized).permute(2, 0, 1).float()
            x = (x - self._mean) / self._std
            out.append(F.pad(x, (0, img - rw, 0, img - rh)).contiguous())
        return out

    # -- forward -----------------------------------------------------------------------------
    def forward_dense(
        self, x: torch.Tensor, grids: list[tuple[int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the encoder on ``(B, 3, img, img)`` inputs from ``preprocess``.

        The encoder runs one image at a time, as ``SamPredictor.set_image`` does, so in float32
        (no autocast: ``--precision fp32``) the cached tensors are bit-identical to what the
        library computes for that image (a batched forward changes float rounding, ~2e-6 on the
        tiny test model on the CPU; at 4096 tokens per image one image already fills the
        hardware).

        Args:
            x: the batch.
            grids: per sample its valid grid ``(gh, gw)``; ``None`` means the whole ``S x S``.

        Returns:
            The dict described in the class docstring (inference tensors, model dtype/device).
        """
        b = self._check_input(x)
        s = self.config.embedding_size
        grids = [(s, s)] * b if grids is None else [tuple(g) for g in grids]
        if len(grids) != b or any(not (0 < gh <= s and 0 < gw <= s) for gh, gw in grids):
            raise ValueError(f"need {b} grids within {s}x{s}, got {grids}")
        n_max = max(gh * gw for gh, gw in grids)
        with torch.inference_mode():
            samples = [self._encode_one(x[j : j + 1], grid) for j, grid in enumerate(grids)]
            out = {"embedding": torch.cat([one["embedding"] for one in samples])}
            for key in samples[0]:
                if key == "embedding":
                    continue
                first = samples[0][key]
                batch = first.new_zeros((b, n_max, *first.shape[1:]))
                for j, one in enumerate(samples):
                    batch[j, : one[key].shape[0]] = one[key]
                out[key] = batch
        return out

    def _encode_one(self, x: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """One ``(1, 3, img, img)`` input -> ``embedding (1, C, S, S)`` and the valid-token rows
        ``(gh*gw, ...)`` of ``q``/``k``/``v``/``attn_log_mass``/``layer{i}``."""
        encoder = self.model.image_encoder
        attn = encoder.blocks[self.attn_block].attn
        captured: dict[str, torch.Tensor] = {}

        def keep(key: str) -> Callable:
            def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                captured[key] = output

            return hook

        hooks = [attn.qkv.register_forward_hook(keep("qkv"))]
        hooks += [encoder.blocks[i].register_forward_hook(keep(f"layer{i}")) for i in self.layers]
        try:
            embedding = encoder(x)
        finally:
            for handle in hooks:
                handle.remove()

        s, heads, hd = self.config.embedding_size, self.config.num_heads, self.config.head_dim
        rows = top_left_rows(grid, s, x.device)
        # (1, S, S, 3D) -> q, k, v of shape (S*S, H, hd), as Attention.forward splits them.
        q, k, v = captured["qkv"].reshape(s * s, 3, heads, hd).unbind(1)
        out = {"embedding": embedding, "q": q[rows], "k": k[rows], "v": v[rows]}
        for i in self.layers:
            out[f"layer{i}"] = captured[f"layer{i}"].reshape(s * s, -1)[rows]
        rel_h, rel_w = attn.rel_pos_h.detach().float(), attn.rel_pos_w.detach().float()
        log_mass = torch.empty((rows.numel(), heads), dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            q_valid, k_all = out["q"].float(), k.float()
            for h in range(heads):  # one (n, S*S) logit matrix at a time
                logits = attention_logits(
                    q_valid[:, h : h + 1],
                    k_all[:, h : h + 1],
                    grid,
                    (s, s),
                    rel_h,
                    rel_w,
                    attn.scale,
                )[0]
                mass = torch.logsumexp(logits[:, rows], -1) - torch.logsumexp(logits, -1)
                log_mass[:, h] = mass.clamp(max=0.0)
        out["attn_log_mass"] = log_mass
        return {key: t.contiguous() for key, t in out.items()}

    def _check_input(self, x: torch.Tensor) -> int:
        img = self.config.img_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, img, img):
            raise ValueError(f"expected a (B, 3, {img}, {img}) batch, got {tuple(x.shape)}")
        return int(x.shape[0])


def top_left_rows(
    sub_grid: tuple[int, int], width: int, device: str | torch.device | None = None
) -> torch.Tensor:
    """Row-major indices ``(sh*sw,)`` of the top-left ``sub_grid = (sh, sw)`` tokens in the
    token rows of a grid ``width`` tokens wide (row-major): the valid tokens inside the encoder's
    ``S x S`` grid, or Trident's floor grid inside the cached ``ceil`` grid. The one rule of
    this crop (``methods.sam_cache.crop_token_rows``, ``methods.sam_affinity``)."""
    sh, sw = sub_grid
    ys = torch.arange(sh, device=device)[:, None]
    xs = torch.arange(sw, device=device)[None, :]
    return (ys * width + xs).reshape(-1)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def weights_spec(variant: SamVariant) -> WeightsSpec:
    """Where the release checkpoint of ``variant`` may be found ($OVSS_WEIGHTS, torch.hub)."""
    return WeightsSpec(
        candidates=[variant.checkpoint],
        hub_id=None,
        torch_hub_file=variant.checkpoint,
        url_hint=CHECKPOINT_URL + variant.checkpoint,
        model=variant.name,
    )


def _load_checkpoint(
    model: Sam, path: os.PathLike, variant: SamVariant, config: SamConfig, decoder_only: bool
) -> None:
    """Load Meta's flat ``Sam`` state dict strictly; a decoder-only model still checks that the
    file's image-encoder tensors fit ``config`` (the decoders of B/L/H have the same shapes)."""
    state = load_state_dict(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if decoder_only:
        with torch.device("meta"):
            encoder = _image_encoder(config)
        expected.update(
            {f"image_encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        problems = [
            f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong),
            )
            if keys
        ]
        raise OvssError(
            f"{path} does not fit {variant.name} ({variant.arch}): {'; '.join(problems)}"
        )
    if decoder_only:
        state = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}
    model.load_state_dict(state, strict=True)


def _build(
    variant: SamVariant,
    weights: str | os.PathLike | None,
    random_init: bool,
    seed: int,
    arch_overrides: Mapping | None,
    decoder_only: bool,
) -> tuple[Sam, SamConfig, str, str | None]:
    if random_init and weights is not None:
        raise OvssError("--weights and --random-init exclude each other; pass only one")
    config = sam_config(variant, arch_overrides)
    model = build_sam_model(config, seed=seed, with_image_encoder=not decoder_only)
    if random_init:
        return model, config, f"random-init:{seed}", None
    path = resolve_weights(weights_spec(variant), weights)
    _load_checkpoint(model, path, variant, config, decoder_only)
    return model.eval(), config, sha256_file(path), str(path)


def build_sam(
    variant: SamVariant,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    layers: Sequence[int] = (),
    arch_overrides: Mapping | None = None,
    pos_interp: str | None = None,
) -> SamBackbone:
    """Build ``variant`` with its release checkpoint or a seeded random initialisation.

    Args:
        variant: which model (one of ``VARIANTS``).
        weights: checkpoint path (Meta's ``.pth``); ``None`` resolves ``variant.checkpoint``
            through ``featurestore.weights.resolve_weights`` ($OVSS_WEIGHTS, then
            ``torch.hub.get_dir()/checkpoints``, where ``torch.hub`` downloads land).
        random_init: skip weights; initialise under ``seed`` (see ``build_sam_model``); the
            weights identity becomes ``random-init:<seed>``.
        seed: seed of the random initialisation.
        layers: encoder blocks whose outputs to cache as ``layer{i}`` (negative counts from the
            end); stored sorted and non-negative in ``info.extra["layers"]``.
        arch_overrides: ``SamConfig`` fields to change (tiny test models of the same classes);
            recorded in ``info.extra``.
        pos_interp: accepted for a uniform call (``extract --pos-interp`` over several models)
            and not recorded: SAM always runs at its native ``img_size`` grid, where every
            position-embedding rule is the identity.

    Raises:
        OvssError: both ``weights`` and ``random_init``, a layer out of range, weights missing
            (``WeightsNotFoundError`` naming the file) or not fitting the architecture.
        ValueError: bad ``arch_overrides``.
    """
    del pos_interp  # the identity at SAM's one grid (docstring)
    model, config, identity, path = _build(
        variant, weights, random_init, seed, arch_overrides, decoder_only=False
    )
    block_indices = _normalise_layers(layers, config.depth, variant.name)
    info = BackboneInfo(
        name=variant.name,
        family="sam",
        patch_size=config.patch_size,
        mean=_unit_range(SAM_PIXEL_MEAN),
        std=_unit_range(SAM_PIXEL_STD),
        weights=identity,
        weights_path=path,
        library=_library_versions(),
        arch=variant.arch,
        extra={
            "img_size": config.img_size,
            "embedding_size": config.embedding_size,
            "embed_dim": config.embed_dim,
            "depth": config.depth,
            "heads": config.num_heads,
            "head_dim": config.head_dim,
            "attn_block": config.attn_block,
            "global_attn_indexes": list(config.global_attn_indexes),
            "pixel_mean": list(SAM_PIXEL_MEAN),
            "pixel_std": list(SAM_PIXEL_STD),
            "valid_grid": "ceil(resized / patch_size)",
            "layers": list(block_indices),
            "config": _jsonable(asdict(config)),
            "arch_overrides": _jsonable(dict(arch_overrides or {})),
        },
    )
    return SamBackbone(model, config, info, block_indices)


def load_sam_decoder(
    name: str,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    arch_overrides: Mapping | None = None,
) -> Sam:
    """The prompt encoder and mask decoder of ``name`` in a ``Sam`` without its image encoder.

    Same weights resolution, seeding and ``arch_overrides`` as the backbone builders, so the
    result decodes prompts on embeddings cached by ``create_backbone(name, ...)``. The image
    encoder is a weightless placeholder carrying ``img_size``; the checkpoint's encoder tensors
    are checked against the architecture, then dropped. Works with ``SamPredictor``-style code
    through ``methods.sam_cache.CachedSamPredictor``.

    Raises:
        OvssError: as ``build_sam`` (``WeightsNotFoundError`` names the missing file).
    """
    model, _config, _identity, _path = _build(
        sam_variant(name), weights, random_init, seed, arch_overrides, decoder_only=True
    )
    return model


def decoder_weights_identity(
    name: str, weights: str | os.PathLike | None = None
) -> tuple[str, str]:
    """``("sha256:<hex>", path)`` of the checkpoint ``load_sam_decoder(name, weights)`` reads."""
    path = resolve_weights(weights_spec(sam_variant(name)), weights)
    return sha256_file(path), str(path)


def _normalise_layers(layers: Sequence[int], depth: int, name: str) -> tuple[int, ...]:
    out = set()
    for i in layers:
        if not -depth <= i < depth:
            raise OvssError(f"layer {i} does not exist in {name}; it has blocks 0..{depth - 1}")
        out.add(i % depth)
    return tuple(sorted(out))


def _unit_range(values: tuple[float, float, float]) -> tuple[float, float, float]:
    """SAM's 0..255 statistics in the 0..1 units of ``BackboneInfo`` (ImageNet's numbers)."""
    a, b, c = (round(v / 255.0, 6) for v in values)
    return a, b, c


def _library_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    try:
        versions["segment_anything"] = importlib.metadata.version("segment_anything")
    except importlib.metadata.PackageNotFoundError:
        versions["segment_anything"] = "unknown"
    return versions


def _jsonable(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


# The smallest SAM of the real classes (a 2-block 64-wide encoder on 256 px, tiny decoder).
TINY_ARCH = {
    "depth": 2,
    "embed_dim": 64,
    "num_heads": 2,
    "global_attn_indexes": (1,),
    "window_size": 4,
    "img_size": 256,
    "out_chans": 32,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
    "mask_in_chans": 8,
}

register_variants(
    VARIANTS,
    build_sam,
    doc=lambda v: f"{v.doc}; segment_anything {v.arch}",
    tiny=TINY_ARCH,
)
