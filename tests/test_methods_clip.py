"""maskclip / proxyclip segmenters on stores extracted with tiny random-init CLIP and DINO."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.errors import OvssError
from featurestore.extract import ExtractConfig, extract
from featurestore.images import list_folder_images
from featurestore.protocol import Protocol
from featurestore.store import FeatureStore
from methods.base import ScoringConfig, Vocab, build_config, get_method
from methods.clip_dense import LastBlock, maskclip_dense
from methods.proxyclip import proxy_attention, proxy_window_features
from methods.segment import segment_image
from ovss_cli.hints import render_error

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
    "text_cfg": {"layers": 2, "width": 64, "heads": 2},
}
TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("m")
    rng = np.random.default_rng(0)
    (tmp / "imgs").mkdir()
    for i, (h, w) in enumerate([(60, 90), (112, 70)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            tmp / "imgs" / f"a{i}.png"
        )
    recs = list_folder_images(tmp / "imgs")
    p_mask = Protocol(resize="short", size=64, crop=48, stride=32)
    p_proxy = Protocol(resize="short", size=128, crop=112, stride=56, pad_multiple=56)
    common = dict(store=str(tmp / "s.zarr"), random_init=True, dtype="float32", block_mb=1)
    extract(
        recs,
        ExtractConfig(models=["clip-b16"], protocol=p_mask, arch_overrides=TINY_CLIP, **common),
    )
    extract(
        recs,
        ExtractConfig(models=["clip-b16"], protocol=p_proxy, arch_overrides=TINY_CLIP, **common),
    )
    extract(
        recs, ExtractConfig(models=["dino-b8"], protocol=p_proxy, arch_overrides=TINY_VIT, **common)
    )
    return FeatureStore.open(tmp / "s.zarr"), p_mask, p_proxy


def vocab(e=32, q=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(q, e, generator=g), dim=-1)
    return Vocab([[f"c{i}"] for i in range(q - 1)], emb, torch.tensor([0, 1, 2, 3, 3]))


def test_maskclip_logits_match_direct_window_computation(stores):
    store, p, _ = stores
    cls = get_method("maskclip")
    seg = cls(store, build_config(cls, None, {"size": 64, "crop": 48, "stride": 32}))
    fs = seg.sets["clip"]
    f = fs.read(1)
    block = LastBlock.from_feature_set(fs)
    v = vocab()
    cos, canvas = seg.cosine_logits(1, v)
    assert canvas == f.resized_size and cos.shape == (5, *canvas)
    # one window directly: its logits on the token grid, upsampled, must appear in the canvas
    # wherever only that window covers a pixel
    boxes = f.win_box
    g0 = f.window_tokens("pre_last")[0]
    gh, gw = g0.shape[:2]
    feat = maskclip_dense(torch.from_numpy(g0.reshape(gh * gw, -1)), None, block)
    direct = (
        torch.nn.functional.normalize(feat, dim=-1)
        @ torch.nn.functional.normalize(v.embeddings, dim=-1).T
    )
    from methods.base import window_logits_to_box

    win = window_logits_to_box(direct.T.reshape(-1, gh, gw), boxes[0], f.win_pad[0])
    y1, x1, y2, x2 = boxes[0]
    covered = np.zeros(canvas, int)
    for b in boxes:
        covered[b[0] : b[2], b[1] : b[3]] += 1
    only = torch.from_numpy(covered[y1:y2, x1:x2] == 1)
    assert only.any()
    torch.testing.assert_close(cos[:, y1:y2, x1:x2][:, only], win[:, only], atol=1e-5, rtol=0)
    labels, _, _ = segment_image(seg, 1, v, ScoringConfig())
    assert labels.shape == tuple(store.root["images/size"][1]) and labels.max() <= 3


def test_proxy_attention_invariants():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    a = proxy_attention(x, 1.2, 3.0).double()
    torch.testing.assert_close(a.sum(-1), torch.ones(40, dtype=torch.float64))
    f = torch.nn.functional.normalize(x, dim=-1)
    s = f @ f.T
    s = (s - 1.2 * s.mean()) * 3.0
    far = s.abs() > 1e-4
    assert (a[(s < 0) & far] == 0).all() and (a[(s > 0) & far] > 0).all()
    assert torch.diagonal(a).gt(0).all()  # self-similarity 1 is always above the threshold


def test_proxy_features_equal_reference_loop(stores):
    store, _, p = stores
    fs_c = store.require("clip-b16", p)
    fs_d = store.require("dino-b8", p)
    block = LastBlock.from_feature_set(fs_c)
    c, d = fs_c.read(0), fs_d.read(0)
    assert np.array_equal(c.win_box, d.win_box)
    cg, vg = c.window_tokens("pre_last")[0], d.window_tokens("patch")[0]
    ch, cw = cg.shape[:2]
    vh, vw = vg.shape[:2]
    assert (vh, vw) == (2 * ch, 2 * cw)  # B/8 vs B/16 on the same padded crop
    ct = torch.from_numpy(cg.reshape(ch * cw, -1))
    vt = torch.from_numpy(vg.reshape(vh * vw, -1))
    got = proxy_window_features(ct, (ch, cw), vt, (vh, vw), block, 1.2, 3.0)
    # reference: head by head, written out from METHODS.md §3
    v = block.values(ct)  # (N, D)
    heads = block.num_heads
    a = proxy_attention(vt, 1.2, 3.0)
    outs = []
    for h in range(heads):
        vh_ = v[:, h * block.head_dim : (h + 1) * block.head_dim].T.reshape(-1, ch, cw)
        vh_ = torch.nn.functional.interpolate(
            vh_[None], size=(vh, vw), mode="bilinear", align_corners=False
        )[0]
        outs.append(a @ vh_.reshape(block.head_dim, -1).T)
    o = block.out_proj(torch.cat(outs, dim=1))
    want = block.project(o)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_proxyclip_segments_and_reports_missing_vfm(stores):
    store, _, p = stores
    cls = get_method("proxyclip")
    cfg = build_config(cls, None, {"size": 128, "crop": 112, "stride": 56})
    seg = cls(store, cfg)
    labels, _, _ = segment_image(seg, 0, vocab(), ScoringConfig())
    assert labels.shape == tuple(store.root["images/size"][0])
    with pytest.raises(OvssError) as err:
        cls(
            store,
            build_config(
                cls, None, {"size": 128, "crop": 112, "stride": 56, "vfm_model": "dinov2-b14"}
            ),
        )
    assert "ovss extract --store" in render_error(err.value)
    assert cls.presets("ade20k") == {
        "size": 448,
        "crop": 336,
        "stride": 112,
        "beta": 1.2,
        "gamma": 3.0,
    }
    assert cls.scoring_presets("voc21") == {"prob_thd": 0.2, "logit_scale": 40.0}


def test_cli_segment_images_on_the_fly(tmp_path):
    import json

    from click.testing import CliRunner

    from ovss_cli.main import cli

    rng = np.random.default_rng(3)
    img = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(img)
    tiny = [
        "embed_dim=32",
        "vision_cfg.layers=2",
        "vision_cfg.width=64",
        "vision_cfg.heads=2",
        "text_cfg.layers=2",
        "text_cfg.width=64",
        "text_cfg.heads=2",
    ]
    args = [
        "segment",
        "--images",
        str(img),
        "--classes",
        "sky,tree",
        "--method",
        "maskclip",
        "--set",
        "size=64",
        "--set",
        "crop=48",
        "--set",
        "stride=32",
        "--templates",
        "single",
        "--random-init",
        "--text-random-init",
        "--out",
        str(tmp_path / "o"),
        "-q",
        "--json",
        "--keep-store",
        str(tmp_path / "kept.zarr"),
    ]
    for t in tiny:
        args += ["--arch-override", t, "--text-arch-override", t]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["images"] == 1
    labels = np.asarray(Image.open(tmp_path / "o" / "photo.png"))
    assert labels.shape == (50, 70) and labels.max() <= 1
    assert FeatureStore.open(tmp_path / "kept.zarr").feature_sets() == ["clip-b16@short64-c48s32"]
