"""IoUAccumulator: mmseg IoUMetric semantics (spec/EVAL.md §5), incl. the §5.4 worked example."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from featurestore.errors import OvssError
from methods.metrics import IoUAccumulator, MetricResult

# EVAL.md §5.4: C=5, ignore 255, two 2x4 images.
GT_A = np.array([[0, 0, 1, 1], [0, 255, 1, 1]])
PRED_A = np.array([[0, 1, 1, 1], [0, 0, 1, 2]])
GT_B = np.array([[2, 2, 0, 0], [2, 2, 0, 0]])
PRED_B = np.array([[2, 2, 0, 0], [2, 1, 0, 3]])


def _worked_example() -> MetricResult:
    acc = IoUAccumulator(5)
    acc.update(PRED_A, GT_A)
    acc.update(PRED_B, GT_B)
    return acc.compute()


def test_worked_example_summaries() -> None:
    r = _worked_example()
    assert r.miou == 45.36
    assert r.aacc == 73.33
    assert r.macc == 73.81
    assert r.num_images == 2


def test_worked_example_per_class_areas_and_values() -> None:
    r = _worked_example()
    np.testing.assert_array_equal(r.area_intersect, [5, 3, 3, 0, 0])
    np.testing.assert_array_equal(r.area_pred, [5, 5, 4, 1, 0])
    np.testing.assert_array_equal(r.area_label, [7, 4, 4, 0, 0])
    np.testing.assert_array_equal(r.area_union, [7, 6, 5, 1, 0])
    np.testing.assert_allclose(r.iou[:4], [5 / 7, 0.5, 0.6, 0.0])
    assert math.isnan(r.iou[4])  # absent from GT and predictions: excluded
    assert r.iou[3] == 0.0  # predicted but absent from GT: counted as 0
    np.testing.assert_allclose(r.acc[:3], [5 / 7, 0.75, 0.75])
    assert math.isnan(r.acc[3]) and math.isnan(r.acc[4])


def test_mean_of_per_image_miou_is_a_different_number() -> None:
    per_image = []
    for pred, gt in ((PRED_A, GT_A), (PRED_B, GT_B)):
        acc = IoUAccumulator(5)
        acc.update(pred, gt)
        per_image.append(acc.compute().miou)
    assert per_image == [42.22, 37.5]
    assert round(float(np.mean(per_image)), 2) == 39.86
    assert _worked_example().miou != 39.86


def _histc(values: list[int], num_classes: int) -> list[int]:
    """torch.histc(bins=C, min=0, max=C-1) on integer values: out-of-range values are dropped."""
    counts = [0] * num_classes
    for v in values:
        if 0 <= v <= num_classes - 1:
            counts[v] += 1
    return counts


def _slow_reference(
    pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int, ignore: int = 255
) -> dict[str, list[int]]:
    """Pixel-by-pixel transcription of mmseg's intersect_and_union, summed over images."""
    tot = {"inter": [0] * num_classes, "pred": [0] * num_classes, "label": [0] * num_classes}
    for pred, gt in pairs:
        kept_pred, kept_gt = [], []
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist(), strict=True):
            if g != ignore:
                kept_pred.append(p)
                kept_gt.append(g)
        inter = [p for p, g in zip(kept_pred, kept_gt, strict=True) if p == g]
        for key, vals in (("inter", inter), ("pred", kept_pred), ("label", kept_gt)):
            for c, n in enumerate(_histc(vals, num_classes)):
                tot[key][c] += n
    return tot


def _random_pairs(
    rng: np.random.Generator, num_classes: int, n_images: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for _ in range(n_images):
        h, w = rng.integers(5, 30, size=2)
        gt = rng.integers(0, num_classes, size=(h, w))
        gt[rng.random((h, w)) < 0.15] = 255  # ignore pixels
        gt[rng.random((h, w)) < 0.03] = num_classes + 2  # stray GT id: not counted as a label
        pred = rng.integers(0, num_classes, size=(h, w))
        pred[rng.random((h, w)) < 0.1] = num_classes  # out-of-range predictions: not counted
        pred[rng.random((h, w)) < 0.05] = 255
        pred[rng.random((h, w)) < 0.05] = -1
        pairs.append((pred, gt))
    return pairs


@pytest.mark.parametrize("num_classes", [1, 7, 5000])  # 5000: the per-map bincount path
def test_matches_slow_reference_on_random_data(num_classes: int) -> None:
    rng = np.random.default_rng(num_classes)
    pairs = _random_pairs(rng, min(num_classes, 7), n_images=4)
    acc = IoUAccumulator(num_classes)
    for pred, gt in pairs:
        acc.update(pred, gt)
    r = acc.compute()
    ref = _slow_reference(pairs, num_classes)
    np.testing.assert_array_equal(r.area_intersect, ref["inter"])
    np.testing.assert_array_equal(r.area_pred, ref["pred"])
    np.testing.assert_array_equal(r.area_label, ref["label"])
    union = np.array(ref["pred"]) + np.array(ref["label"]) - np.array(ref["inter"])
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.array(ref["inter"]) / union
        accs = np.array(ref["inter"]) / np.array(ref["label"])
    np.testing.assert_allclose(r.iou, iou, equal_nan=True)
    np.testing.assert_allclose(r.acc, accs, equal_nan=True)
    valid = iou[~np.isnan(iou)]
    assert r.miou == round(float(valid.mean()) * 100, 2)
    assert r.aacc == round(sum(ref["inter"]) / sum(ref["label"]) * 100, 2)


def test_merge_equals_single_accumulation_and_state_round_trip() -> None:
    rng = np.random.default_rng(0)
    pairs = _random_pairs(rng, 6, n_images=6)
    single = IoUAccumulator(6)
    shards = [IoUAccumulator(6), IoUAccumulator(6)]
    for i, (pred, gt) in enumerate(pairs):
        single.update(pred, gt)
        shards[i % 2].update(pred, gt)
    # One shard travels as JSON, as it would from another process.
    remote = IoUAccumulator.from_state_dict(json.loads(json.dumps(shards[1].state_dict())))
    merged = shards[0].merge(remote)
    assert merged is shards[0]
    a, b = single.compute(), merged.compute()
    assert a.to_dict() == b.to_dict()
    assert b.num_images == 6


def test_merge_rejects_other_settings() -> None:
    with pytest.raises(OvssError, match="different settings"):
        IoUAccumulator(5).merge(IoUAccumulator(6))
    with pytest.raises(OvssError, match="different settings"):
        IoUAccumulator(5).merge(IoUAccumulator(5, ignore_index=0))


def test_torch_numpy_and_dtypes_agree() -> None:
    ref = _worked_example().to_dict()
    acc = IoUAccumulator(5)
    acc.update(torch.from_numpy(PRED_A), torch.from_numpy(GT_A))
    acc.update(PRED_B.astype(np.uint8), GT_B.astype(np.uint8))
    assert acc.compute().to_dict() == ref


def test_shape_mismatch_and_float_maps_raise() -> None:
    acc = IoUAccumulator(5)
    with pytest.raises(OvssError, match="shape"):
        acc.update(PRED_A, GT_A[:, :3])
    with pytest.raises(OvssError, match="integer"):
        acc.update(PRED_A.astype(np.float32), GT_A)
    with pytest.raises(OvssError):
        IoUAccumulator(0)
    assert acc.num_images == 0


def test_to_dict_is_strict_json_with_none_for_nan() -> None:
    d = _worked_example().to_dict(class_names=["a", "b", "c", "d", "e"])
    text = json.dumps(d, allow_nan=False)  # raises if a NaN slipped through
    back = json.loads(text)
    assert back["mIoU"] == 45.36
    assert back["per_class"]["iou"][4] is None
    assert back["per_class"]["acc"][3] is None
    assert back["per_class"]["name"][0] == "a"
    with pytest.raises(OvssError):
        _worked_example().to_dict(class_names=["only-one"])


def test_all_ignored_gives_nan_summaries() -> None:
    acc = IoUAccumulator(3)
    acc.update(np.zeros((4, 4), dtype=np.int64), np.full((4, 4), 255))
    r = acc.compute()
    assert math.isnan(r.miou) and math.isnan(r.aacc)
    assert r.to_dict()["mIoU"] is None
    acc.reset()
    assert acc.num_images == 0 and acc.area_label.sum() == 0


def test_cityscapes_sized_image_matches_confusion_count() -> None:
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 19, size=(1024, 2048), dtype=np.uint8)
    gt[:100] = 255
    pred = gt.copy()
    pred[500:600] = (pred[500:600] + 1) % 19
    acc = IoUAccumulator(19)
    acc.update(pred, gt)
    r = acc.compute()
    valid = gt != 255
    assert r.area_label.sum() == valid.sum()
    assert r.area_intersect.sum() == (valid & (pred == gt)).sum()
