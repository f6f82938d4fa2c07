"""SimZSS (METHODS.md §2): a text tower trained from scratch against a frozen, cached DINOv2.

This module holds the text tower, the loss (each equation a function of its own), the
``simzss:<checkpoint>`` text-encoder kind and the ``simzss`` segmenter; training lives in
``methods.simzss_train`` (``ovss align --method simzss``).

Text tower: open_clip's causal ``TextTransformer`` (context 77, width 512, 12 layers, 8 heads,
GELU, output width = the vision width), open_clip's BPE tokenizer; both the end-of-text (EOT)
embedding and every token embedding go through ``ln_final`` and the text projection. A learnable
``logit_scale`` starts at ln(1/0.07) and is clamped to [0, ln 100] after every step.

Loss per batch of b captions (their images' cached tokens: CLS ``(b, D)`` and patches
``(b, n, D)`` after DINOv2's final norm; M concept occurrences, K distinct concepts)::

    c_t(l) = mean (option: sum) of the token embeddings at occurrence l's indices    (Eq. 1)
    h_k    = sum of c_t(l) over the occurrences of concept k in the batch            (Eq. 7)
    s_l    = softmax_n(<l2n(h_k(l)), l2n(z_n)> / tau),  tau = 0.1                     (Eq. 3)
    c_v(l) = l2n(sum_n s_l,n z_n)                                                     (Eq. 4)
    L_loc  = CE(s_loc * c_v l2n(h)^T, k(l)),  s_loc = 1/0.07 fixed; only batch concepts (Eq. 8-9)
             (option ``local_target=argmax``: the prediction's own argmax as target)
    L_glob = symmetric InfoNCE of l2n(CLS) and l2n(EOT) with exp(logit_scale)        (Eq. 6)
    L      = L_glob + lambda L_loc,  lambda = 0.05                                    (Eq. 10)

The query of an occurrence is its *batch-level* concept ``l2n(h_k)`` (the released code's), so
two occurrences of one concept query their images with the same vector.

Inference (``segment/eval --method simzss --checkpoint CKPT``): the evaluation set's patch
tokens (``short448-c448s224`` by default, the TCL protocol) · the class-name embeddings of the
trained tower (80 templates; cached in the store under the checkpoint's identity) -> per-window
bilinear upsampling and the window merge -> §0.2 scoring (argmax; background by ``prob_thd``,
per-dataset defaults [ours: to be measured]).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from featurestore.errors import OvssError
from featurestore.protocol import Protocol
from methods.base import (
    FeatureRequirement,
    Segmenter,
    Vocab,
    VocabularyDefaults,
    register_method,
    window_logits_to_box,
)

#: Checkpoint format tag of ``ovss align --method simzss``.
CHECKPOINT_FORMAT = "ovss-simzss/1"
#: ``logit_scale`` starts at ln(1/0.07) and is clamped to [0, ln 100] (CLIP's rule).
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)
#: The tokenizer (recorded in checkpoints).
TOKENIZER = "open_clip SimpleTokenizer (CLIP BPE, vocab 49408, lowercased)"
#: [ours: to be measured against the paper's numbers] ``prob_thd`` of the datasets with a
#: scored background; the others use 0 (background ignored).
PROB_THD = {"voc21": 0.2, "context60": 0.2, "coco_object": 0.2}


def l2n(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, dim=dim)


@lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77) -> Any:
    """open_clip's CLIP BPE tokenizer (``SimpleTokenizer``) with this context length."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:
        raise OvssError(
            "SimZSS needs open_clip for its text tower: pip install 'ovss[clip]'"
        ) from None
    return SimpleTokenizer(context_length=context_length)


class TextTower(nn.Module):
    """The SimZSS text tower (open_clip ``TextTransformer`` trained from scratch).

    Args:
        out_dim: output width (the vision width D, e.g. 768 for ViT-B/14).
        width, layers, heads: transformer size (512 / 12 / 8; smaller for tests).
        context_length: token context (77).
        vocab_size: the tokenizer's vocabulary (49408).
    """

    def __init__(
        self,
        out_dim: int,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        context_length: int = 77,
        vocab_size: int = 49408,
    ):
        super().__init__()
        try:
            from open_clip.transformer import TextTransformer
        except ImportError:
            raise OvssError("SimZSS needs open_clip: pip install 'ovss[clip]'") from None
        self.text = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            output_dim=out_dim,
            output_tokens=True,
        )
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.out_dim = out_dim
        self.context_length = context_length

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (B, L)`` -> EOT embeddings ``(B, D)`` and token embeddings ``(B, L, D)``,
        both after ``ln_final`` and the projection (not normalised)."""
        eot, tok = self.text(tokens)
        return eot, tok @ self.text.text_projection

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


# --------------------------------------------------------------------------------------------
# The loss, one equation per function
# --------------------------------------------------------------------------------------------


@dataclass
class ConceptBatch:
    """The concept occurrences of a batch of captions (flat index lists).

    Attributes:
        caption: ``(M,)`` the caption (row of the batch) of each occurrence.
        concept: ``(M,)`` its concept id in the bank.
        span_occ: ``(T,)`` for every spanned token, its occurrence.
        span_pos: ``(T,)`` the token's position in its caption (0 = start-of-text).
    """

    caption: torch.Tensor
    concept: torch.Tensor
    span_occ: torch.Tensor
    span_pos: torch.Tensor

    @classmethod
    def from_lists(
        cls, occurrences: list[list[tuple[int, list[int]]]], device: Any = "cpu"
    ) -> ConceptBatch:
        """From per-caption lists of ``(concept id, token indices)``."""
        cap, con, so, sp = [], [], [], []
        for b, occ in enumerate(occurrences):
            for cid, toks in occ:
                m = len(cap)
                cap.append(b)
                con.append(cid)
                so += [m] * len(toks)
                sp += list(toks)

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        return cls(t(cap), t(con), t(so), t(sp))

    def __len__(self) -> int:
        return int(self.caption.numel())


def concept_text_embeddings(
    tokens: torch.Tensor, batch: ConceptBatch, reduce: str = "mean"
) -> torch.Tensor:
    """Eq. 1: ``c_t`` ``(M, D)``, the mean (``reduce="sum"``: sum) of each occurrence's token
    embeddings; ``tokens`` ``(B, L, D)``."""
    b, length, d = tokens.shape
    m = len(batch)
    rows = tokens.reshape(b * length, d)[batch.caption[batch.span_occ] * length + batch.span_pos]
    out = torch.zeros(m, d, dtype=rows.dtype, device=rows.device).index_add(0, batch.span_occ, rows)
    if reduce == "mean":
        count = torch.bincount(batch.span_occ, minlength=m).clamp_min(1)
        out = out / count[:, None].to(out.dtype)
    elif reduce != "sum":
        raise OvssError(f"concept_reduce must be mean or sum, not {reduce!r}")
    return out


def batch_concept_sums(c_t: torch.Tensor, concept: torch.Tensor):
    """Eq. 7: the batch's distinct concepts ``(K,)``, each occurrence's index among them
    ``(M,)`` and ``h`` ``(K, D)``: the sum of the text concepts of each distinct concept."""
    uniq, inv = torch.unique(concept, return_inverse=True)
    h = torch.zeros(len(uniq), c_t.shape[1], dtype=c_t.dtype, device=c_t.device)
    return uniq, inv, h.index_add(0, inv, c_t)


def visual_concepts(
    patches: torch.Tensor,
    valid: torch.Tensor | None,
    caption: torch.Tensor,
    queries: torch.Tensor,
    tau: float = 0.1,
) -> torch.Tensor:
    """Eqs. 3-4: ``c_v`` ``(M, D)`` unit rows.

    Args:
        patches: ``(B, N, D)`` patch tokens of each caption's image.
        valid: ``(B, N)`` bool, False for padding (None: all valid).
        caption: ``(M,)`` the caption of each occurrence.
        queries: ``(M, D)`` each occurrence's unit query (its batch-level concept).
        tau: softmax temperature over the patches.
    """
    m, d = queries.shape
    if m == 0:
        return queries.new_zeros(0, patches.shape[2])
    b = patches.shape[0]
    # slot of each occurrence among its caption's occurrences: one padded query set per caption
    order = torch.argsort(caption, stable=True)
    counts = torch.bincount(caption, minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(caption)
    slot[order] = torch.arange(m, device=caption.device) - starts[caption[order]]
    q = queries.new_zeros(b, int(counts.max()), d)
    q = q.index_put((caption, slot), queries.to(q.dtype))
    sim = torch.einsum("bpd,bnd->bpn", q, l2n(patches).to(q.dtype)) / tau
    if valid is not None:
        sim = sim.masked_fill(~valid[:, None, :], float("-inf"))
    s = torch.softmax(sim, dim=-1)
    cv = torch.einsum("bpn,bnd->bpd", s, patches.to(s.dtype))
    return l2n(cv[caption, slot])


def local_loss_terms(
    c_v: torch.Tensor,
    h: torch.Tensor,
    target: torch.Tensor,
    scale: float = 1 / 0.07,
    target_mode: str = "label",
) -> torch.Tensor:
    """Eqs. 8-9: per-occurrence cross-entropy ``(M,)`` of ``softmax(scale * c_v l2n(h)^T)``
    over the batch's K concepts (concepts absent from the batch are not classes), against the
    occurrence's concept (``target_mode="argmax"``: the prediction's own argmax)."""
    logits = scale * c_v @ l2n(h).T
    if target_mode == "argmax":
        target = logits.detach().argmax(dim=1)
    elif target_mode != "label":
        raise OvssError(f"local_target must be label or argmax, not {target_mode!r}")
    return F.cross_entropy(logits, target, reduction="none")


def global_loss_terms(
    cls_local: torch.Tensor,
    eot_local: torch.Tensor,
    cls_all: torch.Tensor,
    eot_all: torch.Tensor,
    offset: int,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Eq. 6, this process's share: the summed cross-entropies of its ``b_r`` image rows
    (image -> all captions) and caption rows (caption -> all images); dividing the sum over
    processes by ``2 b`` gives the symmetric InfoNCE. Inputs are unit rows; the local rows are
    rows ``offset .. offset + b_r`` of the ``*_all`` tensors."""
    scale = logit_scale.exp()
    target = torch.arange(len(cls_local), device=cls_local.device) + offset
    img = F.cross_entropy(scale * cls_local @ eot_all.T, target, reduction="sum")
    txt = F.cross_entropy(scale * eot_local @ cls_all.T, target, reduction="sum")
    return img + txt


class _GatherSum(torch.autograd.Function):
    """Rows of every rank concatenated in rank order; backward *sums* the incoming gradient
    over the ranks and keeps this rank's rows.

    Each rank evaluates only its share of the loss (its images' visual concepts, its rows of
    the InfoNCE), so the gradient of the total loss with respect to this rank's rows is the sum
    of what every rank's share sends them (the convention of ``torch.distributed.nn``'s
    ``all_gather``). With the parameter gradients then summed over the ranks, training equals
    one process on the global batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        pad = x.new_zeros((max(max(sizes), 1), *x.shape[1:]))
        pad[: len(x)] = x
        parts = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(parts, pad.contiguous())
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g)
        lo = sum(ctx.sizes[: ctx.rank])
        return g[lo : lo + ctx.sizes[ctx.rank]], None


def gather_rows_sum(x: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    """``(rows of every rank in rank order, this rank's offset)``; gradients as
    :class:`_GatherSum`. ``world == 1``: ``(x, 0)``."""
    if world <= 1:
        return x, 0
    import torch.distributed as dist

    n = torch.tensor([len(x)], device=x.device)
    ns = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(ns, n)
    sizes = [int(v) for v in ns]
    return _GatherSum.apply(x, sizes), sum(sizes[: dist.get_rank()])


def gather_plain(x: torch.Tensor, world: int) -> torch.Tensor:
    """Rows of every rank in rank order, without gradients (labels, ids)."""
    if world <= 1:
        return x
    import torch.distributed as dist

    n = torch.tensor([len(x)], device=x.device)
    ns = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(ns, n)
    sizes = [int(v) for v in ns]
    pad = x.new_zeros((max(max(sizes), 1), *x.shape[1:]))
    pad[: len(x)] = x
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


@dataclass
class LossParts:
    """This process's share of the loss (``total`` is what it backpropagates).

    Attributes:
        total: ``global_part + lam * local_part`` (summed over processes: L of Eq. 10).
        global_part, local_part: this share of L_glob and L_loc.
        n_captions, n_concepts: global batch size b and occurrence count M.
        local_correct: occurrences of this share whose visual concept is nearest its own
            batch concept.
    """

    total: torch.Tensor
    global_part: torch.Tensor
    local_part: torch.Tensor
    n_captions: int
    n_concepts: int
    local_correct: int


def simzss_loss(
    eot: torch.Tensor,
    tokens: torch.Tensor,
    cls: torch.Tensor,
    patches: torch.Tensor,
    valid: torch.Tensor | None,
    concepts: ConceptBatch,
    logit_scale: torch.Tensor,
    tau: float = 0.1,
    local_scale: float = 1 / 0.07,
    lam: float = 0.05,
    reduce: str = "mean",
    target_mode: str = "label",
    world: int = 1,
) -> LossParts:
    """L = L_glob + λ L_loc (Eq. 10) for this process's captions of the global batch.

    Args:
        eot: ``(b_r, D)`` EOT embeddings; tokens: ``(b_r, L, D)`` token embeddings.
        cls: ``(b_r, D)`` image CLS tokens; patches: ``(b_r, N, D)``; valid: ``(b_r, N)``.
        concepts: the occurrences of these captions (caption indices local).
        logit_scale: the tower's learnable log-scale of the InfoNCE.
        tau, local_scale, lam, reduce, target_mode: see the module doc.
        world: processes in the job (> 1: the rows of all processes are gathered).
    """
    c_t = concept_text_embeddings(tokens, concepts, reduce)
    c_t_all, m_off = gather_rows_sum(c_t, world)
    concept_all = gather_plain(concepts.concept, world)
    m_all = len(concept_all)
    if m_all:
        _, inv_all, h = batch_concept_sums(c_t_all, concept_all)
        inv = inv_all[m_off : m_off + len(c_t)]
        c_v = visual_concepts(patches, valid, concepts.caption, l2n(h)[inv], tau)
        terms = local_loss_terms(c_v, h, inv, local_scale, target_mode)
        local_part = terms.sum() / m_all
        with torch.no_grad():
            correct = int((c_v @ l2n(h).T).argmax(1).eq(inv).sum()) if len(c_v) else 0
    else:
        local_part, correct = eot.sum() * 0.0, 0
    cls_n, eot_n = l2n(cls.to(eot.dtype)), l2n(eot)
    eot_all, off = gather_rows_sum(eot_n, world)
    cls_all = gather_plain(cls_n.detach(), world)
    b_all = len(eot_all)
    global_part = global_loss_terms(cls_n, eot_n, cls_all, eot_all, off, logit_scale) / (2 * b_all)
    return LossParts(global_part + lam * local_part, global_part, local_part, b_all, m_all, correct)


# --------------------------------------------------------------------------------------------
# Checkpoints and the text-encoder kind
# --------------------------------------------------------------------------------------------


def build_tower(provenance: dict[str, Any]) -> TextTower:
    """An untrained tower of the architecture a checkpoint's provenance records."""
    c = provenance["config"]
    return TextTower(
        int(provenance["dims"]["vision"]),
        int(c["text_width"]),
        int(c["text_layers"]),
        int(c["text_heads"]),
        int(c["context_length"]),
    )


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[TextTower, dict[str, Any]]:
    """The trained tower (eval mode) and the checkpoint dict without weights.

    Raises:
        OvssError: no file, not a SimZSS checkpoint, unsafe (pickled objects).
    """
    from methods.train import read_checkpoint

    ck = read_checkpoint(path, map_location="cpu")
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise OvssError(
            f"{path} is not a SimZSS checkpoint (format {ck.get('format')}); train one with "
            "the simzss trainer"
        )
    tower = build_tower(ck["provenance"])
    tower.load_state_dict(ck["model"])
    tower.to(device).eval()
    return tower, {k: v for k, v in ck.items() if k not in ("model", "optimizer")}


def checkpoint_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """A SimZSS checkpoint's provenance, cached per (path, mtime, size); read-only."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise OvssError(f"no SimZSS checkpoint at {p}; train one with the simzss trainer") from None
    return _provenance_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _provenance_cached(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    return load_checkpoint(path)[1]["provenance"]


TEXT_KIND = "simzss:"


def text_model_spec(checkpoint: str | os.PathLike) -> str:
    """The text-encoder spec of a checkpoint's tower: ``simzss:<absolute path>``."""
    return f"{TEXT_KIND}{Path(checkpoint).expanduser().resolve()}"


def _identify(spec: str, opts: Any = None) -> dict:
    from featurestore.text_encoders import file_identity

    return {"kind": "simzss", "weights": file_identity(spec[len(TEXT_KIND) :])}


def _encoder_base() -> type:
    try:
        from featurestore.text_encoders import TextEncoder
    except ImportError:  # the registry is not there yet: a plain base
        return object
    return TextEncoder


class SimZSSTextEncoder(_encoder_base()):  # type: ignore[misc]
    """The trained tower of a checkpoint as a text encoder (prompts -> EOT embeddings)."""

    kind = "simzss"

    def __init__(self, spec: str, device: str = "cpu"):
        self.name = spec
        self.path = spec[len(TEXT_KIND) :] if spec.startswith(TEXT_KIND) else spec
        self.device = torch.device(device)
        self.tower, meta = load_checkpoint(self.path, self.device)
        self.dim = self.tower.out_dim
        self.tokenizer = get_tokenizer(self.tower.context_length)
        self._prov = meta["provenance"]

    def identity(self) -> dict:
        return _identify(TEXT_KIND + self.path)

    def provenance(self) -> dict:
        return {
            **self.identity(),
            "checkpoint": str(self.path),
            "tokenizer": TOKENIZER,
            "features": self._prov.get("features"),
        }

    def encode_batch(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), context_length=self.tower.context_length)
        return self.tower(tokens.to(self.device))[0]


def _factory(spec: str, opts: Any) -> SimZSSTextEncoder:
    return SimZSSTextEncoder(spec, getattr(opts, "device", "cpu"))


def _register_text_kind() -> None:
    try:
        from featurestore.text_encoders import register_text_encoder
    except ImportError:
        return
    register_text_encoder(
        TEXT_KIND,
        _factory,
        identify=_identify,
        help="the text tower of a SimZSS checkpoint (simzss:<path to last.pt>)",
    )


_register_text_kind()


# --------------------------------------------------------------------------------------------
# The segmenter
# --------------------------------------------------------------------------------------------


@dataclass
class SimZSSConfig:
    """Options of the ``simzss`` method.

    Attributes:
        checkpoint: the ``last.pt`` of ``ovss align --method simzss``; required to segment.
        size, crop, stride: the evaluation feature set, ``Protocol(short size, crop, stride)``
            (the paper's TCL protocol: 448 / 448 / 224).
        model: the DINO-family feature model (default: the one the checkpoint was trained on).
        text_model: the text encoder of the vocabulary (default: the checkpoint's tower,
            ``simzss:<checkpoint>``).
    """

    checkpoint: str = ""
    size: int = 448
    crop: int = 448
    stride: int = 224
    model: str | None = None
    text_model: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint:
            if self.model is None:
                self.model = checkpoint_provenance(self.checkpoint)["features"]["model"]
            if self.text_model is None:
                self.text_model = text_model_spec(self.checkpoint)


#: The feature model of the released setup (planning without a checkpoint).
DEFAULT_MODEL = "dinov2-b14-reg"
#: The training set of the released setup: whole images at 224 [ours: square, no augmentation].
TRAIN_RESIZE, TRAIN_SIZE = "square", 224


@register_method
class SimZSSSegmenter(Segmenter):
    """SimZSS inference: cached patch tokens · the trained tower's class embeddings."""

    name = "simzss"
    Config = SimZSSConfig
    doc = (
        "SimZSS: DINOv2 patches vs the class embeddings of a text tower trained by "
        "`ovss align --method simzss`; --checkpoint CKPT"
    )

    @classmethod
    def requirements(cls, config: SimZSSConfig) -> list[FeatureRequirement]:
        """The evaluation set; without a checkpoint (planning: ``extract --for simzss``) also
        the training set of the trainer's defaults (whole image, square 224, CLS + patches),
        so one extraction serves training and evaluation."""
        proto = Protocol("short", config.size, crop=config.crop, stride=config.stride)
        model = config.model or DEFAULT_MODEL
        reqs = [FeatureRequirement("vfm", model, proto, ("patch",), model_field="model")]
        if not config.checkpoint:
            train = Protocol(TRAIN_RESIZE, TRAIN_SIZE)
            reqs.insert(
                0,
                FeatureRequirement("train", model, train, ("patch", "cls"), model_field="model"),
            )
        return reqs

    @classmethod
    def vocabulary_defaults(cls, config: SimZSSConfig) -> VocabularyDefaults:
        return VocabularyDefaults(
            text_model=config.text_model or "", templates="openai80", family="sclip"
        )

    @classmethod
    def scoring_presets(cls, dataset: str) -> dict[str, Any]:
        from featurestore.datasets import get_dataset

        try:
            name = get_dataset(dataset).name
        except OvssError:
            return {}
        return {"prob_thd": PROB_THD[name]} if name in PROB_THD else {}

    def __init__(self, store, config: SimZSSConfig, device: str | torch.device = "cpu"):
        if not config.checkpoint:
            raise OvssError(
                "method simzss needs a trained text tower: --checkpoint PATH (the last.pt of "
                "the simzss trainer)"
            )
        super().__init__(store, config, device)
        self.provenance = checkpoint_provenance(config.checkpoint)
        fs = self.sets["vfm"]
        want = self.provenance["features"].get("weights")
        have = fs.provenance["backbone"].get("weights")
        if config.model == self.provenance["features"]["model"] and want != have:
            raise OvssError(
                f"checkpoint {config.checkpoint} was trained on {want} features; the store's "
                f"'{fs.key}' were made with {have}"
            )

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        from methods.scoring import merge_window_logits

        d = int(self.provenance["dims"]["vision"])
        if vocab.embeddings.shape[1] != d:
            raise OvssError(
                f"the vocabulary's embeddings are {vocab.embeddings.shape[1]}-d, the features "
                f"{d}-d: embed the classes with text model {text_model_spec(self.config.checkpoint)}"
            )
        feats = self.sets["vfm"].read(index, names=["patch"])
        text = l2n(vocab.embeddings.float().to(self.device))
        windows = []
        for w, box, pad in zip(
            feats.window_tokens("patch"), feats.win_box, feats.win_pad, strict=True
        ):
            x = l2n(torch.from_numpy(np.asarray(w, np.float32)).to(self.device))
            cos = torch.einsum("hwd,qd->qhw", x, text)  # merged on the device
            windows.append(window_logits_to_box(cos, box, pad))
        canvas = feats.resized_size
        return merge_window_logits(windows, feats.win_box, canvas), canvas


__all__ = [
    "CHECKPOINT_FORMAT",
    "ConceptBatch",
    "LossParts",
    "SimZSSConfig",
    "SimZSSSegmenter",
    "SimZSSTextEncoder",
    "TextTower",
    "batch_concept_sums",
    "checkpoint_provenance",
    "concept_text_embeddings",
    "gather_rows_sum",
    "get_tokenizer",
    "global_loss_terms",
    "load_checkpoint",
    "local_loss_terms",
    "simzss_loss",
    "text_model_spec",
    "visual_concepts",
]
