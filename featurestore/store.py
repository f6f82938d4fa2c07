"""The ovss feature store: a Zarr v3 group of ragged per-image dense features.

Layout (see README "The feature store" for the rationale)::

    <store>/                         zarr group, attrs {"ovss_store": 1, ...}
      images/                        the image table, fixed when the store is created
        id, path, source, split, sha256     (n_images,) strings
        size                                (n_images, 2) int32 original (H, W) after EXIF
      features/<model>@<protocol>/   one feature set; attrs = provenance
        geometry/                    derived from sizes + protocol + patch size, written once
          resized (n_images, 2), n_windows (n_images,), win_box/win_pad/win_grid (n_win_total, 4|2)
          win_start (n_images + 1,)  first window row of each image (global window numbering)
          block_start (n_blocks + 1,) first image of each block
          row_start_<unit> (n_images,) first row of the image in every tensor of that unit
          row_count_<unit> (n_images,)
        <tensor>                     (n_blocks * block_rows_<unit>, *row_shape), one chunk = one block
        status                       (n_blocks, max_block_images) uint8, chunk = one block's row
        errors                       (n_blocks, max_block_images) str, chunk = one block's row

Images are grouped into *blocks* of consecutive images (about ``target_block_mb`` of the largest
tensor each). A block is one uncompressed chunk of every tensor, so:
  * reading one image touches one chunk per tensor (a byte-range read of it);
  * streaming a feature set reads whole chunk files in order;
  * a writer always owns whole chunks: ``--shard i/n`` writes the blocks ``b % n == i``;
  * a block's ``status`` chunk is written only after its data chunks are on disk (fsync), so an
    interrupted extraction resumes at the first unfinished block and never exposes partial data.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import glob
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from featurestore import __version__, remote
from featurestore.errors import (
    CorruptStoreError,
    FeatureSetExistsError,
    MissingFeatureSetError,
    StoreError,
    StoreImagesMismatchError,
    StoreNotFoundError,
)
from featurestore.images import ImageRecord
from featurestore.names import check_name
from featurestore.protocol import ImageGeometry, Protocol
from featurestore.specs import UNITS, TensorSpec
from featurestore.store_files import ChunkFiles

STORE_FORMAT = 1
IMAGE_COLUMNS = ("id", "path", "source", "split", "sha256")
#: Environment variable naming a crash point (tests): the process kills itself (SIGKILL) there.
CRASH_ENV = "OVSS_TEST_CRASH_AT"
STATUS_PENDING, STATUS_OK, STATUS_FAILED = 0, 1, 2
DTYPES = ("float16", "float32", "bfloat16")
DEFAULT_BLOCK_MB = 32.0


def set_key(model: str, protocol: Protocol) -> str:
    """Feature-set name: ``<model>@<protocol key>``, e.g. ``dinov2-s14@short448``."""
    return f"{model}@{protocol.key()}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _storage_dtype(dtype: str) -> np.dtype:
    # numpy has no bfloat16: its bit pattern is stored as uint16 and viewed back through torch.
    return np.dtype("uint16") if dtype == "bfloat16" else np.dtype(dtype)


@dataclass
class Provenance:
    """Everything that identifies how a feature set was made."""

    model: str
    protocol: dict
    backbone: dict  # BackboneInfo as a dict: weights identity, library versions, arch, mean/std...
    tensors: list[dict]
    dtype: str
    ovss_version: str = __version__
    created: str = ""

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "protocol": self.protocol,
            "backbone": self.backbone,
            "tensors": self.tensors,
            "dtype": self.dtype,
            "ovss_version": self.ovss_version,
            "created": self.created,
        }


# --------------------------------------------------------------------------------------------
# Layout planning
# --------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where every image's rows live; derived deterministically from sizes + protocol + specs."""

    geometries: list[ImageGeometry]
    block_start: np.ndarray  # (n_blocks + 1,)
    block_rows: dict[str, int]  # unit -> rows per block chunk
    row_start: dict[str, np.ndarray]  # unit -> (n_images,) absolute row in the tensor array
    row_count: dict[str, np.ndarray]  # unit -> (n_images,)

    @property
    def n_blocks(self) -> int:
        return len(self.block_start) - 1

    @property
    def max_block_images(self) -> int:
        return int(np.diff(self.block_start).max()) if self.n_blocks else 1


def _unit_counts(geos: Sequence[ImageGeometry]) -> dict[str, np.ndarray]:
    return {
        "token": np.array([g.n_tokens for g in geos], dtype=np.int64),
        "window": np.array([g.n_windows for g in geos], dtype=np.int64),
        "image": np.array([1 if g.n_windows else 0 for g in geos], dtype=np.int64),
    }


def plan_layout(
    geometries: list[ImageGeometry],
    specs: Sequence[TensorSpec],
    dtype: str = "float16",
    target_block_mb: float = DEFAULT_BLOCK_MB,
    max_block_images: int = 256,
) -> Layout:
    """Group consecutive images into blocks of about ``target_block_mb`` of feature bytes.

    An image is never split across blocks; a block holds at least one image and at most
    ``max_block_images``. The block size in rows of each unit is the largest block's use.
    """
    counts = _unit_counts(geometries)
    itemsize = _storage_dtype(dtype).itemsize
    per_image_bytes = np.zeros(len(geometries), dtype=np.float64)
    for spec in specs:
        per_image_bytes += counts[spec.unit] * int(np.prod(spec.row_shape)) * itemsize
    target = target_block_mb * 2**20
    starts = [0]
    acc, n_in = 0.0, 0
    for i, b in enumerate(per_image_bytes):
        if n_in and (acc + b > target or n_in >= max_block_images):
            starts.append(i)
            acc, n_in = 0.0, 0
        acc += b
        n_in += 1
    if len(geometries):
        starts.append(len(geometries))
    block_start = np.array(starts, dtype=np.int64)
    block_rows: dict[str, int] = {}
    row_start: dict[str, np.ndarray] = {}
    for unit in UNITS:
        c = counts[unit]
        within = np.zeros(len(c), dtype=np.int64)
        rows = 1
        for b in range(len(block_start) - 1):
            s, e = block_start[b], block_start[b + 1]
            cs = np.cumsum(c[s:e])
            within[s:e] = cs - c[s:e]
            rows = max(rows, int(cs[-1]) if e > s else 0)
        block_rows[unit] = rows
        block_of = np.repeat(np.arange(len(block_start) - 1), np.diff(block_start))
        row_start[unit] = block_of * rows + within
    return Layout(geometries, block_start, block_rows, row_start, counts)


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------


class FeatureStore:
    """A Zarr v3 feature store. Open with ``FeatureStore.open`` or ``FeatureStore.create``."""

    def __init__(self, root: zarr.Group, path: str, storage_options: dict | None = None) -> None:
        self.root = root
        self.path = path
        self._image_ids: list[str] | None = None
        #: one-line notes of what opening/creating did on the side (leftovers removed)
        self.notes: list[str] = []
        #: fsspec options of a remote store (``None``: the process-wide ones); never recorded
        self.storage_options = storage_options
        self._remote_fs: tuple | None = None

    @property
    def is_remote(self) -> bool:
        """Whether the store is an fsspec URL (object storage) rather than a local folder."""
        return remote.is_url(self.path)

    def _fs(self) -> tuple:
        """``(fs, root)`` of a remote store: its synchronous fsspec filesystem (made once)."""
        if self._remote_fs is None:
            self._remote_fs = remote.filesystem(self.path, self.storage_options)
        return self._remote_fs

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: str | os.PathLike, mode: str = "r", storage_options: dict | None = None
    ) -> FeatureStore:
        """Open an existing store (``mode`` ``r`` or ``a``); a clear StoreError otherwise.

        ``path`` may be an fsspec URL (``s3://bucket/x.zarr``): ``storage_options`` (default:
        ``featurestore.remote.set_storage_options``) configure its filesystem, and the store
        must be committed (``featurestore.remote``)."""
        path = str(path)
        from featurestore.hdf5 import is_hdf5_path, open_hdf5

        if remote.is_url(path):
            return cls._open_remote(path, mode, storage_options)
        if is_hdf5_path(path):
            root = open_hdf5(path)
            if root.attrs.get("ovss_store") != STORE_FORMAT:
                raise StoreError(f"{path} is an HDF5 file but not an exported ovss store")
            return cls(root, path)  # type: ignore[arg-type]
        if "://" not in path and not Path(path, "zarr.json").exists():
            raise StoreNotFoundError(f"no ovss store at {path}", store=path)
        try:
            root = zarr.open_group(path, mode=mode, zarr_format=3)
        except Exception as e:  # zarr raises several types for unreadable metadata
            raise StoreError(f"cannot open store {path}: {e}") from None
        if root.attrs.get("ovss_store") != STORE_FORMAT:
            raise StoreError(f"{path} is a Zarr group but not an ovss store")
        store = cls(root, path)
        if not store._has_image_table():
            raise CorruptStoreError(
                f"store {path} has no complete image table (an interrupted creation by an "
                "older version, or damage); delete it and extract again",
                store=path,
            )
        return store

    @classmethod
    def _open_remote(cls, url: str, mode: str, storage_options: dict | None) -> FeatureStore:
        from featurestore.names import redact_url

        shown = redact_url(url)
        _, _, meta = remote.probe(url, storage_options)
        attrs = (meta or {}).get("attributes") or {}
        if meta is None:
            raise StoreNotFoundError(f"no ovss store at {shown}", store=shown)
        if attrs.get("ovss_store") != STORE_FORMAT:
            if remote.CREATING_ATTR in attrs:
                raise StoreNotFoundError(
                    f"store {shown} is unfinished (its creation was interrupted or is under "
                    "way; the next extraction into it makes it anew)",
                    store=shown,
                )
            raise StoreError(f"{shown} is a Zarr group but not an ovss store")
        with remote.remote_errors(url, storage_options):
            zstore = remote.zarr_store(url, mode == "r", storage_options)
            root = zarr.open_group(zstore, mode="r" if mode == "r" else "r+", zarr_format=3)
            store = cls(root, url, storage_options)
            complete = store._has_image_table()
        if not complete:
            raise CorruptStoreError(
                f"store {shown} has no complete image table (damage); delete it and extract again",
                store=shown,
            )
        return store

    def _has_image_table(self) -> bool:
        try:
            g = self.root["images"]
            return all(k in g for k in IMAGE_COLUMNS + ("size",))
        except Exception:  # noqa: BLE001 - unreadable metadata is an incomplete table
            return False

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        records: Sequence[ImageRecord],
        notes: list[str] | None = None,
        creator: bool = True,
        storage_options: dict | None = None,
    ) -> FeatureStore:
        """Open the store at ``path`` or create it with this image table.

        Creation is serialised with a lock file so concurrent shard processes agree, and is a
        transaction: the store is built in a hidden sibling folder (``.<name>.ovss-new``) and
        renamed into place when complete, so a store at ``path`` always has its whole image
        table; the leftover of an interrupted creation is removed by the next call (a line in
        ``notes``). An existing store must hold the same images: the same ids in the same
        order, and unchanged files (size and modification time, else the content hash).

        A URL (``s3://...``) is built in place and committed by its root metadata, written
        last (``featurestore.remote``); only a ``creator`` (shard 0) creates it or removes a
        leftover, the other shards wait for the commit. ``creator`` is ignored locally.

        Raises:
            StoreImagesMismatchError: other images, or an image file whose content changed.
            StoreError: ``path`` is a non-empty folder that is not a store.
        """
        path = str(path)
        notes = notes if notes is not None else []
        if remote.is_url(path):
            store = cls._open_or_create_remote(path, records, notes, creator, storage_options)
            store._check_same_images(records)
            store.notes = notes
            return store
        with _creation_lock(path):
            _clean_leftovers(path, notes)
            target = Path(path)
            if (target / "zarr.json").exists():
                store = cls.open(path, mode="a")
                store._check_same_images(records)
                store.notes = notes
                return store
            if target.exists() and (not target.is_dir() or any(target.iterdir())):
                raise StoreError(
                    f"{path} exists and is not an ovss store (choose another location)"
                )
            tmp = _aside(path, "new")
            root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            cls(root, str(tmp))._write_image_table(records)
            _crash_point("store-before-rename")
            _fsync_tree(tmp)
            if target.exists():
                target.rmdir()  # an empty folder the user made
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            store = cls.open(path, mode="a")
            store.notes = notes
            return store

    @classmethod
    def _open_or_create_remote(
        cls,
        url: str,
        records: Sequence[ImageRecord],
        notes: list[str],
        creator: bool,
        storage_options: dict | None,
    ) -> FeatureStore:
        from featurestore.names import redact_url

        shown = redact_url(url)

        def committed(meta: dict | None) -> bool:
            return ((meta or {}).get("attributes") or {}).get("ovss_store") == STORE_FORMAT

        fs, root, meta = remote.probe(url, storage_options)
        if not creator:
            if not committed(meta):
                remote.wait_for(
                    lambda: committed(remote.probe(url, storage_options)[2]), "the store", url
                )
            return cls.open(url, mode="a", storage_options=storage_options)
        if committed(meta):
            return cls.open(url, mode="a", storage_options=storage_options)
        with remote.remote_errors(url, storage_options):
            if meta is not None and remote.CREATING_ATTR in (meta.get("attributes") or {}):
                remote.remove_tree(fs, root)
                notes.append(f"removed the unfinished creation of store {shown} (made anew)")
            elif meta is not None or remote.has_objects(fs, root):
                raise StoreError(
                    f"{shown} exists and is not an ovss store (choose another location)"
                )
            zstore = remote.zarr_store(url, False, storage_options)
            group = zarr.open_group(
                zstore, mode="w", zarr_format=3, attributes={remote.CREATING_ATTR: 1}
            )
            building = cls(group, url, storage_options)
            building._write_image_table(records)
            _crash_point("remote-store-before-commit")
            final = {k: v for k, v in group.attrs.asdict().items() if k != remote.CREATING_ATTR}
            group.attrs.put(final)  # the commit: one put of the root metadata
        return cls.open(url, mode="a", storage_options=storage_options)

    # -- image table -------------------------------------------------------------------------
    def _write_image_table(self, records: Sequence[ImageRecord]) -> None:
        """Probe, hash and record every image; the root attributes (with the table's digest)
        are written last."""
        from featurestore.images import file_sha256, probe_image

        g = self.root.create_group("images")
        n = len(records)
        sizes = np.zeros((n, 2), dtype=np.int32)
        stats = np.zeros((n, 2), dtype=np.int64)
        hashes = []
        for i, r in enumerate(records):
            try:
                st = os.stat(r.path)
                sizes[i] = probe_image(r.path)
                hashes.append(file_sha256(r.path))
                stats[i] = (st.st_size, st.st_mtime_ns)
            except Exception:  # unreadable: recorded as size 0, reported at extraction
                hashes.append("")
            if i == n // 2:
                _crash_point("store-image-table")
        columns = {
            "id": [r.image_id for r in records],
            "path": [str(r.path) for r in records],
            "source": [r.source for r in records],
            "split": [r.split for r in records],
            "sha256": hashes,
        }
        for name, values in columns.items():
            arr = g.create_array(name, shape=(n,), dtype=str, chunks=(max(n, 1),))
            if n:
                arr[:] = np.array(values, dtype=object)
        for name, data in (("size", sizes), ("stat", stats)):
            arr = g.create_array(name, shape=(n, 2), dtype=data.dtype, chunks=(max(n, 1), 2))
            if n:
                arr[:] = data
        self.root.attrs.update(
            {
                "ovss_store": STORE_FORMAT,
                "ovss_version": __version__,
                "created": _now(),
                "images_sha256": image_table_digest({**columns, "size": sizes}),
            }
        )

    def _check_same_images(self, records: Sequence[ImageRecord]) -> None:
        """Same ids in the same order, and unchanged files: the recorded size and modification
        time (fast path), else the recorded content hash."""
        ids = self.image_ids
        new = [r.image_id for r in records]
        if list(ids) != new:
            raise StoreImagesMismatchError(
                f"store {self.path} holds a different image list ({len(ids)} images) than "
                f"requested ({len(new)})",
                store=self.path,
                reason="list",
            )
        if "stat" not in self.root["images"]:  # made by an older version: ids only
            return
        from featurestore.images import file_sha256

        table = self.image_table()
        changed = []
        for i, r in enumerate(records):
            recorded = str(table["sha256"][i])
            if not recorded:  # unreadable at creation: the extraction reports it
                continue
            try:
                st = os.stat(r.path)
            except OSError:  # unreadable now: the extraction reports it
                continue
            size, mtime = (int(x) for x in table["stat"][i])
            if (st.st_size, st.st_mtime_ns) == (size, mtime) and str(r.path) == str(
                table["path"][i]
            ):
                continue
            try:
                if file_sha256(r.path) != recorded:
                    changed.append(str(r.path))
            except OSError:
                continue
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise StoreImagesMismatchError(
                f"store {self.path} was made from other content of {len(changed)} image(s): "
                f"{', '.join(changed[:3])}{more} changed since",
                store=self.path,
                reason="content",
                paths=changed,
            )

    @property
    def n_images(self) -> int:
        return int(self.root["images/id"].shape[0])

    @property
    def image_ids(self) -> list[str]:
        """Image ids in store order (read once: the image table never changes)."""
        if self._image_ids is None:
            a = self.root["images/id"]
            self._image_ids = [str(x) for x in a[:]] if a.shape[0] else []
        return self._image_ids

    def image_table(self) -> dict[str, np.ndarray]:
        """Columns ``id, path, source, split, sha256`` (strings), ``size`` ``(n, 2)`` int32 and,
        for stores made by this version, ``stat`` ``(n, 2)`` int64 (file size in bytes,
        modification time in ns)."""
        g = self.root["images"]
        keys = IMAGE_COLUMNS + ("size",) + (("stat",) if "stat" in g else ())
        return {k: g[k][:] for k in keys}

    def image_records(self) -> list[ImageRecord]:
        t = self.image_table()
        return [
            ImageRecord(str(t["id"][i]), str(t["path"][i]), str(t["source"][i]), str(t["split"][i]))
            for i in range(len(t["id"]))
        ]

    # -- feature sets ------------------------------------------------------------------------
    def _set_entries(self) -> dict[str, bool]:
        """Every feature-set entry under ``features/`` -> whether it is finished (its group
        metadata is readable and holds the provenance, which is written last).

        Local stores are listed from the directory itself, so an entry whose ``zarr.json`` is
        missing or unreadable (an interrupted creation, or damage) is listed as unfinished
        rather than hidden or crashing the listing."""
        if self._is_local():
            feats = Path(self.path, "features")
            if not feats.is_dir():
                return {}
            out = {}
            for entry in sorted(feats.iterdir()):
                if not entry.is_dir() or entry.name.startswith("."):
                    continue
                try:
                    meta = json.loads((entry / "zarr.json").read_text())
                    done = meta.get("node_type") == "group" and "provenance" in meta.get(
                        "attributes", {}
                    )
                except (OSError, ValueError, AttributeError):
                    done = False
                out[entry.name] = bool(done)
            return out
        if self.is_remote:
            return self._remote_set_entries()
        if "features" not in self.root:
            return {}
        return {k: "provenance" in g.attrs for k, g in self.root["features"].groups()}

    def _remote_set_entries(self) -> dict[str, bool]:
        """As for local stores, from the object listing: an entry of ``features/`` whose
        ``zarr.json`` is missing (an interrupted removal) or lacks the provenance (an
        interrupted creation) is unfinished."""
        fs, root = self._fs()
        out = {}
        with remote.remote_errors(self.path, self.storage_options):
            for name in remote.child_names(fs, f"{root}/features"):
                if name == "zarr.json" or name.startswith("."):
                    continue
                meta = remote.read_json(fs, f"{root}/features/{name}/zarr.json")
                attrs = (meta or {}).get("attributes") or {}
                out[name] = bool(
                    meta and meta.get("node_type") == "group" and "provenance" in attrs
                )
        return out

    def _is_local(self) -> bool:
        return "://" not in self.path and not self.path.lower().endswith((".h5", ".hdf5"))

    def feature_sets(self) -> list[str]:
        """Keys of the finished feature sets (provenance written), sorted."""
        return sorted(k for k, done in self._set_entries().items() if done)

    def unfinished_feature_sets(self) -> list[str]:
        """Keys of feature sets whose creation did not finish (no provenance, or unreadable
        group metadata); ``create_feature_set`` replaces them, ``store verify`` reports them."""
        return sorted(k for k, done in self._set_entries().items() if not done)

    def feature_set(self, key: str) -> FeatureSet:
        check_name(key, "feature set")
        if key not in self.feature_sets():
            have = ", ".join(self.feature_sets()) or "none"
            raise StoreError(f"store {self.path} has no feature set '{key}' (it has: {have})")
        return FeatureSet(self, key)

    def require(
        self,
        model: str,
        protocol: Protocol,
        weights: str | None = None,
        tensors: Sequence[str] = (),
    ) -> FeatureSet:
        """The feature set of ``model`` under ``protocol``, checked against what the caller needs.

        Raises :class:`~featurestore.errors.MissingFeatureSetError` (with the store, model,
        protocol, tensors and a ``reason``) when the set is missing, unfinished, made with
        other settings or weights, or lacks a tensor.
        """
        key = set_key(model, protocol)

        def missing(message: str, reason: str) -> MissingFeatureSetError:
            return MissingFeatureSetError(
                message,
                store=self.path,
                model=model,
                protocol=protocol,
                tensors=tuple(tensors),
                reason=reason,
            )

        if key not in self.feature_sets():
            if key in self.unfinished_feature_sets():
                raise missing(
                    f"feature set '{key}' in store {self.path} is unfinished (its creation "
                    "was interrupted)",
                    "incomplete",
                )
            have = ", ".join(self.feature_sets()) or "none"
            raise missing(f"store {self.path} has no '{key}' features (it has: {have})", "missing")
        fs = FeatureSet(self, key)
        prov = fs.provenance
        if Protocol.from_dict(prov["protocol"]) != protocol:
            raise missing(
                f"feature set '{key}' was made with protocol {prov['protocol']}, not "
                f"{protocol.to_dict()}",
                "mismatch",
            )
        have_w = prov["backbone"].get("weights")
        if weights is not None and have_w != weights:
            err = missing(
                f"feature set '{key}' was made with weights {have_w}, not {weights}", "weights"
            )
            err.extra.update({"weights": weights, "have_weights": have_w})
            raise err
        lacking = [t for t in tensors if t not in fs.tensor_names]
        if lacking:
            raise missing(f"feature set '{key}' lacks tensors {lacking}", "tensors")
        return fs

    def create_feature_set(
        self,
        model: str,
        protocol: Protocol,
        backbone_info: dict,
        specs: Sequence[TensorSpec],
        geometries: list[ImageGeometry],
        dtype: str = "float16",
        target_block_mb: float = DEFAULT_BLOCK_MB,
        overwrite: bool = False,
        static: dict[str, np.ndarray] | None = None,
        default_geometry: bool = False,
        creator: bool = True,
    ) -> FeatureSet:
        """Create (or, with identical provenance, reopen for resuming) a feature set.

        ``default_geometry``: the geometries follow ``featurestore.protocol.image_geometry``
        with the backbone's ``patch_size`` (recorded in the layout, so ``store verify`` can
        recompute them from the image sizes); False for backbones with a rule of their own.

        An existing set with different provenance is an error unless ``overwrite``; with
        ``overwrite`` only that set is replaced (never the store): it is renamed out of the
        store first, then deleted, so an interruption never leaves half a set behind.
        Creation is a transaction: the set is built in a hidden sibling folder of the store
        and renamed into ``features/`` complete (provenance included). An unfinished set (no
        readable provenance: an interrupted creation by an older version, or damage) is
        replaced, with a line in ``self.notes``.

        In a remote store (a URL) the set is built in place, its provenance written last (the
        commit); only a ``creator`` (shard 0) builds, replaces or removes it, the other shards
        wait for the commit and then check the provenance like a resumed set.

        Raises:
            FeatureSetExistsError: the set exists with other settings and not ``overwrite``.
        """
        if dtype not in DTYPES:
            raise StoreError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        key = check_name(set_key(model, protocol), "feature set")
        prov = Provenance(
            model=model,
            protocol=protocol.to_dict(),
            backbone=_jsonable(backbone_info),
            tensors=[
                {"name": s.name, "unit": s.unit, "row_shape": list(s.row_shape), "doc": s.doc}
                for s in specs
            ],
            dtype=dtype,
        )
        if self.is_remote and not creator:
            return self._await_feature_set(key, prov)
        with _creation_lock(self.path):
            if self._is_local():
                _clean_leftovers(self.path, self.notes)
            entries = self._set_entries()
            if key in entries and entries[key]:
                existing = FeatureSet(self, key)
                if overwrite:
                    self._discard_set(key)
                elif existing.same_provenance(prov.to_dict()):
                    return existing
                else:
                    old = existing.provenance
                    diff = [
                        k
                        for k in ("protocol", "tensors", "dtype")
                        if old.get(k) != prov.to_dict()[k]
                    ]
                    if old["backbone"].get("weights") != prov.backbone.get("weights"):
                        diff.append("weights")
                    raise FeatureSetExistsError(
                        f"feature set '{key}' already exists with different "
                        f"{', '.join(diff) or 'settings'}",
                        store=self.path,
                        key=key,
                        differences=diff,
                    )
            elif key in entries:
                self._discard_set(key)
                self.notes.append(
                    f"feature set '{key}' was unfinished (an interrupted creation); made anew"
                )
            layout = plan_layout(geometries, specs, dtype, target_block_mb)
            prov.created = _now()
            d = prov.to_dict()
            d["layout"] = {
                "n_blocks": layout.n_blocks,
                "block_rows": layout.block_rows,
                "max_block_images": layout.max_block_images,
                "target_block_mb": target_block_mb,
                "geometry_rule": "default" if default_geometry else "own",
            }
            feats = self.root.require_group("features")
            if self.is_remote:  # built in place, the provenance written last (the commit)
                with remote.remote_errors(self.path, self.storage_options):
                    _build_set(feats.create_group(key), layout, specs, dtype, static, d)
                return FeatureSet(self, key)
            if not self._is_local():
                _build_set(feats.create_group(key), layout, specs, dtype, static, d)
                return FeatureSet(self, key)
            tmp = _aside(self.path, "new-set")
            _build_set(
                zarr.open_group(str(tmp), mode="w", zarr_format=3), layout, specs, dtype, static, d
            )
            _crash_point("set-before-rename")
            _fsync_tree(tmp)
            final = Path(self.path, "features", key)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
            return FeatureSet(self, key)

    def _await_feature_set(self, key: str, prov: Provenance) -> FeatureSet:
        """A non-creating shard of a remote store: wait for shard 0 to commit set ``key``,
        then require the same provenance (as when resuming)."""
        remote.wait_for(
            lambda: self._remote_set_entries().get(key, False), f"feature set '{key}'", self.path
        )
        fs = FeatureSet(self._reopened(), key)
        if not fs.same_provenance(prov.to_dict()):
            raise FeatureSetExistsError(
                f"feature set '{key}' was committed by shard 0 with other settings than this "
                "shard's",
                store=self.path,
                key=key,
                differences=[],
            )
        return fs

    def _reopened(self) -> FeatureStore:
        """This store, reopened (a remote store's Zarr group caches no new members)."""
        if not self.is_remote:
            return self
        again = FeatureStore.open(self.path, mode="a", storage_options=self.storage_options)
        self.root = again.root
        return self

    def _discard_set(self, key: str) -> None:
        """Remove a feature set: renamed out of the store (one atomic step), then deleted; an
        interrupted deletion leaves only a hidden sibling folder the next creation removes.
        In a remote store its metadata goes first (the set is unfinished from then on), then
        every other object."""
        if self.is_remote:
            fs, root = self._fs()
            prefix = f"{root}/features/{key}"
            with remote.remote_errors(self.path, self.storage_options):
                if fs.exists(f"{prefix}/zarr.json"):
                    fs.rm_file(f"{prefix}/zarr.json")
                _crash_point("overwrite-after-rename")
                remote.remove_tree(fs, prefix)
            self._reopened()
            return
        if not self._is_local():
            del self.root["features"][key]
            return
        trash = _aside(self.path, "trash")
        os.rename(Path(self.path, "features", key), trash)
        _fsync_dir(Path(self.path, "features"))
        _crash_point("overwrite-after-rename")
        shutil.rmtree(trash)


def _build_set(
    g: zarr.Group,
    layout: Layout,
    specs: Sequence[TensorSpec],
    dtype: str,
    static: dict[str, np.ndarray] | None,
    provenance: dict,
) -> None:
    """Write a feature set's arrays into the empty group ``g``; the provenance (with its
    digest) is written last."""
    _write_geometry(g, layout)
    sdt = _storage_dtype(dtype)
    for s in specs:
        rows = layout.block_rows[s.unit]
        g.create_array(
            s.name,
            shape=(layout.n_blocks * rows, *s.row_shape),
            chunks=(rows, *s.row_shape),
            dtype=sdt,
            fill_value=0,
            compressors=None,
            filters=None,
            serializer=BytesCodec(endian="little"),
        )
    if static:
        st_group = g.create_group("static")
        for name, value in static.items():
            value = np.ascontiguousarray(value)
            a = st_group.create_array(
                name,
                shape=value.shape,
                dtype=value.dtype,
                chunks=tuple(max(1, n) for n in value.shape) or None,
            )
            a[...] = value
    _crash_point("set-arrays")
    nb, mb = layout.n_blocks, layout.max_block_images
    g.create_array("status", shape=(nb, mb), chunks=(1, mb), dtype="uint8", fill_value=0)
    g.create_array("errors", shape=(nb, mb), chunks=(1, mb), dtype=str)
    n_specs = max(len(specs), 1)
    g.create_array(
        "checksum", shape=(nb, n_specs), chunks=(1, n_specs), dtype="uint32", fill_value=0
    )
    g.attrs.update({"provenance": provenance, "provenance_sha256": json_digest(provenance)})


def json_digest(obj) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def image_table_digest(table: dict) -> str:
    """sha256 of the image table's columns (``id, path, source, split, sha256, size``): the
    store records it at creation so ``store verify`` detects any later edit."""
    return json_digest(
        {k: [str(x) for x in table[k]] for k in IMAGE_COLUMNS}
        | {"size": np.asarray(table["size"]).astype(np.int64).tolist()}
    )


def chunk_checksum(data: np.ndarray) -> int:
    """CRC-32 of a chunk's bytes as stored (little-endian, C order)."""
    a = np.ascontiguousarray(data)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return zlib.crc32(memoryview(a).cast("B")) & 0xFFFFFFFF


def _crash_point(name: str) -> None:
    """Tests only: with ``OVSS_TEST_CRASH_AT=name`` the process kills itself here (SIGKILL),
    so an interruption at that step of creation can be replayed deterministically."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _aside(path: str, what: str) -> Path:
    """A fresh hidden sibling folder of the store (``.<name>.ovss-<what>-<pid>-<n>``): where a
    store or feature set is built before its rename, or where a deleted set goes."""
    p = Path(path).absolute()
    for n in itertools.count():
        cand = p.parent / f".{p.name}.ovss-{what}-{os.getpid()}-{n}"
        if not cand.exists():
            return cand
    raise AssertionError("unreachable")


def _clean_leftovers(path: str, notes: list[str]) -> None:
    """Delete what an interrupted creation or deletion left beside the store (under the
    creation lock, so never another process's work in progress), one note per leftover."""
    p = Path(path).absolute()
    if not p.parent.is_dir():
        return
    prefix = f".{p.name}.ovss-"
    for entry in sorted(p.parent.glob(f"{glob.escape(prefix)}*-*")):
        if not entry.is_dir():
            continue
        kind = entry.name[len(prefix) :]
        shutil.rmtree(entry)
        if kind.startswith("new-set-"):
            notes.append(f"removed an unfinished feature set creation of {path} (made anew)")
        elif kind.startswith("new-"):
            notes.append(f"removed the unfinished creation of store {path} (made anew)")
        else:
            notes.append(f"finished deleting a replaced feature set of {path}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Make every file and folder under ``root`` durable (before it is renamed into place)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _write_geometry(g: zarr.Group, layout: Layout) -> None:
    geos = layout.geometries
    n = len(geos)
    geo = g.create_group("geometry")

    def put(name: str, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data)
        shape = data.shape
        chunks = tuple(max(s, 1) for s in shape)
        a = geo.create_array(name, shape=shape, chunks=chunks, dtype=data.dtype, fill_value=0)
        if data.size:
            a[...] = data

    wins = [w for g_ in geos for w in g_.windows]
    put("resized", np.array([g_.resized for g_ in geos], dtype=np.int32).reshape(n, 2))
    n_win = np.array([g_.n_windows for g_ in geos], dtype=np.int64)
    put("win_start", np.concatenate([[0], np.cumsum(n_win)]).astype(np.int64))
    put("win_box", np.array([w.box for w in wins], dtype=np.int32).reshape(-1, 4))
    put("win_pad", np.array([w.pad for w in wins], dtype=np.int32).reshape(-1, 4))
    put("win_grid", np.array([w.grid for w in wins], dtype=np.int32).reshape(-1, 2))
    put("block_start", layout.block_start)
    for unit in UNITS:
        put(f"row_start_{unit}", layout.row_start[unit])
        put(f"row_count_{unit}", layout.row_count[unit])


@contextlib.contextmanager
def _creation_lock(path: str):
    """Serialise store/feature-set creation between processes (local stores only)."""
    if "://" in path:
        yield
        return
    p = Path(path).absolute()
    p.parent.mkdir(parents=True, exist_ok=True)
    # The lock lives beside the store: zarr warns about foreign files inside a group.
    with open(p.parent / f".{p.name}.ovss-lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: Blocks of a remote feature set fetched ahead of the one being read (``iter_images``).
REMOTE_READ_AHEAD = 4


class _ReadAhead:
    """Fetches the chunks of the next blocks of a remote set in threads (Zarr's sync API may
    be called from several threads; each call is one GET), in block order."""

    def __init__(self, fs: FeatureSet, specs: Sequence[TensorSpec]):
        from concurrent.futures import ThreadPoolExecutor

        self.fs = fs
        self.specs = list(specs)
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, min(16, REMOTE_READ_AHEAD * len(self.specs))),
            thread_name_prefix="ovss-read",
        )
        self.pending: dict[int, dict] = {}
        self.next_block = 0

    def _needed(self, b: int, status: np.ndarray, wanted: set[int] | None) -> bool:
        return any(
            status[i] == STATUS_OK and (wanted is None or i in wanted)
            for i in self.fs.block_images(b)
        )

    def get(self, b: int, status: np.ndarray, wanted: set[int] | None) -> dict[str, np.ndarray]:
        """The chunks of block ``b`` (name -> array), queueing the following needed blocks."""
        nb = max(self.next_block, b)
        while nb < self.fs.n_blocks and len(self.pending) <= REMOTE_READ_AHEAD:
            if nb not in self.pending and self._needed(nb, status, wanted):
                self.pending[nb] = {
                    s.name: self.pool.submit(self.fs._read_chunk, s, nb) for s in self.specs
                }
            nb += 1
        self.next_block = nb
        futures = self.pending.pop(b, None)
        if futures is None:
            return {}
        return {name: f.result() for name, f in futures.items()}

    def close(self) -> None:
        for futures in self.pending.values():
            for f in futures.values():
                f.cancel()
        self.pool.shutdown(wait=True)


class _TensorPlan:
    """Where one tensor's rows of every image live (``FeatureSet.read``'s lookups)."""

    def __init__(self, fs: FeatureSet, spec: TensorSpec, base: str | None) -> None:
        geo = fs.geometry
        self.name = spec.name
        self.row_shape = tuple(spec.row_shape)
        self.dtype = _storage_dtype(fs.dtype)
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        self.block_rows = fs.block_rows(spec.unit)
        # memoryviews of int64 arrays: indexing gives Python ints without numpy scalars
        self.row_start = memoryview(np.ascontiguousarray(geo[f"row_start_{spec.unit}"], np.int64))
        self.row_count = memoryview(np.ascontiguousarray(geo[f"row_count_{spec.unit}"], np.int64))
        tail = "/0" * len(self.row_shape)  # the chunk key has one index per array dimension
        self.paths = (
            None
            if base is None
            else [f"{base}/{spec.name}/c/{b}{tail}" for b in range(fs.n_blocks)]
        )


class _ReadPlan:
    """A feature set's per-image lookup tables, made once per ``FeatureSet``."""

    def __init__(self, fs: FeatureSet) -> None:
        geo = fs.geometry
        local = fs.store._is_local()  # a Zarr directory: chunk files read directly
        base = f"{fs.store.path}/features/{fs.key}" if local else None
        self.tensors = [_TensorPlan(fs, s, base) for s in fs.specs]
        self.tensor = {t.name: t for t in self.tensors}
        self.raw = fs.dtype != "bfloat16"  # stored as returned: no decoding step
        self.n_images = len(fs.image_sizes)
        self.image_ids = fs.store.image_ids
        self.sizes = memoryview(np.ascontiguousarray(fs.image_sizes, np.int64))
        self.resized = memoryview(np.ascontiguousarray(geo["resized"], np.int64))
        self.win_start = memoryview(np.ascontiguousarray(geo["win_start"], np.int64))
        self.win_box, self.win_pad, self.win_grid = (
            geo["win_box"],
            geo["win_pad"],
            geo["win_grid"],
        )


@dataclass
class ImageFeatures:
    """One image's cached tensors and the geometry needed to place them."""

    index: int
    image_id: str
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    win_box: np.ndarray  # (n_windows, 4) y1, x1, y2, x2 in resized pixels
    win_pad: np.ndarray  # (n_windows, 4) top, left, bottom, right
    win_grid: np.ndarray  # (n_windows, 2) gh, gw
    tensors: dict[str, np.ndarray]  # token: (n_tokens, *row); window: (n_windows, *row); image

    def window_tokens(self, name: str) -> list[np.ndarray]:
        """Split a token tensor into per-window ``(gh, gw, *row)`` grids."""
        out, start = [], 0
        t = self.tensors[name]
        for gh, gw in self.win_grid.tolist():
            out.append(t[start : start + gh * gw].reshape(gh, gw, *t.shape[1:]))
            start += gh * gw
        return out


class FeatureSet:
    """One (model, protocol) feature set inside a store."""

    def __init__(self, store: FeatureStore, key: str):
        self.store = store
        self.key = key
        self.group: zarr.Group = store.root["features"][key]
        self._geometry: dict[str, np.ndarray] | None = None
        self._sizes: np.ndarray | None = None
        self._prov: dict | None = None
        self._specs: list[TensorSpec] | None = None
        self._ndims: dict[str, str] = {}  # array name -> chunk-key tail ("/0" per extra dim)
        self._plan: _ReadPlan | None = None  # per-image lookup tables, made by the first read
        self._files = ChunkFiles()  # open chunk files of committed blocks (local stores)
        self._committed: dict[int, bool] = {}  # block -> its status chunk was written

    def close(self) -> None:
        """Close the chunk files kept open by :meth:`read` (also done when the set is garbage
        collected; a later read opens them again)."""
        self._files.close()

    # -- metadata ----------------------------------------------------------------------------
    @property
    def provenance(self) -> dict:
        """The set's provenance (read once; a feature set's provenance never changes)."""
        if self._prov is None:
            self._prov = dict(self.group.attrs["provenance"])
        return self._prov

    def same_provenance(self, other: dict) -> bool:
        mine = self.provenance
        keys = ("model", "protocol", "tensors", "dtype")
        if any(mine.get(k) != other.get(k) for k in keys):
            return False
        a, b = mine["backbone"], other["backbone"]
        return a.get("weights") == b.get("weights") and a.get("extra") == b.get("extra")

    @property
    def specs(self) -> list[TensorSpec]:
        if self._specs is None:
            self._specs = [
                TensorSpec(t["name"], t["unit"], tuple(t["row_shape"]), t.get("doc", ""))
                for t in self.provenance["tensors"]
            ]
        return self._specs

    @property
    def tensor_names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def dtype(self) -> str:
        return self.provenance["dtype"]

    @property
    def protocol(self) -> Protocol:
        return Protocol.from_dict(self.provenance["protocol"])

    @property
    def geometry(self) -> dict[str, np.ndarray]:
        if self._geometry is None:
            geo = self.group["geometry"]
            self._geometry = {k: a[...] for k, a in geo.arrays()}
        return self._geometry

    def static_names(self) -> list[str]:
        """Names of the per-set arrays (model parameters needed to run methods from the store)."""
        if "static" not in self.group:
            return []
        return sorted(k for k, _ in self.group["static"].arrays())

    def static(self, name: str) -> np.ndarray:
        """A per-set array stored at creation (e.g. ``ln_post.weight`` of CLIP)."""
        if name not in self.static_names():
            raise StoreError(f"feature set '{self.key}' has no static array '{name}'")
        return np.asarray(self.group["static"][name][...])

    @property
    def image_sizes(self) -> np.ndarray:
        """(n_images, 2) original sizes (cached)."""
        if self._sizes is None:
            self._sizes = np.asarray(self.store.root["images/size"][...])
        return self._sizes

    @property
    def n_blocks(self) -> int:
        return len(self.geometry["block_start"]) - 1

    def block_images(self, b: int) -> range:
        bs = self.geometry["block_start"]
        return range(int(bs[b]), int(bs[b + 1]))

    def block_of(self, index: int) -> int:
        return int(np.searchsorted(self.geometry["block_start"], index, side="right") - 1)

    def block_rows(self, unit: str) -> int:
        return int(self.provenance["layout"]["block_rows"][unit])

    # -- status ------------------------------------------------------------------------------
    def status(self) -> np.ndarray:
        """Per-image status: 0 pending, 1 done, 2 failed (unreadable image)."""
        st = self.group["status"][...]
        out = np.zeros(self.store.n_images, dtype=np.uint8)
        for b in range(self.n_blocks):
            imgs = self.block_images(b)
            out[imgs.start : imgs.stop] = st[b, : len(imgs)]
        return out

    def done_blocks(self) -> np.ndarray:
        """Boolean (n_blocks,): the block's status chunk has been written."""
        st = self.group["status"][...]
        sizes = np.diff(self.geometry["block_start"])
        return np.array([bool(st[b, : sizes[b]].all()) for b in range(len(sizes))], dtype=bool)

    def errors(self) -> dict[str, str]:
        """Image id -> error message for images that failed."""
        ids = self.store.image_ids
        err = self.group["errors"][...]
        out = {}
        for b in range(self.n_blocks):
            for j, i in enumerate(self.block_images(b)):
                if err[b, j]:
                    out[ids[i]] = str(err[b, j])
        return out

    # -- writing -----------------------------------------------------------------------------
    def new_block_buffers(self, b: int) -> dict[str, np.ndarray]:
        """Zero buffers holding exactly one chunk (block ``b``) of every tensor."""
        sdt = _storage_dtype(self.dtype)
        return {
            s.name: np.zeros((self.block_rows(s.unit), *s.row_shape), dtype=sdt) for s in self.specs
        }

    def local_rows(self, unit: str, index: int) -> slice:
        """Rows of image ``index`` inside its block's chunk."""
        rows = self.block_rows(unit)
        start = int(self.geometry[f"row_start_{unit}"][index]) % rows
        return slice(start, start + int(self.geometry[f"row_count_{unit}"][index]))

    def write_block(
        self, b: int, buffers: dict[str, np.ndarray], status: np.ndarray, errors: Sequence[str]
    ) -> None:
        """Write block ``b`` (whole chunks) and its checksums, make them durable, then mark
        its images finished (the status chunk: the block's commit)."""
        sums = []
        for s in self.specs:
            rows = self.block_rows(s.unit)
            self.group[s.name][b * rows : (b + 1) * rows] = buffers[s.name]
            sums.append(chunk_checksum(buffers[s.name]))
        self._fsync_block(b)
        if "checksum" in self.group:  # sets made by older versions have none
            self.group["checksum"][b] = np.array(sums, dtype=np.uint32)
            self._fsync_paths([self._chunk_path("checksum", b)])
        self._forget_files(b)
        _crash_point("block-before-status")
        mb = self.group["status"].shape[1]
        err = np.full(mb, "", dtype=object)
        err[: len(errors)] = list(errors)
        if any(errors):
            self.group["errors"][b] = err
        st = np.zeros(mb, dtype=np.uint8)
        st[: len(status)] = status
        self.group["status"][b] = st
        self._fsync_paths([self._chunk_path("status", b)])

    def _forget_files(self, b: int) -> None:
        """Block ``b`` was (re)written: its chunk files are opened anew by the next read."""
        self._committed.pop(b, None)
        if self._plan is not None:
            for t in self._plan.tensors:
                if t.paths is not None:
                    self._files.drop(t.paths[b])

    def _chunk_path(self, name: str, b: int) -> Path | None:
        """The chunk file of block ``b`` when the store is a local Zarr directory, else None."""
        file = self._chunk_file(name, b)
        return None if file is None else Path(file)

    def _chunk_file(self, name: str, b: int) -> str | None:
        """``_chunk_path`` as a string, built without pathlib (the per-read hot path)."""
        if "://" in self.store.path or self.store.path.lower().endswith((".h5", ".hdf5")):
            return None
        tail = self._ndims.get(name)
        if tail is None:  # one zarr metadata read per array, not one per block and image
            ndim = len(self.group[name].shape)
            tail = self._ndims[name] = "".join(["/0"] * (ndim - 1))
        return f"{self.store.path}/features/{self.key}/{name}/c/{b}{tail}"

    def _remote_chunk_size(self, name: str, b: int) -> int | None:
        """Bytes of block ``b``'s chunk object of ``name`` in a remote store; ``None`` when the
        object is missing (Zarr does not write all-zero chunks)."""
        fs, root = self.store._fs()
        ndim = len(self.group[name].shape)
        key = "/".join([root, "features", self.key, name, "c", str(b), *["0"] * (ndim - 1)])
        with remote.remote_errors(self.store.path, self.store.storage_options):
            return remote.object_size(fs, key)

    def _fsync_block(self, b: int) -> None:
        self._fsync_paths([self._chunk_path(s.name, b) for s in self.specs])

    @staticmethod
    def _fsync_paths(paths: Sequence[Path | None]) -> None:
        for p in paths:
            if p is None or not p.exists():
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- reading -----------------------------------------------------------------------------
    def _read_plan(self) -> _ReadPlan:
        """The per-image lookup tables of :meth:`read` (made once: a set's geometry, layout
        and image table never change)."""
        if self._plan is None:
            self._plan = _ReadPlan(self)
        return self._plan

    def _is_committed(self, b: int) -> bool:
        """Whether block ``b``'s status chunk is written (its data chunks are then final),
        read once per block; a block pending at that read is never asked again."""
        done = self._committed.get(b)
        if done is None:
            n = len(self.block_images(b))
            done = self._committed[b] = bool(np.all(self.group["status"][b][:n]))
        return done

    def _read_rows(self, name: str, unit: str, start: int, count: int) -> np.ndarray:
        """Rows ``[start, start + count)`` of a tensor (all in one block); a byte-range read
        of one chunk file for local stores (uncompressed chunks), the zarr API otherwise."""
        t = self._read_plan().tensor[name]
        if t.paths is None:
            return self.group[name][start : start + count]
        return self._read_local(t, start, count)

    def _read_local(self, t: _TensorPlan, start: int, count: int) -> np.ndarray:
        b = start // t.block_rows
        out = np.empty((count, *t.row_shape), dtype=t.dtype)
        if not count:
            return out
        offset = (start - b * t.block_rows) * t.row_bytes
        path = t.paths[b]
        buf = [memoryview(out).cast("B")]
        done = self._committed.get(b)
        if done or (done is None and self._is_committed(b)):
            d = self._files.acquire(path)
            if d is None:  # never written (Zarr leaves all-zero chunks out)
                out[...] = 0
                return out
            try:
                got = os.preadv(d.fd, buf, offset)
            finally:
                self._files.release(d)
            if got == out.nbytes:
                return out
            # Short: the file was cut or replaced since it was opened; read it anew below.
            self._files.drop(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # never written (Zarr leaves all-zero chunks out)
            out[...] = 0
            return out
        try:
            got = os.preadv(fd, buf, offset)
        finally:
            os.close(fd)
        if got != out.nbytes:
            raise CorruptStoreError(
                f"chunk {b} of '{t.name}' in {self.key} is truncated",
                store=self.store.path,
                key=self.key,
                tensor=t.name,
                block=b,
            )
        return out

    def read(self, index: int, names: Sequence[str] | None = None) -> ImageFeatures:
        """All (or the named) tensors of image ``index``: O(1) chunks, exact byte ranges.

        Local stores read each tensor's rows straight into the returned array (``os.preadv``)
        through chunk files kept open between reads (those of committed blocks; at most
        ``featurestore.store_files.DEFAULT_CAPACITY``, see :meth:`close`)."""
        plan = self._plan or self._read_plan()
        if not 0 <= index < plan.n_images:
            raise StoreError(f"image index {index} out of range (store has {plan.n_images})")
        tensors = {}
        for t in plan.tensors:
            if names is not None and t.name not in names:
                continue
            start = t.row_start[index]
            count = t.row_count[index]
            if t.paths is None:
                a = self.group[t.name][start : start + count]
            else:
                a = self._read_local(t, start, count)
            tensors[t.name] = a if plan.raw else self._decode(a)
        return self._image_features(index, tensors)

    def _image_features(self, index: int, tensors: dict[str, np.ndarray]) -> ImageFeatures:
        p = self._plan or self._read_plan()
        w0, w1 = p.win_start[index], p.win_start[index + 1]
        return ImageFeatures(  # positional (index, image_id, original_size, resized_size, ...)
            index,
            p.image_ids[index],
            (p.sizes[index, 0], p.sizes[index, 1]),
            (p.resized[index, 0], p.resized[index, 1]),
            p.win_box[w0:w1],
            p.win_pad[w0:w1],
            p.win_grid[w0:w1],
            tensors,
        )

    def encode(self, a) -> np.ndarray:
        """Float array or tensor -> this set's storage representation (bfloat16 as uint16 bits)."""
        import torch

        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a, np.float32))
        t = t.detach().float().cpu()
        if self.dtype == "bfloat16":
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return t.numpy().astype(self.dtype, copy=False)

    def _decode(self, a: np.ndarray) -> np.ndarray:
        if self.dtype == "bfloat16":
            import torch

            bits = torch.from_numpy(np.ascontiguousarray(a).view(np.int16))
            return bits.view(torch.bfloat16).float().numpy()
        return a

    def iter_images(
        self, names: Sequence[str] | None = None, indices: Sequence[int] | None = None
    ) -> Iterator[ImageFeatures]:
        """Stream images in store order, reading each block's chunk files sequentially.

        Local stores read every image's exact byte range into its own array (no large
        temporary buffers); other backends read one whole chunk per block and tensor. Pending
        or failed images are skipped. Memory holds at most one block; for a remote store
        (a URL) the chunks of the next :data:`REMOTE_READ_AHEAD` blocks are fetched meanwhile
        (concurrent GETs [ours]), so memory holds up to that many more.
        """
        status = self.status()
        wanted = None if indices is None else set(int(i) for i in indices)
        specs = [s for s in self.specs if names is None or s.name in names]
        sdt = _storage_dtype(self.dtype)
        plan = self._read_plan()
        ahead = _ReadAhead(self, specs) if self.store.is_remote else None
        try:
            for b in range(self.n_blocks):
                imgs = [
                    i
                    for i in self.block_images(b)
                    if status[i] == STATUS_OK and (wanted is None or i in wanted)
                ]
                if not imgs:
                    continue
                fetched = ahead.get(b, status, wanted) if ahead is not None else {}
                sources = {}
                for s in specs:
                    path = self._chunk_path(s.name, b)
                    if path is not None and path.exists():
                        sources[s.name] = open(path, "rb", buffering=0)
                        if hasattr(os, "posix_fadvise"):  # the block is read front to back
                            fd = sources[s.name].fileno()
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    elif path is None:
                        sources[s.name] = fetched.get(s.name)
                        if sources[s.name] is None:
                            sources[s.name] = self._read_chunk(s, b)
                    else:
                        sources[s.name] = None  # never written: all zeros
                try:
                    for i in imgs:
                        tensors = {}
                        for s in specs:
                            t = plan.tensor[s.name]
                            start = t.row_start[i] - b * t.block_rows  # row inside the chunk
                            count = t.row_count[i]
                            src = sources[s.name]
                            if isinstance(src, np.ndarray):
                                arr = src[start : start + count]
                            else:
                                arr = np.empty((count, *t.row_shape), dtype=sdt)
                                if src is None:
                                    arr[...] = 0
                                elif count:
                                    got = os.preadv(
                                        src.fileno(),
                                        [memoryview(arr).cast("B")],
                                        start * t.row_bytes,
                                    )
                                    if got != arr.nbytes:
                                        raise CorruptStoreError(
                                            f"chunk {b} of '{s.name}' in {self.key} is truncated",
                                            store=self.store.path,
                                            key=self.key,
                                            tensor=s.name,
                                            block=b,
                                        )
                            tensors[s.name] = self._decode(arr)
                        yield self._image_features(i, tensors)
                finally:
                    for src in sources.values():
                        if src is not None and not isinstance(src, np.ndarray):
                            src.close()
        finally:
            if ahead is not None:
                ahead.close()

    def _read_chunk(self, spec: TensorSpec, b: int) -> np.ndarray:
        rows = self.block_rows(spec.unit)
        sdt = _storage_dtype(self.dtype)
        path = self._chunk_path(spec.name, b)
        if path is not None:
            if not path.exists():
                return np.zeros((rows, *spec.row_shape), dtype=sdt)
            return np.fromfile(path, dtype=sdt).reshape(rows, *spec.row_shape)
        return self.group[spec.name][b * rows : (b + 1) * rows]

    def nbytes(self) -> int:
        """Bytes of the feature arrays as laid out (including block padding)."""
        return int(sum(self.group[s.name].nbytes for s in self.specs))
