"""The embedded demo benchmark: Voronoi collages of photographs that ship with scikit-image.

`build_collage_dataset` writes a small segmentation benchmark with known labels, offline and in a
few seconds, in the "custom" dataset layout::

    <root>/images/{train,val}/<id>.png        RGB collages (uint8)
    <root>/annotations/{train,val}/<id>.png   palette ("P") PNGs of class indices 0..K-1, no ignore
    <root>/classes.txt                        one class name per line, index order
    <root>/README.txt                         what this is, the seed and the parameters
    <root>/demo.json                          the parameters; written last, marks a finished build

Each collage is a Voronoi partition of the image (nearest-seed argmin on the pixel grid). Every
cell is filled with a random crop (position, scale 0.75-1.5, horizontal flip) of the photograph of
its class, so the texture a model sees varies from cell to cell and from image to image. The
train and val splits draw from independent random streams (``SeedSequence(seed).spawn(2)``), so
val layouts, class assignments and crop positions are not copies of train ones.

Classes (all eight are files inside the scikit-image wheel, so no download is ever needed):

==========================  ============================================  =====================
class                       ``skimage.data`` loader                       native size, colour
==========================  ============================================  =====================
brick                       ``brick()``                                   512x512 grey
grass                       ``grass()``                                   512x512 grey
gravel                      ``gravel()``                                  512x512 grey
coffee                      ``coffee()``                                  400x600 RGB
moon                        ``moon()``                                    512x512 grey
hubble_deep_field           ``hubble_deep_field()``                       872x1000 RGB
retina                      ``retina()`` (central 60 %, no black rim)     1411x1411 RGB
immunohistochemistry        ``immunohistochemistry()``                    512x512 RGB
==========================  ============================================  =====================

Re-running with the same parameters is byte-identical, and finds the finished dataset and returns
without writing anything.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from featurestore.errors import OvssError

__all__ = [
    "DEMO_CLASSES",
    "DEMO_PALETTE",
    "DemoDataset",
    "build_collage_dataset",
    "load_demo_photo",
]

#: Bump when the generator changes in a way that changes the written bytes.
GENERATOR_VERSION = 1

#: The demo classes, in label-index order; each name is also its ``skimage.data`` loader.
DEMO_CLASSES: tuple[str, ...] = (
    "brick",
    "grass",
    "gravel",
    "coffee",
    "moon",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)

#: One RGB colour per class (row ``k`` is the colour of label ``k``) for the palette PNGs.
DEMO_PALETTE: np.ndarray = np.array(
    [
        [178, 34, 34],  # brick: firebrick
        [60, 179, 113],  # grass: green
        [160, 160, 160],  # gravel: grey
        [139, 90, 43],  # coffee: brown
        [240, 230, 140],  # moon: khaki
        [25, 25, 112],  # hubble_deep_field: midnight blue
        [255, 140, 0],  # retina: orange
        [186, 85, 211],  # immunohistochemistry: orchid
    ],
    dtype=np.uint8,
)

# File of each class inside ``skimage/data`` (what ``skimage.data.<name>()`` reads).
_PHOTO_FILES: dict[str, str] = {
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "coffee": "coffee.png",
    "moon": "moon.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
    "immunohistochemistry": "ihc.png",
}
_SCALE_RANGE: tuple[float, float] = (0.75, 1.5)
# Fraction of the retina photograph kept around its centre: the rest is the black camera rim.
_RETINA_CENTRE_FRACTION = 0.6
# zlib level of the written PNGs: level 1 encodes ~3x faster than the default 6, ~15 % larger.
_PNG_LEVEL = 1
# Seeds of one collage are at least this many "mean cell radii" apart (see `_voronoi_seeds`).
_MIN_SEED_SPACING = 0.4


@dataclass(frozen=True)
class DemoDataset:
    """A built demo benchmark on disk.

    Attributes:
        root: the dataset directory.
        class_names: class names in label-index order (label ``k`` is ``class_names[k]``).
        n_train: number of train images.
        n_val: number of val images.
        train_ids: image ids of the train split (file stem of image and annotation).
        val_ids: image ids of the val split.
        seed: the seed it was built from.
        size: image size as ``(height, width)`` in pixels.
        rebuilt: True if this call wrote the files, False if a finished build was reused.
    """

    root: Path
    class_names: tuple[str, ...]
    n_train: int
    n_val: int
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    seed: int
    size: tuple[int, int]
    rebuilt: bool

    def ids(self, split: str) -> tuple[str, ...]:
        """Image ids of ``split`` (``"train"`` or ``"val"``)."""
        if split == "train":
            return self.train_ids
        if split == "val":
            return self.val_ids
        raise ValueError(f"'{split}' is not a demo split; choose from train, val")

    def image_path(self, split: str, image_id: str) -> Path:
        """Path of the RGB collage ``image_id`` of ``split``."""
        return self.root / "images" / split / f"{image_id}.png"

    def label_path(self, split: str, image_id: str) -> Path:
        """Path of the palette PNG of class indices for ``image_id`` of ``split``."""
        return self.root / "annotations" / split / f"{image_id}.png"


def _skimage_data_dir() -> Path:
    """The ``skimage/data`` folder of the installed scikit-image, found without importing it.

    Importing ``skimage.io`` (what the ``skimage.data`` loaders use) takes about a second; the
    files are plain PNG/JPEG that Pillow decodes to the same pixels.
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise OvssError("scikit-image is not installed; the demo dataset needs scikit-image>=0.22")
    return Path(spec.origin).parent / "data"


def load_demo_photo(name: str) -> np.ndarray:
    """Load the scikit-image photograph of demo class ``name`` as RGB uint8, shape (H, W, 3).

    The pixels are those of ``skimage.data.<name>()``, read straight from the file inside the
    scikit-image wheel. Grey images are repeated over three channels. The retina photograph is cut
    to its central 60 % so crops do not land on the black camera rim.

    Raises:
        OvssError: ``name`` is not a demo class, or the file is not in the installed scikit-image.
    """
    if name not in DEMO_CLASSES:
        raise OvssError(f"'{name}' is not a demo class; choose from {', '.join(DEMO_CLASSES)}")
    path = _skimage_data_dir() / _PHOTO_FILES[name]
    try:
        with Image.open(path) as image:
            photo = np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise OvssError(
            f"cannot read {path} ({exc}); the demo needs the photographs that ship inside the "
            "scikit-image wheel: reinstall scikit-image>=0.22"
        ) from exc
    if name == "retina":
        h, w = photo.shape[:2]
        ch, cw = round(h * _RETINA_CENTRE_FRACTION), round(w * _RETINA_CENTRE_FRACTION)
        top, left = (h - ch) // 2, (w - cw) // 2
        photo = photo[top : top + ch, left : left + cw]
    return np.ascontiguousarray(photo)


def _prepare_sources(size: tuple[int, int]) -> list[Image.Image]:
    """The class photographs resized so the largest crop (scale 1.5) of ``size`` always fits.

    Each photograph is resized (aspect kept) so that its short side is ``ceil(1.5 * max(size))``.
    """
    short_side = math.ceil(_SCALE_RANGE[1] * max(size))
    sources = []
    for name in DEMO_CLASSES:
        photo = Image.fromarray(load_demo_photo(name))
        w, h = photo.size
        factor = short_side / min(w, h)
        new_size = (max(short_side, round(w * factor)), max(short_side, round(h * factor)))
        sources.append(photo.resize(new_size, Image.Resampling.BILINEAR))
    return sources


def _voronoi_seeds(rng: np.random.Generator, n: int, size: tuple[int, int]) -> np.ndarray:
    """``n`` distinct integer pixel positions (n, 2) as (row, col), spread by dart throwing.

    Seeds are at least ``0.4 * sqrt(H * W / n)`` pixels apart, so every cell contains a disc of
    half that radius around its seed: no cell is empty or a sliver. If the spacing cannot be met
    in a few hundred throws it is relaxed by 20 % and the throwing starts over.
    """
    height, width = size
    spacing = _MIN_SEED_SPACING * math.sqrt(height * width / n)
    while True:
        seeds: list[tuple[int, int]] = []
        for _ in range(200 * n):
            row, col = int(rng.integers(height)), int(rng.integers(width))
            if all((row - r) ** 2 + (col - c) ** 2 >= spacing**2 for r, c in seeds):
                seeds.append((row, col))
                if len(seeds) == n:
                    return np.array(seeds, dtype=np.int64)
        spacing *= 0.8
        if spacing < 1.0:
            raise ValueError(f"cannot place {n} distinct Voronoi seeds in a {height}x{width} image")


def _voronoi_labels(seeds: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Index (H, W) int64 of the nearest seed for every pixel (squared Euclidean distance)."""
    rows = np.arange(size[0], dtype=np.float32)[None, :, None]
    cols = np.arange(size[1], dtype=np.float32)[None, None, :]
    seed_rows = seeds[:, 0].astype(np.float32)[:, None, None]
    seed_cols = seeds[:, 1].astype(np.float32)[:, None, None]
    dist2 = (rows - seed_rows) ** 2 + (cols - seed_cols) ** 2
    return np.argmin(dist2, axis=0)


def _assign_cell_classes(
    rng: np.random.Generator, cell_counts: list[int], n_classes: int
) -> list[np.ndarray]:
    """A class per cell for every image: all classes appear in the split, >= 2 per image.

    ``n_classes`` randomly chosen cells of the split get a random permutation of all classes; the
    others get random classes. An image whose cells all got one class has a cell outside the
    chosen ones switched to another class (there is always one: chosen cells differ in class).
    """
    total = sum(cell_counts)
    flat = rng.integers(n_classes, size=total)
    required = rng.choice(total, size=n_classes, replace=False)
    flat[required] = rng.permutation(n_classes)
    is_required = np.zeros(total, dtype=bool)
    is_required[required] = True
    per_image = []
    start = 0
    for count in cell_counts:
        classes = flat[start : start + count].copy()
        if np.all(classes == classes[0]):
            free = np.flatnonzero(~is_required[start : start + count])
            cell = int(free[rng.integers(len(free))])
            classes[cell] = (classes[cell] + 1 + rng.integers(n_classes - 1)) % n_classes
        per_image.append(classes)
        start += count
    return per_image


def _crop_texture(
    rng: np.random.Generator, source: Image.Image, size: tuple[int, int]
) -> np.ndarray:
    """A random crop (scale 0.75-1.5 of ``size``, random position, 50 % h-flip) as (H, W, 3)."""
    height, width = size
    scale = rng.uniform(*_SCALE_RANGE)
    crop_w, crop_h = width * scale, height * scale
    left = rng.uniform(0.0, source.width - crop_w)
    top = rng.uniform(0.0, source.height - crop_h)
    flip = bool(rng.random() < 0.5)
    box = (left, top, left + crop_w, top + crop_h)
    texture = np.asarray(source.resize((width, height), Image.Resampling.BILINEAR, box=box))
    return texture[:, ::-1] if flip else texture


def _palette_png(labels: np.ndarray, palette: np.ndarray, path: Path) -> None:
    """Write ``labels`` (H, W) of indices 0..255 as a palette PNG coloured by ``palette`` (K, 3).

    Reading it back with ``np.array(Image.open(path))`` gives the indices, not the colours.
    """
    if labels.ndim != 2 or labels.min() < 0 or labels.max() > 255:
        raise ValueError(f"labels must be (H, W) indices in 0..255, got {labels.shape}")
    height, width = labels.shape
    image = Image.frombytes("P", (width, height), labels.astype(np.uint8).tobytes())
    flat_palette = np.zeros((256, 3), dtype=np.uint8)
    flat_palette[: len(palette)] = palette
    image.putpalette(flat_palette.reshape(-1).tolist())
    image.save(path, format="PNG", compress_level=_PNG_LEVEL)


def _split_counts(
    rng: np.random.Generator, n_images: int, n_cells: tuple[int, int], n_classes: int
) -> list[int]:
    """Random cell count per image in ``n_cells`` (inclusive), raised to cover all classes."""
    counts = [int(c) for c in rng.integers(n_cells[0], n_cells[1] + 1, size=n_images)]
    while sum(counts) < n_classes:
        below = [i for i, c in enumerate(counts) if c < n_cells[1]]
        counts[below[int(rng.integers(len(below)))]] += 1
    return counts


def _write_split(
    root: Path,
    split: str,
    rng: np.random.Generator,
    n_images: int,
    size: tuple[int, int],
    n_cells: tuple[int, int],
    sources: list[Image.Image],
) -> tuple[str, ...]:
    """Draw and write the ``n_images`` collages of ``split``; return their ids."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    n_classes = len(DEMO_CLASSES)
    counts = _split_counts(rng, n_images, n_cells, n_classes)
    cell_classes = _assign_cell_classes(rng, counts, n_classes)
    ids = []
    for index, (count, classes) in enumerate(zip(counts, cell_classes, strict=True)):
        cells = _voronoi_labels(_voronoi_seeds(rng, count, size), size)
        image = np.empty((*size, 3), dtype=np.uint8)
        for cell, class_index in enumerate(classes):
            mask = cells == cell
            image[mask] = _crop_texture(rng, sources[class_index], size)[mask]
        labels = classes[cells]
        image_id = f"{split}_{index:04d}"
        image_path = root / "images" / split / f"{image_id}.png"
        Image.fromarray(image).save(image_path, format="PNG", compress_level=_PNG_LEVEL)
        _palette_png(labels, DEMO_PALETTE, root / "annotations" / split / f"{image_id}.png")
        ids.append(image_id)
    return tuple(ids)


def _readme(
    seed: int, n_train: int, n_val: int, size: tuple[int, int], n_cells: tuple[int, int]
) -> str:
    """Text of ``<root>/README.txt``."""
    classes = "\n".join(
        f"  {k}  {name:<22} skimage.data.{name}()" for k, name in enumerate(DEMO_CLASSES)
    )
    return (
        "ovss demo benchmark: Voronoi collages of photographs shipped with scikit-image\n"
        "\n"
        "Every image is a Voronoi partition; each cell shows a random crop (random position,\n"
        "scale 0.75-1.5, random horizontal flip) of the photograph of its class. Labels are\n"
        "class indices (palette PNG), every pixel is labelled, there is no ignore value.\n"
        "train and val are drawn from independent random streams.\n"
        "\n"
        f"seed: {seed}\n"
        f"images: {n_train} train, {n_val} val, {size[0]}x{size[1]} (height x width)\n"
        f"cells per image: {n_cells[0]}..{n_cells[1]}\n"
        "\n"
        "classes (index, name, source):\n"
        f"{classes}\n"
        "\n"
        "layout:\n"
        "  images/{train,val}/<id>.png        RGB collages\n"
        "  annotations/{train,val}/<id>.png   class indices 0..K-1 (mode P)\n"
        "  classes.txt                        class names in index order\n"
        "  demo.json                          build parameters (rebuilt when they change)\n"
        "\n"
        "Made by featurestore.demo_data.build_collage_dataset; same seed -> same bytes.\n"
    )


def _expected_ids(split: str, n_images: int) -> tuple[str, ...]:
    return tuple(f"{split}_{i:04d}" for i in range(n_images))


def _is_finished(root: Path, params: dict[str, object], n_train: int, n_val: int) -> bool:
    """True if ``root`` holds a finished build made with exactly ``params``."""
    try:
        recorded = json.loads((root / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    if recorded != params:
        return False
    for split, n_images in (("train", n_train), ("val", n_val)):
        for image_id in _expected_ids(split, n_images):
            for kind in ("images", "annotations"):
                if not (root / kind / split / f"{image_id}.png").is_file():
                    return False
    return (root / "classes.txt").is_file()


def _check_arguments(
    seed: int, n_train: int, n_val: int, size: tuple[int, int], n_cells: tuple[int, int]
) -> None:
    """Raise ValueError with a clear message for arguments the generator cannot honour."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1, got {n_train} and {n_val}")
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"size must be (height, width) with both >= 16 pixels, got {size}")
    low, high = n_cells
    if not 2 <= low <= high:
        raise ValueError(f"n_cells must be (low, high) with 2 <= low <= high, got {n_cells}")
    n_classes = len(DEMO_CLASSES)
    if min(n_train, n_val) * high < n_classes:
        raise ValueError(
            f"a split of {min(n_train, n_val)} images with at most {high} cells each cannot show "
            f"all {n_classes} classes; raise n_cells[1] or the number of images"
        )


def build_collage_dataset(
    root: str | Path,
    seed: int = 0,
    n_train: int = 24,
    n_val: int = 8,
    size: tuple[int, int] = (224, 288),
    n_cells: tuple[int, int] = (4, 9),
) -> DemoDataset:
    """Write the demo benchmark of Voronoi collages to ``root`` (see the module docstring).

    Args:
        root: output directory; created if missing. It must be empty, missing, or a demo dataset
            (one with ``demo.json``); a demo dataset made with other parameters is replaced.
        seed: non-negative seed; the same seed and parameters give byte-identical files.
        n_train: number of train collages.
        n_val: number of val collages.
        size: ``(height, width)`` of every collage in pixels.
        n_cells: inclusive range of Voronoi cells per collage; each collage shows >= 2 classes,
            each split shows all 8.

    Returns:
        The dataset description. If ``root`` already holds a finished build with the same
        parameters nothing is written and ``rebuilt`` is False.

    Raises:
        ValueError: impossible parameters.
        OvssError: ``root`` holds other files than a demo dataset, or a photograph is missing.
    """
    size = (int(size[0]), int(size[1]))
    n_cells = (int(n_cells[0]), int(n_cells[1]))
    _check_arguments(seed, n_train, n_val, size, n_cells)
    root = Path(root)
    params: dict[str, object] = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "size": list(size),
        "n_cells": list(n_cells),
        "classes": list(DEMO_CLASSES),
        # Decoders and resamplers can change bytes between releases: rebuild when they change.
        "numpy": np.__version__,
        "pillow": Image.__version__,
        "scikit_image": importlib.metadata.version("scikit-image"),
    }

    rebuilt = not _is_finished(root, params, n_train, n_val)
    if rebuilt:
        if root.is_dir() and any(root.iterdir()) and not (root / "demo.json").is_file():
            raise OvssError(
                f"{root} is not empty and is not an ovss demo dataset; choose an empty or new "
                "directory for the demo data"
            )
        (root / "demo.json").unlink(missing_ok=True)
        for kind in ("images", "annotations"):
            shutil.rmtree(root / kind, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        sources = _prepare_sources(size)
        # Independent streams: val layouts and crop positions are not copies of train ones.
        train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)
        train_rng, val_rng = np.random.default_rng(train_seq), np.random.default_rng(val_seq)
        _write_split(root, "train", train_rng, n_train, size, n_cells, sources)
        _write_split(root, "val", val_rng, n_val, size, n_cells, sources)
        (root / "classes.txt").write_text("".join(f"{name}\n" for name in DEMO_CLASSES))
        (root / "README.txt").write_text(_readme(seed, n_train, n_val, size, n_cells))
        # Written last: its presence marks a finished build.
        (root / "demo.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")

    return DemoDataset(
        root=root,
        class_names=DEMO_CLASSES,
        n_train=n_train,
        n_val=n_val,
        train_ids=_expected_ids("train", n_train),
        val_ids=_expected_ids("val", n_val),
        seed=seed,
        size=size,
        rebuilt=rebuilt,
    )
