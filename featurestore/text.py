"""Text embeddings of vocabularies: template sets, vocabularies, the §0.1 embedding, the store cache.

A *vocabulary* is a list of classes, each a list of synonyms; every synonym is its own *query*
(``query_to_class[q]`` is the class of query ``q``). A query's embedding is METHODS.md §0.1::

    e_t = l2n(encode_text(template_t.format(query)))   for every template t of the set
    e   = l2n(mean_t e_t)

The text encoder is any registered kind (``featurestore.text_encoders``: the CLIP towers, and
kinds methods register, such as a trained text tower or learnable prompts from a checkpoint).
Embeddings are cached in the feature store per (encoder identity, vocabulary, template set)::

    <store>/text/<encoder>/<vocabulary key>-<template set>/
        embeddings        (Q, E) float32, unit rows, query order
        query_to_class    (Q,) int32
        attrs["text_set"] provenance: queries, class names, vocabulary source, template set and
                          its templates, the encoder spec, its identity (and its hash), its
                          provenance (BackboneInfo, precision, context mode), ovss version,
                          creation time

``<encoder>`` is the spec of a CLIP tower (``clip-b16``; a set of other weights is refused, not
reused) or ``<kind>-<identity hash>`` for other kinds (two checkpoints never share a set).

The ``text_set`` attribute is written last, so a group without it (an interrupted write) counts
as missing and is rewritten.

Vocabulary specs (``parse_vocab``, ``ovss extract --vocab``), tried in this order (an existing
file of the same name wins over a dataset name; the prefixes force one reading):

* ``dataset:NAME[/FAMILY]`` or ``NAME[/FAMILY]`` with NAME a benchmark (or alias): its bundled
  class file; FAMILY ``sclip`` (default) or ``proxyclip``;
* ``file:PATH`` or a path to an existing file: a class file (one class per line, synonyms
  separated by ``", "`` or ``"; "``, see :func:`featurestore.datasets.read_class_file`);
* ``list:...`` or any text containing a comma: a comma list. Commas separate classes,
  semicolons separate the synonyms of one class: ``"sky;clouds,tree,horse;pony"`` is three
  classes and five queries. Names are stripped; a single class is written with a trailing comma
  (``"sky,"``).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurestore import __version__
from featurestore.errors import MissingTextSetError, OvssError, StoreError, WeightsNotFoundError
from featurestore.text_encoders import (  # noqa: F401 (re-exported: the text encoder API)
    ClipTextEncoder,
    TextEncoder,
    TextEncoderKind,
    TextEncoderOptions,
    create_text_encoder,
    file_identity,
    identity_hash,
    jsonable,
    list_text_encoders,
    load_clip_tower,
    lookup_text_encoder,
    register_text_encoder,
)

if TYPE_CHECKING:
    import torch


ProgressCallback = Callable[[str, int, int], None]  # (label, done, total)

TEXT_GROUP = "text"
DEFAULT_TEMPLATES = "openai80"

# --------------------------------------------------------------------------------------------
# Template sets
# --------------------------------------------------------------------------------------------

_CLIP7 = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
_SUB_IMAGENET7 = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
_STATIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    # CLIP notebook's 7 (sequential forward selection order), EVAL.md §3.3.
    "clip7": _CLIP7,
    # PixelCLIP's IMAGENET_TEMPLATES_SELECT: CLIP's 7 + one ViLD-style template (no period).
    "pixelclip8": (*_CLIP7, "A photo of a {} in the scene"),
    # TCL / ProxyCLIP / Trident sub_imagenet_template ("a bad photo of *a*").
    "sub_imagenet7": _SUB_IMAGENET7,
    # TCL's default "custom" set.
    "tcl9": (*_SUB_IMAGENET7, "a photo of many {}.", "a photo of {}s."),
    # TCL / MaskCLIP maskclip_templates.
    "maskclip5": (
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
    ),
    # FMbSeg's single template.
    "single": ("a photo of a {}.",),
}
TEMPLATE_SET_DOCS: dict[str, str] = {
    "openai80": "the 80 OpenAI ImageNet templates (open_clip's list; SCLIP/ProxyCLIP/Trident)",
    "clip7": "CLIP notebook's 7 selected templates",
    "pixelclip8": "PixelCLIP imagenet_select: clip7 + 'A photo of a {} in the scene'",
    "sub_imagenet7": "TCL/ProxyCLIP sub_imagenet_template ('a bad photo of a {}.')",
    "tcl9": "TCL default: sub_imagenet7 + 'a photo of many {}.', 'a photo of {}s.'",
    "maskclip5": "MaskCLIP/TCL 'there is a {} in the scene.' family",
    "single": "'a photo of a {}.' (FMbSeg)",
}


def list_template_sets() -> list[str]:
    """Names accepted by :func:`get_templates` (``openai80`` first)."""
    return list(TEMPLATE_SET_DOCS)


@functools.lru_cache(maxsize=1)
def _openai80() -> tuple[str, ...]:
    try:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    except ImportError:
        raise OvssError(
            "the openai80 templates come from open_clip, which is not installed; "
            "pip install 'ovss[clip]'"
        ) from None
    out = []
    for t in OPENAI_IMAGENET_TEMPLATES:
        # open_clip stores f-string lambdas; called with "{}" they give the format string.
        text = t("{}") if callable(t) else str(t)
        if text.count("{}") != 1:
            raise OvssError(f"unexpected open_clip template {text!r}")
        out.append(text)
    return tuple(out)


def get_templates(name: str) -> list[str]:
    """The templates of set ``name`` as format strings with one ``{}``, in reference order.

    Raises:
        OvssError: unknown name (the message lists the known sets).
    """
    if name == "openai80":
        return list(_openai80())
    if name not in _STATIC_TEMPLATES:
        raise OvssError(
            f"'{name}' is not a known template set; choose from {', '.join(list_template_sets())}"
        )
    return list(_STATIC_TEMPLATES[name])


# --------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """Classes (each a list of synonyms) and where they came from.

    Attributes:
        classes: per class, in label order, its synonyms (each one query).
        source: ``dataset:<name>/<family>``, ``file:<sha256 of the file>`` or ``list``.
        origin: the spec that reproduces it (``dataset:ade20k/sclip``, the file path, or the
            comma list), used in messages that say which command makes a missing set.
    """

    classes: tuple[tuple[str, ...], ...]
    source: str = "list"
    origin: str = ""

    def __post_init__(self) -> None:
        if not self.classes:
            raise OvssError("a vocabulary needs at least one class")
        for i, syns in enumerate(self.classes):
            if not syns or any(not s for s in syns):
                raise OvssError(f"class {i} of the vocabulary has an empty name")

    @classmethod
    def from_names(
        cls, classes: Sequence[Sequence[str] | str], source: str = "list", origin: str = ""
    ) -> Vocabulary:
        """Build from per-class synonym lists (a plain string is a class with one name)."""
        norm = tuple((c,) if isinstance(c, str) else tuple(c) for c in classes)
        if not origin and source == "list":
            origin = ",".join(";".join(s.strip() for s in syns) for syns in norm)
        return cls(norm, source, origin)

    @property
    def class_names(self) -> list[list[str]]:
        """Per class, its synonyms (a fresh list of lists)."""
        return [list(s) for s in self.classes]

    @property
    def queries(self) -> list[str]:
        """Every synonym of every class, class by class (the text queries)."""
        return [q for syns in self.classes for q in syns]

    @property
    def query_to_class(self) -> np.ndarray:
        """``(Q,)`` int64: the class index of each query."""
        return np.repeat(
            np.arange(len(self.classes), dtype=np.int64), [len(s) for s in self.classes]
        )

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_queries(self) -> int:
        return sum(len(s) for s in self.classes)

    def key(self) -> str:
        """A stable 16-hex-digit id: sha256 of the synonym lists (queries and their grouping).

        The same names give the same key whatever the source (dataset name, file or list).
        """
        blob = json.dumps([list(s) for s in self.classes], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def spec(self) -> str:
        """A ``--vocab`` spec that gives this vocabulary back."""
        return self.origin or ",".join(";".join(s) for s in self.classes)

    def describe(self) -> str:
        """One line: source, classes and queries."""
        return f"{self.source} ({self.n_classes} classes, {self.n_queries} queries)"


def _parse_list(text: str) -> list[list[str]]:
    classes = []
    items = text.split(",")
    if items and not items[-1].strip():  # a trailing comma ("sky,") makes a one-class list
        items = items[:-1]
    for i, item in enumerate(items):
        syns = [s.strip() for s in item.split(";") if s.strip()]
        if not syns:
            raise OvssError(
                f"class list {text!r}: item {i + 1} is empty (commas separate classes, "
                "semicolons separate synonyms)"
            )
        classes.append(syns)
    if not classes:
        raise OvssError(f"class list {text!r} names no class")
    return classes


def _file_vocab(path: str | os.PathLike) -> Vocabulary:
    from featurestore.datasets import read_class_file

    p = Path(path).expanduser()
    classes = read_class_file(p)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return Vocabulary.from_names(classes, source=f"file:{digest}", origin=str(p))


def _dataset_vocab(name: str, family: str, data_root: str | os.PathLike | None) -> Vocabulary:
    from featurestore.datasets import FAMILIES, class_names, get_dataset

    spec = get_dataset(name)
    fam = FAMILIES.get(family.lower())
    if fam is None:
        raise OvssError(
            f"'{family}' is not a known class-name family; choose from {', '.join(FAMILIES)}"
        )
    classes = class_names(spec.name, fam, data_root=data_root)
    if spec.name == "custom":
        root = Path(str(data_root)).expanduser() / "classes.txt"
        return Vocabulary.from_names(
            classes,
            source=f"file:{hashlib.sha256(root.read_bytes()).hexdigest()}",
            origin=str(root),
        )
    tag = f"dataset:{spec.name}/{fam}"
    return Vocabulary.from_names(classes, source=tag, origin=tag)


def _as_dataset(spec: str) -> tuple[str, str | None] | None:
    """``(name, family)`` when ``spec`` names a dataset (``ade20k``, ``voc21/proxyclip``)."""
    from featurestore.datasets import FAMILIES, get_dataset

    name, _, family = spec.partition("/")
    if family and family.lower() not in FAMILIES:
        return None
    try:
        get_dataset(name)
    except OvssError:
        return None
    return name, (family or None)


def parse_vocab(
    spec: str | Vocabulary | Sequence[Sequence[str] | str],
    family: str = "sclip",
    data_root: str | os.PathLike | None = None,
) -> Vocabulary:
    """A vocabulary from a dataset name, a class file or a comma list (see the module doc).

    Args:
        spec: the spec string; a :class:`Vocabulary` (returned as is) or a list of classes
            (each a name or a list of synonyms) are accepted too.
        family: class-file family for dataset names without ``/FAMILY``: ``sclip`` or
            ``proxyclip`` (EVAL.md §2.1).
        data_root: the ``custom`` dataset's root (its ``classes.txt``).

    Raises:
        OvssError: the spec is none of the accepted forms, or the named file/list is invalid.
    """
    if isinstance(spec, Vocabulary):
        return spec
    if not isinstance(spec, str):
        return Vocabulary.from_names(list(spec))
    text = spec.strip()
    if not text:
        raise OvssError("empty vocabulary spec: give a dataset name, a class file or 'a,b,c'")
    kind, sep, rest = text.partition(":")
    if sep and kind in ("dataset", "file", "list"):
        if kind == "dataset":
            hit = _as_dataset(rest)
            if hit is None:
                from featurestore.datasets import list_datasets

                raise OvssError(
                    f"'{rest}' is not a known dataset[/family]; choose from "
                    f"{', '.join(list_datasets())} (families: sclip, proxyclip)"
                )
            return _dataset_vocab(hit[0], hit[1] or family, data_root)
        if kind == "file":
            return _file_vocab(rest)
        return Vocabulary.from_names(_parse_list(rest), source="list", origin=rest)
    if "," not in text:
        hit = _as_dataset(text)
        if hit is not None and not Path(text).expanduser().is_file():
            return _dataset_vocab(hit[0], hit[1] or family, data_root)
    if Path(text).expanduser().is_file():
        return _file_vocab(text)
    if "," in text:
        return Vocabulary.from_names(_parse_list(text), source="list", origin=text)
    from featurestore.datasets import list_datasets

    raise OvssError(
        f"'{text}' is not a dataset ({', '.join(list_datasets())}), an existing class file, "
        "or a comma list; write a single class as 'name,'"
    )


# --------------------------------------------------------------------------------------------
# Embedding (METHODS.md §0.1)
# --------------------------------------------------------------------------------------------


def embed_vocabulary(
    model: TextEncoder | Any,
    tokenizer: Callable[[list[str]], torch.Tensor] | None,
    vocab: Vocabulary,
    templates: Sequence[str],
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Query embeddings ``(Q, E)`` float32 with unit rows, METHODS.md §0.1 exactly.

    For every query and template: ``l2n(encode(template.format(query)))``; the query's
    embedding is the L2-normalised mean over templates. Texts are encoded in batches of
    ``batch_size`` (higher is faster on GPU but uses more memory) in the model's dtype; the
    normalisation and mean are done in float32. A CLIP tower runs the exact truncated-context
    fast path (``featurestore.text_encoders``).

    Args:
        model: a :class:`~featurestore.text_encoders.TextEncoder` (``tokenizer`` and ``device``
            are then unused), or an ``open_clip`` CLIP (anything with ``encode_text(tokens)``),
            moved to ``device``.
        tokenizer: the open_clip tokenizer of ``model`` (list of strings -> ``(N, context)``
            token ids); None with a ``TextEncoder``.
        vocab: the vocabulary; rows follow ``vocab.queries``.
        templates: format strings with one ``{}``.
        progress: called as ``("text <model>", texts done, texts total)`` after each batch.
    """
    import torch

    templates = list(templates)
    if not templates:
        raise OvssError("the template set is empty")
    if isinstance(model, TextEncoder):
        encoder = model
    else:
        if tokenizer is None:
            raise OvssError("embed_vocabulary needs the tokenizer of an open_clip model")
        encoder = ClipTextEncoder("clip", model, tokenizer, device=str(device))
    queries = vocab.queries
    texts = [t.format(q) for q in queries for t in templates]
    raw = encoder.encode(texts, batch_size=batch_size, progress=progress).float()
    per_template = torch.nn.functional.normalize(raw, dim=-1).view(len(queries), len(templates), -1)
    mean = per_template.mean(dim=1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------
# Store cache
# --------------------------------------------------------------------------------------------


@dataclass
class TextEmbeddings:
    """One cached text set.

    Attributes:
        embeddings: ``(Q, E)`` float32, unit rows, in ``queries`` order.
        query_to_class: ``(Q,)`` int64 class index of each query.
        queries: the query strings.
        class_names: per class, its synonyms.
        text_model: registry name of the CLIP model (``clip-b16``).
        template_set: template-set name; ``templates`` holds its strings.
        weights: weights identity of the text encoder (``sha256:...`` / ``random-init:N``).
        key: path of the set inside the store (``text/<model>/<vocab key>-<templates>``).
        provenance: the full ``text_set`` attribute.
    """

    embeddings: np.ndarray
    query_to_class: np.ndarray
    queries: list[str]
    class_names: list[list[str]]
    text_model: str
    template_set: str
    templates: list[str]
    weights: str
    key: str
    provenance: dict = field(default_factory=dict)

    @property
    def vocabulary(self) -> Vocabulary:
        v = self.provenance.get("vocabulary", {})
        return Vocabulary.from_names(
            self.class_names, source=v.get("source", "list"), origin=v.get("origin", "")
        )


@dataclass
class _Layout:
    """Where the text sets of an encoder live and which cached sets it accepts."""

    store_name: str  # the group under text/
    want: dict | None  # the identity a cached set must have (None: no check)
    keyed: bool  # store_name carries the identity hash
    kind: TextEncoderKind | None = None
    encoder: TextEncoder | None = None  # built to learn the identity, reused to compute


def _layout(
    text_model: str | TextEncoder,
    opts: TextEncoderOptions | None = None,
    strict: bool = False,
) -> _Layout:
    """The layout of a spec or an encoder. ``strict``: an unknown spec is an error (else it
    names a group as is, for reading sets written under any name)."""
    opts = opts or TextEncoderOptions()
    if isinstance(text_model, TextEncoder):
        enc = text_model
        try:
            kind: TextEncoderKind | None = lookup_text_encoder(enc.name)
        except OvssError:
            kind = None
        keyed = kind.keyed_by_identity if kind is not None else enc.kind != "clip"
        ident = jsonable(enc.identity())
        slug = kind.slug if kind is not None else re.sub(r"[^A-Za-z0-9_.-]+", "-", enc.kind)
        name = f"{slug}-{identity_hash(ident)}" if keyed else enc.name
        return _Layout(name, ident, keyed, kind, enc)
    try:
        kind = lookup_text_encoder(text_model)
    except OvssError:
        if strict:
            raise
        return _Layout(text_model, None, False)
    ident = kind.identify(text_model, opts) if kind.identify is not None else None
    if not kind.keyed_by_identity:
        return _Layout(text_model, None if ident is None else jsonable(ident), False, kind)
    enc = None
    if ident is None:  # the kind can only tell its identity once built
        enc = _build(kind, text_model, opts)
        ident = enc.identity()
    ident = jsonable(ident)
    return _Layout(f"{kind.slug}-{identity_hash(ident)}", ident, True, kind, enc)


def _build(kind: TextEncoderKind, spec: str, opts: TextEncoderOptions) -> TextEncoder:
    return kind.factory(spec, opts)


def text_set_key(
    text_model: str | TextEncoder,
    vocab: Vocabulary,
    template_name: str,
    options: TextEncoderOptions | None = None,
) -> str:
    """Path of a text set inside the store: ``text/<encoder>/<vocab key>-<template set>``.

    ``<encoder>`` is the spec of a CLIP tower (``clip-b16``) and ``<kind>-<identity hash>`` for
    kinds keyed by identity (module doc of ``featurestore.text_encoders``); ``options`` are the
    encoder's build options (weights, random init, ...), which may change its identity.
    """
    return f"{TEXT_GROUP}/{_layout(text_model, options).store_name}/{vocab.key()}-{template_name}"


def _spec_of(text_model: str | TextEncoder) -> str:
    return text_model.name if isinstance(text_model, TextEncoder) else text_model


def _open(store: Any, mode: str = "r"):
    """A FeatureStore for ``store`` (a store or a path); ``mode="a"`` reopens it writable."""
    from featurestore.hdf5 import is_hdf5_path
    from featurestore.store import FeatureStore

    path = store.path if isinstance(store, FeatureStore) else str(store)
    if mode != "r" and is_hdf5_path(path):
        raise StoreError(f"{path} is an HDF5 export (read-only); add text sets to the Zarr store")
    if isinstance(store, FeatureStore) and mode == "r":
        return store
    return FeatureStore.open(path, mode=mode)


def _group_complete(root: Any, key: str) -> bool:
    try:
        g = root[key]
    except KeyError:
        return False
    return "text_set" in g.attrs


def store_text_embeddings(
    store: Any,
    text_model: str | TextEncoder,
    vocab: Vocabulary,
    template_name: str,
    embeddings: np.ndarray,
    provenance: dict,
    *,
    overwrite: bool = False,
    identity: dict | None = None,
) -> str:
    """Write a text set into the store and return its key (:func:`text_set_key`).

    Args:
        store: a :class:`~featurestore.store.FeatureStore` or a store path.
        text_model: the encoder's spec (or the encoder).
        embeddings: ``(Q, E)`` query embeddings (stored as float32).
        provenance: what to record about the encoder: a ``BackboneInfo`` as a dict (``weights``,
            ``library``, ``arch``, ``extra``, ...) plus anything else worth recording
            (``arch_overrides``, ``precision``, ``context``).
        overwrite: replace an existing complete set (otherwise it is an error).
        identity: the encoder's identity (the cache key); default: ``kind``/``model``/
            ``weights``/``arch_overrides`` taken from ``provenance``.

    Raises:
        StoreError: the set exists (without ``overwrite``), the shape does not fit the
            vocabulary, or the store is read-only (an HDF5 export).
    """
    if identity is None:
        identity = (
            text_model.identity()
            if isinstance(text_model, TextEncoder)
            else {
                "kind": provenance.get("kind", "clip"),
                "model": text_model,
                "weights": str(provenance.get("weights", "")),
                "arch_overrides": provenance.get("arch_overrides") or None,
            }
        )
    identity = jsonable(identity)
    spec = _spec_of(text_model)
    try:
        kind: TextEncoderKind | None = lookup_text_encoder(spec)
    except OvssError:
        kind = None
    if kind is not None and kind.keyed_by_identity:
        name = f"{kind.slug}-{identity_hash(identity)}"
    elif kind is None and isinstance(text_model, TextEncoder) and text_model.kind != "clip":
        name = _layout(text_model).store_name
    else:
        name = spec
    key = f"{TEXT_GROUP}/{name}/{vocab.key()}-{template_name}"
    return _write_set(
        store, key, _spec_of(text_model), vocab, template_name, embeddings, provenance, identity,
        overwrite,
    )  # fmt: skip


def _write_set(
    store: Any,
    key: str,
    spec: str,
    vocab: Vocabulary,
    template_name: str,
    embeddings: np.ndarray,
    provenance: dict,
    identity: dict,
    overwrite: bool,
) -> str:
    st = _open(store, "a")
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != vocab.n_queries:
        raise StoreError(
            f"text embeddings have shape {emb.shape}, expected ({vocab.n_queries}, E) for "
            f"{vocab.describe()}"
        )
    if _group_complete(st.root, key) and not overwrite:
        raise StoreError(f"store {st.path} already holds text set '{key}' (use overwrite)")
    if key in st.root:
        del st.root[key]
    g = st.root.require_group(key)
    a = g.create_array("embeddings", shape=emb.shape, dtype="float32", chunks=emb.shape)
    a[...] = emb
    q2c = vocab.query_to_class.astype(np.int32)
    b = g.create_array("query_to_class", shape=q2c.shape, dtype="int32", chunks=q2c.shape)
    b[...] = q2c
    identity = jsonable(identity)
    record = {
        "text_model": spec,
        "vocabulary": {
            "key": vocab.key(),
            "source": vocab.source,
            "origin": vocab.origin,
            "classes": vocab.class_names,
            "queries": vocab.queries,
        },
        "template_set": template_name,
        "templates": get_templates(template_name),
        "embedding": "l2n(mean_t l2n(encode(t.format(query))))",
        "dim": int(emb.shape[1]),
        "identity": identity,
        "identity_hash": identity_hash(identity),
        "encoder": jsonable(provenance),
        "weights": str(identity.get("weights") or provenance.get("weights", "")),
        "ovss_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    g.attrs["text_set"] = record  # written last: marks the set complete
    return key


def _recorded_identity(prov: dict) -> dict:
    """The identity a set was made with (sets written before identities were recorded: the
    weights and arch overrides of their encoder record)."""
    if "identity" in prov:
        return dict(prov["identity"])
    return {
        "weights": prov.get("weights", ""),
        "arch_overrides": prov.get("encoder", {}).get("arch_overrides") or None,
    }


def _accepts(prov: dict, layout: _Layout) -> bool:
    """Whether a cached set (its ``text_set`` record) was made by the encoder of ``layout``.

    Keyed kinds: the same identity. CLIP towers: the same weights identity (``None`` wanted:
    any real, non-random weights) and the same arch overrides."""
    want = layout.want
    if want is None:
        return True
    have = _recorded_identity(prov)
    if layout.keyed:
        return identity_hash(jsonable(have)) == identity_hash(want)
    have_w = str(have.get("weights") or "")
    if want.get("weights") is None:
        if have_w.startswith("random-init:"):
            return False
    elif have_w != want["weights"]:
        return False
    return (have.get("arch_overrides") or None) == (want.get("arch_overrides") or None)


def _describe_identity(ident: dict | None) -> str:
    if not ident:
        return "unknown"
    w = ident.get("weights")
    ao = ident.get("arch_overrides")
    text = "real (non-random) weights" if w is None else f"weights {w}"
    return text + (f", arch overrides {ao}" if ao else "")


def _missing(
    st: Any, spec: str, vocab: Vocabulary, template_name: str, weights: str | None, reason: str,
    message: str,
) -> MissingTextSetError:  # fmt: skip
    return MissingTextSetError(
        message,
        store=st.path,
        text_model=spec,
        vocab_spec=vocab.spec(),
        templates=template_name,
        weights=weights,
        reason=reason,
    )


def load_text_embeddings(
    store: Any,
    text_model: str | TextEncoder,
    vocab: Vocabulary,
    template_name: str = DEFAULT_TEMPLATES,
    weights: str | None = None,
) -> TextEmbeddings:
    """Read a cached text set.

    Args:
        store: a :class:`~featurestore.store.FeatureStore` or a store path.
        text_model: the encoder's spec (``clip-b16``, ``simzss:/path/ckpt.pt``) or the encoder.
        weights: when given, the weights identity the set must have been made with (e.g. the
            one recorded in the CLIP image feature set it will be compared against).

    Raises:
        MissingTextSetError: the set is missing (``reason="missing"``) or was made with other
            weights (``"mismatch"``); the CLI renders the ``extract`` command that makes it.
    """
    st = _open(store)
    spec = _spec_of(text_model)
    key = text_set_key(text_model, vocab, template_name)
    if not _group_complete(st.root, key):
        have = ", ".join(s["key"] for s in list_text_sets(st)) or "none"
        raise _missing(
            st, spec, vocab, template_name, weights, "missing",
            f"store {st.path} has no {spec} text embeddings of {vocab.describe()} with "
            f"templates '{template_name}' (it has: {have}); get_text_embeddings computes it",
        )  # fmt: skip
    return _read_set(st, key, spec, template_name, weights, vocab)


def _read_set(
    st: Any,
    key: str,
    spec: str,
    template_name: str,
    weights: str | None = None,
    vocab: Vocabulary | None = None,
) -> TextEmbeddings:
    g = st.root[key]
    prov = dict(g.attrs["text_set"])
    have_w = prov.get("weights", "")
    if weights is not None and have_w != weights:
        raise _missing(
            st, spec, vocab, template_name, weights, "mismatch",
            f"text set '{key}' was made with weights {have_w}, not {weights}",
        )  # fmt: skip
    voc = prov["vocabulary"]
    return TextEmbeddings(
        embeddings=np.asarray(g["embeddings"][...], dtype=np.float32),
        query_to_class=np.asarray(g["query_to_class"][...], dtype=np.int64),
        queries=list(voc["queries"]),
        class_names=[list(c) for c in voc["classes"]],
        text_model=spec,
        template_set=template_name,
        templates=list(prov["templates"]),
        weights=have_w,
        key=key,
        provenance=prov,
    )


def list_text_sets(store: Any) -> list[dict]:
    """One dict per complete text set: key, text model (the encoder spec), vocabulary
    key/source, template set, queries, classes, embedding dim, weights identity, identity hash,
    creation time (for ``store info``)."""
    st = _open(store)
    if TEXT_GROUP not in st.root:
        return []
    out = []
    for model, mg in sorted(st.root[TEXT_GROUP].groups()):
        for name, g in sorted(mg.groups()):
            if "text_set" not in g.attrs:
                continue
            p = g.attrs["text_set"]
            voc = p["vocabulary"]
            out.append(
                {
                    "key": f"{TEXT_GROUP}/{model}/{name}",
                    "text_model": p.get("text_model", model),
                    "vocabulary": voc["key"],
                    "source": voc["source"],
                    "template_set": p["template_set"],
                    "queries": len(voc["queries"]),
                    "classes": len(voc["classes"]),
                    "dim": p["dim"],
                    "weights": p.get("weights", ""),
                    "identity": p.get("identity_hash", ""),
                    "created": p.get("created", ""),
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# On demand
# --------------------------------------------------------------------------------------------


def expected_weights(weights: str | os.PathLike | None, random_init: bool, seed: int) -> str | None:
    """The weights identity a text set must carry for these options, when it is known
    without loading the model: ``random-init:<seed>``, the checkpoint's ``sha256:...``, or None
    (weights resolved later: any real-weights set is accepted)."""
    if random_init:
        return f"random-init:{seed}"
    if weights is not None:
        return file_identity(str(weights))
    return None


def load_text_encoder(
    text_model: str,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    arch_overrides: dict | None = None,
) -> tuple[Any, Any, dict]:
    """``(open_clip model, tokenizer, provenance dict)`` of a CLIP tower (``clip-*`` or
    ``openclip:...``), through ``featurestore.backbones.clip.load_open_clip`` (same weights
    rules as ``ovss extract``). Other kinds: :func:`create_text_encoder`."""
    opts = TextEncoderOptions(
        None if weights is None else str(weights), random_init, seed, arch_overrides
    )
    return load_clip_tower(text_model, opts)


@dataclass
class TextSetReport:
    """What :func:`get_text_embeddings` did for one text set (``ovss extract --vocab``)."""

    text_model: str
    key: str
    source: str
    queries: int
    classes: int
    template_set: str
    status: str  # "computed", "cached" or "skipped: ..."
    seconds: float = 0.0


def get_text_embeddings(
    store: Any,
    text_model: str | TextEncoder,
    vocab: Vocabulary | str,
    template_name: str = DEFAULT_TEMPLATES,
    *,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    arch_overrides: dict | None = None,
    compute_if_missing: bool = True,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    report: list[TextSetReport] | None = None,
) -> TextEmbeddings:
    """The text set of ``vocab`` from the store, computed and cached first when missing.

    A cached set is used when it was made by the requested encoder (the cache key is its
    identity, ``featurestore.text_encoders``): for CLIP towers ``random_init`` needs
    ``random-init:<seed>`` and the same ``arch_overrides``, ``weights=PATH`` that file's sha256,
    otherwise any set made with real weights is accepted; kinds keyed by identity (a method's
    checkpoint) find exactly the set of the same checkpoint and options. A cached set is found
    without building the encoder when its kind can tell its identity up front.

    Args:
        store: a :class:`~featurestore.store.FeatureStore` or a store path (it must exist).
        text_model: an encoder spec (``clip-b16``, ``openclip:...``, a registered kind such as
            ``simzss:/path/ckpt.pt``) or a built :class:`TextEncoder` (then ``weights``,
            ``random_init``, ``seed``, ``arch_overrides`` and ``device`` are unused).
        vocab: a :class:`Vocabulary` or a spec for :func:`parse_vocab`.
        weights, random_init, seed, arch_overrides: the text encoder, as for ``ovss extract``.
        compute_if_missing: embed and cache a missing set (False: raise instead).
        device: where the text encoder runs.
        batch_size: texts per forward pass (default 256).
        overwrite: recompute even when a matching set exists (and replace a mismatched one).
        progress: ``("text <model>", texts done, texts total)`` after each batch.
        report: when given, a :class:`TextSetReport` is appended to it.

    Raises:
        MissingTextSetError: missing and ``compute_if_missing`` is False, or present but made
            with another encoder (and ``overwrite`` is False); the CLI renders the command.
        WeightsNotFoundError: the set must be computed and the encoder's weights are missing.
        OvssError: unknown encoder spec or template set, bad vocabulary.
    """
    vocab = parse_vocab(vocab)
    templates = get_templates(template_name)  # validate the name before anything else
    st = _open(store)
    opts = TextEncoderOptions(
        None if weights is None else str(weights), random_init, seed, arch_overrides, str(device)
    )
    spec = _spec_of(text_model)
    layout = _layout(text_model, opts, strict=True)
    key = f"{TEXT_GROUP}/{layout.store_name}/{vocab.key()}-{template_name}"
    want_w = (layout.want or {}).get("weights")
    if _group_complete(st.root, key) and not overwrite:
        prov = dict(st.root[key].attrs["text_set"])
        if _accepts(prov, layout):
            emb = _read_set(st, key, spec, template_name)
            if report is not None:
                report.append(_report(spec, key, vocab, template_name, "cached"))
            return emb
        raise _missing(
            st, spec, vocab, template_name, want_w, "mismatch",
            f"text set '{key}' in {st.path} was made with "
            f"{_describe_identity(_recorded_identity(prov))}, not "
            f"{_describe_identity(layout.want)}",
        )  # fmt: skip
    if not compute_if_missing:
        have = ", ".join(s["key"] for s in list_text_sets(st)) or "none"
        raise _missing(
            st, spec, vocab, template_name, want_w, "missing",
            f"store {st.path} has no {spec} text embeddings of {vocab.describe()} with "
            f"templates '{template_name}' (it has: {have})",
        )  # fmt: skip
    t0 = time.perf_counter()
    encoder = layout.encoder
    if encoder is None:
        try:
            encoder = _build(layout.kind, spec, opts)
        except WeightsNotFoundError as e:
            raise WeightsNotFoundError(
                f"{spec} text embeddings of {vocab.describe()} are not in {st.path} and the "
                f"text encoder cannot be loaded: {e}"
            ) from None
    emb = embed_vocabulary(
        encoder, None, vocab, templates, batch_size=batch_size, progress=progress
    )
    ident = jsonable(encoder.identity())
    if layout.keyed and identity_hash(ident) != identity_hash(layout.want):
        raise OvssError(
            f"text encoder '{spec}': its identity() {ident} differs from the one its kind's "
            f"identify() gave ({layout.want}); the two must agree"
        )
    _write_set(st, key, spec, vocab, template_name, emb, encoder.provenance(), ident, True)
    if report is not None:
        report.append(
            _report(spec, key, vocab, template_name, "computed", time.perf_counter() - t0)
        )
    return _read_set(st, key, spec, template_name)


def _report(
    text_model: str,
    key: str,
    vocab: Vocabulary,
    template_name: str,
    status: str,
    seconds: float = 0.0,
) -> TextSetReport:
    return TextSetReport(
        text_model=text_model,
        key=key,
        source=vocab.source,
        queries=vocab.n_queries,
        classes=vocab.n_classes,
        template_set=template_name,
        status=status,
        seconds=round(seconds, 3),
    )
