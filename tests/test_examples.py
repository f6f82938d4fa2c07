"""The batch-job examples run as written, with the scheduler's variables set by hand on tiny
data: the SLURM array (two shard tasks at once, the eval job they queue with
``--dependency=afterok``) and the torchrun script (2 CPU ranks over gloo: extract, then DDP
align) give what one process gives."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from methods.train import read_checkpoint
from ovss_cli.main import cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BIN = Path(sys.executable).parent
TINY_CLIP = [
    *("--arch-override", "embed_dim=32", "--arch-override", "vision_cfg.layers=2"),
    *("--arch-override", "vision_cfg.width=64", "--arch-override", "vision_cfg.heads=2"),
    *("--arch-override", "text_cfg.layers=2", "--arch-override", "text_cfg.width=64"),
    *("--arch-override", "text_cfg.heads=2"),
]
TINY_TEXT = [a.replace("--arch-override", "--text-arch-override") for a in TINY_CLIP]
TINY_DINO = [*("--arch-override", "depth=2", "--arch-override", "embed_dim=64")]
TINY_DINO += ["--arch-override", "num_heads=2"]
PROTO = ["--resize", "short", "--size", "48", "--block-mb", "0.0005"]  # one image per block


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    for sub in ("images/train", "annotations/train"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("sky\ngrass\nbrick\n")
    for i in range(4):
        h, w = 32 + 8 * i, 48
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / "train" / f"im{i}.png"
        )
        Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8)).save(
            root / "annotations" / "train" / f"im{i}.png"
        )
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK"))}
    for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _arrays(path: str) -> dict:
    """path -> array bytes of every array of a store (the data, whatever the timestamps)."""
    out = {}

    def walk(g, prefix=""):
        for name, a in g.arrays():
            data = a[...]
            raw = data.tobytes() if data.dtype != object else json.dumps(data.tolist()).encode()
            out[f"{prefix}/{name}"] = (a.shape, str(a.dtype), raw)
        for name, sub in g.groups():
            walk(sub, f"{prefix}/{name}")

    walk(zarr.open_group(path, mode="r"))
    return out


def _common(store: str, dataset: Path) -> dict[str, str]:
    return {"STORE": store, "DATASET": "custom", "DATA_ROOT": str(dataset), "SPLIT": "train"}


def test_slurm_array_then_dependent_eval_equals_one_process(dataset, tmp_path):
    store = str(tmp_path / "array.zarr")
    calls = tmp_path / "sbatch.log"
    fake = tmp_path / "bin" / "sbatch"  # records what the array's task 0 submits
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {shlex.quote(str(calls))}\n')
    fake.chmod(0o755)
    extra = " ".join(["--random-init", *TINY_CLIP, *PROTO])
    base = _env(**_common(store, dataset), MODEL="clip-b16", EXTRA=extra)
    base["PATH"] = f"{fake.parent}{os.pathsep}{base['PATH']}"
    tasks = [
        subprocess.Popen(
            ["bash", str(EXAMPLES / "slurm_extract.sh")],
            cwd=tmp_path,
            env={
                **base,
                "SLURM_ARRAY_JOB_ID": "4242",
                "SLURM_ARRAY_TASK_ID": str(i),
                "SLURM_ARRAY_TASK_COUNT": "2",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [t.communicate(timeout=600)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs
    args = calls.read_text().split("\n")
    assert "--dependency=afterok:4242" in args
    assert args[-2].endswith("slurm_eval.sh")
    exported = next(a for a in args if a.startswith("--export=ALL,"))
    job_env = dict(kv.split("=", 1) for kv in exported[len("--export=ALL,") :].split(","))
    assert job_env == _common(store, dataset)

    # The dependent job, as SLURM would start it once both tasks succeeded.
    eval_args = " ".join(["--random-init", *TINY_CLIP, "--templates", "single", "--set size=48"])
    res = subprocess.run(
        ["bash", str(EXAMPLES / "slurm_eval.sh")],
        cwd=tmp_path,
        env=_env(**job_env, SLURM_JOB_ID="4243", EVAL_ARGS=eval_args),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    arrayed = json.loads((tmp_path / "eval-4243.json").read_text())

    one = str(tmp_path / "one.zarr")
    r = CliRunner()
    args = ["--dataset", "custom", "--data-root", str(dataset), "--split", "train"]
    res1 = r.invoke(cli, ["extract", "--store", one, *args, "--model", "clip-b16"]
                    + ["--random-init", *TINY_CLIP, *PROTO, "-q"])  # fmt: skip
    assert res1.exit_code == 0, res1.output
    shards = _arrays(store)  # before eval adds text sets to the single-process store
    res1 = r.invoke(cli, ["eval", "--store", one, *args, *shlex.split(eval_args), "-q", "--json"])
    assert res1.exit_code == 0, res1.output
    assert arrayed["metrics"] == json.loads(res1.output)["metrics"]
    mine = {k: v for k, v in _arrays(one).items() if not k.startswith("/text")}
    assert {k: v for k, v in shards.items() if not k.startswith("/text")} == mine


def test_torchrun_extract_and_align_equal_one_process(dataset, tmp_path):
    store = str(tmp_path / "ddp.zarr")
    align = ["--arch", "block", "--hidden-dim", "16", "--heads", "2", "--epochs", "2"]
    align += ["--batch-images", "3", "--lr", "0.5", "--max-patches-per-image", "8"]
    align += ["--text-random-init", *TINY_TEXT, "--templates", "single"]
    env = _env(
        **_common(store, dataset),
        NPROC="2",
        MODEL="dinov2-s14",
        OUT=str(tmp_path / "ck"),
        DEVICE="cpu",
        TORCHRUN=str(BIN / "torchrun"),
        EXTRACT_ARGS=" ".join(["--random-init", *TINY_DINO, *PROTO]),
        ALIGN_ARGS=" ".join(align),
    )
    res = subprocess.run(
        ["bash", str(EXAMPLES / "torchrun_extract_align.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    one = str(tmp_path / "one.zarr")
    r = CliRunner()
    args = ["--data-root", str(dataset), "--split", "train"]
    res1 = r.invoke(cli, ["extract", "--store", one, "--dataset", "custom", *args]
                    + ["--model", "dinov2-s14", "--random-init", *TINY_DINO, *PROTO, "-q"])  # fmt: skip
    assert res1.exit_code == 0, res1.output
    both = [
        {k: v for k, v in _arrays(p).items() if not k.startswith("/text")} for p in (store, one)
    ]
    assert both[0] == both[1]  # the ranks' shards make the single process's store

    res1 = r.invoke(cli, ["align", "--store", one, "--features", "dinov2-s14", "--gt-dataset"]
                    + ["custom", *args, "--out", str(tmp_path / "ck1"), "--device", "cpu", "-q"]
                    + align)  # fmt: skip
    assert res1.exit_code == 0, res1.output
    ddp = read_checkpoint(tmp_path / "ck" / "last.pt")
    single = read_checkpoint(tmp_path / "ck1" / "last.pt")
    assert ddp.get("world_size") == 2
    for h2, h1 in zip(ddp["history"], single["history"], strict=True):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
    for name, w in single["module"].items():
        assert torch.allclose(ddp["module"][name], w, atol=1e-5), name
