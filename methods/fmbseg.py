"""FMbSeg Stage 2: an alignment module on frozen DINOv2 patch features (METHODS.md §1.2).

A small module ``M`` maps cached VFM patch tokens ``x`` (width ``D_v``) into CLIP text space,
``z = l2n(M(x))`` (width ``D_t``), trained with the TSupCon loss (paper 000, Eq. 1-4) on patch
pseudo-labels derived from per-pixel labels (a label set in the store, or a dataset's GT).
At test time ``z`` is compared with the text embeddings of *any* vocabulary (``aligned``
method, ``methods/aligned.py``).

Pieces:

- :func:`patch_labels` — majority label of the pixels under each patch (``min_frac``).
- :class:`AlignmentModule` — ``block`` / ``mlp`` / ``linear`` variants (``--arch``).
- :func:`tsupcon_loss`, :func:`supcon_loss`, :func:`proto_loss` — the loss and its ablations.
- :class:`FMbSegTrainer` — the ``fmbseg`` trainer (``ovss align --method fmbseg``, the seam
  of ``methods.train``): SGD + cosine schedule over batches of images from the store, a
  checkpoint with full provenance after every epoch (``weights_only``-loadable), resume from
  the last checkpoint, torchrun data parallel. :func:`train_alignment` is the same with class
  embeddings given (the demo's call).
- :func:`load_checkpoint` — the module and its provenance back.
- :func:`resolve_device` — ``--device auto`` (the ``LOCAL_RANK`` GPU when CUDA exists, else
  Apple MPS when present, else cpu; under torchrun without CUDA: cpu, see
  :func:`setup_distributed`).

Choices marked **[ours]** are not fixed by the paper (no public code exists):

- τ = 0.1 divides every dot product (τ = 1 reproduces Eq. 1-4 literally).
- Patch labels: the majority over the classes and ignore (a patch whose most frequent pixel
  label is ignore is ignored; a class wins a tie with ignore); ``min_frac`` = 0.5: a patch whose
  majority class covers less than half of its in-image pixels (ignore pixels count in the
  denominator, window padding does not) is ignored.
- ``block``: Linear D_v→D_m, one pre-norm transformer block (8-head self-attention over the
  tokens of one *window* — for whole-image protocols, the image — + MLP ×4, GELU), Linear
  D_m→D_t; D_m = 512; no positional embedding (DINOv2 tokens already carry position).
- A class with synonyms is represented in training by ``l2n(mean of its query embeddings)``.
- ``--loss proto`` normalises the sum of ℓt terms by the number of classes in the batch
  (Eq. 1 without ℓim, whose normalisation would otherwise shrink with n); ``--loss supcon``
  is SupCon (L_out) over patches + all K text vectors as labelled samples, averaged over the
  anchors that have a positive.
- lr 0.01, weight decay 1e-4, momentum 0.9, cosine annealing per optimisation step to 0,
  ``max_patches_per_image`` = 0 (all labelled patches; > 0 samples uniformly per image to
  bound the O(n²) memory), seed 0 for init / shuffling / sampling; an epoch shuffles the
  training images (seed + epoch) so a resumed run reproduces an uninterrupted one.
- Checkpoint: ``<out>/last.pt`` rewritten atomically after every epoch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from typing import Protocol as TypingProtocol

import numpy as np
import torch
import torch.distributed as dist  # noqa: F401  (tests patch ``methods.fmbseg.dist``)
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from featurestore.errors import OvssError
from featurestore.extract import resolve_device  # the shared --device rule (re-exported)
from featurestore.protocol import Protocol
from featurestore.store import STATUS_OK, FeatureSet, FeatureStore, ImageFeatures, set_key
from methods.base import FeatureRequirement, Requirement, VocabularyDefaults
from methods.train import (
    CHECKPOINT_NAME,
    CheckpointError,
    DatasetLabelSource,
    DistContext,
    LabelRequest,
    ProgressFn,
    StepMeter,
    StoreLabelSource,
    TextOptions,
    Trainer,
    TrainRequest,
    TrainResult,
    checkpoint_provenance,
    embed_classes,
    get_loss,
    list_losses,
    now_utc,
    open_labels,
    read_checkpoint,
    register_loss,
    register_trainer,
    resolve_text,
    resume_state,
    save_checkpoint,
    setup_distributed,
    text_identity,
)

__all__ = [
    "ARCHS",
    "LOSSES",
    "LOSS_FAMILY",
    "AlignConfig",
    "FMbSegTrainer",
    "AlignmentModule",
    "DatasetLabelSource",
    "LabelSource",
    "StoreLabelSource",
    "align_features",
    "load_checkpoint",
    "patch_labels",
    "proto_loss",
    "resolve_device",
    "setup_distributed",
    "supcon_loss",
    "text_identity",
    "train_alignment",
    "tsupcon_loss",
]

ARCHS = ("block", "mlp", "linear")
#: The loss family of alignment losses: ``fn(z (n, D), y (n,), t (K, D), tau) -> scalar``.
LOSS_FAMILY = "patch-text"
IGNORE = -1
CHECKPOINT_FORMAT = 1
#: Features of the training images are kept in memory when they fit in this many bytes.
CACHE_BYTES = 2 << 30


# --------------------------------------------------------------------------------------------
# Patch pseudo-labels
# --------------------------------------------------------------------------------------------


def _resize_nearest(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``(H, W)`` integer map to ``hw`` (pixel centres)."""
    h, w = labels.shape
    if (h, w) == tuple(hw):
        return labels
    ys = np.minimum(((np.arange(hw[0]) + 0.5) * h / hw[0]).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(hw[1]) + 0.5) * w / hw[1]).astype(np.int64), w - 1)
    return labels[ys[:, None], xs[None, :]]


def patch_labels(
    labels: np.ndarray, feats: ImageFeatures, num_classes: int, min_frac: float = 0.5
) -> np.ndarray:
    """Majority pixel label under every token of one image (METHODS.md §1.2).

    Args:
        labels: ``(H, W)`` integer labels at the original image size; values ``>= num_classes``
            (e.g. 255) are ignore.
        feats: the image's features (window boxes, padding and token grids are used).
        num_classes: K; labels in ``[0, K)`` are classes.
        min_frac: a token is ignored unless its majority label covers at least this fraction
            of the token's in-image pixels **[ours: 0.5]** (window padding is not counted;
            ignore pixels are).

    The majority is taken over the classes and ignore together (METHODS.md §1.2: "ignore if it
    is ignore"): a token whose most frequent pixel label is ignore is ignored, whatever
    ``min_frac``; otherwise the winning class must cover ``min_frac`` of the pixels. Ties go
    to the lower label, so a class beats ignore on a tie **[ours]**.

    Returns:
        ``(n_tokens,)`` int64, the class of each token in store order, ``-1`` = ignore.
    """
    canvas = _resize_nearest(np.asarray(labels), tuple(feats.resized_size)).astype(np.int64)
    canvas = np.where((canvas >= 0) & (canvas < num_classes), canvas, num_classes)
    out = []
    for (gh, gw), box, pad in zip(feats.win_grid, feats.win_box, feats.win_pad, strict=True):
        y1, x1, y2, x2 = (int(v) for v in box)
        top, left, bottom, right = (int(v) for v in pad)
        ph = (y2 - y1 + top + bottom) // int(gh)
        pw = (x2 - x1 + left + right) // int(gw)
        win = np.full((int(gh) * ph, int(gw) * pw), num_classes + 1, dtype=np.int64)
        crop = canvas[y1:y2, x1:x2]
        hh = min(crop.shape[0], win.shape[0] - top)
        ww = min(crop.shape[1], win.shape[1] - left)
        win[top : top + hh, left : left + ww] = crop[:hh, :ww]
        tok = win.reshape(int(gh), ph, int(gw), pw).transpose(0, 2, 1, 3).reshape(-1, ph * pw)
        n_tok = tok.shape[0]
        counts = np.bincount(
            (np.arange(n_tok)[:, None] * (num_classes + 2) + tok).ravel(),
            minlength=n_tok * (num_classes + 2),
        ).reshape(n_tok, num_classes + 2)
        inside = counts[:, : num_classes + 1].sum(1)  # padding (K + 1) excluded
        # the majority over the classes *and* ignore (column K): a token whose most frequent
        # pixel label is ignore is ignored; on a tie the lower index (a class) wins [ours]
        best = counts[:, : num_classes + 1].argmax(1)
        best_n = counts[np.arange(n_tok), best]
        ok = (best < num_classes) & (best_n > 0) & (best_n >= min_frac * np.maximum(inside, 1))
        out.append(np.where(ok, best, IGNORE))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class LabelSource(TypingProtocol):
    """Where per-pixel training labels come from (a store label set or a dataset's GT)."""

    class_names: list[list[str]]

    def labels(self, index: int) -> np.ndarray | None:
        """``(H, W)`` labels of store image ``index`` at its original size, or None."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-safe provenance of the labels."""
        ...


# --------------------------------------------------------------------------------------------
# Alignment module
# --------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, key_padding_mask=pad_mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class AlignmentModule(nn.Module):
    """``M``: VFM patch tokens ``(S, L, D_v)`` -> unit vectors in text space ``(S, L, D_t)``.

    Args:
        in_dim: D_v (VFM token width, 384 for ViT-S/14, 1024 for ViT-L/14).
        out_dim: D_t (CLIP text embedding width).
        arch: ``block`` (default), ``mlp`` (Linear-GELU-Linear) or ``linear``.
        hidden_dim: D_m **[ours: 512]**.
        heads: attention heads of ``block`` **[ours: 8]**.
        mlp_ratio: hidden width of the block's MLP, × D_m **[ours: 4]**.

    ``forward(x, valid)``: ``x`` ``(S, L, D_v)`` sequences (one per window), ``valid`` ``(S, L)``
    bool (False = padding, excluded from attention); returns ``l2n(M(x))`` ``(S, L, D_t)``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        arch: str = "block",
        hidden_dim: int = 512,
        heads: int = 8,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise OvssError(f"'{arch}' is not an alignment architecture; choose from {ARCHS}")
        self.arch = arch
        # Frozen per-dimension input standardisation (identity until set_input_stats).
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        if arch == "block":
            if hidden_dim % heads:
                raise OvssError(f"hidden_dim {hidden_dim} must be a multiple of heads {heads}")
            self.proj_in = nn.Linear(in_dim, hidden_dim)
            self.block = _Block(hidden_dim, heads, mlp_ratio)
            self.proj_out = nn.Linear(hidden_dim, out_dim)
        elif arch == "mlp":
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
            )
        else:
            self.linear = nn.Linear(in_dim, out_dim)

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Freeze the input standardisation ``(x - mean) / std`` (``(D_v,)`` each)."""
        self.in_mean.copy_(mean)
        self.in_std.copy_(std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        x = (x - self.in_mean) / self.in_std
        if self.arch == "block":
            pad = None if valid is None else ~valid
            y = self.proj_out(self.block(self.proj_in(x), pad))
        elif self.arch == "mlp":
            y = self.mlp(x)
        else:
            y = self.linear(x)
        return F.normalize(y, dim=-1)


def _pad_sequences(
    seqs: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``S`` tensors ``(L_s, D)`` -> ``(S, L_max, D)`` zero-padded and the ``(S, L_max)`` mask."""
    n = max(s.shape[0] for s in seqs)
    x = seqs[0].new_zeros(len(seqs), n, seqs[0].shape[1])
    valid = torch.zeros(len(seqs), n, dtype=torch.bool, device=seqs[0].device)
    for i, s in enumerate(seqs):
        x[i, : s.shape[0]] = s
        valid[i, : s.shape[0]] = True
    return x, valid


def align_features(
    module: AlignmentModule, tokens: torch.Tensor, win_grid: np.ndarray
) -> torch.Tensor:
    """Aligned features ``(n_tokens, D_t)`` of one image's tokens ``(n_tokens, D_v)``.

    The ``block`` architecture attends within each window (``win_grid`` ``(n_windows, 2)``).
    """
    sizes = [int(gh) * int(gw) for gh, gw in np.asarray(win_grid).tolist()]
    seqs = list(torch.split(tokens, sizes))
    x, valid = _pad_sequences(seqs)
    z = module(x, valid)
    return z[valid]


# --------------------------------------------------------------------------------------------
# Losses (all inputs unit norm; z (n, D) patches, y (n,) labels in [0, K), t (K, D) text)
# --------------------------------------------------------------------------------------------


def _check_loss_inputs(z: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
    if z.dim() != 2 or t.dim() != 2 or z.shape[1] != t.shape[1] or y.shape != (z.shape[0],):
        raise OvssError(
            f"loss inputs must be z (n, D), y (n,), t (K, D); got {tuple(z.shape)}, "
            f"{tuple(y.shape)}, {tuple(t.shape)}"
        )


def _masked_similarities(z: torch.Tensor, tau: float) -> torch.Tensor:
    """``z z^T / τ`` with ``-inf`` on the diagonal (the ``j ≠ i`` of Eq. 3-4)."""
    s = z @ z.T / tau
    return s.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))


def _lt_terms(z: torch.Tensor, y: torch.Tensor, t: torch.Tensor, tau: float, s: torch.Tensor):
    """Per-patch ℓt(z_i, t_{y_i}) of Eq. 3 ``(n,)``."""
    zt = z @ t.T / tau  # (n, K)
    lse = torch.logsumexp(torch.cat([zt, s], dim=1), dim=1)
    return lse - zt.gather(1, y[:, None])[:, 0]


def tsupcon_loss(
    z: torch.Tensor, y: torch.Tensor, t: torch.Tensor, tau: float = 0.1
) -> torch.Tensor:
    """TSupCon (paper 000 Eq. 1-4, METHODS.md §1.2), a scalar.

    ``L = (Σ_{k in batch} ℓt(t_k) + Σ_i ℓim(z_i)) / (n + K_batch)`` with ℓt(t_k) the mean over
    the patches of class k of ``-z_i·t_k/τ + log(Σ_k' exp(z_i·t_k'/τ) + Σ_{j≠i} exp(z_i·z_j/τ))``
    and ℓim(z_i) the mean over same-label partners l of ``-z_i·z_l/τ + log Σ_{j≠i} exp(z_i·z_j/τ)``
    (patches without a partner have no ℓim term). All log-sum-exps subtract their max.

    Args:
        z: ``(n, D)`` unit patch features (labelled patches only).
        y: ``(n,)`` int64 labels in ``[0, K)``.
        t: ``(K, D)`` unit text prototypes of the whole vocabulary.
        tau: temperature **[ours: 0.1]**; 1 gives the paper's equations literally.
    """
    _check_loss_inputs(z, y, t)
    s = _masked_similarities(z, tau)
    lt = _lt_terms(z, y, t, tau, s)
    counts = torch.bincount(y, minlength=t.shape[0]).to(z.dtype)
    lt_sum = (lt / counts[y]).sum()
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool, device=z.device)
    n_pos = same.sum(1)
    has = n_pos > 0
    if has.any():
        s_rows = s[has]
        pos_mean = torch.where(same[has], s_rows, torch.zeros_like(s_rows)).sum(1) / n_pos[has]
        lim_sum = (torch.logsumexp(s_rows, dim=1) - pos_mean).sum()
    else:
        lim_sum = z.sum() * 0
    k_batch = int((counts > 0).sum())
    return (lt_sum + lim_sum) / (len(z) + k_batch)


def proto_loss(z: torch.Tensor, y: torch.Tensor, t: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """ℓt only (``--loss proto``): ``Σ_{k in batch} ℓt(t_k) / K_batch`` **[ours: normaliser]**."""
    _check_loss_inputs(z, y, t)
    lt = _lt_terms(z, y, t, tau, _masked_similarities(z, tau))
    counts = torch.bincount(y, minlength=t.shape[0]).to(z.dtype)
    return (lt / counts[y]).sum() / (counts > 0).sum()


def supcon_loss(
    z: torch.Tensor, y: torch.Tensor, t: torch.Tensor, tau: float = 0.1
) -> torch.Tensor:
    """SupCon (Khosla et al., L_out) over the patches and all K text vectors as samples
    (``--loss supcon``): for every anchor a with positives P(a) (same label, a excluded),
    ``-1/|P(a)| Σ_{p∈P(a)} log(exp(s_ap/τ) / Σ_{j≠a} exp(s_aj/τ))``, averaged over such anchors."""
    _check_loss_inputs(z, y, t)
    feats = torch.cat([z, t.to(z.dtype)])
    labels = torch.cat([y, torch.arange(t.shape[0], device=y.device)])
    s = _masked_similarities(feats, tau)
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(
        len(labels), dtype=torch.bool, device=z.device
    )
    n_pos = same.sum(1)
    has = n_pos > 0
    s_rows = s[has]
    log_prob = s_rows - torch.logsumexp(s_rows, dim=1, keepdim=True)
    pos = torch.where(same[has], log_prob, torch.zeros_like(log_prob)).sum(1) / n_pos[has]
    return -pos.mean()


register_loss("tsupcon", LOSS_FAMILY, "TSupCon (paper Eq. 1-4)")(tsupcon_loss)
register_loss("supcon", LOSS_FAMILY, "SupCon (L_out), patches + the K text vectors")(supcon_loss)
register_loss("proto", LOSS_FAMILY, "the prototype term only")(proto_loss)
#: The alignment losses (``--loss``), from the registry.
LOSSES = list_losses(LOSS_FAMILY)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class AlignConfig:
    """Hyperparameters of ``ovss align --method fmbseg`` (all recorded in the checkpoint).

    Attributes:
        arch: Module: Linear + one pre-norm transformer block (self-attention within one
            window [ours]: the whole image for whole-image features; no positional embedding
            [ours]) + Linear, a 2-layer GELU MLP, or one Linear.
        loss: TSupCon (Eq. 1-4), SupCon (L_out) over patches + the K text vectors as samples
            (averaged over the anchors that have a positive [ours]), or the prototype term
            only (normalised by the classes in the batch [ours]). Each class is one prototype,
            l2n(mean of its synonyms' embeddings) [ours].
        tau: Temperature dividing every dot product [ours]; 1 = the paper's equations
            literally.
        hidden_dim: D_m, the module's hidden width [ours].
        heads: Attention heads of the block [ours].
        mlp_ratio: Hidden width of the block's MLP, times hidden_dim [ours].
        epochs: Passes over the training images (paper: 10).
        batch_images: Images per optimisation step (paper: 5).
        lr: Initial SGD learning rate [ours], cosine-annealed to 0 per step.
        momentum: SGD momentum.
        weight_decay: SGD weight decay [ours].
        min_frac: Patch label = the majority pixel label, ignore counted as a candidate (a
            mostly ignore patch is ignored; a class wins a tie [ours]); the class must cover
            this fraction of the patch's pixels [ours].
        max_patches_per_image: Sample this many labelled patches per image and step (0: all)
            [ours]; bounds the O(n^2) loss memory.
        seed: Init, shuffling, sampling and random-init text seed [ours].
        tensor: Feature tensor read from the store.
        input_norm: Standardise each input dimension with the mean/std of the training
            patches (frozen, saved with the module) [ours]; without it SGD at lr 0.01 barely
            moves on features dominated by a shared mean direction.
    """

    arch: str = field(default="block", metadata={"choices": ARCHS})
    loss: str = field(default="tsupcon", metadata={"choices": LOSSES})
    tau: float = 0.1
    hidden_dim: int = 512
    heads: int = 8
    mlp_ratio: float = 4.0
    epochs: int = 10
    batch_images: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    min_frac: float = 0.5
    max_patches_per_image: int = 0
    seed: int = 0
    tensor: str = "patch"
    input_norm: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise OvssError(f"'{self.arch}' is not an alignment architecture; choose from {ARCHS}")
        if self.loss not in LOSSES:
            raise OvssError(f"'{self.loss}' is not an alignment loss; choose from {LOSSES}")
        if self.tau <= 0 or self.epochs < 1 or self.batch_images < 1 or self.lr <= 0:
            raise OvssError("tau, lr must be > 0 and epochs, batch_images >= 1")
        if not 0 <= self.min_frac <= 1:
            raise OvssError(f"min_frac must lie in [0, 1], got {self.min_frac}")


@dataclass
class TrainingData:
    """Training images with labelled patches: store indices, token labels, window grids."""

    indices: list[int]
    labels: dict[int, torch.Tensor]  # index -> (n_tokens,) int64, -1 ignore
    grids: dict[int, np.ndarray]
    feats: dict[int, torch.Tensor] = field(default_factory=dict)  # in-memory cache
    mean: torch.Tensor | None = None  # (D_v,) over all tokens of the training images
    std: torch.Tensor | None = None


def _resolve_features(store: FeatureStore, features: str | tuple[str, Protocol]) -> FeatureSet:
    if isinstance(features, tuple):
        model, protocol = features
        return store.require(model, protocol)
    if features in store.feature_sets():
        return store.feature_set(features)
    hits = [k for k in store.feature_sets() if k.split("@")[0] == features]
    if len(hits) == 1:
        return store.feature_set(hits[0])
    have = ", ".join(store.feature_sets()) or "none"
    raise OvssError(
        f"'{features}' names {'several' if hits else 'no'} feature set(s) of {store.path} "
        f"(it has: {have}); give the full key MODEL@PROTOCOL"
    )


def _class_prototypes(vocab: Any) -> torch.Tensor:
    """``(K, D)`` per-class unit prototype: l2n(mean of the class's query embeddings) [ours]."""
    emb = F.normalize(vocab.embeddings.float(), dim=1)
    q2c = vocab.query_to_class.long()
    k = int(vocab.num_classes)
    sums = torch.zeros(k, emb.shape[1]).index_add_(0, q2c, emb)
    return F.normalize(sums, dim=1)


def prepare_training_data(
    fs: FeatureSet,
    source: LabelSource,
    cfg: AlignConfig,
    progress: ProgressFn | None = None,
) -> TrainingData:
    """Patch labels of every finished image that has pixel labels (and ≥ 1 labelled patch);
    features are cached in memory when all of them fit in ``CACHE_BYTES``."""
    status = fs.status()
    k = len(source.class_names)
    data = TrainingData([], {}, {})
    cand = [i for i in range(fs.store.n_images) if status[i] == STATUS_OK]
    width = int(np.prod(next(s.row_shape for s in fs.specs if s.name == cfg.tensor)))
    n_tok = fs.geometry[f"row_count_{'token'}"]
    cache = sum(int(n_tok[i]) for i in cand) * width * 4 <= CACHE_BYTES
    s1, s2, cnt = np.zeros(width), np.zeros(width), 0
    for n, i in enumerate(cand):
        lab = source.labels(i)
        if progress:
            progress({"stage": "patch labels", "done": n + 1, "total": len(cand)})
        if lab is None:
            continue
        f = fs.read(i, names=[cfg.tensor])
        pl = patch_labels(lab, f, k, cfg.min_frac)
        if (pl >= 0).any():
            x = np.asarray(f.tensors[cfg.tensor], np.float64).reshape(len(pl), -1)
            s1 += x.sum(0)
            s2 += (x * x).sum(0)
            cnt += len(x)
            data.indices.append(i)
            data.labels[i] = torch.from_numpy(pl)
            data.grids[i] = np.asarray(f.win_grid)
            if cache:
                data.feats[i] = torch.from_numpy(np.asarray(f.tensors[cfg.tensor], np.float32))
    if not data.indices:
        raise OvssError("no training image has a labelled patch (check the labels / min_frac)")
    mean = s1 / cnt
    data.mean = torch.from_numpy(mean).float()
    data.std = torch.from_numpy(np.sqrt(np.maximum(s2 / cnt - mean * mean, 0))).float()
    return data


def _patch_selection(
    data: TrainingData, batch: Sequence[int], cfg: AlignConfig, gen: torch.Generator
) -> list[torch.Tensor]:
    """Per image of a step's batch, the mask of its tokens that enter the loss: the labelled
    ones, at most ``max_patches_per_image`` of them sampled with ``gen``. Drawn for the whole
    batch in batch order on every rank, so the sample does not depend on the world size."""
    masks = []
    for i in batch:
        keep = data.labels[i] >= 0
        if cfg.max_patches_per_image > 0:
            idx = torch.nonzero(keep)[:, 0]
            if len(idx) > cfg.max_patches_per_image:
                perm = torch.randperm(len(idx), generator=gen)[: cfg.max_patches_per_image]
                keep = torch.zeros_like(keep)
                keep[idx[perm]] = True
        masks.append(keep)
    return masks


def _batch_forward(
    module: nn.Module,
    fs: FeatureSet,
    data: TrainingData,
    batch: Sequence[int],
    masks: Sequence[torch.Tensor],
    cfg: AlignConfig,
    device: torch.device,
    d_in: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned features ``(n, D_t)`` and labels ``(n,)`` of the selected patches of a batch."""
    if not batch:
        # a rank with no image in this step: an empty output that still reaches every
        # parameter, so that DistributedDataParallel sees (zero) gradients for all of them
        x = torch.zeros(1, 1, d_in, device=device)
        z = module(x, torch.ones(1, 1, dtype=torch.bool, device=device))[0, :0]
        return z, torch.zeros(0, dtype=torch.long, device=device)
    seqs, labels = [], []
    for i in batch:
        x = data.feats.get(i)
        if x is None:
            x = torch.from_numpy(
                np.asarray(fs.read(i, names=[cfg.tensor]).tensors[cfg.tensor], np.float32)
            )
        sizes = [int(gh) * int(gw) for gh, gw in data.grids[i].tolist()]
        seqs.extend(torch.split(x.to(device), sizes))
        labels.extend(torch.split(data.labels[i], sizes))
    y = torch.cat(labels).to(device)
    keep = torch.cat(list(masks)).to(device)
    if getattr(module, "module", module).arch != "block":
        # token-wise modules (mlp, linear): only the selected patches need a forward pass
        # (with --max-patches-per-image 8 that is ~1/40 of the work); same values as below
        z = module(torch.cat(seqs)[keep][None])[0]
        return z, y[keep]
    xb, valid = _pad_sequences(seqs)
    z = module(xb, valid)[valid]
    return z[keep], y[keep]


# --------------------------------------------------------------------------------------------
# The trainer (``ovss align --method fmbseg``)
# --------------------------------------------------------------------------------------------

#: The VFM input of Stage 2 (the ``fmbseg`` recipe: DINOv2-L/14, shorter side 448) [ours].
VFM_MODEL = "dinov2-l14"
VFM_PROTOCOL = Protocol(resize="short", size=448)


@register_trainer
class FMbSegTrainer(Trainer):
    """Train an alignment module (FMbSeg Stage 2) on cached VFM patches and pixel labels.

    Patch labels = majority pixel label (--min-frac); the module maps patches into CLIP text
    space and is trained with TSupCon against the frozen class text embeddings (SGD, cosine
    schedule, batches of images). A checkpoint with full provenance (feature set, label set,
    vocabulary, text encoder weights / templates, hyperparameters, library versions) is written
    after every epoch; rerunning the same command resumes from it. Segment with the aligned method
    and --checkpoint OUT/last.pt.

    \b
    [ours] choices (no public code): τ 0.1, lr 0.01, weight decay 1e-4, D_m 512, 8 heads,
    MLP ratio 4, block attention within a window, one prototype per class = l2n(mean of its
    synonyms' embeddings), SupCon averaged over anchors with a positive, input
    standardisation, patch-label majority with ignore as a candidate and --min-frac 0.5.
    """

    name = "fmbseg"
    Config = AlignConfig
    doc = "FMbSeg Stage 2: alignment module on VFM patches, TSupCon against class text (align)"
    needs_labels = True
    segment_method = "aligned"
    smoke_overrides: ClassVar[dict[str, Any]] = {
        "arch": "block",
        "hidden_dim": 8,
        "heads": 2,
        "mlp_ratio": 2.0,
        "epochs": 2,
        "batch_images": 8,
        "lr": 0.5,
        "max_patches_per_image": 16,
    }

    @classmethod
    def requirements(cls, config: AlignConfig) -> list[Requirement]:
        """FMbSeg Stage 1's sets (CLIP-L/14 windows, SAM-H; its pseudo-labels are the training
        labels) and Stage 2's input, DINOv2-L/14 at shorter side 448 [ours] (the training
        options do not change them: no model field)."""
        from methods.fmbseg_stage1 import FMbSegStage1Config, FMbSegStage1Segmenter

        stage1 = FMbSegStage1Segmenter.requirements(FMbSegStage1Config())
        vfm = FeatureRequirement("vfm", VFM_MODEL, VFM_PROTOCOL, (config.tensor,))
        return [dataclasses.replace(r, model_field="") for r in stage1] + [vfm]

    @classmethod
    def vocabulary_defaults(cls, config: AlignConfig) -> VocabularyDefaults:
        """The pipeline's text side (``extract --for fmbseg``): Stage 1's CLIP (clip-l14) and
        the paper's one template (``single``), SCLIP class files."""
        from methods.fmbseg_stage1 import FMbSegStage1Config, FMbSegStage1Segmenter

        return FMbSegStage1Segmenter.vocabulary_defaults(FMbSegStage1Config())

    @classmethod
    def training_text_defaults(cls, config: AlignConfig) -> VocabularyDefaults:
        """When the label set records no CLIP (e.g. a dataset's GT): clip-b16 with ``single``
        [ours]."""
        return VocabularyDefaults(text_model="clip-b16", templates="single", family="sclip")

    def fit(self, request: TrainRequest, progress: ProgressFn | None = None) -> TrainResult:
        """Train (or resume) an alignment module; returns the result with ``last.pt``.

        ``request.features`` names the VFM feature set (None: ``dinov2-l14@short448``);
        ``request.labels`` the pixel labels (class k = label k); ``request.vocab`` (optional)
        class embeddings to use as they are, else the labels' class names are embedded with
        ``request.text`` (explicit > the label set's recorded CLIP and templates > clip-b16 and
        ``single``). ``request.out_dir`` default: ``<store>/../align/<feature set>-<arch>-<loss>``.
        A checkpoint of another run (other features, vocabulary, labels or hyperparameters) in
        ``out_dir`` is an error unless ``request.restart``; a finished run returns at once.

        The checkpoint dict holds ``module`` (state dict), ``optimizer``, ``epoch``, ``step``,
        ``history`` (per-epoch mean loss, patch accuracy vs the class prototypes, seconds,
        images/s) and ``provenance`` (see ``methods.train.checkpoint_provenance``).

        Under torchrun (``WORLD_SIZE`` > 1, see ``methods.train.setup_distributed``) the module
        is wrapped in DistributedDataParallel and each step's images are split into contiguous
        per-rank shares; the ranks' aligned patches are gathered so every rank evaluates the
        loss of the whole step's batch, the same objective (and, up to floating-point summation
        order, the same gradient) as one process. Only rank 0 reports progress and writes the
        checkpoint; rank 0 embeds the classes first and every rank stops with its error.
        """
        cfg = request.config if request.config is not None else AlignConfig()
        with setup_distributed(request.device) as ctx:
            return self._fit(request, cfg, ctx, progress if ctx.rank == 0 else None)

    def _fit(
        self,
        request: TrainRequest,
        cfg: AlignConfig,
        ctx: DistContext,
        progress: ProgressFn | None,
    ) -> TrainResult:
        store = FeatureStore.open(request.store)
        source = open_labels(store, request.labels)
        if source is None:
            raise OvssError(
                "fmbseg trains on pixel labels: give a label set of the store or a dataset's GT"
            )
        vocab, te, text_model = request.vocab, request.text_embeddings, request.text.text_model
        if vocab is None:
            text_model, templates = resolve_text(
                request.text, source, self.training_text_defaults(cfg)
            )
            vocab, te = ctx.rank0_first(
                lambda: embed_classes(
                    request.store, source.class_names, text_model, templates, request.text, cfg.seed
                )
            )
        fs = _resolve_features(store, request.features or (VFM_MODEL, VFM_PROTOCOL))
        if cfg.tensor not in fs.tensor_names:
            raise OvssError(f"feature set '{fs.key}' has no tensor '{cfg.tensor}'")
        if len(source.class_names) != vocab.num_classes:
            raise OvssError(
                f"the labels have {len(source.class_names)} classes but the vocabulary has "
                f"{vocab.num_classes}: embed the labels' classes"
            )
        dev = ctx.device
        protos = _class_prototypes(vocab).to(dev)
        d_in = int(np.prod(next(s.row_shape for s in fs.specs if s.name == cfg.tensor)))
        d_out = int(protos.shape[1])
        prov = checkpoint_provenance(
            self.name,
            cfg,
            features=fs,
            tensor=cfg.tensor,
            vocabulary={
                "class_names": [list(c) for c in vocab.class_names],
                "source": getattr(vocab, "source", ""),
                "templates": getattr(vocab, "templates", ""),
                "text_model": getattr(vocab, "text_model", None),
                **text_identity(vocab, text_model, store, te),
            },
            labels=source.describe(),
            dims={"in": d_in, "out": d_out},
        )
        out = (
            Path(request.out_dir)
            if request.out_dir
            else Path(request.store).parent
            / "align"
            / (f"{fs.key.replace('@', '_')}-{cfg.arch}-{cfg.loss}")
        )
        out.mkdir(parents=True, exist_ok=True)
        ckpt_path = out / CHECKPOINT_NAME

        torch.manual_seed(cfg.seed)
        module = AlignmentModule(d_in, d_out, cfg.arch, cfg.hidden_dim, cfg.heads, cfg.mlp_ratio)
        module.to(dev)
        opt = torch.optim.SGD(
            module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        data = prepare_training_data(fs, source, cfg, progress)
        if cfg.input_norm:
            module.set_input_stats(data.mean.to(dev), data.std.to(dev))
        steps_per_epoch = math.ceil(len(data.indices) / cfg.batch_images)
        total = steps_per_epoch * cfg.epochs
        start_epoch, step, history = 0, 0, []
        ck = resume_state(
            ckpt_path, prov, request.restart, map_location=dev, trust=request.trust_checkpoint
        )
        if ck is not None:
            module.load_state_dict(ck["module"])
            opt.load_state_dict(ck["optimizer"])
            start_epoch, step, history = int(ck["epoch"]), int(ck["step"]), list(ck["history"])
        model: nn.Module = module
        if ctx.world > 1:
            model = DistributedDataParallel(
                module, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        created = now_utc()
        loss_fn = get_loss(cfg.loss, LOSS_FAMILY)
        meter = StepMeter(progress, cfg.epochs, total, unit="images")

        def lr_at(s: int) -> float:
            return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(s, total) / total))

        for epoch in range(start_epoch, cfg.epochs):
            meter.start_epoch()
            module.train()
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            order = [data.indices[j] for j in torch.randperm(len(data.indices), generator=gen)]
            losses, correct, seen = [], 0, 0
            for b in range(steps_per_epoch):
                batch = order[b * cfg.batch_images : (b + 1) * cfg.batch_images]
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                masks = _patch_selection(data, batch, cfg, gen)
                share = ctx.rank_slice(len(batch))
                z, y = _batch_forward(model, fs, data, batch[share], masks[share], cfg, dev, d_in)
                z, y = ctx.gather_rows(z, y)
                if len(z) == 0:
                    step += 1
                    continue
                loss = loss_fn(z, y, protos, cfg.tau)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                losses.append(float(loss.detach()))
                with torch.no_grad():
                    correct += int(((z @ protos.T).argmax(1) == y).sum())
                    seen += len(y)
                meter.step(epoch + 1, step, losses[-1], lr_at(step), len(batch))
            history.append(
                meter.end_epoch(
                    {
                        "epoch": epoch + 1,
                        "loss": float(np.mean(losses)) if losses else None,
                        "patch_acc": correct / max(seen, 1),
                    }
                )
            )
            ctx.barrier()
            if ctx.rank == 0:
                save_checkpoint(
                    {
                        "format": CHECKPOINT_FORMAT,
                        "trainer": self.name,
                        "module": module.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": epoch + 1,
                        "step": step,
                        "history": history,
                        "provenance": {**prov, "created": created},
                        "train_images": len(data.indices),
                        "world_size": ctx.world,
                    },
                    ckpt_path,
                )
            ctx.barrier()
            meter.report_epoch(history[-1])
        return TrainResult(
            trainer=self.name,
            checkpoint=str(ckpt_path),
            epochs_done=cfg.epochs,
            steps_done=step,
            history=history,
            provenance=prov,
            summary={"train_images": len(data.indices)},
            rank=ctx.rank,
            world_size=ctx.world,
            segment_method=self.segment_method,
        )


def train_alignment(
    store_path: str,
    features: str | tuple[str, Protocol] | None,
    label_source: str | LabelSource,
    vocab: Any,
    cfg: AlignConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    resume: bool = True,
    text_model: str | None = None,
    text: Any = None,
) -> Path:
    """``FMbSegTrainer().fit`` with class embeddings given; returns the checkpoint path.

    Args:
        store_path: the feature store.
        features: feature set key (``dinov2-l14@short448``), a model name with a single set in
            the store, or ``(model, Protocol)``.
        label_source: a label set name in the store or a :class:`LabelSource` (e.g.
            ``DatasetLabelSource`` for a dataset's GT, as the demo does).
        vocab: a ``methods.base.Vocab`` whose classes are the label indices (class k = label k);
            its embeddings ``(Q, D_t)`` are frozen text prototypes.
        cfg: hyperparameters (:class:`AlignConfig`).
        progress: called with dicts ``{"stage", "epoch", "step", "steps", "loss", "lr", ...}``.
        out_dir: where ``last.pt`` lives (default ``<store>/../align/<feature set>-<arch>-<loss>``).
        device: torch device for the module (features are moved there per batch).
        resume: continue from ``out_dir/last.pt`` when it was made by the same run; False starts
            over.
        text_model: recorded in the checkpoint (the CLIP text model of ``vocab``).
        text: the ``featurestore.text.TextEmbeddings`` behind ``vocab`` (its identity is
            recorded; without it the store's matching text set is looked up, see
            ``methods.train.text_identity``).
    """
    labels = LabelRequest(set_name=label_source) if isinstance(label_source, str) else label_source
    request = TrainRequest(
        store=str(store_path),
        config=cfg,
        features=features,
        labels=labels,
        vocab=vocab,
        text_embeddings=text,
        text=TextOptions(text_model=text_model),
        out_dir=out_dir,
        restart=not resume,
        device=device,
    )
    return Path(FMbSegTrainer().fit(request, progress).checkpoint)


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[AlignmentModule, dict[str, Any]]:
    """The trained module (eval mode) and the checkpoint dict (without weights).

    Loaded with ``weights_only=True`` (``methods.train.read_checkpoint``): a file holding
    pickled objects is refused with a one-line error.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no alignment checkpoint at {p}", str(p), "missing")
    ck = read_checkpoint(p, device)
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{p} is not an ovss alignment checkpoint (format {ck.get('format')})", str(p), "format"
        )
    prov = ck["provenance"]
    c = prov["config"]
    module = AlignmentModule(
        prov["dims"]["in"],
        prov["dims"]["out"],
        c["arch"],
        c["hidden_dim"],
        c["heads"],
        c["mlp_ratio"],
    )
    module.load_state_dict(ck["module"])
    module.to(device).eval()
    meta = {k: v for k, v in ck.items() if k not in ("module", "optimizer")}
    return module, meta


def feature_key(model: str, protocol: Protocol) -> str:
    """The store key of a (model, protocol) feature set."""
    return set_key(model, protocol)
