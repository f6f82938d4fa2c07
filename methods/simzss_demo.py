"""The SimZSS stage of ``ovss demo``: captions made from the collages' known classes, a tiny
text tower trained against the demo's cached (random-init) DINOv2 tokens, val segmentation.

Captions are deterministic: for every train collage, the classes it shows (largest area first,
underscores read as spaces) are put into several phrasings, e.g. "a picture of brick next to
some gravel", "gravel and brick", "a collage of brick, gravel and moon". The concept bank is
the shipped one plus the demo's class names (a concept file).

[demo choices, measured on the default demo, seed 0, random-init ViT-S/14, 8 classes, chance
12.5] ``global_token=patch_mean``: a random-init DINOv2 gives every image the same CLS token
(LayerScale 1e-5 leaves the blocks near identity; measured cosine 1.000 between all 32
collages), so the paper's global loss has nothing to align the EOT embeddings with and the class
embeddings stay meaningless (val mIoU 9.0 with ``cls``); the mean patch token carries the
collage's textures (val mIoU 44.5; 41.7 with λ = 0, so most of the signal is the global term on
these features). A 2-layer 64-wide tower, context 32, batches of 32 captions, peak lr 4e-3
(``lr`` 0.032 per 256; the paper's 3e-5 × 32/256 would barely move a tower trained from
scratch in 48 steps), 12 epochs, λ = 0.05 as the paper, one checkpoint at the end. Tower seeds
0 / 1 / 2: val mIoU 44.5 / 39.3 / 35.8 in 6-9 s of training on the shared 2-core machine. The
segmenter reads the same whole-image set (the collages are 224 px high).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: [demo choice] phrasings; ``{0}`` is the largest class, ``{1}`` the second, ``{all}`` all.
PHRASINGS = (
    "a picture of {0} next to some {1}",
    "{1} and {0}",
    "a collage of {all}",
    "a photo of {0} with {1}",
    "some {1} beside the {0}",
)

#: [demo choices, measured] the demo's SimZSS hyperparameters (see the module doc).
DEMO_SIMZSS = {
    "text_width": 64,
    "text_layers": 2,
    "text_heads": 4,
    "context_length": 32,
    "global_token": "patch_mean",
    "epochs": 12,
    "batch_size": 32,
    "lr": 2e-3 * 256 / 16,
    "save_every": 10**9,
}


def _spoken(name: str) -> str:
    return name.replace("_", " ")


def collage_captions(ds: Any, split: str = "train") -> list[dict[str, str]]:
    """``[{"image": id, "caption": text}]``: every phrasing for every collage of ``split``."""
    rows = []
    for iid in ds.ids(split):
        lab = np.asarray(Image.open(ds.label_path(split, iid)))
        counts = np.bincount(lab.ravel(), minlength=len(ds.class_names))
        present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
        names = [_spoken(ds.class_names[c]) for c in present]
        if len(names) < 2:
            names = names * 2
        everything = ", ".join(names[:-1]) + " and " + names[-1]
        for p in PHRASINGS:
            rows.append({"image": f"{split}/{iid}", "caption": p.format(*names, all=everything)})
    return rows


def run_simzss_stage(store_path: str, key: str, ds: Any, out: Path, seed: int, timings) -> dict:
    """Train on the train collages' captions, segment and score the val collages."""
    from featurestore.store import FeatureStore
    from featurestore.text import get_text_embeddings, parse_vocab
    from methods.evaluate import evaluate_store
    from methods.segment import vocab_from_text
    from methods.simzss import text_model_spec
    from methods.simzss_train import SimZSSTrainConfig, train_simzss
    from methods.train import TrainRequest

    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    store = FeatureStore.open(store_path)
    ids = set(store.image_ids)
    rows = [r for r in collage_captions(ds) if r["image"] in ids]
    if not rows:  # store ids without the split prefix
        rows = [{**r, "image": r["image"].split("/", 1)[1]} for r in collage_captions(ds)]
    caps = out / "captions.jsonl"
    caps.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    concepts = out / "concepts.txt"
    concepts.write_text("\n".join(_spoken(c) for c in ds.class_names) + "\n")
    cfg = SimZSSTrainConfig(
        captions=str(caps), concepts=str(concepts), model=key.split("@")[0], seed=seed,
        **DEMO_SIMZSS,
    )  # fmt: skip
    res = train_simzss(TrainRequest(store_path, cfg, features=key, out_dir=out, device="cpu"))
    timings["simzss train"] = time.perf_counter() - t
    t = time.perf_counter()
    fs = store.feature_set(key)
    proto = fs.protocol
    settings = {
        "checkpoint": res.checkpoint,
        "size": proto.size,
        "crop": proto.crop,
        "stride": proto.stride,
    }
    vocab = parse_vocab(",".join(_spoken(c) for c in ds.class_names) + ",")
    te = get_text_embeddings(store_path, text_model_spec(res.checkpoint), vocab, "single")
    v = vocab_from_text(te, source=vocab.describe())
    ev = evaluate_store(
        store_path, "custom", str(ds.root), "simzss", v, split="val", overrides=settings
    )
    timings["simzss segment + eval"] = time.perf_counter() - t
    from methods.demo import _eval_summary

    summary = _eval_summary(ev, v)
    summary["per_class_iou"] = {c: summary["per_class_iou"].get(_spoken(c)) for c in ds.class_names}
    return {
        "simzss_eval": summary,
        "simzss": {
            "checkpoint": res.checkpoint,
            "captions": len(rows),
            "config": dict(DEMO_SIMZSS),
            "loss_first_last": [res.history[0]["loss"], res.history[-1]["loss"]],
            "concept_acc": res.history[-1]["concept_acc"],
        },
    }
