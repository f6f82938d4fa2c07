"""Extraction recipes planned from the methods (``methods.plan``): per-dataset presets (EVAL.md
§4.2/§4.4, now owned by the method modules), model and setting changes, dry runs, runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featurestore.backbones.clip as clip_module
from featurestore.datasets import list_datasets
from featurestore.errors import OvssError
from featurestore.extract import ExtractConfig
from featurestore.images import list_folder_images
from featurestore.protocol import Protocol
from featurestore.recipes import RecipeStep, make_job, plan_job, recipe_job, run_job
from featurestore.store import FeatureStore
from featurestore.text import list_text_sets, load_text_embeddings, parse_vocab
from methods.maskclip import SCLIP_PRESETS, SCLIP_WINDOW
from methods.plan import list_components
from methods.plan import plan_for as recipe_for
from methods.proxyclip import PROXYCLIP_PRESETS
from methods.trident import TRIDENT_PRESETS
from ovss_cli.hints import render_error
from ovss_cli.main import cli

BENCHMARKS = [d for d in list_datasets() if d != "custom"]

# EVAL.md §4.4, typed again here: S / crop / stride / prob_thd.
PROXYCLIP_TABLE = {
    "voc21": (336, 336, 112, 0.2),
    "voc20": (336, 336, 112, 0.0),
    "context60": (336, 336, 112, 0.15),
    "context59": (336, 336, 112, 0.0),
    "coco_object": (336, 336, 112, 0.25),
    "coco_stuff171": (336, 336, 112, 0.0),
    "ade20k": (448, 336, 112, 0.0),
    "cityscapes": (448, 224, 112, 0.0),
}
# S / crop / stride / prob_thd / coarse_thresh / cos_fac / refine_neg_cos
TRIDENT_TABLE = {
    "voc21": (448, 336, 224, 0.2, 0.2, 1.2, True),
    "voc20": (336, 336, 112, 0.0, 0.2, 0.0, True),
    "context60": (576, 336, 224, 0.15, 0.15, 1.2, True),
    "context59": (576, 336, 224, 0.0, 0.15, 1.2, True),
    "coco_object": (448, 336, 224, 0.25, 0.25, 1.2, True),
    "coco_stuff171": (448, 336, 224, 0.0, 0.05, 1.2, True),
    "ade20k": (576, 336, 224, 0.0, 0.05, 1.2, False),
    "cityscapes": (688, 336, 224, 0.0, 0.10, 3.0, False),
}
# EVAL.md §4.2, SCLIP column: S (maskclip windows are 224/112).
SCLIP_SIZES = {
    "voc21": 336,
    "context60": 336,
    "coco_object": 336,
    "voc20": 336,
    "context59": 336,
    "coco_stuff171": 448,
    "cityscapes": 560,
    "ade20k": 336,
}
TINY_CLIP_ARGS = [
    "--random-init",
    "--arch-override",
    "embed_dim=32",
    "--arch-override",
    "vision_cfg.layers=1",
    "--arch-override",
    "vision_cfg.width=32",
    "--arch-override",
    "vision_cfg.heads=2",
    "--arch-override",
    "text_cfg.layers=1",
    "--arch-override",
    "text_cfg.width=32",
    "--arch-override",
    "text_cfg.heads=2",
]


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OVSS_WEIGHTS", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(clip_module, "OPENAI_CACHE_DIR", tmp_path / "clip_cache")


def test_benchmarks_are_the_eval_tables() -> None:
    assert set(BENCHMARKS) == set(PROXYCLIP_TABLE) == set(TRIDENT_TABLE) == set(SCLIP_SIZES)
    # the method modules' tables are the EVAL tables typed above
    assert {d: (p.size, p.crop, p.stride, p.prob_thd) for d, p in PROXYCLIP_PRESETS.items()} == (
        PROXYCLIP_TABLE
    )
    assert {
        d: (p.size, p.crop, p.stride, p.prob_thd, p.coarse_thresh, p.cos_fac, p.refine_neg_cos)
        for d, p in TRIDENT_PRESETS.items()
    } == TRIDENT_TABLE
    assert {d: p.size for d, p in SCLIP_PRESETS.items()} == SCLIP_SIZES
    assert SCLIP_WINDOW == (224, 112)


@pytest.mark.parametrize("dataset", list(PROXYCLIP_TABLE))
def test_proxyclip_presets(dataset: str) -> None:
    size, crop, stride, thd = PROXYCLIP_TABLE[dataset]
    r = recipe_for("proxyclip", dataset)
    win = Protocol("short", size, crop=crop, stride=stride, pad_multiple=56)
    assert r.steps == [RecipeStep("clip", "clip-b16", win), RecipeStep("vfm", "dino-b8", win)]
    assert (r.settings["size"], r.settings["crop"], r.settings["stride"]) == (size, crop, stride)
    assert r.settings["prob_thd"] == thd
    assert (r.settings["beta"], r.settings["gamma"], r.settings["logit_scale"]) == (1.2, 3.0, 40)
    assert r.vocab == f"dataset:{dataset}/proxyclip" and r.templates == "openai80"
    assert r.text_model == "clip-b16"
    assert r.groups() == [(win, ["clip-b16", "dino-b8"])]  # one pass: same windows


@pytest.mark.parametrize("dataset", list(TRIDENT_TABLE))
def test_trident_presets(dataset: str) -> None:
    size, crop, stride, thd, coarse, cos_fac, neg = TRIDENT_TABLE[dataset]
    r = recipe_for("trident", dataset)
    # Trident's canvas: short side S rounded up to the CLIP-B/16 patch grid (METHODS.md §4.2)
    win = Protocol("grid", size, crop=crop, stride=stride, pad_multiple=56, align=16)
    # Cityscapes: SAM on the left and right image halves (EVAL.md §4.4); SAM's image rounded
    # up to the CLIP patch grid first (METHODS.md §4 step 1)
    sam = Protocol(resize="halves" if dataset == "cityscapes" else "long", size=1024, align=16)
    assert r.steps == [
        RecipeStep("clip", "clip-b16", win),
        RecipeStep("vfm", "dino-b16", win),
        RecipeStep("sam", "sam-b", sam),
    ]
    s = r.settings
    assert (s["prob_thd"], s["coarse_thresh"], s["cos_fac"], s["refine_neg_cos"]) == (
        thd,
        coarse,
        cos_fac,
        neg,
    )
    assert (s["sam_iou_thresh"], s["minimal_area"], s["sam_mask_alpha"]) == (0.8, 225, 0.005)
    assert r.vocab == f"dataset:{dataset}/proxyclip"
    assert r.groups() == [(win, ["clip-b16", "dino-b16"]), (sam, ["sam-b"])]
    assert s["sam_halves"] == (dataset == "cityscapes")
    assert any("halves" in n for n in r.notes) == (dataset == "cityscapes")
    # the whole-image SAM set of --sam-refine: optional, listed, never extracted
    assert [s.feature_set for s in r.optional] == (
        ["sam-b@long1024-a16"] if dataset == "cityscapes" else []
    )
    assert any("round up to multiples of 16" in n and sam.key() in n for n in r.notes)
    assert sam.key() == ("halves1024-a16" if dataset == "cityscapes" else "long1024-a16")
    # CLIP-H/14 (SAM-H follows): the 14-pixel grid for the canvas and SAM's rounding alike
    h = recipe_for("trident", dataset, ["clip-h14"])
    assert h.steps[2] == RecipeStep("sam", "sam-h", dataclasses.replace(sam, align=14))


@pytest.mark.parametrize("dataset", list(SCLIP_SIZES))
def test_maskclip_presets(dataset: str) -> None:
    r = recipe_for("maskclip", dataset)
    win = Protocol("short", SCLIP_SIZES[dataset], crop=224, stride=112)
    assert r.steps == [RecipeStep("clip", "clip-b16", win)]
    assert r.vocab == f"dataset:{dataset}/sclip" and r.templates == "openai80"
    assert r.settings["logit_scale"] == {"voc21": 65, "context60": 50, "coco_object": 50}.get(
        dataset, 40
    )


def test_fmbseg_and_prototype_defaults() -> None:
    f = recipe_for("fmbseg", "coco_stuff171")
    assert sorted((s.role, s.model, s.protocol.key()) for s in f.steps) == [
        ("clip", "clip-l14", "short448-c224s112"),
        ("sam", "sam-h", "long1024"),
        ("vfm", "dinov2-l14", "short448"),
    ]
    assert f.templates == "single" and f.kind == "trainer"
    assert f.vocab == "dataset:coco_stuff171/sclip"
    s1 = recipe_for("fmbseg-stage1", "voc20")
    assert s1.templates == "single" and s1.text_model == "clip-l14"
    p = recipe_for("prototype", "voc20")
    assert [(s.role, s.model, s.protocol.key()) for s in p.steps] == [
        ("dense", "clip-b16", "short448")
    ]
    p = recipe_for("prototype", "voc20", models=["dinov2-s14"])
    assert p.steps[0].model == "dinov2-s14" and p.text_model == "clip-b16"


def test_role_changes_and_protocol_changes() -> None:
    r = recipe_for("trident", "voc21", models=["dinov2-b14"])
    assert [s.model for s in r.steps] == ["clip-b16", "dinov2-b14", "sam-b"]
    h = recipe_for("trident", "voc21", models=["clip-h14"])
    assert [s.model for s in h.steps] == ["clip-h14", "dino-b16", "sam-h"]
    assert h.text_model == "clip-h14"
    hb = recipe_for("trident", "voc21", models=["clip-h14", "sam-b"])
    assert hb.steps[2].model == "sam-b"
    c = recipe_for("proxyclip", "ade20k", overrides={"size": "512", "stride": 224})
    assert c.steps[0].protocol == Protocol("short", 512, crop=336, stride=224, pad_multiple=56)
    assert c.settings["size"] == 512 and any("preset changed" in n for n in c.notes)
    t = recipe_for("trident", "ade20k", overrides={"size": 640})
    assert t.steps[2].protocol == Protocol(resize="long", size=1024, align=16)  # fixed
    m = recipe_for("maskclip", "voc20", templates="clip7", text_model="clip-l14")
    assert (m.templates, m.text_model) == ("clip7", "clip-l14")
    # --set reaches the config, typed: the SAM follows the CLIP unless set
    s = recipe_for("trident", "voc21", overrides={"sam_model": "sam-l", "size": "512"})
    assert s.steps[2].model == "sam-l" and s.steps[0].protocol.size == 512
    assert recipe_for("trident", "voc21", overrides={"window_attention": "none"}).groups() == [
        (Protocol("grid", 448, crop=336, stride=224, pad_multiple=56, align=16), ["clip-b16"]),
        (Protocol("long", 1024, align=16), ["sam-b"]),
    ]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "segformer", "dataset": "ade20k"}, "not a known method or trainer.*proxyclip"),
        ({"name": "trident", "dataset": "ade21"}, "ade20k, voc21"),
        ({"name": "maskclip", "dataset": "voc20", "models": ["dino-b8"]}, "fits none"),
        ({"name": "trident", "dataset": "voc20", "models": ["dino-b8", "dino-b16"]}, "two"),
        ({"name": "proxyclip", "dataset": "voc20", "overrides": {"crop": 336, "stride": 0}},
         "stride"),
        ({"name": "proxyclip", "dataset": "voc20", "templates": "x"}, "template set"),
        ({"name": "maskclip", "dataset": "voc20", "overrides": {"size": "abc"}},
         "size expects an integer"),
        ({"name": "maskclip", "dataset": "voc20", "overrides": {"pad_multiple": 56}},
         "no option pad_multiple"),
        ({"name": "trident", "dataset": "voc20", "models": ["sam-l"],
          "overrides": {"sam_model": "sam-b"}}, "disagree"),
    ],
)  # fmt: skip
def test_recipe_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(OvssError, match=match):
        recipe_for(**kwargs)


def test_custom_dataset_plans_the_defaults() -> None:
    r = recipe_for("trident", "custom")
    assert r.steps[0].protocol.size == 448 and r.vocab == "dataset:custom/proxyclip"
    assert any("no preset for custom" in n for n in r.notes)
    assert recipe_for("trident").vocab is None  # no dataset: no vocabulary


def test_components_are_the_cli_choices() -> None:
    opt = next(p for p in cli.commands["extract"].params if p.name == "for_method")
    assert list(opt.type.choices) == list_components()
    assert {"proxyclip", "trident", "maskclip", "fmbseg", "prototype"} <= set(list_components())


def test_make_job_rules() -> None:
    proto = Protocol("short", 448)
    job = make_job(["dinov2-s14", "clip-l14"], proto, vocabs=["ade20k"])
    assert job.groups == [(proto, ["dinov2-s14", "clip-l14"])] and job.text_models == ["clip-l14"]
    assert make_job(["dinov2-s14"], proto, vocabs=["a,b"]).text_models == ["clip-b16"]
    assert make_job(["dinov2-s14"], proto).text_models == []
    job = recipe_job(recipe_for("trident", "voc20"), vocabs=["cat,dog"])
    assert job.vocabs == ["dataset:voc20/proxyclip", "cat,dog"]
    assert job.text_models == ["clip-b16"] and job.template_name == "openai80"
    assert recipe_job(recipe_for("trident")).text_models == []  # no vocabulary, no text set
    with pytest.raises(OvssError, match="nothing to extract"):
        make_job([], proto)


# -- through the CLI --------------------------------------------------------------------------


@pytest.fixture()
def ade_root(tmp_path: Path) -> Path:
    d = tmp_path / "data" / "ADEChallengeData2016" / "images" / "validation"
    d.mkdir(parents=True)
    for i, (h, w) in enumerate([(512, 683), (300, 400)]):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(d / f"ADE_val_{i:08d}.jpg")
    return tmp_path / "data"


def test_cli_trident_ade20k_dry_run(tmp_path: Path, ade_root: Path) -> None:
    store = tmp_path / "t.zarr"
    args = ["extract", "--for", "trident", "--dataset", "ade20k", "--data-root", str(ade_root),
            "--store", str(store), "--dry-run"]  # fmt: skip
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [(s["role"], s["model"], s["feature_set"]) for s in out["recipe"]["steps"]] == [
        ("clip", "clip-b16", "clip-b16@trident576a16-c336s224-pad56"),  # keys kept
        ("vfm", "dino-b16", "dino-b16@trident576a16-c336s224-pad56"),
        ("sam", "sam-b", "sam-b@long1024-a16"),
    ]
    rows = {r["feature_set"]: r for r in out["feature_sets"]}
    # both images resize to 576x768 -> 3x3 windows of 336 px = 21x21 tokens (patch 16)
    for key in ("clip-b16@trident576a16-c336s224-pad56", "dino-b16@trident576a16-c336s224-pad56"):
        assert rows[key]["images"] == 2 and rows[key]["windows"] == 18
        assert rows[key]["tokens"] == 18 * 21 * 21
    # SAM: the image rounded up to multiples of 16 first (512x683 -> 512x688, 300x400 ->
    # 304x400), then the longer side to 1024: 762x1024 and 778x1024 -> 48x64 + 49x64 tokens
    sam = rows["sam-b@long1024-a16"]
    assert sam["windows"] == 2 and sam["tokens"] == 48 * 64 + 49 * 64
    assert all(r["bytes"] > 0 for r in rows.values())
    [text] = out["text_sets"]
    assert text["source"] == "dataset:ade20k/proxyclip" and text["queries"] == 150
    assert text["dim"] == 512 and text["bytes"] == 150 * 512 * 4 and not text["cached"]
    assert text["template_set"] == "openai80" and text["templates"] == 80
    assert not store.exists()  # a dry run writes nothing
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "recipe: --for trident --dataset ade20k" in res.output
    assert "sam-b@long1024-a16" in res.output
    # without images: the recipe alone
    res = CliRunner().invoke(
        cli, ["extract", "--for", "trident", "--dataset", "ade", "--store", "x", "--dry-run"]
    )
    assert res.exit_code == 0 and "no images given" in res.output
    res = CliRunner().invoke(cli, ["extract", "--for", "trident", "--dataset", "ade", "-s", "x"])
    assert res.exit_code == 2 and "--data-root" in res.output


def test_cli_recipe_overrides_reach_the_plan(tmp_path: Path, ade_root: Path) -> None:
    res = CliRunner().invoke(
        cli,
        ["extract", "--for", "proxyclip", "--dataset", "ade20k", "--data-root", str(ade_root),
         "-m", "dinov2-b14-reg", "--size", "336", "--store", str(tmp_path / "p.zarr"),
         "--templates", "clip7", "--dry-run", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [r["feature_set"] for r in out["feature_sets"]] == [
        "clip-b16@short336-c336s112-pad56",
        "dinov2-b14-reg@short336-c336s112-pad56",
    ]
    assert out["text_sets"][0]["template_set"] == "clip7"
    res = CliRunner().invoke(
        cli, ["extract", "--for", "proxyclip", "--dataset", "ade20k", "--resize", "square",
              "-s", "x", "--dry-run"],
    )  # fmt: skip
    assert res.exit_code == 1 and "resize" in res.output
    # --set: typed through the config, one line on a bad value
    base = ["extract", "--for", "trident", "--dataset", "voc21", "-s", "x", "--dry-run"]
    res = CliRunner().invoke(cli, [*base, "--set", "vfm_model=dinov2-b14", "--json"])
    assert res.exit_code == 0, res.output
    steps = json.loads(res.output)["recipe"]["steps"]
    assert steps[1]["feature_set"] == "dinov2-b14@trident448a16-c336s224-pad56"
    res = CliRunner().invoke(cli, [*base, "--set", "size=abc"])
    assert res.exit_code == 1 and "size expects an integer" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_cli_maskclip_recipe_runs(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 50 + 10 * i, 3), dtype=np.uint8)).save(
            imgs / f"x{i}.png"
        )
    store = str(tmp_path / "m.zarr")
    args = ["extract", "--for", "maskclip", "--dataset", "voc20", "--images", str(imgs),
            "--store", store, "--templates", "single", "-q", "--json", *TINY_CLIP_ARGS]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["recipe"]["method"] == "maskclip"
    assert [m["feature_set"] for m in rep["models"]] == ["clip-b16@short336-c224s112"]
    assert rep["models"][0]["images_extracted"] == 2
    assert rep["text_sets"][0]["status"] == "computed"
    st = FeatureStore.open(store)
    st.require("clip-b16", Protocol("short", 336, crop=224, stride=112))
    emb = load_text_embeddings(st, "clip-b16", parse_vocab("voc20"), "single")
    assert emb.embeddings.shape == (30, 32) and emb.query_to_class.max() == 19
    res = CliRunner().invoke(cli, [a for a in args if a != "--json"])
    assert res.exit_code == 0 and "cached" in res.output


def test_text_sets_only_on_shard_zero(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(imgs / "a.png")
    records = list_folder_images(imgs)
    store = str(tmp_path / "s.zarr")
    FeatureStore.open_or_create(store, records)
    proto = Protocol("short", 32)
    job = make_job([], proto, vocabs=["a,b"])
    cfg = ExtractConfig(models=[], protocol=proto, store=store, shard=(1, 2), random_init=True)
    rep = run_job(records, job, cfg)
    assert rep.text_sets[0].status.startswith("skipped: shard 1/2")
    assert list_text_sets(store) == []
    plan = plan_job(records, job, cfg)
    assert plan.feature_sets == [] and plan.text_sets[0].queries == 2


def test_weights_with_a_text_model_outside_the_call(tmp_path: Path) -> None:
    proto = Protocol("short", 32)
    job = make_job(["dinov2-s14"], proto, vocabs=["a,b"])
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"x")
    cfg = ExtractConfig(models=["dinov2-s14"], protocol=proto, store="s", weights=str(ckpt))
    with pytest.raises(OvssError, match="text model clip-b16 needs its own"):
        run_job([], job, cfg)


# -- Trident: the whole-image SAM set of --sam-refine on Cityscapes; store commands that run --


def test_trident_cityscapes_lists_the_whole_image_sam_set(tmp_path: Path) -> None:
    r = recipe_for("trident", "cityscapes")
    assert [(s.role, s.protocol.key()) for s in r.steps][2] == ("sam", "halves1024-a16")
    [opt] = r.optional
    assert (opt.role, opt.feature_set) == ("sam_refine", "sam-b@long1024-a16")
    assert any("--set sam_refine=on" in n for n in r.notes)
    # the CLI renders the plain command that makes it, and that command is one it accepts
    res = CliRunner().invoke(
        cli, ["extract", "--for", "trident", "--dataset", "cityscapes", "-s", "x", "--dry-run"]
    )
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("optional"))
    cmd = line.split("recipe: ", 1)[1]
    assert cmd == (
        "ovss extract --store STORE --model sam-b --resize long --size 1024 --align 16 "
        "--dataset cityscapes --data-root PATH"
    )
    args = cmd.replace("STORE", str(tmp_path / "s.zarr")).replace("PATH", str(tmp_path)).split()
    ctx = cli.commands["extract"].make_context("extract", args[2:])
    assert ctx.params["models"] == ("sam-b",) and ctx.params["resize"] == "long"
    assert ctx.params["size"] == 1024 and ctx.params["dataset"] == "cityscapes"
    assert ctx.params["align"] == 16
    # the same SAM as the recipe's (SAM-H with CLIP-H, 14-pixel grid), and only on Cityscapes
    h = recipe_for("trident", "cityscapes", ["clip-h14"])
    assert [s.feature_set for s in h.optional] == ["sam-h@long1024-a14"]
    for ds in BENCHMARKS:
        if ds != "cityscapes":
            assert recipe_for("trident", ds).optional == []
    # with the refinement on, the set is required (extracted by the recipe)
    on = recipe_for("trident", "cityscapes", overrides={"sam_refine": "on"})
    assert "sam-b@long1024-a16" in [s.feature_set for s in on.steps] and on.optional == []


@pytest.mark.parametrize(
    ("model", "protocol"),
    [
        ("dino-b16", Protocol("grid", 64, crop=48, stride=32, align=16)),
        ("clip-b16", Protocol("grid", 64, crop=48, stride=32, pad_multiple=56, align=16)),
        ("dino-b16", Protocol("grid", 448, crop=336, stride=224, pad_multiple=56, align=14)),
        ("sam-b", Protocol("halves", 1024)),
        ("sam-b", Protocol("halves", 1024, align=16)),
        ("sam-b", Protocol("long", 1024, align=14)),
        ("dinov2-s14", Protocol("short", 64, crop=56, stride=28)),
    ],
)
def test_missing_set_command_runs(tmp_path: Path, model: str, protocol: Protocol) -> None:
    """The command a missing feature set names is one `ovss extract` accepts, and it plans
    exactly that set (Trident canvases through `--for trident`: there is no --resize trident)."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(imgs / "a.png")
    store = FeatureStore.open_or_create(tmp_path / "s.zarr", list_folder_images(imgs))
    with pytest.raises(OvssError) as err:
        store.require(model, protocol)
    cmd = render_error(err.value).split("; run: ", 1)[1]
    if protocol.resize == "grid":
        assert "--for trident --dataset NAME" in cmd and "--resize" not in cmd
        assert ("--model clip-l14" in cmd) == (protocol.align == 14)
    for placeholder in ("<--data-root PATH or --images DIR>", "<images or --dataset ...>"):
        cmd = cmd.replace(placeholder, f"--images {imgs}")
    args = cmd.replace("--dataset NAME", "--dataset voc21").split()
    assert args[:2] == ["ovss", "extract"]
    res = CliRunner().invoke(cli, [*args[1:], "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    rows = out["feature_sets"] if isinstance(out, dict) else out
    key = f"{model}@{protocol.key()}"
    assert key in [r["feature_set"] for r in rows]
    assert next(r for r in rows if r["feature_set"] == key)["images"] == 1


def test_cli_align_is_sams_pre_rounding_only(tmp_path: Path, ade_root: Path) -> None:
    """`--align N` rounds SAM's image up (`long1024-a16`); other resize rules refuse it, and
    `--for` sets it itself."""
    base = ["extract", "--dataset", "ade20k", "--data-root", str(ade_root), "--store",
            str(tmp_path / "s.zarr"), "--dry-run", "--json"]  # fmt: skip
    res = CliRunner().invoke(
        cli, [*base, "--model", "sam-b", "--resize", "long", "--size", "1024", "--align", "16"]
    )
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.output)
    assert row["feature_set"] == "sam-b@long1024-a16" and row["tokens"] == 48 * 64 + 49 * 64
    res = CliRunner().invoke(cli, [*base, "--model", "sam-b", "--resize", "long", "--size", "1024"])
    (row,) = json.loads(res.output)
    assert row["feature_set"] == "sam-b@long1024" and row["tokens"] == 2 * 48 * 64  # unchanged
    res = CliRunner().invoke(cli, [*base, "--model", "dinov2-s14", "--align", "16"])
    assert res.exit_code != 0 and "align is used with resize 'grid'" in res.output
    res = CliRunner().invoke(cli, [*base, "--for", "trident", "--align", "16"])
    assert res.exit_code != 0 and "--for trident sets every protocol itself" in res.output
