"""``ovss tune``: label-free hyperparameter search where a method defines one (PnP-OVSS, paper 003).

PnP-OVSS's reward (paper Eq. 4-5) needs no segmentation labels: for an image ``I`` with classes
``K(I)`` and the mask ``M_k`` of each class under a candidate configuration,

    reward(I) = Σ_k 1[Pr(M_k ⊙ I, k) > Pr(0, k)],
    Pr(J, k) = softmax over k' in K(I) of 100 · cos(CLIP_image(J), CLIP_text(k')),

``0`` the all-black image. The total over a sample of images is maximised by random search over
the layer, the head, the threshold T and the blur σ (the paper's Table 2: layer 1-12, head 1-12,
T 0.05-0.45 step 0.1; σ values are not given).

Choices marked [ours]:

- one random search over the joint grid (the paper tunes layer/head/T on GradCAM masks first,
  then σ on the masks before the CRF): ``M_k`` is the final mask ``labels == k`` of the trial's
  full pipeline (blur and CRF included);
- σ candidates ``BLUR_SIGMAS``; grid points are drawn without replacement (``seed``);
- ``K(I)``: the image's classes from ``image_classes`` when given (the paper's setting: the
  class names appearing in each image), else every vocabulary class but ``background``;
- the masked image is the original image with the pixels outside ``M_k`` black, squashed to the
  CLIP's native square input (``CLIPBackbone.preprocess_image``); a class's text embedding is
  the mean of its synonyms' (renormalised) under the chosen templates (default ``single``);
- the Saliency DropOut maps of each (layer, head) are computed once per image and reused by
  every T and σ of that pair (T and σ do not change which patches are dropped).

The trials log (JSON lines) makes a search resumable: trials already in it are not run again
(it must be of the same images); the best configuration is written as JSON that ``segment`` /
``eval`` take with ``--config FILE``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.errors import OvssError

Progress = Callable[[str, int, int], None]

LAYERS = tuple(range(1, 13))
HEADS = tuple(range(1, 13))
THRESHOLDS = (0.05, 0.15, 0.25, 0.35, 0.45)
BLUR_SIGMAS = (0.025, 0.05, 0.075, 0.1)
SEARCH_KEYS = ("layer", "head", "threshold", "blur_sigma")
CLIP_LOGIT_SCALE = 100.0


class TrialsLogMismatchError(OvssError):
    """A trials log was written for other images or another search.

    Attributes:
        log: the log's path.
    """

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


@dataclass
class TuneRequest:
    """What ``ovss tune`` runs.

    Attributes:
        store: the store of the images (its recorded paths are read).
        vocab_spec: the vocabulary (``list:a,b``, ``file:PATH``, ``dataset:NAME``).
        method: the method to tune (only ``pnp-ovss`` defines a reward).
        settings: the method's other options (``--set``), kept fixed.
        trials: random-search trials.
        sample: images drawn from the store for the reward (0 = all).
        seed: seed of the image sample and of the search.
        clip_model: the reward CLIP (the paper: ViT-L/14 at 336 px).
        templates: prompt templates of the reward's class texts.
        random_init, clip_seed, clip_arch_overrides, clip_weights: the reward CLIP's weights, as
            for ``ovss extract`` (random-init for tests and demos).
        layers, heads, thresholds, blur_sigmas: the grid (layers/heads counted from 1, cut to
            the model's size).
        log: trials log (JSON lines); resumed when it exists.
        out: where the best configuration is written (JSON), or None.
        device: where BLIP and CLIP run: ``auto`` (a GPU when there is one, see
            ``featurestore.extract.resolve_device``), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        data_root: root of a ``custom`` dataset vocabulary.
    """

    store: str
    vocab_spec: str
    method: str = "pnp-ovss"
    settings: dict[str, Any] = field(default_factory=dict)
    trials: int = 20
    sample: int = 16
    seed: int = 0
    clip_model: str = "clip-l14-336"
    templates: str = "single"
    random_init: bool = False
    clip_seed: int = 0
    clip_arch_overrides: dict | None = None
    clip_weights: str | None = None
    layers: tuple[int, ...] = LAYERS
    heads: tuple[int, ...] = HEADS
    thresholds: tuple[float, ...] = THRESHOLDS
    blur_sigmas: tuple[float, ...] = BLUR_SIGMAS
    log: str | None = None
    out: str | None = None
    device: str = "auto"
    data_root: str | None = None


@dataclass
class TuneResult:
    """Trials (in run order, each ``{trial, params, reward, max_reward, seconds, resumed}``),
    the best one, and the configuration written."""

    method: str
    clip_model: str
    images: list[str]
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    best_settings: dict[str, Any]
    log: str | None
    out: str | None
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------
# The reward (pure functions)
# --------------------------------------------------------------------------------------------


def class_probabilities(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """``Pr(J, k)``: ``(B, E)`` image and ``(K, E)`` class embeddings -> ``(B, K)`` softmax over
    the classes of ``100 · cos``."""
    a = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    b = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    return torch.softmax(CLIP_LOGIT_SCALE * a @ b.T, dim=-1)


def image_reward(masked_probs: torch.Tensor, black_probs: torch.Tensor) -> int:
    """``Σ_k 1[Pr(M_k ⊙ I, k) > Pr(0, k)]``: ``masked_probs`` ``(K, K)`` (row k: the image
    masked to class k), ``black_probs`` ``(K,)`` (the black image)."""
    return int((masked_probs.diagonal() > black_probs).sum())


def masked_images(image: np.ndarray, labels: np.ndarray, classes: list[int]) -> list[np.ndarray]:
    """Per class ``c``, the image with every pixel not labelled ``c`` black."""
    return [np.where((labels == c)[..., None], image, 0).astype(np.uint8) for c in classes]


class ClipReward:
    """The reward CLIP: image embeddings of masked images and class text embeddings."""

    def __init__(self, clip: Any, class_text: torch.Tensor):
        self.clip = clip.eval()
        self.class_text = class_text  # (C, E) per vocabulary class
        self._black: dict[tuple[int, ...], torch.Tensor] = {}

    def embed(self, images: list[np.ndarray]) -> torch.Tensor:
        dev = next(self.clip.parameters()).device
        x = torch.stack([self.clip.preprocess_image(im, None) for im in images]).to(dev)
        return self.clip.forward_image(x)["global_image"].float().cpu()

    def reward(self, image: np.ndarray, local_labels: np.ndarray, classes: list[int]) -> int:
        """The reward of one image: ``local_labels`` value ``j + 1`` is the mask of
        ``classes[j]`` (a vocabulary index), as ``pnp_ovss.maps_to_labels`` returns."""
        if not classes:
            return 0
        text = self.class_text[classes]
        key = tuple(classes)
        if key not in self._black:
            black = np.zeros((16, 16, 3), np.uint8)
            self._black[key] = class_probabilities(self.embed([black]), text)[0]
        masks = masked_images(image, local_labels, list(range(1, len(classes) + 1)))
        return image_reward(class_probabilities(self.embed(masks), text), self._black[key])


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


def draw_trials(
    n: int,
    rng: np.random.Generator,
    layers: tuple[int, ...],
    heads: tuple[int, ...],
    thresholds: tuple[float, ...],
    blur_sigmas: tuple[float, ...],
) -> list[dict[str, Any]]:
    """``n`` distinct grid points in random order (fewer when the grid is smaller)."""
    grid = [
        {"layer": int(a), "head": int(b), "threshold": float(t), "blur_sigma": float(s)}
        for a in layers
        for b in heads
        for t in thresholds
        for s in blur_sigmas
    ]
    order = rng.permutation(len(grid))[: min(n, len(grid))]
    return [grid[i] for i in order]


def _key(params: dict[str, Any]) -> str:
    return json.dumps({k: params[k] for k in SEARCH_KEYS}, sort_keys=True)


def read_log(path: Path, images: list[str]) -> dict[str, dict[str, Any]]:
    """Trials already in a log (by their parameters); a log of other images is an error."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("images") != images:
            raise TrialsLogMismatchError(
                f"trials log {path} was written for other images (sample, seed or store "
                "differ); give another log file or the same sample",
                log=str(path),
            )
        done[_key(row["params"])] = row
    return done


def _class_text(request: TuneRequest, store: Any) -> tuple[Any, torch.Tensor]:
    from featurestore.text import get_text_embeddings, parse_vocab
    from methods.segment import vocab_from_text

    te = get_text_embeddings(
        store,
        request.clip_model,
        parse_vocab(request.vocab_spec, data_root=request.data_root),
        request.templates,
        weights=request.clip_weights,
        random_init=request.random_init,
        seed=request.clip_seed,
        arch_overrides=request.clip_arch_overrides,
        device=request.device,
    )
    v = vocab_from_text(te, source=str(request.vocab_spec))
    out = torch.zeros(v.num_classes, v.embeddings.shape[1])
    for c in range(v.num_classes):
        members = v.embeddings[v.query_to_class == c]
        out[c] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return v, out


def tune(request: TuneRequest, progress: Progress | None = None) -> TuneResult:
    """Run the label-free random search (module doc) and write the log and the best config.

    Raises:
        OvssError: a method without a reward, an empty sample, a log of other images, and
            whatever the method or the CLIPs raise (one line each).
    """
    from featurestore.backbones import create_backbone
    from featurestore.extract import resolve_device
    from featurestore.store import FeatureStore
    from methods.base import build_config, get_method
    from methods.pnp_ovss import PnPOVSS, background_index, maps_to_labels

    request = replace(request, device=str(resolve_device(request.device)))
    cls = get_method(request.method)
    if not issubclass(cls, PnPOVSS):
        raise OvssError(f"method {request.method} defines no label-free reward (pnp-ovss does)")
    if request.trials < 1:
        raise OvssError("tune needs at least one trial")
    t0 = time.perf_counter()
    store = FeatureStore.open(request.store, mode="a")
    config = build_config(cls, None, request.settings)
    seg = cls(store, config, device=request.device)
    vocab, class_text = _class_text(request, store)
    clip = create_backbone(
        request.clip_model,
        weights=request.clip_weights,
        random_init=request.random_init,
        seed=request.clip_seed,
        arch_overrides=request.clip_arch_overrides,
    ).to(request.device)
    reward = ClipReward(clip, class_text)

    rng = np.random.default_rng(request.seed)
    candidates = [i for i in range(store.n_images) if not seg.too_small(i)]
    if request.sample and len(candidates) > request.sample:
        candidates = sorted(rng.choice(candidates, request.sample, replace=False).tolist())
    classes = {i: seg.image_class_indices(i, vocab) for i in candidates}
    indices = [i for i in candidates if classes[i]]
    if not indices:
        raise OvssError(f"no image of {request.store} can be scored (all skipped: {seg.skipped})")
    ids = [store.image_ids[i] for i in indices]
    has_background = background_index(vocab) is not None
    max_reward = sum(len(classes[i]) for i in indices)

    blip = seg.blip
    layers = tuple(x for x in request.layers if 1 <= x <= blip.num_text_layers)
    heads = tuple(x for x in request.heads if 1 <= x <= blip.num_text_heads)
    if not layers or not heads:
        raise OvssError(
            f"the layer/head grid is empty for {config.model} ({blip.num_text_layers} layers of "
            f"{blip.num_text_heads} heads)"
        )
    plan = draw_trials(request.trials, rng, layers, heads, request.thresholds, request.blur_sigmas)
    log = Path(request.log) if request.log else None
    done = read_log(log, ids) if log else {}
    images = {i: seg.load_image(i) for i in indices}
    maps_cache: dict[tuple[int, int, int], torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    for n, params in enumerate(plan, start=1):
        prev = done.get(_key(params))
        if prev is not None:
            rows.append({**prev, "trial": n, "resumed": True})
            if progress:
                progress("tune", n, len(plan))
            continue
        t = time.perf_counter()
        total = 0
        for i in indices:
            mk = (i, params["layer"], params["head"])
            if mk not in maps_cache:
                maps_cache[mk] = seg.summed_maps(
                    i, classes[i], vocab, layer=params["layer"], head=params["head"]
                )
            local, _ = maps_to_labels(
                maps_cache[mk],
                images[i],
                threshold=params["threshold"],
                blur_sigma=params["blur_sigma"],
                crf_backend=seg.crf_backend,
                crf_params=config.crf_params,
                background=has_background,
            )
            total += reward.reward(images[i], local, classes[i])
        row = {
            "trial": n,
            "params": params,
            "reward": total,
            "max_reward": max_reward,
            "seconds": round(time.perf_counter() - t, 3),
            "images": ids,
            "resumed": False,
        }
        rows.append(row)
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as fh:
                fh.write(json.dumps({k: v for k, v in row.items() if k != "resumed"}) + "\n")
        if progress:
            progress("tune", n, len(plan))
    best = max(rows, key=lambda r: (r["reward"], -r["trial"]))
    best_settings = {**request.settings, **best["params"]}
    if request.out:
        Path(request.out).parent.mkdir(parents=True, exist_ok=True)
        Path(request.out).write_text(
            json.dumps(
                {
                    "method": request.method,
                    "settings": best_settings,
                    "reward": best["reward"],
                    "max_reward": max_reward,
                    "clip_model": request.clip_model,
                    "images": ids,
                    "crf_backend": seg.crf_backend,
                },
                indent=2,
            )
        )
    return TuneResult(
        method=request.method,
        clip_model=request.clip_model,
        images=ids,
        trials=[{k: v for k, v in r.items() if k != "images"} for r in rows],
        best={k: v for k, v in best.items() if k != "images"},
        best_settings=best_settings,
        log=str(log) if log else None,
        out=request.out,
        seconds=round(time.perf_counter() - t0, 3),
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Method options from a JSON file: ``tune``'s output (``{"settings": {...}}``) or a flat
    ``{option: value}`` object; the same options ``--set`` takes.

    Raises:
        OvssError: no file, not JSON, or not an object of options.
    """
    p = Path(path)
    if not p.is_file():
        raise OvssError(f"no config file at {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise OvssError(f"config file {p} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("settings"), dict):
        data = data["settings"]
    if not isinstance(data, dict):
        raise OvssError(f"config file {p} must hold a JSON object of method options")
    return dict(data)
