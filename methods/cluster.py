"""Clustering of cached patch features (METHODS.md §7): k-means, Hungarian eval, Sinkhorn.

- :func:`kmeans` — one interface, FAISS (``faiss.Kmeans``) or torch (chunked Lloyd) backends.
  **All points are used** unless ``max_points`` says otherwise: FAISS's default
  ``max_points_per_centroid = 256`` silently subsamples to ``k·256`` points, so it is set to
  ``ceil(N / k)`` here. ``spherical=True`` L2-normalises the points and the centroids (cosine
  k-means); the assignment is then the best inner product. ``device`` puts the torch backend
  on a GPU (``ovss cluster --device auto``, the default, picks one when CUDA exists); the FAISS
  backend uses a GPU only with faiss-gpu.
- :func:`cluster_per_image` — k-means of each image's tokens into ``k`` segments (PixelCLIP's
  "DINO masks", k = 16), written into the store as a label set (a *mask set*: label = cluster
  id, no class meaning), default name ``kmeans<k>-<feature set>``.
- :func:`cluster_store` — one k-means codebook over the patches of (some) images of a store;
  the per-image assignments are an unsupervised segmentation (optionally written as a label
  set ``codebook<k>-<feature set>`` with the centroids alongside); ``evaluate`` scores it
  against a dataset's GT with Hungarian matching (:func:`hungarian_match`).
- :func:`sinkhorn_knopp` — the balanced assignment of METHODS.md §5 (softmax-initialised,
  3 iterations, rows sum to 1).
- :func:`name_clusters` — each centroid's nearest text prototypes (open-vocabulary naming).

**[ours]**: token maps become pixel maps by nearest upsampling of each window's token grid to
its padded pixel size, cropping the padding, pasting windows in order (a later window wins
on overlaps) and a nearest resize of the canvas to the original size; clusters left without a
class by the Hungarian matching (``k > C``) predict no class (mmseg ``histc`` drops them from
the prediction areas, they still miss their GT pixels); the torch backend initialises with
``k`` distinct random points (as FAISS does) and re-seeds an empty cluster with the point
farthest from its centroid; niter = 20 (FAISS's default 25 is also fine); seed 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.errors import OvssError
from featurestore.store import FeatureSet, FeatureStore, ImageFeatures

__all__ = [
    "ClusterRequest",
    "ClusterSummary",
    "KMeansConfig",
    "KMeansResult",
    "choose_backend",
    "cluster_per_image",
    "cluster_store",
    "hungarian_match",
    "kmeans",
    "name_clusters",
    "run_cluster",
    "sinkhorn_knopp",
    "token_map_to_pixels",
]

Progress = Callable[[str, int, int], None]
_CHUNK = 1 << 22  # floats of one (rows, k) distance block


# --------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    """Centroids ``(k, D)`` float32, assignments ``(N,)`` int64, objective and metadata.

    ``objective``: sum of squared distances (L2) or of cosines (spherical) to the assigned
    centroid. ``points_used``: how many points trained the centroids.
    """

    centroids: torch.Tensor
    assign: torch.Tensor
    objective: float
    backend: str
    spherical: bool
    points_used: int
    seconds: float


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a dependency here
        raise OvssError("k-means backend 'faiss' needs faiss-cpu (or use backend='torch')") from e
    return faiss


def _faiss_gpus(faiss: Any) -> int:
    """GPUs FAISS can use (0 for faiss-cpu)."""
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def choose_backend(backend: str, device: str, faiss_available: bool, faiss_gpus: int) -> str:
    """The k-means backend :func:`kmeans` runs (a pure rule: no import, no device probe).

    ``faiss`` and ``torch`` are kept as asked; ``auto`` **[ours]** is ``faiss`` when FAISS is
    installed (``faiss_available``) unless ``device`` is a CUDA GPU and FAISS sees no GPU
    (``faiss_gpus == 0``: faiss-cpu), where ``torch`` runs on that GPU instead; ``torch`` when
    FAISS is missing. A CPU or MPS ``device`` keeps FAISS (on the CPU).

    Raises:
        OvssError: an unknown backend name.
    """
    if backend == "auto":
        on_cuda = torch.device(device).type == "cuda"
        return "faiss" if faiss_available and (not on_cuda or faiss_gpus > 0) else "torch"
    if backend not in ("faiss", "torch"):
        raise OvssError(f"'{backend}' is not a k-means backend; choose faiss, torch or auto")
    return backend


def _assign_torch(
    x: torch.Tensor, c: torch.Tensor, spherical: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid ``(N,)`` and its score (cosine, or squared distance) ``(N,)``."""
    n, k = x.shape[0], c.shape[0]
    rows = max(1, _CHUNK // max(k, 1))
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    score = torch.empty(n, dtype=torch.float32, device=x.device)
    c2 = (c * c).sum(1)
    for s in range(0, n, rows):
        xb = x[s : s + rows]
        ip = xb @ c.T
        if spherical:
            v, i = ip.max(1)
        else:
            d = (xb * xb).sum(1, keepdim=True) - 2 * ip + c2
            v, i = d.min(1)
        idx[s : s + rows], score[s : s + rows] = i, v
    return idx, score


def kmeans(
    x: torch.Tensor | np.ndarray,
    k: int,
    *,
    niter: int = 20,
    spherical: bool = False,
    seed: int = 0,
    backend: str = "auto",
    max_points: int | None = None,
    device: str = "cpu",
    nredo: int = 1,
) -> KMeansResult:
    """k-means of ``x`` ``(N, D)`` into ``k`` clusters.

    Args:
        x: points (float; copied to float32).
        k: clusters, ``1 <= k <= N``.
        niter: Lloyd iterations.
        spherical: cosine k-means on L2-normalised points, unit centroids.
        seed: initialisation / subsampling seed.
        backend: ``faiss``, ``torch`` or ``auto`` **[ours]**: see :func:`choose_backend`
            (FAISS when installed, except on a CUDA ``device`` without faiss-gpu: torch there).
        max_points: train on a seeded random subset of this many points (None: all points;
            every point is assigned either way).
        device: where the torch backend runs (``cpu``, ``cuda``, ``cuda:N``); with a GPU
            ``device`` the FAISS backend trains on the GPU only when faiss-gpu is installed
            (faiss-cpu ignores it).
        nredo: independent restarts; the best objective is kept (FAISS ``nredo``).

    Returns:
        :class:`KMeansResult`.
    """
    t0 = time.perf_counter()
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if xt.dim() != 2:
        raise OvssError(f"k-means needs (N, D) points, got {tuple(xt.shape)}")
    n = xt.shape[0]
    if not 1 <= k <= n:
        raise OvssError(f"k must lie in [1, N={n}], got {k}")
    if spherical:
        xt = F.normalize(xt, dim=1)
    on_gpu = torch.device(device).type == "cuda"
    have_faiss, gpus = False, 0
    if backend == "auto":
        try:
            have_faiss, gpus = True, _faiss_gpus(_faiss())
        except OvssError:
            have_faiss = False
    backend = choose_backend(backend, device, have_faiss, gpus)
    gen = torch.Generator().manual_seed(seed)
    train = xt
    if max_points is not None and max_points < n:
        train = xt[torch.randperm(n, generator=gen)[: max(max_points, k)]]
    if backend == "faiss":
        faiss = _faiss()
        xn = np.ascontiguousarray(train.cpu().numpy())
        km = faiss.Kmeans(
            xn.shape[1],
            k,
            niter=niter,
            spherical=spherical,
            seed=seed,
            verbose=False,
            max_points_per_centroid=math.ceil(len(xn) / k) + 1,
            min_points_per_centroid=1,
            nredo=nredo,
            gpu=on_gpu and _faiss_gpus(faiss) > 0,
        )
        km.train(xn)
        cent = torch.from_numpy(km.centroids.copy())
        xa = xt
    else:
        best = None
        train_dev = train.to(device)  # copied to the device once for all restarts
        for _ in range(max(1, nredo)):
            c = _lloyd_torch(train_dev, k, niter, spherical, gen)
            sc = _assign_torch(train_dev, c, spherical)[1].double().sum()
            obj = -sc if spherical else sc
            if best is None or obj < best[0]:
                best = (obj, c)
        cent = best[1]
        xa = train_dev if train is xt else xt.to(cent.device)
    assign, score = _assign_torch(xa, cent, spherical)
    return KMeansResult(
        centroids=cent.cpu(),
        assign=assign.cpu(),
        objective=float(score.double().sum()),
        backend=backend,
        spherical=spherical,
        points_used=int(train.shape[0]),
        seconds=round(time.perf_counter() - t0, 3),
    )


def _lloyd_torch(
    x: torch.Tensor, k: int, niter: int, spherical: bool, gen: torch.Generator
) -> torch.Tensor:
    """Lloyd iterations from ``k`` distinct random points; returns centroids ``(k, D)``."""
    c = x[torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)].clone()
    for _ in range(niter):
        a, score = _assign_torch(x, c, spherical)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k)
        empty = counts == 0
        c = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        if empty.any():  # re-seed with the worst-fitting points
            worst = (score if not spherical else -score).topk(int(empty.sum())).indices
            c[empty] = x[worst]
        if spherical:
            c = F.normalize(c, dim=1)
    return c


# --------------------------------------------------------------------------------------------
# Sinkhorn, Hungarian, naming
# --------------------------------------------------------------------------------------------


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Balanced soft assignment of ``M`` items to ``k`` clusters (METHODS.md §5, PixelCLIP).

    ``Q = softmax(logits, over clusters)ᵀ; Q /= Q.sum()``; then ``iters`` times: rows
    (clusters) normalised to sum ``1/k``, columns (items) to ``1/M``; finally ``(Q·M)ᵀ``.

    Args:
        logits: ``(M, k)`` scores (PixelCLIP: ε · cosine, ε = 100).
        iters: iterations (3 in PixelCLIP).

    Returns:
        ``(M, k)`` float tensor; each row sums to 1; column sums approach ``M / k``.
    """
    if logits.dim() != 2:
        raise OvssError(f"sinkhorn_knopp needs (M, k) logits, got {tuple(logits.shape)}")
    q = torch.softmax(logits.double(), dim=1).T  # (k, M)
    q = q / q.sum()
    k, m = q.shape
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True)
        q = q / k
        q = q / q.sum(0, keepdim=True)
        q = q / m
    return (q * m).T.to(logits.dtype)


def hungarian_match(confusion: np.ndarray) -> np.ndarray:
    """Cluster -> class map maximising matched pixels (scipy ``linear_sum_assignment``).

    Args:
        confusion: ``(k, C)`` pixel counts (cluster, GT class).

    Returns:
        ``(k,)`` int64 class of each cluster; ``C`` (no class) for clusters left unmatched
        when ``k > C``.
    """
    from scipy.optimize import linear_sum_assignment

    k, c = confusion.shape
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    out = np.full(k, c, dtype=np.int64)
    out[rows] = cols
    return out


def name_clusters(
    centroids: torch.Tensor, vocab: Any, topk: int = 3
) -> list[list[tuple[str, float]]]:
    """Each centroid's ``topk`` nearest query names by cosine (``vocab``: ``methods.base.Vocab``).

    ``centroids`` ``(k, D)`` must live in the text space (width = the vocabulary's).
    """
    from methods.prototype import PrototypeIndex

    names = [q for syns in vocab.class_names for q in syns]
    if centroids.shape[1] != vocab.embeddings.shape[1]:
        raise OvssError(
            f"centroids are {centroids.shape[1]}-d, the text embeddings "
            f"{vocab.embeddings.shape[1]}-d: name clusters of text-space features (aligned "
            "features: pass --checkpoint)"
        )
    s, i = PrototypeIndex(vocab.embeddings.float(), backend="torch").search(
        centroids.float(), min(topk, len(names))
    )
    return [
        [(names[j], round(float(v), 4)) for v, j in zip(sr, ir, strict=True)]
        for sr, ir in zip(s.tolist(), i.tolist(), strict=True)
    ]


# --------------------------------------------------------------------------------------------
# Store-level drivers
# --------------------------------------------------------------------------------------------


def token_map_to_pixels(values: np.ndarray, feats: ImageFeatures) -> np.ndarray:
    """Per-token integers ``(n_tokens,)`` -> ``(H, W)`` map at the image's original size
    (nearest; rule in the module docstring)."""
    from methods.fmbseg import _resize_nearest

    canvas = np.zeros(tuple(feats.resized_size), dtype=np.int64)
    start = 0
    for (gh, gw), box, pad in zip(feats.win_grid, feats.win_box, feats.win_pad, strict=True):
        gh, gw = int(gh), int(gw)
        y1, x1, y2, x2 = (int(v) for v in box)
        top, left, bottom, right = (int(v) for v in pad)
        grid = values[start : start + gh * gw].reshape(gh, gw)
        start += gh * gw
        full = _resize_nearest(grid, (y2 - y1 + top + bottom, x2 - x1 + left + right))
        canvas[y1:y2, x1:x2] = full[top : top + y2 - y1, left : left + x2 - x1]
    return _resize_nearest(canvas, feats.original_size)


def _feature_set(store: FeatureStore, features: str) -> FeatureSet:
    from methods.fmbseg import _resolve_features

    return _resolve_features(store, features)


def _tokens(f: ImageFeatures, tensor: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(f.tensors[tensor], np.float32))


@dataclass
class ClusterSummary:
    """What a clustering run did (JSON-safe via ``to_dict``)."""

    store: str
    features: str
    mode: str
    k: int
    backend: str
    spherical: bool
    images: int
    points: int
    seconds: float
    label_set: str | None = None
    eval: dict[str, Any] | None = None
    names: list[list[tuple[str, float]]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def default_set_name(mode: str, k: int, features_key: str) -> str:
    """``kmeans<k>-<key>`` (per image) or ``codebook<k>-<key>`` (store-level)."""
    return f"{'kmeans' if mode == 'per-image' else 'codebook'}{k}-{features_key}"


def cluster_per_image(
    store_path: str,
    features: str,
    k: int = 16,
    *,
    name: str | None = None,
    tensor: str = "patch",
    niter: int = 20,
    spherical: bool = False,
    seed: int = 0,
    backend: str = "auto",
    overwrite: bool = False,
    indices: Sequence[int] | None = None,
    progress: Progress | None = None,
    device: str = "cpu",
) -> ClusterSummary:
    """k-means of every image's tokens into ``k`` masks, written as label set ``name``.

    Images with fewer than ``k`` tokens get ``n_tokens`` clusters. Resumable: an existing set
    made with the same settings keeps its finished images (``overwrite`` restarts it).
    ``device``: where the torch k-means runs (see :func:`kmeans`).
    """
    from featurestore.labelsets import LabelSet, create_label_set, list_label_sets

    store = FeatureStore.open(store_path, mode="a")
    fs = _feature_set(store, features)
    name = name or default_set_name("per-image", k, fs.key)
    info = {
        "class_names": [[f"cluster {j}"] for j in range(k)],
        "kind": "mask set",
        "method": "kmeans-per-image",
        "features": fs.key,
        "tensor": tensor,
        "k": k,
        "niter": niter,
        "spherical": spherical,
        "seed": seed,
    }
    if name in list_label_sets(store) and not overwrite:
        ls = LabelSet(store, name)
        old = {
            a: ls.info.get(a)
            for a in ("method", "features", "tensor", "k", "niter", "spherical", "seed")
        }
        if old != {a: info[a] for a in old}:
            raise OvssError(
                f"label set '{name}' was made with other settings {old}; pass "
                "--overwrite to replace it"
            )
    else:
        ls = create_label_set(store, name, info, overwrite=overwrite)
    t0 = time.perf_counter()
    todo = [
        i for i in (indices if indices is not None else range(store.n_images)) if not ls.done[i]
    ]
    n = points = 0
    used = backend
    for f in fs.iter_images(names=[tensor], indices=todo):
        x = _tokens(f, tensor)
        res = kmeans(
            x,
            min(k, len(x)),
            niter=niter,
            spherical=spherical,
            seed=seed,
            backend=backend,
            device=device,
        )
        used = res.backend
        ls.write(f.index, token_map_to_pixels(res.assign.numpy(), f))
        n += 1
        points += len(x)
        if progress:
            progress(f"kmeans{k} per image", n, len(todo))
    return ClusterSummary(
        store_path,
        fs.key,
        "per-image",
        k,
        used,
        spherical,
        n,
        points,
        round(time.perf_counter() - t0, 3),
        label_set=name,
    )


def _aligned_tokens(module: Any, f: ImageFeatures, tensor: str) -> torch.Tensor:
    from methods.fmbseg import align_features

    dev = next(module.parameters()).device
    with torch.no_grad():
        return align_features(module, _tokens(f, tensor).to(dev), f.win_grid).cpu()


def cluster_store(
    store_path: str,
    features: str,
    k: int,
    *,
    tensor: str = "patch",
    niter: int = 20,
    spherical: bool = False,
    seed: int = 0,
    backend: str = "auto",
    max_points: int | None = None,
    indices: Sequence[int] | None = None,
    write_labels: str | None = None,
    overwrite: bool = False,
    eval_dataset: tuple[str, str, str | None] | None = None,
    name_vocab: Any = None,
    checkpoint: str | None = None,
    progress: Progress | None = None,
    device: str = "cpu",
) -> ClusterSummary:
    """One k-means codebook over the tokens of the store's images (all of them by default).

    Args:
        store_path, features, tensor: the feature set and tensor clustered.
        k, niter, spherical, seed, backend, max_points: as for :func:`kmeans` (all points
            unless ``max_points``).
        indices: only these images (default: every finished image).
        write_labels: write the per-image assignments as this label set (centroids stored in
            its group as ``centroids`` ``(k, D)``).
        eval_dataset: ``(dataset, data_root, split)``: Hungarian-matched mIoU/mAcc/aAcc of the
            assignments against the GT of those images (pixel-level, original size).
        name_vocab: a ``methods.base.Vocab``: name each cluster by its nearest queries.
        checkpoint: an ``ovss align`` checkpoint: cluster the *aligned* features instead (they
            live in text space, so clusters can be named).
        device: where the torch k-means (and the aligned module) run (see :func:`kmeans`).

    Memory: every token of the selected images is held as float32 (N × D × 4 bytes).
    """
    store = FeatureStore.open(store_path, mode="a" if write_labels else "r")
    fs = _feature_set(store, features)
    module = None
    if checkpoint:
        from methods.fmbseg import load_checkpoint

        module, _ = load_checkpoint(checkpoint, device)
    t0 = time.perf_counter()
    chunks, owners = [], []
    wanted = list(indices) if indices is not None else None
    total = len(wanted) if wanted is not None else store.n_images
    for j, f in enumerate(fs.iter_images(names=[tensor], indices=wanted)):
        x = _aligned_tokens(module, f, tensor) if module is not None else _tokens(f, tensor)
        chunks.append(x)
        owners.append(f.index)
        if progress:
            progress("read tokens", j + 1, total)
    if not chunks:
        raise OvssError(f"no finished image of '{fs.key}' to cluster")
    x = torch.cat(chunks)
    sizes = [len(c) for c in chunks]
    del chunks
    res = kmeans(
        x,
        k,
        niter=niter,
        spherical=spherical,
        seed=seed,
        backend=backend,
        max_points=max_points,
        device=device,
    )
    assigns = dict(zip(owners, torch.split(res.assign, sizes), strict=True))
    summary = ClusterSummary(
        store_path,
        fs.key,
        "codebook",
        k,
        res.backend,
        spherical,
        len(owners),
        len(x),
        0.0,
        extra={
            "points_used": res.points_used,
            "objective": res.objective,
            "kmeans_seconds": res.seconds,
            "aligned": bool(checkpoint),
        },
    )
    if write_labels or eval_dataset:
        _write_and_eval(
            store,
            fs,
            tensor,
            assigns,
            res,
            k,
            write_labels,
            overwrite,
            eval_dataset,
            summary,
            progress,
            checkpoint,
            seed,
            niter,
        )
    if name_vocab is not None:
        summary.names = name_clusters(res.centroids, name_vocab)
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary


def _write_and_eval(
    store,
    fs,
    tensor,
    assigns,
    res,
    k,
    write_labels,
    overwrite,
    eval_dataset,
    summary,
    progress,
    checkpoint,
    seed,
    niter,
) -> None:
    """Pixel maps of the assignments -> label set and/or Hungarian evaluation."""
    from featurestore.labelsets import create_label_set

    ls = None
    if write_labels:
        ls = create_label_set(
            store,
            write_labels,
            {
                "class_names": [[f"cluster {j}"] for j in range(k)],
                "kind": "mask set",
                "method": "kmeans-codebook",
                "features": fs.key,
                "tensor": tensor,
                "k": k,
                "spherical": res.spherical,
                "seed": seed,
                "niter": niter,
                "aligned_checkpoint": checkpoint,
            },
            overwrite=overwrite,
        )
        arr = ls.group.create_array(
            "centroids", shape=tuple(res.centroids.shape), dtype="float32", overwrite=True
        )
        arr[...] = res.centroids.numpy()
        summary.label_set = write_labels
    spec, gts = None, {}
    if eval_dataset:
        from featurestore.datasets import get_dataset, list_dataset_images

        ds, root, split = eval_dataset
        spec = get_dataset(ds, root) if ds == "custom" else get_dataset(ds)
        ids = {i: n for n, i in enumerate(store.image_ids)}
        gts = {
            ids[r.image_id]: r.label_path
            for r in list_dataset_images(ds, root, split)
            if r.image_id in ids and ids[r.image_id] in assigns
        }
        if not gts:
            raise OvssError(f"none of the clustered images is a {ds} {split or ''} image")
    maps: dict[int, np.ndarray] = {}
    conf = np.zeros((k, spec.num_classes if spec else 1), dtype=np.int64)
    from featurestore.labels import load_label

    for j, (i, a) in enumerate(assigns.items()):
        if ls is None and i not in gts:
            continue
        f = fs.read(i, names=[])
        pix = token_map_to_pixels(a.numpy(), f)
        if ls is not None:
            ls.write(i, pix)
        if i in gts:
            gt = load_label(spec, gts[i])
            ok = gt < spec.num_classes
            conf += np.bincount(pix[ok] * spec.num_classes + gt[ok], minlength=conf.size).reshape(
                conf.shape
            )
            maps[i] = pix
        if progress:
            progress("assignments", j + 1, len(assigns))
    if spec is not None:
        from methods.metrics import IoUAccumulator

        mapping = hungarian_match(conf)
        acc = IoUAccumulator(spec.num_classes)
        for i, pix in maps.items():
            acc.update(mapping[pix], load_label(spec, gts[i]))
        m = acc.compute().to_dict()
        summary.eval = {
            "dataset": eval_dataset[0],
            "split": eval_dataset[2],
            "images": len(maps),
            "mIoU": m["mIoU"],
            "mAcc": m["mAcc"],
            "aAcc": m["aAcc"],
            "cluster_to_class": mapping.tolist(),
            "chance_mIoU": round(100 / spec.num_classes, 2),
        }


# --------------------------------------------------------------------------------------------
# One request, one call (``ovss cluster``)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KMeansConfig:
    """k-means settings of a clustering run (the options of ``ovss cluster``).

    Attributes:
        k: clusters: masks per image (PixelCLIP's DINO masks: 16) or the codebook size; at
            least 1.
        niter: Lloyd iterations [ours: 20; FAISS's own default is 25]; at least 1.
        spherical: cosine k-means on L2-normalised tokens (off: L2 k-means).
        seed: k-means seed (initialisation and subsampling) [ours: 0].
        backend: k-means backend [ours: auto = FAISS when installed, unless the device is a
            CUDA GPU and FAISS has no GPU support (faiss-cpu): torch on that GPU then; torch
            when FAISS is missing]. torch: k distinct random points as initial centroids, an
            empty cluster re-seeded with the worst-fitting point [ours].
        max_points: codebook: train on a seeded random subset of this many tokens (null: all
            of them; FAISS's own default would silently use k*256); every token is assigned.
    """

    k: int = 16
    niter: int = 20
    spherical: bool = False
    seed: int = 0
    backend: str = field(default="auto", metadata={"choices": ("auto", "faiss", "torch")})
    max_points: int | None = None

    def __post_init__(self) -> None:
        for name in ("k", "niter", "max_points"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"option {name} must be at least 1, got {v}")


@dataclass(frozen=True)
class ClusterRequest:
    """One ``ovss cluster`` run: per-image masks or a store-level codebook.

    Attributes:
        store: the feature store (path or URL).
        features: feature set key, or a model with one set in the store.
        config: the k-means settings.
        tensor: the token tensor clustered (``patch``).
        per_image: k-means of each image's tokens into ``config.k`` masks, written as a label
            set (mask set); else one codebook over the tokens of every selected image.
        device: ``auto`` (a GPU when there is one, see ``featurestore.extract.resolve_device``),
            ``cpu``, ``cuda[:N]`` or ``mps``: where the torch k-means (and an aligned module)
            run.
        name: label set written (per image default ``kmeans<k>-<features>``; the codebook
            writes one only when named).
        overwrite: replace an existing label set of that name.
        eval_dataset, data_root, split: codebook: cluster only that dataset split's images and
            score the assignments against its ground truth (Hungarian matching).
        name_with: codebook: name each centroid by its nearest queries of this vocabulary
            (dataset, class file or comma list); needs text-space features.
        checkpoint: codebook: cluster the aligned features of this ``ovss align`` checkpoint.
        text: how ``name_with`` is embedded (``methods.train.TextOptions``; model and templates
            default to the checkpoint's recorded ones, else ``clip-b16`` / ``single``).
    """

    store: str
    features: str
    config: KMeansConfig = field(default_factory=KMeansConfig)
    tensor: str = "patch"
    per_image: bool = False
    device: str = "auto"
    name: str | None = None
    overwrite: bool = False
    eval_dataset: str | None = None
    data_root: str | None = None
    split: str | None = None
    name_with: str | None = None
    checkpoint: str | None = None
    text: Any = None


def _eval_indices(request: ClusterRequest) -> list[int] | None:
    """The store indices of the ``eval_dataset`` split's images (None: every image)."""
    if not request.eval_dataset:
        return None
    from featurestore.datasets import list_dataset_images

    ids = {i: n for n, i in enumerate(FeatureStore.open(request.store).image_ids)}
    return sorted(
        ids[r.image_id]
        for r in list_dataset_images(request.eval_dataset, request.data_root, request.split)
        if r.image_id in ids
    )


def _naming_vocab(request: ClusterRequest) -> Any:
    """The ``name_with`` vocabulary embedded in the checkpoint's text space (explicit text
    options win over what the checkpoint records)."""
    from featurestore.text import parse_vocab
    from methods.train import TextOptions, embed_classes

    text = request.text or TextOptions()
    recorded: dict[str, Any] = {}
    if request.checkpoint:
        from methods.aligned import checkpoint_provenance

        recorded = checkpoint_provenance(request.checkpoint).get("vocabulary", {})
    vocab, _ = embed_classes(
        request.store,
        parse_vocab(request.name_with),
        text.text_model or recorded.get("text_model") or "clip-b16",
        text.templates or recorded.get("templates") or "single",
        text,
        seed=request.config.seed,
    )
    return vocab


def run_cluster(request: ClusterRequest, progress: Progress | None = None) -> ClusterSummary:
    """Run one clustering request (:func:`cluster_per_image` or :func:`cluster_store`).

    Raises:
        OvssError: codebook-only settings with ``per_image``, ``eval_dataset`` without
            ``data_root``, or any error of the functions it calls.
    """
    from featurestore.extract import resolve_device

    cfg = request.config
    if request.per_image and (request.eval_dataset or request.name_with or request.checkpoint):
        raise OvssError("evaluation, naming and aligned checkpoints apply to the codebook mode")
    if request.eval_dataset and not request.data_root:
        raise OvssError(f"evaluating against {request.eval_dataset} needs its data root")
    shared = dict(
        tensor=request.tensor,
        niter=cfg.niter,
        spherical=cfg.spherical,
        seed=cfg.seed,
        backend=cfg.backend,
        overwrite=request.overwrite,
        progress=progress,
        device=str(resolve_device(request.device)),
    )
    if request.per_image:
        return cluster_per_image(
            request.store, request.features, cfg.k, name=request.name, **shared
        )
    return cluster_store(
        request.store,
        request.features,
        cfg.k,
        max_points=cfg.max_points,
        indices=_eval_indices(request),
        write_labels=request.name,
        eval_dataset=(
            (request.eval_dataset, request.data_root, request.split)
            if request.eval_dataset
            else None
        ),
        name_vocab=_naming_vocab(request) if request.name_with else None,
        checkpoint=request.checkpoint,
        **shared,
    )
