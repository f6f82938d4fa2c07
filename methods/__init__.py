"""methods: everything that consumes cached tensors: segmenters, trainers and their blocks.

Shared blocks: ``scoring`` (sliding-window merge and the SCLIP-lineage post-processing of dense
logits), ``prototype`` (nearest-prototype lookup with torch and FAISS backends), ``metrics``
(the mmseg ``IoUMetric`` accumulator), ``config`` (typed configs), ``base`` / ``train`` (the
method and trainer registries) and ``plan`` (the extraction planner over both registries).

Registries fill themselves on first use, as the backbone registry does: ``list_methods`` /
``get_method`` (``methods.base``) and ``list_trainers`` / ``get_trainer`` (``methods.train``)
call :func:`load_components`, which imports every method and trainer module below, and each
registers itself (``@register_method`` / ``@register_trainer``). A new method or trainer is
one module plus one line here. Importing the package itself imports no method module (so no
torch): commands that need no model (``ovss eval --predictions``, ``ovss methods``) stay
light. ``base``, ``config`` and ``train`` import no method module, so there is no import
circle.
"""

# ruff: noqa: I001  (registration order and one import per line, kept by hand)


def load_components() -> None:
    """Import every method and trainer module: each registers itself (idempotent)."""
    # -- methods (one import per line) --
    from methods import aligned  # noqa: F401
    from methods import fmbseg_stage1  # noqa: F401
    from methods import last_block  # noqa: F401
    from methods import maskclip  # noqa: F401
    from methods import pixelclip  # noqa: F401
    from methods import pnp_ovss  # noqa: F401
    from methods import prototype_method  # noqa: F401
    from methods import proxyclip  # noqa: F401
    from methods import simzss  # noqa: F401
    from methods import trident  # noqa: F401

    # -- trainers (one import per line) --
    from methods import train  # noqa: F401
    from methods import fmbseg  # noqa: F401
    from methods import pixelclip_train  # noqa: F401
    from methods import simzss_train  # noqa: F401
