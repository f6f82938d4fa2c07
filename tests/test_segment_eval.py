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


def make_store(tmp_path, gts, flip=None, weights="random-init:0"):
    recs = list_folder_images(tmp_path / "data" / "images" / "val")
    store = FeatureStore.open_or_create(tmp_path / "s.zarr", recs)
    sizes = store.root["images/size"][...]
    geos = [image_geometry(PROTO, h, w, P) for h, w in sizes.tolist()]
    E = 3
    specs = [TensorSpec("patch", "token", (E,))]
    fs = store.create_feature_set(
        "fake-dense", PROTO, {"name": "fake-dense", "weights": weights}, specs, geos
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
        str(store.path),
        "custom",
        str(tmp_path / "data"),
        "prototype",
        vocab(),
        split="val",
        overrides=overrides(),
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


# -- the segment / eval / methods commands: requests, order of checks, --images -----------------

TINY_CLIP = [
    "--arch-override",
    "embed_dim=32",
    *("--arch-override", "vision_cfg.layers=2", "--arch-override", "vision_cfg.width=64"),
    *("--arch-override", "vision_cfg.heads=2", "--arch-override", "text_cfg.layers=2"),
    *("--arch-override", "text_cfg.width=64", "--arch-override", "text_cfg.heads=2"),
]


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (36, 52, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def no_weights(tmp_path, monkeypatch):
    """No checkpoint anywhere and no hub: only random-init towers can be built."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "weights").mkdir()
    monkeypatch.setenv("OVSS_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _one_line_error(res, *words):
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit), res.exception  # a user error
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1, res.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _segment_images(photo, out, *extra):
    args = ["segment", "--images", str(photo), "--classes", "cat,sofa", "--out", str(out)]
    return CliRunner().invoke(cli, [*args, "--random-init", *TINY_CLIP, "-q", "--json", *extra])


def test_set_with_a_wrong_type_is_one_line_naming_field_and_type(tmp_path):
    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts)
    for where in (str(store.path), str(tmp_path / "no-store")):
        res = CliRunner().invoke(
            cli,
            ["segment", "--store", where, "--classes", "a,b", "--out", str(tmp_path / "o")]
            + ["--set", "size=abc"],
        )
        _one_line_error(res, "size", "an integer", "'abc'")
    res = CliRunner().invoke(
        cli,
        ["eval", "--dataset", "custom", "--data-root", str(tmp_path / "data"), "--store"]
        + [str(store.path), "--set", "logit_scale=1"],
    )
    _one_line_error(res, "no option logit_scale")
    # the command as written (no --out): the missing output is named first, a usage
    # error without a traceback (exit 2)
    res = CliRunner().invoke(
        cli, ["segment", "--store", str(store.path), "--classes", "a,b", "--set", "size=abc"]
    )
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert isinstance(res.exception, SystemExit) and "nothing to write" in res.output


def test_images_default_method_runs_with_random_init_alone(
    tmp_path, photo, no_weights, monkeypatch
):
    """Issue 15 #1-2: `--random-init` covers the text tower; the default `prototype` reads
    CLIP's dense tokens, which `extract` makes; the temporary store is removed."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    res = _segment_images(photo, tmp_path / "o")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["method"] == "prototype" and d["config"]["tensor"] == "auto"
    assert d["feature_sets"] == {"dense": "clip-b16@short448"}
    assert d["extracted"] == ["clip-b16@short448"]
    assert d["text"]["weights"] == "random-init:0" and d["text"]["templates"] == "openai80"
    assert d["store"] is None and not list((tmp_path / "tmp").glob("ovss-segment-*"))
    labels = np.asarray(Image.open(tmp_path / "o" / "photo.png"))
    assert labels.shape == (36, 52) and set(np.unique(labels)) <= {0, 1}
    assert json.loads((tmp_path / "o" / "segment.json").read_text())["store"] is None


def test_prototype_clip_dense_is_maskclip_value_path(tmp_path, photo, no_weights):
    """`tensor=auto` on a CLIP set = MaskCLIP's value path on the whole image: the same labels
    as the `maskclip` method on the same set (one window)."""
    store = tmp_path / "k.zarr"
    res = _segment_images(photo, tmp_path / "o", "--keep-store", str(store))
    assert res.exit_code == 0, res.output
    proto = np.asarray(Image.open(tmp_path / "o" / "photo.png"))
    res = CliRunner().invoke(
        cli,
        ["segment", "--store", str(store), "--classes", "cat,sofa", "--out", str(tmp_path / "m")]
        + ["--method", "maskclip", "--set", "crop=0", "--set", "stride=0", "--random-init"]
        + [*TINY_CLIP, "-q", "--json"],
    )
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m" / "photo.png")), proto)


def test_cached_rerun_builds_no_model(tmp_path, photo, no_weights, monkeypatch):
    store = tmp_path / "keep.zarr"
    res = _segment_images(photo, tmp_path / "o", "--keep-store", str(store))
    assert res.exit_code == 0, res.output
    first = np.asarray(Image.open(tmp_path / "o" / "photo.png"))

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    import featurestore.backbones.base as bb_base
    import featurestore.extract as extract_mod
    import featurestore.text as text_mod
    import featurestore.text_encoders as te_mod

    monkeypatch.setattr(bb_base, "create_backbone", no_model)
    monkeypatch.setattr(extract_mod, "extract", no_model)
    monkeypatch.setattr(text_mod, "load_text_encoder", no_model)
    monkeypatch.setattr(te_mod, "create_text_encoder", no_model)
    res = _segment_images(photo, tmp_path / "o2", "--keep-store", str(store))
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["extracted"] == [] and d["store"] == str(store)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o2" / "photo.png")), first)


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--templates", "nope"], ["nope"]),  # vocabulary side: the template set
        (["--set", "tensor=patch"], ["patch", "clip-b16", "does not compute", "--set model"]),
        (["--text-weights", "{tmp}/missing.pt"], ["missing.pt", "clip-b16 text encoder"]),
        (["--text-model", "nope-text"], ["nope-text"]),
        (["--method", "nope"], ["not a known method"]),
    ],
)
def test_cheap_checks_fail_before_any_extraction(tmp_path, photo, no_weights, extra, words):
    store = tmp_path / "keep.zarr"
    extra = [x.format(tmp=tmp_path) for x in extra]
    res = _segment_images(photo, tmp_path / "o", "--keep-store", str(store), *extra)
    line = _one_line_error(res, *words)
    assert not store.exists()  # nothing extracted, no store created
    assert "ovss-segment-" not in line


def test_missing_weights_found_before_extraction(tmp_path, photo, no_weights, monkeypatch):
    """Without --random-init: the image backbone's checkpoint is looked for first; the message
    names what to pass, never a temporary store."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    res = CliRunner().invoke(
        cli,
        ["segment", "--images", str(photo), "--classes", "cat,sofa", "--out", str(tmp_path / "o")],
    )
    line = _one_line_error(res, "clip-b16", "--weights PATH", "--random-init")
    assert "ovss-segment-" not in line and not list((tmp_path / "tmp").glob("ovss-segment-*"))


def test_failure_after_extraction_keeps_the_temporary_store(
    tmp_path, photo, no_weights, monkeypatch
):
    import methods.segment as seg_mod
    from featurestore.errors import OvssError

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    real = seg_mod.embed_text

    def broken(*a, **k):
        raise OvssError("the text side broke")

    monkeypatch.setattr(seg_mod, "embed_text", broken)
    res = _segment_images(photo, tmp_path / "o")
    line = _one_line_error(res, "the text side broke", "kept in", "--keep-store")
    kept = line.split("rerun with --keep-store ")[1].split(" to resume")[0]
    assert FeatureStore.open(kept).feature_sets() == ["clip-b16@short448"]
    monkeypatch.setattr(seg_mod, "embed_text", real)
    res = _segment_images(photo, tmp_path / "o", "--keep-store", kept)  # resumes: no extraction
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["extracted"] == []


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--checkpoint", "x.pt"], ["takes no checkpoint", "aligned", "--checkpoint"]),
        (["--sam-refine"], ["no SAM refinement", "trident", "--sam-refine"]),
        (["--write-labels", "p"], ["keep the store", "--keep-store"]),
    ],
)
def test_option_conflicts_are_usage_errors(tmp_path, photo, extra, words):
    res = CliRunner().invoke(
        cli,
        ["segment", "--images", str(photo), "--classes", "a,b", "--out", str(tmp_path / "o")]
        + extra,
    )
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for w in words:
        assert w in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_text_embedding_reports_progress(tmp_path):
    from methods.segment import SegmentRequest, run_segment

    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts)
    calls = []
    req = SegmentRequest(
        store=str(store.path),
        classes="sky,grass,brick,tree",  # not cached: embedded with openai80
        out_dir=str(tmp_path / "o"),
        settings={"model": "fake-dense", "resize": "none", "size": "0"},
        text_random_init=True,
        text_arch_overrides={"embed_dim": 3, "text_cfg": {"layers": 1, "width": 32, "heads": 2}},
        device="cpu",
    )
    summary = run_segment(req, lambda label, done, total: calls.append((label, done, total)))
    text = [c for c in calls if c[0].startswith("text")]
    assert text and text[-1][1] == text[-1][2] == 4 * 80
    assert summary.images == 3 and summary.text["templates"] == "openai80"


def test_methods_lists_typed_options(tmp_path):
    from methods.config import config_fields
    from methods.segment import DEFAULT_METHOD

    res = CliRunner().invoke(cli, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    proto = {o["name"]: o for o in rows["prototype"]["options"]}
    assert proto["tensor"]["default"] == "auto" and proto["tensor"]["type"] == "str"
    assert proto["size"] == {**proto["size"], "type": "int", "default": 448, "required": False}
    assert "text embedding space" in proto["tensor"]["help"]
    assert rows[DEFAULT_METHOD]["default"] and sum(r["default"] for r in rows.values()) == 1
    cls = get_method("fmbseg-stage1")
    assert [o["name"] for o in rows["fmbseg-stage1"]["options"]] == [
        f.name for f in config_fields(cls.Config)
    ]
    table = CliRunner().invoke(cli, ["methods"], terminal_width=200).output
    assert "[ours: 2]" in table  # not eaten as markup
    helptext = CliRunner().invoke(cli, ["segment", "--help"]).output
    assert f"default: {DEFAULT_METHOD}" in helptext


# --- non-finite features: segment and eval refuse them, naming the image ------------------------


def _nan_store(tmp_path, image: int = 1):
    """The fake-dense store with one NaN in image ``image``'s patch features (its block
    rewritten, status finished)."""
    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts)
    fs = store.require("fake-dense", PROTO)
    b = next(b for b in range(fs.n_blocks) if image in fs.block_images(b))
    bufs = fs.new_block_buffers(b)
    for i in fs.block_images(b):
        rows = fs.local_rows("token", i)
        bufs["patch"][rows] = fs.encode(np.asarray(fs.read(i).tensors["patch"], np.float32))
        if i == image:
            bufs["patch"][rows.start + 1, 2] = np.nan
    imgs = fs.block_images(b)
    fs.write_block(b, bufs, np.full(len(imgs), STATUS_OK), [""] * len(imgs))
    return FeatureStore.open(store.path), store.image_ids[image]


def test_nan_features_stop_segment_and_eval_naming_image_and_set(tmp_path):
    from methods.segment import NonFiniteFeaturesError

    store, bad_id = _nan_store(tmp_path)
    with pytest.raises(NonFiniteFeaturesError) as err:
        segment_store(
            str(store.path), "prototype", vocab(), str(tmp_path / "out"), overrides=overrides()
        )
    assert err.value.image_id == bad_id and err.value.feature_set == "fake-dense@orig"
    assert err.value.tensor == "patch" and err.value.count == 1
    with pytest.raises(NonFiniteFeaturesError, match=f"image '{bad_id}'"):
        evaluate_store(
            str(store.path),
            "custom",
            str(tmp_path / "data"),
            "prototype",
            vocab(),
            split="val",
            overrides=overrides(),
        )
    sets = ["--set", "model=fake-dense", "--set", "resize=none", "--set", "size=0"]
    sets.append("--text-random-init")
    data = ["--dataset", "custom", "--data-root", str(tmp_path / "data"), "--split", "val"]
    for args in (
        ["segment", "--classes", "sky,grass,brick", "--out", str(tmp_path / "o")],
        ["eval", *data],
    ):
        res = CliRunner().invoke(
            cli, [*args, "--store", str(store.path), "--templates", "single", "-q", *sets]
        )
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert f"image '{bad_id}'" in res.output and "fake-dense@orig" in res.output
        assert "mIoU" not in res.output and res.output.strip().count("\n") == 0
        assert "store verify" in res.output


# -- strict evaluation: every image of the split has a usable prediction, or --allow-missing ----

EVAL_SETS = ["--set", "model=fake-dense", "--set", "resize=none", "--set", "size=0"]


def _eval(tmp_path, *extra):
    args = ["eval", "--dataset", "custom", "--data-root", str(tmp_path / "data")]
    return CliRunner().invoke(cli, [*args, "--split", "val", "-q", *extra])


def test_eval_predictions_missing_or_wrong_size_fail_unless_allow_missing(tmp_path):
    gts = make_dataset(tmp_path / "data", n=5)
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in range(3):
        Image.fromarray(gts[f"im{i}"][1]).save(pred / f"im{i}.png")
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(pred / "im4.png")  # another size
    res = _eval(tmp_path, "--predictions", str(pred))
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "2 of 5 custom images have no usable prediction" in res.output
    assert "im3 (no prediction file)" in res.output and "im4 (prediction shape" in res.output
    assert "--allow-missing" in res.output
    res = _eval(tmp_path, "--predictions", str(pred), "--allow-missing", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert (d["images"], d["total"], sorted(d["skipped"])) == (3, 5, ["im3", "im4"])
    assert d["metrics"]["mIoU"] == 100.0
    res = _eval(tmp_path, "--predictions", str(pred), "--allow-missing")
    assert res.exit_code == 0 and "mIoU over 3 of 5 images" in res.output, res.output
    for i in (3, 4):  # complete: no count of a subset
        Image.fromarray(gts[f"im{i}"][1]).save(pred / f"im{i}.png")
    res = _eval(tmp_path, "--predictions", str(pred))
    assert res.exit_code == 0 and "mIoU over 5 images" in res.output, res.output


def test_eval_store_and_sweep_without_features_for_some_images_fail(tmp_path):
    gts = make_dataset(tmp_path / "data", n=3)
    store = make_store(tmp_path, gts)
    make_dataset(tmp_path / "data", n=8)  # 5 more images of the split, not in the store
    base = ["--store", str(store.path), "--templates", "single", "--text-random-init", *EVAL_SETS]
    res = _eval(tmp_path, *base)
    assert res.exit_code == 1 and "5 of 8 custom images have no usable prediction" in res.output
    assert "im3 (not in the store)" in res.output and "and 2 more" in res.output, res.output
    assert "im7" not in res.output  # the first few, then a count
    res = _eval(tmp_path, *base, "--allow-missing", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert (d["images"], d["total"], len(d["skipped"])) == (3, 8, 5)
    sweep = ["--sweep", "logit_scale=10,40"]
    res = _eval(tmp_path, *base, *sweep)
    assert res.exit_code == 1 and "5 of 8 custom images" in res.output, res.output
    res = _eval(tmp_path, *base, *sweep, "--allow-missing")
    assert res.exit_code == 0 and "mIoU over 3 of 8 images" in res.output, res.output
