"""CLI start-up: commands that need no model import no torch, timm or open_clip.

Each check runs the commands through click's ``CliRunner`` in a fresh ``python -c`` process
(this test process has torch loaded already) and reads that process's ``sys.modules``. The
outputs of the light commands are compared with what the same commands print here, where
torch and the registries are loaded (the live tables, the torch-side evaluation).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featurestore.demo_data import build_collage_dataset
from featurestore.images import ImageRecord
from featurestore.protocol import Protocol, image_geometry
from featurestore.specs import TensorSpec
from featurestore.store import STATUS_OK, FeatureStore
from ovss_cli.main import cli

HEAVY = ("torch", "timm", "open_clip", "transformers", "segment_anything")

CHILD = """
import json, sys
from click.testing import CliRunner
from ovss_cli.main import cli
runs = [CliRunner().invoke(cli, args) for args in json.loads(sys.argv[1])]
print(json.dumps({
    "codes": [r.exit_code for r in runs],
    "outputs": [r.output for r in runs],
    "loaded": [m for m in json.loads(sys.argv[2]) if m in sys.modules],
}))
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


def test_methods_and_models_import_no_model_library_and_print_the_live_tables():
    commands = [["methods"], ["methods", "--json"], ["models"], ["models", "--json"]]
    out = run_commands(commands)
    assert out["codes"] == [0, 0, 0, 0]
    assert out["loaded"] == []
    # Here the registries are live (this process imports every method and backbone): the
    # light process printed the same bytes.
    import methods.segment
    from featurestore.backbones.base import list_backbones

    assert methods.segment.describe_methods() and list_backbones()
    for args, light in zip(commands, out["outputs"], strict=True):
        live = CliRunner().invoke(cli, args)
        assert live.exit_code == 0
        assert light == live.output, args


def _predictions(root: Path) -> tuple[str, str]:
    """A demo collage dataset and a folder of noisy predictions of its val images (one left
    out, one with a class outside the vocabulary)."""
    from PIL import Image

    from featurestore.datasets import get_dataset, list_dataset_images
    from featurestore.labels import load_label

    data = build_collage_dataset(root / "data", n_train=1, n_val=5, size=(40, 56))
    spec = get_dataset("custom", str(data.root))
    rng = np.random.default_rng(3)
    pred_dir = root / "pred"
    pred_dir.mkdir()
    records = list_dataset_images("custom", str(data.root), None)
    for i, r in enumerate(records[:-1]):
        gt = load_label(spec, r.label_path)
        noise = rng.integers(0, spec.num_classes + (i == 0), gt.shape)
        p = np.where(rng.random(gt.shape) < 0.35, noise, np.where(gt == 255, 0, gt))
        Image.fromarray(p.astype(np.uint8), mode="L").save(pred_dir / f"{r.image_id}.png")
    return str(data.root), str(pred_dir)


def test_eval_predictions_imports_no_model_library_and_gives_the_same_numbers(tmp_path):
    data_root, pred_dir = _predictions(tmp_path)
    args = ["eval", "--predictions", pred_dir, "--dataset", "custom", "--data-root", data_root]
    commands = [[*args, "-q", "--allow-missing", "--json"], [*args, "-q"]]
    out = run_commands(commands)
    assert out["codes"] == [0, 1]  # the strict run fails on the image without a prediction
    assert out["loaded"] == []
    assert "1 of 5 custom images have no usable prediction" in out["outputs"][1]
    light = json.loads(out["outputs"][0])
    # The same scoring here, with torch loaded and the predictions given as torch tensors to
    # the metric (its torch input path), and mIoU recomputed from the confusion matrix.
    import torch
    from PIL import Image

    from featurestore.datasets import get_dataset, list_dataset_images
    from featurestore.labels import load_label
    from methods.metrics import IoUAccumulator

    live = CliRunner().invoke(cli, commands[0])
    assert live.exit_code == 0
    here = json.loads(live.output)
    for key in ("metrics", "confusion", "per_image", "gallery", "skipped", "images", "total"):
        assert light[key] == here[key], key
    spec = get_dataset("custom", data_root)
    c = spec.num_classes
    acc = IoUAccumulator(c)
    inter, area_pred, area_label = np.zeros(c), np.zeros(c), np.zeros(c)
    for r in list_dataset_images("custom", data_root, None)[:-1]:
        pred = np.asarray(Image.open(Path(pred_dir) / f"{r.image_id}.png")).astype(np.int64)
        gt = load_label(spec, r.label_path)
        acc.update(torch.from_numpy(pred), gt)
        p, g = pred[gt != 255], gt[gt != 255]  # mmseg: histograms over [0, C) of the labelled
        inter += np.bincount(p[p == g], minlength=c)[:c]
        area_pred += np.bincount(p[p < c], minlength=c)[:c]
        area_label += np.bincount(g, minlength=c)[:c]
    assert acc.compute().to_dict(light["class_names"]) == light["metrics"]
    iou = inter / (area_pred + area_label - inter)
    assert light["metrics"]["mIoU"] == np.round(np.nanmean(iou) * 100, 2)
    assert 20 < light["metrics"]["mIoU"] < 95  # noisy, not trivial


def test_the_probe_sees_torch_when_a_command_needs_it():
    # The same probe on a command that plans from the method registry: torch must show up,
    # so the empty lists above are real observations.
    out = run_commands([["extract", "--for", "prototype", "-s", "x.zarr", "--dry-run", "--json"]])
    assert out["codes"] == [0]
    assert "torch" in out["loaded"]
