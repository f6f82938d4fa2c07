"""SAM backbones and the cached-SAM methods, against segment_anything's own classes.

Models are the real ``Sam`` classes in a tiny configuration (2 encoder blocks, 64-d, 256 px input,
a 16 x 16 token grid), random-initialised on the CPU; the official configurations are checked on
the meta device against segment_anything's ``build_sam_vit_*``. Checkpoints are written by the
tests in Meta's ``.pth`` layout (a flat ``Sam`` state dict).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import segment_anything.modeling.image_encoder as sam_image_encoder
import torch
from PIL import Image
from segment_anything import (
    SamAutomaticMaskGenerator,
    SamPredictor,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
)
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam
from segment_anything.utils.transforms import ResizeLongestSide

from featurestore.backbones import create_backbone, list_backbones, tiny_arch_overrides
from featurestore.backbones.sam import SamBackbone, load_sam_decoder
from featurestore.errors import OvssError, ProvenanceMismatchError, WeightsNotFoundError
from featurestore.extract import ExtractConfig, extract, plan
from featurestore.images import list_folder_images, load_image_rgb
from featurestore.protocol import Protocol
from featurestore.store import FeatureSet, FeatureStore, ImageFeatures
from methods.sam_cache import (
    CachedSamPredictor,
    crop_token_rows,
    generate_masks_cached,
    load_sam_decoder_for,
    sam_attention,
    sam_static,
    trident_sam_inputs,
)
from ovss_cli.hints import render_error

SAM_NAMES = [n for n in list_backbones() if n.startswith("sam-")]
TINY = tiny_arch_overrides("sam-b")
IMG = TINY["img_size"]
S = IMG // 16  # token grid side
PROTO = Protocol(resize="long", size=IMG)
CHECKPOINTS = {
    "sam-b": "sam_vit_b_01ec64.pth",
    "sam-l": "sam_vit_l_0b3195.pth",
    "sam-h": "sam_vit_h_4b8939.pth",
}
# Original sizes: wide and tall with sides that are no multiple of 16 after resizing, and square.
IMAGE_SIZES = ((90, 131), (200, 57), (64, 64))


def tiny(name: str = "sam-b", seed: int = 0, layers: tuple[int, ...] = ()) -> SamBackbone:
    return create_backbone(name, random_init=True, seed=seed, layers=layers, arch_overrides=TINY)


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


def write_images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(IMAGE_SIZES):
        # Smooth stripes and blobs plus noise, deterministic.
        yy, xx = np.mgrid[0:h, 0:w]
        base = 127 + 100 * np.sin(xx / (7 + 3 * i))[..., None] * np.cos(yy / 9)[..., None]
        pixels = base + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / f"im{i}.png")
    return root


def save_official(model: Sam, path: Path) -> Path:
    """Meta's release layout: ``torch.save`` of the whole ``Sam`` state dict."""
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list:
    return list_folder_images(write_images(tmp_path_factory.mktemp("sam_images")))


def tiny_sam_store(
    images: list, store: Path, protocol: Protocol, batch_size: int, weights: Path | None = None
) -> FeatureSet:
    """float32 store of the tiny sam-b under ``protocol``: random init (seed 0), or
    ``weights``."""
    cfg = ExtractConfig(
        models=["sam-b"],
        protocol=protocol,
        store=str(store),
        weights=None if weights is None else str(weights),
        random_init=weights is None,
        arch_overrides=TINY,
        dtype="float32",
        batch_size=batch_size,
        workers=1,
        device="cpu",
    )
    report = extract(images, cfg)
    assert report.models[0].images_extracted == len(images)
    return FeatureStore.open(store).require("sam-b", protocol)


@pytest.fixture(scope="module")
def random_store(images: list, tmp_path_factory: pytest.TempPathFactory) -> FeatureSet:
    """The tiny sam-b store at the default protocol, extracted in batches of 2."""
    store = tmp_path_factory.mktemp("sam_store") / "s.zarr"
    return tiny_sam_store(images, store, PROTO, batch_size=2)


@pytest.fixture(scope="module")
def strong_bias_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Sam, Path]:
    """A tiny sam-b whose relative-position tables are large (std 0.5), saved as the release
    file: the relative-position bias then changes the attention a lot."""
    model = tiny(seed=3).model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5, generator=gen)
            block.attn.rel_pos_w.normal_(0, 0.5, generator=gen)
    path = tmp_path_factory.mktemp("sam_ckpt") / CHECKPOINTS["sam-b"]
    return model, save_official(model, path)


@pytest.fixture(scope="module")
def loaded_store(
    images: list, strong_bias_model: tuple[Sam, Path], tmp_path_factory: pytest.TempPathFactory
) -> FeatureSet:
    store = tmp_path_factory.mktemp("sam_store_w") / "s.zarr"
    return tiny_sam_store(images, store, PROTO, batch_size=3, weights=strong_bias_model[1])


class GlobalAttentionRecorder:
    """Records the pre-softmax logits of the real encoder's global-attention blocks by wrapping
    segment_anything's ``add_decomposed_rel_pos`` (which ``Attention.forward`` calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.logits: list[torch.Tensor] = []
        original = sam_image_encoder.add_decomposed_rel_pos

        def record(attn, q, rel_pos_h, rel_pos_w, q_size, k_size):
            out = original(attn, q, rel_pos_h, rel_pos_w, q_size, k_size)
            if tuple(q_size) == (S, S):  # global blocks only (windows are 4 x 4 here)
                self.logits.append(out.detach().clone())
            return out

        monkeypatch.setattr(sam_image_encoder, "add_decomposed_rel_pos", record)

    def last_attention(self) -> torch.Tensor:
        """``(H, S*S, S*S)`` softmax attention of the last global block (batch of one)."""
        return self.logits[-1].softmax(dim=-1)


def valid_rows(grid: tuple[int, int]) -> torch.Tensor:
    gh, gw = grid
    return (torch.arange(gh)[:, None] * S + torch.arange(gw)[None, :]).reshape(-1)


# --- registry, configurations, geometry -------------------------------------------------------


def test_registry_holds_every_sam_name() -> None:
    assert SAM_NAMES == ["sam-b", "sam-h", "sam-l"]


@pytest.mark.parametrize(
    ("name", "reference", "attn_block"),
    [
        ("sam-b", build_sam_vit_b, 11),
        ("sam-l", build_sam_vit_l, 23),
        ("sam-h", build_sam_vit_h, 31),
    ],
)
def test_official_configuration_equals_segment_anything_builder(
    name: str, reference, attn_block: int
) -> None:
    with torch.device("meta"):
        ours = create_backbone(name, random_init=True)
        ref = reference()
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.model.state_dict().items()} == want
    assert ours.attn_block == attn_block and ours.info.extra["attn_block"] == attn_block
    assert ours.model.image_encoder.blocks[attn_block].window_size == 0  # global
    assert ours.info.extra["img_size"] == 1024 and ours.info.extra["embedding_size"] == 64


@pytest.mark.parametrize("name", SAM_NAMES)
def test_tiny_build_is_the_real_classes_and_recorded(name: str) -> None:
    backbone = tiny(name, seed=3, layers=(-2,))
    model = backbone.model
    assert type(model) is Sam and type(model.image_encoder) is ImageEncoderViT
    assert type(model.prompt_encoder) is PromptEncoder and type(model.mask_decoder) is MaskDecoder
    assert len(model.image_encoder.blocks) == 2 and model.image_encoder.img_size == IMG
    assert [b.window_size for b in model.image_encoder.blocks] == [4, 0]
    assert model.prompt_encoder.image_embedding_size == (S, S)
    info = backbone.info
    assert info.name == name and info.family == "sam" and info.patch_size == 16
    assert info.arch == {"sam-b": "vit_b", "sam-l": "vit_l", "sam-h": "vit_h"}[name]
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    assert info.weights == "random-init:3" and info.weights_path is None
    assert set(info.library) == {"torch", "segment_anything"}
    extra = info.extra
    assert (extra["heads"], extra["head_dim"], extra["attn_block"]) == (2, 32, 1)
    assert extra["layers"] == [0] and extra["arch_overrides"]["global_attn_indexes"] == [1]
    specs = {s.name: (s.unit, s.row_shape) for s in backbone.tensor_specs()}
    assert specs == {
        "embedding": ("window", (32, S, S)),
        "q": ("token", (2, 32)),
        "k": ("token", (2, 32)),
        "v": ("token", (2, 32)),
        "attn_log_mass": ("token", (2,)),
        "layer0": ("token", (64,)),
    }
    static = backbone.static_tensors()
    assert static["rel_pos_h"].shape == static["rel_pos_w"].shape == (2 * S - 1, 32)
    assert static["scale"].tolist() == [32**-0.5] and static["patch_size"].tolist() == [16]
    # segment_anything starts the tables at zero; our random init draws them.
    assert np.abs(static["rel_pos_h"]).max() > 0


def test_random_init_is_seeded_per_part_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b, c = tiny(seed=7), tiny(seed=7), tiny(seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert not torch.equal(
        a.model.image_encoder.patch_embed.proj.weight, c.model.image_encoder.patch_embed.proj.weight
    )
    decoder = load_sam_decoder("sam-b", random_init=True, seed=7, arch_overrides=TINY)
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, a.model.state_dict()[key]), key


def test_bad_overrides_and_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown SAM arch_overrides.*allowed keys"):
        create_backbone("sam-b", random_init=True, arch_overrides={"dept": 2})
    with pytest.raises(ValueError, match="global_attn_indexes"):
        create_backbone(
            "sam-b", random_init=True, arch_overrides=dict(TINY, global_attn_indexes=(5,))
        )
    with pytest.raises(OvssError, match="exclude each other"):
        create_backbone("sam-b", weights=str(tmp_path / "x.pth"), random_init=True)
    with pytest.raises(OvssError, match="layer 2 does not exist"):
        tiny(layers=(2,))


@pytest.mark.parametrize(
    ("size", "resized", "grid"),
    [
        ((90, 131), (176, 256), (11, 16)),  # wide, 176 = 11 * 16
        ((300, 40), (256, 34), (16, 3)),  # tall, 34 px = 2 patches + 2 px
        ((40, 300), (34, 256), (3, 16)),
        ((5, 7), (183, 256), (12, 16)),  # smaller than a patch: upsampled
        ((3, 100), (8, 256), (1, 16)),  # short side below one patch after resizing
        ((1, 600), (1, 256), (1, 16)),  # SAM's rounding gives 0 rows: kept at 1
        ((64, 64), (256, 256), (16, 16)),
    ],
)
def test_geometry_is_resize_longest_side_padded_bottom_right(
    size: tuple[int, int], resized: tuple[int, int], grid: tuple[int, int]
) -> None:
    backbone = tiny()
    geo = backbone.geometry(PROTO, *size)
    assert geo.original == size and geo.resized == resized
    expected = ResizeLongestSide.get_preprocess_shape(*size, IMG)
    assert resized == tuple(max(1, s) for s in expected) == PROTO.resized_size(*size)
    (window,) = geo.windows
    assert window.box == (0, 0, *resized)
    assert window.pad == (0, 0, IMG - resized[0], IMG - resized[1])
    assert window.grid == grid and geo.n_tokens == grid[0] * grid[1]


def test_other_protocols_are_refused_with_the_right_one_named() -> None:
    backbone = tiny()
    for protocol in (
        Protocol(resize="short", size=IMG),
        Protocol(resize="long", size=1024),
        Protocol(resize="long", size=IMG, crop=128, stride=64),
    ):
        with pytest.raises(OvssError, match=r"Protocol\(resize='long', size=256\)"):
            backbone.geometry(protocol, 90, 131)


@pytest.mark.parametrize("size", [(90, 131), (300, 40)])
def test_preprocess_equals_sam_predictor_input(size: tuple[int, int]) -> None:
    backbone = tiny()
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    (x,) = backbone.preprocess(image, backbone.geometry(PROTO, *size))
    resized = torch.as_tensor(ResizeLongestSide(IMG).apply_image(image)).permute(2, 0, 1)
    assert torch.equal(x, backbone.model.preprocess(resized[None])[0])


# --- cached tensors ---------------------------------------------------------------------------


def test_store_embedding_and_factors_equal_the_real_encoder(
    random_store: FeatureSet, images: list
) -> None:
    backbone = tiny()
    block = backbone.model.image_encoder.blocks[1]
    predictor = SamPredictor(backbone.model)
    captured = {}
    block.attn.qkv.register_forward_hook(lambda m, a, out: captured.update(qkv=out))
    for i, record in enumerate(images):
        predictor.set_image(load_image_rgb(record.path))
        got = random_store.read(i)
        assert got.resized_size == predictor.input_size
        assert got.original_size == predictor.original_size
        assert torch.equal(torch.from_numpy(got.tensors["embedding"]), predictor.features)
        grid = tuple(got.win_grid[0])
        qkv = captured["qkv"].reshape(S * S, 3, 2, 32)[valid_rows(grid)]
        for j, name in enumerate("qkv"):
            assert torch.equal(torch.from_numpy(got.tensors[name]), qkv[:, j]), name
    static = sam_static(random_store)
    assert np.array_equal(static["rel_pos_h"], block.attn.rel_pos_h.detach().numpy())
    assert random_store.provenance["backbone"]["extra"]["attn_block"] == 1


def test_intermediate_layers_are_block_outputs_on_valid_tokens() -> None:
    backbone = tiny(layers=(0,))
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    out = backbone.forward_dense(x, [(11, 16), (16, 3)])
    with torch.no_grad():
        enc = backbone.model.image_encoder
        tokens = enc.blocks[0](enc.patch_embed(x) + enc.pos_embed)  # (2, S, S, D)
    assert out["layer0"].shape == (2, 176, 64) and out["q"].shape == (2, 176, 2, 32)
    assert torch.equal(out["layer0"][1, :48], tokens[1, :16, :3].reshape(48, 64))
    assert torch.equal(out["layer0"][0], tokens[0, :11].reshape(176, 64))
    assert not out["q"][1, 48:].any() and not out["attn_log_mass"][1, 48:].any()


# --- attention --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_reference(strong_bias_model: tuple[Sam, Path], images: list) -> list[dict]:
    """Per image, what the real encoder of the strong-bias model computes in
    ``SamPredictor.set_image``: its last global block's softmax attention ``(H, S*S, S*S)``,
    the block's ``qkv`` output ``(S, S, 3D)``, ``features`` and ``input_size``."""
    model = strong_bias_model[0]
    captured: dict = {}
    hook = model.image_encoder.blocks[1].attn.qkv.register_forward_hook(
        lambda m, a, out: captured.update(qkv=out[0])
    )
    predictor = SamPredictor(model)
    out = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = GlobalAttentionRecorder(monkeypatch)
        for record in images:
            predictor.set_image(load_image_rgb(record.path))
            out.append(
                dict(
                    attention=recorder.last_attention(),
                    qkv=captured["qkv"],
                    features=predictor.features,
                    input_size=predictor.input_size,
                )
            )
    hook.remove()
    return out


@pytest.mark.parametrize("index", range(len(IMAGE_SIZES)))
def test_attention_equals_the_real_blocks_attention(
    loaded_store: FeatureSet, encoder_reference: list[dict], index: int
) -> None:
    static = sam_static(loaded_store)
    full = encoder_reference[index]["attention"]  # softmax over the padded S x S grid
    features = loaded_store.read(index)
    got, grid = features.tensors, tuple(features.win_grid[0])
    rows = valid_rows(grid)
    cropped = full[:, rows][:, :, rows]
    q, k = got["q"], got["k"]
    log_mass = got["attn_log_mass"]
    attn_full = sam_attention(q, k, grid, static, normalise="full", attn_log_mass=log_mass)
    torch.testing.assert_close(attn_full, cropped, rtol=1e-5, atol=1e-7)
    attn_valid = sam_attention(q, k, grid, static)
    renormalised = cropped / cropped.sum(-1, keepdim=True)
    torch.testing.assert_close(attn_valid, renormalised, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(attn_valid.sum(-1), torch.ones(2, len(rows)))
    padded = grid != (S, S)
    assert (attn_full.sum(-1) < 1 - 1e-3).any() == padded
    # One head, and the bias matters: zero tables give another attention.
    assert torch.equal(sam_attention(q, k, grid, static, heads=[1])[0], attn_valid[1])
    no_bias = dict(static, rel_pos_h=0 * static["rel_pos_h"], rel_pos_w=0 * static["rel_pos_w"])
    assert (sam_attention(q, k, grid, no_bias) - attn_valid).abs().max() > 0.05


@pytest.mark.parametrize("index", range(len(IMAGE_SIZES)))
def test_trident_inputs_equal_tridents_crop_of_the_encoder(
    loaded_store: FeatureSet, encoder_reference: list[dict], index: int
) -> None:
    ref = encoder_reference[index]
    vh, vw = (s // 16 for s in ref["input_size"])  # Trident: input_size // stride
    # Trident's get_sam_feat, on the attention and values of the real block.
    attn = ref["attention"].view(1, 2, S, S, S, S)[:, :, :vh, :vw, :vh, :vw]
    attn = attn.flatten(2, 3).flatten(3, 4)[0]
    v = ref["qkv"].reshape(S, S, 3, 2, 32)[:, :, 2].permute(2, 0, 1, 3)
    v = v[:, :vh, :vw].reshape(2, vh * vw, 32)
    emb = ref["features"][0, :, :vh, :vw]

    features = loaded_store.read(index)
    got = trident_sam_inputs(features, sam_static(loaded_store))
    assert got.grid == (vh, vw)
    torch.testing.assert_close(got.attn, attn, rtol=1e-5, atol=1e-7)
    assert torch.equal(got.v, v) and torch.equal(got.embedding, emb)
    # The tall image resizes to 256 x 73: Trident's floor grid is one column short of ours.
    ceil_grid = {0: (11, 16), 1: (16, 5), 2: (16, 16)}[index]
    assert tuple(features.win_grid[0]) == ceil_grid
    assert (vh, vw) == {0: (11, 16), 1: (16, 4), 2: (16, 16)}[index]


def test_trident_grid_empty_and_missing_log_mass_are_refused() -> None:
    rng = np.random.default_rng(0)
    tensors = {name: rng.normal(size=(16, 2, 32)).astype(np.float32) for name in "qkv"}
    tensors["attn_log_mass"] = np.zeros((16, 2), np.float32)
    tensors["embedding"] = np.zeros((1, 32, S, S), np.float32)
    sliver = ImageFeatures(  # a 1 x 600 image: resized to 1 x 256, one row of tokens
        index=0,
        image_id="sliver",
        original_size=(1, 600),
        resized_size=(1, 256),
        win_box=np.array([[0, 0, 1, 256]]),
        win_pad=np.array([[0, 0, 255, 0]]),
        win_grid=np.array([[1, 16]]),
        tensors=tensors,
    )
    static = tiny().static_tensors()
    with pytest.raises(OvssError, match="Trident's SAM grid .* is empty"):
        trident_sam_inputs(sliver, static)
    with pytest.raises(ValueError, match="needs the cached attn_log_mass"):
        sam_attention(tensors["q"], tensors["k"], (1, 16), static, normalise="full")
    attn = sam_attention(tensors["q"], tensors["k"], (1, 16), static)
    assert attn.shape == (2, 16, 16)


def test_crop_token_rows_keeps_the_top_left_sub_grid() -> None:
    x = np.arange(12).reshape(3, 4)  # tokens of a 3 x 4 grid, row-major
    assert crop_token_rows(x.reshape(12), (3, 4), (2, 3)).tolist() == [0, 1, 2, 4, 5, 6]
    t = crop_token_rows(torch.arange(12), (3, 4), (3, 1))
    assert t.tolist() == [0, 4, 8]


# --- prompt decoding --------------------------------------------------------------------------


PROMPTS = {
    "point": dict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1])),
    "points": dict(
        point_coords=np.array([[10.0, 20.0], [100.0, 60.0]]), point_labels=np.array([1, 0])
    ),
    "box": dict(box=np.array([5.0, 8.0, 90.0, 70.0])),
    "box+point": dict(
        box=np.array([5.0, 8.0, 90.0, 70.0]),
        point_coords=np.array([[50.0, 40.0]]),
        point_labels=np.array([1]),
    ),
}


@pytest.fixture(scope="module")
def references(images: list) -> list[SamPredictor]:
    """``SamPredictor`` of the random-init tiny sam-b (the random store's model), one per image."""
    model = tiny().model
    predictors = []
    for record in images:
        predictor = SamPredictor(model)
        predictor.set_image(load_image_rgb(record.path))
        predictors.append(predictor)
    return predictors


@pytest.fixture(scope="module")
def decoder(random_store: FeatureSet) -> Sam:
    return load_sam_decoder_for(random_store)


@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("multimask", [True, False])
def test_cached_predictor_is_identical_to_sam_predictor(
    random_store: FeatureSet,
    references: list[SamPredictor],
    decoder: Sam,
    prompt: str,
    multimask: bool,
) -> None:
    reference = references[0]
    cached = CachedSamPredictor(decoder)
    cached.set_features(random_store.read(0))
    kwargs = dict(PROMPTS[prompt], multimask_output=multimask)
    want = reference.predict(**kwargs)
    got = cached.predict(**kwargs)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)
    assert want[0].shape == ((3 if multimask else 1), 90, 131)
    # A second round with the low-res logits as mask input, and raw logits out.
    mask_input = want[2][np.argmax(want[1])][None]
    kwargs.update(mask_input=mask_input, return_logits=True)
    for a, b in zip(cached.predict(**kwargs), reference.predict(**kwargs), strict=True):
        assert np.array_equal(a, b)


def test_cached_predictor_batched_torch_prompts(
    random_store: FeatureSet, references: list[SamPredictor], decoder: Sam
) -> None:
    reference = references[1]
    cached = CachedSamPredictor(decoder)
    cached.set_features(random_store.read(1))
    boxes = reference.transform.apply_boxes_torch(
        torch.tensor([[0.0, 0.0, 40.0, 100.0], [10.0, 50.0, 57.0, 190.0]]), (200, 57)
    )
    got = cached.predict_torch(None, None, boxes=boxes, multimask_output=False)
    want = reference.predict_torch(None, None, boxes=boxes, multimask_output=False)
    for a, b in zip(got, want, strict=True):
        assert a.shape[0] == 2 and torch.equal(a, b)
    assert torch.equal(cached.get_image_embedding(), reference.get_image_embedding())


def test_float16_embedding_moves_logits_slightly(random_store: FeatureSet, decoder: Sam) -> None:
    """The float16 effect documented in ``methods.sam_cache``: measured, bounded, non-zero."""
    features = random_store.read(0)
    exact, rounded = CachedSamPredictor(decoder), CachedSamPredictor(decoder)
    exact.set_features(features)
    emb16 = features.tensors["embedding"][0].astype(np.float16)
    rounded.set_cached(emb16, features.original_size, features.resized_size)
    kwargs = dict(PROMPTS["points"], multimask_output=True, return_logits=True)
    (m32, s32, low32), (m16, s16, low16) = exact.predict(**kwargs), rounded.predict(**kwargs)
    logit_diff = float(np.abs(low32 - low16).max())
    assert 0 < logit_diff < 2e-4  # measured 5e-5 (logit spread ~0.02)
    assert float(np.abs(s32 - s16).max()) < 2e-5
    # Binary masks differ only where a logit is within that distance of the threshold.
    flips = (m32 > 0) != (m16 > 0)
    assert np.all(np.abs(m32[flips]) <= logit_diff)


def test_decoder_only_model_has_no_encoder() -> None:
    decoder = load_sam_decoder("sam-h", random_init=True, arch_overrides=TINY)
    assert not any(k.startswith("image_encoder.") for k in decoder.state_dict())
    predictor = CachedSamPredictor(decoder)
    with pytest.raises(OvssError, match="without its image encoder"):
        predictor.set_image(np.zeros((20, 30, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="embedding must be"):
        predictor.set_cached(np.zeros((32, 8, 8), np.float32), (20, 30), (171, 256))
    with pytest.raises(ValueError, match="longer side = 256"):
        predictor.set_cached(np.zeros((32, S, S), np.float32), (20, 30), (170, 250))
    with pytest.raises(RuntimeError, match="An image must be set"):
        predictor.predict(box=np.array([0, 0, 5, 5]))


# --- automatic mask generation ----------------------------------------------------------------

# The random decoder's masks are speckles with tiny logits (|logit| ~ 0.1) spanning the image:
# a small stability offset and thresholds that keep a strict subset; without NMS (IoU cut-off 1)
# many overlapping masks survive, with SAM's 0.7 one does.
AMG = dict(
    points_per_side=6,
    pred_iou_thresh=0.1,
    stability_score_thresh=0.75,
    stability_score_offset=0.002,
)


@pytest.mark.parametrize(("index", "box_nms_thresh"), [(0, 1.0), (1, 1.0), (2, 0.7)])
def test_cached_mask_generation_equals_sam_automatic_mask_generator(
    random_store: FeatureSet, decoder: Sam, images: list, index: int, box_nms_thresh: float
) -> None:
    params = dict(AMG, box_nms_thresh=box_nms_thresh)
    reference = SamAutomaticMaskGenerator(tiny().model, **params)
    want = reference.generate(load_image_rgb(images[index].path))
    got = generate_masks_cached(decoder, random_store.read(index), **params)
    if box_nms_thresh == 1.0:
        assert 1 < len(want) < 3 * 36  # the filters keep a strict subset
    else:
        assert len(want) == 1
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a["area"] == b["area"] and a["bbox"] == b["bbox"]
        assert a["predicted_iou"] == b["predicted_iou"]
        assert a["stability_score"] == b["stability_score"]
        assert a["point_coords"] == b["point_coords"] and a["crop_box"] == b["crop_box"]
        assert np.array_equal(a["segmentation"], b["segmentation"])


def test_cached_mask_generation_refuses_crop_layers(random_store: FeatureSet, decoder: Sam) -> None:
    with pytest.raises(OvssError, match="crop_n_layers must be 0"):
        generate_masks_cached(decoder, random_store.read(0), crop_n_layers=1)


# --- weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sam-b", "sam-h"])
def test_checkpoint_loads_through_the_real_path(name: str, offline_and_isolated: Path) -> None:
    source = tiny(name, seed=11)
    path = save_official(source.model, offline_and_isolated / CHECKPOINTS[name])
    loaded = create_backbone(name, arch_overrides=TINY)  # found in $OVSS_WEIGHTS
    explicit = create_backbone(name, weights=str(path), arch_overrides=TINY)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for backbone in (loaded, explicit):
        assert backbone.info.weights == f"sha256:{digest}"
        assert backbone.info.weights_path == str(path)
    x = torch.randn(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    want, got = source.forward_dense(x, [(11, 16)]), loaded.forward_dense(x, [(11, 16)])
    for key in want:
        assert torch.equal(got[key], want[key]), key
    decoder = load_sam_decoder(name, weights=path, arch_overrides=TINY)
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, source.model.state_dict()[key]), key


def test_checkpoint_in_torch_hub_cache_is_found(tmp_path: Path) -> None:
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    path = save_official(tiny("sam-l").model, folder / CHECKPOINTS["sam-l"])
    assert create_backbone("sam-l", arch_overrides=TINY).info.weights_path == str(path)


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = save_official(tiny().model, tmp_path / "tiny.pth")
    deeper = dict(TINY, depth=3, global_attn_indexes=(2,))
    with pytest.raises(OvssError, match="does not fit sam-b") as err:
        create_backbone("sam-b", weights=str(path), arch_overrides=deeper)
    assert "missing" in str(err.value) and "\n" not in str(err.value)
    wider = dict(TINY, embed_dim=96)  # same decoder, other encoder: refused as well
    with pytest.raises(OvssError, match="wrong shape"):
        load_sam_decoder("sam-b", weights=path, arch_overrides=wider)


def test_decoder_for_a_store_checks_the_weights(
    loaded_store: FeatureSet, strong_bias_model: tuple[Sam, Path], tmp_path: Path
) -> None:
    model, path = strong_bias_model
    decoder = load_sam_decoder_for(loaded_store, weights=path)
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    other = save_official(tiny(seed=9).model, tmp_path / "other.pth")
    with pytest.raises(ProvenanceMismatchError, match="was made with weights sha256:"):
        load_sam_decoder_for(loaded_store, weights=other)


@pytest.mark.parametrize("name", SAM_NAMES)
def test_missing_weights_offline_names_the_file(name: str) -> None:
    for build in (
        lambda: create_backbone(name, arch_overrides=TINY),
        lambda: load_sam_decoder(name, arch_overrides=TINY),
    ):
        with pytest.raises(WeightsNotFoundError) as err:
            build()
        message = str(err.value)
        assert "\n" not in message
        assert f"$OVSS_WEIGHTS/{CHECKPOINTS[name]}" in message
        assert f"https://dl.fbaipublicfiles.com/segment_anything/{CHECKPOINTS[name]}" in message
        assert "--weights PATH" in message and "--random-init" in message


# --- sizes ------------------------------------------------------------------------------------


def test_plan_bytes_per_image_for_sam_b_at_1024(tmp_path: Path) -> None:
    """float16 bytes of one image for the real sam-b: 256x64x64 embedding + n x (3 x 12 x 64 +
    12) token values, n = valid tokens (4096 for a square image, 48 x 64 for 4:3)."""
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (512, 512)).save(root / "a.png")
    Image.new("RGB", (640, 480)).save(root / "b.png")
    records = list_folder_images(root)
    cfg = ExtractConfig(models=["sam-b"], protocol=Protocol(resize="long", size=1024), store="x")
    for name, n in (("a", 64 * 64), ("b", 48 * 64)):
        (row,) = plan([r for r in records if r.image_id == name], cfg)
        assert row.tokens == n and row.windows == 1
        assert row.bytes == 2 * (256 * 64 * 64 + n * (3 * 12 * 64 + 12))
    assert 2 * (256 * 64 * 64 + 4096 * 2316) == 21_069_824


# --- two windows per image: SAM on the left and right halves (Trident, Cityscapes) ------------

HALVES = Protocol(resize="halves", size=IMG)


def half_images(image: np.ndarray) -> list[np.ndarray]:
    w = image.shape[1]
    return [image[:, : w // 2], image[:, w // 2 :]]


@pytest.fixture(scope="module")
def halves_store(images: list, tmp_path_factory: pytest.TempPathFactory) -> FeatureSet:
    """The tiny sam-b store on the image halves."""
    store = tmp_path_factory.mktemp("sam_halves") / "s.zarr"
    return tiny_sam_store(images, store, HALVES, batch_size=3)


def test_halves_protocol_key_and_validation() -> None:
    assert (
        HALVES.key() == "halves256" and Protocol(resize="halves", size=1024).key() == "halves1024"
    )
    assert PROTO.key() == "long256"  # existing keys unchanged
    assert Protocol.from_dict(HALVES.to_dict()) == HALVES and "align" not in HALVES.to_dict()
    with pytest.raises(ValueError, match="no crop"):
        Protocol(resize="halves", size=IMG, crop=128, stride=64)
    with pytest.raises(ValueError, match="only SAM backbones"):
        create_backbone("clip-b16", random_init=True).geometry(HALVES, 90, 131)
    with pytest.raises(ValueError, match="no left and right halves"):
        HALVES.resized_size(50, 1)
    with pytest.raises(OvssError, match="no left and right halves"):
        tiny().geometry(HALVES, 50, 1)
    # Cityscapes: 2048 x 1024 -> two 1024 x 1024 halves, scale 1 at img_size 1024.
    city = Protocol(resize="halves", size=1024)
    assert city.halves_layout(1024, 2048) == [(0, 1024, 1024, 1024), (1024, 2048, 1024, 1024)]
    assert city.resized_size(1024, 2048) == (1024, 2048)


@pytest.mark.parametrize("size", [(90, 131), (200, 57), (20, 101), (64, 64), (7, 3)])
def test_halves_geometry_is_two_sam_predictor_inputs(size: tuple[int, int]) -> None:
    h, w = size
    geo = tiny().geometry(HALVES, h, w)
    assert geo.original == size and geo.n_windows == 2
    assert geo.resized == HALVES.resized_size(h, w)
    layout = HALVES.halves_layout(h, w)
    x0 = 0
    for window, (x1, x2), (lx1, lx2, rh, rw) in zip(
        geo.windows, ((0, w // 2), (w // 2, w)), layout, strict=True
    ):
        assert (lx1, lx2) == (x1, x2)
        expected = ResizeLongestSide.get_preprocess_shape(h, x2 - x1, IMG)
        assert (rh, rw) == tuple(max(1, s) for s in expected)
        assert window.box == (0, x0, rh, x0 + rw)
        assert window.pad == (0, 0, IMG - rh, IMG - rw)
        assert window.grid == (-(-rh // 16), -(-rw // 16))
        x0 += rw
    assert geo.resized == (max(r[2] for r in layout), x0)
    if size == (20, 101):  # halves 50 and 51 wide, wider than tall: different scales
        assert [r[2] for r in layout] == [102, 100] and [r[3] for r in layout] == [256, 256]


@pytest.mark.parametrize("size", [(90, 131), (300, 41)])
def test_halves_preprocess_equals_sam_predictor_input_per_half(size: tuple[int, int]) -> None:
    backbone = tiny()
    image = np.random.default_rng(2).integers(0, 256, (*size, 3), dtype=np.uint8)
    xs = backbone.preprocess(image, backbone.geometry(HALVES, *size))
    assert len(xs) == 2
    for x, half in zip(xs, half_images(image), strict=True):
        resized = torch.as_tensor(ResizeLongestSide(IMG).apply_image(half)).permute(2, 0, 1)
        assert torch.equal(x, backbone.model.preprocess(resized[None])[0])


def test_halves_store_embedding_and_factors_equal_sam_predictor_on_each_half(
    halves_store: FeatureSet, images: list
) -> None:
    from methods.sam_cache import sam_window

    backbone = tiny()
    block = backbone.model.image_encoder.blocks[1]
    predictor = SamPredictor(backbone.model)
    captured = {}
    block.attn.qkv.register_forward_hook(lambda m, a, out: captured.update(qkv=out))
    decoder = load_sam_decoder_for(halves_store)
    for i, record in enumerate(images):
        got = halves_store.read(i)
        assert got.tensors["embedding"].shape[0] == 2 and len(got.win_grid) == 2
        with pytest.raises(ValueError, match="sam_window"):
            trident_sam_inputs(got, sam_static(halves_store))
        # a two-window image is two SamPredictor inputs: the predictor refuses it (it would
        # otherwise decode against the left half's embedding with the whole image's sizes)
        refused = CachedSamPredictor(decoder)
        with pytest.raises(ValueError, match="2 SAM windows .*sam_window"):
            refused.set_features(got)
        assert not refused.is_image_set
        for w, half in enumerate(half_images(load_image_rgb(record.path))):
            predictor.set_image(half)
            one = sam_window(got, w)
            assert one.resized_size == predictor.input_size
            assert one.original_size == predictor.original_size
            assert torch.equal(torch.from_numpy(one.tensors["embedding"]), predictor.features)
            grid = tuple(one.win_grid[0])
            qkv = captured["qkv"].reshape(S * S, 3, 2, 32)[valid_rows(grid)]
            for j, name in enumerate("qkv"):
                assert torch.equal(torch.from_numpy(one.tensors[name]), qkv[:, j]), name
            # the half decodes prompts exactly as SamPredictor on the half image
            cached = CachedSamPredictor(decoder)
            cached.set_features(one)
            point = dict(point_coords=np.array([[5.0, 7.0]]), point_labels=np.array([1]))
            for a, b in zip(cached.predict(**point), predictor.predict(**point), strict=True):
                assert np.array_equal(a, b)
            trident_sam_inputs(one, sam_static(halves_store))  # one window: accepted
    with pytest.raises(ValueError, match="2 SAM window"):
        sam_window(halves_store.read(0), 2)


# --- SAM's pre-rounding (align): Trident's input, the image rounded up to the CLIP patch grid ---

LONG16 = Protocol(resize="long", size=IMG, align=16)
HALVES16 = Protocol(resize="halves", size=IMG, align=16)


def rounded_image(image: np.ndarray, align: int = 16) -> np.ndarray:
    """Trident's ``cv2.resize`` to multiples of ``align`` (``resize_linear_u8`` is that, byte for
    byte: ``tests/test_resize.py``)."""
    from featurestore.resize import resize_linear_u8, round_up

    h, w = image.shape[:2]
    return resize_linear_u8(image, round_up(h, align), round_up(w, align))


@pytest.mark.parametrize(
    ("size", "rounded", "resized", "grid"),
    [
        ((90, 131), (96, 144), (171, 256), (11, 16)),  # unrounded: (176, 256)
        ((200, 57), (208, 64), (256, 79), (16, 5)),  # unrounded: (256, 73)
        ((64, 64), (64, 64), (256, 256), (16, 16)),  # multiples already: a no-op
        ((5, 7), (16, 16), (256, 256), (16, 16)),
        ((1, 600), (16, 608), (7, 256), (1, 16)),
    ],
)
def test_aligned_geometry_is_sam_predictor_input_of_the_rounded_image(
    size: tuple[int, int],
    rounded: tuple[int, int],
    resized: tuple[int, int],
    grid: tuple[int, int],
) -> None:
    geo = tiny().geometry(LONG16, *size)
    assert geo.original == size and LONG16.rounded_size(*size) == rounded
    assert geo.rounded == (None if rounded == size else rounded)
    assert geo.resized == resized == LONG16.resized_size(*size)
    assert resized == ResizeLongestSide.get_preprocess_shape(*rounded, IMG)
    (window,) = geo.windows
    assert window.box == (0, 0, *resized) and window.grid == grid
    assert window.pad == (0, 0, IMG - resized[0], IMG - resized[1])
    # halves: the rounded image split at its width // 2
    geo = tiny().geometry(HALVES16, *size)
    assert geo.original == size and geo.resized == HALVES16.resized_size(*size)
    half = rounded[1] // 2
    for window, (x1, x2, rh, rw) in zip(geo.windows, HALVES16.halves_layout(*size), strict=True):
        assert (x1, x2) in ((0, half), (half, rounded[1]))
        assert (rh, rw) == ResizeLongestSide.get_preprocess_shape(rounded[0], x2 - x1, IMG)
        assert (window.box[2] - window.box[0], window.box[3] - window.box[1]) == (rh, rw)


@pytest.mark.parametrize("size", [(90, 131), (300, 41), (64, 64)])
def test_aligned_preprocess_equals_sam_predictor_on_the_rounded_image(
    size: tuple[int, int],
) -> None:
    backbone = tiny()
    image = np.random.default_rng(4).integers(0, 256, (*size, 3), dtype=np.uint8)
    big = rounded_image(image)
    (x,) = backbone.preprocess(image, backbone.geometry(LONG16, *size))
    resized = torch.as_tensor(ResizeLongestSide(IMG).apply_image(big)).permute(2, 0, 1)
    assert torch.equal(x, backbone.model.preprocess(resized[None])[0])
    xs = backbone.preprocess(image, backbone.geometry(HALVES16, *size))
    for x, half in zip(xs, half_images(big), strict=True):
        resized = torch.as_tensor(ResizeLongestSide(IMG).apply_image(half)).permute(2, 0, 1)
        assert torch.equal(x, backbone.model.preprocess(resized[None])[0])


@pytest.fixture(scope="module")
def aligned_store(images: list, tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    """float32 store of the tiny random-init sam-b with ``LONG16`` and ``HALVES16``."""
    store = tmp_path_factory.mktemp("sam_aligned") / "s.zarr"
    for protocol in (LONG16, HALVES16):
        tiny_sam_store(images, store, protocol, batch_size=2)
    return FeatureStore.open(store)


def test_aligned_store_is_sam_predictor_on_the_rounded_image(
    aligned_store: FeatureStore, images: list
) -> None:
    """Embedding, q/k/v and the valid grid of a ``long256-a16`` set are SamPredictor's on the
    image rounded up to multiples of 16; ``sam_frame`` gives SamPredictor's original size (the
    rounded one) and the cached predictor then decodes exactly as SamPredictor on it."""
    from featurestore.backbones.sam import valid_token_grid
    from methods.sam_cache import sam_frame, sam_window, trident_grid

    fs = aligned_store.require("sam-b", LONG16)
    assert fs.key == "sam-b@long256-a16" and fs.protocol == LONG16
    backbone = tiny()
    predictor = SamPredictor(backbone.model)
    captured = {}
    backbone.model.image_encoder.blocks[1].attn.qkv.register_forward_hook(
        lambda m, a, out: captured.update(qkv=out)
    )
    decoder = load_sam_decoder_for(fs)
    for i, record in enumerate(images):
        image = load_image_rgb(record.path)
        big = rounded_image(image)
        predictor.set_image(big)
        got = fs.read(i)
        assert got.original_size == image.shape[:2]  # the store keeps the original size
        assert got.resized_size == predictor.input_size
        assert tuple(got.win_grid[0]) == valid_token_grid(predictor.input_size)
        assert trident_grid(got.resized_size, 16) == tuple(s // 16 for s in predictor.input_size)
        assert torch.equal(torch.from_numpy(got.tensors["embedding"]), predictor.features)
        qkv = captured["qkv"].reshape(S * S, 3, 2, 32)[valid_rows(tuple(got.win_grid[0]))]
        for j, name in enumerate("qkv"):
            assert torch.equal(torch.from_numpy(got.tensors[name]), qkv[:, j]), name
        framed = sam_frame(got, fs.protocol)
        assert framed.original_size == predictor.original_size == big.shape[:2]
        cached = CachedSamPredictor(decoder)
        cached.set_features(framed)
        point = dict(point_coords=np.array([[5.0, 7.0]]), point_labels=np.array([1]))
        for a, b in zip(cached.predict(**point), predictor.predict(**point), strict=True):
            assert np.array_equal(a, b)
        # halves: SamPredictor on each half of the rounded image
        halves = aligned_store.require("sam-b", HALVES16).read(i)
        framed = sam_frame(halves, HALVES16)
        for k, half in enumerate(half_images(big)):
            predictor.set_image(half)
            one = sam_window(framed, k)
            assert one.original_size == predictor.original_size
            assert one.resized_size == predictor.input_size
            assert torch.equal(torch.from_numpy(one.tensors["embedding"]), predictor.features)
    # without align sam_frame changes nothing
    plain = ImageFeatures(0, "x", (90, 131), (176, 256), *([np.zeros((1, 4))] * 3), {})
    assert sam_frame(plain, PROTO) is plain


def test_aligned_set_command_names_align(aligned_store: FeatureStore) -> None:
    with pytest.raises(ProvenanceMismatchError) as err:
        aligned_store.require("sam-b", Protocol(resize="long", size=IMG, align=14))
    assert "--resize long --size 256 --align 14 " in render_error(err.value)
