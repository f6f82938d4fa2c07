"""BLIP ITM backbones (featurestore.backbones.blip): tiny random-init models of the real
transformers classes, checkpoint folders through the real loading path, the cached first pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import huggingface_hub  # noqa: E402
from PIL import Image  # noqa: E402

from featurestore.backbones.blip import (  # noqa: E402
    TINY,
    VARIANTS,
    build_blip,
    get_variant,
    load_blip,
    load_tokenizer,
    squash_pixels,
    write_wordpiece_vocab,
)
from featurestore.errors import OvssError, WeightsNotFoundError  # noqa: E402
from featurestore.protocol import Protocol  # noqa: E402

WORDS = ["cat", "dog", "grass", "sky"]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network, an empty $OVSS_WEIGHTS and an empty huggingface_hub cache."""
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OVSS_WEIGHTS", str(weights))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return weights


def save_folder(blip, folder: Path, tokenizer: bool = True) -> Path:
    """A tiny model in the Hugging Face folder layout (config.json, model.safetensors, and
    the tokenizer files)."""
    blip.model.save_pretrained(folder)
    if tokenizer:
        blip.tokenizer.save_pretrained(folder)
    return folder


def tiny(seed: int = 0, vocab: Path | None = None):
    return load_blip(
        "blip-itm-l", random_init=True, seed=seed, arch_overrides=TINY, tokenizer=vocab
    )


def test_registry_names_and_variants() -> None:
    from featurestore.backbones import list_backbones

    names = {v.name for v in VARIANTS}
    assert names == {"blip-itm-l", "blip-itm-l-coco", "blip-itm-b", "blip-itm-b-coco"}
    assert names <= set(list_backbones())
    assert get_variant("blip-itm-l").hub_id == "Salesforce/blip-itm-large-flickr"
    with pytest.raises(OvssError, match="not a BLIP model"):
        get_variant("blip-xl")


def test_tiny_model_is_the_real_class_recorded_and_seeded() -> None:
    import transformers

    a, b, c = tiny(3), tiny(3), tiny(4)
    assert isinstance(a.model, transformers.BlipForImageTextRetrieval)
    assert a.info.weights == "random-init:3" and a.info.family == "blip"
    assert a.info.extra["arch_overrides"] == TINY
    assert a.info.patch_size == 16 and a.tokenizer_source == "builtin-chars"
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(a.encode_image(x), b.encode_image(x))
    assert not torch.allclose(a.encode_image(x), c.encode_image(x))


def test_backbone_is_the_live_models_image_encoder_at_any_square_size() -> None:
    live = tiny(1)
    bb = build_blip(get_variant("blip-itm-l"), random_init=True, seed=1, arch_overrides=TINY)
    for size in (64, 96):  # the native size (64 in TINY) and a resampled position embedding
        x = torch.randn(2, 3, size, size)
        out = bb.forward_dense(x)
        ref = live.encode_image(x)
        g = size // 16
        assert out["image_embeds"].shape == (2, g * g, 32) and out["image_cls"].shape == (2, 32)
        torch.testing.assert_close(out["image_embeds"], ref[:, 1:])
        torch.testing.assert_close(out["image_cls"], ref[:, 0])
    specs = {s.name: (s.unit, s.row_shape) for s in bb.tensor_specs()}
    assert specs == {"image_embeds": ("token", (32,)), "image_cls": ("window", (32,))}
    with pytest.raises(ValueError, match="squashed to a square"):
        bb.geometry(Protocol(resize="short", size=64), 50, 80)
    assert bb.geometry(Protocol(resize="square", size=64), 50, 80).windows[0].grid == (4, 4)


def test_squash_pixels_is_bicubic_resize_then_clip_normalisation() -> None:
    img = np.full((10, 30, 3), 255, np.uint8)
    x = squash_pixels(img, 32)
    assert x.shape == (3, 32, 32)
    expected = (1.0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    torch.testing.assert_close(x[:, 5, 5], expected)


def test_wordpiece_vocab_splits_words_into_pieces(tmp_path: Path) -> None:
    vocab = write_wordpiece_vocab(tmp_path / "vocab.txt", words=["cat"])
    tok, source = load_tokenizer(vocab)
    assert source == str(vocab)
    assert tok.convert_ids_to_tokens(tok("cat dog", add_special_tokens=False)["input_ids"]) == [
        "cat",
        "d",
        "##o",
        "##g",
    ]
    assert "[ENC]" in tok.get_vocab()


def test_checkpoint_folder_loads_through_the_real_path(tmp_path: Path, offline: Path) -> None:
    vocab = write_wordpiece_vocab(tmp_path / "vocab.txt", words=WORDS)
    source = tiny(5, vocab)
    folder = save_folder(source, tmp_path / "ckpt")
    loaded = load_blip("blip-itm-l", weights=folder)
    assert loaded.info.weights.startswith("sha256:") and loaded.info.weights_path == str(folder)
    x = torch.randn(1, 3, 64, 64)
    emb = source.encode_image(x)
    torch.testing.assert_close(loaded.encode_image(x), emb)
    ids = loaded.tokenizer("a picture of grass", return_tensors="pt")["input_ids"]
    assert (
        ids.tolist()
        == source.tokenizer("a picture of grass", return_tensors="pt")["input_ids"].tolist()
    )
    m1, _ = loaded.itm_match(emb, ids)
    m0, _ = source.itm_match(emb, ids)
    torch.testing.assert_close(m1, m0)
    # $OVSS_WEIGHTS/<repo name> is found without --weights
    save_folder(source, offline / "blip-itm-large-flickr")
    found = load_blip("blip-itm-l")
    assert found.info.weights == loaded.info.weights
    assert found.info.weights_path == str(offline / "blip-itm-large-flickr")


def test_missing_tokenizer_is_one_line_naming_the_files(tmp_path: Path) -> None:
    folder = save_folder(tiny(0), tmp_path / "no_tok", tokenizer=False)
    with pytest.raises(OvssError) as err:
        load_blip("blip-itm-l", weights=folder)
    msg = str(err.value)
    assert "\n" not in msg and "vocab.txt" in msg and "tokenizer.json" in msg


def test_missing_weights_offline_names_the_folder(offline: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as err:
        load_blip("blip-itm-b")
    msg = str(err.value)
    assert "\n" not in msg and "Salesforce/blip-itm-base-flickr" in msg
    assert "blip-itm-base-flickr" in msg and "--random-init" in msg
    with pytest.raises(WeightsNotFoundError, match="no folder there"):
        load_blip("blip-itm-b", weights=offline / "nowhere")
    with pytest.raises(OvssError, match="random-init models only"):
        load_blip("blip-itm-l", weights=offline, arch_overrides=TINY)


def test_extract_caches_the_first_pass(tmp_path: Path) -> None:
    from featurestore.extract import ExtractConfig, extract
    from featurestore.images import list_folder_images, load_image_rgb
    from featurestore.store import FeatureStore

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i, (h, w) in enumerate([(40, 70), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / "img" / f"im{i}.png"
        )
    records = list_folder_images(tmp_path / "img")
    protocol = Protocol(resize="square", size=64)
    cfg = ExtractConfig(
        models=["blip-itm-l"],
        protocol=protocol,
        store=str(tmp_path / "s.zarr"),
        random_init=True,
        seed=2,
        arch_overrides=TINY,
        device="cpu",
        dtype="float32",
    )
    extract(records, cfg)
    fs = FeatureStore.open(str(tmp_path / "s.zarr")).require("blip-itm-l", protocol)
    assert fs.provenance["backbone"]["weights"] == "random-init:2"
    live = tiny(2)
    for i, r in enumerate(records):
        t = fs.read(i).tensors
        ref = live.encode_image(squash_pixels(load_image_rgb(r.path), 64)[None])[0]
        torch.testing.assert_close(torch.from_numpy(t["image_embeds"]), ref[1:], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.from_numpy(t["image_cls"][0]), ref[0], atol=1e-4, rtol=0)
