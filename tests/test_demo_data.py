"""Tests of featurestore.demo_data: the Voronoi-collage demo benchmark."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurestore.demo_data import (
    DEMO_CLASSES,
    DEMO_PALETTE,
    DemoDataset,
    _palette_png,
    build_collage_dataset,
    load_demo_photo,
)
from featurestore.errors import OvssError

SMALL = {"n_train": 6, "n_val": 3, "size": (64, 80), "n_cells": (3, 6)}


def _all_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` as relative path -> bytes."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoDataset, float]:
    """The default-size dataset, built once for the module, with its build time in seconds."""
    root = tmp_path_factory.mktemp("demo_default")
    start = time.perf_counter()
    dataset = build_collage_dataset(root)
    return dataset, time.perf_counter() - start


def test_default_build_is_fresh(default_build: tuple[DemoDataset, float]) -> None:
    # Build time is a benchmark figure, not a test assertion (timed tests flake under load).
    dataset, _ = default_build
    assert dataset.rebuilt


def test_layout_and_counts(default_build: tuple[DemoDataset, float]) -> None:
    dataset, _ = default_build
    root = dataset.root
    assert (dataset.n_train, dataset.n_val) == (24, 8)
    assert len(dataset.train_ids) == 24 and len(dataset.val_ids) == 8
    assert not set(dataset.train_ids) & set(dataset.val_ids)
    for split in ("train", "val"):
        expected = {f"{image_id}.png" for image_id in dataset.ids(split)}
        assert {p.name for p in (root / "images" / split).iterdir()} == expected
        assert {p.name for p in (root / "annotations" / split).iterdir()} == expected
    assert (root / "classes.txt").read_text().splitlines() == list(DEMO_CLASSES)
    assert dataset.class_names == DEMO_CLASSES
    readme = (root / "README.txt").read_text()
    assert "seed: 0" in readme and "brick" in readme
    recorded = json.loads((root / "demo.json").read_text())
    assert recorded["seed"] == 0 and recorded["size"] == [224, 288]


def test_images_and_labels_match(default_build: tuple[DemoDataset, float]) -> None:
    dataset, _ = default_build
    n_classes = len(DEMO_CLASSES)
    for split in ("train", "val"):
        for image_id in dataset.ids(split):
            image = Image.open(dataset.image_path(split, image_id))
            label_image = Image.open(dataset.label_path(split, image_id))
            assert image.mode == "RGB" and image.size == (288, 224)
            assert label_image.mode == "P" and label_image.size == (288, 224)
            labels = np.array(label_image)
            assert labels.dtype == np.uint8
            assert labels.max() < n_classes
            assert len(np.unique(labels)) >= 2, f"{split}/{image_id} shows a single class"


def test_each_split_shows_every_class(default_build: tuple[DemoDataset, float]) -> None:
    dataset, _ = default_build
    for split in ("train", "val"):
        seen: set[int] = set()
        for image_id in dataset.ids(split):
            seen |= set(np.unique(np.array(Image.open(dataset.label_path(split, image_id)))))
        assert seen == set(range(len(DEMO_CLASSES))), f"{split} misses classes"


def test_labels_follow_the_image_content(default_build: tuple[DemoDataset, float]) -> None:
    """Pixels of the (colourless) grass class are grey; those of coffee are not."""
    dataset, _ = default_build
    grass, coffee = DEMO_CLASSES.index("grass"), DEMO_CLASSES.index("coffee")
    spread = {grass: [], coffee: []}
    for image_id in dataset.train_ids:
        image = np.array(Image.open(dataset.image_path("train", image_id))).astype(np.int16)
        labels = np.array(Image.open(dataset.label_path("train", image_id)))
        channel_spread = image.max(axis=2) - image.min(axis=2)
        for class_index, values in spread.items():
            values.extend(channel_spread[labels == class_index].tolist())
    assert max(spread[grass]) == 0
    assert np.mean(spread[coffee]) > 20


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    build_collage_dataset(tmp_path / "a", seed=3, **SMALL)
    build_collage_dataset(tmp_path / "b", seed=3, **SMALL)
    files_a, files_b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert len(files_a) == 2 * (6 + 3) + 3
    assert files_a == files_b


def test_other_seed_and_val_stream_differ(tmp_path: Path) -> None:
    first = build_collage_dataset(tmp_path / "a", seed=0, **SMALL)
    other = build_collage_dataset(tmp_path / "b", seed=1, **SMALL)
    image_a = first.image_path("train", "train_0000").read_bytes()
    assert image_a != other.image_path("train", "train_0000").read_bytes()
    assert image_a != first.image_path("val", "val_0000").read_bytes()


def test_second_call_reuses_without_writing(tmp_path: Path) -> None:
    first = build_collage_dataset(tmp_path, seed=2, **SMALL)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    time.sleep(0.01)
    second = build_collage_dataset(tmp_path, seed=2, **SMALL)
    assert first.rebuilt and not second.rebuilt
    assert second.train_ids == first.train_ids and second.val_ids == first.val_ids
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes


def test_changed_parameters_rebuild_and_drop_stale_files(tmp_path: Path) -> None:
    build_collage_dataset(tmp_path, seed=2, **SMALL)
    smaller = build_collage_dataset(tmp_path, seed=2, **{**SMALL, "n_train": 4})
    assert smaller.rebuilt
    assert len(list((tmp_path / "images" / "train").iterdir())) == 4
    assert json.loads((tmp_path / "demo.json").read_text())["n_train"] == 4


def test_unfinished_build_is_redone(tmp_path: Path) -> None:
    build_collage_dataset(tmp_path, seed=2, **SMALL)
    (tmp_path / "annotations" / "val" / "val_0001.png").unlink()
    again = build_collage_dataset(tmp_path, seed=2, **SMALL)
    assert again.rebuilt
    assert (tmp_path / "annotations" / "val" / "val_0001.png").is_file()


def test_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OvssError, match="not an ovss demo dataset"):
        build_collage_dataset(tmp_path, **SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "overrides",
    [
        {"seed": -1},
        {"n_val": 0},
        {"n_cells": (1, 4)},
        {"n_cells": (5, 4)},
        {"n_val": 1, "n_cells": (2, 4)},
        {"size": (8, 80)},
    ],
)
def test_rejects_impossible_parameters(tmp_path: Path, overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_collage_dataset(tmp_path, **{**SMALL, **overrides})  # type: ignore[arg-type]
    assert not (tmp_path / "demo.json").exists()


def test_few_images_still_cover_all_classes(tmp_path: Path) -> None:
    dataset = build_collage_dataset(tmp_path, n_train=2, n_val=2, size=(48, 48), n_cells=(2, 4))
    for split in ("train", "val"):
        seen: set[int] = set()
        for image_id in dataset.ids(split):
            seen |= set(np.unique(np.array(Image.open(dataset.label_path(split, image_id)))))
        assert seen == set(range(len(DEMO_CLASSES)))


@pytest.mark.parametrize("name", DEMO_CLASSES)
def test_photos_load_offline_as_rgb(name: str) -> None:
    photo = load_demo_photo(name)
    assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
    assert min(photo.shape[:2]) >= 300


def test_photos_equal_the_skimage_loaders() -> None:
    """Reading the files directly gives the pixels of ``skimage.data.<name>()``."""
    import skimage.data

    for name in DEMO_CLASSES:
        expected = getattr(skimage.data, name)()
        if expected.ndim == 2:
            expected = np.repeat(expected[:, :, None], 3, axis=2)
        if name == "retina":
            side = round(expected.shape[0] * 0.6)
            top = (expected.shape[0] - side) // 2
            expected = expected[top : top + side, top : top + side]
        np.testing.assert_array_equal(load_demo_photo(name), expected, err_msg=name)


def test_unknown_photo_is_a_user_error() -> None:
    with pytest.raises(OvssError, match="not a demo class"):
        load_demo_photo("astronaut")


def test_palette_png_round_trips_indices(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 2], [7, 7, 3]], dtype=np.int64)
    path = tmp_path / "labels.png"
    _palette_png(labels, DEMO_PALETTE, path)
    image = Image.open(path)
    assert image.mode == "P"
    np.testing.assert_array_equal(np.array(image), labels)
    np.testing.assert_array_equal(np.array(image.convert("RGB"))[1, 0], DEMO_PALETTE[7])
    with pytest.raises(ValueError):
        _palette_png(np.full((2, 2), 256), DEMO_PALETTE, path)
