"""SimZSS training (METHODS.md §2): ``ovss align --method simzss --captions FILE``.

The vision tower is frozen and cached: every step reads the DINOv2 CLS + patch tokens of its
images from the store (held in memory when they fit in ``cache_gb``, otherwise read per step
with the next batch prefetched), so only the text tower runs. Per step a global batch of
``batch_size`` (image, caption) pairs: each caption of an image is its own pair [ours: one
epoch visits every caption once; two captions of one image may share a batch, as open_clip's
caption datasets do].

Optimisation as the paper / open_clip: AdamW (β 0.9 / 0.98, eps 1e-6; torch's fused kernel on
CPU and CUDA), peak learning rate
``lr × batch_size / 256``, weight decay 0.2 on the weight matrices and embeddings only (not on
gains, biases or ``logit_scale``), linear warm-up over the first 10 % of the steps then cosine
decay to 0 (open_clip's ``cosine_lr``), ``logit_scale`` clamped to [0, ln 100] after every
step, bfloat16 autocast on CUDA (``amp``). [ours] The last partial batch of an epoch is kept.

Under torchrun (``WORLD_SIZE`` > 1) each step's pairs are split into contiguous per-rank
shares. Each rank computes its captions' text concepts and EOT embeddings; these (and the
concept ids and CLS tokens) are gathered so the batch concepts ``h`` and the InfoNCE negatives
are those of the whole global batch; each rank evaluates its own share of the loss (its images'
visual concepts, its InfoNCE rows), gradients of gathered rows are summed back to their rank,
and parameter gradients are summed over the ranks: the same step as one process on the global
batch [ours: an explicit gradient all-reduce instead of DistributedDataParallel, because the
shares are not identical losses].

Resuming: a checkpoint (``<out>/last.pt``) is written every ``save_every`` steps and at the end
(``save_every`` 0: after every epoch); the data order of an epoch is a function of (seed,
epoch), and the checkpoint holds the optimizer state and the epoch's running sums, so a run killed and restarted with the same
command ends with the same weights as an uninterrupted one. Provenance: feature set and its
weights identity, caption file hash and join counts, concept bank hash and matcher, tokenizer,
every hyperparameter.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from featurestore.errors import MissingFeatureSetError, OvssError
from featurestore.protocol import Protocol
from featurestore.store import STATUS_OK, FeatureSet, FeatureStore
from methods.base import FeatureRequirement, VocabularyDefaults
from methods.simzss import (
    CHECKPOINT_FORMAT,
    DEFAULT_MODEL,
    LOGIT_SCALE_INIT,
    TOKENIZER,
    TRAIN_RESIZE,
    TRAIN_SIZE,
    ConceptBatch,
    LossParts,
    TextTower,
    get_tokenizer,
    simzss_loss,
    text_model_spec,
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

#: Provenance sections that must match to resume.
SIMZSS_RUN_KEYS = (*RUN_KEYS, "captions", "concepts", "tokenizer")


@dataclass
class SimZSSTrainConfig:
    """Hyperparameters of ``ovss align --method simzss``.

    Attributes:
        captions: caption file: a COCO captions JSON, or a CSV / JSONL of image,caption rows
            (image = store image id or path); required.
        concepts: extra concept file (one concept per line) added to the bank of the shipped
            class names.
        spacy_model: an installed spaCy pipeline (package name or folder) for noun phrases
            (extra 'nlp'); '' = the offline bank matcher [ours].
        model: the DINO-family feature model (the paper: dinov2-b14-reg).
        train_resize, train_size: the training feature set's resize rule and size:
            square 224 [ours: no augmentation, the cache is fixed] or short side 224.
        eval_size, eval_crop, eval_stride: the evaluation feature set that extract plans beside
            the training one (TCL protocol: short 448, windows 448, stride 224).
        text_width, text_layers, text_heads, context_length: the text transformer (512 / 12 /
            8 / 77 as CLIP's; smaller for tests and demos).
        global_token: the image side of the global loss: cls (the paper) or patch_mean, the
            mean of the image's patch tokens [ours: for backbones whose CLS carries no image
            information, e.g. a random-init DINOv2, where LayerScale 1e-5 leaves every image
            the same CLS].
        tau: softmax temperature over patches when a concept queries an image (Eq. 3).
        local_scale: fixed scale of the concept-level cross-entropy (1/0.07).
        lam: weight λ of the concept-level loss (Eq. 10).
        concept_reduce: pooling of a concept's token embeddings: mean (the paper) or sum
            (the released code).
        local_target: concept-loss target: label (the concept itself) or argmax (the
            released code's own prediction).
        epochs: passes over the captions [ours: 7 ≈ the paper's 4M samples on COCO].
        batch_size: captions per step, over all processes (the paper: 16384).
        lr: peak learning rate per 256 captions (peak = lr × batch_size / 256).
        weight_decay: AdamW decay of weight matrices and embeddings.
        beta1, beta2, eps: AdamW moments and epsilon.
        warmup: fraction of the steps with linear warm-up.
        seed: initialisation and data-order seed.
        save_every: write the checkpoint every this many steps and after the last one (0:
            after every epoch) [ours: 500].
        amp: bfloat16 autocast on CUDA devices.
        cache_gb: hold the training tokens in memory when they fit in this many GiB, else
            read them per step [ours: 4].
    """

    captions: str = ""
    concepts: str = ""
    spacy_model: str = ""
    model: str = DEFAULT_MODEL
    train_resize: str = field(default=TRAIN_RESIZE, metadata={"choices": ("square", "short")})
    train_size: int = TRAIN_SIZE
    eval_size: int = 448
    eval_crop: int = 448
    eval_stride: int = 224
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    global_token: str = field(default="cls", metadata={"choices": ("cls", "patch_mean")})
    tau: float = 0.1
    local_scale: float = 1 / 0.07
    lam: float = 0.05
    concept_reduce: str = field(default="mean", metadata={"choices": ("mean", "sum")})
    local_target: str = field(default="label", metadata={"choices": ("label", "argmax")})
    epochs: int = 7
    batch_size: int = 16384
    lr: float = 3e-5
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: float = 0.1
    seed: int = 0
    save_every: int = 500
    amp: bool = True
    cache_gb: float = 4.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "train_size", "text_width", "text_layers"):
            if getattr(self, name) <= 0:
                raise OvssError(f"simzss: {name} must be > 0, not {getattr(self, name)}")
        if self.text_width % self.text_heads:
            raise OvssError(
                f"simzss: text_width {self.text_width} is not a multiple of text_heads "
                f"{self.text_heads}"
            )
        if not 0 <= self.warmup < 1:
            raise OvssError(f"simzss: warmup must be in [0, 1), not {self.warmup}")

    @property
    def train_protocol(self) -> Protocol:
        return Protocol(self.train_resize, self.train_size)

    @property
    def eval_protocol(self) -> Protocol:
        return Protocol("short", self.eval_size, crop=self.eval_crop, stride=self.eval_stride)

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / 256


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """open_clip's ``cosine_lr``: ``peak (s+1)/W`` for the first ``W = round(warmup·total)``
    steps, then ``peak/2 (1 + cos(π (s-W)/(total-W)))``."""
    w = int(round(warmup * total))
    if step < w:
        return peak * (step + 1) / w
    e, es = step - w, max(total - w, 1)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * peak


def param_groups(tower: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on parameters with ≥ 2 dims except ``logit_scale``; none on gains,
    biases and ``logit_scale`` (open_clip's rule)."""
    decay, no_decay = [], []
    for n, p in tower.named_parameters():
        if p.ndim < 2 or "logit_scale" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class CaptionData:
    """The training pairs with their tokens and concepts.

    Attributes:
        image: ``(P,)`` store image index of each pair.
        tokens: ``(P, L)`` int64 token ids.
        concepts: per pair, ``(concept id, token indices)`` of its occurrences.
        stats: counts for the report (unknown images, captions without a concept, ...).
    """

    image: np.ndarray
    tokens: torch.Tensor
    concepts: list[list[tuple[int, list[int]]]]
    stats: dict[str, Any]


def prepare_captions(
    store: FeatureStore, fs: FeatureSet, cfg: SimZSSTrainConfig, progress: Any = None
) -> tuple[CaptionData, dict[str, Any], dict[str, Any]]:
    """Join the captions to the store, find their concepts, tokenise them.

    Returns ``(data, captions provenance, concepts provenance)``.

    Raises:
        OvssError: no caption file given, no caption joins a finished image of the set, or the
            caption / concept files are unusable.
    """
    from featurestore.captions import join_captions
    from methods.concepts import ConceptBank, annotate_caption, make_matcher

    if not cfg.captions:
        raise OvssError("simzss trains on captions: give --captions FILE (COCO JSON, CSV, JSONL)")
    join = join_captions(cfg.captions, store)
    ok = fs.status() == STATUS_OK
    pairs = [(i, c) for i, c in join.pairs if ok[i]]
    pending = len(join.pairs) - len(pairs)
    if not pairs:
        raise OvssError(
            f"no caption of {cfg.captions} belongs to a finished image of '{fs.key}' "
            f"({len(join.unknown)} captions name images not in the store, {pending} images "
            "without features)"
        )
    bank = ConceptBank.build(cfg.concepts or None)
    matcher = make_matcher(bank, cfg.spacy_model or None)
    tok = get_tokenizer(cfg.context_length)
    tokens = torch.zeros(len(pairs), cfg.context_length, dtype=torch.long)
    concepts: list[list[tuple[int, list[int]]]] = []
    no_concept = truncated = occurrences = 0
    for n, (_, cap) in enumerate(pairs):
        a = annotate_caption(cap, matcher, tok, cfg.context_length)
        tokens[n] = a.tokens
        occ = [(o.concept, o.tokens) for o in a.concepts]
        concepts.append(occ)
        no_concept += not occ
        truncated += a.truncated
        occurrences += len(occ)
        if progress and (n + 1 == len(pairs) or (n + 1) % 1000 == 0):
            progress({"stage": "concepts", "done": n + 1, "total": len(pairs)})
    stats = {
        **join.summary(),
        "pairs": len(pairs),
        "pending_images": pending,
        "captions_without_concept": no_concept,
        "concept_occurrences": occurrences,
        "occurrences_cut_by_context": truncated,
    }
    cap_prov = {
        "file": str(Path(cfg.captions).expanduser().resolve()),
        "sha256": join.sha256,
        "format": join.format,
        "pairs": len(pairs),
        "unknown_images": len(join.unknown),
    }
    con_prov = {
        "bank_key": bank.key(),
        "size": len(bank),
        "sources": list(bank.sources),
        "matcher": matcher.name,
        "spacy_model": cfg.spacy_model or None,
    }
    data = CaptionData(np.array([i for i, _ in pairs], dtype=np.int64), tokens, concepts, stats)
    return data, cap_prov, con_prov


class TokenReader:
    """CLS ``(b, D)`` and padded patches ``(b, N, D)`` + validity of store images, from memory
    when all training images fit in ``cache_bytes``."""

    def __init__(self, fs: FeatureSet, indices: np.ndarray, cache_bytes: float):
        self.fs = fs
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        uniq = np.unique(indices)
        n_tok = fs.geometry["row_count_token"]
        width = int(np.prod(next(s.row_shape for s in fs.specs if s.name == "patch")))
        self.dim = width
        if sum(int(n_tok[i]) + 1 for i in uniq) * width * 4 <= cache_bytes:
            for i in uniq.tolist():
                self.cache[i] = self._read(i)

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        f = self.fs.read(int(i), names=["patch", "cls"])
        if len(f.win_grid) != 1:
            raise OvssError(
                f"simzss trains on whole-image feature sets (one window per image); "
                f"'{self.fs.key}' has {len(f.win_grid)} windows for image {f.image_id}"
            )
        return (
            np.asarray(f.tensors["cls"], np.float32).reshape(-1),
            np.asarray(f.tensors["patch"], np.float32),
        )

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.cache.get(int(i)) or self._read(int(i)) for i in indices]
        n = max((len(p) for _, p in rows), default=1)
        cls = torch.zeros(len(rows), self.dim)
        patches = torch.zeros(len(rows), n, self.dim)
        valid = torch.zeros(len(rows), n, dtype=torch.bool)
        for k, (c, p) in enumerate(rows):
            cls[k] = torch.from_numpy(c)
            patches[k, : len(p)] = torch.from_numpy(p)
            valid[k, : len(p)] = True
        return cls, patches, valid


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def resolve_train_set(store: FeatureStore, cfg: SimZSSTrainConfig, features: Any = None):
    """The training feature set: ``features`` (a key or ``(model, Protocol)``) or the config's
    model and training protocol; it must hold ``patch`` and ``cls``."""
    if isinstance(features, str) and features:
        if features in store.feature_sets():
            fs = store.feature_set(features)
        else:
            hits = [k for k in store.feature_sets() if k.split("@")[0] == features]
            if len(hits) != 1:
                have = ", ".join(store.feature_sets()) or "none"
                raise OvssError(
                    f"'{features}' names {'several' if hits else 'no'} feature set(s) of "
                    f"{store.path} (it has: {have}); give the full key MODEL@PROTOCOL"
                )
            fs = store.feature_set(hits[0])
        missing = [t for t in ("patch", "cls") if t not in fs.tensor_names]
        if missing:
            raise OvssError(f"feature set '{fs.key}' lacks {', '.join(missing)} (DINO tokens)")
        return fs
    model, proto = features if isinstance(features, tuple) else (cfg.model, cfg.train_protocol)
    try:
        return store.require(model, proto, tensors=("patch", "cls"))
    except MissingFeatureSetError as e:
        e.needed_by = e.needed_by or "simzss"
        e.role = e.role or "vfm"
        raise


def global_patch_mean(patches: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(b, D)`` mean of each image's valid patch tokens (``patches (b, N, D)``, ``valid
    (b, N)``): the ``global_token=patch_mean`` image representation of the global loss."""
    w = valid.to(patches.dtype)[..., None]
    return (patches * w).sum(1) / w.sum(1).clamp_min(1)


def train_step(
    tower: TextTower,
    opt: torch.optim.Optimizer,
    cfg: SimZSSTrainConfig,
    tokens: torch.Tensor,
    concepts: ConceptBatch,
    cls: torch.Tensor,
    patches: torch.Tensor,
    valid: torch.Tensor,
    world: int = 1,
) -> LossParts:
    """One optimisation step of this process's share of a batch: the tower on ``tokens (b, L)``,
    Eq. 10 against the image tokens (``cls (b, D)``, ``patches (b, N, D)``, ``valid (b, N)``;
    moved to the tower's device), backward, gradients summed over ``world`` processes, AdamW
    at the learning rate already set in ``opt``, ``logit_scale`` clamped. Returns this share's
    loss parts."""
    dev = tower.logit_scale.device
    cls, patches, valid = cls.to(dev), patches.to(dev), valid.to(dev)
    if cfg.global_token == "patch_mean":
        cls = global_patch_mean(patches, valid)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and dev.type == "cuda"):
        eot, tok = tower(tokens.to(dev))
        parts = simzss_loss(
            eot,
            tok,
            cls,
            patches,
            valid,
            concepts,
            tower.logit_scale,
            cfg.tau,
            cfg.local_scale,
            cfg.lam,
            cfg.concept_reduce,
            cfg.local_target,
            world,
        )
    opt.zero_grad(set_to_none=True)
    parts.total.float().backward()
    if world > 1:
        allreduce_grads(list(tower.parameters()))
    opt.step()
    tower.clamp_logit_scale()
    return parts


def make_optimizer(tower: TextTower, cfg: SimZSSTrainConfig) -> torch.optim.AdamW:
    """AdamW with the config's groups (:func:`param_groups`), betas, eps and peak lr; one fused
    kernel per step on CPU and CUDA (the per-tensor loop's sqrt / addcdiv over the 49408-row
    token embedding was ~60 % of a tiny tower's CPU step)."""
    dev = tower.logit_scale.device
    return torch.optim.AdamW(
        param_groups(tower, cfg.weight_decay),
        lr=cfg.peak_lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=dev.type in ("cpu", "cuda"),
    )


def train_simzss(request: TrainRequest, progress: Any = None) -> TrainResult:
    """Train (or resume) a SimZSS text tower; see the module doc and :class:`TrainRequest`.

    ``request.config`` is a :class:`SimZSSTrainConfig` (None: defaults, which need
    ``captions``). Returns a :class:`TrainResult`; the checkpoint is ``<out>/last.pt``.
    """
    with setup_distributed(request.device) as ctx:
        return _train(request, progress if ctx.rank == 0 else None, ctx)


def _train(request: TrainRequest, progress: Any, ctx: Any) -> TrainResult:
    cfg: SimZSSTrainConfig = request.config or SimZSSTrainConfig()
    dev = ctx.device
    store = FeatureStore.open(request.store)
    fs = resolve_train_set(store, cfg, request.features)
    data, cap_prov, con_prov = prepare_captions(store, fs, cfg, progress)
    reader = TokenReader(fs, data.image, cfg.cache_gb * 2**30)
    d = reader.dim
    prov = checkpoint_provenance(
        "simzss",
        cfg,
        features=fs,
        tensor="patch+cls",
        captions=cap_prov,
        concepts=con_prov,
        tokenizer={"name": TOKENIZER, "context_length": cfg.context_length},
        dims={"vision": d, "text_width": cfg.text_width},
        loss={
            "equation": "L_glob + lam * L_local (METHODS §2)",
            "logit_scale_init": LOGIT_SCALE_INIT,
        },
    )
    out = (
        Path(request.out_dir)
        if request.out_dir
        else Path(store.path).parent / "align" / f"simzss-{fs.key.replace('@', '_')}"
    )
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME

    torch.manual_seed(cfg.seed)
    tower = TextTower(d, cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.context_length)
    tower.to(dev)
    opt = make_optimizer(tower, cfg)
    n_pairs = len(data.image)
    spe = math.ceil(n_pairs / cfg.batch_size)
    total = spe * cfg.epochs
    step, history, running = 0, [], {}
    ck = resume_state(
        ckpt_path,
        prov,
        request.restart,
        "cpu",
        SIMZSS_RUN_KEYS,
        trust=request.trust_checkpoint,
    )
    if ck is not None:
        tower.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, history = int(ck["step"]), list(ck["history"])
        running = dict(ck.get("running") or {})
    if ctx.world > 1:  # identical start on every rank
        import torch.distributed as dist

        for p in tower.parameters():
            dist.broadcast(p.data, src=0)
    created = now_utc()
    meter = StepMeter(progress, cfg.epochs, total, unit="captions")

    def state(epoch_done: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": tower.state_dict(),  # the text tower
            "optimizer": opt.state_dict(),
            "step": step,
            "epoch": epoch_done,
            "history": history,
            "running": running,
            "provenance": {**prov, "created": created},
            "world_size": ctx.world,
            "summary": data.stats,
        }

    def save(epoch_done: int) -> None:
        ctx.barrier()
        if ctx.rank == 0:
            save_checkpoint(state(epoch_done), ckpt_path)
        ctx.barrier()

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        while step < total:
            epoch, b0 = divmod(step, spe)
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            order = torch.randperm(n_pairs, generator=gen).numpy()
            batches = [order[b * cfg.batch_size : (b + 1) * cfg.batch_size] for b in range(spe)]
            shares = [bt[ctx.rank_slice(len(bt))] for bt in batches]
            meter.start_epoch()
            tower.train()
            pending = pool.submit(reader.batch, data.image[shares[b0]])
            for b in range(b0, spe):
                cls, patches, valid = pending.result()
                if b + 1 < spe:
                    pending = pool.submit(reader.batch, data.image[shares[b + 1]])
                share = shares[b]
                lr = lr_at(step, total, cfg.peak_lr, cfg.warmup)
                for g in opt.param_groups:
                    g["lr"] = lr
                cb = ConceptBatch.from_lists([data.concepts[i] for i in share], dev)
                parts = train_step(
                    tower, opt, cfg, data.tokens[share], cb, cls, patches, valid, ctx.world
                )
                step += 1
                vals = torch.tensor(
                    [
                        float(parts.total.detach()),
                        float(parts.global_part.detach()),
                        float(parts.local_part.detach()),
                        float(parts.local_correct),
                    ],
                    dtype=torch.float64,
                    device=dev,
                )
                if ctx.world > 1:
                    import torch.distributed as dist

                    dist.all_reduce(vals)
                v = vals.tolist()
                for k, x in zip(("loss", "global", "local", "correct"), v, strict=True):
                    running[k] = running.get(k, 0.0) + x
                running["steps"] = running.get("steps", 0) + 1
                running["concepts"] = running.get("concepts", 0) + parts.n_concepts
                running["captions"] = running.get("captions", 0) + parts.n_captions
                meter.step(epoch + 1, step, v[0], lr, parts.n_captions)
                if b + 1 == spe:
                    n = max(running["steps"], 1)
                    rec = meter.end_epoch(
                        {
                            "epoch": epoch + 1,
                            "loss": running["loss"] / n,
                            "loss_global": running["global"] / n,
                            "loss_local": running["local"] / n,
                            "concept_acc": running["correct"] / max(running["concepts"], 1),
                            "concepts_per_caption": running["concepts"]
                            / max(running["captions"], 1),
                            "logit_scale": float(tower.logit_scale.detach().exp()),
                        }
                    )
                    history.append(rec)
                    running = {}
                    if not cfg.save_every or step % cfg.save_every == 0 or step == total:
                        save(epoch + 1)
                    meter.report_epoch(rec)
                elif cfg.save_every and step % cfg.save_every == 0:
                    save(epoch)
    finally:
        pool.shutdown(wait=True)
    return TrainResult(
        trainer="simzss",
        checkpoint=str(ckpt_path),
        epochs_done=cfg.epochs,
        steps_done=step,
        history=history,
        provenance=prov,
        summary={
            **data.stats,
            "text_model": text_model_spec(ckpt_path),
            "concept_bank": con_prov["bank_key"],
        },
        rank=ctx.rank,
        world_size=ctx.world,
        segment_method="simzss",
    )


@register_trainer
class SimZSSTrainer(Trainer):
    """Train a SimZSS text tower on captions against the cached, frozen DINOv2 tokens.

    Needs a caption file (--captions: COCO captions JSON, or CSV / JSONL of image,caption) and
    the whole-image DINOv2 set at the training resolution (plan it with extract --for simzss).
    Concepts: the shipped class names of every benchmark (both families, synonyms) plus
    --concepts FILE, found by spaCy noun chunks (--spacy-model) or the offline matcher [ours].
    [ours] choices: the offline matcher, square 224 training features without augmentation,
    7 epochs, checkpoint every 500 steps, the last partial batch kept, features held in memory
    up to 4 GiB, explicit gradient all-reduce under torchrun, and the option --global-token
    patch_mean (the mean patch token in place of a CLS that carries nothing). Segment with the
    simzss method and --checkpoint OUT/last.pt.
    """

    name = "simzss"
    Config = SimZSSTrainConfig
    doc = "SimZSS: a text tower trained from scratch on captions vs frozen cached DINOv2"
    needs_labels = False
    segment_method = "simzss"

    smoke_overrides: ClassVar[dict[str, Any]] = {
        "text_width": 16,
        "text_layers": 1,
        "text_heads": 2,
        "context_length": 16,
        "epochs": 2,
        "lr": 0.01,
        "save_every": 0,
    }

    @classmethod
    def smoke_config(cls, workdir: Path, store: Any) -> dict[str, Any]:
        """The smoke values plus a caption file under ``workdir``: one caption per store
        image, two shipped concepts each; one step per epoch."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        caps = workdir / "simzss_captions.jsonl"
        words = ("dog", "grass", "car", "tree")
        rows = [
            {"image": iid, "caption": f"a {words[i % 4]} next to some {words[(i + 1) % 4]}"}
            for i, iid in enumerate(store.image_ids)
        ]
        caps.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {**cls.smoke_overrides, "captions": str(caps), "batch_size": len(rows)}

    @classmethod
    def requirements(cls, config: SimZSSTrainConfig) -> list[FeatureRequirement]:
        return [
            FeatureRequirement(
                "vfm", config.model, config.train_protocol, ("patch", "cls"), model_field="model"
            ),
            FeatureRequirement(
                "dense", config.model, config.eval_protocol, ("patch",), model_field="model"
            ),
        ]

    @classmethod
    def vocabulary_defaults(cls, config: SimZSSTrainConfig) -> VocabularyDefaults:
        return VocabularyDefaults(text_model="", templates="openai80", family="sclip")

    def fit(self, request: TrainRequest, progress: Any = None) -> TrainResult:
        return train_simzss(request, progress)


__all__ = [
    "CaptionData",
    "SimZSSTrainConfig",
    "SimZSSTrainer",
    "TokenReader",
    "global_patch_mean",
    "lr_at",
    "make_optimizer",
    "param_groups",
    "prepare_captions",
    "train_simzss",
    "train_step",
]
