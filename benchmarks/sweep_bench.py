"""Sweeps and the derived dense cache (``ovss eval --sweep`` / ``--cache-dense``).

``python -m benchmarks.sweep_bench`` prints the result dict as JSON.

Setup: N demo collages (``build_collage_dataset``, ``side x side`` px) in a store made as
``ovss extract --for trident`` does (``benchmarks.trident_bench``): full-size random-init
``clip-b16`` and ``dino-b16`` on the paper's windows and the demo's tiny SAM. The text tower is
a random-init CLIP-B/16 (its embeddings are cached in the store before anything is timed).
Times are best of ``BENCH_SWEEP_REPEATS`` (default 2) after a warm-up.

- ``scoring``: a 12-point grid of ``prob_thd`` (4) x ``logit_scale`` (3) in one pass ÷ one
  evaluation (``run_eval``); target <= 1.5 (the logits are computed once per image, the 12
  scorings share them);
- ``method_key``: a 4-point sweep of Trident's ``cos_fac`` in one pass ÷ four separate
  evaluations; target <= 0.5 (the windows' proxy attention and the splice are computed once
  per image; only the SAM affinity and the projection run per value);
- ``derived_cache``: an evaluation from pixels (extraction into a fresh store + evaluation) ÷
  a second evaluation from the derived dense cache (``--cache-dense``); target >= 50.

Environment knobs: BENCH_SWEEP_IMAGES (default 3), BENCH_SWEEP_SIZE (collage side, default
448), BENCH_SWEEP_REPEATS (default 2).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from featurestore.datasets import list_dataset_images
from featurestore.demo_data import build_collage_dataset
from methods.base import build_config, get_method
from methods.evaluate import EvalRequest, run_eval
from methods.sweep import SweepRequest, run_sweep

SETTINGS = {"sam_size": "256"}
TARGETS = {"scoring": 1.5, "method_key": 0.5, "derived_cache": 50.0}


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_sweep(tmp: Path) -> dict:
    from benchmarks.trident_bench import _extract

    n = int(os.environ.get("BENCH_SWEEP_IMAGES", "3"))
    side = int(os.environ.get("BENCH_SWEEP_SIZE", "448"))
    repeats = int(os.environ.get("BENCH_SWEEP_REPEATS", "2"))
    ds = build_collage_dataset(tmp / "sweep_data", n_train=1, n_val=n, size=(side, side))
    records = list_dataset_images("custom", ds.root, "val")
    cfg = build_config(get_method("trident"), "custom", SETTINGS)
    store = tmp / "sweep.zarr"
    _extract(records, store, cfg)
    base = dict(
        dataset="custom",
        data_root=str(ds.root),
        split="val",
        store=str(store),
        method="trident",
        settings=dict(SETTINGS),
        templates="single",
        text_random_init=True,
        device="cpu",
        gallery=0,
    )
    run_eval(EvalRequest(**base))  # caches the text embedding, warms up

    one = _best(lambda: run_eval(EvalRequest(**base)), repeats)
    grid = {"prob_thd": ["0.0", "0.2", "0.4", "0.6"], "logit_scale": ["20", "40", "80"]}
    sweep12 = SweepRequest(**base, sweep=grid)
    rows12 = len(run_sweep(sweep12).rows)
    s12 = _best(lambda: run_sweep(sweep12), repeats)

    values = ["0.8", "1.0", "1.2", "1.5"]

    def four_separate() -> None:
        for v in values:
            run_eval(EvalRequest(**{**base, "settings": {**SETTINGS, "cos_fac": v}}))

    sep4 = _best(four_separate, repeats)
    sweep4 = SweepRequest(**base, sweep={"cos_fac": values})
    s4 = _best(lambda: run_sweep(sweep4), repeats)

    # from pixels: extraction into a fresh store + the evaluation; then twice with the cache
    pixel_store = tmp / "pixels.zarr"
    t = time.perf_counter()
    _extract(records, pixel_store, cfg)
    pix = {**base, "store": str(pixel_store)}
    run_eval(EvalRequest(**pix))
    from_pixels = time.perf_counter() - t
    cache = tmp / "dense_cache"
    first = run_sweep(SweepRequest(**pix, cache_dense=str(cache)))
    second = None

    def from_cache() -> None:
        nonlocal second
        second = run_sweep(SweepRequest(**pix, cache_dense=str(cache)))

    cached = _best(from_cache, repeats)
    assert second is not None and second.sharing["dense_cached"] == n
    assert second.rows[0].result.metrics == first.rows[0].result.metrics

    ratios = {
        "scoring": round(s12 / one, 3),
        "method_key": round(s4 / sep4, 3),
        "derived_cache": round(from_pixels / cached, 1),
    }
    met = {
        "scoring": ratios["scoring"] <= TARGETS["scoring"],
        "method_key": ratios["method_key"] <= TARGETS["method_key"],
        "derived_cache": ratios["derived_cache"] >= TARGETS["derived_cache"],
    }
    return {
        "images": n,
        "side": side,
        "one_eval_s": round(one, 3),
        "sweep12_s": round(s12, 3),
        "sweep12_rows": rows12,
        "four_separate_s": round(sep4, 3),
        "sweep4_s": round(s4, 3),
        "from_pixels_s": round(from_pixels, 3),
        "from_cache_s": round(cached, 3),
        "ratios": ratios,
        "targets": TARGETS,
        "met": met,
    }


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ovss-sweep-bench-"))
    try:
        print(json.dumps(bench_sweep(tmp), indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
