"""Tests of featurestore.images: folder listing, header probing, decoding every mode, hashing."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurestore.errors import ImageReadError, OvssError
from featurestore.images import (
    IMAGE_SUFFIXES,
    ImageRecord,
    file_sha256,
    list_folder_images,
    load_image_rgb,
    probe_image,
)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A random (h, w, 3) uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


# -- list_folder_images ---------------------------------------------------------------------------


def test_list_folder_images_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    img = _rgb(4, 5)
    _save(tmp_path / "b.jpg", img)
    _save(tmp_path / "a" / "z.png", img)
    _save(tmp_path / "a" / "deep" / "w.webp", img)
    _save(tmp_path / "c.BMP", img, format="BMP")
    _save(tmp_path / "d.tiff", img)
    _save(tmp_path / "e.JPEG", img, format="JPEG")
    _save(tmp_path / ".hidden.jpg", img)
    _save(tmp_path / ".cache" / "x.jpg", img)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "noext").write_bytes(b"\x00")

    records = list_folder_images(tmp_path)

    ids = [r.image_id for r in records]
    assert ids == ["a/deep/w", "a/z", "b", "c", "d", "e"]
    assert all(isinstance(r, ImageRecord) for r in records)
    assert all(r.source == "folder" and r.split == "" and r.label_path is None for r in records)
    assert all(Path(r.path).is_absolute() and Path(r.path).is_file() for r in records)
    assert Path(records[0].path) == (tmp_path / "a" / "deep" / "w.webp").resolve()
    assert Path(records[3].path).name == "c.BMP"


def test_list_folder_images_accepts_relative_root(tmp_path: Path, monkeypatch) -> None:
    _save(tmp_path / "imgs" / "x.png", _rgb(2, 2))
    monkeypatch.chdir(tmp_path)
    (rec,) = list_folder_images("imgs")
    assert rec.image_id == "x"
    assert Path(rec.path).is_absolute()


def test_list_folder_images_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(OvssError, match="image folder not found") as info:
        list_folder_images(missing)
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_list_folder_images_empty_or_no_images(tmp_path: Path) -> None:
    with pytest.raises(OvssError, match="no images found"):
        list_folder_images(tmp_path)
    (tmp_path / "readme.txt").write_text("x")
    _save(tmp_path / ".hidden.png", _rgb(2, 2))
    with pytest.raises(OvssError, match="no images found"):
        list_folder_images(tmp_path)


def test_list_folder_images_file_instead_of_folder(tmp_path: Path) -> None:
    f = _save(tmp_path / "one.png", _rgb(2, 2))
    with pytest.raises(OvssError, match="not a folder"):
        list_folder_images(f)


def test_list_folder_images_duplicate_id(tmp_path: Path) -> None:
    _save(tmp_path / "x.png", _rgb(2, 2))
    _save(tmp_path / "x.jpg", _rgb(2, 2))
    with pytest.raises(OvssError, match="share the id 'x'"):
        list_folder_images(tmp_path)


def test_image_suffixes_are_lower_case() -> None:
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)


# -- probe_image / load_image_rgb -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".bmp", ".tif"])
def test_probe_and_load_formats(tmp_path: Path, suffix: str) -> None:
    arr = _rgb(7, 11)
    path = _save(tmp_path / f"x{suffix}", arr)
    assert probe_image(path) == (7, 11)
    out = load_image_rgb(path)
    assert out.shape == (7, 11, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable
    if suffix != ".jpg" and suffix != ".webp":  # lossless formats round-trip exactly
        np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("orientation, swapped", [(1, False), (3, False), (6, True), (8, True)])
def test_exif_orientation(tmp_path: Path, orientation: int, swapped: bool) -> None:
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, :10] = 255  # white left third, to check the rotation direction
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)

    expected = (30, 10) if swapped else (10, 30)
    assert probe_image(path) == expected
    out = load_image_rgb(path)
    assert out.shape == (*expected, 3)
    if orientation == 6:  # rotate 90 degrees clockwise to display: left edge goes to the top
        assert out[:8].mean() > 200 and out[12:].mean() < 50
    if orientation == 3:  # rotate 180: left third goes to the right
        assert out[:, -8:].mean() > 200 and out[:, :18].mean() < 50


def test_grayscale(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    path = _save(tmp_path / "g.png", gray)
    out = load_image_rgb(path)
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_grayscale_with_alpha(tmp_path: Path) -> None:
    la = Image.fromarray(np.full((3, 4), 90, dtype=np.uint8)).convert("LA")
    la.putalpha(0)
    path = tmp_path / "la.png"
    la.save(path)
    with Image.open(path) as check:
        assert check.mode == "LA"
    out = load_image_rgb(path)
    assert out.shape == (3, 4, 3)
    assert (out == 90).all()  # alpha dropped, not composited


@pytest.mark.parametrize("transparent", [False, True])
def test_palette(tmp_path: Path, transparent: bool) -> None:
    im = Image.new("P", (5, 3))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 1, 0] * 3)
    path = tmp_path / "p.png"
    if transparent:
        im.save(path, transparency=1)
    else:
        im.save(path)
    with Image.open(path) as check:
        assert check.mode == "P" and (("transparency" in check.info) == transparent)
    out = load_image_rgb(path)
    assert out.shape == (3, 5, 3)
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 0, 0])  # the transparent entry keeps its colour
    np.testing.assert_array_equal(out[0, 2], [0, 0, 255])


def test_rgba_alpha_dropped(tmp_path: Path) -> None:
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 1] = 100
    rgba[..., 2] = 50
    rgba[..., 3] = np.arange(6, dtype=np.uint8) * 50  # from fully transparent to opaque
    path = _save(tmp_path / "a.png", rgba)
    assert probe_image(path) == (4, 6)
    out = load_image_rgb(path)
    assert out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_16bit_png(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256], [4095, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")  # 16-bit grayscale PNG, however PIL names it
    out = load_image_rgb(path)
    assert out.shape == (2, 3, 3)
    expected = (values >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    values = np.array([[0, 513, 65535]], dtype=np.uint16)
    im = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    path = tmp_path / "deep.tif"
    im.save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16B"
    out = load_image_rgb(path)
    np.testing.assert_array_equal(out[..., 0], [[0, 2, 255]])


def test_int32_and_float_modes(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 256, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.array([[-5.0, 7.4, 300.0]], dtype=np.float32)).save(tmp_path / "g.tif")
    Image.fromarray(np.array([[-1, 1 << 30]], dtype=np.int32)).save(tmp_path / "wide.tif")
    for name, mode in (("i", "I"), ("f", "F"), ("g", "F"), ("wide", "I")):
        with Image.open(tmp_path / f"{name}.tif") as check:
            assert check.mode == mode
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "i.tif")[..., 1], [[0, 1, 255]])
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "f.tif")[..., 2], [[0, 128, 255]])
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "g.tif")[..., 0], [[0, 7, 255]])
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "wide.tif")[..., 0], [[0, 128]])


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 5), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    out = load_image_rgb(path)
    assert out.shape == (5, 8, 3)
    assert out[..., 0].mean() > 200 and out[..., 1:].mean() < 60


def test_ycbcr_and_bilevel(tmp_path: Path) -> None:
    Image.new("YCbCr", (4, 3), (128, 128, 128)).save(tmp_path / "y.tif")
    assert load_image_rgb(tmp_path / "y.tif").shape == (3, 4, 3)
    bw = Image.new("1", (4, 2), 1)
    bw.putpixel((0, 0), 0)
    bw.save(tmp_path / "bw.png")
    out = load_image_rgb(tmp_path / "bw.png")
    assert out.shape == (2, 4, 3)
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 3].tolist() == [255, 255, 255]


def test_one_pixel_image(tmp_path: Path) -> None:
    path = _save(tmp_path / "tiny.png", np.array([[[1, 2, 3]]], dtype=np.uint8))
    assert probe_image(path) == (1, 1)
    np.testing.assert_array_equal(load_image_rgb(path), [[[1, 2, 3]]])


def test_truncated_jpeg_raises(tmp_path: Path) -> None:
    good = _save(tmp_path / "good.jpg", _rgb(64, 64), quality=95)
    data = good.read_bytes()
    bad = tmp_path / "half.jpg"
    bad.write_bytes(data[: len(data) // 2])
    assert probe_image(bad) == (64, 64)  # the header is intact
    with pytest.raises(ImageReadError, match="cannot read image") as info:
        load_image_rgb(bad)
    assert str(bad) in str(info.value)
    load_image_rgb(good)  # the intact file still decodes (no global state was changed)


def test_non_image_renamed_jpg_raises(tmp_path: Path) -> None:
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is plain text, not a JPEG\n" * 10)
    for fn in (probe_image, load_image_rgb):
        with pytest.raises(ImageReadError, match=r"cannot read image .*fake\.jpg: not an image"):
            fn(fake)


def test_missing_and_empty_file_raise(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found"):
        load_image_rgb(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="file not found"):
        probe_image(tmp_path / "absent.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError):
        load_image_rgb(empty)


def test_image_read_error_is_ovss_error() -> None:
    assert issubclass(ImageReadError, OvssError)


def test_load_is_thread_safe(tmp_path: Path) -> None:
    paths = [_save(tmp_path / f"{i}.png", _rgb(16, 16, seed=i)) for i in range(8)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    expected = [load_image_rgb(p) for p in paths]
    results: dict[int, object] = {}

    def work(k: int) -> None:
        try:
            results[k] = load_image_rgb(paths[k % 8]) if k % 3 else load_image_rgb(bad)
        except ImageReadError as err:
            results[k] = err

    threads = [threading.Thread(target=work, args=(k,)) for k in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(48):
        if k % 3:
            np.testing.assert_array_equal(results[k], expected[k % 8])
        else:
            assert isinstance(results[k], ImageReadError)


# -- file_sha256 ----------------------------------------------------------------------------------


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, size=3000, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == expected
    assert file_sha256(path, chunk=7) == expected  # several chunks, last one partial
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()


def test_file_sha256_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="cannot read file"):
        file_sha256(tmp_path / "absent")


# --- huge images: reduced decoding, no raw PIL warning ---------------------------------------


def _smooth_jpeg(path, h, w, orientation=None):
    y = np.linspace(0, 255, h)[:, None]
    x = np.linspace(0, 255, w)[None, :]
    arr = np.stack([y + 0 * x, x + 0 * y, (x + y) / 2], -1).astype(np.uint8)
    im = Image.fromarray(arr)
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, quality=95, exif=exif)
    else:
        im.save(path, quality=95)
    return arr


def test_reduction_factor_keeps_at_least_the_needed_size():
    from featurestore.images import reduction_factor

    assert reduction_factor((9000, 12000), (448, 597)) == 20
    assert reduction_factor((100, 100), (100, 100)) == 1
    assert reduction_factor((100, 100), (60, 10)) == 1
    assert reduction_factor((64, 64), (1, 1)) == 64
    for size, need in (((9000, 12000), (448, 597)), ((1001, 37), (50, 3))):
        f = reduction_factor(size, need)
        assert all(-(-s // f) >= n for s, n in zip(size, need, strict=True))
        assert not all(-(-s // (f + 1)) >= max(1, n) for s, n in zip(size, need, strict=True))


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_load_image_reduced_follows_the_needed_size(tmp_path, fmt):
    from featurestore.images import load_image_reduced

    path = tmp_path / f"big.{fmt}"
    arr = _smooth_jpeg(tmp_path / "big.jpg", 1200, 1600)
    if fmt == "png":
        Image.fromarray(arr).save(path)
    small, full = load_image_reduced(path, (150, 200))
    assert full == (1200, 1600)
    assert small.dtype == np.uint8 and small.shape[2] == 3
    assert 150 <= small.shape[0] < 300 and 200 <= small.shape[1] < 400  # not the full decode
    # the same picture: close to the full decode resized to the reduced size
    ref = np.asarray(Image.fromarray(load_image_rgb(path)).resize(small.shape[1::-1], Image.BOX))
    assert np.abs(small.astype(int) - ref.astype(int)).mean() < 3.0


def test_load_image_reduced_applies_exif_orientation(tmp_path):
    from featurestore.images import load_image_reduced

    _smooth_jpeg(
        tmp_path / "rot.jpg", 800, 1200, orientation=6
    )  # stored 800x1200, upright 1200x800
    assert probe_image(tmp_path / "rot.jpg") == (1200, 800)
    small, full = load_image_reduced(tmp_path / "rot.jpg", (300, 200))
    assert full == (1200, 800)
    assert small.shape[0] > small.shape[1] and small.shape[0] >= 300 and small.shape[1] >= 200
    whole = load_image_rgb(tmp_path / "rot.jpg")
    ref = np.asarray(Image.fromarray(whole).resize(small.shape[1::-1], Image.BOX))
    assert np.abs(small.astype(int) - ref.astype(int)).mean() < 3.0


def test_no_raw_decompression_bomb_warning(tmp_path, monkeypatch):
    """In a fresh interpreter (pytest installs its own warning filters): probing and decoding
    an image in PIL's warning range print nothing on stderr; twice the limit is refused."""
    import subprocess
    import sys

    from featurestore.images import load_image_reduced

    _smooth_jpeg(tmp_path / "a.jpg", 200, 300)
    code = (
        "from PIL import Image\n"
        "from featurestore.images import load_image_reduced, load_image_rgb, probe_image\n"
        "Image.MAX_IMAGE_PIXELS = 40_000\n"  # 60 000 px: PIL's warning range
        f"p = {str(tmp_path / 'a.jpg')!r}\n"
        "probe_image(p); load_image_rgb(p); load_image_reduced(p, (50, 50))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # over twice the limit: refused
    with pytest.raises(ImageReadError, match="decompression-bomb"):
        load_image_reduced(tmp_path / "a.jpg", (50, 50))
