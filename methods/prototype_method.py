"""``prototype``: nearest text prototype for cached dense features already in text space.

Per window, the token features of a feature set (``tensor``, default ``patch``) are compared by
cosine with the query embeddings (``PrototypeIndex``, METHODS.md §0.6), the per-window logits are
placed on the resized canvas and averaged over window overlaps (§0.3). Works for any feature set
whose token width equals the text embedding width (e.g. aligned features).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featurestore.protocol import Protocol
from methods.base import (
    FeatureRequirement,
    Segmenter,
    Vocab,
    register_method,
    window_logits_to_box,
)


@dataclass
class PrototypeConfig:
    """Options of the ``prototype`` method.

    Attributes:
        model: backbone whose feature set is read.
        resize, size, crop, stride, pad_multiple: that feature set's protocol (as for
            ``ovss extract``).
        tensor: token tensor to read (must be in the text embedding space).
        backend: ``PrototypeIndex`` backend: auto, torch or faiss.
        text_model: CLIP model whose text embeddings are the prototypes.
    """

    model: str = "clip-b16"
    resize: str = "short"
    size: int = 448
    crop: int = 0
    stride: int = 0
    pad_multiple: int = 0
    tensor: str = "patch"
    backend: str = "auto"
    text_model: str = "clip-b16"

    @property
    def protocol(self) -> Protocol:
        return Protocol(
            resize=self.resize,
            size=self.size,
            crop=self.crop,
            stride=self.stride,
            pad_multiple=self.pad_multiple,
        )


@register_method
class PrototypeSegmenter(Segmenter):
    name = "prototype"
    Config = PrototypeConfig
    doc = "nearest text prototype of cached dense features already in text space"

    @classmethod
    def requirements(cls, config: PrototypeConfig) -> list[FeatureRequirement]:
        return [FeatureRequirement("dense", config.model, config.protocol, (config.tensor,))]

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        from methods.prototype import PrototypeIndex
        from methods.scoring import merge_window_logits

        fs = self.sets["dense"]
        feats = fs.read(index, names=[self.config.tensor])
        tokens = torch.from_numpy(np.asarray(feats.tensors[self.config.tensor], np.float32))
        index_ = PrototypeIndex(vocab.embeddings.float(), backend=self.config.backend)
        cos = index_.scores(tokens)  # (n_tokens, Q)
        windows, start = [], 0
        for (gh, gw), box, pad in zip(feats.win_grid, feats.win_box, feats.win_pad, strict=True):
            w = cos[start : start + gh * gw].T.reshape(-1, gh, gw)
            start += gh * gw
            windows.append(window_logits_to_box(w, box, pad))
        canvas = feats.resized_size
        return merge_window_logits(windows, feats.win_box, canvas), canvas
