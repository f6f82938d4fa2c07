"""Trident's SAM affinity (``METHODS.md`` §4 step 5), fused and chunked over query rows.

``methods.trident.sam_affinity`` builds, per head, the whole ``(n, n)`` attention of SAM's last
global-attention block among the valid tokens (``SamTokens.attn_head``), then its cosine mask,
and accumulates. On SAM-B's 64 x 64 grid (``n = 4096``, 12 heads) that is ~6 s per image on two
CPU cores, most of it spent writing and re-reading ``(n, n)`` temporaries.

``fused_affinity`` computes the same matrix one block of ``chunk`` valid query rows at a time;
per block and head it never holds more than two ``(chunk, N)`` blocks (logits, attention; ``N``
tokens of the cached grid) and a ``(chunk, n)`` cosine block:

    logits = (q_c * scale) k^T + q_c . R_h[y_c - y_k + S - 1] + q_c . R_w[x_c - x_k + S - 1]
             (the rel-pos terms of all heads as one q_c @ table^T each, then gathered)
    attn   = softmax_keys(logits) * exp(attn_log_mass[c, h])   (one fused softmax kernel; the
             mass factor is skipped where the log mass is 0 everywhere: no padding)
    keep   = sv_h[c] . sv_h^T > thr_c  (strict; diagonal kept)            ("aff")
    W[c]  += where(keep, attn, 0)   ("aff")    or    W[c] += attn   ("attn")

and then row-normalises the block (a dead row becomes an identity row). The mean over heads of
the reference cancels in the row normalisation and is skipped. Results equal the reference to
float32 rounding; a keep decision can differ only for a cosine within rounding of ``thr``.

On CPU the blocks run on ``torch.get_num_threads()`` worker threads with one torch thread each
(``workers``) [ours]: the work is ~8 small ops per block and head, and intra-op threading puts a
barrier between the cores after every one of them; on a loaded machine those barriers cost more
than the work (measured on 2 shared cores, SAM-B's 64 x 64 grid: 6.6 s with two intra-op
threads, 0.83 s with two workers, in the same run).

Cost on SAM-B's grid (``H = 12``, ``hd = 64``, ``n = N = 4096``): ``4 H n N hd`` = 51.5 GFLOP
of float32 matmul (``q k^T`` and the value cosines), ``H n N`` = 201 M exponentials; the
compulsory traffic is the float16 ``q, k, v`` in (19 MB) and the ``(n, n)`` float32 result out
(67 MB). ``benchmarks.trident_bench`` reports the figure beside those bounds.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from featurestore.backbones.sam import top_left_rows

__all__ = [
    "DEFAULT_CHUNK",
    "SamAttentionFactors",
    "factors_from_arrays",
    "fused_affinity",
]

#: Query rows per block (a (256, 4096) float32 block is 4 MB; a worker holds three): on 2 shared
#: CPU cores with 2 workers and SAM-B's 4096 tokens, 128 to 1024 rows took 0.94 to 1.08 CPU-s per
#: image (256 the least), 0.52 to 0.56 s wall at best.
DEFAULT_CHUNK = 256


@dataclass
class SamAttentionFactors:
    """What the fused path needs of SAM's cached global-attention block, for one image.

    Attributes:
        q: ``(N, H, hd)`` unscaled queries of the cached grid (``N = gh * gw``, row-major).
        k: ``(N, H, hd)`` keys.
        attn_log_mass: ``(N, H)`` log attention mass of each query on the cached grid's keys.
        rel_pos_h: ``(2S - 1, hd)`` height table of the block.
        rel_pos_w: ``(2S - 1, hd)`` width table of the block.
        scale: ``hd ** -0.5``.
        cached: ``(gh, gw)`` the cached grid (softmax runs over its ``N`` keys).
        rows: ``(n,)`` index in the cached grid of each valid token (row-major over the valid
            grid). ``None`` with ``valid``: its top-left rows
            (``featurestore.backbones.sam.top_left_rows``).
        valid: ``(vh, vw)`` when the valid tokens are the top-left ``vh x vw`` sub-grid of the
            cached grid (Trident's crop, ``methods.trident.sam_tokens``): ``fused_affinity``
            then slices the valid keys of each logits block (a strided view) instead of
            gathering them. ``None``: any ``rows`` (gathered). Given with ``rows``, the caller
            vouches that ``rows`` is that sub-grid (only the count is checked).
    """

    q: torch.Tensor
    k: torch.Tensor
    attn_log_mass: torch.Tensor
    rel_pos_h: torch.Tensor
    rel_pos_w: torch.Tensor
    scale: float
    cached: tuple[int, int]
    rows: torch.Tensor | None = None
    valid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        gh, gw = self.cached
        if self.valid is not None:
            self.valid = (int(self.valid[0]), int(self.valid[1]))
            vh, vw = self.valid
            if not (0 < vh <= gh and 0 < vw <= gw):
                raise ValueError(f"valid grid {self.valid} is not inside the cached {self.cached}")
            if self.rows is None:
                self.rows = top_left_rows(self.valid, gw, self.q.device)
            elif self.rows.numel() != vh * vw:
                raise ValueError(f"{self.rows.numel()} rows for the valid grid {self.valid}")
        elif self.rows is None:
            raise ValueError("SamAttentionFactors needs the valid rows or the valid grid")
        if self.q.ndim != 3 or self.q.shape != self.k.shape or self.q.shape[0] != gh * gw:
            raise ValueError(
                f"q/k must be (gh*gw, H, hd) alike for grid {self.cached}, got "
                f"{tuple(self.q.shape)} {tuple(self.k.shape)}"
            )
        if tuple(self.attn_log_mass.shape) != tuple(self.q.shape[:2]):
            raise ValueError(f"attn_log_mass must be (N, H), got {tuple(self.attn_log_mass.shape)}")
        span_h, span_w = (self.rel_pos_h.shape[0] + 1) // 2, (self.rel_pos_w.shape[0] + 1) // 2
        if gh > span_h or gw > span_w:
            raise ValueError(f"grid {self.cached} exceeds the block's {span_h}x{span_w} grid")

    @property
    def num_heads(self) -> int:
        return int(self.q.shape[1])


def fused_affinity(
    factors: SamAttentionFactors,
    unit_values: torch.Tensor,
    thresholds: torch.Tensor,
    correlation: str = "aff",
    chunk: int = DEFAULT_CHUNK,
    workers: int | None = None,
) -> torch.Tensor:
    """Trident's row-normalised SAM affinity ``(n, n)`` over all valid tokens, chunked.

    Same matrix as ``methods.trident.sam_affinity(sam, [None], correlation, ...)`` with the
    attention of ``factors`` (normalised over the cached grid, cropped, not renormalised).

    Args:
        factors: the image's cached attention factors.
        unit_values: ``(H, n, hd)`` l2-normalised values of the valid tokens; sets the dtype
            and device of the computation and the result.
        thresholds: ``(n,)`` per-query cosine thresholds (``methods.trident.cosine_thresholds``);
            unused for ``"attn"``.
        correlation: ``"aff"`` (``mean_h where(cos_h > thr, attn_h, 0)``, diagonal kept) or
            ``"attn"`` (``mean_h attn_h``).
        chunk: query rows per block.
        workers: threads that compute blocks side by side, each with one torch thread
            (default: ``torch.get_num_threads()`` on CPU, 1 on other devices; 1 runs inline).
            Blocks are independent rows of the result: any ``workers > 1`` gives the bits of the
            inline loop on one torch thread (more intra-op threads may round differently).

    Returns:
        ``(n, n)``: rows sum to 1 (a row whose mass vanished is an identity row).
    """
    if correlation not in ("aff", "attn"):
        raise ValueError(f"the fused affinity takes correlation aff or attn, not {correlation!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    sv = unit_values
    dtype, device = sv.dtype, sv.device
    heads, n, hd = sv.shape
    gh, gw = factors.cached
    big_n = gh * gw
    if factors.num_heads != heads or factors.q.shape[2] != hd or factors.rows.numel() != n:
        raise ValueError(
            f"factors (N={big_n}, H={factors.num_heads}, hd={factors.q.shape[2]}, "
            f"n={factors.rows.numel()}) do not match values {tuple(sv.shape)}"
        )
    rows = factors.rows.to(device, torch.long)
    crop = factors.valid  # a top-left crop: valid keys are a strided view of a logits block
    span_h = (factors.rel_pos_h.shape[0] + 1) // 2
    span_w = (factors.rel_pos_w.shape[0] + 1) // 2
    table_h = factors.rel_pos_h.to(device, dtype)
    table_w = factors.rel_pos_w.to(device, dtype)
    # Per head, valid queries (H, n, hd), the scaled copy, keys as (H, hd, N) for q @ k^T.
    q = factors.q.to(device, dtype).index_select(0, rows).permute(1, 0, 2).contiguous()
    qs = q * factors.scale
    kt = factors.k.to(device, dtype).permute(1, 2, 0).contiguous()
    log_mass = factors.attn_log_mass.to(device, dtype).index_select(0, rows).T.contiguous()
    svt = sv.transpose(1, 2).contiguous()  # (H, hd, n)
    # Rel-pos gather indices of each valid query against every row / column of the cached grid.
    yq, xq = rows // gw, rows % gw
    idx_h = yq[:, None] - torch.arange(gh, device=device)[None, :] + (span_h - 1)  # (n, gh)
    idx_w = xq[:, None] - torch.arange(gw, device=device)[None, :] + (span_w - 1)  # (n, gw)
    thr = thresholds.to(device, dtype)

    # exp(log mass) of every valid query and head: the attention's row factor. A square image
    # without padding has log mass 0 everywhere: the factor is exactly 1 and is skipped.
    mass_factor = None if bool((log_mass == 0).all()) else log_mass.exp()
    out = sv.new_empty(n, n)

    def rows_block(c0: int, c1: int, bufs: tuple[torch.Tensor, ...]) -> None:
        """Rows ``[c0, c1)`` of ``out``: every head accumulated, then row-normalised."""
        c = c1 - c0
        logits, probs, cos = (b[:c] for b in bufs)
        acc = out[c0:c1]  # the first head writes it, the others add
        diag = torch.arange(c, device=device) * n + torch.arange(c0, c1, device=device)
        # rel-pos terms of every head of the block: (H, c, hd) @ (hd, 2S - 1), then gathered
        qc = q[:, c0:c1]
        rel_h = torch.gather(qc @ table_h.T, 2, idx_h[c0:c1].expand(heads, c, gh))
        rel_w = torch.gather(qc @ table_w.T, 2, idx_w[c0:c1].expand(heads, c, gw))
        for h in range(heads):
            torch.add(rel_h[h, :, :, None], rel_w[h, :, None, :], out=logits.view(c, gh, gw))
            logits.addmm_(qs[h, c0:c1], kt[h])
            # softmax over the cached grid's keys in one fused kernel (max, exp, sum, scale)
            torch.ops.aten._softmax.out(logits, -1, False, out=probs)
            factor = None if mass_factor is None else mass_factor[h, c0:c1, None]
            if crop is not None:
                attn = probs.view(c, gh, gw)[:, : crop[0], : crop[1]]
                target = acc.view(c, *crop)
            else:
                attn = probs.index_select(1, rows)
                target = acc
            if correlation == "attn" and factor is None:
                (target.copy_ if h == 0 else target.add_)(attn)
                continue
            if correlation == "attn":
                weight = factor.view(c, *([1] * (target.ndim - 1)))
            else:
                weight = cos
                torch.mm(sv[h, c0:c1], svt[h], out=weight)
                weight.view(-1)[diag] = float("inf")
                weight.gt_(thr[c0:c1, None])  # keep: 0 / 1
                if factor is not None:
                    weight.mul_(factor)  # times the row factor
                weight = weight.view(target.shape)
            if h == 0:
                torch.mul(attn, weight, out=target)
            else:
                target.addcmul_(attn, weight)
        mass = acc.sum(dim=-1, keepdim=True)
        dead = mass[:, 0] <= 0
        if bool(dead.any()):
            d = dead.nonzero()[:, 0]
            acc[d] = 0
            acc[d, d + c0] = 1
            mass = acc.sum(dim=-1, keepdim=True)
        acc.div_(mass)

    blocks = [(c0, min(c0 + chunk, n)) for c0 in range(0, n, chunk)]
    if workers is None:
        workers = torch.get_num_threads() if device.type == "cpu" else 1
    workers = max(1, min(int(workers), len(blocks)))
    rows_c = min(chunk, n)

    def new_buffers() -> tuple[torch.Tensor, ...]:
        return (sv.new_empty(rows_c, big_n), sv.new_empty(rows_c, big_n), sv.new_empty(rows_c, n))

    if workers == 1:
        bufs = new_buffers()
        for c0, c1 in blocks:
            rows_block(c0, c1, bufs)
        return out

    # Grad and inference modes are thread-local: the workers take the caller's.
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def worker(mine: list[tuple[int, int]]) -> None:
        # One torch thread per worker: the blocks run side by side, with no per-op barrier
        # between cores (on a loaded machine those barriers cost more than the work).
        torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            bufs = new_buffers()
            for c0, c1 in mine:
                rows_block(c0, c1, bufs)

    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(worker, blocks[w::workers]) for w in range(workers)]:
            f.result()
    return out


def factors_from_arrays(
    q: np.ndarray | torch.Tensor,
    k: np.ndarray | torch.Tensor,
    attn_log_mass: np.ndarray | torch.Tensor,
    static: dict,
    cached: tuple[int, int],
    *,
    rows: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    valid: tuple[int, int] | None = None,
) -> SamAttentionFactors:
    """``SamAttentionFactors`` from cached arrays and a SAM set's static arrays
    (``methods.sam_cache.sam_static``: ``rel_pos_h``, ``rel_pos_w``, ``scale``); ``rows`` and
    ``valid`` as the class's attributes."""

    def tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return t.to(device, dtype)

    return SamAttentionFactors(
        q=tensor(q),
        k=tensor(k),
        attn_log_mass=tensor(attn_log_mass),
        rel_pos_h=tensor(static["rel_pos_h"]),
        rel_pos_w=tensor(static["rel_pos_w"]),
        scale=float(np.asarray(static["scale"]).reshape(-1)[0]),
        cached=(int(cached[0]), int(cached[1])),
        rows=None if rows is None else rows.to(device, torch.long),
        valid=valid,
    )
