"""The trainer seam: ``ovss align --method NAME`` for every method that trains something.

A trainer is **one module** with a :class:`Trainer` subclass registered with
``@register_trainer`` (one import line in ``methods/__init__.py`` loads it with the registry;
a module imported before the CLI runs registers itself the same way). The subclass declares:

- ``name`` (``ovss align --method NAME``, ``extract --for NAME``) and ``doc`` (one line for
  ``ovss methods``); its class docstring is the long help of ``ovss align --method NAME``.
- ``Config``: a dataclass whose fields are the trainer's hyperparameters, documented in its
  ``Attributes:`` section. ``ovss align --method NAME --help`` lists one generated option per
  field (``methods.config``); the whole config is recorded in every checkpoint.
- ``requirements(config)``: the feature sets it needs (``extract --for NAME`` plans them).
- ``presets(dataset)``, ``vocabulary_defaults(config)`` (the text side ``extract --for NAME``
  plans), ``training_text_defaults(config)`` (text model / templates ``fit`` uses when neither
  the user nor the label set says; default: ``vocabulary_defaults``), ``needs_labels``, ``segment_method`` (the method that
  segments with its checkpoint), ``smoke_overrides`` / ``smoke_config`` (config values for a
  two-step run on a toy store; the registry tests train every trainer with them).
- ``fit(request, progress) -> TrainResult``: ``request`` is a :class:`TrainRequest` (store,
  feature set, label source, text options, output folder, restart, device, the typed config).

Shared helpers a trainer's ``fit`` uses so it only writes its own step:

- data parallel under torchrun: :func:`setup_distributed` -> :class:`DistContext` (rank,
  world, device; ``rank_slice`` of a step's items, ``gather_rows`` of per-rank rows into one
  global batch with gradients, ``rank0_first`` runs a function on rank 0 first and broadcasts
  its success or one-line error so every rank stops with the same message);
- labels and text: :meth:`LabelRequest.open` (a store label set or a dataset's GT),
  :func:`embed_classes` (the class embeddings, defaults resolved explicit > label set >
  trainer), :func:`text_identity`;
- checkpoints: :func:`checkpoint_provenance` (trainer, feature set and its weights, text
  encoder identity, labels, hyperparameters, library versions, all plain JSON values),
  :func:`save_checkpoint` (atomic; refuses non-plain values), :func:`read_checkpoint`
  (``torch.load(weights_only=True)``: a checkpoint holding pickled objects is refused with a
  one-line :class:`CheckpointError`; no code from a shared file runs; only a file named to
  :func:`trusted_checkpoints`, the CLI's ``--trust-checkpoint``, loads as a full pickle),
  :func:`resume_state`
  (the last checkpoint of the same run, or a one-line error naming what differs);
- progress: :class:`StepMeter` reports ``{"stage": "train", epoch, step, steps, loss, lr,
  items_per_s}`` per step and ``{"stage": "epoch", ...}`` per epoch to a ``progress(event)``
  callback (the CLI prints them as plain lines when stderr is not a terminal);
- losses: :func:`register_loss` / :func:`list_losses` / :func:`get_loss`, grouped by
  ``family`` (the signature they share); a config's ``loss`` field takes its choices from
  ``list_losses(family)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from featurestore.errors import OvssError
from featurestore.extract import resolve_device
from methods.base import Component, VocabularyDefaults
from methods.config import build_config as _build_config
from methods.config import config_to_dict

ProgressFn = Callable[[dict[str, Any]], None]
T = TypeVar("T")

#: File name of a trainer's checkpoint in its output folder.
CHECKPOINT_NAME = "last.pt"

_TRAINERS: dict[str, type[Trainer]] = {}


# --------------------------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextOptions:
    """How the class names of the labels are embedded (the text side a trainer aligns to).

    Attributes:
        text_model: text encoder (registry name); None: the one recorded by the label set,
            else the trainer's ``vocabulary_defaults``.
        templates: template-set name; None: likewise.
        random_init: a seeded random-init text tower (tests, demos).
        arch_overrides: reduced tower configuration (with ``random_init``), e.g.
            ``{"layers": 2}``.
        weights: checkpoint of the text tower (None: the usual resolution).
        seed: random-init seed; None: the config's ``seed`` (else 0).
    """

    text_model: str | None = None
    templates: str | None = None
    random_init: bool = False
    arch_overrides: dict | None = None
    weights: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class LabelRequest:
    """Where per-pixel training labels come from: one of a store label set or a dataset's GT.

    Attributes:
        set_name: a label set of the store (e.g. Stage-1 pseudo-labels).
        dataset: a dataset whose ground truth is used instead (``custom`` for the demo).
        data_root: root of ``dataset``.
        split: split of ``dataset`` (None: the dataset's default).
    """

    set_name: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    split: str | None = None

    def open(self, store: Any) -> Any:
        """The label source (``StoreLabelSource`` or ``DatasetLabelSource``)."""
        if bool(self.set_name) == bool(self.dataset):
            raise OvssError("give exactly one label source: a label set or a dataset's GT")
        if self.set_name:
            return StoreLabelSource(store, self.set_name)
        if not self.data_root:
            raise OvssError(f"the {self.dataset} ground truth needs its data root")
        return DatasetLabelSource(store, self.dataset, self.data_root, self.split)


@dataclass
class TrainRequest:
    """Everything one training run needs (what ``ovss align`` parses into).

    Attributes:
        store: path of the feature store.
        config: the trainer's ``Config`` instance (None: its defaults).
        features: the feature set trained on: a key (``dinov2-l14@short448``), a model with one
            set in the store, ``(model, Protocol)``, or None for the trainer's declared one.
        labels: a :class:`LabelRequest`, an opened label source, or None.
        vocab: class embeddings to use as they are (a ``methods.base.Vocab``; None: embed the
            labels' class names with ``text``).
        text_embeddings: the ``featurestore.text.TextEmbeddings`` behind ``vocab`` (its
            identity is recorded), if known.
        text: how to embed the class names when ``vocab`` is None (:class:`TextOptions`).
        out_dir: checkpoint folder (None: the trainer's default under the store's folder).
        restart: ignore an existing checkpoint and start over (else resume it).
        device: torch device or ``auto`` (see :func:`setup_distributed`).
        trust_checkpoint: load the checkpoint resumed from as a full pickle (code in it
            runs), for an old file whose origin the user knows (default False: tensors and
            plain values only, see :func:`read_checkpoint`).
    """

    store: str
    config: Any = None
    features: Any = None
    labels: Any = None
    vocab: Any = None
    text_embeddings: Any = None
    text: TextOptions = field(default_factory=TextOptions)
    out_dir: str | os.PathLike | None = None
    restart: bool = False
    device: str = "auto"
    trust_checkpoint: bool = False


@dataclass
class TrainResult:
    """What a finished ``fit`` returns (on every rank; only rank 0 wrote the checkpoint).

    Attributes:
        trainer: the trainer's name.
        checkpoint: path of the checkpoint (``<out>/last.pt``).
        epochs_done, steps_done: progress recorded in the checkpoint.
        history: per-epoch records (``loss``, ``seconds``, ``items_per_s``, trainer extras).
        provenance: the checkpoint's provenance (see :func:`checkpoint_provenance`).
        summary: trainer-specific facts for the report (e.g. ``train_images``).
        rank, world_size: this process in the data-parallel job.
        segment_method: the method that segments with this checkpoint ('' if none).
    """

    trainer: str
    checkpoint: str
    epochs_done: int
    steps_done: int
    history: list[dict[str, Any]]
    provenance: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    segment_method: str = ""

    def to_dict(self) -> dict[str, Any]:
        prov = self.provenance
        text = prov.get("vocabulary") or {}
        return {
            "trainer": self.trainer,
            "checkpoint": self.checkpoint,
            "epochs_done": self.epochs_done,
            "steps_done": self.steps_done,
            **self.summary,
            "world_size": self.world_size,
            "history": self.history,
            "features": (prov.get("features") or {}).get("key"),
            "labels": prov.get("labels"),
            "text": {
                k: text.get(k)
                for k in ("text_model", "templates", "text_weights", "vocabulary_key")
            },
        }


# --------------------------------------------------------------------------------------------
# The trainer contract and its registry
# --------------------------------------------------------------------------------------------


class Trainer(Component):
    """Base class of trainers (see the module doc)."""

    kind: ClassVar[str] = "trainer"
    #: whether ``fit`` needs pixel labels (a label set or a dataset's GT)
    needs_labels: ClassVar[bool] = False
    #: the method that segments with the checkpoint ('' if none)
    segment_method: ClassVar[str] = ""
    #: config values for a two-step run on a toy store (used by the registry tests)
    smoke_overrides: ClassVar[dict[str, Any]] = {}

    @classmethod
    def build_config(
        cls, dataset: str | None = None, overrides: dict[str, Any] | None = None
    ) -> Any:
        """Defaults, then the dataset preset, then ``overrides`` (coerced; a bad value is a
        one-line ``ConfigError`` naming the field)."""
        return _build_config(
            cls.Config,
            cls.presets(dataset) if dataset else {},
            overrides,
            owner=f"trainer {cls.name}",
        )

    @classmethod
    def training_text_defaults(cls, config: Any) -> VocabularyDefaults:
        """Text model and templates ``fit`` embeds the labels' classes with when neither the
        user nor the label set says. Default: :meth:`vocabulary_defaults`."""
        return cls.vocabulary_defaults(config)

    @classmethod
    def smoke_config(cls, workdir: Path, store: Any) -> dict[str, Any]:
        """Config values for a two-step run (two epochs of one step) on a toy store of a few
        images holding the required feature sets: the registry tests call it. Default:
        ``smoke_overrides``; a trainer that needs input files (captions...) writes tiny ones
        under ``workdir`` and returns their paths in its values."""
        return dict(cls.smoke_overrides)

    def fit(self, request: TrainRequest, progress: ProgressFn | None = None) -> TrainResult:
        """Train (or resume) and write the checkpoint; see :class:`TrainRequest`."""
        raise NotImplementedError


def register_trainer(cls: type[Trainer]) -> type[Trainer]:
    if not cls.name or cls.name in _TRAINERS:
        raise ValueError(f"trainer name {cls.name!r} empty or registered twice")
    _TRAINERS[cls.name] = cls
    return cls


def _import_trainers() -> None:
    """Load the registry: ``methods.load_components`` imports every trainer module (one line
    each); ``fmbseg``, the default of ``ovss align``, is imported here as well."""
    from methods import fmbseg, load_components  # noqa: F401

    load_components()


def list_trainers() -> list[str]:
    _import_trainers()
    return sorted(_TRAINERS)


def get_trainer(name: str) -> type[Trainer]:
    _import_trainers()
    if name not in _TRAINERS:
        raise OvssError(
            f"'{name}' is not a known trainer; choose from {', '.join(sorted(_TRAINERS))}"
        )
    return _TRAINERS[name]


# --------------------------------------------------------------------------------------------
# Loss registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossInfo:
    """A registered loss.

    Attributes:
        name: ``--loss NAME``.
        family: the signature the losses of a family share (e.g. ``patch-text``:
            ``fn(z (n, D), y (n,), t (K, D), tau) -> scalar``).
        fn: the loss function.
        doc: one line for help texts.
    """

    name: str
    family: str
    fn: Callable[..., torch.Tensor]
    doc: str = ""


_LOSSES: dict[tuple[str, str], LossInfo] = {}


def register_loss(name: str, family: str, doc: str = "") -> Callable[[T], T]:
    """Decorator registering a loss function under ``(family, name)``."""

    def deco(fn: T) -> T:
        if (family, name) in _LOSSES:
            raise ValueError(f"loss {name!r} of family {family!r} registered twice")
        _LOSSES[(family, name)] = LossInfo(name, family, fn, doc)  # type: ignore[arg-type]
        return fn

    return deco


def list_losses(family: str) -> tuple[str, ...]:
    """Names of the losses of ``family``, in registration order."""
    return tuple(n for f, n in _LOSSES if f == family)


def get_loss(name: str, family: str) -> Callable[..., torch.Tensor]:
    info = _LOSSES.get((family, name))
    if info is None:
        raise OvssError(
            f"'{name}' is not a {family} loss; choose from {', '.join(list_losses(family))}"
        )
    return info.fn


# --------------------------------------------------------------------------------------------
# Data parallel (torchrun)
# --------------------------------------------------------------------------------------------


@dataclass
class DistContext:
    """Where this process stands in a torchrun job (``world == 1``: a plain single process)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owned: bool = False  # this context initialised the process group and destroys it

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def rank_slice(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (sizes differ by at most 1;
        concatenated in rank order the shares give the items back in order)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return slice(lo, lo + base + (self.rank < extra))

    def gather_rows(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every rank's rows of each tensor concatenated in rank order (the global batch).

        The first tensor keeps its gradient (see :class:`_GatherRows`); the others (labels)
        are gathered without. With ``world == 1`` the tensors come back unchanged.
        """
        if self.world <= 1:
            return tensors
        n = torch.tensor([len(tensors[0])], device=tensors[0].device)
        ns = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(ns, n)
        sizes = [int(v) for v in ns]
        out = [_GatherRows.apply(tensors[0], sizes)]
        with torch.no_grad():
            out += [_GatherRows.apply(t, sizes) for t in tensors[1:]]
        return tuple(out)

    def rank0_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 first (e.g. it fills the store's text cache), then on the others.

        With ``world`` > 1 rank 0 broadcasts ``None`` or its error message in place of a
        barrier, so a failure there raises the same one-line ``OvssError`` on every rank instead
        of leaving the others waiting until the collective times out.
        """
        if self.world <= 1:
            return fn()
        msg: list[str | None] = [None]
        if self.rank == 0:
            try:
                out = fn()
            except OvssError as e:
                msg[0] = str(e)
            except Exception as e:
                msg[0] = f"rank 0 failed: {type(e).__name__}: {e}"
                dist.broadcast_object_list(msg, src=0)
                raise
            dist.broadcast_object_list(msg, src=0)
            if msg[0] is not None:
                raise OvssError(msg[0])
            return out
        dist.broadcast_object_list(msg, src=0)
        if msg[0] is not None:
            raise OvssError(msg[0])
        return fn()


def setup_distributed(device: str | torch.device = "cpu") -> DistContext:
    """Join the torchrun job described by the environment when ``WORLD_SIZE`` > 1.

    The process group (``env://``: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``)
    uses gloo for a CPU ``device`` and nccl for CUDA, where ``LOCAL_RANK`` picks the GPU
    (``auto``: see ``featurestore.extract.resolve_device``, except that with ``WORLD_SIZE`` > 1
    and no CUDA ``auto`` is the CPU, never MPS: gloo cannot carry MPS tensors). A group that is
    already initialised is used as is (and left to its owner to destroy).

    Raises:
        OvssError: an MPS ``device`` with ``WORLD_SIZE`` > 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and str(device).strip().lower() == "auto" and not torch.cuda.is_available():
        device = "cpu"
    dev = resolve_device(device)
    if world <= 1:
        return DistContext(device=dev)
    if dev.type == "mps":
        raise OvssError(
            "--device mps cannot train under torchrun (gloo has no MPS tensors); use cpu or cuda"
        )
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, owned)


class _GatherRows(torch.autograd.Function):
    """All ranks' rows concatenated in rank order (every rank gets the same tensor).

    Every rank then evaluates the identical loss of the global batch, so the gradient arriving
    here is already the full one on each rank: backward keeps this rank's rows, times the world
    size, which the gradient averaging of DistributedDataParallel divides out again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        pad = x.new_zeros((max(sizes), *x.shape[1:]))
        pad[: len(x)] = x
        parts = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(parts, pad)
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        lo = sum(ctx.sizes[: ctx.rank])
        return g[lo : lo + ctx.sizes[ctx.rank]] * len(ctx.sizes), None


# --------------------------------------------------------------------------------------------
# Labels and text
# --------------------------------------------------------------------------------------------


class StoreLabelSource:
    """Labels from a label set of the store (e.g. pseudo-labels from ``--write-labels``)."""

    def __init__(self, store: Any, name: str):
        from featurestore.labelsets import LabelSet

        self.set = LabelSet(store, name)
        info = self.set.info
        names = info.get("class_names")
        if not names:
            raise OvssError(f"label set '{name}' records no class names; it cannot train")
        self.class_names = [list(c) if isinstance(c, list) else [str(c)] for c in names]
        self.name = name

    def labels(self, index: int) -> np.ndarray | None:
        """``(H, W)`` labels of store image ``index`` at its original size, or None."""
        return self.set.read(index) if self.set.done[index] else None

    def text_defaults(self) -> dict[str, str]:
        """The CLIP model (role ``clip``) and template set that produced this label set, as
        recorded by ``ovss segment --write-labels`` (empty when not recorded): a trainer aligns
        to the same text space by default."""
        rec = self.set.info.get("protocol") or {}
        out = {}
        clip = (rec.get("backbones") or {}).get("clip") or {}
        if clip.get("model"):
            out["text_model"] = str(clip["model"])
        if rec.get("templates"):
            out["templates"] = str(rec["templates"])
        return out

    def describe(self) -> dict[str, Any]:
        info = self.set.info
        return {
            "kind": "label_set",
            "name": self.name,
            "created": info.get("created"),
            "protocol": info.get("protocol"),
        }


class DatasetLabelSource:
    """Ground-truth labels of a dataset (e.g. the demo's ``custom`` collages), by image id.

    Args:
        store: the store; its image ids are matched with the dataset's.
        dataset: dataset name (``custom`` for the demo).
        data_root: the dataset root.
        split: only this split's images get labels (None: the dataset's default split).
    """

    def __init__(self, store: Any, dataset: str, data_root: str, split: str | None = None):
        from featurestore.datasets import class_names, get_dataset, list_dataset_images

        self.spec = get_dataset(dataset, data_root) if dataset == "custom" else get_dataset(dataset)
        self.dataset, self.data_root, self.split = dataset, str(data_root), split
        recs = list_dataset_images(dataset, data_root, split)
        ids = {i: n for n, i in enumerate(store.image_ids)}
        self.paths = {ids[r.image_id]: r.label_path for r in recs if r.image_id in ids}
        if not self.paths:
            raise OvssError(f"no {dataset} {split or ''} image of {data_root} is in the store")
        self.class_names = [list(c) for c in class_names(dataset, data_root=data_root)]

    def labels(self, index: int) -> np.ndarray | None:
        from featurestore.labels import load_label

        path = self.paths.get(index)
        return None if path is None else load_label(self.spec, path)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "dataset",
            "dataset": self.dataset,
            "data_root": self.data_root,
            "split": self.split,
            "images": len(self.paths),
        }


def allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the process group in one flat ``all_reduce``.

    A parameter without a gradient takes part as zeros (so every rank sends the same layout) and
    gets the summed tensor as its ``grad``; the caller scales (sum, not mean).
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    start = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[start : start + n].view_as(p).clone()
        start += n


def open_labels(store: Any, labels: Any) -> Any:
    """A label source from a :class:`LabelRequest` (or an already opened source, as is)."""
    return labels.open(store) if isinstance(labels, LabelRequest) else labels


def resolve_text(text: TextOptions, source: Any, defaults: VocabularyDefaults) -> tuple[str, str]:
    """``(text_model, templates)``: explicit options, else what the label set records (the
    text space its labels were made in), else the trainer's defaults."""
    recorded = source.text_defaults() if hasattr(source, "text_defaults") else {}
    model = text.text_model or recorded.get("text_model") or defaults.text_model
    templates = text.templates or recorded.get("templates") or defaults.templates
    return model, templates


def embed_classes(
    store_path: str,
    class_names: list[list[str]] | Any,
    text_model: str,
    templates: str,
    text: TextOptions,
    seed: int = 0,
) -> tuple[Any, Any]:
    """The class embeddings as a ``methods.base.Vocab`` and the cached text set behind them
    (computed and cached in the store when missing). Class k of the labels is query group k.
    ``class_names``: the classes (each a list of synonyms), or a parsed
    ``featurestore.text.Vocabulary`` (kept as is, with its source)."""
    from featurestore.text import Vocabulary, get_text_embeddings, parse_vocab
    from methods.segment import vocab_from_text

    vocab = (
        class_names
        if isinstance(class_names, Vocabulary)
        else parse_vocab([list(c) for c in class_names])
    )
    te = get_text_embeddings(
        store_path,
        text_model,
        vocab,
        templates,
        weights=text.weights,
        random_init=text.random_init,
        seed=text.seed if text.seed is not None else seed,
        arch_overrides=text.arch_overrides,
    )
    return vocab_from_text(te, source=vocab.describe()), te


def text_identity(
    vocab: Any, text_model: str | None = None, store: Any = None, text: Any = None
) -> dict[str, Any]:
    """Identity of the text encoder and text set behind ``vocab``'s embeddings (JSON-safe).

    Args:
        vocab: the ``methods.base.Vocab`` trained against.
        text_model: the registry name of its text encoder.
        store: a store (or path) where the text set is looked up when ``text`` is not given
            (found only when ``vocab.templates`` names the template set and the cached
            embeddings equal ``vocab``'s).
        text: the ``featurestore.text.TextEmbeddings`` the vocabulary was made from.

    Returns:
        ``text_model``, ``templates`` (template-set name), ``text_weights`` (``sha256:...`` of
        the checkpoint, ``random-init:SEED``, or None when unknown), ``text_arch_overrides``,
        ``text_set`` (its key in the store) and ``vocabulary_key`` (the vocabulary's
        16-hex-digit key: sha256 of its synonym lists).
    """
    from featurestore.text import Vocabulary, load_text_embeddings

    names = [list(c) for c in vocab.class_names]
    out: dict[str, Any] = {
        "text_model": text_model,
        "templates": getattr(vocab, "templates", "") or None,
        "text_weights": None,
        "text_arch_overrides": None,
        "text_set": None,
        "vocabulary_key": Vocabulary.from_names(names).key(),
    }
    if text is None and store is not None and text_model and out["templates"]:
        try:
            te = load_text_embeddings(
                store, text_model, Vocabulary.from_names(names), out["templates"]
            )
            same = tuple(te.embeddings.shape) == tuple(vocab.embeddings.shape) and np.allclose(
                te.embeddings, vocab.embeddings.float().cpu().numpy(), atol=1e-6
            )
            text = te if same else None
        except OvssError:
            text = None
    if text is not None:
        out.update(
            text_model=text_model or text.text_model,
            templates=text.template_set,
            text_weights=text.weights or None,
            text_arch_overrides=text.provenance.get("encoder", {}).get("arch_overrides"),
            text_set=text.key,
            vocabulary_key=text.provenance.get("vocabulary", {}).get("key")
            or out["vocabulary_key"],
        )
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints: provenance, atomic saves, safe loads, resume
# --------------------------------------------------------------------------------------------


class CheckpointError(OvssError):
    """A checkpoint cannot be used: missing, not an ovss checkpoint, unsafe or of another run.

    Attributes:
        path: the checkpoint file.
        reason: ``missing``, ``unsafe`` (holds pickled objects), ``format`` or ``mismatch``.
        differs: for ``mismatch``, the provenance keys that differ.
    """

    def __init__(
        self, message: str, path: str = "", reason: str = "", differs: tuple[str, ...] = ()
    ):
        super().__init__(message)
        self.path = path
        self.reason = reason
        self.differs = tuple(differs)


def library_versions() -> dict[str, str]:
    """Versions recorded in every checkpoint (ovss, torch, numpy, python)."""
    from featurestore import __version__

    return {
        "ovss": __version__,
        "torch": torch.__version__.split("+")[0],
        "numpy": np.__version__,
        "python": ".".join(str(v) for v in sys.version_info[:3]),
    }


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON values (dicts, lists, str, int, float, bool, None): paths become
    strings, tuples lists, numpy scalars Python numbers, protocols and dataclasses dicts.

    Raises:
        TypeError: a value with no plain form (it would need pickling in a checkpoint).
    """

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, np.generic):
            return v.item()
        if hasattr(v, "to_dict") and callable(v.to_dict):
            return v.to_dict()
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return dataclasses.asdict(v)
        raise TypeError(f"{type(v).__name__} is not a plain checkpoint value")

    return json.loads(json.dumps(obj, default=conv))


def checkpoint_provenance(
    trainer: str,
    config: Any,
    features: Any = None,
    tensor: str | None = None,
    vocabulary: dict[str, Any] | None = None,
    labels: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The provenance every trainer's checkpoint records (plain JSON values).

    Args:
        trainer: the trainer's name.
        config: its typed config (recorded field by field).
        features: the ``featurestore.store.FeatureSet`` trained on (key, model, protocol,
            backbone weights identity, tensor, store) or None.
        tensor: the tensor read from ``features``.
        vocabulary: class names and the text encoder identity (see :func:`text_identity`).
        labels: the label source's ``describe()``.
        extra: further trainer-specific sections (e.g. ``dims``).

    Returns:
        ``{"trainer", "features", "vocabulary", "labels", "config", **extra, "versions",
        "ovss_version"}``.
    """
    prov: dict[str, Any] = {"trainer": trainer}
    if features is not None:
        fp = features.provenance
        prov["features"] = {
            "key": features.key,
            "model": fp["model"],
            "protocol": fp["protocol"],
            "weights": fp["backbone"].get("weights"),
            "tensor": tensor,
            "store": str(features.store.path),
        }
    if vocabulary is not None:
        prov["vocabulary"] = vocabulary
    if labels is not None:
        prov["labels"] = labels
    prov["config"] = config_to_dict(config) if dataclasses.is_dataclass(config) else config
    prov.update(extra)
    versions = library_versions()
    prov["versions"] = versions
    prov["ovss_version"] = versions["ovss"]
    return plain(prov)


#: Provenance sections that must match for a resume (``versions`` and ``created`` need not).
RUN_KEYS = ("trainer", "features", "vocabulary", "labels", "dims")


def differing(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...] = RUN_KEYS) -> list[str]:
    """Provenance keys whose values differ (a resume must match exactly: a schedule depends on
    ``epochs``, so a longer run is a new run); config fields are named ``config.FIELD``."""
    diff = [k for k in keys if a.get(k) != b.get(k)]
    ca, cb = a.get("config") or {}, b.get("config") or {}
    diff += [f"config.{k}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    return diff


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` atomically (a temporary file, then ``os.replace``).

    ``state`` may hold tensors, state dicts and plain values only, so that
    :func:`read_checkpoint` loads it with ``weights_only=True``; its ``provenance`` (if any)
    is checked to be plain JSON.
    """
    p = Path(path)
    if "provenance" in state:
        state = {**state, "provenance": plain(state["provenance"])}
    tmp = p.with_name(p.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, p)
    return p


_UNSAFE = re.compile(r"GLOBAL ([\w.]+)")

#: Resolved paths of checkpoints the user vouched for (``--trust-checkpoint``), while a
#: :func:`trusted_checkpoints` block runs.
_TRUSTED: dict[Path, int] = {}
_TRUSTED_LOCK = threading.Lock()


@contextlib.contextmanager
def trusted_checkpoints(*paths: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, :func:`read_checkpoint` loads the files at ``paths`` (None and ''
    ignored) as full pickles (``weights_only=False``): code in them runs. The CLI's
    ``--trust-checkpoint`` (segment / eval ``--checkpoint``, align resume) is the only way a
    command gets here [ours]; every other file stays ``weights_only=True``. Nestable and
    thread-safe; the trust ends with the block.
    """
    keys = [Path(p).resolve() for p in paths if p not in (None, "")]
    with _TRUSTED_LOCK:
        for k in keys:
            _TRUSTED[k] = _TRUSTED.get(k, 0) + 1
    try:
        yield
    finally:
        with _TRUSTED_LOCK:
            for k in keys:
                _TRUSTED[k] -= 1
                if not _TRUSTED[k]:
                    del _TRUSTED[k]


def _is_trusted(p: Path) -> bool:
    with _TRUSTED_LOCK:
        return p.resolve() in _TRUSTED


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", trust: bool = False
) -> dict[str, Any]:
    """A checkpoint's dict, loaded with ``torch.load(weights_only=True)``: tensors and plain
    values only, no code runs.

    ``trust`` (or ``path`` named to an enclosing :func:`trusted_checkpoints`): load it as a
    full pickle instead (``weights_only=False``; code in the file runs), for an old checkpoint
    whose origin the user knows.

    Raises:
        CheckpointError: no file, not a torch checkpoint, or it holds pickled objects (one
            line naming the first offending global, and the way past for a trusted file).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}", str(p), "missing")
    if trust or _is_trusted(p):
        try:  # the user vouched for this file: the one full-pickle load of the tree
            ck = torch.load(p, map_location=map_location, weights_only=False)
        except Exception as e:  # noqa: BLE001 - whatever the pickle raises, one line
            raise CheckpointError(
                f"{p} is not a readable checkpoint ({type(e).__name__}: {e})", str(p), "format"
            ) from None
        if not isinstance(ck, dict):
            raise CheckpointError(f"{p} is not an ovss checkpoint", str(p), "format")
        return ck
    try:
        ck = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError (unsafe), RuntimeError/EOFError (not a checkpoint)
        text = str(e)
        m = _UNSAFE.search(text)
        if m or "weights_only" in text.lower():
            what = f" ({m.group(1)})" if m else ""
            raise CheckpointError(
                f"{p} holds pickled Python objects{what}; ovss loads checkpoints with "
                "weights_only (tensors and plain values, no code runs) and refuses it",
                str(p),
                "unsafe",
            ) from None
        raise CheckpointError(
            f"{p} is not a readable checkpoint ({type(e).__name__})", str(p), "format"
        ) from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{p} is not an ovss checkpoint", str(p), "format")
    return ck


def resume_state(
    path: str | os.PathLike,
    provenance: dict[str, Any],
    restart: bool = False,
    map_location: str | torch.device = "cpu",
    keys: tuple[str, ...] = RUN_KEYS,
    trust: bool = False,
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` to resume from, or None (no file, or ``restart``).
    ``trust``: load it as a full pickle (:func:`read_checkpoint`; ``TrainRequest.trust_checkpoint``).

    Raises:
        CheckpointError: the checkpoint was made by another run (other features, labels,
            vocabulary or hyperparameters): names what differs.
    """
    p = Path(path)
    if restart or not p.exists():
        return None
    ck = read_checkpoint(p, map_location, trust)
    diff = differing(ck.get("provenance") or {}, provenance, keys)
    if diff:
        raise CheckpointError(
            f"{p} was trained with other {', '.join(diff)}",
            str(p),
            "mismatch",
            tuple(diff),
        )
    return ck


def now_utc() -> str:
    """ISO timestamp (seconds) recorded as ``created``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class StepMeter:
    """Progress events of a training loop, with throughput.

    ``step(...)`` emits ``{"stage": "train", "epoch", "epochs", "step", "steps", "loss", "lr",
    "items_per_s"}`` (items: images, captions... per second since the epoch started);
    ``end_epoch(record)`` returns ``record`` with ``seconds`` and ``items_per_s`` added and
    emits ``{"stage": "epoch", **record, "epochs"}``. ``progress`` None: nothing is emitted.
    """

    def __init__(self, progress: ProgressFn | None, epochs: int, steps: int, unit: str = "items"):
        self.progress, self.epochs, self.steps, self.unit = progress, epochs, steps, unit
        self.start_epoch()

    def start_epoch(self) -> None:
        self.t0 = time.perf_counter()
        self.items = 0

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.items / dt if dt > 0 else 0.0

    def step(self, epoch: int, step: int, loss: float, lr: float | None, items: int) -> None:
        self.items += items
        if self.progress:
            self.progress(
                {
                    "stage": "train",
                    "epoch": epoch,
                    "epochs": self.epochs,
                    "step": step,
                    "steps": self.steps,
                    "loss": loss,
                    "lr": lr,
                    "items_per_s": round(self.rate(), 2),
                    "unit": self.unit,
                }
            )

    def end_epoch(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {
            **record,
            "seconds": round(time.perf_counter() - self.t0, 3),
            "items_per_s": round(self.rate(), 2),
        }
        return record

    def report_epoch(self, record: dict[str, Any]) -> None:
        if self.progress:
            self.progress({"stage": "epoch", **record, "epochs": self.epochs, "unit": self.unit})


def format_event(ev: dict[str, Any]) -> str:
    """One plain line for a progress event (logs, non-terminal stderr)."""
    stage = ev.get("stage")
    unit = ev.get("unit", "items")
    if stage == "epoch":
        loss = ev.get("loss")
        extras = [f"loss {loss:.4f}" if loss is not None else "loss n/a"]
        extras += [
            f"{k.replace('_', ' ')} {v:.3f}"
            for k, v in ev.items()
            if k not in ("stage", "epoch", "epochs", "loss", "seconds", "items_per_s", "unit")
            and isinstance(v, float)
        ]
        return (
            f"epoch {ev['epoch']}/{ev['epochs']}: {', '.join(extras)}, "
            f"{ev.get('items_per_s', 0):.1f} {unit}/s, {ev.get('seconds', 0):.1f} s"
        )
    if stage == "train":
        lr = f" lr {ev['lr']:.2e}" if ev.get("lr") is not None else ""
        return (
            f"epoch {ev['epoch']}/{ev['epochs']} step {ev['step']}/{ev['steps']}: "
            f"loss {ev['loss']:.4f}{lr}, {ev.get('items_per_s', 0):.1f} {unit}/s"
        )
    return f"{stage}: {ev.get('done')}/{ev.get('total')}"


__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "DatasetLabelSource",
    "DistContext",
    "LabelRequest",
    "LossInfo",
    "StepMeter",
    "StoreLabelSource",
    "TextOptions",
    "TrainRequest",
    "TrainResult",
    "Trainer",
    "checkpoint_provenance",
    "differing",
    "embed_classes",
    "format_event",
    "get_loss",
    "get_trainer",
    "library_versions",
    "list_losses",
    "list_trainers",
    "open_labels",
    "plain",
    "read_checkpoint",
    "register_loss",
    "register_trainer",
    "resolve_text",
    "resume_state",
    "save_checkpoint",
    "setup_distributed",
    "text_identity",
    "trusted_checkpoints",
]
