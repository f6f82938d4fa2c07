"""One extraction planner for every method and trainer: ``extract --for NAME``, ``segment --images``.

A *component* is a registered method (``methods.base``) or trainer (``methods.train``). Each
owns, in its own module, a typed ``Config`` with per-dataset ``presets``, its declared
``requirements(config)`` and its ``vocabulary_defaults(config)``; this module derives the rest:

1. the config: ``build_config`` with the dataset's preset, then the user's settings (``--set
   KEY=VALUE`` and ``--size``/``--crop``/``--stride``/``--pad-multiple``, which set the config
   fields of the same names);
2. ``-m NAME``: the requirement the backbone fits gets it through its ``model_field``, and the
   config is built again (so dependent choices follow, e.g. Trident's SAM-H with CLIP-H/14).
   A backbone fits a requirement whose current model is of its family (``BackboneInfo.family``
   from the backbone registry: ``clip``, ``dino``, ``dinov2``, ``sam``...), else one whose
   tensors it produces (a DINOv2 for a DINO's ``patch``); none or several is an error (name the
   field with ``--set FIELD=NAME`` then);
3. the feature sets: required :class:`~methods.base.FeatureRequirement` s become recipe steps,
   grouped by protocol (one extraction pass each); optional ones are listed, not extracted; a
   :class:`~methods.base.LiveModelRequirement` is planned as its ``cached`` first pass when it
   has one, else reported as a model that runs on pixels;
4. the text side: vocabulary ``dataset:<ds>/<family>``, templates and text model from
   ``vocabulary_defaults``.

Methods and trainers share one namespace here; a name registered as both is planned from the
method [ours].

``ExtractRequest`` + ``plan_extract`` / ``run_extract`` are what the ``extract`` command calls:
one library call per command, whether it is a plain call, a ``--vocab`` call or a recipe.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from featurestore.errors import OvssError
from featurestore.protocol import Protocol
from featurestore.recipes import (
    JobPlan,
    JobReport,
    LiveStep,
    Recipe,
    RecipeStep,
    group_by_protocol,
    make_job,
    plan_job,
    recipe_job,
    run_job,
)
from methods.base import (
    Component,
    FeatureRequirement,
    LiveModelRequirement,
    Requirement,
    Segmenter,
    get_method,
    list_methods,
)
from methods.config import build_config as _build_config
from methods.config import config_fields

PROTOCOL_SETTINGS = ("size", "crop", "stride", "pad_multiple")
"""``extract`` protocol options that, with ``--for``, set the config fields of the same name."""


# --------------------------------------------------------------------------------------------
# Components: methods + trainers
# --------------------------------------------------------------------------------------------


def _trainers() -> dict[str, type[Component]]:
    from methods.train import get_trainer, list_trainers

    return {n: get_trainer(n) for n in list_trainers()}


def list_components() -> list[str]:
    """Names ``extract --for`` accepts: every registered method and trainer, sorted."""
    return sorted(set(list_methods()) | set(_trainers()))


def get_component(name: str) -> type[Component]:
    """The method (preferred) or trainer registered as ``name``.

    Raises:
        OvssError: no such component (listing the choices).
    """
    if name in list_methods():
        return get_method(name)
    trainers = _trainers()
    if name in trainers:
        return trainers[name]
    raise OvssError(
        f"'{name}' is not a known method or trainer; choose from {', '.join(list_components())}"
    )


def _component(name_or_cls: str | type[Component]) -> type[Component]:
    return get_component(name_or_cls) if isinstance(name_or_cls, str) else name_or_cls


def _owner(cls: type[Component]) -> str:
    return f"{cls.kind or 'component'} {cls.name}"


def component_config(
    component: str | type[Component],
    dataset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """The component's config: defaults, the dataset preset (none off the benchmarks), then
    ``overrides`` (strings coerced to the field types).

    Raises:
        ConfigError: unknown key or bad value (one line, naming the field).
    """
    cls = _component(component)
    preset = cls.presets(dataset) if dataset else {}
    return _build_config(cls.Config, preset, overrides, owner=_owner(cls))


def requirements_of(component: str | type[Component], config: Any) -> list[Requirement]:
    """``component.requirements(config)``, an invalid combination as one-line ``OvssError``."""
    cls = _component(component)
    try:
        return list(cls.requirements(config))
    except ValueError as e:  # e.g. an invalid protocol or a missing option
        raise OvssError(f"{cls.name}: {e}") from None


def _has_presets(cls: type[Component]) -> bool:
    """Whether the component has a preset for any registered dataset."""
    from featurestore.datasets import list_datasets

    return any(cls.presets(d) for d in list_datasets())


def _cached(r: Requirement) -> FeatureRequirement | None:
    return r.cached if isinstance(r, LiveModelRequirement) else r


def feature_groups(
    component: str | type[Component], config: Any, include_optional: bool = False
) -> list[tuple[Protocol, list[str]]]:
    """What must be extracted for ``component`` with ``config`` (no dataset needed): the
    required feature sets (and cached first passes of live models), as ``[(protocol,
    [models...])]`` in first-appearance order, one extraction pass per protocol.

    This is the stable entry point of ``segment --images`` (``methods.segment``): build the
    config (``component_config``), then extract these groups into a scratch store.

    Args:
        component: a registered name or a component class.
        config: its config (``component_config`` or ``build_config``).
        include_optional: also the sets read only when present.

    Raises:
        OvssError: the config's requirements are invalid.
    """
    pairs = []
    for r in requirements_of(component, config):
        c = _cached(r)
        if c is not None and (include_optional or not c.optional):
            pairs.append((c.model, c.protocol))
    return group_by_protocol(pairs)


# --------------------------------------------------------------------------------------------
# -m NAME -> the requirement it fits
# --------------------------------------------------------------------------------------------


@functools.cache
def backbone_traits(model: str) -> tuple[str, frozenset[str]]:
    """``(family, tensor names)`` of a registered backbone, from the backbone registry (built
    on the meta device: no weights, no memory).

    Raises:
        OvssError: not a known backbone (listing the choices).
    """
    import torch

    from featurestore.backbones import create_backbone

    with torch.device("meta"):
        b = create_backbone(model, random_init=True)
    return b.info.family, frozenset(s.name for s in b.tensor_specs())


def _model_fields(reqs: Sequence[Requirement]) -> dict[str, list[FeatureRequirement]]:
    """Requirements (cached sets) by the config field naming their model, in order."""
    out: dict[str, list[FeatureRequirement]] = {}
    for r in reqs:
        c = _cached(r)
        if c is not None and c.model_field:
            out.setdefault(c.model_field, []).append(c)
    for r in reqs:  # live models without a cached pass: matched by family only
        if isinstance(r, LiveModelRequirement) and r.cached is None and r.model_field:
            out.setdefault(r.model_field, [])
    return out


def _fits(
    model: str,
    cls: type[Component],
    reqs: Sequence[Requirement],
    trial: Any,
) -> str:
    """The config field of the requirement ``model`` fits (see the module doc); ``trial(field)``
    gives the requirements with ``field`` set to ``model`` (tensors may depend on the model)."""
    name = cls.name
    family, tensors = backbone_traits(model)
    by_field = _model_fields(reqs)
    if not by_field:
        raise OvssError(f"{name} names no model a -m can replace (its models are fixed)")

    def field_family(f: str) -> str | None:
        rs = by_field[f]
        m = (
            rs[0].model
            if rs
            else next(
                r.model for r in reqs if isinstance(r, LiveModelRequirement) and r.model_field == f
            )
        )
        try:
            return backbone_traits(m)[0]
        except OvssError:  # a live model outside the backbone registry
            return None

    def makes_tensors(f: str) -> bool:
        try:
            new = _model_fields(trial(f)).get(f, [])
        except OvssError:
            return False
        return bool(new) and all(set(r.tensors) <= tensors for r in new if not r.optional)

    fields = [f for f in by_field if field_family(f) == family]
    if not fields:
        fields = [f for f in by_field if makes_tensors(f)]
    if len(fields) == 1:
        return fields[0]
    roles = ", ".join(
        f"{f} ({', '.join(sorted({r.role for r in rs})) or 'live'})" for f, rs in by_field.items()
    )
    if not fields:
        raise OvssError(
            f"'{model}' ({family}) fits none of {name}'s models: {roles}; "
            f"it produces {', '.join(sorted(tensors))}"
        )
    raise OvssError(
        f"'{model}' fits several of {name}'s models ({', '.join(fields)}): "
        f"name one with --set FIELD={model}"
    )


def assign_models(
    component: str | type[Component],
    models: Sequence[str],
    dataset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, str]:
    """``-m`` models -> ``{config field: model}`` for the config of ``dataset`` +
    ``overrides`` (see the module doc).

    Raises:
        OvssError: a model that fits no requirement or several, or two models for one field.
    """
    cls = _component(component)
    base = dict(overrides or {})
    reqs = requirements_of(cls, component_config(cls, dataset, base))

    out: dict[str, str] = {}
    for m in models:

        def trial(f: str, m: str = m) -> list[Requirement]:
            return requirements_of(cls, component_config(cls, dataset, {**base, f: m}))

        f = _fits(m, cls, reqs, trial)
        if f in out and out[f] != m:
            raise OvssError(f"two models for {cls.name}'s {f}: {out[f]} and {m}")
        out[f] = m
    return out


# --------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------


def plan_for(
    name: str | type[Component],
    dataset: str | None = None,
    models: Sequence[str] = (),
    overrides: dict[str, Any] | None = None,
    templates: str | None = None,
    text_model: str | None = None,
    family: str | None = None,
) -> Recipe:
    """The recipe of component ``name`` (see the module doc).

    Args:
        name: a method or trainer (``list_components``), or its class.
        dataset: a dataset name or alias: its preset (if the component has one) and its
            vocabulary; None: the component's defaults and no vocabulary.
        models: ``-m`` backbones, each replacing the model of the requirement it fits.
        overrides: config settings (``--set``, protocol options), strings typed by the config.
        templates, text_model, family: the text side (default: ``vocabulary_defaults``).

    Raises:
        OvssError: unknown component, dataset, template set or model; a bad setting
            (``ConfigError``); a model that fits no requirement.
    """
    from featurestore.datasets import get_dataset
    from featurestore.text import get_templates

    cls = _component(name)
    ds = get_dataset(dataset).name if dataset else None
    preset = cls.presets(ds) if ds else {}
    user = dict(overrides or {})
    config = component_config(cls, ds, user)
    if models:
        for f, m in assign_models(cls, models, ds, user).items():
            if f in user and str(user[f]) != m:
                raise OvssError(f"-m {m} and --set {f}={user[f]} disagree; give one")
            user[f] = m
        config = component_config(cls, ds, user)
    reqs = requirements_of(cls, config)

    steps: list[RecipeStep] = []
    optional: list[RecipeStep] = []
    live: list[LiveStep] = []
    for r in reqs:
        c = _cached(r)
        if c is None:
            live.append(LiveStep(r.role, r.model))
            continue
        (optional if c.optional else steps).append(
            RecipeStep(c.role, c.model, c.protocol, tuple(c.layers))
        )

    notes: list[str] = []
    if ds and not preset and _has_presets(cls):
        notes.append(f"{cls.name} has no preset for {ds}: its defaults")
    known = {f.name for f in config_fields(cls.Config)}
    changed = {k: getattr(config, k) for k in overrides or {} if k in known}
    if changed:
        notes.append("preset changed: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
    notes.extend(cls.recipe_notes(config))
    for s in live:
        notes.append(f"{s.model} ({s.role}) runs on pixels: the method needs the images")

    settings: dict[str, Any] = dict(preset)
    if ds and isinstance(cls, type) and issubclass(cls, Segmenter):
        settings.update(cls.scoring_presets(ds))
    settings.update(changed)

    vd = cls.vocabulary_defaults(config)
    tmpl = templates or vd.templates
    get_templates(tmpl)
    return Recipe(
        method=cls.name,
        kind=cls.kind,
        dataset=ds,
        steps=steps,
        optional=optional,
        live=live,
        vocab=f"dataset:{ds}/{family or vd.family}" if ds else None,
        templates=tmpl,
        text_model=text_model or vd.text_model,
        settings=settings,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# The extract command: one request, one call
# --------------------------------------------------------------------------------------------


@dataclass
class ExtractRequest:
    """One ``ovss extract`` call.

    Attributes:
        store: store path (created if absent, resumed if present).
        records: the images (may be empty for a dry run or a text-only call).
        models: ``--model`` names (plain call), or ``-m`` replacements with ``component``.
        component: ``--for NAME`` (a method or trainer), or None for a plain call.
        dataset: the dataset (with ``component``: its preset and vocabulary).
        settings: ``--set KEY=VALUE`` (with ``component``; strings typed by its config).
        protocol: the protocol options ``resize``, ``size``, ``crop``, ``stride``,
            ``pad_multiple``, ``align`` (plain call: the protocol of the pass).
        protocol_given: which of them the user gave (with ``component``: ``size``, ``crop``,
            ``stride``, ``pad_multiple`` set the config fields of those names; ``resize`` and
            ``align`` are the component's own).
        vocabs: extra vocabularies whose text embeddings are cached.
        templates, text_model: the text side (default: the component's, else ``openai80``
            and the call's CLIP models).
        data_root: the dataset's root (the ``custom`` dataset's ``classes.txt``).
        runtime: the other ``ExtractConfig`` fields (``batch_size``, ``device``, ``weights``,
            ``random_init``, ``shard``...).
    """

    store: str
    records: list = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    component: str | None = None
    dataset: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    protocol_given: tuple[str, ...] = ()
    vocabs: list[str] = field(default_factory=list)
    templates: str | None = None
    text_model: str | None = None
    data_root: str | None = None
    runtime: dict[str, Any] = field(default_factory=dict)


def _plain_protocol(req: ExtractRequest) -> Protocol:
    try:
        return Protocol(**req.protocol)
    except (TypeError, ValueError) as e:
        raise OvssError(f"invalid protocol: {e}") from None


def _job(req: ExtractRequest):
    """``(ExtractJob, ExtractConfig, plain)`` of a request (the one decision point)."""
    from featurestore.extract import ExtractConfig

    if req.component:
        name = req.component
        fixed = [k for k in req.protocol_given if k not in PROTOCOL_SETTINGS]
        if fixed:
            raise OvssError(
                f"--for {name} sets every protocol itself; "
                f"{', '.join('--' + k.replace('_', '-') for k in fixed)} cannot be given "
                "(it goes with a plain call)"
            )
        overrides = dict(req.settings)
        for k in req.protocol_given:
            v = req.protocol[k]
            if k in overrides and str(overrides[k]) != str(v):
                raise OvssError(
                    f"--{k.replace('_', '-')} {v} and --set {k}={overrides[k]} disagree"
                )
            overrides[k] = v
        recipe = plan_for(
            name,
            req.dataset,
            models=req.models,
            overrides=overrides,
            templates=req.templates,
            text_model=req.text_model,
        )
        job = recipe_job(recipe, req.vocabs, req.data_root)
        protocol = job.groups[0][0] if job.groups else Protocol()
        models = job.models
        plain = False
    else:
        if req.settings:
            raise OvssError("--set KEY=VALUE goes with --for NAME (it sets that config)")
        protocol = _plain_protocol(req)
        job = make_job(
            req.models,
            protocol,
            vocabs=req.vocabs,
            templates=req.templates,
            text_model=req.text_model,
            data_root=req.data_root,
        )
        models = list(req.models)
        plain = not req.vocabs
    cfg = ExtractConfig(models=models, protocol=protocol, store=req.store, **req.runtime)
    return job, cfg, plain


def plan_extract(req: ExtractRequest) -> JobPlan:
    """Dry run of ``req``: the recipe (if any), the feature sets and text sets it would
    write (images, windows, tokens, bytes); loads no weights, writes nothing."""
    job, cfg, plain = _job(req)
    out = plan_job(req.records, job, cfg)
    out.plain = plain
    return out


def run_extract(req: ExtractRequest, progress: Any = None) -> JobReport:
    """Run ``req``: every extraction pass (resuming), then its text sets (see
    ``featurestore.recipes.run_job``); ``progress(label, done, total)`` as usual."""
    job, cfg, plain = _job(req)
    rep = run_job(req.records, job, cfg, progress=progress)
    rep.plain = plain
    return rep


__all__ = [
    "PROTOCOL_SETTINGS",
    "ExtractRequest",
    "assign_models",
    "backbone_traits",
    "component_config",
    "feature_groups",
    "get_component",
    "list_components",
    "plan_extract",
    "plan_for",
    "requirements_of",
    "run_extract",
]
