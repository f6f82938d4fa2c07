"""``aligned``: FMbSeg Stage 2 inference (METHODS.md §1.2) from an ``ovss align`` checkpoint.

Per image: the cached VFM tokens of the checkpoint's feature set ``(n_tokens, D_v)`` go through
the alignment module, ``z = l2n(M(x))`` ``(n_tokens, D_t)`` (the ``block`` variant attends
within each window); ``PrototypeIndex`` scores them against the query embeddings of *any*
vocabulary (open-vocabulary at test time); per-window logits are upsampled bilinearly onto the
resized canvas and averaged over window overlaps (§0.3); the shared driver then applies §0.2
scoring. Use: ``ovss segment --method aligned --checkpoint CKPT ...`` (or ``--set checkpoint=CKPT``). The text model
defaults to the one recorded in the checkpoint (the vocabulary must be embedded by the same
CLIP text tower: the module was trained into that space).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def checkpoint_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance of an ``ovss align`` checkpoint (feature set, vocabulary with its
    ``text_model`` and ``templates``, ...), cached per file (path, mtime, size): the module is
    built and loaded once however often it is asked for. Treat the result as read-only."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise OvssError(
            f"no alignment checkpoint at {p}; train one with the fmbseg trainer"
        ) from None
    return _checkpoint_meta(str(p), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _checkpoint_meta(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    from methods.fmbseg import load_checkpoint

    _, meta = load_checkpoint(path)
    return meta["provenance"]


@dataclass
class AlignedConfig:
    """Options of the ``aligned`` method.

    Attributes:
        checkpoint: ``ovss align`` checkpoint (``last.pt``); required to segment.
        backend: ``PrototypeIndex`` backend: auto, torch or faiss.
        text_model: CLIP model that embeds the vocabulary (default: the checkpoint's).
    """

    checkpoint: str = ""
    backend: str = "auto"
    text_model: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint and self.text_model is None:
            self.text_model = checkpoint_provenance(self.checkpoint)["vocabulary"].get("text_model")
        if self.text_model is None:
            self.text_model = "clip-b16"


@register_method
class AlignedSegmenter(Segmenter):
    name = "aligned"
    Config = AlignedConfig
    doc = "FMbSeg Stage 2: alignment module (ovss align) + prototype lookup; --checkpoint CKPT"

    @classmethod
    def requirements(cls, config: AlignedConfig) -> list[FeatureRequirement]:
        if not config.checkpoint:
            raise ValueError("needs a trained module: checkpoint=PATH of the fmbseg trainer")
        feats = checkpoint_provenance(config.checkpoint)["features"]
        proto = Protocol.from_dict(feats["protocol"])
        return [FeatureRequirement("vfm", feats["model"], proto, (feats["tensor"],))]

    @classmethod
    def vocabulary_defaults(cls, config: AlignedConfig) -> VocabularyDefaults:
        """The checkpoint's text model and templates (the module was trained against those
        embeddings); without a checkpoint ``single``, FMbSeg's one template."""
        templates = "single"
        if config.checkpoint:
            voc = checkpoint_provenance(config.checkpoint).get("vocabulary", {})
            templates = str(voc.get("templates") or templates)
        return VocabularyDefaults(text_model=str(config.text_model), templates=templates)

    def __init__(self, store, config: AlignedConfig, device: str | torch.device = "cpu"):
        from methods.fmbseg import load_checkpoint

        super().__init__(store, config, device)
        self.module, meta = load_checkpoint(config.checkpoint, self.device)
        self.provenance = meta["provenance"]
        self.tensor = self.provenance["features"]["tensor"]
        fs = self.sets["vfm"]
        want = self.provenance["features"].get("weights")
        have = fs.provenance["backbone"].get("weights")
        if want != have:
            raise OvssError(
                f"checkpoint {config.checkpoint} was trained on {want} features; the store's "
                f"'{fs.key}' were made with {have}"
            )

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        from methods.fmbseg import align_features
        from methods.prototype import PrototypeIndex
        from methods.scoring import merge_window_logits

        d_out = self.provenance["dims"]["out"]
        if vocab.embeddings.shape[1] != d_out:
            raise OvssError(
                f"the vocabulary's embeddings are {vocab.embeddings.shape[1]}-d, the module "
                f"outputs {d_out}-d: embed with text model {self.provenance['vocabulary']}"
            )
        feats = self.sets["vfm"].read(index, names=[self.tensor])
        x = torch.from_numpy(np.asarray(feats.tensors[self.tensor], np.float32)).to(self.device)
        with torch.no_grad():
            z = align_features(self.module, x, feats.win_grid)
        text = vocab.embeddings.float().to(self.device)  # the lookup runs on the device
        cos = PrototypeIndex(text, backend=self.config.backend).scores(z)
        windows, start = [], 0
        for (gh, gw), box, pad in zip(feats.win_grid, feats.win_box, feats.win_pad, strict=True):
            w = cos[start : start + gh * gw].T.reshape(-1, gh, gw)
            start += gh * gw
            windows.append(window_logits_to_box(w, box, pad))
        canvas = feats.resized_size
        return merge_window_logits(windows, feats.win_box, canvas), canvas
