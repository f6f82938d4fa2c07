"""OpenCV's ``cv2.resize(..., interpolation=INTER_LINEAR)`` on uint8 images, in numpy.

Trident feeds SAM the image resized so that both sides are multiples of the CLIP patch size with
``cv2.resize`` (METHODS.md §4 step 1). OpenCV is not a dependency of ovss, so
:func:`resize_linear_u8` computes the same bytes from the same integer arithmetic:

- source coordinate of output pixel ``d`` along an axis of ``n`` -> ``m`` pixels: the float32
  value ``f = (d + 0.5) * (n / m) - 0.5`` (half-pixel centres, the scale a float64 ``1 / (m / n)``),
  ``s = floor(f)``, fraction ``t = f - s``;
- horizontally a source column left of 0 becomes column 0 and one at or right of the last
  column becomes the last column, both with ``t = 0``; vertically the fraction is kept and the
  two source rows ``s``, ``s + 1`` are clamped to the image;
- weights ``1 - t`` and ``t`` in 11-bit fixed point: ``rint(w * 2048)`` (float32 products);
- horizontal pass in exact integers: ``acc = a0 * p[s] + a1 * p[s + 1]`` (scale 2^11);
- vertical pass as OpenCV's vectorised kernel computes it (which also serves the row tails in
  the OpenCV builds checked): ``((acc0 >> 4) * b0 >> 16) + ((acc1 >> 4) * b1 >> 16)``, then
  ``(x + 2) >> 2`` saturated to 0..255. This truncates twice, so it differs by one grey level
  now and then from the exact rounding ``(b0 * acc0 + b1 * acc1 + 2^21) >> 22``;
  ``tests/test_resize.py`` checks the bytes against the real ``cv2.resize``.

Only the rule above is implemented: OpenCV switches to ``INTER_AREA`` for an exact 2x
downscale of both sides, which this function does not do (Trident only enlarges).
"""

from __future__ import annotations

import numpy as np

__all__ = ["resize_linear_u8", "round_up"]

_COEF_BITS = 11
_COEF_SCALE = np.float32(1 << _COEF_BITS)


def round_up(x: int, multiple: int) -> int:
    """``x`` rounded up to a multiple of ``multiple`` (``x`` itself when ``multiple`` <= 0)."""
    return -(-x // multiple) * multiple if multiple > 0 else x


def _axis(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: the first source index (unclamped) and its float32 fraction."""
    scale = 1.0 / (n_dst / n_src)  # OpenCV stores the inverse scale and inverts it
    f = ((np.arange(n_dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f)
    return s.astype(np.int64), (f - s).astype(np.float32)


def _fixed(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point weights of ``1 - t`` and ``t`` (int32)."""
    w0 = np.rint((np.float32(1.0) - t).astype(np.float32) * _COEF_SCALE)
    w1 = np.rint(t * _COEF_SCALE)
    return w0.astype(np.int32), w1.astype(np.int32)


def resize_linear_u8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize(image, (width, height))`` (``INTER_LINEAR``) for a uint8 image.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` uint8.
        height, width: the output size (positive).

    Returns:
        ``(height, width[, C])`` uint8; a copy of ``image`` when the size is unchanged.

    Raises:
        ValueError: not uint8, an empty image or a non-positive output size.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W[, C]) uint8 image, got {img.dtype} {img.shape}")
    h_src, w_src = img.shape[:2]
    if min(h_src, w_src) < 1 or height < 1 or width < 1:
        raise ValueError(f"cannot resize a {h_src}x{w_src} image to {height}x{width}")
    if (height, width) == (h_src, w_src):
        return img.copy()
    x = img if img.ndim == 3 else img[..., None]

    # horizontal pass: exact integer sums at scale 2^11 (in place: few full-size temporaries)
    sx, tx = _axis(w_src, width)
    tx[(sx < 0) | (sx >= w_src - 1)] = 0.0
    sx = np.clip(sx, 0, w_src - 1)
    a0, a1 = _fixed(tx)
    acc = np.take(x, sx, axis=1).astype(np.int32)
    acc *= a0[:, None]
    right = np.take(x, np.minimum(sx + 1, w_src - 1), axis=1).astype(np.int32)
    right *= a1[:, None]
    acc += right
    del right
    acc >>= 4  # OpenCV's vector kernel drops 4 bits to fit 16-bit lanes

    # vertical pass: 16-bit multiply-high per row, sum, round by 2 bits
    sy, ty = _axis(h_src, height)
    b0, b1 = _fixed(ty)
    out = np.take(acc, np.clip(sy, 0, h_src - 1), axis=0)
    out *= b0[:, None, None]
    out >>= 16
    bottom = np.take(acc, np.clip(sy + 1, 0, h_src - 1), axis=0)
    bottom *= b1[:, None, None]
    bottom >>= 16
    out += bottom
    del bottom
    out += 2
    out >>= 2
    out = np.clip(out, 0, 255, out=out).astype(np.uint8)
    return out if img.ndim == 3 else out[..., 0]
