"""CLIP backbones (open_clip): registry, cached tensors vs open_clip's own forward, weights.

All models are the real ``open_clip.model.CLIP`` class shrunk with ``arch_overrides`` (2 blocks,
64-wide, 2 heads, 32-d embedding), random-initialised on the CPU; checkpoints are written by the
tests in open_clip's layout (.bin / .safetensors) and OpenAI's (a TorchScript archive).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from featurestore.backbones import clip as clip_module
from featurestore.backbones import create_backbone, list_backbones
from featurestore.backbones.base import backbone_doc
from featurestore.backbones.clip import (
    STATIC_NAMES,
    CLIPBackbone,
    interpolate_pos_embed,
    load_open_clip,
)
from featurestore.errors import OvssError, WeightsNotFoundError
from featurestore.extract import ExtractConfig, extract, plan
from featurestore.images import list_folder_images, load_image_rgb
from featurestore.protocol import Protocol
from featurestore.store import FeatureStore

CLIP_NAMES = ["clip-b16", "clip-h14", "clip-l14", "clip-l14-336"]
LAION_B16 = "openclip:ViT-B-16:laion2b_s34b_b88k"
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
    "text_cfg": {"layers": 2, "width": 64, "heads": 2},
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny(name: str, seed: int = 0, layers: tuple[int, ...] = (), **kw) -> CLIPBackbone:
    return create_backbone(
        name, random_init=True, seed=seed, layers=layers, arch_overrides=TINY, **kw
    )


@functools.cache
def _tiny_model(name: str, seed: int) -> open_clip.model.CLIP:
    return load_open_clip(name, random_init=True, seed=seed, arch_overrides=TINY)[0]


def tiny_model(name: str, seed: int = 0) -> open_clip.model.CLIP:
    """A whole tiny CLIP (image and text towers); a fresh copy of a cached build."""
    return copy.deepcopy(_tiny_model(name, seed))


def windows(p: int, gh: int, gw: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, gh * p, gw * p, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def offline_and_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network, an empty $OVSS_WEIGHTS, and empty hub / torch.hub / open_clip URL caches."""
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OVSS_WEIGHTS", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(clip_module, "OPENAI_CACHE_DIR", tmp_path / "dot_cache_clip")
    return weights_dir


# --- registry -----------------------------------------------------------------------------------


def test_registry_holds_every_clip_name_with_a_doc() -> None:
    assert set(CLIP_NAMES) <= set(list_backbones())
    for name in CLIP_NAMES:
        assert "CLIP" in backbone_doc(name)


def test_unknown_name_mentions_clip_names_and_the_openclip_syntax() -> None:
    with pytest.raises(OvssError) as err:
        create_backbone("clip-b17", random_init=True)
    message = str(err.value)
    assert "'clip-b17' is not a known model" in message
    assert "clip-b16" in message and "openclip:<model_name>:<pretrained_tag>" in message


@pytest.mark.parametrize("name", [*CLIP_NAMES, LAION_B16])
def test_tiny_build_is_the_real_class_and_recorded(name: str) -> None:
    backbone = tiny(name, seed=3)
    visual = backbone.visual
    assert type(visual) is open_clip.transformer.VisionTransformer
    assert len(visual.transformer.resblocks) == 2 and visual.transformer.width == 64
    assert visual.transformer.resblocks[-1].attn.num_heads == 2
    openai = name != "clip-h14" and name != LAION_B16
    act = visual.transformer.resblocks[0].mlp.gelu
    assert type(act) is (open_clip.transformer.QuickGELU if openai else torch.nn.GELU)

    info = backbone.info
    patch = 16 if "b16" in name or "B-16" in name else 14
    native = 336 if name == "clip-l14-336" else 224
    assert info.name == name and info.family == "clip"
    assert info.patch_size == patch
    assert info.mean == OPENAI_MEAN and info.std == OPENAI_STD  # also the LAION tags' values
    assert info.weights == "random-init:3" and info.weights_path is None
    assert set(info.library) == {"open_clip", "torch"}
    extra = info.extra
    assert extra["activation"] == ("quick_gelu" if openai else "gelu")
    assert extra["open_clip_model"] == info.arch
    tags = {"clip-h14": "laion2b_s32b_b79k", LAION_B16: "laion2b_s34b_b88k"}
    assert extra["pretrained_tag"] == tags.get(name, "openai")
    assert (extra["num_heads"], extra["width"], extra["embed_dim"], extra["depth"]) == (
        2,
        64,
        32,
        2,
    )
    assert extra["image_size"] == [native, native]
    assert extra["pos_embed_grid"] == [native // patch] * 2
    assert extra["pos_interp"] == "offset"  # the authors' rule, recorded
    assert "0.1" in extra["pos_embed_interpolation"]
    assert extra["arch_overrides"] == TINY  # recorded as given

    model, tokenizer, model_info = load_open_clip(
        name, random_init=True, seed=3, arch_overrides=TINY
    )
    assert type(model) is open_clip.model.CLIP
    image_only = ("pos_interp", "pos_embed_interpolation")  # the cache's rule, not the text's
    assert model_info.extra == {
        **{k: v for k, v in extra.items() if k not in image_only},
        "layers": [],
    }
    assert tokenizer(["a photo of a cat"]).shape == (1, 77)
    for key, value in model.visual.state_dict().items():  # same seed, same weights
        assert torch.equal(value, visual.state_dict()[key]), key


def test_registered_variants_are_the_documented_open_clip_pairs() -> None:
    pairs = {v.name: (v.model, v.tag) for v in clip_module.VARIANTS}
    assert pairs == {
        "clip-b16": ("ViT-B-16-quickgelu", "openai"),
        "clip-l14": ("ViT-L-14-quickgelu", "openai"),
        "clip-l14-336": ("ViT-L-14-336-quickgelu", "openai"),
        "clip-h14": ("ViT-H-14", "laion2b_s32b_b79k"),
    }


def test_full_size_architectures_on_the_meta_device() -> None:
    expected = {  # width D, embedding E, blocks, heads, native size
        "clip-b16": (768, 512, 12, 12, 224),
        "clip-l14": (1024, 768, 24, 16, 224),
        "clip-l14-336": (1024, 768, 24, 16, 336),
        "clip-h14": (1280, 1024, 32, 16, 224),
    }
    for name, (d, e, depth, heads, size) in expected.items():
        with torch.device("meta"):
            backbone = create_backbone(name, random_init=True)
        specs = {s.name: s for s in backbone.tensor_specs()}
        assert specs["pre_last"].row_shape == (d,) and specs["pre_last"].unit == "token"
        assert specs["pre_last_cls"].row_shape == (d,) and specs["pre_last_cls"].unit == "window"
        assert specs["global"].row_shape == (e,) and specs["global"].unit == "window"
        assert specs["global_image"].row_shape == (e,) and specs["global_image"].unit == "image"
        extra = backbone.info.extra
        assert (extra["depth"], extra["num_heads"], extra["image_size"][0]) == (depth, heads, size)


# --- dense outputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLIP_NAMES)
def test_specs_describe_outputs_at_non_square_sizes(name: str) -> None:
    backbone = tiny(name, layers=(0,))
    specs = {s.name: s for s in backbone.tensor_specs()}
    assert set(specs) == {
        "pre_last",
        "pre_last_cls",
        "global",
        "global_image",
        "layer0",
        "layer0_cls",
    }
    assert specs["layer0_cls"].unit == "window" and specs["layer0_cls"].row_shape == (64,)
    assert {s.name for s in tiny(name).tensor_specs()} == {
        "pre_last",
        "pre_last_cls",
        "global",
        "global_image",
    }
    p = backbone.info.patch_size
    for gh, gw in ((2, 3), (3, 2)):
        out = backbone.forward_dense(windows(p, gh, gw))
        assert set(out) == set(specs) - {"global_image"}
        for key, tensor in out.items():
            lead = (2, gh * gw) if specs[key].unit == "token" else (2,)
            assert tensor.shape == lead + specs[key].row_shape, key
            assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    size = backbone.info.extra["image_size"][0]
    whole = backbone.forward_image(windows(1, size, size, n=1))
    assert set(whole) == {"global_image"} and whole["global_image"].shape == (1, 32)


def test_native_window_equals_open_clip_forward() -> None:
    backbone, model = tiny("clip-b16", seed=5), tiny_model("clip-b16", seed=5)
    x = windows(16, 14, 14)
    out = backbone.forward_dense(x)
    with torch.no_grad():
        embedding = model.encode_image(x)
        inter = model.visual.forward_intermediates(
            x, indices=[0], output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
        )  # block 0's output = the tokens entering block 1, the last of 2
    torch.testing.assert_close(out["global"], embedding, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["pre_last"], inter["image_intermediates"][0], rtol=0, atol=0)
    torch.testing.assert_close(
        out["pre_last_cls"], inter["image_intermediates_prefix"][0][:, 0], rtol=0, atol=0
    )


def authors_pos_encoding(
    positional_embedding: torch.Tensor, w: int, h: int, patch: int
) -> torch.Tensor:
    """ProxyCLIP's / Trident's ``VisionTransformer.interpolate_pos_encoding``
    (``open_clip/transformer.py``; SCLIP's ``clip/model.py`` is the same), rewritten here: the
    input is ``(B, 3, w, h)`` (their names: w = rows), ``positional_embedding`` ``(1 + N, D)``.
    Returns ``(1, 1 + gh * gw, D)``."""
    n = positional_embedding.shape[0] - 1
    side = math.sqrt(n)
    dim = positional_embedding.shape[-1]
    cls_pos = positional_embedding[[0]]
    rows, cols = w // patch + 0.1, h // patch + 0.1
    grid = positional_embedding[1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(rows / side, cols / side), mode="bicubic")
    assert int(rows) == grid.shape[-2] and int(cols) == grid.shape[-1]
    return torch.cat((cls_pos.unsqueeze(0), grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def open_clip_pre_last(model: open_clip.model.CLIP, pos: torch.Tensor, x: torch.Tensor):
    """open_clip's own forward with ``pos`` as its position embedding: (block-0 patch tokens =
    the tokens entering the last of 2 blocks, the image embedding)."""
    visual = copy.deepcopy(model.visual)
    visual.positional_embedding = torch.nn.Parameter(pos.detach().reshape(-1, pos.shape[-1]))
    with torch.no_grad():
        embedding = visual(x)
        inter = visual.forward_intermediates(
            x, indices=[0], output_fmt="NLC", intermediates_only=True
        )["image_intermediates"][0]
    return inter, embedding


# B/16 windows of 336x336, 448x448, 448x672 (the brief's) and two small non-square ones.
AUTHOR_GRIDS = [(21, 21), (28, 28), (28, 42), (2, 3), (20, 17)]


@pytest.mark.parametrize(("gh", "gw"), AUTHOR_GRIDS)
def test_other_windows_equal_the_authors_position_rule(gh: int, gw: int) -> None:
    """The default rule is the authors' formula: open_clip's forward given the embedding their
    ``interpolate_pos_encoding`` computes gives the cached tokens exactly."""
    backbone, model = tiny("clip-b16", seed=2), tiny_model("clip-b16", seed=2)
    x = windows(16, gh, gw, n=1)
    authors = authors_pos_encoding(model.visual.positional_embedding.detach(), 16 * gh, 16 * gw, 16)
    out = backbone.forward_dense(x)
    inter, embedding = open_clip_pre_last(model, authors, x)
    torch.testing.assert_close(out["pre_last"], inter, rtol=0, atol=0)
    torch.testing.assert_close(out["global"], embedding, rtol=0, atol=1e-6)
    # The old rule (size=(gh, gw)) samples elsewhere: the cached tokens move.
    old = tiny("clip-b16", seed=2, pos_interp="size")
    assert old.info.extra["pos_interp"] == "size"
    moved = (old.forward_dense(x)["pre_last"] - out["pre_last"]).abs().max()
    assert moved > 1e-4, float(moved)


def test_size_rule_is_the_old_exact_size_interpolation() -> None:
    """``pos_interp="size"`` reproduces ovss's rule before (open_clip given a ``size=`` embedding)."""
    backbone, model = tiny("clip-b16", seed=2, pos_interp="size"), tiny_model("clip-b16", seed=2)
    x = windows(16, 28, 42, n=1)
    pos = model.visual.positional_embedding.detach()
    grid = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(28, 42), mode="bicubic", align_corners=False)
    sized = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(28 * 42, -1)])
    inter, _ = open_clip_pre_last(model, sized, x)
    torch.testing.assert_close(backbone.forward_dense(x)["pre_last"], inter, rtol=0, atol=0)


def test_native_grid_is_the_same_under_every_rule() -> None:
    x = windows(16, 14, 14, n=1)
    outs = [
        tiny("clip-b16", seed=2, pos_interp=r).forward_dense(x)["pre_last"]
        for r in ("offset", "size", "size-aa")
    ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_unknown_rule_is_refused_in_one_line() -> None:
    with pytest.raises(OvssError, match="pos_interp 'bilinear' is not a rule for clip-b16"):
        tiny("clip-b16", pos_interp="bilinear")


def test_position_embedding_interpolation() -> None:
    pos = torch.randn(1 + 14 * 14, 8, generator=torch.Generator().manual_seed(0))
    assert interpolate_pos_embed(pos, (14, 14), (14, 14)) is pos  # native: the identity
    out = interpolate_pos_embed(pos, (14, 14), (21, 10))
    assert out.shape == (1 + 21 * 10, 8)
    assert torch.equal(out[0], pos[0])  # the class position is kept
    authors = authors_pos_encoding(pos, 21 * 16, 10 * 16, 16)[0]
    torch.testing.assert_close(out, authors, rtol=0, atol=0)
    sized = interpolate_pos_embed(pos, (14, 14), (21, 10), rule="size")
    grid = pos[1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    reference = F.interpolate(grid, size=(21, 10), mode="bicubic", align_corners=False)
    torch.testing.assert_close(sized[1:], reference.permute(0, 2, 3, 1).reshape(210, 8))
    assert not torch.allclose(sized, out)
    antialiased = F.interpolate(grid, (21, 10), mode="bicubic", antialias=True)
    assert not torch.allclose(sized[1:], antialiased.permute(0, 2, 3, 1).reshape(210, 8))
    # A constant embedding stays constant (bicubic weights sum to one), also when shrinking.
    flat = torch.cat([pos[:1], torch.full((196, 8), 0.25)])
    for rule in ("offset", "size", "size-aa"):
        shrunk = interpolate_pos_embed(flat, (14, 14), (9, 30), rule=rule)[1:]
        assert torch.allclose(shrunk, torch.tensor(0.25)), rule


def test_requested_layers_are_block_outputs() -> None:
    backbone, model = tiny("clip-l14", layers=(0, -1)), tiny_model("clip-l14")
    assert backbone.info.extra["layers"] == [0, 1]
    x = windows(14, 16, 16)
    out = backbone.forward_dense(x)
    with torch.no_grad():
        res = model.visual.forward_intermediates(
            x, indices=[0, 1], output_fmt="NLC", intermediates_only=True, output_extra_tokens=True
        )
    inter, prefix = res["image_intermediates"], res["image_intermediates_prefix"]
    assert torch.equal(out["layer0"], inter[0]) and torch.equal(out["layer0"], out["pre_last"])
    assert torch.equal(out["layer1"], inter[1])
    assert torch.equal(out["layer0_cls"], prefix[0][:, 0])
    assert torch.equal(out["layer0_cls"], out["pre_last_cls"])
    assert torch.equal(out["layer1_cls"], prefix[1][:, 0])
    assert not torch.equal(out["layer1_cls"], out["layer0_cls"])


def test_static_tensors_are_the_last_block_parameters() -> None:
    backbone = tiny("clip-b16", seed=4)
    static = backbone.static_tensors()
    assert tuple(static) == STATIC_NAMES
    visual = backbone.visual
    block = visual.transformer.resblocks[-1]
    for name, array in static.items():
        assert array.dtype == np.float32, name
        if name.startswith("last_block."):
            want = block.get_parameter(name.removeprefix("last_block."))
        else:
            want = visual.get_parameter(name)
        assert np.array_equal(array, want.detach().numpy()), name
    assert static["last_block.attn.in_proj_weight"].shape == (192, 64)
    assert static["proj"].shape == (64, 32)


def test_whole_image_input_and_embedding() -> None:
    backbone, model = tiny("clip-b16", seed=1), tiny_model("clip-b16", seed=1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = backbone.preprocess_image(image, backbone.geometry(Protocol(), 224, 224))
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(OPENAI_STD).view(3, 1, 1) * 255
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(x, expected)  # native size: normalisation only
    wide = backbone.preprocess_image(rng.integers(0, 256, (50, 300, 3), dtype=np.uint8), None)
    assert wide.shape == (3, 224, 224)  # squashed, aspect not kept
    assert wide.max() <= (255 - mean.min()) / std.min() + 1e-4  # clamped to the pixel range
    with torch.no_grad():
        want = model.encode_image(x[None])
    torch.testing.assert_close(
        backbone.forward_image(x[None])["global_image"], want, rtol=0, atol=1e-6
    )


def test_seeded_random_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b, c = tiny("clip-b16", seed=7), tiny("clip-b16", seed=7), tiny("clip-b16", seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    x = windows(16, 2, 2)
    assert torch.equal(a.forward_dense(x)["pre_last"], b.forward_dense(x)["pre_last"])
    assert not torch.allclose(a.forward_dense(x)["pre_last"], c.forward_dense(x)["pre_last"])


def test_bad_arguments_and_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OvssError, match="layer 2 does not exist in clip-b16"):
        tiny("clip-b16", layers=(2,))
    with pytest.raises(OvssError, match="exclude each other"):
        create_backbone("clip-b16", weights=str(tmp_path / "x.pt"), random_init=True)
    backbone = tiny("clip-b16")
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        backbone.forward_dense(torch.zeros(1, 3, 32, 40))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backbone.forward_dense(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="unknown keys"):
        create_backbone("clip-b16", random_init=True, arch_overrides={"vision_cfg": {"depth": 2}})
    with pytest.raises(ValueError, match="fixed by the weights"):
        create_backbone("clip-b16", random_init=True, arch_overrides={"quick_gelu": False})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("openclip:ViT-B-16", "is not of the form openclip:<model_name>:<pretrained_tag>"),
        ("openclip:ViT-B-61:openai", "'ViT-B-61' is not an open_clip model; close names: ViT-B-16"),
        ("openclip:ViT-B-16:laion9b", "no pretrained tag 'laion9b' for ViT-B-16; its tags: openai"),
        ("openclip:ViT-B-16:openai", "use openclip:ViT-B-16-quickgelu:openai"),
        ("openclip:ViT-B-16-SigLIP:webli", "timm image tower"),
    ],
)
def test_openclip_names_are_checked(name: str, message: str) -> None:
    with pytest.raises(OvssError, match=message):
        create_backbone(name, random_init=True, arch_overrides=TINY)


# --- checkpoint loading -------------------------------------------------------------------------


def fp16_exact(model: torch.nn.Module) -> torch.nn.Module:
    """Round every parameter to float16 and back (OpenAI ships float16 weights), so a float16
    archive holds this model exactly."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def save_openai_torchscript(model: torch.nn.Module, path: Path) -> Path:
    """OpenAI's release format: a TorchScript archive whose state dict holds the model's float16
    weights under open_clip's key names plus ``input_resolution``/``context_length``/
    ``vocab_size`` entries."""

    class Node(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Node()
    for key, value in model.state_dict().items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, Node())
            node = getattr(node, part)
        node.register_buffer(leaf, value.detach().half().clone())
    for key, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(key, torch.tensor(value))
    with pytest.warns(FutureWarning):  # torch.jit.script is deprecated, OpenAI's files are not
        torch.jit.script(root).save(str(path))
    return path


def save_checkpoint(model: torch.nn.Module, layout: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "openai":
        return save_openai_torchscript(model, path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "safetensors":
        save_file(state, str(path))
    else:  # open_clip's .bin: a plain torch.save of the state dict
        torch.save(state, path)
    return path


LOAD_CASES = [  # name, layout, file under $OVSS_WEIGHTS
    ("clip-b16", "openai", "ViT-B-16.pt"),
    ("clip-b16", "bin", "timm/vit_base_patch16_clip_224.openai/open_clip_pytorch_model.bin"),
    ("clip-l14-336", "openai", "ViT-L-14-336px.pt"),
    (
        "clip-h14",
        "safetensors",
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K/open_clip_model.safetensors",
    ),
    (LAION_B16, "bin", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K/open_clip_pytorch_model.bin"),
]


@pytest.mark.parametrize(("name", "layout", "filename"), LOAD_CASES)
def test_checkpoint_in_ovss_weights_loads_through_open_clip(
    name: str, layout: str, filename: str, offline_and_isolated: Path
) -> None:
    source = fp16_exact(tiny_model(name, seed=11))
    path = save_checkpoint(source, layout, offline_and_isolated / filename)
    if layout == "openai":
        assert clip_module._is_torchscript_archive(path)

    model, tokenizer, info = load_open_clip(name, arch_overrides=TINY)
    assert info.weights == f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert info.weights_path == str(path)
    for key, value in source.state_dict().items():  # image and text towers
        assert torch.equal(model.state_dict()[key], value), key
    text = tokenizer(["a photo of a cat", "sky"])
    with torch.no_grad():
        assert torch.equal(model.encode_text(text), source.encode_text(text))

    explicit = create_backbone(name, weights=str(path), arch_overrides=TINY)  # --weights PATH
    assert explicit.info.weights == info.weights and explicit.info.weights_path == str(path)
    for key, value in source.visual.state_dict().items():
        assert torch.equal(explicit.visual.state_dict()[key], value), key


def test_openai_file_found_in_open_clips_url_cache(tmp_path: Path) -> None:
    source = fp16_exact(tiny_model("clip-l14", seed=1))
    path = save_checkpoint(source, "openai", tmp_path / "dot_cache_clip" / "ViT-L-14.pt")
    state = torch.get_rng_state()
    backbone = create_backbone("clip-l14", arch_overrides=TINY)
    assert torch.equal(torch.get_rng_state(), state)  # open_clip's throw-away init is fenced
    assert backbone.info.weights_path == str(path)
    x = windows(14, 16, 16, n=1)  # the native 224 px
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.forward_dense(x)["global"], source.encode_image(x), rtol=0, atol=1e-6
        )


def test_checkpoint_of_another_architecture_is_refused_in_one_line(tmp_path: Path) -> None:
    path = save_checkpoint(tiny_model("clip-b16"), "bin", tmp_path / "b16.bin")
    deeper = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 3}}
    with pytest.raises(OvssError, match="does not fit clip-b16") as err:
        create_backbone("clip-b16", weights=str(path), arch_overrides=deeper)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("clip-b16", ["ViT-B-16.pt", "timm/vit_base_patch16_clip_224.openai/open_clip_model"]),
        ("clip-h14", ["laion/CLIP-ViT-H-14-laion2B-s32B-b79K/open_clip_model.safetensors"]),
    ],
)
def test_missing_weights_offline_names_the_file(name: str, files: list[str]) -> None:
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone(name, arch_overrides=TINY)
    message = str(err.value)
    assert "\n" not in message and f"no weights for {name}" in message
    for f in files:
        assert f in message
    assert "$OVSS_WEIGHTS" in message and "--weights PATH" in message


# --- the pipeline -------------------------------------------------------------------------------


def write_images(root: Path, sizes: list[tuple[int, int]]) -> list:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"im{i}.png")
    return list_folder_images(root)


def test_dry_run_plans_the_cache_size(tmp_path: Path) -> None:
    records = write_images(tmp_path / "imgs", [(512, 683)])  # an ADE20K-sized image
    protocol = Protocol(resize="short", size=448, crop=224, stride=112)
    (row,) = plan(records, ExtractConfig(models=["clip-b16"], protocol=protocol, store="unused"))
    # 448x598 after resizing: 3 x 5 windows of 14 x 14 tokens, float16
    assert (row.windows, row.tokens) == (15, 15 * 196)
    assert row.bytes == 2 * (15 * 196 * 768 + 15 * 768 + 15 * 512 + 512)


def test_extracted_store_equals_the_backbone(tmp_path: Path) -> None:
    records = write_images(tmp_path / "imgs", [(40, 70), (64, 48)])
    protocol = Protocol(resize="short", size=48, crop=32, stride=16)  # windows of 2 x 2 tokens
    cfg = ExtractConfig(
        models=["clip-b16"],
        protocol=protocol,
        store=str(tmp_path / "s.zarr"),
        random_init=True,
        arch_overrides=TINY,
        dtype="float32",
        batch_size=3,
        workers=1,
    )
    assert extract(records, cfg).models[0].images_extracted == 2
    fs = FeatureStore.open(tmp_path / "s.zarr").require(
        "clip-b16", protocol, weights="random-init:0", tensors=["pre_last", "global_image"]
    )
    backbone = tiny("clip-b16")
    assert fs.provenance["backbone"]["extra"]["activation"] == "quick_gelu"
    for name, array in backbone.static_tensors().items():
        assert np.array_equal(fs.static(name), array), name
    for i, record in enumerate(records):
        image = load_image_rgb(record.path)
        geometry = backbone.geometry(protocol, *image.shape[:2])
        got = fs.read(i)
        assert got.win_grid.tolist() == [list(w.grid) for w in geometry.windows]
        x = torch.stack(backbone.preprocess(image, geometry))  # every window is 32 x 32 here
        want = backbone.forward_dense(x)
        for key in ("pre_last", "pre_last_cls", "global"):
            expected = want[key].reshape(-1, want[key].shape[-1]).numpy()
            np.testing.assert_allclose(got.tensors[key], expected, rtol=0, atol=1e-5)
        whole = backbone.forward_image(backbone.preprocess_image(image, geometry)[None])
        np.testing.assert_allclose(
            got.tensors["global_image"], whole["global_image"].numpy(), rtol=0, atol=1e-5
        )
