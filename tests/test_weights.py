"""Weight resolution order, checkpoint hashing and state-dict reading (offline, tiny files)."""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from featurestore import weights
from featurestore.errors import OvssError, WeightsNotFoundError
from featurestore.weights import WeightsSpec, load_state_dict, resolve_weights, sha256_file

SPEC = WeightsSpec(
    candidates=["tiny_pretrain.pth", "timm/tiny.lvd/model.safetensors"],
    hub_id="timm/tiny.lvd",
    torch_hub_file="tiny_pretrain.pth",
    url_hint="https://example.org/tiny_pretrain.pth",
    model="tiny-s14",
)


@pytest.fixture(autouse=True)
def downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Offline, no $OVSS_WEIGHTS, empty huggingface_hub and torch.hub caches.

    Returns the list of attempted hub downloads (each one also fails).
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OVSS_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))

    attempts: list[str] = []

    def no_download(repo_id: str, filename: str, **kwargs: object) -> str:
        attempts.append(f"{repo_id}/{filename}")
        raise OSError("no network in tests")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    return attempts


def write(path: Path, data: bytes = b"weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- sha256_file ----------------------------------------------------------------------------------


def test_sha256_matches_hashlib_and_follows_changes(tmp_path: Path) -> None:
    path = write(tmp_path / "a.bin", b"x" * 3_000_000)
    assert sha256_file(path) == "sha256:" + hashlib.sha256(b"x" * 3_000_000).hexdigest()
    hits = weights._sha256_cached.cache_info().hits
    assert sha256_file(str(path)) == sha256_file(path)
    assert weights._sha256_cached.cache_info().hits == hits + 2  # not read again
    write(path, b"other bytes")
    assert sha256_file(path) == "sha256:" + hashlib.sha256(b"other bytes").hexdigest()


def test_sha256_notices_same_size_rewrite(tmp_path: Path) -> None:
    path = write(tmp_path / "a.bin", b"aaaa")
    first = sha256_file(path)
    write(path, b"bbbb")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert sha256_file(path) != first


# --- load_state_dict ------------------------------------------------------------------------------


def test_safetensors_and_pth_read_alike(tmp_path: Path) -> None:
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.save(state, tmp_path / "m.pth")
    torch.save(state, tmp_path / "pytorch_model.bin")
    for name in ("m.safetensors", "m.pth", "pytorch_model.bin"):
        got = load_state_dict(tmp_path / name)
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in state)


def test_wrappers_and_prefixes_are_removed(tmp_path: Path) -> None:
    tensor = torch.randn(3)
    torch.save({"model": {"module.backbone.blocks.0.w": tensor}, "epoch": 3}, tmp_path / "a.pth")
    assert list(load_state_dict(tmp_path / "a.pth")) == ["blocks.0.w"]
    # DINO training checkpoints: the teacher is wanted, not the student; scalars are dropped.
    ckpt = {
        "student": {"module.backbone.cls_token": torch.zeros(1)},
        "teacher": {"backbone.cls_token": tensor, "head.mlp.0.weight": torch.ones(1)},
        "epoch": 100,
    }
    torch.save(ckpt, tmp_path / "b.pth")
    got = load_state_dict(tmp_path / "b.pth")
    assert set(got) == {"cls_token", "head.mlp.0.weight"}
    assert torch.equal(got["cls_token"], tensor)
    torch.save({"state_dict": {"x": tensor, "step": 5}}, tmp_path / "c.pth")
    assert list(load_state_dict(tmp_path / "c.pth")) == ["x"]


def test_unsafe_or_broken_files_are_refused(tmp_path: Path) -> None:
    # Pickled objects other than tensors would run code on load: weights_only refuses them.
    torch.save({"args": argparse.Namespace(lr=1.0), "w": torch.ones(1)}, tmp_path / "pickle.pth")
    with pytest.raises(OvssError, match="cannot read weights"):
        load_state_dict(tmp_path / "pickle.pth")
    with pytest.raises(OvssError, match="cannot read weights"):
        load_state_dict(write(tmp_path / "junk.safetensors", b"not safetensors"))
    torch.save({"epoch": 1}, tmp_path / "empty.pth")
    with pytest.raises(OvssError, match="holds no tensors"):
        load_state_dict(tmp_path / "empty.pth")


# --- resolve_weights ------------------------------------------------------------------------------


def test_explicit_path_wins_and_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = write(tmp_path / "mine.pth")
    monkeypatch.setenv("OVSS_WEIGHTS", str(tmp_path / "dir"))
    write(tmp_path / "dir" / "tiny_pretrain.pth")
    assert resolve_weights(SPEC, explicit=str(explicit)) == explicit
    with pytest.raises(WeightsNotFoundError, match="nope.pth does not exist"):
        resolve_weights(SPEC, explicit=tmp_path / "nope.pth")


def test_weights_dir_candidates_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVSS_WEIGHTS", str(tmp_path))
    second = write(tmp_path / "timm" / "tiny.lvd" / "model.safetensors")
    assert resolve_weights(SPEC) == second
    first = write(tmp_path / "tiny_pretrain.pth")
    assert resolve_weights(SPEC) == first


def test_weights_dir_must_be_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVSS_WEIGHTS", str(tmp_path / "missing"))
    with pytest.raises(WeightsNotFoundError, match="is not a directory"):
        resolve_weights(SPEC)


def test_huggingface_cache_is_searched(tmp_path: Path) -> None:
    repo = tmp_path / "hf_cache" / "models--timm--tiny.lvd"
    write(repo / "refs" / "main", b"abc123")
    cached = write(repo / "snapshots" / "abc123" / "model.safetensors")
    assert resolve_weights(SPEC) == cached


def test_torch_hub_cache_is_searched(tmp_path: Path) -> None:
    cached = write(tmp_path / "torch_home" / "hub" / "checkpoints" / "tiny_pretrain.pth")
    assert Path(torch.hub.get_dir()) == tmp_path / "torch_home" / "hub"
    assert resolve_weights(SPEC) == cached


def test_weights_dir_comes_before_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "torch_home" / "hub" / "checkpoints" / "tiny_pretrain.pth")
    monkeypatch.setenv("OVSS_WEIGHTS", str(tmp_path / "dir"))
    mine = write(tmp_path / "dir" / "tiny_pretrain.pth")
    assert resolve_weights(SPEC) == mine


def test_offline_and_missing_gives_one_line_instruction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, downloads: list[str]
) -> None:
    monkeypatch.setattr(weights, "_hub_reachable", lambda *a: pytest.fail("network probed"))
    monkeypatch.setenv("OVSS_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights(SPEC)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("no weights for tiny-s14")
    for part in (
        "save tiny_pretrain.pth (from https://example.org/tiny_pretrain.pth)",
        "as $OVSS_WEIGHTS/tiny_pretrain.pth",
        f"OVSS_WEIGHTS={tmp_path}",
        "timm/tiny.lvd/model.safetensors there also work",
        "--weights PATH",
        "--random-init",
    ):
        assert part in message
    assert downloads == []


def test_online_download_is_used_and_its_failure_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(weights, "_hub_reachable", lambda *a: True)
    fetched = write(tmp_path / "downloaded" / "model.safetensors")
    calls: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append((repo_id, filename))
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_weights(SPEC) == fetched
    assert calls == [("timm/tiny.lvd", "model.safetensors")]

    def failing_download(repo_id: str, filename: str, **kwargs: object) -> str:
        raise OSError("connection reset")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    with pytest.raises(WeightsNotFoundError, match="tiny_pretrain.pth"):
        resolve_weights(SPEC)


def test_unreachable_hub_means_offline(
    monkeypatch: pytest.MonkeyPatch, downloads: list[str]
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(weights, "_hub_reachable", lambda *a: False)
    with pytest.raises(WeightsNotFoundError):
        resolve_weights(SPEC)
    assert downloads == []
