"""What is in a store (``ovss store info``) and whether it is sound (``ovss store verify``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featurestore.store import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_PENDING,
    FeatureStore,
    _storage_dtype,
)


def _disk_bytes(path: str) -> int | None:
    if "://" in path or not os.path.isdir(path):
        return None
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def store_info(path: str) -> dict:
    """A JSON-safe summary: image table, and per feature set its provenance, tensors,
    completeness (done / pending / failed images) and size."""
    store = FeatureStore.open(path)
    table = store.image_table()
    sources = sorted(
        {f"{s}:{p}" if p else str(s) for s, p in zip(table["source"], table["split"], strict=True)}
    )
    sets = []
    for key in store.feature_sets():
        fs = store.feature_set(key)
        prov = fs.provenance
        st = fs.status()
        sets.append(
            {
                "key": key,
                "model": prov["model"],
                "protocol": prov["protocol"],
                "weights": prov["backbone"].get("weights"),
                "library": prov["backbone"].get("library", {}),
                "dtype": prov["dtype"],
                "tensors": prov["tensors"],
                "images_done": int((st == STATUS_OK).sum()),
                "images_pending": int((st == STATUS_PENDING).sum()),
                "images_failed": int((st == STATUS_FAILED).sum()),
                "windows": int(fs.geometry["win_start"][-1]),
                "tokens": int(fs.geometry["row_count_token"].sum()),
                "blocks": fs.n_blocks,
                "bytes": fs.nbytes(),
                "disk_bytes": _disk_bytes(os.path.join(path, "features", key)),
                "created": prov.get("created"),
                "ovss_version": prov.get("ovss_version"),
            }
        )
    from featurestore.labelsets import list_label_sets
    from featurestore.text import list_text_sets

    return {
        "store": path,
        "images": store.n_images,
        "sources": sources,
        "feature_sets": sets,
        "text_sets": list_text_sets(store),
        "label_sets": list_label_sets(store),
        "disk_bytes": _disk_bytes(path),
    }


@dataclass
class VerifyReport:
    store: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked_sets: int = 0
    checked_blocks: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def verify_store(path: str, scan_values: bool = True) -> VerifyReport:
    """Check a store's integrity.

    Finds: pending (missing) images, finished blocks whose chunk file is missing or has the
    wrong size (partial/corrupt), array shapes/dtypes that disagree with the provenance,
    geometry that disagrees with the token counts, and NaN/inf values (``scan_values``).
    Failed (unreadable) images are reported as notes, not problems: that outcome is defined.
    """
    store = FeatureStore.open(path)
    rep = VerifyReport(store=path)
    n = store.n_images
    for key in store.feature_sets():
        rep.checked_sets += 1
        try:
            fs = store.feature_set(key)
            prov = fs.provenance
            geo = fs.geometry
        except Exception as e:  # malformed metadata is itself the finding
            rep.problems.append(f"{key}: unreadable metadata ({e})")
            continue
        for k in ("model", "protocol", "backbone", "tensors", "dtype", "layout"):
            if k not in prov:
                rep.problems.append(f"{key}: provenance lacks '{k}'")
        if len(geo["row_count_token"]) != n or len(geo["win_start"]) != n + 1:
            rep.problems.append(
                f"{key}: geometry covers {len(geo['row_count_token'])} images, the image table {n}"
            )
            continue
        grids = geo["win_grid"]
        tok_from_grid = np.zeros(n, dtype=np.int64)
        ws = geo["win_start"]
        per_win = grids[:, 0].astype(np.int64) * grids[:, 1] if len(grids) else np.zeros(0)
        csum = np.concatenate([[0], np.cumsum(per_win)]).astype(np.int64)
        tok_from_grid = csum[ws[1:]] - csum[ws[:-1]]
        if not np.array_equal(tok_from_grid, geo["row_count_token"]):
            rep.problems.append(f"{key}: token counts disagree with the window grids")
        sdt = _storage_dtype(fs.dtype)
        nb = fs.n_blocks
        for spec in fs.specs:
            if spec.name not in fs.group:
                rep.problems.append(f"{key}: tensor '{spec.name}' is missing")
                continue
            arr = fs.group[spec.name]
            want = (nb * fs.block_rows(spec.unit), *spec.row_shape)
            if tuple(arr.shape) != want:
                rep.problems.append(f"{key}/{spec.name}: shape {tuple(arr.shape)}, expected {want}")
            if np.dtype(arr.dtype) != sdt:
                rep.problems.append(f"{key}/{spec.name}: dtype {arr.dtype}, expected {sdt}")
        status = fs.status()
        pending = int((status == STATUS_PENDING).sum())
        failed = int((status == STATUS_FAILED).sum())
        if pending:
            rep.problems.append(
                f"{key}: {pending} of {n} images not extracted (rerun the extraction that "
                "made it to resume)"
            )
        if failed:
            rep.notes.append(f"{key}: {failed} images failed to decode and were skipped")
        done = fs.done_blocks()
        for b in range(nb):
            if not done[b]:
                continue
            rep.checked_blocks += 1
            imgs = fs.block_images(b)
            any_ok = bool((status[imgs.start : imgs.stop] == STATUS_OK).any())
            for spec in fs.specs:
                rows = fs.block_rows(spec.unit)
                used = int(geo[f"row_count_{spec.unit}"][imgs.start : imgs.stop].sum())
                path_ = fs._chunk_path(spec.name, b)
                expected = rows * int(np.prod(spec.row_shape)) * sdt.itemsize
                if path_ is not None:
                    if not Path(path_).exists():
                        if any_ok and used:
                            rep.problems.append(
                                f"{key}/{spec.name}: block {b} is marked done but "
                                "its chunk is missing"
                            )
                        continue
                    size = Path(path_).stat().st_size
                    if size != expected:
                        rep.problems.append(
                            f"{key}/{spec.name}: block {b} chunk has {size} bytes, "
                            f"expected {expected} (partial or corrupt)"
                        )
                        continue
                if scan_values and used:
                    data = fs._read_chunk(spec, b)
                    vals = fs._decode(data[:used]) if fs.dtype == "bfloat16" else data[:used]
                    if not np.isfinite(vals).all():
                        bad = int((~np.isfinite(vals)).sum())
                        rep.problems.append(
                            f"{key}/{spec.name}: block {b} holds {bad} NaN/inf values"
                        )
    return rep
