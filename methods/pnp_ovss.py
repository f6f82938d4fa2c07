"""``pnp-ovss``: BLIP cross-attention GradCAM with Saliency DropOut, blur and DenseCRF (paper 003).

PnP-OVSS is the one image-level method: it runs a live BLIP ITM model on the pixels, with
gradients, so it needs the images (``segment --images``, or the paths a store records). Per image
and per round ``r = 0 .. rounds-1``:

1. **Prompt.** ``"a picture of " + " ".join(class names)`` (the first name of each class of the
   image), tokenised word by word so every class knows its word pieces; the first token is
   BLIP's ``[ENC]`` when the tokenizer has it (as BLIP/LAVIS's ITM does), else ``[CLS]``.
2. **Image.** Squashed to ``size`` x ``size`` (336: 21 x 21 patches), CLIP mean/std; the patches
   dropped so far are zeroed in normalised space (the mean colour, as the release does). Round 0
   reads the cached first pass (``ovss extract -m blip-itm-l``, feature set ``image_embeds`` +
   ``image_cls``) when the store has one made with the same weights; every later round re-runs
   the image encoder.
3. **GradCAM.** One forward of the text encoder, one backward of the ITM *match* logit
   (``itm_head(h_[ENC])[1]``, before softmax) to the softmax cross-attention probabilities ``A``
   of layer ``layer``, head ``head`` (both counted from 1): ``relu(∂ITM/∂A) ⊙ A`` per text token
   over the patches (the image class-token column dropped). All classes of an image share the
   one backward.
4. **Class maps.** Per class the mean over its word pieces; ``a``, ``picture``, ``of`` and the
   special tokens take no part. Patches dropped in earlier rounds are zero in the round's maps
   (as the release).
5. **Saliency DropOut.** ``U_t = Σ_k M̃_(k, t)``; ``median`` rule: drop every remaining patch
   with ``U_t >= median(U over the remaining patches)`` and [ours] ``U_t > 0`` (without it a map
   that is zero on half the patches would drop everything); ``topk`` rule (the release's
   ``sort_thresh`` path): drop the ``dropout_k`` remaining patches of highest ``U``, where the
   release's ``U`` sums the GradCAM of every token after "of" (word pieces one by one, ``[SEP]``
   included), and the final map counts round 0 twice (``gradcam_agg = list[0] + Σ_r list[r]``).

Then **map -> labels** (the release's ``postprocess``): the rounds' maps summed; per class
min-max normalised and ``keep = norm >= threshold``; the *raw* summed map times ``keep``
(as the release) resized bilinearly (``align_corners=True``) to the original image; a background
channel ``1[no class > 0]`` first; each channel Gaussian-blurred with ``σ = blur_sigma × max(H,
W)`` pixels (``scipy.ndimage.gaussian_filter``, ``reflect`` borders, as the release) and min-max
normalised (an all-constant channel becomes 0 [ours], the release divides by zero); DenseCRF
(``methods.crf``) on the softmax of those channels; argmax. The background channel exists only
when the vocabulary has a class named ``background`` (VOC-style; its pixels get that class);
otherwise every pixel gets one of the image's classes, as the release does on context datasets
(it adds the channel there only for images of fewer than 3 classes [not reproduced]).

Choices marked [ours] (the paper or the release is silent or differs):

- the ``U > 0`` guard of the median rule; constant channels -> 0 after blur;
- the first name of a class is its prompt word (synonyms are not used);
- without ``--image-classes`` every vocabulary class (but ``background``) is in every prompt;
  the release reads image-level lists of an external classifier (``image_classes=FILE``);
- images smaller than one 16-pixel patch on a side are skipped and reported;
- the torch CRF backend when ``pydensecrf2`` is missing (``crf=auto``), recorded per result;
- score maps (``--score-maps``) are ``softmax(logit_scale × normalised masked class maps)``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.errors import OvssError
from featurestore.protocol import Protocol
from featurestore.store import STATUS_OK
from methods.base import (
    FeatureRequirement,
    LiveModelRequirement,
    ScoringConfig,
    Segmenter,
    Vocab,
    VocabularyDefaults,
    register_method,
)
from methods.crf import CRFParams, crf_labels, resolve_backend

PROMPT_WORDS = ("a", "picture", "of")
DROPOUT_RULES = ("median", "topk")
CRF_CHOICES = ("auto", "pydensecrf", "torch", "none")
IGNORE = 255
CACHE_TENSORS = ("image_embeds", "image_cls")


@dataclass
class PnPOVSSConfig:
    """Options of ``pnp-ovss`` (defaults: the paper's, which the release's run scripts use).

    Attributes:
        model: BLIP ITM model (``blip-itm-l``: ViT-L/16, Flickr30k retrieval, as the release).
        weights: checkpoint folder (Hugging Face layout); '' = the one the store's cached first
            pass records, else ``$OVSS_WEIGHTS`` / the hub cache.
        random_init: a seeded random-init BLIP of the real classes (tests, demos).
        seed: the random-init seed.
        arch: random-init architecture overrides as a JSON object (``vision_config`` /
            ``text_config``); '' = the full model, or what the cached set records.
        tokenizer: tokenizer folder or ``vocab.txt``; '' = the checkpoint's (random-init: a
            built-in character vocabulary [ours]).
        size: side of the squashed square input in pixels (336: 21 x 21 patches of 16).
        layer: text-encoder layer whose cross-attention is read, counted from 1 (paper: 8).
        head: attention head of that layer, counted from 1 (paper: 10; the release's 9 from 0).
        rounds: Saliency DropOut rounds, the un-dropped one included (4).
        dropout_rule: ``median`` (the paper) or ``topk`` (the release's fixed count per round,
            with its double count of round 0).
        dropout_k: patches dropped per round by the ``topk`` rule (10).
        threshold: T: a class keeps the patches whose min-max normalised map is >= T (0.15).
        blur_sigma: Gaussian blur σ as a fraction of the image's longer side (0.05); 0 = none.
        crf: ``auto`` (pydensecrf2 when installed, else the torch approximation), ``pydensecrf``,
            ``torch`` or ``none`` (argmax of the blurred maps).
        crf_iterations: DenseCRF mean-field iterations (10).
        crf_gauss_sxy, crf_gauss_compat: smoothness kernel: σ in pixels (3), weight (7).
        crf_bilateral_sxy, crf_bilateral_srgb, crf_bilateral_compat: appearance kernel: σ in
            pixels (50), colour σ (5), weight (10).
        crf_max_side: torch CRF: longer side of its working resolution [ours: 128].
        enc_token: start the prompt with ``[ENC]`` when the tokenizer has it (BLIP's ITM input).
        image_classes: JSON (``{image id: [class, ...]}``) or CSV (``image id,class,class...``)
            file of the classes of each image (the release's setting); '' = every class.
        use_cache: read round 0 from the store's cached first pass when it matches.
        text_model: CLIP whose text tower embeds the vocabulary for the shared driver (unused by
            the method itself; ``ovss tune``'s reward CLIP is its own option).
        class_family: class-file family of dataset vocabularies.
    """

    model: str = "blip-itm-l"
    weights: str = ""
    random_init: bool = False
    seed: int = 0
    arch: str = ""
    tokenizer: str = ""
    size: int = 336
    layer: int = 8
    head: int = 10
    rounds: int = 4
    dropout_rule: str = field(default="median", metadata={"choices": DROPOUT_RULES})
    dropout_k: int = 10
    threshold: float = 0.15
    blur_sigma: float = 0.05
    crf: str = field(default="auto", metadata={"choices": CRF_CHOICES})
    crf_iterations: int = 10
    crf_gauss_sxy: float = 3.0
    crf_gauss_compat: float = 7.0
    crf_bilateral_sxy: float = 50.0
    crf_bilateral_srgb: float = 5.0
    crf_bilateral_compat: float = 10.0
    crf_max_side: int = 128
    enc_token: bool = True
    image_classes: str = ""
    use_cache: bool = True
    text_model: str = "clip-b16"
    class_family: str = "sclip"

    @property
    def protocol(self) -> Protocol:
        """The cached first pass's protocol: the whole image squashed to ``size``."""
        return Protocol(resize="square", size=self.size)

    @property
    def arch_overrides(self) -> dict | None:
        if not self.arch:
            return None
        try:
            value = json.loads(self.arch)
        except json.JSONDecodeError as e:
            raise ValueError(f"arch must be a JSON object: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("arch must be a JSON object")
        return value

    @property
    def crf_params(self) -> CRFParams:
        return CRFParams(
            iterations=self.crf_iterations,
            gauss_sxy=self.crf_gauss_sxy,
            gauss_compat=self.crf_gauss_compat,
            bilateral_sxy=self.crf_bilateral_sxy,
            bilateral_srgb=self.crf_bilateral_srgb,
            bilateral_compat=self.crf_bilateral_compat,
            max_side=self.crf_max_side,
        )


# --------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """A tokenised prompt and where each class's word pieces are.

    Attributes:
        input_ids: ``(1, T)`` token ids: ``[ENC]``/``[CLS]``, "a picture of", the classes,
            ``[SEP]``.
        spans: per class, ``(start, end)`` token positions of its word pieces.
        after_prefix: first position after "of" (the release's ``U`` sums from here to
            ``[SEP]`` inclusive).
        sep: position of ``[SEP]``.
    """

    input_ids: torch.Tensor
    spans: list[tuple[int, int]]
    after_prefix: int
    sep: int

    def to(self, device: torch.device | str) -> Prompt:
        return Prompt(self.input_ids.to(device), self.spans, self.after_prefix, self.sep)


def build_prompt(tokenizer: Any, class_names: list[str], enc_token: bool = True) -> Prompt:
    """``"a picture of " + " ".join(class_names)`` as token ids with each class's span.

    Words are tokenised one at a time and concatenated, which equals tokenising the joined
    string for BERT's WordPiece (it splits on whitespace first).

    Raises:
        OvssError: a class name that tokenises to no word piece (one line naming it).
    """

    def pieces(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    first = tokenizer.cls_token_id
    if enc_token and "[ENC]" in tokenizer.get_vocab():
        first = tokenizer.convert_tokens_to_ids("[ENC]")
    ids = [int(first)]
    for w in PROMPT_WORDS:
        ids += pieces(w)
    after_prefix = len(ids)
    spans = []
    for name in class_names:
        p = pieces(name)
        if not p:
            raise OvssError(
                f"class name {name!r} tokenises to no word piece with this BLIP tokenizer; "
                "rename it"
            )
        spans.append((len(ids), len(ids) + len(p)))
        ids += p
    sep = len(ids)
    ids.append(int(tokenizer.sep_token_id))
    return Prompt(torch.tensor([ids], dtype=torch.long), spans, after_prefix, sep)


# --------------------------------------------------------------------------------------------
# GradCAM and Saliency DropOut (pure functions on tensors)
# --------------------------------------------------------------------------------------------


def token_gradcam(
    blip: Any, image_embeds: torch.Tensor, prompt: Prompt, layer: int, head: int
) -> torch.Tensor:
    """``relu(∂ITM/∂A) ⊙ A`` of one head, per text token over the patches.

    Args:
        blip: a :class:`featurestore.backbones.blip.BlipModel`.
        image_embeds: ``(1, 1 + N, D)`` image encoder output.
        prompt: from :func:`build_prompt`.
        layer, head: 0-based text layer and head.

    Returns:
        ``(T, N)`` float32 (patch columns only, row-major over the grid).
    """
    emb = image_embeds.detach().clone().requires_grad_(True)
    match, captured = blip.itm_match(emb, prompt.input_ids, capture_layers=(layer,))
    probs = captured[layer]
    (grad,) = torch.autograd.grad(match.sum(), probs)
    cam = grad.clamp_min(0) * probs.detach()
    return cam[0, head, :, 1:].float()


def class_maps(token_cams: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """``(T, N)`` token maps -> ``(K, N)``: per class the mean over its word pieces."""
    return torch.stack([token_cams[a:b].mean(0) for a, b in spans])


def dropout_patches(u: torch.Tensor, dropped: torch.Tensor, rule: str, k: int = 10) -> torch.Tensor:
    """Patches to drop this round (a ``(N,)`` bool mask, disjoint from ``dropped``).

    Args:
        u: ``(N,)`` saliency per patch.
        dropped: ``(N,)`` bool, patches dropped in earlier rounds.
        rule: ``median``: remaining patches with ``u >= median(u[remaining])`` and ``u > 0``
            (``torch.median``: the lower middle value for an even count); ``topk``: the ``k``
            remaining patches of highest ``u`` (ties: the later index first, as a stable
            ascending argsort read from its end).
    """
    remaining = ~dropped
    if not bool(remaining.any()):
        return torch.zeros_like(dropped)
    if rule == "median":
        med = u[remaining].median()
        return remaining & (u >= med) & (u > 0)
    if rule == "topk":
        score = u.clone().double()
        score[dropped] = float("-inf")
        order = np.argsort(score.cpu().numpy(), kind="stable")
        n = min(k, int(remaining.sum()))
        out = torch.zeros_like(dropped)
        if n:
            out[torch.from_numpy(order[-n:].copy()).to(out.device)] = True
        return out
    raise ValueError(f"dropout_rule must be one of {', '.join(DROPOUT_RULES)}, not {rule!r}")


def drop_pixels(pixels: torch.Tensor, dropped: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """Zero (the mean colour in normalised space) the ``patch``-pixel squares of the dropped
    patches of a ``(3, S, S)`` input."""
    out = pixels.clone()
    for p in torch.nonzero(dropped).reshape(-1).tolist():
        r, c = divmod(p, grid)
        out[:, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = 0
    return out


@dataclass
class DropoutTrace:
    """What Saliency DropOut did: the summed maps and per round the dropped patches."""

    maps: torch.Tensor  # (K, g, g) summed over rounds
    dropped: list[torch.Tensor] = field(default_factory=list)  # per round, (N,) bool
    seconds: dict[str, float] = field(default_factory=dict)


def saliency_dropout(
    blip: Any,
    pixels: torch.Tensor,
    prompt: Prompt,
    *,
    layer: int,
    head: int,
    rounds: int,
    rule: str,
    k: int,
    first_embeds: torch.Tensor | None = None,
) -> DropoutTrace:
    """The rounds of Saliency DropOut on one image (module doc, steps 2-5).

    Args:
        blip: the live model.
        pixels: ``(3, S, S)`` normalised input.
        prompt: the image's prompt.
        layer, head: 0-based.
        rounds: number of rounds (>= 1).
        rule, k: the dropout rule.
        first_embeds: ``(1, 1 + N, D)`` round-0 image embeddings (the cache), or None.

    Returns:
        The summed class maps ``(K, g, g)`` (``topk``: round 0 counted twice) and the trace.
    """
    import time

    patch = int(blip.info.patch_size)
    grid = pixels.shape[-1] // patch
    n = grid * grid
    dropped = torch.zeros(n, dtype=torch.bool, device=pixels.device)
    total = None
    first = None
    trace = DropoutTrace(maps=torch.empty(0))
    t_enc = t_cam = 0.0
    for r in range(rounds):
        t = time.perf_counter()
        if r == 0 and first_embeds is not None:
            embeds = first_embeds
        else:
            embeds = blip.encode_image(drop_pixels(pixels, dropped, grid, patch)[None])
        t_enc += time.perf_counter() - t
        t = time.perf_counter()
        cams = token_gradcam(blip, embeds, prompt, layer, head)
        t_cam += time.perf_counter() - t
        cams[:, dropped] = 0
        maps = class_maps(cams, prompt.spans)
        total = maps.clone() if total is None else total + maps
        if r == 0:
            first = maps
        if r == rounds - 1:
            break
        if rule == "topk":
            u = cams[prompt.after_prefix : prompt.sep + 1].sum(0)
        else:
            u = maps.sum(0)
        new = dropout_patches(u, dropped, rule, k)
        trace.dropped.append(new)
        dropped = dropped | new
    if rule == "topk":
        total = total + first
    trace.maps = total.reshape(-1, grid, grid)
    trace.seconds = {"encoder": t_enc, "cross-attention + backward": t_cam}
    return trace


# --------------------------------------------------------------------------------------------
# Maps -> labels (pure functions)
# --------------------------------------------------------------------------------------------


def threshold_maps(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(K, g, g)`` -> the raw maps where their per-class min-max normalisation is
    ``>= threshold``, 0 elsewhere (a constant map becomes 0)."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    span = hi - lo
    norm = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-30), torch.zeros_like(flat))
    keep = (norm >= threshold) & (span > 0)
    return (flat * keep).reshape(maps.shape)


def image_scores(
    masked: torch.Tensor, size: tuple[int, int], background: bool = True
) -> torch.Tensor:
    """``(K, g, g)`` masked maps resized bilinearly with ``align_corners=True`` (as the
    release) to ``(K, H, W)``, with ``background`` a first channel ``1[max_k == 0]``
    (``(1 + K, H, W)``)."""
    up = F.interpolate(masked[None].float(), size=size, mode="bilinear", align_corners=True)[0]
    if not background:
        return up
    bg = (up.amax(0) <= 0).float()
    return torch.cat([bg[None], up], dim=0)


def blur_scores(scores: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Per channel: ``scipy.ndimage.gaussian_filter(σ = sigma_px)`` (``reflect`` borders,
    truncate 4σ) then min-max to [0, 1]; a constant channel becomes 0 [ours]."""
    from scipy.ndimage import gaussian_filter

    x = scores.numpy().astype(np.float32, copy=True)
    for c in range(x.shape[0]):
        ch = x[c]
        if not ch.any():
            continue
        if sigma_px > 0:
            ch = gaussian_filter(ch, sigma_px)
        lo, hi = float(ch.min()), float(ch.max())
        x[c] = (ch - lo) / (hi - lo) if hi > lo else 0.0
    return torch.from_numpy(x)


def maps_to_labels(
    maps: torch.Tensor,
    image: np.ndarray,
    *,
    threshold: float,
    blur_sigma: float,
    crf_backend: str,
    crf_params: CRFParams,
    timings: dict[str, float] | None = None,
    background: bool = True,
) -> tuple[np.ndarray, torch.Tensor]:
    """Summed class maps ``(K, g, g)`` -> local labels ``(H, W)`` (0 = background, k + 1 =
    class k) and the thresholded maps; ``crf_backend`` ``none`` skips the CRF. Without
    ``background`` there is no background channel: every pixel gets a class (as the release
    on context datasets)."""
    import time

    h, w = image.shape[:2]
    t = time.perf_counter()
    maps = maps.cpu()  # the blur (scipy) and the CRF run on the CPU
    masked = threshold_maps(maps, threshold)
    scores = image_scores(masked, (h, w), background)
    scores = blur_scores(scores, blur_sigma * max(h, w))
    t_blur = time.perf_counter() - t
    t = time.perf_counter()
    if crf_backend == "none":
        labels = scores.argmax(0).numpy().astype(np.int64)
    else:
        labels = crf_labels(image, scores, crf_params, crf_backend)
    if not background:
        labels = labels + 1
    if timings is not None:
        timings["threshold + resize + blur"] = timings.get("threshold + resize + blur", 0) + t_blur
        timings["crf"] = timings.get("crf", 0) + time.perf_counter() - t
    return labels, masked


# --------------------------------------------------------------------------------------------
# Image-level class lists
# --------------------------------------------------------------------------------------------


def read_image_classes(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{image id: [class name, ...]}`` from JSON (an object of lists) or CSV (rows
    ``image id,class,class...``; a header row starting with ``image`` is skipped)."""
    p = Path(path)
    if not p.is_file():
        raise OvssError(f"no image-classes file at {p}")
    text = p.read_text()
    if p.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise OvssError(f"{p} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise OvssError(f"{p} must be a JSON object of image id -> list of class names")
        return {str(k): [str(c) for c in v] for k, v in data.items()}
    out: dict[str, list[str]] = {}
    for i, row in enumerate(csv.reader(text.splitlines())):
        if not row or (i == 0 and row[0].strip().lower().startswith("image")):
            continue
        out.setdefault(row[0].strip(), []).extend(c.strip() for c in row[1:] if c.strip())
    return out


def background_index(vocab: Vocab) -> int | None:
    """The vocabulary class named ``background`` (any synonym), or None."""
    for i, syns in enumerate(vocab.class_names):
        if any(s.strip().lower() == "background" for s in syns):
            return i
    return None


def class_lookup(vocab: Vocab) -> dict[str, int]:
    """Lower-cased synonym -> class index."""
    out: dict[str, int] = {}
    for i, syns in enumerate(vocab.class_names):
        for s in syns:
            out.setdefault(s.strip().lower(), i)
    return out


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


class ImagesUnreadableError(OvssError):
    """A live-model method cannot read an image a store records (moved or deleted).

    Attributes:
        store: the store path.
        image_id: the image's id.
        path: the recorded path.
    """

    def __init__(self, message: str, store: str = "", image_id: str = "", path: str = ""):
        super().__init__(message)
        self.store = store
        self.image_id = image_id
        self.path = path


@register_method
class PnPOVSS(Segmenter):
    name = "pnp-ovss"
    Config = PnPOVSSConfig
    doc = "BLIP cross-attention GradCAM + Saliency DropOut + blur + DenseCRF (live BLIP; images)"

    @classmethod
    def requirements(cls, config: PnPOVSSConfig) -> list[LiveModelRequirement]:
        if config.rounds < 1:
            raise ValueError("rounds must be at least 1")
        if config.layer < 1 or config.head < 1:
            raise ValueError("layer and head count from 1")
        if config.size < 16 or config.size % 16:
            raise ValueError("size must be a positive multiple of the 16-pixel patch")
        if config.dropout_rule not in DROPOUT_RULES:
            raise ValueError(f"dropout_rule must be one of {', '.join(DROPOUT_RULES)}")
        if config.crf not in CRF_CHOICES:
            raise ValueError(f"crf must be one of {', '.join(CRF_CHOICES)}")
        _ = config.arch_overrides  # validates the JSON
        cached = FeatureRequirement("blip", config.model, config.protocol, CACHE_TENSORS, "model")
        return [LiveModelRequirement("blip", config.model, cached=cached, model_field="model")]

    @classmethod
    def vocabulary_defaults(cls, config: PnPOVSSConfig) -> VocabularyDefaults:
        """The method prompts BLIP with the class names; the driver's text embeddings (used
        for score-map bookkeeping only) take one template [ours: ``single``]."""
        return VocabularyDefaults(
            text_model=config.text_model, templates="single", family=config.class_family
        )

    def __init__(self, store: Any, config: PnPOVSSConfig, device: str | torch.device = "cpu"):
        super().__init__(store, config, device)
        self.crf_backend = "none" if config.crf == "none" else resolve_backend(config.crf)
        self._blip = None
        self.skipped: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self._records = store.image_records()
        self._sizes = store.image_table()["size"]
        self._classes = read_image_classes(config.image_classes) if config.image_classes else None
        self._prompts: dict[tuple[str, ...], Prompt] = {}
        self.cache_used = False

    # -- the live model ----------------------------------------------------------------------
    def live_identity(self) -> dict[str, Any]:
        """How the live model is built: the config's choice, else the cached set's record."""
        cfg = self.config
        if cfg.random_init:
            return {"random_init": True, "seed": cfg.seed, "arch_overrides": cfg.arch_overrides}
        if cfg.weights:
            return {"weights": cfg.weights}
        fs = self.sets.get("blip")
        if fs is not None:
            bb = fs.provenance["backbone"]
            ident = str(bb.get("weights", ""))
            if ident.startswith("random-init:"):
                return {
                    "random_init": True,
                    "seed": int(ident.split(":", 1)[1]),
                    "arch_overrides": (bb.get("extra") or {}).get("arch_overrides"),
                }
            if bb.get("weights_path"):
                return {"weights": bb["weights_path"]}
        return {}

    @property
    def blip(self) -> Any:
        if self._blip is None:
            from featurestore.backbones.blip import load_blip

            ident = self.live_identity()
            blip = load_blip(
                self.config.model,
                weights=ident.get("weights"),
                random_init=bool(ident.get("random_init")),
                seed=int(ident.get("seed", 0)),
                arch_overrides=ident.get("arch_overrides"),
                tokenizer=self.config.tokenizer or None,
            )
            blip.model.requires_grad_(False)
            blip.model.to(self.device)
            self._blip = blip
            fs = self.sets.get("blip")
            if fs is not None:
                bb = fs.provenance["backbone"]
                same = bb.get("weights") == blip.info.weights and (
                    (bb.get("extra") or {}).get("arch_overrides")
                    == blip.info.extra.get("arch_overrides")
                )
                if not (same and self.config.use_cache):
                    del self.sets["blip"]  # another model's pass: not ours to read
        return self._blip

    def live_record(self) -> dict[str, Any]:
        """What ran (recorded with every result): the model identity, the tokenizer, the CRF
        backend, whether round 0 came from the store, skipped images."""
        blip = self.blip
        return {
            "model": blip.info.name,
            "weights": blip.info.weights,
            "weights_path": blip.info.weights_path,
            "arch_overrides": blip.info.extra.get("arch_overrides"),
            "tokenizer": blip.tokenizer_source,
            "crf_backend": self.crf_backend,
            "first_pass": "store" if "blip" in self.sets else "live",
            "skipped": dict(self.skipped),
        }

    # -- per image ---------------------------------------------------------------------------
    def image_class_indices(self, index: int, vocab: Vocab) -> list[int] | None:
        """The vocabulary classes of image ``index`` (None: skipped and recorded)."""
        bg = background_index(vocab)
        if self._classes is None:
            return [c for c in range(vocab.num_classes) if c != bg]
        image_id = self._records[index].image_id
        names = self._classes.get(image_id)
        if names is None:
            self.skipped[image_id] = "not in the image-classes file"
            return None
        lookup = class_lookup(vocab)
        unknown = [n for n in names if n.strip().lower() not in lookup]
        if unknown:
            raise OvssError(
                f"image-classes file {self.config.image_classes}: image {image_id!r} lists "
                f"{', '.join(map(repr, unknown))}, not in the vocabulary"
            )
        out: list[int] = []
        for n in names:
            c = lookup[n.strip().lower()]
            if c != bg and c not in out:
                out.append(c)
        return out

    def load_image(self, index: int) -> np.ndarray:
        from featurestore.images import load_image_rgb

        rec = self._records[index]
        try:
            return load_image_rgb(rec.path)
        except (OvssError, OSError) as e:
            gone = not Path(rec.path).exists()
            raise ImagesUnreadableError(
                f"{self.name} runs BLIP on the pixels, and image {rec.image_id!r} of store "
                f"{self.store.path} cannot be read at {rec.path}"
                + (" (moved or deleted)" if gone else f": {e}"),
                store=str(self.store.path),
                image_id=rec.image_id,
                path=rec.path,
            ) from None

    def first_pass(self, index: int) -> torch.Tensor | None:
        """``(1, 1 + N, D)`` cached round-0 embeddings of image ``index``, or None."""
        fs = self.sets.get("blip")
        if fs is None or fs.status()[index] != STATUS_OK:
            return None
        t = fs.read(index, list(CACHE_TENSORS)).tensors
        emb = np.concatenate([t["image_cls"][:1], t["image_embeds"]], axis=0)
        return torch.from_numpy(emb.astype(np.float32))[None].to(self.device)

    def prompt(self, names: list[str]) -> Prompt:
        key = tuple(names)
        if key not in self._prompts:
            p = build_prompt(self.blip.tokenizer, names, self.config.enc_token)
            if p.input_ids.shape[1] > self.blip.max_text_tokens:
                raise OvssError(
                    f"the prompt of {len(names)} classes is {p.input_ids.shape[1]} tokens, over "
                    f"BLIP's {self.blip.max_text_tokens}; give image-level classes "
                    "(image_classes=FILE)"
                )
            self._prompts[key] = p.to(self.device)
        return self._prompts[key]

    def summed_maps(
        self,
        index: int,
        classes: list[int],
        vocab: Vocab,
        layer: int | None = None,
        head: int | None = None,
    ) -> torch.Tensor:
        """``(K, g, g)`` Saliency DropOut maps of image ``index`` for ``classes`` (vocabulary
        indices), at ``layer`` / ``head`` (1-based; default: the config's)."""
        cfg = self.config
        blip = self.blip
        layer, head = layer or cfg.layer, head or cfg.head
        if layer > blip.num_text_layers or head > blip.num_text_heads:
            raise OvssError(
                f"{cfg.model} has {blip.num_text_layers} text layers of {blip.num_text_heads} "
                f"heads: layer {layer} / head {head} do not exist"
            )
        image = self.load_image(index)
        pixels = self._pixels(image)
        names = [vocab.class_names[c][0] for c in classes]
        first = self.first_pass(index)
        self.cache_used |= first is not None
        trace = saliency_dropout(
            blip,
            pixels,
            self.prompt(names),
            layer=layer - 1,
            head=head - 1,
            rounds=cfg.rounds,
            rule=cfg.dropout_rule,
            k=cfg.dropout_k,
            first_embeds=first,
        )
        for k, v in trace.seconds.items():
            self.timings[k] = self.timings.get(k, 0.0) + v
        return trace.maps

    def _pixels(self, image: np.ndarray) -> torch.Tensor:
        from featurestore.backbones.blip import squash_pixels

        return squash_pixels(image, self.config.size).to(self.device)

    def too_small(self, index: int) -> bool:
        h, w = (int(x) for x in self._sizes[index])
        if min(h, w) < 16:
            self.skipped[self._records[index].image_id] = (
                f"{h}x{w} is smaller than one 16-pixel patch"
            )
            return True
        return False

    def segment_labels(
        self, index: int, vocab: Vocab, scoring: ScoringConfig
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor] | None:
        """The driver's hook for methods that label pixels themselves: ``(labels (H, W)
        int64, max_prob (H, W) float32 (1 where a class or background was chosen), scores
        (Q, g, g))``, or None when the image is skipped (recorded in ``skipped``)."""
        if self.too_small(index):
            return None
        classes = self.image_class_indices(index, vocab)
        if classes is None:
            return None
        bg = background_index(vocab)
        image = self.load_image(index)
        if not classes:
            h, w = image.shape[:2]
            fill = IGNORE if bg is None else bg
            labels = np.full((h, w), fill, dtype=np.int64)
            return labels, np.ones((h, w), np.float32), torch.zeros(len(vocab.query_to_class), 1, 1)
        maps = self.summed_maps(index, classes, vocab)
        local, masked = maps_to_labels(
            maps,
            image,
            threshold=self.config.threshold,
            blur_sigma=self.config.blur_sigma,
            crf_backend=self.crf_backend,
            crf_params=self.config.crf_params,
            timings=self.timings,
            background=bg is not None,
        )
        lut = np.array([IGNORE if bg is None else bg] + classes, dtype=np.int64)
        labels = lut[local]
        return labels, np.ones(labels.shape, np.float32), self._query_scores(masked, classes, vocab)

    def _query_scores(self, masked: torch.Tensor, classes: list[int], vocab: Vocab) -> torch.Tensor:
        k, g1, g2 = masked.shape
        flat = masked.reshape(k, -1)
        hi = flat.amax(1, keepdim=True).clamp_min(1e-30)
        norm = (flat / hi).reshape(k, g1, g2)
        out = torch.zeros(len(vocab.query_to_class), g1, g2)
        q2c = vocab.query_to_class.long()
        for j, c in enumerate(classes):
            out[q2c == c] = norm[j]
        return out

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        raise OvssError(f"{self.name} labels pixels itself (segment_labels); it has no logits")
