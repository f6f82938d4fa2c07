"""A derived cache of a method's dense output: the cosine logits ``(Q, h, w)`` of every image.

Sweeps over scoring keys (and later evaluations of the same method configuration) then read
the logits instead of recomputing them from the feature sets. Layout [ours]::

    <root>/                                  a folder, or <store>/derived/dense for "store"
      <method>-<digest>/                      one entry per method config + vocabulary
        manifest.json                         {"format": 1, "identity": {...}}
        <image index>.npy                     float32 (Q, h, w), written atomically

An entry's *key* (its folder name) is a digest of the method, its typed config and the
vocabulary (class names, query-to-class map and the digest of the query embeddings, so the text
tower, templates and class-file family are covered). Its manifest's identity adds the feature
sets the method read (key and a digest of each provenance, which records the weights, the
protocol and the time the set was made) and the store's image table. An entry is **refused**
(:class:`DenseCacheMismatchError`, naming what differs) when any of it differs from the run's:
a re-extracted feature set, another store, or (an entry folder given directly) another config
or vocabulary. Images are added as they are computed, so an interrupted run's entry is
resumed; the float32 logits are stored bit for bit, so a run from the cache gives the labels of
a run from the features exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.errors import OvssError
from featurestore.store import image_table_digest, json_digest
from methods.base import Segmenter, Vocab
from methods.config import config_to_dict

FORMAT = 1
#: ``--cache-dense store``: the cache lives inside the (local) store, under this folder.
IN_STORE = "store"
STORE_FOLDER = ("derived", "dense")


class DenseCacheMismatchError(OvssError):
    """A derived dense cache entry was made under another configuration.

    Attributes:
        path: the entry's folder.
        differences: the parts of the identity that differ (``config.cos_fac``,
            ``feature_sets.clip``, ``vocabulary``, ``images``...).
    """

    def __init__(self, message: str, path: str = "", differences: tuple[str, ...] = ()):
        super().__init__(message)
        self.path = path
        self.differences = tuple(differences)


def vocabulary_identity(vocab: Vocab) -> dict[str, Any]:
    """What of a vocabulary the logits depend on: names, query map and the embeddings' digest
    (float32 bytes)."""
    emb = np.ascontiguousarray(vocab.embeddings.detach().float().cpu().numpy())
    q2c = np.asarray(vocab.query_to_class.detach().cpu().numpy(), dtype=np.int64)
    return {
        "class_names": [list(c) for c in vocab.class_names],
        "query_to_class": q2c.tolist(),
        "embeddings": hashlib.sha256(emb.tobytes()).hexdigest(),
        "shape": list(emb.shape),
        "source": vocab.source,
        "templates": vocab.templates,
    }


def dense_identity(seg: Segmenter, vocab: Vocab) -> dict[str, Any]:
    """The identity of a method's dense output over a store (see the module doc)."""
    return {
        "method": seg.name,
        "config": json.loads(json.dumps(config_to_dict(seg.config), default=str)),
        "vocabulary": vocabulary_identity(vocab),
        "feature_sets": {
            role: {"key": fs.key, "provenance": json_digest(fs.provenance)}
            for role, fs in sorted(seg.sets.items())
        },
        "images": image_table_digest(seg.store.image_table()),
    }


def entry_key(identity: dict[str, Any]) -> str:
    """The folder name of an identity's entry: ``<method>-<16 hex digits>`` of the method,
    config and vocabulary."""
    part = {k: identity[k] for k in ("method", "config", "vocabulary")}
    return f"{identity['method']}-{json_digest(part)[:16]}"


def _differences(have: dict, want: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(have) | set(want)):
        a, b = have.get(k), want.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and k in ("config", "feature_sets"):
            out += _differences(a, b, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def cache_root(location: str, store_path: str) -> Path:
    """The folder of ``--cache-dense LOCATION``: ``store`` is ``<store>/derived/dense``.

    Raises:
        OvssError: ``store`` for a store that is not a local folder.
    """
    if location == IN_STORE:
        if "://" in str(store_path) or str(store_path).lower().endswith((".h5", ".hdf5")):
            raise OvssError(
                f"the derived dense cache can live only in a local store folder, not in "
                f"{store_path}; give a folder for it instead"
            )
        return Path(store_path, *STORE_FOLDER)
    return Path(location)


class DenseCacheEntry:
    """One entry: the logits of one method config + vocabulary over one store's images."""

    def __init__(self, path: Path, identity: dict[str, Any]):
        self.path = Path(path)
        self.identity = identity
        self.hits = 0
        self.writes = 0

    @classmethod
    def open(cls, path: str | os.PathLike, identity: dict[str, Any]) -> DenseCacheEntry:
        """The entry at ``path`` (created, with its manifest, when absent).

        Raises:
            DenseCacheMismatchError: the entry's identity differs from ``identity``.
        """
        path = Path(path)
        manifest = path / "manifest.json"
        if manifest.exists():
            try:
                have = json.loads(manifest.read_text())
            except (OSError, ValueError) as e:
                raise OvssError(f"derived dense cache {path}: unreadable manifest ({e})") from None
            if have.get("format") != FORMAT:
                raise OvssError(
                    f"derived dense cache {path} has format {have.get('format')}, "
                    f"this version reads {FORMAT}; remove it"
                )
            diff = _differences(have.get("identity", {}), identity)
            if diff:
                raise DenseCacheMismatchError(
                    f"derived dense cache {path} was made with another {', '.join(diff)}; "
                    "it is not used (remove it, or give another cache folder)",
                    path=str(path),
                    differences=tuple(diff),
                )
        else:
            path.mkdir(parents=True, exist_ok=True)
            tmp = path / f".manifest.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"format": FORMAT, "identity": identity}, indent=1))
            os.replace(tmp, manifest)
        return cls(path, identity)

    def _file(self, index: int) -> Path:
        return self.path / f"{int(index)}.npy"

    def get(self, index: int) -> torch.Tensor | None:
        """The cached logits of image ``index`` (float32 ``(Q, h, w)``), or None."""
        f = self._file(index)
        if not f.exists():
            return None
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a damaged file is recomputed (and replaced)
        self.hits += 1
        return torch.from_numpy(arr)

    def put(self, index: int, cos: torch.Tensor) -> None:
        """Store image ``index``'s logits (atomically: a temporary file renamed)."""
        arr = np.ascontiguousarray(cos.detach().cpu().numpy())
        tmp = self.path / f".{int(index)}.{os.getpid()}.tmp.npy"
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, self._file(index))
        self.writes += 1

    def cached_images(self) -> int:
        return sum(1 for p in self.path.glob("*.npy") if not p.name.startswith("."))


def open_entry(location: str, store_path: str, seg: Segmenter, vocab: Vocab) -> DenseCacheEntry:
    """The entry of ``seg`` + ``vocab`` under ``--cache-dense LOCATION``: a cache folder (the
    entry ``<method>-<digest>`` inside it), ``store``, or one entry folder given directly
    (it has a ``manifest.json``; then it must match).

    Raises:
        DenseCacheMismatchError: the entry was made under another identity.
    """
    identity = dense_identity(seg, vocab)
    root = cache_root(location, store_path)
    if (root / "manifest.json").exists():
        return DenseCacheEntry.open(root, identity)
    return DenseCacheEntry.open(root / entry_key(identity), identity)


__all__ = [
    "DenseCacheEntry",
    "DenseCacheMismatchError",
    "cache_root",
    "dense_identity",
    "entry_key",
    "open_entry",
    "vocabulary_identity",
]
