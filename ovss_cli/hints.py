"""Library errors -> what the user reads: the error's message plus the command to run.

Library errors (``featurestore.errors``) carry facts (which store, feature set, model,
protocol, tensors); only here are they turned into ``ovss ...`` command lines, so the library
never builds CLI strings. Add a renderer for a new error type with :func:`hint_for`.
"""

from __future__ import annotations

from collections.abc import Callable

from featurestore.errors import MissingTextSetError, OvssError

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
