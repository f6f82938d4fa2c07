"""Tests of featurestore.datasets: registry, mmseg layouts on tiny synthetic trees, class files,
palettes."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from featurestore.datasets import (
    DatasetSpec,
    class_names,
    dataset_dir,
    describe_datasets,
    get_dataset,
    list_dataset_images,
    list_datasets,
    palette,
    read_class_file,
    resolve_split,
    voc_colour_map,
)
from featurestore.errors import OvssError

BENCHMARKS = [
    "ade20k",
    "voc21",
    "voc20",
    "context60",
    "context59",
    "coco_stuff171",
    "coco_object",
    "cityscapes",
]
NUM_CLASSES = {
    "ade20k": 150,
    "voc21": 21,
    "voc20": 20,
    "context60": 60,
    "context59": 59,
    "coco_stuff171": 171,
    "coco_object": 81,
    "cityscapes": 19,
}


def _touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def _make_ade(parent: Path) -> Path:
    base = parent / "ADEChallengeData2016"
    img = base / "images" / "validation"
    _touch(
        img / "ADE_val_00000002.jpg",
        img / "ADE_val_00000001.jpg",
        img / "ADE_val_00000010.jpg",
        img / "notes.txt",
        img / ".ADE_val_hidden.jpg",
        base / "annotations" / "validation" / "ADE_val_00000001.png",
    )
    return base


def _make_voc(parent: Path, year: str = "2012", context: bool = False) -> Path:
    base = parent / "VOCdevkit" / f"VOC{year}"
    sets = base / "ImageSets" / ("SegmentationContext" if context else "Segmentation")
    sets.mkdir(parents=True)
    # deliberately not sorted, with a blank line and Windows line ends
    (sets / "val.txt").write_text("2007_000129\r\n2007_000033\r\n\r\n2008_000002\r\n")
    for i in ("2007_000033", "2007_000129", "2008_000002", "2009_999999"):
        _touch(base / "JPEGImages" / f"{i}.jpg")
    return base


def _make_coco(parent: Path, folder: str = "coco_stuff164k") -> Path:
    base = parent / folder
    img = base / "images" / "val2017"
    _touch(
        img / "000000000285.jpg",
        img / "000000000139.jpg",
        img / "000000000632.jpg",
        base / "images" / "train2017" / "000000000009.jpg",
        base / "annotations" / "val2017" / "000000000139_labelTrainIds.png",
    )
    return base


def _make_cityscapes(parent: Path) -> Path:
    base = parent / "cityscapes"
    img = base / "leftImg8bit" / "val"
    _touch(
        img / "munster" / "munster_000000_000019_leftImg8bit.png",
        img / "frankfurt" / "frankfurt_000001_000000_leftImg8bit.png",
        img / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png",
        img / "lindau" / "lindau_000000_000019_leftImg8bit.png",
        img / "lindau" / "lindau_000000_000019_gtFine_polygons.json",
        base / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png",
    )
    return base


# -- registry ------------------------------------------------------------------------------------


def test_list_datasets() -> None:
    assert list_datasets() == [*BENCHMARKS, "custom"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_registry_entries_are_consistent(name: str) -> None:
    spec = get_dataset(name)
    assert isinstance(spec, DatasetSpec)
    assert spec.name == name
    assert spec.num_classes == NUM_CLASSES[name]
    assert spec.default_split in spec.splits
    assert not (spec.has_background and spec.reduce_zero_label)
    assert spec.doc and "\n" not in spec.doc
    assert len(class_names(name)) == spec.num_classes


def test_label_rules() -> None:
    assert {n for n in BENCHMARKS if get_dataset(n).reduce_zero_label} == {
        "ade20k",
        "voc20",
        "context59",
    }
    assert {n for n in BENCHMARKS if get_dataset(n).has_background} == {
        "voc21",
        "context60",
        "coco_object",
    }
    assert get_dataset("ade20k").splits == ("validation", "training")
    assert get_dataset("voc21").splits == ("val", "train")


@pytest.mark.parametrize(
    "alias, name",
    [
        ("ade", "ade20k"),
        ("ADE20K", "ade20k"),
        ("ade-150", "ade20k"),
        ("voc", "voc21"),
        ("VOC21", "voc21"),
        ("voc20", "voc20"),
        ("pc59", "context59"),
        ("pc60", "context60"),
        ("PC-59", "context59"),
        ("coco-stuff", "coco_stuff171"),
        ("cocostuff", "coco_stuff171"),
        ("coco_stuff", "coco_stuff171"),
        ("coco-object", "coco_object"),
        ("city", "cityscapes"),
        ("Cityscapes", "cityscapes"),
        ("custom", "custom"),
    ],
)
def test_aliases(alias: str, name: str) -> None:
    assert get_dataset(alias).name == name


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(OvssError) as info:
        get_dataset("imagenet")
    msg = str(info.value)
    assert "'imagenet'" in msg and "\n" not in msg
    for name in BENCHMARKS:
        assert name in msg


# -- listing, per benchmark --------------------------------------------------------------------


@pytest.mark.parametrize("root_kind", ["parent", "dataset"])
def test_ade20k_layout(tmp_path: Path, root_kind: str) -> None:
    base = _make_ade(tmp_path)
    root = tmp_path if root_kind == "parent" else base
    recs = list_dataset_images("ade20k", root)
    assert [r.image_id for r in recs] == [
        "ADE_val_00000001",
        "ADE_val_00000002",
        "ADE_val_00000010",
    ]
    r = recs[0]
    assert r.source == "ade20k" and r.split == "validation"
    assert Path(r.path) == base / "images" / "validation" / "ADE_val_00000001.jpg"
    assert Path(r.label_path) == base / "annotations" / "validation" / "ADE_val_00000001.png"
    # a missing label file is not an error here
    assert Path(recs[1].label_path).name == "ADE_val_00000002.png"
    assert not Path(recs[1].label_path).exists()
    # split alias
    assert [x.image_id for x in list_dataset_images("ade", root, split="val")] == [
        x.image_id for x in recs
    ]


def test_ade20k_missing_split(tmp_path: Path) -> None:
    _make_ade(tmp_path)
    with pytest.raises(OvssError) as info:
        list_dataset_images("ade20k", tmp_path, split="training")
    assert str(tmp_path / "ADEChallengeData2016" / "images" / "training") in str(info.value)


@pytest.mark.parametrize("name", ["voc21", "voc20"])
@pytest.mark.parametrize("root_kind", ["parent", "devkit", "dataset"])
def test_voc_layout(tmp_path: Path, name: str, root_kind: str) -> None:
    base = _make_voc(tmp_path)
    root = {"parent": tmp_path, "devkit": tmp_path / "VOCdevkit", "dataset": base}[root_kind]
    recs = list_dataset_images(name, root)
    assert [r.image_id for r in recs] == ["2007_000129", "2007_000033", "2008_000002"]  # file order
    assert all(r.split == "val" and r.source == name for r in recs)
    assert Path(recs[1].path) == base / "JPEGImages" / "2007_000033.jpg"
    assert Path(recs[1].label_path) == base / "SegmentationClass" / "2007_000033.png"


def test_voc_missing_split_file(tmp_path: Path) -> None:
    base = _make_voc(tmp_path)
    with pytest.raises(OvssError, match="split file") as info:
        list_dataset_images("voc21", tmp_path, split="train")
    assert str(base / "ImageSets" / "Segmentation" / "train.txt") in str(info.value)


def test_voc_missing_jpeg_folder(tmp_path: Path) -> None:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    with pytest.raises(OvssError, match="image folder") as info:
        list_dataset_images("voc21", tmp_path)
    assert str(base / "JPEGImages") in str(info.value)


@pytest.mark.parametrize("name", ["context60", "context59"])
def test_context_layout(tmp_path: Path, name: str) -> None:
    _make_voc(tmp_path)  # VOC2012 next to VOC2010, as in a usual mmseg data/ folder
    base = _make_voc(tmp_path, year="2010", context=True)
    for root in (tmp_path, tmp_path / "VOCdevkit", base):
        recs = list_dataset_images(name, root)
        assert [r.image_id for r in recs] == ["2007_000129", "2007_000033", "2008_000002"]
        assert Path(recs[0].path) == base / "JPEGImages" / "2007_000129.jpg"
        assert Path(recs[0].label_path) == base / "SegmentationClassContext" / "2007_000129.png"


def test_context_is_not_found_in_voc2012(tmp_path: Path) -> None:
    voc2012 = _make_voc(tmp_path)
    with pytest.raises(OvssError) as info:
        list_dataset_images("context59", voc2012)
    assert "VOC2010" in str(info.value) and "SegmentationContext" in str(info.value)


def test_coco_stuff_layout(tmp_path: Path) -> None:
    base = _make_coco(tmp_path)
    for root in (tmp_path, base):
        recs = list_dataset_images("coco_stuff171", root)
        assert [r.image_id for r in recs] == ["000000000139", "000000000285", "000000000632"]
        assert recs[0].split == "val"
        assert Path(recs[0].path) == base / "images" / "val2017" / "000000000139.jpg"
        assert Path(recs[0].label_path) == (
            base / "annotations" / "val2017" / "000000000139_labelTrainIds.png"
        )
    assert len(list_dataset_images("cocostuff", tmp_path, split="val2017")) == 3
    train = list_dataset_images("coco_stuff171", tmp_path, split="train")
    assert [r.image_id for r in train] == ["000000000009"]
    assert train[0].label_path.endswith("annotations/train2017/000000000009_labelTrainIds.png")


def test_coco_object_layout(tmp_path: Path) -> None:
    stuff = _make_coco(tmp_path)  # converted in place
    recs = list_dataset_images("coco_object", tmp_path)
    assert [r.image_id for r in recs] == ["000000000139", "000000000285", "000000000632"]
    assert Path(recs[2].label_path) == (
        stuff / "annotations" / "val2017" / "000000000632_instanceTrainIds.png"
    )
    # written with -o data_root/coco_object: that folder is preferred
    obj = _make_coco(tmp_path, folder="coco_object")
    recs = list_dataset_images("coco_object", tmp_path)
    assert Path(recs[0].path).parent == obj / "images" / "val2017"
    assert Path(recs[0].label_path).parent == obj / "annotations" / "val2017"
    assert list_dataset_images("coco_object", obj) == recs


@pytest.mark.parametrize("root_kind", ["parent", "dataset"])
def test_cityscapes_layout(tmp_path: Path, root_kind: str) -> None:
    base = _make_cityscapes(tmp_path)
    recs = list_dataset_images("cityscapes", tmp_path if root_kind == "parent" else base)
    assert [r.image_id for r in recs] == [
        "frankfurt/frankfurt_000000_000294",
        "frankfurt/frankfurt_000001_000000",
        "lindau/lindau_000000_000019",
        "munster/munster_000000_000019",
    ]
    r = recs[2]
    assert r.split == "val" and r.source == "cityscapes"
    assert Path(r.path) == base / "leftImg8bit" / "val" / "lindau" / (
        "lindau_000000_000019_leftImg8bit.png"
    )
    assert Path(r.label_path) == base / "gtFine" / "val" / "lindau" / (
        "lindau_000000_000019_gtFine_labelTrainIds.png"
    )


@pytest.mark.parametrize("name", BENCHMARKS)
def test_missing_root_names_expected_path(tmp_path: Path, name: str) -> None:
    expected_dir = {
        "ade20k": "ADEChallengeData2016/images/validation",
        "voc21": "VOCdevkit/VOC2012/ImageSets/Segmentation",
        "voc20": "VOCdevkit/VOC2012/ImageSets/Segmentation",
        "context60": "VOCdevkit/VOC2010/ImageSets/SegmentationContext",
        "context59": "VOCdevkit/VOC2010/ImageSets/SegmentationContext",
        "coco_stuff171": "coco_stuff164k/images/val2017",
        "coco_object": "coco_stuff164k/images/val2017",
        "cityscapes": "cityscapes/leftImg8bit/val",
    }[name]
    for root in (tmp_path, tmp_path / "does_not_exist"):
        with pytest.raises(OvssError) as info:
            list_dataset_images(name, root)
        msg = str(info.value)
        assert str(root / expected_dir) in msg
        assert "download" in msg and "\n" not in msg


def test_unknown_split(tmp_path: Path) -> None:
    _make_voc(tmp_path)
    with pytest.raises(OvssError, match="no split 'test'"):
        list_dataset_images("voc21", tmp_path, split="test")


def test_empty_image_folder(tmp_path: Path) -> None:
    (tmp_path / "ADEChallengeData2016" / "images" / "validation").mkdir(parents=True)
    with pytest.raises(OvssError, match="no \\*.jpg files"):
        list_dataset_images("ade20k", tmp_path)


# -- custom layout -------------------------------------------------------------------------------


def _make_custom(root: Path, annotations: bool = True) -> None:
    _touch(
        root / "images" / "val" / "b.png",
        root / "images" / "val" / "a.JPG",
        root / "images" / "val" / "sub" / "c.webp",
        root / "images" / "val" / "readme.md",
        root / "images" / "train" / "t.jpg",
    )
    if annotations:
        _touch(root / "annotations" / "val" / "a.png")
    (root / "classes.txt").write_text("road\ncar; automobile\nsky\n")


def test_custom_layout(tmp_path: Path) -> None:
    _make_custom(tmp_path)
    recs = list_dataset_images("custom", tmp_path)
    assert [r.image_id for r in recs] == ["a", "b", "sub/c"]
    assert all(r.source == "custom" and r.split == "val" for r in recs)
    assert Path(recs[0].path) == tmp_path / "images" / "val" / "a.JPG"
    assert Path(recs[2].label_path) == tmp_path / "annotations" / "val" / "sub" / "c.png"
    assert [r.image_id for r in list_dataset_images("custom", tmp_path, split="train")] == ["t"]

    spec = get_dataset("custom", data_root=tmp_path)
    assert spec.num_classes == 3
    assert not spec.reduce_zero_label and not spec.has_background
    assert spec.splits == ("train", "val")
    assert get_dataset("custom").num_classes == 0
    assert class_names("custom", data_root=tmp_path) == [["road"], ["car", "automobile"], ["sky"]]


def test_custom_without_annotations(tmp_path: Path) -> None:
    _make_custom(tmp_path, annotations=False)
    recs = list_dataset_images("custom", tmp_path)
    assert len(recs) == 3 and all(r.label_path is None for r in recs)


def test_custom_errors(tmp_path: Path) -> None:
    with pytest.raises(OvssError) as info:
        list_dataset_images("custom", tmp_path)
    assert str(tmp_path / "images" / "val") in str(info.value)
    with pytest.raises(OvssError, match="data_root"):
        class_names("custom")
    with pytest.raises(OvssError, match="class file not found"):
        class_names("custom", data_root=tmp_path)
    with pytest.raises(OvssError, match="no split"):
        list_dataset_images("custom", tmp_path, split="../x")


# -- class names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BENCHMARKS)
@pytest.mark.parametrize("family", ["sclip", "proxyclip"])
def test_class_name_counts(name: str, family: str) -> None:
    names = class_names(name, family=family)
    assert len(names) == NUM_CLASSES[name]
    for synonyms in names:
        assert synonyms and all(s and "\n" not in s and "\r" not in s for s in synonyms)


def test_class_name_content_and_families() -> None:
    voc_s, voc_p = class_names("voc21"), class_names("voc21", family="proxyclip")
    assert len(voc_s[0]) == 26 and voc_s[0][:2] == ["sky", "wall"]
    assert voc_p[0] == voc_s[0]  # same 26 words, other separator
    assert voc_s[1] == ["aeroplane"] and voc_p[1] == ["aeroplane"]
    person = 15
    assert len(voc_s[person]) > 1 and voc_p[person] == ["person"]
    assert len(voc_s[-1]) == 5 and voc_p[-1] == ["tvmonitor"]
    assert class_names("voc20") == voc_s[1:]
    assert class_names("voc20", family="proxyclip") == voc_p[1:]
    with pytest.raises(OvssError, match="not a known class-name family"):
        class_names("voc20", family="trident")  # families name class files, not methods

    obj_s, obj_p = class_names("coco_object"), class_names("coco_object", family="proxyclip")
    assert len(obj_s[0]) == 26 and len(obj_p[0]) == 17
    assert obj_p[1] == ["person"] and len(obj_s[1]) > 1

    assert class_names("ade20k", family="proxyclip") == class_names("ade20k")
    assert class_names("context60")[0] == ["background"]
    assert class_names("context60")[-1] == ["wood "]  # byte-exact, as the reference parser
    assert class_names("coco_stuff171")[-1] == ["wood"]
    assert "building-other" in {s for c in class_names("coco_stuff171") for s in c}
    assert class_names("cityscapes")[:2] == [["road"], ["sidewalk"]]
    assert class_names("voc21", family="SCLIP") == voc_s


def test_unknown_family() -> None:
    with pytest.raises(OvssError, match="family"):
        class_names("voc21", family="clip")


def test_bundled_class_files_are_byte_exact() -> None:
    expected = {
        "ade20k.txt": "e66c13f6d5984206f5ff5d66c7250545",
        "voc20.txt": "c0a263bf09bad31b0c62fee26518ecf2",
        "voc21.txt": "66096d7be3f9c5d6d7b3e46211c2aa00",
        "context59.txt": "de9023e283be0aba552072e12da6267d",
        "context60.txt": "478af0e4f26e096e35a019db8be4cc96",
        "coco_stuff171.txt": "2d025c4203763ced2e27ec26b7c2a700",
        "coco_object.txt": "4eb522592b19e2728d3ed4299a31b7b0",
        "cityscapes.txt": "a8bbbb996e8281b62e333ffe461b129e",
        "proxyclip_trident/voc20.txt": "57b05f75d2799ee43d3bade790d54f39",
        "proxyclip_trident/voc21.txt": "ea6e671fbb6d61ac6ac45667ff030f69",
        "proxyclip_trident/coco_object.txt": "14582307b68e7849d711e4db79dc7604",
    }
    folder = resources.files("featurestore.data").joinpath("classnames")
    for rel, md5 in expected.items():
        data = folder.joinpath(*rel.split("/")).read_bytes()
        assert hashlib.md5(data).hexdigest() == md5, rel


def test_read_class_file_rules(tmp_path: Path) -> None:
    comma = tmp_path / "comma.txt"
    comma.write_text("cat, kitty\ndog\nsports ball, ball\n")
    assert read_class_file(comma) == [["cat", "kitty"], ["dog"], ["sports ball", "ball"]]

    semi = tmp_path / "semi.txt"  # one line with "; " switches the whole file to "; "
    semi.write_text("person; human\nbolts, nuts\n\n\n")
    assert read_class_file(semi) == [["person", "human"], ["bolts, nuts"]]

    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes("\ufeffsky , heaven\r\ntree\r\n".encode())
    assert read_class_file(crlf) == [["sky", "heaven"], ["tree"]]


def test_read_class_file_errors(tmp_path: Path) -> None:
    with pytest.raises(OvssError, match="class file not found"):
        read_class_file(tmp_path / "absent.txt")
    gap = tmp_path / "gap.txt"
    gap.write_text("a\n\nb\n")
    with pytest.raises(OvssError, match="line 2 is empty"):
        read_class_file(gap)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(OvssError, match="holds no class"):
        read_class_file(empty)


# -- palettes ------------------------------------------------------------------------------------


def test_voc_colour_map() -> None:
    cmap = voc_colour_map(np.arange(4))
    assert cmap.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert voc_colour_map(np.array(255)).tolist() == [224, 224, 192]


@pytest.mark.parametrize("name", [*BENCHMARKS, "custom"])
def test_palette_shape_distinct_deterministic(name: str) -> None:
    n = (
        max(NUM_CLASSES.get(name, 5), 300)
        if name in ("cityscapes", "custom")
        else NUM_CLASSES[name]
    )
    pal = palette(name, n)
    assert pal.shape == (n, 3) and pal.dtype == np.uint8
    assert len({tuple(c) for c in pal.tolist()}) == n
    np.testing.assert_array_equal(pal, palette(name, n))
    assert palette(name, 0).shape == (0, 3)


def test_palette_rules() -> None:
    assert palette("voc21", 2).tolist() == [[0, 0, 0], [128, 0, 0]]
    np.testing.assert_array_equal(palette("voc20", 20), palette("voc21", 21)[1:])
    np.testing.assert_array_equal(palette("context59", 59), palette("context60", 60)[1:])
    assert palette("ade20k", 150)[0].tolist() != [0, 0, 0]
    assert palette("cityscapes", 19)[0].tolist() == [128, 64, 128]
    assert palette("cityscapes", 19)[-1].tolist() == [119, 11, 32]
    with pytest.raises(OvssError):
        palette("ade20k", -1)


# -- expected counts, preparation entries, dataset folders, descriptions ------------------------

EXPECTED_VAL = {
    "ade20k": 2000,
    "voc21": 1449,
    "voc20": 1449,
    "context60": 5105,
    "context59": 5105,
    "coco_stuff171": 5000,
    "coco_object": 5000,
    "cityscapes": 500,
}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_expected_counts_and_prepare_entries(name: str) -> None:
    spec = get_dataset(name)
    assert spec.expected_count(spec.default_split) == EXPECTED_VAL[name]
    assert spec.expected_count("no-such-split") is None
    assert all(split in spec.splits for split, _ in spec.expected_images)
    assert spec.converter == {"coco_stuff171": "coco_stuff", "coco_object": "coco_object"}.get(name)
    assert spec.prepare_steps
    for step in spec.prepare_steps:
        filled = step.format(data_root="R", dataset_dir="D", dataset_parent="P")
        assert "{" not in filled and "\n" not in filled


def test_resolve_split() -> None:
    assert resolve_split("ade") == "validation"
    assert resolve_split("ade20k", "val") == "validation"
    assert resolve_split("coco_object", "val2017") == "val"
    with pytest.raises(OvssError, match="no split"):
        resolve_split("voc21", "test")


def test_dataset_dir_found_and_expected(tmp_path: Path) -> None:
    base = _make_voc(tmp_path, year="2010", context=True)
    for root in (tmp_path, tmp_path / "VOCdevkit", base):
        assert dataset_dir("context59", root) == base
    with pytest.raises(OvssError, match="download"):
        dataset_dir("ade20k", tmp_path)
    guess = {
        tmp_path: tmp_path / "ADEChallengeData2016",
        tmp_path / "ADEChallengeData2016": tmp_path / "ADEChallengeData2016",
    }
    for root, expected in guess.items():
        assert dataset_dir("ade20k", root, must_exist=False) == expected
    assert dataset_dir("voc21", tmp_path / "x" / "VOCdevkit", must_exist=False) == (
        tmp_path / "x" / "VOCdevkit" / "VOC2012"
    )
    assert dataset_dir("coco_object", tmp_path, must_exist=False) == tmp_path / "coco_stuff164k"
    assert dataset_dir("custom", tmp_path, must_exist=False) == tmp_path


def test_describe_datasets(tmp_path: Path) -> None:
    infos = describe_datasets()
    assert [i.name for i in infos] == list_datasets()
    by_name = {i.name: i for i in infos}
    ade = by_name["ade20k"]
    assert (ade.num_classes, ade.split, ade.expected_images) == (150, "validation", 2000)
    assert ade.layout_root == "ADEChallengeData2016/" and "reduce_zero_label" in ade.label_rule
    assert ade.present is None and ade.dataset_dir is None
    assert "background" in by_name["voc21"].label_rule
    assert by_name["coco_stuff171"].label_suffix == "_labelTrainIds.png"
    assert by_name["custom"].expected_images is None

    _make_ade(tmp_path)
    _make_custom(tmp_path)
    found = {i.name: i for i in describe_datasets(tmp_path)}
    assert found["ade20k"].present is True
    assert found["ade20k"].dataset_dir == str(tmp_path / "ADEChallengeData2016")
    assert found["voc21"].present is False and found["voc21"].dataset_dir is None
    assert found["custom"].present is True and found["custom"].num_classes == 3


def test_published_palettes_known_entries() -> None:
    ade = palette("ade20k", 150)
    assert ade[0].tolist() == [120, 120, 120]  # wall
    assert ade[2].tolist() == [6, 230, 230]  # sky
    assert ade[12].tolist() == [150, 5, 61]  # person
    assert ade[149].tolist() == [92, 0, 255]  # flag
    # the table repeats road's colour for skyscraper: replaced by an unused VOC colour
    assert ade[6].tolist() == [140, 140, 140] and ade[48].tolist() != [140, 140, 140]
    np.testing.assert_array_equal(palette("context60", 60)[:48], ade[:48])
    assert palette("context59", 59)[0].tolist() == [180, 120, 120]  # aeroplane
    coco = palette("coco_stuff171", 171)
    assert coco[0].tolist() == [0, 192, 64] and coco[170].tolist() == [64, 64, 0]
    assert coco[1].tolist() != [0, 192, 64]  # bicycle repeats person's colour in the table
    assert palette("cityscapes", 19)[13].tolist() == [0, 0, 142]  # car
    assert palette("ade20k", 160).shape == (160, 3)  # beyond the table: spare VOC colours
