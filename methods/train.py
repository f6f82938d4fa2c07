"""The trainer seam: ``ovss align --method NAME`` for every method that trains something.

A trainer is one module with a :class:`Trainer` subclass registered with
``@register_trainer``: a ``name``, a typed ``Config`` dataclass (its fields become the
``ovss align --method NAME`` options, see ``methods.config``), declared ``requirements``
(what ``extract --for NAME`` plans) and ``fit``. Shared helpers for data-parallel runs under
torchrun, resuming from the last checkpoint, checkpoint provenance and progress live here so a
trainer only writes its own step.
"""

from __future__ import annotations

from typing import Any, ClassVar

from featurestore.errors import OvssError
from methods.base import Component

_TRAINERS: dict[str, type[Trainer]] = {}


class Trainer(Component):
    """Base class of trainers (see the module doc)."""

    kind: ClassVar[str] = "trainer"

    def fit(self, request: Any, progress: Any = None) -> Any:
        raise NotImplementedError


def register_trainer(cls: type[Trainer]) -> type[Trainer]:
    if not cls.name or cls.name in _TRAINERS:
        raise ValueError(f"trainer name {cls.name!r} empty or registered twice")
    _TRAINERS[cls.name] = cls
    return cls


def list_trainers() -> list[str]:
    return sorted(_TRAINERS)


def get_trainer(name: str) -> type[Trainer]:
    if name not in _TRAINERS:
        raise OvssError(
            f"'{name}' is not a known trainer; choose from {', '.join(sorted(_TRAINERS))}"
        )
    return _TRAINERS[name]
