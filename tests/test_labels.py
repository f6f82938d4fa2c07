"""Tests of featurestore.labels: mmseg label decoding on tiny datasets written in every layout,
the COCO and PASCAL-Context mappings, the COCO conversions, LabelSource and verify_dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurestore.datasets import class_names, get_dataset, list_dataset_images, voc_colour_map
from featurestore.errors import OvssError
from featurestore.labels import (
    COCO_RAW_IDS,
    COCO_UNUSED_IDS,
    CONTEXT_IDS,
    LabelError,
    LabelSource,
    check_label,
    coco_lut,
    coco_object_train_ids,
    coco_stuff_train_ids,
    context_ids_to_labels,
    decode_label,
    load_label,
    prepare_dataset,
    reduce_zero_label,
    verify_dataset,
    write_png_atomic,
)
from ovss_cli.data_cmd import next_step_command

# -- tiny datasets --------------------------------------------------------------------------------
# Every label is 2 x 5 (H x W); images are real JPEG/PNG files of the same size.

H, W = 2, 5


def _image(path: Path, height: int = H, width: int = W) -> None:
    """A small RGB image (JPEG or PNG after the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def _label(path: Path, values: list[list[int]], palette: bool = False) -> None:
    """A label PNG: grey (L) by default, palette (P, VOC colours) with ``palette``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(values, dtype=np.uint8))
    if palette:
        im.putpalette(voc_colour_map(np.arange(256)).ravel().tolist())
        assert im.mode == "P"
    im.save(path)


ADE_RAW = {
    "ADE_val_00000001": [[0, 1, 2, 150, 255], [3, 3, 0, 149, 1]],
    "ADE_val_00000002": [[10, 0, 0, 0, 0], [0, 0, 0, 0, 150]],
}
ADE_EXPECTED = {
    "ADE_val_00000001": [[255, 0, 1, 149, 255], [2, 2, 255, 148, 0]],
    "ADE_val_00000002": [[9, 255, 255, 255, 255], [255, 255, 255, 255, 149]],
}
VOC_RAW = {
    "2007_000033": [[0, 1, 20, 255, 15], [0, 0, 255, 255, 15]],
    "2007_000042": [[5, 5, 0, 0, 0], [12, 255, 0, 19, 2]],
    "2008_000001": [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
}
VOC20_EXPECTED = {
    "2007_000033": [[255, 0, 19, 255, 14], [255, 255, 255, 255, 14]],
    "2007_000042": [[4, 4, 255, 255, 255], [11, 255, 255, 18, 1]],
    "2008_000001": [[255] * 5, [255] * 5],
}
CONTEXT_RAW = {
    "2008_000002": [[0, 1, 59, 30, 0], [2, 2, 0, 58, 59]],
    "2008_000003": [[7, 0, 0, 0, 1], [0, 0, 0, 0, 0]],
}
CONTEXT59_EXPECTED = {
    "2008_000002": [[255, 0, 58, 29, 255], [1, 1, 255, 57, 58]],
    "2008_000003": [[6, 255, 255, 255, 0], [255, 255, 255, 255, 255]],
}
# raw stuffthingmaps: 0 person, 12 stop sign, 89 toothbrush, 91 banner, 181 wood, 26, 100, 255
COCO_RAW = {
    "000000000139": [[0, 12, 89, 91, 181], [255, 26, 100, 0, 255]],
    "000000000285": [[181, 181, 0, 0, 30], [255, 255, 255, 91, 1]],
}
COCO_STUFF_EXPECTED = {  # rank among the 171 used ids; 255 stays
    "000000000139": [[0, 11, 79, 80, 170], [255, 24, 89, 0, 255]],
    "000000000285": [[170, 170, 0, 0, 26], [255, 255, 255, 80, 1]],
}
COCO_OBJECT_EXPECTED = {  # things: trainId + 1; stuff and 255: 0
    "000000000139": [[1, 12, 80, 0, 0], [0, 25, 0, 1, 0]],
    "000000000285": [[0, 0, 1, 1, 27], [0, 0, 0, 0, 2]],
}
CITY_RAW = {
    "frankfurt/frankfurt_000000_000294": [[0, 1, 18, 255, 13], [10, 10, 10, 255, 255]],
    "lindau/lindau_000000_000019": [[2, 2, 2, 2, 2], [8, 8, 255, 11, 12]],
}
CUSTOM_RAW = {
    "a": [[0, 1, 2, 255, 0], [2, 2, 1, 1, 0]],
    "sub/b": [[1, 1, 1, 1, 1], [0, 0, 0, 0, 255]],
}


def write_ade(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    for image_id, raw in ADE_RAW.items():
        _image(base / "images" / "validation" / f"{image_id}.jpg")
        _label(base / "annotations" / "validation" / f"{image_id}.png", raw)
    return base


def write_voc(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("\n".join(VOC_RAW) + "\n")
    for image_id, raw in VOC_RAW.items():
        _image(base / "JPEGImages" / f"{image_id}.jpg")
        _label(base / "SegmentationClass" / f"{image_id}.png", raw, palette=True)
    return base


def write_context(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2010"
    sets = base / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("\n".join(CONTEXT_RAW) + "\n")
    for image_id, raw in CONTEXT_RAW.items():
        _image(base / "JPEGImages" / f"{image_id}.jpg")
        _label(base / "SegmentationClassContext" / f"{image_id}.png", raw)
    return base


def write_coco_raw(root: Path, raw_maps: dict[str, list[list[int]]] = COCO_RAW) -> Path:
    """images/val2017 and the RAW stuffthingmaps in annotations/val2017 (no train split)."""
    base = root / "coco_stuff164k"
    for image_id, raw in raw_maps.items():
        _image(base / "images" / "val2017" / f"{image_id}.jpg")
        _label(base / "annotations" / "val2017" / f"{image_id}.png", raw)
    return base


def write_cityscapes(root: Path) -> Path:
    base = root / "cityscapes"
    for image_id, raw in CITY_RAW.items():
        _image(base / "leftImg8bit" / "val" / f"{image_id}_leftImg8bit.png")
        _label(base / "gtFine" / "val" / f"{image_id}_gtFine_labelTrainIds.png", raw)
    return base


def write_custom(root: Path) -> Path:
    for image_id, raw in CUSTOM_RAW.items():
        _image(root / "images" / "val" / f"{image_id}.png")
        _label(root / "annotations" / "val" / f"{image_id}.png", raw)
    (root / "classes.txt").write_text("road\ncar\nsky\n")
    return root


def build(name: str, root: Path) -> dict[str, list[list[int]]]:
    """Write dataset ``name`` under ``root``; return the expected labels per image id."""
    if name in ("ade20k",):
        write_ade(root)
        return ADE_EXPECTED
    if name in ("voc21", "voc20"):
        write_voc(root)
        return VOC_RAW if name == "voc21" else VOC20_EXPECTED
    if name in ("context60", "context59"):
        write_context(root)
        return CONTEXT_RAW if name == "context60" else CONTEXT59_EXPECTED
    if name in ("coco_stuff171", "coco_object"):
        write_coco_raw(root)
        report = prepare_dataset(name, root, workers=1)
        assert report.ok and report.written == len(COCO_RAW)
        return COCO_STUFF_EXPECTED if name == "coco_stuff171" else COCO_OBJECT_EXPECTED
    if name == "cityscapes":
        write_cityscapes(root)
        return CITY_RAW
    write_custom(root)
    return CUSTOM_RAW


ALL = [
    "ade20k",
    "voc21",
    "voc20",
    "context60",
    "context59",
    "coco_stuff171",
    "coco_object",
    "cityscapes",
    "custom",
]


@pytest.mark.parametrize("name", ALL)
def test_every_layout_reads_back_exact_labels(tmp_path: Path, name: str) -> None:
    expected = build(name, tmp_path)
    records = list_dataset_images(name, tmp_path)
    source = LabelSource(name, records, data_root=tmp_path)
    pairs = list(source)
    assert source.problems == []
    assert sorted(r.image_id for r, _ in pairs) == sorted(expected)
    for record, label in pairs:
        assert label.dtype == np.uint8 and label.shape == (H, W)
        np.testing.assert_array_equal(label, np.asarray(expected[record.image_id]))
        np.testing.assert_array_equal(load_label(name, record.label_path), label)
    report = verify_dataset(name, tmp_path, workers=2)
    assert report.ok, report.problems
    assert report.labels_checked == len(expected)


def test_palette_png_is_read_as_indices_not_colours(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    _label(path, [[0, 1, 2, 255, 15]] * 2, palette=True)
    with Image.open(path) as im:
        assert im.mode == "P"
        grey = np.asarray(im.convert("L"))
    decoded = decode_label(path)
    np.testing.assert_array_equal(decoded, [[0, 1, 2, 255, 15]] * 2)
    assert not np.array_equal(decoded, grey)  # what a colour conversion would give
    np.testing.assert_array_equal(load_label("voc20", path), [[255, 0, 1, 255, 14]] * 2)


def test_reduce_zero_label_matches_mmseg_on_every_value() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    gt = values.copy()  # mmseg LoadAnnotations._load_seg_map, verbatim
    gt[gt == 0] = 255
    gt = gt - 1
    gt[gt == 254] = 255
    np.testing.assert_array_equal(reduce_zero_label(values), gt)
    assert reduce_zero_label(np.array([0, 1, 150, 254, 255])).tolist() == [255, 0, 149, 253, 255]


def test_load_label_rules_per_dataset(tmp_path: Path) -> None:
    path = tmp_path / "l.png"
    _label(path, [[0, 1, 255]])
    assert load_label("voc21", path).tolist() == [[0, 1, 255]]
    assert load_label(get_dataset("ade"), path).tolist() == [[255, 0, 255]]
    assert load_label("pc59", path).tolist() == [[255, 0, 255]]
    assert load_label("coco_object", path).tolist() == [[0, 1, 255]]


def test_decode_label_modes(tmp_path: Path) -> None:
    wide = tmp_path / "16bit.png"
    Image.fromarray(np.array([[0, 7, 255]], dtype=np.uint16)).save(wide)
    assert decode_label(wide).tolist() == [[0, 7, 255]]
    assert decode_label(wide).dtype == np.uint8

    too_wide = tmp_path / "300.png"
    Image.fromarray(np.array([[0, 300]], dtype=np.uint16)).save(too_wide)
    with pytest.raises(LabelError, match="do not fit in 8 bits"):
        decode_label(too_wide)

    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(rgb)
    with pytest.raises(LabelError, match="RGB image") as info:
        decode_label(rgb)
    assert str(rgb) in str(info.value) and "\n" not in str(info.value)


def test_label_read_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match="file not found") as info:
        load_label("ade20k", tmp_path / "absent.png")
    assert isinstance(info.value, OvssError) and "\n" not in str(info.value)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    with pytest.raises(LabelError, match="cannot read label") as info:
        load_label("ade20k", junk)
    assert str(junk) in str(info.value) and "\n" not in str(info.value)
    truncated = tmp_path / "trunc.png"
    _label(truncated, np.arange(200 * 50).reshape(200, 50).astype(np.uint8).tolist())
    truncated.write_bytes(truncated.read_bytes()[:-60])
    with pytest.raises(LabelError):
        decode_label(truncated)


def test_check_label() -> None:
    label = np.array([[0, 1, 2, 255], [3, 200, 2, 0]], dtype=np.uint8)
    assert check_label(label, 3).tolist() == [3, 200]
    assert check_label(label, 201).tolist() == []
    assert check_label(label.astype(np.int32) - 1, 3).tolist() == [-1, 199, 254]
    assert check_label(np.full((2, 2), 255, dtype=np.uint8), 1).tolist() == []


# -- mappings -------------------------------------------------------------------------------------


def test_coco_stuff_mapping_hand_values() -> None:
    raw = [0, 10, 12, 24, 26, 27, 30, 89, 91, 92, 181, 255, 11, 90, 182, 200]
    want = [0, 10, 11, 23, 24, 25, 26, 79, 80, 81, 170, 255, 255, 255, 255, 255]
    assert coco_stuff_train_ids(np.array(raw)).tolist() == want
    names = class_names("coco_stuff171")
    assert names[0] == ["person"] and names[79] == ["toothbrush"] and names[80] == ["banner"]


def test_coco_object_mapping_hand_values() -> None:
    raw = [0, 1, 12, 30, 89, 91, 120, 181, 255, 11, 90, 200]
    want = [1, 2, 12, 27, 80, 0, 0, 0, 0, 255, 255, 255]
    assert coco_object_train_ids(np.array(raw)).tolist() == want
    assert class_names("coco_object")[1][0] == "person"
    assert class_names("coco_object")[80] == ["toothbrush"]


def test_coco_luts_equal_the_reference_dictionaries() -> None:
    # mmseg coco_stuff164k.py: clsID_to_trID lists the 171 used raw ids in order, plus 255
    cls_to_tr = {}
    train_id = 0
    for raw_id in range(182):
        if raw_id not in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90):
            cls_to_tr[raw_id] = train_id
            train_id += 1
    cls_to_tr[255] = 255
    # GroupViT cvt_coco_object.py: v + 1 for every entry, then 0 for every k > 90
    obj = {k: (0 if k > 90 else v + 1) for k, v in cls_to_tr.items()}
    stuff_lut, obj_lut = coco_lut("coco_stuff"), coco_lut("coco_object")
    assert len(cls_to_tr) == 172 and train_id == 171
    assert all(stuff_lut[k] == v for k, v in cls_to_tr.items())
    assert all(obj_lut[k] == v for k, v in obj.items())
    assert sorted(set(range(182)) - set(COCO_RAW_IDS)) == list(COCO_UNUSED_IDS)
    assert set(obj_lut[list(COCO_RAW_IDS)].tolist()) == set(range(81))
    with pytest.raises(OvssError, match="coco_stuff, coco_object"):
        coco_lut("lvis")


def test_context_ids_to_labels() -> None:
    assert len(CONTEXT_IDS) == 60 and list(CONTEXT_IDS) == sorted(CONTEXT_IDS)
    mask = np.array([[0, 2, 9, 18], [454, 458, 2, 0]], dtype=np.int32)
    labels = context_ids_to_labels(mask)
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[0, 1, 2, 3], [58, 59, 1, 0]]
    names = class_names("context60")
    assert [names[i][0] for i in (0, 1, 2, 3, 58)] == [
        "background",
        "aeroplane",
        "bag",
        "bed",
        "window",
    ]
    np.testing.assert_array_equal(
        context_ids_to_labels(np.array(CONTEXT_IDS)), np.arange(60, dtype=np.uint8)
    )
    with pytest.raises(OvssError, match="value\\(s\\) 1, 3"):
        context_ids_to_labels(np.array([0, 1, 3, 2]))


# -- COCO conversions -----------------------------------------------------------------------------


def test_coco_conversions_beside_raw_maps(tmp_path: Path) -> None:
    base = write_coco_raw(tmp_path)
    ann = base / "annotations" / "val2017"
    stuff = prepare_dataset("coco-stuff", tmp_path, workers=2)
    obj = prepare_dataset("coco_object", base, workers=1)
    assert (stuff.action, stuff.written, stuff.skipped, stuff.ok) == ("converted", 2, 0, True)
    assert stuff.ready and stuff.splits == ["val"] and stuff.out_dir == str(base)
    assert (obj.written, obj.skipped) == (2, 0)
    for image_id in COCO_RAW:
        out = np.asarray(Image.open(ann / f"{image_id}_labelTrainIds.png"))
        np.testing.assert_array_equal(out, COCO_STUFF_EXPECTED[image_id])
        out = np.asarray(Image.open(ann / f"{image_id}_instanceTrainIds.png"))
        np.testing.assert_array_equal(out, COCO_OBJECT_EXPECTED[image_id])
        with Image.open(ann / f"{image_id}_labelTrainIds.png") as im:
            assert im.mode == "L"
    assert not [p for p in ann.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert not (base / "annotations" / "train2017").exists()  # train split never needed


def test_coco_conversion_is_idempotent_and_overwrites_on_request(tmp_path: Path) -> None:
    base = write_coco_raw(tmp_path)
    first = prepare_dataset("coco_stuff171", tmp_path, workers=1)
    out = base / "annotations" / "val2017" / "000000000139_labelTrainIds.png"
    os.utime(out, (1, 1))
    calls: list[tuple[str, int, int]] = []
    again = prepare_dataset(
        "coco_stuff171", tmp_path, workers=1, progress=lambda *a: calls.append(a)
    )
    assert (first.written, again.written, again.skipped) == (2, 0, 2)
    assert again.ready and out.stat().st_mtime == 1  # untouched
    assert calls[-1][1:] == (2, 2)
    forced = prepare_dataset("coco_stuff171", tmp_path, workers=1, overwrite=True)
    assert (forced.written, forced.skipped) == (2, 0) and out.stat().st_mtime > 1


def test_coco_object_with_out_folder(tmp_path: Path) -> None:
    base = write_coco_raw(tmp_path)
    out = tmp_path / "coco_object"
    report = prepare_dataset("coco_object", tmp_path, out=out, workers=1)
    assert report.written == 2 and report.out_dir == str(out)
    assert (out / "images" / "val2017").is_dir()
    assert not list((base / "annotations" / "val2017").glob("*_instanceTrainIds.png"))
    # the datasets layout prefers data_root/coco_object; the labels read back exactly
    records = list_dataset_images("coco_object", tmp_path)
    assert Path(records[0].label_path).parent == out / "annotations" / "val2017"
    for record, label in LabelSource("coco_object", records):
        np.testing.assert_array_equal(label, COCO_OBJECT_EXPECTED[record.image_id])
    with pytest.raises(OvssError, match="coco_object only"):
        prepare_dataset("coco_stuff171", tmp_path, out=out)


def test_coco_conversion_reports_bad_files_and_unknown_values(tmp_path: Path) -> None:
    base = write_coco_raw(tmp_path, {"000000000001": [[0, 90, 200, 11, 255]] * 2})
    (base / "annotations" / "val2017" / "000000000002.png").write_bytes(b"broken")
    report = prepare_dataset("coco_stuff171", tmp_path, workers=1)
    assert report.written == 1 and not report.ok and not report.ready
    assert [(f.image_id, f.kind) for f in report.failures] == [("000000000002", "unreadable_label")]
    raw_path = str(base / "annotations" / "val2017" / "000000000001.png")
    assert report.unexpected_values == {raw_path: [11, 90, 200]}
    out = np.asarray(
        Image.open(base / "annotations" / "val2017" / "000000000001_labelTrainIds.png")
    )
    assert out[0].tolist() == [0, 255, 255, 255, 255]


def test_coco_conversion_errors(tmp_path: Path) -> None:
    with pytest.raises(OvssError, match="stuffthingmaps_trainval2017.zip") as info:
        prepare_dataset("coco_stuff171", tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "coco_stuff164k" / "annotations" / "val2017").mkdir(parents=True)
    with pytest.raises(OvssError, match="no raw COCO-Stuff maps"):
        prepare_dataset("coco_stuff171", tmp_path)


def test_coco_split_all_converts_the_splits_present(tmp_path: Path) -> None:
    base = write_coco_raw(tmp_path)
    _label(base / "annotations" / "train2017" / "000000000009.png", [[0, 255]])
    report = prepare_dataset("coco_stuff171", tmp_path, split="all", workers=1)
    assert report.splits == ["val", "train"] and report.written == 3
    assert (base / "annotations" / "train2017" / "000000000009_labelTrainIds.png").is_file()


def test_write_png_atomic_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.png"
    write_png_atomic(np.array([[1, 2]], dtype=np.uint8), target)
    assert np.asarray(Image.open(target)).tolist() == [[1, 2]]
    with pytest.raises((TypeError, ValueError, OSError)):
        write_png_atomic(np.zeros((2, 2, 2, 2), dtype=np.uint8), tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


# -- instructions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ade20k", "nothing to convert"),
        ("voc21", "VOCtrainval_11-May-2012.tar"),
        ("context59", "python tools/dataset_converters/pascal_context.py"),
        ("cityscapes", "csCreateTrainIdLabelImgs"),
        ("custom", "classes.txt"),
    ],
)
def test_prepare_gives_instructions(tmp_path: Path, name: str, expected: str) -> None:
    report = prepare_dataset(name, tmp_path)
    assert report.action == "instructions" and not report.ready and report.ok
    text = " ".join(report.steps)
    assert expected in text and "{" not in text
    assert all("\n" not in step for step in report.steps)


def test_prepare_context_command_has_the_paths(tmp_path: Path) -> None:
    report = prepare_dataset("context60", tmp_path / "VOCdevkit")
    devkit = tmp_path / "VOCdevkit"
    assert report.dataset_dir == str(devkit / "VOC2010")
    assert f"pascal_context.py {devkit} {devkit / 'VOC2010' / 'trainval_merged.json'}" in " ".join(
        report.steps
    )


def test_prepare_says_ready_when_labels_exist(tmp_path: Path) -> None:
    write_ade(tmp_path)
    report = prepare_dataset("ade20k", tmp_path)
    assert report.ready and "labels found" in report.notes[0]
    assert [(s.action, s.dataset, s.data_root) for s in report.next_steps] == [
        ("verify", "ade20k", str(tmp_path))
    ]
    assert (
        next_step_command(report.next_steps[0]) == f"ovss data verify ade20k --data-root {tmp_path}"
    )
    assert not any("ovss" in n for n in report.notes)  # the library names facts, not commands


# -- problems: LabelSource and verify ----------------------------------------------------------


def _broken_ade(root: Path) -> Path:
    """ADE with: a wrong-size label, an out-of-range value, an unreadable and a missing label."""
    base = write_ade(root)
    ann = base / "annotations" / "validation"
    img = base / "images" / "validation"
    _image(img / "ADE_val_00000003.jpg")
    _label(ann / "ADE_val_00000003.png", [[1, 2, 3, 4]])  # 4 x 1, image is 5 x 2
    _image(img / "ADE_val_00000004.jpg")
    _label(ann / "ADE_val_00000004.png", [[0, 1, 151, 200, 255], [1] * 5])  # 151 -> 150: bad
    _image(img / "ADE_val_00000005.jpg")
    (ann / "ADE_val_00000005.png").write_bytes(b"\x89PNG garbage")
    _image(img / "ADE_val_00000006.jpg")  # no label at all
    return base


def test_label_source_skips_and_reports(tmp_path: Path) -> None:
    _broken_ade(tmp_path)
    records = list_dataset_images("ade20k", tmp_path)
    seen = []
    source = LabelSource("ade20k", records, on_problem=seen.append)
    pairs = {r.image_id: label for r, label in source}
    # out-of-range labels are kept (mmseg scores them too); the others are skipped
    assert sorted(pairs) == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000004"]
    kinds = {p.image_id: p.kind for p in source.problems}
    assert kinds == {
        "ADE_val_00000003": "size_mismatch",
        "ADE_val_00000004": "out_of_range",
        "ADE_val_00000005": "unreadable_label",
        "ADE_val_00000006": "missing_label",
    }
    assert seen == source.problems
    assert source.skipped_ids == ["ADE_val_00000003", "ADE_val_00000005", "ADE_val_00000006"]
    size = next(p for p in source.problems if p.kind == "size_mismatch")
    assert "is 4x1 but image" in size.message and "is 5x2" in size.message
    rng = next(p for p in source.problems if p.kind == "out_of_range")
    assert "150, 199" in rng.message and "raw 151, 200" in rng.message
    assert all("\n" not in p.message for p in source.problems)


def test_label_source_uses_given_image_sizes(tmp_path: Path) -> None:
    write_ade(tmp_path)
    records = list_dataset_images("ade20k", tmp_path)
    sizes = {"ADE_val_00000001": (H, W), "ADE_val_00000002": (W, H)}
    for r in records:  # the images are not read when their size is given
        Path(r.path).unlink()
    source = LabelSource("ade20k", records, image_sizes=sizes)
    assert [r.image_id for r, _ in source] == ["ADE_val_00000001"]
    assert [p.kind for p in source.problems] == ["size_mismatch"]


def test_label_source_without_labels(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "val" / "a.png")
    records = list_dataset_images("custom", tmp_path)
    source = LabelSource("custom", records)
    assert list(source) == [] and [p.kind for p in source.problems] == ["no_label"]


def test_verify_finds_every_problem(tmp_path: Path) -> None:
    _broken_ade(tmp_path)
    calls: list[tuple[str, int, int]] = []
    report = verify_dataset("ade20k", tmp_path, workers=3, progress=lambda *a: calls.append(a))
    assert not report.ok
    assert report.problem_counts() == {
        "missing_label": 1,
        "unreadable_label": 1,
        "size_mismatch": 1,
        "out_of_range": 1,
    }
    assert report.images_listed == report.images_checked == 6
    assert report.labels_checked == 4 and report.expected_images == 2000
    assert any("6 images listed" in w and "2000" in w for w in report.warnings)
    assert any("label file(s) missing" in w for w in report.warnings)
    [step] = report.next_steps
    assert (
        next_step_command(step)
        == f"ovss data prepare ade20k --data-root {tmp_path} (prints the steps)"
    )
    assert calls[0] == ("verify ade20k validation", 0, 6) and calls[-1][1:] == (6, 6)
    d = report.to_dict()
    assert d["ok"] is False and len(d["problems"]) == 4
    assert set(d["problems"][0]) == {"image_id", "kind", "message", "skipped"}


def test_verify_limit_and_missing_images(tmp_path: Path) -> None:
    base = write_voc(tmp_path)
    (base / "JPEGImages" / "2007_000042.jpg").unlink()
    report = verify_dataset("voc21", tmp_path, limit=2)
    assert report.images_listed == 3 and report.images_checked == 2
    assert [(p.image_id, p.kind) for p in report.problems] == [("2007_000042", "missing_image")]
    assert report.classes_present == 8  # 0, 1, 2, 5, 12, 15, 19, 20 in the first two labels


def test_verify_custom_without_classes_or_annotations(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "val" / "a.png")
    report = verify_dataset("custom", tmp_path)
    assert report.ok and report.num_classes is None and report.labels_checked == 0
    assert any("class file not found" in w for w in report.warnings)
    assert any("only images were checked" in w for w in report.warnings)


def test_verify_warns_about_255_in_coco_object(tmp_path: Path) -> None:
    base = write_coco_raw(tmp_path)
    for image_id, raw in COCO_RAW.items():  # 255 left in, as a wrong converter would
        _label(base / "annotations" / "val2017" / f"{image_id}_instanceTrainIds.png", raw)
    report = verify_dataset("coco_object", tmp_path)
    assert any("maps unlabeled pixels to 0" in w for w in report.warnings)
    assert next_step_command(report.next_steps[-1]).endswith("--overwrite")
    assert report.problem_counts() == {"out_of_range": 2}  # raw ids above 80


def test_verify_missing_dataset_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(OvssError, match="download") as info:
        verify_dataset("cityscapes", tmp_path)
    assert "\n" not in str(info.value)
