"""Dense logits -> label maps: the sliding-window merge and the SCLIP-lineage post-processing.

``spec/EVAL.md`` §2.2/§4.1 and ``spec/METHODS.md`` §0.2/§0.3. The reference computation is::

    up    = bilinear(cos, out_hw, align_corners=False)        # (Q, H, W), float32
    probs = softmax(logit_scale * up, over ALL queries)        # every synonym of every class
    cls   = max over each class's queries of probs             # (C, H, W)
    [area_thd: classes >= 1 with <= area_thd of the foreground pixels get cls = 0]   (SCLIP VOC21)
    label = argmax_c cls ; label[max_c cls < prob_thd] = 0

``score_logits_reference`` does exactly that. ``score_logits`` / ``score_labels`` give the same
labels much faster on CPU without materialising the softmax, nor (with the C kernel) the
upsampled logits. Two paths compute the same decisions:

- the C kernel (``methods/native/scoring_kernel.c``, compiled on first use; ``kernel_status()``
  says whether it runs here): the separable bilinear upsampling, value for value
  ``F.interpolate``'s, fused with the per-pixel best query, best-two gap and softmax
  denominator, a band of output rows at a time so the source rows stay in cache, never storing
  the ``(Q, H, W)`` logits. Before trusting it for a pair of sizes, a random probe of those sizes
  is upsampled both ways and must agree to the last bit (PyTorch's generic CPU kernel, which
  runs for outputs with ``H + W > 128`` on AVX2/AVX-512 builds, does; for smaller outputs
  PyTorch rounds differently and the torch path runs). 150 classes at 683 x 512 on 2 cores:
  ~15 ms on a quiet machine (1.4x the time to write and read those logits once), ~15x the
  torch path;
- the torch path (no compiler, ``OVSS_NATIVE=0``, sizes the probe refuses): the upsampled
  logits come from the same ``F.interpolate`` call as the reference's (so they are bitwise its
  values) and are reduced in cache-sized blocks of rows on ``torch.get_num_threads()`` worker
  threads with one torch thread each [ours] (no per-op barrier between cores).

On both:

- the label of a pixel is the class of its best query (softmax is monotone), read from the
  logits; the max probability is ``1 / sum_q exp(s_q - s_max)``;
- every pixel whose decision could depend on float32 rounding (best two scaled logits within
  ``4e-6`` of each other, or max probability within 1e-4 (relative) of ``prob_thd``), and every
  pixel whose class ``area_thd`` removes, is recomputed with the reference formula on its column
  of upsampled logits (the kernel gives those columns bitwise).

So the labels equal the reference's except where the reference itself is a float32 coin flip
(two probabilities equal to the last bit, whose order then depends on memory layout). Extra
memory: ``2 * 4 * Q * W`` bytes per thread with the kernel (two width-resized source rows),
``4 * Q * H * W`` on the torch path (the reference needs three such tensors).

``merge_window_logits`` runs on the same kernel where it can: each window is upsampled and added
to the canvas row by row, the same float32 additions in the same order as the torch loop, so
the canvas is bitwise the same without a ``(Q, box)`` temporary per window.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.errors import OvssError

__all__ = [
    "merge_window_logits",
    "score_labels",
    "score_logits",
    "score_logits_reference",
    "upsample_bilinear",
]

# Two best scaled logits closer than this (absolute, in logit_scale * cos units) are re-decided by
# the reference formula. Any pair further apart keeps its order through exp() and the softmax
# division (the gap is >= 60 ulps of 1.0), whatever the exp implementation.
_TIE_TOL = 4e-6
# Max probabilities within this relative distance of prob_thd are recomputed exactly.
_PROB_RTOL = 1e-4
# Pixel blocks hold about this many logits (Q * pixels): 16 MB, L3-resident, few sync points.
_BLOCK_ELEMS = 1 << 22


def upsample_bilinear(x: torch.Tensor, out_hw: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of the last two dims, ``align_corners=False`` (mmseg's ``resize``).

    Args:
        x: ``(..., h, w)`` tensor with at least 2 dims, e.g. ``(Q, h, w)`` logits.
        out_hw: ``(H, W)`` target size.

    Returns:
        ``(..., H, W)`` tensor of ``x``'s dtype; each leading channel is resized independently
        (bitwise the same as ``F.interpolate(x[None], size, mode="bilinear")``).
    """
    if x.dim() < 2:
        raise OvssError(f"upsample_bilinear needs a (..., h, w) tensor, got shape {tuple(x.shape)}")
    out_h, out_w = _hw(out_hw)
    lead = x.shape[:-2]
    y = F.interpolate(
        x.reshape(1, -1, *x.shape[-2:]), size=(out_h, out_w), mode="bilinear", align_corners=False
    )
    return y.reshape(*lead, out_h, out_w)


def _hw(out_hw: Sequence[int]) -> tuple[int, int]:
    """Validate an ``(H, W)`` pair of positive ints."""
    if len(out_hw) != 2:
        raise OvssError(f"a size must be (H, W), got {tuple(out_hw)}")
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    if out_h < 1 or out_w < 1:
        raise OvssError(f"a size must be positive, got {(out_h, out_w)}")
    return out_h, out_w


def merge_window_logits(
    window_logits: Sequence[torch.Tensor],
    boxes: np.ndarray | torch.Tensor | Sequence[Sequence[int]],
    canvas_hw: Sequence[int],
) -> torch.Tensor:
    """Average per-window logits on a canvas (mmseg ``slide`` inference, EVAL.md §4.1 rule 4).

    Each window's logits are bilinearly resized (``align_corners=False``) to its box size, summed
    on a zero canvas in window order, and the sum is divided by how many windows cover each pixel.
    The result is bitwise what mmseg's ``forward_slide`` computes.

    Args:
        window_logits: ``n`` tensors ``(Q, h_i, w_i)`` (e.g. cosine logits on each window's patch
            grid); all with the same ``Q``.
        boxes: ``(n, 4)`` window boxes ``(y1, x1, y2, x2)`` in canvas pixels (as
            ``featurestore.protocol.Protocol.windows`` returns them).
        canvas_hw: ``(H, W)`` canvas size (the resized image).

    Returns:
        ``(Q, H, W)`` float32 averaged logits.

    Raises:
        OvssError: inconsistent shapes, a box outside the canvas, or a canvas pixel that no
            window covers.
    """
    out_h, out_w = _hw(canvas_hw)
    box_arr = np.asarray(
        boxes.cpu().numpy() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.int64
    )
    if box_arr.ndim != 2 or box_arr.shape[1] != 4 or len(box_arr) != len(window_logits):
        raise OvssError(
            f"need one (y1, x1, y2, x2) box per window: {len(window_logits)} windows, "
            f"boxes of shape {box_arr.shape}"
        )
    if len(window_logits) == 0:
        raise OvssError("no windows to merge")
    q = window_logits[0].shape[0]
    for logits, (y1, x1, y2, x2) in zip(window_logits, box_arr, strict=True):
        if logits.dim() != 3 or logits.shape[0] != q:
            raise OvssError(
                f"window logits must be (Q={q}, h, w) tensors, got {tuple(logits.shape)}"
            )
        if not (0 <= y1 < y2 <= out_h and 0 <= x1 < x2 <= out_w):
            raise OvssError(
                f"window box {(y1, x1, y2, x2)} is not inside the canvas {(out_h, out_w)}"
            )
    count = torch.zeros(out_h, out_w, dtype=torch.float32)
    for y1, x1, y2, x2 in box_arr:
        count[y1:y2, x1:x2] += 1
    if bool((count == 0).any()):
        raise OvssError("the windows do not cover the whole canvas (mmseg requires full coverage)")

    device = window_logits[0].device
    canvas = _merge_native(window_logits, box_arr, (out_h, out_w)) if device.type == "cpu" else None
    if canvas is None:
        canvas = torch.zeros(q, out_h, out_w, dtype=torch.float32, device=device)
        for logits, (y1, x1, y2, x2) in zip(window_logits, box_arr, strict=True):
            size = (int(y2 - y1), int(x2 - x1))
            canvas[:, y1:y2, x1:x2] += upsample_bilinear(logits.float(), size)
    return canvas.div_(count.to(device))  # in place: bitwise ``canvas / count``


def _merge_native(
    window_logits: Sequence[torch.Tensor], boxes: np.ndarray, canvas_hw: tuple[int, int]
) -> torch.Tensor | None:
    """The ``(Q, H, W)`` sum ``canvas[:, y1:y2, x1:x2] += upsample_bilinear(window, box size)``
    over the windows in order, from the C kernel (one query plane at a time, no ``(Q, box)``
    temporaries), bitwise the torch loop's sums; ``None`` when the kernel does not run here or
    its probe refuses one of the window sizes (the caller then runs the torch loop)."""
    lib = _kernel()
    if lib is None:
        return None
    wins = [w.float().contiguous() for w in window_logits]
    sizes = [
        (w.shape[1], w.shape[2], int(y2 - y1), int(x2 - x1))
        for w, (y1, x1, y2, x2) in zip(wins, boxes, strict=True)
    ]
    if not all(_kernel_matches(lib, wins[0].shape[0], *key) for key in set(sizes)):
        return None
    q, (out_h, out_w) = wins[0].shape[0], canvas_hw
    tables = [_axis_tables(lib, h, bh) + _axis_tables(lib, w, bw) for h, w, bh, bw in sizes]
    dims = torch.tensor(
        [[*size, int(y1), int(x1)] for size, (y1, x1, _, _) in zip(sizes, boxes, strict=True)],
        dtype=torch.int64,
    )
    n = len(wins)
    win_ptrs = (ctypes.c_void_p * n)(*(w.data_ptr() for w in wins))
    table_ptrs = (ctypes.c_void_p * (8 * n))(*(t.data_ptr() for ts in tables for t in ts))
    canvas = torch.empty(q, out_h, out_w)
    workers = max(1, min(torch.get_num_threads(), q))
    bounds = [q * i // (2 * workers) for i in range(2 * workers + 1)]
    failed = []

    def part(a: int, b: int) -> None:
        rc = lib.ovss_merge_windows(
            n, win_ptrs, _ptr(dims), table_ptrs, _ptr(canvas), out_h, out_w, a, b
        )
        if rc != 0:
            failed.append(rc)

    tasks = [(part, (a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    _in_parallel(tasks, workers)
    if failed:
        raise MemoryError("the scoring kernel could not allocate its scratch buffer")
    return canvas


def _check_scoring_inputs(
    cos: torch.Tensor,
    out_hw: Sequence[int],
    query_to_class: torch.Tensor | Sequence[int],
    num_classes: int,
) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
    """Validate and normalise the arguments shared by the scoring functions."""
    if cos.dim() != 3:
        raise OvssError(f"logits must be (Q, h, w), got shape {tuple(cos.shape)}")
    q2c = torch.as_tensor(query_to_class, dtype=torch.long, device=cos.device).reshape(-1)
    if q2c.numel() != cos.shape[0]:
        raise OvssError(
            f"query_to_class has {q2c.numel()} entries but the logits have {cos.shape[0]} queries"
        )
    num_classes = int(num_classes)
    if num_classes < 1 or q2c.numel() == 0:
        raise OvssError("need at least one class and one query")
    if int(q2c.min()) < 0 or int(q2c.max()) >= num_classes:
        raise OvssError(f"query_to_class values must lie in [0, {num_classes - 1}]")
    return cos.float(), _hw(out_hw), q2c


def _is_identity(q2c: torch.Tensor, num_classes: int) -> bool:
    """True when query q is class q for every class (no synonyms: the merge step is skipped)."""
    return q2c.numel() == num_classes and bool(
        torch.equal(q2c, torch.arange(num_classes, device=q2c.device))
    )


def _class_max(probs: torch.Tensor, q2c: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(Q, ...)`` query probabilities -> ``(C, ...)``: max over each class's queries (0 if none).

    Same values as the reference's ``(probs * one_hot(query_idx).T[..., None, None]).max(1)``:
    the max is exact and the one-hot zeros never win since ``probs >= 0``.
    """
    if _is_identity(q2c, num_classes):
        return probs
    out = torch.zeros((num_classes, *probs.shape[1:]), dtype=probs.dtype, device=probs.device)
    index = q2c.view(-1, *([1] * (probs.dim() - 1))).expand_as(probs)
    return out.scatter_reduce_(0, index, probs, reduce="amax", include_self=True)


def _area_keep(labels: torch.Tensor, num_classes: int, area_thd: float) -> torch.Tensor:
    """SCLIP's ``area_thd`` rule: ``(C,)`` bool, False for classes >= 1 to be zeroed.

    A foreground class survives when its predicted area is ``> area_thd *`` (total foreground
    predicted area), computed in float32 as the reference does.
    """
    counts = torch.bincount(labels.reshape(-1), minlength=num_classes)[:num_classes]
    area = counts[1:].to(torch.float32)
    keep_fg = area > area_thd * area.sum()
    return torch.cat([torch.ones(1, dtype=torch.bool, device=labels.device), keep_fg])


def _postprocess_columns(
    logits: torch.Tensor,
    q2c: torch.Tensor,
    num_classes: int,
    logit_scale: float,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference post-processing of ``(Q, ...)`` upsampled logits, without ``prob_thd``.

    Returns ``(labels, max_prob)`` of shape ``logits.shape[1:]``; ``keep`` (``(C,)`` bool) zeroes
    the probabilities of the classes it marks False (the ``area_thd`` step).
    """
    probs = (logits * logit_scale).softmax(0)
    cls = _class_max(probs, q2c, num_classes)
    if keep is not None:
        cls[1:] *= keep[1:].to(cls.dtype).view(-1, *([1] * (cls.dim() - 1)))
    return cls.argmax(0), cls.max(0).values


def score_logits_reference(
    cos: torch.Tensor,
    out_hw: Sequence[int],
    query_to_class: torch.Tensor | Sequence[int],
    num_classes: int,
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain float32 post-processing of SCLIP/NACLIP/ProxyCLIP/Trident (EVAL.md §2.2).

    Materialises the ``(Q, H, W)`` upsampled logits and their softmax. Use ``score_logits``
    (same labels, much faster on CPU); this one is the definition it is tested against.

    Args:
        cos: ``(Q, h, w)`` cosine logits (e.g. the merged canvas at the resized image size).
        out_hw: ``(H, W)``, the original image size.
        query_to_class: ``(Q,)`` class id of each query (synonyms share a class).
        num_classes: ``C``; classes without a query get probability 0.
        logit_scale: multiplies the logits before the softmax (default 40).
        prob_thd: pixels whose max class probability is below it become class 0 (default 0).
        area_thd: SCLIP's area rule (default ``None``: off).

    Returns:
        ``(labels, max_prob)``: ``(H, W)`` int64 class ids and ``(H, W)`` float32 probability of
        the chosen class (after the area rule, before the threshold sets labels to 0).
    """
    cos, out_hw, q2c = _check_scoring_inputs(cos, out_hw, query_to_class, num_classes)
    up = upsample_bilinear(cos, out_hw)
    probs = (up * logit_scale).softmax(0)
    cls = _class_max(probs, q2c, num_classes)
    if area_thd is not None:
        keep = _area_keep(cls.argmax(0), num_classes, area_thd)
        cls[1:] *= keep[1:].to(cls.dtype)[:, None, None]
    labels = cls.argmax(0)
    max_prob = cls.max(0).values
    labels[max_prob < prob_thd] = 0
    return labels, max_prob


def _score_block(
    block: torch.Tensor,
    logit_scale: float,
    prob_thd: float,
    need_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fast decisions for a ``(Q, n)`` block of upsampled logits.

    Returns ``(best_query, max_prob, unsure)``, each ``(n,)``: the best query, the max
    probability (``None`` unless ``need_prob``) and the pixels whose decision float32 rounding
    could change, to be recomputed with the reference formula. The block's values are restored
    before returning (it is a view of the caller's tensor).
    """
    best, best_q = block.max(0)
    s_best = best * logit_scale
    max_prob = None
    if need_prob:
        # sum_q exp(s_q - s_max) is the softmax denominator; the max probability is 1 / it.
        shifted = torch.mul(block, logit_scale).sub_(s_best)
        max_prob = shifted.exp_().sum(0).reciprocal_()
    if block.shape[0] > 1:
        # Second best logit: hide the best, take the max, put the best back (bitwise restore).
        block.scatter_(0, best_q[None], float("-inf"))
        second = block.amax(0)
        block.scatter_(0, best_q[None], best[None])
        unsure = (s_best - second * logit_scale) < _TIE_TOL
    else:
        unsure = torch.zeros_like(best, dtype=torch.bool)
    if prob_thd > 0 and max_prob is not None:
        unsure |= (max_prob - prob_thd).abs() <= _PROB_RTOL * prob_thd
    return best_q, max_prob, unsure


def _score(
    cos: torch.Tensor,
    out_hw: Sequence[int],
    query_to_class: torch.Tensor | Sequence[int],
    num_classes: int,
    logit_scale: float,
    prob_thd: float,
    area_thd: float | None,
    want_prob: bool,
    block_elems: int,
    workers: int | None = None,
    native: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared body of ``score_logits`` and ``score_labels``; ``workers``: threads (one torch
    thread each; default ``torch.get_num_threads()``), which do not change the labels;
    ``native=False`` skips the C kernel (the torch path; same labels)."""
    if cos.device.type != "cpu":
        return score_logits_reference(
            cos, out_hw, query_to_class, num_classes, logit_scale, prob_thd, area_thd
        )
    cos, hw, q2c = _check_scoring_inputs(cos, out_hw, query_to_class, num_classes)
    need_prob = want_prob or prob_thd > 0 or area_thd is not None
    q = cos.shape[0]
    workers = max(1, min(torch.get_num_threads(), q)) if workers is None else max(1, workers)
    fused = _KernelUpsampler.create(cos, hw, workers) if native else None
    if fused is not None:
        best_query, max_prob, unsure = fused.decide(logit_scale, prob_thd, need_prob)
        values = fused.pixels
    else:
        best_query, max_prob, unsure, values = _torch_decide(
            cos, hw, logit_scale, prob_thd, need_prob, block_elems, workers
        )
    labels = best_query if _is_identity(q2c, num_classes) else q2c[best_query]
    # One reference call for every unsure pixel of the image (few; tiny ops are costly).
    _redo(values, unsure.nonzero()[:, 0], labels, max_prob, q2c, num_classes, logit_scale, None)
    if area_thd is not None:
        keep = _area_keep(labels, num_classes, area_thd)
        if not bool(keep.all()):
            # Pixels whose class is zeroed fall to their best surviving class.
            hit = (~keep[labels]).nonzero()[:, 0]
            _redo(values, hit, labels, max_prob, q2c, num_classes, logit_scale, keep)
    if prob_thd > 0 and max_prob is not None:
        labels[max_prob < prob_thd] = 0
    prob_img = max_prob.view(hw) if want_prob and max_prob is not None else None
    return labels.view(hw), prob_img


def _torch_decide(
    cos: torch.Tensor,
    hw: tuple[int, int],
    logit_scale: float,
    prob_thd: float,
    need_prob: bool,
    block_elems: int,
    workers: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The decisions of every pixel from ``F.interpolate``'s upsampled logits, in blocks of rows
    on ``workers`` threads: ``(best_query, max_prob, unsure, values)``, ``values(idx)`` giving
    the ``(Q, n)`` upsampled logits of pixels ``idx``."""
    q, (out_h, out_w) = cos.shape[0], hw
    # (Q, H*W) view of the upsampled logits: bitwise the reference's values (one resize call).
    flat = upsample_bilinear(cos, hw).view(q, out_h * out_w)
    best_query = torch.empty(out_h * out_w, dtype=torch.long)
    max_prob = torch.empty(out_h * out_w, dtype=torch.float32) if need_prob else None
    unsure = torch.empty(out_h * out_w, dtype=torch.bool)
    step = max(1, int(block_elems) // (q * out_w)) * out_w  # whole rows, ~block_elems logits

    def block(start: int) -> None:
        stop = min(start + step, out_h * out_w)
        b_query, b_prob, b_unsure = _score_block(
            flat[:, start:stop], logit_scale, prob_thd, need_prob
        )
        best_query[start:stop] = b_query
        unsure[start:stop] = b_unsure
        if max_prob is not None and b_prob is not None:
            max_prob[start:stop] = b_prob

    _in_parallel([(block, (start,)) for start in range(0, out_h * out_w, step)], workers)
    return best_query, max_prob, unsure, lambda idx: flat[:, idx]


class _KernelUpsampler:
    """The C kernel's (``methods/native/scoring_kernel.c``) upsampling of one ``(Q, h, w)``
    input to ``(H, W)``, fused with the per-pixel decisions.

    Its values are bitwise ``F.interpolate``'s: ``create`` checks that on a random probe of the
    same sizes (cached per sizes) and returns ``None`` when they differ, when the kernel cannot
    be built, or for inputs it does not take; the torch path then runs.
    """

    def __init__(self, lib, cos: torch.Tensor, hw: tuple[int, int], workers: int) -> None:
        self.lib, self.workers = lib, workers
        self.q, self.h, self.w = cos.shape
        self.out_h, self.out_w = hw
        self.cos = cos.contiguous()
        self.tables = _axis_tables(lib, self.h, self.out_h) + _axis_tables(lib, self.w, self.out_w)

    @classmethod
    def create(
        cls, cos: torch.Tensor, hw: tuple[int, int], workers: int
    ) -> _KernelUpsampler | None:
        lib = _kernel()
        if lib is None or cos.dtype != torch.float32 or max(cos.shape[0], *hw) >= 2**31:
            return None
        ok = _kernel_matches(lib, cos.shape[0], cos.shape[1], cos.shape[2], hw[0], hw[1])
        return cls(lib, cos, hw, workers) if ok else None

    def _run(self, n: int, fn: Callable[[int, int], object]) -> None:
        """``fn(start, stop)`` over ``[0, n)`` in about 4 chunks per worker (the GIL is released
        inside the kernel)."""
        chunks = max(1, min(n, 4 * self.workers if self.workers > 1 else 1))
        bounds = [n * i // chunks for i in range(chunks + 1)]
        tasks = [(fn, (a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        _in_parallel(tasks, self.workers)

    def _head(self) -> tuple:
        """The leading kernel arguments: logits, Q, h, w."""
        return (_ptr(self.cos), self.q, self.h, self.w)

    def _tables(self) -> tuple:
        return tuple(_ptr(t) for t in self.tables)

    def upsampled(self) -> torch.Tensor:
        """All ``(Q, H, W)`` upsampled values (the probe check; the scoring never builds them)."""
        out = torch.empty(self.q, self.out_h, self.out_w)
        rc = self.lib.ovss_height_pass(
            *self._head(), self.out_h, self.out_w, *self._tables(), 0, self.out_h, _ptr(out)
        )
        if rc != 0:
            raise MemoryError("the scoring kernel could not allocate its scratch buffer")
        return out

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """``(Q, n)`` upsampled values of flat pixel indices ``idx`` (``y * W + x``)."""
        idx = idx.to(torch.int64).contiguous()
        out = torch.empty(self.q, idx.numel())
        if idx.numel():
            self.lib.ovss_pixels(
                *self._head(), self.out_w, *self._tables(), _ptr(idx), idx.numel(), _ptr(out)
            )
        return out

    def decide(
        self, logit_scale: float, prob_thd: float, need_prob: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(best_query, max_prob, unsure)`` of every pixel, as ``_torch_decide``."""
        n = self.out_h * self.out_w
        best_query = torch.empty(n, dtype=torch.int64)
        max_prob = torch.empty(n) if need_prob else torch.empty(1)
        unsure = torch.empty(n, dtype=torch.uint8)
        failed = []

        def rows(a: int, b: int) -> None:
            rc = self.lib.ovss_score_rows(
                *self._head(),
                self.out_w,
                *self._tables(),
                a,
                b,
                ctypes.c_float(logit_scale),
                int(need_prob),
                ctypes.c_float(_TIE_TOL),
                ctypes.c_float(prob_thd if need_prob else 0.0),
                ctypes.c_float(_PROB_RTOL),
                _ptr(best_query),
                _ptr(max_prob),
                _ptr(unsure),
            )
            if rc != 0:
                failed.append(rc)

        self._run(self.out_h, rows)
        if failed:
            raise MemoryError("the scoring kernel could not allocate its scratch buffer")
        return best_query, max_prob if need_prob else None, unsure.view(torch.bool)


def _axis_tables(lib, n_in: int, n_out: int) -> tuple[torch.Tensor, ...]:
    """``(i0, i1, w0, w1)`` of one axis resized from ``n_in`` to ``n_out`` (the kernel's)."""
    i0, i1 = torch.empty(n_out, dtype=torch.int32), torch.empty(n_out, dtype=torch.int32)
    w0, w1 = torch.empty(n_out), torch.empty(n_out)
    lib.ovss_axis(n_in, n_out, _ptr(i0), _ptr(i1), _ptr(w0), _ptr(w1))
    return i0, i1, w0, w1


_verified: dict[tuple[int, ...], bool] = {}
#: Outputs up to this many pixels are probed whole; larger ones axis by axis.
_WHOLE_PROBE_PIXELS = 1 << 16


def _kernel_matches(lib, q: int, h: int, w: int, out_h: int, out_w: int) -> bool:
    """Whether the kernel's upsampling of ``q`` channels of ``(h, w)`` to ``(out_h, out_w)`` is
    bitwise ``upsample_bilinear``'s here, checked on random probes (cached per sizes).

    PyTorch picks its CPU kernel by the sizes, the channel count and the thread count (e.g. its
    channels-last kernel for 3 channels on one thread), so a probe has the call's channel count
    (up to 4; beyond that the choice no longer depends on it) and runs under the caller's thread
    count. Small outputs are probed whole. Larger ones (``H * W > 2**16``, so ``H + W > 128``:
    the generic separable kernel) one axis at a time, ``(h, 1) -> (H, 128)`` and
    ``(1, w) -> (128, W)``: the same index, weight and rounding steps as the whole resize, in
    ``128 * (H + W)`` pixels instead of ``H * W`` (each image size of a dataset is new).
    """
    c = min(int(q), 4)
    if out_h * out_w <= _WHOLE_PROBE_PIXELS:
        return _probe(lib, c, h, w, out_h, out_w)
    return _probe(lib, c, h, 1, out_h, 128) and _probe(lib, c, 1, w, 128, out_w)


def _probe(lib, c: int, h: int, w: int, out_h: int, out_w: int) -> bool:
    key = (c, int(h), int(w), int(out_h), int(out_w), torch.get_num_threads() == 1)
    ok = _verified.get(key)
    if ok is None:
        probe = torch.rand(c, h, w, generator=torch.Generator().manual_seed(0))
        ours = _KernelUpsampler(lib, probe, (out_h, out_w), 1).upsampled()
        ok = torch.equal(ours, upsample_bilinear(probe, (out_h, out_w)))
        if len(_verified) > 4096:
            _verified.clear()
        _verified[key] = ok
    return ok


def _column_values(
    cos: torch.Tensor, hw: tuple[int, int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``values(idx)``: the ``(Q, n)`` upsampled logits of flat pixels ``idx``, bitwise
    ``upsample_bilinear(cos, hw)``'s (from the kernel where it runs, else from that call)."""
    fused = _KernelUpsampler.create(cos, hw, max(1, torch.get_num_threads()))
    if fused is not None:
        return fused.pixels
    flat = upsample_bilinear(cos, hw).view(cos.shape[0], -1)
    return lambda idx: flat[:, idx]


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_KERNEL_SIGNATURES = {
    "ovss_axis": ([_I, _I] + [_P] * 4, None),
    "ovss_score_rows": (
        [_P] + [_I] * 4 + [_P] * 8 + [_I, _I, _F, ctypes.c_int, _F, _F, _F] + [_P] * 3,
        ctypes.c_int,
    ),
    "ovss_pixels": ([_P] + [_I] * 4 + [_P] * 9 + [_I, _P], None),
    "ovss_height_pass": ([_P] + [_I] * 5 + [_P] * 8 + [_I, _I, _P], ctypes.c_int),
    "ovss_merge_windows": ([_I, _P, _P, _P, _P] + [_I] * 4, ctypes.c_int),
}


@functools.cache
def _kernel():
    """The scoring kernel library with its argument types set, or ``None`` (see
    ``methods.native``)."""
    from methods.native import library

    lib = library("scoring_kernel")
    if lib is None:
        return None
    for name, (args, result) in _KERNEL_SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def kernel_status() -> str:
    """Whether scoring runs the C kernel here: ``compiled (...)``, or why not (the torch path
    then runs; same labels)."""
    from methods.native import status

    return status("scoring_kernel")


def _in_parallel(tasks: list[tuple[Callable, tuple]], workers: int) -> None:
    """Run ``fn(*args)`` for every task: inline for one worker, else on ``workers`` threads with
    one torch thread each (tasks round-robin) [ours]. Intra-op threading puts a barrier between
    the cores after every op; on a loaded machine those cost more than the work (measured on 2
    shared cores: ``score_logits`` at 683 x 512, 150 classes, 1.36 s with two intra-op threads,
    0.45 s on one)."""
    workers = min(workers, len(tasks))
    if workers <= 1:
        for fn, args in tasks:
            fn(*args)
        return

    # Grad and inference modes are thread-local: the workers take the caller's.
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(mine: list[tuple[Callable, tuple]]) -> None:
        torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for fn, args in mine:
                fn(*args)

    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(run, tasks[w::workers]) for w in range(workers)]:
            f.result()


def _redo(
    values: Callable[[torch.Tensor], torch.Tensor],
    idx: torch.Tensor,
    labels: torch.Tensor,
    max_prob: torch.Tensor | None,
    q2c: torch.Tensor,
    num_classes: int,
    logit_scale: float,
    keep: torch.Tensor | None,
) -> None:
    """Recompute pixels ``idx`` of ``labels``/``max_prob`` in place with the reference formula."""
    if idx.numel() == 0:
        return
    redo_labels, redo_prob = _postprocess_columns(values(idx), q2c, num_classes, logit_scale, keep)
    labels[idx] = redo_labels
    if max_prob is not None:
        max_prob[idx] = redo_prob


def score_logits(
    cos: torch.Tensor,
    out_hw: Sequence[int],
    query_to_class: torch.Tensor | Sequence[int],
    num_classes: int,
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
    block_elems: int = _BLOCK_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsample cosine logits to the image size and turn them into labels (EVAL.md §2.2, §4.1).

    Same arguments and labels as ``score_logits_reference`` (see the module docstring for the
    exactness argument); on CPU it never builds the softmax and works in cache-sized pixel blocks.
    On other devices it runs the reference computation.

    Args:
        cos: ``(Q, h, w)`` cosine logits (float32; other dtypes are converted).
        out_hw: ``(H, W)`` output (original image) size.
        query_to_class: ``(Q,)`` class id of each query (synonyms share a class).
        num_classes: ``C``.
        logit_scale: softmax temperature multiplier (default 40).
        prob_thd: pixels whose max class probability is below it become class 0 (default 0).
        area_thd: SCLIP's area rule (default ``None``: off).
        block_elems: logits per pixel block (default 2**22, about 16 MB).

    Returns:
        ``(labels, max_prob)``: ``(H, W)`` int64 and ``(H, W)`` float32. ``max_prob`` matches the
        reference to float32 rounding (relative 1e-5), exactly where a pixel was recomputed.
    """
    labels, max_prob = _score(
        cos, out_hw, query_to_class, num_classes, logit_scale, prob_thd, area_thd, True, block_elems
    )
    assert max_prob is not None
    return labels, max_prob


def score_labels(
    cos: torch.Tensor,
    out_hw: Sequence[int],
    query_to_class: torch.Tensor | Sequence[int],
    num_classes: int,
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
    block_elems: int = _BLOCK_ELEMS,
) -> torch.Tensor:
    """``score_logits`` without the max-probability map: ``(H, W)`` int64 labels.

    When ``prob_thd == 0`` and ``area_thd is None`` (every dataset without a background class)
    this skips the softmax denominator entirely, which is the fastest path.
    """
    labels, _ = _score(
        cos,
        out_hw,
        query_to_class,
        num_classes,
        logit_scale,
        prob_thd,
        area_thd,
        False,
        block_elems,
    )
    return labels


def score_logits_thresholds(
    cos: torch.Tensor,
    out_hw: Sequence[int],
    query_to_class: torch.Tensor | Sequence[int],
    num_classes: int,
    logit_scale: float,
    prob_thds: Sequence[float],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``score_logits`` for several ``prob_thd`` values at once (``area_thd`` off): one
    upsampling and one pass over the logits, then each threshold.

    Equal, label for label, to one ``score_logits(..., prob_thd=t)`` call per ``t``: the pixels
    whose max probability lies within the recompute band of a threshold get the reference value
    before that threshold is applied, as the single call does.

    Returns:
        one ``(labels, max_prob)`` pair per threshold, in the order given: ``(H, W)`` int64 and
        ``(H, W)`` float32.
    """
    labels0, prob0 = score_logits(cos, out_hw, query_to_class, num_classes, logit_scale, 0.0)
    if cos.device.type != "cpu":  # the reference path is exact already
        out = []
        for t in prob_thds:
            lab = labels0.clone()
            if t > 0:
                lab[prob0 < t] = 0
            out.append((lab, prob0))
        return out
    cos, hw, q2c = _check_scoring_inputs(cos, out_hw, query_to_class, num_classes)
    flat_labels0, flat_prob0 = labels0.view(-1), prob0.view(-1)
    values: Callable[[torch.Tensor], torch.Tensor] | None = None
    out = []
    for t in prob_thds:
        labels, prob = flat_labels0.clone(), flat_prob0
        if t > 0:
            near = ((flat_prob0 - t).abs() <= _PROB_RTOL * t).nonzero()[:, 0]
            if near.numel():
                if values is None:
                    values = _column_values(cos, hw)
                prob = flat_prob0.clone()
                ref_labels, ref_prob = _postprocess_columns(
                    values(near), q2c, num_classes, logit_scale, None
                )
                labels[near] = ref_labels
                prob[near] = ref_prob
            labels[prob < t] = 0
        out.append((labels.view(hw), prob.view(hw)))
    return out
