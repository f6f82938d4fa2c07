"""``ovss demo``: the embedded default benchmark, end to end on a fresh machine, offline, on CPU.

Stages so far: build the Voronoi-collage benchmark (scikit-image photographs, known labels) ->
extract DINOv2 features into a store -> summarise the store. Later stages (cluster, align,
segment, eval) build on the same store.
"""

from __future__ import annotations

import time
from pathlib import Path

from featurestore.datasets import list_dataset_images
from featurestore.demo_data import build_collage_dataset
from featurestore.extract import ExtractConfig, extract
from featurestore.inspect import store_info
from featurestore.protocol import Protocol

#: The demo's protocol: collages are 224 px high, so the shorter side stays as is.
DEMO_PROTOCOL = Protocol(resize="short", size=224)


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
        "note": (
            "random-init weights: the features carry texture statistics only; "
            "pass --weights for a real checkpoint"
            if weights is None
            else ""
        ),
    }
