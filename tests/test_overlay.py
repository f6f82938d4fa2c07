"""methods.overlay: palette PNGs, overlays (unlabelled pixels, legends in columns, fonts that
scale, alpha), side-by-side comparisons; `ovss segment --alpha/--legend/--side-by-side`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featurestore.datasets import class_names, palette
from featurestore.errors import OvssError
from methods.overlay import (
    OverlayStyle,
    colourize,
    font_size_for,
    image_miou,
    legend_entries,
    render_comparison,
    render_legend,
    render_overlay,
    save_label_png,
)
from ovss_cli.main import cli
from tests.test_segment_eval import make_dataset, make_store

PAL = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
NAMES = ["sky", "grass", "brick"]


def _labels(h=40, w=60):
    lab = np.zeros((h, w), dtype=np.int64)
    lab[:, w // 3 :] = 1
    lab[: h // 4] = 255
    return lab


def test_unlabelled_pixels_show_the_image_hatched_not_the_last_class_colour():
    lab = _labels()
    img = np.full((*lab.shape, 3), 200, dtype=np.uint8)
    out = np.asarray(render_overlay(img, lab, PAL, NAMES, OverlayStyle(alpha=1.0)))
    top = out[: lab.shape[0] // 4, : lab.shape[1]]
    colours = {tuple(c) for c in top.reshape(-1, 3).tolist()}
    assert (0, 0, 255) not in colours  # the old bug: 255 clipped to the last class (brick)
    assert colours == {(200, 200, 200), (40, 40, 40)}  # the image through a dark hatch
    rgb, bad = colourize(lab, PAL)
    assert bad.sum() == (lab == 255).sum() and (rgb[bad] == 0).all()
    assert legend_entries([lab], NAMES, PAL)[-1] == ("unlabelled", None)
    assert [n for n, _ in legend_entries([lab[20:]], NAMES, PAL)] == ["sky", "grass"]


def test_values_outside_the_vocabulary_are_unlabelled_too():
    lab = np.array([[0, 7], [-1, 2]])
    _, bad = colourize(lab, PAL)
    assert bad.tolist() == [[False, True], [True, False]]


def test_alpha_weights_the_colours():
    lab = np.zeros((8, 8), dtype=np.int64)
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    for alpha, red in ((0.0, 0), (0.25, 64), (0.5, 128), (1.0, 255)):
        out = np.asarray(render_overlay(img, lab, PAL, NAMES, OverlayStyle(alpha=alpha)))
        assert abs(int(out[4, 4, 0]) - red) <= 1, (alpha, out[4, 4])
    with pytest.raises(OvssError, match="alpha"):
        OverlayStyle(alpha=1.5)
    with pytest.raises(OvssError, match="legend"):
        OverlayStyle(legend="some")


def test_font_scales_with_the_image():
    assert font_size_for(256, 256) == 12
    assert font_size_for(1200, 1800) == 29
    assert font_size_for(3000, 4000) == 64
    small = render_legend([("wall", (1, 2, 3))], 256, font_size_for(256, 256))
    big = render_legend([("wall", (1, 2, 3))], 3000, font_size_for(3000, 4000))
    assert big.width > 4 * small.width  # the text itself is drawn larger


def test_many_classes_fill_columns_as_tall_as_the_image():
    names = [c[0] for c in class_names("ade20k")]
    pal = palette("ade20k", 150)
    lab = (np.arange(256)[:, None] // 16 * 16 + np.arange(256)[None, :] // 16) % 150
    img = np.zeros((256, 256, 3), dtype=np.uint8)
    present = render_overlay(img, lab, pal, names)
    assert present.height == 256  # the legend never makes the picture taller
    assert len(legend_entries([lab], names, pal)) == 150
    few = render_overlay(img, np.zeros_like(lab), pal, names)
    every = render_overlay(img, np.zeros_like(lab), pal, names, OverlayStyle(legend="all"))
    assert few.width < every.width and every.height == 256
    # a column holds (256 - 2 pad) // row_h = 14 rows: 150 classes -> 11 columns of swatches
    legend = np.asarray(every)[:, 256:]
    wall = np.all(legend == pal[0], axis=-1)
    assert wall.any()
    swatch_cols = sum(
        1 for c in range(legend.shape[1]) if np.all(legend[:, c] == (0, 0, 0), axis=-1).sum() > 100
    )
    assert swatch_cols >= 2 * 10  # two black swatch borders per column, 11 columns


def test_label_png_keeps_indices_and_draws_ignore_white(tmp_path):
    lab = _labels()
    save_label_png(lab, PAL, tmp_path / "l.png")
    im = Image.open(tmp_path / "l.png")
    assert im.mode == "P"
    np.testing.assert_array_equal(np.asarray(im), lab.astype(np.uint8))
    pal = np.array(im.getpalette()[: 256 * 3]).reshape(-1, 3)
    assert pal[1].tolist() == [0, 255, 0] and pal[255].tolist() == [255, 255, 255]
    with pytest.raises(OvssError, match="8-bit"):
        save_label_png(np.array([[300]]), PAL, tmp_path / "x.png")


def test_comparison_has_three_panels_and_the_image_miou():
    gt = _labels()
    pred = gt.copy()
    pred[gt == 1] = 2  # grass predicted as brick: IoU sky 1, grass 0, brick 0 -> 33.33
    assert image_miou(pred, gt, 3) == pytest.approx(33.33)
    assert image_miou(gt, gt, 3) == 100.0
    assert image_miou(pred, np.full_like(gt, 255), 3) is None
    img = np.zeros((*gt.shape, 3), dtype=np.uint8)
    three = render_comparison(img, pred, gt, PAL, NAMES)
    two = render_comparison(img, pred, None, PAL, NAMES)
    assert three.width - two.width >= gt.shape[1]  # one more panel
    assert three.height > gt.shape[0]  # a title band
    entries = legend_entries([pred, gt], NAMES, PAL)
    assert [n for n, _ in entries] == ["sky", "grass", "brick", "unlabelled"]
    with pytest.raises(OvssError, match="ground truth"):
        render_comparison(img, pred, gt[:10], PAL, NAMES)


def test_long_and_multiline_names_do_not_break_the_legend():
    entries = [("a\nvery " + "long " * 20 + "name", (1, 2, 3)), ("b", (4, 5, 6))]
    legend = render_legend(entries, 100, 12)
    assert legend.width < 400


SETS = ["--set", "model=fake-dense", "--set", "resize=none", "--set", "size=0"]


def test_cli_segment_alpha_legend_side_by_side(tmp_path):
    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts)
    out = tmp_path / "o"
    args = ["segment", "--store", str(store.path), "--dataset", "custom", "--data-root"]
    args += [str(tmp_path / "data"), "--templates", "single", "--out", str(out), "-q", "--json"]
    args += [*SETS, "--text-random-init"]
    res = CliRunner().invoke(cli, [*args, "--side-by-side", "--alpha", "1", "--legend", "all"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["images"] == 3
    cmp_ = Image.open(out / "im1_compare.png")
    ov = Image.open(out / "im1_overlay.png")
    h, w = np.asarray(Image.open(out / "im1.png")).shape
    assert cmp_.width > 3 * w and ov.width > w  # three panels with ground truth, legends
    ovr = np.asarray(ov.convert("RGB"))[:h, :w]
    labels = np.asarray(Image.open(out / "im1.png"))
    pal = palette("custom", 3)
    np.testing.assert_array_equal(ovr, pal[labels])  # alpha 1: exactly the class colours
    for bad, word in ((["--alpha", "2"], "alpha"), (["--legend", "x"], "legend")):
        res = CliRunner().invoke(cli, [*args, *bad])
        assert res.exit_code == 2 and word in res.output and "Traceback" not in res.output


def test_help_documents_the_overlay_options():
    text = CliRunner().invoke(cli, ["segment", "--help"]).output
    for flag in ("--alpha", "--legend", "--side-by-side", "--no-overlay"):
        assert flag in text
