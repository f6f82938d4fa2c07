"""PrototypeIndex: torch and FAISS backends agree with brute-force cosine search."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

import methods.prototype as prototype_mod
from featurestore.errors import OvssError
from methods.prototype import PrototypeIndex

HAS_FAISS = importlib.util.find_spec("faiss") is not None
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss is not installed (ovss[faiss])")
BACKENDS = ["torch", pytest.param("faiss", marks=needs_faiss)]


def _close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    """allclose with a readable failure (torch.testing.assert_close costs ~1 s to import)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    expected = expected.to(actual.dtype)
    ok = torch.allclose(actual, expected, rtol=rtol, atol=atol)
    assert ok, f"max abs diff {(actual - expected).abs().max().item():.3g}"


def _data(k: int, d: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(k, d, generator=gen) * (1 + torch.rand(k, 1, generator=gen) * 3)
    x = torch.randn(n, d, generator=gen) * (1 + torch.rand(n, 1, generator=gen) * 3)
    return protos, x


def _brute(protos: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos = F.normalize(x.double(), dim=1) @ F.normalize(protos.double(), dim=1).T
    s, i = cos.topk(min(k + 1, protos.shape[0]), dim=1)
    return s, i


def _clear(scores: torch.Tensor, k: int, tol: float = 1e-5) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th best brute-force scores are not (near-)tied."""
    if scores.shape[1] <= k:
        return torch.ones(scores.shape[0], dtype=torch.bool)
    return (scores[:, k - 1] - scores[:, k]) > tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_matches_brute_force(backend: str) -> None:
    protos, x = _data(150, 64, 3000)
    ref_s, ref_i = _brute(protos, x, 1)
    index = PrototypeIndex(protos, backend=backend)
    assert index.backend == backend
    s, i = index.search(x, 1)
    assert s.shape == (3000, 1) and i.shape == (3000, 1) and i.dtype == torch.long
    clear = _clear(ref_s, 1)
    assert clear.float().mean() > 0.99
    assert torch.equal(i[clear, 0].cpu(), ref_i[clear, 0])
    _close(s[:, 0].double().cpu(), ref_s[:, 0], atol=1e-5, rtol=0)
    assert torch.equal(index.argmax(x)[clear].cpu(), ref_i[clear, 0])


@needs_faiss
def test_torch_and_faiss_agree() -> None:
    protos, x = _data(300, 48, 2000, seed=1)
    ref_s, _ = _brute(protos, x, 1)
    clear = _clear(ref_s, 1)
    a = PrototypeIndex(protos, backend="torch").argmax(x)
    b = PrototypeIndex(protos, backend="faiss").argmax(x)
    assert torch.equal(a[clear], b[clear])


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_neighbours_sorted_and_exact(backend: str) -> None:
    protos, x = _data(40, 16, 500, seed=2)
    k = 5
    ref_s, ref_i = _brute(protos, x, k)
    s, i = PrototypeIndex(protos, backend=backend).search(x, k)
    assert s.shape == (500, k)
    assert bool((s[:, :-1] >= s[:, 1:] - 1e-6).all())  # best first
    clear = _clear(ref_s, k)
    got = torch.sort(i[clear], dim=1).values
    want = torch.sort(ref_i[clear, :k], dim=1).values
    assert torch.equal(got, want)
    _close(s.double(), ref_s[:, :k], atol=1e-5, rtol=0)


def test_normalisation() -> None:
    protos, x = _data(20, 8, 100, seed=3)
    index = PrototypeIndex(protos, backend="torch")
    # Cosines: invariant to positive rescaling of queries, bounded by 1.
    s1, i1 = index.search(x, 3)
    s2, i2 = index.search(x * 7.5, 3)
    assert torch.equal(i1, i2)
    _close(s1, s2)
    assert bool((s1.abs() <= 1 + 1e-6).all())
    _close(index.prototypes.norm(dim=1), torch.ones(20))
    # Dense scores are the full cosine matrix.
    _close(index.scores(x), F.normalize(x, dim=1) @ F.normalize(protos, dim=1).T)
    # normalize=False: raw inner products, so long prototypes win.
    raw = PrototypeIndex(protos, backend="torch", normalize=False)
    _close(raw.scores(x), x @ protos.T)
    assert torch.equal(raw.argmax(x), (x @ protos.T).argmax(1))


@needs_faiss
def test_faiss_without_normalisation_is_raw_inner_product() -> None:
    protos, x = _data(20, 8, 100, seed=3)
    raw_faiss = PrototypeIndex(protos, backend="faiss", normalize=False)
    s, i = raw_faiss.search(x, 1)
    _close(s[:, 0], (x @ protos.T).max(1).values, rtol=1e-5, atol=1e-5)
    assert torch.equal(i[:, 0], (x @ protos.T).argmax(1))


def test_zero_vectors_score_zero() -> None:
    protos = torch.eye(4)
    x = torch.zeros(3, 4)
    s, _ = PrototypeIndex(protos, backend="torch").search(x, 1)
    assert bool((s == 0).all())


@pytest.mark.parametrize("chunk", [1, 7, 150 * 7 + 3])
def test_torch_chunk_boundaries(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    protos, x = _data(150, 32, 1001, seed=4)
    full_s, full_i = PrototypeIndex(protos, backend="torch").search(x, 3)
    monkeypatch.setattr(prototype_mod, "_CHUNK_SCORES", chunk)
    s, i = PrototypeIndex(protos, backend="torch").search(x, 3)
    assert torch.equal(i, full_i)
    _close(s, full_s, rtol=0, atol=1e-6)
    s1, i1 = PrototypeIndex(protos, backend="torch").search(x, 1)
    assert torch.equal(i1[:, 0], full_i[:, 0])


def test_bf16_rescoring_is_exact_on_separated_data(monkeypatch: pytest.MonkeyPatch) -> None:
    protos, x = _data(200, 64, 800, seed=5)
    monkeypatch.setattr(prototype_mod, "_CHUNK_SCORES", 5000)  # several chunks
    ref_s, ref_i = _brute(protos, x, 2)
    index = PrototypeIndex(protos, backend="torch", bf16=True)
    assert index.backend == "torch"
    s, i = index.search(x, 2)
    clear = _clear(ref_s, 2, tol=1e-3)
    assert torch.equal(torch.sort(i[clear], 1).values, torch.sort(ref_i[clear, :2], 1).values)
    _close(s.double(), ref_s[:, :2], atol=1e-5, rtol=0)


@needs_faiss
def test_auto_choice() -> None:
    small = PrototypeIndex(torch.randn(150, 512))
    assert small.backend == "torch" and "K*D" in small.reason
    large = PrototypeIndex(torch.randn(1024, 512))
    assert large.backend == "faiss" and large.device in ("faiss-cpu", "faiss-gpu")
    assert "faiss" in repr(large)
    assert PrototypeIndex(torch.randn(1024, 512), bf16=True).backend == "torch"


def test_missing_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(OvssError, match=r"install ovss\[faiss\]"):
        PrototypeIndex(torch.randn(10, 4), backend="faiss")
    with pytest.raises(OvssError, match=r"install ovss\[faiss\]"):
        PrototypeIndex(torch.randn(10, 4), backend="faiss-ivf")
    auto = PrototypeIndex(torch.randn(1024, 512))
    assert auto.backend == "torch" and "not installed" in auto.reason


@needs_faiss
def test_ivf_recall_report() -> None:
    protos, x = _data(400, 32, 600, seed=6)
    exhaustive = PrototypeIndex(protos, backend="faiss-ivf", nlist=10, nprobe=10)
    ref_s, _ = _brute(protos, x, 1)
    report = exhaustive.recall_report(x[_clear(ref_s, 1)])
    assert report["backend"] == "faiss-ivf" and report["nlist"] == 10 and report["nprobe"] == 10
    assert report["recall_at_k"] == 1.0 and report["top1_agreement"] == 1.0
    assert report["mean_top1_score_loss"] < 1e-5
    approx = PrototypeIndex(protos, backend="faiss-ivf", nlist=20, nprobe=1)
    rep1 = approx.recall_report(x, k=1)
    rep5 = approx.recall_report(x, k=5)
    assert 0.0 < rep1["recall_at_k"] < 1.0  # one list of 20 on random data misses some
    assert rep5["recall_at_k"] >= rep1["recall_at_k"]
    exact = PrototypeIndex(protos, backend="torch").recall_report(x)
    assert exact["recall_at_k"] == 1.0 and exact["nlist"] is None


def test_bad_arguments() -> None:
    protos = torch.randn(10, 4)
    with pytest.raises(OvssError, match="not a prototype backend"):
        PrototypeIndex(protos, backend="annoy")
    with pytest.raises(OvssError, match=r"\(K, D\)"):
        PrototypeIndex(protos[0])
    with pytest.raises(OvssError, match="bf16"):
        PrototypeIndex(protos, backend="faiss", bf16=True)
    with pytest.raises(OvssError, match="nlist"):
        PrototypeIndex(protos, backend="faiss-ivf", nlist=11)
    index = PrototypeIndex(protos, backend="torch")
    with pytest.raises(OvssError, match="k must"):
        index.search(torch.randn(3, 4), k=11)
    with pytest.raises(OvssError, match=r"\(N, 4\)"):
        index.search(torch.randn(3, 5))
