"""store verify: one test per kind of corruption, each found with its location; store info on
a store with an unfinished set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featurestore.inspect import FINDING_KINDS, store_info, verify_store
from ovss_cli.main import cli
from tests.test_store import INFO, PROTOCOL, SPECS, _build, make_records

KEY = "fake@short32-c28s14"
GEO_INFO = dict(INFO, family="fake", patch_size=7)  # the default geometry rule applies


@pytest.fixture
def store(tmp_path):
    s = _build(tmp_path / "s.zarr", make_records(tmp_path), info=GEO_INFO)
    rep = verify_store(s.path)
    assert rep.ok and rep.checked_blocks == s.feature_set(KEY).n_blocks > 2, rep.problems
    return s


def chunk(store, name, b):
    return store.feature_set(KEY)._chunk_path(name, b)


def kinds(path, **kw):
    rep = verify_store(str(path), **kw)
    assert all(f["kind"] in FINDING_KINDS for f in rep.findings)
    return rep, {f["kind"] for f in rep.findings}


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_flipped_bits_in_a_float16_chunk(store):
    p = chunk(store, "patch", 1)
    data = bytearray(p.read_bytes())
    data[5] ^= 0x04  # one bit of one value
    p.write_bytes(bytes(data))
    rep, found = kinds(store.path)
    assert found == {"checksum"}
    assert rep.findings[0] | {"message": ""} == {
        "kind": "checksum",
        "set": KEY,
        "tensor": "patch",
        "block": 1,
        "message": "",
    }
    assert verify_store(store.path, scan_values=False).ok  # sizes only: not seen, as documented


def test_two_chunks_swapped(store):
    a, b = chunk(store, "cls", 0), chunk(store, "cls", 2)
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    rep, found = kinds(store.path)
    assert found == {"checksum"} and sorted(f["block"] for f in rep.findings) == [0, 2]


def test_truncated_chunk(store):
    p = chunk(store, "reg", 0)
    p.write_bytes(p.read_bytes()[:10])
    rep, found = kinds(store.path)
    assert found == {"chunk_size"} and rep.findings[0]["tensor"] == "reg"


def test_deleted_chunk(store):
    chunk(store, "patch", 0).unlink()
    _, found = kinds(store.path)
    assert found == {"missing_chunk"}


def test_nan_values(store):
    p = chunk(store, "patch", 0)
    arr = np.frombuffer(p.read_bytes(), dtype=np.float16).copy()
    arr[0] = np.nan
    p.write_bytes(arr.tobytes())
    _, found = kinds(store.path)
    assert found == {"nonfinite", "checksum"}


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["attributes"]["provenance"].update(model="other"),
        lambda d: d["attributes"]["provenance"]["protocol"].update(size=64),
        lambda d: d["attributes"]["provenance"]["backbone"].update(weights="sha256:x"),
    ],
    ids=["model", "protocol", "weights"],
)
def test_provenance_edited(store, edit):
    edit_json(Path(store.path, "features", KEY, "zarr.json"), edit)
    rep, found = kinds(store.path)
    assert "provenance" in found and all(f["set"] == KEY for f in rep.findings)


def test_provenance_edited_with_its_digest_removed_still_names_another_set(store):
    def edit(d):
        d["attributes"]["provenance"]["protocol"]["size"] = 64
        del d["attributes"]["provenance_sha256"]

    edit_json(Path(store.path, "features", KEY, "zarr.json"), edit)
    rep, found = kinds(store.path)
    assert "provenance" in found and any("describes" in p for p in rep.problems)


def test_image_size_edited(store):
    arr = store.root["images/size"]
    sizes = arr[...]
    sizes[1] = (sizes[1][0] + 5, sizes[1][1])
    arr[...] = sizes
    _, found = kinds(store.path)
    assert {"image_table", "geometry"} <= found


def test_image_size_edited_without_digest_is_found_by_the_geometry(store):
    arr = store.root["images/size"]
    sizes = arr[...]
    sizes[3] = (sizes[3][0] + 40, sizes[3][1])  # another aspect ratio: other windows
    arr[...] = sizes
    edit_json(Path(store.path, "zarr.json"), lambda d: d["attributes"].pop("images_sha256"))
    rep, found = kinds(store.path)
    assert found == {"geometry"}, rep.problems


def test_window_grid_edited(store):
    g = store.root[f"features/{KEY}/geometry/win_grid"]
    grid = g[...]
    grid[0] = grid[0] + 1
    g[...] = grid
    _, found = kinds(store.path)
    assert "geometry" in found


def test_feature_set_metadata_deleted(store):
    Path(store.path, "features", KEY, "zarr.json").unlink()
    rep, found = kinds(store.path)
    assert found == {"unfinished_set"} and rep.findings[0]["set"] == KEY
    assert rep.checked_sets == 0 and not rep.ok  # never "OK (0 feature sets)"
    assert store_info(store.path)["unfinished_sets"] == [KEY]


def test_tensor_array_deleted(store):
    shutil.rmtree(Path(store.path, "features", KEY, "cls"))
    _, found = kinds(store.path)
    assert "layout" in found


def test_pending_images(tmp_path):
    from featurestore.store import FeatureStore
    from tests.test_store import geometries_for

    s = FeatureStore.open_or_create(tmp_path / "s.zarr", make_records(tmp_path))
    geos = geometries_for(s.root["images/size"][...], PROTOCOL, 7)
    s.create_feature_set("fake", PROTOCOL, GEO_INFO, SPECS, geos)
    _, found = kinds(s.path)
    assert found == {"pending"}


def test_verify_cli_json_lists_findings_and_exits_1(store):
    chunk(store, "patch", 1).write_bytes(b"\0" * 3)
    res = CliRunner().invoke(cli, ["store", "verify", store.path, "--json"])
    assert res.exit_code == 1
    out = json.loads(res.output)
    assert out["ok"] is False
    assert [(f["kind"], f["tensor"], f["block"]) for f in out["findings"]] == [
        ("chunk_size", "patch", 1)
    ]
    res = CliRunner().invoke(cli, ["store", "info", store.path])
    assert res.exit_code == 0


def test_fix_marks_bad_blocks_pending_and_a_rerun_recomputes_exactly_those(store, tmp_path):
    from tests.test_store import _snapshot

    clean = _snapshot(store.path)
    good = chunk(store, "patch", 0)
    good_mtime = good.stat().st_mtime_ns
    p = chunk(store, "cls", 2)
    data = bytearray(p.read_bytes())
    data[0] ^= 0xFF
    p.write_bytes(bytes(data))
    res = CliRunner().invoke(cli, ["store", "verify", store.path, "--fix"])
    assert res.exit_code == 1 and "marked block(s) 2 pending" in res.output
    fs = store.feature_set(KEY)
    assert fs.done_blocks().tolist() == [b != 2 for b in range(fs.n_blocks)]
    again = _build(Path(store.path), make_records(tmp_path), info=GEO_INFO)
    assert verify_store(again.path).ok
    assert _snapshot(store.path) == clean  # the block recomputed, byte for byte
    assert good.stat().st_mtime_ns == good_mtime  # and only that block
