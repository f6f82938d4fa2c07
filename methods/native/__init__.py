"""Small C kernels for the CPU hot paths, compiled on first use with the system C compiler.

The sources ship with the package (``methods/native/*.c``). The first call of ``library(name)``
in a process compiles ``name.c`` into a shared object under the cache directory (once per
source, compiler, flags and CPU; later processes load the cached file) and loads it with
``ctypes``. ``library`` returns ``None`` when there is no compiler, the build fails or
``OVSS_NATIVE=0`` is set: every caller has a pure-torch path that computes the same result,
so a missing compiler costs speed, never correctness. ``status(name)`` says which it is.

Environment:
- ``OVSS_NATIVE=0`` turns the kernels off (the torch paths run).
- ``OVSS_NATIVE_DIR``: where compiled kernels are kept (default ``$XDG_CACHE_HOME/ovss/native``,
  i.e. ``~/.cache/ovss/native``; a per-user temporary folder when that is not writable).
- ``CC``: the compiler (default ``cc``, else ``gcc``, else ``clang``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["library", "status"]

SOURCE_DIR = Path(__file__).resolve().parent
#: Compiler flags [ours]: -march=native is safe because the cache key includes the CPU's
#: feature flags; -ffp-contract=off keeps every fused multiply-add explicit in the source, and
#: no flag lets the compiler change a value (no -ffast-math).
CFLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-shared",
    "-fPIC",
)

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_why: dict[str, str] = {}


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_signature() -> str:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), else the platform's processor name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _cache_dirs() -> list[Path]:
    explicit = os.environ.get("OVSS_NATIVE_DIR")
    if explicit:
        return [Path(explicit)]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return [Path(base) / "ovss" / "native", Path(tempfile.gettempdir()) / f"ovss-native-{uid}"]


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(name: str) -> ctypes.CDLL | None:
    if os.environ.get("OVSS_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _why[name] = "off (OVSS_NATIVE=0)"
        return None
    source = SOURCE_DIR / f"{name}.c"
    cc = _compiler()
    if cc is None:
        _why[name] = "no C compiler found (set CC)"
        return None
    text = source.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [
                text,
                " ".join(CFLAGS).encode(),
                cc.encode(),
                _compiler_version(cc).encode(),
                _cpu_signature().encode(),
                platform.platform().encode(),
            ]
        )
    ).hexdigest()[:20]
    errors = []
    for folder in _cache_dirs():
        target = folder / f"{name}-{key}.so"
        if not target.exists():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=folder)
                os.close(fd)
                res = subprocess.run(
                    [cc, *CFLAGS, "-o", tmp, str(source), "-lm"],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                if res.returncode != 0:
                    os.unlink(tmp)
                    last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
                    _why[name] = f"the build failed: {last}"
                    return None
                os.replace(tmp, target)  # atomic: a concurrent process sees all or nothing
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{folder}: {exc}")
                continue
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as exc:
            errors.append(f"{target}: {exc}")
            continue
        _why[name] = f"compiled ({target.name})"
        return lib
    _why[name] = "no writable cache folder: " + "; ".join(errors)
    return None


def library(name: str) -> ctypes.CDLL | None:
    """The loaded kernel library ``name`` (``methods/native/<name>.c``), or ``None`` when it
    cannot be built here (see ``status``). Thread-safe; built at most once per process."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build(name)
        return _loaded[name]


def status(name: str) -> str:
    """How ``library(name)`` came out: ``compiled (...)``, ``off (...)`` or why it failed."""
    library(name)
    return _why.get(name, "not built")
