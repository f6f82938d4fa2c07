"""DINOv3 backbones: registry, dense outputs vs timm's forward, the class chosen from the file,
checkpoints in Meta's official layout and timm's, through ``ovss extract``.

Models are timm's real ``Eva`` classes shrunk with ``arch_overrides`` (2 blocks, 64-d, 2 heads),
random-initialised on the CPU. Meta-layout files are written from the key names and shapes of
facebookresearch/dinov3 ``dinov3/models/vision_transformer.py`` (``DinoVisionTransformer``),
``dinov3/layers/attention.py`` (``LinearKMaskedBias``: ``qkv.bias`` + ``qkv.bias_mask``),
``dinov3/layers/ffn_layers.py`` (``Mlp`` fc1/fc2, ``SwiGLUFFN`` w1/w2/w3) and
``dinov3/layers/rope_position_encoding.py`` (``periods``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.layers import SwiGLU
from timm.models.eva import Eva

from featurestore.backbones import create_backbone, list_backbones, tiny_arch_overrides
from featurestore.backbones.dinov3 import VARIANTS
from featurestore.backbones.timm_vit import TimmViTBackbone
from featurestore.errors import OvssError, WeightsNotFoundError
from featurestore.extract import ExtractConfig, extract
from featurestore.images import list_folder_images, load_image_rgb
from featurestore.protocol import Protocol
from featurestore.store import FeatureStore

NAMES = [v.name for v in VARIANTS]
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SAT = ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))


def tiny(name: str, seed: int = 0, layers: tuple[int, ...] = ()) -> TimmViTBackbone:
    return create_backbone(name, random_init=True, seed=seed, layers=layers, arch_overrides=TINY)


def batch(gh: int, gw: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16 * gh, 16 * gw, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def offline_and_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OVSS_WEIGHTS", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return weights_dir


# --- registry and outputs -------------------------------------------------------------------------


def test_registry_holds_the_eight_dinov3_names() -> None:
    assert set(NAMES) == {
        "dinov3-s16",
        "dinov3-s16plus",
        "dinov3-b16",
        "dinov3-l16",
        "dinov3-h16plus",
        "dinov3-7b16",
        "dinov3-l16-sat",
        "dinov3-7b16-sat",
    }
    assert set(NAMES) <= set(list_backbones())


@pytest.mark.parametrize("name", NAMES)
def test_tiny_build_is_meta_architecture_and_recorded(name: str) -> None:
    backbone = tiny(name, seed=3, layers=(-1,))
    model = backbone.model
    assert type(model) is Eva and len(model.blocks) == 2 and model.embed_dim == 64
    seven_b = "7b" in name
    # Meta's ViTs carry a (k-masked) qkv bias, except 7B: timm's _qkvb class holds q and v.
    assert (model.blocks[0].attn.q_bias is not None) == (not seven_b)
    swiglu = "plus" in name or seven_b
    assert isinstance(model.blocks[0].mlp, SwiGLU) == swiglu
    assert model.num_prefix_tokens == 5 and model.pos_embed is None  # cls + 4 registers, RoPE
    info = backbone.info
    assert info.family == "dinov3" and info.patch_size == 16
    mean, std = SAT if name.endswith("-sat") else IMAGENET
    assert info.mean == pytest.approx(mean) and info.std == pytest.approx(std)
    assert info.weights == "random-init:3"
    extra = info.extra
    assert extra["timm_name"].endswith(".sat493m" if name.endswith("-sat") else ".lvd1689m")
    assert extra["qkv_bias"] == (not seven_b) and extra["num_registers"] == 4
    assert extra["pos_interp"] == "none" and extra["layers"] == [1]
    assert extra["meta_file"].startswith("dinov3_vit") and extra["arch_overrides"] == TINY


@pytest.mark.parametrize(("gh", "gw"), [(3, 3), (4, 6), (7, 2)])
def test_patch_and_cls_are_forward_features_slices(gh: int, gw: int) -> None:
    backbone = tiny("dinov3-s16", layers=(0, 1))
    x = batch(gh, gw)
    out = backbone.forward_dense(x)
    with torch.no_grad():
        full = backbone.model.forward_features(x)  # (B, 1 + 4 + gh*gw, D)
    assert set(out) == {"patch", "cls", "layer0", "layer1"}  # the registers are dropped
    assert torch.equal(out["patch"], full[:, 5:]) and torch.equal(out["cls"], full[:, 0])
    assert torch.equal(out["layer1"], out["patch"])
    specs = {s.name: s for s in backbone.tensor_specs()}
    assert specs["patch"].unit == "token" and specs["cls"].unit == "window"


def test_intermediate_layer_is_block_output_with_final_norm() -> None:
    backbone = tiny("dinov3-b16", layers=(0,))
    x = batch(2, 3)
    with torch.no_grad():
        grid = backbone.model.forward_intermediates(
            x, indices=[0], norm=True, output_fmt="NCHW", intermediates_only=True
        )[0]
    rows = grid.permute(0, 2, 3, 1).reshape(2, 6, 64)
    assert torch.equal(backbone.forward_dense(x)["layer0"], rows)
    assert not torch.allclose(backbone.forward_dense(x)["patch"], rows)


def test_no_position_rule_applies_and_bad_inputs_are_refused() -> None:
    with pytest.raises(OvssError, match="RoPE"):
        create_backbone("dinov3-s16", random_init=True, arch_overrides=TINY, pos_interp="offset")
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        tiny("dinov3-s16").forward_dense(torch.zeros(1, 3, 32, 40))
    with pytest.raises(OvssError, match="layer 2 does not exist"):
        tiny("dinov3-s16", layers=(2,))


# --- checkpoints ---------------------------------------------------------------------------------


def to_meta_layout(model: Eva, seed: int = 9, local_cls_norm: bool = False) -> dict:
    """timm's Eva state dict written back in Meta's ``DinoVisionTransformer`` key layout.

    The k third of each ``qkv.bias`` gets random values: Meta's ``bias_mask`` zeroes it, so the
    loaded model must not see it.
    """
    g = torch.Generator().manual_seed(seed)
    timm_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    d = model.embed_dim
    meta: dict[str, torch.Tensor] = {
        "cls_token": timm_state.pop("cls_token"),
        "storage_tokens": timm_state.pop("reg_token"),
        "mask_token": torch.zeros(1, d),
        "rope_embed.periods": meta_rope_periods(model),
    }
    for key, value in timm_state.items():
        if key.endswith("attn.q_bias"):
            block = key[: -len("q_bias")]
            v_bias = timm_state[block + "v_bias"]
            k_bias = torch.randn(d, generator=g)
            meta[block + "qkv.bias"] = torch.cat([value, k_bias, v_bias])
            mask = torch.ones(3 * d)
            mask[d : 2 * d] = 0
            meta[block + "qkv.bias_mask"] = mask
            continue
        if key.endswith("attn.v_bias"):
            continue
        key = key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if _swiglu(model):  # SwiGLUFFN: silu(w1 x) * w2 x, then w3
            key = key.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
            key = key.replace("mlp.fc2.", "mlp.w3.")
        meta[key] = value
    if local_cls_norm:  # 7B / L-SAT: a training-only norm for local crops
        meta["local_cls_norm.weight"] = torch.randn(d, generator=g)
        meta["local_cls_norm.bias"] = torch.randn(d, generator=g)
    return meta


def meta_rope_periods(model: Eva, base: float = 100.0) -> torch.Tensor:
    """``RopePositionEmbedding._init_weights`` (Meta, ``base`` given): ``base ** (2 * arange(
    D_head // 4) / (D_head // 2))``, float32."""
    d_head = model.embed_dim // model.blocks[0].attn.num_heads
    return base ** (2 * torch.arange(d_head // 4, dtype=torch.float32) / (d_head // 2))


def _swiglu(model: Eva) -> bool:
    return isinstance(model.blocks[0].mlp, SwiGLU)


def randomise(backbone: TimmViTBackbone, seed: int = 1) -> TimmViTBackbone:
    """Sizeable biases, layer scales and tokens (timm starts some at ~0 or 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in backbone.model.named_parameters():
            if "bias" in name or "gamma" in name or "token" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return backbone


@pytest.mark.parametrize("name", ["dinov3-s16", "dinov3-s16plus", "dinov3-7b16", "dinov3-l16-sat"])
def test_meta_checkpoint_loads_exactly_through_the_real_path(name: str, tmp_path: Path) -> None:
    source = randomise(tiny(name, seed=11))
    variant = next(v for v in VARIANTS if v.name == name)
    meta = to_meta_layout(source.model, local_cls_norm="7b" in name or name.endswith("-sat"))
    assert ("blocks.0.attn.qkv.bias" in meta) == ("7b" not in name)
    path = tmp_path / variant.meta_file
    torch.save(meta, path)

    loaded = create_backbone(name, weights=str(path), arch_overrides=TINY)
    assert loaded.info.weights == f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert loaded.info.arch == source.info.arch
    for gh, gw in ((3, 3), (4, 7)):
        x = batch(gh, gw)
        want, got = source.forward_dense(x), loaded.forward_dense(x)
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_meta_and_timm_layouts_of_the_same_weights_give_identical_features(tmp_path: Path) -> None:
    source = randomise(tiny("dinov3-b16", seed=5))
    meta_path = tmp_path / "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"
    torch.save(to_meta_layout(source.model), meta_path)
    timm_path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(timm_path))
    a = create_backbone("dinov3-b16", weights=str(meta_path), arch_overrides=TINY)
    b = create_backbone("dinov3-b16", weights=str(timm_path), arch_overrides=TINY)
    x = batch(5, 3)
    assert torch.equal(a.forward_dense(x)["patch"], b.forward_dense(x)["patch"])
    assert torch.equal(a.forward_dense(x)["patch"], source.forward_dense(x)["patch"])


def test_class_is_chosen_from_the_checkpoint(tmp_path: Path) -> None:
    """A timm file of the class without qkv bias loads into that class, never into _qkvb with
    biases left at their init (and a bias file never into the class without)."""
    plain = create_backbone(
        "timm:vit_small_patch16_dinov3.lvd1689m", random_init=True, seed=2, arch_overrides=TINY
    )
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in plain.model.state_dict().items()}, str(path))
    loaded = create_backbone("dinov3-s16", weights=str(path), arch_overrides=TINY)
    assert loaded.info.arch == "vit_small_patch16_dinov3" and loaded.info.extra["qkv_bias"] is False
    x = batch(3, 4)
    assert torch.equal(loaded.forward_dense(x)["patch"], plain.forward_dense(x)["patch"])
    # 7B has no qkv bias anywhere: a file with one is refused.
    biased = to_meta_layout(tiny("dinov3-s16").model)
    torch.save(biased, tmp_path / "b.pth")
    with pytest.raises(OvssError, match="has a qkv bias but dinov3-7b16"):
        create_backbone("dinov3-7b16", weights=str(tmp_path / "b.pth"), arch_overrides=TINY)


def test_files_of_another_layout_model_or_size_are_refused_in_one_line(tmp_path: Path) -> None:
    dinov2 = create_backbone("dinov2-s14-reg", random_init=True, arch_overrides=TINY)
    save_file(
        {k: v.contiguous() for k, v in dinov2.model.state_dict().items()},
        str(tmp_path / "v2.safetensors"),
    )
    with pytest.raises(OvssError, match="is not a DINOv3 checkpoint") as err:
        create_backbone("dinov3-s16", weights=str(tmp_path / "v2.safetensors"), arch_overrides=TINY)
    assert "storage_tokens" in str(err.value) and "\n" not in str(err.value)

    meta = to_meta_layout(tiny("dinov3-s16").model)
    del meta["blocks.1.norm2.weight"]
    torch.save(meta, tmp_path / "missing.pth")
    with pytest.raises(OvssError, match="1 missing") as err:
        create_backbone("dinov3-s16", weights=str(tmp_path / "missing.pth"), arch_overrides=TINY)
    assert "blocks.1.norm2.weight" in str(err.value)

    deeper = dict(TINY, depth=3)
    torch.save(to_meta_layout(tiny("dinov3-s16").model), tmp_path / "s.pth")
    with pytest.raises(OvssError, match="does not fit dinov3-s16"):
        create_backbone("dinov3-s16", weights=str(tmp_path / "s.pth"), arch_overrides=deeper)

    meta = to_meta_layout(tiny("dinov3-s16").model)
    meta["blocks.0.attn.qkv.bias_mask"] = torch.ones(3 * 64)  # k bias not masked
    torch.save(meta, tmp_path / "unmasked.pth")
    with pytest.raises(OvssError, match="does not mask exactly the k third"):
        create_backbone("dinov3-s16", weights=str(tmp_path / "unmasked.pth"), arch_overrides=TINY)

    meta = to_meta_layout(tiny("dinov3-s16").model)
    meta["rope_embed.periods"] = meta["rope_embed.periods"] * 2
    torch.save(meta, tmp_path / "rope.pth")
    with pytest.raises(OvssError, match="RoPE periods"):
        create_backbone("dinov3-s16", weights=str(tmp_path / "rope.pth"), arch_overrides=TINY)


def test_meta_file_found_in_ovss_weights_and_missing_named(offline_and_isolated: Path) -> None:
    source = tiny("dinov3-l16-sat", seed=4)
    path = offline_and_isolated / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    torch.save(to_meta_layout(source.model, local_cls_norm=True), path)
    loaded = create_backbone("dinov3-l16-sat", arch_overrides=TINY)
    assert loaded.info.weights_path == str(path)
    assert loaded.info.mean == pytest.approx(SAT[0])
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("dinov3-h16plus", arch_overrides=TINY)
    message = str(err.value)
    assert "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth" in message and "\n" not in message
    assert "timm/vit_huge_plus_patch16_dinov3_qkvb.lvd1689m/model.safetensors" in message


# --- through ovss extract ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [48, 80])
def test_extract_equals_timm_forward_features(size: int, tmp_path: Path) -> None:
    """Random-init DINOv3 through the extraction pipeline: the stored patch rows equal timm's
    ``forward_features`` on the same windows (float32, <= 1e-6), square and non-square."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    root.mkdir()
    for i, (h, w) in enumerate(((50, 70), (64, 40))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
    records = list_folder_images(root)
    protocol = Protocol(resize="short", size=size)
    cfg = ExtractConfig(
        models=["dinov3-s16"],
        protocol=protocol,
        store=str(tmp_path / "s.zarr"),
        device="cpu",
        dtype="float32",
        random_init=True,
        arch_overrides=TINY,
        workers=1,
    )
    extract(records, cfg)
    fs = FeatureStore.open(tmp_path / "s.zarr").require("dinov3-s16", protocol)
    assert fs.provenance["backbone"]["extra"]["pos_interp"] == "none"
    assert fs.provenance["backbone"]["mean"] == list(IMAGENET[0])
    backbone = tiny("dinov3-s16")
    shapes = set()
    for i, record in enumerate(records):
        image = load_image_rgb(record.path)
        geometry = backbone.geometry(protocol, *image.shape[:2])
        windows = backbone.preprocess(image, geometry)
        with torch.no_grad():
            full = [backbone.model.forward_features(w[None])[0] for w in windows]
        shapes |= {tuple(w.shape[-2:]) for w in windows}
        got = fs.read(i).tensors
        want = torch.cat([f[5:] for f in full]).numpy()
        np.testing.assert_allclose(got["patch"], want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got["cls"], torch.stack([f[0] for f in full]), atol=1e-6)
    assert any(h != w for h, w in shapes)  # a non-square window was among them


# --- doctor -------------------------------------------------------------------------------------


def test_doctor_lists_the_dinov3_files_found(offline_and_isolated: Path) -> None:
    from featurestore.doctor import doctor_report

    assert doctor_report()["DINOv3 weights"].startswith("none found")
    meta = offline_and_isolated / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    meta.write_bytes(b"")
    hub = offline_and_isolated / "timm/vit_small_patch16_dinov3_qkvb.lvd1689m/model.safetensors"
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"")
    found = doctor_report()["DINOv3 weights"]
    assert found == f"dinov3-s16: {hub}, dinov3-l16-sat: {meta}"


# --- in the methods (tiny random-init stores, through the CLI) ------------------------------------

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
    "text_cfg": {"layers": 2, "width": 64, "heads": 2},
}
TINY_VFM = {"depth": 2, "embed_dim": 32, "num_heads": 2}  # CLIP's text width: prototype works
TINY_SAM = tiny_arch_overrides("sam-b")
CLASSES = ("sky", "tree", "road")
SIZES = ((61, 93), (97, 50))
PC = {"size": 64, "crop": 48, "stride": 32, "pad_multiple": 0}  # proxyclip's and trident's
PC_PROTOCOL = Protocol("short", 64, crop=48, stride=32)
TRIDENT_PROTOCOL = Protocol("trident", 64, crop=48, stride=32, align=16)
WHOLE = Protocol("short", 64)


def tiny_text_args() -> list[str]:
    args = ["--text-random-init", "--templates", "single"]
    args += ["--text-arch-override", f"embed_dim={TINY_CLIP['embed_dim']}"]
    for tower in ("vision_cfg", "text_cfg"):
        args += [f"--text-arch-override={tower}.{k}={v}" for k, v in TINY_CLIP[tower].items()]
    return args


@pytest.fixture(scope="module")
def method_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A ``custom`` dataset of two odd-sized images and a store with tiny CLIP-B/16, DINOv3-S/16
    and SAM-B sets for proxyclip, trident, prototype, cluster and align: ``(store, data root)``."""
    from click.testing import CliRunner

    from ovss_cli.main import cli

    tmp = tmp_path_factory.mktemp("dinov3_methods")
    data = tmp / "data"
    for sub in ("images/val", "annotations/val"):
        (data / sub).mkdir(parents=True)
    (data / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for i, (h, w) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        noise = np.random.default_rng(i).normal(0, 25, (h, w, 3))
        pixels = np.clip(127 + 100 * np.sin(xx / (5 + 2 * i))[..., None] + noise, 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(data / "images/val" / f"im{i}.png")
        gt = (xx * 3 // w).astype(np.uint8)
        Image.fromarray(gt).save(data / "annotations/val" / f"im{i}.png")
    store = tmp / "s.zarr"
    records = list_folder_images(data / "images/val")
    common = dict(store=str(store), random_init=True, dtype="float32", block_mb=1, workers=1)
    for model, protocol, arch in (
        ("clip-b16", PC_PROTOCOL, TINY_CLIP),
        ("clip-b16", TRIDENT_PROTOCOL, TINY_CLIP),
        ("dinov3-s16", TRIDENT_PROTOCOL, TINY_VFM),
        ("sam-b", Protocol("long", 256, align=16), TINY_SAM),
    ):
        cfg = ExtractConfig(models=[model], protocol=protocol, arch_overrides=arch, **common)
        extract(records, cfg)
    # the DINOv3 sets of the plain protocols through ovss extract itself
    arch = [f"--arch-override={k}={v}" for k, v in TINY_VFM.items()]
    for protocol in (["--crop", "48", "--stride", "32"], []):
        res = CliRunner().invoke(
            cli,
            ["extract", "--images", str(data / "images/val"), "-s", str(store), "-m",
             "dinov3-s16", "--random-init", "--size", "64", *protocol, *arch, "--dtype",
             "float32", "--workers", "1", "-q"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
    return store, data


def _run(*args: str) -> dict:
    import json

    from click.testing import CliRunner

    from ovss_cli.main import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def _opts(method: str) -> dict:
    """The method's config on the tiny store (Trident: tiny SAM, every mask kept)."""
    opts = {**PC, "vfm_model": "dinov3-s16"}
    if method == "trident":
        opts.update(sam_size=256, coarse_thresh=0.0, minimal_area=4, sam_iou_thresh=-1.0)
    return opts


def _sets(method: str) -> list[str]:
    return [f"--set={k}={v}" for k, v in _opts(method).items()]


@pytest.mark.parametrize("method", ["proxyclip", "trident"])
def test_segment_and_eval_with_a_dinov3_vfm(method: str, method_store, tmp_path: Path) -> None:
    """``segment``/``eval --method proxyclip|trident --set vfm_model=dinov3-s16`` run on the
    DINOv3 sets; the PNGs are the Python segmenter's labels (random weights: the pipeline)."""
    from featurestore.text import load_text_embeddings, parse_vocab
    from methods.base import ScoringConfig, build_config, get_method
    from methods.segment import segment_image, vocab_from_text

    store, data = method_store
    out = tmp_path / "seg"
    summary = _run(
        "segment", "--store", store, "--classes", ",".join(CLASSES), "--method", method,
        "--out", out, "-q", "--json", *_sets(method), *tiny_text_args(),
    )  # fmt: skip
    assert summary["images"] == 2 and summary["config"]["vfm_model"] == "dinov3-s16"
    fs = FeatureStore.open(store)
    cls = get_method(method)
    seg = cls(fs, build_config(cls, None, _opts(method)))
    assert seg.sets["vfm"].provenance["backbone"]["name"] == "dinov3-s16"
    te = load_text_embeddings(fs, "clip-b16", parse_vocab(",".join(CLASSES)), "single")
    for i, (h, w) in enumerate(SIZES):
        png = np.asarray(Image.open(out / f"im{i}.png"))
        labels, _, _ = segment_image(seg, i, vocab_from_text(te), ScoringConfig())
        assert png.shape == (h, w)
        np.testing.assert_array_equal(png, labels)
    d = _run(
        "eval", "--dataset", "custom", "--data-root", data, "--split", "val", "--store", store,
        "--method", method, "-q", "--json", *_sets(method), *tiny_text_args(),
    )  # fmt: skip
    assert d["images"] == 2 and 0.0 <= d["metrics"]["mIoU"] <= 100.0
    protocol = TRIDENT_PROTOCOL if method == "trident" else PC_PROTOCOL
    vfm = d["protocol"]["backbones"]["vfm"]
    assert vfm["feature_set"] == f"dinov3-s16@{protocol.key()}"


def test_trident_splices_dinov3_windows_at_ratio_one(method_store) -> None:
    """DINOv3-S/16 on CLIP-B/16 windows of the same size: one VFM token per CLIP token."""
    from methods.trident import splice_ratio

    store, _ = method_store
    fs = FeatureStore.open(store)
    vfm = fs.require("dinov3-s16", TRIDENT_PROTOCOL).read(0, names=["patch"])
    clip = fs.require("clip-b16", TRIDENT_PROTOCOL).read(0, names=["pre_last"])
    windows = [torch.from_numpy(np.asarray(g)) for g in vfm.window_tokens("patch")]
    assert len(windows) > 1
    assert splice_ratio(windows, vfm.win_pad, vfm.win_box, 16) == 1
    assert [g.shape[:2] for g in clip.window_tokens("pre_last")] == [
        tuple(w.shape[:2]) for w in windows
    ]


def test_prototype_cluster_and_align_read_dinov3_sets(method_store, tmp_path: Path) -> None:
    """The whole-image DINOv3 set feeds prototype lookup, k-means and FMbSeg's alignment."""
    store, data = method_store
    key = f"dinov3-s16@{WHOLE.key()}"
    d = _run(
        "segment", "--store", store, "--classes", ",".join(CLASSES), "--method", "prototype",
        "--set=model=dinov3-s16", "--set=size=64", "--out", tmp_path / "proto", "-q",
        "--json", *tiny_text_args(),
    )  # fmt: skip
    assert d["images"] == 2 and d["config"]["model"] == "dinov3-s16"
    assert (tmp_path / "proto/im1.png").exists()
    c = _run("cluster", "--store", store, "--features", key, "--k", "2", "--backend", "torch",
             "--device", "cpu", "--json", "-q")  # fmt: skip
    assert c["features"] == key and c["k"] == 2
    a = _run(
        "align", "--method", "fmbseg", "--store", store, "--features", key, "--gt-dataset",
        "custom", "--data-root", data, "--split", "val", "--arch", "linear", "--epochs", "1",
        "--device", "cpu", "--out", tmp_path / "ck", "--json", "-q", *tiny_text_args(),
    )  # fmt: skip
    assert a["epochs_done"] == 1 and a["features"] == key


@pytest.mark.parametrize("method", ["proxyclip", "trident", "prototype"])
def test_extract_for_a_recipe_swaps_in_the_dinov3_vfm(method: str, tmp_path: Path) -> None:
    """``extract --for METHOD -m dinov3-s16 --dry-run``: the VFM (or dense) step becomes DINOv3,
    at the recipe's protocol; the CLIP and SAM steps stay."""
    plain = _run("extract", "--for", method, "--dataset", "voc21", "-s", tmp_path / "a.zarr",
                 "--dry-run", "--json")["recipe"]["steps"]  # fmt: skip
    swapped = _run("extract", "--for", method, "--dataset", "voc21", "-m", "dinov3-s16", "-s",
                   tmp_path / "b.zarr", "--dry-run", "--json")["recipe"]["steps"]  # fmt: skip
    role = "dense" if method == "prototype" else "vfm"
    assert len(plain) == len(swapped)
    for before, after in zip(plain, swapped, strict=True):
        if before["role"] == role:
            assert after["model"] == "dinov3-s16" and before["model"] != "dinov3-s16"
            assert after["protocol"] == before["protocol"]
            assert after["feature_set"].startswith("dinov3-s16@")
        else:
            assert after == before
