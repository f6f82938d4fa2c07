"""The segmentation driver: method logits -> original-size labels -> files / metric.

``segment_store`` writes, per image, a label PNG (class indices), a colour overlay with a legend
and optionally per-class score maps; ``evaluate`` streams a benchmark split through the same path
into an ``IoUAccumulator`` (memory does not grow with the number of images).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from featurestore import __version__
from featurestore.errors import OvssError
from featurestore.store import STATUS_OK, FeatureStore
from methods.base import (
    ScoringConfig,
    Segmenter,
    Vocab,
    build_config,
    config_to_dict,
    get_method,
)

Progress = Callable[[str, int, int], None]


@dataclass
class SegmentationResult:
    index: int
    image_id: str
    labels: np.ndarray  # (H, W) int64 class indices at the original size
    max_prob: np.ndarray  # (H, W) float32


def build_segmenter(
    store: FeatureStore,
    method: str,
    dataset: str | None = None,
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Segmenter:
    """The configured method over a store (presets of ``dataset``, then ``overrides``)."""
    cls = get_method(method)
    return cls(store, build_config(cls, dataset, overrides), device=device)


def segment_image(seg: Segmenter, index: int, vocab: Vocab, scoring: ScoringConfig):
    """Labels of one image at its original size (METHODS.md §0.2 scoring)."""
    from methods.scoring import score_logits

    cos, _ = seg.cosine_logits(index, vocab)
    fs = next(iter(seg.sets.values()))
    h, w = (int(x) for x in fs.image_sizes[index])
    labels, max_prob = score_logits(
        cos.float(),
        (h, w),
        vocab.query_to_class,
        vocab.num_classes,
        logit_scale=scoring.logit_scale,
        prob_thd=scoring.prob_thd,
        area_thd=scoring.area_thd,
    )
    labels, max_prob = labels.numpy(), max_prob.numpy()
    refine = getattr(seg, "refine", None)  # optional second stage (Trident's SAM refinement)
    if refine is not None:
        labels, max_prob = refine(index, cos, labels, max_prob, vocab, scoring)
    return labels, max_prob, cos


def class_probabilities(cos: torch.Tensor, out_hw, vocab: Vocab, scoring: ScoringConfig):
    """Per-class probability maps ``(C, H, W)`` (softmax over all queries, max over synonyms)."""
    from methods.scoring import upsample_bilinear

    probs = torch.softmax(scoring.logit_scale * upsample_bilinear(cos.float(), out_hw), dim=0)
    out = torch.zeros((vocab.num_classes, *probs.shape[1:]))
    q2c = vocab.query_to_class.long()
    for c in range(vocab.num_classes):
        members = probs[q2c == c]
        if len(members):
            out[c] = members.amax(dim=0)
    return out


def iter_segmentations(
    seg: Segmenter,
    vocab: Vocab,
    scoring: ScoringConfig,
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, torch.Tensor]]:
    """``(index, labels, max_prob, cos)`` for every finished image (all feature sets done)."""
    ok = np.ones(seg.store.n_images, dtype=bool)
    for fs in seg.sets.values():
        ok &= fs.status() == STATUS_OK
    wanted = range(seg.store.n_images) if indices is None else indices
    for i in wanted:
        if ok[i]:
            labels, max_prob, cos = segment_image(seg, i, vocab, scoring)
            yield i, labels, max_prob, cos


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------


def save_label_png(labels: np.ndarray, palette: np.ndarray, path: Path) -> None:
    """Label indices as a palette PNG (values are the class indices; 255 stays 255)."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette[:256]
    im.putpalette(flat.reshape(-1).tolist())
    im.save(path)


def save_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    alpha: float = 0.5,
) -> None:
    """The image blended with the label colours, plus a legend of the classes present."""
    colours = palette[np.clip(labels, 0, len(palette) - 1)]
    blend = (image.astype(np.float32) * (1 - alpha) + colours * alpha).astype(np.uint8)
    present = [int(c) for c in np.unique(labels) if c < len(class_names)]
    row_h = 16
    legend_w = 12 + 7 * max([len(class_names[c]) for c in present] + [4])
    h = max(blend.shape[0], row_h * len(present) + 8)
    canvas = Image.new("RGB", (blend.shape[1] + legend_w, h), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = blend.shape[1] + 4
    for k, c in enumerate(present):
        y = 4 + k * row_h
        draw.rectangle([x0, y, x0 + 10, y + 10], fill=tuple(int(v) for v in palette[c]))
        draw.text((x0 + 14, y - 1), class_names[c], fill=(0, 0, 0))
    canvas.save(path)


@dataclass
class SegmentSummary:
    store: str
    method: str
    config: dict
    scoring: dict
    vocabulary: dict
    images: int
    out_dir: str | None
    seconds: float
    label_set: str | None = None
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def segment_store(
    store_path: str,
    method: str,
    vocab: Vocab,
    out_dir: str | None,
    dataset: str | None = None,
    overrides: dict[str, Any] | None = None,
    scoring: ScoringConfig | None = None,
    overlays: bool = True,
    score_maps: bool = False,
    indices: Sequence[int] | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    write_labels: str | None = None,
    overwrite_labels: bool = False,
) -> SegmentSummary:
    """Segment every finished image of a store, write the output files under ``out_dir`` and,
    with ``write_labels``, the label maps into the store as a label set of that name."""
    from featurestore.datasets import palette as dataset_palette
    from featurestore.images import load_image_rgb

    store = FeatureStore.open(store_path, mode="a" if write_labels else "r")
    seg = build_segmenter(store, method, dataset, overrides, device)
    scoring = scoring or ScoringConfig()
    label_set = None
    if write_labels:
        from featurestore.labelsets import create_label_set

        label_set = create_label_set(
            store,
            write_labels,
            {
                "class_names": vocab.class_names,
                "protocol": protocol_record(seg, scoring, vocab),
            },
            overwrite=overwrite_labels,
        )
    names = [syn[0] for syn in vocab.class_names]
    pal = dataset_palette(dataset or "custom", max(len(names), 1))
    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    paths = store.image_table()["path"]
    ids = store.image_ids
    total = len(indices) if indices is not None else store.n_images
    t0 = time.perf_counter()
    n = 0
    files: list[str] = []
    for i, labels, _max_prob, cos in iter_segmentations(seg, vocab, scoring, indices):
        n += 1
        if label_set is not None:
            label_set.write(i, labels)
        if out:
            stem = ids[i].replace("/", "__")
            save_label_png(labels, pal, out / f"{stem}.png")
            files.append(f"{stem}.png")
            if overlays:
                try:
                    img = load_image_rgb(str(paths[i]))
                    save_overlay(img, labels, pal, names, out / f"{stem}_overlay.png")
                except OvssError:
                    pass  # the image moved since extraction: labels are still written
            if score_maps:
                probs = class_probabilities(cos, labels.shape, vocab, scoring)
                np.save(out / f"{stem}_scores.npy", probs.numpy().astype(np.float16))
        if progress:
            progress(method, n, total)
    summary = SegmentSummary(
        store=store_path,
        method=method,
        config=config_to_dict(seg.config),
        scoring=dict(scoring.__dict__),
        vocabulary={"source": vocab.source, "templates": vocab.templates, "classes": names},
        images=n,
        out_dir=str(out) if out else None,
        seconds=round(time.perf_counter() - t0, 3),
        files=files,
        label_set=write_labels,
    )
    if out:
        (out / "segment.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return summary


def vocab_from_text(te, source: str = "") -> Vocab:
    """A ``Vocab`` from a cached text set (``featurestore.text.TextEmbeddings``)."""
    return Vocab(
        class_names=[list(c) for c in te.class_names],
        embeddings=torch.from_numpy(np.asarray(te.embeddings, dtype=np.float32)),
        query_to_class=torch.from_numpy(np.asarray(te.query_to_class, dtype=np.int64)),
        source=source or f"{te.key} ({te.weights})",
        templates=te.template_set,
    )


def protocol_record(seg: Segmenter, scoring: ScoringConfig, vocab: Vocab) -> dict:
    """Everything needed to reproduce a result (EVAL.md §7 item 9)."""
    backbones = {
        role: {
            "feature_set": fs.key,
            "model": fs.provenance["model"],
            "weights": fs.provenance["backbone"].get("weights"),
            "protocol": fs.provenance["protocol"],
        }
        for role, fs in seg.sets.items()
    }
    return {
        "method": seg.name,
        "config": config_to_dict(seg.config),
        "backbones": backbones,
        "scoring": dict(scoring.__dict__),
        "vocabulary": vocab.source,
        "templates": vocab.templates,
        "ovss_version": __version__,
    }


def records_from_paths(paths: Sequence[str]):
    """Image records for ``segment --images``: folders (recursive) and single files."""
    from featurestore.images import ImageRecord, list_folder_images

    records = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            records.extend(list_folder_images(path))
        elif path.is_file():
            records.append(ImageRecord(path.stem, str(path.resolve()), "file", ""))
        else:
            raise OvssError(f"no image or folder at {p}")
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise OvssError("two input images share a name; segment them in separate calls")
    if not records:
        raise OvssError("no images given")
    return records


def extract_for_method(
    records,
    store_path: str,
    method: str,
    dataset: str | None = None,
    overrides: dict[str, Any] | None = None,
    random_init: bool = False,
    seed: int = 0,
    arch_overrides: dict | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> None:
    """Extract exactly the feature sets a configured method requires (its ``requirements``),
    one ``extract`` pass per protocol, into ``store_path`` (resuming)."""
    from featurestore.extract import ExtractConfig, extract

    cls = get_method(method)
    config = build_config(cls, dataset, overrides)
    try:
        reqs = cls.requirements(config)
    except ValueError as e:
        raise OvssError(f"method {method}: {e}") from None
    groups: dict = {}
    for r in reqs:
        groups.setdefault(r.protocol, [])
        if r.model not in groups[r.protocol]:
            groups[r.protocol].append(r.model)
    for protocol, models in groups.items():
        cfg = ExtractConfig(
            models=models,
            protocol=protocol,
            store=store_path,
            random_init=random_init,
            seed=seed,
            arch_overrides=arch_overrides,
            device=device,
        )
        extract(records, cfg, progress=progress)
