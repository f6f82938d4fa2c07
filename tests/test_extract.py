"""Extraction pipeline: correctness against the model, resume after kill -9, shards, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.backbones import create_backbone
from featurestore.errors import OvssError
from featurestore.extract import ExtractConfig, extract, plan, preprocess
from featurestore.images import list_folder_images, load_image_rgb
from featurestore.inspect import verify_store
from featurestore.protocol import Protocol, image_geometry
from featurestore.store import STATUS_FAILED, STATUS_OK, FeatureStore

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
PROTO = Protocol(resize="short", size=56, crop=42, stride=28)


def write_images(root, n=6, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(rng.integers(30, 90)), int(rng.integers(30, 90))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / f"im{i:02d}.png"
        )
    return root


def cfg(store, **kw):
    base = dict(
        models=["dinov2-s14"],
        protocol=PROTO,
        store=str(store),
        random_init=True,
        arch_overrides=TINY,
        batch_size=3,
        block_mb=0.01,
        workers=2,
    )
    base.update(kw)
    return ExtractConfig(**base)


def test_features_equal_direct_forward(tmp_path):
    recs = list_folder_images(write_images(tmp_path / "imgs", n=3))
    rep = extract(recs, cfg(tmp_path / "s.zarr", dtype="float32"))
    assert rep.models[0].images_extracted == 3
    fs = FeatureStore.open(tmp_path / "s.zarr").require("dinov2-s14", PROTO)
    bb = create_backbone("dinov2-s14", random_init=True, arch_overrides=TINY).eval()
    for i, r in enumerate(recs):
        img = load_image_rgb(r.path)
        geo = image_geometry(PROTO, *img.shape[:2], 14)
        assert geo == bb.geometry(PROTO, *img.shape[:2])
        wins = preprocess(img, geo, bb.info.mean, bb.info.std)
        with torch.inference_mode():
            want = [bb.forward_dense(w[None]) for w in wins]
        got = fs.read(i)
        np.testing.assert_allclose(
            got.tensors["patch"], torch.cat([o["patch"][0] for o in want]).numpy(), atol=1e-5
        )
        np.testing.assert_allclose(
            got.tensors["cls"], torch.cat([o["cls"] for o in want]).numpy(), atol=1e-5
        )
    # provenance records the weights identity and the protocol
    prov = fs.provenance
    assert prov["backbone"]["weights"] == "random-init:0"
    assert prov["protocol"]["crop"] == 42


def _batched_reference(bb, recs, fs, protocol, batch):
    """The outputs of a direct forward, batched as extract batches (per block, ``batch``
    windows in image order; one window shape here), stored as float16: image -> tensors."""
    want = {}
    for b in range(fs.n_blocks):
        idx = list(fs.block_images(b))
        wins, owner = [], []
        for i in idx:
            img = load_image_rgb(recs[i].path)
            for w in bb.preprocess(img, bb.geometry(protocol, *img.shape[:2])):
                wins.append(w)
                owner.append(i)
        outs: dict[str, list] = {}
        for k in range(0, len(wins), batch):
            with torch.inference_mode():
                out = bb.forward_dense(torch.stack(wins[k : k + batch]))
            for name, t in out.items():
                outs.setdefault(name, []).extend(t.numpy().astype(np.float16))
        for j, i in enumerate(owner):
            got = want.setdefault(i, {})
            for name, rows in outs.items():
                got.setdefault(name, []).append(rows[j])
    return {
        i: {n: np.concatenate([r.reshape(-1, r.shape[-1]) for r in v]) for n, v in t.items()}
        for i, t in want.items()
    }


def test_stored_bytes_equal_a_direct_forward_batched_alike(tmp_path):
    """Exact: every stored float16 tensor is the direct forward's output, batched the same way
    (3 windows per forward across images, short batches at block ends), converted alike; the
    progress callback reaches every image once, in order. (This tiny model's outputs do not
    depend on the batching; the bench-size models' do, and were checked by hand.)"""
    recs = list_folder_images(write_images(tmp_path / "imgs", n=8, seed=3))
    square = Protocol(resize="square", size=42)
    calls = []
    extract(
        recs,
        cfg(tmp_path / "s.zarr", protocol=square, block_mb=0.004),
        progress=lambda m, done, total: calls.append((done, total)),
    )
    fs = FeatureStore.open(tmp_path / "s.zarr").require("dinov2-s14", square)
    assert fs.n_blocks > 1 and any(len(fs.block_images(b)) % 3 for b in range(fs.n_blocks))
    assert calls == [(k, 8) for k in range(9)]
    bb = create_backbone("dinov2-s14", random_init=True, arch_overrides=TINY).eval()
    want = _batched_reference(bb, recs, fs, square, 3)
    for i in range(len(recs)):
        got = fs.read(i).tensors
        assert set(got) == set(want[i])
        for name in got:
            assert got[name].dtype == np.float16
            np.testing.assert_array_equal(got[name].reshape(want[i][name].shape), want[i][name])


def test_clip_whole_image_and_window_tensors_equal_direct_forwards(tmp_path):
    """Exact at batch 1 with CLIP's image-level tensor: each window and each whole-image
    input forwarded alone give the stored float16 rows."""
    from featurestore.backbones.base import tiny_arch_overrides

    recs = list_folder_images(write_images(tmp_path / "imgs", n=3, seed=4))
    tiny = tiny_arch_overrides("clip-b16")
    extract(recs, cfg(tmp_path / "s.zarr", models=["clip-b16"], arch_overrides=tiny, batch_size=1))
    fs = FeatureStore.open(tmp_path / "s.zarr").require("clip-b16", PROTO)
    bb = create_backbone("clip-b16", random_init=True, arch_overrides=tiny).eval()
    for i, r in enumerate(recs):
        img = load_image_rgb(r.path)
        geo = bb.geometry(PROTO, *img.shape[:2])
        with torch.inference_mode():
            wins = [bb.forward_dense(w[None]) for w in bb.preprocess(img, geo)]
            whole = bb.forward_image(bb.preprocess_image(img, geo)[None])
        got = fs.read(i).tensors
        for name in ("pre_last", "pre_last_cls", "global"):
            want = np.concatenate([o[name].reshape(-1, o[name].shape[-1]).numpy() for o in wins])
            np.testing.assert_array_equal(got[name].reshape(want.shape), want.astype(np.float16))
        np.testing.assert_array_equal(
            got["global_image"].reshape(1, -1), whole["global_image"].numpy().astype(np.float16)
        )


def test_dry_run_plan(tmp_path):
    recs = list_folder_images(write_images(tmp_path / "imgs", n=4))
    (row,) = plan(recs, cfg(tmp_path / "s.zarr"))
    assert row.images == 4 and row.windows >= 4 and row.tokens == row.windows * 9
    assert row.bytes == row.tokens * 64 * 2 + row.windows * 64 * 2
    assert not (tmp_path / "s.zarr").exists()


def test_bad_images_skipped_and_reported(tmp_path):
    root = write_images(tmp_path / "imgs", n=3)
    (root / "trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"0" * 50)
    good = Image.fromarray(np.zeros((40, 50, 3), np.uint8))
    good.save(root / "half.jpg")
    data = (root / "half.jpg").read_bytes()
    (root / "half.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((5, 3), np.uint8)).save(root / "tiny_gray.png")
    Image.fromarray(np.zeros((20, 30, 4), np.uint8)).save(root / "rgba.png")
    (root / "notes.txt").write_text("not an image")
    recs = list_folder_images(root)
    rep = extract(recs, cfg(tmp_path / "s.zarr"))
    m = rep.models[0]
    assert set(m.failures) == {"trunc", "half"}
    assert m.images_extracted == len(recs) - 2
    fs = FeatureStore.open(tmp_path / "s.zarr").require("dinov2-s14", PROTO)
    st = fs.status()
    ids = fs.store.image_ids
    assert st[ids.index("trunc")] == STATUS_FAILED and st[ids.index("tiny_gray")] == STATUS_OK
    assert "trunc" in fs.errors()
    assert verify_store(fs.store.path).ok  # failures are notes, not problems
    # rerun: nothing recomputed
    rep2 = extract(recs, cfg(tmp_path / "s.zarr"))
    assert rep2.models[0].images_done_before == len(recs)


def test_errors_are_clear(tmp_path):
    with pytest.raises(OvssError, match="not a known model"):
        extract(
            list_folder_images(write_images(tmp_path / "i", 1)),
            cfg(tmp_path / "s.zarr", models=["nope"]),
        )
    with pytest.raises(OvssError, match="shard"):
        extract(list_folder_images(tmp_path / "i"), cfg(tmp_path / "s.zarr", shard=(2, 2)))


RUNNER = textwrap.dedent(
    """
    import sys, time
    from featurestore.extract import ExtractConfig, extract
    from featurestore.images import list_folder_images
    from featurestore.protocol import Protocol
    import featurestore.store as st
    images, store, shard, slow = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    if slow:
        orig = st.FeatureSet.write_block
        def write_block(self, *a, **k):
            orig(self, *a, **k)
            print("BLOCK", flush=True)
            time.sleep(slow)
        st.FeatureSet.write_block = write_block
    i, n = (int(x) for x in shard.split("/"))
    cfg = ExtractConfig(models=["dinov2-s14"], protocol=Protocol(resize="short", size=56,
        crop=42, stride=28), store=store, random_init=True,
        arch_overrides={"depth": 2, "embed_dim": 64, "num_heads": 2}, batch_size=3,
        block_mb=0.01, shard=(i, n))
    extract(list_folder_images(images), cfg)
    print("DONE", flush=True)
    """
)


def run_py(args, **kw):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        **kw,
    )


def read_all(store):
    fs = FeatureStore.open(store).require("dinov2-s14", PROTO)
    return {f.index: f.tensors for f in fs.iter_images()}, fs


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for name in a[k]:
            np.testing.assert_array_equal(a[k][name], b[k][name])


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    images = write_images(tmp_path / "imgs", n=10)
    ref = run_py([images, tmp_path / "ref.zarr", "0/1", 0])
    assert "DONE" in ref.communicate(timeout=120)[0]
    p = run_py([images, tmp_path / "k.zarr", "0/1", 5])
    assert p.stdout.readline().strip() == "BLOCK"  # first block durable, then killed mid-run
    p.send_signal(signal.SIGKILL)
    p.wait()
    _, fs = read_all(tmp_path / "k.zarr")
    done_before = fs.done_blocks()
    assert 0 < done_before.sum() < fs.n_blocks
    first_chunk = fs._chunk_path("patch", 0)
    mtime = first_chunk.stat().st_mtime_ns
    time.sleep(0.01)
    p = run_py([images, tmp_path / "k.zarr", "0/1", 0])
    assert "DONE" in p.communicate(timeout=120)[0]
    assert first_chunk.stat().st_mtime_ns == mtime  # finished block not recomputed
    a, _ = read_all(tmp_path / "ref.zarr")
    b, _ = read_all(tmp_path / "k.zarr")
    assert_same(a, b)
    assert verify_store(str(tmp_path / "k.zarr")).ok


def test_concurrent_shards_equal_single_process(tmp_path):
    images = write_images(tmp_path / "imgs", n=10, seed=1)
    ref = run_py([images, tmp_path / "ref.zarr", "0/1", 0])
    procs = [run_py([images, tmp_path / "sh.zarr", f"{i}/2", 0]) for i in range(2)]
    for p in [ref, *procs]:
        assert "DONE" in p.communicate(timeout=180)[0]
    a, fa = read_all(tmp_path / "ref.zarr")
    b, fb = read_all(tmp_path / "sh.zarr")
    assert fb.done_blocks().all() and fb.n_blocks > 1
    assert_same(a, b)


# --- huge images, probe-time failures ----------------------------------------------------------


def _chunk_bytes(store_path):
    out = {}
    for dirpath, _, files in os.walk(store_path):
        for f in files:
            if "/c/" in os.path.join(dirpath, f) or dirpath.endswith("/c"):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(dirpath, f), store_path)] = fh.read()
    return out


def _smooth_images(root, n=3):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 240 + 16 * i, 320
        y, x = np.mgrid[0:h, 0:w]
        arr = np.stack([(y * 255) // h, (x * 255) // w, ((x + y + 40 * i) % 256)], -1)
        Image.fromarray(arr.astype(np.uint8)).save(root / f"s{i}.jpg", quality=95)
    return root


def test_ordinary_images_store_the_same_bytes_and_huge_ones_are_decoded_reduced(tmp_path):
    from featurestore.extract import decode_for

    recs = list_folder_images(_smooth_images(tmp_path / "imgs"))
    extract(recs, cfg(tmp_path / "a.zarr", dtype="float32"))  # default --max-pixels
    extract(recs, cfg(tmp_path / "b.zarr", dtype="float32", max_pixels=10**12))
    a, b = _chunk_bytes(tmp_path / "a.zarr"), _chunk_bytes(tmp_path / "b.zarr")
    assert a and a == b
    # forced reduced decoding (every image counts as huge): a smaller decode, close features
    geo = create_backbone("dinov2-s14", random_init=True, arch_overrides=TINY).geometry(
        PROTO, 240, 320
    )
    img, full = decode_for(recs[0].path, geo, max_pixels=1)
    assert full == (240, 320) and img.shape[0] < 240 and img.shape[0] >= geo.resized[0]
    extract(recs, cfg(tmp_path / "c.zarr", dtype="float32", max_pixels=1))
    fa = FeatureStore.open(tmp_path / "a.zarr").require("dinov2-s14", PROTO)
    fc = FeatureStore.open(tmp_path / "c.zarr").require("dinov2-s14", PROTO)
    ta, tc = fa.read(0), fc.read(0)
    key = "patch" if "patch" in ta.tensors else next(iter(ta.tensors))
    x, y = np.asarray(ta.tensors[key], np.float64), np.asarray(tc.tensors[key], np.float64)
    assert x.shape == y.shape and not np.array_equal(x, y)
    assert np.linalg.norm(x - y) / np.linalg.norm(x) < 0.1


def test_probe_time_failure_gets_its_reason(tmp_path):
    root = write_images(tmp_path / "imgs", n=2)
    (root / "bad.png").write_bytes(b"not an image at all")
    rep = extract(list_folder_images(root), cfg(tmp_path / "s.zarr"))
    msg = rep.models[0].failures["bad"]
    assert "bad.png" in msg and "not an image" in msg
