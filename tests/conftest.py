"""Test-session settings shared by every test module."""

from __future__ import annotations

import os

# CUDA present: the suite is CPU by design (tiny models, byte comparisons with CPU results,
# `--device auto` would otherwise resolve to the GPU), so it hides the GPUs from itself and from
# the subprocesses it starts, before torch first asks. OVSS_TEST_CUDA=1 keeps them visible for
# the tests marked `cuda` (`OVSS_TEST_CUDA=1 pytest -m cuda`).
if os.environ.get("OVSS_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

# Under pytest-xdist (`make test` runs `-n 2` on 2 cores) every worker already owns a core:
# letting each one start a second intra-op thread oversubscribes the machine, and the OpenMP
# threads of small ops then spin against each other (measured: the demo's 960 small training
# steps took 15x longer with 2 threads per worker under load than with 1). Subprocesses the
# tests start (the CLI, torchrun ranks) inherit the same limit through the environment.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
