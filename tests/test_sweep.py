"""methods.sweep + methods.dense_cache: a sweep's rows are separate evaluations exactly, the
pass shares reads / text / dense outputs / Trident's early stage, the derived cache is reused
and refused when its identity differs, bad sweep inputs are one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featurestore.extract import ExtractConfig, extract
from featurestore.images import list_folder_images
from methods.dense_cache import DenseCacheEntry, DenseCacheMismatchError, dense_identity
from methods.evaluate import decode_label_png, run_eval
from methods.sweep import (
    SweepError,
    SweepRequest,
    _SharedReads,
    parse_sweep_items,
    plan_configurations,
    read_sweep_file,
    run_sweep,
)
from ovss_cli.main import cli
from tests.test_segment_eval import _one_line_error, make_dataset, make_store
from tests.test_trident import LONG, OPTS, SIZES, TINY_CLIP, TINY_SAM, TINY_VIT, WIN

SETTINGS = {"model": "fake-dense", "resize": "none", "size": "0"}
CLI_SETS = ["--set", "model=fake-dense", "--set", "resize=none", "--set", "size=0"]


@pytest.fixture()
def fake(tmp_path):
    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts)
    return tmp_path, store


def request(tmp_path, store, **kw) -> SweepRequest:
    base = dict(
        dataset="custom",
        data_root=str(tmp_path / "data"),
        split="val",
        store=str(store.path),
        settings=dict(SETTINGS),
        templates="single",
        text_random_init=True,
        device="cpu",
    )
    return SweepRequest(**{**base, **kw})


def same_as_separate(cfg, row) -> None:
    one = run_eval(cfg.request)
    got = row.result
    assert got.metrics == one.metrics, cfg.label
    assert got.images == one.images and got.skipped == one.skipped
    assert got.confusion == one.confusion and got.per_image == one.per_image
    assert got.gallery == one.gallery
    assert got.protocol == one.protocol


def test_scoring_sweep_rows_equal_separate_evals_and_share_the_dense_output(fake):
    tmp_path, store = fake
    req = request(tmp_path, store, sweep={"prob_thd": ["0.5", "0.9"], "logit_scale": ["10", "40"]})
    res = run_sweep(req)
    _, keys, cfgs = plan_configurations(req)
    assert keys == ["prob_thd", "logit_scale"] and len(res.rows) == 5  # the default added first
    assert res.rows[0].default and res.rows[0].values == {"prob_thd": 0.0, "logit_scale": 40.0}
    for cfg, row in zip(cfgs, res.rows, strict=True):
        same_as_separate(cfg, row)
        assert row.result.protocol["scoring"]["prob_thd"] == row.values["prob_thd"]
    mious = [r.result.metrics["mIoU"] for r in res.rows]
    assert len(set(mious)) > 1  # the sweep changes the result
    assert [r.best for r in res.rows].count(True) == 1
    assert res.rows[mious.index(max(mious))].best
    for r in res.rows:
        assert r.delta_miou == round(r.result.metrics["mIoU"] - mious[0], 2)
    # 3 images: each read once, one dense output each, 5 scorings each
    assert res.sharing["feature_reads"] == 3 and res.sharing["dense_computed"] == 3
    assert res.sharing["scorings"] == 15 and res.sharing["method_instances"] == 1


def test_a_grid_point_equal_to_the_default_is_marked_not_added(fake):
    tmp_path, store = fake
    res = run_sweep(request(tmp_path, store, sweep={"prob_thd": ["0.9", "0"]}))
    assert [r.values["prob_thd"] for r in res.rows] == [0.9, 0.0]
    assert [r.default for r in res.rows] == [False, True]
    assert res.rows[1].delta_miou == 0.0


def test_confusion_matrix_and_per_image_scores_agree_with_the_metric(fake):
    tmp_path, store = fake
    res = run_sweep(request(tmp_path, store, sweep={"prob_thd": ["0.9"]})).rows[1].result
    cm = np.asarray(res.confusion)
    pc = res.metrics["per_class"]
    np.testing.assert_array_equal(np.diagonal(cm), pc["area_intersect"])
    np.testing.assert_array_equal(cm.sum(axis=1), pc["area_label"])
    np.testing.assert_array_equal(cm.sum(axis=0), pc["area_pred"])
    assert [p["image_id"] for p in res.per_image] == ["im0", "im1", "im2"]
    ranks = [g["rank"] for g in res.gallery]
    assert ranks == ["best"] * 3  # 3 images, 4 kept at each end: each listed once
    scores = [g["mIoU"] for g in res.gallery]
    assert scores == sorted(scores, reverse=True)
    first = res.gallery[0]
    assert decode_label_png(first["prediction_png"]).shape == (
        8 * (3 + int(first["image_id"][-1])),
        32,
    )


def test_templates_are_embedded_once_per_template_set(fake):
    tmp_path, store = fake
    tiny_text = {"embed_dim": 3, "text_cfg": {"layers": 1, "width": 32, "heads": 2}}
    req = request(
        tmp_path,
        store,
        sweep={"templates": ["clip7", "maskclip5"], "prob_thd": ["0.5", "0.9"]},
        text_arch_overrides=tiny_text,
        templates="clip7",
    )
    res = run_sweep(req)
    assert res.sharing["text_sets"] == 2 and res.sharing["dense_computed"] == 6
    _, _, cfgs = plan_configurations(req)
    for cfg, row in zip(cfgs, res.rows, strict=True):
        same_as_separate(cfg, row)
    assert {r.result.protocol["templates"] for r in res.rows} == {"clip7", "maskclip5"}


def test_shared_reads_read_once_and_give_each_reader_its_own_arrays(fake):
    _, store = fake
    fs = store.feature_set("fake-dense@orig")
    memo = _SharedReads()
    a = memo.read(fs, 1, None)
    a.tensors["patch"][:] = 7  # a reader working in place
    b = memo.read(fs, 1, None)
    assert memo.reads == 1
    np.testing.assert_array_equal(b.tensors["patch"], fs.read(1).tensors["patch"])


# -- Trident: a method key (cos_fac) shares the window outputs and the splice -----------------


@pytest.fixture(scope="module")
def trident_store(tmp_path_factory):
    from PIL import Image

    from tests.test_trident import CLASSES

    tmp = tmp_path_factory.mktemp("sweep_trident")
    data = tmp / "data"
    for sub in ("images/val", "annotations/val"):
        (data / sub).mkdir(parents=True)
    (data / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for i, (h, w) in enumerate(SIZES):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            data / "images" / "val" / f"im{i}.png"
        )
        yy, xx = np.mgrid[0:h, 0:w]
        Image.fromarray((xx * 3 // w).astype(np.uint8)).save(
            data / "annotations" / "val" / f"im{i}.png"
        )
    recs = list_folder_images(data / "images" / "val")
    common = dict(store=str(tmp / "s.zarr"), random_init=True, dtype="float32", block_mb=1)
    for model, proto, arch in (
        ("clip-b16", WIN, TINY_CLIP),
        ("dino-b16", WIN, TINY_VIT),
        ("sam-b", LONG, TINY_SAM),
    ):
        extract(recs, ExtractConfig(models=[model], protocol=proto, arch_overrides=arch, **common))
    return tmp


def trident_request(tmp, **kw) -> SweepRequest:
    from tests.test_trident import TINY_CLIP as T

    return SweepRequest(
        dataset="custom",
        data_root=str(tmp / "data"),
        split="val",
        store=str(tmp / "s.zarr"),
        method="trident",
        settings={k: str(v) for k, v in OPTS.items()},
        templates="single",
        text_random_init=True,
        text_arch_overrides=T,
        device="cpu",
        **kw,
    )


def test_trident_cos_fac_sweep_equals_separate_evals_and_shares_the_early_stage(trident_store):
    req = trident_request(trident_store, sweep={"cos_fac": ["0.5", "1.2", "3.0"]})
    res = run_sweep(req)
    _, _, cfgs = plan_configurations(req)
    assert [r.values["cos_fac"] for r in res.rows] == [0.5, 1.2, 3.0]
    assert res.rows[1].default
    for cfg, row in zip(cfgs, res.rows, strict=True):
        same_as_separate(cfg, row)
        assert row.result.protocol["config"]["cos_fac"] == row.values["cos_fac"]
    n = len(SIZES)
    assert res.sharing["method_instances"] == 3
    assert res.sharing["early_stages"] == n  # once per image, not once per configuration
    assert res.sharing["dense_computed"] == 3 * n
    # each tensor read once per image: clip pre_last, dino patch, sam q/k/v/attn_log_mass
    assert res.sharing["feature_reads"] == 6 * n


# -- the derived dense cache ------------------------------------------------------------------


def test_dense_cache_is_reused_and_gives_the_same_rows(fake, tmp_path):
    _, store = fake
    cache = tmp_path / "dense"
    sweep = {"prob_thd": ["0.5", "0.9"]}
    first = run_sweep(request(tmp_path, store, sweep=sweep, cache_dense=str(cache)))
    assert first.sharing["dense_computed"] == 3 and first.cache[0]["writes"] == 3
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    assert entry.name.startswith("prototype-") and (entry / "manifest.json").exists()
    second = run_sweep(request(tmp_path, store, sweep=sweep, cache_dense=str(cache)))
    assert second.sharing["dense_computed"] == 0 and second.sharing["dense_cached"] == 3
    assert second.sharing["feature_reads"] == 0
    for a, b in zip(first.rows, second.rows, strict=True):
        assert a.result.metrics == b.result.metrics and a.result.confusion == b.result.confusion
    # another method config: another entry beside the first, not the first one reused
    other = request(tmp_path, store, cache_dense=str(cache))
    other.settings["backend"] = "torch"
    run_sweep(other)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_dense_cache_in_the_store(fake, tmp_path):
    _, store = fake
    res = run_sweep(request(tmp_path, store, cache_dense="store"))
    assert res.cache[0]["path"].startswith(str(Path(store.path, "derived", "dense")))
    again = run_sweep(request(tmp_path, store, cache_dense="store"))
    assert again.sharing["dense_cached"] == 3
    from featurestore.store import FeatureStore

    reopened = FeatureStore.open(store.path)  # the derived folder is not a feature set
    assert reopened.feature_sets() == ["fake-dense@orig"] and not reopened.unfinished_feature_sets()


def test_dense_cache_refused_when_the_feature_set_differs(tmp_path):
    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts)
    cache = tmp_path / "dense"
    run_sweep(request(tmp_path, store, cache_dense=str(cache)))
    shutil.rmtree(store.path)  # re-extracted with other weights: other features and provenance
    store = make_store(tmp_path, gts, flip=(1, 2), weights="random-init:1")
    with pytest.raises(DenseCacheMismatchError, match="feature_sets.dense") as e:
        run_sweep(request(tmp_path, store, cache_dense=str(cache)))
    assert e.value.differences == ("feature_sets.dense",)
    res = CliRunner().invoke(
        cli,
        ["eval", "--dataset", "custom", "--data-root", str(tmp_path / "data"), "--split", "val"]
        + ["--store", str(store.path), "--templates", "single", "--text-random-init", "-q"]
        + [*CLI_SETS, "--cache-dense", str(cache)],
    )
    _one_line_error(res, "derived dense cache", "feature_sets.dense", "not used")


def test_dense_cache_entry_refused_when_the_method_config_differs(fake, tmp_path):
    _, store = fake
    cache = tmp_path / "dense"
    run_sweep(request(tmp_path, store, cache_dense=str(cache)))
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    other = request(tmp_path, store, cache_dense=str(entry))  # the entry folder itself
    other.settings["backend"] = "torch"
    with pytest.raises(DenseCacheMismatchError, match="config.backend"):
        run_sweep(other)
    identity = json.loads((entry / "manifest.json").read_text())["identity"]
    changed = {**identity, "vocabulary": {**identity["vocabulary"], "templates": "x"}}
    with pytest.raises(DenseCacheMismatchError, match="vocabulary"):
        DenseCacheEntry.open(entry, changed)
    assert DenseCacheEntry.open(entry, identity).cached_images() == 3


def test_dense_identity_names_the_feature_set_provenance(fake):
    from methods.base import build_config, get_method
    from tests.test_segment_eval import vocab

    _, store = fake
    cls = get_method("prototype")
    seg = cls(store, build_config(cls, None, SETTINGS))
    ident = dense_identity(seg, vocab())
    assert ident["feature_sets"]["dense"]["key"] == "fake-dense@orig"
    assert ident["config"]["model"] == "fake-dense" and len(ident["images"]) == 64


# -- parsing and bad inputs -------------------------------------------------------------------


def test_parse_sweep_items_and_files(tmp_path):
    assert parse_sweep_items(["prob-thd=0.1, 0.2", "cos_fac=1"]) == {
        "prob_thd": ["0.1", "0.2"],
        "cos_fac": ["1"],
    }
    for bad in (["prob_thd"], ["prob_thd="], ["=1"], ["a=1,,2"], ["a=1", "a=2"]):
        with pytest.raises(SweepError):
            parse_sweep_items(bad)
    (tmp_path / "s.json").write_text('{"prob_thd": [0.1, 0.2], "logit_scale": 40}')
    (tmp_path / "s.yaml").write_text("prob_thd: [0.1, 0.2]\nlogit_scale: 40\n")
    want = {"prob_thd": [0.1, 0.2], "logit_scale": [40]}
    assert read_sweep_file(tmp_path / "s.json") == want == read_sweep_file(tmp_path / "s.yaml")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SweepError, match="mapping"):
        read_sweep_file(tmp_path / "bad.json")


def _eval_cli(tmp_path, store, *extra):
    return CliRunner().invoke(
        cli,
        ["eval", "--dataset", "custom", "--data-root", str(tmp_path / "data"), "--split", "val"]
        + ["--store", str(store.path), "--templates", "single", "--text-random-init", "-q"]
        + [*CLI_SETS, *extra],
    )


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--sweep", "nope=1,2"], ["unknown sweep key nope", "prob_thd", "size"]),
        (["--sweep", "prob_thd=abc"], ["prob_thd", "a number", "'abc'"]),
        (["--sweep", "size=1.5"], ["size", "an integer", "'1.5'"]),
        (["--sweep", "area_thd=x"], ["area_thd", "'x'"]),
        (["--sweep", "templates=nope"], ["nope"]),
        (["--sweep", "family=other"], ["family", "sclip"]),
        (["--sweep", "prob_thd"], ["KEY=v1,v2"]),
        (["--sweep-file", "{tmp}/missing.yaml"], ["missing.yaml"]),
        (["--method", "prototype", "--method", "nope"], ["not a known method"]),
    ],
)
def test_bad_sweep_inputs_are_one_line_errors(fake, extra, words):
    tmp_path, store = fake
    extra = [x.format(tmp=tmp_path) for x in extra]
    _one_line_error(_eval_cli(tmp_path, store, *extra), *words)


def test_cli_sweep_table_json_csv(fake):
    tmp_path, store = fake
    (tmp_path / "sw.yaml").write_text("prob_thd: [0.9]\n")
    res = _eval_cli(
        tmp_path,
        store,
        "--sweep-file",
        str(tmp_path / "sw.yaml"),
        "--sweep",
        "logit_scale=10,40",
        "--csv",
        str(tmp_path / "rows.csv"),
        "--out-json",
        str(tmp_path / "sweep.json"),
    )
    assert res.exit_code == 0, res.output
    assert "prob_thd" in res.output and "logit_scale" in res.output and "Δ mIoU" in res.output
    assert "best" in res.output and "default" in res.output
    d = json.loads((tmp_path / "sweep.json").read_text())
    assert d["kind"] == "sweep" and d["keys"] == ["prob_thd", "logit_scale"]
    assert len(d["rows"]) == 3 and d["rows"][0]["default"]
    rows = list(csv.DictReader(open(tmp_path / "rows.csv")))
    assert [r["logit_scale"] for r in rows] == ["40.0", "10.0", "40.0"]
    for r, j in zip(rows, d["rows"], strict=True):
        assert float(r["mIoU"]) == j["result"]["metrics"]["mIoU"]
        assert json.loads(r["protocol"]) == j["result"]["protocol"]
    res = _eval_cli(tmp_path, store, "--sweep", "prob_thd=0.9", "--json")
    assert json.loads(res.output)["rows"][1]["values"] == {"prob_thd": 0.9}


def test_cache_dense_alone_prints_a_plain_evaluation(fake, tmp_path):
    _, store = fake
    plain = json.loads(_eval_cli(tmp_path, store, "--json").output)
    res = _eval_cli(tmp_path, store, "--json", "--cache-dense", str(tmp_path / "c"))
    assert res.exit_code == 0, res.output
    cached = json.loads(res.output)
    assert cached["kind"] == "eval" and cached["metrics"] == plain["metrics"]
