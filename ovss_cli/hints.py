"""Library errors -> what the user reads: the error's message plus the command to run.

Library errors (``featurestore.errors``) carry facts (which store, feature set, model,
protocol, tensors); only here are they turned into ``ovss ...`` command lines, so the library
never builds CLI strings. Add a renderer for a new error type with :func:`hint_for`.
"""

from __future__ import annotations

from collections.abc import Callable

from featurestore.errors import (
    CorruptStoreError,
    FeatureSetExistsError,
    ImagesNotInStoreError,
    MissingFeatureSetError,
    MissingLabelSetError,
    MissingTextSetError,
    NonFiniteFeaturesError,
    OvssError,
    RemoteStoreError,
    StoreImagesMismatchError,
    StoreNotFoundError,
)

_RENDERERS: dict[type, Callable[[OvssError], str | None]] = {}


def hint_for(error_type: type):
    """Register ``fn(error) -> hint or None`` for an error type (and its subclasses)."""

    def deco(fn):
        _RENDERERS[error_type] = fn
        return fn

    return deco


def render_error(e: OvssError) -> str:
    """One line: the error's message, then the hint of the most specific renderer."""
    message = str(e)
    for klass in type(e).__mro__:
        fn = _RENDERERS.get(klass)
        if fn is not None:
            hint = fn(e)
            if hint:
                return f"{message}; {hint}"
            break
    return message


# -- renderers ------------------------------------------------------------------------------------


def checkpoint_hint(e: OvssError) -> str | None:
    """The hint of a ``methods.train.CheckpointError`` (registered by the commands that read
    checkpoints, on first use: importing ``methods`` here would import torch for ``--help``)."""
    reason = getattr(e, "reason", "")
    if reason == "mismatch":
        return "pass --restart (or another --out) to train from scratch"
    if reason == "missing":
        return "train one with `ovss align`"
    if reason == "unsafe":
        return (
            "only if you know where the file came from, pass --trust-checkpoint to load it "
            "anyway (code in it runs)"
        )
    return None


#: Resize rules the ``extract --resize`` option offers; any other (a canvas only a method's
#: recipe makes) is rendered as ``extract --for METHOD``.
PLAIN_RESIZE = ("short", "square", "long", "none", "halves")
#: The CLIP whose patch grid a recipe-only canvas (``Protocol.align``) follows: ``--for``
#: needs it named when it is not the recipe's default CLIP (16-pixel patches).
_CLIP_OF_PATCH = {16: "clip-b16", 14: "clip-l14"}


def _recipes() -> list[str]:
    try:
        from methods.plan import list_components

        return list(list_components())
    except Exception:  # noqa: BLE001 - a hint must never hide the error it explains
        return []


def _recipe_making(resize: str) -> str:
    """The registered method whose requirements (default config) use the resize rule
    ``resize`` and that ``extract --for`` offers ('' if none)."""
    try:
        from methods.base import build_config, get_method, list_methods

        names = list_methods()
    except Exception:  # noqa: BLE001 - a hint must never hide the error it explains
        return ""
    recipes = _recipes()
    for name in names:
        if recipes and name not in recipes:
            continue
        try:
            cls = get_method(name)
            reqs = cls.requirements(build_config(cls))
        except Exception:  # noqa: BLE001 - e.g. a method that needs a checkpoint
            continue
        for r in reqs:
            cached = getattr(r, "cached", r)
            if getattr(getattr(cached, "protocol", None), "resize", None) == resize:
                return name
    return ""


def extract_command(e: MissingFeatureSetError) -> str:
    """The ``ovss extract`` call that makes the set ``e`` describes."""
    p = e.protocol
    recipe = e.needed_by if e.needed_by in _recipes() else ""
    if not recipe and p is not None and p.resize not in PLAIN_RESIZE:
        recipe = _recipe_making(p.resize)
    if recipe or (p is not None and p.resize not in PLAIN_RESIZE):
        cmd = f"ovss extract --store {e.store} --for {recipe or 'METHOD'} --dataset NAME"
        cmd += f" --model {e.model}" if e.model else ""
        clip = _CLIP_OF_PATCH.get(p.align) if p is not None else None
        if clip and clip != e.model and not e.model.startswith("clip-") and p.align != 16:
            cmd += f" --model {clip}"
        if p is not None and p.resize not in PLAIN_RESIZE:  # the window options of the canvas
            cmd += f" --size {p.size} --crop {p.crop} --stride {p.stride}"
            cmd += f" --pad-multiple {p.pad_multiple}"
        return cmd + " <--data-root PATH or --images DIR>"
    cmd = f"ovss extract --store {e.store} --model {e.model or 'MODEL'}"
    if p is None:
        return cmd + " <images or --dataset ...>"
    cmd += f" --resize {p.resize}"
    if p.resize != "none":
        cmd += f" --size {p.size}"
    if p.align:  # SAM's pre-rounding (long / halves)
        cmd += f" --align {p.align}"
    if p.crop:
        cmd += f" --crop {p.crop} --stride {p.stride}"
    if p.pad_multiple:
        cmd += f" --pad-multiple {p.pad_multiple}"
    return cmd + " <images or --dataset ...>"


@hint_for(MissingFeatureSetError)
def _missing_feature_set(e: MissingFeatureSetError) -> str:
    cmd = extract_command(e)
    if e.reason == "weights":
        return f"re-extract into another store: {cmd.replace(e.store, 'OTHER_STORE', 1)}"
    if e.reason in ("mismatch", "tensors"):
        return f"run: {cmd} --overwrite"
    if e.reason == "incomplete":
        return f"rerun the extraction to finish it: {cmd}"
    return f"run: {cmd}"


@hint_for(FeatureSetExistsError)
def _feature_set_exists(e: FeatureSetExistsError) -> str:
    return "pass --overwrite to replace it, or use another --store"


@hint_for(StoreNotFoundError)
def _store_not_found(e: StoreNotFoundError) -> str:
    return f"create one with 'ovss extract --store {e.store}'"


@hint_for(StoreImagesMismatchError)
def _images_mismatch(e: StoreImagesMismatchError) -> str:
    return "use another --store"


@hint_for(CorruptStoreError)
def _corrupt(e: CorruptStoreError) -> str:
    return f"run 'ovss store verify {e.store}'"


@hint_for(NonFiniteFeaturesError)
def _non_finite(e: NonFiniteFeaturesError) -> str:
    return (
        f"find every damaged block with 'ovss store verify {e.store} --fix', then rerun the "
        "extraction that made the set (it recomputes those blocks)"
    )


@hint_for(RemoteStoreError)
def _remote_store(e: RemoteStoreError) -> str | None:
    if e.reason in ("credentials", "denied"):
        return (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass --storage-options "
            '\'{"key": ..., "secret": ...}\''
        )
    if e.reason == "unreachable":
        return (
            "check that the server is up and the endpoint is right (AWS_ENDPOINT_URL, or "
            "--storage-options '{\"endpoint_url\": ...}')"
        )
    return None


@hint_for(MissingLabelSetError)
def _missing_label_set(e: MissingLabelSetError) -> str:
    return f"write one with 'ovss segment --store {e.store} --write-labels {e.name or 'NAME'} ...'"


@hint_for(ImagesNotInStoreError)
def _images_not_in_store(e: ImagesNotInStoreError) -> str:
    return (
        f"extract them with 'ovss extract --dataset {e.dataset} --data-root {e.data_root} "
        f"--store {e.store}'"
    )


@hint_for(MissingTextSetError)
def _missing_text_set(e: MissingTextSetError) -> str:
    import shlex

    cmd = (
        f"ovss extract --store {shlex.quote(e.store)} --text-model {shlex.quote(e.text_model)} "
        f"--vocab {shlex.quote(e.vocab_spec)} --templates {e.templates}"
    )
    if e.weights and e.weights.startswith("random-init:"):
        cmd += f" --random-init --seed {e.weights.split(':', 1)[1]}"
    if e.reason == "mismatch":
        return f"recompute it: {cmd} --overwrite"
    return f"run: {cmd}"
