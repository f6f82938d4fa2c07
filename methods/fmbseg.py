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
- :func:`train_alignment` — SGD + cosine schedule over batches of images from the store, a
  checkpoint with full provenance after every epoch, resume from the last checkpoint.
- :func:`load_checkpoint` — the module and its provenance back.
- :func:`text_identity` — the text encoder behind the class embeddings (weights identity,
  templates, vocabulary key), recorded in the checkpoint with the feature set and labels.
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
import datetime as _dt
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from featurestore import __version__
from featurestore.errors import OvssError
from featurestore.extract import resolve_device  # the shared --device rule (re-exported)
from featurestore.protocol import Protocol
from featurestore.store import STATUS_OK, FeatureSet, FeatureStore, ImageFeatures, set_key

__all__ = [
    "ARCHS",
    "LOSSES",
    "AlignConfig",
    "AlignmentModule",
    "DatasetLabelSource",
    "LabelSource",
    "StoreLabelSource",
    "align_features",
    "load_checkpoint",
    "patch_labels",
    "proto_loss",
    "resolve_device",
    "supcon_loss",
    "text_identity",
    "train_alignment",
    "tsupcon_loss",
]

ARCHS = ("block", "mlp", "linear")
LOSSES = ("tsupcon", "supcon", "proto")
IGNORE = -1
CHECKPOINT_FORMAT = 1
#: Features of the training images are kept in memory when they fit in this many bytes.
CACHE_BYTES = 2 << 30

ProgressFn = Callable[[dict[str, Any]], None]


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


class StoreLabelSource:
    """Labels from a label set of the store (e.g. pseudo-labels from ``--write-labels``)."""

    def __init__(self, store: FeatureStore, name: str):
        from featurestore.labelsets import LabelSet

        self.set = LabelSet(store, name)
        info = self.set.info
        names = info.get("class_names")
        if not names:
            raise OvssError(f"label set '{name}' records no class names; it cannot train")
        self.class_names = [list(c) if isinstance(c, list) else [str(c)] for c in names]
        self.name = name

    def labels(self, index: int) -> np.ndarray | None:
        return self.set.read(index) if self.set.done[index] else None

    def text_defaults(self) -> dict[str, str]:
        """The CLIP model (role ``clip``) and template set that produced this label set, as
        recorded by ``ovss segment --write-labels`` (empty when not recorded): Stage 2 aligns
        to the same text space by default."""
        rec = self.set.info.get("protocol") or {}
        out = {}
        clip = (rec.get("backbones") or {}).get("clip") or {}
        if clip.get("model"):
            out["text_model"] = str(clip["model"])
        if rec.get("templates"):
            out["templates"] = str(rec["templates"])
        return out

    def describe(self) -> dict[str, Any]:
        info = self.set.info
        return {
            "kind": "label_set",
            "name": self.name,
            "created": info.get("created"),
            "protocol": info.get("protocol"),
        }


class DatasetLabelSource:
    """Ground-truth labels of a dataset (e.g. the demo's ``custom`` collages), by image id.

    Args:
        store: the store; its image ids are matched with the dataset's.
        dataset: dataset name (``custom`` for the demo).
        data_root: the dataset root.
        split: only this split's images get labels (None: the dataset's default split).
    """

    def __init__(self, store: FeatureStore, dataset: str, data_root: str, split: str | None = None):
        from featurestore.datasets import class_names, get_dataset, list_dataset_images

        self.spec = get_dataset(dataset, data_root) if dataset == "custom" else get_dataset(dataset)
        self.dataset, self.data_root, self.split = dataset, str(data_root), split
        recs = list_dataset_images(dataset, data_root, split)
        ids = {i: n for n, i in enumerate(store.image_ids)}
        self.paths = {ids[r.image_id]: r.label_path for r in recs if r.image_id in ids}
        if not self.paths:
            raise OvssError(f"no {dataset} {split or ''} image of {data_root} is in the store")
        self.class_names = [list(c) for c in class_names(dataset, data_root=data_root)]

    def labels(self, index: int) -> np.ndarray | None:
        from featurestore.labels import load_label

        path = self.paths.get(index)
        return None if path is None else load_label(self.spec, path)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "dataset",
            "dataset": self.dataset,
            "data_root": self.data_root,
            "split": self.split,
            "images": len(self.paths),
        }


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


_LOSS_FNS = {"tsupcon": tsupcon_loss, "supcon": supcon_loss, "proto": proto_loss}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class AlignConfig:
    """Hyperparameters of ``ovss align`` (all recorded in the checkpoint).

    Attributes:
        arch: ``block`` | ``mlp`` | ``linear`` (module variants, METHODS.md §1.2).
        loss: ``tsupcon`` | ``supcon`` | ``proto``.
        tau: temperature of every dot product **[ours: 0.1]**; 1 = the paper's Eq. literally.
        hidden_dim, heads, mlp_ratio: module width D_m **[ours: 512]**, heads **[ours: 8]**,
            block MLP ratio **[ours: 4]**.
        epochs: passes over the training images (paper: 10).
        batch_images: images per optimisation step (paper: 5).
        lr: initial SGD learning rate **[ours: 0.01]**, cosine-annealed to 0 per step.
        momentum: SGD momentum (0.9).
        weight_decay: **[ours: 1e-4]**.
        min_frac: patch-label purity threshold **[ours: 0.5]**.
        max_patches_per_image: > 0 samples that many labelled patches per image and step
            (bounds the O(n²) loss memory) **[ours: 0 = all]**.
        seed: init, shuffling and sampling seed **[ours: 0]**.
        tensor: feature tensor read from the store (``patch``).
        input_norm: standardise each input dimension with the mean/std of the training
            patches (frozen, saved with the module) **[ours: on]**; without it SGD at lr 0.01
            barely moves on features dominated by a shared mean direction.
    """

    arch: str = "block"
    loss: str = "tsupcon"
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
# distributed data parallel (torchrun)


@dataclass
class DistContext:
    """Where this process stands in a torchrun job (``world == 1``: a plain single process)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owned: bool = False  # this context initialised the process group and destroys it

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False


def setup_distributed(device: str | torch.device = "cpu") -> DistContext:
    """Join the torchrun job described by the environment when ``WORLD_SIZE`` > 1.

    The process group (``env://``: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``)
    uses gloo for a CPU ``device`` and nccl for CUDA, where ``LOCAL_RANK`` picks the GPU
    (``auto``: see :func:`resolve_device`, except that with ``WORLD_SIZE`` > 1 and no CUDA
    ``auto`` is the CPU, never MPS: gloo cannot carry MPS tensors). A group that is already
    initialised is used as is (and left to its owner to destroy).

    Raises:
        OvssError: an MPS ``device`` with ``WORLD_SIZE`` > 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and str(device).strip().lower() == "auto" and not torch.cuda.is_available():
        device = "cpu"
    dev = resolve_device(device)
    if world <= 1:
        return DistContext(device=dev)
    if dev.type == "mps":
        raise OvssError(
            "--device mps cannot train under torchrun (gloo has no MPS tensors); use cpu or cuda"
        )
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, owned)


def _rank_slice(n: int, ctx: DistContext) -> slice:
    """The contiguous share of rank ``ctx.rank`` of ``n`` items (sizes differ by at most 1;
    concatenated in rank order the shares give the items back in order)."""
    base, extra = divmod(n, ctx.world)
    lo = ctx.rank * base + min(ctx.rank, extra)
    return slice(lo, lo + base + (ctx.rank < extra))


class _GatherRows(torch.autograd.Function):
    """All ranks' rows concatenated in rank order (every rank gets the same tensor).

    Every rank then evaluates the identical loss of the global batch, so the gradient arriving
    here is already the full one on each rank: backward keeps this rank's rows, times the world
    size, which the gradient averaging of DistributedDataParallel divides out again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        pad = x.new_zeros((max(sizes), *x.shape[1:]))
        pad[: len(x)] = x
        parts = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(parts, pad)
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        lo = sum(ctx.sizes[: ctx.rank])
        return g[lo : lo + ctx.sizes[ctx.rank]] * len(ctx.sizes), None


def _gather_batch(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = torch.tensor([len(z)], device=z.device)
    ns = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(ns, n)
    sizes = [int(v) for v in ns]
    with torch.no_grad():
        y_all = _GatherRows.apply(y, sizes)
    return _GatherRows.apply(z, sizes), y_all


def text_identity(
    vocab: Any, text_model: str | None = None, store: Any = None, text: Any = None
) -> dict[str, Any]:
    """Identity of the text encoder and text set behind ``vocab``'s embeddings (JSON-safe).

    Args:
        vocab: the ``methods.base.Vocab`` trained against.
        text_model: the CLIP registry name of its text tower.
        store: a store (or path) where the text set is looked up when ``text`` is not given
            (found only when ``vocab.templates`` names the template set and the cached
            embeddings equal ``vocab``'s).
        text: the ``featurestore.text.TextEmbeddings`` the vocabulary was made from.

    Returns:
        ``text_model``, ``templates`` (template-set name), ``text_weights`` (``sha256:...`` of
        the checkpoint, ``random-init:SEED``, or None when unknown), ``text_arch_overrides``,
        ``text_set`` (its key in the store) and ``vocabulary_key`` (the vocabulary's
        16-hex-digit key: sha256 of its synonym lists).
    """
    from featurestore.text import Vocabulary, load_text_embeddings

    names = [list(c) for c in vocab.class_names]
    out: dict[str, Any] = {
        "text_model": text_model,
        "templates": getattr(vocab, "templates", "") or None,
        "text_weights": None,
        "text_arch_overrides": None,
        "text_set": None,
        "vocabulary_key": Vocabulary.from_names(names).key(),
    }
    if text is None and store is not None and text_model and out["templates"]:
        try:
            te = load_text_embeddings(
                store, text_model, Vocabulary.from_names(names), out["templates"]
            )
            same = tuple(te.embeddings.shape) == tuple(vocab.embeddings.shape) and np.allclose(
                te.embeddings, vocab.embeddings.float().cpu().numpy(), atol=1e-6
            )
            text = te if same else None
        except OvssError:
            text = None
    if text is not None:
        out.update(
            text_model=text_model or text.text_model,
            templates=text.template_set,
            text_weights=text.weights or None,
            text_arch_overrides=text.provenance.get("encoder", {}).get("arch_overrides"),
            text_set=text.key,
            vocabulary_key=text.provenance.get("vocabulary", {}).get("key")
            or out["vocabulary_key"],
        )
    return out


def _provenance(
    fs: FeatureSet,
    vocab: Any,
    source: LabelSource,
    cfg: AlignConfig,
    d_in: int,
    d_out: int,
    text: dict[str, Any] | None = None,
) -> dict[str, Any]:
    prov = fs.provenance
    return {
        "features": {
            "key": fs.key,
            "model": prov["model"],
            "protocol": prov["protocol"],
            "weights": prov["backbone"].get("weights"),
            "tensor": cfg.tensor,
            "store": fs.store.path,
        },
        "vocabulary": {
            "class_names": [list(c) for c in vocab.class_names],
            "source": getattr(vocab, "source", ""),
            "templates": getattr(vocab, "templates", ""),
            "text_model": getattr(vocab, "text_model", None),
            **(text or {}),
        },
        "labels": source.describe(),
        "config": dataclasses.asdict(cfg),
        "dims": {"in": d_in, "out": d_out},
        "ovss_version": __version__,
    }


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two provenances (a resume must match exactly: the
    cosine schedule depends on ``epochs``, so a longer run is a new run)."""
    diff = [k for k in ("features", "vocabulary", "labels", "dims") if a.get(k) != b.get(k)]
    ca, cb = a["config"], b["config"]
    diff += [f"config.{k}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    return diff


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_alignment(
    store_path: str,
    features: str | tuple[str, Protocol],
    label_source: str | LabelSource,
    vocab: Any,
    cfg: AlignConfig | None = None,
    progress: ProgressFn | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    resume: bool = True,
    text_model: str | None = None,
    text: Any = None,
) -> Path:
    """Train an alignment module from the store; returns the checkpoint path (``last.pt``).

    Args:
        store_path: the feature store.
        features: feature set key (``dinov2-l14@short448``), a model name with a single set in
            the store, or ``(model, Protocol)``.
        label_source: a label set name in the store or a :class:`LabelSource` (e.g.
            :class:`DatasetLabelSource` for a dataset's GT, as the demo does).
        vocab: a ``methods.base.Vocab`` whose classes are the label indices (class k = label k);
            its embeddings ``(Q, D_t)`` are frozen text prototypes.
        cfg: hyperparameters (:class:`AlignConfig`).
        progress: called with dicts ``{"stage", "epoch", "step", "steps", "loss", "lr", ...}``.
        out_dir: where ``last.pt`` lives (default ``<store>/../align/<feature set>-<arch>-<loss>``).
        device: torch device for the module (features are moved there per batch).
        resume: continue from ``out_dir/last.pt`` when it was made by the same run (same
            features, vocabulary, labels and hyperparameters); a finished run returns at once;
            False starts over. A mismatching checkpoint is an error unless ``resume=False``.
        text_model: recorded in the checkpoint (the CLIP text model of ``vocab``).
        text: the ``featurestore.text.TextEmbeddings`` behind ``vocab``: the text encoder's
            identity (weights ``sha256:...`` / ``random-init:SEED``, templates, vocabulary key,
            text set) is recorded from it; without it the store's text set of ``text_model``
            and ``vocab.templates`` is used when its embeddings equal ``vocab``'s (see
            :func:`text_identity`).

    Returns:
        The checkpoint path. Its dict holds ``module`` (state dict), ``optimizer``, ``epoch``,
        ``step``, ``history`` (per-epoch mean loss, patch accuracy vs the class prototypes,
        seconds) and ``provenance`` (feature set, vocabulary, label set, hyperparameters).

    Under torchrun (``WORLD_SIZE`` > 1, see :func:`setup_distributed`) the module is wrapped in
    DistributedDataParallel and each step's images are split into contiguous per-rank shares;
    the ranks' aligned patches are gathered so every rank evaluates the loss of the whole
    step's batch, the same objective (and, up to floating-point summation order, the same
    gradient) as one process. Only rank 0 reports progress and writes the checkpoint.
    """
    ctx = setup_distributed(device)
    try:
        return _train_alignment(
            store_path,
            features,
            label_source,
            vocab,
            cfg,
            progress,
            out_dir,
            ctx,
            resume,
            text_model,
            text,
        )
    finally:
        ctx.close()


def _train_alignment(
    store_path: str,
    features: str | tuple[str, Protocol],
    label_source: str | LabelSource,
    vocab: Any,
    cfg: AlignConfig | None,
    progress: ProgressFn | None,
    out_dir: str | os.PathLike | None,
    ctx: DistContext,
    resume: bool,
    text_model: str | None,
    text: Any = None,
) -> Path:
    cfg = cfg or AlignConfig()
    if ctx.rank != 0:
        progress = None
    store = FeatureStore.open(store_path)
    fs = _resolve_features(store, features)
    if cfg.tensor not in fs.tensor_names:
        raise OvssError(f"feature set '{fs.key}' has no tensor '{cfg.tensor}'")
    source = (
        StoreLabelSource(store, label_source) if isinstance(label_source, str) else label_source
    )
    if len(source.class_names) != vocab.num_classes:
        raise OvssError(
            f"the labels have {len(source.class_names)} classes but the vocabulary has "
            f"{vocab.num_classes}: embed the labels' classes"
        )
    dev = ctx.device
    protos = _class_prototypes(vocab).to(dev)
    d_in = int(np.prod(next(s.row_shape for s in fs.specs if s.name == cfg.tensor)))
    d_out = int(protos.shape[1])
    ident = text_identity(vocab, text_model, store, text)
    prov = _provenance(fs, vocab, source, cfg, d_in, d_out, ident)
    out = (
        Path(out_dir)
        if out_dir
        else Path(store_path).parent
        / "align"
        / (f"{fs.key.replace('@', '_')}-{cfg.arch}-{cfg.loss}")
    )
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "last.pt"

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
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        diff = _same_run(ck["provenance"], prov)
        if diff:
            raise OvssError(
                f"{ckpt_path} was trained with other {', '.join(diff)}; pass --restart (or "
                "another --out) to train from scratch"
            )
        module.load_state_dict(ck["module"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, step, history = int(ck["epoch"]), int(ck["step"]), list(ck["history"])
    model: nn.Module = module
    if ctx.world > 1:
        model = DistributedDataParallel(
            module, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def lr_at(s: int) -> float:
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(s, total) / total))

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        module.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = [data.indices[j] for j in torch.randperm(len(data.indices), generator=gen)]
        losses, correct, seen = [], 0, 0
        for b in range(steps_per_epoch):
            batch = order[b * cfg.batch_images : (b + 1) * cfg.batch_images]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            masks = _patch_selection(data, batch, cfg, gen)
            share = _rank_slice(len(batch), ctx)
            z, y = _batch_forward(model, fs, data, batch[share], masks[share], cfg, dev, d_in)
            if ctx.world > 1:
                z, y = _gather_batch(z, y)
            if len(z) == 0:
                step += 1
                continue
            loss = _LOSS_FNS[cfg.loss](z, y, protos, cfg.tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            with torch.no_grad():
                correct += int(((z @ protos.T).argmax(1) == y).sum())
                seen += len(y)
            if progress:
                progress(
                    {
                        "stage": "train",
                        "epoch": epoch + 1,
                        "epochs": cfg.epochs,
                        "step": step,
                        "steps": total,
                        "loss": losses[-1],
                        "lr": lr_at(step),
                    }
                )
        history.append(
            {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)) if losses else None,
                "patch_acc": correct / max(seen, 1),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        ctx.barrier()
        if ctx.rank == 0:
            _save_atomic(
                {
                    "format": CHECKPOINT_FORMAT,
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
        if progress:
            progress({"stage": "epoch", **history[-1], "epochs": cfg.epochs})
    return ckpt_path


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[AlignmentModule, dict[str, Any]]:
    """The trained module (eval mode) and the checkpoint dict (without weights)."""
    p = Path(path)
    if not p.is_file():
        raise OvssError(f"no alignment checkpoint at {p}; train one with 'ovss align'")
    ck = torch.load(p, map_location=device, weights_only=False)
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise OvssError(f"{p} is not an ovss alignment checkpoint (format {ck.get('format')})")
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
