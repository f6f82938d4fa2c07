"""Where checkpoint files come from, what they are (sha256), and how they are read.

Every backbone family describes its checkpoint with a ``WeightsSpec`` and calls
``resolve_weights``, which looks in this order and stops at the first hit:

1. an explicit path (``--weights PATH``); it must exist;
2. the directory named by ``$OVSS_WEIGHTS`` (each of ``spec.candidates``, relative to it);
3. the libraries' own caches: the huggingface_hub cache (``model.safetensors`` /
   ``pytorch_model.bin`` of ``spec.hub_id``) and ``torch.hub.get_dir()/checkpoints``;
4. a download of ``spec.hub_id`` from the Hugging Face hub, only when online
   (``HF_HUB_OFFLINE=1`` or a failed connection means offline; nothing waits long).

When all four fail a ``WeightsNotFoundError`` says, in one line, which file to get and where to
put it. The chosen path is logged at INFO level.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from featurestore.errors import OvssError, WeightsNotFoundError

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "OVSS_WEIGHTS"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
# Keys under which training scripts nest the weights we want, tried in this order.
WRAPPER_KEYS = ("teacher", "model", "state_dict")
# Prefixes that DDP (``module.``) and DINO-style training code (``backbone.``) put on keys.
KEY_PREFIXES = ("module.", "backbone.")
# Seconds to wait for the hub before treating the machine as offline.
CONNECT_TIMEOUT_S = 3.0
_TRUE_VALUES = {"1", "true", "yes", "on"}


@dataclass
class WeightsSpec:
    """Everything needed to find one checkpoint.

    Attributes:
        candidates: file names looked up under ``$OVSS_WEIGHTS``, most preferred first; may hold
            sub-folders, e.g. ``["dinov2_vits14_pretrain.pth",
            "timm/vit_small_patch14_dinov2.lvd142m/model.safetensors"]``.
        hub_id: Hugging Face repo id (e.g. ``timm/vit_small_patch14_dinov2.lvd142m``) searched in
            the huggingface_hub cache and downloaded from when online; ``None`` if there is none.
        torch_hub_file: file name looked up in ``torch.hub.get_dir()/checkpoints`` (where
            ``torch.hub.load_state_dict_from_url`` stores downloads), or ``None``.
        url_hint: where a person can get the file by hand (shown in the error message).
        model: short model name used in messages (e.g. ``dinov2-s14``).
        hub_files: file names tried in the ``hub_id`` repo, cached or downloaded.
        also_hub_ids: further repos searched in the huggingface_hub cache after ``hub_id``
            (never downloaded), e.g. timm's second class of the same weights.
    """

    candidates: list[str]
    hub_id: str | None = None
    torch_hub_file: str | None = None
    url_hint: str = ""
    model: str = ""
    hub_files: tuple[str, ...] = field(default=HUB_FILES)
    also_hub_ids: tuple[str, ...] = ()


def resolve_weights(spec: WeightsSpec, explicit: str | os.PathLike | None = None) -> Path:
    """Return the path of the checkpoint described by ``spec`` (see the module doc for the order).

    Args:
        spec: what to look for.
        explicit: a path given by the user; when set, nothing else is searched.

    Raises:
        WeightsNotFoundError: the explicit file does not exist, ``$OVSS_WEIGHTS`` is not a
            directory, or no step found the checkpoint.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {path} does not exist")
        return _chosen(path, "--weights")

    weights_dir = os.environ.get(WEIGHTS_ENV)
    if weights_dir:
        root = Path(weights_dir).expanduser()
        if not root.is_dir():
            raise WeightsNotFoundError(
                f"{WEIGHTS_ENV}={weights_dir} is not a directory; create it or unset {WEIGHTS_ENV}"
            )
        for name in spec.candidates:
            if (root / name).is_file():
                return _chosen(root / name, f"${WEIGHTS_ENV}")

    cached = _find_in_library_caches(spec)
    if cached is not None:
        return cached

    downloaded = _download_from_hub(spec)
    if downloaded is not None:
        return downloaded

    raise WeightsNotFoundError(_missing_message(spec))


def find_local_weights(spec: WeightsSpec) -> Path | None:
    """The checkpoint of ``spec`` found without the network (``$OVSS_WEIGHTS``, then the
    huggingface_hub and torch.hub caches, as ``resolve_weights``), or ``None``; never raises."""
    weights_dir = os.environ.get(WEIGHTS_ENV)
    if weights_dir:
        root = Path(weights_dir).expanduser()
        for name in spec.candidates if root.is_dir() else []:
            if (root / name).is_file():
                return root / name
    try:
        return _find_in_library_caches(spec)
    except Exception:  # a broken cache is a doctor finding, not a crash
        return None


def _chosen(path: Path, source: str) -> Path:
    logger.info("using weights %s (from %s)", path, source)
    return path


def _find_in_library_caches(spec: WeightsSpec) -> Path | None:
    hub_ids = [h for h in (spec.hub_id, *spec.also_hub_ids) if h]
    if hub_ids:
        from huggingface_hub import try_to_load_from_cache

        for hub_id in hub_ids:
            for filename in spec.hub_files:
                hit = try_to_load_from_cache(hub_id, filename)
                # A str is a cached file; None and the _CACHED_NO_EXIST sentinel are misses.
                if isinstance(hit, str) and Path(hit).is_file():
                    return _chosen(Path(hit), "huggingface_hub cache")
    if spec.torch_hub_file:
        path = Path(torch.hub.get_dir()) / "checkpoints" / spec.torch_hub_file
        if path.is_file():
            return _chosen(path, "torch.hub cache")
    return None


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE_VALUES:
            return True
    return False


def _hub_reachable(timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _download_from_hub(spec: WeightsSpec) -> Path | None:
    if not spec.hub_id or hub_offline() or not _hub_reachable():
        return None
    import huggingface_hub

    for filename in spec.hub_files:
        try:
            path = huggingface_hub.hf_hub_download(
                spec.hub_id, filename, etag_timeout=CONNECT_TIMEOUT_S
            )
        except Exception as exc:  # missing file, no network, auth: all mean "not from here"
            logger.info("hub download of %s/%s failed: %s", spec.hub_id, filename, exc)
            continue
        return _chosen(Path(path), f"download of {spec.hub_id}")
    return None


def _missing_message(spec: WeightsSpec) -> str:
    what = f"no weights for {spec.model}" if spec.model else "no weights"
    where = os.environ.get(WEIGHTS_ENV)
    env_state = f"{WEIGHTS_ENV}={where}" if where else f"{WEIGHTS_ENV} is not set"
    if not spec.candidates:
        todo = f"set {WEIGHTS_ENV} to a folder holding the checkpoint ({env_state})"
    else:
        first, rest = spec.candidates[0], spec.candidates[1:]
        source = f" (from {spec.url_hint})" if spec.url_hint else ""
        todo = f"save {first}{source} as ${WEIGHTS_ENV}/{first} ({env_state})"
        if rest:
            todo += f"; {', '.join(rest)} there also work"
    return f"{what} on disk or from the hub: {todo}, or pass --weights PATH, or use --random-init"


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def sha256_file(path: str | os.PathLike) -> str:
    """Return ``"sha256:<hex>"`` of a file's bytes.

    Digests are remembered in-process by (absolute path, size, mtime), so asking again for an
    unchanged multi-GB checkpoint is free, and a rewritten file is hashed again.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _sha256_cached(str(resolved), stat.st_size, stat.st_mtime_ns)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; anything else
    (``.pth``, ``.pt``, ``.bin``) with ``torch.load(map_location="cpu", weights_only=True)``, so
    no pickled code runs. Training wrappers are unwrapped (``teacher``, then ``model``, then
    ``state_dict``), ``module.``/``backbone.`` key prefixes are removed, and non-tensor entries
    are dropped.

    Raises:
        OvssError: the file cannot be read as weights or holds no tensors.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise OvssError(f"cannot read weights from {path}: {exc}") from exc

    while isinstance(raw, Mapping):
        inner = next((raw[k] for k in WRAPPER_KEYS if isinstance(raw.get(k), Mapping)), None)
        if inner is None:
            break
        raw = inner
    if not isinstance(raw, Mapping):
        raise OvssError(f"{path} does not hold a state dict (found {type(raw).__name__})")

    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if isinstance(value, torch.Tensor):
            state[_strip_prefixes(str(key))] = value
    if not state:
        raise OvssError(f"{path} holds no tensors")
    return state


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key
