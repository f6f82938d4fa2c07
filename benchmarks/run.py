"""``make bench``: side-by-side ratios measured in one run, a table on stdout, JSON in bench_out/.

Figures (PRODUCT.md "Performance"):
  0. the table: every row has a target and a met/missed column (``BenchTable``); the JSON
     holds the same rows as ``table``, next to each benchmark's full figures;
  1. extraction overhead: ``ovss extract`` (CPU) images/s ÷ a bare loop of the same forwards
     over pre-decoded inputs, batched alike, for dinov2-s14 (square 448) and clip-b16 windows
     (short 448, crop 336, stride 224), at batch 1 and 8, best of interleaved repeats (target
     ≥ 0.95; ``_extraction_pair``);
  2. store read: streaming one feature set ÷ ``numpy.memmap`` of the same bytes, and random
     per-image ``FeatureSet.read`` latency ÷ slicing an open memmap (target ≥ 0.8 each);
     the same set streamed from an S3 server (SeaweedFS on 127.0.0.1) ÷ from local disk (no
     target, reported; ``benchmarks.s3_bench``);
  3. peak RSS of streaming a feature set at two store sizes (must not grow with the images);
  4. cache payoff of the CLIP path: MaskCLIP dense features from the store ÷ from pixels;
  5. store bytes per image of each backbone at its default protocol;
  6. PrototypeIndex FAISS vs torch (150 and 20,000 prototypes), k-means FAISS vs torch on
     1M x 384 points, alignment training throughput.
  7. Trident: ``ovss eval --method trident`` images/s from the store, and its cache payoff
     (from pixels ÷ from the store) with a tiny SAM, extrapolated to SAM ViT-B from the
     measured SAM-B encoder (and Trident head) seconds per image (``benchmarks.trident_bench``).
  8. text embedding: ADE20K x openai80 on CLIP-B/16's text tower, full context ÷ truncated per
     batch, and the max difference (``benchmarks.text_bench``).
  9. PnP-OVSS: seconds per image of each stage (encoder, cross-attention + backward per round,
     blur, CRF torch vs pydensecrf2), tiny and full-size random-init BLIP-L, cached first pass vs
     none (``benchmarks.pnp_bench``; BENCH_PNP_FULL=0 skips the full-size model).
 10. PixelCLIP training steps/s, store (K=1) ÷ pixels (K=all), CLIP-B/16 random weights
     (``benchmarks.pixelclip_bench``).
 11. SimZSS training captions/s, tokens from the store ÷ the DINOv2 ViT-B/14 forward from pixels
     (random weights, CLIP-size text tower), at two batch sizes and the large-batch ratio
     (``benchmarks.simzss_bench``).
 11. Sweeps: a 12-point scoring sweep ÷ one evaluation (target <= 1.5), a 4-point Trident
     ``cos_fac`` sweep ÷ four evaluations (target <= 0.5), an evaluation from pixels ÷ one from
     the derived dense cache (target >= 50) (``benchmarks.sweep_bench``).
 12. DINOv3 beside DINOv2: store bytes per image and ``extract`` images/s of dinov3-s16 and
     dinov2-s14 at the default protocol, random weights (``bench_dinov3``).

Also: CLI start-up (``ovss store info`` in a fresh process, target ≤ 1 s, and which model
libraries the model-free commands load: none) and scoring at the original resolution (150
classes at 683 x 512 ÷ its memory-bandwidth bound, target ≤ 3, labels identical to the float32
reference; ``benchmarks.scoring_bench``).

Environment knobs: BENCH_IMAGES (extraction images, default 16; half for the CLIP windows),
BENCH_EXTRACT_REPEATS (interleaved repeats of each extraction side, default 2),
BENCH_READ_IMAGES (default 400). One part alone, e.g.
``python -c "from benchmarks.run import bench_extraction as b; from pathlib import Path;
import tempfile; print(b(Path(tempfile.mkdtemp())))"``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featurestore.backbones import create_backbone
from featurestore.backbones.base import TensorSpec
from featurestore.extract import ExtractConfig, extract
from featurestore.images import ImageRecord, list_folder_images, load_image_rgb
from featurestore.protocol import Protocol, image_geometry
from featurestore.store import STATUS_OK, FeatureStore

OUT = Path(os.environ.get("BENCH_OUT", "bench_out"))
#: Targets (issue 16): extract ÷ bare forward, store read ÷ memmap (streaming and random).
EXTRACTION_TARGET = 0.95
READ_TARGET = 0.8
#: ``ovss store info`` seconds on a small store, in a fresh process.
STARTUP_TARGET_S = 1.0


class BenchTable:
    """The bench table: every row has a target (``none (reported)`` where there is none) and
    whether this run met it (``met`` / ``missed`` / ``n/a``); the same rows, with the same
    fields, go to the JSON as ``results["table"]``."""

    COLUMNS = ("benchmark", "ours", "baseline", "ratio", "target", "met")

    def __init__(self, title: str):
        self.title = title
        self.rows: list[dict[str, str]] = []

    def add_row(
        self,
        benchmark: str,
        ours: str,
        baseline: str,
        ratio: str,
        target: str = "",
        met: bool | None = None,
    ) -> None:
        verdict = "n/a" if met is None else ("met" if met else "missed")
        values = (benchmark, ours, baseline, ratio, target or "none (reported)", verdict)
        self.rows.append(dict(zip(self.COLUMNS, values, strict=True)))

    def rich(self):
        from rich.table import Table

        t = Table(title=self.title)
        for c in self.COLUMNS:
            t.add_column(c)
        for row in self.rows:
            t.add_row(*(row[c] for c in self.COLUMNS))
        return t


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }


def write_images(root: Path, n: int, seed: int = 0) -> list[ImageRecord]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 480, int(rng.integers(560, 720))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / f"img{i:04d}.jpg", quality=92
        )
    return list_folder_images(root)


#: (label, model, protocol) of the extraction-overhead rows (every window of a config has one
#: shape, so batches of 8 fill across images as ``extract`` fills them).
EXTRACTION_CONFIGS = (
    ("dinov2-s14 square 448", "dinov2-s14", Protocol(resize="square", size=448)),
    (
        "clip-b16 windows (short 448, crop 336, stride 224)",
        "clip-b16",
        Protocol(resize="short", size=448, crop=336, stride=224),
    ),
)


def _extraction_pair(
    tmp: Path, records, model: str, protocol: Protocol, batch: int, repeats: int = 2
) -> dict:
    """``extract`` on CPU vs a bare loop of the same forwards over pre-decoded inputs.

    The bare loop runs exactly the forwards ``extract`` runs: ``batch`` windows of one shape
    per ``forward_dense`` (filled across images, as ``extract`` fills them within a block),
    and one ``forward_image`` per image where the model has image-level tensors (CLIP's
    ``global_image``). Decoding and preprocessing are done before it (not timed).

    The sides run interleaved ``repeats`` times (bare, extract, extract, bare, ...) so the
    shared machine's background load hits both alike. ``ratio``: the best bare time ÷ the best
    time of the extraction loop (the seconds ``extract`` reports, which its images/s are
    computed from: decode, preprocess, forwards, encoding, block writes); ``ratio_median``:
    the median of the per-repeat ratios; ``ratio_end_to_end``: the same with the whole
    ``extract`` call (also building the model and creating the store: a fixed cost per call,
    ``fixed_seconds``, that a dataset of thousands of images amortises).
    """
    bb = create_backbone(model, random_init=True).eval()
    wants_image = any(s.unit == "image" for s in bb.tensor_specs())
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    image_inputs: list[torch.Tensor] = []
    for r in records:
        img = load_image_rgb(r.path)
        geo = bb.geometry(protocol, *img.shape[:2])
        for x in bb.preprocess(img, geo):
            by_shape.setdefault(tuple(x.shape), []).append(x)
        if wants_image:
            image_inputs.append(bb.preprocess_image(img, geo)[None])
    batches = [
        torch.stack(xs[i : i + batch]) for xs in by_shape.values() for i in range(0, len(xs), batch)
    ]
    windows = sum(len(xs) for xs in by_shape.values())
    store = tmp / "ext.zarr"
    cfg = ExtractConfig(
        models=[model],
        protocol=protocol,
        store=str(store),
        random_init=True,
        batch_size=batch,
        device="cpu",
    )

    def bare_loop() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for x in image_inputs:
                bb.forward_image(x)
            for x in batches:
                bb.forward_dense(x)
        return time.perf_counter() - t

    def full_run() -> tuple[float, float]:
        shutil.rmtree(store, ignore_errors=True)
        t = time.perf_counter()
        rep = extract(records, cfg)
        return rep.models[0].seconds, time.perf_counter() - t

    with torch.inference_mode():
        bb.forward_dense(batches[0])  # warm-up
    bare_times, loop_times, wall_times = [], [], []
    for k in range(max(1, repeats)):
        if k % 2 == 0:
            bare_times.append(bare_loop())
        loop, wall = full_run()
        loop_times.append(loop)
        wall_times.append(wall)
        if k % 2 == 1:
            bare_times.append(bare_loop())
    shutil.rmtree(store, ignore_errors=True)
    bare, loop, wall = min(bare_times), min(loop_times), min(wall_times)
    n = len(records)
    ratio = bare / loop
    return {
        "model": model,
        "protocol": protocol.key(),
        "batch": batch,
        "images": n,
        "windows": windows,
        "repeats": len(bare_times),
        "bare_images_per_s": round(n / bare, 3),
        "extract_images_per_s": round(n / loop, 3),
        "ratio": round(ratio, 3),
        "ratio_median": round(float(np.median(np.array(bare_times) / np.array(loop_times))), 3),
        "ratio_end_to_end": round(bare / wall, 3),
        "fixed_seconds": round(float(np.median(np.array(wall_times) - np.array(loop_times))), 3),
        "bare_seconds": [round(t, 3) for t in bare_times],
        "extract_seconds": [round(t, 3) for t in loop_times],
        "target": EXTRACTION_TARGET,
        "met": ratio >= EXTRACTION_TARGET,
    }


def bench_extraction(tmp: Path) -> dict:
    """Extraction overhead (``extract`` ÷ bare forward loop) for each of ``EXTRACTION_CONFIGS``
    at batch 1 and 8: BENCH_IMAGES images (default 16; half for the CLIP windows, about 5
    windows each), BENCH_EXTRACT_REPEATS interleaved repeats of each side (default 2)."""
    n = int(os.environ.get("BENCH_IMAGES", "16"))
    repeats = int(os.environ.get("BENCH_EXTRACT_REPEATS", "2"))
    records = write_images(tmp / "ext_images", n)
    rows = []
    for label, model, protocol in EXTRACTION_CONFIGS:
        recs = records if model != "clip-b16" else records[: max(1, n // 2)]
        for batch in (1, 8):
            row = _extraction_pair(tmp, recs, model, protocol, batch, repeats)
            rows.append({"config": label, **row})
    first = rows[0]
    return {
        "rows": rows,
        # the first row's figures, under the names earlier runs used
        "model": first["model"],
        "ratio": first["ratio"],
        "target": EXTRACTION_TARGET,
        "met": all(r["met"] for r in rows),
    }


#: The DINOv3-beside-DINOv2 row: (model, the default protocol), random weights.
DINOV3_PAIR = ("dinov3-s16", "dinov2-s14")


def bench_dinov3(tmp: Path) -> dict:
    """Store bytes per image (float16, the dry-run planner) and ``extract`` images/s on CPU of
    dinov3-s16 beside dinov2-s14 at the default protocol (short side 448, one window), on the
    same BENCH_IMAGES images (default 8; 480 x 560-720), random weights, batch 1."""
    from featurestore.extract import plan

    n = int(os.environ.get("BENCH_IMAGES", "8"))
    records = write_images(tmp / "dinov3_images", n, seed=3)
    protocol = Protocol(resize="short", size=448)
    rows = {}
    for model in DINOV3_PAIR:
        store = tmp / f"{model}.zarr"
        cfg = ExtractConfig(
            models=[model], protocol=protocol, store=str(store), random_init=True, device="cpu"
        )
        (row,) = plan(records, cfg)
        extract(records[:1], cfg)  # warm-up (not timed)
        shutil.rmtree(store)
        t = time.perf_counter()
        extract(records, cfg)
        seconds = time.perf_counter() - t
        rows[model] = {
            "protocol": protocol.key(),
            "tokens_per_image": row.tokens / row.images,
            "bytes_per_image": row.bytes // row.images,
            "mb_per_image": round(row.bytes / row.images / 2**20, 3),
            "extract_images_per_s": round(n / seconds, 3),
        }
    a, b = (rows[m] for m in DINOV3_PAIR)
    return {
        "images": n,
        "models": rows,
        "bytes_ratio": round(a["bytes_per_image"] / b["bytes_per_image"], 3),
        "rate_ratio": round(a["extract_images_per_s"] / b["extract_images_per_s"], 3),
    }


def synthetic_store(path: Path, n_images: int, dim: int = 384) -> FeatureStore:
    """A store of ``n_images`` 448x448-protocol images with random float16 tokens."""
    root = path.parent / (path.name + "_img")
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "x.png")
    recs = [ImageRecord(f"i{i:05d}", str(root / "x.png"), "bench", "") for i in range(n_images)]
    store = FeatureStore.open_or_create(path, recs)
    sizes = np.tile(np.array([[448, 448]]), (n_images, 1))
    protocol = Protocol(resize="square", size=448)
    geos = [image_geometry(protocol, h, w, 14) for h, w in sizes.tolist()]
    specs = [TensorSpec("patch", "token", (dim,)), TensorSpec("cls", "window", (dim,))]
    info = {"name": "synthetic", "weights": "random-init:0"}
    fs = store.create_feature_set("synthetic", protocol, info, specs, geos)
    rng = np.random.default_rng(0)
    for b in range(fs.n_blocks):
        bufs = fs.new_block_buffers(b)
        for k in bufs:
            bufs[k][:] = rng.standard_normal(bufs[k].shape, dtype=np.float32).astype(np.float16)
        imgs = fs.block_images(b)
        fs.write_block(b, bufs, np.full(len(imgs), STATUS_OK), [""] * len(imgs))
    return store


def bench_read(tmp: Path) -> dict:
    """Streaming the `patch` tensor of a feature set vs numpy.memmap over the same bytes."""
    n = int(os.environ.get("BENCH_READ_IMAGES", "400"))
    store = synthetic_store(tmp / "read.zarr", n)
    fs = store.feature_set(store.feature_sets()[0])
    # The same bytes as one flat file, read per image through a memmap.
    flat = tmp / "flat.bin"
    rows = fs.geometry["row_count_token"]
    with open(flat, "wb") as fh:
        for f in fs.iter_images(names=["patch"]):
            fh.write(f.tensors["patch"].tobytes())
    dim = fs.specs[0].row_shape[0]
    total_bytes = int(rows.sum()) * dim * 2

    def stream() -> float:
        s = 0.0
        for f in fs.iter_images(names=["patch"]):
            s += float(f.tensors["patch"][0, 0])
        return s

    def memmap() -> float:
        mm = np.memmap(flat, dtype=np.float16, mode="r").reshape(-1, dim)
        s, start = 0.0, 0
        for r in rows.tolist():
            a = np.array(mm[start : start + r])  # materialise like the store read does
            s += float(a[0, 0])
            start += r
        return s

    # Random per-image reads: ``FeatureSet.read`` vs slicing one open memmap, same order.
    starts = np.concatenate([[0], np.cumsum(rows)]).tolist()
    order = np.random.default_rng(0).permutation(len(rows)).tolist()
    mm_open = np.memmap(flat, dtype=np.float16, mode="r").reshape(-1, dim)

    def random_store() -> float:
        return sum(float(fs.read(i, names=["patch"]).tensors["patch"][0, 0]) for i in order)

    def random_memmap() -> float:
        return sum(float(np.array(mm_open[starts[i] : starts[i + 1]])[0, 0]) for i in order)

    # Interleaved, best of BENCH_READ_REPEATS (default 15) each: background load on a shared
    # machine hits both sides alike; one pass is ~0.3 GB, tens of ms.
    fns = {"stream": stream, "memmap": memmap, "rs": random_store, "rm": random_memmap}
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm the page cache
    repeats = max(1, int(os.environ.get("BENCH_READ_REPEATS", "15")))
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    t_store, t_mm = min(times["stream"]), min(times["memmap"])
    t_rs, t_rm = min(times["rs"]), min(times["rm"])

    def median_ratio(fast: str, slow: str) -> float:  # of the per-repeat (adjacent) ratios
        return round(float(np.median(np.array(times[fast]) / np.array(times[slow]))), 3)

    return {
        "images": n,
        "repeats": repeats,
        "bytes": total_bytes,
        "store_GBps": round(total_bytes / t_store / 1e9, 3),
        "memmap_GBps": round(total_bytes / t_mm / 1e9, 3),
        "ratio": round(t_mm / t_store, 3),
        "ratio_median": median_ratio("memmap", "stream"),
        "random_store_us_per_image": round(t_rs / n * 1e6, 1),
        "random_memmap_us_per_image": round(t_rm / n * 1e6, 1),
        "random_ratio": round(t_rm / t_rs, 3),
        "random_ratio_median": median_ratio("rm", "rs"),
        "target": READ_TARGET,
        "met": t_mm / t_store >= READ_TARGET,
        "random_met": t_rm / t_rs >= READ_TARGET,
    }


RSS_CHILD = """
import resource, sys
from featurestore.store import FeatureStore
fs = FeatureStore.open(sys.argv[1]).feature_set(FeatureStore.open(sys.argv[1]).feature_sets()[0])
n = 0
for f in fs.iter_images():
    n += f.tensors["patch"].shape[0]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def bench_rss(tmp: Path) -> dict:
    """Peak RSS (MB) of a process streaming a feature set, at two store sizes."""
    out = {}
    for n in (100, 400):
        path = tmp / f"rss{n}.zarr"
        synthetic_store(path, n)
        res = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, str(path)],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, PYTHONPATH=os.getcwd()),
        )
        out[f"peak_rss_mb_{n}_images"] = round(float(res.stdout.strip()), 1)
    a, b = out["peak_rss_mb_100_images"], out["peak_rss_mb_400_images"]
    out["growth_ratio_4x_images"] = round(b / a, 3)
    return out


STARTUP_PROBE = """
import sys
from click.testing import CliRunner
from ovss_cli.main import cli
code = CliRunner().invoke(cli, sys.argv[1:]).exit_code
heavy = ("torch", "timm", "open_clip", "transformers", "segment_anything")
print(code, ",".join(m for m in heavy if m in sys.modules) or "-")
"""


def bench_startup(tmp: Path) -> dict:
    """``ovss store info`` on a small store in a fresh process (best of 3 wall seconds), and
    the model libraries loaded by the commands that need no model (``--help``, ``store info``,
    ``store ls``, ``methods``, ``models``)."""
    path = tmp / "startup.zarr"
    synthetic_store(path, 8, dim=16)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    main_cli = "from ovss_cli.main import cli; cli()"
    times = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", main_cli, "store", "info", str(path)],
            check=True,
            capture_output=True,
            env=env,
        )
        times.append(time.perf_counter() - t)
    loaded = {}
    for args in (
        ["--help"],
        ["store", "info", str(path)],
        ["store", "ls", str(path)],
        ["methods"],
        ["models"],
    ):
        res = subprocess.run(
            [sys.executable, "-c", STARTUP_PROBE, *args],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        code, heavy = res.stdout.split()[-2:]
        loaded[" ".join(a if a != str(path) else "STORE" for a in args)] = heavy
    best = min(times)
    return {
        "store_info_s": round(best, 3),
        "model_libraries_loaded": loaded,
        "target_s": STARTUP_TARGET_S,
        "met": best <= STARTUP_TARGET_S and all(v == "-" for v in loaded.values()),
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ovss-bench-"))
    results = {"machine": machine()}
    try:
        from benchmarks.align_bench import (
            bench_align_throughput,
            bench_kmeans,
            bench_prototype_index,
        )
        from benchmarks.clip_bench import bench_clip_cache, bench_store_sizes
        from benchmarks.last_block_bench import bench_last_block
        from benchmarks.pixelclip_bench import bench_pixelclip
        from benchmarks.pnp_bench import bench_pnp
        from benchmarks.s3_bench import bench_s3
        from benchmarks.scoring_bench import bench_scoring
        from benchmarks.simzss_bench import bench_simzss
        from benchmarks.sweep_bench import bench_sweep
        from benchmarks.text_bench import bench_text
        from benchmarks.trident_bench import bench_trident

        for name, fn in (
            ("startup", bench_startup),
            ("store_read", bench_read),
            ("s3_read", bench_s3),
            ("streaming_rss", bench_rss),
            ("extraction_overhead", bench_extraction),
            ("dinov3_vs_dinov2", bench_dinov3),
            ("scoring", bench_scoring),
            ("clip_cache_payoff", bench_clip_cache),
            ("store_size_per_image", bench_store_sizes),
            ("align_throughput", lambda _tmp: bench_align_throughput()),
            ("prototype_index", lambda _tmp: bench_prototype_index()),
            ("kmeans", lambda _tmp: bench_kmeans()),
            ("trident", bench_trident),
            ("text_embedding", bench_text),
            ("pnp_ovss", bench_pnp),
            ("last_block", bench_last_block),
            ("pixelclip", bench_pixelclip),
            ("simzss", bench_simzss),
            ("sweep", bench_sweep),
        ):
            t = time.perf_counter()
            results[name] = fn(tmp)
            results[name]["bench_seconds"] = round(time.perf_counter() - t, 1)
            print(f"[bench] {name}: {results[name]}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["self_peak_rss_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    from rich.console import Console

    t = BenchTable("ovss benchmarks (ratios measured side by side in this run)")
    e, r, m = results["extraction_overhead"], results["store_read"], results["streaming_rss"]
    for row in e["rows"]:
        t.add_row(
            f"extraction overhead, {row['config']}, batch {row['batch']}",
            f"{row['extract_images_per_s']} img/s (ovss extract, cpu)",
            f"{row['bare_images_per_s']} img/s (bare forward)",
            str(row["ratio"]),
            f">= {row['target']}",
            row["met"],
        )
    t.add_row(
        "store read, streaming",
        f"{r['store_GBps']} GB/s (stream)",
        f"{r['memmap_GBps']} GB/s (memmap)",
        str(r["ratio"]),
        f">= {r['target']}",
        r["met"],
    )
    t.add_row(
        "store read, random images",
        f"{r['random_store_us_per_image']} us/image (FeatureSet.read)",
        f"{r['random_memmap_us_per_image']} us/image (memmap slice)",
        str(r["random_ratio"]),
        f">= {r['target']}",
        r["random_met"],
    )
    su = results["startup"]
    t.add_row(
        "CLI start-up: ovss store info (fresh process)",
        f"{su['store_info_s']} s",
        "model libraries loaded: "
        + "; ".join(f"{k}: {v}" for k, v in su["model_libraries_loaded"].items()),
        "",
        f"<= {su['target_s']} s, none loaded",
        su["met"],
    )
    sc = results["scoring"]
    t.add_row(
        f"scoring at original resolution ({sc['classes']} classes, "
        f"{sc['out_hw'][0]}x{sc['out_hw'][1]}), x bandwidth bound",
        f"{sc['score_logits_s']} s score_logits, {sc['score_labels_s']} s score_labels "
        f"(labels identical: {sc['labels_identical']}; C kernel: {sc['kernel']}); torch path "
        f"{sc['torch_path_s']} s = {sc['torch_ratio_to_bound']}x",
        f"bound {sc['bound_s']} s at {sc['copy_GBps']} GB/s; reference {sc['reference_s']} s",
        f"{sc['ratio_to_bound']} ({sc['labels_ratio_to_bound']} labels only)",
        f"<= {sc['target']}x bound",
        sc["ratio_to_bound"] <= sc["target"] and sc["labels_identical"],
    )
    s3 = results["s3_read"]
    t.add_row(
        "store read from S3 (SeaweedFS, 127.0.0.1)",
        f"{s3.get('s3_mb_per_s', '-')} MB/s (stream; server alone {s3.get('s3_raw_get_mb_per_s', '-')})",
        f"{s3.get('local_mb_per_s', '-')} MB/s (same store, local disk)",
        str(s3.get("ratio_s3_over_local", s3.get("skipped", ""))),
        "none (reported)",
        None,
    )
    t.add_row(
        "streaming peak RSS",
        f"{m['peak_rss_mb_400_images']} MB at 400 images",
        f"{m['peak_rss_mb_100_images']} MB at 100 images",
        str(m["growth_ratio_4x_images"]),
        "<= 1.1 (flat)",
        m["growth_ratio_4x_images"] <= 1.1,
    )
    c = results["clip_cache_payoff"]
    t.add_row(
        "cache payoff (MaskCLIP dense)",
        f"{c['store_s']} s from the store",
        f"{c['pixel_s']} s from pixels",
        str(c["ratio"]),
        ">= 20 (paper-size backbones)",
        c["ratio"] >= 20,
    )
    tr = results["trident"]
    t.add_row(
        "trident eval from the store",
        f"{tr['images_per_s']} img/s ({tr['store_s_per_image']} s/img)",
        f"{tr['images']} images {tr['image_size'][0]}x{tr['image_size'][1]}",
        "",
        "",
    )
    t.add_row(
        "trident payoff (tiny SAM)",
        f"{tr['store_s_per_image']} s/img from the store",
        f"{tr['pixel_s_per_image']} s/img from pixels (CLIP-B+DINO-B+tiny SAM+head)",
        str(tr["ratio_tiny_sam"]),
        "",
    )
    if "sam_b" in tr:
        b = tr["sam_b"]
        t.add_row(
            "trident payoff (SAM-B, extrapolated from measured encoder s/img)",
            f"{tr['store_s_per_image']} s/img from the store",
            f"{b['pixel_s_per_image']} s/img from pixels "
            f"(SAM-B encoder {b['encoder_s_per_image']} s/img)",
            str(b["ratio_sam_b_encoder"]),
            "",
        )
        t.add_row(
            "trident payoff (SAM-B, + measured 64x64-grid head both sides)",
            f"{b['store_s_per_image_with_sam_b_head']} s/img from the store",
            f"{b['pixel_s_per_image_with_sam_b_head']} s/img from pixels",
            str(b["ratio_sam_b_encoder_and_head"]),
            "",
        )
        af = b["affinity"]
        t.add_row(
            "trident SAM affinity, SAM-B 64x64 grid (12 heads), s/image",
            f"{af['affinity_s_per_image']} s ({af['torch_threads']} threads; labels identical to "
            f"the per-head reference: {af.get('labels_identical', 'not checked')})",
            f"bounds: {af['gflop']} GFLOP at {af['sgemm_gflops']} GFLOP/s = "
            f"{af['flop_bound_s']} s; {af['mbytes']} MB at {af['copy_GBps']} GB/s = "
            f"{af['byte_bound_s']} s",
            f"{af['ratio_to_bound']} x bound",
            f"<= {af['target_s']} s, labels identical",
            af["met"] and af.get("labels_identical", True),
        )
    px = results["pixelclip"]
    t.add_row(
        f"pixelclip training, CLIP-B/16 random-init, batch {px['batch']}",
        f"{px['store_steps_per_s']} steps/s from the store (K=1)",
        f"{px['pixel_steps_per_s']} steps/s from pixels (K=all)",
        str(px["ratio"]),
        "",
    )
    sz = results["simzss"]
    t.add_row(
        f"simzss training, dinov2-b14-reg random-init, batch {sz['batches'][1]} "
        f"(large batch: per-caption fit)",
        f"{sz['store_captions_per_s']} captions/s from the store",
        f"{sz['pixel_captions_per_s']} captions/s from pixels",
        f"{sz['ratio']} ({sz['large_batch_ratio']} large batch)",
        f">= {sz['target']} large batch",
        sz["met"],
    )
    tx = results["text_embedding"]
    t.add_row(
        f"text embedding ADE20K x openai80 ({tx['prompts']} prompts, clip-b16 text tower)",
        f"{tx['truncated_s']} s (truncated per batch, max |diff| {tx['max_abs_diff']:.1e})",
        f"{tx['full_context_s']} s (full 77-token context; {tx['full_context_timing']})",
        str(tx["ratio"]),
        f">= {tx['target']} within {tx['tolerance']:.0e}",
        tx["met"],
    )
    for name, row in results["pnp_ovss"]["models"].items():
        t.add_row(
            f"pnp-ovss per image ({name} BLIP, 4 rounds, 375x500, 20 classes)",
            f"{row['s_per_image_cached']} s (cached first pass; round: encoder "
            f"{row['encoder_s']} s + cam {row['cam_round_s']} s; blur {row['blur_s']} s; "
            f"CRF torch {row['crf_torch_s']} s vs pydensecrf {row['crf_pydensecrf_s']} s)",
            f"{row['dropout_live_s']} s rounds live vs {row['dropout_cached_s']} s cached",
            str(row["cache_saving"]),
            "",
        )
    sw = results["sweep"]
    for key, label, ours, base in (
        ("scoring", "12-point scoring sweep (prob_thd x logit_scale)", "sweep12_s", "one_eval_s"),
        ("method_key", "4-point trident cos_fac sweep", "sweep4_s", "four_separate_s"),
        ("derived_cache", "eval from pixels / derived cache", "from_pixels_s", "from_cache_s"),
    ):
        cmp = "<=" if key != "derived_cache" else ">="
        t.add_row(
            f"{label}, {sw['images']} images",
            f"{sw[ours]} s",
            f"{sw[base]} s",
            str(sw["ratios"][key]),
            f"{cmp} {sw['targets'][key]}",
            sw["met"][key],
        )
    lb = results["last_block"]
    t.add_row(
        "last-block baselines per image from the store (clip-b16, 375x500, 21 queries)",
        f"sclip {lb['sclip_s']} s, naclip {lb['naclip_s']} s (+ PAMR {lb['pamr_s']} s), "
        f"clearclip {lb['clearclip_s']} s (448 windows)",
        f"maskclip {lb['maskclip_s']} s",
        str(lb["ratio_sclip_to_maskclip"]),
        "",
    )
    d3 = results["dinov3_vs_dinov2"]
    m3, m2 = (d3["models"][m] for m in DINOV3_PAIR)
    t.add_row(
        f"{DINOV3_PAIR[0]} beside {DINOV3_PAIR[1]} ({m3['protocol']}, random weights)",
        f"{m3['mb_per_image']} MiB/image, {m3['extract_images_per_s']} img/s",
        f"{m2['mb_per_image']} MiB/image, {m2['extract_images_per_s']} img/s",
        f"bytes {d3['bytes_ratio']}, rate {d3['rate_ratio']}",
        "none (reported)",
    )
    for model, row in results["store_size_per_image"]["models"].items():
        t.add_row(
            f"store size {model}", f"{row['mb_per_image']} MiB/image", row["protocol"], "", ""
        )
    for row in results["prototype_index"]["results"]:
        t.add_row(
            f"PrototypeIndex {row['prototypes']} protos",
            f"{row['faiss']['seconds']} s (FAISS)",
            f"{row['torch']['seconds']} s (torch)",
            str(row["faiss_speedup"]),
            "auto picks the faster",
        )
    km = results["kmeans"]
    t.add_row(
        f"k-means {km['points']}x{km['dim']} k={km['k']}",
        f"{km['faiss']['seconds']} s (FAISS)",
        f"{km['torch']['seconds']} s (torch)",
        str(km["faiss_speedup"]),
        "",
    )
    for arch, row in results["align_throughput"]["archs"].items():
        t.add_row(f"align training ({arch})", f"{row['train_patches_per_s']} patches/s", "", "", "")
    results["table"] = t.rows
    Console().print(t.rich())
    Console().print(f"machine: {results['machine']}")
    path = OUT / "bench.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
