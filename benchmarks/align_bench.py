"""Alignment / lookup / clustering benchmarks (issue 6). ``python -m benchmarks.align_bench``
prints every result dict as JSON. Each function returns a JSON-safe dict and is sized to run
in well under a minute on a 2-core CPU (larger on request via the environment knobs).

- ``bench_align_throughput``: training steps/s and patches/s of the alignment module (each
  ``arch``) with TSupCon on batches of 5 images of ViT-S/14-like tokens (384-d -> 512-d,
  16 x 16 tokens per image), forward + loss + backward + SGD step; plus inference patches/s.
- ``bench_prototype_index``: ``PrototypeIndex`` torch vs FAISS top-1 search at 150 and 20,000
  prototypes (queries: BENCH_PROTO_QUERIES, default 50,000 x 512).
- ``bench_kmeans``: k-means FAISS vs torch on BENCH_KMEANS_POINTS (default 1,000,000) x 384
  points, k = BENCH_KMEANS_K (default 64), BENCH_KMEANS_ITERS (default 3) iterations, all
  points used; time per iteration is reported so shorter runs extrapolate.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

from methods.cluster import kmeans
from methods.fmbseg import AlignmentModule, align_features, tsupcon_loss
from methods.prototype import PrototypeIndex


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def bench_align_throughput(steps: int = 3, tokens: int = 256, batch: int = 5) -> dict:
    """Training and inference throughput of each alignment architecture (CPU, float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, 384, generator=g)
    y = torch.randint(0, 20, (batch * tokens,), generator=g)
    t = F.normalize(torch.randn(171, 512, generator=g), dim=1)
    out: dict = {
        "batch_images": batch,
        "tokens_per_image": tokens,
        "threads": torch.get_num_threads(),
        "archs": {},
    }
    for arch in ("block", "mlp", "linear"):
        torch.manual_seed(0)
        m = AlignmentModule(384, 512, arch)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        tsupcon_loss(m(x).reshape(-1, 512), y, t).backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = tsupcon_loss(m(x).reshape(-1, 512), y, t)
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_s = (time.perf_counter() - t0) / steps
        m.eval()
        grid = [[16, tokens // 16]]
        with torch.no_grad():
            t0 = time.perf_counter()
            for i in range(batch):
                align_features(m, x[i], grid)
            infer_s = time.perf_counter() - t0
        out["archs"][arch] = {
            "train_step_s": round(train_s, 4),
            "train_patches_per_s": round(batch * tokens / train_s),
            "infer_patches_per_s": round(batch * tokens / infer_s),
        }
    return out


def bench_prototype_index(n_queries: int | None = None, dim: int = 512) -> dict:
    """Top-1 search time, torch vs FAISS, at 150 and 20,000 prototypes."""
    n = n_queries or _env("BENCH_PROTO_QUERIES", 50_000)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, dim, generator=g)
    out: dict = {"queries": n, "dim": dim, "threads": torch.get_num_threads(), "results": []}
    for k in (150, 20_000):
        protos = torch.randn(k, dim, generator=g)
        row: dict = {"prototypes": k}
        ids = {}
        for backend in ("torch", "faiss"):
            idx = PrototypeIndex(protos, backend=backend)
            idx.argmax(q[:1000])  # warm-up
            t0 = time.perf_counter()
            ids[backend] = idx.argmax(q)
            s = time.perf_counter() - t0
            row[backend] = {"seconds": round(s, 4), "queries_per_s": round(n / s)}
        row["agreement"] = float((ids["torch"].cpu() == ids["faiss"]).float().mean())
        row["faiss_speedup"] = round(row["torch"]["seconds"] / row["faiss"]["seconds"], 3)
        out["results"].append(row)
    return out


def bench_kmeans(n: int | None = None, k: int | None = None, niter: int | None = None) -> dict:
    """k-means FAISS vs torch on N x 384 points (all points used), seconds per iteration."""
    n = n or _env("BENCH_KMEANS_POINTS", 1_000_000)
    k = k or _env("BENCH_KMEANS_K", 64)
    niter = niter or _env("BENCH_KMEANS_ITERS", 3)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(k, 384, generator=g) * 3
    x = centres[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, 384, generator=g)
    out: dict = {
        "points": n,
        "dim": 384,
        "k": k,
        "niter": niter,
        "threads": torch.get_num_threads(),
    }
    for backend in ("faiss", "torch"):
        t0 = time.perf_counter()
        res = kmeans(x, k, niter=niter, seed=0, backend=backend)
        s = time.perf_counter() - t0
        out[backend] = {
            "seconds": round(s, 3),
            "seconds_per_iter": round(s / (niter + 1), 3),
            "points_used": res.points_used,
            "mean_sq_dist": round(res.objective / n, 4),
        }
    out["faiss_speedup"] = round(out["torch"]["seconds"] / out["faiss"]["seconds"], 3)
    return out


def main() -> None:
    for fn in (bench_align_throughput, bench_prototype_index, bench_kmeans):
        print(json.dumps({fn.__name__: fn()}, indent=2), flush=True)


if __name__ == "__main__":
    main()
