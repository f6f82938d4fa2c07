"""Preprocessing protocols: how an image becomes model inputs (resize rule, sliding windows, padding).

A protocol is part of a feature set's identity: two feature sets of the same model with different
protocols are different sets. The geometry rules follow the OVSS benchmark protocol
(the mmseg ``Resize(scale=(2048, S), keep_ratio=True)`` + ``slide`` rule).

The resize mode ``grid`` (short side to S, sides rounded up to a multiple of ``align``, each at
least the crop) was called ``trident`` before; the on-disk spelling keeps the old name
(``STORED_RESIZE_NAMES``): keys (``trident448a16-c336s224-pad56``) and the ``protocol`` record
of a feature set are byte-identical to those of stores made before the rename, so every such
store stays readable and resumable. ``Protocol(resize="trident")`` (an old record read with
``from_dict``) is the same protocol as ``Protocol(resize="grid")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from featurestore.resize import round_up

if TYPE_CHECKING:  # torch is imported where it is used: store commands start without it
    import torch

RESIZE_MODES = ("short", "square", "long", "none", "grid", "halves")

RESIZE_ALIASES = {"trident": "grid"}
"""Former names of resize modes -> the current name (accepted wherever a mode is given)."""

STORED_RESIZE_NAMES = {"grid": "trident"}
"""Modes spelled differently in keys and records: the name used when the store format froze."""


@dataclass(frozen=True)
class Protocol:
    """How images are resized and cut into windows before a backbone sees them.

    Attributes:
        resize: ``short`` (shorter side to ``size``, longer side capped at ``max_long``, the mmseg
            keep-ratio rule), ``square`` (``size``x``size``, aspect not kept), ``long`` (longer side
            to ``size``, SAM's rule), ``none`` (original size) or ``grid`` (the ``short`` size,
            then each side rounded *up* to a multiple of ``align`` and raised to at least
            ``crop``, so every sliding window is a full ``crop`` x ``crop`` crop whose corners
            lie on the ``align`` patch grid: Trident's CLIP canvas; formerly ``trident``, still
            the spelling in keys and records, see the module doc) or
            ``halves`` (Trident's Cityscapes SAM input, EVAL.md §4.4: the left half (columns
            ``[0, W // 2)``) and the right half (``[W // 2, W)``) of the image, each resized on
            its own with the ``long`` rule; see ``halves_layout``; no crop, stride or padding
            options). ``long`` and ``halves`` may first round the image up (``align``).
        size: target side in pixels for ``short``/``square``/``long``/``grid``/``halves``;
            ignored for ``none``.
        max_long: cap on the longer side for ``short`` (2048 in every benchmark config).
        crop: sliding-window size in pixels; 0 means one window covering the whole resized image.
        stride: sliding-window stride in pixels (required when ``crop > 0``).
        pad_multiple: each window is zero-padded (in normalised space, i.e. with the mean colour)
            symmetrically up to a multiple of this many pixels; 0 means "the backbone's patch
            size". [ours] symmetric padding as ProxyCLIP does for its 56-pixel rule.
        align: ``grid``: the patch grid of the canvas, i.e. the CLIP patch size (16 for
            CLIP-B/16, 14 for CLIP-L/14 and H/14); ``crop`` and ``stride`` must be multiples of
            it. ``long`` / ``halves`` (SAM's input, Trident's METHODS.md §4 step 1): 0, or a
            pre-rounding: before the resize rule the image is resized bilinearly (OpenCV's
            ``INTER_LINEAR``, ``featurestore.resize``) to ``rounded_size``, each side rounded
            *up* to a multiple of ``align`` (a no-op when both already are); ``halves`` then
            splits that rounded image. Key suffix ``-a<align>`` (``long1024-a16``). Unused by
            the other modes (must be 0). Left out of ``to_dict`` when 0, so the records of
            protocols without it are unchanged.
    """

    resize: str = "short"
    size: int = 448
    max_long: int = 2048
    crop: int = 0
    stride: int = 0
    pad_multiple: int = 0
    align: int = 0

    def __post_init__(self) -> None:
        if self.resize in RESIZE_ALIASES:  # a former name (records of older stores)
            object.__setattr__(self, "resize", RESIZE_ALIASES[self.resize])
        if self.resize not in RESIZE_MODES:
            raise ValueError(
                f"resize must be one of {', '.join(RESIZE_MODES)}, not {self.resize!r}"
            )
        if self.resize != "none" and self.size <= 0:
            raise ValueError("protocol size must be a positive number of pixels")
        if self.crop < 0 or self.stride < 0:
            raise ValueError("crop and stride must be >= 0")
        if self.crop > 0 and self.stride <= 0:
            raise ValueError("a sliding-window crop needs a stride > 0")
        if self.resize == "grid":
            if self.align <= 0:
                raise ValueError("resize 'grid' needs align > 0 (the patch size of its grid)")
            if self.crop % self.align or self.stride % self.align:
                raise ValueError(
                    f"resize 'grid' puts windows on the {self.align}-pixel patch grid: crop "
                    f"{self.crop} and stride {self.stride} must be multiples of {self.align}"
                )
        elif self.align < 0:
            raise ValueError(f"align must be >= 0, not {self.align}")
        elif self.align and self.resize not in ("long", "halves"):
            raise ValueError(
                "align is used with resize 'grid' (the canvas grid) and 'long' / 'halves' "
                f"(SAM's pre-rounding), not with {self.resize!r}"
            )
        if self.resize == "halves" and (self.crop or self.stride or self.pad_multiple):
            raise ValueError(
                "resize 'halves' is two whole half-images: no crop, stride or pad_multiple"
            )

    def key(self) -> str:
        """A short, filesystem-safe identifier, e.g. ``short448``, ``short336-c224s112`` or
        ``long1024-a16``; ``grid`` keys keep the old spelling, ``trident448a16-c336s224``)."""
        name = STORED_RESIZE_NAMES.get(self.resize, self.resize)
        base = "orig" if self.resize == "none" else f"{name}{self.size}"
        if self.resize == "grid":
            base += f"a{self.align}"
        elif self.align:
            base += f"-a{self.align}"
        if self.resize in ("short", "grid") and self.max_long != 2048:
            base += f"max{self.max_long}"
        if self.crop:
            base += f"-c{self.crop}s{self.stride}"
        if self.pad_multiple:
            base += f"-pad{self.pad_multiple}"
        return base

    def to_dict(self) -> dict:
        """The record of the protocol (``resize`` in its stored spelling, see the module doc)."""
        d = asdict(self)
        d["resize"] = STORED_RESIZE_NAMES.get(self.resize, self.resize)
        if not d["align"]:
            del d["align"]  # the records of protocols made before ``align`` existed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Protocol:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def rounded_size(self, height: int, width: int) -> tuple[int, int]:
        """Size ``(H, W)`` of the image the resize rule starts from: for ``long`` / ``halves``
        with ``align``, each side of the original rounded *up* to a multiple of ``align``
        (``(512, 683)`` -> ``(512, 688)`` at 16); the original size otherwise."""
        if self.align and self.resize in ("long", "halves"):
            return round_up(height, self.align), round_up(width, self.align)
        return height, width

    @property
    def sam_only(self) -> bool:
        """``halves``, or ``long`` with ``align``: SAM's input rules, which only SAM backbones
        (``featurestore.backbones.sam``) take."""
        return self.resize == "halves" or (self.resize == "long" and bool(self.align))

    def halves_layout(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """``halves`` only: per half ``(src_x1, src_x2, rh, rw)``, its columns ``[src_x1,
        src_x2)`` in the image that is split (the original, or with ``align`` the rounded image
        of ``rounded_size``; ``height`` and ``width`` are the original size either way) and its
        own ``long``-rule size ``(rh, rw)`` (longer side = ``size``, ``int(x * f + 0.5)``, at
        least 1 px, as SAM's ``ResizeLongestSide``).

        The two resized halves are laid side by side, top-aligned, on the "resized image" of
        ``resized_size``: ``(max(rh), rw_left + rw_right)``; the left half is the box
        ``(0, 0, rh_l, rw_l)``, the right one ``(0, rw_l, rh_r, rw_l + rw_r)``. For Cityscapes
        (2048 x 1024, halves 1024 x 1024) at ``size=1024`` the scale is 1 and the layout is the
        original image. With an odd width the right half is one column wider, so the two halves
        may get slightly different scales (and heights) when they are wider than tall (an even
        ``align`` makes the rounded width even: two equal halves).

        Raises:
            ValueError: not ``halves``, or an image (after rounding) narrower than 2 px (no
                left half).
        """
        if self.resize != "halves":
            raise ValueError(f"halves_layout needs resize 'halves', not {self.resize!r}")
        height, width = self.rounded_size(height, width)
        if width < 2 or height < 1:
            raise ValueError(f"a {height}x{width} image has no left and right halves")
        out = []
        for x1, x2 in half_columns(width):
            f = self.size / max(height, x2 - x1)
            rh = max(1, int(height * f + 0.5))
            rw = max(1, int((x2 - x1) * f + 0.5))
            out.append((x1, x2, rh, rw))
        return out

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size ``(H, W)`` of the resized image (EVAL.md §4.1: ``int(x * f + 0.5)``; for
        ``halves`` the side-by-side layout of ``halves_layout``; ``long`` with ``align`` resizes
        the ``rounded_size``)."""
        if self.resize == "halves":
            layout = self.halves_layout(height, width)
            return max(r[2] for r in layout), sum(r[3] for r in layout)
        if self.resize == "none":
            return height, width
        if self.resize == "square":
            return self.size, self.size
        if self.resize == "long":
            height, width = self.rounded_size(height, width)
            f = self.size / max(height, width)
        else:
            f = min(self.max_long / max(height, width), self.size / min(height, width))
        rh, rw = max(1, int(height * f + 0.5)), max(1, int(width * f + 0.5))
        if self.resize == "grid":
            a = self.align
            rh, rw = max(round_up(rh, a), self.crop), max(round_up(rw, a), self.crop)
        return rh, rw

    def windows(self, height: int, width: int) -> np.ndarray:
        """Window boxes ``(n, 4)`` as ``(y1, x1, y2, x2)`` in resized-image pixels.

        mmseg ``slide`` rule: ``grids = max(H - c + s - 1, 0) // s + 1``; the last window is flush
        with the border; an image smaller than the crop is a single window.
        """
        if not self.crop:
            return np.array([[0, 0, height, width]], dtype=np.int64)
        c, s = self.crop, self.stride
        h_grids = max(height - c + s - 1, 0) // s + 1
        w_grids = max(width - c + s - 1, 0) // s + 1
        boxes = []
        for i in range(h_grids):
            for j in range(w_grids):
                y1, x1 = i * s, j * s
                y2, x2 = min(y1 + c, height), min(x1 + c, width)
                y1, x1 = max(y2 - c, 0), max(x2 - c, 0)
                boxes.append((y1, x1, y2, x2))
        return np.array(boxes, dtype=np.int64)


def half_columns(width: int) -> list[tuple[int, int]]:
    """Columns ``[x1, x2)`` of the left and right halves of an image ``width`` pixels wide:
    ``[0, W // 2)`` and ``[W // 2, W)`` (the right one is a column wider when ``W`` is odd).
    The one split rule of ``Protocol(resize="halves")`` (``Protocol.halves_layout``), of SAM's
    halves input and of everything that maps results back onto the halves."""
    return [(0, width // 2), (width // 2, width)]


@dataclass(frozen=True)
class WindowGeometry:
    """One window: its box in the resized image, its symmetric padding and its token grid."""

    box: tuple[int, int, int, int]  # y1, x1, y2, x2 in resized pixels
    pad: tuple[int, int, int, int]  # top, left, bottom, right (pixels added)
    grid: tuple[int, int]  # (gh, gw) patch tokens


@dataclass
class ImageGeometry:
    """Everything about one image's model inputs that follows from its size and the protocol."""

    original: tuple[int, int]
    resized: tuple[int, int]
    windows: list[WindowGeometry] = field(default_factory=list)
    # The image the resize rule starts from when it is not the original: SAM's pre-rounding
    # (``Protocol.align`` with ``long`` / ``halves``, ``Protocol.rounded_size``).
    rounded: tuple[int, int] | None = None

    @property
    def n_windows(self) -> int:
        return len(self.windows)

    @property
    def n_tokens(self) -> int:
        return sum(w.grid[0] * w.grid[1] for w in self.windows)


def padding_for(length: int, multiple: int) -> tuple[int, int]:
    """Symmetric padding ``(before, after)`` that brings ``length`` up to a multiple."""
    total = (-length) % multiple
    return total // 2, total - total // 2


def image_geometry(protocol: Protocol, height: int, width: int, patch_size: int) -> ImageGeometry:
    """Geometry of one image of original size ``(height, width)`` for a backbone's patch size."""
    if protocol.sam_only:
        raise ValueError(
            f"{protocol.key()} is SAM's input (resize 'halves', or 'long' with align); only SAM "
            "backbones take it (featurestore.backbones.sam)"
        )
    multiple = protocol.pad_multiple or patch_size
    if multiple % patch_size:
        multiple = math.lcm(multiple, patch_size)
    rh, rw = protocol.resized_size(height, width)
    geo = ImageGeometry(original=(height, width), resized=(rh, rw))
    for y1, x1, y2, x2 in protocol.windows(rh, rw).tolist():
        top, bottom = padding_for(y2 - y1, multiple)
        left, right = padding_for(x2 - x1, multiple)
        gh = (y2 - y1 + top + bottom) // patch_size
        gw = (x2 - x1 + left + right) // patch_size
        geo.windows.append(WindowGeometry((y1, x1, y2, x2), (top, left, bottom, right), (gh, gw)))
    return geo


def preprocess_windows(
    image: np.ndarray,
    geometry: ImageGeometry,
    mean: Sequence[float],
    std: Sequence[float],
) -> list[torch.Tensor]:
    """Resize, normalise and cut one RGB image into padded windows.

    Args:
        image: ``(H, W, 3)`` uint8 at the original size.
        geometry: the image's geometry for the protocol and the backbone's patch size.

    Returns:
        One ``(3, h, w)`` float32 tensor per window, zero-padded (i.e. with the mean colour)
        symmetrically as ``geometry`` says. Resizing is bilinear, ``align_corners=False``,
        no antialiasing (cv2 ``INTER_LINEAR`` semantics, as mmseg's ``Resize``).
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    rh, rw = geometry.resized
    if (rh, rw) != tuple(x.shape[1:]):
        x = F.interpolate(x[None], size=(rh, rw), mode="bilinear", align_corners=False)[0]
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0
    x = (x - m) / s
    out = []
    for w in geometry.windows:
        y1, x1, y2, x2 = w.box
        top, left, bottom, right = w.pad
        crop = x[:, y1:y2, x1:x2]
        if top or left or bottom or right:
            crop = F.pad(crop, (left, right, top, bottom))
        out.append(crop.contiguous())
    return out
