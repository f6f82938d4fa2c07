"""PixelCLIP (METHODS.md §5, paper 002): CLIP's image encoder fine-tuned with unlabeled masks.

This module holds the model pieces, the per-step computation, the ``pixelclip:<checkpoint>``
text-encoder kind and the ``pixelclip`` segmenter; mask sources live in
``methods.pixelclip_masks`` and training (``ovss align --method pixelclip``) in
``methods.pixelclip_train``.

Shapes: ``B`` images, ``D`` CLIP width, ``E`` embedding size, ``h × w`` token grid (20 × 20 at
320²), ``k`` learnable classes (64), ``l`` tokens per class (4), ``M`` masks, ``S`` the mask
resolution (256).

- :class:`DenseCLIP`: an open_clip ``VisionTransformer`` run densely. Blocks ``0 .. N-2`` as CLIP
  runs them, the last block with PixelCLIP's dense rule (§0.5; the authors'
  ``ResidualAttentionBlock.forward_dense``): ``t = out_proj(v) + x_CLS``,
  ``t = t + MLP(ln_2(t))``, then ``ln_post(t) @ proj``, CLS dropped. The input is squashed to
  320² and the patch part of the position embedding resampled bicubically by the CLIP backbone's
  rule (``featurestore.backbones.clip.interpolate_pos_embed``, the authors' offset rule), so
  the tokens equal the cached ones of a ``square320`` CLIP feature set. ``trainable_blocks = K``
  freezes the first ``N − K`` blocks (their output can then come from the store).
- :func:`ema_update`: the teacher is an EMA of the student (momentum 0.999), updated *before*
  the teacher's forward pass.
- :class:`PromptedText`: ``k × l`` learnable token embeddings put in place of the ``{}`` of
  ``"A photo of a {} {} {} {} in the scene"`` in the frozen text tower, initialised from the
  token embeddings of seeded random vocabulary ids (the authors: ``randint(vocab_size − 10)``).
- :class:`MaskDecoder`: the light conv decoder (Conv3×3 1→64, ConvTranspose ×2 → 64, two
  Conv-GN-ReLU, ConvTranspose ×2 → 32, two Conv-GN-ReLU, Conv3×3 → 1; 4× upsampling).
- :func:`sinkhorn`: the balanced assignment over all masks of the global batch (row sums and
  the mask count all-reduced across ranks), softmax-initialised, 3 iterations; with one process
  it equals ``methods.cluster.sinkhorn_knopp``.
- :func:`mask_pool`, :func:`prepare_clusters`: per-mask teacher features, ε·cos logits,
  Sinkhorn, hard assignment and the per-cluster targets (union of the image's masks assigned
  to each cluster).
- :func:`mask_loss`: the student's cost map → decoder → bilinear to S² → BCE-with-logits only at
  pixels some mask covers.

[ours] Mask pooling of the teacher features bilinearly upsampled to S² is computed without the
``(B, E, S, S)`` tensor: upsampling is separable and linear, ``up(F) = A_h F A_wᵀ`` with
``A (S, h)``, so ``Σ_p m(p) up(F)(p) = Σ_t (A_hᵀ m A_w)(t) F(t)`` (exact up to rounding;
``tests/test_pixelclip.py`` compares it with the literal computation).

Inference (``segment/eval --method pixelclip --checkpoint CKPT``): the fine-tuned dense features
at 320² → bilinear to 64×64 → cosine with the class text embeddings (the 8 ``pixelclip8``
templates, embedded by the frozen text tower the checkpoint records) → the driver's bilinear
upsampling → argmax; no background class.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from featurestore.errors import OvssError
from featurestore.protocol import Protocol
from methods.base import (
    FeatureRequirement,
    LiveModelRequirement,
    Segmenter,
    Vocab,
    VocabularyDefaults,
    register_method,
)

#: Checkpoint format tag of ``ovss align --method pixelclip``.
CHECKPOINT_FORMAT = "ovss-pixelclip/1"
#: The fixed template of the learnable classes (the authors' ``P*``).
PROMPT_TEMPLATE = "A photo of a {} in the scene"
#: Input side of student, teacher and inference (20 × 20 tokens for ViT-B/16).
CLIP_SIZE = 320
#: Mask resolution of pooling, targets and loss.
MASK_SIZE = 256
#: Feature-map size of the inference cosine (the authors' ``size=(64, 64)``).
EVAL_GRID = 64
DEFAULT_MODEL = "clip-b16"
TEXT_KIND = "pixelclip:"
#: Placeholder of learned class ``N`` in prompts given to the ``pixelclip:`` text encoder.
LEARNED_CLASS = re.compile(r"<class (\d+)>")


def l2n(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, dim=dim)


# --------------------------------------------------------------------------------------------
# The dense image tower (student and teacher)
# --------------------------------------------------------------------------------------------


def attention_param_names(block_index: int) -> tuple[str, ...]:
    """Names (relative to the visual tower) of the q/k/v/out projections of one block."""
    p = f"transformer.resblocks.{block_index}.attn."
    return (
        p + "in_proj_weight",
        p + "in_proj_bias",
        p + "out_proj.weight",
        p + "out_proj.bias",
    )


class DenseCLIP(nn.Module):
    """An open_clip ``VisionTransformer`` run densely with PixelCLIP's last block.

    Args:
        visual: the open_clip image tower (``model.visual``); owned by this module.
        trainable_blocks: ``K``, the number of trained blocks at the end (1 .. N); the first
            ``N − K`` blocks (and the patch embedding, ``ln_pre``) are frozen.
        pos_interp: the position-embedding rule at non-native grids (the backbone's default:
            the authors' offset rule).

    Trained parameters (``requires_grad``): the attention projections (q/k/v in
    ``in_proj_*``, ``out_proj``) of the last ``K`` blocks, and the positional embedding when
    ``K = N`` (a frozen block's input cannot be trained, so it stays fixed otherwise).
    """

    def __init__(self, visual: nn.Module, trainable_blocks: int, pos_interp: str = "offset"):
        super().__init__()
        self.visual = visual
        self.depth = len(visual.transformer.resblocks)
        if not 1 <= trainable_blocks <= self.depth:
            raise OvssError(
                f"pixelclip: trainable_blocks must be in 1..{self.depth} for this CLIP, "
                f"not {trainable_blocks}"
            )
        self.trainable_blocks = int(trainable_blocks)
        self.pos_interp = pos_interp
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.native_grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        for p in self.visual.parameters():
            p.requires_grad_(False)
        for name, p in self.visual.named_parameters():
            if name in self.trained_names():
                p.requires_grad_(True)

    @property
    def first_trained(self) -> int:
        """Index of the first trained block, ``N − K``."""
        return self.depth - self.trainable_blocks

    @property
    def width(self) -> int:
        return int(self.visual.transformer.width)

    @property
    def embed_dim(self) -> int:
        return int(self.visual.proj.shape[1])

    def trained_names(self) -> tuple[str, ...]:
        """Names (relative to ``visual``) of the trained parameters."""
        names: list[str] = []
        for b in range(self.first_trained, self.depth):
            names += attention_param_names(b)
        if self.trainable_blocks == self.depth:
            names.append("positional_embedding")
        return tuple(names)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained parameters (detached CPU copies), by name."""
        params = dict(self.visual.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in self.trained_names()}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.visual.named_parameters())
        missing = [n for n in self.trained_names() if n not in state]
        if missing:
            raise OvssError(f"the checkpoint lacks trained parameters {missing[:3]}")
        with torch.no_grad():
            for n, v in state.items():
                if n not in params or params[n].shape != v.shape:
                    raise OvssError(f"the checkpoint's parameter {n} does not fit this CLIP")
                params[n].copy_(v)

    # -- pieces --------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised pixels -> ``(B, 1 + gh·gw, D)`` tokens entering block 0
        (patch embedding, class token, resampled position embedding, ``ln_pre``)."""
        from featurestore.backbones.clip import interpolate_pos_embed

        v = self.visual
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        t = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(t.dtype).view(1, 1, -1).expand(len(t), 1, -1)
        pos = interpolate_pos_embed(v.positional_embedding, self.native_grid, grid, self.pos_interp)
        t = torch.cat([cls, t], dim=1) + pos.to(t.dtype)
        return v.ln_pre(t)

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start .. stop-1`` (CLIP's own forward) on ``(B, 1 + n, D)`` tokens."""
        for block in self.visual.transformer.resblocks[start:stop]:
            tokens = block(tokens)
        return tokens

    def dense_last(self, tokens: torch.Tensor) -> torch.Tensor:
        """PixelCLIP's last block on ``(B, 1 + n, D)`` tokens -> ``(B, n, E)`` features.

        ``t = out_proj(W_v ln_1(x) + b_v) + x_CLS; t = t + MLP(ln_2(t)); ln_post(t) @ proj``
        (the class token's input broadcast to every token; the authors' ``forward_dense``)."""
        block = self.visual.transformer.resblocks[-1]
        d = self.width
        attn = block.attn
        y = block.ln_1(tokens)
        v = F.linear(y, attn.in_proj_weight[2 * d :], attn.in_proj_bias[2 * d :])
        t = attn.out_proj(v) + tokens[:, :1]
        t = t + block.mlp(block.ln_2(t))
        t = self.visual.ln_post(t) @ self.visual.proj
        return t[:, 1:]

    def frozen_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> the tokens entering the first trained block (no gradients when a block
        is frozen before them; with ``K = N`` the embedding itself carries the trained position
        embedding)."""
        if self.first_trained == 0:
            return self.embed(x)
        with torch.no_grad():
            return self.run_blocks(self.embed(x), 0, self.first_trained)

    def from_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens entering block ``N − K`` ``(B, 1 + gh·gw, D)`` -> ``(B, gh, gw, E)``."""
        t = self.run_blocks(tokens, self.first_trained, self.depth - 1)
        out = self.dense_last(t)
        return out.reshape(len(out), grid[0], grid[1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised pixels -> ``(B, H/p, W/p, E)`` dense features."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return self.from_tokens(self.frozen_tokens(x), grid)


@torch.no_grad()
def ema_update(teacher: DenseCLIP, student: DenseCLIP, momentum: float) -> None:
    """``θ_teacher ← m θ_teacher + (1 − m) θ_student`` over the trained parameters (the frozen
    ones are equal in both). Called before the teacher's forward pass of every step."""
    t = dict(teacher.visual.named_parameters())
    s = dict(student.visual.named_parameters())
    for n in student.trained_names():
        t[n].mul_(momentum).add_(s[n].detach(), alpha=1.0 - momentum)


def make_teacher(student: DenseCLIP) -> DenseCLIP:
    """A frozen copy of the student (the EMA teacher)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# --------------------------------------------------------------------------------------------
# Learnable class prompts in the frozen text tower
# --------------------------------------------------------------------------------------------


def encode_text_embeds(
    model: nn.Module, tokens: torch.Tensor, embeds: torch.Tensor
) -> torch.Tensor:
    """open_clip's ``encode_text`` with the token embeddings given: ``embeds (n, L, W)`` for the
    ids ``tokens (n, L)`` (the ids only choose the pooled position). Returns ``(n, E)``, not
    normalised; with ``embeds = token_embedding(tokens)`` it equals ``model.encode_text``."""
    from open_clip.transformer import text_global_pool

    cast = model.transformer.get_cast_dtype()
    x = embeds.to(cast) + model.positional_embedding.to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(
        x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
    )
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


def placeholder_id(tokenizer: Any) -> int:
    """The token id of ``{}`` (the authors' 39025 for CLIP's BPE)."""
    ids = tokenizer(["{}"])[0]
    inner = [int(i) for i in ids[1:] if int(i) != 0]
    if len(inner) < 2:
        raise OvssError("the tokenizer does not make '{}' one token")
    return inner[0]


class PromptedText(nn.Module):
    """``k`` learnable classes of ``l`` tokens in a frozen open_clip text tower.

    Args:
        model: the whole open_clip CLIP (only its text parts are used; all frozen).
        tokenizer: its tokenizer.
        num_classes: ``k`` (64).
        length: ``l`` (4).
        seed: seed of the random vocabulary ids whose embeddings initialise the prompts.

    ``forward()`` -> ``(k, E)`` class embeddings (not normalised) of
    ``"A photo of a {} {} {} {} in the scene"`` with class ``c``'s tokens in the ``{}``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, num_classes: int, length: int, seed: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.num_classes, self.length = int(num_classes), int(length)
        self.slot = placeholder_id(tokenizer)
        template = PROMPT_TEMPLATE.format(" ".join(["{}"] * self.length))
        self.register_buffer("template", tokenizer([template]), persistent=False)
        if int((self.template == self.slot).sum()) != self.length:
            raise OvssError("the prompt template does not tokenise to one slot per prompt token")
        vocab = int(model.token_embedding.num_embeddings)
        gen = torch.Generator().manual_seed(int(seed))
        ids = torch.randint(vocab - 10, (self.num_classes, self.length), generator=gen)
        with torch.no_grad():
            init = model.token_embedding(ids.to(model.token_embedding.weight.device))
        self.prompts = nn.Parameter(init.detach().clone().float())

    def embed_with(self, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ``tokens (n, L)`` with each row's ``{}`` slots replaced by
        ``prompts (n, l, W)``."""
        emb = self.model.token_embedding(tokens)
        mask = tokens == self.slot
        emb = emb.masked_scatter(mask.unsqueeze(-1), prompts.to(emb.dtype).reshape(-1))
        return emb

    def forward(self) -> torch.Tensor:
        tokens = self.template.expand(self.num_classes, -1)
        return encode_text_embeds(self.model, tokens, self.embed_with(tokens, self.prompts))


# --------------------------------------------------------------------------------------------
# The light decoder
# --------------------------------------------------------------------------------------------


class _DoubleConv(nn.Sequential):
    """Two Conv3×3 (no bias) - GroupNorm(channels / 16) - ReLU."""

    def __init__(self, channels: int):
        g = max(channels // 16, 1)
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(g, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(g, channels),
            nn.ReLU(inplace=True),
        )


class MaskDecoder(nn.Module):
    """The light conv decoder of METHODS §5 (the authors' ``ConvHead``): ``(n, 1, h, w)`` cost
    maps -> ``(n, 1, 4h, 4w)`` mask logits.

    Conv3×3 1→64, ConvTranspose(2, stride 2) 64→64, two Conv-GN-ReLU (64), ConvTranspose
    64→32, two Conv-GN-ReLU (32), Conv3×3 32→1. GroupNorm with channels / 16 groups.
    """

    def __init__(self, channels: tuple[int, int, int] = (64, 64, 32)):
        super().__init__()
        c0, c1, c2 = channels
        self.conv0 = nn.Conv2d(1, c0, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(c0, c1, 2, stride=2)
        self.conv1 = _DoubleConv(c1)
        self.up2 = nn.ConvTranspose2d(c1, c2, 2, stride=2)
        self.conv2 = _DoubleConv(c2)
        self.proj = nn.Conv2d(c2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(x)
        x = self.conv1(self.up1(x))
        x = self.conv2(self.up2(x))
        return self.proj(x)


# --------------------------------------------------------------------------------------------
# Per-step computation: Sinkhorn, mask pooling, cluster targets, the loss
# --------------------------------------------------------------------------------------------


def _all_reduce(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, iters: int = 3, world: int = 1) -> torch.Tensor:
    """Balanced soft assignment of the masks of the global batch to ``k`` clusters.

    ``Q = softmax(logits, over clusters)ᵀ; Q /= ΣQ``; ``iters`` times: each cluster row to
    ``1/k`` of the mass, each mask column to ``1/M``; finally ``(Q·M)ᵀ``. Under torchrun the
    total mass ``M`` and the row sums are all-reduced, so the masks of every rank form one
    problem (the authors' ``distributed_sinkhorn``); the column step is per mask and local.

    Args:
        logits: ``(M_rank, k)`` this rank's masks' scores (``ε · cos``); ``M_rank`` may be 0.
        iters: Sinkhorn iterations (3).
        world: processes in the job (1: plain; equals ``methods.cluster.sinkhorn_knopp``).

    Returns:
        ``(M_rank, k)`` in the logits' dtype (computed in float64): rows sum to 1, column sums
        over all ranks ≈ ``M / k``.
    """
    if logits.dim() != 2:
        raise OvssError(f"sinkhorn needs (M, k) logits, got {tuple(logits.shape)}")
    q = torch.softmax(logits.double(), dim=1).T  # (k, M_rank)
    k = q.shape[0]
    total = _all_reduce(q.sum().reshape(1), world)
    if float(total) == 0:
        return logits.new_zeros(logits.shape)
    q = q / total
    for _ in range(iters):
        rows = _all_reduce(q.sum(1, keepdim=True), world)
        q = q / rows / k
        q = q / q.sum(0, keepdim=True) / total
    return (q * total).T.to(logits.dtype)


def interpolation_matrix(n: int, size: int, device: Any = None) -> torch.Tensor:
    """``(size, n)``: 1-D linear interpolation (``align_corners=False``) from ``n`` to
    ``size`` samples as a matrix; ``F.interpolate(bilinear)`` of an ``(h, w)`` map is
    ``A_h X A_wᵀ``."""
    eye = torch.eye(n, dtype=torch.float64, device=device)[None]  # (1, n, n): n signals
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[0].T


def mask_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of the bilinearly upsampled feature map inside each mask.

    Args:
        features: ``(h, w, E)`` one image's dense features.
        masks: ``(n, S, S)`` binary masks at the mask resolution (each with > 0 pixels).

    Returns:
        ``(n, E)``: ``Σ_p m(p) up(F)(p) / Σ_p m(p)`` with ``up`` = bilinear to ``S × S``
        (computed through the separable interpolation matrices, module doc).
    """
    h, w, _ = features.shape
    s_h, s_w = masks.shape[-2:]
    a_h = interpolation_matrix(h, s_h, features.device).to(features.dtype)
    a_w = interpolation_matrix(w, s_w, features.device).to(features.dtype)
    m = masks.to(features.dtype)
    weights = torch.einsum("sh,nst,tw->nhw", a_h, m, a_w)
    area = m.sum(dim=(1, 2)).clamp_min(1e-12)
    return torch.einsum("nhw,hwe->ne", weights, features) / area[:, None]


@dataclass
class ClusterTargets:
    """What :func:`prepare_clusters` returns.

    Attributes:
        targets: ``(B, k, S, S)`` bool: per image, the union of its masks assigned to each
            cluster.
        assignment: ``(M_rank,)`` int64 cluster of each mask (images in order).
        n_masks: ``(B,)`` masks per image.
        logits: ``(M_rank, k)`` the ε·cos logits given to Sinkhorn.
    """

    targets: torch.Tensor
    assignment: torch.Tensor
    n_masks: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def prepare_clusters(
    teacher_features: torch.Tensor,
    masks: list[torch.Tensor],
    class_embeddings: torch.Tensor,
    eps: float = 100.0,
    iters: int = 3,
    world: int = 1,
) -> ClusterTargets:
    """Cluster the masks of the batch onto the learnable classes and build the targets.

    Args:
        teacher_features: ``(B, h, w, E)`` the teacher's dense features.
        masks: per image ``(n_i, S, S)`` binary masks (already resized, ≤ 1-pixel masks
            dropped; ``n_i`` may be 0).
        class_embeddings: ``(k, E)`` the learnable classes' text embeddings.
        eps: ``ε`` of the logits ``ε · cos(f_m, prompt_c)`` (100 for ViT).
        iters: Sinkhorn iterations.
        world: processes whose masks form one Sinkhorn problem (:func:`sinkhorn`).

    Returns:
        :class:`ClusterTargets`; ``targets[i, c]`` = union of image ``i``'s masks whose hard
        assignment (argmax of the Sinkhorn matrix) is ``c``.
    """
    b = len(teacher_features)
    if len(masks) != b:
        raise OvssError(f"{len(masks)} mask sets for {b} images")
    k = len(class_embeddings)
    s = masks[0].shape[-2:] if masks else (MASK_SIZE, MASK_SIZE)
    text = l2n(class_embeddings.detach().float())
    logits, counts = [], []
    for f, m in zip(teacher_features, masks, strict=True):
        counts.append(len(m))
        if len(m):
            logits.append(eps * l2n(mask_pool(f.float(), m)) @ text.T)
    dev = teacher_features.device
    lg = torch.cat(logits) if logits else torch.zeros(0, k, device=dev)
    q = sinkhorn(lg, iters, world)
    assign = q.argmax(dim=1) if len(q) else torch.zeros(0, dtype=torch.long, device=dev)
    targets = torch.zeros(b, k, *s, dtype=torch.bool, device=dev)
    start = 0
    for i, (m, n) in enumerate(zip(masks, counts, strict=True)):
        if n:
            acc = torch.zeros(k, *s, device=dev)
            acc.index_add_(0, assign[start : start + n], m.to(acc.dtype))
            targets[i] = acc > 0
        start += n
    return ClusterTargets(targets, assign, torch.tensor(counts), lg)


def cost_maps(student_features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """``(B, h, w, E)`` features, ``(k, E)`` classes -> ``(B, k, h, w)`` cosine maps."""
    return torch.einsum("ke,bhwe->bkhw", l2n(class_embeddings), l2n(student_features))


def mask_logits(costs: torch.Tensor, decoder: MaskDecoder, size: int = MASK_SIZE) -> torch.Tensor:
    """``(B, k, h, w)`` cost maps -> ``(B, k, size, size)`` mask logits: each map through the
    decoder (4× upsampling), then bilinear (``align_corners=False``) to ``size``."""
    b, k, h, w = costs.shape
    out = decoder(costs.reshape(b * k, 1, h, w))
    out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)
    return out.reshape(b, k, size, size)


def mask_loss(
    logits: torch.Tensor, targets: torch.Tensor, denominator: float | None = None
) -> torch.Tensor:
    """BCE-with-logits over the pixels covered by some mask (every cluster channel there).

    Args:
        logits, targets: ``(B, k, S, S)``.
        denominator: the number of terms to divide the sum by (None: this batch's
            ``covered pixels × k``; under torchrun the global count, so the summed gradients
            of the ranks are those of one process).

    Returns:
        scalar; 0 (with a graph) when no pixel is covered.
    """
    covered = targets.any(dim=1)  # (B, S, S)
    sel_logits = logits.permute(0, 2, 3, 1)[covered]
    sel_targets = targets.permute(0, 2, 3, 1)[covered].to(logits.dtype)
    total = F.binary_cross_entropy_with_logits(sel_logits, sel_targets, reduction="sum")
    n = denominator if denominator is not None else float(sel_logits.numel())
    return total / max(n, 1.0)


# --------------------------------------------------------------------------------------------
# Base CLIP, checkpoints and the text-encoder kind
# --------------------------------------------------------------------------------------------


def split_trained(
    flat: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """A checkpoint's ``model`` (flat: ``visual.<name>``, ``prompts``, ``decoder.<name>``) ->
    ``(visual state, prompts (k, l, W), decoder state)``."""
    visual = {n[7:]: v for n, v in flat.items() if n.startswith("visual.")}
    decoder = {n[8:]: v for n, v in flat.items() if n.startswith("decoder.")}
    if "prompts" not in flat:
        raise OvssError("the checkpoint holds no learned prompts")
    return visual, flat["prompts"], decoder


def parse_arch(text: str) -> dict | None:
    """A JSON object of open_clip architecture overrides ('' = none)."""
    if not text:
        return None
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise OvssError(f"pixelclip: clip_arch is not JSON ({e.msg})") from None
    if not isinstance(out, dict):
        raise OvssError("pixelclip: clip_arch must be a JSON object")
    return out


def load_base_clip(base: dict[str, Any]) -> tuple[nn.Module, Any, Any]:
    """``(open_clip CLIP, tokenizer, BackboneInfo)`` of a base-CLIP record
    (``{"model", "weights", "random_init", "seed", "arch_overrides"}``)."""
    from featurestore.backbones.clip import load_open_clip

    return load_open_clip(
        base["model"],
        weights=base.get("weights") or None,
        random_init=bool(base.get("random_init")),
        seed=int(base.get("seed") or 0),
        arch_overrides=base.get("arch_overrides") or None,
    )


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A PixelCLIP checkpoint (trained tensors + provenance), loaded with ``weights_only``.

    Raises:
        OvssError: no file, not a PixelCLIP checkpoint, unsafe (pickled objects).
    """
    from methods.train import read_checkpoint

    ck = read_checkpoint(path)
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise OvssError(
            f"{path} is not a PixelCLIP checkpoint (format {ck.get('format')}); train one with "
            "the pixelclip trainer"
        )
    return ck


@lru_cache(maxsize=8)
def _provenance_cached(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    return load_checkpoint(path)["provenance"]


def checkpoint_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """A PixelCLIP checkpoint's provenance, cached per (path, mtime, size)."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        raise OvssError(
            f"no PixelCLIP checkpoint at {p}; train one with the pixelclip trainer"
        ) from None
    return _provenance_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def text_model_spec(checkpoint: str | os.PathLike) -> str:
    """``pixelclip:<absolute path>``: the frozen text tower of the checkpoint's base CLIP with
    its learned classes (``<class N>`` in a prompt)."""
    return f"{TEXT_KIND}{Path(checkpoint).expanduser().resolve()}"


def _identify(spec: str, opts: Any = None) -> dict:
    from featurestore.text_encoders import file_identity

    return {"kind": "pixelclip", "weights": file_identity(spec[len(TEXT_KIND) :])}


def _encoder_base() -> type:
    from featurestore.text_encoders import TextEncoder

    return TextEncoder


class PixelCLIPTextEncoder(_encoder_base()):  # type: ignore[misc]
    """The frozen text tower of a checkpoint's base CLIP, with its learned classes.

    Ordinary prompts are embedded exactly as the base tower does (it is never trained); a
    prompt holding ``<class N>`` gets learned class ``N``'s ``l`` token embeddings in its place
    (e.g. ``"a photo of a <class 3>."``), so the learned classes can be named and segmented
    with like any vocabulary [ours].
    """

    kind = "pixelclip"

    def __init__(self, spec: str, device: str = "cpu"):
        self.name = spec
        self.path = spec[len(TEXT_KIND) :] if spec.startswith(TEXT_KIND) else spec
        self.device = torch.device(device)
        ck = load_checkpoint(self.path)
        self._prov = ck["provenance"]
        model, tokenizer, info = load_base_clip(self._prov["base_clip"])
        check_base_weights(self._prov, info, self.path)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.slot = placeholder_id(tokenizer)
        self.prompts = split_trained(ck["model"])[1].to(self.device)
        self.dim = int(self.model.text_projection.shape[-1])

    def identity(self) -> dict:
        return _identify(TEXT_KIND + self.path)

    def provenance(self) -> dict:
        return {
            **self.identity(),
            "checkpoint": str(self.path),
            "base_clip": self._prov.get("base_clip"),
        }

    def encode_batch(self, prompts: list[str]) -> torch.Tensor:
        length = self.prompts.shape[1]
        texts, chosen = [], []
        for p in prompts:
            hits = LEARNED_CLASS.findall(p)
            if len(hits) > 1:
                raise OvssError(f"prompt {p!r} names more than one learned class")
            if hits:
                c = int(hits[0])
                if not 0 <= c < len(self.prompts):
                    raise OvssError(
                        f"prompt {p!r}: this checkpoint has learned classes 0..{len(self.prompts) - 1}"
                    )
                p = LEARNED_CLASS.sub(" ".join(["{}"] * length), p)
            texts.append(p)
            chosen.append(int(hits[0]) if hits else -1)
        tokens = self.tokenizer(texts).to(self.device)
        emb = self.model.token_embedding(tokens)
        for row, c in enumerate(chosen):
            if c >= 0:
                slots = (tokens[row] == self.slot).nonzero().flatten()
                emb[row, slots[:length]] = self.prompts[c].to(emb.dtype)
        return encode_text_embeds(self.model, tokens, emb)


def _factory(spec: str, opts: Any) -> PixelCLIPTextEncoder:
    return PixelCLIPTextEncoder(spec, getattr(opts, "device", "cpu"))


def _register_text_kind() -> None:
    from featurestore.text_encoders import register_text_encoder

    register_text_encoder(
        TEXT_KIND,
        _factory,
        identify=_identify,
        help="the frozen text tower of a PixelCLIP checkpoint's CLIP, with its learned classes "
        "as '<class N>' (pixelclip:<path to last.pt>)",
    )


_register_text_kind()


def check_base_weights(prov: dict[str, Any], info: Any, path: str | os.PathLike) -> None:
    """Refuse a base CLIP whose weights differ from the ones the checkpoint was trained on."""
    want = (prov.get("base_clip") or {}).get("weights_identity")
    have = getattr(info, "weights", None)
    if want and have and want != have:
        raise OvssError(f"checkpoint {path} was trained on CLIP weights {want}; these are {have}")


def build_dense_clip(
    prov: dict[str, Any], device: str | torch.device = "cpu", path: str = ""
) -> DenseCLIP:
    """The fine-tuned student of a checkpoint (base CLIP + trained tensors), eval mode."""
    ck = load_checkpoint(path)
    model, _, info = load_base_clip(prov["base_clip"])
    check_base_weights(prov, info, path)
    dense = DenseCLIP(model.visual, int(prov["trainable_blocks"]), prov.get("pos_interp", "offset"))
    dense.load_trained_state(split_trained(ck["model"])[0])
    return dense.to(device).eval()


# --------------------------------------------------------------------------------------------
# The segmenter
# --------------------------------------------------------------------------------------------


@dataclass
class PixelCLIPConfig:
    """Options of the ``pixelclip`` method.

    Attributes:
        checkpoint: the ``last.pt`` of ``ovss align --method pixelclip``; required to segment.
        size: input side: every image squashed to ``size``² (320, the authors').
        eval_grid: the dense features are resized bilinearly to ``eval_grid``² before the
            cosine (64, the authors').
        text_model: the text encoder of the vocabulary (default: the checkpoint's frozen
            tower, ``pixelclip:<checkpoint>``).
        templates: template set of the class embeddings (pixelclip8: CLIP's 7 + "A photo of a
            {} in the scene").
        model, trainable_blocks, masks, mask_set: without a checkpoint (extract --for
            pixelclip) the training recipe is planned: the CLIP, K trained blocks (0 = all, on
            pixels; 1 = the cached square<size> set), the mask source (dino, sam, sa1b) and a
            mask set that exists already (then no DINO set is planned); with a checkpoint
            they come from it.
    """

    checkpoint: str = ""
    size: int = CLIP_SIZE
    eval_grid: int = EVAL_GRID
    text_model: str | None = None
    templates: str = "pixelclip8"
    model: str = DEFAULT_MODEL
    trainable_blocks: int = 0
    masks: str = "dino"
    mask_set: str = ""

    def __post_init__(self) -> None:
        if self.checkpoint and self.text_model is None:
            self.text_model = text_model_spec(self.checkpoint)


def store_protocol(size: int = CLIP_SIZE) -> Protocol:
    """The protocol of the cached CLIP tokens: the whole image squashed to ``size``²."""
    return Protocol("square", size)


def cached_tensors(depth: int, trainable_blocks: int) -> tuple[str, str]:
    """The tensors holding the tokens entering block ``N − K``: ``pre_last`` /
    ``pre_last_cls`` for ``K = 1``, else ``layer{N−K−1}`` / ``layer{N−K−1}_cls``."""
    if trainable_blocks == 1:
        return ("pre_last", "pre_last_cls")
    i = depth - trainable_blocks - 1
    return (f"layer{i}", f"layer{i}_cls")


def cached_layers(depth: int, trainable_blocks: int) -> tuple[int, ...]:
    """The ``--layers`` the CLIP set needs for ``K`` trained blocks: none for ``K = 1``
    (``pre_last`` is always cached), else ``(N − K − 1,)``."""
    return () if trainable_blocks == 1 else (depth - trainable_blocks - 1,)


@register_method
class PixelCLIPSegmenter(Segmenter):
    """PixelCLIP inference: the fine-tuned CLIP's dense features · class text embeddings.

    Runs CLIP on the pixels when the checkpoint trained every block; with fewer trained
    blocks the frozen blocks' output is read from the ``square<size>`` CLIP set of the store
    (as in training) and only the trained blocks run. No background class: argmax over the
    classes.
    """

    name = "pixelclip"
    Config = PixelCLIPConfig
    doc = (
        "PixelCLIP: CLIP fine-tuned with unlabeled masks by `ovss align --method pixelclip`; "
        "--checkpoint CKPT"
    )

    @classmethod
    def requirements(cls, config: PixelCLIPConfig) -> list[Any]:
        if not config.checkpoint:  # planning: the training recipe
            from methods.pixelclip_train import PixelCLIPTrainer

            tcfg = PixelCLIPTrainer.build_config(
                None,
                {
                    "model": config.model,
                    "trainable_blocks": config.trainable_blocks,
                    "masks": config.masks,
                    "mask_set": config.mask_set,
                    "size": config.size,
                    "sa1b_dir": "-" if config.masks == "sa1b" else "",
                },
            )
            return PixelCLIPTrainer.requirements(tcfg)
        prov = checkpoint_provenance(config.checkpoint)
        base = prov["base_clip"]
        k, depth = int(prov["trainable_blocks"]), int(prov["depth"])
        if k >= depth:
            return [LiveModelRequirement("clip", base["model"])]
        return [
            FeatureRequirement(
                "clip",
                base["model"],
                store_protocol(config.size),
                cached_tensors(depth, k),
                layers=cached_layers(depth, k),
            )
        ]

    @classmethod
    def vocabulary_defaults(cls, config: PixelCLIPConfig) -> VocabularyDefaults:
        return VocabularyDefaults(
            text_model=config.text_model or DEFAULT_MODEL,
            templates=config.templates,
            family="sclip",
        )

    def __init__(self, store, config: PixelCLIPConfig, device: str | torch.device = "cpu"):
        if not config.checkpoint:
            raise OvssError(
                "method pixelclip needs a fine-tuned CLIP: --checkpoint PATH (the last.pt of the "
                "pixelclip trainer)"
            )
        super().__init__(store, config, device)
        self.provenance = checkpoint_provenance(config.checkpoint)
        self.dense = build_dense_clip(self.provenance, self.device, config.checkpoint)
        self._records = store.image_records()
        self._mean = self.provenance["base_clip"]["mean"]
        self._std = self.provenance["base_clip"]["std"]
        fs = self.sets.get("clip")
        if fs is not None:
            want = self.provenance["base_clip"].get("weights_identity")
            have = fs.provenance["backbone"].get("weights")
            if want != have:
                raise OvssError(
                    f"checkpoint {config.checkpoint} was trained on CLIP weights {want}; the "
                    f"store's '{fs.key}' were made with {have}"
                )

    def dense_features(self, index: int) -> torch.Tensor:
        """``(gh, gw, E)`` fine-tuned dense features of image ``index`` at ``size``²."""
        s = self.config.size
        p = self.dense.patch_size
        grid = (s // p, s // p)
        fs = self.sets.get("clip")
        with torch.no_grad():
            if fs is not None:
                names = cached_tensors(self.dense.depth, self.dense.trainable_blocks)
                f = fs.read(index, names=list(names))
                tokens = torch.from_numpy(np.asarray(f.tensors[names[0]], np.float32))
                cls = torch.from_numpy(np.asarray(f.tensors[names[1]], np.float32)).reshape(1, -1)
                x = torch.cat([cls, tokens])[None].to(self.device)
                return self.dense.from_tokens(x, grid)[0]
            from methods.pixelclip_masks import load_store_image

            image = load_store_image(self.store, self._records[index], self.name)
            x = squash_normalise(image, s, self._mean, self._std)[None].to(self.device)
            return self.dense(x)[0]

    def segment_labels(self, index: int, vocab: Vocab, scoring: Any):
        """``(labels (H, W), max_prob (H, W), cosine logits (Q, H, W))`` of image ``index``:
        the §0.2 scoring of :meth:`cosine_logits` (argmax; ``prob_thd`` 0, no background).
        Defined so the driver needs no feature set when CLIP runs on the pixels."""
        from methods.scoring import score_logits

        cos, hw = self.cosine_logits(index, vocab)
        labels, max_prob = score_logits(
            cos.float(),
            hw,
            vocab.query_to_class,
            vocab.num_classes,
            logit_scale=scoring.logit_scale,
            prob_thd=scoring.prob_thd,
            area_thd=scoring.area_thd,
        )
        return labels.cpu().numpy(), max_prob.cpu().numpy(), cos

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        feats = self.dense_features(index).float()
        e = feats.shape[-1]
        if vocab.embeddings.shape[1] != e:
            raise OvssError(
                f"the vocabulary's embeddings are {vocab.embeddings.shape[1]}-d, the CLIP "
                f"features {e}-d: embed the classes with text model "
                f"{text_model_spec(self.config.checkpoint)}"
            )
        g = self.config.eval_grid
        up = F.interpolate(
            feats.permute(2, 0, 1)[None], size=(g, g), mode="bilinear", align_corners=False
        )[0]
        text = l2n(vocab.embeddings.float().to(up.device))
        cos = torch.einsum("ehw,qe->qhw", l2n(up, dim=0), text)  # upsampled on the device
        h, w = (int(v) for v in self.store.image_table()["size"][index])
        from methods.scoring import upsample_bilinear

        return upsample_bilinear(cos, (h, w)), (h, w)


def squash_normalise(image: np.ndarray, size: int, mean: Any, std: Any) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, size, size)`` float: bilinear (``align_corners=False``, no
    antialiasing, as the store's extraction resizes), then CLIP mean/std."""
    from featurestore.protocol import image_geometry, preprocess_windows

    geo = image_geometry(store_protocol(size), image.shape[0], image.shape[1], 1)
    return preprocess_windows(image, geo, mean, std)[0]


__all__ = [
    "CHECKPOINT_FORMAT",
    "ClusterTargets",
    "DenseCLIP",
    "MaskDecoder",
    "PixelCLIPConfig",
    "PixelCLIPSegmenter",
    "PixelCLIPTextEncoder",
    "PromptedText",
    "cached_tensors",
    "checkpoint_provenance",
    "cost_maps",
    "ema_update",
    "encode_text_embeds",
    "interpolation_matrix",
    "load_checkpoint",
    "make_teacher",
    "mask_logits",
    "mask_loss",
    "mask_pool",
    "prepare_clusters",
    "sinkhorn",
    "split_trained",
    "squash_normalise",
    "store_protocol",
    "text_model_spec",
]
