"""segment / eval drivers on a store whose features are controlled: known labels in, known
mIoU out; CLI outputs and JSON schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featurestore.backbones.base import TensorSpec
from featurestore.images import list_folder_images
from featurestore.labelsets import LabelSet
from featurestore.protocol import Protocol, image_geometry
from featurestore.store import STATUS_OK, FeatureStore
from featurestore.text import Vocabulary, store_text_embeddings
from methods.base import ScoringConfig, Vocab, build_config, get_method
from methods.evaluate import evaluate_predictions, evaluate_store
from methods.metrics import IoUAccumulator
from methods.segment import segment_image, segment_store
from ovss_cli.main import cli

CLASSES = ["sky", "grass", "brick"]
PROTO = Protocol(resize="none", size=0)
P = 8  # patch size of the fake dense feature set


def make_dataset(root, n=3, seed=0):
    """A `custom` dataset whose GT is constant on 8x8 patches (so patch labels are exact)."""
    rng = np.random.default_rng(seed)
    for sub in ("images/val", "annotations/val"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    gts = {}
    for i in range(n):
        gh, gw = 3 + i, 4
        grid = rng.integers(0, 3, (gh, gw))
        gt = np.kron(grid, np.ones((P, P), dtype=np.int64)).astype(np.uint8)
        gt[0, 0] = 255  # an ignore pixel
        Image.fromarray(rng.integers(0, 255, (*gt.shape, 3), dtype=np.uint8)).save(
            root / "images" / "val" / f"im{i}.png"
        )
        Image.fromarray(gt).save(root / "annotations" / "val" / f"im{i}.png")
        gts[f"im{i}"] = (grid, gt)
    return gts


def make_store(tmp_path, gts, flip=None):
    recs = list_folder_images(tmp_path / "data" / "images" / "val")
    store = FeatureStore.open_or_create(tmp_path / "s.zarr", recs)
    sizes = store.root["images/size"][...]
    geos = [image_geometry(PROTO, h, w, P) for h, w in sizes.tolist()]
    E = 3
    specs = [TensorSpec("patch", "token", (E,))]
    fs = store.create_feature_set(
        "fake-dense", PROTO, {"name": "fake-dense", "weights": "random-init:0"}, specs, geos
    )
    for b in range(fs.n_blocks):
        bufs = fs.new_block_buffers(b)
        for i in fs.block_images(b):
            grid = gts[store.image_ids[i]][0].copy()
            if flip is not None:
                grid[grid == flip[0]] = flip[1]
            onehot = np.eye(E, dtype=np.float32)[grid.reshape(-1)]
            bufs["patch"][fs.local_rows("token", i)] = fs.encode(onehot)
        imgs = fs.block_images(b)
        fs.write_block(b, bufs, np.full(len(imgs), STATUS_OK), [""] * len(imgs))
    vocab = Vocabulary.from_names(CLASSES)
    store_text_embeddings(
        store,
        "clip-b16",
        vocab,
        "single",
        np.eye(E, dtype=np.float32),
        {"weights": "random-init:0"},
    )
    return store


def vocab():
    import torch

    return Vocab([[c] for c in CLASSES], torch.eye(3), torch.arange(3), "test", "single")


def overrides():
    return {"model": "fake-dense", "resize": "none", "size": 0}


def test_prototype_recovers_known_labels_and_miou(tmp_path):
    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts)
    cls = get_method("prototype")
    seg = cls(store, build_config(cls, None, overrides()))
    for i, image_id in enumerate(store.image_ids):
        labels, max_prob, _ = segment_image(seg, i, vocab(), ScoringConfig())
        grid, gt = gts[image_id]
        # away from patch borders the bilinear logits keep the patch's class
        centre = labels[P // 2 :: P, P // 2 :: P]
        np.testing.assert_array_equal(centre, grid)
    res = evaluate_store(
        str(store.path), "custom", str(tmp_path / "data"), "prototype", vocab(), "val", overrides()
    )
    # reference: the same labels through the metric by hand
    acc = IoUAccumulator(3)
    for i, image_id in enumerate(store.image_ids):
        labels, _, _ = segment_image(seg, i, vocab(), ScoringConfig())
        acc.update(labels, gts[image_id][1])
    assert res.metrics["mIoU"] == acc.compute().miou
    assert res.images == 3 and not res.skipped
    assert res.protocol["backbones"]["dense"]["feature_set"] == "fake-dense@orig"


def test_wrong_features_lower_miou_and_predictions_folder(tmp_path):
    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts, flip=(1, 2))  # grass predicted as brick
    out = tmp_path / "out"
    summary = segment_store(
        str(store.path),
        "prototype",
        vocab(),
        str(out),
        overrides=overrides(),
        write_labels="pseudo",
    )
    assert summary.images == 3
    assert (out / "im0.png").exists() and (out / "im0_overlay.png").exists()
    res = evaluate_predictions("custom", str(tmp_path / "data"), str(out), "val")
    assert res.images == 3
    pc = res.metrics["per_class"]
    assert pc["iou"][1] == 0.0  # grass never predicted
    assert res.metrics["mIoU"] < 100
    ls = LabelSet(FeatureStore.open(store.path), "pseudo")
    assert ls.done.all()
    np.testing.assert_array_equal(ls.read(0), np.asarray(Image.open(out / "im0.png")))


def test_cli_segment_and_eval_json(tmp_path):
    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts)
    r = CliRunner()
    sets = [
        "--set",
        "model=fake-dense",
        "--set",
        "resize=none",
        "--set",
        "size=0",
        "--text-random-init",
    ]
    res = r.invoke(
        cli,
        [
            "segment",
            "--store",
            str(store.path),
            "--classes",
            "sky,grass,brick",
            "--templates",
            "single",
            "--out",
            str(tmp_path / "o"),
            "-q",
            "--json",
            *sets,
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["images"] == 3
    res = r.invoke(
        cli,
        [
            "eval",
            "--dataset",
            "custom",
            "--data-root",
            str(tmp_path / "data"),
            "--split",
            "val",
            "--store",
            str(store.path),
            "--templates",
            "single",
            "-q",
            "--json",
            "--check-reference",
            *sets,
        ],
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert 80 < d["metrics"]["mIoU"] <= 100.0  # bilinear logits blur patch borders only
    assert d["protocol"]["method"] == "prototype"
    assert d["reference"]["matched"] is False
    res = r.invoke(
        cli,
        [
            "eval",
            "--dataset",
            "custom",
            "--data-root",
            str(tmp_path / "data"),
            "--split",
            "val",
            "--predictions",
            str(tmp_path / "o"),
            "-q",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["metrics"]["mIoU"] == d["metrics"]["mIoU"]


def test_unknown_option_and_method(tmp_path):
    cls = get_method("prototype")
    with pytest.raises(Exception, match="has no option"):
        build_config(cls, None, {"nope": 1})
    with pytest.raises(Exception, match="not a known method"):
        get_method("nope")
