"""PixelCLIP training throughput: the store path (``trainable_blocks = 1`` and ``2``: only the
last one or two blocks run, on cached tokens) vs pixels (all blocks, the paper), full-size CLIP
ViT-B/16 with random weights, 320² inputs, k = 64 classes, 256² masks, on this machine's CPU
(or ``--device``).

Both paths run the same ``PixelCLIPModel.step`` (EMA update, teacher forward, prompts through
the text tower, Sinkhorn targets, student forward, decoder, BCE, AdamW). The store path's
inputs are tokens of the shape a ``square320`` CLIP set holds, read from memory: reading two
images' tokens from a local store costs ~1 ms, far below a step. Steps/s after one warm-up
step; the ratios are store ÷ pixels (``ratio``: K = 1, ``ratio_k2``: K = 2). Knobs: ``BENCH_PIXELCLIP_BATCH`` (images per step, default
2), ``BENCH_PIXELCLIP_STEPS`` (timed steps, default 2).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def _steps(model, student_in, masks, grid, steps: int) -> float:
    model.step(student_in, student_in, masks, grid, lr=1e-4)  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        model.step(student_in, student_in, masks, grid, lr=1e-4)
    return steps / (time.perf_counter() - t)


def bench_pixelclip(tmp: Path | None = None, device: str = "cpu") -> dict:
    """``{"store_steps_per_s", "store_k2_steps_per_s", "pixel_steps_per_s", "ratio",
    "ratio_k2", ...}`` (module doc)."""
    from featurestore.backbones.clip import DEFAULT_POS_INTERP, load_open_clip
    from methods.pixelclip_train import PixelCLIPModel, PixelCLIPTrainConfig

    batch = int(os.environ.get("BENCH_PIXELCLIP_BATCH", "2"))
    steps = int(os.environ.get("BENCH_PIXELCLIP_STEPS", "2"))
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(16, 256, 256, generator=g) > 0.5).to(dev) for _ in range(batch)]
    out: dict = {"model": "clip-b16 (random-init)", "batch": batch, "timed_steps": steps}
    rates = {}
    for label, k in (("store", 1), ("store_k2", 2), ("pixel", 12)):
        clip, tok, _ = load_open_clip("clip-b16", random_init=True, seed=0)
        cfg = PixelCLIPTrainConfig(trainable_blocks=k, batch_size=batch)
        model = PixelCLIPModel(clip, tok, cfg, k, DEFAULT_POS_INTERP).to(dev)
        if k < 12:  # the tokens entering block 12 - k
            inputs = torch.randn(batch, 1 + 400, model.student.width, generator=g).to(dev)
        else:
            inputs = torch.randn(batch, 3, 320, 320, generator=g).to(dev)
        rates[label] = _steps(model, inputs, masks, (20, 20), steps)
        del model, clip
    out["store_steps_per_s"] = round(rates["store"], 3)
    out["store_k2_steps_per_s"] = round(rates["store_k2"], 3)
    out["pixel_steps_per_s"] = round(rates["pixel"], 3)
    out["ratio"] = round(rates["store"] / rates["pixel"], 2)
    out["ratio_k2"] = round(rates["store_k2"] / rates["pixel"], 2)
    out["store_gives_up"] = (
        "augmentations (frozen blocks see the fixed cached image), position-embedding and "
        "blocks 0..10 (K = 1) or 0..9 (K = 2) training"
    )
    return out


if __name__ == "__main__":
    print(bench_pixelclip())
