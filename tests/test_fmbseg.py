"""FMbSeg Stage 2: TSupCon against a loop-based Eq. 1-4, ablation losses, patch labels,
training on a separable toy store, checkpoint round trip / resume, `aligned` segmentation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from featurestore.backbones.base import TensorSpec
from featurestore.datasets import list_dataset_images
from featurestore.errors import OvssError
from featurestore.protocol import Protocol, image_geometry
from featurestore.store import STATUS_OK, FeatureStore
from featurestore.text import Vocabulary, store_text_embeddings
from methods.base import Vocab
from methods.evaluate import evaluate_store
from methods.fmbseg import (
    AlignConfig,
    AlignmentModule,
    DatasetLabelSource,
    load_checkpoint,
    patch_labels,
    proto_loss,
    supcon_loss,
    train_alignment,
    tsupcon_loss,
)
from methods.train import read_checkpoint
from ovss_cli.main import cli

torch.set_num_threads(1)


def _rand(n=9, k=4, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    t = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 0, 1, 2][:n])  # class 3 absent, 2 classes with >1
    y[-1] = 3 if n > 8 else y[-1]  # one singleton class (no ℓim partner)
    return z, y, t


def _tsupcon_loop(z, y, t, tau):
    """Eq. 1-4 of the paper written literally with loops (τ divides every dot product)."""
    n, k = len(z), len(t)
    dot = lambda a, b: float(a @ b) / tau  # noqa: E731

    def lt_i(i, kk):
        den = sum(math.exp(dot(z[i], t[q])) for q in range(k))
        den += sum(math.exp(dot(z[i], z[j])) for j in range(n) if j != i)
        return -dot(z[i], t[kk]) + math.log(den)

    present = sorted(set(y.tolist()))
    lt = 0.0
    for kk in present:
        members = [i for i in range(n) if y[i] == kk]
        lt += sum(lt_i(i, kk) for i in members) / len(members)
    lim = 0.0
    for i in range(n):
        pos = [j for j in range(n) if j != i and y[j] == y[i]]
        if not pos:
            continue
        den = math.log(sum(math.exp(dot(z[i], z[j])) for j in range(n) if j != i))
        lim += sum(-dot(z[i], z[j]) + den for j in pos) / len(pos)
    return lt, lim, (lt + lim) / (n + len(present))


@pytest.mark.parametrize("tau", [1.0, 0.1, 0.07])
def test_tsupcon_equals_loop_reference(tau):
    for seed in range(3):
        z, y, t = _rand(seed=seed)
        got = float(tsupcon_loss(z, y, t, tau))
        assert got == pytest.approx(_tsupcon_loop(z, y, t, tau)[2], rel=1e-10)


def test_proto_and_supcon_reference():
    z, y, t = _rand(seed=1)
    tau = 0.2
    lt, _, _ = _tsupcon_loop(z, y, t, tau)
    assert float(proto_loss(z, y, t, tau)) == pytest.approx(lt / len(set(y.tolist())), rel=1e-10)
    feats = torch.cat([z, t])
    labels = torch.cat([y, torch.arange(len(t))]).tolist()
    total, anchors = 0.0, 0
    for a in range(len(feats)):
        pos = [p for p in range(len(feats)) if p != a and labels[p] == labels[a]]
        if not pos:
            continue
        den = math.log(
            sum(math.exp(float(feats[a] @ feats[j]) / tau) for j in range(len(feats)) if j != a)
        )
        total += -sum(float(feats[a] @ feats[p]) / tau - den for p in pos) / len(pos)
        anchors += 1
    assert float(supcon_loss(z, y, t, tau)) == pytest.approx(total / anchors, rel=1e-10)


@pytest.mark.parametrize("loss", [tsupcon_loss, supcon_loss, proto_loss])
def test_gradients_finite_including_degenerate_batches(loss):
    torch.manual_seed(0)
    m = AlignmentModule(6, 5, "block", hidden_dim=8, heads=2)
    for n in (1, 2, 7):
        x = torch.randn(1, n, 6)
        y = torch.zeros(n, dtype=torch.long) if n < 7 else torch.arange(n) % 3
        t = F.normalize(torch.randn(3, 5), dim=1)
        m.zero_grad()
        value = loss(m(x)[0], y, t, 0.1)
        value.backward()
        assert torch.isfinite(value)
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_large_logits_are_stable():
    z, y, t = _rand(seed=2)
    assert torch.isfinite(tsupcon_loss(z.float(), y, t.float(), tau=1e-3))


@pytest.mark.parametrize("arch", ["block", "mlp", "linear"])
def test_module_shapes_unit_norm_and_padding(arch):
    torch.manual_seed(0)
    m = AlignmentModule(6, 5, arch, hidden_dim=8, heads=2).eval()
    x = torch.randn(2, 4, 6)
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    z = m(x, valid)
    assert z.shape == (2, 4, 5)
    assert torch.allclose(z.norm(dim=-1), torch.ones(2, 4), atol=1e-5)
    # padded tokens do not change the valid ones
    z2 = m(x[1:, :2], None)
    assert torch.allclose(z[1, :2], z2[0], atol=1e-5)


# ------------------------------------------------------------------------------ toy store

CLASSES = ["sky", "grass", "brick"]
PROTO = Protocol(resize="none", size=0)
P = 8
D_IN, D_TXT = 6, 4


def _toy(tmp_path, n=6, seed=0):
    """A `custom` dataset with patch-constant GT, a store whose 6-d tokens are a class
    direction + noise, and 4-d random text embeddings of the classes."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "data"
    for sub in ("images/train", "annotations/train"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    grids = {}
    for i in range(n):
        grid = rng.integers(0, 3, (3, 4))
        gt = np.kron(grid, np.ones((P, P), dtype=np.int64)).astype(np.uint8)
        Image.fromarray(rng.integers(0, 255, (*gt.shape, 3), dtype=np.uint8)).save(
            root / "images/train" / f"im{i}.png"
        )
        Image.fromarray(gt).save(root / "annotations/train" / f"im{i}.png")
        grids[f"im{i}"] = grid
    recs = list_dataset_images("custom", root, "train")
    store = FeatureStore.open_or_create(tmp_path / "s.zarr", recs)
    sizes = store.root["images/size"][...]
    geos = [image_geometry(PROTO, h, w, P) for h, w in sizes.tolist()]
    fs = store.create_feature_set(
        "fake-vfm",
        PROTO,
        {"name": "fake-vfm", "weights": "random-init:0"},
        [TensorSpec("patch", "token", (D_IN,))],
        geos,
    )
    centres = rng.normal(size=(3, D_IN)) * 2 + 5  # a shared offset, as real features have
    for b in range(fs.n_blocks):
        bufs = fs.new_block_buffers(b)
        for i in fs.block_images(b):
            lab = grids[store.image_ids[i].split("/")[-1]].reshape(-1)
            x = centres[lab] + rng.normal(size=(len(lab), D_IN)) * 0.5
            bufs["patch"][fs.local_rows("token", i)] = fs.encode(x.astype(np.float32))
        imgs = fs.block_images(b)
        fs.write_block(b, bufs, np.full(len(imgs), STATUS_OK), [""] * len(imgs))
    emb = F.normalize(torch.randn(3, D_TXT, generator=torch.Generator().manual_seed(1)), dim=1)
    store_text_embeddings(
        store,
        "clip-b16",
        Vocabulary.from_names(CLASSES),
        "single",
        emb.numpy(),
        {"weights": "random-init:0"},
    )
    vocab = Vocab([[c] for c in CLASSES], emb, torch.arange(3))
    return store, root, vocab


def test_patch_labels_majority_and_min_frac(tmp_path):
    store, root, _ = _toy(tmp_path, n=1)
    f = store.feature_set(store.feature_sets()[0]).read(0)
    lab = np.zeros(tuple(f.original_size), np.uint8)
    lab[:, :P] = 1
    lab[:P, P : P + 3] = 2  # 3/8 of the columns of patch (0, 1): majority 0 (5/8) kept
    lab[P : 2 * P, P : P + 5] = 255  # majority ignore: 3/8 < 0.5 -> ignored
    # patch (1, 2): ignore is the most frequent label (4/8) without a majority of the classes
    # (class 0 2/8, class 2 2/8): ignored, even with a min_frac the classes would pass
    lab[P : 2 * P, 2 * P : 2 * P + 4] = 255
    lab[P : 2 * P, 2 * P + 4 : 2 * P + 6] = 2
    # patch (2, 2): ignore and class 2 tie (3/8 each), class 0 has 2/8: the class wins the tie
    lab[2 * P :, 2 * P : 2 * P + 3] = 255
    lab[2 * P :, 2 * P + 3 : 2 * P + 6] = 2
    pl = patch_labels(lab, f, 3, 0.5).reshape(3, 4)
    assert pl[0, 0] == 1 and pl[0, 1] == 0 and pl[1, 1] == -1 and pl[2, 3] == 0
    assert pl[1, 2] == -1 and pl[2, 2] == -1  # 3/8 < 0.5
    assert patch_labels(lab, f, 3, 0.7).reshape(3, 4)[0, 1] == -1
    low = patch_labels(lab, f, 3, 0.2).reshape(3, 4)
    # a majority over the classes only would keep class 0 in (1, 2) (2/8 >= 0.2) and in (1, 1)
    # (3/8 of class 0 under 5/8 ignore); ignore as a candidate of the majority drops both
    assert low[1, 2] == -1 and low[1, 1] == -1
    assert low[2, 2] == 2 and low[0, 1] == 0


def test_training_separable_toy_resume_and_aligned_segmentation(tmp_path):
    store, root, vocab = _toy(tmp_path)
    src = DatasetLabelSource(store, "custom", str(root), "train")
    key = store.feature_sets()[0]
    cfg = AlignConfig(arch="mlp", hidden_dim=16, epochs=6, batch_images=2, lr=0.5)
    events = []
    ck = train_alignment(
        str(store.path),
        key,
        src,
        vocab,
        cfg,
        progress=events.append,
        out_dir=tmp_path / "a",
        text_model="clip-b16",
    )
    module, meta = load_checkpoint(ck)
    hist = meta["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["patch_acc"] > max(hist[0]["patch_acc"], 0.9)
    prov = meta["provenance"]
    assert prov["features"]["key"] == key and prov["labels"]["kind"] == "dataset"
    assert prov["config"]["lr"] == 0.5 and prov["vocabulary"]["class_names"] == [
        [c] for c in CLASSES
    ]
    assert any(e["stage"] == "train" and "loss" in e for e in events)

    # resume: a run interrupted after epoch 3, then rerun == one uninterrupted run (bitwise)
    def stop_after_3(ev):
        if ev["stage"] == "epoch" and ev["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_alignment(
            str(store.path), key, src, vocab, cfg, progress=stop_after_3, out_dir=tmp_path / "b"
        )
    assert load_checkpoint(tmp_path / "b" / "last.pt")[1]["epoch"] == 3
    ck_b = train_alignment(str(store.path), key, src, vocab, cfg, out_dir=tmp_path / "b")
    mb, meta_b = load_checkpoint(ck_b)
    assert meta_b["epoch"] == 6 and len(meta_b["history"]) == 6
    for (n1, p1), (_, p2) in zip(module.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), n1
    with pytest.raises(Exception, match="other"):
        train_alignment(
            str(store.path),
            key,
            src,
            vocab,
            AlignConfig(**{**cfg.__dict__, "lr": 0.1}),
            out_dir=tmp_path / "b",
        )

    res = evaluate_store(
        str(store.path),
        "custom",
        str(root),
        "aligned",
        vocab,
        split="train",
        overrides={"checkpoint": str(ck)},
    )
    # patch accuracy is 1.0 (above); the pixel metric loses the 8-px patch boundaries that
    # bilinear upsampling of 3x4 token logits blurs (measured: mIoU 79, aAcc 88; chance 33)
    assert hist[-1]["patch_acc"] == 1.0
    assert res.metrics["mIoU"] > 70 and res.metrics["aAcc"] > 80


def test_cli_align_then_segment(tmp_path):
    store, root, _ = _toy(tmp_path, n=4)
    key = store.feature_sets()[0]
    r = CliRunner().invoke(
        cli,
        [
            "align",
            "--store",
            str(store.path),
            "--features",
            key,
            "--gt-dataset",
            "custom",
            "--data-root",
            str(root),
            "--split",
            "train",
            "--arch",
            "linear",
            "--epochs",
            "2",
            "--lr",
            "0.5",
            "--out",
            str(tmp_path / "ck"),
            "--json",
            "-q",
            "--text-random-init",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["epochs_done"] == 2 and out["checkpoint"].endswith("last.pt")
    r = CliRunner().invoke(
        cli,
        [
            "segment",
            "--store",
            str(store.path),
            "--method",
            "aligned",
            "--set",
            f"checkpoint={out['checkpoint']}",
            "--classes",
            ",".join(CLASSES),
            "--templates",
            "single",
            "--out",
            str(tmp_path / "seg"),
            "--json",
            "-q",
            "--no-overlay",
            "--text-random-init",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["images"] == 4


def _cli(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_cli_align_from_a_store_label_set_records_text_identity_and_checkpoint_option(tmp_path):
    """The Stage-1 -> Stage-2 path through the store: a label set written into the store (as
    `ovss segment --write-labels` does) trains `ovss align --labels NAME`; the checkpoint
    records the text encoder (random-init:0, templates, vocabulary key); `segment/eval
    --method aligned --checkpoint` then embed the vocabulary with the checkpoint's templates."""
    from featurestore.labels import load_label
    from featurestore.labelsets import create_label_set
    from methods.fmbseg import StoreLabelSource

    store, root, vocab = _toy(tmp_path, n=4)
    key = store.feature_sets()[0]
    # the same embeddings cached under a second template set: the checkpoint's choice is seen
    store_text_embeddings(
        store,
        "clip-b16",
        Vocabulary.from_names(CLASSES),
        "clip7",
        vocab.embeddings.numpy(),
        {"weights": "random-init:0"},
    )
    from featurestore.datasets import get_dataset

    spec = get_dataset("custom", root)
    # as `ovss segment --write-labels` records it: the CLIP and templates of Stage 1
    stage1 = {"backbones": {"clip": {"model": "clip-b16"}}, "templates": "clip7"}
    ls = create_label_set(
        FeatureStore.open(store.path, mode="a"),
        "stage1",
        {"class_names": [[c] for c in CLASSES], "protocol": stage1},
    )
    recs = {r.image_id: r.label_path for r in list_dataset_images("custom", root, "train")}
    for i, image_id in enumerate(store.image_ids):
        gt = load_label(spec, recs[image_id]).copy()
        gt[:, :3] = 255  # pseudo-labels leave pixels unlabelled
        ls.write(i, gt)
    assert StoreLabelSource(store, "stage1").class_names == [[c] for c in CLASSES]
    assert StoreLabelSource(store, "stage1").text_defaults() == {
        "text_model": "clip-b16",
        "templates": "clip7",
    }

    ck_dir = tmp_path / "ck"
    # no --templates / --text-model: the label set's clip-b16 + clip7
    r = _cli(
        "align", "--store", store.path, "--features", key, "--labels", "stage1",
        "--arch", "block", "--hidden-dim", "8", "--heads", "2", "--mlp-ratio", "2",
        "--epochs", "2", "--lr", "0.5", "--text-random-init",
        "--device", "cpu", "--out", ck_dir, "--json", "-q",
    )  # fmt: skip
    out = json.loads(r.output)
    assert out["epochs_done"] == 2 and out["labels"]["kind"] == "label_set"
    assert out["labels"]["name"] == "stage1" and "--checkpoint" in out["segment_with"]
    _, meta = load_checkpoint(out["checkpoint"])
    voc = meta["provenance"]["vocabulary"]
    assert voc["text_model"] == "clip-b16" and voc["templates"] == "clip7"
    assert voc["text_weights"] == "random-init:0"
    assert voc["vocabulary_key"] == Vocabulary.from_names(CLASSES).key()
    assert voc["text_set"].endswith("-clip7")
    assert meta["provenance"]["config"]["mlp_ratio"] == 2.0
    assert out["text"]["text_weights"] == "random-init:0"

    # segment with --checkpoint and no --templates: the checkpoint's templates (clip7)
    seg = tmp_path / "seg"
    _cli(
        "segment", "--store", store.path, "--method", "aligned", "--checkpoint",
        out["checkpoint"], "--classes", ",".join(CLASSES), "--out", seg, "--no-overlay",
        "--text-random-init", "--device", "auto", "--json", "-q",
    )  # fmt: skip
    summary = json.loads((seg / "segment.json").read_text())
    assert summary["images"] == 4 and summary["vocabulary"]["templates"] == "clip7"
    assert summary["config"]["checkpoint"] == out["checkpoint"]
    # eval takes the same option
    r = _cli(
        "eval", "--dataset", "custom", "--data-root", root, "--split", "train", "--store",
        store.path, "--method", "aligned", "--checkpoint", out["checkpoint"],
        "--text-random-init", "--json", "-q",
    )  # fmt: skip
    res = json.loads(r.output)
    assert res["images"] == 4 and res["protocol"]["templates"] == "clip7"

    # --checkpoint with a method that has none, or disagreeing with --set: usage errors
    for extra in (
        ["--method", "prototype", "--checkpoint", out["checkpoint"]],
        ["--method", "aligned", "--checkpoint", out["checkpoint"], "--set", "checkpoint=x.pt"],
    ):
        r = CliRunner().invoke(
            cli,
            ["segment", "--store", str(store.path), "--classes", "a,b", "--out",
             str(tmp_path / "x"), "--text-random-init", *extra],
        )  # fmt: skip
        assert r.exit_code == 2 and "checkpoint" in r.output


def test_default_templates_and_device(monkeypatch):
    from methods.base import build_config, get_method
    from methods.fmbseg import resolve_device

    def default_templates(method, dataset=None):  # the method's vocabulary defaults
        cls = get_method(method)
        return cls.vocabulary_defaults(build_config(cls, dataset)).templates

    assert default_templates("prototype") == "openai80"
    assert default_templates("aligned") == "single"  # FMbSeg's one template
    assert default_templates("fmbseg-stage1") == "single"  # the fmbseg recipe's
    assert default_templates("fmbseg-stage1", "custom") == "single"
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    mps = getattr(torch.backends, "mps", None)
    if torch.cuda.is_available():
        want = "cuda:0"
    elif mps is not None and mps.is_available():
        want = "mps"
    else:
        want = "cpu"
    assert str(resolve_device("auto")) == want
    assert str(resolve_device("cpu")) == "cpu"
    with pytest.raises(OvssError, match="not a device"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(OvssError, match="CUDA"):
            resolve_device("cuda:1")


def test_device_auto_is_the_default_and_listed():
    for cmd in (["align"], ["segment"], ["eval"], ["cluster"]):
        r = CliRunner().invoke(cli, [*cmd, "--help"])
        assert r.exit_code == 0
        opt = next(p for p in cli.commands[cmd[0]].params if p.name == "device")
        # one default in one place: the option's, or (None here) the library request's
        assert opt.default in ("auto", None) and "auto" in r.output
    from methods.segment import MethodRequest

    assert MethodRequest().device == "auto"


# ------------------------------------------------------------------------------ DDP (torchrun)


def _ddp_worker(rank, world, port, store_path, root, emb, cfg, out):
    """One torchrun-style rank: the environment torchrun sets, then the ordinary API call."""
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    store = FeatureStore.open(store_path)
    src = DatasetLabelSource(store, "custom", root, "train")
    vocab = Vocab([[c] for c in CLASSES], emb, torch.arange(3))
    events = []
    train_alignment(
        store_path, store.feature_sets()[0], src, vocab, cfg, progress=events.append, out_dir=out
    )
    assert torch.distributed.is_initialized() is False  # destroyed at the end
    assert (len(events) > 0) == (rank == 0)  # only rank 0 reports progress


def test_ddp_two_gloo_ranks_match_single_process(tmp_path):
    """2 gloo ranks (7 images, 3 per step: shares 2+1, and an empty rank-1 share at the last
    step; block arch with per-image patch sampling). Every rank gathers the step's aligned
    patches and evaluates the whole batch's loss, so the run equals the single-process one up
    to float summation order: asserted as per-epoch loss and patch accuracy equal to rel 1e-5
    and every weight allclose (atol 1e-5), not bitwise."""
    import socket

    import torch.multiprocessing as mp

    store, root, vocab = _toy(tmp_path, n=7)
    key = store.feature_sets()[0]
    cfg = AlignConfig(
        arch="block", hidden_dim=16, heads=2, epochs=3, batch_images=3, lr=0.5,
        max_patches_per_image=8,
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (2, port, str(store.path), str(root), vocab.embeddings, cfg, str(tmp_path / "ddp"))
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    _, meta = load_checkpoint(tmp_path / "ddp" / "last.pt")
    ck = read_checkpoint(tmp_path / "ddp" / "last.pt")
    assert meta["epoch"] == 3 and ck["world_size"] == 2
    assert all(math.isfinite(h["loss"]) for h in meta["history"])

    src = DatasetLabelSource(store, "custom", str(root), "train")
    one = train_alignment(str(store.path), key, src, vocab, cfg, out_dir=tmp_path / "one")
    ck1 = read_checkpoint(one)
    for h2, h1 in zip(meta["history"], ck1["history"], strict=True):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
        assert h2["patch_acc"] == pytest.approx(h1["patch_acc"], rel=1e-5)
    for name, w in ck1["module"].items():
        assert torch.allclose(ck["module"][name], w, atol=1e-5), name


def test_ddp_rank0_embedding_failure_stops_every_rank(tmp_path):
    """Under torchrun rank 0 embeds the classes first; when that fails (here an unknown
    template set) every rank exits non-zero with rank 0's one-line message instead of rank 1
    waiting in a collective until its timeout."""
    import os
    import socket
    import subprocess
    import sys

    store, root, _ = _toy(tmp_path, n=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        "align", "--store", str(store.path), "--features", store.feature_sets()[0],
        "--gt-dataset", "custom", "--data-root", str(root), "--split", "train",
        "--arch", "linear", "--epochs", "1", "--text-random-init", "--templates", "nosuchset",
        "--device", "cpu", "--out", str(tmp_path / "ck"), "-q",
    ]  # fmt: skip
    code = "import sys; from ovss_cli.main import cli; cli(sys.argv[1:])"
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 1, (rank, out)
        assert "'nosuchset' is not a known template set" in out, (rank, out)
        assert "Traceback" not in out, (rank, out)
    assert not (tmp_path / "ck" / "last.pt").exists()


def test_setup_distributed_auto_is_cpu_under_torchrun_without_cuda(monkeypatch):
    """`auto` never picks MPS for a multi-rank job (gloo cannot carry MPS tensors); an
    explicit mps device there is refused."""
    import methods.fmbseg as fm

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    inits = []
    monkeypatch.setattr(fm.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(fm.dist, "init_process_group", lambda backend: inits.append(backend))
    monkeypatch.setattr(fm.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(fm.dist, "get_world_size", lambda: 2)
    ctx = fm.setup_distributed("auto")
    assert ctx.device == torch.device("cpu") and (ctx.rank, ctx.world) == (1, 2)
    assert inits == ["gloo"]
    with pytest.raises(OvssError, match="mps"):
        fm.setup_distributed("mps")
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process keeps the usual auto rule
    if getattr(torch.backends, "mps", None) is not None:
        assert fm.setup_distributed("auto").device.type == "mps"
