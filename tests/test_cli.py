"""The CLI through click's CliRunner: documentation, exit codes, the main workflows."""

from __future__ import annotations

import json

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ovss_cli.main import cli

TINY_ARGS = [
    "--random-init",
    "--arch-override",
    "depth=2",
    "--arch-override",
    "embed_dim=64",
    "--arch-override",
    "num_heads=2",
]


def all_commands(group=cli, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, (*prefix, name))


@pytest.mark.parametrize(
    "path,cmd", list(all_commands()), ids=lambda x: " ".join(x) if isinstance(x, tuple) else ""
)
def test_every_command_and_option_documented(path, cmd):
    res = CliRunner().invoke(cli, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert cmd.help and cmd.help.strip(), f"{path} has no help"
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name != "help":
            assert p.help, f"option {p.opts} of {' '.join(path)} is undocumented"


def test_readme_mentions_every_command():
    readme = open("README.md").read()
    for path, _ in all_commands():
        assert f"ovss {' '.join(path)}" in readme, f"README lacks 'ovss {' '.join(path)}'"


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(
            root / f"a{i}.png"
        )
    return root


def test_extract_info_verify_export_ls(tmp_path, images):
    r = CliRunner()
    store = str(tmp_path / "s.zarr")
    args = [
        "extract",
        "-m",
        "dinov2-s14",
        "--images",
        str(images),
        "--store",
        store,
        "--size",
        "42",
        "-q",
        "--json",
        *TINY_ARGS,
    ]
    res = r.invoke(cli, args)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["models"][0]["images_extracted"] == 4
    res = r.invoke(cli, ["store", "info", store, "--json"])
    info = json.loads(res.output)
    assert info["images"] == 4 and info["feature_sets"][0]["key"] == "dinov2-s14@short42"
    assert info["feature_sets"][0]["weights"] == "random-init:0"
    assert r.invoke(cli, ["store", "info", store]).exit_code == 0
    res = r.invoke(cli, ["store", "ls", store])
    assert res.output.split() == ["dinov2-s14@short42"]
    assert r.invoke(cli, ["store", "ls", store, "--images"]).output.split() == [
        "a0",
        "a1",
        "a2",
        "a3",
    ]
    res = r.invoke(cli, ["store", "verify", store])
    assert res.exit_code == 0 and "OK" in res.output
    h5 = str(tmp_path / "x.h5")
    res = r.invoke(cli, ["store", "export", store, h5])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, ["store", "info", h5, "--json"])
    assert json.loads(res.output)["feature_sets"][0]["images_done"] == 4
    # dry run writes nothing
    res = r.invoke(
        cli,
        [
            "extract",
            "-m",
            "dinov2-s14",
            "--images",
            str(images),
            "--store",
            str(tmp_path / "d.zarr"),
            "--dry-run",
            "--json",
            *TINY_ARGS,
        ],
    )
    assert res.exit_code == 0 and json.loads(res.output)[0]["images"] == 4
    assert not (tmp_path / "d.zarr").exists()


def test_verify_exit_code_on_corruption(tmp_path, images):
    r = CliRunner()
    store = tmp_path / "s.zarr"
    r.invoke(
        cli,
        [
            "extract",
            "-m",
            "dinov2-s14",
            "--images",
            str(images),
            "--store",
            str(store),
            "--size",
            "42",
            "-q",
            *TINY_ARGS,
        ],
    )
    chunk = store / "features" / "dinov2-s14@short42" / "patch" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    res = r.invoke(cli, ["store", "verify", str(store)])
    assert res.exit_code == 1 and "partial or corrupt" in res.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["extract", "-m", "dinov2-s14", "--store", "x"], "exactly one of --images"),
        (
            ["extract", "-m", "nope", "--images", "{images}", "--store", "{tmp}/s"],
            "not a known model",
        ),
        (
            ["extract", "-m", "dinov2-s14", "--images", "{tmp}/missing", "--store", "{tmp}/s"],
            "missing",
        ),
        (
            [
                "extract",
                "-m",
                "dinov2-s14",
                "--images",
                "{images}",
                "--store",
                "{tmp}/s",
                "--shard",
                "3/2",
            ],
            "0 <= i < n",
        ),
        (
            [
                "extract",
                "-m",
                "dinov2-s14",
                "--images",
                "{images}",
                "--store",
                "{tmp}/s",
                "--crop",
                "10",
            ],
            "stride",
        ),
        (
            [
                "extract",
                "-m",
                "dinov2-s14",
                "--images",
                "{images}",
                "--store",
                "{tmp}/s",
                "--device",
                "cuda",
            ],
            "CUDA",
        ),
        (["store", "info", "{tmp}/nothing"], "no ovss store"),
        (
            ["extract", "-m", "dinov2-s14", "--images", "{images}", "--store", "{tmp}/s"],
            "--random-init",
        ),
    ],
)
def test_user_errors_are_one_line(tmp_path, images, args, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "weights").mkdir()
    monkeypatch.setenv("OVSS_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import torch

    if message == "CUDA" and torch.cuda.is_available():
        pytest.skip("--device cuda is not an error where CUDA is present")
    args = [a.format(tmp=tmp_path, images=images) for a in args]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    assert message.lower() in res.output.lower(), res.output


@pytest.mark.parametrize(
    "protocol_args,rule",
    [
        (["--resize", "halves"], "--resize halves"),
        (["--resize", "long", "--align", "16"], "--align"),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_sam_only_protocols_are_refused_for_other_models(
    tmp_path, images, protocol_args, rule, dry_run
):
    """``halves`` and ``long`` with ``--align`` are SAM's inputs: another model is refused with
    one line before it is built (no traceback, no store written)."""
    args = ["extract", "-m", "dinov2-s14", "--images", str(images), "--store"]
    args += [str(tmp_path / "s.zarr"), "--size", "42", "-q", *protocol_args, *TINY_ARGS]
    res = CliRunner().invoke(cli, args + (["--dry-run"] if dry_run else []))
    assert res.exit_code != 0
    assert isinstance(res.exception, SystemExit)  # a user error, not an uncaught exception
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert lines[0].startswith("Error: ") and rule in lines[0] and "dinov2-s14" in lines[0]
    assert "only SAM models" in lines[0]
    assert not (tmp_path / "s.zarr").exists()


def test_demo_small(tmp_path):
    res = CliRunner().invoke(
        cli,
        ["demo", "--out", str(tmp_path / "d"), "--n-train", "3", "--n-val", "2", "-q", "--json"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["store_info"]["feature_sets"][0]["images_done"] == 5
    assert out["weights"] == "random-init:0"


def test_doctor_and_models():
    r = CliRunner()
    res = r.invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 0 and "torch" in json.loads(res.output)
    from methods.scoring import kernel_status

    assert json.loads(res.output)["scoring kernel"] == kernel_status()
    res = r.invoke(cli, ["models", "--json"])
    names = [m["name"] for m in json.loads(res.output)]
    assert "dinov2-s14" in names and "dino-b8" in names


def test_extract_reports_the_stores_cleanup_notes(tmp_path, images):
    """A set left unfinished (its provenance lost) is made anew on rerun, and the report says
    so: in the JSON and as a note line under the table."""
    store = tmp_path / "s.zarr"
    args = ["extract", "-m", "dinov2-s14", "--images", str(images), "--store", str(store)]
    args += ["--size", "42", "-q", *TINY_ARGS]
    r = CliRunner()
    assert r.invoke(cli, args).exit_code == 0
    meta = store / "features" / "dinov2-s14@short42" / "zarr.json"
    d = json.loads(meta.read_text())
    del d["attributes"]["provenance"]
    meta.write_text(json.dumps(d))
    res = r.invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["models"][0]["images_extracted"] == 4
    assert any("unfinished" in n for n in rep["notes"]), rep
    meta.write_text(json.dumps(d))
    res = r.invoke(cli, args)
    assert res.exit_code == 0 and "note: feature set 'dinov2-s14@short42' was unfinished" in (
        res.output
    ), res.output
