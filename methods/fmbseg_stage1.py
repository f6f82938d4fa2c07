"""``fmbseg-stage1``: FMbSeg Stage 1 pseudo-labels from cached CLIP crops and SAM (METHODS.md §1.1).

Inputs, all from the store: CLIP sliding-window crops (``global``: each crop's image embedding,
its CLS token through CLIP's head; ``pre_last`` / ``pre_last_cls``: the tokens entering the last
block) and one SAM ``embedding`` per image. Per image:

1. **Detection.** Each crop is assigned the class of its best query,
   ``argmax_q <l2n(global_c), t_q>``; a class is *present* when at least ``min_crops`` crops are
   assigned to it.
2. **Dense features.** The bare value path of §0.5 (``out_proj(W_v ln_1(x) + b_v)``, no residual,
   no MLP, then ``ln_post`` and ``proj``) per window, spliced onto the canvas patch grid
   (``ceil(Hc / p) x ceil(Wc / p)``; a token takes the mean of every window covering its centre).
3. **Stage 1.1.** For each present class, the cosine map of the dense grid with the class (max
   over its synonyms); the pixel centres of the ``top_k`` most similar patches, mapped to the
   original image, are positive point prompts to SAM (``multimask_output=True``); the mask with
   the highest predicted IoU is kept, scored by that IoU.
4. **Stage 1.2.** SAM's automatic masks decoded from the cached embedding (predicted-IoU and
   stability filters, box NMS, ``min_area``); each gets the present class whose text embedding is
   most similar to the mask's mean dense feature.
5. **Merge [ours].** Stage 1.1 masks first (where they overlap, the higher SAM score wins);
   Stage 1.2 masks then label only pixels still unlabelled (in decreasing predicted IoU); every
   other pixel is ignore (255). ``stage`` = ``1.1`` / ``1.2`` runs one of the two alone.

How it plugs into the shared driver (``methods.segment.segment_image``): ``cosine_logits``
returns the bare-value dense cosine logits on the spliced patch grid (so scoring, score maps and
``--write-labels`` work unchanged), and the real Stage-1 labelling happens in the ``refine`` hook,
which *replaces* the driver's labels: class indices where Stage 1 labelled a pixel, 255
elsewhere, and as ``max_prob`` the SAM score of the chosen mask (0 where ignored). ``ovss eval``
scores the ignore pixels as wrong predictions (they fall in no class).

Choices marked [ours] (the paper has no public code):

- ``min_crops`` = 2. An image small enough to be a single crop therefore detects nothing.
- The CLIP crops' assignment and the per-class similarity map merge synonyms by max over queries.
- A mask's "mean CLIP dense feature" is the mean of the l2-normalised patch features of the
  patches under its pixels (each pixel takes its nearest patch), so large patches of the mask
  weigh by their pixel count.
- Stage 1.2's minimum area ``min_area`` = 0 pixels (at the original size); SAM's own
  ``min_mask_region_area`` (hole / island removal, needs OpenCV) is off.
- Overlapping Stage 1.2 masks: the one with the higher predicted IoU labels the pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.protocol import Protocol
from methods.base import (
    FeatureRequirement,
    Segmenter,
    Vocab,
    VocabularyDefaults,
    register_method,
)

IGNORE = 255
TEMPLATES = "single"  # FMbSeg's one template, "a photo of a {}." (the paper)
STAGES = ("both", "1.1", "1.2")


@dataclass
class FMbSegStage1Config:
    """Options of ``fmbseg-stage1`` (defaults match the ``fmbseg`` extraction recipe).

    Attributes:
        clip_model: CLIP of the window feature set (crops' CLS + dense path); also the text model.
        sam_model: SAM of the per-image feature set.
        size, crop, stride: the CLIP protocol (shorter side S, sliding windows; docs/evaluation.md).
        sam_size: SAM's protocol (longest side, ``SamPredictor``'s input).
        min_crops: a class is present if at least this many crops are assigned to it [ours: 2].
        top_k: point prompts per present class (the most similar patches; paper: 5).
        stage: ``both``, ``1.1`` (point-prompted masks only) or ``1.2`` (automatic masks only).
        points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
            box_nms_thresh: SAM's automatic mask generator (its defaults).
        min_area: Stage 1.2 masks smaller than this many pixels are dropped [ours: 0].
        sam_weights: SAM checkpoint (default: the one recorded for the feature set).
        class_family: class-file family for dataset vocabularies (``sclip``).
    """

    clip_model: str = "clip-l14"
    sam_model: str = "sam-h"
    size: int = 448
    crop: int = 224
    stride: int = 112
    sam_size: int = 1024
    min_crops: int = 2
    top_k: int = 5
    stage: str = "both"
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    min_area: int = 0
    sam_weights: str | None = None
    class_family: str = "sclip"

    def __post_init__(self) -> None:
        # `--set stage=1.2` parses as the number 1.2: take it back as the stage name
        if isinstance(self.stage, (int, float)) and not isinstance(self.stage, bool):
            self.stage = f"{self.stage:g}"

    @property
    def clip_protocol(self) -> Protocol:
        """The CLIP window protocol (``fmbseg`` recipe: short 448, crop 224, stride 112)."""
        return Protocol(resize="short", size=self.size, crop=self.crop, stride=self.stride)

    @property
    def sam_protocol(self) -> Protocol:
        """SAM's protocol (longest side ``sam_size``)."""
        return Protocol(resize="long", size=self.sam_size)

    @property
    def text_model(self) -> str:
        """The CLIP whose text tower embeds the vocabulary: the crops' CLIP."""
        return self.clip_model


# --------------------------------------------------------------------------------------------
# The pieces (pure functions on tensors; the tests drive them with controlled inputs)
# --------------------------------------------------------------------------------------------


def class_similarities(
    feats: torch.Tensor, text: torch.Tensor, query_to_class: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Cosine of features with each class: ``(n, E)`` -> ``(n, C)``, max over a class's queries
    (``-inf`` for a class with no query)."""
    cos = F.normalize(feats.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    out = torch.full((cos.shape[0], num_classes), float("-inf"), device=cos.device)
    q2c = query_to_class.long().to(cos.device)
    return out.scatter_reduce(1, q2c[None].expand(cos.shape[0], -1), cos, reduce="amax")


def detect_classes(
    crop_embeddings: torch.Tensor,
    text: torch.Tensor,
    query_to_class: torch.Tensor,
    num_classes: int,
    min_crops: int,
) -> list[int]:
    """Classes present in an image: assigned (best query's class) to ``>= min_crops`` crops.

    Args:
        crop_embeddings: ``(n_crops, E)`` CLIP image embeddings of the crops.
        text: ``(Q, E)`` query embeddings.
        query_to_class: ``(Q,)`` class of each query.
        num_classes: ``C``.
        min_crops: minimum number of crops.

    Returns:
        The present class indices, ascending.
    """
    cos = F.normalize(crop_embeddings.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    assigned = query_to_class.long().to(cos.device)[cos.argmax(dim=1)]
    counts = torch.bincount(assigned, minlength=num_classes)
    return [int(c) for c in torch.nonzero(counts >= min_crops).reshape(-1)]


def patch_centres(
    grid_hw: tuple[int, int], patch: int, canvas_hw: tuple[int, int], original_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres ``(ys, xs)`` of the canvas token grid's rows and columns, in original-image
    coordinates (``patch * (t + 1/2)`` clamped inside the canvas, then scaled)."""
    out = []
    for n, limit, orig in zip(grid_hw, canvas_hw, original_hw, strict=True):
        c = np.minimum(patch * (np.arange(n) + 0.5), limit - 0.5)
        out.append(c * orig / limit)
    return out[0], out[1]


def top_k_points(sim: torch.Tensor, k: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``(k, 2)`` ``(x, y)`` original-image points of the ``k`` most similar patches of a
    ``(gh, gw)`` similarity map (fewer when the grid is smaller)."""
    gh, gw = sim.shape
    idx = torch.topk(sim.reshape(-1).float(), min(k, gh * gw)).indices.cpu().numpy()
    return np.stack([xs[idx % gw], ys[idx // gw]], axis=1).astype(np.float32)


class PointPredictor(TypingProtocol):
    """What Stage 1.1 needs of ``SamPredictor`` (set to the image)."""

    def predict(
        self, point_coords: np.ndarray, point_labels: np.ndarray, multimask_output: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass
class ScoredMask:
    """A binary mask ``(H, W)`` at the original size, its class and SAM score."""

    mask: np.ndarray
    cls: int
    score: float
    stage: str = "1.1"
    points: np.ndarray | None = field(default=None, repr=False)


def stage11_masks(
    predictor: PointPredictor,
    dense_grid: torch.Tensor,
    text: torch.Tensor,
    query_to_class: torch.Tensor,
    num_classes: int,
    present: Sequence[int],
    centres: tuple[np.ndarray, np.ndarray],
    top_k: int,
) -> list[ScoredMask]:
    """Stage 1.1: per present class, the best of SAM's 3 masks for its top-k patch points.

    Args:
        predictor: a predictor set to the image (``CachedSamPredictor``).
        dense_grid: ``(gh, gw, E)`` dense CLIP features on the canvas patch grid.
        text, query_to_class, num_classes: the vocabulary.
        present: detected classes.
        centres: ``(ys, xs)`` of ``patch_centres``.
        top_k: points per class.

    Returns:
        One ``ScoredMask`` per present class (score = the kept mask's predicted IoU).
    """
    gh, gw, e = dense_grid.shape
    sims = class_similarities(dense_grid.reshape(-1, e), text, query_to_class, num_classes)
    out = []
    for c in present:
        points = top_k_points(sims[:, c].reshape(gh, gw), top_k, *centres)
        masks, iou, _ = predictor.predict(
            point_coords=points,
            point_labels=np.ones(len(points), dtype=np.int64),
            multimask_output=True,
        )
        best = int(np.argmax(iou))
        out.append(ScoredMask(np.asarray(masks[best], bool), c, float(iou[best]), "1.1", points))
    return out


def nearest_patch_index(
    original_hw: tuple[int, int], canvas_hw: tuple[int, int], grid_hw: tuple[int, int], patch: int
) -> np.ndarray:
    """``(H, W)`` flat index of the canvas patch under each original pixel (its centre mapped
    onto the canvas)."""
    idx = []
    for orig, limit, n in zip(original_hw, canvas_hw, grid_hw, strict=True):
        pos = (np.arange(orig) + 0.5) * limit / orig
        idx.append(np.minimum((pos // patch).astype(np.int64), n - 1))
    return idx[0][:, None] * grid_hw[1] + idx[1][None, :]


def label_auto_masks(
    records: Sequence[dict[str, Any]],
    dense_grid: torch.Tensor,
    pixel_patch: np.ndarray,
    text: torch.Tensor,
    query_to_class: torch.Tensor,
    num_classes: int,
    present: Sequence[int],
    min_area: int = 0,
) -> list[ScoredMask]:
    """Stage 1.2: each automatic mask gets the present class most similar to its mean feature.

    Args:
        records: ``SamAutomaticMaskGenerator`` records (``segmentation`` ``(H, W)`` bool,
            ``predicted_iou``).
        dense_grid: ``(gh, gw, E)`` dense features.
        pixel_patch: ``(H, W)`` of ``nearest_patch_index``.
        text, query_to_class, num_classes: the vocabulary.
        present: detected classes (nothing is labelled without one).
        min_area: masks with fewer pixels are dropped.

    Returns:
        Labelled masks (score = predicted IoU), in the records' order.
    """
    if not present:
        return []
    gh, gw, e = dense_grid.shape
    feats = F.normalize(dense_grid.reshape(-1, e).float(), dim=-1)
    allowed = torch.tensor(list(present), device=feats.device)
    out = []
    for r in records:
        mask = np.asarray(r["segmentation"], bool)
        area = int(mask.sum())
        if area == 0 or area < min_area:
            continue
        weights = np.bincount(pixel_patch[mask], minlength=gh * gw).astype(np.float32)
        mean = torch.from_numpy(weights).to(feats.device) @ feats / area
        sims = class_similarities(mean[None], text, query_to_class, num_classes)[0]
        c = int(allowed[sims[allowed].argmax()])
        out.append(ScoredMask(mask, c, float(r["predicted_iou"]), "1.2"))
    return out


def merge_stage1(
    masks11: Sequence[ScoredMask], masks12: Sequence[ScoredMask], hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The merge rule [ours]: 1.1 masks (higher score wins on overlap), then 1.2 masks on the
    pixels left unlabelled (higher score first), 255 elsewhere.

    Returns:
        ``(labels, scores)``: ``(H, W)`` int64 labels and float32 SAM scores (0 where ignored).
    """
    labels = np.full(hw, IGNORE, dtype=np.int64)
    scores = np.full(hw, -np.inf, dtype=np.float32)
    for m in masks11:
        win = m.mask & (m.score > scores)
        labels[win], scores[win] = m.cls, m.score
    for m in sorted(masks12, key=lambda m: -m.score):  # stable: ties keep the records' order
        win = m.mask & (labels == IGNORE)
        labels[win], scores[win] = m.cls, m.score
    scores[labels == IGNORE] = 0.0
    return labels, scores


# --------------------------------------------------------------------------------------------
# The segmenter
# --------------------------------------------------------------------------------------------


@dataclass
class _Dense:
    """One image's CLIP side: spliced dense grid, crop embeddings, geometry."""

    index: int
    grid: torch.Tensor  # (gh, gw, E)
    crops: torch.Tensor  # (n_crops, E)
    patch: int
    canvas_hw: tuple[int, int]


@register_method
class FMbSegStage1Segmenter(Segmenter):
    name = "fmbseg-stage1"
    Config = FMbSegStage1Config
    doc = (
        "FMbSeg Stage 1 pseudo-labels: CLIP crop detection (min_crops [ours: 2]; synonyms "
        "merged by max [ours]), SAM masks from top-5 patch points (1.1) and automatic masks "
        "(1.2, min_area [ours: 0 px]) labelled by the mean l2n dense feature under the mask "
        "[ours], merged [ours: 1.1 first]; 255 = unlabelled; --set stage=1.1|1.2; templates: "
        "single (the paper's)"
    )

    @classmethod
    def requirements(cls, config: FMbSegStage1Config) -> list[FeatureRequirement]:
        if config.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {config.stage!r}")
        if config.min_crops < 1 or config.top_k < 1:
            raise ValueError("min_crops and top_k must be at least 1")
        return [
            FeatureRequirement(
                "clip",
                config.clip_model,
                config.clip_protocol,
                ("pre_last", "global"),
                "clip_model",
            ),
            FeatureRequirement(
                "sam", config.sam_model, config.sam_protocol, ("embedding",), "sam_model"
            ),
        ]

    @classmethod
    def vocabulary_defaults(cls, config: FMbSegStage1Config) -> VocabularyDefaults:
        """The crops' CLIP, FMbSeg's one template (``single``: "a photo of a {}.", as in the
        paper) and the SCLIP class files."""
        return VocabularyDefaults(
            text_model=config.text_model, templates=TEMPLATES, family=config.class_family
        )

    def __init__(self, store: Any, config: FMbSegStage1Config, device: str | torch.device = "cpu"):
        super().__init__(store, config, device)
        from methods.clip_dense import LastBlock

        self.block = LastBlock.from_feature_set(self.sets["clip"]).to(self.device)
        self._dense: _Dense | None = None
        self._model: Any = None

    # -- CLIP side ----------------------------------------------------------------------------
    def dense(self, index: int) -> _Dense:
        """Bare-value dense features spliced on the canvas patch grid and the crops' embeddings
        (cached for the last image: ``cosine_logits`` then ``refine`` read the same)."""
        if self._dense is not None and self._dense.index == index:
            return self._dense
        from methods.clip_dense import bare_value_dense
        from methods.trident import splice_windows

        f = self.sets["clip"].read(index, names=["pre_last", "global"])
        windows = []
        with torch.inference_mode():
            for grid in f.window_tokens("pre_last"):
                gh, gw = grid.shape[:2]
                tokens = torch.from_numpy(np.asarray(grid, np.float32).reshape(gh * gw, -1))
                feat = bare_value_dense(tokens.to(self.device), None, self.block)
                windows.append(feat.float().reshape(gh, gw, -1))
        y1, _, y2, _ = (int(v) for v in f.win_box[0])
        top, _, bottom, _ = (int(v) for v in f.win_pad[0])
        patch = (y2 - y1 + top + bottom) // int(f.win_grid[0][0])
        canvas = tuple(int(s) for s in f.resized_size)
        spliced = splice_windows(windows, f.win_box, f.win_pad, canvas, patch)
        crops = torch.from_numpy(np.asarray(f.tensors["global"], np.float32)).to(self.device)
        self._dense = _Dense(index, spliced, crops, patch, canvas)
        return self._dense

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        """Bare-value dense cosine logits ``(Q, gh, gw)`` on the canvas patch grid and that grid
        size (what the driver scores; ``refine`` then replaces the labels by Stage 1's)."""
        d = self.dense(index)
        gh, gw, e = d.grid.shape
        text = F.normalize(vocab.embeddings.float(), dim=-1).to(self.device)
        cos = F.normalize(d.grid.reshape(-1, e), dim=-1) @ text.T
        return cos.T.reshape(-1, gh, gw).cpu(), (gh, gw)

    # -- Stage 1 ------------------------------------------------------------------------------
    def _sam_model(self) -> Any:
        if self._model is None:
            from methods.sam_cache import load_sam_decoder_for

            self._model = load_sam_decoder_for(self.sets["sam"], self.config.sam_weights)
            self._model = self._model.to(self.device).eval()
        return self._model

    def stage1(self, index: int, vocab: Vocab) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Stage-1 labels of one image at its original size.

        Returns:
            ``(labels, scores, present)``: ``(H, W)`` int64 labels (255 = unlabelled), float32
            SAM scores of the labelling masks (0 where unlabelled), the detected classes.
        """
        from methods.sam_cache import CachedSamPredictor

        cfg = self.config
        d = self.dense(index)
        text = F.normalize(vocab.embeddings.float(), dim=-1).to(self.device)
        q2c, nc = vocab.query_to_class, vocab.num_classes
        present = detect_classes(d.crops, text, q2c, nc, cfg.min_crops)
        sam = self.sets["sam"].read(index, names=["embedding"])
        hw = tuple(int(s) for s in sam.original_size)
        gh, gw = d.grid.shape[:2]
        masks11: list[ScoredMask] = []
        masks12: list[ScoredMask] = []
        if present and cfg.stage in ("both", "1.1"):
            predictor = CachedSamPredictor(self._sam_model())
            predictor.set_features(sam)
            centres = patch_centres((gh, gw), d.patch, d.canvas_hw, hw)
            with torch.inference_mode():
                masks11 = stage11_masks(
                    predictor, d.grid, text, q2c, nc, present, centres, cfg.top_k
                )
        if present and cfg.stage in ("both", "1.2"):
            records = generate_masks(self._sam_model(), sam, cfg)
            pixel_patch = nearest_patch_index(hw, d.canvas_hw, (gh, gw), d.patch)
            masks12 = label_auto_masks(
                records, d.grid, pixel_patch, text, q2c, nc, present, cfg.min_area
            )
        labels, scores = merge_stage1(masks11, masks12, hw)
        return labels, scores, present

    def refine(
        self,
        index: int,
        cos: torch.Tensor,
        labels: np.ndarray,
        max_prob: np.ndarray,
        vocab: Vocab,
        scoring: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The driver's second-stage hook: returns Stage 1's labels and scores instead of the
        dense-logit labels (``cos``, ``labels``, ``max_prob`` and ``scoring`` are not used)."""
        new_labels, scores, _ = self.stage1(index, vocab)
        if new_labels.shape != labels.shape:
            raise ValueError(f"Stage 1 labels {new_labels.shape} != image size {labels.shape}")
        return new_labels, scores


def generate_masks(model: Any, sam: Any, cfg: FMbSegStage1Config) -> list[dict[str, Any]]:
    """SAM automatic masks of one cached image with the config's generator options."""
    from methods.sam_cache import generate_masks_cached

    with torch.inference_mode():
        return generate_masks_cached(
            model,
            sam,
            points_per_side=cfg.points_per_side,
            points_per_batch=cfg.points_per_batch,
            pred_iou_thresh=cfg.pred_iou_thresh,
            stability_score_thresh=cfg.stability_score_thresh,
            box_nms_thresh=cfg.box_nms_thresh,
        )
