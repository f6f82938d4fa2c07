"""The fused, query-chunked SAM affinity (``methods.sam_affinity``) against the per-head path
of ``methods.trident.sam_affinity`` (full ``(n, n)`` attention from ``sam_attention``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featurestore.backbones.sam import top_left_rows
from methods.sam_affinity import SamAttentionFactors, factors_from_arrays, fused_affinity
from methods.sam_cache import sam_attention
from methods.trident import SamTokens, cosine_thresholds, sam_affinity

CACHED = (9, 7)  # the cached (ceil) grid
VALID = (8, 6)  # Trident's valid (floor) grid
HEADS, HD, SPAN = 3, 8, 10  # the block's grid is SPAN x SPAN: rel-pos tables (2*SPAN - 1, HD)


def random_block(seed: int = 0, dtype: torch.dtype = torch.float32, rows=None, zero_mass=False):
    """Random cached factors and values, and the per-head reference ``SamTokens``
    (``zero_mass``: log attention mass 0 everywhere, as for an image without padding)."""
    g = torch.Generator().manual_seed(seed)
    big_n = CACHED[0] * CACHED[1]
    q = torch.randn(big_n, HEADS, HD, generator=g) * 1.5
    k = torch.randn(big_n, HEADS, HD, generator=g) * 1.5
    log_mass = -torch.rand(big_n, HEADS, generator=g) * 2
    if zero_mass:
        log_mass = torch.zeros_like(log_mass)
    static = {
        "rel_pos_h": torch.randn(2 * SPAN - 1, HD, generator=g) * 0.5,
        "rel_pos_w": torch.randn(2 * SPAN - 1, HD, generator=g) * 0.5,
        "scale": np.array([HD**-0.5]),
    }
    valid = VALID if rows is None else None  # the top-left crop: the sliced (strided) path
    rows = top_left_rows(VALID, CACHED[1]) if rows is None else rows
    values = torch.randn(HEADS, len(rows), HD, generator=g).to(dtype)

    def attn_head(h: int) -> torch.Tensor:
        a = sam_attention(
            q, k, CACHED, static, heads=[h], normalise="full", attn_log_mass=log_mass, dtype=dtype
        )[0]
        return a.index_select(0, rows).index_select(1, rows)

    factors = factors_from_arrays(
        q, k, log_mass, static, CACHED, rows=rows, dtype=dtype, valid=valid
    )
    return SamTokens(grid=VALID, values=values, attn_head=attn_head), factors


def assert_same(fused: torch.Tensor, ref: torch.Tensor) -> None:
    n = ref.shape[0]
    torch.testing.assert_close(fused.sum(-1), torch.ones(n, dtype=fused.dtype))
    # rows sum to 1: the row scale; entries agree to float32 rounding
    assert (fused - ref).abs().max() < 1e-6
    # the same keep decisions (no cosine lies within rounding of its threshold here)
    assert torch.equal(fused > 0, ref > 0)


@pytest.mark.parametrize("chunk", [1, 5, 13, 48, 256])
@pytest.mark.parametrize("correlation", ["aff", "attn"])
@pytest.mark.parametrize(("cos_fac", "neg"), [(1.2, True), (1.2, False), (0.0, True), (-2, False)])
def test_fused_equals_the_per_head_path(chunk, correlation, cos_fac, neg):
    sam, factors = random_block()
    (ref,) = sam_affinity(sam, [None], correlation, cos_fac, 0.9, neg, 0.6)
    sv = F.normalize(sam.values, dim=-1)
    thr = cosine_thresholds(sv, cos_fac, 0.9, neg, 0.6)
    got = fused_affinity(factors, sv, thr, correlation, chunk)
    assert got.shape == ref.shape == (48, 48) and got.dtype == torch.float32
    assert_same(got, ref)
    if correlation == "aff":
        assert (got.diagonal() > 0).all()
        assert (got == 0).any()  # the mask drops something


def test_cos_fac_zero_threshold_drops_negative_cosines():
    sam, factors = random_block(seed=1)
    sv = F.normalize(sam.values, dim=-1)
    got = fused_affinity(factors, sv, cosine_thresholds(sv, 0.0), "aff", 7)
    cos = sv @ sv.transpose(1, 2)
    kept_somewhere = (cos > 0).any(0) | torch.eye(48, dtype=torch.bool)
    assert torch.equal(got > 0, kept_somewhere)


def test_float64_matches_exactly_enough():
    sam, factors = random_block(seed=2, dtype=torch.float64)
    (ref,) = sam_affinity(sam, [None], "aff", 1.2)
    sv = F.normalize(sam.values, dim=-1)
    got = fused_affinity(factors, sv, cosine_thresholds(sv, 1.2), "aff", 10)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_any_valid_row_map():
    # not a top-left crop: the valid keys are gathered instead of sliced
    rows = torch.tensor([3, 4, 5, 10, 11, 12, 17, 18, 19, 30, 31, 62])
    sam, factors = random_block(seed=3, rows=rows)
    for correlation in ("aff", "attn"):
        (ref,) = sam_affinity(dataclasses.replace(sam, factors=None), [None], correlation, 1.0)
        sv = F.normalize(sam.values, dim=-1)
        thr = cosine_thresholds(sv, 1.0)
        assert_same(fused_affinity(factors, sv, thr, correlation, 5), ref)


def test_top_left_rows_and_the_valid_grid():
    rows = top_left_rows(VALID, CACHED[1])
    assert rows.tolist()[:7] == [0, 1, 2, 3, 4, 5, 7] and rows.numel() == 48
    _, factors = random_block(seed=6)
    assert factors.valid == VALID and torch.equal(factors.rows, rows)
    # rows from the valid grid alone
    alone = dataclasses.replace(factors, rows=None)
    assert torch.equal(alone.rows, rows)
    # the same rows without the valid grid: gathered, not sliced; the same matrix
    gathered = dataclasses.replace(factors, valid=None)
    sam, _ = random_block(seed=6)
    sv = F.normalize(sam.values, dim=-1)
    thr = cosine_thresholds(sv, 1.2)
    for correlation in ("aff", "attn"):
        sliced = fused_affinity(factors, sv, thr, correlation, 9)
        torch.testing.assert_close(fused_affinity(gathered, sv, thr, correlation, 9), sliced)


def test_dead_rows_become_identity_rows():
    sam, factors = random_block(seed=4)
    lm = factors.attn_log_mass.clone()
    lm[top_left_rows(VALID, CACHED[1])[[0, 20]]] = -float("inf")  # no mass on the valid keys
    factors = dataclasses.replace(factors, attn_log_mass=lm)
    sv = F.normalize(sam.values, dim=-1)
    got = fused_affinity(factors, sv, cosine_thresholds(sv, 1.2), "aff", 16)
    for r in (0, 20):
        assert got[r, r] == 1 and got[r].sum() == 1
    assert (got.sum(-1) - 1).abs().max() < 1e-6


def test_sam_affinity_takes_the_fused_path_when_it_applies():
    sam, factors = random_block(seed=5)
    plain = dataclasses.replace(sam, factors=None)
    fused = dataclasses.replace(sam, factors=factors)
    calls = []

    def counting(h: int) -> torch.Tensor:
        calls.append(h)
        return sam.attn_head(h)

    fused = dataclasses.replace(fused, attn_head=counting)
    for correlation in ("aff", "attn"):
        (ref,) = sam_affinity(plain, [None], correlation, 1.2)
        (got,) = sam_affinity(fused, [None], correlation, 1.2)
        assert_same(got, ref)
    assert not calls  # no (n, n) head built
    # groups and "cos" keep the per-head path
    groups = [torch.arange(0, 48, 2), torch.arange(1, 48, 2)]
    for g, r in zip(sam_affinity(fused, groups), sam_affinity(plain, groups), strict=True):
        assert torch.equal(g, r)
    assert torch.equal(sam_affinity(fused, [None], "cos")[0], sam_affinity(plain, [None], "cos")[0])
    assert calls


def test_factors_are_checked():
    _, factors = random_block()
    with pytest.raises(ValueError, match="gh\\*gw"):
        dataclasses.replace(factors, cached=(8, 7))
    with pytest.raises(ValueError, match="not inside"):
        dataclasses.replace(factors, valid=(10, 6))
    with pytest.raises(ValueError, match="rows for the valid grid"):
        dataclasses.replace(factors, valid=(8, 5))
    with pytest.raises(ValueError, match="valid rows or the valid grid"):
        dataclasses.replace(factors, rows=None, valid=None)
    with pytest.raises(ValueError, match="exceeds"):
        SamAttentionFactors(
            factors.q, factors.k, factors.attn_log_mass, factors.rel_pos_h[:9],
            factors.rel_pos_w, factors.scale, factors.cached, factors.rows,
        )  # fmt: skip
    sv = torch.randn(HEADS + 1, 48, HD)
    with pytest.raises(ValueError, match="do not match"):
        fused_affinity(factors, sv, torch.zeros(48))
    with pytest.raises(ValueError, match="aff or attn"):
        fused_affinity(factors, sv[:HEADS], torch.zeros(48), "cos")


@pytest.mark.parametrize("correlation", ["aff", "attn"])
@pytest.mark.parametrize("rows", [None, torch.tensor([0, 2, 9, 10, 11, 40, 41, 62])])
def test_zero_log_mass_skips_the_row_factor_and_still_matches(correlation, rows):
    sam, factors = random_block(seed=7, zero_mass=True, rows=rows)
    (ref,) = sam_affinity(dataclasses.replace(sam, factors=None), [None], correlation, 1.2)
    sv = F.normalize(sam.values, dim=-1)
    thr = cosine_thresholds(sv, 1.2)
    assert_same(fused_affinity(factors, sv, thr, correlation, 6), ref)


@pytest.mark.parametrize("correlation", ["aff", "attn"])
def test_workers_compute_the_same_matrix_bit_for_bit(correlation):
    # blocks of rows on several threads (one torch thread each) == the inline loop on one
    # torch thread, exactly; the caller's thread setting is left as it was
    sam, factors = random_block(seed=8)
    sv = F.normalize(sam.values, dim=-1)
    thr = cosine_thresholds(sv, 1.2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inline = fused_affinity(factors, sv, thr, correlation, 5, workers=1)
    finally:
        torch.set_num_threads(threads)
    for workers in (2, 3, 64):
        got = fused_affinity(factors, sv, thr, correlation, 5, workers=workers)
        assert torch.equal(got, inline)
        assert torch.get_num_threads() == threads
    # inside inference mode (as evaluation runs it) the workers write the caller's tensors
    with torch.inference_mode():
        assert torch.equal(fused_affinity(factors, sv, thr, correlation, 5, workers=2), inline)
    (ref,) = sam_affinity(dataclasses.replace(sam, factors=None), [None], correlation, 1.2)
    assert_same(inline, ref)
