"""CLIP dense features from the cached last-block inputs (``spec/METHODS.md`` §0.5 and §3).

A CLIP feature set (``featurestore.backbones.clip``) stores, per window, the tokens entering the
last visual block (``pre_last`` (N, D) and ``pre_last_cls`` (D,)) and, once per set, that block's
parameters with ``ln_post`` and ``proj``. ``LastBlock`` rebuilds the block from those arrays;
the functions below compute the published last-block variants from it, without the backbone:

- ``maskclip_dense``: ``y = ln_1(x); v = W_v y + b_v; o = out_proj(v) + x;
  o = o + MLP(ln_2(o))``, then ``ln_post(o) @ proj`` (MaskCLIP's own code, CLIP-DINOiser);
  CLS dropped;
- ``bare_value_dense``: ``o = out_proj(v)``, then ``ln_post(o) @ proj`` (ClearCLIP-style;
  FMbSeg's default);
- ``pixelclip_dense``: ``t = out_proj(v) + x_CLS; t = t + MLP(ln_2(t))``, then
  ``ln_post(t) @ proj``;
- ``value_tokens``: ``v`` per head ``(heads, N, hd)``; ProxyCLIP/Trident replace the attention
  weights ``A`` and finish with ``attention_output(A, v, block)`` = ``out_proj(A @ v)``, then
  ``block.project``.

Shapes: ``D`` transformer width, ``E`` embedding size, ``N`` patch tokens (no CLS). Every
function takes ``tokens`` as ``(N, D)`` or ``(B, N, D)`` (torch or numpy, any float dtype; the
computation runs in the block's dtype, float32 by default) and returns ``(N, E)`` or
``(B, N, E)``. Outputs are not L2-normalised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.backbones.clip import STATIC_NAMES
from featurestore.errors import MissingFeatureSetError, StoreError

if TYPE_CHECKING:
    from open_clip.transformer import VisionTransformer

    from featurestore.store import FeatureSet

__all__ = [
    "LastBlock",
    "attention_output",
    "bare_value_dense",
    "maskclip_dense",
    "pixelclip_dense",
    "value_tokens",
]

ACTIVATIONS = ("quick_gelu", "gelu")
ArrayLike = torch.Tensor | np.ndarray


@dataclass
class LastBlock:
    """CLIP's last visual block, ``ln_post`` and ``proj`` as plain tensors.

    Field names follow open_clip's parameters (``visual.transformer.resblocks[-1].<name>``,
    ``visual.ln_post``, ``visual.proj``); ``M`` is the MLP width (4 D).

    Attributes:
        ln_1_weight, ln_1_bias: ``(D,)``.
        in_proj_weight: ``(3D, D)`` stacked q, k, v projections; ``in_proj_bias`` ``(3D,)``.
        out_proj_weight: ``(D, D)``; ``out_proj_bias`` ``(D,)``.
        ln_2_weight, ln_2_bias: ``(D,)``.
        c_fc_weight: ``(M, D)``; ``c_fc_bias`` ``(M,)``.
        c_proj_weight: ``(D, M)``; ``c_proj_bias`` ``(D,)``.
        ln_post_weight, ln_post_bias: ``(D,)``.
        proj: ``(D, E)``.
        num_heads: attention heads of the block.
        activation: ``quick_gelu`` (OpenAI weights) or ``gelu`` (exact erf GELU).
        eps: LayerNorm epsilon (open_clip: 1e-5).
    """

    ln_1_weight: torch.Tensor
    ln_1_bias: torch.Tensor
    in_proj_weight: torch.Tensor
    in_proj_bias: torch.Tensor
    out_proj_weight: torch.Tensor
    out_proj_bias: torch.Tensor
    ln_2_weight: torch.Tensor
    ln_2_bias: torch.Tensor
    c_fc_weight: torch.Tensor
    c_fc_bias: torch.Tensor
    c_proj_weight: torch.Tensor
    c_proj_bias: torch.Tensor
    ln_post_weight: torch.Tensor
    ln_post_bias: torch.Tensor
    proj: torch.Tensor
    num_heads: int
    activation: str
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, not {self.activation!r}")
        d = self.width
        if self.in_proj_weight.shape != (3 * d, d) or self.proj.shape[0] != d:
            raise ValueError(
                f"inconsistent last block: in_proj {tuple(self.in_proj_weight.shape)}, "
                f"proj {tuple(self.proj.shape)}, width {d}"
            )
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by {self.num_heads} heads")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_static(
        cls,
        arrays: Mapping[str, ArrayLike],
        num_heads: int,
        activation: str,
        eps: float = 1e-5,
        dtype: torch.dtype = torch.float32,
    ) -> LastBlock:
        """From the arrays named in ``featurestore.backbones.clip.STATIC_NAMES``
        (``last_block.ln_1.weight``, ..., ``ln_post.bias``, ``proj``), e.g. a backbone's
        ``static_tensors()``."""
        missing = [n for n in STATIC_NAMES if n not in arrays]
        if missing:
            raise KeyError(f"CLIP last-block arrays missing: {', '.join(missing)}")
        tensors = {
            _field_name(n): torch.as_tensor(np.asarray(arrays[n])).to(dtype) for n in STATIC_NAMES
        }
        return cls(**tensors, num_heads=int(num_heads), activation=activation, eps=float(eps))

    @classmethod
    def from_feature_set(cls, fs: FeatureSet, dtype: torch.dtype = torch.float32) -> LastBlock:
        """From a CLIP feature set's static arrays and provenance (heads, activation, eps).

        Raises:
            MissingFeatureSetError: the set was not made by a CLIP backbone (a
                ProvenanceMismatchError).
            StoreError: its last-block arrays are missing.
        """
        backbone = fs.provenance.get("backbone", {})
        if backbone.get("family") != "clip":
            raise MissingFeatureSetError(
                f"feature set '{fs.key}' was made by {backbone.get('name', '?')}, not a CLIP "
                "model; CLIP features are needed",
                store=fs.store.path,
                model="clip-b16",
                protocol=fs.protocol,
                role="clip",
            )
        have = set(fs.static_names())
        missing = [n for n in STATIC_NAMES if n not in have]
        if missing:
            raise StoreError(
                f"feature set '{fs.key}' lacks CLIP's last-block arrays ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}); re-extract it with --overwrite"
            )
        extra = backbone.get("extra", {})
        return cls.from_static(
            {n: fs.static(n) for n in STATIC_NAMES},
            num_heads=extra["num_heads"],
            activation=extra["activation"],
            eps=extra.get("ln_eps", 1e-5),
            dtype=dtype,
        )

    @classmethod
    def from_visual(
        cls, visual: VisionTransformer, dtype: torch.dtype = torch.float32
    ) -> LastBlock:
        """From an open_clip ``VisionTransformer`` (a live model, e.g. to compare with pixels)."""
        from open_clip.transformer import QuickGELU

        block = visual.transformer.resblocks[-1]
        arrays = {f"last_block.{n}": p.detach() for n, p in block.named_parameters()}
        arrays |= {
            "ln_post.weight": visual.ln_post.weight.detach(),
            "ln_post.bias": visual.ln_post.bias.detach(),
            "proj": visual.proj.detach(),
        }
        activation = "quick_gelu" if isinstance(block.mlp.gelu, QuickGELU) else "gelu"
        tensors = {_field_name(n): arrays[n].to(dtype) for n in STATIC_NAMES}
        return cls(
            **tensors,
            num_heads=int(block.attn.num_heads),
            activation=activation,
            eps=float(block.ln_1.eps),
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LastBlock:
        """A copy with every tensor moved/cast (``LastBlock``)."""
        moved = {
            f.name: getattr(self, f.name).to(device=device, dtype=dtype)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return LastBlock(
            **moved, num_heads=self.num_heads, activation=self.activation, eps=self.eps
        )

    # -- facts -------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """``D``."""
        return int(self.ln_1_weight.shape[0])

    @property
    def embed_dim(self) -> int:
        """``E``."""
        return int(self.proj.shape[1])

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.dtype

    @property
    def device(self) -> torch.device:
        return self.proj.device

    # -- pieces (all act on the last axis; any leading shape) --------------------------------
    def ln_1(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.width,), self.ln_1_weight, self.ln_1_bias, self.eps)

    def ln_2(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.width,), self.ln_2_weight, self.ln_2_bias, self.eps)

    def ln_post(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.width,), self.ln_post_weight, self.ln_post_bias, self.eps)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., N, D)`` block inputs -> ``(..., N, D)`` values ``W_v ln_1(x) + b_v``."""
        d = self.width
        return F.linear(self.ln_1(x), self.in_proj_weight[2 * d :], self.in_proj_bias[2 * d :])

    def out_proj(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> ``(..., D)``: the attention's output projection."""
        return F.linear(x, self.out_proj_weight, self.out_proj_bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> ``(..., D)``: ``c_proj(act(c_fc(x)))`` (no LayerNorm, no residual)."""
        h = F.linear(x, self.c_fc_weight, self.c_fc_bias)
        h = h * torch.sigmoid(1.702 * h) if self.activation == "quick_gelu" else F.gelu(h)
        return F.linear(h, self.c_proj_weight, self.c_proj_bias)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> ``(..., E)``: ``ln_post(x) @ proj``."""
        return self.ln_post(x) @ self.proj


def maskclip_dense(tokens: ArrayLike, cls: ArrayLike | None, block: LastBlock) -> torch.Tensor:
    """MaskCLIP's value path: ``(N, D)`` or ``(B, N, D)`` -> ``(N, E)`` or ``(B, N, E)``.

    ``y = ln_1(x); v = W_v y + b_v; o = out_proj(v) + x; o = o + MLP(ln_2(o));
    feat = ln_post(o) @ proj``. Every token depends on itself only, so ``cls`` is not used (it
    is accepted so all variants share one signature); no CLS row is returned.
    """
    x = _tokens(tokens, block)
    o = block.out_proj(block.values(x)) + x
    o = o + block.mlp(block.ln_2(o))
    return block.project(o)


def bare_value_dense(tokens: ArrayLike, cls: ArrayLike | None, block: LastBlock) -> torch.Tensor:
    """The bare value path (ClearCLIP-style, FMbSeg's default): ``o = out_proj(W_v ln_1(x) +
    b_v)``, no residual, no MLP, then ``ln_post(o) @ proj``. ``cls`` unused. Shapes as
    ``maskclip_dense``."""
    x = _tokens(tokens, block)
    return block.project(block.out_proj(block.values(x)))


def pixelclip_dense(tokens: ArrayLike, cls: ArrayLike, block: LastBlock) -> torch.Tensor:
    """PixelCLIP's dense block: ``t = out_proj(v) + x_CLS`` (the class token's block input
    broadcast to every token), ``t = t + MLP(ln_2(t))``, then ``ln_post(t) @ proj``.

    Args:
        tokens: ``(N, D)`` or ``(B, N, D)`` patch tokens entering the last block.
        cls: ``(D,)`` or ``(B, D)``: the class token entering the last block (``pre_last_cls``).

    Returns:
        ``(N, E)`` or ``(B, N, E)``.
    """
    x = _tokens(tokens, block)
    c = _tokens(cls, block, name="cls", ndims=(1, 2))
    if c.shape[:-1] != x.shape[:-2]:
        raise ValueError(f"cls {tuple(c.shape)} does not match tokens {tuple(x.shape)}")
    t = block.out_proj(block.values(x)) + c.unsqueeze(-2)
    t = t + block.mlp(block.ln_2(t))
    return block.project(t)


def value_tokens(tokens: ArrayLike, block: LastBlock) -> torch.Tensor:
    """Per-head values of the last block: ``(N, D)`` / ``(B, N, D)`` ->
    ``(heads, N, hd)`` / ``(B, heads, N, hd)``, ``hd = D / heads``.

    With attention weights ``A`` ``(..., heads or 1, N', N)`` from elsewhere (ProxyCLIP's VFM
    affinity, Trident's SAM affinity), ``attention_output(A, v, block)`` is ``out_proj(A @ v)``.
    For ProxyCLIP pass the patch tokens only (CLS dropped before attention).
    """
    x = _tokens(tokens, block)
    v = block.values(x)
    v = v.reshape(*v.shape[:-1], block.num_heads, block.head_dim)
    return v.transpose(-3, -2)


def attention_output(attn: torch.Tensor, values: torch.Tensor, block: LastBlock) -> torch.Tensor:
    """``out_proj(A @ v)`` with the heads merged back.

    Args:
        attn: ``(..., heads or 1, N', N)`` attention weights (rows usually sum to 1).
        values: ``(..., heads, N, hd)`` from ``value_tokens``.

    Returns:
        ``(..., N', D)``; follow with ``block.project`` for ``(..., N', E)`` features (ProxyCLIP:
        no residual, no MLP).
    """
    o = attn.to(values.dtype) @ values  # (..., heads, N', hd)
    o = o.transpose(-3, -2)  # (..., N', heads, hd)
    return block.out_proj(o.reshape(*o.shape[:-2], block.width))


def _tokens(
    a: ArrayLike, block: LastBlock, name: str = "tokens", ndims: tuple[int, ...] = (2, 3)
) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
    if t.ndim not in ndims or t.shape[-1] != block.width:
        raise ValueError(
            f"{name} must have {' or '.join(map(str, ndims))} dims with last size "
            f"{block.width}, got {tuple(t.shape)}"
        )
    return t.to(device=block.device, dtype=block.dtype)


def _field_name(static_name: str) -> str:
    """``last_block.attn.out_proj.weight`` -> ``out_proj_weight`` (a ``LastBlock`` field)."""
    name = static_name.removeprefix("last_block.")
    name = name.removeprefix("attn.").removeprefix("mlp.")
    return name.replace(".", "_")
