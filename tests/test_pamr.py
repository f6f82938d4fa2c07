"""PAMR: the fast form against the authors' convolution form and a plain per-pixel loop
(float64), broken variants caught, the guide, the driver's refinement step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featurestore.errors import OvssError
from methods.pamr import (
    NEIGHBOURS,
    PAMRConfig,
    naclip_guide,
    pamr,
    pamr_affinity,
    pamr_reference,
    parse_dilations,
    refine_cosine,
)


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def loop_pamr(
    guide,
    scores,
    steps,
    dilations,
    *,
    biased_std=False,
    zero_pad=False,
    centre_neighbour=False,
    softmax_then_mean=False,
    align_corners=True,
    no_std=False,
):
    """PAMR pixel by pixel in Python floats; the flags are deliberately broken variants."""
    k_n, h, w = guide.shape
    m = F.interpolate(scores[None], size=(h, w), mode="bilinear", align_corners=align_corners)[0]
    g = guide.tolist()
    offs = [(0, 0)] + list(NEIGHBOURS) if centre_neighbour else list(NEIGHBOURS)

    def at(img, c, y, x):
        if zero_pad and not (0 <= y < h and 0 <= x < w):
            return 0.0
        return img[c][min(max(y, 0), h - 1)][min(max(x, 0), w - 1)]

    aff = [[None] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            per_channel = []
            for c in range(k_n):
                samples = [
                    at(g, c, y + d * dy, x + d * dx)
                    for d in dilations
                    for dy in (-1, 0, 1)
                    for dx in (-1, 0, 1)
                ]
                mu = sum(samples) / len(samples)
                dof = len(samples) if biased_std else len(samples) - 1
                std = 1.0 if no_std else math.sqrt(sum((s - mu) ** 2 for s in samples) / dof)
                per_channel.append(
                    [
                        -abs(g[c][y][x] - at(g, c, y + d * dy, x + d * dx)) / (1e-8 + 0.1 * std)
                        for d in dilations
                        for dy, dx in offs
                    ]
                )

            def softmax(v):
                mx = max(v)
                e = [math.exp(a - mx) for a in v]
                return [a / sum(e) for a in e]

            if softmax_then_mean:
                sm = [softmax(v) for v in per_channel]
                aff[y][x] = [sum(s[i] for s in sm) / k_n for i in range(len(sm[0]))]
            else:
                aff[y][x] = softmax(
                    [sum(v[i] for v in per_channel) / k_n for i in range(len(per_channel[0]))]
                )
    cur = m.tolist()
    for _ in range(steps):
        nxt = [[[0.0] * w for _ in range(h)] for _ in range(len(cur))]
        for c in range(len(cur)):
            for y in range(h):
                for x in range(w):
                    nb = [(d, dy, dx) for d in dilations for dy, dx in offs]
                    nxt[c][y][x] = sum(
                        a * at(cur, c, y + d * dy, x + d * dx)
                        for a, (d, dy, dx) in zip(aff[y][x], nb, strict=True)
                    )
        cur = nxt
    return torch.tensor(cur, dtype=torch.float64)


def test_fast_form_equals_the_authors_convolutions():
    guide, scores = rand(3, 23, 31, seed=1), rand(5, 9, 12, seed=2)
    ours = pamr(guide, scores, 10, (8, 16))
    ref = pamr_reference(guide, scores, 10, (8, 16))
    assert ours.shape == (5, 23, 31) and ours.dtype == torch.float64
    assert (ours - ref).abs().max().item() <= 1e-12
    assert not torch.allclose(pamr(guide, scores, 10, (8, 15)), ours)  # dilations matter


def test_equals_a_plain_loop_and_no_broken_variant():
    guide, scores = rand(3, 7, 9, seed=3), rand(2, 4, 5, seed=4)
    dil, steps = (1, 3), 3
    ours = pamr(guide, scores, steps, dil)
    ref = loop_pamr(guide, scores, steps, dil)
    assert (ours - ref).abs().max().item() <= 1e-9
    for flags in (
        {"biased_std": True},
        {"zero_pad": True},
        {"centre_neighbour": True},
        {"softmax_then_mean": True},
        {"align_corners": False},
        {"no_std": True},
    ):
        broken = loop_pamr(guide, scores, steps, dil, **flags)
        gap = (ours - broken).abs().max().item()
        assert gap > 1e-6, (flags, gap)
    assert (pamr(guide, scores, steps - 1, dil) - ref).abs().max() > 1e-6  # steps matter


def test_invariants():
    guide = rand(3, 20, 25, seed=5)
    aff = pamr_affinity(guide, (8, 16))
    assert aff.shape == (16, 20, 25)
    assert torch.allclose(aff.sum(0), torch.ones(20, 25, dtype=torch.float64))
    const = torch.full((4, 6, 7), 0.3, dtype=torch.float64)
    assert torch.allclose(pamr(guide, const), torch.full((4, 20, 25), 0.3, dtype=torch.float64))
    # same size, zero steps: the align_corners=True resize is the identity
    s = rand(2, 20, 25, seed=6)
    assert torch.equal(pamr(guide, s, 0), s)
    # a guide with one sharp edge keeps the scores from leaking across it
    g = torch.zeros(3, 24, 24, dtype=torch.float64)
    g[:, :, 12:] = 10.0
    g += rand(3, 24, 24, seed=7) * 0.01
    m = torch.zeros(1, 24, 24, dtype=torch.float64)
    m[:, :, 12:] = 1.0
    out = pamr(g, m, 10, (2, 4))
    assert out[0, :, :10].max() < 0.05 and out[0, :, 14:].min() > 0.95


def test_dilations_and_errors():
    assert parse_dilations("8,16") == (8, 16) and parse_dilations(" 4 , 2") == (4, 2)
    assert parse_dilations((8,)) == (8,)
    for bad in ("", "8,x", "0,8", "-1"):
        with pytest.raises(OvssError, match="pamr_dilations"):
            parse_dilations(bad)
    with pytest.raises(ValueError, match="guide"):
        pamr(rand(3, 4, 4), rand(4, 4))
    with pytest.raises(OvssError, match="pamr_steps"):
        pamr(rand(3, 4, 4), rand(1, 4, 4), -1)


def test_naclip_guide_is_the_network_input_resized_back():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    g = naclip_guide(img, (20, 30), mean, std)
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(20, 30), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1) * 255) / (torch.tensor(std).view(1, 3, 1, 1) * 255)
    x = F.interpolate(x, size=(30, 45), mode="bilinear", align_corners=False)[0]
    assert g.shape == (3, 30, 45) and torch.allclose(g, x, atol=1e-6)
    same = naclip_guide(img, (30, 45), mean, std)  # no resize at the original size
    assert torch.allclose(same[0], (torch.from_numpy(img[..., 0]).float() - 127.5) / 51.0)


def test_refine_cosine_is_a_no_op_without_the_option():
    class Seg:
        config = PAMRConfig()

    cos = rand(3, 5, 6).float()
    assert refine_cosine(Seg(), 0, cos, (10, 12)) is cos

    class Other:  # a config without PAMR fields
        config = object()

    assert refine_cosine(Other(), 0, cos, (10, 12)) is cos
