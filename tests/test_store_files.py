"""ChunkFiles: the bounded, thread- and fork-safe cache of open chunk files."""

from __future__ import annotations

import os

import pytest

from featurestore.store_files import ChunkFiles


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _files(tmp_path, n):
    paths = []
    for k in range(n):
        p = tmp_path / f"c{k}"
        p.write_bytes(bytes([k]) * 16)
        paths.append(str(p))
    return paths


def test_lru_bound_reuse_and_missing_files(tmp_path):
    a, b, c = _files(tmp_path, 3)
    files = ChunkFiles(capacity=2)
    da = files.acquire(a)
    files.release(da)
    again = files.acquire(a)
    assert again is da and len(files) == 1  # kept open, not reopened
    files.release(again)
    db = files.acquire(b)
    files.release(db)
    files.acquire(a)  # a is now the most recently used
    files.release(da)
    dc = files.acquire(c)  # evicts b, the least recently used
    files.release(dc)
    assert len(files) == 2 and not _is_open(db.fd) and _is_open(da.fd) and _is_open(dc.fd)
    assert os.pread(dc.fd, 4, 0) == bytes([2]) * 4
    assert files.acquire(str(tmp_path / "nope")) is None and len(files) == 2
    files.close()
    assert len(files) == 0 and not _is_open(da.fd) and not _is_open(dc.fd)
    with pytest.raises(ValueError, match="at least 1"):
        ChunkFiles(capacity=0)


def test_a_descriptor_in_use_is_closed_by_its_last_user(tmp_path):
    a, b = _files(tmp_path, 2)
    files = ChunkFiles(capacity=1)
    d1 = files.acquire(a)
    d2 = files.acquire(a)
    files.acquire(b)  # evicts a while two reads still use it
    assert _is_open(d1.fd) and os.pread(d1.fd, 1, 0) == b"\x00"
    files.release(d1)
    assert _is_open(d2.fd)
    files.release(d2)
    assert not _is_open(d2.fd)


def test_drop_reopens_a_replaced_file(tmp_path):
    (a,) = _files(tmp_path, 1)
    files = ChunkFiles()
    d = files.acquire(a)
    files.release(d)
    tmp = tmp_path / "new"
    tmp.write_bytes(b"\x07" * 16)
    os.replace(tmp, a)  # an atomic rewrite: the kept descriptor still reads the old file
    assert os.pread(d.fd, 1, 0) == b"\x00"
    files.drop(a)
    assert not _is_open(d.fd)
    d2 = files.acquire(a)
    assert os.pread(d2.fd, 1, 0) == b"\x07"
    files.release(d2)


def test_a_forked_child_starts_empty_with_the_inherited_descriptors_closed(tmp_path):
    (a,) = _files(tmp_path, 1)
    files = ChunkFiles()
    d = files.acquire(a)
    files.release(d)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        ok = len(files) == 0 and not _is_open(d.fd)
        d2 = files.acquire(a)
        ok = ok and d2 is not None and os.pread(d2.fd, 1, 0) == b"\x00"
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(files) == 1 and _is_open(d.fd)  # the parent's are untouched
    files.close()
