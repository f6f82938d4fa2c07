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


def _stored_bytes(store: FeatureStore, sub: str = "") -> int | None:
    """Bytes stored under the store (or its sub-path ``sub``): on disk, or in object storage."""
    if store.is_remote:
        from featurestore import remote

        fs, root = store._fs()
        return remote.tree_bytes(fs, f"{root}/{sub}" if sub else root)
    return _disk_bytes(os.path.join(store.path, sub) if sub else store.path)


def store_info(path: str) -> dict:
    """A JSON-safe summary: image table, and per feature set its provenance, tensors,
    completeness (done / pending / failed images) and size; ``unfinished_sets`` lists the
    entries whose creation did not finish (the next extraction of that set makes it anew).
    ``disk_bytes``: bytes stored, on disk or in object storage (a URL's credentials masked in
    ``store``)."""
    from featurestore.names import redact_url

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
                "disk_bytes": _stored_bytes(store, f"features/{key}"),
                "created": prov.get("created"),
                "ovss_version": prov.get("ovss_version"),
            }
        )
    from featurestore.labelsets import list_label_sets
    from featurestore.text import list_text_sets

    return {
        "store": redact_url(path),
        "images": store.n_images,
        "sources": sources,
        "feature_sets": sets,
        "unfinished_sets": store.unfinished_feature_sets(),
        "text_sets": list_text_sets(store),
        "label_sets": list_label_sets(store),
        "disk_bytes": _stored_bytes(store),
    }


@dataclass
class VerifyReport:
    """What :func:`verify_store` found.

    Attributes:
        store: the store path.
        problems: one line per problem, its location first (``<set>/<tensor>: block 3 ...``).
        findings: the same problems as facts: ``kind``, ``set``, ``tensor``, ``block`` (-1:
            none), ``message`` (``--json`` lists them).
        notes: facts that are not problems (failed images, sets without checksums).
        checked_sets, checked_blocks: how much was checked.
    """

    store: str
    problems: list[str] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked_sets: int = 0
    checked_blocks: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, message: str, set_: str = "", tensor: str = "", block: int = -1):
        where = f"{set_}/{tensor}" if tensor else set_ or "store"
        self.problems.append(f"{where}: {message}")
        self.findings.append(
            {"kind": kind, "set": set_, "tensor": tensor, "block": block, "message": message}
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


#: The kinds of ``VerifyReport.findings``.
FINDING_KINDS = (
    "image_table",  # a column missing, or the table changed since creation (its digest)
    "unfinished_set",  # an entry of features/ without readable metadata or provenance
    "provenance",  # a field missing, edited (its digest), or disagreeing with the set's name
    "geometry",  # geometry disagreeing with the image table, the protocol or the token counts
    "layout",  # arrays whose shape or dtype disagree with the provenance
    "pending",  # images not extracted yet
    "missing_chunk",  # a finished block's chunk file is missing
    "chunk_size",  # a finished block's chunk file has the wrong size (truncated or padded)
    "checksum",  # a finished block's bytes differ from what was written
    "nonfinite",  # NaN/inf values in a finished block
)


#: Findings of a finished block that ``fix`` repairs by marking the block pending again.
BLOCK_KINDS = ("missing_chunk", "chunk_size", "checksum", "nonfinite")


def verify_store(path: str, scan_values: bool = True, fix: bool = False) -> VerifyReport:
    """Check a store's integrity; every finding has a location (set, tensor, block).

    Checks: the image table (its columns and the digest recorded at creation, so an edited
    size or id is found); entries of ``features/`` that are unfinished or lost their metadata;
    each set's provenance (complete, unedited: its recorded digest, and naming the set's own
    key); its geometry (covering the image table, token counts agreeing with the window grids,
    and, for backbones with the default geometry rule, exactly what the protocol implies for
    the recorded image sizes); array shapes and dtypes against the provenance; pending images;
    and per finished block the chunk files (present, of the right size) and, with
    ``scan_values`` (one read of every chunk), their checksum (recorded when the block was
    written: any byte change, including swapped chunks) and NaN/inf values. Failed
    (unreadable) images are notes, not problems: that outcome is defined.

    ``fix`` marks every block with a block finding pending again (its status chunk), so the
    next run of the same extraction recomputes exactly those blocks; the findings are still
    reported (a note says what was marked).
    """
    from featurestore.names import redact_url
    from featurestore.protocol import Protocol, image_geometry
    from featurestore.store import (
        chunk_checksum,
        image_table_digest,
        json_digest,
        plan_layout,
        set_key,
    )

    store = FeatureStore.open(path)
    rep = VerifyReport(store=redact_url(path))
    n = store.n_images
    table = store.image_table()
    lengths = {k: len(v) for k, v in table.items()}
    if any(v != n for v in lengths.values()):
        rep.add("image_table", f"image table columns have different lengths ({lengths})")
    recorded = store.root.attrs.get("images_sha256")
    if recorded and image_table_digest(table) != recorded:
        rep.add("image_table", "the image table changed since the store was made")
    elif not recorded:
        rep.notes.append("the image table has no recorded digest (made by an older version)")
    sizes = np.asarray(table["size"])
    for key in store.unfinished_feature_sets():
        rep.add(
            "unfinished_set",
            "no readable metadata or provenance (an interrupted creation or damage); the next "
            "extraction of this set makes it anew",
            key,
        )
    for key in store.feature_sets():
        rep.checked_sets += 1
        try:
            fs = store.feature_set(key)
            prov = fs.provenance
            geo = fs.geometry
        except Exception as e:  # malformed metadata is itself the finding
            rep.add("provenance", f"unreadable metadata ({e})", key)
            continue
        lacking = [
            k
            for k in ("model", "protocol", "backbone", "tensors", "dtype", "layout")
            if k not in prov
        ]
        for k in lacking:
            rep.add("provenance", f"provenance lacks '{k}'", key)
        if lacking:
            continue
        digest = fs.group.attrs.get("provenance_sha256")
        if digest and json_digest(prov) != digest:
            rep.add("provenance", "the provenance was edited after the set was made", key)
        try:
            protocol = Protocol.from_dict(prov["protocol"])
            named = set_key(prov["model"], protocol)
        except Exception as e:  # noqa: BLE001 - an unreadable protocol is the finding
            rep.add("provenance", f"unreadable protocol ({e})", key)
            continue
        if named != key:
            rep.add("provenance", f"the provenance describes '{named}', not this set", key)
        if len(geo["row_count_token"]) != n or len(geo["win_start"]) != n + 1:
            rep.add(
                "geometry",
                f"geometry covers {len(geo['row_count_token'])} images, the image table {n}",
                key,
            )
            continue
        grids = geo["win_grid"]
        ws = geo["win_start"]
        per_win = grids[:, 0].astype(np.int64) * grids[:, 1] if len(grids) else np.zeros(0)
        csum = np.concatenate([[0], np.cumsum(per_win)]).astype(np.int64)
        tok_from_grid = csum[ws[1:]] - csum[ws[:-1]]
        if not np.array_equal(tok_from_grid, geo["row_count_token"]):
            rep.add("geometry", "token counts disagree with the window grids", key)
        _check_implied_geometry(rep, key, fs, prov, protocol, sizes, image_geometry, plan_layout)
        sdt = _storage_dtype(fs.dtype)
        nb = fs.n_blocks
        for spec in fs.specs:
            if spec.name not in fs.group:
                rep.add("layout", "tensor is missing", key, spec.name)
                continue
            arr = fs.group[spec.name]
            want = (nb * fs.block_rows(spec.unit), *spec.row_shape)
            if tuple(arr.shape) != want:
                rep.add("layout", f"shape {tuple(arr.shape)}, expected {want}", key, spec.name)
            if np.dtype(arr.dtype) != sdt:
                rep.add("layout", f"dtype {arr.dtype}, expected {sdt}", key, spec.name)
        status = fs.status()
        pending = int((status == STATUS_PENDING).sum())
        failed = int((status == STATUS_FAILED).sum())
        if pending:
            rep.add(
                "pending",
                f"{pending} of {n} images not extracted (rerun the extraction that made it "
                "to resume)",
                key,
            )
        if failed:
            rep.notes.append(f"{key}: {failed} images failed to decode and were skipped")
        sums = fs.group["checksum"][...] if "checksum" in fs.group else None
        if sums is None:
            rep.notes.append(f"{key}: no checksums recorded (made by an older version)")
        done = fs.done_blocks()
        for b in range(nb):
            if not done[b]:
                continue
            rep.checked_blocks += 1
            imgs = fs.block_images(b)
            any_ok = bool((status[imgs.start : imgs.stop] == STATUS_OK).any())
            for t, spec in enumerate(fs.specs):
                if spec.name not in fs.group:
                    continue
                rows = fs.block_rows(spec.unit)
                used = int(geo[f"row_count_{spec.unit}"][imgs.start : imgs.stop].sum())
                path_ = fs._chunk_path(spec.name, b)
                expected = rows * int(np.prod(spec.row_shape)) * sdt.itemsize
                remote_size = fs._remote_chunk_size(spec.name, b) if store.is_remote else None
                if path_ is not None or store.is_remote:
                    if (remote_size is None) if store.is_remote else not Path(path_).exists():
                        if any_ok and used and (sums is None or sums[b, t] != _zeros_crc(expected)):
                            rep.add(
                                "missing_chunk",
                                f"block {b} is marked done but its chunk is missing",
                                key,
                                spec.name,
                                b,
                            )
                        continue
                    size = remote_size if store.is_remote else Path(path_).stat().st_size
                    if size != expected:
                        rep.add(
                            "chunk_size",
                            f"block {b} chunk has {size} bytes, expected {expected} "
                            "(partial or corrupt)",
                            key,
                            spec.name,
                            b,
                        )
                        continue
                if not scan_values:
                    continue
                data = fs._read_chunk(spec, b)
                if sums is not None and chunk_checksum(data) != int(sums[b, t]):
                    rep.add(
                        "checksum",
                        f"block {b} differs from what was written (checksum mismatch)",
                        key,
                        spec.name,
                        b,
                    )
                if used:
                    vals = fs._decode(data[:used]) if fs.dtype == "bfloat16" else data[:used]
                    if not np.isfinite(vals).all():
                        bad = int((~np.isfinite(vals)).sum())
                        rep.add(
                            "nonfinite", f"block {b} holds {bad} NaN/inf values", key, spec.name, b
                        )
    if fix:
        _mark_pending(store, rep)
    return rep


def _mark_pending(store: FeatureStore, rep: VerifyReport) -> None:
    bad: dict[str, set[int]] = {}
    for f in rep.findings:
        if f["kind"] in BLOCK_KINDS and f["block"] >= 0:
            bad.setdefault(f["set"], set()).add(int(f["block"]))
    if not bad:
        return
    writable = FeatureStore.open(store.path, mode="a", storage_options=store.storage_options)
    for key, blocks in sorted(bad.items()):
        fs = writable.feature_set(key)
        width = fs.group["status"].shape[1]
        for b in sorted(blocks):
            fs.group["status"][b] = np.zeros(width, dtype=np.uint8)
        rep.notes.append(
            f"{key}: marked block(s) {', '.join(map(str, sorted(blocks)))} pending; rerun the "
            "extraction that made the set to recompute them"
        )


def _zeros_crc(nbytes: int) -> int:
    """Checksum of an all-zero chunk (Zarr does not write those: a missing file reads as it)."""
    import zlib

    return zlib.crc32(bytes(nbytes)) & 0xFFFFFFFF


def _check_implied_geometry(rep, key, fs, prov, protocol, sizes, image_geometry, plan_layout):
    """Geometry and block layout recomputed from the image sizes and the protocol, for sets
    whose backbone follows the default geometry rule (recorded at creation; SAM and BLIP have
    their own rule, sets of older versions record none: only the counts are checked)."""
    patch = prov.get("backbone", {}).get("patch_size")
    if prov["layout"].get("geometry_rule") != "default" or protocol.sam_only or not patch:
        return
    geo = fs.geometry
    try:
        geos = []
        for h, w in np.asarray(sizes).tolist():
            if h <= 0 or w <= 0:
                from featurestore.protocol import ImageGeometry

                geos.append(ImageGeometry(original=(h, w), resized=(0, 0)))
            else:
                geos.append(image_geometry(protocol, h, w, int(patch)))
    except ValueError as e:
        rep.add("geometry", f"the protocol cannot be applied to the image table ({e})", key)
        return
    wins = [w for g in geos for w in g.windows]
    implied = {
        "resized": np.array([g.resized for g in geos], dtype=np.int64).reshape(-1, 2),
        "win_box": np.array([w.box for w in wins], dtype=np.int64).reshape(-1, 4),
        "win_pad": np.array([w.pad for w in wins], dtype=np.int64).reshape(-1, 4),
        "win_grid": np.array([w.grid for w in wins], dtype=np.int64).reshape(-1, 2),
    }
    for name, want in implied.items():
        have = np.asarray(geo[name]).astype(np.int64)
        if have.shape != want.shape or not np.array_equal(have, want):
            rep.add(
                "geometry",
                f"geometry '{name}' is not what the protocol implies for the image sizes",
                key,
            )
            return
    layout = plan_layout(geos, fs.specs, fs.dtype, prov["layout"].get("target_block_mb", 32.0))
    if not np.array_equal(layout.block_start, geo["block_start"]):
        rep.add("geometry", "the block layout is not what the image table implies", key)
