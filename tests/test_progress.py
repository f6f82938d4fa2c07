"""Progress for batch jobs: plain lines on a non-terminal stderr, never hard-wrapped."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from ovss_cli.render import PlainProgress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_plain_lines_every_interval_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    p = PlainProgress(out, interval=5.0, clock=clock)
    p("clip-b16", 20, 120)  # 20 done by an earlier run: not in the rate
    for k in range(1, 13):  # one image per second
        clock.t += 1.0
        p("clip-b16", 20 + k, 120)
    lines = out.getvalue().splitlines()
    assert lines == [
        "clip-b16: 25/120 (20.8%) 1.00 img/s ETA 1:35",
        "clip-b16: 30/120 (25.0%) 1.00 img/s ETA 1:30",
    ]
    clock.t += 0.5
    p("clip-b16", 120, 120)  # completion prints at once
    assert out.getvalue().splitlines()[-1] == "clip-b16: 120/120 (100.0%) 8.00 img/s done in 0:12"
    p("clip-b16", 120, 120)  # nothing new: no repeated line
    assert len(out.getvalue().splitlines()) == 3


def test_labels_are_independent_and_hours_show():
    out, clock = io.StringIO(), Clock()
    p = PlainProgress(out, interval=1.0, clock=clock)
    p("a", 0, 100000)
    p("b", 0, 10)
    clock.t += 10.0
    p("a", 10, 100000)
    assert out.getvalue() == "a: 10/100000 (0.0%) 1.00 img/s ETA 27:46:30\n"


def test_extract_without_a_terminal_prints_plain_progress_and_unwrapped_skips(tmp_path):
    root = tmp_path / ("a_rather_long_folder_name_" * 4)
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    cmd = [sys.executable, "-m", "ovss_cli.main", "extract", "--images", str(root)]
    cmd += ["--store", str(tmp_path / "s.zarr"), "-m", "dinov2-s14", "--random-init"]
    cmd += ["--arch-override", "depth=1", "--arch-override", "embed_dim=32"]
    cmd += ["--arch-override", "num_heads=2", "--size", "28", "--device", "cpu"]
    env = {**os.environ, "COLUMNS": "80"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 3, res.stderr
    err = res.stderr.splitlines()
    assert "dinov2-s14: 4/4 (100.0%)" in res.stderr and "done in" in res.stderr
    skipped = [line for line in err if line.startswith("skipped broken")]
    assert len(skipped) == 1 and len(skipped[0]) > 100  # one line, not cut at 80 columns
    assert str(root / "broken.png") in skipped[0]
    assert "\x1b[" not in res.stderr  # no terminal control sequences in a log
