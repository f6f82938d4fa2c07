"""Documented exit codes: 0 ok, 1 error, 2 usage (impossible numbers too), 3 some inputs failed."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ovss_cli.common import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
from ovss_cli.main import cli

TINY = ["--arch-override", "depth=2", "--arch-override", "embed_dim=64"]
TINY += ["--arch-override", "num_heads=2"]


def _images(root, bad: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / f"{i}.png")
    for i in range(bad):
        (root / f"bad{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def _extract(tmp_path, *extra, bad=1):
    args = ["extract", "--images", str(_images(tmp_path / "imgs", bad))]
    args += ["--store", str(tmp_path / "s.zarr"), "--model", "dinov2-s14", "--random-init"]
    args += [*TINY, "--size", "28", "--device", "cpu", "-q", *extra]
    return CliRunner().invoke(cli, args)


def test_codes_are_the_documented_numbers():
    assert (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL) == (0, 1, 2, 3)


def test_extract_with_failed_images_exits_3_unless_allowed(tmp_path):
    res = _extract(tmp_path)
    assert res.exit_code == EXIT_PARTIAL, res.output
    assert "skipped bad0" in res.output
    res = _extract(tmp_path / "b", "--allow-failed")
    assert res.exit_code == EXIT_OK, res.output
    assert _extract(tmp_path / "c", bad=0).exit_code == EXIT_OK


def test_a_user_error_exits_1(tmp_path):
    res = CliRunner().invoke(
        cli, ["extract", "--images", str(tmp_path / "none"), "--store", "s", "-m", "dinov2-s14"]
    )
    assert res.exit_code == EXIT_ERROR
    assert res.output.strip().count("\n") == 0 and "not found" in res.output


@pytest.mark.parametrize(
    "opt",
    [
        ("--batch-size", "0"),
        ("--block-mb", "-1"),
        ("--block-mb", "0"),
        ("--workers", "0"),
        ("--limit", "-3"),
        ("--limit", "0"),
        ("--size", "0"),
        ("--crop", "-1"),
        ("--stride", "-8"),
        ("--pad-multiple", "-1"),
        ("--align", "-16"),
        ("--max-pixels", "0"),
    ],
)
def test_impossible_extract_numbers_are_usage_errors(tmp_path, opt):
    res = _extract(tmp_path, *opt, bad=0)
    assert res.exit_code == EXIT_USAGE, res.output
    assert f"Invalid value for '{opt[0]}'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["segment", "--store", "S", "--limit", "0"],
        ["eval", "--store", "S", "--gallery", "-1"],
        ["captions", "inspect", "--limit", "-1"],
        ["captions", "inspect", "--top", "-2"],
        ["tune", "--trials", "0"],
        ["tune", "--sample", "-1"],
        ["demo", "--n-train", "0"],
        ["demo", "--n-val", "-1"],
    ],
)
def test_impossible_numbers_of_other_commands_are_usage_errors(args):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == EXIT_USAGE, res.output
    assert f"Invalid value for '{args[-2]}'" in res.output


def test_sigterm_stops_a_command_as_ctrl_c_with_exit_143():
    import os
    import signal

    import click

    from ovss_cli.common import user_errors

    finished = []

    @click.command()
    @user_errors
    def job():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        finally:
            finished.append(True)  # cleanup (the block writer's close) still runs

    before = signal.getsignal(signal.SIGTERM)
    res = CliRunner().invoke(job, [])
    assert res.exit_code == 143
    assert res.output.strip() == (
        "terminated; finished work is kept — rerun the same command to resume"
    )
    assert finished == [True]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
