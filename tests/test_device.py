"""Device handling: ``auto`` is the default of every command that runs models, it resolves to the
CPU without CUDA, a ``device=`` argument (a string or a ``torch.device``) is honoured, and the
hot paths give the same results either way. The ``cuda`` tests (skipped here) run the same paths
on a GPU against the CPU: ``OVSS_TEST_CUDA=1 pytest -m cuda tests/test_device.py``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.errors import OvssError
from featurestore.extract import ExtractConfig, extract, resolve_device
from featurestore.images import list_folder_images
from featurestore.protocol import Protocol
from featurestore.store import FeatureStore
from methods.base import ScoringConfig, Vocab, build_config, get_method
from methods.segment import segment_image

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
    "text_cfg": {"layers": 2, "width": 64, "heads": 2},
}
TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}
P_CLIP = Protocol(resize="short", size=64, crop=48, stride=32)
P_PROXY = Protocol(resize="short", size=128, crop=112, stride=56, pad_multiple=56)
#: method -> its settings on the tiny store (the windows of ``P_CLIP`` / ``P_PROXY``); NACLIP
#: with its PAMR refinement on.
METHODS = {
    "maskclip": {"size": 64, "crop": 48, "stride": 32},
    "sclip": {"size": 64, "crop": 48, "stride": 32},
    "naclip": {"size": 64, "crop": 48, "stride": 32, "pamr": "on"},
    "proxyclip": {"size": 128, "crop": 112, "stride": 56},
}

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (OVSS_TEST_CUDA=1 on a GPU machine)"
)


def _field_default(cls: type, name: str) -> object:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _images(root) -> list:
    rng = np.random.default_rng(0)
    root.mkdir()
    for i, (h, w) in enumerate([(60, 90), (112, 70)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"a{i}.png")
    return list_folder_images(root)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    tmp = tmp_path_factory.mktemp("dev")
    recs = _images(tmp / "imgs")
    common = dict(
        store=str(tmp / "s.zarr"), random_init=True, dtype="float32", block_mb=1, device="cpu"
    )
    for model, proto, arch in (
        ("clip-b16", P_CLIP, TINY_CLIP),
        ("clip-b16", P_PROXY, TINY_CLIP),
        ("dino-b8", P_PROXY, TINY_VIT),
    ):
        extract(recs, ExtractConfig(models=[model], protocol=proto, arch_overrides=arch, **common))
    return FeatureStore.open(tmp / "s.zarr")


def _vocab(e: int = 32, q: int = 5, seed: int = 0) -> Vocab:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(q, e, generator=g), dim=-1)
    return Vocab([[f"c{i}"] for i in range(q - 1)], emb, torch.tensor([0, 1, 2, 3, 3]))


def _segmenter(store: FeatureStore, method: str, device):
    cls = get_method(method)
    return cls(store, build_config(cls, None, METHODS[method]), device=device)


# -- the rule and the defaults ---------------------------------------------------------------


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" AUTO ") == torch.device("cpu")
    with pytest.raises(OvssError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_auto_is_the_local_rank_gpu_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)


@pytest.mark.parametrize("given", ["cpu", "CPU", torch.device("cpu")])
def test_a_given_device_is_honoured(given):
    assert resolve_device(given) == torch.device("cpu")


def test_a_bad_device_is_one_line():
    with pytest.raises(OvssError, match="'gpu0' is not a device; use auto, cpu"):
        resolve_device("gpu0")


def test_every_command_that_runs_models_defaults_to_auto():
    from methods.cluster import ClusterRequest
    from methods.evaluate import EvalRequest
    from methods.segment import MethodRequest, SegmentRequest
    from methods.sweep import SweepRequest
    from methods.train import TrainRequest
    from methods.tune import TuneRequest

    for cls in (
        ExtractConfig,
        MethodRequest,
        SegmentRequest,
        EvalRequest,
        SweepRequest,
        ClusterRequest,
        TrainRequest,
        TuneRequest,
    ):
        assert _field_default(cls, "device") == "auto", cls.__name__


# -- device arguments honoured on the CPU ------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_segmenters_take_a_device_string_or_object(store, method):
    vocab, scoring = _vocab(), ScoringConfig()
    a = _segmenter(store, method, "cpu")
    b = _segmenter(store, method, torch.device("cpu"))
    assert a.device == b.device == torch.device("cpu")
    for i in range(store.n_images):
        la, pa, ca = segment_image(a, i, vocab, scoring)
        lb, pb, cb = segment_image(b, i, vocab, scoring)
        assert ca.device.type == "cpu"
        assert isinstance(la, np.ndarray) and la.shape == tuple(store.image_table()["size"][i])
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(pa, pb)
        assert torch.equal(ca, cb)


def test_kmeans_takes_a_device_object():
    from methods.cluster import kmeans

    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 4, backend="torch", device="cpu", seed=3)
    b = kmeans(x, 4, backend="torch", device=torch.device("cpu"), seed=3)
    assert torch.equal(a.assign, b.assign) and torch.equal(a.centroids, b.centroids)
    assert a.assign.device.type == "cpu"


def test_prototype_scores_live_on_the_prototypes_device():
    from methods.prototype import PrototypeIndex

    g = torch.Generator().manual_seed(0)
    protos, x = torch.randn(7, 16, generator=g), torch.randn(50, 16, generator=g)
    index = PrototypeIndex(protos.to(torch.device("cpu")), backend="torch")
    assert index.device == "cpu" and index.scores(x).device.type == "cpu"
    want = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(protos, dim=1).T
    torch.testing.assert_close(index.scores(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["median", "topk"])
def test_dropout_masks_stay_on_the_saliency_device(rule):
    from methods.pnp_ovss import dropout_patches

    u = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.0, 0.7])
    dropped = torch.tensor([False, False, True, False, False, False])
    new = dropout_patches(u, dropped, rule, k=2)
    assert new.device == u.device and new.dtype == torch.bool
    # median of the remaining 0.5, 0.1, 0.3, 0.0, 0.7 is 0.3; the top 2 are 0.7 and 0.5
    want = {"median": [0, 3, 5], "topk": [0, 5]}[rule]
    assert torch.nonzero(new)[:, 0].tolist() == want


# -- the same paths on CUDA, against the CPU ---------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", sorted(METHODS))
def test_segmenters_on_cuda_match_the_cpu(store, method):
    vocab, scoring = _vocab(), ScoringConfig()
    cpu = _segmenter(store, method, "cpu")
    gpu = _segmenter(store, method, "cuda")
    assert next(gpu.block.parameters()).device.type == "cuda"
    agree = total = 0
    for i in range(store.n_images):
        lc, pc, cc = segment_image(cpu, i, vocab, scoring)
        lg, pg, cg = segment_image(gpu, i, vocab, scoring)
        assert isinstance(lg, np.ndarray) and lg.shape == lc.shape
        torch.testing.assert_close(cg.cpu(), cc, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(pg, pc, rtol=1e-3, atol=1e-4)
        agree += int((lg == lc).sum())
        total += lc.size
    assert agree / total >= 0.999  # float32 rounding may flip exact near-ties only


@pytest.mark.cuda
@needs_cuda
def test_extraction_on_cuda_matches_the_cpu(tmp_path):
    recs = _images(tmp_path / "imgs")
    out = {}
    for dev in ("cpu", "cuda"):
        cfg = ExtractConfig(
            models=["clip-b16"],
            protocol=P_CLIP,
            store=str(tmp_path / f"{dev}.zarr"),
            random_init=True,
            dtype="float32",
            device=dev,
            precision="fp32",
            arch_overrides=TINY_CLIP,
        )
        extract(recs, cfg)
        fs = FeatureStore.open(tmp_path / f"{dev}.zarr").require("clip-b16", P_CLIP)
        out[dev] = np.asarray(fs.read(0).tensors["pre_last"])
    np.testing.assert_allclose(out["cuda"], out["cpu"], rtol=1e-3, atol=1e-4)
    # the auto precision (fp16 autocast) runs too
    cfg = dataclasses.replace(cfg, store=str(tmp_path / "fp16.zarr"), precision="auto")
    assert extract(recs, cfg).models[0].images_failed == 0


@pytest.mark.cuda
@needs_cuda
def test_text_embedding_on_cuda_matches_the_cpu():
    from featurestore.text import embed_vocabulary, get_templates, parse_vocab
    from featurestore.text_encoders import create_text_encoder

    vocab, templates = parse_vocab("sky;clouds,tree,a horse"), get_templates("clip7")
    emb = {
        dev: embed_vocabulary(
            create_text_encoder("clip-b16", random_init=True, arch_overrides=TINY_CLIP, device=dev),
            None,
            vocab,
            templates,
        )
        for dev in ("cpu", "cuda")
    }
    np.testing.assert_allclose(emb["cuda"], emb["cpu"], atol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_kmeans_and_prototypes_on_cuda():
    from methods.cluster import kmeans
    from methods.prototype import PrototypeIndex

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 10
    x = (centres[torch.arange(400) % 4] + torch.randn(400, 8, generator=g)).contiguous()
    a = kmeans(x, 4, backend="torch", device="cpu", seed=1)
    b = kmeans(x, 4, backend="torch", device="cuda", seed=1)
    assert b.backend == "torch" and b.assign.device.type == "cpu"
    assert torch.equal(a.assign, b.assign)  # well separated: the same partition
    torch.testing.assert_close(b.centroids, a.centroids, rtol=1e-4, atol=1e-4)
    protos, q = torch.randn(30, 16, generator=g), torch.randn(500, 16, generator=g)
    cpu = PrototypeIndex(protos, backend="torch")
    gpu = PrototypeIndex(protos.cuda())
    assert gpu.backend == "torch" and gpu.device.startswith("cuda")
    s_c, i_c = cpu.search(q, 3)
    s_g, i_g = gpu.search(q.cuda(), 3)
    torch.testing.assert_close(s_g.cpu(), s_c, rtol=1e-4, atol=1e-5)
    assert float((i_g[:, 0].cpu() == i_c[:, 0]).float().mean()) >= 0.99


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("rule", ["median", "topk"])
def test_pnp_dropout_and_labels_on_cuda_match_the_cpu(rule):
    from methods.crf import CRFParams
    from methods.pnp_ovss import dropout_patches, maps_to_labels

    g = torch.Generator().manual_seed(0)
    u, dropped = torch.rand(64, generator=g), torch.rand(64, generator=g) < 0.2
    want = dropout_patches(u, dropped, rule, k=5)
    got = dropout_patches(u.cuda(), dropped.cuda(), rule, k=5)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), want)
    maps = torch.rand(3, 8, 8, generator=g)
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    kw = dict(threshold=0.5, blur_sigma=0.02, crf_backend="none", crf_params=CRFParams())
    lc, mc = maps_to_labels(maps, image, **kw)
    lg, mg = maps_to_labels(maps.cuda(), image, **kw)
    np.testing.assert_array_equal(lg, lc)
    assert torch.equal(mg, mc)
