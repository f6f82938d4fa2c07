"""Scoring: window merge (mmseg slide) and the fast, exact SCLIP-lineage post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featurestore.errors import OvssError
from featurestore.protocol import Protocol
from methods.scoring import (
    merge_window_logits,
    score_labels,
    score_logits,
    score_logits_reference,
    upsample_bilinear,
)


def _close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    """allclose with a readable failure (torch.testing.assert_close costs ~1 s to import)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    expected = expected.to(actual.dtype)
    ok = torch.allclose(actual, expected, rtol=rtol, atol=atol)
    assert ok, f"max abs diff {(actual - expected).abs().max().item():.3g}"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_same_as_reference(
    cos: torch.Tensor, out_hw: tuple[int, int], q2c: torch.Tensor | list[int], c: int, **kw: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast labels == reference labels (also labels-only), probabilities to float32 rounding;
    both fast paths: the C kernel (where it builds) and the torch one."""
    from methods.scoring import _score

    ref_labels, ref_prob = score_logits_reference(cos, out_hw, q2c, c, **kw)
    labels, prob = score_logits(cos, out_hw, q2c, c, **kw)
    assert labels.shape == out_hw and labels.dtype == torch.long
    assert torch.equal(labels, ref_labels)
    _close(prob, ref_prob, rtol=1e-5, atol=0)
    assert torch.equal(score_labels(cos, out_hw, q2c, c, **kw), ref_labels)
    args = (kw.get("logit_scale", 40.0), kw.get("prob_thd", 0.0), kw.get("area_thd"))
    torch_labels, torch_prob = _score(cos, out_hw, q2c, c, *args, True, 1 << 22, native=False)
    assert torch.equal(torch_labels, ref_labels)
    _close(torch_prob, ref_prob, rtol=1e-5, atol=0)
    return ref_labels, ref_prob


# ------------------------------------------------------------------------------------- upsample


def test_upsample_bilinear_is_f_interpolate_for_any_leading_dims() -> None:
    x = torch.randn(2, 3, 7, 9, generator=_gen(0))
    ref = F.interpolate(x, size=(20, 13), mode="bilinear", align_corners=False)
    assert torch.equal(upsample_bilinear(x, (20, 13)), ref)
    assert torch.equal(upsample_bilinear(x[0], (20, 13)), ref[0])
    assert torch.equal(upsample_bilinear(x[0, 0], (20, 13)), ref[0, 0])
    assert torch.equal(upsample_bilinear(x[0], (7, 9)), x[0])
    with pytest.raises(OvssError):
        upsample_bilinear(x, (0, 4))


# ---------------------------------------------------------------------------------------- merge


def _slide_reference(
    img_logits: list[torch.Tensor], boxes: np.ndarray, hw: tuple[int, int]
) -> torch.Tensor:
    """mmseg forward_slide: zero-pad each resized crop to the canvas, add, divide by count."""
    q = img_logits[0].shape[0]
    preds = torch.zeros(1, q, *hw)
    count = torch.zeros(1, 1, *hw)
    for logits, (y1, x1, y2, x2) in zip(img_logits, boxes.tolist(), strict=True):
        crop = F.interpolate(logits[None], size=(y2 - y1, x2 - x1), mode="bilinear")
        preds += F.pad(crop, (x1, hw[1] - x2, y1, hw[0] - y2))
        count[:, :, y1:y2, x1:x2] += 1
    return (preds / count)[0]


@pytest.mark.parametrize("hw", [(336, 448), (200, 150), (225, 230)])
def test_merge_window_logits_is_bitwise_mmseg_slide(hw: tuple[int, int]) -> None:
    boxes = Protocol(resize="none", crop=224, stride=112).windows(*hw)
    if hw == (336, 448):
        assert len(boxes) == 6  # EVAL.md §4.1: 448x336 with c=224, s=112 -> 3x2 windows
    gen = _gen(1)
    logits = [
        torch.randn(5, (y2 - y1) // 16, (x2 - x1) // 16, generator=gen) for y1, x1, y2, x2 in boxes
    ]
    merged = merge_window_logits(logits, boxes, hw)
    assert merged.shape == (5, *hw)
    assert torch.equal(merged, _slide_reference(logits, boxes, hw))


def test_merge_window_logits_rejects_bad_input() -> None:
    logits = [torch.zeros(3, 4, 4)]
    with pytest.raises(OvssError, match="cover"):
        merge_window_logits(logits, [[0, 0, 8, 8]], (8, 9))
    with pytest.raises(OvssError, match="inside"):
        merge_window_logits(logits, [[0, 0, 8, 10]], (8, 9))
    with pytest.raises(OvssError, match="box per window"):
        merge_window_logits(logits + logits, [[0, 0, 8, 9]], (8, 9))
    with pytest.raises(OvssError, match="Q=3"):
        merge_window_logits(
            [torch.zeros(3, 4, 4), torch.zeros(2, 4, 4)], [[0, 0, 8, 9]] * 2, (8, 9)
        )


# -------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("q", "hw", "out_hw"),
    [
        (13, (17, 23), (41, 37)),
        (9, (40, 31), (19, 27)),
        (150, (24, 31), (53, 71)),
        (1, (5, 6), (9, 7)),
    ],
)
def test_fast_equals_reference_random_one_query_per_class(
    q: int, hw: tuple[int, int], out_hw: tuple[int, int]
) -> None:
    cos = torch.rand(q, *hw, generator=_gen(q)) * 2 - 1
    _assert_same_as_reference(cos, out_hw, torch.arange(q), q)


def test_fast_equals_reference_with_synonyms_and_empty_class() -> None:
    # 12 classes, 30 queries in no particular order; class 7 has no query (probability 0).
    gen = _gen(3)
    q2c = torch.randint(0, 12, (30,), generator=gen)
    q2c[q2c == 7] = 8
    cos = torch.rand(30, 19, 26, generator=gen) * 0.6 - 0.1
    labels, _ = _assert_same_as_reference(cos, (45, 61), q2c, 12)
    assert not bool((labels == 7).any())
    # The class of the single best query: synonyms are merged after the softmax.
    up = upsample_bilinear(cos, (45, 61))
    assert torch.equal(labels, q2c[up.argmax(0)])


@pytest.mark.parametrize("prob_thd", [0.3, 0.5, 0.8])
def test_fast_equals_reference_with_prob_thd(prob_thd: float) -> None:
    gen = _gen(4)
    q2c = torch.tensor([0, 0, 0, 1, 2, 3, 4, 4, 5, 6])
    cos = torch.rand(10, 21, 18, generator=gen) * 0.3
    labels, prob = _assert_same_as_reference(cos, (50, 47), q2c, 7, prob_thd=prob_thd)
    below = prob < prob_thd
    assert bool(below.any()) and bool((~below).any())  # the threshold really splits the image
    assert bool((labels[below] == 0).all())


def test_prob_thd_sees_the_softmax_over_all_synonyms() -> None:
    # Two equal synonyms of class 1 halve its probability: 0.5 < 0.6 -> background.
    cos = torch.zeros(3, 2, 2)
    cos[1:] = 1.0
    labels, prob = score_logits(cos, (2, 2), [0, 1, 1], 2, logit_scale=40.0, prob_thd=0.6)
    _close(prob, torch.full((2, 2), 0.5), rtol=1e-6, atol=0)
    assert bool((labels == 0).all())
    _assert_same_as_reference(cos, (2, 2), [0, 1, 1], 2, prob_thd=0.6)


def test_fast_equals_reference_with_area_thd() -> None:
    # Classes 1-2 own large regions, 3-4 small ones: area_thd=0.1 removes 3 and 4.
    cos = torch.zeros(6, 30, 40)
    cos[0] = 0.2
    cos[1, :, :20] = 0.6
    cos[2, :, 20:] = 0.6
    cos[3, 2:5, 2:5] = 0.9
    cos[4, 20:23, 30:34] = 0.9
    cos[5] = 0.55  # a synonym of class 4, best wherever 3/4 are not
    cos += torch.rand(6, 30, 40, generator=_gen(5)) * 0.05
    q2c = [0, 1, 2, 3, 4, 4]
    plain, _ = score_logits_reference(cos, (61, 83), q2c, 5, logit_scale=65.0)
    assert set(plain.unique().tolist()) == {1, 2, 3, 4}
    labels, _ = _assert_same_as_reference(
        cos, (61, 83), q2c, 5, logit_scale=65.0, prob_thd=0.1, area_thd=0.1
    )
    assert set(labels.unique().tolist()) <= {0, 1, 2}
    assert {1, 2} <= set(labels.unique().tolist())


def test_area_thd_on_random_logits() -> None:
    gen = _gen(6)
    cos = torch.rand(8, 11, 13, generator=gen)
    cos[1] += 0.3  # one dominant foreground class survives, the others are cut
    _assert_same_as_reference(cos, (33, 29), torch.arange(8), 8, area_thd=0.1, prob_thd=0.05)


def test_exact_ties_and_one_ulp_gaps_follow_the_reference() -> None:
    gen = _gen(7)
    cos = torch.rand(6, 9, 10, generator=gen) * 0.05
    cos[4] = 0.5  # class 2 (query 4) ...
    cos[1] = 0.5  # ... and class 1 (query 1) tie exactly everywhere: argmax takes class 1
    cos[5, :, :5] = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0))  # 1 ulp above
    q2c = [0, 1, 1, 3, 2, 3]
    labels, _ = _assert_same_as_reference(cos, (20, 23), q2c, 4)
    assert set(labels.unique().tolist()) <= {1, 3}


@pytest.mark.parametrize("block_elems", [1, 97, 1 << 30])
def test_block_size_does_not_change_results(block_elems: int) -> None:
    cos = torch.rand(7, 12, 15, generator=_gen(8))
    q2c = [0, 1, 2, 2, 3, 4, 5]
    ref_labels, ref_prob = score_logits_reference(cos, (29, 31), q2c, 6, prob_thd=0.2)
    labels, prob = score_logits(cos, (29, 31), q2c, 6, prob_thd=0.2, block_elems=block_elems)
    assert torch.equal(labels, ref_labels)
    _close(prob, ref_prob, rtol=1e-5, atol=0)


@pytest.mark.parametrize("workers", [1, 2, 3, 16])
@pytest.mark.parametrize("kw", [{}, {"prob_thd": 0.2}, {"area_thd": 0.3}])
def test_workers_do_not_change_results(workers: int, kw: dict) -> None:
    # blocks of pixels on several threads (one torch thread each) give the reference labels
    from methods.scoring import _score

    cos = torch.rand(9, 11, 13, generator=_gen(9))
    q2c = [0, 1, 2, 2, 3, 4, 5, 6, 6]
    ref_labels, ref_prob = score_logits_reference(cos, (37, 29), q2c, 7, **kw)
    threads = torch.get_num_threads()
    labels, prob = _score(
        cos, (37, 29), q2c, 7, 40.0, kw.get("prob_thd", 0.0), kw.get("area_thd"), True, 97, workers
    )
    assert torch.get_num_threads() == threads
    assert torch.equal(labels, ref_labels)
    _close(prob, ref_prob, rtol=1e-5, atol=0)
    with torch.inference_mode():  # as evaluation runs it: the workers take the caller's mode
        got, _ = _score(cos, (37, 29), q2c, 7, 40.0, 0.0, kw.get("area_thd"), True, 97, workers)
    assert torch.equal(got, ref_labels) or "prob_thd" in kw


def test_scoring_rejects_bad_arguments() -> None:
    cos = torch.zeros(3, 4, 4)
    with pytest.raises(OvssError, match="entries"):
        score_logits(cos, (4, 4), [0, 1], 2)
    with pytest.raises(OvssError, match=r"\[0, 1\]"):
        score_logits(cos, (4, 4), [0, 1, 2], 2)
    with pytest.raises(OvssError, match="Q, h, w"):
        score_logits(cos[0], (4, 4), [0], 1)
    with pytest.raises(OvssError, match="size"):
        score_labels(cos, (4,), [0, 1, 2], 3)


def test_thresholds_at_once_equal_one_call_each():
    """score_logits_thresholds == score_logits per threshold, label for label, including pixels
    whose max probability sits on a threshold (the recompute band)."""
    from methods.scoring import score_logits, score_logits_thresholds

    g = torch.Generator().manual_seed(3)
    cos = torch.rand(6, 9, 11, generator=g) * 0.2
    q2c = torch.tensor([0, 1, 1, 2, 3, 4])
    labels0, prob0 = score_logits(cos, (37, 41), q2c, 5, 40.0)
    on_edge = float(prob0.flatten()[100])  # a threshold exactly on some pixel's probability
    thds = [0.0, 0.2, 0.35, on_edge, 0.9]
    multi = score_logits_thresholds(cos, (37, 41), q2c, 5, 40.0, thds)
    for t, (labels, _) in zip(thds, multi, strict=True):
        single, _ = score_logits(cos, (37, 41), q2c, 5, 40.0, prob_thd=t)
        assert torch.equal(labels, single), t
    assert (multi[4][0] == 0).sum() > (multi[1][0] == 0).sum()  # thresholds really applied


# ------------------------------------------------------------------------------ the C kernel

KERNEL_SHAPES = [
    (150, (28, 37), (683, 512)),  # an ADE20K-sized upsampling at patch 16
    (13, (17, 23), (141, 37)),
    (9, (200, 151), (119, 90)),  # downsampling
    (4, (300, 400), (100, 90)),  # 4x down: 16 outputs read more than 32 inputs (no permutes)
    (5, (80, 70), (80, 70)),  # same size
    (3, (1, 7), (200, 1)),  # one-pixel rows and columns
    (1, (5, 6), (90, 70)),
    (70, (32, 32), (517, 389)),  # more than 64 pixels per row: whole runs and a remainder
    # outputs with H + W <= 128, where PyTorch runs another kernel that rounds differently:
    # the probe check refuses the C kernel there and the torch path runs
    (13, (17, 23), (41, 37)),
    (9, (40, 31), (19, 27)),
]


def _kernel_or_skip():
    from methods.scoring import _kernel, kernel_status

    lib = _kernel()
    if lib is None:
        pytest.skip(f"the scoring kernel does not build here: {kernel_status()}")
    return lib


def test_kernel_builds_where_there_is_a_compiler() -> None:
    import shutil

    from methods.scoring import kernel_status

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")
    assert kernel_status().startswith("compiled"), kernel_status()


@pytest.mark.parametrize(("q", "hw", "out_hw"), KERNEL_SHAPES)
def test_kernel_upsampling_agrees_with_f_interpolate(
    q: int, hw: tuple[int, int], out_hw: tuple[int, int]
) -> None:
    """The kernel's separable upsampling is F.interpolate's to the last bit for outputs with
    H + W > 128 (PyTorch's generic CPU kernel; measured on AVX2 and AVX-512 builds), and within
    float32 rounding everywhere; its pixel and decision outputs are the same values."""
    from methods.scoring import _KernelUpsampler

    lib = _kernel_or_skip()
    cos = torch.rand(q, *hw, generator=_gen(q)) * 0.6 - 0.2
    ref = upsample_bilinear(cos, out_hw)
    up = _KernelUpsampler(lib, cos, out_hw, 2)
    ours = up.upsampled()
    _close(ours, ref, rtol=1e-6, atol=1e-7)
    accepted = _KernelUpsampler.create(cos, out_hw, 2) is not None
    assert accepted == torch.equal(ours, ref)
    if sum(out_hw) > 128 and not accepted:
        pytest.skip(
            "PyTorch runs another kernel here (3 channels on one thread, or another build): not used"
        )
    idx = torch.randperm(out_hw[0] * out_hw[1], generator=_gen(1))[:50]
    assert torch.equal(up.pixels(idx), ours.view(q, -1)[:, idx])
    best_query, max_prob, unsure = up.decide(40.0, 0.0, True)
    flat = ours.view(q, -1)
    assert torch.equal(flat[best_query, torch.arange(flat.shape[1])], flat.max(0).values)
    _close(max_prob, (flat * 40.0).softmax(0).max(0).values, rtol=1e-5, atol=0)
    if q > 1:
        top2 = (flat * 40.0).topk(2, dim=0).values
        assert torch.equal(unsure, (top2[0] - top2[1]) < 4e-6) or bool(unsure.any())


@pytest.mark.parametrize(("q", "hw", "out_hw"), KERNEL_SHAPES)
@pytest.mark.parametrize("kw", [{}, {"prob_thd": 0.1}, {"area_thd": 0.05, "prob_thd": 0.02}])
def test_kernel_labels_equal_the_reference(
    q: int, hw: tuple[int, int], out_hw: tuple[int, int], kw: dict
) -> None:
    _kernel_or_skip()
    cos = torch.rand(q, *hw, generator=_gen(q + 1)) * 0.4 - 0.1
    _assert_same_as_reference(cos, out_hw, torch.arange(q), q, **kw)


def test_a_kernel_that_disagrees_with_f_interpolate_is_not_used(monkeypatch) -> None:
    """The probe check: when the kernel's values differ from F.interpolate's for some sizes,
    scoring runs the torch path for them, with the reference's labels."""
    import methods.scoring as scoring

    _kernel_or_skip()
    real = scoring.upsample_bilinear
    monkeypatch.setattr(scoring, "_verified", {})
    monkeypatch.setattr(scoring, "upsample_bilinear", lambda x, hw: real(x, hw) * (1 + 1e-7))
    cos = torch.rand(11, 9, 13, generator=_gen(2))
    assert scoring._KernelUpsampler.create(cos, (31, 29), 1) is None
    monkeypatch.setattr(scoring, "upsample_bilinear", real)
    labels, _ = score_logits(cos, (31, 29), torch.arange(11), 11)  # cached verdict: torch path
    assert torch.equal(labels, score_logits_reference(cos, (31, 29), torch.arange(11), 11)[0])
    # one whole probe (31 * 29 pixels) of 4 channels, under this process's thread count
    assert scoring._verified == {(4, 9, 13, 31, 29, torch.get_num_threads() == 1): False}


def test_native_build_falls_back_cleanly(tmp_path) -> None:
    """A fresh process builds the kernel into OVSS_NATIVE_DIR; OVSS_NATIVE=0 and a missing
    compiler each turn it off with a reason, and scoring still gives the same labels."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    child = (
        "import json, torch\n"
        "from methods.scoring import kernel_status, score_labels, score_logits_reference\n"
        "cos = torch.rand(7, 9, 11, generator=torch.Generator().manual_seed(0))\n"
        "ok = torch.equal(score_labels(cos, (23, 19), torch.arange(7), 7),\n"
        "                 score_logits_reference(cos, (23, 19), torch.arange(7), 7)[0])\n"
        "print(json.dumps([kernel_status(), ok]))\n"
    )

    def run(**env: str) -> list:
        full = {**os.environ, "OVSS_NATIVE_DIR": str(tmp_path / "native"), **env}
        res = subprocess.run(
            [sys.executable, "-c", child], env=full, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])

    assert run(OVSS_NATIVE="0") == ["off (OVSS_NATIVE=0)", True]
    assert run(CC="no-such-compiler-ovss") == ["no C compiler found (set CC)", True]
    if any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        status, ok = run()
        assert status.startswith("compiled") and ok
        assert [p.suffix for p in (tmp_path / "native").iterdir()] == [".so"]
