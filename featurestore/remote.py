"""Feature stores on object storage: any fsspec URL (``s3://bucket/path.zarr``, ``gs://``, ...).

A store whose path contains ``://`` is read and written through fsspec (Zarr's ``FsspecStore``).
Options for the filesystem (``endpoint_url``, ``key``, ``secret``, ``client_kwargs``, ...) come
from :func:`set_storage_options` (the CLI's ``--storage-options JSON``) or an explicit argument;
for ``s3://`` the standard AWS variables fill in whatever they do not name (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``:
read by s3fs / botocore themselves). Nothing here records or prints the options: every secret
value they carry (and the AWS secret variables) is registered with
:func:`featurestore.names.register_secret`, so :func:`featurestore.names.redact` masks it in
any line the tool prints.

**Commits without renames** [ours]. A local store and a local feature set are built in a hidden
sibling folder and renamed into place; object stores have no atomic rename, so a remote store
is built in place and its *commit record* is the metadata object written last, in one
whole-object put:

* the store: its root ``zarr.json`` carries ``ovss_store`` (the format) only once the image
  table is complete; while it is being made the root carries :data:`CREATING_ATTR` instead, so
  an interrupted creation is recognised as a leftover (and removed by the next creator, root
  last) rather than mistaken for a foreign Zarr group;
* a feature set: its group ``zarr.json`` carries ``provenance`` only once every array exists
  (the same rule as local sets); an entry of ``features/`` without it is unfinished.

Opening requires the commit record. There is no lock on object storage, so exactly one writer
creates: shard 0 of a sharded extraction (the only writer of an unsharded one); every other
shard waits for the commit records (polling, up to :data:`WAIT_ENV` seconds) and then writes
only its own blocks. Every block write is a whole-object put of chunks that writer owns.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from featurestore.errors import RemoteStoreError, StoreError
from featurestore.names import redact, register_secret

#: Root attribute of a remote store while it is being made (replaced by ``ovss_store``).
CREATING_ATTR = "ovss_creating"
#: Seconds a non-creating shard waits for shard 0 to commit the store / a feature set.
WAIT_ENV = "OVSS_REMOTE_WAIT_S"
DEFAULT_WAIT_S = 900.0
#: Seconds between two looks at a commit record while waiting.
POLL_S = 0.5
#: Environment variables whose values are secrets (masked in every printed line).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRET_KEY = re.compile(r"key|secret|token|passw|credential|signature|auth", re.IGNORECASE)

_default_options: dict[str, Any] = {}


def is_url(path: object) -> bool:
    """Whether a store path is an fsspec URL (``scheme://...``) rather than a local path."""
    return "://" in str(path)


def set_storage_options(options: dict[str, Any] | None) -> None:
    """Set the process-wide fsspec options of remote stores (``None``: none). The CLI calls
    this with ``--storage-options``; library callers may too, or pass options explicitly."""
    global _default_options
    _default_options = dict(options or {})
    register_secrets(_default_options)


def storage_options(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options to use: ``options`` when given, else the process-wide ones (a copy)."""
    opts = dict(_default_options if options is None else options)
    register_secrets(opts)
    return opts


def register_secrets(options: dict[str, Any]) -> None:
    """Register every secret-looking value of ``options`` (nested dicts included) and of the
    AWS secret variables, so that printed lines mask them."""
    for name in SECRET_ENV:
        if os.environ.get(name):
            register_secret(os.environ[name])

    def walk(d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(v, str) and _SECRET_KEY.search(str(k)):
                register_secret(v)

    walk(options)


def parse_storage_options(text: str) -> dict[str, Any]:
    """``--storage-options``: a JSON object, or ``@FILE`` naming a file holding one (keeps
    secrets off the command line). The error never repeats the text (it may hold secrets).

    Raises:
        ValueError: not a JSON object, or an unreadable file.
    """
    source = "the JSON"
    if text.startswith("@"):
        source = f"file {text[1:]}"
        try:
            with open(text[1:], encoding="utf-8") as fh:
                text = fh.read()
        except OSError as e:
            raise ValueError(f"cannot read {source}: {e.strerror or e}") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(
            f"{source} is not valid JSON (line {e.lineno}, column {e.colno})"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f'{source} must be a JSON object, e.g. {{"endpoint_url": "..."}}')
    register_secrets(value)
    return value


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _fs_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """The filesystem's keyword arguments. For ``s3://`` the AWS variables are passed in
    explicitly where the options name nothing else, so fsspec's cache of filesystems (keyed
    by these arguments) never hands back a client holding other credentials or endpoint."""
    opts = dict(options)
    if _scheme(url) in ("s3", "s3a"):
        env = os.environ
        ep = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        client = dict(opts.get("client_kwargs") or {})
        if ep and "endpoint_url" not in opts and "endpoint_url" not in client:
            opts["endpoint_url"] = ep
        if not opts.get("anon") and "key" not in opts and "secret" not in opts:
            if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
                opts["key"] = env["AWS_ACCESS_KEY_ID"]
                opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
                if env.get("AWS_SESSION_TOKEN") and "token" not in opts:
                    opts["token"] = env["AWS_SESSION_TOKEN"]
        region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
        if region and "region_name" not in client:
            client["region_name"] = region
        if client:
            opts["client_kwargs"] = client
    return opts


def filesystem(url: str, options: dict[str, Any] | None = None):
    """``(fs, root)``: a synchronous fsspec filesystem for ``url`` and the store's root path in
    it (no trailing slash)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **_fs_options(url, storage_options(options)))
    return fs, root.rstrip("/")


def zarr_store(url: str, read_only: bool, options: dict[str, Any] | None = None):
    """A Zarr ``FsspecStore`` for ``url`` (asynchronous s3fs, or a wrapped sync filesystem)."""
    from zarr.storage import FsspecStore

    opts = _fs_options(url, storage_options(options))
    return FsspecStore.from_url(url.rstrip("/"), storage_options=opts, read_only=read_only)


def endpoint(url: str, options: dict[str, Any] | None = None) -> str:
    """The endpoint a URL is served from, for messages (``AWS_ENDPOINT_URL`` or the option for
    ``s3://``; the scheme's default otherwise)."""
    opts = storage_options(options)
    ep = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    if not ep and _scheme(url) in ("s3", "s3a"):
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return redact(str(ep)) if ep else f"the default {_scheme(url)} endpoint"


_UNREACHABLE = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ProxyConnectionError",
)
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


def _names(e: BaseException) -> set[str]:
    return {k.__name__ for k in type(e).__mro__}


def classify(e: BaseException, url: str, options: dict[str, Any] | None = None) -> StoreError:
    """The one-line :class:`RemoteStoreError` of an exception raised by fsspec / s3fs /
    botocore for ``url`` (credentials masked)."""
    shown = redact(url)
    names = _names(e)
    cause = redact(" ".join(str(e).split()))[:200]
    if names & set(_NO_CREDENTIALS):
        return RemoteStoreError(
            f"no credentials for {shown} (none given, none in the AWS environment variables)",
            store=shown,
            reason="credentials",
        )
    if names & set(_UNREACHABLE) or isinstance(e, (ConnectionError, TimeoutError)):
        ep = endpoint(url, options)
        return RemoteStoreError(
            f"cannot reach the object store of {shown} at {ep}",
            store=shown,
            reason="unreachable",
            endpoint=ep,
        )
    if isinstance(e, PermissionError):
        return RemoteStoreError(
            f"access to {shown} was denied ({cause or 'forbidden'}: a wrong key or secret, or "
            "no permission on the bucket)",
            store=shown,
            reason="denied",
        )
    if isinstance(e, FileNotFoundError) and "bucket" in str(e).lower():
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        return RemoteStoreError(
            f"bucket '{redact(bucket)}' of {shown} does not exist (create it first: ovss "
            "creates stores, not buckets)",
            store=shown,
            reason="no-bucket",
        )
    return RemoteStoreError(f"object store error for {shown}: {cause}", store=shown, reason="io")


@contextmanager
def remote_errors(url: str, options: dict[str, Any] | None = None) -> Iterator[None]:
    """Turn fsspec / s3fs / botocore exceptions inside the block into one-line
    :class:`RemoteStoreError` (library errors pass through)."""
    from featurestore.errors import OvssError

    try:
        yield
    except OvssError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend raises its own types
        raise classify(e, url, options) from None


def read_json(fs, key: str) -> dict | None:
    """The JSON object at ``key`` of ``fs``; ``None`` when there is no such object.

    A missing *bucket* is an error (``FileNotFoundError`` naming the bucket), not a missing
    object."""
    try:
        data = fs.cat_file(key)
    except FileNotFoundError as e:
        if "bucket" in str(e).lower():
            raise
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def probe(url: str, options: dict[str, Any] | None = None) -> tuple[Any, str, dict | None]:
    """``(fs, root, root metadata or None)``: one read of the store's ``zarr.json``; reaching the
    server, the credentials and the bucket are checked by it (one-line errors)."""
    with remote_errors(url, options):
        fs, root = filesystem(url, options)
        return fs, root, read_json(fs, f"{root}/zarr.json")


def has_objects(fs, root: str) -> bool:
    """Whether anything is stored under ``root``."""
    try:
        return bool(fs.ls(root, detail=False))
    except FileNotFoundError:
        return False


def child_names(fs, prefix: str) -> list[str]:
    """Names directly under ``prefix`` (objects and "folders"), sorted; none when absent."""
    try:
        entries = fs.ls(prefix, detail=False, refresh=True)
    except (FileNotFoundError, TypeError):
        try:
            entries = fs.ls(prefix, detail=False)
        except FileNotFoundError:
            return []
    names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
    names.discard(prefix.rstrip("/").rsplit("/", 1)[-1])
    return sorted(names)


def remove_tree(fs, prefix: str, last: str = "zarr.json") -> None:
    """Delete every object under ``prefix``, the object ``prefix/last`` last (so an interrupted
    removal still shows what it was removing)."""
    keep = f"{prefix}/{last}"
    try:
        found = fs.find(prefix)
    except FileNotFoundError:
        found = []
    rest = [p for p in found if p.rstrip("/") != keep]
    if rest:
        fs.rm(rest)
    if keep in found:
        fs.rm_file(keep)
    _invalidate(fs, prefix)


def _invalidate(fs, prefix: str) -> None:
    inv = getattr(fs, "invalidate_cache", None)
    if inv is not None:
        inv(prefix)


def object_size(fs, key: str) -> int | None:
    """Size in bytes of the object ``key``; ``None`` when it does not exist."""
    try:
        return int(fs.size(key))
    except FileNotFoundError:
        return None


def tree_bytes(fs, prefix: str) -> int | None:
    """Total bytes stored under ``prefix`` (``None`` when the backend cannot say)."""
    try:
        return int(fs.du(prefix, total=True))
    except Exception:  # noqa: BLE001 - a size is informative only
        return None


def wait_for(
    check: Callable[[], bool], what: str, url: str, timeout_s: float | None = None
) -> None:
    """Poll ``check`` until it is true: a non-creating shard waiting for shard 0's commit.

    Raises:
        StoreError: still false after ``timeout_s`` (default: ``$OVSS_REMOTE_WAIT_S`` or
            :data:`DEFAULT_WAIT_S`).
    """
    if timeout_s is None:
        try:
            timeout_s = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
        except ValueError:
            raise StoreError(f"{WAIT_ENV} must be a number of seconds") from None
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            raise StoreError(
                f"{what} of {redact(url)} was not committed within {timeout_s:g} s: on object "
                f"storage shard 0 creates it and the other shards wait (is shard 0 running? "
                f"{WAIT_ENV} sets the wait)"
            )
        time.sleep(POLL_S)
