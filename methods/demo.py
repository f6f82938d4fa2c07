"""``ovss demo``: the embedded default benchmark, end to end on a fresh machine, offline, on CPU.

Stages: build the Voronoi-collage benchmark (scikit-image photographs, known labels) ->
extract DINOv2 ViT-S/14 features (random-init real architecture unless weights are given) ->
cluster (per-image k-means masks; a store-level codebook scored with Hungarian-matched mIoU on
the val split) -> embed the class names with a CLIP text tower -> align the DINOv2 features to
the text space on the train split (its known labels stand in for FMbSeg's Stage-1
pseudo-labels, which random-init CLIP/SAM cannot produce) -> segment the val split with the
aligned model (label PNGs + overlays) -> evaluate with the benchmark metric -> SimZSS: a tiny
text tower trained on captions made from the train collages' classes against the same cached
tokens, val segmentation and score (``methods.simzss_demo``). ``with_maskclip``
also extracts CLIP ViT-B/16 and runs ``maskclip``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from featurestore.backbones import tiny_arch_overrides
from featurestore.datasets import list_dataset_images
from featurestore.demo_data import build_collage_dataset
from featurestore.extract import ExtractConfig, extract
from featurestore.inspect import store_info
from featurestore.protocol import Protocol
from methods.fmbseg import AlignConfig

#: The demo's protocols: collages are 224 px high, so the shorter side stays as is.
DEMO_PROTOCOL = Protocol(resize="short", size=224)
#: CLIP windows for the maskclip stage (224 px crops, stride 112: two windows per collage).
DEMO_CLIP_PROTOCOL = Protocol(resize="short", size=224, crop=224, stride=112)
DEMO_CLIP = "clip-b16"
#: One template keeps the random-init text tower's work small [demo choice].
DEMO_TEMPLATES = "single"
#: [demo choice, measured] FMbSeg's TSupCon loss (tau 0.1) on an MLP module, one image per step
#: and 8 labelled patches sampled per image, lr 0.5, 40 epochs: ~49 val mIoU (chance 12.5) on
#: random-init ViT-S/14 features in ~4 s on 2 cores. The `ovss align` default (block module,
#: all ~1,700 patches of 5 images per step, lr 0.01) stays near chance here: in Eq. 1 every
#: patch-to-patch term weighs as much as a patch-to-text term, so with n patches >> K text
#: vectors the text anchors barely move the loss on features without semantics; sampling 8
#: patches per image keeps the text terms a sizeable share. (The prototype-only loss on a linear
#: module reaches ~35.) `ovss align` keeps the paper-style defaults.
DEMO_ALIGN = AlignConfig(
    arch="mlp", loss="tsupcon", lr=0.5, epochs=40, batch_images=1, max_patches_per_image=8
)


def run_demo(
    out: str | Path,
    *,
    model: str = "dinov2-s14",
    weights: str | None = None,
    seed: int = 0,
    n_train: int = 24,
    n_val: int = 8,
    progress=None,
    with_maskclip: bool = False,
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

    key = f"{model}@{DEMO_PROTOCOL.key()}"
    stages = _cluster(store_path, key, ds, seed, progress, timings)
    stages.update(_align_segment_eval(store_path, key, ds, out, seed, progress, timings))
    # SimZSS: a tiny text tower trained on captions made from the train collages' classes
    from methods.simzss_demo import run_simzss_stage

    stages.update(run_simzss_stage(store_path, key, ds, out / "simzss", seed, timings))
    if with_maskclip:
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
        stages.update(_maskclip(store_path, ds, out, seed, progress, timings))
    # Trident's tiny models live in their own store: its text set (a tiny CLIP text tower) would
    # clash with the main store's full-size one under the same model name.
    stages.update(_trident(str(out / "trident.zarr"), records, ds, out, seed, progress, timings))
    stages.update(_pnp_ovss(str(out / "pnp.zarr"), ds, out, seed, progress, timings))
    stages.update(
        _pixelclip(
            store_path, stages["cluster"]["per_image_masks"], ds, out, seed, progress, timings
        )
    )
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
        "stages": stages,
        "note": (
            "random-init weights: the features carry texture statistics only; "
            "pass --weights for a real checkpoint"
            if weights is None
            else ""
        ),
    }


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run a block with one torch thread, then restore the count.

    The demo's alignment takes ~1,000 steps on 8 patches each. Steps that small spend their
    time in OpenMP synchronisation: on a machine busy with other work, 2 threads took 47.7 s
    against 6.1 s with one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _demo_vocab(store_path, ds, seed: int, timings):
    from featurestore.text import get_text_embeddings, parse_vocab
    from methods.segment import vocab_from_text

    t = time.perf_counter()
    vocab = parse_vocab("custom", data_root=ds.root)
    te = get_text_embeddings(
        store_path, DEMO_CLIP, vocab, DEMO_TEMPLATES, random_init=True, seed=seed
    )
    timings.setdefault("embed classes", time.perf_counter() - t)
    return vocab_from_text(te, source=vocab.describe())


def _segment_and_eval(store_path, method: str, v, ds, out_dir: Path, overrides, progress):
    """Segment the val collages with ``method`` (label PNGs + overlays in ``out_dir``), then
    score them; returns ``(SegmentSummary, EvalResult)``."""
    from methods.evaluate import evaluate_store
    from methods.segment import segment_store

    val = list(range(ds.n_train, ds.n_train + ds.n_val))
    seg = segment_store(
        store_path,
        method,
        v,
        str(out_dir),
        dataset="custom",
        overrides=overrides,
        indices=val,
        progress=progress,
    )
    res = evaluate_store(
        store_path, "custom", str(ds.root), method, v, split="val", overrides=overrides
    )
    return seg, res


def _eval_summary(res, v) -> dict:
    return {
        "mIoU": res.metrics["mIoU"],
        "mAcc": res.metrics["mAcc"],
        "aAcc": res.metrics["aAcc"],
        "images": res.images,
        "chance_mIoU": round(100 / len(v.class_names), 2),
        # percent, like mIoU (None: a class absent from both prediction and labels)
        "per_class_iou": {
            name: None if iou is None else round(100 * iou, 2)
            for name, iou in zip(res.class_names, res.metrics["per_class"]["iou"], strict=True)
        },
    }


def _cluster(store_path, key: str, ds, seed: int, progress, timings) -> dict:
    """Per-image k-means masks (k=16) and a codebook (k = number of classes) over the val
    collages, scored with Hungarian matching."""
    from methods.cluster import cluster_per_image, cluster_store

    t = time.perf_counter()
    per_image = cluster_per_image(store_path, key, k=16, seed=seed, progress=progress)
    val = list(range(ds.n_train, ds.n_train + ds.n_val))
    book = cluster_store(
        store_path,
        key,
        k=len(ds.class_names),
        seed=seed,
        indices=val,
        eval_dataset=("custom", str(ds.root), "val"),
        overwrite=True,
    )
    timings["cluster"] = time.perf_counter() - t
    return {
        "cluster": {
            "per_image_masks": per_image.label_set,
            "codebook_k": book.k,
            "hungarian": book.eval,
        }
    }


def _align_segment_eval(store_path, key: str, ds, out: Path, seed: int, progress, timings) -> dict:
    """Align DINOv2 patches to the class embeddings on train, segment + score val."""
    from featurestore.store import FeatureStore
    from methods.evaluate import evaluate_store
    from methods.fmbseg import DatasetLabelSource, train_alignment
    from methods.segment import segment_store

    v = _demo_vocab(store_path, ds, seed, timings)
    t = time.perf_counter()
    labels = DatasetLabelSource(FeatureStore.open(store_path), "custom", str(ds.root), "train")
    with one_torch_thread():
        ckpt = train_alignment(
            store_path,
            key,
            labels,
            v,
            DEMO_ALIGN,
            out_dir=out / "align",
            resume=False,
        )
    timings["align"] = time.perf_counter() - t
    settings = {"checkpoint": str(ckpt)}
    val = list(range(ds.n_train, ds.n_train + ds.n_val))
    t = time.perf_counter()
    seg = segment_store(
        store_path,
        "aligned",
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
        store_path, "custom", str(ds.root), "aligned", v, split="val", overrides=settings
    )
    timings["eval"] = time.perf_counter() - t
    return {
        "align": {"checkpoint": str(ckpt), "config": dict(DEMO_ALIGN.__dict__)},
        "segment": {"images": seg.images, "out_dir": seg.out_dir},
        "eval": _eval_summary(res, v),
    }


#: Trident in the demo: tiny random-init CLIP / DINO / SAM of the real classes (the full-size
#: SAM-B encoder takes 12-19 s per image on a CPU). Numbers are meaningless; the pipeline is
#: the real one (canvas on the CLIP patch grid, proxy attention, SAM affinity, refinement).
TRIDENT_TINY = {
    "clip-b16": {
        "embed_dim": 32,
        "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
        "text_cfg": {"layers": 2, "width": 64, "heads": 2},
    },
    "dino-b16": {"depth": 2, "embed_dim": 64, "num_heads": 2},
    "sam-b": tiny_arch_overrides("sam-b"),
}
TRIDENT_SETTINGS = {"size": 224, "crop": 224, "stride": 112, "sam_size": 256, "sam_refine": True}


def _trident(store_path, records, ds, out: Path, seed: int, progress, timings) -> dict:
    """Trident (splice-then-segment + SAM affinity + SAM refinement) on the val collages."""
    from featurestore.text import get_text_embeddings, parse_vocab
    from methods.base import build_config, get_method
    from methods.segment import vocab_from_text

    t = time.perf_counter()
    cls = get_method("trident")
    config = build_config(cls, None, TRIDENT_SETTINGS)
    for req in cls.requirements(config):
        cfg = ExtractConfig(
            models=[req.model],
            protocol=req.protocol,
            store=store_path,
            random_init=True,
            seed=seed,
            batch_size=8,
            arch_overrides=TRIDENT_TINY[req.model],
        )
        extract(records, cfg, progress=progress)
    vocab = parse_vocab("custom", data_root=ds.root)
    te = get_text_embeddings(
        store_path,
        "clip-b16",
        vocab,
        DEMO_TEMPLATES,
        random_init=True,
        seed=seed,
        arch_overrides=TRIDENT_TINY["clip-b16"],
    )
    v = vocab_from_text(te, source=vocab.describe())
    timings["trident extract (tiny models)"] = time.perf_counter() - t
    t = time.perf_counter()
    _, res = _segment_and_eval(
        store_path, "trident", v, ds, out / "segment_trident", TRIDENT_SETTINGS, progress
    )
    timings["trident segment + eval"] = time.perf_counter() - t
    return {"trident_eval": _eval_summary(res, v)}


#: PnP-OVSS in the demo: a tiny random-init BLIP ITM (the real transformers classes, 64 px
#: input: 4 x 4 patches) and the tiny CLIP of Trident, two val collages, the torch CRF (the
#: pydensecrf2 package is optional). Numbers meaningless; the pipeline is the real one.
PNP_SETTINGS = {
    "size": 64,
    "layer": 2,
    "head": 2,
    "rounds": 2,
    "crf": "torch",
    "crf_max_side": 48,
}


def _pnp_ovss(store_path, ds, out: Path, seed: int, progress, timings) -> dict:
    """PnP-OVSS (BLIP GradCAM + Saliency DropOut + blur + CRF) and a 2-trial ``ovss tune``."""
    from featurestore.backbones.blip import TINY as BLIP_TINY
    from featurestore.text import get_text_embeddings, parse_vocab
    from methods.base import build_config, get_method
    from methods.evaluate import evaluate_store
    from methods.segment import segment_store, vocab_from_text
    from methods.tune import TuneRequest, tune

    t = time.perf_counter()
    val = list_dataset_images("custom", ds.root, "val")[:2]
    cls = get_method("pnp-ovss")
    (req,) = cls.requirements(build_config(cls, None, PNP_SETTINGS))
    cfg = ExtractConfig(
        models=[req.model],
        protocol=req.cached.protocol,
        store=store_path,
        random_init=True,
        seed=seed,
        arch_overrides=BLIP_TINY,
    )
    extract(val, cfg, progress=progress)
    vocab = parse_vocab("custom", data_root=ds.root)
    tiny_clip = TRIDENT_TINY["clip-b16"]
    te = get_text_embeddings(
        store_path,
        "clip-b16",
        vocab,
        "single",
        random_init=True,
        seed=seed,
        arch_overrides=tiny_clip,
    )
    v = vocab_from_text(te, source=vocab.describe())
    seg = segment_store(
        store_path,
        "pnp-ovss",
        v,
        str(out / "segment_pnp_ovss"),
        dataset="custom",
        overrides=PNP_SETTINGS,
        progress=progress,
    )
    res = evaluate_store(
        store_path, "custom", str(ds.root), "pnp-ovss", v, split="val", overrides=PNP_SETTINGS
    )
    timings["pnp-ovss extract + segment + eval (tiny BLIP)"] = time.perf_counter() - t
    t = time.perf_counter()
    tuned = tune(
        TuneRequest(
            store=store_path,
            vocab_spec="custom",
            settings=PNP_SETTINGS,
            trials=2,
            sample=2,
            layers=(2,),  # one (layer, head): its maps are computed once for both trials
            heads=(2,),
            seed=seed,
            clip_model="clip-b16",
            random_init=True,
            clip_seed=seed,
            clip_arch_overrides=tiny_clip,
            data_root=str(ds.root),
            log=str(out / "tune_pnp_ovss.jsonl"),
            out=str(out / "tune_pnp_ovss_best.json"),
        ),
        progress,
    )
    timings["pnp-ovss tune (2 trials)"] = time.perf_counter() - t
    return {
        "pnp_ovss_eval": _eval_summary(res, v),
        "pnp_ovss": {"crf_backend": seg.live_model.get("crf_backend"), "out_dir": seg.out_dir},
        "pnp_ovss_tune": {"best": tuned.best, "config": tuned.out},
    }


def _maskclip(store_path, ds, out: Path, seed: int, progress, timings) -> dict:
    """Segment the val collages with maskclip on the CLIP features, score them."""

    v = _demo_vocab(store_path, ds, seed, timings)
    settings = {
        "size": DEMO_CLIP_PROTOCOL.size,
        "crop": DEMO_CLIP_PROTOCOL.crop,
        "stride": DEMO_CLIP_PROTOCOL.stride,
    }
    t = time.perf_counter()
    _, res = _segment_and_eval(
        store_path, "maskclip", v, ds, out / "segment_maskclip", settings, progress
    )
    timings["maskclip segment + eval"] = time.perf_counter() - t
    return {"maskclip_eval": _eval_summary(res, v)}


#: [demo choice] PixelCLIP on a tiny random-init CLIP, on pixels (all blocks trained), with the
#: demo's per-image k-means masks: 96 px inputs, 48 px masks, 8 learnable classes, 4 images per
#: step, 40 steps; no augmentation (each image decoded, squashed and its masks resized once,
#: not per step), a 16-wide decoder (the authors' is 64) and lr 1e-3 -> 5e-4 so the smaller
#: decoder learns in 40 steps. Measured (2 threads, idle machine): 1.1 s for the 40 steps
#: (loss 0.725 -> 0.384, mean of the first / last 10 %: 0.66 / 0.39), against 2.9 s with
#: augmentations and the 64-wide decoder at lr 2e-4 (0.75 -> 0.38); a loaded shared machine
#: stretches both 5-10x.
DEMO_PIXELCLIP = {
    "random_init": True,
    "clip_arch": '{"embed_dim": 32, "vision_cfg": {"layers": 2, "width": 64, "heads": 2}, '
    '"text_cfg": {"layers": 2, "width": 64, "heads": 2}}',
    "size": 96,
    "mask_size": 48,
    "num_classes": 8,
    "batch_size": 4,
    "iterations": 40,
    "augment": False,
    "decoder_width": 16,
    "lr": 1e-3,
    "min_lr": 5e-4,
    "save_every": 0,
}


def _pixelclip(store_path, mask_set: str, ds, out: Path, seed: int, progress, timings) -> dict:
    """PixelCLIP: a tiny random-init CLIP fine-tuned on the train collages with the DINO k-means
    masks, then val segmented with its fine-tuned dense features. With random weights the val
    mIoU is near chance; the loss curve shows the pipeline learning its own mask targets."""
    from featurestore.text import get_text_embeddings, parse_vocab
    from methods.evaluate import evaluate_store
    from methods.pixelclip import text_model_spec
    from methods.pixelclip_train import PixelCLIPTrainer
    from methods.segment import vocab_from_text
    from methods.train import TrainRequest

    t = time.perf_counter()
    cfg = PixelCLIPTrainer.build_config(
        None, {**DEMO_PIXELCLIP, "mask_set": mask_set, "seed": seed, "init_seed": seed}
    )
    res = PixelCLIPTrainer().fit(
        TrainRequest(store=store_path, config=cfg, out_dir=out / "pixelclip", device="cpu"),
        None,
    )
    timings["pixelclip train (tiny CLIP, 40 steps)"] = time.perf_counter() - t
    t = time.perf_counter()
    vocab = parse_vocab("custom", data_root=ds.root)
    te = get_text_embeddings(store_path, text_model_spec(res.checkpoint), vocab, "pixelclip8")
    v = vocab_from_text(te, source=vocab.describe())
    ev = evaluate_store(
        store_path,
        "custom",
        str(ds.root),
        "pixelclip",
        v,
        split="val",
        overrides={"checkpoint": res.checkpoint, "size": DEMO_PIXELCLIP["size"]},
    )
    timings["pixelclip eval"] = time.perf_counter() - t
    losses = res.summary["losses"]
    tenth = max(len(losses) // 10, 1)
    return {
        "pixelclip": {
            "checkpoint": res.checkpoint,
            "train_images": res.summary["train_images"],
            "skipped_images": res.summary["skipped_images"],
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "loss_first_10pct_mean": sum(losses[:tenth]) / tenth,
            "loss_last_10pct_mean": sum(losses[-tenth:]) / tenth,
            "note": "random-init CLIP: the val mIoU is expected near chance; the pipeline is real",
        },
        "pixelclip_eval": _eval_summary(ev, v),
    }
