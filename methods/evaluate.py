"""``ovss eval``: the standard OVSS protocol on a store (or on a folder of predictions).

Streaming: one image's labels and GT are in memory at a time; the metric is the dataset-level
``IoUAccumulator`` (mmseg ``IoUMetric`` semantics, EVAL.md §5). Besides the metric a result
carries (:class:`EvalAccumulator`) the dataset's confusion matrix, every image's own mIoU and
the predictions of the best and worst images (for ``ovss report``'s galleries).
"""

from __future__ import annotations

import base64
import heapq
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featurestore.errors import ImagesNotInStoreError, OvssError
from methods.base import ScoringConfig, Segmenter, Vocab
from methods.metrics import IoUAccumulator
from methods.segment import (
    MethodRequest,
    RequestError,
    build_segmenter,
    embed_text,
    honours_trust,
    iter_segmentations,
    protocol_record,
    resolve_method,
    resolve_vocabulary,
    text_choice,
)

Progress = Callable[[str, int, int], None]


#: Images kept for each end of a result's gallery (best and worst by per-image mIoU) [ours].
GALLERY_SIZE = 4


@dataclass
class EvalResult:
    """One evaluation.

    Attributes:
        dataset, split: the benchmark and split scored.
        images: images scored (the number covers these).
        skipped: image id -> why it was not scored (empty unless ``allow_missing``: a strict
            run fails instead, see :func:`require_complete`).
        total: images of the split asked for (scored + skipped; default: their sum).
        metrics: ``MetricResult.to_dict`` (mIoU, mAcc, aAcc in percent, per-class values).
        protocol: everything needed to reproduce the result (method, config, backbones,
            scoring, vocabulary, templates, version).
        seconds: time of the image loop (s).
        reference: the published-number check (``--check-reference``), or None.
        class_names: the first name of each class.
        confusion: ``(C, C)`` pixel counts, row = ground-truth class, column = predicted class
            (ground-truth 255 left out); its diagonal is the metric's ``area_intersect``.
        per_image: per scored image ``{"image_id", "mIoU", "pixels"}``: its own mIoU (percent,
            classes present in its prediction or ground truth; None without labelled pixels)
            and its labelled pixels.
        gallery: the best and worst images by per-image mIoU, each ``{"image_id", "mIoU",
            "rank": "best"|"worst", "image_path", "label_path", "prediction_png"}`` (the
            prediction as a base64 PNG of class indices: 8-bit with up to 256 classes, else
            16-bit).
        store, data_root: where the features and the dataset were (for the report's images).
        kind: ``eval`` (a result file's type, for ``ovss report``).
    """

    dataset: str
    split: str
    images: int
    skipped: dict[str, str]
    metrics: dict[str, Any]
    protocol: dict[str, Any]
    seconds: float
    reference: dict[str, Any] | None = None
    class_names: list[str] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    per_image: list[dict[str, Any]] = field(default_factory=list)
    gallery: list[dict[str, Any]] = field(default_factory=list)
    store: str | None = None
    data_root: str | None = None
    kind: str = "eval"
    total: int = 0

    def __post_init__(self) -> None:
        if not self.total:
            self.total = self.images + len(self.skipped)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class MissingPredictionsError(OvssError):
    """Images of the benchmark without a usable prediction (missing or unreadable PNG, another
    size, skipped by the method, features not extracted): a number over a subset is not the
    benchmark's, so a strict evaluation fails.

    Attributes:
        missing: image id -> why it has no usable prediction.
        total: images of the split asked for.
        dataset: the benchmark.
    """

    def __init__(self, message: str, missing: dict[str, str], total: int, dataset: str = ""):
        super().__init__(message)
        self.missing = dict(missing)
        self.total = total
        self.dataset = dataset


#: Images a :class:`MissingPredictionsError` names in its message (then a count) [ours].
MISSING_SHOWN = 3


def require_complete(result: EvalResult, allow_missing: bool = False, label: str = "") -> None:
    """Fail unless every image of the split was scored (``allow_missing``: accept the subset;
    ``result.images`` of ``result.total`` then says what the number covers).

    Raises:
        MissingPredictionsError: names the first :data:`MISSING_SHOWN` images with their
            reasons and the count of the others.
    """
    if allow_missing or not result.skipped:
        return
    items = list(result.skipped.items())
    shown = "; ".join(f"{k} ({v})" for k, v in items[:MISSING_SHOWN])
    more = f"; and {len(items) - MISSING_SHOWN} more" if len(items) > MISSING_SHOWN else ""
    who = f"{label}: " if label else ""
    raise MissingPredictionsError(
        f"{who}{len(items)} of {result.total} {result.dataset} images have no usable "
        f"prediction: {shown}{more}",
        result.skipped,
        result.total,
        result.dataset,
    )


def encode_label_png(labels: np.ndarray) -> str:
    """``(H, W)`` class indices as a base64 PNG (``L`` mode below 256, else 16-bit)."""
    arr = np.asarray(labels)
    buf = io.BytesIO()
    if arr.size == 0 or (int(arr.min()) >= 0 and int(arr.max()) < 256):
        Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    else:
        Image.fromarray(np.clip(arr, 0, 65535).astype(np.uint16)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_label_png(data: str) -> np.ndarray:
    """The inverse of :func:`encode_label_png`: ``(H, W)`` int64 class indices."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))).astype(np.int64)


class EvalAccumulator:
    """The dataset metric plus what a report shows: the confusion matrix, per-image mIoU and
    the labels of the ``gallery`` best and worst images.

    Args:
        num_classes: ``C``.
        gallery: images kept at each end (default :data:`GALLERY_SIZE`; 0: none).
        ignore_index: ground-truth value left out (255).
    """

    def __init__(self, num_classes: int, gallery: int = GALLERY_SIZE, ignore_index: int = 255):
        self.metric = IoUAccumulator(num_classes, ignore_index)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.per_image: list[dict[str, Any]] = []
        self.gallery = int(gallery)
        self._best: list[tuple] = []  # min-heap of (miou, -order, image_id, labels, extra)
        self._worst: list[tuple] = []  # min-heap of (-miou, order, ...)

    def update(
        self, image_id: str, pred: np.ndarray, gt: np.ndarray, extra: dict | None = None
    ) -> float | None:
        """Add one image (``(H, W)`` integer maps); returns its mIoU (percent, or None)."""
        self.metric.update(pred, gt)
        c, n = self.num_classes, self.num_classes + 1
        p = np.asarray(pred).astype(np.int64, copy=False).ravel()
        g = np.asarray(gt).astype(np.int64, copy=False).ravel()
        keep = g != self.ignore_index
        p, g = p[keep], g[keep]
        p = np.where((p >= 0) & (p < c), p, c)
        g = np.where((g >= 0) & (g < c), g, c)
        joint = np.bincount(g * n + p, minlength=n * n).reshape(n, n)
        self.confusion += joint[:c, :c]
        inter = np.diagonal(joint)[:c].astype(np.float64)
        union = joint[:, :c].sum(axis=0) + joint[:c, :].sum(axis=1) - inter
        present = union > 0
        miou = None
        if present.any():
            miou = float(np.round(np.mean(inter[present] / union[present]) * 100, 2))
        self.per_image.append({"image_id": image_id, "mIoU": miou, "pixels": int(keep.sum())})
        if self.gallery and miou is not None:
            order = len(self.per_image)
            labels = np.asarray(pred)
            item = (image_id, labels, extra or {})
            self._push(self._best, (miou, -order, *item))
            self._push(self._worst, (-miou, order, *item))
        return miou

    def _push(self, heap: list, entry: tuple) -> None:
        if len(heap) < self.gallery:
            heapq.heappush(heap, entry)
        elif entry[:2] > heap[0][:2]:
            heapq.heapreplace(heap, entry)

    def gallery_entries(self) -> list[dict[str, Any]]:
        """The best images (best first), then the worst (worst first); an image in both
        lists (few images) is listed once, as best."""
        out, seen = [], set()
        for rank, heap, sign in (("best", self._best, 1), ("worst", self._worst, -1)):
            for key, _, image_id, labels, extra in sorted(heap, reverse=True):
                if image_id in seen:
                    continue
                seen.add(image_id)
                out.append(
                    {
                        "image_id": image_id,
                        "mIoU": sign * key,
                        "rank": rank,
                        **extra,
                        "prediction_png": encode_label_png(labels),
                    }
                )
        return out

    def fill(self, result: EvalResult) -> EvalResult:
        """Put the confusion matrix, per-image scores and gallery into ``result``."""
        result.confusion = self.confusion.tolist()
        result.per_image = list(self.per_image)
        result.gallery = self.gallery_entries()
        return result


def _gt_for(dataset: str, data_root: str, split: str | None):
    from featurestore.datasets import get_dataset, list_dataset_images

    spec = get_dataset(dataset, data_root) if dataset == "custom" else get_dataset(dataset)
    records = list_dataset_images(dataset, data_root, split)
    return spec, records


def _load_label(spec, path: str) -> np.ndarray:
    from featurestore.labels import load_label

    return load_label(spec, path)


def evaluate_store(
    store_path: str,
    dataset: str,
    data_root: str,
    method: str,
    vocab: Vocab,
    *,
    split: str | None = None,
    overrides: dict[str, Any] | None = None,
    scoring: ScoringConfig | None = None,
    limit: int | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    segmenter: Segmenter | None = None,
    gallery: int = GALLERY_SIZE,
) -> EvalResult:
    """Score ``method`` on the benchmark images that are in the store.

    Images of the split missing from the store, failed at extraction, or whose label size
    differs from the image are skipped and listed (never silently). ``segmenter``: an already
    configured method over this store (``method`` and ``overrides`` then unused). ``gallery``:
    images kept at each end of the result's gallery (0: none).
    """
    spec, records = _gt_for(dataset, data_root, split)
    if limit:
        records = records[:limit]
    if segmenter is not None:
        seg = segmenter
        store = seg.store
    else:
        from featurestore.store import FeatureStore  # zarr: not for predictions

        store = FeatureStore.open(store_path)
        seg = build_segmenter(store, method, dataset, overrides, device)
    scoring = scoring or ScoringConfig()
    ids = {image_id: i for i, image_id in enumerate(store.image_ids)}
    by_index = {}
    skipped: dict[str, str] = {}
    for r in records:
        if r.image_id not in ids:
            skipped[r.image_id] = "not in the store"
        else:
            by_index[ids[r.image_id]] = r
    if not by_index:
        raise ImagesNotInStoreError(
            f"none of the {len(records)} {dataset} images is in {store_path}",
            store=str(store_path),
            dataset=dataset,
            data_root=str(data_root),
            count=len(records),
        )
    acc = EvalAccumulator(vocab.num_classes, gallery)
    paths = store.image_table()["path"]
    t0 = time.perf_counter()
    done = 0
    order = sorted(by_index)
    seen = set()
    for i, labels, _mp, _cos in iter_segmentations(seg, vocab, scoring, order):
        seen.add(i)
        r = by_index[i]
        try:
            gt = _load_label(spec, r.label_path)
        except OvssError as e:
            skipped[r.image_id] = str(e)
            continue
        if gt.shape != labels.shape:
            skipped[r.image_id] = f"label is {gt.shape[0]}x{gt.shape[1]}, image {labels.shape}"
            continue
        acc.update(r.image_id, labels, gt, gallery_paths(paths[i], r.label_path))
        done += 1
        if progress:
            progress(f"eval {method}", done, len(order))
    method_skips = getattr(seg, "skipped", {})  # reasons a method gave (pnp-ovss)
    for i in order:
        if i not in seen:
            image_id = by_index[i].image_id
            skipped[image_id] = method_skips.get(
                image_id, "features not extracted (or the image failed)"
            )
    names = [syn[0] for syn in vocab.class_names]
    res = acc.metric.compute()
    result = EvalResult(
        dataset=dataset,
        split=split or spec.default_split,
        images=done,
        skipped=skipped,
        metrics=res.to_dict(names),
        protocol=protocol_record(seg, scoring, vocab),
        seconds=round(time.perf_counter() - t0, 3),
        class_names=names,
        store=str(store.path),
        data_root=str(data_root),
    )
    return acc.fill(result)


def gallery_paths(image_path: Any, label_path: Any) -> dict[str, str]:
    """The file paths a gallery entry records (the report reads the image and label)."""
    return {"image_path": str(image_path), "label_path": str(label_path or "")}


def evaluate_predictions(
    dataset: str,
    data_root: str,
    predictions: str,
    split: str | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Score a folder of label PNGs (``<image id>.png``, dataset label indices; ids with ``/``
    may use ``__`` instead) with the same protocol, for predictions made by any tool."""
    from featurestore.datasets import class_names

    spec, records = _gt_for(dataset, data_root, split)
    if limit:
        records = records[:limit]
    pred_dir = Path(predictions)
    if not pred_dir.is_dir():
        raise OvssError(f"no predictions folder at {pred_dir}")
    acc = EvalAccumulator(spec.num_classes)
    skipped: dict[str, str] = {}
    t0 = time.perf_counter()
    done = 0
    for r in records:
        cands = [pred_dir / f"{r.image_id}.png", pred_dir / f"{r.image_id.replace('/', '__')}.png"]
        path = next((p for p in cands if p.exists()), None)
        if path is None:
            skipped[r.image_id] = "no prediction file"
            continue
        try:
            pred = np.asarray(Image.open(path))
            gt = _load_label(spec, r.label_path)
        except (OSError, OvssError) as e:
            skipped[r.image_id] = str(e)
            continue
        if pred.ndim != 2 or pred.shape != gt.shape:
            skipped[r.image_id] = f"prediction shape {pred.shape} != label shape {gt.shape}"
            continue
        acc.update(r.image_id, pred, gt, gallery_paths(r.path, r.label_path))
        done += 1
        if progress:
            progress("eval predictions", done, len(records))
    if not done:
        raise OvssError(f"no prediction in {pred_dir} matches a {dataset} image id")
    names = [syn[0] for syn in class_names(dataset, data_root=data_root)]
    result = EvalResult(
        dataset=dataset,
        split=split or spec.default_split,
        images=done,
        skipped=skipped,
        metrics=acc.metric.compute().to_dict(names),
        protocol={"method": "predictions", "predictions": str(pred_dir)},
        seconds=round(time.perf_counter() - t0, 3),
        class_names=names,
        data_root=str(data_root),
    )
    return acc.fill(result)


@dataclass
class EvalRequest(MethodRequest):
    """What ``ovss eval`` takes (the method options: :class:`~methods.segment.MethodRequest`).

    Attributes:
        dataset: the benchmark (its classes, label format and the method's presets).
        data_root: where the dataset lives.
        split: the split (None: the benchmark's evaluation split).
        store: feature store of the dataset's images (exactly one of store / predictions).
        predictions: a folder of label PNGs (``<image id>.png``) to score instead.
        check_reference: compare with the published numbers when the configuration matches.
        gallery: images kept at each end of the result's gallery (best and worst by per-image
            mIoU; default :data:`GALLERY_SIZE` [ours]; 0: none).
        allow_missing: score the images that have a usable prediction and report how many of
            the split's that is (default False: any image without one fails the run with
            :class:`MissingPredictionsError`).
    """

    dataset: str = ""
    data_root: str = ""
    split: str | None = None
    store: str | None = None
    predictions: str | None = None
    check_reference: bool = False
    gallery: int = GALLERY_SIZE
    allow_missing: bool = False


@honours_trust
def run_eval(request: EvalRequest, progress: Progress | None = None) -> EvalResult:
    """Run ``ovss eval``: score ``predictions``, or the method on ``store``.

    Order, cheap checks first: the options, the method's typed config, its requirements, the
    template set and the dataset's vocabulary; then the store's feature sets (the method is
    built over the store), then the text embedding (cached, or computed with ``progress``),
    then the images.

    Raises:
        RequestError: missing or contradicting options.
        MissingPredictionsError: an image of the split has no usable prediction (unless
            ``allow_missing``).
        OvssError: whatever else is wrong, as one line.
    """
    from methods.reference import check_reference

    if not request.dataset or not request.data_root:
        raise RequestError("give the dataset and its data root", "dataset")
    if bool(request.store) == bool(request.predictions):
        raise RequestError("give exactly one of a store or predictions", "store")
    if request.predictions:
        result = evaluate_predictions(
            request.dataset,
            request.data_root,
            request.predictions,
            request.split,
            request.limit,
            progress,
        )
    else:
        from featurestore.extract import resolve_device  # torch: not for predictions

        setup = resolve_method(request, request.dataset)
        vocabulary = resolve_vocabulary(f"dataset:{request.dataset}", setup, request.data_root)
        text = text_choice(request, setup)
        device = str(resolve_device(request.device))
        from featurestore.store import FeatureStore

        store = FeatureStore.open(request.store)
        seg = setup.cls(store, setup.config, device=device)  # the feature sets, before the text
        vocab, _ = embed_text(request.store, text, vocabulary, device, progress)
        result = evaluate_store(
            request.store,
            request.dataset,
            request.data_root,
            setup.cls.name,
            vocab,
            split=request.split,
            scoring=setup.scoring,
            limit=request.limit,
            device=device,
            progress=progress,
            segmenter=seg,
            gallery=request.gallery,
        )
    require_complete(result, request.allow_missing)
    if request.check_reference:
        result.reference = check_reference(result)
    return result
