"""``trident`` (METHODS.md §4, §8) on a store of tiny random-init CLIP-B/16, DINO-B/16 and SAM-B.

The models are the real classes in tiny configurations; the images have odd sizes so that the
canvas rounding, the window grid and SAM's floor grid are all exercised. Hard cut-offs (the
strict ``cos > thr``) are checked in float64 on inputs built to sit exactly on them.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featurestore.backbones import tiny_arch_overrides
from featurestore.errors import OvssError, ProvenanceMismatchError
from featurestore.extract import ExtractConfig, extract
from featurestore.images import list_folder_images
from featurestore.protocol import Protocol, image_geometry
from featurestore.store import FeatureStore
from methods.base import ScoringConfig, Vocab, build_config, get_method, window_logits_to_box
from methods.clip_dense import LastBlock
from methods.proxyclip import proxy_window_features
from methods.scoring import merge_window_logits
from methods.segment import segment_image
from methods.trident import (
    SamTokens,
    TridentConfig,
    cosine_thresholds,
    image_proxy_attention,
    mask_prompt,
    refine_with_sam,
    refinement_prompts,
    resample_matrix,
    resize_grid,
    sam_affinity,
    splice_windows,
)
from ovss_cli.hints import render_error

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
    "text_cfg": {"layers": 2, "width": 64, "heads": 2},
}
TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}
TINY_SAM = tiny_arch_overrides("sam-b")
SIZES = ((61, 93), (97, 50))  # odd sides: canvas rounding, SAM floor grid < ceil grid
OPTS = {"size": 64, "crop": 48, "stride": 32, "pad_multiple": 0, "sam_size": 256}
WIN = Protocol("trident", 64, crop=48, stride=32, align=16)
# SAM's image rounded up to the CLIP-B/16 grid first (METHODS.md §4 step 1, sam_round_up)
LONG = Protocol("long", 256, align=16)
HALVES = Protocol("halves", 256, align=16)


CLASSES = ("sky", "tree", "road")  # the `custom` dataset of the store's images (CLI eval)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The images are also a `custom` dataset (``<tmp>/data``: images, labels, classes.txt)."""
    tmp = tmp_path_factory.mktemp("trident")
    data = tmp / "data"
    for sub in ("images/val", "annotations/val"):
        (data / sub).mkdir(parents=True)
    (data / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for i, (h, w) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        base = 127 + 100 * np.sin(xx / (5 + 2 * i))[..., None] * np.cos(yy / 7)[..., None]
        noise = np.random.default_rng(i).normal(0, 25, (h, w, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(data / "images" / "val" / f"im{i}.png")
        gt = (xx * 3 // w).astype(np.uint8)  # three vertical bands
        gt[0, :] = 255  # ignored
        Image.fromarray(gt).save(data / "annotations" / "val" / f"im{i}.png")
    recs = list_folder_images(data / "images" / "val")
    common = dict(store=str(tmp / "s.zarr"), random_init=True, dtype="float32", block_mb=1)
    for model, proto, arch in (
        ("clip-b16", WIN, TINY_CLIP),
        ("dino-b16", WIN, TINY_VIT),
        ("sam-b", LONG, TINY_SAM),
        ("sam-b", HALVES, TINY_SAM),
        ("sam-b", Protocol("long", 256), TINY_SAM),  # the original image (sam_round_up=off)
    ):
        extract(recs, ExtractConfig(models=[model], protocol=proto, arch_overrides=arch, **common))
    return FeatureStore.open(tmp / "s.zarr")


def segmenter(store, **overrides):
    cls = get_method("trident")
    return cls(store, build_config(cls, None, {**OPTS, **overrides}))


def vocab(e=32, q=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(q, e, generator=g), dim=-1)
    return Vocab([[f"c{i}"] for i in range(q - 1)], emb, torch.tensor([0, 1, 2, 3, 3]))


# --- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(61, 93), (97, 50), (20, 31), (375, 500), (1024, 2048)])
def test_trident_canvas_is_on_the_patch_grid_and_at_least_the_crop(hw):
    for proto, patch in ((WIN, 16), (Protocol("trident", 448, crop=336, stride=224, align=14), 14)):
        rh, rw = proto.resized_size(*hw)
        short = Protocol("short", proto.size).resized_size(*hw)
        assert rh % proto.align == 0 and rw % proto.align == 0
        assert rh >= max(short[0], proto.crop) and rh - max(short[0], proto.crop) < proto.align
        assert rw >= max(short[1], proto.crop) and rw - max(short[1], proto.crop) < proto.align
        geo = image_geometry(proto, *hw, patch_size=patch)
        for w in geo.windows:  # every window a full crop with corners on the grid, no padding
            y1, x1, y2, x2 = w.box
            assert (y2 - y1, x2 - x1) == (proto.crop, proto.crop) and w.pad == (0, 0, 0, 0)
            assert all(v % patch == 0 for v in w.box)
    assert Protocol("trident", 448, crop=336, stride=224, pad_multiple=56, align=16).key() == (
        "trident448a16-c336s224-pad56"
    )
    # the other modes keep their records (no 'align' key) and refuse it
    assert "align" not in Protocol("short", 448).to_dict()
    assert Protocol.from_dict(WIN.to_dict()) == WIN
    with pytest.raises(ValueError, match="multiples of 16"):
        Protocol("trident", 448, crop=330, stride=224, align=16)
    with pytest.raises(ValueError, match="align"):
        Protocol("short", 448, align=16)
    with pytest.raises(ValueError, match="align > 0"):
        Protocol("trident", 448, crop=336, stride=224)


def test_resample_matrix_is_pytorch_bilinear_and_exact_on_cell_centres():
    x = torch.randn(21, 5, dtype=torch.float64)
    centres = [Fraction(16 * (2 * t + 1), 2) for t in range(24)]  # 24 tokens over 384 px
    m = resample_matrix(centres, 0, 384, 21, torch.float64)
    want = F.interpolate(x.T[None], size=24, mode="linear", align_corners=False)[0].T
    torch.testing.assert_close(m @ x, want)
    eye = resample_matrix([Fraction(40 + 16 * t) for t in range(7)], 32, 7 * 16, 7, torch.float64)
    assert torch.equal(eye, torch.eye(7, dtype=torch.float64))


def test_identical_windows_splice_to_themselves():
    for hw in SIZES + ((40, 200),):
        geo = image_geometry(WIN, *hw, patch_size=16)
        th, tw = geo.resized[0] // 16, geo.resized[1] // 16
        canvas = torch.randn(th, tw, 6, dtype=torch.float64)
        windows = [
            canvas[y1 // 16 : y2 // 16, x1 // 16 : x2 // 16]
            for y1, x1, y2, x2 in (w.box for w in geo.windows)
        ]
        boxes = np.array([w.box for w in geo.windows])
        pads = np.array([w.pad for w in geo.windows])
        assert len(windows) > 1
        out = splice_windows(windows, boxes, pads, geo.resized, 16)
        assert torch.equal(out, canvas)
    # off the grid (short canvas, padded windows): a constant field stays constant
    geo = image_geometry(Protocol("short", 70, crop=40, stride=24, pad_multiple=48), 70, 101, 16)
    wins = [torch.full((*w.grid, 3), 2.5, dtype=torch.float64) for w in geo.windows]
    out = splice_windows(
        wins,
        np.array([w.box for w in geo.windows]),
        np.array([w.pad for w in geo.windows]),
        geo.resized,
        16,
    )
    assert out.shape[:2] == (-(-geo.resized[0] // 16), -(-geo.resized[1] // 16))
    torch.testing.assert_close(out, torch.full_like(out, 2.5))


def _bilinear_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``(h, w, D)`` -> ``(out_h, out_w, D)``: bilinear, half-pixel centres, edges clamped,
    one output cell at a time (independent of ``F.interpolate``)."""
    h, w = x.shape[:2]
    out = np.zeros((out_h, out_w, x.shape[2]))
    for i in range(out_h):
        u = max((i + 0.5) * h / out_h - 0.5, 0.0)
        i0 = min(int(np.floor(u)), h - 1)
        i1, fy = min(i0 + 1, h - 1), u - i0 if i0 < h - 1 else 0.0
        for j in range(out_w):
            v = max((j + 0.5) * w / out_w - 0.5, 0.0)
            j0 = min(int(np.floor(v)), w - 1)
            j1, fx = min(j0 + 1, w - 1), v - j0 if j0 < w - 1 else 0.0
            top = (1 - fx) * x[i0, j0] + fx * x[i0, j1]
            bottom = (1 - fx) * x[i1, j0] + fx * x[i1, j1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


def _spec_splice(windows, geo, patch: int, r: int) -> np.ndarray:
    """§4 step 4 written out: a canvas r x the CLIP token canvas; window k (its grid resized
    to (r h_tok, r w_tok) when it is not that already) added into rows [r y1_tok, r y2_tok),
    columns [r x1_tok, r x2_tok); the mean by overlap count."""
    th, tw = geo.resized[0] // patch, geo.resized[1] // patch
    acc = np.zeros((r * th, r * tw, windows[0].shape[2]))
    count = np.zeros((r * th, r * tw, 1))
    for f, w in zip(windows, geo.windows, strict=True):
        y1, x1, y2, x2 = (v // patch for v in w.box)
        f = np.asarray(f, dtype=np.float64)
        want = (r * (y2 - y1), r * (x2 - x1))
        if f.shape[:2] != want:
            f = _bilinear_reference(f, *want)
        acc[r * y1 : r * y2, r * x1 : r * x2] += f
        count[r * y1 : r * y2, r * x1 : r * x2] += 1
    return acc / count


@pytest.mark.parametrize(("r", "grid"), [(1, 3), (2, 6), (2, 7), (1, 4)])
def test_splice_at_the_window_grid_ratio_matches_the_spec(r, grid):
    """48-px windows of 3 CLIP tokens: a 3x3 grid (r = 1, DINO-B/16), 6x6 (r = 2, DINO-B/8's
    42 per 21 tokens), 7x7 (r = 2, not a multiple: resized first), 4x4 (rounds to r = 1)."""
    g = torch.Generator().manual_seed(r * 10 + grid)
    for hw in SIZES + ((40, 200),):
        geo = image_geometry(WIN, *hw, patch_size=16)
        assert all(w.pad == (0, 0, 0, 0) for w in geo.windows) and len(geo.windows) > 1
        windows = [
            torch.randn(grid, grid, 5, generator=g, dtype=torch.float64) for _ in geo.windows
        ]
        boxes = np.array([w.box for w in geo.windows])
        pads = np.array([w.pad for w in geo.windows])
        out = splice_windows(windows, boxes, pads, geo.resized, 16)
        want = _spec_splice(windows, geo, 16, r)
        assert out.shape == want.shape == (r * geo.resized[0] // 16, r * geo.resized[1] // 16, 5)
        np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-12)
        # then bilinear to SAM's valid grid
        vh, vw = geo.resized[0] // 16 - 1, geo.resized[1] // 16 + 1
        np.testing.assert_allclose(
            resize_grid(out, (vh, vw)).numpy(), _bilinear_reference(want, vh, vw), atol=1e-12
        )
        if r == 2:  # the former rule (averaged onto the token canvas) is another computation
            old = splice_windows(windows, boxes, pads, geo.resized, 16, ratio=1)
            assert old.shape[:2] == (geo.resized[0] // 16, geo.resized[1] // 16)
            a, b = resize_grid(old, (vh, vw)), resize_grid(out, (vh, vw))
            assert float((a - b).norm() / b.norm()) > 0.05


def test_splice_ratio_two_copies_aligned_windows_bit_for_bit():
    geo = image_geometry(WIN, 61, 93, patch_size=16)
    th, tw = geo.resized[0] // 16, geo.resized[1] // 16
    canvas = torch.randn(2 * th, 2 * tw, 4, dtype=torch.float64)
    windows = [
        canvas[2 * y1 // 16 : 2 * y2 // 16, 2 * x1 // 16 : 2 * x2 // 16]
        for y1, x1, y2, x2 in (w.box for w in geo.windows)
    ]
    boxes, pads = np.array([w.box for w in geo.windows]), np.array([w.pad for w in geo.windows])
    assert torch.equal(splice_windows(windows, boxes, pads, geo.resized, 16), canvas)


# --- the proxy attention with the image-level mean ---------------------------------------------


def test_proxy_threshold_mean_is_one_scalar_over_all_windows():
    g = torch.Generator().manual_seed(0)
    wins = [torch.randn(12, 8, generator=g, dtype=torch.float64) + k for k in (0.0, 0.5, 3.0)]
    attn = image_proxy_attention(wins, 1.2, 3.0, "image")
    sims = [F.normalize(w, dim=-1) @ F.normalize(w, dim=-1).T for w in wins]
    mean = torch.cat([s.reshape(-1) for s in sims]).mean()
    for a, s in zip(attn, sims, strict=True):
        z = (s - 1.2 * mean) * 3.0
        torch.testing.assert_close(a.sum(-1), torch.ones(12, dtype=torch.float64))
        far = z.abs() > 1e-9
        assert (a[(z < 0) & far] == 0).all() and (a[(z > 0) & far] > 0).all()
        ref = torch.softmax(z.masked_fill(z < 0, float("-inf")), -1)
        torch.testing.assert_close(a, ref)
    per_window = image_proxy_attention(wins, 1.2, 3.0, "window")
    assert not torch.allclose(per_window[0], attn[0])


# --- the SAM affinity ---------------------------------------------------------------------------


def fake_sam(values: torch.Tensor, attn: torch.Tensor) -> SamTokens:
    n = values.shape[1]
    side = int(round(n**0.5))
    return SamTokens(grid=(side, n // side), values=values, attn_head=lambda h: attn[h])


def random_sam(n=16, heads=3, hd=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(heads, n, hd, generator=g, dtype=torch.float64)
    attn = torch.softmax(torch.randn(heads, n, n, generator=g, dtype=torch.float64) * 2, -1)
    attn = attn * torch.rand(heads, n, 1, generator=g, dtype=torch.float64)  # "full": mass < 1
    return values, attn


def reference_affinity(values, attn, cos_fac, cap=0.9, refine_neg_cos=True):
    """METHODS.md §4 step 5 written out with the full cos matrices, float64."""
    sv = F.normalize(values, dim=-1)
    cos = sv @ sv.transpose(1, 2)
    thr = cos_fac * cos.mean(dim=2).mean(dim=0)
    thr = torch.minimum(thr, torch.tensor(cap, dtype=thr.dtype))
    if not refine_neg_cos:
        thr = torch.where(thr < 0, torch.full_like(thr, 0.6), thr)
    am = torch.where(cos > thr[None, :, None], attn, torch.zeros_like(attn)).mean(0)
    return am / am.sum(-1, keepdim=True), thr, cos


@pytest.mark.parametrize(
    ("cos_fac", "neg"), [(1.2, True), (0.0, True), (3.0, False), (-1.5, False)]
)
def test_affinity_rows_sum_to_one_keep_the_diagonal_and_match_the_reference(cos_fac, neg):
    values, attn = random_sam()
    (w,) = sam_affinity(fake_sam(values, attn), [None], "aff", cos_fac, 0.9, neg, 0.6)
    ref, thr, cos = reference_affinity(values, attn, cos_fac, 0.9, neg)
    assert (cos.diagonal(dim1=1, dim2=2) > thr).all()  # so the explicit diagonal rule is moot
    torch.testing.assert_close(w, ref)
    torch.testing.assert_close(w.sum(-1), torch.ones(16, dtype=torch.float64))
    assert (w.diagonal() > 0).all()
    got_thr = cosine_thresholds(F.normalize(values, dim=-1), cos_fac, 0.9, neg, 0.6)
    torch.testing.assert_close(got_thr, thr)
    raw = cos_fac * (cos.mean(dim=2).mean(dim=0))
    if not neg:
        assert (got_thr[raw < 0] == 0.6).all()  # a negative threshold becomes 0.6
        assert (raw < 0).any() or cos_fac > 0
    else:
        assert (got_thr[raw < 0] < 0).all()
    for corr in ("attn", "cos"):
        (m,) = sam_affinity(fake_sam(values, attn), [None], corr, cos_fac, 0.9, neg, 0.6)
        torch.testing.assert_close(m.sum(-1), torch.ones(16, dtype=torch.float64))
        assert (m.diagonal() > 0).all()


def test_threshold_is_per_query_and_the_comparison_strict():
    # one head, 2-d values: tokens 0,1 along x, 2 along y, 3 at 45 degrees
    v = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    attn = torch.full((1, 4, 4), 0.25, dtype=torch.float64)
    sv = F.normalize(v, dim=-1)
    row_means = (sv @ sv.transpose(1, 2))[0].mean(-1)
    thr = cosine_thresholds(sv, 1.0, cos_cap=1.0)
    torch.testing.assert_close(thr, row_means)  # one threshold per query token
    assert len(set(thr.tolist())) > 1
    # cos_fac 2: query 0's mean cosine is (1 + 1 + 0 + s)/4 with s = cos 45; query 2's is
    # (0 + 0 + 1 + s)/4. Make token 0's threshold exactly 1 = cos(0, 1): strictly '>' drops it.
    s = float(sv[0, 0] @ sv[0, 3])
    fac = 4.0 / (2.0 + s)
    (w,) = sam_affinity(fake_sam(v, attn), [None], "aff", fac, cos_cap=1.0)
    t0 = cosine_thresholds(sv, fac, cos_cap=1.0)[0]
    assert t0 == 1.0 and w[0, 1] == 0 and w[0, 0] == 1.0  # cos == thr: dropped; diag kept
    (w2,) = sam_affinity(fake_sam(v, attn), [None], "aff", fac * 0.999, cos_cap=1.0)
    assert w2[0, 1] > 0  # just below: kept
    (w3,) = sam_affinity(fake_sam(v, attn), [None], "aff", fac, cos_cap=0.9)
    assert w3[0, 1] > 0  # the 0.9 cap lets it through again


def test_groups_are_independent_blocks():
    values, attn = random_sam(n=16)
    groups = [torch.arange(0, 16, 2), torch.arange(1, 16, 2)]
    got = sam_affinity(fake_sam(values, attn), groups, "aff", 1.2)
    for g, w in zip(groups, got, strict=True):
        ref, _, _ = reference_affinity(values[:, g], attn[:, g][:, :, g], 1.2)
        torch.testing.assert_close(w, ref)


# --- the segmenter ------------------------------------------------------------------------------


def test_logits_live_on_sams_floor_grid_and_segment_odd_images(store):
    seg = segmenter(store)
    v = vocab()
    for i, (h, w) in enumerate(SIZES):
        cos, size = seg.cosine_logits(i, v)
        sam = seg.sets["sam"].read(i, names=["v"])
        rh, rw = sam.resized_size
        assert size == (rh // 16, rw // 16) and cos.shape == (5, *size)
        assert tuple(sam.win_grid[0]) != size  # odd sizes: the ceil grid is larger
        assert torch.isfinite(cos).all() and cos.abs().max() <= 1 + 1e-5
        labels, _, _ = segment_image(seg, i, v, ScoringConfig())
        assert labels.shape == (h, w) and labels.max() <= 3
    # the canvas of the CLIP set is the trident canvas
    assert seg.sets["clip"].read(0, names=[]).resized_size == (64, 112)


def test_sam_sees_the_image_rounded_up_to_the_clip_patch_grid(store):
    """METHODS.md §4 step 1: SAM's image is the original resized so H and W round up to
    multiples of the CLIP patch (``long256-a16``), so its grid is the rounded image's: image 1
    (97 x 50 -> 112 x 64) is SamPredictor input 256 x 146, floor grid 16 x 9, where the original
    image (256 x 132) would give 16 x 8 (``sam_round_up=off`` [ours] reads that set)."""
    v = vocab()
    seg = segmenter(store)
    assert seg.sets["sam"].key == "sam-b@long256-a16"
    f = seg.sets["sam"].read(1, names=[])
    assert f.original_size == SIZES[1] and f.resized_size == (256, 146)
    cos, size = seg.cosine_logits(1, v)
    assert size == (16, 9) and cos.shape == (5, 16, 9)
    labels, max_prob, _ = segment_image(seg, 1, v, ScoringConfig())
    assert labels.shape == SIZES[1] and np.isfinite(max_prob).all()
    off = segmenter(store, sam_round_up=False)
    assert off.sets["sam"].key == "sam-b@long256"
    cos_off, size_off = off.cosine_logits(1, v)
    assert size_off == (16, 8)
    assert segment_image(off, 1, v, ScoringConfig())[0].shape == SIZES[1]
    # with the refinement (the predictor's image is the rounded one, masks resized back)
    ref = segmenter(store, **REFINE)
    new, prob = ref.refine(1, cos, labels, max_prob, v, ScoringConfig())
    assert new.shape == SIZES[1] and prob.shape == SIZES[1] and not np.array_equal(prob, max_prob)


def test_store_with_the_unrounded_sam_set_hints_sam_round_up_off(tmp_path):
    only_original = one_image_store(tmp_path, Protocol("long", 256))
    cls = get_method("trident")
    with pytest.raises(ProvenanceMismatchError) as err:
        cls(only_original, build_config(cls, None, OPTS))
    msg = str(err.value)
    assert "sam-b@long256-a16" in msg and "--set sam_round_up=off reads it" in msg
    cls(only_original, build_config(cls, None, {**OPTS, "sam_round_up": False}))


def test_identity_affinity_gives_the_plain_spliced_features(store, monkeypatch):
    """W = identity: ln_post(out_proj(spliced values)) @ proj, here checked against a plain
    token-by-token loop (identity window attention, windows averaged per canvas token)."""
    v = vocab()
    seg = segmenter(store, window_attention="none", correlation="none")
    cos, (vh, vw) = seg.cosine_logits(0, v)
    c = seg.sets["clip"].read(0, names=["pre_last"])
    block = LastBlock.from_feature_set(seg.sets["clip"]).to(dtype=torch.float64)
    th, tw = c.resized_size[0] // 16, c.resized_size[1] // 16
    total = torch.zeros(th, tw, block.width, dtype=torch.float64)
    count = torch.zeros(th, tw, 1, dtype=torch.float64)
    for (y1, x1, _, _), g in zip(c.win_box.tolist(), c.window_tokens("pre_last"), strict=True):
        for r in range(g.shape[0]):
            for s in range(g.shape[1]):
                total[y1 // 16 + r, x1 // 16 + s] += block.values(
                    torch.from_numpy(g[r, s]).double()
                )
                count[y1 // 16 + r, x1 // 16 + s] += 1
    x = resize_grid(total / count, (vh, vw)).reshape(vh * vw, -1)
    feat = F.normalize(block.project(block.out_proj(x)), dim=-1)
    want = (feat @ F.normalize(v.embeddings.double(), dim=-1).T).T.reshape(-1, vh, vw)
    torch.testing.assert_close(cos.double(), want, atol=2e-5, rtol=0)
    # the same through the affinity path with W forced to the identity
    seg_aff = segmenter(store, window_attention="none", correlation="aff")
    monkeypatch.setattr(
        "methods.trident.sam_affinity",
        lambda sam, groups, *a: [torch.eye(sam.grid[0] * sam.grid[1]) for _ in groups],
    )
    cos_aff, _ = seg_aff.cosine_logits(0, v)
    torch.testing.assert_close(cos_aff, cos)


def test_segment_then_splice_without_correlation_is_proxyclip(store):
    v = vocab()
    seg = segmenter(
        store, paradigm="segment-then-splice", correlation="none", threshold_mean="window"
    )
    assert "sam" not in seg.sets  # no SAM needed for this ablation
    cos, size = seg.cosine_logits(1, v)
    c, d = seg.sets["clip"].read(1), seg.sets["vfm"].read(1)
    block = LastBlock.from_feature_set(seg.sets["clip"])
    text = F.normalize(v.embeddings, dim=-1)
    wins = []
    for w, (cg, vg) in enumerate(
        zip(c.window_tokens("pre_last"), d.window_tokens("patch"), strict=True)
    ):
        ct = torch.from_numpy(cg.reshape(-1, cg.shape[-1]))
        vt = torch.from_numpy(vg.reshape(-1, vg.shape[-1]))
        feat = proxy_window_features(ct, cg.shape[:2], vt, vg.shape[:2], block, 1.2, 3.0)
        logits = (F.normalize(feat, dim=-1) @ text.T).T.reshape(-1, *vg.shape[:2])
        wins.append(window_logits_to_box(logits, c.win_box[w], c.win_pad[w]))
    want = merge_window_logits(wins, c.win_box, c.resized_size)
    assert size == c.resized_size
    torch.testing.assert_close(cos, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "opts",
    [
        {"correlation": "attn"},
        {"correlation": "cos", "sam_halves": True},
        {"paradigm": "segment-then-splice", "correlation": "aff", "sam_halves": True},
        {"cos_fac": 0.0, "threshold_mean": "window", "apply_out_proj": False},
    ],
)
def test_ablations_run(store, opts):
    cos, size = segmenter(store, **opts).cosine_logits(0, vocab())
    assert cos.shape == (5, *size) and torch.isfinite(cos).all()


def test_store_without_sam_names_the_extract_command(store, tmp_path):
    cls = get_method("trident")
    with pytest.raises(ProvenanceMismatchError) as err:
        cls(store, build_config(cls, None, {**OPTS, "sam_size": 512}))
    msg = render_error(err.value)
    assert "sam-b@long512-a16" in msg and "ovss extract" in msg
    assert "--for trident --dataset" in msg
    with pytest.raises(OvssError, match="clip_model must be one of"):
        build_config(cls, None, {"clip_model": "clip-x"})


def test_presets_follow_eval_table_and_pair_sam_h_with_clip_h():
    cls = get_method("trident")
    voc20, city = cls.presets("voc20"), cls.presets("cityscapes")
    assert (voc20["size"], voc20["stride"], voc20["cos_fac"], voc20["refine_neg_cos"]) == (
        336,
        112,
        0.0,
        True,
    )
    assert (city["size"], city["cos_fac"], city["refine_neg_cos"], city["sam_halves"]) == (
        688,
        3.0,
        False,
        True,
    )
    assert cls.presets("ade20k")["coarse_thresh"] == 0.05 and cls.presets("nope") == {}
    assert cls.scoring_presets("coco_object")["prob_thd"] == 0.25
    cfg = build_config(cls, "voc21", {"clip_model": "clip-h14"})
    assert cfg.sam_model == "sam-h" and cfg.window_protocol.align == 14
    assert cfg.window_protocol == Protocol(
        "trident", 448, crop=336, stride=224, pad_multiple=56, align=14
    )
    assert TridentConfig().sam_model == "sam-b"


# --- SAM refinement ----------------------------------------------------------------------------


def synthetic_probs(h=80, w=90):
    """Class 1: a 16x16 (reduced) square; class 2: one big blob and a small one; class 0 weak."""
    p = torch.full((3, h, w), 0.05)
    p[0] = 0.15  # below coarse_thresh everywhere: void
    p[1, 8:40, 8:40] = 0.7
    p[1, 20, 30] = 0.95  # the peak of class 1 (reduced: row 10, col 15)
    p[2, 50:80, 40:74] = 0.8  # 15 x 17 reduced = 255 >= 225
    p[2, 8:20, 70:82] = 0.8  # 6 x 6 reduced: too small
    labels = p.argmax(0)
    labels[p.max(0).values < 0.2] = 0
    return p, labels


def test_refinement_prompts_on_a_synthetic_map():
    p, labels = synthetic_probs()
    prompts = refinement_prompts(p, labels, coarse_thresh=0.2, minimal_area=225, down=2)
    assert prompts.reduced_size == (40, 45)
    assert (prompts.labels == 3).sum() > 0  # the void label C where max prob < coarse_thresh
    by_cls = {cp.cls: cp for cp in prompts.classes}
    assert set(by_cls) == {1, 2}  # class 0 never reaches coarse_thresh
    c1, c2 = by_cls[1], by_cls[2]
    assert len(c1.regions) == 1 and c1.regions[0].sum() == 16 * 16
    assert c1.boxes.tolist() == [[4.0, 4.0, 19.0, 19.0]]
    assert c1.points.tolist() == [[15.0, 10.0]]  # (x, y) of the peak
    assert len(c2.regions) == 1 and c2.boxes.tolist() == [[20.0, 25.0, 36.0, 39.0]]
    # 8-connectivity: two squares touching at a corner are one region
    q = torch.full((2, 60, 60), 0.1)
    q[1, 0:32, 0:32] = 0.9
    q[1, 32:60, 32:60] = 0.9
    q[0] = 1 - q[1]
    touching = refinement_prompts(q, q.argmax(0), coarse_thresh=0.2, minimal_area=225)
    assert [len(cp.regions) for cp in touching.classes if cp.cls == 1] == [1]


def test_mask_prompt_is_letterboxed_and_alpha_scaled():
    prob = torch.zeros(40, 45)
    prob[:, :20] = 0.9
    prob[:, 20:] = 0.1
    m = mask_prompt(prob, (80, 90), 64, coarse_thresh=0.2, alpha=0.005)
    assert m.shape == (64, 64)
    nh = int(80 * 64 / 90 + 0.5)  # ResizeLongestSide: (57, 64)
    assert (m[nh:] == 0).all() and m[:nh, :20].max() == pytest.approx(0.005 * 0.9)
    assert (m[:nh, 40:] == 0).all()  # p <= coarse_thresh -> 0


@pytest.fixture(scope="module")
def predictor(store):
    from methods.sam_cache import CachedSamPredictor, load_sam_decoder_for, sam_frame

    fs = store.require("sam-b", LONG)
    pred = CachedSamPredictor(load_sam_decoder_for(fs))
    pred.set_features(sam_frame(fs.read(0, names=["embedding"]), LONG))
    return pred


def test_refine_with_sam_keeps_or_replaces_labels(predictor):
    h, w = SIZES[0]
    # SAM's image is the rounded one: masks decoded at its size, resized to the probabilities'
    assert predictor.original_size == LONG.rounded_size(h, w) == (64, 96)
    p, labels = synthetic_probs(h, w)
    prompts = refinement_prompts(p, labels, coarse_thresh=0.2, minimal_area=20)
    assert prompts.classes
    same, scores = refine_with_sam(predictor, p, labels, prompts, iou_thresh=float("inf"))
    assert torch.equal(same, labels) and (scores == 0).all()  # nothing kept: coarse labels
    new, scores = refine_with_sam(predictor, p, labels, prompts, iou_thresh=-float("inf"))
    assert new.shape == (h, w) and scores.shape == (3, h, w)
    refined = scores.sum(0) > 0
    assert refined.any()
    assert torch.equal(new[~refined], labels[~refined])
    assert torch.equal(new[refined], scores.argmax(0)[refined])
    assert (scores <= p + 1e-6).all()  # sigmoid(logit) * probability
    for kinds in (("point",), ("box",), ("mask",)):
        out, _ = refine_with_sam(predictor, p, labels, prompts, kinds, iou_thresh=-float("inf"))
        assert out.shape == (h, w)


def test_refine_prompts_are_in_the_predictor_frame(predictor, monkeypatch):
    """SAM's image is the rounded one (61 x 93 -> 64 x 96): every prompt is given in its frame.
    A point or box corner at reduced pixel ``(x, y)`` (the map is 30 x 46) lands at the same
    fraction of SAM's input, ``(x * iw / 46, y * ih / 30)``; the dense mask prompt is the
    letterbox of the rounded image (43 rows of 64), not of the original (42 rows)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    h, w = SIZES[0]
    p, labels = synthetic_probs(h, w)
    prompts = refinement_prompts(p, labels, coarse_thresh=0.2, minimal_area=20)
    seen = []
    real = predictor.predict_torch

    def spy(coords, point_labels, boxes, mask, **kwargs):
        seen.append((coords, boxes, mask))
        return real(coords, point_labels, boxes, mask, **kwargs)

    monkeypatch.setattr(predictor, "predict_torch", spy)
    refine_with_sam(predictor, p, labels, prompts, iou_thresh=-float("inf"))
    assert len(seen) == len(prompts.classes) > 0
    (dh, dw), frame = prompts.reduced_size, predictor.original_size
    ih, iw = predictor.input_size
    side = int(predictor.model.prompt_encoder.mask_input_size[0])
    assert frame == (64, 96) != (h, w) and (dh, dw) == (30, 46)
    letterbox = ResizeLongestSide.get_preprocess_shape(*frame, side)
    assert letterbox == (43, 64) != ResizeLongestSide.get_preprocess_shape(h, w, side)
    to_input = torch.tensor([iw / dw, ih / dh])
    moved = 0
    for cp, (coords, boxes, mask) in zip(prompts.classes, seen, strict=True):
        torch.testing.assert_close(coords[:, 0].cpu(), torch.from_numpy(cp.points) * to_input)
        torch.testing.assert_close(boxes.cpu(), torch.from_numpy(cp.boxes) * to_input.repeat(2))
        want = mask_prompt(prompts.probs[cp.cls], frame, side, 0.2, 0.005)
        assert torch.equal(mask[0, 0].cpu(), want) and (want[letterbox[0] :] == 0).all()
        moved += int(
            not torch.equal(want, mask_prompt(prompts.probs[cp.cls], (h, w), side, 0.2, 0.005))
        )
    assert moved  # class 2 reaches the bottom row: its prompt depends on the frame


def test_segmenter_refine_hook(store):
    v = vocab()
    seg = segmenter(store, sam_refine=True, coarse_thresh=0.0, minimal_area=4, sam_iou_thresh=-1.0)
    labels, max_prob, cos = segment_image(seg, 0, v, ScoringConfig())
    new, prob = seg.refine(0, cos, labels, max_prob, v, ScoringConfig())
    assert new.shape == labels.shape and prob.shape == labels.shape and new.max() <= 3
    off = segmenter(store)
    same, _ = off.refine(0, cos, labels, max_prob, v, ScoringConfig())
    assert same is labels


def test_requirements_match_the_extraction_recipe():
    """Models and protocols of ``ovss extract --for trident`` are exactly what the method reads
    (the canvas rule taken from the recipe, so this holds for either canvas)."""
    from featurestore.datasets import list_datasets
    from methods.plan import plan_for as recipe_for

    cls = get_method("trident")
    for ds in [d for d in list_datasets() if d != "custom"]:
        for models, clip in (((), "clip-b16"), (("clip-h14",), "clip-h14")):
            steps = {s.role: (s.model, s.protocol) for s in recipe_for("trident", ds, models).steps}
            canvas = "trident" if steps["clip"][1].resize == "grid" else "short"
            cfg = build_config(cls, ds, {"canvas": canvas, "clip_model": clip})
            reqs = {r.role: (r.model, r.protocol) for r in cls.requirements(cfg) if not r.optional}
            assert reqs == steps, ds


def test_sam_tokens_equal_the_cached_trident_inputs(store):
    from methods.sam_cache import sam_static, trident_sam_inputs
    from methods.trident import sam_tokens

    fs = store.require("sam-b", LONG)
    f = fs.read(1)
    ref = trident_sam_inputs(f, sam_static(fs), dtype=torch.float64)
    got = sam_tokens(f, sam_static(fs), dtype=torch.float64)
    assert got.grid == ref.grid and got.num_heads == 2
    torch.testing.assert_close(got.values, ref.v)
    for h in range(got.num_heads):
        torch.testing.assert_close(got.attn_head(h), ref.attn[h])


# --- SAM on the left and right halves (Cityscapes) ----------------------------------------------


def test_halves_requirements_with_and_without_refinement(store):
    cls = get_method("trident")
    cfg = build_config(cls, None, {**OPTS, "sam_halves": True})
    (sam,) = [r for r in cls.requirements(cfg) if r.role == "sam"]
    assert sam.protocol == HALVES and sam.protocol.key() == "halves256-a16"
    assert "embedding" not in sam.tensors
    assert build_config(cls, "cityscapes", {}).sam_protocol.key() == "halves1024-a16"
    # refinement as the reference (refine_sam=whole): the halves for the affinity, the
    # whole-image set for the refinement's embedding
    cfg = build_config(cls, "cityscapes", {"sam_refine": True})
    assert cfg.sam_halves and cfg.sam_refine and cfg.refine_sam == "whole"
    reqs = {r.role: r for r in cls.requirements(cfg)}
    assert reqs["sam"].protocol.key() == "halves1024-a16"
    assert "embedding" not in reqs["sam"].tensors
    assert reqs["sam_refine"].model == "sam-b" and reqs["sam_refine"].tensors == ("embedding",)
    assert reqs["sam_refine"].protocol == Protocol("long", 1024, align=16)
    # refine_sam=halves [ours]: the halves' own embeddings, no whole-image set
    cfg = build_config(cls, "cityscapes", {"sam_refine": True, "refine_sam": "halves"})
    reqs = {r.role: r for r in cls.requirements(cfg)}
    assert "sam_refine" not in reqs and "embedding" in reqs["sam"].tensors
    assert reqs["sam"].protocol.key() == "halves1024-a16"
    # SAM-H with CLIP-H: the whole-image set is SAM-H's too
    cfg = build_config(cls, "cityscapes", {"sam_refine": True, "clip_model": "clip-h14"})
    (whole,) = [r for r in cls.requirements(cfg) if r.role == "sam_refine"]
    assert (whole.model, whole.protocol.key()) == ("sam-h", "long1024-a14")
    # sam_round_up=off [ours]: SAM sets of the original image
    cfg = build_config(cls, "cityscapes", {"sam_refine": True, "sam_round_up": False})
    reqs = {r.role: r.protocol.key() for r in cls.requirements(cfg)}
    assert (reqs["sam"], reqs["sam_refine"]) == ("halves1024", "long1024")
    with pytest.raises(OvssError, match="refine_sam must be one of whole, halves"):
        build_config(cls, None, {"refine_sam": "left"})


def one_image_store(tmp_path, sam_protocol):
    """A one-image store with the CLIP and DINO windows and one SAM set."""
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((40, 70, 3), 90, np.uint8)).save(tmp_path / "imgs" / "a.png")
    recs = list_folder_images(tmp_path / "imgs")
    common = dict(store=str(tmp_path / "s.zarr"), random_init=True, dtype="float32")
    for model, proto, arch in (
        ("clip-b16", WIN, TINY_CLIP),
        ("dino-b16", WIN, TINY_VIT),
        ("sam-b", sam_protocol, TINY_SAM),
    ):
        extract(recs, ExtractConfig(models=[model], protocol=proto, arch_overrides=arch, **common))
    return FeatureStore.open(tmp_path / "s.zarr")


def test_halves_need_the_halves_set_and_name_the_extract_command(tmp_path):
    only_whole = one_image_store(tmp_path, LONG)
    cls = get_method("trident")
    with pytest.raises(ProvenanceMismatchError) as err:
        cls(only_whole, build_config(cls, None, {**OPTS, "sam_halves": True}))
    msg = render_error(err.value)
    assert "sam-b@halves256-a16" in msg and "--resize halves --size 256 --align 16" in msg
    assert "--for trident --dataset" in msg


def half_reference(seg, index, v, affinity=None):
    """Per half: the spliced canvas sampled onto the half's SAM grid, aggregated with that
    half's own affinity (from its own window of the halves set), scored."""
    from methods.sam_cache import sam_frame, sam_static, sam_window
    from methods.trident import sam_tokens, window_outputs

    cfg = seg.config
    c, clip, vfm = seg._windows(index)
    outs = window_outputs(clip, vfm, seg.block, cfg.beta, cfg.gamma, cfg.threshold_mean)
    spliced = splice_windows(outs, c.win_box, c.win_pad, c.resized_size, 16)
    fs = seg.sets["sam"]
    f = sam_frame(fs.read(index), fs.protocol)  # the rounded image, split at its width // 2
    hc, wc = c.resized_size
    th, tw, d = spliced.shape
    w = f.original_size[1]
    assert w == HALVES.rounded_size(*c.original_size)[1] and w % 2 == 0
    text = F.normalize(v.embeddings.float(), dim=-1)
    out = []
    for k, (a, b) in enumerate(((0, w // 2), (w // 2, w))):
        tokens = sam_tokens(sam_window(f, k), sam_static(fs))
        vh, vw = tokens.grid
        y1, x1, y2, x2 = (int(t) for t in f.win_box[k])
        rh, rw = y2 - y1, x2 - x1
        assert (vh, vw) == (rh // 16, rw // 16)
        lo, hi = Fraction(a * wc, w), Fraction(b * wc, w)
        cy = [Fraction((2 * r + 1) * hc, 2 * vh) for r in range(vh)]
        cx = [lo + (2 * s + 1) * (hi - lo) / (2 * vw) for s in range(vw)]
        x = torch.einsum(
            "ty,yxd,sx->tsd",
            resample_matrix(cy, 0, hc, th, spliced.dtype),
            spliced,
            resample_matrix(cx, 0, wc, tw, spliced.dtype),
        ).reshape(vh * vw, d)
        wmat = affinity(k, tokens) if affinity else sam_affinity(tokens, [None], "aff", 1.2)[0]
        out.append(seg._features_to_cos(wmat @ x, text).T.reshape(-1, vh, vw))
    return out


@pytest.mark.parametrize("index", range(len(SIZES)))
def test_halves_each_use_their_own_affinity_side_by_side(store, index):
    v = vocab()
    seg = segmenter(store, sam_halves=True)
    assert seg.sets["sam"].key == "sam-b@halves256-a16"
    cos, size = seg.cosine_logits(index, v)
    left, right = half_reference(seg, index, v)
    assert left.shape[1] == right.shape[1]  # the test images' halves are taller than wide
    assert size == (left.shape[1], left.shape[2] + right.shape[2]) and cos.shape == (5, *size)
    torch.testing.assert_close(cos, torch.cat([left, right], dim=2), atol=2e-5, rtol=0)
    labels, _, _ = segment_image(seg, index, v, ScoringConfig())
    assert labels.shape == SIZES[index]


@pytest.mark.parametrize("index", range(len(SIZES)))
def test_equal_halves_without_correlation_are_the_whole_path_on_the_combined_grid(
    store, index, monkeypatch
):
    """An independent check of the halves' geometry (``half_reference`` follows the code).

    With ``correlation="none"`` a SAM token's logits are the scoring of the spliced canvas
    sampled at the token's cell centre (scoring is per token). Two equal halves of ``vh x vw``
    cells (the test images' rounded widths are even, and the halves taller than wide) have their
    cell centres at ``(2s + 1) Wc / (4 vw)`` and ``Wc / 2 +`` the same, i.e. at
    ``(2j + 1) Wc / (2 * 2vw)`` for ``j < 2vw``: the uniform centres of one ``vh x 2vw`` grid,
    which the whole-image path samples with ``resize_grid`` (``F.interpolate``, bilinear,
    ``align_corners=False``). So the halves side by side equal the whole-image path run with
    SAM's grid set to the combined ``(vh, 2vw)``, up to float rounding (exact rational weights
    in ``resample_matrix`` against ``F.interpolate``'s float32 source coordinates).

    It is not the whole-image path's own output resampled to that grid: scoring (``out_proj``,
    ``ln_post``, ``proj``, l2-normalisation) is not linear and does not commute with bilinear
    resampling, and the whole-image set's grid is a different one (10 x 16 for image 0 against
    16 x 24 here)."""
    v = vocab()
    halves = segmenter(store, sam_halves=True, correlation="none")
    cos, size = halves.cosine_logits(index, v)
    (vh, vw), right = (part.tokens.grid for part in halves._sam_parts(index))
    assert right == (vh, vw) and size == (vh, 2 * vw) and cos.shape == (5, vh, 2 * vw)
    whole = segmenter(store, correlation="none")
    assert whole._sam(index).grid != size
    combined = SamTokens(grid=(vh, 2 * vw), values=torch.empty(0), attn_head=None)
    monkeypatch.setattr(whole, "_sam", lambda i: combined)
    cos_whole, size_whole = whole.cosine_logits(index, v)
    assert size_whole == size
    torch.testing.assert_close(cos, cos_whole, atol=1e-5, rtol=0)


def test_halves_affinities_are_independent_blocks(store, monkeypatch):
    """Each half's logits depend only on its own SAM window: replacing the right half's
    affinity by the identity leaves the left half's logits bit for bit unchanged, and the right
    half's become the identity-aggregated reference of that half."""
    import methods.trident as trident

    v = vocab()
    seg = segmenter(store, sam_halves=True)
    cos, _ = seg.cosine_logits(0, v)
    calls = []
    real = trident.sam_affinity

    def spy(sam, groups, *a):
        calls.append((sam.grid, groups))
        (wmat,) = real(sam, groups, *a)
        if len(calls) % 2 == 0:  # the right half
            wmat = torch.eye(wmat.shape[0])
        return [wmat]

    monkeypatch.setattr(trident, "sam_affinity", spy)
    cos_id, _ = seg.cosine_logits(0, v)
    f = seg.sets["sam"].read(0, names=[])
    extents = [(int(y2 - y1), int(x2 - x1)) for y1, x1, y2, x2 in f.win_box]
    assert [g for g, _ in calls] == [(h // 16, w // 16) for h, w in extents]
    assert all(groups == [None] for _, groups in calls)
    vw_left = calls[0][0][1]
    torch.testing.assert_close(cos_id[..., :vw_left], cos[..., :vw_left], atol=0, rtol=0)
    assert (cos_id[..., vw_left:] - cos[..., vw_left:]).abs().max() > 1e-4
    left, right = half_reference(seg, 0, v, lambda k, t: torch.eye(t.grid[0] * t.grid[1]))
    torch.testing.assert_close(cos_id[..., vw_left:], right, atol=2e-5, rtol=0)


# --- SAM refinement per half ---------------------------------------------------------------------

REFINE = {"sam_refine": True, "coarse_thresh": 0.0, "minimal_area": 4, "sam_iou_thresh": -1.0}
HALVES_REFINE = {**REFINE, "sam_halves": True, "refine_sam": "halves"}


def half_predictor(store, index, k):
    """A predictor set to half ``k`` of image ``index`` of the halves set (``sam_window`` of
    SAM's frame, the rounded image)."""
    from methods.sam_cache import CachedSamPredictor, load_sam_decoder_for, sam_frame, sam_window

    fs = store.require("sam-b", HALVES)
    pred = CachedSamPredictor(load_sam_decoder_for(fs))
    pred.set_features(sam_window(sam_frame(fs.read(index, names=["embedding"]), HALVES), k))
    return pred


@pytest.mark.parametrize("refine_sam", ["whole", "halves"])
@pytest.mark.parametrize("index", range(len(SIZES)))
def test_halves_refinement_runs_end_to_end(store, index, refine_sam):
    v = vocab()
    seg = segmenter(store, sam_halves=True, **{**REFINE, "refine_sam": refine_sam})
    assert seg.sets["sam"].key == "sam-b@halves256-a16"
    assert ("sam_refine" in seg.sets) == (refine_sam == "whole")
    labels, max_prob, _ = segment_image(seg, index, v, ScoringConfig())
    assert labels.shape == SIZES[index] and max_prob.shape == SIZES[index]
    assert labels.min() >= 0 and labels.max() <= 3 and np.isfinite(max_prob).all()
    coarse, coarse_prob, _ = segment_image(
        segmenter(store, sam_halves=True), index, v, ScoringConfig()
    )
    assert not np.array_equal(max_prob, coarse_prob)  # the refinement changed scores


@pytest.mark.parametrize("index", range(len(SIZES)))
def test_halves_refinement_is_the_refinement_of_each_half(store, index):
    """``refine_sam=halves``: each half of the result is exactly ``refine_with_sam`` run on
    that half's probability slice (original columns split at ``W // 2``), with prompts from
    that slice and a predictor set to that half's cached embedding (its image: the half of the
    rounded image, input size = its ``halves_layout`` size; the masks are resized to the
    slice)."""
    from methods.segment import class_probabilities

    v = vocab()
    h, w = SIZES[index]
    labels, max_prob, cos = segment_image(
        segmenter(store, sam_halves=True), index, v, ScoringConfig()
    )
    seg = segmenter(store, **HALVES_REFINE)
    new, prob = seg.refine(index, cos, labels, max_prob, v, ScoringConfig())
    assert new.shape == (h, w) and prob.shape == (h, w)
    probs = class_probabilities(cos, (h, w), v, ScoringConfig())
    coarse = torch.from_numpy(labels.astype(np.int64))
    layout = HALVES.halves_layout(h, w)
    hr, wr = HALVES.rounded_size(h, w)
    for k, ((x1, x2, rh, rw), (a, b)) in enumerate(
        zip(layout, ((0, w // 2), (w // 2, w)), strict=True)
    ):
        assert (x1, x2) == ((0, wr // 2), (wr // 2, wr))[k]
        pred = half_predictor(store, index, k)
        assert pred.original_size == (hr, x2 - x1) and pred.input_size == (rh, rw)
        p, c = probs[:, :, a:b].contiguous(), coarse[:, a:b].contiguous()
        prompts = refinement_prompts(p, c, coarse_thresh=0.0, minimal_area=4, down=2)
        assert prompts.classes and prompts.reduced_size == (h // 2, (b - a) // 2)
        want, scores = refine_with_sam(
            pred, p, c, prompts, coarse_thresh=0.0, alpha=0.005, iou_thresh=-1.0
        )
        assert want.shape == (h, b - a)
        np.testing.assert_array_equal(new[:, a:b], want.numpy())
        best = scores.max(dim=0).values
        assert (best > 0).any()
        want_prob = torch.where(best > 0, best, torch.from_numpy(max_prob[:, a:b]))
        np.testing.assert_array_equal(prob[:, a:b], want_prob.numpy())


def test_halves_refinement_keeps_a_half_without_prompts(store):
    """A half whose probabilities never reach ``coarse_thresh`` gets no prompt and keeps its
    coarse labels and probabilities; the other half is refined."""
    v = vocab()
    h, w = SIZES[0]
    cos = torch.zeros(5, h, w)
    cos[1, :, : w // 2] = 1.0  # left: class 1 at probability ~1; right: uniform (0.2 / 0.4)
    labels = np.zeros((h, w), dtype=np.int64)
    labels[:, : w // 2] = 1
    max_prob = np.full((h, w), 0.25, dtype=np.float32)
    seg = segmenter(store, **{**HALVES_REFINE, "coarse_thresh": 0.5})
    new, prob = seg.refine(0, cos, labels, max_prob, v, ScoringConfig())
    right = slice(w // 2, w)
    np.testing.assert_array_equal(new[:, right], labels[:, right])
    np.testing.assert_array_equal(prob[:, right], max_prob[:, right])
    left = slice(0, w // 2)
    assert (prob[:, left] != 0.25).any() and (new[:, left][prob[:, left] != 0.25] == 1).all()
    # neither half with a prompt: the inputs come back unchanged
    same, same_prob = seg.refine(0, torch.zeros(5, h, w), labels, max_prob, v, ScoringConfig())
    assert same is labels and same_prob is max_prob


def test_whole_image_refinement_is_refine_with_sam_on_the_whole_image(store, predictor):
    """Without ``sam_halves`` the hook is one ``refine_with_sam`` on the whole image."""
    from methods.segment import class_probabilities

    v = vocab()
    labels, max_prob, cos = segment_image(segmenter(store), 0, v, ScoringConfig())
    new, prob = segmenter(store, **REFINE).refine(0, cos, labels, max_prob, v, ScoringConfig())
    probs = class_probabilities(cos, labels.shape, v, ScoringConfig())
    coarse = torch.from_numpy(labels.astype(np.int64))
    prompts = refinement_prompts(probs, coarse, coarse_thresh=0.0, minimal_area=4, down=2)
    want, scores = refine_with_sam(
        predictor, probs, coarse, prompts, coarse_thresh=0.0, iou_thresh=-1.0
    )
    np.testing.assert_array_equal(new, want.numpy())
    best = scores.max(dim=0).values
    want_prob = torch.where(best > 0, best, torch.from_numpy(max_prob))
    np.testing.assert_array_equal(prob, want_prob.numpy())


# --- SAM refinement on the whole image with the halves' affinity (the reference's Cityscapes) ----


def whole_predictor(store, index):
    """A predictor set to image ``index`` of the whole-image SAM set (SAM's frame)."""
    from methods.sam_cache import CachedSamPredictor, load_sam_decoder_for, sam_frame

    fs = store.require("sam-b", LONG)
    pred = CachedSamPredictor(load_sam_decoder_for(fs))
    pred.set_features(sam_frame(fs.read(index, names=["embedding"]), LONG))
    return pred


@pytest.mark.parametrize("index", range(len(SIZES)))
def test_halves_refinement_on_the_whole_image_is_refine_with_sam(store, index):
    """``refine_sam=whole`` (default, the reference): the logits come from the halves' affinity,
    and the refinement is one ``refine_with_sam`` on the whole probability map with a predictor
    set to the whole-image set's embedding (its image: the rounded one, as the reference)."""
    from methods.segment import class_probabilities

    v = vocab()
    h, w = SIZES[index]
    labels, max_prob, cos = segment_image(
        segmenter(store, sam_halves=True), index, v, ScoringConfig()
    )
    seg = segmenter(store, sam_halves=True, **REFINE)
    assert seg.config.refine_sam == "whole"
    assert seg.sets["sam"].key == "sam-b@halves256-a16"
    assert seg.sets["sam_refine"].key == "sam-b@long256-a16"
    cos_refine, _ = seg.cosine_logits(index, v)
    assert torch.equal(cos_refine, cos)  # the whole-image set is read by the refinement only
    new, prob = seg.refine(index, cos, labels, max_prob, v, ScoringConfig())
    probs = class_probabilities(cos, (h, w), v, ScoringConfig())
    coarse = torch.from_numpy(labels.astype(np.int64))
    prompts = refinement_prompts(probs, coarse, coarse_thresh=0.0, minimal_area=4, down=2)
    assert prompts.classes and prompts.reduced_size == (h // 2, w // 2)
    pred = whole_predictor(store, index)
    assert pred.original_size == LONG.rounded_size(h, w) != (h, w)
    want, scores = refine_with_sam(
        pred, probs, coarse, prompts, coarse_thresh=0.0, alpha=0.005, iou_thresh=-1.0
    )
    np.testing.assert_array_equal(new, want.numpy())
    best = scores.max(dim=0).values
    assert (best > 0).any()
    want_prob = torch.where(best > 0, best, torch.from_numpy(max_prob))
    np.testing.assert_array_equal(prob, want_prob.numpy())
    # the per-half refinement [ours] decodes other embeddings: other scores
    _, halves_prob = segmenter(store, **HALVES_REFINE).refine(
        index, cos, labels, max_prob, v, ScoringConfig()
    )
    assert not np.array_equal(halves_prob, prob)


def test_refine_sam_changes_nothing_without_halves(store):
    v = vocab()
    cls = get_method("trident")
    whole, halves = (build_config(cls, None, {**OPTS, **REFINE, "refine_sam": r}) for r in
                     ("whole", "halves"))  # fmt: skip
    assert cls.requirements(whole) == cls.requirements(halves)
    assert whole.refine_protocol == halves.refine_protocol == LONG
    labels, max_prob, cos = segment_image(segmenter(store), 1, v, ScoringConfig())
    a = segmenter(store, **REFINE).refine(1, cos, labels, max_prob, v, ScoringConfig())
    b = segmenter(store, **REFINE, refine_sam="halves").refine(
        1, cos, labels, max_prob, v, ScoringConfig()
    )
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_whole_image_refinement_needs_the_whole_image_set(tmp_path):
    """A store with the halves set only: the affinity and the per-half refinement work; the
    reference's whole-image refinement names the one command that adds its set."""
    only_halves = one_image_store(tmp_path, HALVES)
    cls = get_method("trident")
    halves = {**OPTS, "sam_halves": True}
    cls(only_halves, build_config(cls, None, halves))
    cls(
        only_halves, build_config(cls, None, {**halves, "sam_refine": True, "refine_sam": "halves"})
    )
    with pytest.raises(ProvenanceMismatchError) as err:
        cls(only_halves, build_config(cls, None, {**halves, "sam_refine": True}))
    msg = render_error(err.value)
    assert "\n" not in msg and "'sam-b@long256-a16'" in msg and "refine_sam=halves" in msg
    assert msg.endswith(
        f"run: ovss extract --store {only_halves.path} --model sam-b --resize long --size 256 "
        "--align 16 <images or --dataset ...>"
    )


def test_requirements_of_other_backbone_pairs_match_the_recipe():
    """The README's backbone pairs: ``-m`` at extraction = ``--set`` at segmentation."""
    from methods.plan import plan_for as recipe_for

    cls = get_method("trident")
    for models, sets in (
        (("clip-l14",), {"clip_model": "clip-l14"}),
        (("clip-h14",), {"clip_model": "clip-h14"}),
        (("dinov2-b14",), {"vfm_model": "dinov2-b14"}),
        (("sam-l",), {"sam_model": "sam-l"}),
        (("clip-h14", "dinov2-l14"), {"clip_model": "clip-h14", "vfm_model": "dinov2-l14"}),
    ):
        steps = {
            s.role: (s.model, s.protocol) for s in recipe_for("trident", "voc21", models).steps
        }
        reqs = {
            r.role: (r.model, r.protocol)
            for r in cls.requirements(build_config(cls, "voc21", sets))
        }
        assert reqs == steps, models


# --- through the CLI ------------------------------------------------------------------------------


def tiny_text_args():
    """A seeded random-init text tower of the tiny CLIP's width (32)."""
    flat = {"embed_dim": TINY_CLIP["embed_dim"]}
    for tower in ("vision_cfg", "text_cfg"):
        flat.update({f"{tower}.{k}": v for k, v in TINY_CLIP[tower].items()})
    args = ["--text-random-init", "--templates", "single"]
    for k, v in flat.items():
        args += ["--text-arch-override", f"{k}={v}"]
    return args


CLI_SETS = [
    f"--set={k}={v}"
    for k, v in {**OPTS, "coarse_thresh": 0.0, "minimal_area": 4, "sam_iou_thresh": -1.0}.items()
]


def test_cli_segment_and_eval_with_sam_refine(store, tmp_path):
    import json
    import shutil
    from pathlib import Path

    from click.testing import CliRunner

    from featurestore.text import load_text_embeddings, parse_vocab
    from methods.segment import vocab_from_text
    from ovss_cli.main import cli

    path = tmp_path / "s.zarr"
    shutil.copytree(store.path, path)  # the CLI caches text sets in it
    data = Path(store.path).parent / "data"
    out = tmp_path / "seg"
    r = CliRunner()
    res = r.invoke(
        cli,
        ["segment", "--store", str(path), "--classes", ",".join(CLASSES), "--method", "trident",
         "--sam-refine", "--out", str(out), "-q", "--json", *CLI_SETS, *tiny_text_args()],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["images"] == 2 and summary["method"] == "trident"
    assert summary["config"]["sam_refine"] is True and summary["config"]["refine_sam"] == "whole"
    assert json.loads((out / "segment.json").read_text())["config"] == summary["config"]
    # the PNGs are the Python driver's refined labels
    fs = FeatureStore.open(path)
    te = load_text_embeddings(fs, "clip-b16", parse_vocab(",".join(CLASSES)), "single")
    seg = segmenter(fs, **REFINE)
    for i, (h, w) in enumerate(SIZES):
        png = np.asarray(Image.open(out / f"im{i}.png"))
        assert png.shape == (h, w) and (out / f"im{i}_overlay.png").exists()
        labels, _, _ = segment_image(seg, i, vocab_from_text(te), ScoringConfig())
        np.testing.assert_array_equal(png, labels)
    # eval: SAM halves for the affinity, the whole-image set for the refinement (recorded)
    res = r.invoke(
        cli,
        ["eval", "--dataset", "custom", "--data-root", str(data), "--split", "val", "--store",
         str(path), "--method", "trident", "--sam-refine", "--set", "sam_halves=on", "-q",
         "--json", "--out-json", str(tmp_path / "eval.json"), *CLI_SETS, *tiny_text_args()],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["images"] == 2 and not d["skipped"] and 0.0 <= d["metrics"]["mIoU"] <= 100.0
    prot = d["protocol"]
    assert prot["method"] == "trident"
    assert prot["config"]["sam_halves"] is True and prot["config"]["refine_sam"] == "whole"
    assert prot["backbones"]["sam"]["feature_set"] == "sam-b@halves256-a16"
    assert prot["backbones"]["sam_refine"]["feature_set"] == "sam-b@long256-a16"
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == d["metrics"]
