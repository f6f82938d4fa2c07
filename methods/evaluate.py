"""``ovss eval``: the standard OVSS protocol on a store (or on a folder of predictions).

Streaming: one image's labels and GT are in memory at a time; the metric is the dataset-level
``IoUAccumulator`` (mmseg ``IoUMetric`` semantics, EVAL.md §5).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featurestore.errors import ImagesNotInStoreError, OvssError
from featurestore.store import FeatureStore
from methods.base import ScoringConfig, Segmenter, Vocab
from methods.metrics import IoUAccumulator
from methods.segment import (
    MethodRequest,
    RequestError,
    build_segmenter,
    embed_text,
    iter_segmentations,
    protocol_record,
    resolve_method,
    resolve_vocabulary,
    text_choice,
)

Progress = Callable[[str, int, int], None]


@dataclass
class EvalResult:
    dataset: str
    split: str
    images: int
    skipped: dict[str, str]
    metrics: dict[str, Any]
    protocol: dict[str, Any]
    seconds: float
    reference: dict[str, Any] | None = None
    class_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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
    split: str | None = None,
    overrides: dict[str, Any] | None = None,
    scoring: ScoringConfig | None = None,
    limit: int | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    segmenter: Segmenter | None = None,
) -> EvalResult:
    """Score ``method`` on the benchmark images that are in the store.

    Images of the split missing from the store, failed at extraction, or whose label size
    differs from the image are skipped and listed (never silently). ``segmenter``: an already
    configured method over this store (``method`` and ``overrides`` then unused).
    """
    spec, records = _gt_for(dataset, data_root, split)
    if limit:
        records = records[:limit]
    if segmenter is not None:
        seg = segmenter
        store = seg.store
    else:
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
    acc = IoUAccumulator(vocab.num_classes)
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
        acc.update(labels, gt)
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
    res = acc.compute()
    return EvalResult(
        dataset=dataset,
        split=split or spec.default_split,
        images=done,
        skipped=skipped,
        metrics=res.to_dict(names),
        protocol=protocol_record(seg, scoring, vocab),
        seconds=round(time.perf_counter() - t0, 3),
        class_names=names,
    )


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
    acc = IoUAccumulator(spec.num_classes)
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
        acc.update(pred, gt)
        done += 1
        if progress:
            progress("eval predictions", done, len(records))
    if not done:
        raise OvssError(f"no prediction in {pred_dir} matches a {dataset} image id")
    names = [syn[0] for syn in class_names(dataset, data_root=data_root)]
    return EvalResult(
        dataset=dataset,
        split=split or spec.default_split,
        images=done,
        skipped=skipped,
        metrics=acc.compute().to_dict(names),
        protocol={"method": "predictions", "predictions": str(pred_dir)},
        seconds=round(time.perf_counter() - t0, 3),
        class_names=names,
    )


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
    """

    dataset: str = ""
    data_root: str = ""
    split: str | None = None
    store: str | None = None
    predictions: str | None = None
    check_reference: bool = False


def run_eval(request: EvalRequest, progress: Progress | None = None) -> EvalResult:
    """Run ``ovss eval``: score ``predictions``, or the method on ``store``.

    Order, cheap checks first: the options, the method's typed config, its requirements, the
    template set and the dataset's vocabulary; then the store's feature sets (the method is
    built over the store), then the text embedding (cached, or computed with ``progress``),
    then the images.

    Raises:
        RequestError: missing or contradicting options.
        OvssError: whatever else is wrong, as one line.
    """
    from featurestore.extract import resolve_device
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
        setup = resolve_method(request, request.dataset)
        vocabulary = resolve_vocabulary(f"dataset:{request.dataset}", setup, request.data_root)
        text = text_choice(request, setup)
        device = str(resolve_device(request.device))
        store = FeatureStore.open(request.store)
        seg = setup.cls(store, setup.config, device=device)  # the feature sets, before the text
        vocab, _ = embed_text(request.store, text, vocabulary, device, progress)
        result = evaluate_store(
            request.store,
            request.dataset,
            request.data_root,
            setup.cls.name,
            vocab,
            request.split,
            scoring=setup.scoring,
            limit=request.limit,
            device=device,
            progress=progress,
            segmenter=seg,
        )
    if request.check_reference:
        result.reference = check_reference(result)
    return result
