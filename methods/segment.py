"""The segmentation driver: method logits -> original-size labels -> files / metric.

``segment_store`` writes, per image, a label PNG (class indices), a colour overlay with a legend
and optionally per-class score maps; ``evaluate`` streams a benchmark split through the same path
into an ``IoUAccumulator`` (memory does not grow with the number of images).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurestore import __version__
from featurestore.errors import NonFiniteFeaturesError, OvssError
from featurestore.names import redact_url
from methods.base import (
    ScoringConfig,
    Segmenter,
    Vocab,
    build_config,
    config_to_dict,
    get_method,
)
from methods.overlay import (  # save_label_png / save_overlay: re-exported for callers
    OverlayStyle,
    ground_truth_lookup,
    save_comparison,
    save_label_png,
    save_overlay,
)

if TYPE_CHECKING:  # torch and zarr are imported where they run: ``ovss eval --predictions``
    import torch  # needs neither

    from featurestore.store import FeatureStore

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

    own = getattr(seg, "segment_labels", None)  # a method that labels pixels itself (pnp-ovss)
    if own is not None:
        return own(index, vocab, scoring)  # (labels, max_prob, scores), or None: skipped
    from methods.pamr import refine_cosine

    cos, _ = seg.cosine_logits(index, vocab)
    fs = next(iter(seg.sets.values()))
    h, w = (int(x) for x in fs.image_sizes[index])
    # PAMR and the scoring run on the method's device (a no-op on the CPU).
    cos = cos.to(seg.device)
    cos = refine_cosine(seg, index, cos, (h, w))  # PAMR at (h, w) when the config turns it on
    labels, max_prob = score_logits(
        cos.float(),
        (h, w),
        vocab.query_to_class,
        vocab.num_classes,
        logit_scale=scoring.logit_scale,
        prob_thd=scoring.prob_thd,
        area_thd=scoring.area_thd,
    )
    labels, max_prob = labels.cpu().numpy(), max_prob.cpu().numpy()
    refine = getattr(seg, "refine", None)  # optional second stage (Trident's SAM refinement)
    if refine is not None:
        labels, max_prob = refine(index, cos, labels, max_prob, vocab, scoring)
    return labels, max_prob, cos


def class_probabilities(cos: torch.Tensor, out_hw, vocab: Vocab, scoring: ScoringConfig):
    """Per-class probability maps ``(C, H, W)`` (softmax over all queries, max over synonyms)."""
    import torch

    from methods.scoring import upsample_bilinear

    probs = torch.softmax(scoring.logit_scale * upsample_bilinear(cos.float(), out_hw), dim=0)
    out = torch.zeros((vocab.num_classes, *probs.shape[1:]))
    q2c = vocab.query_to_class.long()
    for c in range(vocab.num_classes):
        members = probs[q2c == c]
        if len(members):
            out[c] = members.amax(dim=0)
    return out


def check_finite_reads(seg: Segmenter) -> None:
    """Make every per-image ``read`` of the method's feature sets check what it returns:
    float tensors must be finite (``np.isfinite`` on the values read, once per read), else
    ``NonFiniteFeaturesError``. Idempotent; the sets are the method's own instances."""
    for fs in seg.sets.values():
        if getattr(fs, "_finite_reads", False):
            continue
        read = fs.read

        def checked(index, names=None, _read=read, _fs=fs):
            feats = _read(index, names)
            for name, arr in feats.tensors.items():
                a = np.asarray(arr)
                if a.dtype.kind == "f" and not np.isfinite(a).all():
                    bad = int(a.size - np.isfinite(a).sum())
                    store = redact_url(str(getattr(_fs.store, "path", "")))
                    raise NonFiniteFeaturesError(store, _fs.key, feats.image_id, name, bad)
            return feats

        fs.read = checked
        fs._finite_reads = True


def iter_segmentations(
    seg: Segmenter,
    vocab: Vocab,
    scoring: ScoringConfig,
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, torch.Tensor]]:
    """``(index, labels, max_prob, cos)`` for every finished image (all feature sets done).

    Every feature the method reads is checked to be finite (``check_finite_reads``): NaN/inf
    in a cached tensor stops the run with a ``NonFiniteFeaturesError`` naming the image.
    """
    from featurestore.store import STATUS_OK

    check_finite_reads(seg)
    ok = np.ones(seg.store.n_images, dtype=bool)
    for fs in seg.sets.values():
        ok &= fs.status() == STATUS_OK
    wanted = range(seg.store.n_images) if indices is None else indices
    for i in wanted:
        if ok[i]:
            out = segment_image(seg, i, vocab, scoring)
            if out is not None:  # None: the method skipped the image (it records why)
                yield i, *out


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------


@dataclass
class SegmentSummary:
    """What a segmentation run did.

    Attributes:
        store: the store segmented (None: a temporary store, removed after the run).
        method, config, scoring: the method and its typed config / scoring, as JSON values.
        vocabulary: source, templates and class names.
        images: images segmented.
        out_dir: where the files went (None: none written).
        seconds: segmentation time (s), extraction and text embedding not included.
        label_set: the label set written into the store (or None).
        files: the label PNGs written (names under ``out_dir``).
        feature_sets: role -> feature-set key the method read.
        text: the text tower: ``text_model``, ``templates``, ``weights`` identity.
        extracted: feature-set keys extracted by this run (``--images``; [] when cached).
        live_model: methods running a live model (pnp-ovss): what ran (model identity, CRF
            backend, first pass from the store or live, skipped images); {} otherwise.
    """

    store: str | None
    method: str
    config: dict
    scoring: dict
    vocabulary: dict
    images: int
    out_dir: str | None
    seconds: float
    label_set: str | None = None
    files: list[str] = field(default_factory=list)
    feature_sets: dict[str, str] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    extracted: list[str] = field(default_factory=list)
    live_model: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def segment_store(
    store_path: str,
    method: str,
    vocab: Vocab,
    out_dir: str | None,
    *,
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
    segmenter: Segmenter | None = None,
    style: OverlayStyle | None = None,
    side_by_side: bool = False,
    data_root: str | None = None,
) -> SegmentSummary:
    """Segment every finished image of a store, write the output files under ``out_dir`` and,
    with ``write_labels``, the label maps into the store as a label set of that name.
    ``segmenter``: an already configured method over this store (then ``method``, ``dataset``
    and ``overrides`` are not used to build one; its store must be writable for
    ``write_labels``). ``style``: how overlays are drawn (``methods.overlay.OverlayStyle``);
    ``side_by_side``: also write ``<id>_compare.png`` (image | prediction | ground truth, the
    ground truth where ``dataset`` and ``data_root`` give one for the image id)."""
    from featurestore.datasets import palette as dataset_palette
    from featurestore.images import load_image_rgb

    if segmenter is not None:
        seg = segmenter
        store = seg.store
    else:
        from featurestore.store import FeatureStore

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
    style = style or OverlayStyle()
    out = Path(out_dir) if out_dir else None
    gt_of = ground_truth_lookup(dataset, data_root) if side_by_side and out else None
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
            if overlays or side_by_side:
                try:
                    img = load_image_rgb(str(paths[i]))
                except OvssError:
                    img = None  # the image moved since extraction: labels are still written
                if img is not None and overlays:
                    save_overlay(img, labels, pal, names, out / f"{stem}_overlay.png", style=style)
                if img is not None and side_by_side:
                    gt = gt_of(ids[i]) if gt_of else None
                    save_comparison(
                        img,
                        labels,
                        gt,
                        pal,
                        names,
                        out / f"{stem}_compare.png",
                        style=style,
                        title=ids[i],
                    )
            if score_maps:
                probs = class_probabilities(cos, labels.shape, vocab, scoring)
                np.save(out / f"{stem}_scores.npy", probs.numpy().astype(np.float16))
        if progress:
            progress(method, n, total)
    summary = SegmentSummary(
        store=redact_url(store_path),  # a store URL's credentials are never recorded
        method=method,
        config=config_to_dict(seg.config),
        scoring=dict(scoring.__dict__),
        vocabulary={"source": vocab.source, "templates": vocab.templates, "classes": names},
        images=n,
        out_dir=str(out) if out else None,
        seconds=round(time.perf_counter() - t0, 3),
        files=files,
        label_set=write_labels,
        live_model=seg.live_record() if hasattr(seg, "live_record") else {},
    )
    if out:
        (out / "segment.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return summary


def vocab_from_text(te, source: str = "") -> Vocab:
    """A ``Vocab`` from a cached text set (``featurestore.text.TextEmbeddings``)."""
    import torch

    return Vocab(
        class_names=[list(c) for c in te.class_names],
        embeddings=torch.from_numpy(np.asarray(te.embeddings, dtype=np.float32)),
        query_to_class=torch.from_numpy(np.asarray(te.query_to_class, dtype=np.int64)),
        source=source or f"{te.key} ({te.weights})",
        templates=te.template_set,
    )


def protocol_record(seg: Segmenter, scoring: ScoringConfig, vocab: Vocab) -> dict:
    """Everything needed to reproduce a result (EVAL.md §7 item 9)."""
    from featurestore.backbones.posembed import pos_interp_of

    backbones = {
        role: {
            "feature_set": fs.key,
            "model": fs.provenance["model"],
            "weights": fs.provenance["backbone"].get("weights"),
            "protocol": fs.provenance["protocol"],
            "pos_interp": pos_interp_of(fs.provenance["backbone"]),
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
        **({"live_model": seg.live_record()} if hasattr(seg, "live_record") else {}),
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


# --------------------------------------------------------------------------------------------
# Requests: everything `ovss segment` / `ovss eval` take, and the one function that runs each
# --------------------------------------------------------------------------------------------

#: The method ``segment`` / ``eval`` run when none is named [ours]: ``prototype`` reads a dense
#: feature set already in text space (by default CLIP-B/16's dense tokens, see its ``tensor``).
DEFAULT_METHOD = "prototype"


class RequestError(OvssError):
    """The options of a request are missing or contradict each other (a usage error).

    Attributes:
        option: the request field concerned (``checkpoint``, ``store``...; '' when several).
    """

    def __init__(self, message: str, option: str = ""):
        super().__init__(message)
        self.option = option


class KeptStoreError(OvssError):
    """A run on a temporary store failed (or was interrupted) after extraction began; the
    store is kept so that a rerun on it resumes instead of starting over.

    Attributes:
        store: the kept store's path.
        cause: the error that stopped the run (None when interrupted).
    """

    def __init__(self, message: str, store: str = "", cause: OvssError | None = None):
        super().__init__(message)
        self.store = store
        self.cause = cause


class TensorNotComputedError(OvssError):
    """A method reads tensors its model does not compute (found before any extraction).

    Attributes:
        method: the method's name.
        role: the requirement's role (``dense``, ``clip``...).
        model: the backbone.
        tensors: the tensors it lacks.
        available: the tensors the backbone computes.
        model_field: the method's config field naming the model ('' when fixed).
    """

    def __init__(
        self,
        message: str,
        method: str = "",
        role: str = "",
        model: str = "",
        tensors: Sequence[str] = (),
        available: Sequence[str] = (),
        model_field: str = "",
    ):
        super().__init__(message)
        self.method = method
        self.role = role
        self.model = model
        self.tensors = tuple(tensors)
        self.available = tuple(available)
        self.model_field = model_field


@dataclass
class MethodRequest:
    """What a command that runs a method on cached features takes (``segment``, ``eval``).

    Attributes:
        method: the method's registry name (default :data:`DEFAULT_METHOD`).
        settings: raw ``--set`` values ``{field: text}``; the method's config coerces them to
            its field types (a bad value is one ``ConfigError`` naming the field and type).
        checkpoint: a trained module, for methods with a ``checkpoint`` option (an error for
            the others); the same as ``settings["checkpoint"]``.
        trust_checkpoint: load that checkpoint even if it holds pickled Python objects
            (``weights_only=False``: code in the file runs), for an old file whose origin the
            user knows; default False: refused (``methods.train.read_checkpoint``).
        sam_refine: turn on the method's ``sam_refine`` option (an error for methods without).
        logit_scale, prob_thd, area_thd: scoring overrides; None: the method's dataset preset,
            else the ``ScoringConfig`` defaults.
        templates, text_model, family: the vocabulary side; None: the method's
            ``vocabulary_defaults(config)``.
        random_init: seeded random weights for every tower the command builds: the image
            backbones of ``--images`` and the text tower.
        text_random_init: seeded random weights for the text tower only.
        weights: checkpoint of the image backbone (a method reading one model) and of the
            text tower when that is the same CLIP, or when no image model is built [ours].
        text_weights: checkpoint of the text tower (wins over ``weights`` for it).
        arch_overrides: architecture overrides of the image backbones, and of the text tower
            when it is the same CLIP (its towers share ``embed_dim``) or when no image model
            is built [ours].
        text_arch_overrides: architecture overrides of the text tower (win over the above).
        seed: seed of the random initialisations (default 0).
        device: ``auto`` (the GPU of LOCAL_RANK, else MPS, else cpu), ``cpu``, ``cuda[:N]``,
            ``mps``.
        limit: only the first N images (None: all).
    """

    method: str = DEFAULT_METHOD
    settings: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    trust_checkpoint: bool = False
    sam_refine: bool = False
    logit_scale: float | None = None
    prob_thd: float | None = None
    area_thd: float | None = None
    templates: str | None = None
    text_model: str | None = None
    family: str | None = None
    random_init: bool = False
    text_random_init: bool = False
    weights: str | None = None
    text_weights: str | None = None
    arch_overrides: dict | None = None
    text_arch_overrides: dict | None = None
    seed: int = 0
    device: str = "auto"
    limit: int | None = None


@dataclass
class SegmentRequest(MethodRequest):
    """What ``ovss segment`` takes (the method options: :class:`MethodRequest`).

    Attributes:
        store: a feature store to segment (exactly one of ``store`` / ``images``).
        images: image files or folders: the method's feature sets are extracted on the fly.
        keep_store: with ``images``: extract into this store (kept; a rerun resumes and, when
            everything is there, builds no model). None: a temporary store, removed after a
            successful run and kept (its path in the error) when a run fails after extraction.
        classes: comma-separated class names (exactly one of classes / vocab_file / dataset).
        vocab_file: a class file (one class per line, synonyms separated by ``, `` or ``; ``).
        dataset: a benchmark's classes (and the method's presets for it).
        data_root: the ``custom`` dataset's root (its ``classes.txt``).
        out_dir: folder for label PNGs, overlays, score maps and ``segment.json``.
        overlays: write colour overlays with a legend (default on).
        overlay_style: how overlays are drawn (alpha, legend; ``methods.overlay.OverlayStyle``).
        side_by_side: also write ``<id>_compare.png``: image | prediction | ground truth (the
            ground truth when ``dataset`` and ``data_root`` give a label for the image id).
        score_maps: also write per-class probability maps (``.npy``, float16).
        write_labels: store the label maps in the store as a label set of this name.
        overwrite_labels: replace an existing label set of that name.
    """

    store: str | None = None
    images: tuple[str, ...] = ()
    keep_store: str | None = None
    classes: str | None = None
    vocab_file: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    out_dir: str | None = None
    overlays: bool = True
    overlay_style: OverlayStyle = field(default_factory=OverlayStyle)
    side_by_side: bool = False
    score_maps: bool = False
    write_labels: str | None = None
    overwrite_labels: bool = False


@dataclass
class MethodSetup:
    """A request's method, resolved before anything is read or built.

    Attributes:
        cls: the method class.
        config: its typed config (defaults, dataset preset, then the request's settings).
        requirements: ``cls.requirements(config)``.
        scoring: the scoring config (dataset preset, then the request's overrides).
        text_model, templates, family: the vocabulary side (request, else method defaults).
    """

    cls: type[Segmenter]
    config: Any
    requirements: list
    scoring: ScoringConfig
    text_model: str
    templates: str
    family: str


@dataclass(frozen=True)
class TextChoice:
    """The text tower a run embeds the vocabulary with (see :func:`text_choice`)."""

    text_model: str
    templates: str
    weights: str | None
    random_init: bool
    seed: int
    arch_overrides: dict | None


def honours_trust(fn: Callable) -> Callable:
    """Run ``fn(request, ...)`` with the request's checkpoint (``checkpoint`` and
    ``settings["checkpoint"]``) trusted when ``request.trust_checkpoint``
    (:func:`methods.train.trusted_checkpoints`); no other file is."""

    @functools.wraps(fn)
    def wrapper(request: MethodRequest, *args: Any, **kwargs: Any) -> Any:
        if not getattr(request, "trust_checkpoint", False):
            return fn(request, *args, **kwargs)
        from methods.train import trusted_checkpoints

        paths = [request.checkpoint, (request.settings or {}).get("checkpoint")]
        with trusted_checkpoints(*[str(p) for p in paths if p not in (None, "")]):
            return fn(request, *args, **kwargs)

    return wrapper


def _methods_with_field(name: str) -> list[str]:
    from methods.base import list_methods
    from methods.config import config_fields

    return [
        m for m in list_methods() if name in {f.name for f in config_fields(get_method(m).Config)}
    ]


def resolve_method(request: MethodRequest, dataset: str | None = None) -> MethodSetup:
    """The method, its typed config, requirements, scoring and vocabulary defaults of a
    request; reads no store and builds no model (the cheap checks of every run).

    Raises:
        OvssError: unknown method, a config value of the wrong type (``ConfigError``), an
            invalid protocol; ``RequestError`` for ``checkpoint`` / ``sam_refine`` given to a
            method without that option, or a checkpoint given twice.
    """
    from featurestore.text import get_templates
    from methods.config import build_config as build_typed
    from methods.config import config_fields

    cls = get_method(request.method or DEFAULT_METHOD)
    fields = {f.name for f in config_fields(cls.Config)}
    overrides: dict[str, Any] = dict(request.settings or {})
    if request.sam_refine:
        if "sam_refine" not in fields:
            have = ", ".join(_methods_with_field("sam_refine")) or "none"
            raise RequestError(
                f"method '{cls.name}' has no SAM refinement (methods with one: {have})",
                "sam_refine",
            )
        overrides["sam_refine"] = True
    if request.checkpoint:
        if "checkpoint" not in fields:
            have = ", ".join(_methods_with_field("checkpoint")) or "none"
            raise RequestError(
                f"method '{cls.name}' takes no checkpoint (methods that do: {have})",
                "checkpoint",
            )
        given = overrides.get("checkpoint")
        if given not in (None, "") and str(given) != str(request.checkpoint):
            raise RequestError(
                f"checkpoint given twice, as {request.checkpoint} and as the setting "
                f"checkpoint={given}; give one",
                "checkpoint",
            )
        overrides["checkpoint"] = str(request.checkpoint)
    config = build_config(cls, dataset, overrides)
    try:
        reqs = list(cls.requirements(config))
    except ValueError as e:  # e.g. an invalid protocol or a missing checkpoint
        raise OvssError(f"method {cls.name}: {e}") from None
    given_scoring = {
        "logit_scale": request.logit_scale,
        "prob_thd": request.prob_thd,
        "area_thd": request.area_thd,
    }
    scoring = build_typed(
        ScoringConfig,
        cls.scoring_presets(dataset) if dataset else {},
        given_scoring,
        owner="scoring",
    )
    defaults = cls.vocabulary_defaults(config)
    templates = request.templates or defaults.templates
    get_templates(templates)  # an unknown template set fails here, before any work
    return MethodSetup(
        cls=cls,
        config=config,
        requirements=reqs,
        scoring=scoring,
        text_model=request.text_model or defaults.text_model,
        templates=templates,
        family=request.family or defaults.family,
    )


def text_choice(
    request: MethodRequest, setup: MethodSetup, image_models: Sequence[str] = ()
) -> TextChoice:
    """The text tower of a run [ours]: ``random_init`` covers it (as it covers the image
    backbones); ``text_weights`` / ``text_arch_overrides`` win; otherwise a text tower that is
    one of the image models built (the same CLIP) shares their ``weights`` and
    ``arch_overrides``; when no image model is built, ``weights`` and ``arch_overrides`` are
    the text tower's."""
    same_clip = setup.text_model in image_models
    weights = request.text_weights
    if weights is None and request.weights and (same_clip or not image_models):
        weights = request.weights
    random_init = request.text_random_init or (request.random_init and weights is None)
    arch = request.text_arch_overrides
    if arch is None and (same_clip or not image_models):
        arch = request.arch_overrides
    return TextChoice(
        text_model=setup.text_model,
        templates=setup.templates,
        weights=weights,
        random_init=random_init,
        seed=request.seed,
        arch_overrides=arch,
    )


def resolve_vocabulary(spec: str, setup: MethodSetup, data_root: str | None = None):
    """The ``featurestore.text.Vocabulary`` of a spec under the method's class family."""
    from featurestore.text import parse_vocab

    return parse_vocab(spec, family=setup.family, data_root=data_root)


def _text_cached(store_path: str, text: TextChoice, vocabulary) -> bool:
    """Whether the store already holds the vocabulary's embeddings made by this tower (asked
    of the text cache without building the encoder)."""
    from featurestore.errors import ProvenanceMismatchError

    try:
        _text_embeddings(store_path, text, vocabulary, compute_if_missing=False)
    except ProvenanceMismatchError:
        return False
    return True


def _text_embeddings(store_path: str, text: TextChoice, vocabulary, **kwargs: Any) -> Any:
    """``featurestore.text.get_text_embeddings`` of the vocabulary under ``text``'s tower,
    templates, weights and init; ``kwargs`` are its other keyword arguments."""
    from featurestore.text import get_text_embeddings

    return get_text_embeddings(
        store_path,
        text.text_model,
        vocabulary,
        text.templates,
        weights=text.weights,
        random_init=text.random_init,
        seed=text.seed,
        arch_overrides=text.arch_overrides,
        **kwargs,
    )


def check_text_encoder(text: TextChoice) -> None:
    """Cheap checks that the text tower can be built, without building it: a known encoder,
    an existing ``weights`` file, and (CLIP towers with real weights) a checkpoint that the
    usual resolution finds.

    Raises:
        OvssError / WeightsNotFoundError: one line naming the encoder.
    """
    from featurestore.errors import WeightsNotFoundError
    from featurestore.text import expected_weights

    try:
        from featurestore.text_encoders import lookup_text_encoder
    except ImportError:  # before the text-encoder registry
        lookup_text_encoder = None
    if lookup_text_encoder is not None:
        lookup_text_encoder(text.text_model)
    try:
        expected_weights(text.weights, text.random_init, text.seed)
    except WeightsNotFoundError as e:
        raise WeightsNotFoundError(f"the {text.text_model} text encoder: {e}") from None
    if text.random_init or text.weights is not None:
        return
    try:
        from featurestore.backbones.clip import resolve_clip_weights, resolve_variant

        variant = resolve_variant(text.text_model)
    except (ImportError, OvssError):
        return  # not a CLIP tower: its kind checks its weights when it is built
    try:
        resolve_clip_weights(variant)
    except WeightsNotFoundError as e:
        raise WeightsNotFoundError(
            f"the {text.text_model} text encoder cannot be loaded: {e}"
        ) from None


def embed_text(
    store_path: str,
    text: TextChoice,
    vocabulary,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[Vocab, Any]:
    """``(query embeddings, the text set)`` of the vocabulary from the store's text cache
    (computed and cached first when missing, with ``progress(label, texts done, texts
    total)``)."""
    te = _text_embeddings(store_path, text, vocabulary, device=device, progress=progress)
    return vocab_from_text(te, source=vocabulary.describe()), te


# -- on-the-fly extraction (segment --images) ----------------------------------------------


@dataclass
class ExtractionStep:
    """One ``extract`` pass: the models sharing a protocol and the tensors each must have.

    Attributes:
        protocol: the pass's protocol.
        models: the backbones, in requirement order.
        tensors: model -> tensors the method reads from its set.
        layers: intermediate layers to cache (``layer<i>`` tensors read), else ().
        roles: model -> the requirement's role; fields: model -> its config field ('' fixed).
    """

    protocol: Any
    models: list[str]
    tensors: dict[str, tuple[str, ...]]
    layers: tuple[int, ...] = ()
    roles: dict[str, str] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


def extraction_steps(setup: MethodSetup) -> list[ExtractionStep]:
    """The feature sets a configured method needs from images, one ``extract`` pass per
    protocol: the groups of the planner (``methods.plan.feature_groups``: required cached sets
    and the cached first passes of live models), with the tensors, layers, roles and model
    fields each set's requirements declare."""
    import re

    from methods.base import LiveModelRequirement
    from methods.plan import feature_groups

    declared: dict[tuple[str, Any], list] = {}
    for r in setup.requirements:
        c = r.cached if isinstance(r, LiveModelRequirement) else r
        if c is not None:
            declared.setdefault((c.model, c.protocol), []).append(c)
    steps = []
    for protocol, models in feature_groups(setup.cls, setup.config):
        st = ExtractionStep(protocol, list(models), {})
        for m in models:
            reqs = declared.get((m, protocol), [])
            tensors: tuple[str, ...] = ()
            for r in reqs:
                tensors += tuple(t for t in r.tensors if t not in tensors)
            st.tensors[m] = tensors
            st.roles[m] = reqs[0].role if reqs else ""
            st.fields[m] = next((r.model_field for r in reqs if r.model_field), "")
            layers = {int(x.group(1)) for t in tensors if (x := re.fullmatch(r"layer(\d+)", t))}
            st.layers = tuple(sorted(set(st.layers) | layers))
        steps.append(st)
    return steps


def _store_exists(path: str | None) -> bool:
    return bool(path) and ("://" in str(path) or Path(str(path), "zarr.json").exists())


def _set_complete(store, model, protocol, tensors, random_init: bool, seed: int) -> bool:
    from featurestore.errors import ProvenanceMismatchError

    try:
        fs = store.require(model, protocol, tensors=tensors)
    except ProvenanceMismatchError:
        return False
    have = str(fs.provenance["backbone"].get("weights") or "")
    if random_init and have != f"random-init:{seed}":
        return False
    if not random_init and have.startswith("random-init:"):
        return False
    return bool(fs.done_blocks().all())


def missing_steps(
    store_path: str | None, records, steps: list[ExtractionStep], random_init: bool, seed: int
) -> list[ExtractionStep]:
    """The part of ``steps`` the store does not hold yet, asking the store only (no model is
    built): a set made with these weights (random-init seed, or real), finished, with every
    tensor needed is not extracted again.

    Raises:
        StoreImagesMismatchError: the store holds other images (or a file changed).
    """
    from featurestore.store import FeatureStore

    if not _store_exists(store_path):
        return steps
    store = FeatureStore.open_or_create(str(store_path), records)  # checks the image list
    out = []
    for st in steps:
        todo = [
            m
            for m in st.models
            if not _set_complete(store, m, st.protocol, st.tensors[m], random_init, seed)
        ]
        if todo:
            out.append(
                ExtractionStep(
                    st.protocol,
                    todo,
                    {m: st.tensors[m] for m in todo},
                    st.layers,
                    {m: st.roles[m] for m in todo},
                    {m: st.fields[m] for m in todo},
                )
            )
    return out


def check_models(
    method: str,
    steps: list[ExtractionStep],
    seed: int = 0,
    arch_overrides: dict | None = None,
) -> None:
    """Before any extraction: each protocol fits its models, and each model computes the
    tensors the method reads (the models are built on the meta device: no weights, no memory).

    Raises:
        OvssError: a protocol only SAM takes given to another model.
        TensorNotComputedError: a model lacks a tensor the method reads.
    """
    import torch

    from featurestore.backbones.base import create_backbone
    from featurestore.extract import check_protocol_fits

    for st in steps:
        check_protocol_fits(st.models, st.protocol)
        for m in st.models:
            with torch.device("meta"):
                bb = create_backbone(
                    m, random_init=True, seed=seed, layers=st.layers, arch_overrides=arch_overrides
                )
            have = [s.name for s in bb.tensor_specs()]
            lacking = [t for t in st.tensors[m] if t not in have]
            if lacking:
                raise TensorNotComputedError(
                    f"method {method} reads {', '.join(lacking)} of {m} ({st.roles.get(m)} "
                    f"role), which {m} does not compute (it computes {', '.join(have)})",
                    method=method,
                    role=st.roles.get(m, ""),
                    model=m,
                    tensors=lacking,
                    available=have,
                    model_field=st.fields.get(m, ""),
                )


def resolve_backbone_weights(model: str, explicit: str | None = None) -> Path | None:
    """The checkpoint a backbone would load (CLIP, DINO and SAM families), found without
    building it; None for a family this does not know (checked when built).

    Raises:
        WeightsNotFoundError: no checkpoint on disk (or from the hub), naming what to get.
    """
    from featurestore.weights import resolve_weights

    try:
        from featurestore.backbones import clip

        variant = clip.resolve_variant(model)
    except (ImportError, OvssError):
        variant = None
    if variant is not None:
        return clip.resolve_clip_weights(variant, explicit)
    from featurestore.backbones import dino, sam

    for family in (dino, sam):
        for v in getattr(family, "VARIANTS", ()):
            if v.name == model:
                return resolve_weights(family.weights_spec(v), explicit)
    return None


def _check_image_weights(
    steps: list[ExtractionStep], all_models: Sequence[str], request: MethodRequest
) -> None:
    if request.random_init:
        if request.weights:
            raise RequestError("random_init and weights exclude each other; give one", "weights")
        return
    if request.weights and len(all_models) > 1:
        raise RequestError(
            f"weights names one checkpoint, but the method reads {len(all_models)} models "
            f"({', '.join(all_models)}): extract them into a store first",
            "weights",
        )
    for st in steps:
        for m in st.models:
            resolve_backbone_weights(m, request.weights)


def _extract_steps(
    records, store_path: str, steps: list[ExtractionStep], request: MethodRequest, progress
) -> list[str]:
    from featurestore.extract import ExtractConfig, extract
    from featurestore.store import set_key

    done = []
    for st in steps:
        cfg = ExtractConfig(
            models=list(st.models),
            protocol=st.protocol,
            store=store_path,
            random_init=request.random_init,
            seed=request.seed,
            weights=request.weights,
            layers=st.layers,
            arch_overrides=request.arch_overrides,
            device=request.device,
        )
        extract(records, cfg, progress=progress)
        done += [set_key(m, st.protocol) for m in st.models]
    return done


def _check_segment_request(r: SegmentRequest) -> str:
    """The vocabulary spec of a segment request; RequestError for missing/contradicting
    options."""
    if bool(r.store) == bool(r.images):
        raise RequestError("give exactly one of a store or images", "store")
    given = [x for x in (r.classes, r.vocab_file, r.dataset) if x]
    if len(given) != 1:
        raise RequestError("give exactly one of classes, a class file or a dataset", "classes")
    if not r.out_dir and not r.write_labels:
        raise RequestError(
            "nothing to write: give an output folder and/or a label set name", "out_dir"
        )
    if r.images and r.write_labels and not r.keep_store:
        raise RequestError(
            "label sets are written into the store: with images, keep the store", "keep_store"
        )
    if r.keep_store and not r.images:
        raise RequestError("keep_store goes with images (a store is kept anyway)", "keep_store")
    if r.classes:
        return f"list:{r.classes}"
    if r.vocab_file:
        return f"file:{r.vocab_file}"
    return f"dataset:{r.dataset}"


def _segment_existing(
    store_path: str,
    request: SegmentRequest,
    setup: MethodSetup,
    text: TextChoice,
    vocabulary,
    device: str,
    progress: Progress | None,
) -> SegmentSummary:
    from featurestore.store import FeatureStore

    store = FeatureStore.open(store_path, mode="a" if request.write_labels else "r")
    seg = setup.cls(store, setup.config, device=device)  # the feature sets, before the text
    vocab, text_set = embed_text(store_path, text, vocabulary, device, progress)
    summary = segment_store(
        store_path,
        setup.cls.name,
        vocab,
        request.out_dir,
        dataset=request.dataset,
        scoring=setup.scoring,
        overlays=request.overlays,
        score_maps=request.score_maps,
        indices=list(range(request.limit)) if request.limit else None,
        device=device,
        progress=progress,
        write_labels=request.write_labels,
        overwrite_labels=request.overwrite_labels,
        segmenter=seg,
        style=request.overlay_style,
        side_by_side=request.side_by_side,
        data_root=request.data_root,
    )
    summary.feature_sets = {role: fs.key for role, fs in seg.sets.items()}
    summary.text = {
        "text_model": text.text_model,
        "templates": text.templates,
        "weights": text_set.weights,
    }
    return summary


@honours_trust
def run_segment(request: SegmentRequest, progress: Progress | None = None) -> SegmentSummary:
    """Run ``ovss segment``: resolve the method and vocabulary, extract what ``images`` need,
    embed the vocabulary, segment, write the files / label set.

    Order [ours], cheap checks first: the request's options, the method's config (typed), its
    requirements, the template set and the vocabulary; then, with ``images``, what the store
    lacks (the store is asked first: a complete store builds no model), that each model
    computes the tensors read, that the image and text weights can be found; only then the
    extraction, the text embedding (``progress`` reports it) and the segmentation.

    Raises:
        RequestError: missing or contradicting options.
        KeptStoreError: a temporary store's run failed after extraction began (it is kept).
        OvssError: whatever else is wrong, as one line.
    """
    import shutil
    import tempfile

    from featurestore.extract import resolve_device

    spec = _check_segment_request(request)
    setup = resolve_method(request, request.dataset)
    vocabulary = resolve_vocabulary(spec, setup, request.data_root)
    device = str(resolve_device(request.device))
    if request.store:
        text = text_choice(request, setup)
        summary = _segment_existing(
            request.store, request, setup, text, vocabulary, device, progress
        )
        _write_summary(summary)
        return summary

    records = records_from_paths(request.images)
    steps = extraction_steps(setup)
    image_models = [m for st in steps for m in st.models]
    text = text_choice(request, setup, image_models)
    store_path = request.keep_store
    todo = missing_steps(store_path, records, steps, request.random_init, request.seed)
    check_models(setup.cls.name, todo, request.seed, request.arch_overrides)
    _check_image_weights(todo, image_models, request)
    if not (_store_exists(store_path) and _text_cached(str(store_path), text, vocabulary)):
        check_text_encoder(text)

    tmpdir = None
    if store_path is None:
        tmpdir = tempfile.mkdtemp(prefix="ovss-segment-")
        store_path = str(Path(tmpdir) / "store.zarr")
    try:
        extracted = _extract_steps(records, store_path, todo, request, progress)
        if not _store_exists(store_path):  # nothing to extract (a live model runs on pixels)
            from featurestore.store import FeatureStore

            FeatureStore.open_or_create(store_path, records)
        summary = _segment_existing(store_path, request, setup, text, vocabulary, device, progress)
    except BaseException as e:
        if tmpdir is None:
            raise
        if not _store_exists(store_path):  # nothing extracted: nothing to keep
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        if isinstance(e, OvssError):
            raise KeptStoreError(
                f"{e}; the features extracted so far are kept in {store_path}",
                store=store_path,
                cause=e,
            ) from None
        if isinstance(e, KeyboardInterrupt):
            raise KeptStoreError(
                f"interrupted; the features extracted so far are kept in {store_path}",
                store=store_path,
            ) from None
        raise  # an unexpected error: the store is kept for a look
    summary.extracted = extracted
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)
        summary.store = None
    _write_summary(summary)
    return summary


def _write_summary(summary: SegmentSummary) -> None:
    if summary.out_dir:
        (Path(summary.out_dir) / "segment.json").write_text(json.dumps(summary.to_dict(), indent=2))


def describe_methods() -> list[dict[str, Any]]:
    """Every registered method with its options, from its config's fields
    (``methods.config.config_fields``): ``name``, ``doc``, ``default`` (the method run when
    none is named) and ``options``, each ``{name, type, default, required, help, choices}``
    with JSON-ready defaults (protocols as dicts)."""
    import dataclasses

    from methods.base import list_methods
    from methods.config import config_fields
    from methods.config import config_to_dict as _to_json

    def plain(value: Any) -> Any:
        if value is dataclasses.MISSING:
            return None
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return _to_json(value)
        if hasattr(value, "to_dict"):
            return value.to_dict()
        return list(value) if isinstance(value, tuple) else value

    rows = []
    for name in list_methods():
        cls = get_method(name)
        options = [
            {
                "name": f.name,
                "type": f.type_name,
                "default": plain(f.default),
                "required": f.default is dataclasses.MISSING,
                "help": " ".join(f.help.replace("``", "").split()),
                "choices": [plain(c) for c in f.choices],
            }
            for f in config_fields(cls.Config)
        ]
        rows.append(
            {"name": name, "doc": cls.doc, "default": name == DEFAULT_METHOD, "options": options}
        )
    return rows
