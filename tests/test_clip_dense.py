"""CLIP last-block variants from the cache vs the same computation through open_clip's modules.

Reference computations run the real ``ResidualAttentionBlock`` of a tiny random-init
``open_clip.model.CLIP`` on real window inputs: the value path is that block's own
``nn.MultiheadAttention`` with each token allowed to attend to itself only (its output is then
exactly ``out_proj(v)``), so nothing of ``methods.clip_dense`` is reused in the references.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.backbones import create_backbone
from featurestore.backbones.clip import CLIPBackbone, load_open_clip
from featurestore.errors import ProvenanceMismatchError
from featurestore.extract import ExtractConfig, extract
from featurestore.images import list_folder_images, load_image_rgb
from featurestore.protocol import Protocol
from featurestore.store import FeatureSet, FeatureStore
from methods.clip_dense import (
    LastBlock,
    attention_output,
    bare_value_dense,
    maskclip_dense,
    pixelclip_dense,
    value_tokens,
)

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
    "text_cfg": {"layers": 2, "width": 64, "heads": 2},
}
PROTOCOL = Protocol(resize="short", size=48, crop=32, stride=16)
HEADS = 2


@pytest.fixture(scope="module")
def clip() -> tuple[CLIPBackbone, torch.nn.Module]:
    """A tiny clip-b16 backbone and the whole open_clip model with the same weights."""
    backbone = create_backbone("clip-b16", random_init=True, seed=3, arch_overrides=TINY)
    model = load_open_clip("clip-b16", random_init=True, seed=3, arch_overrides=TINY)[0]
    return backbone, model


@pytest.fixture(scope="module")
def block(clip) -> LastBlock:
    backbone, _ = clip
    return LastBlock.from_static(backbone.static_tensors(), HEADS, "quick_gelu")


@pytest.fixture(scope="module")
def tokens(clip) -> torch.Tensor:
    """``(2, 1 + 6, 64)``: CLS + 2x3 patch tokens entering the last block of two windows."""
    backbone, _ = clip
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    return backbone.pre_last_tokens(x).clone()


def self_only_mask(n: int) -> torch.Tensor:
    """Additive attention mask letting token i attend to token i only."""
    mask = torch.full((n, n), float("-inf"))
    return mask.fill_diagonal_(0.0)


def reference_value_path(model, x: torch.Tensor) -> torch.Tensor:
    """``out_proj(v)`` for every token, through the block's own attention module."""
    block = model.visual.transformer.resblocks[-1]
    y = block.ln_1(x)
    return block.attn(y, y, y, need_weights=False, attn_mask=self_only_mask(x.shape[1]))[0]


def head(model, o: torch.Tensor) -> torch.Tensor:
    return model.visual.ln_post(o) @ model.visual.proj


@torch.no_grad()
def test_last_block_from_static_equals_from_the_live_model(clip, block) -> None:
    _, model = clip
    live = LastBlock.from_visual(model.visual)
    assert (live.num_heads, live.activation, live.eps) == (HEADS, "quick_gelu", 1e-5)
    assert (block.width, block.embed_dim, block.head_dim) == (64, 32, 32)
    for name in ("in_proj_weight", "c_proj_bias", "ln_post_weight", "proj"):
        assert torch.equal(getattr(live, name), getattr(block, name)), name


@torch.no_grad()
def test_maskclip_equals_the_block_with_self_only_attention(clip, block, tokens) -> None:
    _, model = clip
    # With self-only attention, the real block computes o = out_proj(v) + x, o + MLP(ln_2(o)).
    o = model.visual.transformer.resblocks[-1](tokens, attn_mask=self_only_mask(tokens.shape[1]))
    expected = head(model, o)[:, 1:]
    got = maskclip_dense(tokens[:, 1:], tokens[:, 0], block)
    assert got.shape == (2, 6, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    single = maskclip_dense(tokens[0, 1:].numpy(), None, block)  # (N, D) numpy in, (N, E) out
    torch.testing.assert_close(single, expected[0], rtol=0, atol=2e-6)


@torch.no_grad()
def test_bare_value_path(clip, block, tokens) -> None:
    _, model = clip
    expected = head(model, reference_value_path(model, tokens))[:, 1:]
    torch.testing.assert_close(
        bare_value_dense(tokens[:, 1:], None, block), expected, atol=2e-6, rtol=0
    )


@torch.no_grad()
def test_pixelclip_dense_block(clip, block, tokens) -> None:
    _, model = clip
    last = model.visual.transformer.resblocks[-1]
    t = reference_value_path(model, tokens)[:, 1:] + tokens[:, :1]  # + the CLS input, broadcast
    t = t + last.mlp(last.ln_2(t))
    expected = head(model, t)
    got = pixelclip_dense(tokens[:, 1:], tokens[:, 0], block)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(pixelclip_dense(tokens[1, 1:], tokens[1, 0], block), expected[1])
    with pytest.raises(ValueError, match="does not match tokens"):
        pixelclip_dense(tokens[:, 1:], tokens[0, 0], block)


@torch.no_grad()
def test_values_with_replaced_attention_equal_the_attention_module(clip, block, tokens) -> None:
    """A different permutation per head and window: attention that picks one key per query."""
    _, model = clip
    batch, n, _ = tokens.shape
    g = torch.Generator().manual_seed(1)
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(batch * HEADS)])
    picks = torch.nn.functional.one_hot(perms, n).float().reshape(batch, HEADS, n, n)
    mask = torch.where(picks > 0, 0.0, float("-inf")).reshape(batch * HEADS, n, n)
    last = model.visual.transformer.resblocks[-1]
    y = last.ln_1(tokens)
    expected = last.attn(y, y, y, need_weights=False, attn_mask=mask)[0]

    v = value_tokens(tokens, block)
    assert v.shape == (batch, HEADS, n, 32)
    torch.testing.assert_close(attention_output(picks, v, block), expected, rtol=0, atol=2e-6)
    # one attention matrix shared by the heads (ProxyCLIP) broadcasts over them
    shared = picks[:, :1]
    assert attention_output(shared, v, block).shape == (batch, n, 64)


@torch.no_grad()
def test_full_block_from_the_stored_arrays_equals_encode_image(clip, block) -> None:
    """The stored arrays hold the whole last block: the ordinary embedding follows from them."""
    backbone, model = clip
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    t = backbone.pre_last_tokens(x)[0]  # (197, 64)
    d, hd = block.width, block.head_dim
    q, k, v = torch.nn.functional.linear(
        block.ln_1(t), block.in_proj_weight, block.in_proj_bias
    ).split(d, -1)
    q, k, v = (z.reshape(-1, HEADS, hd).transpose(0, 1) for z in (q, k, v))
    attn = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)
    o = t + attention_output(attn, v, block)
    o = o + block.mlp(block.ln_2(o))
    torch.testing.assert_close(block.project(o[:1]), model.encode_image(x), rtol=0, atol=2e-6)


def test_inputs_are_validated(clip, block) -> None:
    with pytest.raises(ValueError, match="last size 64"):
        maskclip_dense(torch.zeros(5, 32), None, block)
    with pytest.raises(ValueError, match="2 or 3 dims"):
        bare_value_dense(torch.zeros(64), None, block)
    backbone, _ = clip
    with pytest.raises(ValueError, match="activation"):
        LastBlock.from_static(backbone.static_tensors(), HEADS, "relu")
    with pytest.raises(KeyError, match="proj"):
        LastBlock.from_static({"ln_post.weight": np.zeros(64)}, HEADS, "gelu")


# --- from a real extracted store ----------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureSet, list]:
    root = tmp_path_factory.mktemp("clip_store")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i, (h, w) in enumerate([(40, 70), (64, 48)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / f"imgs/{i}.png"
        )
    records = list_folder_images(root / "imgs")
    common = dict(protocol=PROTOCOL, store=str(root / "s.zarr"), random_init=True, workers=1)
    extract(
        records,
        ExtractConfig(models=["clip-b16"], seed=3, arch_overrides=TINY, dtype="float32", **common),
    )
    extract(
        records,
        ExtractConfig(
            models=["dinov2-s14"],
            arch_overrides={"depth": 1, "embed_dim": 64, "num_heads": 2},
            **common,
        ),
    )
    return FeatureStore.open(root / "s.zarr").require("clip-b16", PROTOCOL), records


@torch.no_grad()
def test_store_dense_features_equal_the_models(clip, store) -> None:
    backbone, model = clip
    fs, records = store
    cached = LastBlock.from_feature_set(fs)
    live = LastBlock.from_visual(model.visual)
    for name in ("ln_1_weight", "in_proj_bias", "out_proj_weight", "c_fc_weight", "proj"):
        assert torch.equal(getattr(cached, name), getattr(live, name)), name
    assert (cached.num_heads, cached.activation) == (HEADS, "quick_gelu")
    for i, record in enumerate(records):
        image = load_image_rgb(record.path)
        geometry = backbone.geometry(PROTOCOL, *image.shape[:2])
        x = torch.stack(backbone.preprocess(image, geometry))  # all windows share 32x32 here
        t = backbone.pre_last_tokens(x)
        got = fs.read(i)
        torch.testing.assert_close(
            torch.from_numpy(got.tensors["pre_last"]), t[:, 1:].reshape(-1, 64), rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            torch.from_numpy(got.tensors["global"]),
            model.visual.ln_post(model.visual.transformer.resblocks[-1](t)[:, 0])
            @ model.visual.proj,
            rtol=0,
            atol=1e-5,
        )
        # MaskCLIP of every token of the image from the store = the live model's block on them
        stored = maskclip_dense(got.tensors["pre_last"], None, cached)
        o = model.visual.transformer.resblocks[-1](t, attn_mask=self_only_mask(t.shape[1]))
        expected = head(model, o)[:, 1:].reshape(-1, 32)
        torch.testing.assert_close(stored, expected, rtol=0, atol=2e-5)
        pixel = pixelclip_dense(
            got.tensors["pre_last"].reshape(len(x), -1, 64), got.tensors["pre_last_cls"], cached
        )
        assert pixel.shape == (len(x), 4, 32)


def test_a_non_clip_feature_set_is_refused(store) -> None:
    fs, _ = store
    dino = fs.store.require("dinov2-s14", PROTOCOL)
    with pytest.raises(ProvenanceMismatchError, match="not a CLIP model"):
        LastBlock.from_feature_set(dino)
