"""``featurestore.resize.resize_linear_u8`` is ``cv2.resize`` (``INTER_LINEAR``) byte for byte.

OpenCV is a test dependency only (the ``test`` extra installs ``opencv-python-headless``); the
comparisons are skipped where it is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

from featurestore.resize import resize_linear_u8, round_up


def cv2_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The real ``cv2.resize`` (the test is skipped without OpenCV)."""
    cv2 = pytest.importorskip("cv2")
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


@pytest.mark.parametrize(
    "size",
    [(61, 93), (97, 50), (512, 683), (375, 500), (333, 499), (7, 3), (1, 1), (1, 17), (23, 1)],
)
@pytest.mark.parametrize("align", [16, 14])
def test_rounding_up_equals_cv2(size: tuple[int, int], align: int) -> None:
    """Trident's SAM input: odd sizes rounded up to multiples of the CLIP patch."""
    h, w = size
    image = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    rh, rw = round_up(h, align), round_up(w, align)
    got = resize_linear_u8(image, rh, rw)
    assert got.shape == (rh, rw, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, cv2_resize(image, rh, rw))


def test_arbitrary_sizes_and_channels_equal_cv2() -> None:
    """Up and down, one side only, 1/3/4 channels and 2-D images (OpenCV's exact 2x
    downscale, which it computes as INTER_AREA, is left out)."""
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 150:
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        rh, rw = (int(v) for v in rng.integers(1, 110, 2))
        if (2 * rh, 2 * rw) == (h, w):
            continue
        channels = int(rng.choice([0, 1, 3, 4]))
        shape = (h, w, channels) if channels else (h, w)
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        want = cv2_resize(image, rh, rw).reshape((rh, rw, *shape[2:]))
        np.testing.assert_array_equal(resize_linear_u8(image, rh, rw), want, err_msg=str(shape))
        checked += 1
    for (h, w), (rh, rw) in (((512, 683), (512, 688)), ((37, 48), (48, 48))):  # one side
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(resize_linear_u8(image, rh, rw), cv2_resize(image, rh, rw))


def exact_rounding(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The same fixed-point weights, vertical pass rounded exactly: ``(b0 * acc0 + b1 * acc1 +
    2^21) >> 22`` (the textbook rule; OpenCV's vector kernel truncates on the way)."""
    h, w = image.shape[:2]

    def weights(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = ((np.arange(m) + 0.5) * (1.0 / (m / n)) - 0.5).astype(np.float32)
        s = np.floor(f).astype(np.int64)
        t = (f - s).astype(np.float32)
        w0 = np.rint((np.float32(1) - t) * np.float32(2048)).astype(np.int64)
        return s, w0, np.rint(t * np.float32(2048)).astype(np.int64)

    sx, a0, a1 = weights(w, width)
    border = (sx < 0) | (sx >= w - 1)
    a0[border], a1[border] = 2048, 0
    sx = np.clip(sx, 0, w - 1)
    x = image.astype(np.int64)
    acc = x[:, sx] * a0[:, None] + x[:, np.minimum(sx + 1, w - 1)] * a1[:, None]
    sy, b0, b1 = weights(h, height)
    top, bottom = acc[np.clip(sy, 0, h - 1)], acc[np.clip(sy + 1, 0, h - 1)]
    return (top * b0[:, None, None] + bottom * b1[:, None, None] + (1 << 21)) >> 22


def test_vertical_rounding_is_opencvs_not_the_exact_one() -> None:
    """OpenCV rounds its vertical pass after truncating (``acc >> 4``, a 16-bit
    multiply-high), one grey level off the exact rounding at some pixels; ours is OpenCV's."""
    image = np.random.default_rng(3).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    want = cv2_resize(image, 384, 512)
    np.testing.assert_array_equal(resize_linear_u8(image, 384, 512), want)
    diff = np.abs(exact_rounding(image, 384, 512) - want.astype(np.int64))
    assert diff.max() == 1 and (diff > 0).mean() > 0.01


def test_same_size_is_a_copy_and_bad_inputs_are_refused() -> None:
    image = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    same = resize_linear_u8(image, 4, 5)
    assert np.array_equal(same, image) and same is not image
    with pytest.raises(ValueError, match="uint8"):
        resize_linear_u8(image.astype(np.float32), 8, 8)
    with pytest.raises(ValueError, match="cannot resize"):
        resize_linear_u8(image, 0, 8)
    assert round_up(683, 16) == 688 and round_up(512, 16) == 512 and round_up(5, 0) == 5
