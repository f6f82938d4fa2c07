"""sclip / clearclip / naclip: the formulas against plain float64 loops (and broken variants),
the segmenters on a tiny random-init store, presets, the position-embedding rule, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from featurestore.errors import MissingFeatureSetError, OvssError
from featurestore.extract import ExtractConfig, extract
from featurestore.images import list_folder_images
from featurestore.protocol import Protocol
from featurestore.store import FeatureStore
from methods.base import ScoringConfig, Vocab, build_config, get_method
from methods.clip_dense import LastBlock
from methods.evaluate import EvalResult
from methods.last_block import gaussian_omega, last_block_attention, last_block_features
from methods.plan import plan_for
from methods.reference import check_reference
from methods.segment import segment_image
from ovss_cli.hints import render_error
from ovss_cli.main import cli

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
    "text_cfg": {"layers": 2, "width": 64, "heads": 2},
}
TINY_ARGS = [
    "--text-arch-override",
    "embed_dim=32",
    "--text-arch-override",
    "text_cfg.layers=2",
    "--text-arch-override",
    "text_cfg.width=64",
    "--text-arch-override",
    "text_cfg.heads=2",
]


# --------------------------------------------------------------------------------------------
# The formulas, against loops
# --------------------------------------------------------------------------------------------


def random_block(d=16, heads=2, e=8, m=32, seed=0, dtype=torch.float64) -> LastBlock:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return LastBlock(
        ln_1_weight=1 + r(d, scale=0.1),
        ln_1_bias=r(d, scale=0.1),
        in_proj_weight=r(3 * d, d),
        in_proj_bias=r(3 * d, scale=0.2),
        out_proj_weight=r(d, d),
        out_proj_bias=r(d, scale=0.2),
        ln_2_weight=1 + r(d, scale=0.1),
        ln_2_bias=r(d, scale=0.1),
        c_fc_weight=r(m, d),
        c_fc_bias=r(m, scale=0.1),
        c_proj_weight=r(d, m),
        c_proj_bias=r(d, scale=0.1),
        ln_post_weight=1 + r(d, scale=0.1),
        ln_post_bias=r(d, scale=0.1),
        proj=r(d, e),
        num_heads=heads,
        activation="quick_gelu",
    )


def _ln(v, w, b, eps):
    mu = sum(v) / len(v)
    var = sum((a - mu) ** 2 for a in v) / len(v)
    return [
        (a - mu) / math.sqrt(var + eps) * float(wi) + float(bi)
        for a, wi, bi in zip(v, w, b, strict=True)
    ]


def _lin(v, weight, bias):
    return [
        sum(float(weight[i, j]) * v[j] for j in range(len(v))) + float(bias[i])
        for i in range(weight.shape[0])
    ]


def _softmax(row):
    m = max(row)
    ex = [math.exp(a - m) for a in row]
    s = sum(ex)
    return [a / s for a in ex]


def reference_loop(
    variant,
    tokens,
    cls,
    grid,
    b: LastBlock,
    sigma=5.0,
    *,
    residual=None,
    ffn=None,
    mean_not_sum=False,
    omega_grid=None,
    omega_scaled=False,
    omega_cls=False,
    drop_cls_before=False,
):
    """One window, token by token and head by head, in Python floats. The keyword flags build
    deliberately broken variants (the defaults are each method's own formula)."""
    residual = (variant == "sclip") if residual is None else residual
    ffn = (variant == "sclip") if ffn is None else ffn
    rows_o, cols_o = omega_grid or grid
    x = [list(map(float, cls))] + [list(map(float, t)) for t in tokens]
    if drop_cls_before:
        x = x[1:]
    t_n, d, h, hd = len(x), b.width, b.num_heads, b.head_dim
    y = [_ln(v, b.ln_1_weight, b.ln_1_bias, b.eps) for v in x]
    qkv = [_lin(v, b.in_proj_weight, b.in_proj_bias) for v in y]
    s = hd**-0.5

    def omega(i, j):
        first = 0 if drop_cls_before else 1
        if i < first or j < first:
            return 1.0 if omega_cls else 0.0
        pi, pj = i - first, j - first
        ri, ci = divmod(pi, cols_o)
        rj, cj = divmod(pj, cols_o)
        return math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * sigma**2))

    attn_out = [[0.0] * d for _ in range(t_n)]
    for head in range(h):
        q = [v[head * hd : (head + 1) * hd] for v in qkv]
        k = [v[d + head * hd : d + (head + 1) * hd] for v in qkv]
        val = [v[2 * d + head * hd : 2 * d + (head + 1) * hd] for v in qkv]
        for i in range(t_n):

            def dots(a, bb, i=i):
                return [
                    s * sum(p * r for p, r in zip(a[i], bb[j], strict=True)) for j in range(t_n)
                ]

            if variant == "sclip":
                a1, a2 = _softmax(dots(q, q)), _softmax(dots(k, k))
                w = [(p + r) / (2 if mean_not_sum else 1) for p, r in zip(a1, a2, strict=True)]
            elif variant == "clearclip":
                w = _softmax(dots(q, q))
            else:
                sc = s if omega_scaled else 1.0
                w = _softmax([a + sc * omega(i, j) for j, a in enumerate(dots(k, k))])
            for c in range(hd):
                attn_out[i][head * hd + c] = sum(w[j] * val[j][c] for j in range(t_n))
    out = []
    for i in range(t_n):
        o = _lin(attn_out[i], b.out_proj_weight, b.out_proj_bias)
        if residual:
            o = [p + r for p, r in zip(o, x[i], strict=True)]
        if ffn:
            hmid = _lin(_ln(o, b.ln_2_weight, b.ln_2_bias, b.eps), b.c_fc_weight, b.c_fc_bias)
            hmid = [a / (1 + math.exp(-1.702 * a)) for a in hmid]
            o = [p + r for p, r in zip(o, _lin(hmid, b.c_proj_weight, b.c_proj_bias), strict=True)]
        z = _ln(o, b.ln_post_weight, b.ln_post_bias, b.eps)
        out.append(
            [sum(z[j] * float(b.proj[j, e]) for j in range(d)) for e in range(b.proj.shape[1])]
        )
    return torch.tensor(out[0 if drop_cls_before else 1 :], dtype=torch.float64)


BROKEN = {
    "sclip": [
        {"residual": False},
        {"ffn": False},
        {"mean_not_sum": True},
        {"drop_cls_before": True},
    ],
    "clearclip": [{"residual": True}, {"ffn": True}, {"drop_cls_before": True}],
    "naclip": [
        {"residual": True},
        {"ffn": True},
        {"omega_grid": (4, 3)},  # the grid transposed (3 rows, 4 columns is the truth)
        {"sigma": 4.0},
        {"omega_scaled": True},
        {"omega_cls": True},
        {"drop_cls_before": True},
    ],
}


@pytest.fixture(scope="module")
def window():
    g = torch.Generator().manual_seed(1)
    grid = (3, 4)  # non-square: rows = H/16, columns = W/16
    tokens = torch.randn(12, 16, generator=g, dtype=torch.float64)
    cls = torch.randn(16, generator=g, dtype=torch.float64)
    return tokens, cls, grid, random_block()


@pytest.mark.parametrize("variant", ["sclip", "clearclip", "naclip"])
def test_formula_equals_the_loop_and_no_broken_variant(variant, window):
    tokens, cls, grid, block = window
    ours = last_block_features(variant, tokens, cls, grid, block)
    ref = reference_loop(variant, tokens, cls, grid, block)
    assert ours.dtype == torch.float64 and ours.shape == (12, 8)
    assert (ours - ref).abs().max().item() <= 1e-9
    for flags in BROKEN[variant]:
        broken = reference_loop(variant, tokens, cls, grid, block, **flags)
        gap = (ours - broken).abs().max().item()
        assert gap > 1e-6, (variant, flags, gap)  # a broken formula would fail the 1e-9 check


def test_each_variant_differs_from_the_others(window):
    tokens, cls, grid, block = window
    feats = {
        v: last_block_features(v, tokens, cls, grid, block)
        for v in ("sclip", "clearclip", "naclip")
    }
    assert (feats["sclip"] - feats["clearclip"]).abs().max() > 1e-3
    assert (feats["clearclip"] - feats["naclip"]).abs().max() > 1e-3


def test_attention_rows_and_omega():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 7, 4, generator=g, dtype=torch.float64).unbind(0)
    q, k = q[None].expand(3, 7, 4), k[None].expand(3, 7, 4)
    assert torch.allclose(
        last_block_attention("sclip", q, k).sum(-1), torch.full((3, 7), 2.0, dtype=torch.float64)
    )
    assert torch.allclose(
        last_block_attention("clearclip", q, k).sum(-1), torch.ones(3, 7, dtype=torch.float64)
    )
    a = last_block_attention("naclip", q, k, (2, 3))
    assert torch.allclose(a.sum(-1), torch.ones(3, 7, dtype=torch.float64))
    om = gaussian_omega(2, 3, 5.0, torch.float64)
    assert om.shape == (7, 7) and om[0].abs().sum() == 0 and om[:, 0].abs().sum() == 0
    assert torch.allclose(torch.diagonal(om)[1:], torch.ones(6, dtype=torch.float64))
    # patch 0 at (0, 0), patch 5 at (1, 2): distance² 5
    assert om[1, 6].item() == pytest.approx(math.exp(-5 / 50), abs=1e-15)
    assert not torch.equal(gaussian_omega(2, 3), gaussian_omega(3, 2))
    with pytest.raises(ValueError, match="grid"):
        last_block_attention("naclip", q, k, (2, 2))
    with pytest.raises(ValueError, match="variant"):
        last_block_attention("maskclip", q, k)


def test_float32_close_to_float64(window):
    tokens, cls, grid, block = window
    for v in ("sclip", "clearclip", "naclip"):
        f64 = last_block_features(v, tokens, cls, grid, block)
        f32 = last_block_features(
            v, tokens.float(), cls.float(), grid, block.to(dtype=torch.float32)
        )
        assert f32.dtype == torch.float32
        assert (f32.double() - f64).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------
# The segmenters on a tiny store
# --------------------------------------------------------------------------------------------


SET = {"size": 64, "crop": 48, "stride": 32}
P = Protocol(resize="short", size=64, crop=48, stride=32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lb")
    rng = np.random.default_rng(0)
    (tmp / "imgs").mkdir()
    for i, (h, w) in enumerate([(60, 90), (112, 70)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            tmp / "imgs" / f"a{i}.png"
        )
    recs = list_folder_images(tmp / "imgs")
    extract(
        recs,
        ExtractConfig(
            models=["clip-b16"],
            protocol=P,
            arch_overrides=TINY_CLIP,
            store=str(tmp / "s.zarr"),
            random_init=True,
            dtype="float32",
            block_mb=1,
        ),
    )
    return FeatureStore.open(tmp / "s.zarr")


def vocab(q=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(q, 32, generator=g), dim=-1)
    return Vocab([[f"c{i}"] for i in range(q - 1)], emb, torch.tensor([0, 1, 2, 3, 3]))


@pytest.mark.parametrize("name", ["sclip", "clearclip", "naclip"])
def test_segmenter_window_logits_are_the_formula(store, name):
    cls = get_method(name)
    seg = cls(store, build_config(cls, None, {**SET, "pamr": "off"}))
    fs = seg.sets["clip"]
    f = fs.read(1)
    block = LastBlock.from_feature_set(fs)
    v = vocab()
    cos, canvas = seg.cosine_logits(1, v)
    assert canvas == f.resized_size and cos.shape == (5, *canvas)
    g0 = f.window_tokens("pre_last")[0]
    gh, gw = g0.shape[:2]
    feat = last_block_features(
        name,
        torch.from_numpy(g0.reshape(gh * gw, -1)),
        f.tensors["pre_last_cls"][0],
        (gh, gw),
        block,
    )
    direct = (
        torch.nn.functional.normalize(feat, dim=-1)
        @ torch.nn.functional.normalize(v.embeddings, dim=-1).T
    )
    from methods.base import window_logits_to_box

    up = window_logits_to_box(direct.T.reshape(-1, gh, gw), f.win_box[0], f.win_pad[0])
    y1, x1, y2, x2 = (int(a) for a in f.win_box[0])
    only = np.ones((y2 - y1, x2 - x1), bool)  # pixels of window 0 no other window covers
    for b in f.win_box[1:]:
        by1, bx1, by2, bx2 = (int(a) for a in b)
        only[max(by1 - y1, 0) : max(by2 - y1, 0), max(bx1 - x1, 0) : max(bx2 - x1, 0)] = False
    assert only.any()
    got = cos[:, y1:y2, x1:x2][:, torch.from_numpy(only)]
    assert torch.allclose(got, up[:, torch.from_numpy(only)], atol=1e-5)


def test_naclip_refines_with_pamr_and_sclip_does_not(store):
    v = vocab()
    scoring = ScoringConfig()
    nac = get_method("naclip")
    on = nac(store, build_config(nac, None, SET))
    assert on.config.pamr is True and on.config.sigma == 5.0
    off = nac(store, build_config(nac, None, {**SET, "pamr": "off"}))
    lab_on, _, cos_on = segment_image(on, 0, v, scoring)
    lab_off, _, cos_off = segment_image(off, 0, v, scoring)
    assert cos_on.shape[-2:] == (60, 90)  # refined at the original size
    assert cos_off.shape[-2:] == off.sets["clip"].read(0).resized_size
    assert not torch.allclose(
        cos_on, torch.nn.functional.interpolate(cos_off[None], (60, 90), mode="bilinear")[0]
    )
    sc = get_method("sclip")
    assert build_config(sc, None, SET).pamr is False
    with_pamr = sc(store, build_config(sc, None, {**SET, "pamr": "on", "pamr_steps": "2"}))
    assert segment_image(with_pamr, 0, v, scoring)[2].shape[-2:] == (60, 90)


def test_pamr_without_the_image_is_one_line(store, tmp_path):
    import shutil

    copy = tmp_path / "s.zarr"
    shutil.copytree(store.path, copy)
    moved = FeatureStore.open(copy)
    img = moved.image_records()[0].path
    backup = tmp_path / "keep.png"
    shutil.move(img, backup)
    try:
        nac = get_method("naclip")
        seg = nac(moved, build_config(nac, None, SET))
        with pytest.raises(
            OvssError, match="PAMR refines with the image.*moved or deleted.*pamr=off"
        ):
            segment_image(seg, 0, vocab(), ScoringConfig())
    finally:
        shutil.move(backup, img)


def test_a_set_made_with_another_rule_is_refused_then_readable(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(
        tmp_path / "imgs" / "x.png"
    )
    extract(
        list_folder_images(tmp_path / "imgs"),
        ExtractConfig(
            models=["clip-b16"],
            protocol=P,
            arch_overrides=TINY_CLIP,
            store=str(tmp_path / "s.zarr"),
            random_init=True,
            dtype="float32",
            pos_interp="size",
        ),
    )
    st = FeatureStore.open(tmp_path / "s.zarr")
    cls = get_method("sclip")
    with pytest.raises(MissingFeatureSetError) as e:
        cls(st, build_config(cls, None, SET))
    assert e.value.reason == "mismatch" and e.value.needed_by == "sclip"
    line = render_error(e.value)
    assert "'size', not 'offset'" in line and "--for sclip" in line and "--overwrite" in line
    seg = cls(st, build_config(cls, None, {**SET, "pos_interp": "size"}))
    assert seg.cosine_logits(0, vocab())[0].shape[0] == 5


# --------------------------------------------------------------------------------------------
# Presets, recipes, references
# --------------------------------------------------------------------------------------------


def test_presets_and_recipes():
    r = plan_for("sclip", "voc21")
    assert r.settings["logit_scale"] == 65.0 and r.settings["area_thd"] == 0.1
    assert r.steps[0].protocol == Protocol(resize="short", size=336, crop=224, stride=112)
    assert r.vocab == "dataset:voc21/sclip" and r.templates == "openai80"
    assert any("'offset' rule (the authors')" in n for n in r.notes)
    r = plan_for("naclip", "voc21")
    assert r.steps[0].protocol == Protocol(resize="short", size=336, crop=0, stride=0)
    assert r.settings["prob_thd"] == 0.1 and r.settings["logit_scale"] == 40.0
    assert any("PAMR" in n for n in r.notes)
    assert plan_for("naclip", "cityscapes").steps[0].protocol.size == 560
    r = plan_for("clearclip", "voc21")
    assert r.steps[0].protocol == Protocol(resize="short", size=448, crop=448, stride=224)
    assert r.settings["logit_scale"] == 50.0 and r.settings["prob_thd"] == 0.5
    assert r.vocab == "dataset:voc21/clearclip"
    assert plan_for("clearclip", "cityscapes").steps[0].protocol.crop == 224
    assert plan_for("clearclip", "coco_object").settings["prob_thd"] == 0.4
    assert plan_for("clearclip", "context60").settings["prob_thd"] == 0.15
    assert get_method("clearclip").scoring_presets("custom") == {"logit_scale": 50.0}


def test_clearclip_class_files_have_a_literal_background():
    from featurestore.datasets import class_names

    for ds, n in (("voc21", 21), ("coco_object", 81), ("context60", 60)):
        names = class_names(ds, "clearclip")
        assert len(names) == n and names[0] == ["background"]
        assert all(len(c) == 1 for c in names)
    assert class_names("coco_object", "clearclip")[10] == ["traffic light"]
    assert class_names("voc21", "sclip")[0] != ["background"]


def _result(method, ds, **changes):
    cls = get_method(method)
    from methods.config import config_to_dict

    cfg = config_to_dict(build_config(cls, ds))
    proto = {
        "method": method,
        "config": cfg,
        "backbones": {"clip": {"model": "clip-b16", "weights": "openai", "pos_interp": "offset"}},
        "scoring": {**ScoringConfig().__dict__, **cls.scoring_presets(ds)},
        "vocabulary": f"dataset:{ds}/{cls.vocabulary_defaults(build_config(cls, ds)).family} (x)",
        "templates": "openai80",
    }
    for k, v in changes.items():
        if k in ("pos_interp", "weights"):
            proto["backbones"]["clip"][k] = v
        elif k in proto["scoring"]:
            proto["scoring"][k] = v
        elif k in ("templates", "vocabulary"):
            proto[k] = v
        else:
            proto["config"][k] = v
    return EvalResult(ds, "val", 10, {}, {"mIoU": 60.0}, proto, 1.0)


@pytest.mark.parametrize(
    "method,ds,published",
    [("sclip", "voc21", 59.63), ("naclip", "ade20k", 19.05), ("clearclip", "cityscapes", 30.0)],
)
def test_check_reference_matches_only_the_published_protocol(method, ds, published):
    ok = check_reference(_result(method, ds))
    assert ok["matched"] and ok["published"] == published
    bad = {
        "rule": check_reference(_result(method, ds, pos_interp="size")),
        "unrecorded": check_reference(_result(method, ds, pos_interp=None)),
        "size": check_reference(_result(method, ds, size=512)),
        "scale": check_reference(_result(method, ds, logit_scale=77.0)),
        "templates": check_reference(_result(method, ds, templates="single")),
        "random": check_reference(_result(method, ds, weights="random-init:0")),
        "pamr": check_reference(_result(method, ds, pamr=method != "naclip")),
    }
    for why, res in bad.items():
        assert res["matched"] is False, why
    assert "position-embedding rule" in bad["rule"]["reason"] and "'size'" in bad["rule"]["reason"]
    assert "unrecorded" in bad["unrecorded"]["reason"]
    assert "size (512" in bad["size"]["reason"]


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset_store(tmp_path_factory):
    """A `custom` dataset of two images with labels, and a store at the test protocol."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(5)
    for sub in ("images/val", "annotations/val"):
        (root / "data" / sub).mkdir(parents=True)
    (root / "data" / "classes.txt").write_text("sky\ngrass\nbrick\n")
    for i, (h, w) in enumerate([(50, 70), (64, 48)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "data" / "images" / "val" / f"im{i}.png"
        )
        Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8)).save(
            root / "data" / "annotations" / "val" / f"im{i}.png"
        )
    extract(
        list_folder_images(root / "data" / "images" / "val"),
        ExtractConfig(
            models=["clip-b16"],
            protocol=P,
            arch_overrides=TINY_CLIP,
            store=str(root / "s.zarr"),
            random_init=True,
            dtype="float32",
        ),
    )
    return root


@pytest.mark.parametrize("name", ["sclip", "clearclip", "naclip"])
def test_cli_eval(dataset_store, name):
    root = dataset_store
    sets = [a for k, v in SET.items() for a in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(
        cli,
        ["eval", "--dataset", "custom", "--data-root", str(root / "data"), "--store"]
        + [str(root / "s.zarr"), "--method", name, "--templates", "single"]
        + ["--text-random-init", *TINY_ARGS, "--check-reference", "-q", "--json", *sets],
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["images"] == 2 and 0 <= d["metrics"]["mIoU"] <= 100
    assert d["protocol"]["method"] == name
    assert d["protocol"]["backbones"]["clip"]["pos_interp"] == "offset"
    assert d["protocol"]["config"]["pamr"] is (name == "naclip")
    assert d["reference"]["matched"] is False


def test_methods_lists_the_options():
    res = CliRunner().invoke(cli, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    rows = {m["name"]: m for m in json.loads(res.output)}
    for name in ("sclip", "clearclip", "naclip"):
        opts = {o["name"] for o in rows[name]["options"]}
        assert {"pamr", "pamr_steps", "pamr_dilations", "pos_interp", "size", "crop"} <= opts
    assert "sigma" in {o["name"] for o in rows["naclip"]["options"]}


def test_bad_options_are_one_line(store):
    for name, key, value, words in (
        ("naclip", "sigma", "0", "sigma must be a positive"),
        ("sclip", "pamr_dilations", "8,x", "pamr_dilations"),
        ("clearclip", "pos_interp", "bilinear", "pos_interp"),
    ):
        cls = get_method(name)
        with pytest.raises(OvssError, match=words):
            cls(store, build_config(cls, None, {**SET, key: value}))
