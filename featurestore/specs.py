"""Tensor specs of the store layout (torch-free, so the store's read path imports no torch).

``featurestore.backbones.base`` re-exports both names: backbones describe their outputs with
them and the store lays tensors out by them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["UNITS", "TensorSpec"]

# Row units: how many rows a tensor has per image in the store.
#   "token":  one row per patch token of every window (sum over windows of gh * gw)
#   "window": one row per window
#   "image":  one row per image
UNITS = ("token", "window", "image")


@dataclass(frozen=True)
class TensorSpec:
    """One named output of a backbone.

    Attributes:
        name: key in the dict ``forward_dense`` returns (e.g. ``patch``, ``cls``, ``reg``,
            ``layer8``).
        unit: ``token``, ``window`` or ``image`` (see ``UNITS``).
        row_shape: shape of one row, e.g. ``(384,)`` for a token or ``(4, 384)`` for the
            4 register tokens of a window.
        doc: one line for ``ovss store info``.
    """

    name: str
    unit: str
    row_shape: tuple[int, ...]
    doc: str = ""

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, not {self.unit!r}")
