"""Label sets in a store: per-image label maps at the original image size (e.g. pseudo-labels
written by ``ovss segment --write-labels NAME``, read by ``ovss align``).

Layout::

    <store>/labels/<name>/       attrs: {"label_set": {class names, method, protocol, ...}}
        pixels  (total pixels,) uint8, images concatenated row-major in store order,
                chunks of 4 Mi pixels (an image touches O(1) chunks)
        offsets (n_images + 1,) int64 first pixel of each image (from the image table sizes)
        done    (n_images,) uint8: 1 once the image's pixels are written

A label set is written by one process (``segment``), image by image, ``done`` after the pixels.
"""

from __future__ import annotations

import datetime as _dt

import numpy as np

from featurestore import __version__
from featurestore.errors import MissingLabelSetError, StoreError
from featurestore.names import check_name
from featurestore.store import FeatureStore

CHUNK_PIXELS = 1 << 22


class LabelSet:
    """Read/write access to one label set."""

    def __init__(self, store: FeatureStore, name: str):
        check_name(name, "label set")
        if "labels" not in store.root or name not in store.root["labels"]:
            have = ", ".join(list_label_sets(store)) or "none"
            raise MissingLabelSetError(
                f"store {store.path} has no label set '{name}' (it has: {have})",
                store=store.path,
                name=name,
                available=list_label_sets(store),
            )
        self.store = store
        self.name = name
        self.group = store.root["labels"][name]
        self.offsets = np.asarray(self.group["offsets"][...])
        self._done = np.asarray(self.group["done"][...])

    @property
    def info(self) -> dict:
        return dict(self.group.attrs["label_set"])

    @property
    def done(self) -> np.ndarray:
        return self._done.astype(bool)

    def write(self, index: int, labels: np.ndarray) -> None:
        h, w = (int(x) for x in self.store.root["images/size"][index])
        if labels.shape != (h, w):
            raise StoreError(f"labels of image {index} are {labels.shape}, the image is {(h, w)}")
        if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
            raise StoreError("labels must be in 0..255 (255 = ignore)")
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        self.group["pixels"][a:b] = labels.astype(np.uint8).reshape(-1)
        self._done[index] = 1
        self.group["done"][index : index + 1] = self._done[index : index + 1]

    def read(self, index: int) -> np.ndarray:
        """``(H, W)`` uint8 labels of image ``index`` (StoreError if not written)."""
        if not self._done[index]:
            raise StoreError(f"label set '{self.name}' has no labels for image {index}")
        h, w = (int(x) for x in self.store.root["images/size"][index])
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        return np.asarray(self.group["pixels"][a:b]).reshape(h, w)


def list_label_sets(store: FeatureStore) -> list[str]:
    if "labels" not in store.root:
        return []
    return sorted(k for k, _ in store.root["labels"].groups())


def create_label_set(
    store: FeatureStore, name: str, info: dict, overwrite: bool = False
) -> LabelSet:
    """Create (or replace with ``overwrite``) an empty label set sized from the image table.

    Raises:
        InvalidNameError: ``name`` cannot be a store key (``featurestore.names.check_name``),
            checked before anything is written.
    """
    check_name(name, "label set")
    labels = store.root.require_group("labels")
    if name in labels:
        if not overwrite:
            raise StoreError(f"label set '{name}' exists; pass --overwrite to replace it")
        del labels[name]
    g = labels.create_group(name)
    sizes = np.asarray(store.root["images/size"][...], dtype=np.int64)
    counts = sizes[:, 0] * sizes[:, 1] if len(sizes) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    g.create_array(
        "pixels",
        shape=(total,),
        chunks=(min(CHUNK_PIXELS, max(total, 1)),),
        dtype="uint8",
        fill_value=255,
    )
    off = g.create_array("offsets", shape=offsets.shape, chunks=offsets.shape, dtype="int64")
    off[...] = offsets
    n = store.n_images
    g.create_array("done", shape=(n,), chunks=(max(n, 1),), dtype="uint8", fill_value=0)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    g.attrs.update({"label_set": {**info, "ovss_version": __version__, "created": created}})
    return LabelSet(store, name)
