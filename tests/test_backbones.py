"""DINO / DINOv2 backbones: registry, dense-output contract, seeded init, checkpoint loading and
the position-embedding rule; and every registered backbone built tiny (the registry-wide test).

All models are the real timm classes shrunk with ``arch_overrides`` (2 blocks, 64-d), random
initialised on the CPU; checkpoints are written by the tests in timm's and Meta's layouts.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import GluMlp, LayerScale
from timm.models.vision_transformer import VisionTransformer

from featurestore.backbones import create_backbone, list_backbones
from featurestore.backbones.base import tiny_arch_overrides
from featurestore.backbones.dino import DinoBackbone
from featurestore.errors import OvssError, WeightsNotFoundError
from featurestore.protocol import Protocol

DINO_NAMES = [n for n in list_backbones() if n.startswith(("dino-", "dinov2-"))]
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def tiny_overrides(name: str) -> dict:
    """Tiny config of the same class; SwiGLU (giant) needs an even int(embed_dim * mlp_ratio)."""
    return dict(TINY, mlp_ratio=4.0) if "g14" in name else dict(TINY)


def tiny(name: str, seed: int = 0, layers: tuple[int, ...] = ()) -> DinoBackbone:
    return create_backbone(
        name, random_init=True, seed=seed, layers=layers, arch_overrides=tiny_overrides(name)
    )


def batch(backbone: DinoBackbone, gh: int, gw: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    p = backbone.info.patch_size
    return torch.randn(n, 3, gh * p, gw * p, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def offline_and_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network, an empty $OVSS_WEIGHTS, and empty huggingface_hub / torch.hub caches."""
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OVSS_WEIGHTS", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return weights_dir


def test_registry_holds_every_dino_name() -> None:
    expected = {
        *(f"dinov2-{s}14{r}" for s in "sblg" for r in ("", "-reg")),
        "dino-s16",
        "dino-b16",
        "dino-b8",
    }
    assert set(DINO_NAMES) == expected


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(OvssError) as err:
        create_backbone("dinov3-s14", random_init=True)
    assert "'dinov3-s14' is not a known model" in str(err.value)
    assert "dinov2-s14" in str(err.value) and "dino-b8" in str(err.value)


@pytest.mark.parametrize("name", DINO_NAMES)
def test_tiny_build_is_the_real_class_and_recorded(name: str) -> None:
    backbone = tiny(name, seed=3, layers=(-1,))
    model = backbone.model
    assert type(model) is VisionTransformer
    assert len(model.blocks) == 2 and model.embed_dim == 64
    patch = 14 if "14" in name else (8 if name == "dino-b8" else 16)
    assert model.patch_embed.patch_size == (patch, patch)
    mlp = model.blocks[0].mlp
    if "g14" in name:
        assert isinstance(mlp, GluMlp) and isinstance(mlp.act, torch.nn.SiLU)
        assert mlp.fc1.out_features == 2 * mlp.fc2.in_features  # packed SwiGLU, as Meta's w12
    else:
        assert not isinstance(mlp, GluMlp)
    # DINOv2 has LayerScale, DINO does not; registers come with an un-embedded cls token.
    assert isinstance(model.blocks[0].ls1, LayerScale) == name.startswith("dinov2")
    assert model.num_reg_tokens == (4 if name.endswith("-reg") else 0)
    assert model.no_embed_class == name.endswith("-reg")

    info = backbone.info
    assert info.name == name
    assert info.family == ("dinov2" if name.startswith("dinov2") else "dino")
    assert info.patch_size == patch
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    assert info.weights == "random-init:3" and info.weights_path is None
    assert set(info.library) == {"timm", "torch"}
    assert info.arch.startswith("vit_") and info.arch in info.extra["timm_name"]
    assert info.extra["num_registers"] == (4 if name.endswith("-reg") else 0)
    assert info.extra["embed_dim"] == 64 and info.extra["depth"] == 2
    assert info.extra["layers"] == [1]  # -1 normalised
    assert info.extra["arch_overrides"] == tiny_overrides(name)


@pytest.mark.parametrize("name", DINO_NAMES)
def test_specs_describe_outputs_at_non_square_sizes(name: str) -> None:
    backbone = tiny(name, layers=(0, -1))
    specs = {s.name: s for s in backbone.tensor_specs()}
    expected_keys = {"patch", "cls", "layer0", "layer1"} | (
        {"reg"} if name.endswith("-reg") else set()
    )
    assert set(specs) == expected_keys
    for gh, gw in ((2, 3), (3, 2)):
        out = backbone.forward_dense(batch(backbone, gh, gw))
        assert set(out) == expected_keys
        for key, spec in specs.items():
            lead = (2, gh * gw) if spec.unit == "token" else (2,)
            assert out[key].shape == lead + spec.row_shape, key
            assert out[key].dtype == torch.float32
            assert torch.isfinite(out[key]).all()
    assert specs["patch"].row_shape == (64,)
    if name.endswith("-reg"):
        assert specs["reg"].row_shape == (4, 64) and specs["reg"].unit == "window"


def test_patch_cls_reg_equal_forward_features_slices() -> None:
    backbone = tiny("dinov2-s14-reg", layers=(0, 1))
    x = batch(backbone, 3, 2)
    out = backbone.forward_dense(x)
    with torch.no_grad():
        full = backbone.model.forward_features(x)  # (B, 1 + 4 + 6, D): cls, registers, patches
    assert full.shape == (2, 11, 64)
    assert torch.equal(out["cls"], full[:, 0])
    assert torch.equal(out["reg"], full[:, 1:5])
    assert torch.equal(out["patch"], full[:, 5:])
    # The last block's output with the final norm is exactly the final patch tokens.
    assert torch.equal(out["layer1"], out["patch"])


def test_intermediate_layer_is_block_output_with_final_norm() -> None:
    backbone = tiny("dino-s16", layers=(0,))
    model = backbone.model
    x = batch(backbone, 2, 3)
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        expected = model.norm(model.blocks[0](tokens))[:, 1:]
    torch.testing.assert_close(backbone.forward_dense(x)["layer0"], expected)
    assert not torch.allclose(backbone.forward_dense(x)["patch"], expected)


def test_tokens_are_row_major_over_the_grid() -> None:
    backbone = tiny("dinov2-b14")
    x = batch(backbone, 2, 3)
    with torch.no_grad():
        grid = backbone.model.forward_intermediates(
            x, indices=[1], norm=True, output_fmt="NCHW", intermediates_only=True
        )[0]  # (B, D, gh, gw)
    rows = grid.permute(0, 2, 3, 1).reshape(2, 6, 64)
    assert torch.equal(backbone.forward_dense(x)["patch"], rows)


def test_seeded_random_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b, c = tiny("dinov2-s14", seed=7), tiny("dinov2-s14", seed=7), tiny("dinov2-s14", seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    x = batch(a, 2, 2)
    assert torch.equal(a.forward_dense(x)["patch"], b.forward_dense(x)["patch"])
    assert not torch.allclose(a.forward_dense(x)["patch"], c.forward_dense(x)["patch"])
    assert a.info.weights == "random-init:7" and c.info.weights == "random-init:8"


def test_bad_arguments_and_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OvssError, match="layer 2 does not exist"):
        tiny("dino-s16", layers=(2,))
    with pytest.raises(OvssError, match="exclude each other"):
        create_backbone("dino-s16", weights=str(tmp_path / "x.pth"), random_init=True)
    backbone = tiny("dino-s16")
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        backbone.forward_dense(torch.zeros(1, 3, 32, 40))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backbone.forward_dense(torch.zeros(3, 32, 32))


# --- checkpoint loading -------------------------------------------------------------------------


def to_meta_layout(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Inverse of timm's ``_convert_dinov2`` for a DINOv2 model: Meta's ``*_pretrain.pth`` keys.

    Meta keeps ``mask_token`` (1, D); register models hold ``register_tokens`` and a
    ``pos_embed`` whose first row belongs to the cls token (timm folds it into ``cls_token``);
    the giant model's SwiGLU is ``mlp.w12`` / ``mlp.w3``.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    meta: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(model.blocks[0].mlp, GluMlp):
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        meta[key] = value
    dim = model.embed_dim
    meta["mask_token"] = torch.zeros(1, dim)
    if model.num_reg_tokens:
        cls_pos = torch.randn(1, 1, dim, generator=torch.Generator().manual_seed(5))
        meta["register_tokens"] = meta.pop("reg_token")
        meta["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
        meta["cls_token"] = state["cls_token"] - cls_pos
    return meta


def save_checkpoint(backbone: DinoBackbone, layout: str, path: Path) -> Path:
    model = backbone.model
    if layout == "timm":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    elif layout == "meta-dinov2":
        torch.save(to_meta_layout(model), path)
    else:  # "meta-dino": DINO v1 release files use timm's key names already
        torch.save(model.state_dict(), path)
    return path


LOAD_CASES = [
    ("dinov2-s14", "timm", "model.safetensors"),
    ("dinov2-s14-reg", "timm", "model.safetensors"),
    ("dino-b8", "timm", "model.safetensors"),
    ("dinov2-s14", "meta-dinov2", "dinov2_vits14_pretrain.pth"),
    ("dinov2-b14-reg", "meta-dinov2", "dinov2_vitb14_reg4_pretrain.pth"),
    ("dinov2-g14", "meta-dinov2", "dinov2_vitg14_pretrain.pth"),
    ("dinov2-g14-reg", "meta-dinov2", "dinov2_vitg14_reg4_pretrain.pth"),
    ("dino-s16", "meta-dino", "dino_deitsmall16_pretrain.pth"),
]


@pytest.mark.parametrize(("name", "layout", "filename"), LOAD_CASES)
def test_checkpoint_loads_through_the_real_path(
    name: str, layout: str, filename: str, tmp_path: Path
) -> None:
    source = tiny(name, seed=11)
    with torch.no_grad():  # timm starts cls_token at ~1e-6; a sizeable one tests its conversion
        source.model.cls_token.normal_(generator=torch.Generator().manual_seed(1))
    path = save_checkpoint(source, layout, tmp_path / filename)
    if layout == "meta-dinov2":
        meta = torch.load(path, weights_only=True)
        assert "mask_token" in meta
        # Meta ships the position embedding of the 518 px model: a 37x37 grid plus the cls row.
        assert meta["pos_embed"].shape == (1, 1 + 37 * 37, 64)

    loaded = create_backbone(name, weights=str(path), arch_overrides=tiny_overrides(name))

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.info.weights == f"sha256:{digest}"
    assert loaded.info.weights_path == str(path)
    x = batch(source, 2, 3)
    expected, got = source.forward_dense(x), loaded.forward_dense(x)
    for key in expected:
        if layout == "meta-dinov2" and name.endswith("-reg"):
            # cls = (cls - pos0) + pos0 in float32: equal up to rounding.
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)
        else:
            assert torch.equal(got[key], expected[key]), key


def test_checkpoint_of_another_patch_size_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tiny("dino-b16"), "timm", tmp_path / "b16.safetensors")
    with pytest.raises(OvssError, match=r"\(16, 16\) patches but dino-b8 uses \(8, 8\)"):
        create_backbone("dino-b8", weights=str(path), arch_overrides=tiny_overrides("dino-b8"))


def test_checkpoint_of_another_depth_is_refused_in_one_line(tmp_path: Path) -> None:
    path = save_checkpoint(tiny("dinov2-s14"), "timm", tmp_path / "s14.safetensors")
    deeper = dict(TINY, depth=3)
    with pytest.raises(OvssError, match="does not fit dinov2-s14") as err:
        create_backbone("dinov2-s14", weights=str(path), arch_overrides=deeper)
    assert "missing" in str(err.value) and "\n" not in str(err.value)


def test_weights_found_in_ovss_weights_dir(offline_and_isolated: Path) -> None:
    source = tiny("dinov2-s14-reg", seed=4)
    path = save_checkpoint(
        source, "meta-dinov2", offline_and_isolated / "dinov2_vits14_reg4_pretrain.pth"
    )
    loaded = create_backbone("dinov2-s14-reg", arch_overrides=TINY)
    assert loaded.info.weights_path == str(path)
    assert loaded.info.weights.startswith("sha256:")
    x = batch(source, 2, 2)
    torch.testing.assert_close(loaded.forward_dense(x)["patch"], source.forward_dense(x)["patch"])


def test_timm_hub_layout_found_in_ovss_weights_dir(offline_and_isolated: Path) -> None:
    folder = offline_and_isolated / "timm" / "vit_small_patch16_224.dino"
    folder.mkdir(parents=True)
    path = save_checkpoint(tiny("dino-s16", seed=2), "timm", folder / "model.safetensors")
    loaded = create_backbone("dino-s16", arch_overrides=TINY)
    assert loaded.info.weights_path == str(path)


def test_missing_weights_offline_names_the_file() -> None:
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("dinov2-b14", arch_overrides=TINY)
    message = str(err.value)
    assert "\n" not in message
    assert "dinov2_vitb14_pretrain.pth" in message
    assert "timm/vit_base_patch14_dinov2.lvd142m/model.safetensors" in message
    assert "$OVSS_WEIGHTS" in message and "--weights PATH" in message
    assert "--random-init" in message


# --- position-embedding rule ------------------------------------------------------------------


def meta_interpolate_pos_encoding(pos_embed: torch.Tensor, w: int, h: int, patch: int):
    """DINO v1's / DINOv2's (``interpolate_offset=0.1``, no antialias) hub
    ``interpolate_pos_encoding``, rewritten: input ``(B, 3, w, h)`` (their names: w = rows),
    ``pos_embed`` ``(1, 1 + N, D)`` with the class position first."""
    n = pos_embed.shape[1] - 1
    if n == (w // patch) * (h // patch) and w == h:
        return pos_embed
    side = math.sqrt(n)
    dim = pos_embed.shape[-1]
    rows, cols = w // patch + 0.1, h // patch + 0.1
    grid = pos_embed[:, 1:].float().reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(rows / side, cols / side), mode="bicubic")
    assert (int(rows), int(cols)) == tuple(grid.shape[-2:])
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def authors_dino_forward(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Meta's ``prepare_tokens_with_masks`` + blocks + norm on timm's parameters: the final
    patch tokens ``(B, gh*gw, D)``."""
    p = model.patch_embed.patch_size[0]
    with torch.no_grad():
        tokens = model.patch_embed(x).flatten(1, 2)  # (B, gh*gw, D), NHWC flattened row-major
        tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + meta_interpolate_pos_encoding(model.pos_embed, x.shape[2], x.shape[3], p)
        for block in model.blocks:
            tokens = block(tokens)
        return model.norm(tokens)[:, 1:]


@pytest.mark.parametrize(
    ("name", "gh", "gw"),
    [("dinov2-s14", 32, 42), ("dinov2-s14", 20, 20), ("dino-s16", 28, 42), ("dino-b8", 9, 5)],
)
def test_no_register_models_follow_the_authors_offset_rule(name: str, gh: int, gw: int) -> None:
    backbone = tiny(name, seed=4)
    assert backbone.info.extra["pos_interp"] == "offset"
    x = batch(backbone, gh, gw, n=1)
    expected = authors_dino_forward(backbone.model, x)
    torch.testing.assert_close(backbone.forward_dense(x)["patch"], expected, rtol=0, atol=1e-6)
    # timm's own rule (size=, antialiased: what ovss cached before) samples elsewhere.
    old = create_backbone(
        name, random_init=True, seed=4, arch_overrides=tiny_overrides(name), pos_interp="size-aa"
    )
    assert "_pos_embed" not in vars(old.model)  # timm's own code path
    with torch.no_grad():
        timm_own = old.model.forward_features(x)[:, 1:]
    torch.testing.assert_close(old.forward_dense(x)["patch"], timm_own, rtol=0, atol=0)
    assert (timm_own - expected).abs().max() > 1e-4


def test_register_models_keep_timm_size_antialias_rule_as_meta_hub() -> None:
    """DINOv2 with registers: Meta's hub uses ``size=`` with antialias, exactly timm's."""
    backbone = tiny("dinov2-s14-reg", seed=4)
    assert backbone.info.extra["pos_interp"] == "size-aa"
    x = batch(backbone, 32, 42, n=1)
    model = backbone.model
    with torch.no_grad():
        patches = model.patch_embed(x).flatten(1, 2)
        grid = model.pos_embed.reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(32, 42), mode="bicubic", antialias=True)
        tokens = patches + grid.permute(0, 2, 3, 1).reshape(1, 32 * 42, -1)
        prefix = [model.cls_token.expand(1, -1, -1), model.reg_token.expand(1, -1, -1)]
        tokens = torch.cat([*prefix, tokens], dim=1)
        for block in model.blocks:
            tokens = block(tokens)
        expected = model.norm(tokens)[:, 5:]
    torch.testing.assert_close(backbone.forward_dense(x)["patch"], expected, rtol=0, atol=1e-6)
    offset = create_backbone(
        "dinov2-s14-reg", random_init=True, seed=4, arch_overrides=TINY, pos_interp="offset"
    )
    assert not torch.allclose(offset.forward_dense(x)["patch"], expected, atol=1e-4)


@pytest.mark.parametrize("name", ["dinov2-s14", "dino-s16", "dinov2-s14-reg"])
def test_native_grid_agrees_under_every_rule(name: str) -> None:
    native = 37 if "14" in name else 14
    outs = []
    for rule in ("offset", "size", "size-aa"):
        bb = create_backbone(
            name, random_init=True, seed=1, arch_overrides=TINY, pos_interp=rule, layers=(0,)
        )
        outs.append(bb.forward_dense(batch(bb, native, native, n=1)))
    for out in outs[1:]:
        assert all(torch.equal(out[k], outs[0][k]) for k in out)


# --- every registered backbone ------------------------------------------------------------------


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_builds_tiny_and_returns_what_it_declares(name: str) -> None:
    """Parametrised over the registry: a family added later joins by registering its tiny
    ``arch_overrides`` (``register_variants(..., tiny=...)``)."""
    backbone = create_backbone(
        name, random_init=True, seed=0, arch_overrides=tiny_arch_overrides(name)
    )
    assert backbone.info.name == name and backbone.info.weights == "random-init:0"
    specs = backbone.tensor_specs()
    assert specs and len({s.name for s in specs}) == len(specs)
    protocol = Protocol(resize="square", size=4 * backbone.info.patch_size)
    if name.startswith("sam-"):
        protocol = Protocol(resize="long", size=backbone.info.extra["img_size"])
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    geometry = backbone.geometry(protocol, 40, 56)
    x = torch.stack(backbone.preprocess(image, geometry))
    grids = [w.grid for w in geometry.windows]
    out = backbone.forward_dense(x, grids)
    whole = backbone.preprocess_image(image, geometry)
    if whole is not None:
        out.update(backbone.forward_image(whole[None]))
    assert set(out) == {s.name for s in specs}
    for spec in specs:
        if spec.unit == "token":
            gh, gw = grids[0]
            assert out[spec.name].shape[1] >= gh * gw, spec.name
            assert tuple(out[spec.name].shape[2:]) == spec.row_shape, spec.name
        else:
            assert tuple(out[spec.name].shape[1:]) == spec.row_shape, spec.name
        assert torch.isfinite(out[spec.name]).all(), spec.name
