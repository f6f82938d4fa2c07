"""PixelCLIP training (METHODS.md §5): ``ovss align --method pixelclip``.

Per step, on a global batch of ``batch_size`` images (contiguous per-rank shares under
torchrun), with the pieces of ``methods.pixelclip``:

1. the teacher (EMA of the student, momentum 0.999) is updated, *then* runs on the weak view;
2. the learnable classes are embedded by the frozen text tower (``PromptedText``);
3. ``prepare_clusters``: mask-pooled teacher features, ε·cos logits, Sinkhorn over every mask of
   the global batch (row sums all-reduced), hard assignment, per-cluster union targets;
4. the student runs on the strong view; its cost maps go through the decoder, bilinear to 256²;
   BCE-with-logits at the pixels some mask covers, normalised by the global count so the summed
   gradients of the ranks equal one process's [ours: an explicit gradient all-reduce];
5. AdamW (lr 2e-4 → 1e-4 cosine over ``iterations``; ×0.01 for CLIP's parameters, ×10 for the
   prompts; weight decay 1e-4), the gradient norm of all trained parameters clipped to 0.01.

Two input paths:

- **pixels** (``trainable_blocks`` 0 = all blocks, the paper): images are read from the paths the
  store records. Weak view: resize the shortest edge to 1024, a random 640² crop, a random flip,
  colour jitter; strong view (student): more jitter, random grayscale, blur and a cutout whose
  area is removed from the masks. [ours] The crop is taken in original coordinates and resized
  straight to 320² (one resampling instead of two); jitter strengths 0.4 / 0.4 / 0.4 / 0.1 (p
  0.8), grayscale p 0.2, blur p 0.5 (σ 0.1–2), one cutout p 0.5 of 2–25 % of the view.
  ``augment=False`` squashes the whole image to 320² as the store's extraction does; each
  image is then decoded and squashed once and its masks resized once, not every step [ours:
  squashed inputs kept up to 512 MiB].
- **store** (``trainable_blocks = K`` < N): the first N − K blocks are frozen and their output is
  read from the ``square320`` CLIP set (``pre_last`` / ``pre_last_cls`` for K = 1, else
  ``layer{N−K−1}`` / ``layer{N−K−1}_cls``, cached by ``extract --layers N−K−1``, which
  ``extract --for pixelclip --set trainable_blocks=K`` plans): only the last K blocks run.
  What the store path gives up: every augmentation (the frozen blocks' input is fixed, so the
  student and teacher see the same whole image squashed to 320²) and training the position
  embedding.

Masks (``methods.pixelclip_masks``): a DINO k-means mask set, SAM automatic masks from the cached
SAM set, or SA-1B JSON; nearest-resized to 256², masks of ≤ 1 pixel dropped. Images without a
mask are skipped and counted (``summary.skipped_images``).

Checkpoint (``<out>/last.pt``): only what is trained (the student's attention projections and
position embedding, the prompts, the decoder; the teacher's EMA copy of the same parameters and
the optimizer state for resuming) plus provenance: the base CLIP identity (model, weights or
``random-init:SEED``, architecture), the mask source, every hyperparameter. A run resumed with
the same command continues from its last save and ends where an uninterrupted run would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from featurestore.errors import MissingFeatureSetError, OvssError
from featurestore.protocol import Protocol
from featurestore.store import STATUS_OK, FeatureStore
from methods.base import FeatureRequirement, LiveModelRequirement, VocabularyDefaults
from methods.pixelclip import (
    CHECKPOINT_FORMAT,
    CLIP_SIZE,
    DEFAULT_MODEL,
    MASK_SIZE,
    DenseCLIP,
    MaskDecoder,
    PromptedText,
    cached_layers,
    cached_tensors,
    cost_maps,
    ema_update,
    make_teacher,
    mask_logits,
    mask_loss,
    parse_arch,
    prepare_clusters,
    split_trained,
    squash_normalise,
    store_protocol,
    text_model_spec,
)
from methods.pixelclip_masks import (
    MASK_SOURCES,
    LabelSetMasks,
    MaskSource,
    SA1BMasks,
    SamMasks,
    load_store_image,
    resize_masks,
)
from methods.train import (
    CHECKPOINT_NAME,
    RUN_KEYS,
    StepMeter,
    Trainer,
    TrainRequest,
    TrainResult,
    allreduce_grads,
    checkpoint_provenance,
    now_utc,
    register_trainer,
    resume_state,
    save_checkpoint,
    setup_distributed,
)

#: Memory for the squashed inputs kept across steps with ``augment=False`` on pixels [ours].
SQUASHED_CACHE_BYTES = 512 * 2**20

#: Provenance sections that must match to resume.
PIXELCLIP_RUN_KEYS = (*RUN_KEYS, "base_clip", "masks", "trainable_blocks")


@dataclass
class PixelCLIPTrainConfig:
    """Hyperparameters of ``ovss align --method pixelclip``.

    Attributes:
        model: the CLIP (a registered name or openclip:MODEL:TAG; the paper: ViT-B/16 OpenAI).
        clip_weights: checkpoint of the CLIP ('' = the usual resolution).
        random_init: a seeded random-init CLIP of the real architecture (tests, demos).
        init_seed: seed of random_init.
        clip_arch: JSON object of open_clip architecture overrides (tiny test models), e.g.
            {"embed_dim": 32, "vision_cfg": {"layers": 2, "width": 64, "heads": 2}}.
        trainable_blocks: K, the trained blocks at the end of the tower; 0 = all (the paper,
            on pixels); K < all reads the frozen blocks' output from the store's square<size>
            CLIP set [ours].
        size: student / teacher / inference input side (320: 20x20 tokens for B/16).
        mask_size: resolution of mask pooling, targets and loss (256).
        masks: mask source: dino (a k-means mask set of ovss cluster --per-image), sam (SAM
            automatic masks from the cached SAM set) or sa1b (SA-1B JSON files).
        mask_set: the mask set with masks=dino ('' = kmeans16-<dino_model set key>).
        dino_model, dino_size: the DINO set the k-means mask set comes from (ViT-S/16; whole
            image, short side dino_size [ours: 448]).
        sam_model, sam_size: the SAM set of masks=sam (longest side sam_size).
        sam_weights: SAM checkpoint for the mask decoder ('' = the set's identity decides).
        points_per_side, pred_iou_thresh, stability_score_thresh, box_nms_thresh: SAM's
            automatic mask generator (its defaults).
        sa1b_dir: folder of SA-1B annotation JSON files (<image id>.json) with masks=sa1b.
        num_classes: k learnable classes (64).
        prompt_length: l tokens per class (4).
        prompt_seed: seed of the random vocabulary ids initialising the prompts.
        decoder_width: channels of the decoder's first two stages, the last has half (64, the
            authors'; smaller only for demos [ours]).
        eps: epsilon of the Sinkhorn logits eps * cos (100 for ViT).
        sinkhorn_iters: Sinkhorn iterations (3).
        momentum: EMA momentum of the teacher (0.999).
        iterations: optimisation steps (10k).
        batch_size: images per step over all processes (48).
        lr, min_lr: cosine schedule from lr to min_lr (2e-4 -> 1e-4), no warm-up.
        weight_decay: AdamW weight decay (1e-4).
        clip_lr_mult: learning-rate factor of CLIP's parameters (0.01).
        prompt_lr_mult: learning-rate factor of the prompts (10).
        grad_clip: maximum gradient norm over all trained parameters (0.01).
        augment: augmentations on the pixel path (weak/strong views); off: the whole image
            squashed to size^2 as the store has it.
        short_side, crop: resize the shortest edge to short_side, then a random crop^2.
        seed: data order and augmentation seed.
        save_every: write the checkpoint every this many steps and after the last [ours: 500].
        amp: bfloat16 autocast on CUDA devices.
    """

    model: str = DEFAULT_MODEL
    clip_weights: str = ""
    random_init: bool = False
    init_seed: int = 0
    clip_arch: str = ""
    trainable_blocks: int = 0
    size: int = CLIP_SIZE
    mask_size: int = MASK_SIZE
    masks: str = field(default="dino", metadata={"choices": MASK_SOURCES})
    mask_set: str = ""
    dino_model: str = "dino-s16"
    dino_size: int = 448
    sam_model: str = "sam-h"
    sam_size: int = 1024
    sam_weights: str = ""
    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    sa1b_dir: str = ""
    num_classes: int = 64
    prompt_length: int = 4
    prompt_seed: int = 0
    decoder_width: int = 64
    eps: float = 100.0
    sinkhorn_iters: int = 3
    momentum: float = 0.999
    iterations: int = 10000
    batch_size: int = 48
    lr: float = 2e-4
    min_lr: float = 1e-4
    weight_decay: float = 1e-4
    clip_lr_mult: float = 0.01
    prompt_lr_mult: float = 10.0
    grad_clip: float = 0.01
    augment: bool = True
    short_side: int = 1024
    crop: int = 640
    seed: int = 0
    save_every: int = 500
    amp: bool = True

    def __post_init__(self) -> None:
        for name in (
            "iterations",
            "batch_size",
            "size",
            "mask_size",
            "num_classes",
            "prompt_length",
            "decoder_width",
        ):
            if getattr(self, name) <= 0:
                raise OvssError(f"pixelclip: {name} must be > 0, not {getattr(self, name)}")
        if self.trainable_blocks < 0:
            raise OvssError(
                f"pixelclip: trainable_blocks must be >= 0 (0 = all), not {self.trainable_blocks}"
            )
        if not 0 <= self.momentum < 1:
            raise OvssError(f"pixelclip: momentum must be in [0, 1), not {self.momentum}")
        if self.masks == "sa1b" and not self.sa1b_dir:
            raise OvssError("pixelclip: masks=sa1b needs sa1b_dir (the annotation folder)")
        parse_arch(self.clip_arch)

    @property
    def clip_protocol(self) -> Protocol:
        return store_protocol(self.size)

    @property
    def dino_protocol(self) -> Protocol:
        return Protocol("short", self.dino_size)

    @property
    def sam_protocol(self) -> Protocol:
        return Protocol("long", self.sam_size)

    def sam_options(self) -> dict[str, Any]:
        return {
            "points_per_side": self.points_per_side,
            "pred_iou_thresh": self.pred_iou_thresh,
            "stability_score_thresh": self.stability_score_thresh,
            "box_nms_thresh": self.box_nms_thresh,
        }


def lr_at(step: int, total: int, peak: float, floor: float) -> float:
    """Cosine from ``peak`` (step 0) to ``floor`` (step ``total``)."""
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def clip_depth(model: str, arch: dict | None) -> int:
    """Blocks of the CLIP image tower (from open_clip's config, no weights loaded)."""
    import open_clip

    from featurestore.backbones.clip import resolve_variant

    cfg = open_clip.get_model_config(resolve_variant(model).model) or {}
    layers = (cfg.get("vision_cfg") or {}).get("layers", 12)
    if arch and "layers" in (arch.get("vision_cfg") or {}):
        layers = arch["vision_cfg"]["layers"]
    return int(layers)


def resolve_blocks(config: PixelCLIPTrainConfig, depth: int) -> int:
    """``K``: ``trainable_blocks`` (0 = all), checked against the depth."""
    k = config.trainable_blocks or depth
    if k > depth:
        raise OvssError(f"pixelclip: trainable_blocks {k} > the {depth} blocks of {config.model}")
    return k


# --------------------------------------------------------------------------------------------
# Augmentations (pixel path)
# --------------------------------------------------------------------------------------------


def _u(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _jitter(x: torch.Tensor, gen: torch.Generator, p: float = 0.8) -> torch.Tensor:
    """Colour jitter of a ``(3, H, W)`` [0, 1] image (brightness, contrast, saturation 0.4, hue
    0.1, random order as torchvision's ``ColorJitter``) with probability ``p``."""
    import torchvision.transforms.v2.functional as TF

    if _u(gen) >= p:
        return x
    ops = [
        lambda y: TF.adjust_brightness(y, _u(gen, 0.6, 1.4)),
        lambda y: TF.adjust_contrast(y, _u(gen, 0.6, 1.4)),
        lambda y: TF.adjust_saturation(y, _u(gen, 0.6, 1.4)),
        lambda y: TF.adjust_hue(y, _u(gen, -0.1, 0.1)),
    ]
    for i in torch.randperm(4, generator=gen).tolist():
        x = ops[i](x)
    return x.clamp(0, 1)


def augment_views(
    image: np.ndarray, masks: np.ndarray, cfg: PixelCLIPTrainConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weak and strong views and their masks (module doc).

    Args:
        image: ``(H, W, 3)`` uint8.
        masks: ``(n, H, W)`` bool at the image's size.

    Returns:
        ``(weak, strong, masks)``: two ``(3, size, size)`` views in [0, 1] (not normalised) and
        ``(n, mask_size, mask_size)`` bool masks of the crop (flipped alike, the cutout removed;
        ≤ 1-pixel masks dropped).
    """
    import torchvision.transforms.v2.functional as TF

    h, w = image.shape[:2]
    scale = cfg.short_side / min(h, w)
    rh, rw = round(h * scale), round(w * scale)
    c = min(cfg.crop, rh, rw)
    y0 = int(torch.randint(rh - c + 1, (), generator=gen))
    x0 = int(torch.randint(rw - c + 1, (), generator=gen))
    oy0, oy1 = int(y0 / scale), max(int(math.ceil((y0 + c) / scale)), int(y0 / scale) + 1)
    ox0, ox1 = int(x0 / scale), max(int(math.ceil((x0 + c) / scale)), int(x0 / scale) + 1)
    region = torch.from_numpy(np.ascontiguousarray(image[oy0:oy1, ox0:ox1])).permute(2, 0, 1)
    view = F.interpolate(
        region[None].float() / 255.0,
        size=(cfg.size, cfg.size),
        mode="bilinear",
        align_corners=False,
    )[0]
    m = torch.from_numpy(np.ascontiguousarray(masks[:, oy0:oy1, ox0:ox1]))
    m = F.interpolate(m[None].float(), size=(cfg.mask_size,) * 2, mode="nearest")[0] > 0.5
    if _u(gen) < 0.5:
        view, m = view.flip(-1), m.flip(-1)
    weak = _jitter(view, gen)
    strong = _jitter(weak, gen)
    if _u(gen) < 0.2:
        strong = TF.rgb_to_grayscale(strong, num_output_channels=3)
    if _u(gen) < 0.5:
        sigma = _u(gen, 0.1, 2.0)
        k = 2 * math.ceil(3 * sigma) + 1
        strong = TF.gaussian_blur(strong, [k, k], [sigma, sigma])
    if _u(gen) < 0.5:
        area = _u(gen, 0.02, 0.25)
        side = max(int(round(math.sqrt(area) * cfg.size)), 1)
        cy = int(torch.randint(cfg.size - side + 1, (), generator=gen))
        cx = int(torch.randint(cfg.size - side + 1, (), generator=gen))
        strong = strong.clone()
        strong[:, cy : cy + side, cx : cx + side] = 0.5  # [ours] mid grey (≈ the CLIP mean)
        f = cfg.mask_size / cfg.size
        my0, my1 = int(cy * f), int(math.ceil((cy + side) * f))
        mx0, mx1 = int(cx * f), int(math.ceil((cx + side) * f))
        m = m.clone()
        m[:, my0:my1, mx0:mx1] = False
    m = m[m.sum(dim=(1, 2)) > 1]
    return weak, strong, m


def _normalise(x: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def open_mask_source(store: FeatureStore, cfg: PixelCLIPTrainConfig) -> MaskSource:
    """The configured mask source (``masks``).

    Raises:
        MissingLabelSetError / MissingFeatureSetError: the mask set or SAM set is missing.
        MaskSourceError: a malformed annotation folder.
    """
    if cfg.masks == "dino":
        name = cfg.mask_set
        if not name:
            from featurestore.store import set_key
            from methods.cluster import default_set_name

            name = default_set_name("per-image", 16, set_key(cfg.dino_model, cfg.dino_protocol))
        return LabelSetMasks(store, name)
    if cfg.masks == "sam":
        try:
            fs = store.require(cfg.sam_model, cfg.sam_protocol, tensors=("embedding",))
        except MissingFeatureSetError as e:
            e.needed_by = e.needed_by or "pixelclip"
            e.role = e.role or "sam"
            raise
        return SamMasks(store, fs, cfg.sam_options(), cfg.sam_weights or None)
    return SA1BMasks(store, cfg.sa1b_dir)


@dataclass
class TrainData:
    """The training images and their masks.

    Attributes:
        indices: ``(n,)`` store indices of the images trained on (each with ≥ 1 mask).
        masks: store path and pixels without augmentation: per index, its resized masks
            ``(m, S, S)`` bool (read once).
        skipped: images without a mask (after resizing), and pending images, counted.
    """

    indices: np.ndarray
    masks: dict[int, torch.Tensor]
    skipped: dict[str, int]


def prepare_data(
    store: FeatureStore,
    source: MaskSource,
    cfg: PixelCLIPTrainConfig,
    candidates: np.ndarray,
    keep_masks: bool,
    progress: Any = None,
) -> TrainData:
    """Read every candidate image's masks once, drop images without any.

    Raises:
        OvssError: no image has masks (naming the counts).
    """
    keep, masks = [], {}
    no_masks = 0
    for n, i in enumerate(candidates.tolist()):
        m = source.masks(int(i))
        r = resize_masks(m, cfg.mask_size) if m is not None else None
        if r is None or len(r) == 0:
            no_masks += 1
        else:
            keep.append(int(i))
            if keep_masks:
                masks[int(i)] = r
        if progress and (n + 1 == len(candidates) or (n + 1) % 100 == 0):
            progress({"stage": "masks", "done": n + 1, "total": len(candidates)})
    skipped = {"no_masks": no_masks, "pending_features": int(store.n_images - len(candidates))}
    if not keep:
        raise OvssError(
            f"pixelclip: none of the {len(candidates)} images has a mask of more than one pixel "
            f"({source.kind} masks); nothing to train on"
        )
    return TrainData(np.array(keep, dtype=np.int64), masks, skipped)


def batch_order(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Global batch of ``step``: positions ``step·b .. step·b + b`` of the stream of seeded
    permutations of the ``n`` images (one permutation per pass)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[j]))
    return np.array(out, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# The model bundle and one step
# --------------------------------------------------------------------------------------------


class PixelCLIPModel:
    """Student, teacher, prompts and decoder of one run, and its optimisation step.

    Args:
        clip: the whole open_clip CLIP (its visual tower becomes the student).
        tokenizer: its tokenizer.
        cfg: the config.
        k: trainable blocks ``K`` (resolved).
        pos_interp: the position-embedding rule.
    """

    def __init__(
        self, clip: Any, tokenizer: Any, cfg: PixelCLIPTrainConfig, k: int, pos_interp: str
    ):
        self.cfg = cfg
        self.text = PromptedText(
            clip, tokenizer, cfg.num_classes, cfg.prompt_length, cfg.prompt_seed
        )
        self.student = DenseCLIP(clip.visual, k, pos_interp)
        self.teacher = make_teacher(self.student)
        torch.manual_seed(cfg.seed)
        w = cfg.decoder_width
        self.decoder = MaskDecoder((w, w, max(w // 2, 1)))
        self.clip_params = [p for p in self.student.parameters() if p.requires_grad]
        self.params = [*self.clip_params, self.text.prompts, *self.decoder.parameters()]
        base = cfg.lr
        self.opt = torch.optim.AdamW(
            [
                {"params": self.clip_params, "lr_mult": cfg.clip_lr_mult},
                {"params": [self.text.prompts], "lr_mult": cfg.prompt_lr_mult},
                {"params": list(self.decoder.parameters()), "lr_mult": 1.0},
            ],
            lr=base,
            weight_decay=cfg.weight_decay,
        )

    def to(self, device: torch.device) -> PixelCLIPModel:
        self.text.to(device)
        self.student.to(device)
        self.teacher.to(device)
        self.decoder.to(device)
        return self

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]

    def features(self, net: DenseCLIP, inputs: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Dense ``(B, gh, gw, E)`` from pixels ``(B, 3, S, S)`` or tokens ``(B, 1 + n, D)``."""
        if inputs.dim() == 4:
            return net(inputs)
        return net.from_tokens(inputs, grid)

    def loss(
        self,
        student_in: torch.Tensor,
        teacher_in: torch.Tensor,
        masks: list[torch.Tensor],
        grid: tuple[int, int],
        world: int = 1,
        amp: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """EMA update, teacher forward, clusters, student forward and the loss of this
        rank's share (its sum over the global covered-pixel count)."""
        cfg = self.cfg
        ema_update(self.teacher, self.student, cfg.momentum)
        dev_type = student_in.device.type
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                tf = self.features(self.teacher, teacher_in, grid).float()
            classes = self.text().float()
            ct = prepare_clusters(tf, masks, classes, cfg.eps, cfg.sinkhorn_iters, world)
            sf = self.features(self.student, student_in, grid)
            logits = mask_logits(cost_maps(sf.float(), classes), self.decoder, cfg.mask_size)
        covered = ct.targets.any(dim=1).sum().to(torch.float64).reshape(1)
        if world > 1:
            dist.all_reduce(covered)
        denom = float(covered) * cfg.num_classes
        loss = mask_loss(logits.float(), ct.targets, denom)
        used = torch.bincount(ct.assignment, minlength=cfg.num_classes)
        stats = {"masks": int(ct.n_masks.sum()), "clusters_used": int((used > 0).sum())}
        return loss, stats

    def step(
        self,
        student_in: torch.Tensor,
        teacher_in: torch.Tensor,
        masks: list[torch.Tensor],
        grid: tuple[int, int],
        lr: float,
        world: int = 1,
        amp: bool = False,
    ) -> tuple[float, dict[str, Any]]:
        """One optimisation step; returns the global loss and stats."""
        self.set_lr(lr)
        loss, stats = self.loss(student_in, teacher_in, masks, grid, world, amp)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            allreduce_grads(self.params)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        val = loss.detach().double().reshape(1)
        if world > 1:
            dist.all_reduce(val)
            m = torch.tensor([stats["masks"]], dtype=torch.float64, device=val.device)
            dist.all_reduce(m)
            stats["masks"] = int(m)
        return float(val), stats

    def trained(self) -> dict[str, torch.Tensor]:
        """What the checkpoint keeps of the model: the trained tensors only (CPU), flat:
        ``visual.<name>`` (the student's), ``prompts`` ``(k, l, W)``, ``decoder.<name>``."""
        out = {f"visual.{n}": v for n, v in self.student.trained_state().items()}
        out["prompts"] = self.text.prompts.detach().cpu().clone()
        out |= {
            f"decoder.{n}": v.detach().cpu().clone() for n, v in self.decoder.state_dict().items()
        }
        return out

    def load(self, ck: dict[str, Any]) -> None:
        visual, prompts, decoder = split_trained(ck["model"])
        self.student.load_trained_state(visual)
        self.teacher.load_trained_state(ck["teacher"])
        with torch.no_grad():
            self.text.prompts.copy_(prompts)
        self.decoder.load_state_dict(decoder)
        self.opt.load_state_dict(ck["optimizer"])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _check_store_set(fs: Any, model: DenseCLIP, info: Any) -> None:
    """The cached set must come from the same CLIP (weights identity, last block, rule)."""
    bb = fs.provenance["backbone"]
    if bb.get("weights") != info.weights:
        raise OvssError(
            f"feature set '{fs.key}' was made with CLIP weights {bb.get('weights')}, the trained "
            f"CLIP is {info.weights}; extract it with the same CLIP or train on pixels"
        )
    rule = (bb.get("extra") or {}).get("pos_interp")
    if rule and rule != model.pos_interp:
        raise OvssError(
            f"feature set '{fs.key}' resampled the position embedding by '{rule}', the trainer "
            f"uses '{model.pos_interp}'"
        )
    block = model.visual.transformer.resblocks[-1]
    cached = np.asarray(fs.static("last_block.attn.in_proj_weight"))
    mine = block.attn.in_proj_weight.detach().cpu().numpy()
    if cached.shape != mine.shape or not np.allclose(cached, mine, atol=1e-6):
        raise OvssError(
            f"feature set '{fs.key}' was made by another architecture or initialisation of "
            "the CLIP (its last block differs)"
        )


def _read_tokens(fs: Any, names: tuple[str, str], indices: list[int]) -> torch.Tensor:
    rows = []
    for i in indices:
        f = fs.read(int(i), names=list(names))
        if len(f.win_grid) != 1:
            raise OvssError(
                f"pixelclip trains on whole-image sets (one window); '{fs.key}' has "
                f"{len(f.win_grid)} windows for image {f.image_id}"
            )
        tok = np.asarray(f.tensors[names[0]], np.float32)
        cls = np.asarray(f.tensors[names[1]], np.float32).reshape(1, -1)
        rows.append(torch.from_numpy(np.concatenate([cls, tok])))
    return torch.stack(rows)


def train_pixelclip(request: TrainRequest, progress: Any = None) -> TrainResult:
    """Train (or resume) PixelCLIP; see the module doc and :class:`TrainRequest`.

    ``request.config`` is a :class:`PixelCLIPTrainConfig` (None: defaults). Returns a
    :class:`TrainResult`; the checkpoint is ``<out>/last.pt``.
    """
    with setup_distributed(request.device) as ctx:
        return _train(request, progress if ctx.rank == 0 else None, ctx)


def _train(request: TrainRequest, progress: Any, ctx: Any) -> TrainResult:
    from featurestore.backbones.clip import DEFAULT_POS_INTERP, load_open_clip

    cfg: PixelCLIPTrainConfig = request.config or PixelCLIPTrainConfig()
    dev = ctx.device
    store = FeatureStore.open(request.store)
    arch = parse_arch(cfg.clip_arch)
    clip, tokenizer, info = load_open_clip(
        cfg.model,
        weights=cfg.clip_weights or None,
        random_init=cfg.random_init,
        seed=cfg.init_seed,
        arch_overrides=arch,
    )
    depth = len(clip.visual.transformer.resblocks)
    k = resolve_blocks(cfg, depth)
    on_store = k < depth
    model = PixelCLIPModel(clip, tokenizer, cfg, k, DEFAULT_POS_INTERP)
    fs = None
    names = cached_tensors(depth, k)
    if on_store:
        try:
            fs = store.require(cfg.model, cfg.clip_protocol, tensors=names)
        except MissingFeatureSetError as e:
            e.needed_by = e.needed_by or "pixelclip"
            e.role = e.role or "clip"
            raise
        _check_store_set(fs, model.student, info)
        candidates = np.flatnonzero(fs.status() == STATUS_OK)
    else:
        candidates = np.arange(store.n_images)
    source = open_mask_source(store, cfg)
    fixed_views = on_store or not cfg.augment  # inputs and masks the same at every step
    data = prepare_data(store, source, cfg, candidates, keep_masks=fixed_views, progress=progress)
    base_clip = {
        "model": cfg.model,
        "weights": cfg.clip_weights or None,
        "random_init": cfg.random_init,
        "seed": cfg.init_seed,
        "arch_overrides": arch,
        "weights_identity": info.weights,
        "mean": list(info.mean),
        "std": list(info.std),
    }
    prov = checkpoint_provenance(
        "pixelclip",
        cfg,
        features=fs,
        tensor="+".join(names) if fs is not None else None,
        base_clip=base_clip,
        masks=source.describe(),
        trainable_blocks=k,
        depth=depth,
        pos_interp=DEFAULT_POS_INTERP,
        input="store" if on_store else "pixels",
        dims={"width": model.student.width, "embed": model.student.embed_dim},
    )
    out = (
        Path(request.out_dir)
        if request.out_dir
        else Path(store.path).parent / "align" / f"pixelclip-{cfg.model.replace(':', '_')}-k{k}"
    )
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME
    model.to(dev)
    step, history = 0, []
    ck = resume_state(
        ckpt_path,
        prov,
        request.restart,
        "cpu",
        PIXELCLIP_RUN_KEYS,
        trust=request.trust_checkpoint,
    )
    if ck is not None:
        model.load(ck)
        step, history = int(ck["step"]), list(ck["history"])
    created = now_utc()
    total = cfg.iterations
    spe = math.ceil(len(data.indices) / cfg.batch_size)  # steps of one pass over the images
    epochs = math.ceil(total / spe)
    meter = StepMeter(progress, epochs, total, unit="images")
    records = store.image_records()
    p = model.student.patch_size
    grid = (cfg.size // p, cfg.size // p)
    use_amp = cfg.amp and dev.type == "cuda"
    running: dict[str, float] = dict((ck or {}).get("running") or {})
    losses: list[float] = list((ck or {}).get("losses") or [])

    def save() -> None:
        ctx.barrier()
        if ctx.rank == 0:
            save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "model": model.trained(),
                    "teacher": model.teacher.trained_state(),
                    "optimizer": model.opt.state_dict(),
                    "step": step,
                    "history": history,
                    "losses": losses,
                    "running": running,
                    "provenance": {**prov, "created": created},
                    "world_size": ctx.world,
                },
                ckpt_path,
            )
        ctx.barrier()

    mean, std = list(info.mean), list(info.std)
    # augment=False on pixels: each image is decoded and squashed once, up to a memory budget
    squashed: dict[int, torch.Tensor] = {}
    budget = SQUASHED_CACHE_BYTES // (3 * cfg.size * cfg.size * 4)
    meter.start_epoch()
    while step < total:
        order = batch_order(len(data.indices), cfg.batch_size, step, cfg.seed)
        share = ctx.rank_slice(len(order))
        positions = list(range(share.start, share.stop))
        idx = [int(data.indices[j]) for j in order[share]]
        if on_store:
            tokens = _read_tokens(fs, names, idx).to(dev)
            s_in = t_in = tokens
            masks = [data.masks[i].to(dev) for i in idx]
        else:
            weak, strong, masks = [], [], []
            for pos, i in zip(positions, idx, strict=True):
                if cfg.augment:
                    img = load_store_image(store, records[i])
                    gen = torch.Generator().manual_seed(
                        (cfg.seed * 1_000_003 + step) * 10_007 + pos
                    )
                    w, s, mm = augment_views(img, source.masks(i), cfg, gen)
                    weak.append(_normalise(w, mean, std))
                    strong.append(_normalise(s, mean, std))
                else:
                    v = squashed.get(i)
                    if v is None:
                        v = squash_normalise(
                            load_store_image(store, records[i]), cfg.size, mean, std
                        )
                        if len(squashed) < budget:
                            squashed[i] = v
                    weak.append(v)
                    strong.append(v)
                    mm = data.masks[i]
                masks.append(mm.to(dev))
            t_in = torch.stack(weak).to(dev)
            s_in = torch.stack(strong).to(dev)
        lr = lr_at(step, total, cfg.lr, cfg.min_lr)
        loss, stats = model.step(s_in, t_in, masks, grid, lr, ctx.world, use_amp)
        step += 1
        losses.append(loss)
        running["loss"] = running.get("loss", 0.0) + loss
        running["steps"] = running.get("steps", 0) + 1
        running["masks"] = running.get("masks", 0) + stats["masks"]
        epoch = (step - 1) // spe + 1
        meter.step(epoch, step, loss, lr, len(order))
        if step % spe == 0 or step == total:
            n = max(running["steps"], 1)
            rec = meter.end_epoch(
                {
                    "epoch": epoch,
                    "loss": running["loss"] / n,
                    "masks_per_step": running["masks"] / n,
                }
            )
            history.append(rec)
            running = {}
            if not cfg.save_every or step % cfg.save_every == 0 or step == total:
                save()
            meter.report_epoch(rec)
            meter.start_epoch()
        elif cfg.save_every and step % cfg.save_every == 0:
            save()
    return TrainResult(
        trainer="pixelclip",
        checkpoint=str(ckpt_path),
        epochs_done=epochs,
        steps_done=step,
        history=history,
        provenance=prov,
        summary={
            "train_images": int(len(data.indices)),
            "skipped_images": data.skipped,
            "input": "store" if on_store else "pixels",
            "trainable_blocks": k,
            "text_model": text_model_spec(ckpt_path),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "losses": losses,
        },
        rank=ctx.rank,
        world_size=ctx.world,
        segment_method="pixelclip",
    )


@register_trainer
class PixelCLIPTrainer(Trainer):
    """Fine-tune CLIP's image encoder with unlabeled masks (PixelCLIP).

    Masks: a DINO k-means mask set (ovss cluster --per-image), SAM automatic masks from the
    cached SAM set, or SA-1B JSON (--masks, --mask-set, --sa1b-dir). The student runs on the
    pixels the store records (--trainable-blocks 0, all blocks, the paper) or, with
    --trainable-blocks K, only its last K blocks on the frozen blocks' cached output (plan the
    set with extract --for pixelclip --set trainable_blocks=K; no augmentation then).
    [ours] choices: the store path, DINO masks from short-side-448 features by default, the
    augmentation strengths, the crop resized straight to 320, no warm-up, gradient all-reduce
    under torchrun, checkpoint every 500 steps. Segment with the pixelclip method and
    --checkpoint OUT/last.pt.
    """

    name = "pixelclip"
    Config = PixelCLIPTrainConfig
    doc = "PixelCLIP: CLIP fine-tuned with unlabeled masks (DINO k-means, SAM or SA-1B)"
    needs_labels = False
    segment_method = "pixelclip"
    smoke_overrides = {
        "random_init": True,
        "clip_arch": '{"embed_dim": 32, "vision_cfg": {"layers": 2, "width": 64, "heads": 2}, '
        '"text_cfg": {"layers": 2, "width": 64, "heads": 2}}',
        "iterations": 2,
        "num_classes": 4,
        "size": 64,
        "mask_size": 32,
        "augment": False,
        "save_every": 0,
        "mask_set": "smoke-masks",
    }

    @classmethod
    def smoke_config(cls, workdir: Path, store: Any) -> dict[str, Any]:
        """The smoke values plus a two-mask set (left / right halves) written into ``store``;
        one pass over the images per step (two epochs of one step)."""
        from featurestore.labelsets import create_label_set

        ls = create_label_set(store, "smoke-masks", {"class_names": [["a"], ["b"]]}, overwrite=True)
        for i, (h, w) in enumerate(np.asarray(store.root["images/size"][...]).tolist()):
            lab = np.zeros((h, w), np.uint8)
            lab[:, w // 2 :] = 1
            ls.write(i, lab)
        return {**cls.smoke_overrides, "batch_size": int(store.n_images)}

    @classmethod
    def requirements(cls, config: PixelCLIPTrainConfig) -> list[Any]:
        reqs: list[Any] = []
        depth = clip_depth(config.model, parse_arch(config.clip_arch))
        k = resolve_blocks(config, depth)
        if k < depth:
            reqs.append(
                FeatureRequirement(
                    "clip",
                    config.model,
                    config.clip_protocol,
                    cached_tensors(depth, k),
                    model_field="model",
                    layers=cached_layers(depth, k),
                )
            )
        else:
            reqs.append(LiveModelRequirement("clip", config.model, model_field="model"))
        if config.masks == "dino":
            reqs.append(
                FeatureRequirement(
                    "dino",
                    config.dino_model,
                    config.dino_protocol,
                    ("patch",),
                    model_field="dino_model",
                    optional=bool(config.mask_set),
                )
            )
        elif config.masks == "sam":
            reqs.append(
                FeatureRequirement(
                    "sam", config.sam_model, config.sam_protocol, ("embedding",), "sam_model"
                )
            )
        return reqs

    @classmethod
    def recipe_notes(cls, config: PixelCLIPTrainConfig) -> list[str]:
        notes = []
        if config.masks == "dino" and not config.mask_set:
            notes.append(
                f"then the DINO masks: per-image k-means (k = 16) of the {config.dino_model} "
                "set (the cluster command, --per-image)"
            )
        return notes

    @classmethod
    def vocabulary_defaults(cls, config: PixelCLIPTrainConfig) -> VocabularyDefaults:
        return VocabularyDefaults(text_model=config.model, templates="pixelclip8", family="sclip")

    def fit(self, request: TrainRequest, progress: Any = None) -> TrainResult:
        return train_pixelclip(request, progress)


__all__ = [
    "PixelCLIPModel",
    "PixelCLIPTrainConfig",
    "PixelCLIPTrainer",
    "TrainData",
    "augment_views",
    "batch_order",
    "lr_at",
    "open_mask_source",
    "prepare_data",
    "train_pixelclip",
]
