"""The ``ovss data`` commands through click's CliRunner: help, exit codes, JSON schemas."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ovss_cli.data_cmd import data
from ovss_cli.main import cli


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _ade(root: Path, bad: bool = False) -> Path:
    """Two ADE images with labels; with ``bad``, one label has the wrong size."""
    base = root / "ADEChallengeData2016"
    for i in (1, 2):
        image_id = f"ADE_val_0000000{i}"
        _png(base / "images" / "validation" / f"{image_id}.jpg", np.zeros((3, 4, 3), np.uint8))
        shape = (2, 4) if bad and i == 2 else (3, 4)
        _png(base / "annotations" / "validation" / f"{image_id}.png", np.ones(shape, np.uint8))
    return base


def _coco(root: Path) -> Path:
    base = root / "coco_stuff164k"
    _png(base / "images" / "val2017" / "000000000139.jpg", np.zeros((2, 3, 3), np.uint8))
    raw = np.array([[0, 91, 255], [12, 181, 89]], dtype=np.uint8)
    _png(base / "annotations" / "val2017" / "000000000139.png", raw)
    return base


def _run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(cli, ["data", *args])


def test_data_group_is_registered() -> None:
    assert cli.commands["data"] is data
    assert set(data.commands) == {"list", "prepare", "verify"}


@pytest.mark.parametrize("command", ["list", "prepare", "verify"])
def test_help_documents_every_option(command: str) -> None:
    res = _run(command, "--help")
    assert res.exit_code == 0, res.output
    cmd = data.commands[command]
    assert cmd.help and cmd.help.strip()
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"{param.opts} of data {command} is undocumented"
            assert param.opts[0] in res.output


def test_list_table_and_json(tmp_path: Path) -> None:
    res = _run("list")
    assert res.exit_code == 0, res.output
    for name in ("ade20k", "voc21", "context59", "coco_object", "cityscapes", "custom"):
        assert name in res.output
    assert "2000" in res.output and "ADEChallengeData2016/" in res.output

    _ade(tmp_path)
    res = _run("list", "--data-root", str(tmp_path), "--json")
    assert res.exit_code == 0, res.output
    rows = {row["name"]: row for row in json.loads(res.output)}
    assert len(rows) == 9
    assert set(rows["ade20k"]) == {
        "name",
        "num_classes",
        "split",
        "expected_images",
        "label_rule",
        "layout_root",
        "label_suffix",
        "dataset_dir",
        "present",
    }
    assert rows["ade20k"]["present"] is True
    assert rows["ade20k"]["dataset_dir"] == str(tmp_path / "ADEChallengeData2016")
    assert rows["voc21"]["present"] is False and rows["voc21"]["expected_images"] == 1449
    assert rows["coco_stuff171"]["num_classes"] == 171

    res = _run("list", "--data-root", str(tmp_path))
    assert res.exit_code == 0 and "not found" in res.output


def test_prepare_coco_converts_then_skips(tmp_path: Path) -> None:
    base = _coco(tmp_path)
    args = ["prepare", "coco_stuff171", "--data-root", str(tmp_path), "--workers", "1", "-q"]
    res = _run(*args, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["action"] == "converted" and report["ok"] is True and report["ready"] is True
    assert (report["written"], report["skipped"], report["failures"]) == (1, 0, [])
    assert set(report) >= {"dataset", "splits", "steps", "out_dir", "notes", "unexpected_values"}
    out = np.asarray(
        Image.open(base / "annotations" / "val2017" / "000000000139_labelTrainIds.png")
    )
    assert out.tolist() == [[0, 80, 255], [11, 170, 79]]

    res = _run(*args)
    assert res.exit_code == 0, res.output
    assert "0 label files written, 1 already present" in res.output

    res = _run("prepare", "coco_object", "--data-root", str(tmp_path), "--json", "-q")
    assert res.exit_code == 0, res.output
    out = Image.open(base / "annotations" / "val2017" / "000000000139_instanceTrainIds.png")
    assert np.asarray(out).tolist() == [[1, 0, 0], [12, 0, 80]]


def test_prepare_failure_exits_1(tmp_path: Path) -> None:
    base = _coco(tmp_path)
    (base / "annotations" / "val2017" / "000000000285.png").write_bytes(b"junk")
    res = _run("prepare", "coco_stuff171", "--data-root", str(tmp_path), "-q")
    assert res.exit_code == 1
    assert "failed" in res.output and "000000000285" in res.output


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ade20k", "nothing to convert"),
        ("voc20", "VOCtrainval_11-May-2012.tar"),
        ("context60", "pascal_context.py"),
        ("cityscapes", "csCreateTrainIdLabelImgs"),
    ],
)
def test_prepare_prints_instructions(tmp_path: Path, name: str, expected: str) -> None:
    res = _run("prepare", name, "--data-root", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert expected in res.output and "action needed" in res.output
    res = _run("prepare", name, "--data-root", str(tmp_path), "--json")
    report = json.loads(res.output)
    assert report["action"] == "instructions" and report["ready"] is False
    assert any(expected in step for step in report["steps"])


def test_verify_ok_and_problems(tmp_path: Path) -> None:
    _ade(tmp_path)
    res = _run("verify", "ade", "--data-root", str(tmp_path), "-q")
    assert res.exit_code == 0, res.output
    assert "OK" in res.output and "warning" in res.output  # 2 of the standard 2000 images

    bad_root = tmp_path / "bad"
    _ade(bad_root, bad=True)
    res = _run("verify", "ade20k", "--data-root", str(bad_root), "-q")
    assert res.exit_code == 1
    assert "size_mismatch" in res.output and "1 problem(s)" in res.output

    res = _run("verify", "ade20k", "--data-root", str(bad_root), "--json", "-q")
    assert res.exit_code == 1
    report = json.loads(res.output)
    assert set(report) == {
        "dataset",
        "split",
        "dataset_dir",
        "num_classes",
        "reduce_zero_label",
        "images_listed",
        "images_checked",
        "expected_images",
        "labels_checked",
        "classes_present",
        "ignored_fraction",
        "warnings",
        "problems",
        "next_steps",
        "ok",
        "problem_counts",
    }
    assert report["ok"] is False and report["problem_counts"] == {"size_mismatch": 1}
    assert report["problems"][0]["image_id"] == "ADE_val_00000002"
    assert report["expected_images"] == 2000 and report["num_classes"] == 150

    res = _run("verify", "ade20k", "--data-root", str(bad_root), "--limit", "1", "--json", "-q")
    assert res.exit_code == 0 and json.loads(res.output)["images_checked"] == 1


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    res = _run("verify", "imagenet", "--data-root", str(tmp_path))
    assert res.exit_code == 1 and "not a known dataset" in res.output
    assert "Traceback" not in res.output

    res = _run("verify", "voc21", "--data-root", str(tmp_path / "nowhere"))
    assert res.exit_code == 1 and "download" in res.output
    assert len(res.output.strip().splitlines()) == 1

    res = _run("prepare", "coco_stuff171", "--data-root", str(tmp_path))
    assert res.exit_code == 1 and "stuffthingmaps_trainval2017.zip" in res.output

    res = _run("prepare", "ade20k", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.exit_code == 1 and "coco_object only" in res.output


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert _run("verify", "ade20k").exit_code == 2  # --data-root is required
    assert _run("verify", "ade20k", "--data-root", str(tmp_path), "--limit", "0").exit_code == 2
    assert _run("prepare", "ade20k", "--data-root", str(tmp_path), "--workers", "0").exit_code == 2
