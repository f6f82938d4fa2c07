"""CLI start-up: commands that need no model import no torch, timm or open_clip.

Each check runs the commands through click's ``CliRunner`` in a fresh ``python -c`` process
(this test process has torch loaded already) and reads that process's ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurestore.demo_data import build_collage_dataset
from featurestore.images import ImageRecord
from featurestore.protocol import Protocol, image_geometry
from featurestore.specs import TensorSpec
from featurestore.store import STATUS_OK, FeatureStore

HEAVY = ("torch", "timm", "open_clip", "transformers", "segment_anything")

CHILD = """
import json, sys
from click.testing import CliRunner
from ovss_cli.main import cli
codes = [CliRunner().invoke(cli, args).exit_code for args in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "loaded": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""

ROOT = Path(__file__).resolve().parents[1]


def run_commands(commands: list[list[str]]) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(commands), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("startup")
    (tmp / "x.png").write_bytes(b"")  # the store never opens the image files here
    recs = [ImageRecord(f"im{i}", str(tmp / "x.png"), "folder", "") for i in range(3)]
    store = FeatureStore.open_or_create(tmp / "s.zarr", recs)
    protocol = Protocol(resize="square", size=28)
    geos = [image_geometry(protocol, 28, 28, 14) for _ in recs]
    specs = [TensorSpec("patch", "token", (4,))]
    fs = store.create_feature_set("fake", protocol, {"name": "fake", "weights": "r"}, specs, geos)
    for b in range(fs.n_blocks):
        bufs = fs.new_block_buffers(b)
        bufs["patch"][:] = np.arange(bufs["patch"].size).reshape(bufs["patch"].shape)
        n = len(fs.block_images(b))
        fs.write_block(b, bufs, np.full(n, STATUS_OK), [""] * n)
    return tmp / "s.zarr"


def test_store_help_and_data_commands_import_no_model_library(tiny_store, tmp_path):
    data = build_collage_dataset(tmp_path / "data", n_train=1, n_val=1, size=(32, 32))
    store = str(tiny_store)
    commands = [
        ["--help"],
        ["store", "info", store],
        ["store", "info", store, "--json"],
        ["store", "ls", store],
        ["store", "verify", store],
        ["data", "list"],
        ["data", "verify", "custom", "--data-root", str(data.root), "-q"],
        ["eval", "--help"],
    ]
    out = run_commands(commands)
    failed = [" ".join(c) for c, code in zip(commands, out["codes"], strict=True) if code]
    assert failed == []
    assert out["loaded"] == []


def test_the_probe_sees_torch_when_a_command_needs_it():
    # The same probe on a command that builds the backbone registry: torch must show up, so
    # the empty list above is a real observation.
    out = run_commands([["models", "--json"]])
    assert out["codes"] == [0]
    assert "torch" in out["loaded"]
