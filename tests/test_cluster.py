"""Clustering: k-means backends on synthetic clusters, Hungarian matching, Sinkhorn invariants,
per-image masks and the codebook through the store and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featurestore.errors import OvssError
from featurestore.labelsets import LabelSet
from methods.cluster import (
    choose_backend,
    cluster_store,
    hungarian_match,
    kmeans,
    name_clusters,
    sinkhorn_knopp,
)
from methods.metrics import IoUAccumulator
from ovss_cli.main import cli
from tests.test_fmbseg import CLASSES, _toy

torch.set_num_threads(1)


def _blobs(n_per=200, k=5, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 10
    y = np.repeat(np.arange(k), n_per)
    return (centres[y] + rng.normal(size=(len(y), d))).astype(np.float32), y


def _purity(assign: np.ndarray, y: np.ndarray) -> float:
    conf = np.zeros((assign.max() + 1, y.max() + 1), np.int64)
    np.add.at(conf, (assign, y), 1)
    return conf.max(1).sum() / len(y)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_recovers_synthetic_clusters(backend, spherical):
    x, y = _blobs()
    res = kmeans(x, 5, niter=20, spherical=spherical, seed=0, backend=backend, nredo=5)
    assert res.backend == backend and res.points_used == len(x)  # all points (no k*256 cap)
    assert res.centroids.shape == (5, 8) and res.assign.shape == (len(x),)
    assert _purity(res.assign.numpy(), y) == 1.0
    if spherical:
        assert torch.allclose(res.centroids.norm(dim=1), torch.ones(5), atol=1e-4)


def test_kmeans_uses_all_points_beyond_faiss_default_and_max_points():
    x, _ = _blobs(n_per=600, k=2, d=4)  # 1200 > 2 * 256 points
    assert kmeans(x, 2, backend="faiss").points_used == 1200
    assert kmeans(x, 2, backend="torch", max_points=100).points_used == 100


def test_hungarian_match_and_metric():
    conf = np.array([[0, 50, 1], [40, 0, 2], [3, 2, 30], [1, 1, 5]])
    m = hungarian_match(conf)
    assert m.tolist() == [1, 0, 2, 3]  # unmatched 4th cluster -> "no class" (C = 3)
    acc = IoUAccumulator(3)
    gt = np.array([1, 0, 2, 2])
    acc.update(m[np.array([0, 1, 2, 3])], gt)
    assert acc.compute().to_dict()["aAcc"] == pytest.approx(75.0)


def test_sinkhorn_invariants_and_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 6, generator=g, dtype=torch.float64) * 3
    q = sinkhorn_knopp(logits, iters=3)
    assert torch.allclose(q.sum(1), torch.ones(40, dtype=torch.float64))
    assert torch.allclose(q.sum(0), torch.full((6,), 40 / 6, dtype=torch.float64), rtol=0.05)
    # the METHODS.md §5 definition written out (softmax init, not SwAV's exp init)
    r = torch.softmax(logits, dim=1).T
    r = r / r.sum()
    for _ in range(3):
        r = r / r.sum(1, keepdim=True) / 6
        r = r / r.sum(0, keepdim=True) / 40
    assert torch.allclose(q, (r * 40).T)
    exp_init = torch.exp(logits).T / torch.exp(logits).sum()
    for _ in range(3):
        exp_init = exp_init / exp_init.sum(1, keepdim=True) / 6
        exp_init = exp_init / exp_init.sum(0, keepdim=True) / 40
    assert not torch.allclose(q, (exp_init * 40).T)  # differs from SwAV exp-init after 3 it.
    assert torch.allclose(
        sinkhorn_knopp(logits, iters=50).sum(0),
        torch.full((6,), 40 / 6, dtype=torch.float64),
        rtol=1e-6,
    )


def test_name_clusters():
    from methods.base import Vocab

    emb = torch.eye(3, 4)
    vocab = Vocab(
        [["a"], ["b", "bee"], ["c"]],
        torch.cat([emb[:2], emb[1:2], emb[2:]]),
        torch.tensor([0, 1, 1, 2]),
    )
    names = name_clusters(torch.tensor([[0.0, 1, 0, 0], [0.1, 0, 1, 0]]), vocab, topk=1)
    assert names[0][0][0] in ("b", "bee") and names[1][0][0] == "c"


def test_codebook_eval_and_per_image_masks(tmp_path):
    store, root, _ = _toy(tmp_path, n=4)
    key = store.feature_sets()[0]
    s = cluster_store(
        str(store.path), key, 3, write_labels="cb3", eval_dataset=("custom", str(root), "train")
    )
    assert s.points == 4 * 12 and s.extra["points_used"] == 48
    assert s.eval["mIoU"] == pytest.approx(100.0)  # toy features are separable per class
    ls = LabelSet(store, "cb3")
    assert ls.done.all() and ls.group["centroids"].shape == (3, 6)

    r = CliRunner().invoke(
        cli,
        [
            "cluster",
            "--store",
            str(store.path),
            "--features",
            key,
            "--per-image",
            "--k",
            "2",
            "--json",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["label_set"] == f"kmeans2-{key}" and out["images"] == 4
    lab = LabelSet(store, out["label_set"]).read(0)
    assert lab.shape == (24, 32) and set(np.unique(lab)) <= {0, 1}
    # resumable: a rerun has nothing left to do
    r = CliRunner().invoke(
        cli,
        [
            "cluster",
            "--store",
            str(store.path),
            "--features",
            key,
            "--per-image",
            "--k",
            "2",
            "--json",
            "-q",
        ],
    )
    assert json.loads(r.output)["images"] == 0
    assert len(CLASSES) == 3


def test_cli_codebook_named_with_a_vocabulary_on_aligned_features(tmp_path):
    """`ovss cluster` codebook on the aligned (text-space) features of an `ovss align`
    checkpoint, named with `--name-with VOCAB` and scored with Hungarian matching, on the torch
    backend with an explicit --device."""
    from methods.fmbseg import AlignConfig, DatasetLabelSource, train_alignment

    store, root, vocab = _toy(tmp_path, n=4)
    key = store.feature_sets()[0]
    src = DatasetLabelSource(store, "custom", str(root), "train")
    cfg = AlignConfig(arch="mlp", hidden_dim=16, epochs=6, batch_images=2, lr=0.5)
    ck = train_alignment(
        str(store.path), key, src, vocab, cfg, out_dir=tmp_path / "ck", text_model="clip-b16"
    )
    args = [
        "cluster", "--store", str(store.path), "--features", key, "--k", "3",
        "--checkpoint", str(ck), "--name-with", ",".join(CLASSES), "--text-random-init",
        "--eval-dataset", "custom", "--data-root", str(root), "--split", "train",
        "--backend", "torch", "--device", "cpu", "--json", "-q",
    ]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["mode"] == "codebook" and out["backend"] == "torch" and out["extra"]["aligned"]
    assert out["eval"]["mIoU"] == pytest.approx(100.0)
    # every cluster named by its nearest queries; the top names are the matched classes
    assert len(out["names"]) == 3 and all(len(n) == 3 for n in out["names"])
    top = [n[0][0] for n in out["names"]]
    assert top == [CLASSES[c] for c in out["eval"]["cluster_to_class"]]


def test_kmeans_device_argument_and_cli_default():
    x, _ = _blobs(n_per=50, k=3, d=4)
    res = kmeans(x, 3, backend="torch", device="cpu")
    assert res.backend == "torch" and res.centroids.device.type == "cpu"
    # the codebook CLI defaults to --device auto and documents the auto backend rule
    opt = next(p for p in cli.commands["cluster"].params if p.name == "device")
    assert opt.default == "auto"
    r = CliRunner().invoke(cli, ["cluster", "--help"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "faiss-gpu" in text and "auto means torch on the GPU" in text


@pytest.mark.parametrize(
    "backend, device, have, gpus, want",
    [
        ("auto", "cpu", True, 0, "faiss"),  # faiss-cpu on a CPU device
        ("auto", "mps", True, 0, "faiss"),  # not CUDA: FAISS on the CPU
        ("auto", "cuda", True, 0, "torch"),  # CUDA + faiss-cpu: torch on the GPU
        ("auto", "cuda:1", True, 2, "faiss"),  # CUDA + faiss-gpu
        ("auto", "cpu", False, 0, "torch"),  # no FAISS
        ("auto", "cuda:0", False, 0, "torch"),
        ("faiss", "cuda", True, 0, "faiss"),  # explicit names are kept
        ("torch", "cpu", True, 1, "torch"),
    ],
)
def test_choose_backend_rule(backend, device, have, gpus, want):
    assert choose_backend(backend, device, have, gpus) == want


def test_choose_backend_rejects_unknown_names():
    with pytest.raises(OvssError, match="not a k-means backend"):
        choose_backend("sklearn", "cpu", True, 0)
    with pytest.raises(OvssError, match="not a k-means backend"):
        kmeans(np.zeros((4, 2), np.float32), 2, backend="sklearn")


def test_kmeans_auto_backend_probes_faiss(monkeypatch):
    """`kmeans(backend="auto")` feeds the FAISS probe into the rule: FAISS missing -> torch;
    FAISS present (stubbed, no GPUs) on a cpu device -> faiss."""
    import methods.cluster as mc

    x, _ = _blobs(n_per=30, k=3, d=4)

    def missing():
        raise OvssError("no faiss")

    monkeypatch.setattr(mc, "_faiss", missing)
    assert kmeans(x, 3, device="cpu").backend == "torch"
    seen = []
    monkeypatch.setattr(mc, "choose_backend", lambda *a: seen.append(a) or "torch")
    monkeypatch.setattr(mc, "_faiss", lambda: object())
    monkeypatch.setattr(mc, "_faiss_gpus", lambda faiss: 3)
    assert kmeans(x, 3, device="cpu").backend == "torch"
    assert seen == [("auto", "cpu", True, 3)]


def test_cli_name_with_takes_the_checkpoints_text_model_and_templates(monkeypatch, tmp_path):
    """`cluster --checkpoint --name-with` embeds the names in the checkpoint's text space: its
    recorded text model and templates, unless --text-model / --templates are given."""
    import methods.aligned as aligned
    import methods.train as train

    store, _, _ = _toy(tmp_path, n=1)
    ck = tmp_path / "last.pt"
    ck.write_bytes(b"")
    monkeypatch.setattr(
        aligned,
        "checkpoint_provenance",
        lambda p: {"vocabulary": {"text_model": "clip-l14", "templates": "clip7"}},
    )
    seen = []

    def fake_embed(store_path, names, text_model, templates, *rest, **kw):
        seen.append((text_model, templates))
        raise OvssError("stop here")

    monkeypatch.setattr(train, "embed_classes", fake_embed)
    base = [
        "cluster", "--store", str(store.path), "--features", store.feature_sets()[0],
        "--checkpoint", str(ck), "--name-with", "a,b", "-q",
    ]  # fmt: skip
    for extra, want in (
        ([], ("clip-l14", "clip7")),
        (["--templates", "single"], ("clip-l14", "single")),
        (["--text-model", "clip-b16"], ("clip-b16", "clip7")),
    ):
        r = CliRunner().invoke(cli, [*base, *extra])
        assert r.exit_code == 1 and "stop here" in r.output, r.output
        assert seen.pop() == want


def test_cluster_options_come_from_the_kmeans_config_and_bad_values_are_one_line(tmp_path):
    """`ovss cluster`'s k-means options are KMeansConfig's fields (one default, one help); a
    value below 1 is a one-line error naming the option; run_cluster is the one library call
    (the CLI's JSON is its summary)."""
    from methods.cluster import ClusterRequest, KMeansConfig, run_cluster
    from methods.config import config_fields

    opts = {p.name: p for p in cli.commands["cluster"].params}
    for f in config_fields(KMeansConfig):
        assert f"cfg_{f.name}" in opts and f.help
    assert list(opts["cfg_backend"].type.choices) == ["auto", "faiss", "torch"]
    store, _, _ = _toy(tmp_path, n=2)
    key = store.feature_sets()[0]
    base = ["cluster", "--store", str(store.path), "--features", key, "-q"]
    for bad in (["--k", "0"], ["--niter", "0"], ["--max-points", "0"]):
        r = CliRunner().invoke(cli, [*base, *bad])
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert f"option {bad[0][2:].replace('-', '_')} must be at least 1" in r.output
    r = CliRunner().invoke(cli, [*base, "--k", "2", "--niter", "3", "--backend", "torch", "--json"])
    assert r.exit_code == 0, r.output
    want = run_cluster(
        ClusterRequest(
            str(store.path), key, KMeansConfig(k=2, niter=3, backend="torch"), device="cpu"
        )
    ).to_dict()
    got = json.loads(r.output)
    assert got["extra"]["objective"] == pytest.approx(want["extra"]["objective"])
    assert (got["k"], got["backend"], got["points"]) == (2, "torch", want["points"])
    with pytest.raises(OvssError, match="codebook mode"):
        run_cluster(ClusterRequest(str(store.path), key, per_image=True, name_with="a,b"))
