"""``ovss captions inspect`` and the SimZSS workflow it serves, through click's CliRunner:
extract (tiny random-init DINOv2) -> align --method simzss (tiny tower) -> segment / eval
--method simzss --checkpoint on a tiny collage dataset; bad inputs as one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from featurestore.demo_data import build_collage_dataset
from methods.simzss_demo import collage_captions
from ovss_cli.main import cli

TINY = ["--random-init", "--arch-override", "depth=2", "--arch-override", "embed_dim=64",
        "--arch-override", "num_heads=2"]  # fmt: skip
TOWER = ["--text-width", "16", "--text-layers", "1", "--text-heads", "2", "--context-length",
         "24", "--epochs", "2", "--batch-size", "8", "--lr", "0.5", "--global-token",
         "patch_mean", "--device", "cpu", "-q"]  # fmt: skip


def _ok(res):
    assert res.exit_code == 0, res.output
    return res


def _one_line_error(res, *needles):
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("simzss_cli")
    ds = build_collage_dataset(tmp / "data", seed=0, n_train=3, n_val=2)
    store = str(tmp / "s.zarr")
    r = CliRunner()
    # one store holds one image list: the train collages, trained on and then scored (the
    # pipeline, not generalisation, is under test here)
    _ok(r.invoke(cli, ["extract", "--for", "simzss", "--dataset", "custom", "--data-root",
                       str(ds.root), "--split", "train", "-s", store, "-q", *TINY]))  # fmt: skip
    from featurestore.store import FeatureStore

    ids = set(FeatureStore.open(store).image_ids)
    rows = [{**r, "image": r["image"].split("/", 1)[1]} for r in collage_captions(ds)]
    assert {r["image"] for r in rows} == ids and len(rows) == 15
    caps = tmp / "caps.jsonl"
    caps.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    concepts = tmp / "concepts.txt"
    concepts.write_text("\n".join(c.replace("_", " ") for c in ds.class_names) + "\n")
    return tmp, ds, store, caps, concepts


def test_extract_align_segment_eval(workflow):
    tmp, ds, store, caps, concepts = workflow
    r = CliRunner()
    res = _ok(r.invoke(cli, ["align", "--method", "simzss", "-s", store, "--captions", str(caps),
                             "--concepts", str(concepts), "--out", str(tmp / "tower"), "--json",
                             *TOWER]))  # fmt: skip
    out = json.loads(res.output)
    ckpt = out["checkpoint"]
    assert ckpt.endswith("last.pt") and out["pairs"] == 15
    assert len(out["history"]) == 2
    assert out["captions_without_concept"] == 0
    common = ["--method", "simzss", "--checkpoint", ckpt, "-s", store, "--dataset", "custom",
              "--data-root", str(ds.root), "--device", "cpu", "-q"]  # fmt: skip
    _ok(r.invoke(cli, ["segment", *common, "-o", str(tmp / "seg"), "--json"]))
    pngs = sorted(p.name for p in (tmp / "seg").glob("*.png") if "overlay" not in p.name)
    assert len(pngs) == 3, pngs
    res = _ok(r.invoke(cli, ["eval", *common, "--split", "train", "--json"]))
    ev = json.loads(res.output)
    assert ev["images"] == 3 and 0 <= ev["metrics"]["mIoU"] <= 100, ev


def test_captions_inspect(workflow):
    tmp, ds, store, caps, concepts = workflow
    res = _ok(CliRunner().invoke(cli, ["captions", "inspect", "--captions", str(caps), "--store",
                                       store, "--concepts", str(concepts), "--json", "-q"]))  # fmt: skip
    d = json.loads(res.output)
    assert d["summary"]["captions"] == 15 and d["summary"]["captions_without_concept"] == 0
    first = d["captions"][0]
    assert len(first["concepts"]) >= 2 and all(c["tokens"] for c in first["concepts"])
    assert sum(d["frequencies"].values()) >= 30
    res = _ok(CliRunner().invoke(cli, ["captions", "inspect", "--captions", str(caps), "-q"]))
    assert "concept frequencies" in res.output and "summary" in res.output


def test_bad_inputs_are_one_line_errors(workflow, tmp_path):
    _, _, store, caps, concepts = workflow
    r = CliRunner()
    align = ["align", "--method", "simzss", "-s", store, "--out", str(tmp_path / "o"), *TOWER]
    _one_line_error(r.invoke(cli, [*align]), "--captions")
    _one_line_error(r.invoke(cli, [*align, "--captions", str(tmp_path / "none.json")]),
                    "no caption file")  # fmt: skip
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_line_error(r.invoke(cli, [*align, "--captions", str(bad)]), "bad.json")
    _one_line_error(r.invoke(cli, ["captions", "inspect", "--captions", str(bad), "-q"]),
                    "bad.json")  # fmt: skip
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    _one_line_error(r.invoke(cli, [*align, "--captions", str(caps), "--concepts", str(empty)]),
                    "names no concept")  # fmt: skip
    # a store without the training set: the message renders the extract command
    line = _one_line_error(r.invoke(cli, [*align, "--captions", str(caps), "--train-size", "112"]),
                           "ovss extract")  # fmt: skip
    assert "simzss" in line
