"""Last-block baselines from the store: seconds per image of sclip / clearclip / naclip beside
maskclip, and of the PAMR refinement.

``python -m benchmarks.last_block_bench`` prints the result dict as JSON.

Setup: ``BENCH_LB_IMAGES`` (default 2) random 375 x 500 images (VOC-sized), a full-size
random-init clip-b16 (the real FLOPs) extracted at SCLIP's VOC protocol (S 336, windows 224 /
112: 6 windows of 14 x 14 tokens) and ClearCLIP's (S 448, windows 448 / 224: 2 windows of 28 x 28
tokens), 21 random unit queries. Per method (best of ``BENCH_LB_REPEATS``, default 2):

- ``<method>_s``: ``cosine_logits`` per image from the store (read, last block, cosines, window
  merge), PAMR off;
- ``pamr_s``: PAMR (10 steps, dilations 8 and 16) of the 21-query logits at 375 x 500, with the
  guide built from the image;
- ``naclip_full_s``: ``segment_image`` with NACLIP's default (PAMR on) including the scoring.
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

from featurestore.extract import ExtractConfig, extract
from featurestore.images import list_folder_images
from featurestore.protocol import Protocol
from featurestore.store import FeatureStore

SCLIP_VOC = Protocol(resize="short", size=336, crop=224, stride=112)
CLEARCLIP_VOC = Protocol(resize="short", size=448, crop=448, stride=224)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_last_block(tmp: Path) -> dict:
    from methods.base import ScoringConfig, Vocab, build_config, get_method
    from methods.pamr import refine_cosine
    from methods.segment import segment_image

    n = int(os.environ.get("BENCH_LB_IMAGES", "2"))
    repeats = int(os.environ.get("BENCH_LB_REPEATS", "2"))
    rng = np.random.default_rng(0)
    (tmp / "lb_images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(
            tmp / "lb_images" / f"img{i:03d}.png"
        )
    records = list_folder_images(tmp / "lb_images")
    store_path = tmp / "lb.zarr"
    t0 = time.perf_counter()
    for p in (SCLIP_VOC, CLEARCLIP_VOC):
        extract(
            records,
            ExtractConfig(models=["clip-b16"], protocol=p, store=str(store_path), random_init=True),
        )
    extract_s = time.perf_counter() - t0
    store = FeatureStore.open(store_path)
    g = torch.Generator().manual_seed(0)
    q = 21
    vocab = Vocab(
        [[f"c{i}"] for i in range(q)],
        torch.nn.functional.normalize(torch.randn(q, 512, generator=g), dim=-1),
        torch.arange(q),
    )
    out: dict = {
        "model": "clip-b16 (random init, full size)",
        "images": n,
        "image_size": [375, 500],
        "queries": q,
        "extract_s": round(extract_s, 2),
        "torch_threads": torch.get_num_threads(),
    }
    sclip_set = {"size": 336, "crop": 224, "stride": 112, "pamr": "off"}
    for name, settings in (
        ("maskclip", {"size": 336, "crop": 224, "stride": 112}),
        ("sclip", sclip_set),
        ("naclip", sclip_set),
        ("clearclip", {"size": 448, "crop": 448, "stride": 224, "pamr": "off"}),
    ):
        cls = get_method(name)
        seg = cls(store, build_config(cls, None, settings))
        seg.cosine_logits(0, vocab)  # warm-up

        def run(seg=seg) -> None:
            with torch.inference_mode():
                for i in range(n):
                    seg.cosine_logits(i, vocab)

        out[f"{name}_s"] = round(_best(run, repeats) / n, 4)
    nac = get_method("naclip")
    seg = nac(store, build_config(nac, None, {"size": 336, "crop": 224, "stride": 112}))
    cos = [seg.cosine_logits(i, vocab)[0] for i in range(n)]

    def pamr_only() -> None:
        for i in range(n):
            refine_cosine(seg, i, cos[i], (375, 500))

    out["pamr_s"] = round(_best(pamr_only, repeats) / n, 4)

    def full() -> None:
        for i in range(n):
            segment_image(seg, i, vocab, ScoringConfig())

    out["naclip_full_s"] = round(_best(full, repeats) / n, 4)
    out["ratio_sclip_to_maskclip"] = round(out["sclip_s"] / out["maskclip_s"], 2)
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(bench_last_block(Path(d)), indent=2))
