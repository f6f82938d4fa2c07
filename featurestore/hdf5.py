"""HDF5 export of a store (``ovss store export --format hdf5``) and read-only access to it.

Layout of the exported file: the same tree as the Zarr store — groups ``images/`` and
``features/<model>@<protocol>/`` (with ``geometry/``), one dataset per Zarr array with the same
shape and dtype (block padding rows included, so ``geometry/row_start_*`` index the datasets
directly), chunked one block per HDF5 chunk, uncompressed; strings as UTF-8 variable-length
strings; every Zarr attribute stored as an HDF5 attribute holding its JSON text.
``FeatureStore.open("file.h5")`` reads such a file back as a (read-only) store.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featurestore.errors import StoreError

H5_SUFFIXES = (".h5", ".hdf5")


def is_hdf5_path(path: str) -> bool:
    return str(path).lower().endswith(H5_SUFFIXES)


class H5Array:
    """A zarr.Array-like view of an h5py dataset (strings come back as ``str``)."""

    def __init__(self, ds):
        self.ds = ds
        self.shape = ds.shape
        self._is_str = ds.dtype.kind == "O"
        self.dtype = np.dtype(object) if self._is_str else ds.dtype
        self.nbytes = int(np.prod(ds.shape)) * (8 if self._is_str else ds.dtype.itemsize)

    def __getitem__(self, key):
        if self._is_str:
            return self.ds.asstr()[key]
        return self.ds[key]


class H5Group:
    """A zarr.Group-like facade over an h5py group: attrs, item access, groups(), arrays()."""

    def __init__(self, g):
        self.g = g

    @property
    def attrs(self) -> dict:
        return {k: json.loads(v) for k, v in self.g.attrs.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.g

    def __getitem__(self, name: str):
        import h5py

        obj = self.g[name]
        return H5Group(obj) if isinstance(obj, h5py.Group) else H5Array(obj)

    def groups(self):
        import h5py

        return [(k, H5Group(v)) for k, v in self.g.items() if isinstance(v, h5py.Group)]

    def arrays(self):
        import h5py

        return [(k, H5Array(v)) for k, v in self.g.items() if isinstance(v, h5py.Dataset)]


def open_hdf5(path: str) -> H5Group:
    import h5py

    if not Path(path).is_file():
        raise StoreError(f"no HDF5 file at {path}")
    try:
        return H5Group(h5py.File(path, "r"))
    except OSError as e:
        raise StoreError(f"cannot read HDF5 file {path}: {e}") from None


def export_hdf5(store_path: str, out_path: str, progress=None) -> dict:
    """Copy a Zarr store into one HDF5 file (layout in the module docstring).

    Tensors are copied one chunk (block) at a time, so memory stays bounded. Returns a summary.
    """
    import h5py
    import zarr

    from featurestore.store import FeatureStore

    store = FeatureStore.open(store_path)
    if is_hdf5_path(store_path):
        raise StoreError("the source is already an HDF5 file")
    out = Path(out_path)
    if not out.parent.is_dir():
        raise StoreError(f"cannot write {out}: the folder {out.parent} does not exist")
    tmp = out.with_name(out.name + ".partial")
    finished = set(store.feature_sets())  # unfinished or damaged entries are not exported
    n_arrays = 0
    n_bytes = 0

    def copy_attrs(src, dst) -> None:
        for k, v in dict(src.attrs).items():
            dst.attrs[k] = json.dumps(v)

    def copy_group(src: zarr.Group, dst) -> None:
        nonlocal n_arrays, n_bytes
        copy_attrs(src, dst)
        for name, arr in src.arrays():
            chunks = arr.chunks
            if arr.dtype.kind in ("T", "U", "O"):
                data = np.asarray(arr[...], dtype=object)
                ds = dst.create_dataset(name, shape=arr.shape, dtype=h5py.string_dtype())
                if data.size:
                    ds[...] = data.astype(str).astype(object)
            else:
                h5chunks = tuple(max(1, c) for c in chunks) if arr.size else None
                ds = dst.create_dataset(name, shape=arr.shape, dtype=arr.dtype, chunks=h5chunks)
                step = max(1, chunks[0])
                for s in range(0, arr.shape[0], step):
                    ds[s : s + step] = arr[s : s + step]
                    if progress:
                        progress(name, s + step, arr.shape[0])
            copy_attrs(arr, ds)
            n_arrays += 1
            n_bytes += int(arr.nbytes) if arr.dtype.kind not in ("T", "U", "O") else 0
        for name, sub in src.groups():
            copy_group(sub, dst.create_group(name))

    with h5py.File(tmp, "w") as f:
        copy_attrs(store.root, f)
        for name, sub in store.root.groups():
            if name == "features":
                dst = f.create_group("features")
                copy_attrs(sub, dst)
                for key in sorted(finished):
                    copy_group(sub[key], dst.create_group(key))
            else:
                copy_group(sub, f.create_group(name))
    tmp.replace(out)
    return {"store": store_path, "out": str(out), "arrays": n_arrays, "bytes": n_bytes}
