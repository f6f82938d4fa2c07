"""Sweeps and method comparisons in one pass over a store (``ovss eval --sweep`` /
``--method A --method B``).

A *configuration* is a method, its typed config, the scoring and the vocabulary side (text
model, templates, class-file family). A sweep is the grid of the swept keys' values (plus the
default configuration when the grid lacks it: the row every Δ is taken against); a comparison
is one configuration per method. Everything is checked before any image is read: an unknown
key, a value of the wrong type (coerced with the field's type, ``methods.config``), an unknown
template set.

One pass shares what does not depend on the swept keys:

- **features**: each feature set is read once per image, whatever the number of configurations
  reading it (one method instance per distinct method config, their sets read through one
  per-image memo; every reader gets its own copy of the arrays);
- **text**: one embedding per distinct vocabulary side (text model, templates, family);
- **dense output**: the cosine logits are computed once per image per (method config,
  vocabulary); the scoring configurations (``logit_scale``, ``prob_thd``, ``area_thd``) are
  applied to the same logits;
- **early stage**: a method may split its logits into an ``early_stage(index)`` that does not
  depend on the options it lists in ``late_fields`` (nor on the vocabulary) and a
  ``late_stage(state, index, vocab)``: configurations differing only in those options share
  the early stage per image (Trident: the window outputs and their splice, when only the
  affinity's ``cos_fac``/``cos_cap``/``refine_neg_cos``/``neg_cos_thr`` change);
- **derived cache** (``cache_dense``, :mod:`methods.dense_cache`): the logits stored per image,
  read by later runs of the same method config and vocabulary over the same feature sets.

Every row is what a separate ``run_eval`` of its configuration gives (the same calls in the
same order on the same inputs: the tests compare them exactly).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import ImagesNotInStoreError, OvssError
from featurestore.store import STATUS_OK, FeatureStore
from methods.base import ScoringConfig, Segmenter, Vocab, get_method
from methods.config import FieldInfo, coerce_value, config_fields, config_to_dict
from methods.evaluate import (
    EvalAccumulator,
    EvalRequest,
    EvalResult,
    _gt_for,
    _load_label,
    gallery_paths,
    require_complete,
)
from methods.scoring import score_logits, score_logits_thresholds
from methods.segment import (
    MethodSetup,
    RequestError,
    TextChoice,
    embed_text,
    protocol_record,
    resolve_method,
    resolve_vocabulary,
    text_choice,
)

Progress = Callable[[str, int, int], None]

#: Scoring keys a sweep can vary (the ``ScoringConfig`` fields).
SCORING_KEYS = tuple(f.name for f in config_fields(ScoringConfig))
#: Vocabulary-side keys a sweep can vary.
VOCABULARY_KEYS = ("templates", "family", "text_model")
FAMILIES = ("sclip", "proxyclip")


class SweepError(OvssError):
    """A sweep key or value that cannot be used.

    Attributes:
        key: the sweep key ('' for a general error).
        value: the value concerned (None when the key itself is wrong).
    """

    def __init__(self, message: str, key: str = "", value: Any = None):
        super().__init__(message)
        self.key = key
        self.value = value


@dataclass
class SweepRequest(EvalRequest):
    """What ``ovss eval --sweep`` / ``--method A --method B`` takes (the single-evaluation
    options: :class:`~methods.evaluate.EvalRequest`).

    Attributes:
        sweep: key -> values (strings from ``--sweep KEY=v1,v2``, or JSON/YAML values from a
            sweep file), in grid order. Keys: any option of the method(s), ``logit_scale``,
            ``prob_thd``, ``area_thd``, ``templates``, ``family``, ``text_model``, ``method``.
        methods: the methods compared (one row per method; () or one: ``method``).
        cache_dense: the derived dense cache: a folder, ``store`` (inside the store), or one
            entry folder of such a cache; None: no cache.
    """

    sweep: dict[str, list[Any]] = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    cache_dense: str | None = None


@dataclass
class Configuration:
    """One row's configuration, resolved (no store read).

    Attributes:
        values: swept key -> typed value.
        request: the equivalent single-evaluation request.
        setup: the method, typed config and scoring.
        vocabulary: the dataset's vocabulary under the family.
        text: the text tower.
        default: the configuration of the request without the sweep.
    """

    values: dict[str, Any]
    request: EvalRequest
    setup: MethodSetup
    vocabulary: Any
    text: TextChoice
    default: bool = False

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_show(v)}" for k, v in self.values.items()) or self.setup.cls.name

    @property
    def method_id(self) -> str:
        return json.dumps([self.setup.cls.name, config_to_dict(self.setup.config)], default=str)

    @property
    def text_id(self) -> str:
        t = self.text
        return json.dumps(
            [t.text_model, t.templates, t.weights, t.random_init, t.seed, t.arch_overrides]
            + [self.vocabulary.classes, self.vocabulary.source],
            default=str,
            sort_keys=True,
        )

    @property
    def identity(self) -> str:
        return json.dumps(
            [self.method_id, dataclasses.asdict(self.setup.scoring), self.text_id], default=str
        )


@dataclass
class SweepRow:
    """One configuration's result.

    Attributes:
        label: ``key=value ...`` (the method name in a plain comparison).
        values: swept key -> value.
        default: the default configuration (Δ reference).
        best: the highest mIoU (the first one on ties).
        delta_miou: mIoU minus the default row's (points; None when either is missing).
        result: the evaluation (equal to a separate ``ovss eval`` of the configuration).
    """

    label: str
    values: dict[str, Any]
    default: bool
    best: bool
    delta_miou: float | None
    result: EvalResult

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["values"] = {k: _jsonable(v) for k, v in self.values.items()}
        d["result"] = self.result.to_dict()
        return d


@dataclass
class SweepResult:
    """A sweep or comparison.

    Attributes:
        kind: ``sweep`` or ``compare`` (several methods, nothing else swept).
        dataset, split, store, data_root: what was scored.
        keys: the swept keys (``method`` for a comparison), in grid order.
        rows: one per configuration, the default first when it is not a grid point.
        seconds: the one pass's wall time (s), text embedding included.
        sharing: what the pass computed: ``feature_reads`` (tensor x image reads from disk),
            ``method_instances``, ``text_sets``, ``early_stages``, ``dense_computed``,
            ``dense_cached`` (logits read from the derived cache), ``scorings``.
        cache: per derived-cache entry used ``{"path", "hits", "writes", "images"}``.
    """

    kind: str
    dataset: str
    split: str
    store: str
    data_root: str
    keys: list[str]
    rows: list[SweepRow]
    seconds: float
    sharing: dict[str, int] = field(default_factory=dict)
    cache: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["rows"] = [r.to_dict() for r in self.rows]
        return d


def _show(v: Any) -> str:
    return "none" if v is None else str(v)


def _jsonable(v: Any) -> Any:
    return v.to_dict() if hasattr(v, "to_dict") else v


# ---------------------------------------------------------------------------------------------
# Parsing and planning
# ---------------------------------------------------------------------------------------------


def parse_sweep_items(items: Sequence[str]) -> dict[str, list[str]]:
    """``KEY=v1,v2,...`` strings (``--sweep``, repeatable) -> ``{key: [values]}`` (dashes in
    keys become underscores; the values stay text until coerced).

    Raises:
        SweepError: an item without ``=`` or without values, or a key given twice.
    """
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        vals = [v.strip() for v in values.split(",")] if sep else []
        if not key or not vals or any(not v for v in vals):
            raise SweepError(f"{item!r}: use KEY=v1,v2,..., e.g. prob_thd=0.1,0.2", key=key)
        if key in out:
            raise SweepError(f"sweep key {key} given twice; list all its values once", key=key)
        out[key] = vals
    return out


def read_sweep_file(path: str | Path) -> dict[str, list[Any]]:
    """A sweep file: a JSON or YAML mapping ``key: [values]`` (a single value: a one-value
    list), keys in grid order.

    Raises:
        SweepError: unreadable, not a mapping, or a key with no values.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SweepError(f"cannot read sweep file {p}: {e.strerror or e}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - JSON and YAML raise different types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SweepError(f"sweep file {p} is not valid {p.suffix[1:] or 'JSON'}: {first}") from None
    if not isinstance(data, dict) or not data:
        raise SweepError(f"sweep file {p} must be a mapping of key to a list of values")
    out: dict[str, list[Any]] = {}
    for k, v in data.items():
        vals = list(v) if isinstance(v, list) else [v]
        if not vals:
            raise SweepError(f"sweep file {p}: key {k} has no values", key=str(k))
        out[str(k).replace("-", "_")] = vals
    return out


def _scoped_settings(settings: dict[str, Any], method: str) -> dict[str, Any]:
    """``--set`` values for one method: unscoped keys, and ``METHOD:key`` keys of it."""
    norm = method.replace("-", "_")
    out = {}
    for k, v in settings.items():
        scope, sep, key = k.partition(":")
        if not sep:
            out[k] = v
        elif scope.replace("-", "_") == norm:
            out[key] = v
    return out


def _method_names(request: SweepRequest) -> list[str]:
    names = list(request.methods) or [request.method]
    for n in names:
        get_method(n)  # an unknown method fails here
    if len(set(names)) != len(names):
        raise SweepError("a method is given twice; give each method once", key="method")
    return names


def _coerce_key(key: str, raw: list[Any], methods: list[str]) -> list[Any]:
    """The typed values of one sweep key (see :class:`SweepRequest` for the keys)."""
    if key == "method":
        for v in raw:
            get_method(str(v))
        return [str(v) for v in raw]
    if key in SCORING_KEYS:
        info = next(f for f in config_fields(ScoringConfig) if f.name == key)
        return [coerce_value(info, v, "scoring") for v in raw]
    if key in VOCABULARY_KEYS:
        from featurestore.text import get_templates

        vals = [str(v) for v in raw]
        for v in vals:
            if key == "templates":
                get_templates(v)
            if key == "family" and v not in FAMILIES:
                raise SweepError(
                    f"sweep family expects one of {', '.join(FAMILIES)}, got {v!r}", key, v
                )
        return vals
    infos: dict[str, FieldInfo] = {}
    lacking = []
    for m in methods:
        fields = {f.name: f for f in config_fields(get_method(m).Config)}
        if key in fields:
            infos[m] = fields[key]
        else:
            lacking.append(m)
    if not infos:
        options = sorted({f.name for m in methods for f in config_fields(get_method(m).Config)})
        raise SweepError(
            f"unknown sweep key {key}; sweep a scoring key ({', '.join(SCORING_KEYS)}), "
            f"{', '.join(VOCABULARY_KEYS)}, method, or an option of {'/'.join(methods)}: "
            + ", ".join(options),
            key=key,
        )
    if lacking:
        raise SweepError(
            f"sweep key {key} is an option of {', '.join(infos)} but not of "
            f"{', '.join(lacking)}; sweep it in a run of {', '.join(infos)} alone",
            key=key,
        )
    out = []
    for v in raw:
        typed = [coerce_value(info, v, f"method {m}") for m, info in infos.items()]
        out.append(typed[0])
    return out


def _configure(
    base: SweepRequest, method: str, values: dict[str, Any], dataset: str
) -> Configuration:
    """Resolve one configuration: the request of a separate run, its method and text."""
    method_values = {
        k: v for k, v in values.items() if k not in SCORING_KEYS + VOCABULARY_KEYS + ("method",)
    }
    fields = {f.name for f in dataclasses.fields(EvalRequest)}
    plain = {k: getattr(base, k) for k in fields}
    plain.update(
        method=method,
        settings={**_scoped_settings(base.settings or {}, method), **method_values},
    )
    for k in VOCABULARY_KEYS:
        if k in values:
            plain[k] = values[k]
    for k in SCORING_KEYS:
        if k in values and values[k] is not None:
            plain[k] = values[k]
    request = EvalRequest(**plain)
    setup = resolve_method(request, dataset)
    scoring_values = {k: values[k] for k in SCORING_KEYS if k in values}
    if scoring_values:  # `area_thd=none` overrides a preset too
        setup.scoring = dataclasses.replace(setup.scoring, **scoring_values)
    vocabulary = resolve_vocabulary(f"dataset:{dataset}", setup, request.data_root)
    text = text_choice(request, setup)
    return Configuration(dict(values), request, setup, vocabulary, text)


def _default_values(cfg: Configuration, keys: list[str]) -> dict[str, Any]:
    s = cfg.setup
    out = {}
    for k in keys:
        if k == "method":
            out[k] = s.cls.name
        elif k in SCORING_KEYS:
            out[k] = getattr(s.scoring, k)
        elif k in VOCABULARY_KEYS:
            out[k] = getattr(s, k)
        else:
            out[k] = getattr(s.config, k)
    return out


def plan_configurations(request: SweepRequest) -> tuple[str, list[str], list[Configuration]]:
    """``(kind, keys, configurations)`` of a sweep request, every check done (no store read).

    The default configuration (the request without its sweep, the first method) is the first
    row when no grid point equals it, else that grid point is marked default.

    Raises:
        SweepError / ConfigError / OvssError: one line naming the key and value.
    """
    methods = _method_names(request)
    sweep = dict(request.sweep or {})
    if "method" in sweep and request.methods:
        raise SweepError("give the methods either as --method or as a sweep of method", "method")
    if "method" in sweep:
        methods = _coerce_key("method", sweep["method"], methods)
    typed: dict[str, list[Any]] = {}
    for key, raw in sweep.items():
        typed[key] = methods if key == "method" else _coerce_key(key, list(raw), methods)
    keys = list(typed)
    if len(methods) > 1 and "method" not in typed:
        typed = {"method": methods, **typed}
        keys = ["method", *keys]
    kind = "compare" if keys == ["method"] else "sweep"
    dataset = request.dataset
    grid = []
    for combo in itertools.product(*(typed[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        grid.append(_configure(request, str(values.get("method", methods[0])), values, dataset))
    default = _configure(request, methods[0], {}, dataset)
    default.values = _default_values(default, keys)
    for cfg in grid:
        if cfg.identity == default.identity:
            cfg.default = True
            break
    else:
        default.default = True
        grid.insert(0, default)
    return kind, keys, grid


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


class _SharedReads:
    """Per-image memo of feature-set reads shared by every method instance of a pass: each
    tensor of each set is read once per image (``reads`` counts those tensor reads)."""

    def __init__(self) -> None:
        self.index: int | None = None
        self.cache: dict[tuple[str, str], Any] = {}
        self.frames: dict[str, Any] = {}
        self.reads = 0

    def read(self, fs: Any, index: int, names: Sequence[str] | None) -> Any:
        if index != self.index:
            self.cache.clear()
            self.frames.clear()
            self.index = index
        wanted = (
            list(fs.tensor_names) if names is None else [n for n in fs.tensor_names if n in names]
        )
        missing = [n for n in wanted if (fs.key, n) not in self.cache]
        if missing or fs.key not in self.frames:
            got = fs.read(index, missing)
            for n in missing:
                self.cache[(fs.key, n)] = got.tensors[n]
            self.frames.setdefault(fs.key, got)
            self.reads += len(missing)
        # each reader gets its own arrays: a method may work in place on what it reads
        tensors = {n: self.cache[(fs.key, n)].copy() for n in wanted}
        return dataclasses.replace(self.frames[fs.key], tensors=tensors)


class _SharedSet:
    """A feature set whose ``read`` goes through a :class:`_SharedReads` memo."""

    def __init__(self, fs: Any, memo: _SharedReads):
        self._fs = fs
        self._memo = memo

    def read(self, index: int, names: Sequence[str] | None = None) -> Any:
        return self._memo.read(self._fs, index, names)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


@dataclass
class _Dense:
    """Configurations sharing one dense output: one method instance + one vocabulary."""

    seg: Segmenter
    vocab: Vocab
    rows: list[int]
    cache: Any = None


def _staged(seg: Segmenter) -> bool:
    return bool(getattr(seg, "late_fields", ())) and all(
        callable(getattr(seg, n, None)) for n in ("early_stage", "late_stage")
    )


def _early_key(cfg: Configuration, seg: Segmenter) -> str:
    if not _staged(seg) or getattr(seg, "segment_labels", None) is not None:
        return cfg.method_id
    late = set(seg.late_fields)
    config = {k: v for k, v in config_to_dict(cfg.setup.config).items() if k not in late}
    return json.dumps(["early", cfg.setup.cls.name, config], default=str)


def _labels(seg: Segmenter, index: int, cos: Any, vocab: Vocab, scoring: ScoringConfig):
    """``methods.segment.segment_image`` after the logits: scoring, then the method's refine."""
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
    return _refined(seg, index, cos, labels, max_prob, vocab, scoring)


def _refined(seg: Segmenter, index: int, cos: Any, labels: Any, max_prob: Any, vocab, scoring):
    """The method's own refinement hook (e.g. Trident's SAM refinement) after the scoring."""
    labels, max_prob = labels.cpu().numpy(), max_prob.cpu().numpy()
    refine = getattr(seg, "refine", None)
    if refine is not None:
        labels, max_prob = refine(index, cos, labels, max_prob, vocab, scoring)
    return labels


def run_sweep(request: SweepRequest, progress: Progress | None = None) -> SweepResult:
    """Evaluate every configuration of a sweep / comparison in one pass over the store.

    Order: the configurations are planned and checked (:func:`plan_configurations`), the
    method instances built over the store (their feature sets checked), the derived cache
    entries opened (refused when made under another identity), the vocabularies embedded
    (``progress`` reports it); then each image: its ground truth once, each early stage once,
    each dense output once (or from the cache), every scoring.

    Raises:
        RequestError: no store, or predictions given.
        SweepError / ConfigError: a sweep key or value that cannot be used.
        DenseCacheMismatchError: a derived cache entry of another identity.
        OvssError: whatever else is wrong, as one line.
    """
    from featurestore.extract import resolve_device
    from methods.reference import check_reference

    if not request.dataset or not request.data_root:
        raise RequestError("give the dataset and its data root", "dataset")
    if request.predictions:
        raise RequestError(
            "sweeps, comparisons and the derived cache run methods on a store, not predictions",
            "store",
        )
    if not request.store:
        raise RequestError("give the store to evaluate on", "store")
    kind, keys, configs = plan_configurations(request)
    t0 = time.perf_counter()
    device = str(resolve_device(request.device))
    store = FeatureStore.open(request.store)
    spec, records = _gt_for(request.dataset, request.data_root, request.split)
    if request.limit:
        records = records[: request.limit]

    memo = _SharedReads()
    segs: dict[str, Segmenter] = {}
    for cfg in configs:
        if cfg.method_id not in segs:
            seg = cfg.setup.cls(store, cfg.setup.config, device=device)
            seg.sets = {role: _SharedSet(fs, memo) for role, fs in seg.sets.items()}
            segs[cfg.method_id] = seg
    vocabs: dict[str, Vocab] = {}
    for cfg in configs:
        if cfg.text_id not in vocabs:
            vocabs[cfg.text_id], _ = embed_text(
                request.store, cfg.text, cfg.vocabulary, device, progress
            )

    dense: dict[tuple[str, str], _Dense] = {}
    early: dict[str, list[tuple[str, str]]] = {}
    for r, cfg in enumerate(configs):
        k = (cfg.method_id, cfg.text_id)
        if k not in dense:
            dense[k] = _Dense(segs[cfg.method_id], vocabs[cfg.text_id], [])
            early.setdefault(_early_key(cfg, segs[cfg.method_id]), []).append(k)
        dense[k].rows.append(r)
    if request.cache_dense:
        from methods.dense_cache import open_entry

        for d in dense.values():
            if getattr(d.seg, "segment_labels", None) is not None:
                raise OvssError(
                    f"method {d.seg.name} labels pixels itself: it has no dense output to "
                    "cache; run it without the derived cache"
                )
            d.cache = open_entry(request.cache_dense, request.store, d.seg, d.vocab)

    ids = {image_id: i for i, image_id in enumerate(store.image_ids)}
    by_index = {}
    skipped: dict[str, str] = {}
    for rec in records:
        if rec.image_id not in ids:
            skipped[rec.image_id] = "not in the store"
        else:
            by_index[ids[rec.image_id]] = rec
    if not by_index:
        raise ImagesNotInStoreError(
            f"none of the {len(records)} {request.dataset} images is in {request.store}",
            store=str(request.store),
            dataset=request.dataset,
            data_root=str(request.data_root),
            count=len(records),
        )
    ok: dict[str, np.ndarray] = {}
    for mid, seg in segs.items():
        mask = np.ones(store.n_images, dtype=bool)
        for fs in seg.sets.values():
            mask &= fs.status() == STATUS_OK
        ok[mid] = mask
    accs = [EvalAccumulator(vocabs[c.text_id].num_classes, request.gallery) for c in configs]
    skips: list[dict[str, str]] = [dict(skipped) for _ in configs]
    done = [0] * len(configs)
    seen: list[set[int]] = [set() for _ in configs]
    counts = dict(early_stages=0, dense_computed=0, dense_cached=0, scorings=0)
    paths = store.image_table()["path"]
    order = sorted(by_index)
    for n_done, i in enumerate(order, 1):
        rec = by_index[i]
        gt: Any = None  # loaded once, on first use
        for group in early.values():
            state: Any = None
            for k in group:
                d = dense[k]
                mid = configs[d.rows[0]].method_id
                if not ok[mid][i]:
                    continue
                outs = _image_labels(d, i, state, counts, configs)
                if outs is None:
                    continue
                state = outs.pop("_state", state)
                for r, labels in outs.items():
                    seen[r].add(i)
                    if gt is None:
                        try:
                            gt = _load_label(spec, rec.label_path)
                        except OvssError as e:
                            gt = e
                    if isinstance(gt, OvssError):
                        skips[r][rec.image_id] = str(gt)
                        continue
                    if gt.shape != labels.shape:
                        skips[r][rec.image_id] = (
                            f"label is {gt.shape[0]}x{gt.shape[1]}, image {labels.shape}"
                        )
                        continue
                    accs[r].update(
                        rec.image_id, labels, gt, gallery_paths(paths[i], rec.label_path)
                    )
                    done[r] += 1
        if progress:
            progress(f"sweep ({len(configs)} configurations)", n_done, len(order))
    seconds = round(time.perf_counter() - t0, 3)

    results = []
    for r, cfg in enumerate(configs):
        seg = segs[cfg.method_id]
        method_skips = getattr(seg, "skipped", {})
        for i in order:
            if i not in seen[r]:
                image_id = by_index[i].image_id
                skips[r][image_id] = method_skips.get(
                    image_id, "features not extracted (or the image failed)"
                )
        vocab = vocabs[cfg.text_id]
        names = [syn[0] for syn in vocab.class_names]
        res = EvalResult(
            dataset=request.dataset,
            split=request.split or spec.default_split,
            images=done[r],
            skipped=skips[r],
            metrics=accs[r].metric.compute().to_dict(names),
            protocol=protocol_record(seg, cfg.setup.scoring, vocab),
            seconds=seconds,
            class_names=names,
            store=str(store.path),
            data_root=str(request.data_root),
        )
        accs[r].fill(res)
        require_complete(res, request.allow_missing, cfg.label if len(configs) > 1 else "")
        if request.check_reference:
            res.reference = check_reference(res)
        results.append(res)
    rows = _rows(configs, results)
    sharing = {
        "feature_reads": memo.reads,
        "method_instances": len(segs),
        "text_sets": len(vocabs),
        **counts,
    }
    cache = [
        {
            "path": str(d.cache.path),
            "hits": d.cache.hits,
            "writes": d.cache.writes,
            "images": d.cache.cached_images(),
        }
        for d in dense.values()
        if d.cache is not None
    ]
    return SweepResult(
        kind=kind,
        dataset=request.dataset,
        split=request.split or spec.default_split,
        store=str(store.path),
        data_root=str(request.data_root),
        keys=keys,
        rows=rows,
        seconds=seconds,
        sharing=sharing,
        cache=cache,
    )


def _image_labels(
    d: _Dense, i: int, state: Any, counts: dict[str, int], configs: list[Configuration]
) -> dict | None:
    """Row -> labels of image ``i`` for the rows of one dense output (``_state``: the early
    stage, for the next dense output of the group); None when the method skipped it."""
    seg = d.seg
    out: dict[Any, Any] = {}
    own = getattr(seg, "segment_labels", None)
    if own is not None:  # a method that labels pixels itself: no dense output to share
        for r in d.rows:
            res = own(i, d.vocab, configs[r].setup.scoring)
            if res is None:
                return None
            out[r] = res[0]
            counts["scorings"] += 1
        return out
    cos = d.cache.get(i) if d.cache is not None else None
    if cos is not None:
        counts["dense_cached"] += 1
    else:
        if _staged(seg):
            if state is None:
                state = seg.early_stage(i)
                counts["early_stages"] += 1
            cos, _ = seg.late_stage(state, i, d.vocab)
            out["_state"] = state
        else:
            cos, _ = seg.cosine_logits(i, d.vocab)
        counts["dense_computed"] += 1
        if d.cache is not None:
            d.cache.put(i, cos)
    from methods.pamr import refine_cosine

    fs = next(iter(seg.sets.values()))
    hw = tuple(int(x) for x in fs.image_sizes[i])
    cos = cos.to(seg.device)  # PAMR and the scoring on the method's device, as the driver
    cos = refine_cosine(seg, i, cos, hw)  # PAMR when the config turns it on, as the driver
    # Rows that differ only in prob_thd share one scoring pass (area rule off).
    groups: dict[float, list[int]] = {}
    for r in d.rows:
        sc = configs[r].setup.scoring
        if sc.area_thd is None:
            groups.setdefault(float(sc.logit_scale), []).append(r)
        else:
            out[r] = _labels(seg, i, cos, d.vocab, sc)
            counts["scorings"] += 1
    for scale, rows in groups.items():
        thds = [float(configs[r].setup.scoring.prob_thd) for r in rows]
        scored = score_logits_thresholds(
            cos.float(), hw, d.vocab.query_to_class, d.vocab.num_classes, scale, thds
        )
        for r, (labels, max_prob) in zip(rows, scored, strict=True):
            out[r] = _refined(seg, i, cos, labels, max_prob, d.vocab, configs[r].setup.scoring)
            counts["scorings"] += 1
    return out


def _rows(configs: list[Configuration], results: list[EvalResult]) -> list[SweepRow]:
    default = next(r for r, c in enumerate(configs) if c.default)
    base = results[default].metrics.get("mIoU")
    mious = [res.metrics.get("mIoU") for res in results]
    valid = [m for m in mious if m is not None]
    best = mious.index(max(valid)) if valid else -1
    rows = []
    for r, (cfg, res) in enumerate(zip(configs, results, strict=True)):
        m = mious[r]
        delta = None if m is None or base is None else round(m - base, 2)
        rows.append(SweepRow(cfg.label, dict(cfg.values), cfg.default, r == best, delta, res))
    return rows


def copy_request(request: EvalRequest, **changes: Any) -> SweepRequest:
    """A :class:`SweepRequest` with ``request``'s fields (and ``changes``)."""
    fields = {f.name: copy.deepcopy(getattr(request, f.name)) for f in dataclasses.fields(request)}
    return SweepRequest(**{**fields, **changes})


__all__ = [
    "Configuration",
    "SweepError",
    "SweepRequest",
    "SweepResult",
    "SweepRow",
    "parse_sweep_items",
    "plan_configurations",
    "read_sweep_file",
    "run_sweep",
]
