"""Nearest-prototype lookup: ``argmax_k <l2n(z), t_k>`` (``spec/METHODS.md`` §0.6).

One interface, ``PrototypeIndex``, over three backends:

- ``torch``: chunked ``x @ P.T`` + ``max``/``topk`` in float32 (exact; CPU or the prototypes'
  device). ``bf16=True`` scores in bfloat16 first and re-scores the best ``k + 8`` candidates in
  float32 (faster for thousands of prototypes on CPUs with bf16 units; near-exact: a true
  neighbour can be missed only if bf16 rounding pushes it below 8 others).
- ``faiss``: ``IndexFlatIP`` (exact inner product; on a GPU when faiss was built with GPUs).
- ``faiss-ivf``: ``IndexIVFFlat`` with ``nlist`` lists probed ``nprobe`` at a time. Approximate,
  so it is opt-in only; ``recall_report`` measures it against exact search.

``backend="auto"`` picks ``faiss`` when faiss is installed, the prototypes are on the CPU and
``K * D >= 2**18`` (e.g. K >= 512 prototypes of width 512), else ``torch``. Measured on a 2-core
CPU (top-1, float32): at 150 x 512 one matmul + max is ~1.1x faster than FAISS; from 500 x 512
up to 20k x 384 FAISS's blocked GEMM with a fused top-k is ~1.3-1.4x faster. (``bf16`` is ~2x
faster again at 20k prototypes but slower than float32 below a few thousand.) GPU-resident
prototypes always use torch. ``.backend`` says what was chosen and ``.reason`` why.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.errors import OvssError

__all__ = ["BACKENDS", "PrototypeIndex"]

BACKENDS = ("auto", "torch", "faiss", "faiss-ivf")

# auto: FAISS from this many prototype coordinates (K * D) on.
_AUTO_FAISS_MIN_KD = 1 << 18
# torch backend: one chunk of scores holds about this many floats (16 MB).
_CHUNK_SCORES = 1 << 22
# bf16 scoring re-scores this many extra candidates in float32.
_BF16_EXTRA = 8


def _import_faiss() -> ModuleType:
    """Import faiss or raise an ``OvssError`` that says how to get it."""
    try:
        return importlib.import_module("faiss")
    except ImportError as e:
        raise OvssError(
            "the FAISS backend needs the faiss package: install ovss[faiss] (faiss-cpu) or "
            "ovss[gpu] (faiss-gpu), or use backend='torch'"
        ) from e


def _faiss_available() -> bool:
    try:
        _import_faiss()
    except OvssError:
        return False
    return True


def _l2n(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return F.normalize(x, p=2.0, dim=1, eps=1e-12)


class PrototypeIndex:
    """Cosine nearest-prototype search over ``K`` prototypes of width ``D``.

    Args:
        prototypes: ``(K, D)`` tensor (e.g. query text embeddings). Kept in float32 on its
            device (the torch backend computes there).
        backend: ``auto`` (default), ``torch``, ``faiss`` or ``faiss-ivf`` (see module doc).
        normalize: L2-normalise prototypes and queries so that scores are cosines (default
            True). With False, scores are raw inner products.
        bf16: torch backend only: bfloat16 scoring + float32 re-scoring of the top ``k + 8``
            (default False: plain float32, exact).
        nlist: ``faiss-ivf`` only: number of inverted lists (default ``round(sqrt(K))``, at
            most ``K``). Training needs ``K >= nlist``; FAISS wants ~39 points per list.
        nprobe: ``faiss-ivf`` only: lists visited per query (default 8, at most ``nlist``).
            Higher is slower and closer to exact.

    Attributes:
        backend: the backend actually used (``torch``, ``faiss`` or ``faiss-ivf``).
        reason: one line saying why (for ``auto``) or ``"requested"``.
        device: ``"cpu"``/``"cuda:0"``... for torch, ``"faiss-cpu"``/``"faiss-gpu"`` for faiss.

    Raises:
        OvssError: bad shapes or arguments, or a faiss backend without faiss installed.
    """

    def __init__(
        self,
        prototypes: torch.Tensor,
        backend: str = "auto",
        normalize: bool = True,
        bf16: bool = False,
        nlist: int | None = None,
        nprobe: int = 8,
    ) -> None:
        if prototypes.dim() != 2 or prototypes.shape[0] < 1 or prototypes.shape[1] < 1:
            raise OvssError(f"prototypes must be a (K, D) tensor, got {tuple(prototypes.shape)}")
        if backend not in BACKENDS:
            raise OvssError(f"'{backend}' is not a prototype backend; choose from {BACKENDS}")
        if bf16 and backend not in ("auto", "torch"):
            raise OvssError("bf16 scoring is a torch-backend option; use backend='torch'")
        self.normalize = bool(normalize)
        self.bf16 = bool(bf16)
        protos = prototypes.detach().float()
        self.prototypes = _l2n(protos) if self.normalize else protos.contiguous()
        self.num_prototypes, self.dim = self.prototypes.shape
        self.backend, self.reason = self._choose(backend)
        self._faiss_index: Any = None
        self._gpu_resources: Any = None
        self._ivf_quantizer: Any = None
        self.nlist: int | None = None
        self.nprobe: int | None = None
        self.device = str(self.prototypes.device)
        if self.backend == "faiss":
            self._faiss_index = self._build_flat()
        elif self.backend == "faiss-ivf":
            self._faiss_index = self._build_ivf(nlist, nprobe)

    def __repr__(self) -> str:
        return (
            f"PrototypeIndex(K={self.num_prototypes}, D={self.dim}, backend={self.backend!r}, "
            f"device={self.device!r}, normalize={self.normalize})"
        )

    # ----------------------------------------------------------------------------- construction

    def _choose(self, backend: str) -> tuple[str, str]:
        """Resolve ``auto`` (rule in the module docstring); explicit backends are kept."""
        if backend != "auto":
            return backend, "requested"
        if self.bf16:
            return "torch", "bf16 scoring is a torch-backend option"
        if self.prototypes.device.type != "cpu":
            return "torch", f"prototypes live on {self.prototypes.device}: matmul there"
        kd = self.num_prototypes * self.dim
        if kd < _AUTO_FAISS_MIN_KD:
            return "torch", f"K*D = {kd} < {_AUTO_FAISS_MIN_KD}: one matmul + max is fastest"
        if not _faiss_available():
            return "torch", "faiss is not installed (install ovss[faiss] for large K)"
        return "faiss", f"K*D = {kd} >= {_AUTO_FAISS_MIN_KD}: FAISS exact flat index"

    def _prototypes_np(self) -> np.ndarray:
        return np.ascontiguousarray(self.prototypes.cpu().numpy(), dtype=np.float32)

    def _to_gpu_if_possible(self, faiss: ModuleType, index: Any) -> Any:
        """Move a faiss index to GPU 0 when this faiss build has GPUs."""
        n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if n_gpus > 0 and hasattr(faiss, "StandardGpuResources"):
            self._gpu_resources = faiss.StandardGpuResources()
            self.device = "faiss-gpu"
            return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        self.device = "faiss-cpu"
        return index

    def _build_flat(self) -> Any:
        faiss = _import_faiss()
        index = faiss.IndexFlatIP(self.dim)
        index.add(self._prototypes_np())
        return self._to_gpu_if_possible(faiss, index)

    def _build_ivf(self, nlist: int | None, nprobe: int) -> Any:
        faiss = _import_faiss()
        k = self.num_prototypes
        nlist = max(1, round(math.sqrt(k))) if nlist is None else int(nlist)
        if not 1 <= nlist <= k:
            raise OvssError(f"nlist must lie in [1, K={k}], got {nlist}")
        if int(nprobe) < 1:
            raise OvssError(f"nprobe must be >= 1, got {nprobe}")
        self.nlist, self.nprobe = nlist, min(int(nprobe), nlist)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if hasattr(index, "cp"):  # prototypes are few by k-means standards: no stderr warning
            index.cp.min_points_per_centroid = 1
        protos = self._prototypes_np()
        index.train(protos)
        index.add(protos)
        index.nprobe = self.nprobe
        self._ivf_quantizer = quantizer  # the index does not own it: keep it alive
        return self._to_gpu_if_possible(faiss, index)

    # ----------------------------------------------------------------------------------- search

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate ``(N, D)`` queries: float32 copy/view and, if ``normalize``, ``1 / |x|``.

        Queries are never divided by their norms: the ranking of ``<x, p_k>`` over k is the
        ranking of the cosines, so only the returned scores are rescaled (saves a pass over x).
        """
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise OvssError(
                f"queries must be (N, {self.dim}) to match the prototypes, got {tuple(x.shape)}"
            )
        x = x.detach().float()
        if not self.normalize:
            return x, None
        return x, x.norm(dim=1).clamp_min_(1e-12).reciprocal_()

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Dense scores ``(N, K)`` float32: cosines (inner products if ``normalize=False``).

        Always computed with torch (float32), on the prototypes' device; returned there.
        """
        q, inv_norm = self._queries(x.to(self.prototypes.device))
        sims = q @ self.prototypes.T
        return sims if inv_norm is None else sims.mul_(inv_norm[:, None])

    def search(self, x: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best prototypes of each query.

        Args:
            x: ``(N, D)`` queries (pixel/patch features), any float dtype and device.
            k: neighbours per query, ``1 <= k <= K`` (default 1).

        Returns:
            ``(scores, idx)``: ``(N, k)`` float32 scores and ``(N, k)`` int64 prototype ids, best
            first, on the CPU for faiss backends and on the prototypes' device for torch.
            Among exactly tied prototypes the order is backend-dependent.
        """
        k = int(k)
        if not 1 <= k <= self.num_prototypes:
            raise OvssError(f"k must lie in [1, K={self.num_prototypes}], got {k}")
        if self.backend == "torch":
            q, inv_norm = self._queries(x.to(self.prototypes.device))
            s, idx = self._search_torch(q, k)
        else:
            q, inv_norm = self._queries(x.cpu())
            s, idx = self._search_faiss(q, k)
        if inv_norm is not None:
            s.mul_(inv_norm[:, None])
        return s, idx

    def _search_torch(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunked exact (or bf16 + float32 re-scored) top-k of raw inner products."""
        n = q.shape[0]
        out_s = torch.empty(n, k, dtype=torch.float32, device=q.device)
        out_i = torch.empty(n, k, dtype=torch.long, device=q.device)
        rows = max(1, _CHUNK_SCORES // self.num_prototypes)
        protos_t = self.prototypes.T
        protos_bf = self.prototypes.bfloat16() if self.bf16 else None
        n_cand = min(self.num_prototypes, k + _BF16_EXTRA)
        if protos_bf is not None:  # the candidates' (rows, n_cand, D) gather bounds the chunk
            rows = max(1, min(rows, _CHUNK_SCORES // (n_cand * self.dim)))
        for start in range(0, n, rows):
            chunk = q[start : start + rows]
            if protos_bf is not None:
                # bf16 scores choose candidates; float32 re-scores them.
                coarse = chunk.bfloat16() @ protos_bf.T
                cand = coarse.topk(n_cand, dim=1).indices  # (c, n_cand)
                exact = torch.einsum("cd,cmd->cm", chunk, self.prototypes[cand])
                s, j = exact.topk(k, dim=1)
                idx = cand.gather(1, j)
            else:
                sims = chunk @ protos_t
                if k == 1:
                    s, idx = sims.max(dim=1, keepdim=True)
                else:
                    s, idx = sims.topk(k, dim=1)
            out_s[start : start + rows] = s
            out_i[start : start + rows] = idx
        return out_s, out_i

    def _search_faiss(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q_np = np.ascontiguousarray(q.numpy(), dtype=np.float32)
        s, idx = self._faiss_index.search(q_np, k)
        return torch.from_numpy(s), torch.from_numpy(idx.astype(np.int64, copy=False))

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` int64 id of the best prototype of each query (``search(x, 1)``)."""
        return self.search(x, 1)[1][:, 0]

    def recall_report(self, x_sample: torch.Tensor, k: int = 1) -> dict[str, Any]:
        """How close this index is to exact search on a sample of queries.

        Args:
            x_sample: ``(n, D)`` representative queries (a few thousand is plenty).
            k: neighbours returned by the index per query (default 1).

        Returns:
            JSON-safe dict: ``backend``, ``nlist``, ``nprobe``, ``n``, ``k``,
            ``recall_at_k`` (fraction of queries whose exact nearest prototype is among the
            index's ``k``), ``top1_agreement`` (fraction whose first answer is the exact one or
            scores exactly as high) and ``mean_top1_score_loss`` (exact best score minus the
            index's best score, averaged; 0 for exact backends).
        """
        exact_s, exact_i = self._exact_top1(x_sample)
        got_s, got_i = self.search(x_sample, k)
        got_s, got_i = got_s.cpu(), got_i.cpu()
        found = (got_i == exact_i[:, None]).any(dim=1)
        agree = (got_i[:, 0] == exact_i) | (got_s[:, 0] >= exact_s)
        n = int(exact_i.numel())
        return {
            "backend": self.backend,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "n": n,
            "k": int(k),
            "recall_at_k": float(found.float().mean()) if n else float("nan"),
            "top1_agreement": float(agree.float().mean()) if n else float("nan"),
            "mean_top1_score_loss": float((exact_s - got_s[:, 0]).clamp(min=0).mean())
            if n
            else 0.0,
        }

    def _exact_top1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact float32 best score and id per query (torch, on the CPU), for recall reports."""
        q, inv_norm = self._queries(x.cpu())
        protos = self.prototypes.cpu()
        best_s = torch.empty(q.shape[0])
        best_i = torch.empty(q.shape[0], dtype=torch.long)
        rows = max(1, _CHUNK_SCORES // self.num_prototypes)
        for start in range(0, q.shape[0], rows):
            s, i = (q[start : start + rows] @ protos.T).max(dim=1)
            best_s[start : start + rows] = s
            best_i[start : start + rows] = i
        if inv_norm is not None:
            best_s.mul_(inv_norm)
        return best_s, best_i
