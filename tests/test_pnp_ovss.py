"""PnP-OVSS (methods.pnp_ovss): GradCAM against finite differences on a tiny BLIP, the dropout
rules on crafted maps, map -> labels, and the method over a store (cache, skips, errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from featurestore.backbones.blip import TINY, load_blip, write_wordpiece_vocab  # noqa: E402
from featurestore.errors import OvssError  # noqa: E402
from methods.base import Vocab  # noqa: E402
from methods.pnp_ovss import (  # noqa: E402
    ImagesUnreadableError,
    PnPOVSSConfig,
    build_prompt,
    class_maps,
    dropout_patches,
    image_scores,
    read_image_classes,
    saliency_dropout,
    threshold_maps,
    token_gradcam,
)

SETTINGS = {"size": 64, "layer": 2, "head": 2, "crf": "torch", "crf_max_side": 32}


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> Path:
    return write_wordpiece_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt", ["cat", "sky"])


@pytest.fixture(scope="module")
def blip(vocab_file: Path):
    m = load_blip("blip-itm-l", random_init=True, seed=0, arch_overrides=TINY, tokenizer=vocab_file)
    m.model.requires_grad_(False)
    return m


def vocab_of(names: list[str]) -> Vocab:
    n = len(names)
    return Vocab([[x] for x in names], torch.randn(n, 8), torch.arange(n), "test", "single")


# --------------------------------------------------------------------------------------------
# Prompt and GradCAM
# --------------------------------------------------------------------------------------------


def test_prompt_spans_cover_each_class_word_pieces(blip) -> None:
    tok = blip.tokenizer
    p = build_prompt(tok, ["cat", "dog", "blue sky"])
    pieces = tok.convert_ids_to_tokens(p.input_ids[0].tolist())
    assert pieces[0] == "[ENC]" and pieces[1:4] == ["a", "picture", "of"] and pieces[-1] == "[SEP]"
    assert [pieces[a:b] for a, b in p.spans] == [
        ["cat"],
        ["d", "##o", "##g"],
        ["b", "##l", "##u", "##e", "sky"],
    ]
    assert p.after_prefix == 4 and p.sep == len(pieces) - 1
    joined = tok("a picture of cat dog blue sky", add_special_tokens=False)["input_ids"]
    assert p.input_ids[0, 1:-1].tolist() == joined
    assert build_prompt(tok, ["cat"], enc_token=False).input_ids[0, 0] == tok.cls_token_id
    with pytest.raises(OvssError, match="tokenises to no word piece") as err:
        build_prompt(tok, ["cat", "   "])
    assert "\n" not in str(err.value)


def _recompute_attention(mod, args, kwargs, bump):
    """The cross-attention of ``mod`` recomputed from its weights, with ``bump`` added to the
    probabilities before they weight the values (an independent path for the check)."""
    hs, enc = args[0], kwargs["encoder_hidden_states"]
    b, t, _ = hs.shape
    d = mod.attention_head_size

    def heads(x):
        return x.view(b, x.shape[1], -1, d).transpose(1, 2)

    q, k, v = heads(mod.query(hs)), heads(mod.key(enc)), heads(mod.value(enc))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    ctx = ((probs + bump) @ v).permute(0, 2, 1, 3).reshape(b, t, -1)
    return ctx, probs


def test_gradcam_matches_finite_differences(blip) -> None:
    model = blip.model.double()
    try:
        prompt = build_prompt(blip.tokenizer, ["cat", "sky"])
        gen = torch.Generator().manual_seed(0)
        emb = blip.encode_image(torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=gen))
        layer, head = 1, 1
        cam = token_gradcam(blip, emb, prompt, layer, head).double()  # (T, N)
        mod = model.text_encoder.encoder.layer[layer].crossattention.self
        t_len, n1 = prompt.input_ids.shape[1], emb.shape[1]
        state = {"bump": torch.zeros(1, 2, t_len, n1, dtype=torch.float64)}

        def hook(m, args, kwargs, out):
            ctx, probs = _recompute_attention(m, args, kwargs, state["bump"])
            torch.testing.assert_close(probs, out[1])  # the recomputation is the module's
            state["probs"] = probs
            return ctx, probs

        h = mod.register_forward_hook(hook, with_kwargs=True)
        try:

            def match(bump):
                state["bump"] = bump
                with torch.no_grad():
                    return blip.itm_match(emb, prompt.input_ids)[0].item()

            base = torch.zeros(1, 2, t_len, n1, dtype=torch.float64)
            match(base)
            probs = state["probs"][0, head, :, 1:]
            eps = 1e-6
            rng = np.random.default_rng(0)
            checked = 0
            top = torch.topk(cam.reshape(-1), 3).indices.tolist()  # positive where any is
            picks = [divmod(int(i), n1 - 1) for i in top]
            picks += [(int(a), int(b)) for a, b in rng.integers(0, [t_len, n1 - 1], (5, 2))]
            for t, j in picks:
                bump = base.clone()
                bump[0, head, t, j + 1] = eps
                plus = match(bump)
                bump[0, head, t, j + 1] = -eps
                minus = match(bump)
                fd = (plus - minus) / (2 * eps)
                expected = max(fd, 0.0) * probs[t, j].item()
                assert cam[t, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-12)
                checked += fd > 0
            assert cam.max() > 0 and checked >= 1  # entries with a positive gradient checked
        finally:
            h.remove()
    finally:
        model.float()


def test_class_maps_average_word_pieces() -> None:
    cams = torch.arange(12.0).reshape(6, 2)
    out = class_maps(cams, [(1, 2), (2, 5)])
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0], [6.0, 7.0]]))


# --------------------------------------------------------------------------------------------
# Saliency DropOut rules
# --------------------------------------------------------------------------------------------


def test_median_rule_drops_the_upper_half_of_the_remaining_patches() -> None:
    u = torch.tensor([5.0, 1.0, 3.0, 0.0, 4.0, 2.0, 9.0, 0.0])
    dropped = torch.tensor([False, False, False, False, False, False, True, False])
    new = dropout_patches(u, dropped, "median")
    # remaining u: 5 1 3 0 4 2 0 -> lower median 2
    assert torch.nonzero(new).reshape(-1).tolist() == [0, 2, 4, 5]
    # a map zero on most patches: the median is 0, only positive patches drop (the U > 0 guard)
    u0 = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, 1.0])
    assert torch.nonzero(dropout_patches(u0, torch.zeros(6, dtype=torch.bool), "median")).reshape(
        -1
    ).tolist() == [4, 5]
    assert not dropout_patches(u, torch.ones(8, dtype=torch.bool), "median").any()


def test_topk_rule_drops_k_remaining_patches_of_highest_saliency() -> None:
    u = torch.tensor([5.0, 1.0, 3.0, 8.0, 4.0, 2.0, 9.0, 7.0])
    dropped = torch.zeros(8, dtype=torch.bool)
    dropped[6] = True
    new = dropout_patches(u, dropped, "topk", k=3)
    assert sorted(torch.nonzero(new).reshape(-1).tolist()) == [0, 3, 7]
    assert int(dropout_patches(u, dropped, "topk", k=20).sum()) == 7
    with pytest.raises(ValueError, match="dropout_rule"):
        dropout_patches(u, dropped, "random")


def test_rounds_sum_maps_and_topk_counts_round_zero_twice(blip) -> None:
    from featurestore.backbones.blip import squash_pixels

    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    pixels = squash_pixels(img, 64)
    prompt = build_prompt(blip.tokenizer, ["cat", "sky"])
    one = saliency_dropout(
        blip, pixels, prompt, layer=1, head=1, rounds=1, rule="median", k=10
    ).maps
    assert one.shape == (2, 4, 4)
    m0 = class_maps(
        token_gradcam(blip, blip.encode_image(pixels[None]), prompt, 1, 1), prompt.spans
    )
    torch.testing.assert_close(one.reshape(2, -1), m0)
    for rule in ("median", "topk"):
        trace = saliency_dropout(blip, pixels, prompt, layer=1, head=1, rounds=2, rule=rule, k=3)
        drop = trace.dropped[0]
        if rule == "topk":
            assert int(drop.sum()) == 3
        from methods.pnp_ovss import drop_pixels

        cams1 = token_gradcam(
            blip, blip.encode_image(drop_pixels(pixels, drop, 4, 16)[None]), prompt, 1, 1
        )
        cams1[:, drop] = 0
        m1 = class_maps(cams1, prompt.spans)
        expected = m0 + m1 + (m0 if rule == "topk" else 0)
        torch.testing.assert_close(trace.maps.reshape(2, -1), expected, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Maps -> labels
# --------------------------------------------------------------------------------------------


def test_threshold_keeps_the_raw_map_above_t_of_its_range() -> None:
    maps = torch.tensor([[[1.0, 2.0], [3.0, 11.0]], [[4.0, 4.0], [4.0, 4.0]]])
    out = threshold_maps(maps, 0.15)  # class 0: (x - 1) / 10 >= 0.15 -> x >= 2.5
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.0], [3.0, 11.0]]))
    assert not out[1].any()  # a constant map keeps nothing


def test_image_scores_background_where_no_class_survives() -> None:
    masked = torch.zeros(2, 2, 2)
    masked[0, 0, 0] = 1.0
    s = image_scores(masked, (3, 3))
    assert s.shape == (3, 3, 3)
    # align_corners=True: the corner pixel is the corner value; the far corner is all-zero
    assert s[1, 0, 0] == 1.0 and s[0, 0, 0] == 0.0 and s[0, 2, 2] == 1.0


def test_image_classes_file_formats(tmp_path: Path) -> None:
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"im0": ["cat", "sky"]}))
    c = tmp_path / "c.csv"
    c.write_text("image,class\nim0,cat\nim0,sky\nim1,sky\n")
    assert read_image_classes(j) == {"im0": ["cat", "sky"]}
    assert read_image_classes(c) == {"im0": ["cat", "sky"], "im1": ["sky"]}
    with pytest.raises(OvssError, match="no image-classes file"):
        read_image_classes(tmp_path / "none.csv")


# --------------------------------------------------------------------------------------------
# The method over a store
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from featurestore.extract import ExtractConfig, extract
    from featurestore.images import list_folder_images

    root = tmp_path_factory.mktemp("pnp")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (48, 64), "b": (64, 40), "tiny": (8, 9)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "img" / f"{name}.png"
        )
    records = list_folder_images(root / "img")
    cfg = ExtractConfig(
        models=["blip-itm-l"],
        protocol=PnPOVSSConfig(size=64).protocol,
        store=str(root / "s.zarr"),
        random_init=True,
        arch_overrides=TINY,
        device="cpu",
        dtype="float32",
    )
    extract(records, cfg)
    return root


def run(store_root: Path, vocab: Vocab, **over):
    from methods.segment import segment_store

    return segment_store(
        str(store_root / "s.zarr"),
        "pnp-ovss",
        vocab,
        None,
        overrides={**SETTINGS, **over},
        write_labels=None,
    )


def labels_of(store_root: Path, vocab: Vocab, **over) -> dict[int, np.ndarray]:
    from featurestore.store import FeatureStore
    from methods.base import ScoringConfig, build_config, get_method
    from methods.segment import iter_segmentations

    cls = get_method("pnp-ovss")
    seg = cls(
        FeatureStore.open(str(store_root / "s.zarr")), build_config(cls, None, {**SETTINGS, **over})
    )
    out = {i: lab for i, lab, _, _ in iter_segmentations(seg, vocab, ScoringConfig())}
    return out, seg


def test_store_run_uses_the_cache_and_reports_the_tiny_image(store: Path) -> None:
    vocab = vocab_of(["background", "cat", "sky"])
    out, seg = labels_of(store, vocab)
    rec = seg.live_record()
    assert rec["first_pass"] == "store" and rec["crf_backend"] == "torch"
    assert rec["weights"] == "random-init:0"
    assert sorted(out) == [0, 1] and "tiny" in rec["skipped"]
    assert "smaller than one 16-pixel patch" in rec["skipped"]["tiny"]
    assert out[0].shape == (48, 64) and out[1].shape == (64, 40)
    assert set(np.unique(out[0])) <= {0, 1, 2}
    # the live first pass gives the same labels as the cached float32 one
    cached, _ = labels_of(store, vocab, crf="none")
    live, seg2 = labels_of(store, vocab, use_cache=False, crf="none")
    assert seg2.live_record()["first_pass"] == "live"
    for i in out:
        assert (live[i] == cached[i]).mean() > 0.99


def test_without_a_background_class_every_pixel_gets_a_class(store: Path) -> None:
    out, _ = labels_of(store, vocab_of(["cat", "sky"]), threshold=0.9, crf="none")
    assert set(np.unique(out[0])) <= {0, 1}
    with_bg, _ = labels_of(store, vocab_of(["background", "cat", "sky"]), threshold=0.9, crf="none")
    assert 0 in set(np.unique(with_bg[0]))  # T = 0.9 leaves pixels no class survives


def test_image_classes_restrict_the_prompt(store: Path, tmp_path: Path) -> None:
    f = tmp_path / "classes.json"
    f.write_text(json.dumps({"a": ["sky"], "b": []}))
    vocab = vocab_of(["background", "cat", "sky"])
    out, seg = labels_of(store, vocab, image_classes=str(f), crf="none")
    assert set(np.unique(out[0])) <= {0, 2}
    assert (out[1] == 0).all()  # no class listed: all background
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": ["horse"]}))
    with pytest.raises(OvssError, match="'horse', not in the vocabulary"):
        labels_of(store, vocab, image_classes=str(bad))


def test_store_whose_images_are_gone_is_one_line(tmp_path: Path) -> None:
    import shutil

    from featurestore.extract import ExtractConfig, extract
    from featurestore.images import list_folder_images

    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img" / "gone.png")
    extract(
        list_folder_images(tmp_path / "img"),
        ExtractConfig(
            models=["blip-itm-l"],
            protocol=PnPOVSSConfig(size=64).protocol,
            store=str(tmp_path / "s.zarr"),
            random_init=True,
            arch_overrides=TINY,
            device="cpu",
        ),
    )
    shutil.rmtree(tmp_path / "img")
    with pytest.raises(ImagesUnreadableError) as err:
        labels_of(tmp_path, vocab_of(["background", "cat"]))
    msg = str(err.value)
    assert "\n" not in msg and "moved or deleted" in msg and "gone.png" in msg


def test_bad_layer_and_settings_are_one_line(store: Path) -> None:
    from methods.config import ConfigError

    with pytest.raises(OvssError, match="layer 9 / head 2 do not exist"):
        labels_of(store, vocab_of(["cat"]), layer=9)
    with pytest.raises(ConfigError):
        labels_of(store, vocab_of(["cat"]), dropout_rule="random")
    with pytest.raises(OvssError, match="arch must be a JSON object"):
        labels_of(store, vocab_of(["cat"]), arch="{nope")


def test_segment_summary_records_the_live_model(store: Path) -> None:
    s = run(store, vocab_of(["background", "cat", "sky"]), rounds=2)
    d = s.to_dict()
    assert d["images"] == 2 and d["live_model"]["crf_backend"] == "torch"
    assert d["live_model"]["skipped"] == {"tiny": "8x9 is smaller than one 16-pixel patch"}
