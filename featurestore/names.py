"""Names a user gives that become keys and folders inside a store, and redaction of credentials.

**Names.** A label-set name (``segment --write-labels NAME``, ``cluster --name``), a mask-set
name, a feature-set key (``<model>@<protocol>``) or a key given to a store command is one folder
under the store's ``labels/`` or ``features/``. :func:`check_name` is the one rule for all of
them: a non-empty string of at most :data:`MAX_NAME_BYTES` UTF-8 bytes, with no ``/`` or ``\\``
(no nesting, no absolute path, no Windows drive path), not ``.`` or ``..`` and not starting
with ``.`` (hidden names are the store's own transaction folders), no control or invisible
formatting character (newlines, tabs, NUL, bidirectional overrides), and no leading or trailing
whitespace. So a name can never resolve outside the store, nor name a nested group.

**Credentials.** :func:`redact` removes credential-like values from text the tool records or
prints: the user-info part of URLs (``s3://KEY:SECRET@host/...`` -> ``s3://***@host/...``),
and the values of query parameters and ``KEY=VALUE`` words whose name says secret, token,
password, signature or access key (``X-Amz-Signature=...``, ``AWS_SECRET_ACCESS_KEY=...``).
:func:`redact_url` does the same for one store path or URL.
"""

from __future__ import annotations

import re
import unicodedata

from featurestore.errors import OvssError

__all__ = [
    "MAX_NAME_BYTES",
    "InvalidNameError",
    "check_name",
    "is_valid_name",
    "redact",
    "redact_url",
    "register_secret",
]

MAX_NAME_BYTES = 200
"""Longest name accepted, in UTF-8 bytes (file systems allow 255 per path component)."""


class InvalidNameError(OvssError):
    """A user-given name that cannot be a store key.

    Attributes:
        name: the name as given.
        what: what it names ("label set", "feature set", ...).
        reason: why it is refused, in words.
    """

    def __init__(self, name: str, what: str, reason: str):
        super().__init__(f"invalid {what} name {name!r}: {reason}")
        self.name = name
        self.what = what
        self.reason = reason


def _reason(name: object) -> str | None:
    """Why ``name`` is not a valid store name, or None when it is."""
    if not isinstance(name, str):
        return f"a name is text, not {type(name).__name__}"
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return "'.' and '..' name folders outside the set"
    if "/" in name or "\\" in name:
        return "it holds a path separator ('/' or '\\'): a name is one word, never a path"
    if name.startswith("."):
        return "it starts with '.' (hidden names are the store's own)"
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            return f"it holds the control character U+{ord(ch):04X}"
    if name != name.strip():
        return "it starts or ends with whitespace"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    return None


def check_name(name: str, what: str = "set") -> str:
    """``name`` when it can be a store key (see the module docstring), else an error.

    Args:
        name: the user-given name.
        what: what it names, for the message ("label set", "feature set", ...).

    Raises:
        InvalidNameError: the name is refused (one line saying why).
    """
    reason = _reason(name)
    if reason is not None:
        raise InvalidNameError(str(name), what, reason)
    return name


def is_valid_name(name: object) -> bool:
    """True when :func:`check_name` accepts ``name``."""
    return _reason(name) is None


# -- credentials ----------------------------------------------------------------------------------

_SECRET_WORDS = r"secret|token|passw(?:or)?d|pwd|signature|credential|session|api[_-]?key"
_SECRET_WORDS += r"|access[_-]?key(?:[_-]?id)?|private[_-]?key|auth"
# scheme://user[:password]@host  -> scheme://***@host
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^/\s@]+)@")
# the same user:secret@ pair where a library quotes the URL without its scheme
_BARE_USERINFO = re.compile(r"(?P<scheme>(?:^|(?<=[\s\"'(=]))[^\s/@:\"'(=]+:)[^\s/@\"']+@")
# name=value (query strings, environment-style words), name carrying a secret word
_KEY_VALUE = re.compile(
    rf"(?P<key>[A-Za-z0-9_.\-]*(?:{_SECRET_WORDS})[A-Za-z0-9_.\-]*)(?P<sep>\s*[=:]\s*)"
    r"(?P<value>[^\s&;,'\"]+)",
    re.IGNORECASE,
)
MASK = "***"
#: Secret values known to the process (storage options, AWS variables): masked wherever seen.
_KNOWN_SECRETS: set[str] = set()


def register_secret(value: str) -> None:
    """Mask ``value`` (a key, secret or token the process was given) in every redacted line;
    values shorter than 4 characters are ignored (they would mask ordinary text)."""
    if isinstance(value, str) and len(value) >= 4:
        _KNOWN_SECRETS.add(value)


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``***``: URL user-info (``user:pass@``) and the
    values of ``KEY=VALUE`` / ``KEY: VALUE`` pairs whose key names a secret, token, password,
    signature or access key, and every value given to :func:`register_secret`. Everything
    else is kept as is."""
    if not text:
        return text
    out = str(text)
    for secret in sorted(_KNOWN_SECRETS, key=len, reverse=True):
        out = out.replace(secret, MASK)
    out = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", out)
    out = _BARE_USERINFO.sub(lambda m: f"{MASK}@", out)
    return _KEY_VALUE.sub(lambda m: f"{m.group('key')}{m.group('sep')}{MASK}", out)


def redact_url(url: str) -> str:
    """A store path or URL safe to record or print (``s3://key:secret@bucket/x`` ->
    ``s3://***@bucket/x``; query credentials masked); a plain path is returned unchanged."""
    return redact(str(url))
