"""Store format: ragged round trip, provenance checks, verify, HDF5 export."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featurestore.backbones.base import TensorSpec
from featurestore.errors import (
    CorruptStoreError,
    FeatureSetExistsError,
    MissingFeatureSetError,
    StoreError,
    StoreImagesMismatchError,
    StoreNotFoundError,
)
from featurestore.hdf5 import export_hdf5
from featurestore.images import ImageRecord
from featurestore.inspect import store_info, verify_store
from featurestore.protocol import Protocol, image_geometry
from featurestore.store import CRASH_ENV, STATUS_OK, FeatureStore, plan_layout
from ovss_cli.hints import render_error

D = 8
SPECS = [
    TensorSpec("patch", "token", (D,)),
    TensorSpec("cls", "window", (D,)),
    TensorSpec("reg", "window", (2, D)),
]
SIZES = [(40, 60), (64, 30), (20, 20), (90, 45), (33, 77)]
PROTOCOL = Protocol(resize="short", size=32, crop=28, stride=14)
INFO = {"name": "fake", "weights": "random-init:0", "extra": {}}


def geometries_for(sizes, protocol, patch):
    return [image_geometry(protocol, h, w, patch) for h, w in np.asarray(sizes).tolist()]


def make_records(tmp_path, sizes=SIZES):
    recs = []
    for i, (h, w) in enumerate(sizes):
        p = tmp_path / "imgs" / f"im{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), i * 20, dtype=np.uint8)).save(p)
        recs.append(ImageRecord(f"im{i}", str(p), "folder", ""))
    return recs


def fill_store(tmp_path, dtype="float16", block_mb=0.0005):
    recs = make_records(tmp_path)
    store = FeatureStore.open_or_create(tmp_path / "s.zarr", recs)
    sizes = store.root["images/size"][...]
    geos = geometries_for(sizes, PROTOCOL, 7)
    fs = store.create_feature_set(
        "fake", PROTOCOL, INFO, SPECS, geos, dtype=dtype, target_block_mb=block_mb
    )
    rng = np.random.default_rng(0)
    truth = {}
    for b in range(fs.n_blocks):
        bufs = fs.new_block_buffers(b)
        imgs = fs.block_images(b)
        for i in imgs:
            g = geos[i]
            t = {
                "patch": rng.standard_normal((g.n_tokens, D)).astype(np.float32),
                "cls": rng.standard_normal((g.n_windows, D)).astype(np.float32),
                "reg": rng.standard_normal((g.n_windows, 2, D)).astype(np.float32),
            }
            truth[i] = t
            for s in SPECS:
                bufs[s.name][fs.local_rows(s.unit, i)] = fs.encode(t[s.name])
        fs.write_block(b, bufs, np.full(len(imgs), STATUS_OK), [""] * len(imgs))
    return store, fs, geos, truth


def test_plan_layout_blocks_hold_whole_images():
    geos = geometries_for(np.array(SIZES), PROTOCOL, 7)
    lay = plan_layout(geos, SPECS, "float16", target_block_mb=0.0005)
    assert lay.n_blocks > 1
    for unit in ("token", "window"):
        rows = lay.block_rows[unit]
        for b in range(lay.n_blocks):
            s, e = lay.block_start[b], lay.block_start[b + 1]
            starts = lay.row_start[unit][s:e]
            ends = starts + lay.row_count[unit][s:e]
            assert (starts >= b * rows).all() and (ends <= (b + 1) * rows).all()
            assert (starts[1:] == ends[:-1]).all()  # packed contiguously


def test_ragged_round_trip(tmp_path):
    store, fs, geos, truth = fill_store(tmp_path)
    assert len({g.n_windows for g in geos}) > 1  # really ragged
    for i, t in truth.items():
        f = fs.read(i)
        for name in ("patch", "cls", "reg"):
            np.testing.assert_allclose(f.tensors[name], t[name].astype(np.float16), rtol=0)
        assert f.original_size == SIZES[i]
        assert len(f.win_box) == geos[i].n_windows
        grids = f.window_tokens("patch")
        assert [g.shape[:2] for g in grids] == [w.grid for w in geos[i].windows]
    streamed = list(fs.iter_images())
    assert [f.index for f in streamed] == sorted(truth)
    for f in streamed:
        np.testing.assert_array_equal(f.tensors["patch"], fs.read(f.index).tensors["patch"])
    assert fs.read(0, names=["cls"]).tensors.keys() == {"cls"}


def test_bfloat16_and_float32(tmp_path):
    for dtype in ("bfloat16", "float32"):
        sub = tmp_path / dtype
        sub.mkdir()
        _, fs, _, truth = fill_store(sub, dtype=dtype)
        got = fs.read(2).tensors["patch"]
        tol = 1e-2 if dtype == "bfloat16" else 0
        np.testing.assert_allclose(got, truth[2]["patch"], rtol=tol, atol=tol)


def test_require_and_provenance_mismatch(tmp_path):
    store, fs, geos, _ = fill_store(tmp_path)
    assert store.require("fake", PROTOCOL).key == fs.key
    other_protocol = Protocol(resize="short", size=64)
    with pytest.raises(MissingFeatureSetError) as err:
        store.require("fake", other_protocol, tensors=["patch"])
    e = err.value
    assert (e.store, e.model, e.protocol, e.tensors, e.reason) == (
        store.path,
        "fake",
        other_protocol,
        ("patch",),
        "missing",
    )
    assert "ovss" not in str(e)  # the library names facts; the CLI renders the command
    assert render_error(e).endswith(
        f"; run: ovss extract --store {store.path} --model fake --resize short --size 64"
        " <images or --dataset ...>"
    )
    with pytest.raises(MissingFeatureSetError, match="weights") as err:
        store.require("fake", PROTOCOL, weights="sha256:abc")
    assert err.value.reason == "weights" and "OTHER_STORE" in render_error(err.value)
    with pytest.raises(MissingFeatureSetError, match="lacks") as err:
        store.require("fake", PROTOCOL, tensors=["layer3"])
    assert err.value.reason == "tensors"
    assert render_error(err.value).endswith(
        "--crop 28 --stride 14 <images or --dataset ...> --overwrite"
    )
    other = dict(INFO, weights="random-init:1")
    with pytest.raises(FeatureSetExistsError) as err:
        store.create_feature_set("fake", PROTOCOL, other, SPECS, geos)
    assert err.value.differences == ("weights",)
    assert "pass --overwrite" in render_error(err.value)
    # same provenance reopens (resume), overwrite replaces only that set
    assert (
        store.create_feature_set("fake", PROTOCOL, INFO, SPECS, geos, target_block_mb=0.0005)
        .done_blocks()
        .all()
    )
    fresh = store.create_feature_set("fake", PROTOCOL, other, SPECS, geos, overwrite=True)
    assert not fresh.done_blocks().any()
    assert store.n_images == len(SIZES)


def test_open_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no ovss store") as err:
        FeatureStore.open(tmp_path / "nope")
    assert render_error(err.value).endswith(
        f"create one with 'ovss extract --store {err.value.store}'"
    )
    store, _, _, _ = fill_store(tmp_path)
    recs = make_records(tmp_path / "other", sizes=[(10, 10)])
    with pytest.raises(StoreError, match="different image list"):
        FeatureStore.open_or_create(tmp_path / "s.zarr", recs)


def test_verify_ok_then_detects_corruption(tmp_path):
    store, fs, _, _ = fill_store(tmp_path)
    assert verify_store(store.path).ok
    path = fs._chunk_path("patch", 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a partial chunk
    rep = verify_store(store.path)
    assert not rep.ok and any("partial or corrupt" in p for p in rep.problems)
    path.write_bytes(data)
    # NaN inside the used rows of a block
    arr = np.frombuffer(data, dtype=np.float16).copy()
    arr[3] = np.nan
    path.write_bytes(arr.tobytes())
    rep = verify_store(store.path)
    assert any("NaN" in p for p in rep.problems)
    # a finished block whose chunk disappeared
    path.unlink()
    assert any("missing" in p for p in verify_store(store.path).problems)


def test_verify_reports_pending(tmp_path):
    recs = make_records(tmp_path)
    store = FeatureStore.open_or_create(tmp_path / "s.zarr", recs)
    geos = geometries_for(store.root["images/size"][...], PROTOCOL, 7)
    store.create_feature_set("fake", PROTOCOL, INFO, SPECS, geos)
    rep = verify_store(store.path)
    assert any("not extracted" in p for p in rep.problems)
    info = store_info(store.path)
    assert info["feature_sets"][0]["images_pending"] == len(SIZES)


def test_hdf5_export_reads_back(tmp_path):
    store, fs, _, truth = fill_store(tmp_path)
    out = tmp_path / "x.h5"
    export_hdf5(store.path, str(out))
    h5 = FeatureStore.open(str(out))
    assert h5.image_ids == store.image_ids
    hfs = h5.require("fake", PROTOCOL)
    for i in truth:
        a, b = hfs.read(i), fs.read(i)
        for name in ("patch", "cls", "reg"):
            np.testing.assert_array_equal(a.tensors[name], b.tensors[name])
        np.testing.assert_array_equal(a.win_box, b.win_box)
    assert [f.index for f in hfs.iter_images()] == sorted(truth)
    assert store_info(str(out))["feature_sets"][0]["images_done"] == len(SIZES)


# -- crash safety: a kill -9 at each step of creation, then a rerun ---------------------------

CRASH_POINTS = (
    "store-image-table",  # half the images probed and hashed
    "store-before-rename",  # the store built aside, not yet in place
    "set-arrays",  # the tensors of a new set created, status/provenance not yet
    "set-before-rename",  # the set built aside, not yet in features/
    "block-before-status",  # a block's data and checksums on disk, its status not
    "overwrite-after-rename",  # the replaced set moved out, not yet deleted
)


def _deterministic_fill(fs, geos):
    """Every pending block written with values that depend only on the block (no torch)."""
    done = fs.done_blocks()
    for b in range(fs.n_blocks):
        if done[b]:
            continue
        bufs = fs.new_block_buffers(b)
        rng = np.random.default_rng(b)
        for s in SPECS:
            bufs[s.name][...] = rng.standard_normal(bufs[s.name].shape).astype(np.float16)
        n = len(fs.block_images(b))
        fs.write_block(b, bufs, np.full(n, STATUS_OK, np.uint8), [""] * n)


def _build(path, recs, info=INFO, overwrite=False):
    store = FeatureStore.open_or_create(path, recs)
    geos = geometries_for(store.root["images/size"][...], PROTOCOL, 7)
    fs = store.create_feature_set(
        "fake",
        PROTOCOL,
        info,
        SPECS,
        geos,
        target_block_mb=0.0005,
        overwrite=overwrite,
        default_geometry="patch_size" in info,
    )
    _deterministic_fill(fs, geos)
    return store


def _build_shard(path, recs, i, n):
    """One of ``n`` concurrent writers: creates (or opens) the store and set, writes b % n == i."""
    store = FeatureStore.open_or_create(path, recs)
    geos = geometries_for(store.root["images/size"][...], PROTOCOL, 7)
    fs = store.create_feature_set("fake", PROTOCOL, INFO, SPECS, geos, target_block_mb=0.0005)
    done = fs.done_blocks()
    for b in range(fs.n_blocks):
        if b % n != i or done[b]:
            continue
        bufs = fs.new_block_buffers(b)
        rng = np.random.default_rng(b)
        for s in SPECS:
            bufs[s.name][...] = rng.standard_normal(bufs[s.name].shape).astype(np.float16)
        k = len(fs.block_images(b))
        fs.write_block(b, bufs, np.full(k, STATUS_OK, np.uint8), [""] * k)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_concurrent_writers_make_the_store_of_one(tmp_path, n):
    """n processes started together on a store that does not exist yet: one creates it (and
    the set), all write their blocks; the result equals a single writer's, file for file."""
    import multiprocessing as mp

    recs = make_records(tmp_path)
    clean = _build(tmp_path / "clean.zarr", recs)
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=_build_shard, args=(tmp_path / "s.zarr", recs, i, n)) for i in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * n
    assert _snapshot(tmp_path / "s.zarr") == _snapshot(clean.path)


def _killed_at(point, fn, *args, **kwargs):
    """Run ``fn`` in a forked child that SIGKILLs itself at ``point``; returns its exit code."""
    import multiprocessing as mp
    import os

    def child():
        os.environ[CRASH_ENV] = point
        fn(*args, **kwargs)
        os._exit(0)

    p = mp.get_context("fork").Process(target=child)
    p.start()
    p.join(60)
    return p.exitcode


def _snapshot(root):
    """Every file of a store: bytes, except zarr.json files compared without timestamps."""
    import json
    from pathlib import Path

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ("created", "provenance_sha256")}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(root))
            out[rel] = strip(json.loads(p.read_text())) if p.name == "zarr.json" else p.read_bytes()
    return out


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_at_each_creation_step_then_rerun_is_identical(tmp_path, point):
    recs = make_records(tmp_path)
    clean = _build(tmp_path / "clean.zarr", recs)
    path = tmp_path / "s.zarr"
    if point == "overwrite-after-rename":  # a finished store whose set is being replaced
        _build(path, recs, info=dict(INFO, weights="random-init:1"))
        code = _killed_at(point, _build, path, recs, overwrite=True)
    else:
        code = _killed_at(point, _build, path, recs)
    assert code == -9  # it really died there
    leftovers = sorted(p.name for p in tmp_path.glob(".s.zarr.ovss-*-*"))
    if point != "block-before-status":
        assert leftovers, "the kill left work in progress beside the store"
    store = _build(path, recs)
    assert not list(tmp_path.glob(".s.zarr.ovss-*-*"))  # leftovers removed on rerun ...
    if leftovers:
        assert store.notes, "... with a note"
    assert _snapshot(path) == _snapshot(clean.path)
    assert verify_store(str(path)).ok


def test_unfinished_set_is_listed_recreated_and_named(tmp_path):
    """A set without provenance (an interrupted in-place creation by an older version, or a
    lost zarr.json) is unfinished: listed apart, never crashing info, made anew on rerun."""
    import json

    recs = make_records(tmp_path)
    store = _build(tmp_path / "s.zarr", recs)
    meta = tmp_path / "s.zarr" / "features" / "fake@short32-c28s14" / "zarr.json"
    d = json.loads(meta.read_text())
    del d["attributes"]["provenance"]
    meta.write_text(json.dumps(d))
    assert store.feature_sets() == [] and store.unfinished_feature_sets() == ["fake@short32-c28s14"]
    info = store_info(store.path)
    assert info["feature_sets"] == [] and info["unfinished_sets"] == ["fake@short32-c28s14"]
    with pytest.raises(MissingFeatureSetError) as err:
        store.require("fake", PROTOCOL)
    assert err.value.reason == "incomplete" and "rerun the extraction" in render_error(err.value)
    meta.unlink()  # even without any metadata
    assert store.unfinished_feature_sets() == ["fake@short32-c28s14"]
    again = _build(tmp_path / "s.zarr", recs)
    assert again.feature_sets() == ["fake@short32-c28s14"]
    assert any("unfinished" in n for n in again.notes)
    assert verify_store(again.path).ok


def test_disk_full_during_creation_leaves_nothing_a_rerun_trips_on(tmp_path, monkeypatch):
    import errno

    import featurestore.store as store_mod

    recs = make_records(tmp_path)
    real = store_mod._write_geometry

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "_write_geometry", full)
    with pytest.raises(OSError):
        _build(tmp_path / "s.zarr", recs)
    monkeypatch.setattr(store_mod, "_write_geometry", real)
    store = _build(tmp_path / "s.zarr", recs)
    assert store.feature_sets() == ["fake@short32-c28s14"] and verify_store(store.path).ok
    assert not list(tmp_path.glob(".s.zarr.ovss-*-*"))


def test_os_errors_are_one_line_through_the_cli(tmp_path):
    """A read-only location (the lock file cannot be made) and an export into a missing
    folder end as one line, no traceback."""
    import click
    from click.testing import CliRunner

    from ovss_cli.common import user_errors

    recs = make_records(tmp_path)

    @click.command()
    @click.argument("where")
    @user_errors
    def make(where):
        FeatureStore.open_or_create(where, recs)

    res = CliRunner().invoke(make, ["/proc/ovss-test.zarr"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and "/proc" in res.output
    store = _build(tmp_path / "s.zarr", recs)
    with pytest.raises(StoreError, match="does not exist"):
        export_hdf5(store.path, str(tmp_path / "no" / "such" / "x.h5"))


def test_changed_image_is_refused_on_resume(tmp_path):
    import os

    recs = make_records(tmp_path)
    _build(tmp_path / "s.zarr", recs)
    path = recs[2].path
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same content: fine
    FeatureStore.open_or_create(tmp_path / "s.zarr", recs)
    Image.fromarray(np.full((20, 20, 3), 7, dtype=np.uint8)).save(path)  # other pixels
    with pytest.raises(StoreImagesMismatchError) as err:
        FeatureStore.open_or_create(tmp_path / "s.zarr", recs)
    assert err.value.reason == "content" and err.value.paths == (path,)
    assert path in str(err.value)


def test_local_reads_match_zarr_and_refuse_a_truncated_chunk(tmp_path):
    # The local read path (byte ranges of the chunk files, no zarr call per read) returns what
    # the zarr API returns for the same rows, for every tensor and image.
    _, fs, _, truth = fill_store(tmp_path)
    geo = fs.geometry
    for i in truth:
        f = fs.read(i)
        for s in SPECS:
            a = int(geo[f"row_start_{s.unit}"][i])
            n = int(geo[f"row_count_{s.unit}"][i])
            np.testing.assert_array_equal(f.tensors[s.name], fs.group[s.name][a : a + n])
    with pytest.raises(StoreError, match="out of range"):
        fs.read(len(SIZES))
    # A chunk file cut short: a one-line store error naming the block, not a reshape error.
    last = max(truth)
    b = fs.block_of(last)
    path = fs._chunk_path("patch", b)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CorruptStoreError, match=f"chunk {b} of 'patch'"):
        fs.read(last)
    with pytest.raises(CorruptStoreError, match=f"chunk {b} of 'patch'"):
        list(fs.iter_images(names=["patch"]))
    # A chunk file that was never written reads as zeros (Zarr's fill value) both ways.
    path.unlink()
    assert not fs.read(last).tensors["patch"].any()
    streamed = {f.index: f for f in fs.iter_images(names=["patch"])}
    assert not streamed[last].tensors["patch"].any()


def _zarr_rows(fs, i):
    geo = fs.geometry
    out = {}
    for s in SPECS:
        a = int(geo[f"row_start_{s.unit}"][i])
        out[s.name] = fs.group[s.name][a : a + int(geo[f"row_count_{s.unit}"][i])]
    return out


def test_reads_keep_committed_chunk_files_open_and_see_rewrites(tmp_path):
    store, fs, _, truth = fill_store(tmp_path)
    first = {i: fs.read(i) for i in truth}
    # One open file per (tensor, block) read, reused: the same bytes on every read.
    assert len(fs._files) == len(SPECS) * fs.n_blocks
    for i in truth:
        f = fs.read(i)
        assert f.original_size == first[i].original_size and isinstance(f.original_size[0], int)
        for s in SPECS:
            assert f.tensors[s.name].tobytes() == first[i].tensors[s.name].tobytes()
            assert f.tensors[s.name].tobytes() == _zarr_rows(fs, i)[s.name].tobytes()
    # A block rewritten through this set is read back, not the kept file's old bytes.
    bufs = fs.new_block_buffers(0)
    for k in bufs:
        bufs[k][...] = 1
    imgs = fs.block_images(0)
    fs.write_block(0, bufs, np.full(len(imgs), STATUS_OK), [""] * len(imgs))
    assert (fs.read(imgs.start).tensors["patch"] == 1).all()
    # A pending block (no status chunk) is read with its file opened per read, never kept.
    last = fs.n_blocks - 1
    fs.group["status"][last] = np.zeros(fs.group["status"].shape[1], np.uint8)
    fresh = store.feature_set(fs.key)
    i = fresh.block_images(last).start
    assert fresh.read(i).tensors["patch"].tobytes() == first[i].tensors["patch"].tobytes()
    assert len(fresh._files) == 0 and fresh._committed == {last: False}
    fs.close()
    assert len(fs._files) == 0
    assert fs.read(0).tensors["cls"].tobytes() == _zarr_rows(fs, 0)["cls"].tobytes()


def test_reads_from_threads_and_a_forked_child_match_zarr(tmp_path):
    import os
    from concurrent.futures import ThreadPoolExecutor

    from featurestore.store_files import ChunkFiles

    _, fs, _, truth = fill_store(tmp_path)
    want = {i: _zarr_rows(fs, i) for i in truth}
    # Capacity 1: nearly every read evicts a file that another thread may be reading.
    fs._files = ChunkFiles(capacity=1)
    order = np.random.default_rng(0).integers(0, len(truth), 400).tolist()

    def same(i: int) -> bool:
        f = fs.read(i)
        return all(f.tensors[k].tobytes() == want[i][k].tobytes() for k in want[i])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(same, order))
    assert len(fs._files) == 1
    pid = os.fork()
    if pid == 0:  # a forked worker reads through the same FeatureSet, its own descriptors
        os._exit(0 if len(fs._files) == 0 and all(same(i) for i in truth) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert same(0)
