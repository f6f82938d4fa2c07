"""PixelCLIP: Sinkhorn, cluster targets, decoder, dense tower, prompts, EMA order, the store
step against pixels, two gloo ranks, resume, mask sources and bad inputs, segmentation."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featurestore.errors import OvssError
from featurestore.extract import ExtractConfig, extract
from featurestore.images import ImageRecord
from featurestore.labelsets import create_label_set
from featurestore.protocol import Protocol
from featurestore.store import FeatureStore
from methods.cluster import sinkhorn_knopp
from methods.pixelclip import (
    CHECKPOINT_FORMAT,
    DenseCLIP,
    MaskDecoder,
    PixelCLIPConfig,
    PixelCLIPSegmenter,
    PromptedText,
    encode_text_embeds,
    mask_logits,
    mask_loss,
    mask_pool,
    prepare_clusters,
    sinkhorn,
    split_trained,
    squash_normalise,
)
from methods.pixelclip_masks import (
    LabelSetMasks,
    MaskSourceError,
    SA1BMasks,
    read_sa1b_file,
    resize_masks,
)
from methods.pixelclip_train import (
    PixelCLIPModel,
    PixelCLIPTrainConfig,
    augment_views,
    train_pixelclip,
)
from methods.train import TrainRequest, read_checkpoint

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
    "text_cfg": {"layers": 2, "width": 64, "heads": 2},
}
SIZE, S, K = 64, 32, 4  # input side (4x4 tokens), mask side, classes
H, W, N_IMAGES = 48, 64, 6


def _tiny_clip(seed: int = 0):
    from featurestore.backbones.clip import load_open_clip

    return load_open_clip("clip-b16", random_init=True, seed=seed, arch_overrides=TINY)


def _cfg(**kw) -> PixelCLIPTrainConfig:
    base = dict(
        random_init=True,
        clip_arch=json.dumps(TINY),
        size=SIZE,
        mask_size=S,
        num_classes=K,
        iterations=2,
        batch_size=4,
        mask_set="masks",
        augment=False,
        grad_clip=1.0,
        save_every=1,
    )
    base.update(kw)
    return PixelCLIPTrainConfig(**base)


def _labels(i: int) -> np.ndarray:
    lab = np.zeros((H, W), np.uint8)
    lab[:, 32 + (i % 3) * 4 :] = 1
    lab[: 16 + i * 2, : 12 + i] = 2
    return lab


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A store of 6 images with a float32 tiny-CLIP square64 set and a mask set (image 5 has
    no masks)."""
    root = tmp_path_factory.mktemp("pixelclip")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(N_IMAGES):
        p = root / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(p)
        recs.append(ImageRecord(f"im{i}", str(p), "folder", ""))
    path = str(root / "s.zarr")
    extract(
        recs,
        ExtractConfig(
            models=["clip-b16"],
            protocol=Protocol("square", SIZE),
            store=path,
            random_init=True,
            arch_overrides=TINY,
            dtype="float32",
            device="cpu",
        ),
    )
    store = FeatureStore.open(path, mode="a")
    ls = create_label_set(store, "masks", {"class_names": [["c"]], "kind": "mask set"})
    empty = create_label_set(store, "empty", {"class_names": [["c"]]})
    for i in range(N_IMAGES):
        ls.write(i, _labels(i) if i < 5 else np.full((H, W), 255, np.uint8))
        empty.write(i, np.full((H, W), 255, np.uint8))
    return root, path


# -- Sinkhorn -------------------------------------------------------------------------------


def _reference_sinkhorn(logits: torch.Tensor, iters: int = 3) -> torch.Tensor:
    q = torch.softmax(logits.double(), 1).T.clone()
    q /= q.sum()
    k, m = q.shape
    for _ in range(iters):
        for c in range(k):
            q[c] /= q[c].sum() * k
        for j in range(m):
            q[:, j] /= q[:, j].sum() * m
    return (q * m).T


def test_sinkhorn_invariants_and_softmax_initialisation():
    g = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    q = sinkhorn(logits)
    assert torch.allclose(q.sum(1), torch.ones(40, dtype=torch.float64), atol=1e-12)
    balanced = torch.full((6,), 40 / 6, dtype=torch.float64)
    start = torch.softmax(logits, 1).sum(0)
    assert (q.sum(0) - balanced).abs().max() < 0.5 * (start - balanced).abs().max()
    assert torch.allclose(sinkhorn(logits, iters=200).sum(0), balanced, atol=1e-6)
    assert torch.allclose(q, _reference_sinkhorn(logits), atol=1e-12)
    assert torch.allclose(q, sinkhorn_knopp(logits), atol=1e-12)
    # SwAV's exp-initialised version (exp(logits) with no per-row softmax) is another matrix
    swav = torch.exp(logits - logits.max()).T
    swav /= swav.sum()
    for _ in range(3):
        swav /= swav.sum(1, keepdim=True) * 6
        swav /= swav.sum(0, keepdim=True) * 40
    assert not torch.allclose(q, (swav * 40).T, atol=1e-3)
    assert sinkhorn(torch.zeros(0, 6)).shape == (0, 6)


# -- mask pooling and cluster targets ------------------------------------------------------


def _slow_targets(feats, masks, classes, eps):
    """The authors' computation written out: upsample, pool per mask, Sinkhorn, unions."""
    up = F.interpolate(feats.permute(0, 3, 1, 2), size=(S, S), mode="bilinear").permute(0, 2, 3, 1)
    logits, owner = [], []
    for i, m in enumerate(masks):
        for mm in m:
            f = (up[i] * mm[..., None]).sum((0, 1)) / mm.sum()
            logits.append(eps * F.normalize(f, dim=0) @ F.normalize(classes, dim=1).T)
            owner.append(i)
    assign = _reference_sinkhorn(torch.stack(logits)).argmax(1)
    t = torch.zeros(len(masks), len(classes), S, S, dtype=torch.bool)
    n = 0
    for i, m in enumerate(masks):
        for mm in m:
            t[i, assign[n]] |= mm.bool()
            n += 1
    return t, assign


def test_mask_pool_equals_the_upsampled_mean():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(5, 7, 3, generator=g, dtype=torch.float64)
    masks = torch.rand(4, S, S, generator=g) > 0.6
    up = F.interpolate(feats.permute(2, 0, 1)[None], size=(S, S), mode="bilinear")[0]
    ref = torch.stack([(up * m).sum((1, 2)) / m.sum() for m in masks])
    assert torch.allclose(mask_pool(feats, masks), ref, atol=1e-12)


def test_cluster_targets_against_a_slow_reference():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(3, 4, 4, 8, generator=g, dtype=torch.float64)
    classes = torch.randn(5, 8, generator=g, dtype=torch.float64)
    masks = [torch.rand(n, S, S, generator=g) > 0.5 for n in (4, 0, 6)]
    out = prepare_clusters(feats, masks, classes, eps=100.0)
    ref_t, ref_a = _slow_targets(feats, masks, classes, 100.0)
    assert torch.equal(out.assignment, ref_a)
    assert torch.equal(out.targets, ref_t)
    assert out.n_masks.tolist() == [4, 0, 6] and not out.targets[1].any()


def test_loss_only_at_covered_pixels():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, S, S, generator=g, requires_grad=True)
    targets = torch.zeros(2, 3, S, S, dtype=torch.bool)
    targets[0, 1, :8] = True
    loss = mask_loss(logits, targets)
    loss.backward()
    covered = targets.any(1)
    assert torch.all(logits.grad.permute(0, 2, 3, 1)[~covered] == 0)
    ref = F.binary_cross_entropy_with_logits(
        logits.detach().permute(0, 2, 3, 1)[covered], targets.permute(0, 2, 3, 1)[covered].float()
    )
    assert torch.allclose(loss.detach(), ref)


def test_decoder_output_shapes():
    dec = MaskDecoder()
    assert dec(torch.randn(6, 1, 5, 7)).shape == (6, 1, 20, 28)
    assert mask_logits(torch.randn(2, 3, 4, 4), dec, S).shape == (2, 3, S, S)
    gn = [m for m in dec.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [m.num_groups for m in gn] == [4, 4, 2, 2]
    small, _ = _model(trainable_blocks=1, decoder_width=16)
    assert small.decoder.conv0.out_channels == 16 and small.decoder.proj.in_channels == 8
    assert small.decoder(torch.randn(6, 1, 5, 7)).shape == (6, 1, 20, 28)
    with pytest.raises(OvssError, match="decoder_width must be > 0"):
        _cfg(decoder_width=0)


# -- dense tower and prompts ---------------------------------------------------------------


def test_dense_tower_equals_the_backbone_and_the_cached_block_rule():
    from featurestore.backbones.clip import build_clip, resolve_variant
    from methods.clip_dense import LastBlock, pixelclip_dense

    model, _, _ = _tiny_clip()
    dense = DenseCLIP(model.visual, 1)
    bb = build_clip(resolve_variant("clip-b16"), random_init=True, arch_overrides=TINY)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        tokens = bb.pre_last_tokens(x)
        assert torch.allclose(dense.frozen_tokens(x), tokens, atol=1e-6)
        out = dense(x)
        ref = pixelclip_dense(tokens[:, 1:], tokens[:, 0], LastBlock.from_visual(model.visual))
    assert out.shape == (2, 3, 5, 32)
    assert torch.allclose(out.reshape(2, 15, 32), ref, atol=1e-5)
    trained = {n for n, p in dense.visual.named_parameters() if p.requires_grad}
    assert trained == set(dense.trained_names())
    assert "positional_embedding" not in trained
    assert "positional_embedding" in DenseCLIP(model.visual, 2).trained_names()


def test_prompts_in_the_frozen_text_tower():
    model, tok, _ = _tiny_clip()
    ids = tok(["a photo of a cat.", "A photo of a {} {} {} {} in the scene"])
    with torch.no_grad():
        assert torch.allclose(
            encode_text_embeds(model, ids, model.token_embedding(ids)),
            model.encode_text(ids),
            atol=1e-6,
        )
    a = PromptedText(model, tok, 3, 4, seed=5)
    b = PromptedText(model, tok, 3, 4, seed=5)
    assert torch.equal(a.prompts, b.prompts) and a.prompts.shape == (3, 4, 64)
    assert not torch.equal(a.prompts, PromptedText(model, tok, 3, 4, seed=6).prompts)
    out = a()
    assert out.shape == (3, 32)
    out.sum().backward()
    assert a.prompts.grad is not None and a.prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


# -- the step -------------------------------------------------------------------------------


def _model(seed: int = 0, **kw) -> tuple[PixelCLIPModel, dict]:
    model, tok, info = _tiny_clip()
    cfg = _cfg(**kw)
    depth = len(model.visual.transformer.resblocks)
    k = cfg.trainable_blocks or depth
    return PixelCLIPModel(model, tok, cfg, k, "offset"), {"info": info}


def test_ema_update_comes_before_the_teacher_forward():
    m, _ = _model(trainable_blocks=1, momentum=0.5)
    name = m.student.trained_names()[0]
    seen = []
    orig = m.teacher.from_tokens

    def spy(tokens, grid):
        seen.append(dict(m.teacher.visual.named_parameters())[name].detach().clone())
        return orig(tokens, grid)

    m.teacher.from_tokens = spy
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 17, 64, generator=g)
    masks = [torch.rand(3, S, S, generator=g) > 0.5 for _ in range(2)]
    start = dict(m.student.visual.named_parameters())[name].detach().clone()
    m.step(tokens, tokens, masks, (4, 4), lr=1e-2)
    after1 = dict(m.student.visual.named_parameters())[name].detach().clone()
    assert not torch.equal(after1, start)
    m.step(tokens, tokens, masks, (4, 4), lr=1e-2)
    assert torch.equal(seen[0], start)  # student == teacher at step 1
    assert torch.allclose(seen[1], 0.5 * start + 0.5 * after1)  # updated before the forward


def test_store_step_equals_the_pixel_step_with_frozen_blocks(toy):
    root, path = toy
    store = FeatureStore.open(path)
    fs = store.feature_set(store.feature_sets()[0])
    idx = [0, 1, 2]
    masks = [resize_masks(LabelSetMasks(store, "masks").masks(i), S) for i in idx]
    from methods.pixelclip_train import _read_tokens

    tokens = _read_tokens(fs, ("pre_last", "pre_last_cls"), idx)
    a, meta = _model(trainable_blocks=1)
    b, _ = _model(trainable_blocks=1)
    info = meta["info"]
    recs = store.image_records()
    pixels = torch.stack(
        [
            squash_normalise(np.asarray(Image.open(recs[i].path)), SIZE, info.mean, info.std)
            for i in idx
        ]
    )
    la, _ = a.loss(tokens, tokens, masks, (4, 4))
    lb, _ = b.loss(pixels, pixels, masks, (4, 4))
    la.backward()
    lb.backward()
    assert abs(float(la.detach()) - float(lb.detach())) < 1e-5
    for pa, pb in zip(a.params, b.params, strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4)


# -- training: provenance, resume, gloo, skips ---------------------------------------------


def test_train_on_the_store_records_what_was_trained(toy):
    root, path = toy
    r = train_pixelclip(
        TrainRequest(store=path, config=_cfg(trainable_blocks=1), out_dir=str(root / "a"))
    )
    assert r.summary["train_images"] == 5
    assert r.summary["skipped_images"]["no_masks"] == 1
    assert r.summary["input"] == "store" and r.steps_done == 2
    ck = read_checkpoint(r.checkpoint)
    assert ck["format"] == CHECKPOINT_FORMAT
    visual, prompts, decoder = split_trained(ck["model"])
    assert prompts.shape == (K, 4, 64) and "proj.weight" in decoder
    assert set(visual) == {
        "transformer.resblocks.1.attn.in_proj_weight",
        "transformer.resblocks.1.attn.in_proj_bias",
        "transformer.resblocks.1.attn.out_proj.weight",
        "transformer.resblocks.1.attn.out_proj.bias",
    }
    prov = ck["provenance"]
    assert prov["base_clip"]["weights_identity"] == "random-init:0"
    assert prov["masks"]["mask_set"] == "masks" and prov["config"]["eps"] == 100.0


def test_resume_after_a_kill_equals_an_uninterrupted_run(toy):
    root, path = toy
    cfg = _cfg(trainable_blocks=1, iterations=4, save_every=2)
    full = train_pixelclip(TrainRequest(store=path, config=cfg, out_dir=str(root / "full")))

    class Kill(Exception):
        pass

    def killer(ev):
        if ev.get("stage") == "train" and ev["step"] == 3:
            raise Kill

    with pytest.raises(Kill):
        train_pixelclip(TrainRequest(store=path, config=cfg, out_dir=str(root / "cut")), killer)
    assert read_checkpoint(root / "cut" / "last.pt")["step"] == 2
    again = train_pixelclip(TrainRequest(store=path, config=cfg, out_dir=str(root / "cut")))
    a, b = read_checkpoint(full.checkpoint), read_checkpoint(again.checkpoint)
    assert b["step"] == 4
    for n, v in a["model"].items():
        assert torch.allclose(v, b["model"][n], atol=1e-6), n
    with pytest.raises(OvssError, match="trained with other config.eps"):
        train_pixelclip(
            TrainRequest(
                store=path,
                config=_cfg(trainable_blocks=1, iterations=4, save_every=2, eps=50.0),
                out_dir=str(root / "cut"),
            )
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, world, port, path, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    train_pixelclip(
        TrainRequest(store=path, config=_cfg(trainable_blocks=1), out_dir=out, device="cpu")
    )


def test_two_gloo_ranks_equal_one_process(toy):
    """Batch 4 split 2 + 2 over two gloo ranks, gradients all-reduced: equal to one process up
    to float summation order. Losses to rel 1e-5; weights to a fraction of their group's Adam
    step: Adam divides each gradient by its own running magnitude, so an element whose
    gradient is rounding-sized moves by a noise-driven part of a full step (measured on an AMD
    EPYC, AVX2: prompts, lr 2e-3, differ by up to 1.4e-5, 0.7 % of a step; the decoder, lr
    2e-4, by 9e-6). A rank that trained on its own gradients would differ by whole steps."""
    import torch.multiprocessing as mp

    root, path = toy
    cfg = _cfg(trainable_blocks=1)
    one = train_pixelclip(TrainRequest(store=path, config=cfg, out_dir=str(root / "one")))
    mp.spawn(_gloo_worker, args=(2, _free_port(), path, str(root / "two")), nprocs=2)
    a, b = read_checkpoint(one.checkpoint), read_checkpoint(root / "two" / "last.pt")
    assert b["world_size"] == 2
    assert [x for x in a["losses"]] == pytest.approx([x for x in b["losses"]], rel=1e-5)
    for n, v in a["model"].items():
        mult = (
            cfg.prompt_lr_mult
            if n == "prompts"
            else 1.0
            if n.startswith("decoder.")
            else cfg.clip_lr_mult
        )
        step = cfg.lr * mult  # the largest per-element Adam step of this group
        d = (v - b["model"][n]).abs()
        assert float(d.max()) <= 0.1 * step, (n, float(d.max()), step)
        assert float(d.float().mean()) <= 0.01 * step, (n, float(d.mean()), step)


def test_pixel_path_with_augmentations_trains(toy):
    root, path = toy
    r = train_pixelclip(
        TrainRequest(
            store=path,
            config=_cfg(augment=True, short_side=64, crop=48, iterations=1),
            out_dir=str(root / "px"),
        )
    )
    assert r.summary["input"] == "pixels" and r.summary["trainable_blocks"] == 2
    ck = read_checkpoint(r.checkpoint)
    assert "visual.positional_embedding" in ck["model"]
    assert np.isfinite(r.summary["first_loss"])


def test_unaugmented_pixels_decoded_once_train_as_decoded_every_step(toy, monkeypatch):
    import methods.pixelclip_train as pt

    root, path = toy
    cfg = _cfg(trainable_blocks=0, iterations=3, save_every=0)
    reads = []
    real = pt.load_store_image
    monkeypatch.setattr(pt, "load_store_image", lambda *a: reads.append(1) or real(*a))
    kept = train_pixelclip(TrainRequest(store=path, config=cfg, out_dir=str(root / "u1")))
    assert len(reads) == 5  # 3 steps of 4 images over the 5 images with masks: each once
    monkeypatch.setattr(pt, "SQUASHED_CACHE_BYTES", 0)
    again = train_pixelclip(TrainRequest(store=path, config=cfg, out_dir=str(root / "u2")))
    assert len(reads) == 5 + 12
    assert kept.summary["input"] == "pixels"
    assert kept.summary["losses"] == again.summary["losses"]


def test_augmented_views_and_cutout_removed_from_masks():
    img = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    masks = np.ones((1, H, W), bool)
    cfg = _cfg(short_side=64, crop=48)
    for seed in range(20):
        weak, strong, m = augment_views(img, masks, cfg, torch.Generator().manual_seed(seed))
        assert weak.shape == strong.shape == (3, SIZE, SIZE) and m.shape[1:] == (S, S)
        cut = (strong == 0.5).all(0)
        if cut.sum() > 16:  # a cutout: its area is gone from the masks
            ys, xs = np.nonzero(cut.numpy())
            cy, cx = int(ys.mean() * S / SIZE), int(xs.mean() * S / SIZE)
            assert not m[0, cy, cx]
            return
    pytest.fail("no cutout in 20 seeds")


# -- mask sources and bad inputs -----------------------------------------------------------


def test_resize_masks_drops_one_pixel_masks():
    m = np.zeros((3, 100, 100), bool)
    m[0, :50] = True
    m[1, 0, 0] = True  # one pixel: gone after the resize
    r = resize_masks(m, 10)
    assert r.shape == (1, 10, 10) and r[0, :5].all() and not r[0, 5:].any()


def test_empty_mask_set_and_missing_set_are_one_line_errors(toy):
    root, path = toy
    for name, match in (("empty", "none of the 6 images"), ("nope", "no label set 'nope'")):
        with pytest.raises(OvssError, match=match) as e:
            train_pixelclip(
                TrainRequest(
                    store=path,
                    config=_cfg(trainable_blocks=1, mask_set=name),
                    out_dir=str(root / "bad"),
                )
            )
        assert "\n" not in str(e.value)
    from methods.pixelclip_train import resolve_blocks

    assert resolve_blocks(_cfg(trainable_blocks=2), 3) == 2
    assert resolve_blocks(_cfg(trainable_blocks=0), 3) == 3
    with pytest.raises(OvssError, match="trainable_blocks 4 > the 3 blocks"):
        resolve_blocks(_cfg(trainable_blocks=4), 3)


def test_sa1b_masks_and_malformed_files(toy, tmp_path):
    from pycocotools import mask as mask_utils

    root, path = toy
    store = FeatureStore.open(path)
    m = np.zeros((H, W), np.uint8, order="F")
    m[5:20, 10:40] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    folder = tmp_path / "sa1b"
    folder.mkdir()
    (folder / "im0.json").write_text(
        json.dumps({"image": {"file_name": "im0.png"}, "annotations": [{"segmentation": rle}]})
    )
    src = SA1BMasks(store, str(folder))
    got = src.masks(0)
    assert got.shape == (1, H, W) and np.array_equal(got[0], m.astype(bool))
    assert src.masks(1) is None  # no file: the image is skipped
    (folder / "bad.json").write_text("{not json")
    with pytest.raises(MaskSourceError, match="bad.json is not readable JSON"):
        read_sa1b_file(folder / "bad.json")
    (folder / "nolist.json").write_text(json.dumps({"image": {}}))
    with pytest.raises(MaskSourceError, match="no 'annotations' list"):
        read_sa1b_file(folder / "nolist.json")
    with pytest.raises(MaskSourceError, match="the image is 10x10"):
        read_sa1b_file(folder / "im0.json", (10, 10))
    with pytest.raises(MaskSourceError, match="does not exist"):
        SA1BMasks(store, str(tmp_path / "missing"))


# -- inference and the text kind -----------------------------------------------------------


def test_segmenter_and_text_encoder_from_the_checkpoint(toy):
    from featurestore.text_encoders import create_text_encoder
    from methods.base import Vocab
    from methods.pixelclip import text_model_spec

    root, path = toy
    r = train_pixelclip(
        TrainRequest(store=path, config=_cfg(trainable_blocks=1), out_dir=str(root / "seg"))
    )
    enc = create_text_encoder(text_model_spec(r.checkpoint))
    model, tok, _ = _tiny_clip()
    with torch.no_grad():
        base = enc.encode(["a photo of a cat."])
        assert torch.allclose(base, model.encode_text(tok(["a photo of a cat."])), atol=1e-5)
        pt = PromptedText(model, tok, K, 4, seed=0)
        pt.prompts.copy_(read_checkpoint(r.checkpoint)["model"]["prompts"])
        learned = enc.encode(["A photo of a <class 2> in the scene"])
        assert torch.allclose(learned[0], pt()[2], atol=1e-5)
    store = FeatureStore.open(path)
    seg = PixelCLIPSegmenter(store, PixelCLIPConfig(checkpoint=r.checkpoint, size=SIZE))
    emb = F.normalize(torch.randn(3, 32), dim=-1)
    vocab = Vocab([["a"], ["b"], ["c"]], emb, torch.arange(3))
    cos, hw = seg.cosine_logits(0, vocab)
    assert hw == (H, W) and cos.shape == (3, H, W) and cos.abs().max() <= 1 + 1e-5
    from methods.base import ScoringConfig

    labels, _, _ = seg.segment_labels(0, vocab, ScoringConfig())
    assert labels.shape == (H, W) and np.array_equal(labels, cos.argmax(0).numpy())


def test_extract_for_pixelclip_plans_the_store_set():
    from featurestore.recipes import recipe_job
    from methods.plan import plan_for

    rec = plan_for("pixelclip", overrides={"trainable_blocks": "1", "mask_set": "m"})
    assert [s.feature_set for s in rec.steps] == ["clip-b16@square320"]
    assert rec.steps[0].layers == () and recipe_job(rec).layers == {}
    rec = plan_for("pixelclip", overrides={"trainable_blocks": "2", "mask_set": "m"})
    assert [(s.feature_set, s.layers) for s in rec.steps] == [("clip-b16@square320", (9,))]
    assert recipe_job(rec).layers == {Protocol("square", 320): (9,)}
    assert rec.to_dict()["steps"][0]["layers"] == [9]
    rec = plan_for("pixelclip")
    assert [s.feature_set for s in rec.steps] == ["dino-s16@short448"]
    assert [s.model for s in rec.live] == ["clip-b16"]


# -- K = 2 of a 3-block CLIP from the store (extract --for pixelclip --set trainable_blocks=2) --

TINY3 = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 3}}


@pytest.fixture(scope="module")
def toy3(toy):
    """The toy images with a 3-block tiny-CLIP square64 set extracted by the pixelclip
    trainer's recipe for trainable_blocks=2 (so with --layers 0: ``layer0`` / ``layer0_cls``).
    [the trainer's own config, which knows the tiny architecture's depth; ``extract --for
    pixelclip`` plans from the method's, at the named model's depth]"""
    from featurestore.recipes import plan_job, recipe_job, run_job
    from methods.pixelclip_train import PixelCLIPTrainer
    from methods.plan import plan_for

    root, path = toy
    store = FeatureStore.open(path)
    path3 = str(root / "s3.zarr")
    recipe = plan_for(
        PixelCLIPTrainer,
        overrides={
            "trainable_blocks": "2",
            "size": str(SIZE),
            "mask_set": "masks",
            "clip_arch": json.dumps(TINY3),
        },
    )
    job = recipe_job(recipe)
    assert job.groups == [(Protocol("square", SIZE), ["clip-b16"])] and job.layers == {
        Protocol("square", SIZE): (0,)
    }
    cfg = ExtractConfig(
        models=job.models,
        protocol=Protocol("square", SIZE),
        store=path3,
        random_init=True,
        arch_overrides=TINY3,
        dtype="float32",
        device="cpu",
    )
    planned = plan_job(store.image_records(), job, cfg)
    assert [r.feature_set for r in planned.feature_sets] == [f"clip-b16@square{SIZE}"]
    run_job(store.image_records(), job, cfg)
    s3 = FeatureStore.open(path3, mode="a")
    ls = create_label_set(s3, "masks", {"class_names": [["c"]], "kind": "mask set"})
    for i in range(N_IMAGES):
        ls.write(i, _labels(i) if i < 5 else np.full((H, W), 255, np.uint8))
    return root, path3


def test_k2_store_step_equals_the_pixel_step_with_one_frozen_block(toy3):
    from featurestore.backbones.clip import load_open_clip
    from methods.pixelclip_train import _read_tokens

    root, path = toy3
    store = FeatureStore.open(path)
    fs = store.feature_set(store.feature_sets()[0])
    from methods.pixelclip import cached_layers, cached_tensors

    names = cached_tensors(3, 2)
    assert cached_layers(3, 2) == (0,) and cached_layers(3, 1) == ()
    assert names == ("layer0", "layer0_cls") and {"layer0", "layer0_cls"} <= set(fs.tensor_names)
    idx = [0, 1, 2]
    masks = [resize_masks(LabelSetMasks(store, "masks").masks(i), S) for i in idx]
    tokens = _read_tokens(fs, names, idx)

    def model() -> tuple[PixelCLIPModel, object]:
        clip, tok, info = load_open_clip("clip-b16", random_init=True, seed=0, arch_overrides=TINY3)
        cfg = _cfg(trainable_blocks=2, clip_arch=json.dumps(TINY3))
        return PixelCLIPModel(clip, tok, cfg, 2, "offset"), info

    (a, info), (b, _) = model(), model()
    assert a.student.first_trained == 1
    recs = store.image_records()
    pixels = torch.stack(
        [
            squash_normalise(np.asarray(Image.open(recs[i].path)), SIZE, info.mean, info.std)
            for i in idx
        ]
    )
    la, _ = a.loss(tokens, tokens, masks, (4, 4))
    lb, _ = b.loss(pixels, pixels, masks, (4, 4))
    la.backward()
    lb.backward()
    assert abs(float(la.detach()) - float(lb.detach())) < 1e-5
    grads = 0
    for pa, pb in zip(a.params, b.params, strict=True):
        if pb.grad is None:
            assert pa.grad is None
            continue
        grads += 1
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4)
    # both trained blocks (1 and 2) receive gradients on the store path
    trained = dict(a.student.visual.named_parameters())
    assert trained["transformer.resblocks.1.attn.in_proj_weight"].grad.abs().sum() > 0
    assert grads > 0


def test_train_k2_on_the_store(toy3):
    root, path = toy3
    r = train_pixelclip(
        TrainRequest(
            store=path,
            config=_cfg(trainable_blocks=2, clip_arch=json.dumps(TINY3)),
            out_dir=str(root / "k2"),
        )
    )
    assert r.summary["input"] == "store" and r.summary["trainable_blocks"] == 2
    assert r.provenance["features"]["tensor"] == "layer0+layer0_cls"
    ck = read_checkpoint(r.checkpoint)
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in ck["model"])
    assert not any(n.startswith("visual.transformer.resblocks.0.") for n in ck["model"])
