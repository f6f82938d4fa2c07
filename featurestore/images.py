"""Image sources: list a folder of images, probe sizes cheaply, decode any image to RGB uint8.

Every failure to read an image raises :class:`~featurestore.errors.ImageReadError` whose message is
``"cannot read image <path>: <reason>"``, so callers can skip the image and report it. The
functions keep no state and touch no global PIL setting (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays
False), so they are safe to call from several reader threads at once.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featurestore.errors import ImageReadError, OvssError

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
"""File suffixes treated as images (compared case-insensitively)."""

_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATIONS_SWAPPING_AXES = (5, 6, 7, 8)  # transpose / rotate 270 / transverse / rotate 90

# Register every PIL plugin now, once, so that concurrent first calls from reader threads never
# race on PIL's lazily filled plugin registry.
Image.init()

# PIL warns (DecompressionBombWarning, a raw multi-line warning on stderr) on images between
# its limit and twice it; large images are expected here and decoded reduced above
# ``HUGE_IMAGE_PIXELS`` (``load_image_reduced``), and twice the limit stays an error.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

HUGE_IMAGE_PIXELS = 40_000_000
"""Default of ``--max-pixels`` [ours]: images with more pixels (height x width) are decoded
through :func:`load_image_reduced`, so memory follows the size they are resized to. Below it
images are decoded at full resolution, exactly as before."""


@dataclass(frozen=True)
class ImageRecord:
    """One input image.

    Attributes:
        image_id: unique id within a listing. Folder listings: the POSIX path relative to the
            folder, without suffix (``"cats/tabby"``). Datasets: the mmseg id
            (``"ADE_val_00000001"``, ``"2007_000033"``, ``"frankfurt/frankfurt_000000_000294"``).
        path: absolute path of the image file.
        source: ``"folder"`` or the dataset name (``"ade20k"``, ...).
        split: dataset split (``"validation"``, ``"val"``, ...); ``""`` for folders.
        label_path: ground-truth label file when the dataset has one (the file may be missing on
            disk; evaluation checks), else None.
    """

    image_id: str
    path: str
    source: str = ""
    split: str = ""
    label_path: str | None = None


def is_image_file(name: str | os.PathLike) -> bool:
    """True when ``name`` ends with one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return os.fspath(name).lower().endswith(IMAGE_SUFFIXES)


def list_folder_images(root: str | os.PathLike) -> list[ImageRecord]:
    """All images under ``root``, recursively, sorted by id.

    Hidden files and folders (name starting with ``.``) and files without an image suffix are
    skipped; symbolic links to folders are not followed. The id is the POSIX path relative to
    ``root`` without the suffix, so ``root/a/b.JPG`` gets id ``"a/b"``.

    Raises:
        OvssError: ``root`` is missing or not a folder, holds no image, or two files share an id
            (``x.jpg`` and ``x.png`` in the same folder).
    """
    base = Path(root).expanduser()
    if not base.exists():
        raise OvssError(f"image folder not found: {base}")
    if not base.is_dir():
        raise OvssError(f"not a folder: {base} (give the folder that holds the images)")
    base = Path(os.path.abspath(base))
    by_id: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fname in filenames:
            if fname.startswith(".") or not is_image_file(fname):
                continue
            full = os.path.join(dirpath, fname)
            rel = Path(full).relative_to(base).as_posix()
            image_id = rel[: -len(Path(fname).suffix)]
            if image_id in by_id:
                raise OvssError(
                    f"two images share the id '{image_id}': {by_id[image_id]} and {full}; "
                    "rename one of them"
                )
            by_id[image_id] = full
    if not by_id:
        suffixes = " ".join(IMAGE_SUFFIXES)
        raise OvssError(f"no images found under {base} (looked for {suffixes}, recursively)")
    return [ImageRecord(i, by_id[i], source="folder") for i in sorted(by_id)]


def _reason(err: BaseException) -> str:
    """A short human-readable reason for a decoding failure."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(err, UnidentifiedImageError):
        return "not an image, or a format PIL cannot decode"
    if isinstance(err, Image.DecompressionBombError):
        return f"image too large for PIL's decompression-bomb limit ({err})"
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of the image as it will be decoded, i.e. after EXIF orientation.

    Reads the header only (no pixel decoding): EXIF orientations 5..8 swap height and width.
    A truncated file with an intact header passes here and fails in :func:`load_image_rgb`.

    Raises:
        ImageReadError: missing file, non-image, unreadable header, or an image above PIL's
            decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, left at its default).
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception as err:  # any failure on bad input is a read error for this file
        raise ImageReadError(f"cannot read image {os.fspath(path)}: {_reason(err)}") from err
    if orientation in _ORIENTATIONS_SWAPPING_AXES:
        width, height = height, width
    return int(height), int(width)


def _gray_to_uint8(gray: np.ndarray, mode: str) -> np.ndarray:
    """Map a one-channel integer or float image (H, W) to uint8 (H, W).

    - ``I;16*`` (unsigned 16-bit): ``>> 8``.
    - ``I`` (signed 32-bit): treated as 16-bit (``>> 8``) when every value lies in 0..65535, the
      usual case (16-bit PNG/TIFF decoded as ``I``); otherwise negatives clip to 0 and the int32
      range is scaled to 8 bits (``>> 23``).
    - ``F`` (float32): non-finite values become 0; values all within [0, 1] are scaled by 255,
      other images are clipped to [0, 255] (PIL's own ``F`` -> ``L`` rule), then rounded.
    """
    if mode.startswith("I;16"):
        return (gray.astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "I":
        wide = gray.astype(np.int64)
        if wide.size == 0 or (wide.min() >= 0 and wide.max() <= 0xFFFF):
            return (wide >> 8).astype(np.uint8)
        return (np.clip(wide, 0, None) >> 23).astype(np.uint8)
    values = np.nan_to_num(gray.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Pixels of a loaded PIL image as (H, W, 3) uint8 RGB.

    Alpha is dropped, not composited: an RGBA pixel (r, g, b, a) becomes (r, g, b) whatever ``a``
    is, and a transparent palette entry keeps its palette colour. High-bit-depth and float
    grayscale follow :func:`_gray_to_uint8`; every other mode (L, P, 1, CMYK, YCbCr, ...) uses
    PIL's conversion to RGB.
    """
    mode = im.mode
    if mode == "RGB":
        arr = np.asarray(im)
    elif mode in ("RGBA", "RGBX"):
        arr = np.asarray(im)[..., :3]
    elif mode.startswith("I;16") or mode in ("I", "F"):
        gray = _gray_to_uint8(np.asarray(im), mode)
        arr = np.repeat(gray[..., None], 3, axis=2)
    elif (
        "A" in im.getbands() or "a" in im.getbands() or (mode == "P" and "transparency" in im.info)
    ):
        # LA, La, PA, RGBa and palette images with a transparent entry: go through RGBA (which
        # also un-premultiplies RGBa) and drop the alpha channel.
        arr = np.asarray(im.convert("RGBA"))[..., :3]
    else:
        arr = np.asarray(im.convert("RGB"))
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"unsupported image mode {mode}")
    return np.require(arr, dtype=np.uint8, requirements=["C", "W"])


def load_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image to a (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Every PIL mode is converted (see :func:`_to_rgb_array`): L/1/P/CMYK/YCbCr through PIL,
    alpha dropped (not composited on any background), 16-bit integer scaled to 8 bits by
    ``>> 8``. The returned array is C-contiguous and writable. Thread-safe.

    Raises:
        ImageReadError: missing, non-image, truncated or corrupt file (truncated data is never
            padded: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False), or unsupported mode.
    """
    try:
        with Image.open(path) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)
            return _to_rgb_array(upright if upright is not None else im)
    except Exception as err:  # any failure on bad input is a read error for this file
        raise ImageReadError(f"cannot read image {os.fspath(path)}: {_reason(err)}") from err


def reduction_factor(size: tuple[int, int], need: tuple[int, int]) -> int:
    """The largest integer ``f >= 1`` with ``ceil(side / f) >= needed side`` on both sides:
    the reduce factor that keeps an image of ``size`` ``(H, W)`` at least ``need`` ``(h, w)``."""
    f = 1
    while f < min(size) and all(
        -(-s // (f + 1)) >= max(1, n) for s, n in zip(size, need, strict=True)
    ):
        f += 1
    return f


def load_image_reduced(
    path: str | os.PathLike, need: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image reduced to about ``need`` ``(h, w)`` (never smaller), EXIF orientation
    applied, and return it with the full upright size ``(H, W)`` (as :func:`probe_image`).

    JPEG goes through PIL's ``draft`` (DCT scaling by 1/2, 1/4 or 1/8 while decoding: memory
    follows the reduced size); other formats are decoded whole (uint8) and box-reduced by
    the largest integer factor of :func:`reduction_factor` (``Image.reduce``). The pixels
    differ slightly from a full decode resized to the same size (both are smoothing
    reductions, where a plain bilinear resize samples): [ours] used only above
    :data:`HUGE_IMAGE_PIXELS` (``--max-pixels``). Thread-safe.

    Raises:
        ImageReadError: as :func:`load_image_rgb`.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION_TAG)
            swap = orientation in _ORIENTATIONS_SWAPPING_AXES
            need_h, need_w = (need[1], need[0]) if swap else need  # in stored orientation
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, need_w), max(1, need_h)))
            im.load()
            f = reduction_factor(im.size[::-1], (need_h, need_w))
            small = im.reduce(f) if f > 1 else im
            upright = ImageOps.exif_transpose(small)
            arr = _to_rgb_array(upright if upright is not None else small)
    except Exception as err:  # any failure on bad input is a read error for this file
        raise ImageReadError(f"cannot read image {os.fspath(path)}: {_reason(err)}") from err
    full = (width, height) if swap else (height, width)
    return arr, (int(full[0]), int(full[1]))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte pieces (default 1 MiB).

    Raises:
        ImageReadError: the file cannot be read (message ``"cannot read file <path>: ..."``).
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    except OSError as err:
        raise ImageReadError(f"cannot read file {os.fspath(path)}: {_reason(err)}") from err
    return digest.hexdigest()
