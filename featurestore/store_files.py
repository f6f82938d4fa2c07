"""Open read-only descriptors of a feature set's chunk files, kept between per-image reads.

``FeatureSet.read`` reads one image's exact byte range of a chunk file with ``os.preadv``;
opening and closing the file around every read costs about as much as the rest of the Python
work of a read. :class:`ChunkFiles` keeps the descriptors of recently read chunk files open:

* bounded: at most ``capacity`` descriptors, the least recently used one closed first;
* thread-safe: a descriptor in use by a read is closed only when that read is done (an evicted
  or dropped descriptor is closed by its last user), so no read ever sees a closed or reused
  descriptor number;
* fork-safe: a forked child (a ``multiprocessing`` worker) closes the descriptors it inherited
  and starts empty, with a fresh lock;
* positional reads only (``os.preadv``), so descriptors never share a file offset.

The caller keeps only files that do not change (the chunks of committed blocks) and calls
:meth:`ChunkFiles.drop` when a read comes back short, so a file changed on disk is opened anew.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict

#: Descriptors kept open per feature set [ours]: a few times the blocks a method revisits.
DEFAULT_CAPACITY = 64

_LIVE: weakref.WeakSet[ChunkFiles] = weakref.WeakSet()


class Descriptor:
    """One open chunk file: ``fd`` is valid until the :meth:`ChunkFiles.release` that ends
    this use."""

    __slots__ = ("fd", "users", "cached")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.cached = True


class ChunkFiles:
    """An LRU cache ``path -> read-only descriptor`` with per-descriptor use counts."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._open: OrderedDict[str, Descriptor] = OrderedDict()
        self._retired: set[Descriptor] = set()  # out of the cache, still in use
        _LIVE.add(self)

    def __len__(self) -> int:
        return len(self._open)

    def acquire(self, path: str) -> Descriptor | None:
        """An open descriptor of ``path`` (opened if needed), or ``None`` when the file does
        not exist (not cached). Every descriptor acquired must be given back with
        :meth:`release`."""
        with self._lock:
            d = self._open.get(path)
            if d is None:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except FileNotFoundError:
                    return None
                d = self._open[path] = Descriptor(fd)
                while len(self._open) > self.capacity:
                    self._retire(self._open.popitem(last=False)[1])
            else:
                self._open.move_to_end(path)
            d.users += 1
            return d

    def release(self, d: Descriptor) -> None:
        """End one use of ``d``; a descriptor already out of the cache is closed by its last
        user."""
        with self._lock:
            d.users -= 1
            if not d.cached and not d.users:
                self._retired.discard(d)
                os.close(d.fd)

    def drop(self, path: str) -> None:
        """Forget ``path`` (its file changed or went away): the next acquire opens it anew."""
        with self._lock:
            d = self._open.pop(path, None)
            if d is not None:
                self._retire(d)

    def close(self) -> None:
        """Close every cached descriptor (one in use is closed when released)."""
        with self._lock:
            while self._open:
                self._retire(self._open.popitem()[1])

    def _retire(self, d: Descriptor) -> None:
        d.cached = False
        if d.users:
            self._retired.add(d)
        else:
            os.close(d.fd)

    def _after_fork_in_child(self) -> None:
        # The parent's lock may have been held by another thread; its reads in flight do not
        # exist here, so every inherited descriptor is closed.
        self._lock = threading.Lock()
        for d in [*self._open.values(), *self._retired]:
            d.cached = False
            try:
                os.close(d.fd)
            except OSError:
                pass
        self._open.clear()
        self._retired.clear()

    def __del__(self) -> None:
        try:
            for d in self._open.values():
                os.close(d.fd)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _reset_after_fork() -> None:
    for cache in list(_LIVE):
        cache._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
