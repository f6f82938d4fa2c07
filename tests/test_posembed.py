"""Position-embedding rules against formulas written from the authors' code, and the rule a
feature set's provenance names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from featurestore.backbones.posembed import pos_interp_of, resample_patch_grid, resample_tokens
from featurestore.errors import OvssError


def authors(patch_pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding`` on a square ``(1, D, g0, g0)`` grid."""
    side = math.sqrt(patch_pos.shape[-1] * patch_pos.shape[-2])
    return F.interpolate(
        patch_pos, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic"
    )


GRID = torch.randn(1, 16, 14, 14, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("gh", "gw"), [(21, 21), (28, 28), (28, 42), (7, 9), (1, 30)])
def test_offset_is_the_authors_formula_and_parts_from_size(gh: int, gw: int) -> None:
    out = resample_patch_grid(GRID, (gh, gw), "offset")
    torch.testing.assert_close(out, authors(GRID, gh, gw), rtol=0, atol=0)
    sized = resample_patch_grid(GRID, (gh, gw), "size")
    assert (sized - out).abs().max() > 1e-3  # the rules sample elsewhere
    antialiased = resample_patch_grid(GRID, (gh, gw), "size-aa")
    expected = F.interpolate(GRID, size=(gh, gw), mode="bicubic", antialias=True)
    torch.testing.assert_close(antialiased, expected, rtol=0, atol=0)


def test_native_grid_is_the_identity_and_dtype_is_kept() -> None:
    for rule in ("offset", "size", "size-aa"):
        assert resample_patch_grid(GRID, (14, 14), rule) is GRID
    half = resample_patch_grid(GRID.half(), (20, 10), "offset")
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), authors(GRID, 20, 10), rtol=0, atol=2e-3)


def test_tokens_keep_the_prefix_rows() -> None:
    tokens = torch.randn(1, 2 + 14 * 14, 16, generator=torch.Generator().manual_seed(1))
    out = resample_tokens(tokens, (14, 14), (5, 8), "offset", num_prefix=2)
    assert out.shape == (1, 2 + 40, 16) and torch.equal(out[:, :2], tokens[:, :2])
    grid = tokens[0, 2:].reshape(1, 14, 14, 16).permute(0, 3, 1, 2)
    want = authors(grid, 5, 8).permute(0, 2, 3, 1).reshape(40, 16)
    torch.testing.assert_close(out[0, 2:], want, rtol=0, atol=0)


def test_provenance_names_the_rule_also_for_sets_made_before_it_was_recorded() -> None:
    assert pos_interp_of({"family": "clip", "extra": {"pos_interp": "offset"}}) == "offset"
    assert pos_interp_of({"family": "clip", "extra": {}}) == "size"
    assert pos_interp_of({"family": "dinov2", "extra": {}}) == "size-aa"
    assert pos_interp_of({"family": "dino", "extra": {}}) == "size-aa"
    assert pos_interp_of({"family": "sam", "extra": {}}) is None


def test_unknown_rule_is_an_error() -> None:
    from featurestore.backbones.posembed import check_rule

    with pytest.raises(OvssError, match="choose from offset, size, size-aa"):
        check_rule("nearest", "dino-s16")
