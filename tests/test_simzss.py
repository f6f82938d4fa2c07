"""SimZSS: each equation against a slow loop reference, gradients, the text tower, training on
a toy store (loss decreases, resume after a kill, two gloo ranks = one process), the segmenter
and its text-encoder kind, bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featurestore.backbones.base import TensorSpec
from featurestore.errors import MissingFeatureSetError, OvssError
from featurestore.images import ImageRecord
from featurestore.protocol import Protocol, image_geometry
from featurestore.store import STATUS_OK, FeatureStore
from methods.simzss import (
    LOGIT_SCALE_INIT,
    LOGIT_SCALE_MAX,
    ConceptBatch,
    TextTower,
    batch_concept_sums,
    concept_text_embeddings,
    get_tokenizer,
    global_loss_terms,
    local_loss_terms,
    simzss_loss,
    visual_concepts,
)
from methods.simzss_train import SimZSSTrainConfig, lr_at, param_groups, train_simzss
from methods.train import TrainRequest, read_checkpoint

torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------
# slow loop references of the equations


def _ref_ct(tok, occ, reduce):
    out = []
    for b, _, idx in occ:
        rows = [tok[b, i] for i in idx]
        s = sum(rows)
        out.append(s / len(rows) if reduce == "mean" else s)
    return torch.stack(out)


def _ref_loss(eot, tok, cls, patches, n_valid, occ, logit_scale, tau, s_loc, lam, reduce):
    """L of Eq. 10 written out with Python loops over captions, occurrences and patches."""
    ct = _ref_ct(tok, occ, reduce)
    concepts = sorted({c for _, c, _ in occ})
    h = []
    for k in concepts:
        h.append(sum(ct[m] for m in range(len(occ)) if occ[m][1] == k))
    local = 0.0
    for b, c, _ in occ:
        k = concepts.index(c)
        q = h[k] / h[k].norm()
        zs = [patches[b, n] for n in range(n_valid[b])]
        sims = torch.stack([q @ (z / z.norm()) / tau for z in zs])
        s = torch.softmax(sims, 0)
        cv = sum(s[n] * zs[n] for n in range(len(zs)))
        cv = cv / cv.norm()
        logits = torch.stack([s_loc * cv @ (hh / hh.norm()) for hh in h])
        local = local - torch.log_softmax(logits, 0)[k]
    local = local / len(occ)
    b = len(eot)
    scale = logit_scale.exp()
    glob = 0.0
    for i in range(b):
        img = torch.stack(
            [scale * (cls[i] / cls[i].norm()) @ (eot[j] / eot[j].norm()) for j in range(b)]
        )
        txt = torch.stack(
            [scale * (eot[i] / eot[i].norm()) @ (cls[j] / cls[j].norm()) for j in range(b)]
        )
        glob = glob - torch.log_softmax(img, 0)[i] - torch.log_softmax(txt, 0)[i]
    glob = glob / (2 * b)
    return glob + lam * local, glob, local


def _random_batch(seed=0, b=4, length=9, n=7, d=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    eot = torch.randn(b, d, generator=g, dtype=dtype, requires_grad=True)
    tok = torch.randn(b, length, d, generator=g, dtype=dtype, requires_grad=True)
    cls = torch.randn(b, d, generator=g, dtype=dtype)
    patches = torch.randn(b, n, d, generator=g, dtype=dtype)
    n_valid = [n, n - 2, n, 3]
    valid = torch.zeros(b, n, dtype=torch.bool)
    for i, k in enumerate(n_valid):
        valid[i, :k] = True
    # caption 0: concepts 5 (2 tokens) and 2; caption 1: 5 again (repeated concept across the
    # batch) and 5 once more (twice in one caption); caption 2: none; caption 3: 9
    occ = [(0, 5, [1, 2]), (0, 2, [4]), (1, 5, [2, 3, 4]), (1, 5, [6]), (3, 9, [1])]
    lists = [[] for _ in range(b)]
    for cap, c, idx in occ:
        lists[cap].append((c, idx))
    return eot, tok, cls, patches, valid, n_valid, occ, ConceptBatch.from_lists(lists)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_eq1_concept_pooling_equals_loop(reduce):
    _, tok, _, _, _, _, occ, cb = _random_batch()
    got = concept_text_embeddings(tok, cb, reduce)
    assert torch.allclose(got, _ref_ct(tok, occ, reduce))


def test_eq7_batch_sums_and_eq34_visual_concepts_equal_loops():
    _, tok, _, patches, valid, n_valid, occ, cb = _random_batch(1)
    ct = concept_text_embeddings(tok, cb)
    uniq, inv, h = batch_concept_sums(ct, cb.concept)
    assert uniq.tolist() == [2, 5, 9]
    assert torch.allclose(h[1], ct[0] + ct[2] + ct[3]) and torch.allclose(h[0], ct[1])
    q = F.normalize(h, dim=1)[inv]
    cv = visual_concepts(patches, valid, cb.caption, q, tau=0.1)
    for m, (b, _, _) in enumerate(occ):
        zs = patches[b, : n_valid[b]]
        s = torch.softmax(torch.stack([q[m] @ F.normalize(z, dim=0) / 0.1 for z in zs]), 0)
        ref = F.normalize(sum(s[n] * zs[n] for n in range(len(zs))), dim=0)
        assert torch.allclose(cv[m], ref)
    assert torch.allclose(cv.norm(dim=1), torch.ones(len(occ), dtype=cv.dtype))


def test_padding_patches_get_no_weight():
    _, tok, _, patches, valid, _, _, cb = _random_batch(2)
    ct = concept_text_embeddings(tok, cb)
    _, inv, h = batch_concept_sums(ct, cb.concept)
    q = F.normalize(h, dim=1)[inv]
    a = visual_concepts(patches, valid, cb.caption, q)
    junk = patches.clone()
    junk[~valid] = 1e3
    assert torch.allclose(a, visual_concepts(junk, valid, cb.caption, q))


def test_local_and_global_terms_equal_loops_and_argmax_option():
    g = torch.Generator().manual_seed(3)
    cv = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    h = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    terms = local_loss_terms(cv, h, y, 1 / 0.07)
    hn = F.normalize(h, dim=1)
    for m in range(5):
        logit = torch.stack([cv[m] @ hn[k] / 0.07 for k in range(3)])
        assert terms[m] == pytest.approx(float(-torch.log_softmax(logit, 0)[y[m]]))
    am = local_loss_terms(cv, h, y, 1 / 0.07, "argmax")
    assert (am <= terms + 1e-12).all() and not torch.allclose(am, terms)
    cls = F.normalize(torch.randn(4, 4, generator=g, dtype=torch.float64), dim=1)
    eot = F.normalize(torch.randn(4, 4, generator=g, dtype=torch.float64), dim=1)
    scale = torch.tensor(0.5, dtype=torch.float64)
    full = global_loss_terms(cls, eot, cls, eot, 0, scale) / 8
    ref = (
        F.cross_entropy(scale.exp() * cls @ eot.T, torch.arange(4))
        + F.cross_entropy(scale.exp() * eot @ cls.T, torch.arange(4))
    ) / 2
    assert float(full) == pytest.approx(float(ref))
    # two shares of rows add up to the whole
    a = global_loss_terms(cls[:1], eot[:1], cls, eot, 0, scale)
    b = global_loss_terms(cls[1:], eot[1:], cls, eot, 1, scale)
    assert float(a + b) / 8 == pytest.approx(float(ref))


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_eq10_total_equals_loop_reference_with_finite_gradients(reduce):
    eot, tok, cls, patches, valid, n_valid, occ, cb = _random_batch(4)
    ls = torch.tensor(LOGIT_SCALE_INIT, dtype=torch.float64, requires_grad=True)
    parts = simzss_loss(eot, tok, cls, patches, valid, cb, ls, 0.1, 1 / 0.07, 0.05, reduce)
    ref, rg, rl = _ref_loss(eot, tok, cls, patches, n_valid, occ, ls, 0.1, 1 / 0.07, 0.05, reduce)
    assert float(parts.total) == pytest.approx(float(ref), rel=1e-10)
    assert float(parts.global_part) == pytest.approx(float(rg), rel=1e-10)
    assert float(parts.local_part) == pytest.approx(float(rl), rel=1e-10)
    assert parts.n_captions == 4 and parts.n_concepts == 5
    grads = torch.autograd.grad(parts.total, [eot, tok, ls])
    rgrads = torch.autograd.grad(ref, [eot, tok, ls])
    for a, b in zip(grads, rgrads, strict=True):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-10)
    assert grads[1][2].abs().sum() == 0  # caption 2 has no concept: only its EOT row matters
    assert grads[1][0, 1].abs().sum() > 0


def test_batch_without_concepts_and_large_logits_are_finite():
    eot, tok, cls, patches, valid, *_ = _random_batch(5, dtype=torch.float32)
    cb = ConceptBatch.from_lists([[] for _ in range(len(eot))])
    ls = torch.tensor(LOGIT_SCALE_MAX, requires_grad=True)
    parts = simzss_loss(eot * 1e4, tok, cls, patches * 1e4, valid, cb, ls)
    assert float(parts.local_part) == 0 and parts.n_concepts == 0
    parts.total.backward()
    assert torch.isfinite(eot.grad).all() and torch.isfinite(ls.grad)


# --------------------------------------------------------------------------------------------
# the text tower


def test_text_tower_outputs_eot_and_projected_tokens():
    torch.manual_seed(0)
    tower = TextTower(out_dim=12, width=16, layers=2, heads=2).eval()
    tok = get_tokenizer(77)(["a dog on the grass", "two cats"])
    eot, toks = tower(tok)
    assert eot.shape == (2, 12) and toks.shape == (2, 77, 12)
    t = tower.text
    end = tok.argmax(-1)
    for i in range(2):  # EOT = the projected ln_final token at the end-of-text position
        assert torch.allclose(eot[i], toks[i, end[i]], atol=1e-6)
    # tokens pass through ln_final and the projection: rebuild position 1 by hand
    x = t.token_embedding(tok) + t.positional_embedding
    x = t.transformer(x, attn_mask=t.attn_mask)
    ref = t.ln_final(x) @ t.text_projection
    assert torch.allclose(toks, ref, atol=1e-5)
    # causal: changing a later token leaves earlier positions unchanged
    tok2 = tok.clone()
    tok2[0, 4] = 1000
    assert torch.allclose(tower(tok2)[1][0, :4], toks[0, :4], atol=1e-6)
    assert float(tower.logit_scale) == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        tower.logit_scale.fill_(9.0)
    tower.clamp_logit_scale()
    assert float(tower.logit_scale) == pytest.approx(math.log(100))


def test_default_tower_is_clip_sized_and_decay_groups():
    cfg = SimZSSTrainConfig()
    assert (cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.context_length) == (512, 12, 8, 77)
    assert (cfg.tau, cfg.lam, cfg.local_scale) == (0.1, 0.05, pytest.approx(1 / 0.07))
    tower = TextTower(out_dim=8, width=16, layers=1, heads=2)
    no_decay, decay = param_groups(tower, 0.2)
    names = {id(p): n for n, p in tower.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in nd and all(tower.get_parameter(n).ndim < 2 for n in nd)
    assert "text.token_embedding.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 20, 1.0, 0.1) for s in range(20)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert SimZSSTrainConfig(batch_size=512).peak_lr == pytest.approx(6e-5)


# --------------------------------------------------------------------------------------------
# a toy store: tokens = the sum of the directions of the classes painted in each patch

CLASSES = ["dog", "grass", "car", "tree"]
PLURAL = {"dog": "dogs", "grass": "grass", "car": "cars", "tree": "trees"}
D = 8
PROTO = Protocol("short", 28)


def _toy_store(tmp_path, n=8, seed=0, name="s.zarr", const_cls=False):
    rng = np.random.default_rng(seed)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir(exist_ok=True)
    recs = []
    for i in range(n):
        p = img_dir / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(p)
        recs.append(ImageRecord(f"im{i}", str(p), "folder", ""))
    store = FeatureStore.open_or_create(tmp_path / name, recs)
    geos = [image_geometry(PROTO, 28, 28, 14) for _ in range(n)]
    fs = store.create_feature_set(
        "fake-dino",
        PROTO,
        {"name": "fake-dino", "weights": "random-init:0"},
        [TensorSpec("patch", "token", (D,)), TensorSpec("cls", "window", (D,))],
        geos,
    )
    dirs = rng.normal(size=(len(CLASSES), D)) * 2
    present = {}
    for b in range(fs.n_blocks):
        bufs = fs.new_block_buffers(b)
        for i in fs.block_images(b):
            a, c = rng.choice(len(CLASSES), 2, replace=False)
            lab = np.array([a, a, c, c])
            x = dirs[lab] + rng.normal(size=(4, D)) * 0.3
            bufs["patch"][fs.local_rows("token", i)] = fs.encode(x.astype(np.float32))
            # const_cls: every image one CLS, as a random-init DINOv2 gives
            cls = np.ones((1, D)) if const_cls else x.mean(0, keepdims=True)
            bufs["cls"][fs.local_rows("window", i)] = fs.encode(cls.astype(np.float32))
            present[f"im{i}"] = (CLASSES[a], CLASSES[c])
        imgs = fs.block_images(b)
        fs.write_block(b, bufs, np.full(len(imgs), STATUS_OK), [""] * len(imgs))
    return store, present


def _captions(tmp_path, present, extra=()):
    rows = []
    for iid, (a, c) in present.items():
        rows.append({"image": iid, "caption": f"a photo of a {a} next to some {PLURAL[c]}."})
        rows.append({"image": iid, "caption": f"{c.capitalize()} and {a}"})
    rows += list(extra)
    p = tmp_path / "caps.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


def _cfg(caps, **kw):
    base = dict(
        captions=str(caps), model="fake-dino", train_resize="short", train_size=28,
        text_width=16, text_layers=1, text_heads=2, context_length=16, epochs=6,
        batch_size=8, lr=0.05 * 256 / 8, save_every=0, seed=0,
    )  # fmt: skip
    base.update(kw)
    return SimZSSTrainConfig(**base)


def test_training_decreases_loss_and_records_provenance(tmp_path):
    store, present = _toy_store(tmp_path)
    caps = _captions(tmp_path, present, [{"image": "nope", "caption": "a dog"}])
    events = []
    res = train_simzss(
        TrainRequest(str(store.path), _cfg(caps), out_dir=tmp_path / "out", device="cpu"),
        events.append,
    )
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.8, losses
    assert res.summary["unknown_images"] == 1 and res.summary["pairs"] == 16
    assert res.summary["captions_without_concept"] == 0
    ev = [e for e in events if e["stage"] == "train"]
    assert ev and ev[-1]["unit"] == "captions" and ev[-1]["items_per_s"] > 0
    ck = read_checkpoint(res.checkpoint)  # weights_only
    prov = ck["provenance"]
    assert prov["features"]["key"] == "fake-dino@short28"
    assert prov["captions"]["sha256"].startswith("sha256:")
    assert prov["concepts"]["matcher"] == "offline" and len(prov["concepts"]["bank_key"]) == 16
    assert prov["config"]["lam"] == 0.05 and "open_clip" in prov["tokenizer"]["name"]
    assert ck["step"] == 12 and ck["epoch"] == 6


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    store, present = _toy_store(tmp_path)
    caps = _captions(tmp_path, present)
    cfg = _cfg(caps, epochs=3, batch_size=6, save_every=2)  # 3 steps per epoch

    full = train_simzss(TrainRequest(str(store.path), cfg, out_dir=tmp_path / "a", device="cpu"))

    class Killed(Exception):
        pass

    def kill_at_5(ev):
        if ev["stage"] == "train" and ev["step"] == 5:  # after step 5; last save at step 4
            raise Killed

    req = TrainRequest(str(store.path), cfg, out_dir=tmp_path / "b", device="cpu")
    with pytest.raises(Killed):
        train_simzss(req, kill_at_5)
    assert read_checkpoint(tmp_path / "b" / "last.pt")["step"] == 4
    resumed = train_simzss(req)
    a, b = read_checkpoint(full.checkpoint), read_checkpoint(resumed.checkpoint)
    assert b["step"] == a["step"] == 9
    for k, w in a["model"].items():
        assert torch.equal(w, b["model"][k]), k
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-6)
    # another run's hyperparameters: a one-line error naming them
    with pytest.raises(OvssError, match="config.lam"):
        train_simzss(TrainRequest(str(store.path), _cfg(caps, lam=0.5, epochs=3, batch_size=6,
                                                          save_every=2),
                                  out_dir=tmp_path / "b", device="cpu"))  # fmt: skip


def _ddp_worker(rank, world, port, store_path, cfg, out):
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    events = []
    train_simzss(TrainRequest(store_path, cfg, out_dir=out, device="cpu"), events.append)
    assert (len(events) > 0) == (rank == 0)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """7 pairs per step split 4 + 3; every rank's text concepts, EOTs, ids and CLS are gathered,
    its share of the loss backpropagated and gradients summed: equal to one process up to
    float summation order."""
    import socket

    import torch.multiprocessing as mp

    store, present = _toy_store(tmp_path, n=7)
    caps = _captions(tmp_path, present)
    cfg = _cfg(caps, epochs=2, batch_size=7)
    # the one-process run first: it imports open_clip, which the forked ranks then inherit
    one = read_checkpoint(
        train_simzss(
            TrainRequest(str(store.path), cfg, out_dir=tmp_path / "one", device="cpu")
        ).checkpoint
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork, not spawn: the ranks inherit this process's imports (a spawned rank re-imports torch
    # and open_clip, ~30 s each on the shared machine); the workers use one torch thread
    mp.start_processes(
        _ddp_worker,
        args=(2, port, str(store.path), cfg, str(tmp_path / "ddp")),
        nprocs=2,
        start_method="fork",
    )
    two = read_checkpoint(tmp_path / "ddp" / "last.pt")
    assert two["world_size"] == 2 and one["world_size"] == 1
    for h2, h1 in zip(two["history"], one["history"], strict=True):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
        assert h2["concept_acc"] == pytest.approx(h1["concept_acc"])
    for k, w in one["model"].items():
        w2 = two["model"][k]
        if k.endswith("attn.in_proj_bias"):
            # the key bias shifts every attention logit of a query equally: its gradient is 0
            # up to rounding, and Adam turns rounding noise into full-size steps; skip it
            width = w.numel() // 3
            w, w2 = torch.cat([w[:width], w[2 * width :]]), torch.cat([w2[:width], w2[2 * width :]])
        assert torch.allclose(w2, w, atol=1e-5), k


def test_bad_inputs_are_one_line_errors(tmp_path):
    store, present = _toy_store(tmp_path, n=2)
    req = lambda cfg: TrainRequest(str(store.path), cfg, out_dir=tmp_path / "o", device="cpu")  # noqa: E731
    with pytest.raises(OvssError, match="--captions"):
        train_simzss(req(SimZSSTrainConfig(model="fake-dino", train_resize="short", train_size=28)))
    with pytest.raises(OvssError, match="no caption file"):
        train_simzss(req(_cfg(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text('{"annotations": [{"image_id": 1}]}')
    with pytest.raises(OvssError, match="annotation 1 lacks"):
        train_simzss(req(_cfg(bad)))
    only_unknown = _captions(tmp_path, {"x1": ("dog", "car")})
    with pytest.raises(OvssError, match="no caption .* belongs to a finished image"):
        train_simzss(req(_cfg(only_unknown)))
    caps = _captions(tmp_path, present)
    with pytest.raises(MissingFeatureSetError) as e:
        train_simzss(req(_cfg(caps, train_size=56)))
    assert e.value.needed_by == "simzss" and "\n" not in str(e.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(OvssError, match="names no concept"):
        train_simzss(req(_cfg(caps, concepts=str(empty))))
    with pytest.raises(OvssError, match="multiple of text_heads"):
        _cfg(caps, text_width=15)


def test_segment_with_the_trained_tower_and_its_cached_text_set(tmp_path):
    from featurestore.text import get_text_embeddings, list_text_sets, parse_vocab
    from methods.base import ScoringConfig
    from methods.segment import build_segmenter, segment_image, vocab_from_text
    from methods.simzss import SimZSSSegmenter, text_model_spec

    store, present = _toy_store(tmp_path)
    caps = _captions(tmp_path, present)
    res = train_simzss(
        # [test choice] λ = 1: on 16 captions the paper's 0.05 leaves the dense side untrained
        TrainRequest(
            str(store.path),
            _cfg(caps, epochs=60, lam=1.0, save_every=1000),
            out_dir=tmp_path / "o",
            device="cpu",
        )
    )
    spec = text_model_spec(res.checkpoint)
    settings = {"checkpoint": res.checkpoint, "size": 28, "crop": 0, "stride": 0}
    seg = build_segmenter(store, "simzss", None, settings)
    assert isinstance(seg, SimZSSSegmenter) and seg.config.text_model == spec
    assert SimZSSSegmenter.vocabulary_defaults(seg.config).text_model == spec
    vocab = parse_vocab(",".join(CLASSES))
    te = get_text_embeddings(store.path, spec, vocab, "single")
    sets = list_text_sets(store.path)
    assert len(sets) == 1 and sets[0]["key"].startswith("text/simzss-")
    assert get_text_embeddings(store.path, spec, vocab, "single").key == te.key  # cached
    v = vocab_from_text(te)
    fs = store.feature_set("fake-dino@short28")
    hits = 0
    for i, iid in enumerate(store.image_ids):
        cos, canvas = seg.cosine_logits(i, v)
        assert cos.shape == (4, 28, 28) and tuple(canvas) == (28, 28)
        labels, _, _ = segment_image(seg, i, v, ScoringConfig())
        a, c = present[iid]
        # left patch column holds class a, right column class c (rows of the 2x2 grid: a a / c c)
        top, bottom = labels[:14].ravel(), labels[14:].ravel()
        hits += int(np.bincount(top, minlength=4).argmax() == CLASSES.index(a))
        hits += int(np.bincount(bottom, minlength=4).argmax() == CLASSES.index(c))
    assert fs.store.n_images == 8 and hits >= 12, hits  # chance: 4 of 16
    with pytest.raises(OvssError, match="--checkpoint"):
        build_segmenter(store, "simzss", None, {"size": 28, "crop": 0, "stride": 0})
    assert SimZSSSegmenter.scoring_presets("voc21")["prob_thd"] > 0
    assert SimZSSSegmenter.scoring_presets("ade20k") == {}


def test_global_patch_mean_ignores_padding_and_is_used_by_the_trainer(tmp_path):
    from methods.simzss_train import global_patch_mean

    g = torch.Generator().manual_seed(6)
    patches = torch.randn(3, 5, 4, generator=g)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    got = global_patch_mean(patches, valid)
    for b in range(3):
        assert torch.allclose(got[b], patches[b, valid[b]].mean(0), atol=1e-6)

    # patch_mean reads the patches only: the same run on a store whose CLS are all one vector;
    # the paper's cls setting differs there
    def first_loss(store, out, **kw):
        cfg = _cfg(caps, epochs=1, **kw)
        res = train_simzss(TrainRequest(str(store.path), cfg, out_dir=tmp_path / out, device="cpu"))
        return res.history[0]["loss"], res

    real, present = _toy_store(tmp_path)
    const, _ = _toy_store(tmp_path, name="c.zarr", const_cls=True)
    caps = _captions(tmp_path, present)
    pm_real, _ = first_loss(real, "a", global_token="patch_mean")
    pm_const, res = first_loss(const, "b", global_token="patch_mean")
    cls_const, _ = first_loss(const, "c")
    assert pm_real == pytest.approx(pm_const, rel=1e-6)
    assert abs(cls_const - pm_const) > 1e-3
    assert read_checkpoint(res.checkpoint)["provenance"]["config"]["global_token"] == "patch_mean"
