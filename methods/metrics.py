"""Dataset-level IoU accumulation with the semantics of mmseg ``IoUMetric`` (``spec/EVAL.md`` §5).

Per image, with ``C`` classes and ``ignore_index`` (255 by default):

- pixels whose ground truth is ``ignore_index`` are removed from *both* maps;
- ``area_intersect``, ``area_pred`` and ``area_label`` are ``torch.histc(..., bins=C, min=0,
  max=C-1)`` counts, so a prediction (or ground-truth id) outside ``[0, C-1]`` is simply not
  counted in its own histogram (the pixel's other map still counts);
- ``area_union = area_pred + area_label - area_intersect``.

The four vectors are summed over the whole dataset; then ``IoU_c = I_c / U_c`` and
``Acc_c = I_c / L_c`` (NaN when the denominator is 0, and NaN classes are left out of the means),
``aAcc = sum(I) / sum(L)``, and each summary is ``np.round(np.nanmean(x) * 100, 2)``.

Counts are exact ``int64`` here. mmseg accumulates ``float32`` histograms, which stop being exact
once a class passes 2**24 pixels over the dataset; the difference is far below the 0.01 shown.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from featurestore.errors import OvssError

if TYPE_CHECKING:  # a torch tensor exists only once torch is imported: no import here
    import torch

__all__ = ["IoUAccumulator", "MetricResult"]

# Above this many confusion cells, per-map bincounts are used instead of one joint bincount.
_MAX_JOINT_BINS = 1 << 22


def _as_label_array(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """Return an integer numpy view/copy of a label map given as numpy or torch."""
    torch = sys.modules.get("torch")  # no tensor can exist before torch is imported
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    else:
        x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise OvssError(
            f"{what} must be an integer label map, got dtype {x.dtype}; "
            "pass class ids (e.g. logits.argmax(0)), not scores"
        )
    return x


def _to_json_float(x: float) -> float | None:
    """``float`` for finite values, ``None`` for NaN (JSON has no NaN)."""
    x = float(x)
    return None if math.isnan(x) else x


def _summary(x: np.ndarray) -> float:
    """mmseg's summary: ``np.round(np.nanmean(x) * 100, 2)``; NaN when every entry is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice"
        return float(np.round(np.nanmean(x) * 100, 2))


@dataclass(frozen=True, eq=False)
class MetricResult:
    """Metrics of one accumulation (a whole dataset, or whatever was fed to the accumulator).

    Attributes:
        num_classes: ``C``.
        num_images: number of ``update`` calls (images) that contributed.
        area_intersect: ``(C,)`` int64, pixels predicted as class c where the GT is c.
        area_union: ``(C,)`` int64, ``area_pred + area_label - area_intersect``.
        area_pred: ``(C,)`` int64, pixels predicted as class c (non-ignored GT only).
        area_label: ``(C,)`` int64, GT pixels of class c.
        iou: ``(C,)`` float64 in [0, 1]; NaN where ``area_union == 0`` (class absent from GT and
            predictions), 0 for a class predicted but absent from GT.
        acc: ``(C,)`` float64 in [0, 1]; NaN where ``area_label == 0``.
        miou: ``np.round(np.nanmean(iou) * 100, 2)`` (percent).
        macc: ``np.round(np.nanmean(acc) * 100, 2)`` (percent).
        aacc: ``np.round(sum(I) / sum(L) * 100, 2)`` (percent), pixel accuracy.
    """

    num_classes: int
    num_images: int
    area_intersect: np.ndarray
    area_union: np.ndarray
    area_pred: np.ndarray
    area_label: np.ndarray
    iou: np.ndarray
    acc: np.ndarray
    miou: float
    macc: float
    aacc: float

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-safe dict: summaries, per-class values (NaN -> ``None``) and the raw areas.

        Args:
            class_names: optional ``C`` names, stored under ``per_class.name``.
        """
        if class_names is not None and len(class_names) != self.num_classes:
            raise OvssError(
                f"got {len(class_names)} class names for a metric over {self.num_classes} classes"
            )
        per_class: dict[str, list] = {
            "iou": [_to_json_float(v) for v in self.iou],
            "acc": [_to_json_float(v) for v in self.acc],
            "area_intersect": [int(v) for v in self.area_intersect],
            "area_union": [int(v) for v in self.area_union],
            "area_pred": [int(v) for v in self.area_pred],
            "area_label": [int(v) for v in self.area_label],
        }
        if class_names is not None:
            per_class = {"name": list(class_names), **per_class}
        return {
            "mIoU": _to_json_float(self.miou),
            "mAcc": _to_json_float(self.macc),
            "aAcc": _to_json_float(self.aacc),
            "num_classes": self.num_classes,
            "num_images": self.num_images,
            "per_class": per_class,
        }


class IoUAccumulator:
    """Sums mmseg ``IoUMetric`` areas over a dataset; ``compute()`` gives mIoU/mAcc/aAcc.

    Args:
        num_classes: ``C``, the number of classes of the dataset (``len(classes)``).
        ignore_index: GT value whose pixels are dropped from both maps (default 255).

    Example::

        acc = IoUAccumulator(150)
        for pred, gt in pairs:          # (H, W) integer maps, same shape
            acc.update(pred, gt)
        print(acc.compute().miou)
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise OvssError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.num_images = 0
        self.area_intersect = np.zeros(self.num_classes, dtype=np.int64)
        self.area_pred = np.zeros(self.num_classes, dtype=np.int64)
        self.area_label = np.zeros(self.num_classes, dtype=np.int64)

    @property
    def area_union(self) -> np.ndarray:
        """``(C,)`` int64, ``area_pred + area_label - area_intersect``."""
        return self.area_pred + self.area_label - self.area_intersect

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.num_images = 0
        for a in (self.area_intersect, self.area_pred, self.area_label):
            a[:] = 0

    def update(self, pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> None:
        """Add one image (or a batch: any shape, as long as ``pred`` and ``gt`` agree).

        Args:
            pred: integer predicted class ids, any shape (usually ``(H, W)``), numpy or torch.
            gt: integer ground-truth ids of the same shape; ``ignore_index`` marks ignored pixels.

        Raises:
            OvssError: shapes differ, or a map is not of an integer dtype.
        """
        p = _as_label_array(pred, "pred")
        g = _as_label_array(gt, "gt")
        if p.shape != g.shape:
            raise OvssError(
                f"prediction shape {p.shape} != ground-truth shape {g.shape}; predictions must "
                "be at the original image resolution (never resize the GT)"
            )
        inter, area_p, area_l = self._areas(p.ravel(), g.ravel())
        self.area_intersect += inter
        self.area_pred += area_p
        self.area_label += area_l
        self.num_images += 1

    def _areas(self, p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-class ``(intersect, pred, label)`` counts of flat maps, histc semantics."""
        c = self.num_classes
        valid = g != self.ignore_index
        if not valid.all():
            p, g = p[valid], g[valid]
        if p.size == 0:
            zero = np.zeros(c, dtype=np.int64)
            return zero, zero.copy(), zero.copy()
        # Ids outside [0, C-1] go to an overflow bin C that is dropped at the end (histc).
        p = _clip_to_overflow(p, c)
        g = _clip_to_overflow(g, c)
        n = c + 1
        if n * n <= _MAX_JOINT_BINS:
            joint = np.bincount(g * n + p, minlength=n * n).reshape(n, n)
            inter = np.diagonal(joint)[:c].copy()
            area_p = joint[:, :c].sum(axis=0)
            area_l = joint[:c, :].sum(axis=1)
        else:
            area_p = np.bincount(p, minlength=n)[:c]
            area_l = np.bincount(g, minlength=n)[:c]
            inter = np.bincount(g[p == g], minlength=n)[:c]
        return inter.astype(np.int64), area_p.astype(np.int64), area_l.astype(np.int64)

    def merge(self, other: IoUAccumulator) -> IoUAccumulator:
        """Add another accumulator's sums into this one (e.g. from another shard); returns self."""
        if not isinstance(other, IoUAccumulator):
            raise OvssError(f"can only merge an IoUAccumulator, got {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise OvssError(
                "cannot merge accumulators with different settings: "
                f"(num_classes={self.num_classes}, ignore_index={self.ignore_index}) vs "
                f"(num_classes={other.num_classes}, ignore_index={other.ignore_index})"
            )
        self.area_intersect += other.area_intersect
        self.area_pred += other.area_pred
        self.area_label += other.area_label
        self.num_images += other.num_images
        return self

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state, for shards that run in other processes (see ``from_state_dict``)."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "num_images": self.num_images,
            "area_intersect": self.area_intersect.tolist(),
            "area_pred": self.area_pred.tolist(),
            "area_label": self.area_label.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> IoUAccumulator:
        """Rebuild an accumulator from ``state_dict()``."""
        acc = cls(state["num_classes"], state["ignore_index"])
        acc.num_images = int(state["num_images"])
        for name in ("area_intersect", "area_pred", "area_label"):
            values = np.asarray(state[name], dtype=np.int64)
            if values.shape != (acc.num_classes,):
                raise OvssError(f"accumulator state: {name} has shape {values.shape}")
            getattr(acc, name)[:] = values
        return acc

    def compute(self) -> MetricResult:
        """Metrics of everything accumulated so far (see ``MetricResult``)."""
        inter = self.area_intersect.copy()
        union = self.area_union
        label = self.area_label.copy()
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / union
            acc = inter / label
            aacc = np.float64(inter.sum()) / np.float64(label.sum())
        return MetricResult(
            num_classes=self.num_classes,
            num_images=self.num_images,
            area_intersect=inter,
            area_union=union,
            area_pred=self.area_pred.copy(),
            area_label=label,
            iou=iou,
            acc=acc,
            miou=_summary(iou),
            macc=_summary(acc),
            aacc=_summary(np.atleast_1d(aacc)),
        )


def _clip_to_overflow(x: np.ndarray, num_classes: int) -> np.ndarray:
    """``x`` as ``int64`` with every id outside ``[0, num_classes-1]`` set to ``num_classes``."""
    x = x.astype(np.int64, copy=False)
    lo, hi = x.min(), x.max()
    if lo >= 0 and hi < num_classes:
        return x
    return np.where((x >= 0) & (x < num_classes), x, num_classes)
