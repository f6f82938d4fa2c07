"""``make bench-gpu``: the GPU figures in under 5 minutes on one GPU, beside the CPU bench's ratios.

``python -m benchmarks.gpu_check [--images N] [--smoke] [--bench-json PATH]`` prints a table and
writes ``bench_out/gpu_check.json``:

- extraction images/s through ``featurestore.extract.extract`` on ``cuda`` (fp16 autocast, the
  ``auto`` precision; batch 8; random-init weights, the real classes) for DINOv2-L/14 at 448
  (short side), CLIP-B/16 windows (short 448, crop 336, stride 224) and SAM-B (long side 1024),
  each after a 2-image warm-up run (model build, kernel selection), on ``--images`` synthetic
  JPEGs (default 32);
- text embedding prompts/s on ``cuda`` (``featurestore.text.embed_vocabulary``, CLIP-B/16's
  text tower, random-init, float32): ADE20K's 150 classes x the 80 OpenAI templates (12,000
  prompts, length-sorted batches of 256 truncated to their longest prompt), after a warm-up
  call on one class;
- Trident seconds per image from the store (``methods.evaluate.evaluate_store`` on ``cuda``:
  CLIP-B/16 + DINO-B/16 windows, SAM-B's 64 x 64 grid affinity, scoring) on ``--images // 4``
  collages (at least 2) of 448 x 448, best of 2 calls;
- the CPU bench's rows (ratio, target, met) from ``bench_out/bench.json`` (``make bench``), when
  that file exists.

Without CUDA it refuses with one line and exit status 2, unless ``--smoke``: the same code path on
the CPU with tiny random-init architectures and 2 images (a dry run that proves the script runs;
its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

#: Wall-clock budget of a full run on one GPU (seconds), checked and reported.
BUDGET_S = 300

EXTRACTION = (
    ("DINOv2-L/14 at 448", "dinov2-l14", {"resize": "short", "size": 448}),
    (
        "CLIP-B/16 windows (448, crop 336, stride 224)",
        "clip-b16",
        {"resize": "short", "size": 448, "crop": 336, "stride": 224},
    ),
    ("SAM-B at 1024", "sam-b", {"resize": "long", "size": 1024}),
)


def _extraction(tmp: Path, n: int, device: str, smoke: bool) -> list[dict]:
    from benchmarks.run import write_images
    from featurestore.backbones.base import tiny_arch_overrides
    from featurestore.extract import ExtractConfig, extract
    from featurestore.protocol import Protocol

    records = write_images(tmp / "images", n)
    rows = []
    for label, model, proto in EXTRACTION:
        protocol = Protocol(**proto)
        if smoke and model == "sam-b":
            protocol = Protocol(resize="long", size=256)  # the tiny SAM's input side

        def run(recs, name, model=model, protocol=protocol):
            cfg = ExtractConfig(
                models=[model],
                protocol=protocol,
                store=str(tmp / name),
                random_init=True,
                batch_size=8,
                device=device,
                arch_overrides=tiny_arch_overrides(model) if smoke else None,
            )
            shutil.rmtree(tmp / name, ignore_errors=True)
            _sync(device)
            t = time.perf_counter()
            extract(recs, cfg)
            _sync(device)
            return time.perf_counter() - t

        run(records[:2], "warmup.zarr")
        seconds = run(records, "ext.zarr")
        rows.append(
            {
                "what": f"extract {label}",
                "model": model,
                "protocol": protocol.key(),
                "images": n,
                "images_per_s": round(n / seconds, 2),
            }
        )
        shutil.rmtree(tmp / "ext.zarr", ignore_errors=True)
    return rows


def _trident(tmp: Path, n: int, device: str, smoke: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from featurestore.datasets import list_dataset_images
    from featurestore.demo_data import build_collage_dataset
    from featurestore.extract import ExtractConfig, extract
    from methods.base import Vocab, build_config, get_method
    from methods.demo import TRIDENT_TINY
    from methods.evaluate import evaluate_store

    ds = build_collage_dataset(tmp / "trident_data", n_train=1, n_val=n, size=(448, 448))
    records = list_dataset_images("custom", ds.root, "val")
    settings = {"sam_size": 256} if smoke else {}
    cls = get_method("trident")
    config = build_config(cls, "custom", settings)
    store = tmp / "trident.zarr"
    for req in cls.requirements(config):
        tiny = smoke and req.model in TRIDENT_TINY
        extract(
            records,
            ExtractConfig(
                models=[req.model],
                protocol=req.protocol,
                store=str(store),
                random_init=True,
                batch_size=8,
                device=device,
                arch_overrides=TRIDENT_TINY[req.model] if tiny else None,
            ),
        )
    dim = 32 if smoke else 512  # CLIP-B/16's text width (the tiny CLIP's when smoke)
    g = torch.Generator().manual_seed(0)
    vocab = Vocab(
        class_names=[[c] for c in ds.class_names],
        embeddings=F.normalize(torch.randn(len(ds.class_names), dim, generator=g), dim=-1),
        query_to_class=torch.arange(len(ds.class_names)),
        source="random unit vectors (gpu_check)",
    )
    per_image = []
    for _ in range(2):
        res = evaluate_store(
            str(store), "custom", str(ds.root), "trident", vocab, overrides=settings, device=device
        )
        if res.images != n:
            raise RuntimeError(f"trident scored {res.images} of {n} images: {res.skipped}")
        per_image.append(res.seconds / n)
    return {
        "what": "trident eval from the store",
        "images": n,
        "s_per_image": round(min(per_image), 4),
    }


def _text(device: str, smoke: bool) -> dict:
    from featurestore.backbones.base import tiny_arch_overrides
    from featurestore.text import embed_vocabulary, get_templates, parse_vocab
    from featurestore.text_encoders import create_text_encoder

    vocab = parse_vocab("ade20k")
    templates = get_templates("clip7" if smoke else "openai80")
    if smoke:
        vocab = parse_vocab([q[0] for q in vocab.class_names[:8]])
    encoder = create_text_encoder(
        "clip-b16",
        random_init=True,
        arch_overrides=tiny_arch_overrides("clip-b16") if smoke else None,
        device=device,
    )
    embed_vocabulary(encoder, None, parse_vocab(vocab.class_names[:1]), templates)  # warm-up
    n = len(vocab.queries) * len(templates)
    _sync(device)
    t = time.perf_counter()
    embed_vocabulary(encoder, None, vocab, templates)
    _sync(device)
    seconds = time.perf_counter() - t
    return {
        "what": "text embedding CLIP-B/16 (ADE20K x openai80)",
        "prompts": n,
        "prompts_per_s": round(n / seconds, 1),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _cpu_rows(path: Path) -> list[dict] | None:
    if not path.exists():
        return None
    table = json.loads(path.read_text()).get("table") or []
    return [{k: row.get(k, "") for k in ("benchmark", "ratio", "target", "met")} for row in table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    parser.add_argument("--images", type=int, default=32, help="extraction images (default 32)")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run with tiny models")
    parser.add_argument(
        "--bench-json",
        default=os.path.join(os.environ.get("BENCH_OUT", "bench_out"), "bench.json"),
        help="the CPU bench's JSON (default bench_out/bench.json)",
    )
    args = parser.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
            "machine, or pass --smoke for a CPU dry run of the same code path",
            file=sys.stderr,
        )
        return 2
    device = "cpu" if args.smoke else "cuda"
    n = 2 if args.smoke else max(2, args.images)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ovss-gpu-check-"))
    try:
        rows = _extraction(tmp, n, device, args.smoke)
        rows.append(_trident(tmp, 2 if args.smoke else max(2, n // 4), device, args.smoke))
        rows.append(_text(device, args.smoke))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - start
    out = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
        "smoke": args.smoke,
        "rows": rows,
        "wall_s": round(wall, 1),
        "budget_s": BUDGET_S,
        "within_budget": wall <= BUDGET_S,
        "cpu_bench": _cpu_rows(Path(args.bench_json)),
    }
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ovss GPU check on {out['device']} ({out['wall_s']} s of {BUDGET_S} s)")
    for c in ("figure", "value"):
        t.add_column(c)
    for row in rows:
        if "images_per_s" in row:
            t.add_row(row["what"], f"{row['images_per_s']} img/s")
        elif "prompts_per_s" in row:
            t.add_row(row["what"], f"{row['prompts_per_s']} prompts/s")
        else:
            t.add_row(row["what"], f"{row['s_per_image']} s/image")
    Console().print(t)
    if out["cpu_bench"] is None:
        print(f"no CPU bench results at {args.bench_json} (run `make bench` first)")
    else:
        c = Table(title=f"CPU bench ratios ({args.bench_json})")
        for col in ("benchmark", "ratio", "target", "met"):
            c.add_column(col)
        for row in out["cpu_bench"]:
            c.add_row(*(str(row[k]) for k in ("benchmark", "ratio", "target", "met")))
        Console().print(c)
    dest = Path(os.environ.get("BENCH_OUT", "bench_out"))
    dest.mkdir(exist_ok=True)
    (dest / "gpu_check.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {dest / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
