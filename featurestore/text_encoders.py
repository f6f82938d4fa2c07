"""Text encoders: a registry of text towers that turn prompts into embeddings.

A *text encoder spec* names one encoder (``ovss extract --text-model``, the ``text_model``
argument of :func:`featurestore.text.get_text_embeddings`):

* ``clip-b16``, ``clip-l14``, ``clip-l14-336``, ``clip-h14``: the text towers of the CLIP
  models of ``featurestore.backbones.clip`` (same weights rules as ``ovss extract``);
* ``openclip:<model_name>:<pretrained_tag>``: any open_clip CLIP's text tower;
* ``<kind>:<argument>``: a kind some module registered with :func:`register_text_encoder`,
  typically a method's text side loaded from a checkpoint, e.g. ``simzss:/path/ckpt.pt`` (a text
  tower trained from scratch) or ``pixelclip:/path/prompts.pt`` (learnable prompt tokens in a
  frozen CLIP tower). The store never imports those modules: a method registers its kinds when
  its module is imported (the ``methods`` package imports all of them).

Every encoder has an *identity* (:meth:`TextEncoder.identity`): a JSON-able dict of everything
that changes its output (kind, model, weights ``sha256:...``/``random-init:N``, architecture
overrides, checkpoint hash). The text-set cache keys on it: CLIP sets live under the model name
and record their weights (a set made with other weights is refused, never reused); sets of
registered kinds live under ``<kind>-<12 hex digits of the identity hash>``, so two checkpoints
never share a set and the same checkpoint finds its set again.

Fast path of CLIP towers [ours]: under CLIP's causal mask the pooled token (the end-of-text
token, found by position: the argmax of the token ids) attends only to the tokens before it,
so the padding after it changes nothing. :class:`ClipTextEncoder` sorts prompts by token length
and runs each batch truncated to its longest prompt (positional embedding and causal mask
sliced), which is exact up to float rounding and ~10x faster for template prompts (~15 tokens of
77). Towers it cannot slice safely (no causal mask, pad masks, an appended class token, ``last``
pooling, a tower that is not open_clip's) run the full context; ``provenance()["context"]``
says which and why.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from featurestore.errors import OvssError

if TYPE_CHECKING:
    import torch

ProgressCallback = Callable[[str, int, int], None]  # (label, done, total)


@dataclass(frozen=True)
class TextEncoderOptions:
    """How to build an encoder from its spec (the ``ovss extract`` text options).

    Attributes:
        weights: a checkpoint file for the tower (None: the kind's default resolution).
        random_init: no weights, the library's initialisation under ``seed``.
        seed: seed of the random initialisation (default 0).
        arch_overrides: architecture changes of the same class (e.g. a tiny test tower).
        device: where the encoder runs (default ``cpu``).
    """

    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    arch_overrides: dict | None = None
    device: str = "cpu"


class TextEncoder:
    """Base of every text encoder: prompts -> ``(N, D)`` embeddings.

    Subclasses set ``name`` (the spec they were made from), ``kind`` (the registered kind) and
    ``dim`` (D), and implement :meth:`identity` and :meth:`encode_batch`. :meth:`encode` batches
    (override it to batch differently, as the CLIP fast path does).
    """

    name: str = ""
    kind: str = ""
    dim: int = 0

    def identity(self) -> dict:
        """Everything that changes the output, JSON-able: at least ``kind`` and ``weights``."""
        raise NotImplementedError

    def provenance(self) -> dict:
        """What a text set records about its encoder (default: the identity)."""
        return dict(self.identity())

    def encode_batch(self, prompts: list[str]) -> torch.Tensor:
        """``(len(prompts), dim)`` float embeddings of one batch, *not* normalised."""
        raise NotImplementedError

    def encode(
        self,
        prompts: Sequence[str],
        batch_size: int = 256,
        progress: ProgressCallback | None = None,
    ) -> torch.Tensor:
        """``(N, dim)`` float32 CPU embeddings in prompt order, not normalised.

        Runs :meth:`encode_batch` on ``batch_size`` prompts at a time without gradients and
        reports ``progress("text <name>", prompts done, N)`` after each batch.
        """
        import torch

        prompts = list(prompts)
        label = f"text {self.name}"
        if progress:
            progress(label, 0, len(prompts))
        out = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                out.append(self.encode_batch(prompts[start : start + batch_size]).float().cpu())
                if progress:
                    progress(label, min(start + batch_size, len(prompts)), len(prompts))
        if not out:
            return torch.empty(0, self.dim)
        return torch.cat(out)


TextEncoderFactory = Callable[[str, TextEncoderOptions], TextEncoder]
Identify = Callable[[str, TextEncoderOptions], "dict | None"]


@dataclass(frozen=True)
class TextEncoderKind:
    """One registry entry (see :func:`register_text_encoder`)."""

    key: str
    factory: TextEncoderFactory
    identify: Identify | None = None
    keyed_by_identity: bool = True
    help: str = ""

    @property
    def is_prefix(self) -> bool:
        return self.key.endswith(":")

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.key.rstrip(":")) or "text"


_KINDS: dict[str, TextEncoderKind] = {}
_builtins_done = False


def register_text_encoder(
    kind_or_prefix: str,
    factory: TextEncoderFactory,
    *,
    identify: Identify | None = None,
    keyed_by_identity: bool = True,
    help: str = "",
) -> None:
    """Register a text-encoder kind (call it at import time of the module that owns it).

    Args:
        kind_or_prefix: an exact spec (``clip-b16``) or a prefix ending in ``:`` that claims
            every spec starting with it (``simzss:`` claims ``simzss:/path/ckpt.pt``).
        factory: ``factory(spec, options) -> TextEncoder`` builds the encoder.
        identify: ``identify(spec, options) -> dict | None``: the identity the built encoder
            will have, computed without building it (e.g. hash the checkpoint file), so a
            cached text set is found without loading the model. It must equal
            ``factory(spec, options).identity()``. None (or returning None): the encoder is
            built to learn its identity.
        keyed_by_identity: store its text sets under ``<kind>-<identity hash>`` (default);
            False keeps them under the spec itself and refuses a cached set of another
            identity (the CLIP towers, whose default weights are only known once resolved).
        help: one line for listings.

    Raises:
        OvssError: the key is already registered to another factory (the same function of a
            re-imported module replaces the old entry).
    """
    old = _KINDS.get(kind_or_prefix)
    if old is not None and _qualname(old.factory) != _qualname(factory):
        raise OvssError(
            f"text encoder kind '{kind_or_prefix}' is already registered (by "
            f"{_qualname(old.factory)})"
        )
    _KINDS[kind_or_prefix] = TextEncoderKind(
        kind_or_prefix, factory, identify, keyed_by_identity, help
    )


def _qualname(fn: Any) -> str:
    """``module.qualname`` of a factory: a re-imported module registers the same one again."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _ensure_builtins() -> None:
    global _builtins_done
    if _builtins_done:
        return
    from featurestore.backbones import clip as clip_backbones

    for v in getattr(clip_backbones, "VARIANTS", ()):
        register_text_encoder(
            v.name,
            _clip_factory,
            identify=_clip_identify,
            keyed_by_identity=False,
            help=f"text tower of {getattr(v, 'doc', v.name)}",
        )
    register_text_encoder(
        getattr(clip_backbones, "PREFIX", "openclip:"),
        _clip_factory,
        identify=_clip_identify,
        keyed_by_identity=False,
        help="text tower of any open_clip CLIP (openclip:<model_name>:<pretrained_tag>)",
    )
    _builtins_done = True


def list_text_encoders() -> list[TextEncoderKind]:
    """Every registered kind, exact names first, then prefixes (registration order)."""
    _ensure_builtins()
    kinds = list(_KINDS.values())
    return [k for k in kinds if not k.is_prefix] + [k for k in kinds if k.is_prefix]


def lookup_text_encoder(spec: str) -> TextEncoderKind:
    """The kind that claims ``spec``: an exact name, else the longest matching prefix.

    Raises:
        OvssError: no kind claims it (the message lists the known names and prefixes).
    """
    _ensure_builtins()
    if spec in _KINDS:
        return _KINDS[spec]
    hits = [k for k in _KINDS.values() if k.is_prefix and spec.startswith(k.key)]
    if hits:
        return max(hits, key=lambda k: len(k.key))
    names = ", ".join(k.key + ("..." if k.is_prefix else "") for k in list_text_encoders())
    raise OvssError(
        f"'{spec}' is not a known text encoder; choose from {names} (a method's own kinds are "
        "registered when its module is imported)"
    )


def create_text_encoder(
    spec: str,
    weights: str | None = None,
    random_init: bool = False,
    seed: int = 0,
    arch_overrides: dict | None = None,
    device: str = "cpu",
) -> TextEncoder:
    """Build the encoder a spec names (module doc), with the ``ovss extract`` text options.

    Raises:
        OvssError: unknown spec; whatever the kind's factory raises (``WeightsNotFoundError``
            for missing weights).
    """
    opts = TextEncoderOptions(
        None if weights is None else str(weights), random_init, seed, arch_overrides, str(device)
    )
    return lookup_text_encoder(spec).factory(spec, opts)


def identity_hash(identity: dict) -> str:
    """12 hex digits of sha256 over the identity's canonical JSON (sorted keys)."""
    blob = json.dumps(identity, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (tuples become lists, unknown objects strings)."""
    return json.loads(json.dumps(obj, default=str))


def file_identity(path: str) -> str:
    """``sha256:<hex>`` of a checkpoint file (for a kind's ``identify``).

    Raises:
        WeightsNotFoundError: the file does not exist.
    """
    from pathlib import Path

    from featurestore.errors import WeightsNotFoundError
    from featurestore.weights import sha256_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsNotFoundError(f"checkpoint {path} does not exist")
    return sha256_file(p)


# --------------------------------------------------------------------------------------------
# CLIP text towers (open_clip), with the exact truncated-context fast path
# --------------------------------------------------------------------------------------------


def _clip_identify(spec: str, opts: TextEncoderOptions) -> dict:
    """Identity of a CLIP tower known before loading it; ``weights`` None = any real weights
    (the default resolution finds them at load time)."""
    if opts.random_init:
        weights: str | None = f"random-init:{opts.seed}"
    elif opts.weights is not None:
        weights = file_identity(opts.weights)
    else:
        weights = None
    return {
        "kind": "clip",
        "model": spec,
        "weights": weights,
        "arch_overrides": jsonable(opts.arch_overrides) if opts.arch_overrides else None,
    }


def _clip_factory(spec: str, opts: TextEncoderOptions) -> ClipTextEncoder:
    model, tokenizer, prov = load_clip_tower(spec, opts)
    return ClipTextEncoder(spec, model, tokenizer, prov, device=opts.device)


def load_clip_tower(spec: str, opts: TextEncoderOptions) -> tuple[Any, Any, dict]:
    """``(open_clip model, tokenizer, provenance dict)`` of a CLIP spec, on the CPU (or the meta
    device when called under ``torch.device("meta")`` with ``random_init``)."""
    from dataclasses import asdict

    try:
        from featurestore.backbones.clip import load_open_clip
    except ImportError as e:
        raise OvssError(
            f"the CLIP text encoder is not available ({e}); pip install 'ovss[clip]'"
        ) from None
    model, tokenizer, info = load_open_clip(
        spec,
        weights=opts.weights,
        random_init=opts.random_init,
        seed=opts.seed,
        arch_overrides=opts.arch_overrides,
    )
    prov = asdict(info) if hasattr(info, "__dataclass_fields__") else dict(info)
    prov["arch_overrides"] = jsonable(opts.arch_overrides) if opts.arch_overrides else None
    return model, tokenizer, prov


@dataclass
class _TowerParts:
    """The pieces of an open_clip text transformer the truncated forward needs."""

    token_embedding: Any
    positional_embedding: Any
    transformer: Any
    ln_final: Any
    attn_mask: Any
    text_projection: Any
    pool_type: str
    eos_id: int | None
    ln_after_pool: bool = False
    extra: dict = field(default_factory=dict)


def _tower_parts(model: Any) -> tuple[_TowerParts | None, str]:
    """``(parts, "")`` when the text tower of ``model`` can run on a truncated context, else
    ``(None, reason)``. Knows open_clip's ``CLIP`` (tower attributes on the model) and
    ``TextTransformer`` (``CustomTextCLIP.text``)."""
    if hasattr(model, "token_embedding") and hasattr(model, "positional_embedding"):
        t = model
        pool, eos = getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None)
    elif hasattr(getattr(model, "text", None), "token_embedding"):
        t = model.text
        pool, eos = getattr(t, "pool_type", "argmax"), getattr(t, "eos_id", None)
        if getattr(t, "cls_emb", None) is not None:
            return None, "the tower appends a class token (pooled last)"
        if getattr(t, "use_pad_mask", False):
            return None, "the tower masks padding (bidirectional)"
    else:
        return None, f"{type(model).__name__} is not an open_clip text transformer"
    for need in ("transformer", "ln_final", "positional_embedding"):
        if not hasattr(t, need):
            return None, f"the tower has no {need}"
    mask = getattr(t, "attn_mask", None)
    if mask is None:
        return None, "the tower has no causal mask (every token sees the padding)"
    if pool not in ("argmax", "eos", "first"):
        return None, f"pool type '{pool}' reads a position that sees the padding"
    if pool == "eos" and eos is None:
        return None, "pool type 'eos' without an eos token id"
    parts = _TowerParts(
        token_embedding=t.token_embedding,
        positional_embedding=t.positional_embedding,
        transformer=t.transformer,
        ln_final=t.ln_final,
        attn_mask=mask,
        text_projection=getattr(t, "text_projection", None),
        pool_type=pool,
        eos_id=eos,
        ln_after_pool=bool(getattr(t, "final_ln_after_pool", False)),
    )
    return parts, ""


def needed_lengths(tokens: torch.Tensor, pool_type: str, eos_id: int | None = None) -> torch.Tensor:
    """``(N,)`` int64: per row, the context length that holds the pooled position (its index
    + 1): the argmax of the ids (CLIP's end-of-text token), the first ``eos_id``, or 1."""
    import torch

    n, ctx = tokens.shape
    if pool_type == "argmax":
        pos = tokens.argmax(dim=-1)
    elif pool_type == "eos":
        hit = tokens == eos_id
        pos = torch.where(hit.any(dim=-1), hit.int().argmax(dim=-1), torch.full((n,), ctx - 1))
    elif pool_type == "first":
        pos = torch.zeros(n, dtype=torch.long)
    else:
        pos = torch.full((n,), ctx - 1, dtype=torch.long)
    return pos.long() + 1


class ClipTextEncoder(TextEncoder):
    """An open_clip CLIP's text tower (``encode_text``), with the exact fast path.

    ``encode`` returns unnormalised ``encode_text`` outputs, ``(N, embed_dim)`` float32 in
    prompt order. With ``truncate`` (default True) prompts are sorted by token length (longest
    first) and each batch runs on its longest prompt's context only; ``truncate=False`` runs
    every prompt on the full context, in prompt order, through ``model.encode_text`` itself.

    Before the first truncated batch the two paths are compared once on a short and a long
    probe prompt; if they differ by more than 1e-4 relative (1e-2 below float32) the encoder
    falls back to the full context and says so in ``provenance()["context"]``.
    """

    kind = "clip"

    def __init__(
        self,
        name: str,
        model: Any,
        tokenizer: Callable[[list[str]], torch.Tensor],
        info: dict | None = None,
        device: str = "cpu",
        truncate: bool = True,
    ):
        self.name = name
        self.device = device
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        self.truncate = truncate
        self._parts, self._why_full = _tower_parts(self.model)
        self._probed = False
        proj = getattr(self.model, "text_projection", None)
        if proj is None and hasattr(self.model, "text"):
            proj = getattr(self.model.text, "text_projection", None)
        if proj is not None:
            self.dim = int(proj.shape[-1] if proj.ndim == 2 else proj.out_features)
        else:
            self.dim = int(getattr(self.model, "embed_dim", 0) or 0)

    # identity ---------------------------------------------------------------------------

    def identity(self) -> dict:
        return {
            "kind": "clip",
            "model": self.name,
            "weights": str(self.info.get("weights", "")),
            "arch_overrides": self.info.get("arch_overrides") or None,
        }

    def provenance(self) -> dict:
        prov = jsonable(self.info)
        prov["precision"] = str(next(self.model.parameters()).dtype).replace("torch.", "")
        prov["context"] = self.context_mode()
        return prov

    def context_mode(self) -> str:
        """``truncated per batch (exact)`` or ``full (<why>)``."""
        if self.truncate and self._parts is not None:
            return "truncated per batch to its longest prompt (exact under the causal mask)"
        return f"full ({self._why_full or 'truncation disabled'})"

    # encoding ---------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(N, context_length)`` int64 token ids."""
        return self.tokenizer(list(prompts))

    def encode_batch(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenize(prompts).to(self.device))

    def _forward_truncated(self, tokens: torch.Tensor) -> torch.Tensor:
        """``encode_text`` of ``tokens`` (B, L) with L <= context: positional embedding and
        causal mask sliced to L."""
        import torch
        import torch.nn as nn

        p = self._parts
        length = tokens.shape[1]
        cast = p.transformer.get_cast_dtype() if hasattr(p.transformer, "get_cast_dtype") else None
        x = p.token_embedding(tokens)
        if cast is not None:
            x = x.to(cast)
        x = x + p.positional_embedding[:length].to(x.dtype)
        mask = p.attn_mask[:length, :length]
        if hasattr(p.transformer, "batch_first"):  # open_clip >= 2.24 transposes by itself
            x = p.transformer(x, attn_mask=mask)
        else:  # older open_clip: the caller gives (L, B, D)
            x = p.transformer(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2)
        if p.pool_type == "argmax":
            idx = tokens.argmax(dim=-1)
        elif p.pool_type == "eos":
            idx = (tokens == p.eos_id).int().argmax(dim=-1)
        else:
            idx = tokens.new_zeros(tokens.shape[0])
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if p.ln_after_pool:
            pooled = p.ln_final(x[rows, idx])
        else:
            pooled = p.ln_final(x)[rows, idx]
        proj = p.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Module) else pooled @ proj

    def _probe(self) -> None:
        """Compare truncated and full context once; fall back to full on a mismatch."""
        import torch

        self._probed = True
        tokens = self.tokenize(["a", "a photo of a large striped cat sitting on the red sofa."])
        tokens = tokens.to(self.device)
        length = int(needed_lengths(tokens.cpu(), self._parts.pool_type, self._parts.eos_id).max())
        with torch.inference_mode():
            try:
                full = self.model.encode_text(tokens).float()
                short = self._forward_truncated(tokens[:, :length]).float()
            except Exception as e:  # a tower variant the truncated forward does not know
                self._parts, self._why_full = None, f"truncated forward failed: {e}"
                return
        exact = next(self.model.parameters()).dtype == torch.float32
        tol = (1e-4 if exact else 1e-2) * max(1.0, float(full.abs().max()))
        err = float((full - short).abs().max())
        if not err <= tol:
            self._parts = None
            self._why_full = f"truncated forward differs by {err:.2e} on a probe"

    def encode(
        self,
        prompts: Sequence[str],
        batch_size: int = 256,
        progress: ProgressCallback | None = None,
    ) -> torch.Tensor:
        """``(N, dim)`` float32 CPU ``encode_text`` outputs in prompt order (not normalised);
        ``progress("text <name>", done, N)`` after each batch."""
        import torch

        prompts = list(prompts)
        if self.truncate and self._parts is not None and not self._probed:
            self._probe()
        if not (self.truncate and self._parts is not None):
            return super().encode(prompts, batch_size, progress)
        label = f"text {self.name}"
        n = len(prompts)
        if progress:
            progress(label, 0, n)
        tokens = self.tokenize(prompts)
        lengths = needed_lengths(tokens, self._parts.pool_type, self._parts.eos_id)
        order = torch.argsort(-lengths, stable=True)
        out = torch.empty(n, self.dim, dtype=torch.float32)
        done = 0
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                length = int(lengths[idx].max())
                batch = tokens[idx, :length].to(self.device)
                out[idx] = self._forward_truncated(batch).float().cpu()
                done += len(idx)
                if progress:
                    progress(label, done, n)
        return out
