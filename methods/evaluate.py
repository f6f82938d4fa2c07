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

from featurestore.errors import OvssError
from featurestore.store import FeatureStore
from methods.base import ScoringConfig, Vocab
from methods.metrics import IoUAccumulator
from methods.segment import build_segmenter, iter_segmentations, protocol_record

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
) -> EvalResult:
    """Score ``method`` on the benchmark images that are in the store.

    Images of the split missing from the store, failed at extraction, or whose label size
    differs from the image are skipped and listed (never silently).
    """
    spec, records = _gt_for(dataset, data_root, split)
    if limit:
        records = records[:limit]
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
        raise OvssError(
            f"none of the {len(records)} {dataset} images is in {store_path}; extract them "
            f"with 'ovss extract --dataset {dataset} --data-root {data_root} --store {store_path}'"
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
    for i in order:
        if i not in seen:
            skipped[by_index[i].image_id] = "features not extracted (or the image failed)"
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
