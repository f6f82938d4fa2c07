"""``ovss demo``: the embedded default benchmark, end to end on a fresh machine, offline, on CPU.

Stages: build the Voronoi-collage benchmark (scikit-image photographs, known labels) ->
extract DINOv2 and CLIP features into one store (random-init real architectures unless weights
are given) -> embed the class names with the CLIP text tower -> segment the val split with
``maskclip`` (label PNGs + overlays) -> evaluate with the benchmark metric. With random weights
the mIoU is near chance: the point is the real pipeline and its outputs.
"""

from __future__ import annotations

import time
from pathlib import Path

from featurestore.datasets import list_dataset_images
from featurestore.demo_data import build_collage_dataset
from featurestore.extract import ExtractConfig, extract
from featurestore.inspect import store_info
from featurestore.protocol import Protocol

#: The demo's protocols: collages are 224 px high, so the shorter side stays as is.
DEMO_PROTOCOL = Protocol(resize="short", size=224)
#: CLIP windows for the maskclip stage (224 px crops, stride 112: two windows per collage).
DEMO_CLIP_PROTOCOL = Protocol(resize="short", size=224, crop=224, stride=112)
DEMO_CLIP = "clip-b16"
#: One template keeps the random-init text tower's work small [demo choice].
DEMO_TEMPLATES = "single"


def run_demo(
    out: str | Path,
    model: str = "dinov2-s14",
    weights: str | None = None,
    seed: int = 0,
    n_train: int = 24,
    n_val: int = 8,
    progress=None,
) -> dict:
    """Build the demo benchmark under ``out`` and extract ``model`` features for it.

    Returns a JSON-safe summary (dataset, model, weights identity, store info, stage timings).
    Re-running reuses the dataset and the finished store (resume), so it is fast.
    """
    out = Path(out)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    ds = build_collage_dataset(out / "data", seed=seed, n_train=n_train, n_val=n_val)
    timings["build collages"] = time.perf_counter() - t

    records = list_dataset_images("custom", ds.root, "train") + list_dataset_images(
        "custom", ds.root, "val"
    )
    t = time.perf_counter()
    store_path = str(out / "store.zarr")
    cfg = ExtractConfig(
        models=[model],
        protocol=DEMO_PROTOCOL,
        store=store_path,
        weights=weights,
        random_init=weights is None,
        seed=seed,
        batch_size=8,
    )
    report = extract(records, cfg, progress=progress)
    timings["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    clip_cfg = ExtractConfig(
        models=[DEMO_CLIP],
        protocol=DEMO_CLIP_PROTOCOL,
        store=store_path,
        random_init=True,
        seed=seed,
        batch_size=8,
    )
    extract(records, clip_cfg, progress=progress)
    timings["extract clip"] = time.perf_counter() - t

    stages = _segment_and_eval(store_path, ds, out, seed, progress, timings)
    info = store_info(store_path)
    weights_id = info["feature_sets"][0]["weights"] if info["feature_sets"] else "?"
    return {
        "dataset": {
            "root": str(ds.root),
            "classes": list(ds.class_names),
            "n_train": ds.n_train,
            "n_val": ds.n_val,
        },
        "out": str(out),
        "model": model,
        "weights": weights_id,
        "store": store_path,
        "store_info": info,
        "extract": report.to_dict(),
        "timings": timings,
        "segment": stages["segment"],
        "eval": stages["eval"],
        "note": (
            "random-init weights: the features carry texture statistics only; "
            "pass --weights for a real checkpoint"
            if weights is None
            else ""
        ),
    }


def _segment_and_eval(store_path, ds, out: Path, seed: int, progress, timings) -> dict:
    """Embed the classes, segment the val collages with maskclip, score them."""
    from featurestore.text import get_text_embeddings, parse_vocab
    from methods.evaluate import evaluate_store
    from methods.segment import segment_store, vocab_from_text

    t = time.perf_counter()
    vocab = parse_vocab("custom", data_root=ds.root)
    te = get_text_embeddings(
        store_path, DEMO_CLIP, vocab, DEMO_TEMPLATES, random_init=True, seed=seed
    )
    v = vocab_from_text(te, source=vocab.describe())
    timings["embed classes"] = time.perf_counter() - t

    settings = {
        "size": DEMO_CLIP_PROTOCOL.size,
        "crop": DEMO_CLIP_PROTOCOL.crop,
        "stride": DEMO_CLIP_PROTOCOL.stride,
    }
    t = time.perf_counter()
    n_train = ds.n_train
    val = list(range(n_train, n_train + ds.n_val))
    seg = segment_store(
        store_path,
        "maskclip",
        v,
        str(out / "segment"),
        dataset="custom",
        overrides=settings,
        indices=val,
        progress=progress,
    )
    timings["segment"] = time.perf_counter() - t
    t = time.perf_counter()
    res = evaluate_store(
        store_path, "custom", str(ds.root), "maskclip", v, split="val", overrides=settings
    )
    timings["eval"] = time.perf_counter() - t
    return {
        "segment": {"images": seg.images, "out_dir": seg.out_dir},
        "eval": {
            "mIoU": res.metrics["mIoU"],
            "mAcc": res.metrics["mAcc"],
            "aAcc": res.metrics["aAcc"],
            "images": res.images,
            "chance_mIoU": round(100 / (len(v.class_names) + 1), 2),
            "per_class_iou": dict(
                zip(res.class_names, res.metrics["per_class"]["iou"], strict=True)
            ),
        },
    }
