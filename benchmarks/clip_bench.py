"""CLIP cache benchmarks: MaskCLIP dense features from the store vs from pixels; store sizes.

``python -m benchmarks.clip_bench`` prints both result dicts as JSON.

- ``bench_clip_cache``: MaskCLIP dense features (``methods.clip_dense.maskclip_dense``) for every
  window token of N images, computed (a) from a clip-b16 feature set (float16 ``pre_last`` + the
  stored last block) and (b) from pixels with the same model (decode, windows, blocks 0..10, then
  the same function). ``ratio`` = pixel time / store time. A full-size random-init ViT-B/16 has
  the FLOPs of the real one; the last block is one of 12, so the ratio is bounded by about 12.
- ``bench_store_sizes``: bytes per image of each backbone family at its default protocol, from
  ``featurestore.extract.plan`` dry runs (no forward pass, models built on the meta device).

Environment knobs: BENCH_CLIP_IMAGES (default 4), BENCH_CLIP_SIZE (image side in pixels before
the short-side-448 resize, default 448: 3 x 3 windows of 224 px at stride 112).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featurestore.backbones import create_backbone
from featurestore.extract import ExtractConfig, extract, plan
from featurestore.images import ImageRecord, list_folder_images, load_image_rgb
from featurestore.protocol import Protocol
from featurestore.store import FeatureStore, _storage_dtype
from methods.clip_dense import LastBlock, maskclip_dense

SAM_PROTOCOL = Protocol(resize="long", size=1024)
CLIP_PROTOCOL = Protocol(resize="short", size=448, crop=224, stride=112)
DINO_PROTOCOL = Protocol(resize="short", size=448)
# Typical benchmark image sizes (H, W): ADE20K, Pascal VOC, COCO.
SIZE_IMAGES = ((512, 683), (375, 500), (480, 640))


def _write_images(root: Path, sizes: list[tuple[int, int]], noise: bool) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        if noise:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:  # only the size matters (dry runs read the header)
            pixels = np.full((h, w, 3), 128, dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:04d}.png")
    return list_folder_images(root)


def bench_clip_cache(tmp: Path) -> dict:
    """MaskCLIP dense features of N images from a clip-b16 store ÷ from pixels (same model)."""
    n = int(os.environ.get("BENCH_CLIP_IMAGES", "4"))
    side = int(os.environ.get("BENCH_CLIP_SIZE", "448"))
    records = _write_images(tmp / "clip_images", [(side, side)] * n, noise=True)
    store_path = tmp / "clip.zarr"
    cfg = ExtractConfig(
        models=["clip-b16"],
        protocol=CLIP_PROTOCOL,
        store=str(store_path),
        random_init=True,
        batch_size=8,
    )
    t0 = time.perf_counter()
    extract(records, cfg)
    extract_s = time.perf_counter() - t0
    backbone = create_backbone("clip-b16", random_init=True).eval()  # same seed: same weights

    def from_store() -> list[torch.Tensor]:
        fs = FeatureStore.open(store_path).require("clip-b16", CLIP_PROTOCOL)
        block = LastBlock.from_feature_set(fs)
        with torch.inference_mode():
            return [
                maskclip_dense(f.tensors["pre_last"], None, block)
                for f in fs.iter_images(names=["pre_last"])
            ]

    def from_pixels() -> list[torch.Tensor]:
        block = LastBlock.from_visual(backbone.visual)
        out = []
        with torch.inference_mode():
            for record in records:
                image = load_image_rgb(record.path)
                windows = backbone.preprocess(
                    image, backbone.geometry(CLIP_PROTOCOL, *image.shape[:2])
                )
                tokens = [
                    backbone.pre_last_tokens(torch.stack(windows[i : i + 8]))[:, 1:]
                    for i in range(0, len(windows), 8)
                ]
                patch = torch.cat(tokens).reshape(-1, backbone.width)
                out.append(maskclip_dense(patch, None, block))
        return out

    from_store()  # warm-up (first zarr open, allocator)
    store_s = min(_timed(from_store)[0] for _ in range(3))
    pixel_s, pixel_out = _timed(from_pixels)
    store_out = from_store()
    diff = max(float((a - b).abs().max()) for a, b in zip(store_out, pixel_out, strict=True))
    cos = min(
        float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())
        for a, b in zip(store_out, pixel_out, strict=True)
    )
    tokens = sum(len(o) for o in store_out)
    return {
        "model": "clip-b16 (random init, full size)",
        "protocol": CLIP_PROTOCOL.key(),
        "images": n,
        "image_size": [side, side],
        "windows": tokens // 196,
        "tokens": tokens,
        "store_dtype": "float16",
        "extract_s": round(extract_s, 3),
        "store_s": round(store_s, 4),
        "pixel_s": round(pixel_s, 3),
        "ratio": round(pixel_s / store_s, 2),
        "max_abs_diff": diff,  # float16 storage of pre_last
        "min_cosine": cos,
    }


def bench_store_sizes(tmp: Path) -> dict:
    """Store bytes per image of each family at its default protocol (float16, dry runs)."""
    records = _write_images(tmp / "size_images", list(SIZE_IMAGES), noise=False)
    rows = {}
    for model, protocol in (
        ("dinov2-s14", DINO_PROTOCOL),
        ("dinov2-b14", DINO_PROTOCOL),
        ("clip-b16", CLIP_PROTOCOL),
        ("sam-b", SAM_PROTOCOL),
    ):
        cfg = ExtractConfig(models=[model], protocol=protocol, store=str(tmp / "unused.zarr"))
        (row,) = plan(records, cfg)
        with torch.device("meta"):
            specs = create_backbone(model, random_init=True).tensor_specs()
        itemsize = _storage_dtype(cfg.dtype).itemsize
        count = {"token": row.tokens, "window": row.windows, "image": row.images}
        per_tensor = {
            s.name: int(count[s.unit] * int(np.prod(s.row_shape)) * itemsize) // row.images
            for s in specs
        }
        rows[model] = {
            "protocol": protocol.key(),
            "windows_per_image": row.windows / row.images,
            "tokens_per_image": row.tokens / row.images,
            "bytes_per_image": row.bytes // row.images,
            "mb_per_image": round(row.bytes / row.images / 2**20, 3),
            "bytes_per_image_by_tensor": per_tensor,
        }
    return {
        "images": [list(s) for s in SIZE_IMAGES],
        "dtype": "float16",
        "models": rows,
    }


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ovss-clip-bench-") as d:
        tmp = Path(d)
        print(json.dumps({"store_sizes": bench_store_sizes(tmp)}, indent=2))
        print(json.dumps({"clip_cache": bench_clip_cache(tmp)}, indent=2))


if __name__ == "__main__":
    main()
