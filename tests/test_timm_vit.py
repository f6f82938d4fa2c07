"""``timm:<name>`` backbones: any timm ViT with dense tokens, its facts read from the model,
weights strictly loaded, models without patch tokens refused."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from featurestore.backbones import create_backbone
from featurestore.errors import OvssError, WeightsNotFoundError

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
REG = "timm:vit_base_patch14_reg4_dinov2.lvd142m"


@pytest.fixture(autouse=True)
def offline_and_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OVSS_WEIGHTS", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return weights_dir


def tiny(name: str, seed: int = 0, **kw):
    return create_backbone(name, random_init=True, seed=seed, arch_overrides=TINY, **kw)


def test_facts_come_from_the_model_and_prefix_tokens_are_dropped() -> None:
    backbone = tiny(REG, layers=(0,))
    info = backbone.info
    assert info.family == "timm" and info.patch_size == 14 and info.arch == REG[5:].split(".")[0]
    assert info.extra["timm_name"] == REG[5:] and info.extra["pretrained_tag"] == "lvd142m"
    assert info.extra["num_prefix_tokens"] == 5 and info.extra["pos_interp"] == "size-aa"
    assert info.mean == (0.485, 0.456, 0.406)
    x = torch.randn(2, 3, 28, 42, generator=torch.Generator().manual_seed(0))
    out = backbone.forward_dense(x)
    with torch.no_grad():
        full = backbone.model.forward_features(x)
    assert torch.equal(out["patch"], full[:, 5:]) and torch.equal(out["cls"], full[:, 0])
    assert set(out) == {s.name for s in backbone.tensor_specs()} == {"patch", "cls", "layer0"}


def test_openai_clip_mean_and_16px_patches_of_another_model() -> None:
    backbone = tiny("timm:vit_base_patch16_clip_224.openai")
    assert backbone.info.patch_size == 16
    assert backbone.info.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_models_without_patch_tokens_and_unknown_names_are_one_line_errors() -> None:
    for name in ("timm:convnext_tiny", "timm:resnet18"):
        with pytest.raises(OvssError, match="has no ViT patch tokens") as err:
            create_backbone(name, random_init=True)
        assert "\n" not in str(err.value)
    with pytest.raises(OvssError, match="is not a timm model; close names"):
        create_backbone("timm:vit_small_patch16_2244", random_init=True)
    with pytest.raises(OvssError, match="no absolute position embedding"):
        tiny("timm:vit_small_patch16_dinov3", pos_interp="offset")


def test_vision_transformer_takes_the_authors_rule() -> None:
    size_aa, offset = tiny(REG, seed=1), tiny(REG, seed=1, pos_interp="offset")
    assert offset.info.extra["pos_interp"] == "offset"
    x = torch.randn(1, 3, 14 * 32, 14 * 42, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(size_aa.forward_dense(x)["patch"], offset.forward_dense(x)["patch"])


def test_weights_round_trip_and_strict_refusal(tmp_path: Path, offline_and_isolated: Path) -> None:
    source = tiny(REG, seed=3)
    with torch.no_grad():
        source.model.cls_token.normal_(generator=torch.Generator().manual_seed(1))
    folder = offline_and_isolated / "timm" / REG[5:]
    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    loaded = create_backbone(REG, arch_overrides=TINY)  # found in $OVSS_WEIGHTS
    assert loaded.info.weights_path == str(folder / "model.safetensors")
    x = torch.randn(1, 3, 28, 56, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.forward_dense(x)["patch"], source.forward_dense(x)["patch"])
    del state["blocks.1.norm1.weight"]
    save_file(state, str(tmp_path / "half.safetensors"))
    with pytest.raises(OvssError, match="1 missing"):
        create_backbone(REG, weights=str(tmp_path / "half.safetensors"), arch_overrides=TINY)
    with pytest.raises(WeightsNotFoundError, match="timm/vit_small_patch16_224.augreg_in21k"):
        create_backbone("timm:vit_small_patch16_224.augreg_in21k", arch_overrides=TINY)
