"""Fully connected CRF refinement of per-pixel class scores (PnP-OVSS's last step).

Two backends, one contract: image ``(H, W, 3)`` uint8 + class probabilities ``(C, H, W)`` ->
refined probabilities ``Q`` ``(C, H, W)``; labels are ``argmax Q``.

- ``pydensecrf``: Krähenbühl & Koltun's DenseCRF (permutohedral lattice) through the
  ``pydensecrf2`` package (optional extra ``crf``; it builds from source), called as the
  PnP-OVSS release does (``New_eval_cam_*.py`` ``densecrf``): ``unary_from_softmax``,
  ``addPairwiseGaussian(sxy, compat)``, ``addPairwiseBilateral(sxy, srgb, rgbim, compat)``,
  ``inference(iterations)``.
- ``torch`` [ours]: a local mean-field approximation of the same model in plain torch, for
  machines without the compiled package. Mean-field updates ``Q ∝ exp(-U + w_g m_g + w_b m_b)``
  (Potts compatibility), where ``m_g`` is the Gaussian-weighted (``sxy_g``) average of ``Q``
  around each pixel and ``m_b`` the bilateral-weighted (``sxy_b``, ``srgb``) average. The
  approximation: it runs at a working resolution whose longer side is at most ``max_side``
  pixels (spatial widths scaled with it, colours averaged), the bilateral sum is taken over a
  window of radius ``2 sxy_b`` sampled every ``max(1, round(sxy_b / 5))`` pixels, messages are
  normalised by the sum of their weights (DenseCRF normalises symmetrically), and ``Q`` is
  resized bilinearly back to the image. It agrees with ``pydensecrf`` on most pixels, not
  exactly (see tests/test_crf.py).

``resolve_backend("auto")`` picks ``pydensecrf`` when importable, else ``torch``; callers record
the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.errors import OvssError

BACKENDS = ("auto", "pydensecrf", "torch")


@dataclass(frozen=True)
class CRFParams:
    """DenseCRF parameters (PnP-OVSS adopts CutLER's; the release's ``densecrf``).

    Attributes:
        iterations: mean-field iterations (10).
        gauss_sxy: spatial standard deviation of the smoothness kernel, pixels (3).
        gauss_compat: its Potts weight (7).
        bilateral_sxy: spatial standard deviation of the appearance kernel, pixels (50).
        bilateral_srgb: its colour standard deviation, 0-255 units (5).
        bilateral_compat: its Potts weight (10).
        max_side: torch backend only: longer side of the working resolution [ours: 128].
    """

    iterations: int = 10
    gauss_sxy: float = 3.0
    gauss_compat: float = 7.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    max_side: int = 128


def have_pydensecrf() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(choice: str) -> str:
    """``auto`` -> ``pydensecrf`` when installed, else ``torch``; an explicit ``pydensecrf``
    that is not installed is a one-line error."""
    if choice not in BACKENDS:
        raise OvssError(f"CRF backend must be one of {', '.join(BACKENDS)}, not {choice!r}")
    if choice == "auto":
        return "pydensecrf" if have_pydensecrf() else "torch"
    if choice == "pydensecrf" and not have_pydensecrf():
        raise OvssError(
            "the pydensecrf CRF backend needs the pydensecrf2 package: pip install 'ovss[crf]' "
            "(or choose crf=torch)"
        )
    return choice


def dense_crf_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """DenseCRF through ``pydensecrf``: ``(H, W, 3)`` uint8, ``(C, H, W)`` probabilities ->
    ``(C, H, W)`` float32 marginals."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    d.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.ascontiguousarray(image.astype(np.uint8)),
        compat=params.bilateral_compat,
    )
    q = d.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def _gaussian_taps(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    return torch.exp(-(x**2) / (2 * sigma**2))


def _gauss_sum(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Zero-padded separable Gaussian sum over ``(C, h, w)``."""
    c = x.shape[0]
    r = (len(taps) - 1) // 2
    kx = taps.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = taps.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    y = F.conv2d(x[None], kx, padding=(0, r), groups=c)
    return F.conv2d(y, ky, padding=(r, 0), groups=c)[0]


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., y, x] = x[..., y + dy, x + dx]`` with zeros outside."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, ye = max(0, -dy), min(h, h - dy)
    xs, xe = max(0, -dx), min(w, w - dx)
    if ys < ye and xs < xe:
        out[..., ys:ye, xs:xe] = x[..., ys + dy : ye + dy, xs + dx : xe + dx]
    return out


def dense_crf_torch(image: np.ndarray, probs: torch.Tensor, params: CRFParams) -> torch.Tensor:
    """The local mean-field approximation (module doc): ``(H, W, 3)`` uint8, ``(C, H, W)``
    probabilities -> ``(C, H, W)`` float32 marginals at the image size."""
    probs = torch.as_tensor(probs, dtype=torch.float32)
    c, h0, w0 = probs.shape
    s = min(1.0, params.max_side / max(h0, w0))
    h, w = max(1, round(h0 * s)), max(1, round(w0 * s))
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    if (h, w) != (h0, w0):
        img = F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True)[0]
        p = F.interpolate(probs[None], size=(h, w), mode="bilinear", antialias=True)[0]
    else:
        p = probs
    unary = -torch.log(p.clamp_min(1e-8))

    g_taps = _gaussian_taps(max(params.gauss_sxy * s, 0.3))
    g_norm = _gauss_sum(torch.ones(1, h, w), g_taps)

    sxy = max(params.bilateral_sxy * s, 0.5)
    step = max(1, round(sxy / 5))
    radius = int(math.ceil(2 * sxy / step)) * step
    offsets = [
        (dy, dx)
        for dy in range(-radius, radius + 1, step)
        for dx in range(-radius, radius + 1, step)
    ]
    weights = []
    inside = torch.ones(1, h, w)
    for dy, dx in offsets:
        diff = ((img - _shift(img, dy, dx)) ** 2).sum(0, keepdim=True)
        wgt = torch.exp(
            -(dy * dy + dx * dx) / (2 * sxy * sxy) - diff / (2 * params.bilateral_srgb**2)
        )
        weights.append(wgt * _shift(inside, dy, dx))
    b_norm = torch.stack(weights).sum(0).clamp_min(1e-12)

    q = torch.softmax(-unary, dim=0)
    r = radius
    for _ in range(params.iterations):
        m_g = _gauss_sum(q, g_taps) / g_norm
        m_b = torch.zeros_like(q)
        qpad = F.pad(q, (r, r, r, r))  # zeros outside: out-of-image neighbours weigh 0 anyway
        for (dy, dx), wgt in zip(offsets, weights, strict=True):
            m_b.addcmul_(wgt, qpad[:, r + dy : r + dy + h, r + dx : r + dx + w])
        m_b /= b_norm
        q = torch.softmax(-unary + params.gauss_compat * m_g + params.bilateral_compat * m_b, dim=0)
    if (h, w) != (h0, w0):
        q = F.interpolate(q[None], size=(h0, w0), mode="bilinear", align_corners=False)[0]
    return q


def crf_labels(
    image: np.ndarray, scores: torch.Tensor, params: CRFParams, backend: str
) -> np.ndarray:
    """Labels ``(H, W)`` int64 after the CRF. ``scores`` ``(C, H, W)`` become probabilities by a
    softmax over classes, as the PnP-OVSS release does with its blurred maps; ``backend`` is
    ``pydensecrf`` or ``torch`` (see :func:`resolve_backend`)."""
    probs = torch.softmax(torch.as_tensor(scores, dtype=torch.float32), dim=0)
    if backend == "pydensecrf":
        q = dense_crf_pydensecrf(image, probs.numpy(), params)
        return np.argmax(q, axis=0).astype(np.int64)
    if backend == "torch":
        return dense_crf_torch(image, probs, params).argmax(0).numpy().astype(np.int64)
    raise OvssError(f"unknown CRF backend {backend!r}")
