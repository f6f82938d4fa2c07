"""PixelCLIP's mask sources: unlabeled masks per store image (METHODS.md §5).

Three sources, one interface (:class:`MaskSource`: ``masks(index) -> (n, H, W) bool`` at the
image's original size, or None when the image has none):

- ``dino`` (:class:`LabelSetMasks`): a mask set of the store, i.e. the per-image k-means of DINO
  ViT-S/16 patch features made by ``ovss cluster --per-image`` (k = 16; label = cluster id, 255 =
  no mask). Each cluster present in an image is one mask.
- ``sam`` (:class:`SamMasks`): SAM's automatic masks computed from the cached SAM set of the
  store (``methods.sam_cache.generate_masks_cached``, no image encoder runs), with the
  generator's options. Computed once per image and kept in memory, bit-packed [ours].
- ``sa1b`` (:class:`SA1BMasks`): SA-1B annotation files, one JSON per image
  (``{"image": {...}, "annotations": [{"segmentation": {"size": [h, w], "counts": RLE}}]}``),
  COCO RLE decoded with ``pycocotools`` (extra ``sa1b``). A store image ``ID`` reads
  ``<folder>/<ID>.json`` (or the stem of its ID, as SA-1B names ``sa_1.jpg`` / ``sa_1.json``).

:func:`resize_masks` brings masks to the training resolution: nearest resize to ``S × S`` (256)
and masks of at most one pixel dropped (the authors' ``downsized_masks.sum() > 1``).

Bad inputs are one-line :class:`MaskSourceError` s naming the file or image: an annotation file
that is not JSON or not of that layout, an RLE whose size differs from the image's, a mask
set with another image count. An image without masks is *skipped*, and the trainer counts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.errors import OvssError
from methods.pixelclip import MASK_SIZE

#: Mask source kinds.
MASK_SOURCES = ("dino", "sam", "sa1b")


class MaskSourceError(OvssError):
    """Masks cannot be read: a malformed annotation file, a mask of the wrong size, a mask set
    that does not belong to the store.

    Attributes:
        source: ``dino``, ``sam`` or ``sa1b``.
        path: the offending file ('' if none).
        image_id: the image concerned ('' if none).
    """

    def __init__(self, message: str, source: str = "", path: str = "", image_id: str = ""):
        super().__init__(message)
        self.source, self.path, self.image_id = source, path, image_id


class MaskSource:
    """Base of the mask sources. ``masks(index)`` -> ``(n, H, W)`` bool or None."""

    kind = ""

    def masks(self, index: int) -> np.ndarray | None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Plain JSON facts recorded in the checkpoint's provenance."""
        raise NotImplementedError


def _check_shape(
    masks: np.ndarray, size: tuple[int, int], source: str, image_id: str, path: str = ""
):
    if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(size):
        raise MaskSourceError(
            f"{source} masks of image {image_id!r} are {tuple(masks.shape[1:])}, the image is "
            f"{tuple(size)}" + (f" ({path})" if path else ""),
            source,
            path,
            image_id,
        )


class LabelSetMasks(MaskSource):
    """Masks from a mask set (label set) of the store: one mask per label present (255 = none).

    Raises:
        MissingLabelSetError: the store has no such set (the CLI proposes ``ovss cluster``).
    """

    kind = "dino"

    def __init__(self, store: Any, name: str):
        from featurestore.labelsets import LabelSet

        self.store = store
        self.set = LabelSet(store, name)
        self.name = name
        if len(self.set.offsets) != store.n_images + 1:
            raise MaskSourceError(
                f"mask set '{name}' has {len(self.set.offsets) - 1} images, the store "
                f"{store.n_images}",
                self.kind,
            )

    def masks(self, index: int) -> np.ndarray | None:
        if not self.set.done[index]:
            return None
        labels = self.set.read(index)
        ids = [int(v) for v in np.unique(labels) if v != 255]
        if not ids:
            return None
        return np.stack([labels == v for v in ids])

    def describe(self) -> dict[str, Any]:
        info = self.set.info
        return {
            "kind": self.kind,
            "mask_set": self.name,
            "method": info.get("method"),
            "features": info.get("features"),
            "k": info.get("k"),
            "created": info.get("created"),
        }


class SamMasks(MaskSource):
    """SAM automatic masks from the cached SAM set (generator options as SAM's).

    Args:
        store: the store.
        fs: the SAM feature set (``embedding``).
        options: ``generate_masks_cached`` keyword arguments (points_per_side, ...).
        weights: SAM checkpoint for the decoder (None: the set's identity decides).
    """

    kind = "sam"

    def __init__(self, store: Any, fs: Any, options: dict[str, Any], weights: str | None = None):
        from methods.sam_cache import load_sam_decoder_for

        self.store, self.fs, self.options = store, fs, dict(options)
        self.model = load_sam_decoder_for(fs, weights)
        self.status = fs.status()
        self._cache: dict[int, tuple[np.ndarray, tuple[int, ...]] | None] = {}

    def masks(self, index: int) -> np.ndarray | None:
        if index in self._cache:
            hit = self._cache[index]
            if hit is None:
                return None
            bits, shape = hit
            return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)
        if self.status[index] != 1:
            return None
        from methods.sam_cache import generate_masks_cached

        f = self.fs.read(index, names=["embedding"])
        with torch.inference_mode():
            recs = generate_masks_cached(self.model, f, **self.options)
        if not recs:
            self._cache[index] = None
            return None
        m = np.stack([np.asarray(r["segmentation"], bool) for r in recs])
        _check_shape(m, tuple(int(s) for s in f.original_size), self.kind, f.image_id)
        self._cache[index] = (np.packbits(m.reshape(-1)), m.shape)
        return m

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "features": self.fs.key,
            "weights": self.fs.provenance["backbone"].get("weights"),
            "generator": self.options,
        }


def decode_rle(segmentation: dict[str, Any]) -> np.ndarray:
    """``(h, w)`` bool of one COCO RLE (``{"size": [h, w], "counts": str | list}``)."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise OvssError("SA-1B annotations need pycocotools: pip install 'ovss[sa1b]'") from None
    rle = dict(segmentation)
    if isinstance(rle.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(rle.get("counts"), str):
        rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


def read_sa1b_file(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The masks of one SA-1B annotation file: ``(n, h, w)`` bool (``n`` may be 0).

    Args:
        path: the JSON file.
        size: the image's ``(H, W)``; every mask must have it.

    Raises:
        MaskSourceError: not JSON, not the SA-1B layout, an RLE that cannot be decoded or has
            another size than the image (one line naming the file).
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MaskSourceError(
            f"SA-1B annotation file {p} is not readable JSON ({type(e).__name__}: "
            f"{getattr(e, 'msg', e)})",
            "sa1b",
            str(p),
        ) from None
    anns = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(anns, list):
        raise MaskSourceError(
            f"SA-1B annotation file {p} has no 'annotations' list", "sa1b", str(p)
        )
    out = []
    for n, a in enumerate(anns):
        seg = a.get("segmentation") if isinstance(a, dict) else None
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise MaskSourceError(
                f"SA-1B annotation {n} of {p} has no COCO RLE segmentation (size, counts)",
                "sa1b",
                str(p),
            )
        try:
            m = decode_rle(seg)
        except OvssError:
            raise
        except Exception as e:  # pycocotools raises plain exceptions on corrupt counts
            raise MaskSourceError(
                f"SA-1B annotation {n} of {p} is not a valid RLE ({type(e).__name__})",
                "sa1b",
                str(p),
            ) from None
        if size is not None and tuple(m.shape) != tuple(size):
            raise MaskSourceError(
                f"SA-1B annotation {n} of {p} is {m.shape[0]}x{m.shape[1]}, the image is "
                f"{size[0]}x{size[1]}",
                "sa1b",
                str(p),
            )
        out.append(m)
    if not out:
        h, w = size if size is not None else (0, 0)
        return np.zeros((0, h, w), bool)
    return np.stack(out)


class SA1BMasks(MaskSource):
    """Masks from a folder of SA-1B annotation files (``<image id>.json``)."""

    kind = "sa1b"

    def __init__(self, store: Any, folder: str):
        self.store = store
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise MaskSourceError(f"SA-1B annotation folder {self.folder} does not exist", "sa1b")
        table = store.image_table()
        self.ids = [str(i) for i in table["id"]]
        self.sizes = np.asarray(table["size"])

    def path_for(self, index: int) -> Path | None:
        iid = self.ids[index]
        for name in (iid, Path(iid).stem, Path(iid).name):
            p = self.folder / f"{name}.json"
            if p.is_file():
                return p
        return None

    def masks(self, index: int) -> np.ndarray | None:
        p = self.path_for(index)
        if p is None:
            return None
        m = read_sa1b_file(p, tuple(int(s) for s in self.sizes[index]))
        return m if len(m) else None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "folder": str(self.folder.resolve())}


def resize_masks(masks: np.ndarray | torch.Tensor, size: int = MASK_SIZE) -> torch.Tensor:
    """``(n, H, W)`` bool masks -> ``(n', size, size)`` bool: nearest resize
    (``F.interpolate(mode="nearest")``, the authors'), masks with ≤ 1 pixel left dropped."""
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    if m.ndim != 3:
        raise OvssError(f"masks must be (n, H, W), got {tuple(m.shape)}")
    if len(m) == 0:
        return torch.zeros(0, size, size, dtype=torch.bool)
    r = F.interpolate(m[None].float(), size=(size, size), mode="nearest")[0] > 0.5
    return r[r.sum(dim=(1, 2)) > 1]


def load_store_image(store: Any, record: Any, who: str = "pixelclip") -> np.ndarray:
    """``(H, W, 3)`` uint8 pixels of a store image (the path the store records).

    Raises:
        OvssError: the file cannot be read (moved, deleted, corrupt), naming it.
    """
    from featurestore.images import load_image_rgb

    try:
        return load_image_rgb(record.path)
    except (OvssError, OSError) as e:
        gone = not Path(record.path).exists()
        raise OvssError(
            f"{who} runs CLIP on the pixels, and image {record.image_id!r} of store "
            f"{store.path} cannot be read at {record.path}"
            + (" (moved or deleted)" if gone else f": {e}")
        ) from None


__all__ = [
    "MASK_SOURCES",
    "LabelSetMasks",
    "MaskSource",
    "MaskSourceError",
    "SA1BMasks",
    "SamMasks",
    "decode_rle",
    "load_store_image",
    "read_sa1b_file",
    "resize_masks",
]
