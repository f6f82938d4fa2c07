"""``prototype``: nearest text prototype for cached dense features already in text space.

Per window, the token features of a feature set (``tensor``) are compared by cosine with the
query embeddings (``PrototypeIndex``, METHODS.md §0.6), the per-window logits are placed on the
resized canvas and averaged over window overlaps (§0.3). Works for any feature set whose token
width equals the text embedding width (e.g. aligned features), and for CLIP sets through their
dense tokens in text space (``tensor=clip-dense``: MaskCLIP's value path of the cached
``pre_last``, what ``auto`` [ours, the default] picks for a CLIP model), so the defaults run on
the features ``extract`` makes for ``clip-b16``.
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

CLIP_DENSE = "clip-dense"


def _is_clip(model: str) -> bool:
    """Whether ``model`` names a CLIP backbone (a registered ``clip-*`` or ``openclip:``)."""
    from featurestore.backbones.clip import resolve_variant
    from featurestore.errors import OvssError

    try:
        resolve_variant(model)
    except OvssError:
        return False
    return True


@dataclass
class PrototypeConfig:
    """Options of the ``prototype`` method.

    Attributes:
        model: backbone whose feature set is read.
        resize, size, crop, stride, pad_multiple: that feature set's protocol (as for
            ``ovss extract``).
        tensor: token tensor to read, in the text embedding space: a stored token tensor
            (e.g. ``patch``), ``clip-dense`` (a CLIP set's dense tokens: MaskCLIP's value path
            of the cached ``pre_last`` through the last block, ``ln_post`` and ``proj``) or
            ``auto`` [ours] = ``clip-dense`` for a CLIP model, ``patch`` for any other.
        backend: ``PrototypeIndex`` backend: auto, torch or faiss.
        text_model: CLIP model whose text embeddings are the prototypes.
    """

    model: str = "clip-b16"
    resize: str = "short"
    size: int = 448
    crop: int = 0
    stride: int = 0
    pad_multiple: int = 0
    tensor: str = "auto"
    backend: str = "auto"
    text_model: str = "clip-b16"

    @property
    def read_tensor(self) -> str:
        """``tensor`` with ``auto`` resolved (``clip-dense`` or ``patch``)."""
        if self.tensor != "auto":
            return self.tensor
        return CLIP_DENSE if _is_clip(self.model) else "patch"

    @property
    def stored_tensors(self) -> tuple[str, ...]:
        """The tensors of the feature set that are read (``pre_last`` for ``clip-dense``)."""
        return ("pre_last",) if self.read_tensor == CLIP_DENSE else (self.read_tensor,)

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
        return [
            FeatureRequirement(
                "dense", config.model, config.protocol, config.stored_tensors, "model"
            )
        ]

    def __init__(self, store, config: PrototypeConfig, device: str | torch.device = "cpu"):
        super().__init__(store, config, device)
        self.block = None
        if config.read_tensor == CLIP_DENSE:
            from methods.clip_dense import LastBlock

            self.block = LastBlock.from_feature_set(self.sets["dense"]).to(self.device)

    def cosine_logits(self, index: int, vocab: Vocab) -> tuple[torch.Tensor, tuple[int, int]]:
        from methods.prototype import PrototypeIndex
        from methods.scoring import merge_window_logits

        fs = self.sets["dense"]
        name = self.config.stored_tensors[0]
        feats = fs.read(index, names=[name])
        tokens = torch.from_numpy(np.asarray(feats.tensors[name], np.float32)).to(self.device)
        if self.block is not None:  # clip-dense: the value path into CLIP's text space
            from methods.clip_dense import maskclip_dense

            with torch.inference_mode():
                tokens = maskclip_dense(tokens, None, self.block).float()
        text = vocab.embeddings.float().to(self.device)  # the lookup runs on the device
        index_ = PrototypeIndex(text, backend=self.config.backend)
        cos = index_.scores(tokens)  # (n_tokens, Q)
        windows, start = [], 0
        for (gh, gw), box, pad in zip(feats.win_grid, feats.win_box, feats.win_pad, strict=True):
            w = cos[start : start + gh * gw].T.reshape(-1, gh, gw)
            start += gh * gw
            windows.append(window_logits_to_box(w, box, pad))
        canvas = feats.resized_size
        return merge_window_logits(windows, feats.win_box, canvas), canvas
