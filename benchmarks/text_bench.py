"""Text embedding: CLIP-B/16's text tower, full context vs truncated per batch, side by side.

The prompts are ADE20K's 150 class names (SCLIP's file) x the 80 OpenAI templates (12,000
prompts), on a full-size random-init ``clip-b16`` text tower, batches of 256 (the default):

* full context: ``ClipTextEncoder(truncate=False)``: every prompt on all 77 positions through
  ``model.encode_text`` (what open_clip does by itself);
* truncated: prompts sorted by token length, each batch cut to its longest prompt.

On 2 CPU cores the full-context side of all 12,000 prompts takes ~12 minutes, so it times a
fixed subset (every k-th prompt, ``BENCH_TEXT_PROMPTS``, default 512 = two full batches) and is
scaled to 12,000: its cost per prompt does not depend on the prompt (always 77 positions, the
same batch shape), so the scaling is exact up to timing noise. The truncated side runs all
12,000 prompts (its cost does depend on the lengths and on how they batch). The ratio is
full (scaled) / truncated (measured); ``subset_ratio`` is both sides on the subset alone (one
length-sorted batch per 256 prompts of mixed lengths: a lower bound). max |diff| compares the
two sides' outputs on the subset. ``BENCH_TEXT_PROMPTS=0`` times all 12,000 on both sides.

Run alone: ``python -m benchmarks.text_bench``.
"""

from __future__ import annotations

import json
import os
import time

import torch

TARGET = 6.0  # speed-up the truncated path must reach (same prompts, same machine)
TOLERANCE = 1e-5  # max |embedding difference| allowed (unnormalised encode_text outputs)


def _prompts() -> list[str]:
    from featurestore.text import get_templates, parse_vocab

    vocab = parse_vocab("ade20k")
    return [t.format(q) for q in vocab.queries for t in get_templates("openai80")]


def bench_text(_tmp=None) -> dict:
    from featurestore.text import create_text_encoder

    prompts = _prompts()
    n_sub = int(os.environ.get("BENCH_TEXT_PROMPTS", "512"))
    batch = int(os.environ.get("BENCH_TEXT_BATCH", "256"))
    if 0 < n_sub < len(prompts):
        idx = list(range(0, len(prompts), len(prompts) // n_sub))[:n_sub]
    else:
        idx = list(range(len(prompts)))
    subset = [prompts[i] for i in idx]
    enc = create_text_encoder("clip-b16", random_init=True)
    enc.encode(subset[:8], batch_size=8)  # warm-up (and the one-off exactness probe)

    def run(truncate: bool, texts: list[str]) -> tuple[float, torch.Tensor]:
        enc.truncate = truncate
        t = time.perf_counter()
        out = enc.encode(texts, batch_size=batch)
        return time.perf_counter() - t, out

    full_sub_s, full = run(False, subset)
    fast_sub_s, fast_sub = run(True, subset)
    if len(subset) == len(prompts):
        fast_all_s, fast_all = fast_sub_s, fast_sub
    else:
        fast_all_s, fast_all = run(True, prompts)
    full_all_s = full_sub_s * len(prompts) / len(subset)
    max_abs = max(float((full - fast_sub).abs().max()), float((full - fast_all[idx]).abs().max()))
    ratio = full_all_s / fast_all_s
    row = {
        "model": "clip-b16 (random init, full size)",
        "prompts": len(prompts),
        "batch_size": batch,
        "full_context_prompts_timed": len(subset),
        "full_context_timing": "all prompts"
        if len(subset) == len(prompts)
        else f"1 prompt in {len(prompts) // n_sub} ({len(subset)}), scaled to {len(prompts)}",
        "full_context_s": round(full_all_s, 1),
        "full_context_subset_s": round(full_sub_s, 2),
        "truncated_s": round(fast_all_s, 2),
        "truncated_subset_s": round(fast_sub_s, 2),
        "ratio": round(ratio, 2),
        "subset_ratio": round(full_sub_s / fast_sub_s, 2),
        "target": TARGET,
        "max_abs_diff": max_abs,
        "max_abs_value": round(float(full.abs().max()), 3),
        "tolerance": TOLERANCE,
        "met": bool(ratio >= TARGET and max_abs <= TOLERANCE),
        "context": enc.context_mode(),
        "threads": torch.get_num_threads(),
    }
    return row


def main() -> None:
    print(json.dumps(bench_text(), indent=2))


if __name__ == "__main__":
    main()
