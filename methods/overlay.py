"""Pictures of label maps: palette PNGs, colour overlays with a legend, side-by-side views.

- **Label PNG** (:func:`save_label_png`): a palette (``P``) PNG whose pixel values are the class
  indices (255 stays 255, the ignore value, drawn white), so the file is both the prediction and
  a picture of it.
- **Overlay** (:func:`render_overlay`): the image blended with the class colours (``alpha`` the
  colour's weight, default 0.5), and a legend to its right. Unlabelled pixels (255, or any value
  outside the vocabulary) keep the image's own colours under a dark diagonal hatch and are listed
  as "unlabelled" when present [ours]. The legend lists the classes present in the label map
  (``legend="all"``: every class), in class order, in as many columns as the image height needs;
  the font (Pillow's scalable default face) and the swatches scale with the image: the font is
  1.6 % of the image's longer side, at least 12 px [ours].
- **Comparison** (:func:`render_comparison`): ``image | prediction | ground truth`` side by side
  under one shared legend (classes of either map), the prediction's panel titled with the image's
  mIoU (classes present in either map, ground-truth 255 pixels left out, as in ``ovss eval``).

Colours come from ``featurestore.datasets.palette`` (the dataset's published table).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from featurestore.errors import OvssError

__all__ = [
    "IGNORE_INDEX",
    "LEGEND_CHOICES",
    "OverlayStyle",
    "colourize",
    "font_size_for",
    "ground_truth_lookup",
    "image_miou",
    "legend_entries",
    "render_comparison",
    "render_legend",
    "render_overlay",
    "save_comparison",
    "save_label_png",
    "save_overlay",
]

IGNORE_INDEX = 255
"""The label value of unlabelled pixels (ground truth and method output alike)."""

LEGEND_CHOICES = ("present", "all")
UNLABELLED = "unlabelled"
_HATCH = (40, 40, 40)
_MAX_NAME = 28  # legend names longer than this many characters are cut with "…" [ours]


@dataclass(frozen=True)
class OverlayStyle:
    """How overlays and comparisons are drawn.

    Attributes:
        alpha: weight of the class colours over the image, 0 (image only) to 1 (colours only);
            default 0.5.
        legend: ``present`` (default): the classes in the label map(s); ``all``: every class of
            the vocabulary.
    """

    alpha: float = 0.5
    legend: str = "present"

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise OvssError(f"overlay alpha must be in 0..1, got {self.alpha}")
        if self.legend not in LEGEND_CHOICES:
            raise OvssError(
                f"legend must be one of {', '.join(LEGEND_CHOICES)}, got {self.legend!r}"
            )


# -- colours --------------------------------------------------------------------------------------


def _unlabelled_mask(labels: np.ndarray, n: int) -> np.ndarray:
    """(H, W) bool: pixels that name no class of ``n`` (255, negative, or >= n)."""
    return (labels < 0) | (labels >= n)


def colourize(labels: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class colours of a label map.

    Args:
        labels: (H, W) integer class indices; 255 (or anything outside ``0..len(palette)-1``)
            is unlabelled.
        palette: (K, 3) uint8 class colours.

    Returns:
        ``(rgb, unlabelled)``: (H, W, 3) uint8 colours (unlabelled pixels black) and the
        (H, W) bool mask of unlabelled pixels.
    """
    labels = np.asarray(labels)
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    bad = _unlabelled_mask(labels, len(pal))
    table = np.concatenate([pal, np.zeros((1, 3), dtype=np.uint8)])  # row K: unlabelled
    return table[np.where(bad, len(pal), labels)], bad


def _hatch_mask(shape: tuple[int, int], spacing: int, top: int = 0) -> np.ndarray:
    """(H, W) bool diagonal stripes: one line of ``max(1, spacing // 4)`` px every ``spacing``
    (``top``: the first row's index in the full picture, so stripes continue across blocks)."""
    h, w = shape
    spacing = max(2, spacing)
    diag = (
        np.arange(top, top + h, dtype=np.int32)[:, None] + np.arange(w, dtype=np.int32)
    ) % spacing
    return diag < max(1, spacing // 4)


def _blend(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float, hatch: int):
    """(H, W, 3) uint8: ``image`` blended with the colours, unlabelled pixels hatched."""
    if image.shape[:2] != labels.shape:
        raise OvssError(
            f"image is {image.shape[1]}x{image.shape[0]} but the label map "
            f"{labels.shape[1]}x{labels.shape[0]}"
        )
    rgb, bad = colourize(labels, palette)
    img = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    a = int(round(alpha * 256))
    out = ((img.astype(np.uint16) * (256 - a) + rgb.astype(np.uint16) * a + 128) >> 8).astype(
        np.uint8
    )
    rows = np.flatnonzero(bad.any(axis=1))
    if len(rows):  # unlabelled: the image shows through under a hatch
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        b = bad[r0:r1]
        block = np.where(b[..., None], img[r0:r1], out[r0:r1])
        block[b & _hatch_mask(b.shape, hatch, r0)] = _HATCH
        out[r0:r1] = block
    return out


def _present(labels: np.ndarray, n: int) -> tuple[np.ndarray, bool]:
    """(n,) bool: classes present in ``labels``; and whether an unlabelled pixel is there."""
    counts = np.bincount((np.clip(np.asarray(labels).ravel(), -1, n) + 1), minlength=n + 2)
    return counts[1 : n + 1] > 0, bool(counts[0] or counts[n + 1])


# -- legend ---------------------------------------------------------------------------------------


def font_size_for(height: int, width: int) -> int:
    """Legend font size (px) for an image of ``height`` x ``width`` px: 1.6 % of the longer
    side, at least 12 [ours] (256 px -> 12, 1800 px -> 29, 4000 px -> 64)."""
    return max(12, round(0.016 * max(height, width)))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's scalable default face at ``size`` px (the fixed bitmap font where Pillow has
    no FreeType or predates ``load_default(size=...)``)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # pragma: no cover - old or minimal Pillow
        return ImageFont.load_default()


def _short(name: str) -> str:
    name = " ".join(str(name).split())  # no newlines or tabs in a legend
    return name if len(name) <= _MAX_NAME else name[: _MAX_NAME - 1] + "…"


def legend_entries(
    label_maps: Sequence[np.ndarray],
    class_names: Sequence[str],
    palette: np.ndarray,
    legend: str = "present",
) -> list[tuple[str, tuple[int, int, int] | None]]:
    """``(name, colour)`` rows of a legend: the classes present in any of ``label_maps``
    (``legend="all"``: every class), in class order, then ``("unlabelled", None)`` when a map
    has an unlabelled pixel."""
    n = min(len(class_names), len(palette))
    present = np.zeros(n, dtype=bool)
    unlabelled = False
    for lab in label_maps:
        here, bad = _present(lab, n)
        present |= here
        unlabelled = unlabelled or bad
    shown = range(n) if legend == "all" else np.flatnonzero(present).tolist()
    rows: list[tuple[str, tuple[int, int, int] | None]] = [
        (str(class_names[c]), tuple(int(v) for v in palette[c])) for c in shown
    ]
    if unlabelled:
        rows.append((UNLABELLED, None))
    return rows


def render_legend(
    entries: Sequence[tuple[str, tuple[int, int, int] | None]],
    height: int,
    font_size: int,
) -> Image.Image:
    """A white legend image ``height`` px tall (taller only when not one row fits): per entry
    a colour swatch (``None``: the hatched unlabelled swatch) and the name, filled column by
    column, as many columns as needed."""
    font = _font(font_size)
    pad = max(4, font_size // 2)
    row_h = round(font_size * 1.45)
    sw = font_size  # swatch side
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = [_short(n) for n, _ in entries]
    text_w = max([int(math.ceil(probe.textlength(n, font=font))) for n in names] + [0])
    col_w = sw + pad + text_w + 2 * pad
    per_col = max(1, (height - 2 * pad) // row_h)
    n_cols = max(1, math.ceil(len(entries) / per_col))
    rows_used = min(per_col, max(1, len(entries)))
    h = max(height, 2 * pad + rows_used * row_h)
    canvas = Image.new("RGB", (pad + n_cols * col_w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, ((_, colour), name) in enumerate(zip(entries, names, strict=True)):
        x = pad + (k // per_col) * col_w
        y = pad + (k % per_col) * row_h
        y0 = y + (row_h - sw) // 2
        if colour is None:
            swatch = np.full((sw, sw, 3), 255, dtype=np.uint8)
            swatch[_hatch_mask((sw, sw), max(4, sw // 3))] = _HATCH
            canvas.paste(Image.fromarray(swatch), (x, y0))
            draw.rectangle([x, y0, x + sw - 1, y0 + sw - 1], outline=_HATCH)
        else:
            draw.rectangle([x, y0, x + sw - 1, y0 + sw - 1], fill=colour, outline=(0, 0, 0))
        draw.text((x + sw + pad, y + row_h // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


def _with_legend(picture: Image.Image, entries, font_size: int) -> Image.Image:
    legend = render_legend(entries, picture.height, font_size)
    canvas = Image.new(
        "RGB", (picture.width + legend.width, max(picture.height, legend.height)), "white"
    )
    canvas.paste(picture, (0, 0))
    canvas.paste(legend, (picture.width, 0))
    return canvas


# -- overlays and comparisons ---------------------------------------------------------------------


def render_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str],
    style: OverlayStyle | None = None,
) -> Image.Image:
    """The image (H, W, 3 uint8) blended with the class colours of ``labels`` (H, W), with
    the legend to its right (see the module docstring)."""
    style = style or OverlayStyle()
    image = np.asarray(image)
    fs = font_size_for(*image.shape[:2])
    blend = _blend(image, np.asarray(labels), palette, float(style.alpha), hatch=fs)
    entries = legend_entries([labels], class_names, palette, style.legend)
    return _with_legend(Image.fromarray(blend), entries, fs)


def image_miou(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float | None:
    """mIoU (percent, 2 decimals) of one image: classes present in ``pred`` or ``gt`` on the
    pixels whose ground truth is not 255; None when no pixel is labelled."""
    from methods.metrics import IoUAccumulator

    if not (np.asarray(gt) != IGNORE_INDEX).any():
        return None
    acc = IoUAccumulator(num_classes)
    acc.update(np.asarray(pred).astype(np.int64), np.asarray(gt).astype(np.int64))
    miou = acc.compute().miou
    return None if math.isnan(miou) else float(miou)


def render_comparison(
    image: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray | None,
    palette: np.ndarray,
    class_names: Sequence[str],
    style: OverlayStyle | None = None,
    title: str = "",
) -> Image.Image:
    """``image | prediction | ground truth`` (just ``image | prediction`` without ``gt``), each
    panel titled, the prediction's with the image's mIoU when ``gt`` is given, and one legend of
    the classes of both maps. ``title``: prefixed to the image panel's title (e.g. the id)."""
    style = style or OverlayStyle()
    image = np.asarray(image)[..., :3]
    h, w = image.shape[:2]
    fs = font_size_for(h, w)
    font = _font(fs)
    band = round(fs * 1.8)
    panels = [(f"{title}: image" if title else "image", image)]
    pred_title = "prediction"
    maps = [np.asarray(pred)]
    if gt is not None:
        gt = np.asarray(gt)
        if gt.shape != maps[0].shape:
            raise OvssError(f"ground truth is {gt.shape}, the prediction {maps[0].shape}")
        miou = image_miou(maps[0], gt, len(class_names))
        pred_title += f" (mIoU {miou:.2f})" if miou is not None else " (no labelled pixel)"
        maps.append(gt)
    panels.append((pred_title, _blend(image, maps[0], palette, float(style.alpha), fs)))
    if gt is not None:
        panels.append(("ground truth", _blend(image, gt, palette, float(style.alpha), fs)))
    gap = max(4, fs // 3)
    strip = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * gap, h + band), "white")
    draw = ImageDraw.Draw(strip)
    for k, (name, arr) in enumerate(panels):
        x = k * (w + gap)
        strip.paste(Image.fromarray(arr), (x, band))
        draw.text(
            (x + w // 2, band // 2),
            _short_title(name, w, font, draw),
            fill=(0, 0, 0),
            font=font,
            anchor="mm",
        )
    entries = legend_entries(maps, class_names, palette, style.legend)
    return _with_legend(strip, entries, fs)


def _short_title(text: str, width: int, font, draw: ImageDraw.ImageDraw) -> str:
    """``text`` cut with "…" until it fits ``width`` px."""
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text


def ground_truth_lookup(
    dataset: str | None, data_root: str | None, split: str | None = None
) -> Callable[[str], np.ndarray | None] | None:
    """``image id -> ground-truth label map`` (as ``ovss eval`` reads it; None for an id not in
    the split or an unreadable label) of a benchmark, or None without a dataset and data root
    (or when the dataset's folder is not there)."""
    if not dataset or not data_root:
        return None
    from featurestore.datasets import get_dataset, list_dataset_images
    from featurestore.labels import load_label

    try:
        spec = get_dataset(dataset, data_root) if dataset == "custom" else get_dataset(dataset)
        records = {r.image_id: r for r in list_dataset_images(dataset, data_root, split)}
    except OvssError:
        return None

    def lookup(image_id: str) -> np.ndarray | None:
        r = records.get(image_id)
        if r is None or not r.label_path:
            return None
        try:
            return np.asarray(load_label(spec, r.label_path))
        except OvssError:
            return None

    return lookup


# -- files ----------------------------------------------------------------------------------------


def save_label_png(labels: np.ndarray, palette: np.ndarray, path: Path | str) -> None:
    """Label indices as a palette PNG: values are the class indices (255 stays 255 and is
    drawn white), colours the first ``len(palette)`` palette entries.

    Raises:
        OvssError: a label outside 0..255 (a ``P`` PNG holds 8-bit values).
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise OvssError(
            f"label values {int(labels.min())}..{int(labels.max())} do not fit an 8-bit PNG"
        )
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    flat[: len(pal)] = pal
    if len(pal) <= IGNORE_INDEX:
        flat[IGNORE_INDEX] = 255
    im.putpalette(flat.reshape(-1).tolist())
    im.save(path)


def save_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str],
    path: Path | str,
    alpha: float | None = None,
    style: OverlayStyle | None = None,
) -> None:
    """:func:`render_overlay` written as a PNG (``alpha`` given: it wins over the style's)."""
    style = style or OverlayStyle()
    if alpha is not None:
        style = OverlayStyle(alpha=alpha, legend=style.legend)
    render_overlay(image, labels, palette, class_names, style).save(path)


def save_comparison(
    image: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray | None,
    palette: np.ndarray,
    class_names: Sequence[str],
    path: Path | str,
    *,
    style: OverlayStyle | None = None,
    title: str = "",
) -> None:
    """:func:`render_comparison` written as a PNG."""
    render_comparison(image, pred, gt, palette, class_names, style, title).save(path)
