"""featurestore.names: the one rule for user-given store names (library and CLI), and the
redaction of credentials."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from featurestore.errors import OvssError
from featurestore.labelsets import LabelSet, create_label_set, list_label_sets
from featurestore.names import (
    MAX_NAME_BYTES,
    InvalidNameError,
    check_name,
    is_valid_name,
    redact,
    redact_url,
)
from featurestore.store import FeatureStore
from ovss_cli.main import cli
from tests.test_segment_eval import make_dataset, make_store

BAD = {
    "": "empty",
    ".": "'..'",
    "..": "'..'",
    "../../x": "separator",
    "/abs": "separator",
    "a/b": "separator",
    "a\\b": "separator",
    "C:\\x": "separator",
    ".hidden": "starts with '.'",
    "a\nb": "U+000A",
    "a\x00b": "U+0000",
    "tab\there": "U+0009",
    "bidi\u202eevil": "U+202E",
    " padded": "whitespace",
    "x" * (MAX_NAME_BYTES + 1): "longer",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_names_are_refused_with_the_reason(name):
    with pytest.raises(InvalidNameError) as e:
        check_name(name, "label set")
    assert BAD[name] in str(e.value) and "\n" not in str(e.value)
    assert e.value.name == name and e.value.what == "label set"
    assert isinstance(e.value, OvssError) and not is_valid_name(name)


@pytest.mark.parametrize(
    "name", ["pseudo", "kmeans16-dinov2-s14@short448", "fmbseg stage1", "étiquettes", "a..b"]
)
def test_good_names_pass_unchanged(name):
    assert check_name(name) == name and is_valid_name(name)


def test_library_refuses_before_writing(tmp_path):
    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts)
    store = FeatureStore.open(store.path, mode="a")
    before = sorted(p.name for p in tmp_path.iterdir())
    for name in ("../../escape", "/abs", "a/b", ""):
        with pytest.raises(InvalidNameError):
            create_label_set(store, name, {"class_names": [["a"]]})
        with pytest.raises(InvalidNameError):
            LabelSet(store, name)
        with pytest.raises(InvalidNameError):
            store.feature_set(name)
    assert list_label_sets(store) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "escape").exists()
    ok = create_label_set(store, "fine", {"class_names": [["a"]]})
    ok.write(0, np.zeros(ok.store.root["images/size"][0], dtype=np.uint8))
    assert list_label_sets(store) == ["fine"]


SETS = ["--set", "model=fake-dense", "--set", "resize=none", "--set", "size=0"]


def test_cli_write_labels_bad_name_is_a_usage_error(tmp_path):
    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts)
    args = ["segment", "--store", str(store.path), "--classes", "sky,grass,brick"]
    args += ["--templates", "single", "-q", *SETS, "--text-random-init"]
    for name in ("../../x", "/abs", "a/b", ""):
        res = CliRunner().invoke(cli, [*args, "--write-labels", name])
        assert res.exit_code == 2, res.output
        assert "--write-labels" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    assert list_label_sets(FeatureStore.open(store.path)) == []
    res = CliRunner().invoke(cli, [*args, "--write-labels", "pseudo", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["label_set"] == "pseudo"


def test_cli_cluster_name_and_align_labels_use_the_same_rule():
    for cmd in (["cluster", "--store", "s.zarr", "--name"], ["align", "--labels"]):
        res = CliRunner().invoke(cli, [*cmd, "../up"])
        assert res.exit_code == 2, res.output
        assert "path separator" in res.output, res.output


def test_redact_credentials():
    assert redact_url("s3://AKIAX:s3cr3t@bucket/store.zarr") == "s3://***@bucket/store.zarr"
    assert redact_url("/data/store.zarr") == "/data/store.zarr"
    assert redact_url("gs://bucket/x.zarr") == "gs://bucket/x.zarr"
    url = "https://h/x.zarr?X-Amz-Signature=abc123&X-Amz-Credential=AKIA%2F1&page=2"
    out = redact_url(url)
    assert "abc123" not in out and "AKIA" not in out and "page=2" in out
    line = "AWS_SECRET_ACCESS_KEY=wJalr AWS_SESSION_TOKEN=FQoG password: hunter2 size=336"
    out = redact(line)
    for secret in ("wJalr", "FQoG", "hunter2"):
        assert secret not in out
    assert "size=336" in out and out.count("***") == 3


def test_cli_errors_never_print_credentials():
    res = CliRunner().invoke(cli, ["store", "info", "s3://AKIAX:s3cr3t@bucket/store.zarr"])
    assert res.exit_code != 0
    assert "s3cr3t" not in res.output and "AKIAX" not in res.output
    assert "bucket/store.zarr" in res.output
