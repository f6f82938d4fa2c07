"""BLIP image-text matching (ITM) models through ``transformers`` (PnP-OVSS's backbone).

Registered names (Hugging Face repos of ``BlipForImageTextRetrieval``; the optional extra
``blip`` installs ``transformers``, imported only when a BLIP model is built):

- ``blip-itm-l``: ViT-L/16 image encoder + BERT-base text encoder with cross-attention in all
  12 layers, Flickr30k-finetuned retrieval checkpoint ``Salesforce/blip-itm-large-flickr``
  (the checkpoint of the PnP-OVSS release);
- ``blip-itm-l-coco``: the same architecture, COCO-finetuned (``Salesforce/blip-itm-large-coco``);
- ``blip-itm-b`` / ``blip-itm-b-coco``: ViT-B/16 image encoder, Flickr30k / COCO
  (``Salesforce/blip-itm-base-flickr`` / ``-coco``).

**Checkpoints are folders** (a Hugging Face model folder: ``config.json``, ``model.safetensors``
or ``pytorch_model.bin``, and the tokenizer files ``vocab.txt`` and/or ``tokenizer.json`` with
``tokenizer_config.json``), found in this order: ``--weights DIR``; ``$OVSS_WEIGHTS/<repo
name>`` (e.g. ``$OVSS_WEIGHTS/blip-itm-large-flickr``) or ``$OVSS_WEIGHTS/Salesforce/<repo
name>``; the huggingface_hub cache; a download of the repo when online. They load through
``BlipForImageTextRetrieval.from_pretrained`` and ``BertTokenizerFast.from_pretrained``. The
weights identity recorded is the sha256 of the folder's weights file. A folder without tokenizer
files is a one-line error naming them.

**What a feature set caches** (``ovss extract -m blip-itm-l``): the image encoder's output for
the un-dropped image (``last_hidden_state``, i.e. after ``post_layernorm``, the tensor the text
encoder cross-attends to): ``image_embeds`` (token, ``(D,)``: the patch tokens, row-major) and
``image_cls`` (window, ``(D,)``: the class token). The default protocol squashes the image to
336 x 336 (21 x 21 patches, as the PnP-OVSS release): bicubic with antialiasing, clamped to
[0, 255], then CLIP mean/std (BLIP's normalisation). At another input size than the
checkpoint's (384) the position embedding is resampled by ``transformers``
(``interpolate_pos_encoding``: bicubic, ``align_corners=False``, as LAVIS's
``interpolate_pos_embed``).

**Tiny models** (tests, demos): ``random_init=True`` builds the real classes with seeded random
weights; ``arch_overrides`` holds ``vision_config`` / ``text_config`` dicts merged into the
variant's (``BlipVisionConfig`` / ``BlipTextConfig`` fields; dotted CLI keys such as
``vision_config.num_hidden_layers=2`` nest); ``text_config.encoder_hidden_size`` follows the
vision width unless given. A random-init model has no tokenizer files: ``tokenizer=PATH`` (a
folder or a ``vocab.txt``) gives one; otherwise [ours] a character-level WordPiece vocabulary is
built (``[PAD] [UNK] [CLS] [SEP] [MASK]``, ``a picture of``, single letters and digits and their
``##`` continuations, ``[DEC] [ENC]``), which splits any ASCII word into pieces.
"""

from __future__ import annotations

import logging
import os
import string
import tempfile
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.backbones.base import Backbone, BackboneInfo, TensorSpec, register_variants
from featurestore.errors import OvssError, WeightsNotFoundError
from featurestore.protocol import ImageGeometry
from featurestore.weights import WEIGHTS_ENV, hub_offline, sha256_file

logger = logging.getLogger(__name__)

PATCH = 16
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
IMAGE_INPUT_RULE = (
    "image squashed to the protocol's square size (aspect not kept), bicubic with antialiasing, "
    "clamped to [0, 255], then CLIP mean/std"
)
#: Tokens of the built-in character vocabulary besides letters and digits [ours].
BUILTIN_WORDS = ("a", "picture", "of")

_LARGE_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": PATCH,
    "layer_norm_eps": 1e-5,
}
_BASE_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 384,
    "patch_size": PATCH,
    "layer_norm_eps": 1e-5,
}
_TEXT = {
    "vocab_size": 30524,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
}


# BlipTextConfig's defaults ([DEC] = 30522 is BLIP's bos); None when a reduced vocabulary
# has no such id.
_SPECIAL_IDS = {"bos_token_id": 30522, "pad_token_id": 0, "sep_token_id": 102}


@dataclass(frozen=True)
class BlipVariant:
    """One registered model: our name, its Hugging Face repo and architecture."""

    name: str
    hub_id: str
    vision: dict
    doc: str

    @property
    def folder_name(self) -> str:
        """The repo's name without the owner (``blip-itm-large-flickr``)."""
        return self.hub_id.split("/", 1)[1]


VARIANTS: tuple[BlipVariant, ...] = (
    BlipVariant(
        "blip-itm-l",
        "Salesforce/blip-itm-large-flickr",
        _LARGE_VISION,
        "BLIP ITM ViT-L/16 + BERT, Flickr30k retrieval (PnP-OVSS)",
    ),
    BlipVariant(
        "blip-itm-l-coco",
        "Salesforce/blip-itm-large-coco",
        _LARGE_VISION,
        "BLIP ITM ViT-L/16 + BERT, COCO retrieval",
    ),
    BlipVariant(
        "blip-itm-b",
        "Salesforce/blip-itm-base-flickr",
        _BASE_VISION,
        "BLIP ITM ViT-B/16 + BERT, Flickr30k retrieval",
    ),
    BlipVariant(
        "blip-itm-b-coco",
        "Salesforce/blip-itm-base-coco",
        _BASE_VISION,
        "BLIP ITM ViT-B/16 + BERT, COCO retrieval",
    ),
)
_BY_NAME = {v.name: v for v in VARIANTS}


def get_variant(name: str) -> BlipVariant:
    if name not in _BY_NAME:
        raise OvssError(f"'{name}' is not a BLIP model; choose from {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise OvssError(
            "BLIP models need the 'transformers' package: pip install 'ovss[blip]'"
        ) from None
    return transformers


# --------------------------------------------------------------------------------------------
# Finding a checkpoint folder
# --------------------------------------------------------------------------------------------


def weights_file(folder: Path) -> Path | None:
    """The weights file of a Hugging Face folder (``model.safetensors`` first), or None."""
    for name in CHECKPOINT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_blip_folder(variant: BlipVariant, explicit: str | os.PathLike | None = None) -> Path:
    """The checkpoint folder of ``variant``: ``explicit``, ``$OVSS_WEIGHTS``, the hub cache, a
    download when online (see the module doc).

    Raises:
        WeightsNotFoundError: nothing found (one line naming the folder and where to put it).
    """
    if explicit is not None:
        folder = Path(explicit).expanduser()
        if not folder.is_dir():
            raise WeightsNotFoundError(
                f"--weights {folder}: a BLIP checkpoint is a Hugging Face folder (config.json, "
                f"{' or '.join(CHECKPOINT_FILES)}, tokenizer files), and there is no folder there"
            )
        if weights_file(folder) is None or not (folder / "config.json").is_file():
            raise WeightsNotFoundError(
                f"{folder} is not a Hugging Face model folder: it needs config.json and "
                f"{' or '.join(CHECKPOINT_FILES)}"
            )
        return folder
    root = os.environ.get(WEIGHTS_ENV)
    if root:
        for cand in (Path(root) / variant.folder_name, Path(root) / variant.hub_id):
            if cand.is_dir() and weights_file(cand) is not None:
                logger.info("using BLIP weights %s (from $%s)", cand, WEIGHTS_ENV)
                return cand
    try:
        import huggingface_hub

        path = huggingface_hub.snapshot_download(variant.hub_id, local_files_only=True)
        if weights_file(Path(path)) is not None:
            return Path(path)
    except Exception:  # not cached
        pass
    if not hub_offline():
        try:
            import huggingface_hub

            from featurestore.weights import _hub_reachable

            if _hub_reachable():
                return Path(huggingface_hub.snapshot_download(variant.hub_id))
        except Exception as exc:  # no network, auth...: offline
            logger.info("hub download of %s failed: %s", variant.hub_id, exc)
    env = os.environ.get(WEIGHTS_ENV)
    env_state = f"{WEIGHTS_ENV}={env}" if env else f"{WEIGHTS_ENV} is not set"
    raise WeightsNotFoundError(
        f"no weights for {variant.name} on disk or from the hub: save the Hugging Face folder "
        f"{variant.hub_id} as ${WEIGHTS_ENV}/{variant.folder_name} ({env_state}), or pass "
        "--weights DIR, or use --random-init"
    )


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def write_wordpiece_vocab(path: str | os.PathLike, words: list[str] = ()) -> Path:
    """Write a small WordPiece ``vocab.txt``: the BERT special tokens, ``words``, every ASCII
    letter and digit and its ``##`` continuation, then ``[DEC]`` and ``[ENC]`` (BLIP's extra
    tokens). Tests and random-init models use it."""
    chars = string.ascii_lowercase + string.digits
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for w in list(BUILTIN_WORDS) + list(words):
        if w not in tokens:
            tokens.append(w)
    tokens += [c for c in chars if c not in tokens] + [f"##{c}" for c in chars]
    tokens += ["[DEC]", "[ENC]"]
    path = Path(path)
    path.write_text("\n".join(tokens) + "\n")
    return path


def _tokenizer_from_vocab(vocab_txt: Path) -> Any:
    """A BERT tokenizer (lower-casing) from a lone ``vocab.txt`` (read through a temporary
    folder, so ``from_pretrained`` of every supported ``transformers`` version reads it)."""
    import shutil

    tf = _transformers()
    with tempfile.TemporaryDirectory(prefix="ovss-vocab-") as tmp:
        shutil.copyfile(vocab_txt, Path(tmp) / "vocab.txt")
        return tf.BertTokenizerFast.from_pretrained(tmp, do_lower_case=True, local_files_only=True)


def load_tokenizer(source: str | os.PathLike | None) -> tuple[Any, str]:
    """A BERT WordPiece tokenizer and a description of where it came from.

    Args:
        source: a checkpoint folder (``tokenizer.json`` / ``tokenizer_config.json`` /
            ``vocab.txt``), a ``vocab.txt`` file, or None for the built-in character vocabulary.

    Raises:
        OvssError: a folder without tokenizer files (one line naming them).
    """
    tf = _transformers()
    if source is None:
        with tempfile.TemporaryDirectory(prefix="ovss-vocab-") as tmp:
            tok = _tokenizer_from_vocab(write_wordpiece_vocab(Path(tmp) / "vocab.txt"))
        return tok, "builtin-chars"
    path = Path(source)
    if path.is_file():
        return _tokenizer_from_vocab(path), str(path)
    have = [n for n in TOKENIZER_FILES if (path / n).is_file()]
    if not have:
        raise OvssError(
            f"{path} has no tokenizer: a BLIP checkpoint folder needs "
            f"{' or '.join(TOKENIZER_FILES)} (with tokenizer_config.json), as in the Hugging Face "
            "repo"
        )
    try:
        tok = tf.BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise OvssError(f"cannot read the tokenizer in {path}: {exc}") from None
    return tok, str(path)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _merge(base: dict, extra: dict | None) -> dict:
    out = deepcopy(base)
    for k, v in (extra or {}).items():
        out[k] = v
    return out


def blip_config(variant: BlipVariant, arch_overrides: dict | None = None, vocab_size: int = 0):
    """The ``BlipConfig`` of a variant with ``arch_overrides`` (``vision_config`` /
    ``text_config`` dicts, other keys set on the top-level config); the text vocabulary is at
    least ``vocab_size``."""
    tf = _transformers()
    over = dict(arch_overrides or {})
    unknown = [
        k for k in over if k not in ("vision_config", "text_config", "image_text_hidden_size")
    ]
    if unknown:
        raise OvssError(
            f"{variant.name}: unknown architecture override(s) {', '.join(unknown)}; use "
            "vision_config.<field>, text_config.<field> or image_text_hidden_size"
        )
    vision = _merge(variant.vision, over.get("vision_config"))
    text = _merge(_TEXT, over.get("text_config"))
    text.setdefault("encoder_hidden_size", vision["hidden_size"])
    if "encoder_hidden_size" not in (over.get("text_config") or {}):
        text["encoder_hidden_size"] = vision["hidden_size"]
    text["vocab_size"] = max(int(text["vocab_size"]), int(vocab_size))
    for key in ("bos_token_id", "pad_token_id", "sep_token_id"):
        if key not in text and key in _SPECIAL_IDS:
            ident = _SPECIAL_IDS[key]
            text[key] = ident if ident < text["vocab_size"] else None
    kw = {}
    if "image_text_hidden_size" in over:
        kw["image_text_hidden_size"] = int(over["image_text_hidden_size"])
    return tf.BlipConfig(vision_config=vision, text_config=text, **kw)


@dataclass
class BlipModel:
    """A built BLIP ITM model, its tokenizer and identity.

    Attributes:
        model: the ``BlipForImageTextRetrieval`` (eval mode).
        tokenizer: its BERT tokenizer (None when built without text).
        info: identity and preprocessing (as recorded in feature-set provenance).
        tokenizer_source: the folder / file / ``builtin-chars``.
    """

    model: Any
    tokenizer: Any
    info: BackboneInfo
    tokenizer_source: str = ""

    @property
    def num_text_layers(self) -> int:
        return int(self.model.config.text_config.num_hidden_layers)

    @property
    def num_text_heads(self) -> int:
        return int(self.model.config.text_config.num_attention_heads)

    @property
    def max_text_tokens(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixels -> ``(B, 1 + N, D)`` image embeddings (class token
        first, then patches row-major; ``last_hidden_state``, no gradient)."""
        vm = self.model.vision_model
        native = int(self.model.config.vision_config.image_size)
        with torch.no_grad():
            out = vm(
                pixel_values=pixels,
                interpolate_pos_encoding=tuple(pixels.shape[-2:]) != (native, native),
            )
        return out.last_hidden_state

    def itm_match(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        capture_layers: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The ITM "match" logit and the cross-attention probabilities of chosen text layers.

        Args:
            image_embeds: ``(B, 1 + N, D)`` from :meth:`encode_image`.
            input_ids: ``(B, T)`` prompt token ids (first token ``[CLS]`` or ``[ENC]``).
            attention_mask: ``(B, T)`` or None (all ones).
            capture_layers: 0-based text layers whose cross-attention probabilities to return.

        Returns:
            ``(B,)`` the match logit ``itm_head(h[:, 0])[:, 1]`` (before softmax), and per
            captured layer its ``(B, heads, T, 1 + N)`` softmax attention (in the graph, so
            ``torch.autograd.grad(match.sum(), probs)`` is ``∂ITM/∂A``).
        """
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        layers = self.model.text_encoder.encoder.layer
        for li in capture_layers:

            def hook(_mod, _inp, out, li=li):
                captured[li] = out[1]

            hooks.append(layers[li].crossattention.self.register_forward_hook(hook))
        try:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            image_atts = torch.ones(
                image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
            )
            out = self.model.text_encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
            )
            logits = self.model.itm_head(out.last_hidden_state[:, 0, :])
        finally:
            for h in hooks:
                h.remove()
        return logits[:, 1], captured


def _seeded_build(cls, config, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def _library() -> dict[str, str]:
    tf = _transformers()
    return {"transformers": tf.__version__, "torch": torch.__version__}


def load_blip(
    name: str,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    arch_overrides: dict | None = None,
    tokenizer: str | os.PathLike | None = None,
    with_tokenizer: bool = True,
) -> BlipModel:
    """Build a registered BLIP ITM model (see the module doc for where weights come from).

    Args:
        name: ``blip-itm-l`` ... (``VARIANTS``).
        weights: a checkpoint folder; None: ``$OVSS_WEIGHTS``, the hub cache, a download.
        random_init: seeded random weights of the real architecture (no checkpoint).
        seed: the random-init seed (recorded as ``random-init:<seed>``).
        arch_overrides: reduced architectures, random-init only.
        tokenizer: a tokenizer folder or ``vocab.txt`` (default: the checkpoint folder's; for
            random-init the built-in character vocabulary).
        with_tokenizer: False for the image encoder alone (extraction).

    Raises:
        WeightsNotFoundError: no checkpoint folder.
        OvssError: transformers missing, no tokenizer files, bad overrides.
    """
    variant = get_variant(name)
    tf = _transformers()
    if random_init and weights is not None:
        raise OvssError("give --weights or --random-init, not both")
    tok, tok_source = None, ""
    if random_init:
        if with_tokenizer:
            tok, tok_source = load_tokenizer(tokenizer)
        config = blip_config(variant, arch_overrides, vocab_size=len(tok) if tok else 0)
        model = _seeded_build(tf.BlipForImageTextRetrieval, config, seed)
        identity, path = f"random-init:{seed}", None
    else:
        if arch_overrides:
            raise OvssError("architecture overrides apply to --random-init models only")
        folder = resolve_blip_folder(variant, weights)
        if with_tokenizer:
            tok, tok_source = load_tokenizer(tokenizer if tokenizer is not None else folder)
        try:
            model = tf.BlipForImageTextRetrieval.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise OvssError(f"cannot load a BLIP ITM model from {folder}: {exc}") from None
        wf = weights_file(folder)
        identity, path = sha256_file(wf), str(folder)
    model.eval()
    vc = model.config.vision_config
    info = BackboneInfo(
        name=name,
        family="blip",
        patch_size=int(vc.patch_size),
        mean=MEAN,
        std=STD,
        weights=identity,
        weights_path=path,
        library=_library(),
        arch="BlipForImageTextRetrieval",
        extra={
            "hub_id": variant.hub_id,
            "arch_overrides": arch_overrides or None,
            "vision_width": int(vc.hidden_size),
            "native_size": int(vc.image_size),
            "text_layers": int(model.config.text_config.num_hidden_layers),
            "text_heads": int(model.config.text_config.num_attention_heads),
            "input_rule": IMAGE_INPUT_RULE,
        },
    )
    return BlipModel(model, tok, info, tok_source)


def squash_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, size, size)`` normalised float32 (``IMAGE_INPUT_RULE``)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0, 255)[0]
    m = torch.tensor(MEAN).view(3, 1, 1) * 255.0
    s = torch.tensor(STD).view(3, 1, 1) * 255.0
    return (x - m) / s


class BlipBackbone(Backbone):
    """BLIP's image encoder for the store: the first (un-dropped) pass of PnP-OVSS.

    ``forward_dense`` on ``(B, 3, S, S)`` squashed images returns ``image_embeds``
    ``(B, (S/16)^2, D)`` (the patch rows of ``last_hidden_state``) and ``image_cls`` ``(B, D)``.
    """

    def __init__(self, blip: BlipModel):
        super().__init__()
        self.vision = blip.model.vision_model
        self.native = int(blip.model.config.vision_config.image_size)
        self.width = int(blip.model.config.vision_config.hidden_size)
        self.info = blip.info

    def tensor_specs(self) -> list[TensorSpec]:
        return [
            TensorSpec("image_embeds", "token", (self.width,), "image encoder output, patches"),
            TensorSpec("image_cls", "window", (self.width,), "image encoder output, class token"),
        ]

    def geometry(self, protocol, height: int, width: int) -> ImageGeometry:
        if protocol.resize != "square" or protocol.crop:
            raise ValueError(
                f"{self.info.name} takes the whole image squashed to a square (resize 'square', "
                f"no crop), not {protocol.key()}"
            )
        return super().geometry(protocol, height, width)

    def preprocess(self, image: np.ndarray, geometry: ImageGeometry) -> list[torch.Tensor]:
        return [squash_pixels(image, geometry.resized[0])]

    def forward_dense(self, x: torch.Tensor, grids=None) -> dict[str, torch.Tensor]:
        out = self.vision(
            pixel_values=x, interpolate_pos_encoding=tuple(x.shape[-2:]) != (self.native,) * 2
        ).last_hidden_state
        return {"image_embeds": out[:, 1:], "image_cls": out[:, 0]}


#: The smallest architecture of the real classes (registry-wide tests, demos).
TINY = {
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
    },
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 128,
    },
}


def build_blip(
    variant: BlipVariant,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    layers: tuple[int, ...] = (),
    arch_overrides: dict | None = None,
) -> Backbone:
    """The image encoder of a BLIP ITM variant as a store backbone (``BlipBackbone``)."""
    if layers:
        raise OvssError(f"{variant.name} caches its image encoder output only (no --layers)")
    blip = load_blip(
        variant.name,
        weights=weights,
        random_init=random_init,
        seed=seed,
        arch_overrides=arch_overrides,
        with_tokenizer=False,
    )
    return BlipBackbone(blip)


register_variants(VARIANTS, build_blip, tiny=TINY)
