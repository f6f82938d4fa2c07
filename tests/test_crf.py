"""DenseCRF refinement (methods.crf): the torch fallback on a noisy toy labelling, and against
pydensecrf2 where it is installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurestore.errors import OvssError
from methods import crf
from methods.crf import CRFParams, crf_labels, dense_crf_torch, have_pydensecrf, resolve_backend


def toy(flip: float = 0.3, seed: int = 0):
    """Two colour regions (a disc on a background), a labelling with ``flip`` of its pixels
    wrong, as one-hot scores."""
    rng = np.random.default_rng(seed)
    h, w = 72, 96
    yy, xx = np.mgrid[:h, :w]
    gt = ((yy - 36) ** 2 + (xx - 50) ** 2 < 22**2).astype(np.int64)
    img = np.where(gt[..., None] == 1, [200, 60, 40], [40, 90, 200]).astype(np.float64)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    noisy = gt.copy()
    wrong = rng.random((h, w)) < flip
    noisy[wrong] = 1 - noisy[wrong]
    scores = torch.from_numpy(np.stack([noisy == 0, noisy == 1]).astype(np.float32))
    return img, gt, noisy, scores


def test_torch_fallback_cleans_a_noisy_labelling() -> None:
    img, gt, noisy, scores = toy()
    before = (noisy == gt).mean()
    after = (crf_labels(img, scores, CRFParams(), "torch") == gt).mean()
    assert before < 0.75
    assert after > 0.97


def test_torch_fallback_marginals_are_distributions_at_the_image_size() -> None:
    img, _, _, scores = toy(seed=1)
    q = dense_crf_torch(img, torch.softmax(scores, 0), CRFParams(iterations=2, max_side=48))
    assert q.shape == scores.shape
    torch.testing.assert_close(q.sum(0), torch.ones(q.shape[1:]))


def test_without_pairwise_terms_the_crf_keeps_the_unary_argmax() -> None:
    img, _, noisy, scores = toy(seed=2)
    params = CRFParams(gauss_compat=0.0, bilateral_compat=0.0)
    assert (crf_labels(img, scores, params, "torch") == noisy).all()


@pytest.mark.skipif(not have_pydensecrf(), reason="pydensecrf2 is not installed")
def test_torch_fallback_agrees_with_pydensecrf() -> None:
    img, gt, _, scores = toy(seed=3)
    ref = crf_labels(img, scores, CRFParams(), "pydensecrf")
    ours = crf_labels(img, scores, CRFParams(), "torch")
    assert (ref == gt).mean() > 0.97
    assert (ours == ref).mean() > 0.97


def test_backend_choice_and_its_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crf, "have_pydensecrf", lambda: False)
    assert resolve_backend("auto") == "torch"
    with pytest.raises(OvssError, match=r"pip install 'ovss\[crf\]'"):
        resolve_backend("pydensecrf")
    monkeypatch.setattr(crf, "have_pydensecrf", lambda: True)
    assert resolve_backend("auto") == "pydensecrf"
    with pytest.raises(OvssError, match="must be one of"):
        resolve_backend("grabcut")
