"""PnP-OVSS benchmark: seconds per image of each stage on the CPU, tiny and full-size BLIP-L.

``python -m benchmarks.pnp_bench`` prints the result dict as JSON.

Setup: one random 375 x 500 image (a VOC-sized photo), the 20 VOC class names in the prompt,
random-init BLIP ITM of the real ``transformers`` classes: ``tiny`` (the demo's architecture,
``featurestore.backbones.blip.TINY``) and ``blip-l`` (the full ViT-L/16 + BERT-base of
``blip-itm-l``), input 336 x 336 (21 x 21 patches), 4 Saliency DropOut rounds, layer 8 / head
10 (2 / 2 for the tiny model). Random weights give the real FLOPs, not real maps.

Per model (best of ``BENCH_PNP_REPEATS``):

- ``encoder_s``: one image-encoder pass (what every round after the first costs; the first is
  read from the store when cached);
- ``cam_round_s``: one round's text-encoder forward + ITM backward to the cross-attention
  (``token_gradcam``);
- ``dropout_live_s`` / ``dropout_cached_s``: the 4 rounds without / with the cached first pass,
  and ``cache_saving``: their ratio;
- ``blur_s``: threshold + bilinear resize to 375 x 500 + Gaussian blur (σ = 0.05 x 500);
- ``crf_torch_s`` / ``crf_pydensecrf_s``: the CRF, the torch approximation vs pydensecrf2 (when
  installed), with the pixel agreement of their labels.

Environment knobs: BENCH_PNP_FULL (0 skips the full-size BLIP-L, default 1), BENCH_PNP_REPEATS
(default 2).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

VOC = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(best, 4)


def bench_model(arch: str, repeats: int = 2) -> dict:
    from featurestore.backbones.blip import TINY, load_blip, squash_pixels
    from methods.crf import CRFParams, have_pydensecrf
    from methods.pnp_ovss import (
        build_prompt,
        maps_to_labels,
        saliency_dropout,
        token_gradcam,
    )

    t = time.perf_counter()
    blip = load_blip(
        "blip-itm-l", random_init=True, arch_overrides=TINY if arch == "tiny" else None
    )
    blip.model.requires_grad_(False)
    build_s = round(time.perf_counter() - t, 2)
    layer, head = (1, 1) if arch == "tiny" else (7, 9)
    image = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    pixels = squash_pixels(image, 336)
    prompt = build_prompt(blip.tokenizer, VOC)
    first = blip.encode_image(pixels[None])
    out: dict = {
        "model": arch,
        "build_s": build_s,
        "prompt_tokens": int(prompt.input_ids.shape[1]),
        "encoder_s": _best(lambda: blip.encode_image(pixels[None]), repeats),
        "cam_round_s": _best(lambda: token_gradcam(blip, first, prompt, layer, head), repeats),
    }

    def rounds(cached: bool):
        return saliency_dropout(
            blip,
            pixels,
            prompt,
            layer=layer,
            head=head,
            rounds=4,
            rule="median",
            k=10,
            first_embeds=first if cached else None,
        )

    out["dropout_live_s"] = _best(lambda: rounds(False), repeats)
    out["dropout_cached_s"] = _best(lambda: rounds(True), repeats)
    out["cache_saving"] = round(out["dropout_live_s"] / out["dropout_cached_s"], 3)
    maps = rounds(True).maps
    params = CRFParams()

    def labels(backend: str):
        return maps_to_labels(
            maps, image, threshold=0.15, blur_sigma=0.05, crf_backend=backend, crf_params=params
        )

    out["blur_s"] = _best(lambda: labels("none"), repeats)
    torch_labels, _ = labels("torch")
    out["crf_torch_s"] = round(_best(lambda: labels("torch"), repeats) - out["blur_s"], 4)
    if have_pydensecrf():
        ref, _ = labels("pydensecrf")
        out["crf_pydensecrf_s"] = round(
            _best(lambda: labels("pydensecrf"), repeats) - out["blur_s"], 4
        )
        out["crf_label_agreement"] = round(float((ref == torch_labels).mean()), 4)
    else:
        out["crf_pydensecrf_s"] = None
    out["s_per_image_cached"] = round(
        out["dropout_cached_s"] + out["blur_s"] + out["crf_torch_s"], 3
    )
    return out


def bench_pnp(_tmp=None) -> dict:
    repeats = int(os.environ.get("BENCH_PNP_REPEATS", "2"))
    models = ["tiny"] + (["blip-l"] if os.environ.get("BENCH_PNP_FULL", "1") != "0" else [])
    return {
        "threads": torch.get_num_threads(),
        "image": [375, 500],
        "rounds": 4,
        "classes": len(VOC),
        "models": {m: bench_model(m, repeats) for m in models},
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(bench_pnp(), indent=2))
