"""``benchmarks.gpu_check``: refuses without CUDA, its CPU dry run (``--smoke``) runs the same code
path end to end, and on a GPU (``cuda`` marker) the real figures come out within the budget."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check


def test_refuses_in_one_line_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--smoke" in err


def test_smoke_runs_every_figure_and_reads_the_cpu_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    row = {"benchmark": "store read", "ratio": "0.9", "target": ">= 0.8", "met": "met", "x": 1}
    (tmp_path / "bench.json").write_text(json.dumps({"table": [row]}))
    assert gpu_check.main(["--smoke", "--bench-json", str(tmp_path / "bench.json")]) == 0
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["smoke"] and out["device"] == "cpu (smoke)"
    whats = [r["what"] for r in out["rows"]]
    assert whats == [f"extract {label}" for label, _, _ in gpu_check.EXTRACTION] + [
        "trident eval from the store",
        "text embedding CLIP-B/16 (ADE20K x openai80)",
    ]
    assert all(r.get("images_per_s", 0) > 0 for r in out["rows"][:3])
    assert out["rows"][3]["s_per_image"] > 0
    assert out["rows"][4]["prompts"] == 8 * 7 and out["rows"][4]["prompts_per_s"] > 0
    assert out["cpu_bench"] == [{k: row[k] for k in ("benchmark", "ratio", "target", "met")}]
    assert "CPU bench ratios" in capsys.readouterr().out


@pytest.mark.cuda
def test_on_a_gpu_within_the_budget(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (OVSS_TEST_CUDA=1 on a GPU machine)")
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    assert gpu_check.main(["--images", "8", "--bench-json", str(tmp_path / "none.json")]) == 0
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not out["smoke"] and out["within_budget"] and out["cpu_bench"] is None
    assert out["rows"][4]["prompts"] == 150 * 80
