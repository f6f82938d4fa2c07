"""Extraction jobs: the feature sets and text sets one ``ovss extract`` call produces.

A :class:`Recipe` is what a method or trainer needs, as data: its feature sets (role, model,
protocol), the ones it reads only when present, the models it runs on pixels, and the
vocabulary, templates and text model of its text set. Recipes are *planned* from the methods'
own declarations (``methods.plan``: every method and trainer owns its presets and
requirements); this module only runs them and names no method. Models sharing a protocol are
extracted in one pass (the ``ExtractConfig`` of ``featurestore.extract`` has one protocol for
all its models), then the text embeddings are computed and cached in the store
(``featurestore.text``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from featurestore.errors import OvssError
from featurestore.extract import ExtractConfig, ExtractReport, ModelReport, PlanRow, plan
from featurestore.images import ImageRecord
from featurestore.protocol import Protocol
from featurestore.text import (
    DEFAULT_TEMPLATES,
    ProgressCallback,
    TextSetReport,
    Vocabulary,
    get_templates,
    parse_vocab,
)

# --------------------------------------------------------------------------------------------
# Recipes (data)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeStep:
    """One feature set a method reads: its role (``clip``, ``vfm``, ``sam``, ``dense``...),
    model and protocol, and the intermediate layers it must cache (``--layers``; none by
    default)."""

    role: str
    model: str
    protocol: Protocol
    layers: tuple[int, ...] = ()

    @property
    def feature_set(self) -> str:
        """The set's key in a store, ``model@protocol-key``."""
        return f"{self.model}@{self.protocol.key()}"

    def to_dict(self) -> dict:
        out = {
            "role": self.role,
            "model": self.model,
            "protocol": self.protocol.to_dict(),
            "feature_set": self.feature_set,
        }
        if self.layers:
            out["layers"] = list(self.layers)
        return out


@dataclass(frozen=True)
class LiveStep:
    """A model the owner runs on pixels itself (no feature set to extract): role and model."""

    role: str
    model: str


@dataclass
class Recipe:
    """What ``ovss extract --for NAME`` extracts (see ``methods.plan.plan_for``).

    Attributes:
        method: the component's name (a method or a trainer).
        dataset: benchmark whose preset and vocabulary are used (None: the defaults, no
            vocabulary).
        steps: feature sets to extract, in extraction order.
        vocab: vocabulary spec (``dataset:<name>/<family>``, see ``featurestore.text``), or
            None without a dataset.
        templates: template-set name.
        text_model: model whose text tower embeds the vocabulary.
        kind: ``method`` or ``trainer``.
        optional: feature sets read when present, never extracted by the recipe.
        live: models run on pixels (the owner needs the images, not a feature set).
        settings: the preset values (config and scoring) and the changes the call made,
            recorded for reference; methods read their own configs.
        notes: pairings, deviations and [ours] choices worth knowing.
    """

    method: str
    dataset: str | None
    steps: list[RecipeStep]
    vocab: str | None
    templates: str
    text_model: str
    kind: str = "method"
    optional: list[RecipeStep] = field(default_factory=list)
    live: list[LiveStep] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def groups(self) -> list[tuple[Protocol, list[str]]]:
        """Models grouped by protocol, in first-appearance order (one extract pass each)."""
        return group_by_protocol((s.model, s.protocol) for s in self.steps)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "kind": self.kind,
            "dataset": self.dataset,
            "steps": [s.to_dict() for s in self.steps],
            "optional": [s.to_dict() for s in self.optional],
            "live": [asdict(s) for s in self.live],
            "vocab": self.vocab,
            "templates": self.templates,
            "text_model": self.text_model,
            "settings": dict(self.settings),
            "notes": list(self.notes),
        }


def group_by_protocol(
    sets: Sequence[tuple[str, Protocol]] | Any,
) -> list[tuple[Protocol, list[str]]]:
    """``(model, protocol)`` pairs -> ``[(protocol, [models...])]`` in first-appearance order,
    each model once per protocol (one extraction pass per protocol)."""
    out: dict[Protocol, list[str]] = {}
    for model, protocol in sets:
        models = out.setdefault(protocol, [])
        if model not in models:
            models.append(model)
    return list(out.items())


# --------------------------------------------------------------------------------------------
# Jobs: image feature sets + text sets in one call
# --------------------------------------------------------------------------------------------


@dataclass
class ExtractJob:
    """Everything one ``ovss extract`` call does.

    Attributes:
        groups: ``(protocol, models)`` extraction passes, in order.
        vocabs: vocabulary specs (or vocabularies) whose text embeddings are cached.
        template_name: template set of those embeddings.
        text_models: CLIP models whose text towers embed them.
        data_root: the ``custom`` dataset's root, for its ``classes.txt``.
        recipe: the recipe this job came from, if any.
        layers: intermediate layers a pass must cache, by protocol (added to the call's
            ``layers``); empty: the call's only.
    """

    groups: list[tuple[Protocol, list[str]]]
    vocabs: list[str | Vocabulary] = field(default_factory=list)
    template_name: str = DEFAULT_TEMPLATES
    text_models: list[str] = field(default_factory=list)
    data_root: str | None = None
    recipe: Recipe | None = None
    layers: dict[Protocol, tuple[int, ...]] = field(default_factory=dict)

    def pass_config(self, cfg: ExtractConfig, protocol: Protocol, models: list[str]) -> Any:
        """``cfg`` for the pass of ``models`` under ``protocol`` (its layers added)."""
        extra = self.layers.get(protocol, ())
        layers = tuple(sorted({*cfg.layers, *extra})) if extra else cfg.layers
        return dataclasses.replace(cfg, models=models, protocol=protocol, layers=layers)

    @property
    def models(self) -> list[str]:
        return [m for _, ms in self.groups for m in ms]


def make_job(
    models: Sequence[str],
    protocol: Protocol,
    vocabs: Sequence[str] = (),
    templates: str | None = None,
    text_model: str | None = None,
    data_root: str | os.PathLike | None = None,
) -> ExtractJob:
    """The job of a plain ``ovss extract`` call: one pass of ``models`` under ``protocol``;
    text sets for ``vocabs`` with every ``clip-*`` model of the call, or ``text_model``
    (default ``clip-b16`` when the call has no CLIP model).

    Raises:
        OvssError: unknown template set, or nothing to do.
    """
    tmpl = templates or DEFAULT_TEMPLATES
    get_templates(tmpl)
    if not models and not vocabs:
        raise OvssError("nothing to extract: give --model NAME, --for NAME or --vocab SPEC")
    if text_model:
        tms = [text_model]
    else:
        tms = [m for m in models if m.startswith("clip-")] or ["clip-b16"]
    return ExtractJob(
        groups=[(protocol, list(models))] if models else [],
        vocabs=list(vocabs),
        template_name=tmpl,
        text_models=tms if vocabs else [],
        data_root=str(data_root) if data_root is not None else None,
    )


def recipe_job(
    recipe: Recipe, vocabs: Sequence[str] = (), data_root: str | os.PathLike | None = None
) -> ExtractJob:
    """The job of a recipe: its passes, its vocabulary (if any) first, then any extra
    ``vocabs``, embedded with the recipe's text model and templates (not at all when the
    recipe names no text model: a text tower that is still to be trained)."""
    all_vocabs = [*([recipe.vocab] if recipe.vocab else []), *vocabs]
    layers: dict[Protocol, tuple[int, ...]] = {}
    for s in recipe.steps:
        if s.layers:
            layers[s.protocol] = tuple(sorted({*layers.get(s.protocol, ()), *s.layers}))
    return ExtractJob(
        groups=recipe.groups(),
        vocabs=all_vocabs,
        template_name=recipe.templates,
        text_models=[recipe.text_model] if all_vocabs and recipe.text_model else [],
        data_root=str(data_root) if data_root is not None else None,
        recipe=recipe,
        layers=layers,
    )


@dataclass
class TextPlanRow:
    """A text set a job would compute (dry run)."""

    text_model: str
    key: str
    source: str
    classes: int
    queries: int
    template_set: str
    templates: int
    dim: int | None
    bytes: int | None
    cached: bool


@dataclass
class JobPlan:
    """Dry-run result: the recipe (if any), image feature sets and text sets.

    ``plain``: a plain call (models under one protocol, no recipe, no text set), whose
    report is the feature-set rows alone."""

    recipe: dict | None
    feature_sets: list[PlanRow]
    text_sets: list[TextPlanRow]
    plain: bool = False

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "feature_sets": [asdict(r) for r in self.feature_sets],
            "text_sets": [asdict(r) for r in self.text_sets],
        }


@dataclass
class JobReport:
    """What a job did: the extraction report of every pass, merged, and the text sets.

    ``plain``: a plain call; ``to_dict`` is then the ``ExtractReport`` shape (store, shard,
    models, notes). ``notes``: what the passes did on the side, one line each (leftovers of an
    interrupted creation removed)."""

    store: str
    shard: tuple[int, int]
    models: list[ModelReport]
    text_sets: list[TextSetReport]
    recipe: dict | None = None
    plain: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["plain"]
        if self.plain:
            return {k: d[k] for k in ("store", "shard", "models", "notes")}
        return d


def _vocabularies(job: ExtractJob) -> list[Vocabulary]:
    return [parse_vocab(v, data_root=job.data_root) for v in job.vocabs]


def _text_options(job: ExtractJob, cfg: ExtractConfig, text_model: str) -> dict:
    """Weights options of a text model: the call's, under the rules of ``--weights``."""
    weights = cfg.weights
    if weights is not None:
        models = job.models
        if models and text_model not in models:
            raise OvssError(
                f"--weights names the checkpoint of the single --model; the text model "
                f"{text_model} needs its own: add the text set in a second extract call "
                f"on store {cfg.store} with --text-model {text_model} --vocab ... --weights CKPT"
            )
        if not models and len(job.text_models) > 1:
            raise OvssError("--weights names one checkpoint: use it with a single --text-model")
    return {
        "weights": weights,
        "random_init": cfg.random_init,
        "seed": cfg.seed,
        "arch_overrides": cfg.arch_overrides,
    }


def _text_dim(text_model: str, cfg: ExtractConfig) -> int | None:
    """Embedding width of a text model without loading weights (None if it cannot be told)."""
    import torch

    from featurestore.text import load_text_encoder

    try:
        with torch.device("meta"):
            model, _, _ = load_text_encoder(
                text_model, random_init=True, seed=cfg.seed, arch_overrides=cfg.arch_overrides
            )
    except Exception:  # a dry run reports what it can; the real run raises the real error
        return None
    proj = getattr(model, "text_projection", None)
    if proj is not None:
        return int(proj.shape[-1] if proj.ndim == 2 else proj.out_features)
    return None


def plan_job(records: Sequence[ImageRecord], job: ExtractJob, cfg: ExtractConfig) -> JobPlan:
    """What ``run_job`` would write: one ``PlanRow`` per (model, protocol) (images, windows,
    tokens, bytes) and one row per text set; loads no weights, writes nothing."""
    from featurestore.store import FeatureStore
    from featurestore.text import _group_complete, text_set_key

    rows: list[PlanRow] = []
    for protocol, models in job.groups:
        rows.extend(plan(records, job.pass_config(cfg, protocol, models)))
    text_rows = []
    vocabs = _vocabularies(job)
    store = None
    try:
        store = FeatureStore.open(cfg.store)
    except OvssError:
        pass
    for tm in job.text_models:
        dim = _text_dim(tm, cfg)
        for v in vocabs:
            key = text_set_key(tm, v, job.template_name)
            text_rows.append(
                TextPlanRow(
                    text_model=tm,
                    key=key,
                    source=v.source,
                    classes=v.n_classes,
                    queries=v.n_queries,
                    template_set=job.template_name,
                    templates=len(get_templates(job.template_name)),
                    dim=dim,
                    bytes=None if dim is None else v.n_queries * dim * 4,
                    cached=store is not None and _group_complete(store.root, key),
                )
            )
    recipe = job.recipe.to_dict() if job.recipe else None
    return JobPlan(recipe=recipe, feature_sets=rows, text_sets=text_rows)


def run_job(
    records: Sequence[ImageRecord],
    job: ExtractJob,
    cfg: ExtractConfig,
    progress: ProgressCallback | None = None,
) -> JobReport:
    """Run every extraction pass of ``job`` (resuming), then cache its text sets.

    Each pass is ``featurestore.extract.extract`` with ``cfg``'s options and the pass's models
    and protocol. Text sets are computed by shard 0 only (``--shard 0/n`` or torchrun rank 0);
    the other shards report them as skipped. A cached text set made with the same encoder is
    kept (``cfg.overwrite`` recomputes it).

    Raises:
        OvssError: as ``extract`` and ``featurestore.text.get_text_embeddings``; a text-only job
            needs an existing store or images to create it.
    """
    from featurestore.extract import extract, resolve_device, resolve_shard
    from featurestore.store import FeatureStore
    from featurestore.text import get_text_embeddings

    shard = resolve_shard(cfg.shard)
    vocabs = _vocabularies(job)  # fail on a bad --vocab before any long work
    for tm in job.text_models:
        _text_options(job, cfg, tm)
    model_reports: list[ModelReport] = []
    notes: list[str] = []
    for protocol, models in job.groups:
        rep: ExtractReport = extract(records, job.pass_config(cfg, protocol, models), progress)
        model_reports.extend(rep.models)
        notes.extend(n for n in rep.notes if n not in notes)
    text_reports: list[TextSetReport] = []
    if vocabs and job.text_models:
        if not job.groups and records:
            store = FeatureStore.open_or_create(cfg.store, records)
        else:
            store = FeatureStore.open(cfg.store)
        notes.extend(n for n in store.notes if n not in notes)
        for tm in job.text_models:
            opts = _text_options(job, cfg, tm)
            for v in vocabs:
                if shard[0] != 0:
                    text_reports.append(
                        TextSetReport(
                            text_model=tm,
                            key="",
                            source=v.source,
                            queries=v.n_queries,
                            classes=v.n_classes,
                            template_set=job.template_name,
                            status=f"skipped: shard {shard[0]}/{shard[1]} (shard 0 computes it)",
                        )
                    )
                    continue
                t0 = time.perf_counter()
                get_text_embeddings(
                    store,
                    tm,
                    v,
                    job.template_name,
                    device=resolve_device(cfg.device),
                    overwrite=cfg.overwrite,
                    progress=progress,
                    report=text_reports,
                    **opts,
                )
                text_reports[-1].seconds = round(time.perf_counter() - t0, 3)
    return JobReport(
        store=cfg.store,
        shard=shard,
        models=model_reports,
        text_sets=text_reports,
        recipe=job.recipe.to_dict() if job.recipe else None,
        notes=notes,
    )
