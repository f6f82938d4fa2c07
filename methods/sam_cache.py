"""SAM from the feature store: global attention, prompt decoding and automatic masks, no encoder.

Everything here reads what ``featurestore.backbones.sam`` caches (see its module docstring):
per image the neck ``embedding`` ``(1, C, S, S)``, the last global-attention block's ``q``/``k``/
``v`` ``(n, H, hd)`` and ``attn_log_mass`` ``(n, H)`` for the ``n = gh*gw`` valid tokens (row-major
over the ``ceil`` grid ``win_grid[0]``), and per feature set the static arrays ``rel_pos_h``,
``rel_pos_w``, ``scale``, ``patch_size`` (``sam_static``).

- ``sam_attention``: the block's per-head softmax attention among valid tokens, either
  renormalised over the valid keys or normalised over the whole padded grid as inside the encoder.
- ``trident_sam_inputs``: exactly the SAM attention / values / embedding Trident crops
  (``METHODS.md`` §4 step 1).
- ``sam_window``: one window of a two-window (``Protocol(resize="halves")``) image as an image
  of its own (Trident's Cityscapes rule: SAM on the left and right halves).
- ``sam_frame``: an image of a set with SAM's pre-rounding (``Protocol.align``, Trident's input)
  in the frame SAM saw, the rounded image (``original_size`` = ``Protocol.rounded_size``).
- ``CachedSamPredictor``: ``SamPredictor`` on a cached embedding (point/box/mask prompts, Trident's
  step 7).
- ``generate_masks_cached``: ``SamAutomaticMaskGenerator`` on a cached embedding.
- ``load_sam_decoder`` / ``load_sam_decoder_for``: the prompt encoder + mask decoder alone.

Float16 stores (the default) round every cached value to 11 significant bits (relative error
<= 2**-11 = 4.9e-4); the decoders here run in float32 on the rounded values. Measured on
random-init models (no real checkpoint is available offline):

- prompt decoding: max |change| of the low-resolution mask logits 5e-5 on the tiny test model
  (logit spread 0.02) and 6.6e-5 on a full-size sam-b at 1024 px (spread 0.04), i.e. ~0.2% of
  the spread; IoU predictions move by < 2e-6; 0.006% of mask pixels flip (only pixels whose logit
  is that close to 0 can). The change scales with the logits, so trained models, whose logits are
  much larger, move by about the same fraction of them. ``tests/test_sam.py`` bounds it.
- attention: up to 6.6e-4 relative error per entry (full-size sam-b, both normalisations), from
  rounding ``q``/``k``; the relative error of an entry grows with the size of its logits.

Extract with ``dtype="float32"`` when masks must equal ``SamPredictor``'s bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam

from featurestore.backbones.sam import (
    STATIC_NAMES,
    attention_logits,
    decoder_weights_identity,
    load_sam_decoder,
    top_left_rows,
)
from featurestore.errors import OvssError, ProvenanceMismatchError
from featurestore.protocol import Protocol, half_columns
from featurestore.store import FeatureSet, ImageFeatures

__all__ = [
    "CachedSamPredictor",
    "TridentSamInputs",
    "crop_token_rows",
    "generate_masks_cached",
    "load_sam_decoder",
    "load_sam_decoder_for",
    "sam_attention",
    "sam_frame",
    "sam_static",
    "sam_window",
    "trident_grid",
    "trident_sam_inputs",
]

NORMALISATIONS = ("valid", "full")


def sam_static(fs: FeatureSet) -> dict[str, np.ndarray]:
    """The per-set arrays ``rel_pos_h``/``rel_pos_w`` ``(2S - 1, hd)``, ``scale`` ``(1,)`` and
    ``patch_size`` ``(1,)`` of a SAM feature set."""
    return {name: fs.static(name) for name in STATIC_NAMES}


def _tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(dtype)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def sam_attention(
    q: np.ndarray | torch.Tensor,
    k: np.ndarray | torch.Tensor,
    grid: tuple[int, int],
    static: Mapping[str, np.ndarray | torch.Tensor],
    *,
    heads: Sequence[int] | None = None,
    normalise: str = "valid",
    attn_log_mass: np.ndarray | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-head softmax attention of SAM's cached global-attention block among valid tokens.

    The encoder's block attends over its whole ``S x S`` token grid (64 x 64 = 4096 tokens for
    SAM at 1024 px), padding tokens included. Restricted to the ``n = gh*gw`` valid tokens (the
    top-left ``grid``, row-major), its logits are exactly those computed here
    (``featurestore.backbones.sam.attention_logits``: scaled ``q . k`` plus the decomposed
    relative-position bias of the block's own tables). Two normalisations:

    - ``"valid"``: softmax over the ``n`` valid keys only, i.e. the full ``S*S x S*S`` attention
      cropped to valid rows and columns, then each row renormalised to sum to 1.
    - ``"full"``: softmax over all ``S*S`` keys as inside the encoder, then cropped: rows sum to
      the attention mass on valid keys (<= 1). This is what Trident uses (it crops the encoder's
      ``[1, H, 4096, 4096]`` attention with ``[:vh, :vw, :vh, :vw]`` and does not renormalise).
      Computed as ``"valid" * exp(attn_log_mass)`` from the cached log-mass, which refers to the
      cached grid: pass that grid here and crop afterwards (``trident_sam_inputs`` does).

    Args:
        q: ``(n, H, hd)`` cached unscaled queries of one image.
        k: ``(n, H, hd)`` cached keys.
        grid: ``(gh, gw)`` with ``gh * gw == n``: the cached valid grid (``win_grid[0]``), or for
            ``"valid"`` any top-left sub-grid of it (after ``crop_token_rows``).
        static: ``rel_pos_h``, ``rel_pos_w`` and ``scale`` (``sam_static``).
        heads: which heads to compute (default all); memory is ``len(heads) * n * n`` floats
            (805 MB for 12 heads over 4096 tokens in float32).
        normalise: ``"valid"`` or ``"full"`` (see above).
        attn_log_mass: ``(n, H)`` cached log attention mass on valid keys; required for
            ``"full"``.
        dtype: computation and output dtype (``torch.float64`` for exact comparisons).

    Returns:
        ``(len(heads), n, n)`` attention, row = query, column = key.
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, not {normalise!r}")
    if normalise == "full" and attn_log_mass is None:
        raise ValueError("normalise='full' needs the cached attn_log_mass")
    qt, kt = _tensor(q, dtype), _tensor(k, dtype)
    if qt.ndim != 3 or qt.shape != kt.shape:
        raise ValueError(
            f"q and k must be (n, H, hd) alike, got {tuple(qt.shape)} {tuple(kt.shape)}"
        )
    selected = list(range(qt.shape[1])) if heads is None else [int(h) for h in heads]
    logits = attention_logits(
        qt[:, selected],
        kt[:, selected],
        tuple(grid),
        tuple(grid),
        _tensor(static["rel_pos_h"], dtype),
        _tensor(static["rel_pos_w"], dtype),
        float(np.asarray(static["scale"]).reshape(-1)[0]),
    )
    attn = logits.softmax(dim=-1)
    if normalise == "full":
        mass = torch.exp(_tensor(attn_log_mass, dtype)[:, selected])  # (n, len(heads))
        attn = attn * mass.T[:, :, None]
    return attn


def trident_grid(input_size: tuple[int, int], patch_size: int = 16) -> tuple[int, int]:
    """Trident's valid SAM grid ``input_size // patch_size`` (floor; ``METHODS.md`` §0.4)."""
    return input_size[0] // patch_size, input_size[1] // patch_size


def crop_token_rows(
    x: np.ndarray | torch.Tensor, grid: tuple[int, int], sub_grid: tuple[int, int]
) -> np.ndarray | torch.Tensor:
    """Rows of the top-left ``sub_grid`` from token rows laid out row-major over ``grid``.

    ``x`` is ``(gh*gw, ...)``; the result is ``(sh*sw, ...)``, row-major over ``sub_grid``.
    """
    gh, gw = grid
    sh, sw = sub_grid
    if not (0 <= sh <= gh and 0 <= sw <= gw) or x.shape[0] != gh * gw:
        raise ValueError(f"cannot crop {x.shape[0]} rows of grid {grid} to {sub_grid}")
    if isinstance(x, torch.Tensor):
        return x[top_left_rows(sub_grid, gw, x.device)]
    return x[top_left_rows(sub_grid, gw).numpy()]


WINDOW_TENSORS = ("embedding",)  # the SAM set's window-unit tensors; the others are per token


def sam_frame(features: ImageFeatures, protocol: Protocol) -> ImageFeatures:
    """One image of a SAM feature set in the frame of the image SAM was given.

    A set whose protocol rounds the image up first (``align`` with ``long`` / ``halves``:
    Trident's ``cv2.resize`` to multiples of the CLIP patch) was extracted from the rounded
    image, but ``ImageFeatures.original_size`` is the original image's. This returns the same
    features with ``original_size = protocol.rounded_size(*original_size)``, which is what
    ``SamPredictor.set_image`` on the rounded image records: ``sam_window`` then splits the
    rounded width, and ``CachedSamPredictor.set_features`` / ``generate_masks_cached`` give
    masks at the rounded size, with point and box coordinates in its pixels (resize them to
    the original size afterwards, as Trident's refinement does). Without ``align`` the
    features come back unchanged.
    """
    size = tuple(int(s) for s in features.original_size)
    rounded = protocol.rounded_size(*size)
    if rounded == size:
        return features
    return dataclasses.replace(features, original_size=rounded)


def sam_window(features: ImageFeatures, window: int) -> ImageFeatures:
    """Window ``window`` of one image of a SAM feature set, as a one-window ``ImageFeatures``.

    A ``Protocol(resize="halves")`` set holds two SamPredictor inputs per image (left and right
    half, ``SamBackbone.geometry``); this gives one of them with its own tensors (``embedding``
    row ``window``; the token rows of that window's grid), its own ``win_*`` row (box moved to
    the origin) and ``resized_size`` = its box extent, i.e. that half's SamPredictor
    ``input_size``. ``original_size`` is the half's size ``(H, x2 - x1)`` when the set is a
    two-window one (columns ``[x1, x2)`` = ``featurestore.protocol.half_columns(W)[window]`` of
    ``features.original_size = (H, W)``; for a set with
    ``align`` pass ``sam_frame(features, protocol)`` so that ``W`` is the rounded width that was
    split), else unchanged. The result works with
    ``trident_sam_inputs``, ``CachedSamPredictor.set_features`` and ``methods.trident``'s
    ``sam_tokens``. Window 0 of a one-window set is the image itself.

    Raises:
        ValueError: ``window`` out of range.
    """
    n = len(features.win_grid)
    if not 0 <= window < n:
        raise ValueError(f"image {features.image_id} has {n} SAM window(s), not {window + 1}")
    grids = [int(gh) * int(gw) for gh, gw in features.win_grid.tolist()]
    start, count = sum(grids[:window]), grids[window]
    tensors = {}
    for name, t in features.tensors.items():
        if name in WINDOW_TENSORS:
            tensors[name] = t[window : window + 1]
        else:
            tensors[name] = t[start : start + count]
    y1, x1, y2, x2 = (int(v) for v in features.win_box[window])
    h, w = features.original_size
    if n == 2:
        a, b = half_columns(w)[window]
        original = (h, b - a)
    else:
        original = (h, w)
    return dataclasses.replace(
        features,
        original_size=original,
        resized_size=(y2 - y1, x2 - x1),
        win_box=np.array([[0, 0, y2 - y1, x2 - x1]], dtype=features.win_box.dtype),
        win_pad=features.win_pad[window : window + 1],
        win_grid=features.win_grid[window : window + 1],
        tensors=tensors,
    )


def _one_window(features: ImageFeatures) -> None:
    """Refuse an image of several SAM windows (each is a SamPredictor input of its own)."""
    if len(features.win_grid) != 1:
        raise ValueError(
            f"image {features.image_id} has {len(features.win_grid)} SAM windows (a 'halves' "
            "set): take one with sam_window(features, w)"
        )


@dataclass
class TridentSamInputs:
    """What Trident's ``get_sam_feat`` returns, for one image, from the cache.

    Attributes:
        attn: ``(H, n, n)`` attention normalised over the padded grid, cropped (``"full"``).
        v: ``(H, n, hd)`` values.
        grid: ``(vh, vw)`` = ``input_size // patch_size``, ``n = vh * vw``.
        embedding: ``(C, vh, vw)`` neck embedding cropped to the grid.
    """

    attn: torch.Tensor
    v: torch.Tensor
    grid: tuple[int, int]
    embedding: torch.Tensor


def trident_sam_inputs(
    features: ImageFeatures,
    static: Mapping[str, np.ndarray | torch.Tensor],
    dtype: torch.dtype = torch.float32,
) -> TridentSamInputs:
    """SAM attention, values and embedding on Trident's floor grid (``METHODS.md`` §4 step 1).

    Equals Trident's crop of the encoder's own last-block attention
    (``attn[:, :, :vh, :vw, :vh, :vw]`` of the ``S x S`` grid, no renormalisation) and values,
    computed from the cached factors. Trident runs SAM in float16; this uses ``dtype``.
    ``features`` is one SamPredictor input: an image of a ``long`` set, or one half of a
    ``halves`` set (``sam_window``).

    Raises:
        OvssError: the floor grid is empty (a resized side shorter than one patch).
    """
    _one_window(features)
    patch = int(np.asarray(static["patch_size"]).reshape(-1)[0])
    grid = tuple(int(g) for g in features.win_grid[0])
    vh, vw = trident_grid(features.resized_size, patch)
    if vh == 0 or vw == 0:
        raise OvssError(
            f"image {features.image_id} resizes to {features.resized_size}: Trident's SAM grid "
            f"(input size // {patch}) is empty"
        )
    t = features.tensors
    # "full" attention on the cached grid (its log-mass refers to it), then Trident's crop.
    attn = sam_attention(
        t["q"],
        t["k"],
        grid,
        static,
        normalise="full",
        attn_log_mass=t["attn_log_mass"],
        dtype=dtype,
    )
    rows = top_left_rows((vh, vw), grid[1])
    attn = attn[:, rows][:, :, rows]
    v = crop_token_rows(t["v"], grid, (vh, vw))
    return TridentSamInputs(
        attn=attn.contiguous(),
        v=_tensor(v, dtype).permute(1, 0, 2).contiguous(),
        grid=(vh, vw),
        embedding=_tensor(t["embedding"][0, :, :vh, :vw], dtype).contiguous(),
    )


# --------------------------------------------------------------------------------------------
# Prompt decoding
# --------------------------------------------------------------------------------------------


class CachedSamPredictor(SamPredictor):
    """``SamPredictor`` whose image embedding comes from the cache instead of the encoder.

    Build it on the ``Sam`` of ``load_sam_decoder`` (no image encoder) or on a full ``Sam``;
    call ``set_cached`` (or ``set_features``) instead of ``set_image``; then ``predict``,
    ``predict_torch`` and ``get_image_embedding`` are ``SamPredictor``'s own, so with the same
    weights and a float32 cache their outputs are identical to ``SamPredictor`` on the image.
    """

    def set_cached(
        self,
        embedding: np.ndarray | torch.Tensor,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
    ) -> None:
        """Use a cached embedding as the current image.

        Args:
            embedding: ``(C, S, S)`` or ``(1, C, S, S)`` neck embedding (any float dtype; cast
                to the mask decoder's dtype and the model's device).
            original_size: ``(H, W)`` of the image before resizing (``ImageFeatures.original_size``).
            input_size: ``(h, w)`` of the resized, unpadded input (``ImageFeatures.resized_size``);
                its longer side is the encoder's ``img_size``.

        Raises:
            ValueError: shapes that do not fit the model.
        """
        decoder_dtype = next(self.model.mask_decoder.parameters()).dtype
        emb = _tensor(embedding, decoder_dtype).to(self.device)
        if emb.ndim == 3:
            emb = emb[None]
        prompt = self.model.prompt_encoder
        want = (1, prompt.embed_dim, *prompt.image_embedding_size)
        if tuple(emb.shape) != want:
            raise ValueError(f"embedding must be {want[1:]} for this model, got {tuple(emb.shape)}")
        img = self.model.image_encoder.img_size
        h, w = (int(s) for s in input_size)
        if max(h, w) != img or min(h, w) < 1:
            raise ValueError(f"input_size {input_size} must have its longer side = {img}")
        self.reset_image()
        self.original_size = tuple(int(s) for s in original_size)
        self.input_size = (h, w)
        self.features = emb
        self.is_image_set = True

    def set_features(self, features: ImageFeatures) -> None:
        """``set_cached`` from one image of a SAM feature set (``FeatureSet.read(i)``): one
        SamPredictor input, i.e. an image of a ``long`` set or one half of a ``halves`` set
        (``sam_window``).

        Raises:
            ValueError: an image of several windows (a ``halves`` set without ``sam_window``).
        """
        _one_window(features)
        self.set_cached(
            features.tensors["embedding"][0], features.original_size, features.resized_size
        )


class _PinnedPredictor(CachedSamPredictor):
    """The automatic generator's predictor: its ``set_image(image)`` on the whole image (the
    generator's only crop when ``crop_n_layers == 0``) keeps the cached embedding."""

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if not self.is_image_set or tuple(image.shape[:2]) != self.original_size:
            raise OvssError("the cached mask generator only processes the whole cached image")


def generate_masks_cached(
    model: Sam,
    features: ImageFeatures,
    *,
    points_per_side: int | None = 32,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    stability_score_offset: float = 1.0,
    box_nms_thresh: float = 0.7,
    crop_n_layers: int = 0,
    point_grids: list[np.ndarray] | None = None,
    min_mask_region_area: int = 0,
    output_mode: str = "binary_mask",
) -> list[dict[str, Any]]:
    """``SamAutomaticMaskGenerator.generate`` for one cached image (same records, same order).

    The arguments are the generator's (defaults: SAM's, tuned for ViT-H); the generator itself
    runs, only its ``set_image`` is replaced by the cached embedding.

    Args:
        model: ``Sam`` whose prompt encoder and mask decoder match the cache
            (``load_sam_decoder_for``).
        features: one image of a SAM feature set (``embedding``, original and resized size;
            for a set with ``align``, ``sam_frame(features, protocol)`` gives SAM's own frame,
            the records then refer to the rounded image).
        points_per_side: grid points per side (``points_per_side**2`` single-point prompts).
        points_per_batch: prompts decoded together; higher is faster and uses more memory.
        pred_iou_thresh: keep masks whose predicted IoU is above this.
        stability_score_thresh: keep masks whose stability score is at least this.
        stability_score_offset: logit shift used by the stability score.
        box_nms_thresh: box IoU cut-off of the non-maximum suppression between masks.
        crop_n_layers: must be 0: crop layers re-encode zoomed image crops (each resized to
            ``img_size`` on its own), which a whole-image cache cannot provide.
        point_grids: explicit normalised point grids instead of ``points_per_side``.
        min_mask_region_area: > 0 removes small islands and holes (needs OpenCV).
        output_mode: ``binary_mask``, ``uncompressed_rle`` or ``coco_rle`` (needs pycocotools).

    Returns:
        A list of mask records: ``segmentation``, ``area``, ``bbox`` (XYWH), ``predicted_iou``,
        ``point_coords``, ``stability_score``, ``crop_box``.
    """
    if crop_n_layers != 0:
        raise OvssError(
            "crop_n_layers must be 0 with cached embeddings: crop layers encode zoomed-in "
            "crops of the image again, and the cache holds one whole-image embedding"
        )
    try:
        generator = SamAutomaticMaskGenerator(
            model,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=0,
            point_grids=point_grids,
            min_mask_region_area=min_mask_region_area,
            output_mode=output_mode,
        )
    except ImportError as exc:
        raise OvssError(
            f"this mask generation option needs a package that is not installed: {exc}"
        ) from exc
    predictor = _PinnedPredictor(model)
    predictor.set_features(features)
    generator.predictor = predictor
    h, w = features.original_size
    # The generator reads only the image's size (nothing of its pixels once set_image is
    # pinned): a zero-stride stand-in costs no memory.
    stand_in = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (h, w, 3))
    return generator.generate(stand_in)


# --------------------------------------------------------------------------------------------
# Decoder weights matching a feature set
# --------------------------------------------------------------------------------------------


def load_sam_decoder_for(fs: FeatureSet, weights: str | os.PathLike | None = None) -> Sam:
    """The prompt encoder + mask decoder that belong to a SAM feature set.

    A ``random-init:<seed>`` set rebuilds the same random decoder (same seed and
    ``arch_overrides``); otherwise the checkpoint (``weights`` or the resolved release file) must
    have the sha256 recorded in the set's provenance.

    Raises:
        ProvenanceMismatchError: the set is not a SAM set, or the checkpoint differs.
        WeightsNotFoundError: the checkpoint is not on disk.
    """
    backbone = fs.provenance["backbone"]
    if backbone.get("family") != "sam":
        raise ProvenanceMismatchError(f"feature set '{fs.key}' is not a SAM feature set")
    name, identity = backbone["name"], backbone["weights"]
    overrides = backbone.get("extra", {}).get("arch_overrides") or None
    if identity.startswith("random-init:"):
        if weights is not None:
            raise ProvenanceMismatchError(
                f"feature set '{fs.key}' was made with {identity}, not with a checkpoint"
            )
        seed = int(identity.split(":", 1)[1])
        return load_sam_decoder(name, random_init=True, seed=seed, arch_overrides=overrides)
    found, path = decoder_weights_identity(name, weights)
    if found != identity:
        raise ProvenanceMismatchError(
            f"feature set '{fs.key}' was made with weights {identity}, but {path} is {found}; "
            "pass --weights with the checkpoint used for extraction"
        )
    return load_sam_decoder(name, weights=path, arch_overrides=overrides)
