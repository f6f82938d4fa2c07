"""``ovss eval --method A --method B``: one pass over one store, every method's row equal to
its separate evaluation, per-class IoU side by side, a paper-style row, reference checks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from featurestore.extract import ExtractConfig, extract
from featurestore.images import list_folder_images
from featurestore.protocol import Protocol
from methods.sweep import SweepRequest, _scoped_settings, plan_configurations, run_sweep
from ovss_cli.main import cli
from tests.test_segment_eval import _one_line_error, make_dataset
from tests.test_trident import TINY_CLIP, tiny_text_args

METHODS = ("prototype", "maskclip", "clearclip")
SETS = ["--set", "size=64", "--set", "crop=0", "--set", "stride=0"]


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    """A `custom` dataset and a store of a tiny random-init CLIP-B/16 at short side 64."""
    tmp = tmp_path_factory.mktemp("compare")
    make_dataset(tmp / "data")
    recs = list_folder_images(tmp / "data" / "images" / "val")
    extract(
        recs,
        ExtractConfig(
            models=["clip-b16"],
            protocol=Protocol("short", 64),
            arch_overrides=TINY_CLIP,
            random_init=True,
            store=str(tmp / "s.zarr"),
            dtype="float32",
        ),
    )
    return tmp


def _eval(tmp, *extra):
    return CliRunner().invoke(
        cli,
        ["eval", "--dataset", "custom", "--data-root", str(tmp / "data"), "--split", "val"]
        + ["--store", str(tmp / "s.zarr"), "-q", *SETS, *tiny_text_args(), *extra],
    )


def test_comparison_rows_equal_separate_evaluations(clip_store):
    res = _eval(clip_store, *[x for m in METHODS for x in ("--method", m)], "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["kind"] == "compare" and d["keys"] == ["method"]
    assert [r["label"] for r in d["rows"]] == [f"method={m}" for m in METHODS]
    assert d["rows"][0]["default"] and sum(r["best"] for r in d["rows"]) == 1
    assert d["sharing"]["method_instances"] == 3 and d["sharing"]["text_sets"] == 1
    # one set of 4 tensors, 3 images: each tensor read once per image for the 3 methods
    assert d["sharing"]["feature_reads"] == 3 * 4
    for m, row in zip(METHODS, d["rows"], strict=True):
        one = _eval(clip_store, "--method", m, "--json")
        assert one.exit_code == 0, one.output
        alone = json.loads(one.output)
        got = row["result"]
        assert got["protocol"]["method"] == m
        for k in ("metrics", "confusion", "per_image", "skipped", "protocol", "gallery"):
            assert got[k] == alone[k], (m, k)
    # prototype on CLIP dense tokens is MaskCLIP's value path: equal; ClearCLIP differs
    assert len({json.dumps(r["result"]["metrics"]) for r in d["rows"]}) == 2


def test_comparison_table_side_by_side_and_reference(clip_store):
    res = _eval(clip_store, "--method", "prototype", "--method", "maskclip", "--check-reference")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "IoU per class, side by side" in out
    for name in ("sky", "grass", "brick", "method=prototype", "method=maskclip"):
        assert name in out
    assert "custom mIoU: method=prototype" in out  # the paper-style row
    assert out.count("reference (method=") == 2
    d = json.loads(
        _eval(clip_store, "--method", "prototype", "--method", "maskclip", "--json").output
    )
    lines = [x for x in out.splitlines() if x.startswith("│ sky")]
    ious = [100 * r["result"]["metrics"]["per_class"]["iou"][0] for r in d["rows"]]
    assert [f"{v:.2f}" for v in ious] == lines[0].replace("│", " ").split()[1:]


def test_settings_scoped_to_one_method(clip_store):
    assert _scoped_settings(
        {"size": "64", "maskclip:variant": "x", "pnp-ovss:k": 1}, "maskclip"
    ) == {
        "size": "64",
        "variant": "x",
    }
    assert _scoped_settings({"pnp_ovss:k": 1}, "pnp-ovss") == {"k": 1}
    req = SweepRequest(
        dataset="custom",
        data_root=str(clip_store / "data"),
        store=str(clip_store / "s.zarr"),
        methods=("prototype", "clearclip"),
        settings={"size": "64", "crop": "0", "stride": "0", "clearclip:pamr": "on"},
    )
    _, _, cfgs = plan_configurations(req)
    assert [getattr(c.setup.config, "pamr", None) for c in cfgs] == [None, True]


def test_a_method_key_must_exist_in_every_method_compared(clip_store):
    line = _one_line_error(
        _eval(
            clip_store, "--method", "prototype", "--method", "clearclip", "--sweep", "pamr=on,off"
        ),
        "pamr",
        "clearclip",
        "not of prototype",
    )
    assert "Traceback" not in line


def test_comparison_with_a_shared_scoring_sweep(clip_store):
    req = SweepRequest(
        dataset="custom",
        data_root=str(clip_store / "data"),
        split="val",
        store=str(clip_store / "s.zarr"),
        methods=("prototype", "maskclip"),
        settings={"size": "64", "crop": "0", "stride": "0"},
        sweep={"prob_thd": ["0.5"]},
        templates="single",
        text_random_init=True,
        text_arch_overrides=TINY_CLIP,
        device="cpu",
    )
    res = run_sweep(req)
    assert res.kind == "sweep" and res.keys == ["method", "prob_thd"]
    labels = [r.label for r in res.rows]
    assert labels[0] == "method=prototype prob_thd=0.0" and len(labels) == 3
    assert res.sharing["dense_computed"] == 2 * 3  # 2 methods x 3 images, whatever prob_thd
