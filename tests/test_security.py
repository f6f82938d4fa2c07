"""Untrusted files and text: no code runs from a checkpoint or weights file, every
``torch.load`` in the tree is ``weights_only=True``, user text is never rich markup, and stored
or printed store paths carry no credentials."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ovss_cli import render
from ovss_cli.main import cli
from tests.test_segment_eval import make_dataset, make_store

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("featurestore", "methods", "ovss_cli", "benchmarks")
TRUSTED_LOAD = os.path.join("methods", "train.py")


class _Payload:
    """Unpickling this runs ``open(path, "w")``: the file appears only if code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture()
def evil(tmp_path):
    marker = tmp_path / "code-ran"
    ck = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "extra": _Payload(marker)}, ck)
    return ck, marker


def test_a_pickled_payload_is_refused_everywhere_and_never_runs(tmp_path, evil):
    from featurestore.errors import OvssError
    from featurestore.weights import load_state_dict
    from methods.train import CheckpointError, read_checkpoint

    ck, marker = evil
    with pytest.raises(CheckpointError, match="pickled"):
        read_checkpoint(ck)
    with pytest.raises(OvssError):
        load_state_dict(ck)
    store = make_store(tmp_path, make_dataset(tmp_path / "data"))
    for method in ("aligned", "pixelclip", "simzss"):
        res = CliRunner().invoke(
            cli,
            ["segment", "--store", str(store.path), "--classes", "a,b", "--method", method]
            + ["--checkpoint", str(ck), "--text-random-init", "-q", "--out", str(tmp_path / "o")],
        )
        assert res.exit_code == 1, (method, res.output)
        assert "pickled" in res.output and "Traceback" not in res.output, res.output
    assert not marker.exists()


def test_trust_checkpoint_is_the_only_way_past_and_reaches_a_full_load(tmp_path, evil):
    """The payload here only creates an empty file in tmp_path: it shows code ran."""
    from methods.train import CheckpointError, read_checkpoint, resume_state, trusted_checkpoints

    ck, marker = evil
    with trusted_checkpoints(tmp_path / "another.pt"):  # trust is per file
        with pytest.raises(CheckpointError, match="pickled"):
            read_checkpoint(ck)
    with pytest.raises(CheckpointError, match="pickled"):
        resume_state(ck, {})
    assert not marker.exists()
    with trusted_checkpoints(ck):
        assert read_checkpoint(ck)["model"]["w"].tolist() == [1.0]
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="pickled"):  # the trust ended with the block
        read_checkpoint(ck)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="trained with other"):
        resume_state(ck, {"trainer": "x"}, trust=True)
    assert marker.exists()


def test_trust_checkpoint_flag_of_segment_and_eval(tmp_path, evil):
    ck, marker = evil
    data = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, data)
    base = ["--method", "aligned", "--checkpoint", str(ck), "--text-random-init", "-q"]
    seg = ["segment", "--store", str(store.path), "--classes", "a,b", "--out", str(tmp_path / "o")]
    ev = ["eval", "--store", str(store.path), "--dataset", "custom"]
    ev += ["--data-root", str(tmp_path / "data")]
    for cmd in (seg, ev):
        res = CliRunner().invoke(cli, cmd + base)
        assert res.exit_code == 1 and "--trust-checkpoint" in res.output, res.output
        assert not marker.exists()
        res = CliRunner().invoke(cli, cmd + base + ["--trust-checkpoint"])
        assert marker.exists(), res.output  # loaded with weights_only=False
        assert "pickled" not in res.output and "Traceback" not in res.output, res.output
        marker.unlink()


def test_trust_checkpoint_flag_of_align_resume(tmp_path, evil):
    from tests.test_fmbseg import _toy

    ck, marker = evil
    store, root, _ = _toy(tmp_path, n=2)
    out = tmp_path / "ck"
    out.mkdir()
    (out / "last.pt").write_bytes(ck.read_bytes())
    args = [
        "align", "--store", str(store.path), "--features", store.feature_sets()[0],
        "--gt-dataset", "custom", "--data-root", str(root), "--split", "train",
        "--arch", "linear", "--epochs", "1", "--text-random-init",
        "--device", "cpu", "--out", str(out), "-q",
    ]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "pickled" in res.output, res.output
    assert "--trust-checkpoint" in res.output and not marker.exists()
    res = CliRunner().invoke(cli, [*args, "--trust-checkpoint"])
    assert marker.exists(), res.output
    assert res.exit_code == 1 and "trained with other" in res.output, res.output


def _calls(tree: ast.AST, dotted: str):
    mod, name = dotted.rsplit(".", 1)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr == name and isinstance(f.value, ast.Name) and f.value.id == mod:
                yield node


def test_every_torch_load_in_the_tree_is_weights_only():
    """A static check of the source: ``torch.load(..., weights_only=True)`` literally, no
    ``pickle.load(s)``, no ``np.load(allow_pickle=True)``, ``torch.jit.load`` only for
    OpenAI's TorchScript CLIP releases (featurestore/backbones/clip.py). One exception:
    ``read_checkpoint``'s trusted branch (``--trust-checkpoint``) in methods/train.py."""
    bad = []
    trusted_loads = 0
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            where = path.relative_to(ROOT)
            for call in _calls(tree, "torch.load"):
                kw = {k.arg: k.value for k in call.keywords}
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    if str(where) == TRUSTED_LOAD and trusted_loads == 0:
                        trusted_loads += 1  # read_checkpoint's --trust-checkpoint branch
                        continue
                    bad.append(f"{where}:{call.lineno} torch.load without weights_only=True")
            for name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                bad += [f"{where}:{c.lineno} {name}" for c in _calls(tree, name)]
            for call in _calls(tree, "np.load"):
                for k in call.keywords:
                    if k.arg == "allow_pickle" and not (
                        isinstance(k.value, ast.Constant) and k.value.value is False
                    ):
                        bad.append(f"{where}:{call.lineno} np.load(allow_pickle=...)")
            jit = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "jit"]
            if jit and str(where) != os.path.join("featurestore", "backbones", "clip.py"):
                bad.append(f"{where}:{jit[0].lineno} torch.jit outside the CLIP TorchScript loader")
    assert not bad, "\n".join(bad)


def _dataset_with_names(root: Path, names: list[str]) -> None:
    for sub in ("images/val", "annotations/val"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    gt = np.zeros((8, 12), dtype=np.uint8)
    gt[:, 6:] = 1
    gt[:, 9:] = 2
    Image.fromarray(np.zeros((8, 12, 3), dtype=np.uint8)).save(root / "images/val/a.png")
    Image.fromarray(gt).save(root / "annotations/val/a.png")


MARKUP = ["[bold]sky[/bold]", "grass [ours: 2]", "<img src=x onerror=alert(1)>"]


def test_class_names_with_markup_print_literally_in_eval_tables(tmp_path):
    root = tmp_path / "data"
    _dataset_with_names(root, MARKUP)
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.open(root / "annotations/val/a.png").save(pred / "a.png")
    res = CliRunner().invoke(
        cli,
        ["eval", "--dataset", "custom", "--data-root", str(root), "--predictions", str(pred)],
        terminal_width=200,
    )
    assert res.exit_code == 0, res.output
    for name in MARKUP:
        assert name in res.output, res.output


def test_rich_tables_and_lines_keep_user_text(capsys):
    t = render.Table(title="classes [red]x[/red]")
    t.add_column("name")
    for name in MARKUP:
        t.add_row(name)
    render.out.print(t)
    render.store_info(
        {
            "store": "/data/[blink]store[/blink].zarr",
            "images": 1,
            "sources": ["folder [x]"],
            "disk_bytes": 10,
            "feature_sets": [],
            "label_sets": ["[bold]pseudo[/bold]"],
        },
        False,
    )
    out = capsys.readouterr().out
    for text in (*MARKUP, "classes [red]x[/red]", "[blink]store[/blink]", "folder [x]"):
        assert text in out, out
    assert "[bold]pseudo[/bold]" in out


def test_store_urls_with_credentials_never_reach_the_output(tmp_path, monkeypatch):
    """A store named by a URL with credentials: the JSON on stdout and the error lines carry
    ``***`` instead of the key and the secret; the summary a run records is redacted."""
    from featurestore.names import redact_url

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    assert redact_url("s3://AKIAEXAMPLE:wJalrXUtnFEMI@b/s.zarr") == "s3://***@b/s.zarr"
    url = f"file://AKIAEXAMPLE:wJalrXUtnFEMI@localhost{tmp_path}/none.zarr"  # fails fast
    for args in (
        ["store", "info", url, "--json"],
        ["segment", "--store", url, "--classes", "a,b", "--out", str(tmp_path / "o")],
        ["eval", "--dataset", "custom", "--data-root", str(tmp_path), "--store", url],
    ):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code != 0
        assert "wJalrXUtnFEMI" not in res.output and "AKIAEXAMPLE" not in res.output, res.output
