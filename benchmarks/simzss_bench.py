"""SimZSS training throughput: captions/s of a step fed from the store vs the same step that
recomputes the frozen DINOv2 forward from pixels.

Both paths run ``methods.simzss_train.train_step`` (the CLIP-size text tower, 512 wide, 12
layers, 8 heads, context 77, on captions with their concept spans from the offline matcher;
Eq. 10; backward; fused AdamW), one image per caption. The store path reads the CLS + patch
tokens of a ``square224`` ViT-B/14 set (257 tokens of 768 values per image, random) through
the trainer's ``TokenReader`` (held in memory, as the trainer does under ``cache_gb``); the
pixel path runs the random-init ``dinov2-b14-reg`` on already decoded, resized and normalised
224² tensors (decoding and resizing are not counted, which favours the pixel path).

A step has a part that does not grow with the batch (AdamW over the ~63 M parameters, the dense
gradient of the 49408-row token embedding) that dominates the small batches a CPU can run, and
vanishes at the paper's 16384 captions per step. So each path runs at two batch sizes
(``BENCH_SIMZSS_BATCHES``, default 2,6), alternating path and size step by step after a warm-up
(robust to the load of a shared machine), each keeping its fastest of ``BENCH_SIMZSS_STEPS``
steps (default 2). Reported: captions/s and their ratio (store ÷ pixels) at the larger batch,
and the straight-line fit ``seconds = fixed + per_caption × batch`` of each path, whose
per-caption ratio (pixels ÷ store) is the ratio at large batches, the one held to the target.

Expected from the arithmetic: per caption the text step (forward + backward over 77 tokens)
costs ~3 × 2 × 38 M × 77 ≈ 18 GFLOP, the ViT-B/14 forward ~2 × 86 M × 261 ≈ 45 GFLOP: a
large-batch ratio of ~3.5; target >= 2.5.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

#: The ratio the store path must reach (module doc).
TARGET = 2.5
MODEL = "dinov2-b14-reg"
CAPTIONS = (
    "a dog running on the grass next to a tree",
    "two cars parked beside a building",
    "a cat sleeping on a sofa",
    "people walking along the beach at sunset",
    "a plate of food on a wooden table",
    "a train crossing a bridge over the river",
    "a bird sitting on a branch in the snow",
    "a man riding a horse in a field",
)


def _store(tmp: Path, n: int, dim: int, seed: int = 0):
    from featurestore.backbones.base import TensorSpec
    from featurestore.images import ImageRecord
    from featurestore.protocol import Protocol, image_geometry
    from featurestore.store import STATUS_OK, FeatureStore

    root = tmp / "simzss_img"
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "x.png")
    recs = [ImageRecord(f"i{i:04d}", str(root / "x.png"), "bench", "") for i in range(n)]
    store = FeatureStore.open_or_create(tmp / "simzss.zarr", recs)
    proto = Protocol("square", 224)
    geos = [image_geometry(proto, 224, 224, 14) for _ in range(n)]
    specs = [TensorSpec("patch", "token", (dim,)), TensorSpec("cls", "window", (dim,))]
    fs = store.create_feature_set(MODEL, proto, {"name": MODEL, "weights": "random"}, specs, geos)
    rng = np.random.default_rng(seed)
    for b in range(fs.n_blocks):
        bufs = fs.new_block_buffers(b)
        for k in bufs:
            bufs[k][:] = rng.standard_normal(bufs[k].shape, dtype=np.float32).astype(bufs[k].dtype)
        imgs = fs.block_images(b)
        fs.write_block(b, bufs, np.full(len(imgs), STATUS_OK), [""] * len(imgs))
    return fs


def _captions(batch: int, context: int):
    from methods.concepts import ConceptBank, annotate_caption, make_matcher
    from methods.simzss import ConceptBatch, get_tokenizer

    tok = get_tokenizer(context)
    matcher = make_matcher(ConceptBank.build(None), None)
    rows = [
        annotate_caption(CAPTIONS[i % len(CAPTIONS)], matcher, tok, context) for i in range(batch)
    ]
    tokens = torch.stack([r.tokens for r in rows])
    occ = [[(o.concept, o.tokens) for o in r.concepts] for r in rows]
    return tokens, ConceptBatch.from_lists(occ), sum(len(o) for o in occ)


def bench_simzss(tmp: Path, device: str = "cpu") -> dict:
    """``{"store_captions_per_s", "pixel_captions_per_s", "ratio", "large_batch_ratio",
    "target", "met", ...}`` (module doc)."""
    from featurestore.backbones import create_backbone
    from methods.simzss import TextTower
    from methods.simzss_train import SimZSSTrainConfig, TokenReader, make_optimizer, train_step

    sizes = [int(x) for x in os.environ.get("BENCH_SIMZSS_BATCHES", "2,6").split(",")]
    if len(sizes) != 2 or not 0 < sizes[0] < sizes[1]:
        raise ValueError(f"BENCH_SIMZSS_BATCHES must be two sizes SMALL,LARGE, not {sizes}")
    steps = int(os.environ.get("BENCH_SIMZSS_STEPS", "2"))
    dev = torch.device(device)
    cfg = SimZSSTrainConfig(captions="bench", lr=3e-5)
    backbone = create_backbone(MODEL, random_init=True, seed=0)
    backbone.model.to(dev)
    dim = int(backbone.info.extra["embed_dim"])
    fs = _store(Path(tmp), sizes[1], dim)
    reader = TokenReader(fs, np.arange(fs.store.n_images), cfg.cache_gb * 2**30)
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor(backbone.info.mean)[:, None, None]
    std = torch.tensor(backbone.info.std)[:, None, None]
    data = {}
    for b in sizes:
        tokens, concepts, n_occ = _captions(b, cfg.context_length)
        pixels = ((torch.rand(b, 3, 224, 224, generator=g) - mean) / std).to(dev)
        data[b] = (tokens, concepts, n_occ, pixels)

    def from_store(b: int):
        return reader.batch(np.arange(b))

    def from_pixels(b: int):
        out = backbone.forward_dense(data[b][3])
        patches = out["patch"].clone()
        return out["cls"].clone(), patches, torch.ones(patches.shape[:2], dtype=torch.bool)

    sources = {"store": from_store, "pixel": from_pixels}
    towers = {}
    for label in sources:
        torch.manual_seed(0)
        tower = TextTower(dim, cfg.text_width, cfg.text_layers, cfg.text_heads).to(dev)
        towers[label] = (tower, make_optimizer(tower, cfg))

    def step(label: str, b: int) -> float:
        t = time.perf_counter()
        train_step(*towers[label], cfg, data[b][0], data[b][1], *sources[label](b))
        return time.perf_counter() - t

    for label in sources:  # warm-up
        step(label, sizes[0])
    # the paths and sizes alternate step by step, so a change of load on a shared machine hits
    # all alike; each (path, size) keeps its fastest step
    best = {(label, b): float("inf") for label in sources for b in sizes}
    for _ in range(steps):
        for b in sizes:
            for label in sources:
                best[label, b] = min(best[label, b], step(label, b))
    small, large = sizes
    fit = {}
    for label in sources:  # seconds per step = fixed + per_caption * batch
        per = max((best[label, large] - best[label, small]) / (large - small), 1e-9)
        fit[label] = {
            "per_caption_s": round(per, 4),
            "fixed_s": round(max(best[label, small] - per * small, 0.0), 4),
        }
    rate = {label: large / best[label, large] for label in sources}
    large_ratio = fit["pixel"]["per_caption_s"] / fit["store"]["per_caption_s"]
    return {
        "model": f"{MODEL} (random-init) at square 224, text tower 512 x 12 layers, context 77",
        "batches": sizes,
        "timed_steps": steps,
        "concepts_per_caption": round(data[large][2] / large, 2),
        "threads": torch.get_num_threads(),
        "step_s": {f"{label}@{b}": round(best[label, b], 3) for label, b in best},
        "store_captions_per_s": round(rate["store"], 3),
        "pixel_captions_per_s": round(rate["pixel"], 3),
        "ratio": round(rate["store"] / rate["pixel"], 2),
        "fit": fit,
        "large_batch_ratio": round(large_ratio, 2),
        "target": TARGET,
        "met": large_ratio >= TARGET,
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(bench_simzss(Path(d)))
