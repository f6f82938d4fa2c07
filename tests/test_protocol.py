"""Resize and sliding-window rules (EVAL.md §4.1) and window padding/geometry."""

from __future__ import annotations

import numpy as np
import pytest

from featurestore.protocol import Protocol, image_geometry, padding_for


@pytest.mark.parametrize(
    "hw,size,expected",
    [
        ((375, 500), 336, (336, 448)),  # VOC 500x375 at S=336 -> 448x336 (EVAL §4.1)
        ((1024, 2048), 560, (560, 1120)),  # Cityscapes at S=560 -> 1120x560
        ((100, 5000), 448, (41, 2048)),  # the 2048 cap on the longer side wins
        ((7, 9), 448, (448, 576)),  # tiny images are upsampled
    ],
)
def test_short_side_rule(hw, size, expected):
    assert Protocol(resize="short", size=size).resized_size(*hw) == expected


def test_other_resize_modes():
    assert Protocol(resize="square", size=224).resized_size(300, 500) == (224, 224)
    assert Protocol(resize="long", size=1024).resized_size(480, 640) == (768, 1024)
    assert Protocol(resize="none", size=0).resized_size(31, 17) == (31, 17)


def test_windows_example_and_flush_border():
    # 448x336 image (H=336, W=448), c=224, s=112 -> 2 x 3 = 6 windows (EVAL §4.1 example)
    boxes = Protocol(crop=224, stride=112).windows(336, 448)
    assert len(boxes) == 6
    # odd size: the last window is flush with the border and keeps the full crop
    boxes = Protocol(crop=224, stride=112).windows(337, 450)
    assert boxes[:, 2].max() == 337 and boxes[:, 3].max() == 450
    assert ((boxes[:, 2] - boxes[:, 0]) == 224).all() and ((boxes[:, 3] - boxes[:, 1]) == 224).all()
    covered = np.zeros((337, 450), int)
    for y1, x1, y2, x2 in boxes:
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1


def test_image_smaller_than_crop_is_one_window():
    boxes = Protocol(crop=336, stride=112).windows(200, 300)
    assert boxes.tolist() == [[0, 0, 200, 300]]


def test_geometry_padding_and_grids():
    geo = image_geometry(Protocol(resize="none", size=0, crop=0), 30, 45, 14)
    (w,) = geo.windows
    assert w.pad == (6, 5, 6, 6)  # symmetric padding to 42 x 56
    assert w.grid == (3, 4) and geo.n_tokens == 12
    assert padding_for(28, 14) == (0, 0)
    # pad multiple combined with the patch size (56 and 16 -> 112)
    geo = image_geometry(Protocol(resize="none", size=0, pad_multiple=56), 100, 100, 16)
    assert geo.windows[0].grid == (7, 7)


def test_invalid_protocols():
    with pytest.raises(ValueError):
        Protocol(resize="fancy")
    with pytest.raises(ValueError):
        Protocol(crop=224, stride=0)
    assert Protocol(resize="short", size=336, crop=224, stride=112).key() == "short336-c224s112"


def test_sam_pre_rounding_align():
    """``align`` with ``long`` / ``halves``: SAM's image rounded up to the CLIP patch grid first
    (Trident, METHODS.md §4 step 1), then the resize rule on that rounded image."""
    long16 = Protocol(resize="long", size=1024, align=16)
    assert long16.key() == "long1024-a16" and Protocol("halves", 1024, align=14).key() == (
        "halves1024-a14"
    )
    assert Protocol("long", 1024).key() == "long1024"  # without align: unchanged
    assert Protocol.from_dict(long16.to_dict()) == long16 and long16.to_dict()["align"] == 16
    # ADE 683 x 512: rounded to 688 x 512, then SAM's longer side 1024 -> 762 x 1024
    assert long16.rounded_size(512, 683) == (512, 688)
    assert long16.resized_size(512, 683) == (762, 1024)
    assert Protocol("long", 1024).resized_size(512, 683) == (768, 1024)
    # already multiples: a no-op
    assert long16.rounded_size(1024, 2048) == (1024, 2048)
    assert long16.resized_size(480, 640) == Protocol("long", 1024).resized_size(480, 640)
    # halves: the rounded image is split at its width // 2 (an even align: equal halves)
    halves = Protocol("halves", 256, align=16)
    assert halves.rounded_size(61, 93) == (64, 96)
    assert halves.halves_layout(61, 93) == [(0, 48, 256, 192), (48, 96, 256, 192)]
    assert halves.resized_size(61, 93) == (256, 384)
    assert halves.halves_layout(7, 1) == [(0, 8, 256, 128), (8, 16, 256, 128)]
    # other modes do not round
    assert Protocol("short", 448).rounded_size(61, 93) == (61, 93)
    with pytest.raises(ValueError, match="align is used with resize 'grid'"):
        Protocol("short", 448, align=16)
    with pytest.raises(ValueError, match=">= 0"):
        Protocol("long", 1024, align=-16)
    with pytest.raises(ValueError, match="only SAM backbones"):
        image_geometry(long16, 512, 683, 16)


def test_grid_resize_keeps_the_stored_spelling_of_its_old_name() -> None:
    """``grid`` was ``trident``: old records read back as ``grid``, and keys / records keep
    the old spelling, so stores made before the rename stay readable and resumable."""
    new = Protocol("grid", 448, crop=336, stride=224, pad_multiple=56, align=16)
    old = Protocol("trident", 448, crop=336, stride=224, pad_multiple=56, align=16)
    assert old == new and old.resize == "grid"
    assert new.key() == "trident448a16-c336s224-pad56"
    assert new.to_dict()["resize"] == "trident"
    assert Protocol.from_dict(new.to_dict()) == new
    assert new.resized_size(300, 400) == (448, 608)  # 448x597 rounded up to the 16 grid
