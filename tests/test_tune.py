"""``ovss tune`` (methods.tune): the CLIP reward on crafted cases, the random search, the
resumable trials log, and the best configuration accepted by ``segment --config``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featurestore.errors import OvssError
from methods.tune import (
    ClipReward,
    class_probabilities,
    draw_trials,
    image_reward,
    read_config_file,
)

TINY_CLIP = [
    "embed_dim=32",
    "vision_cfg.layers=1",
    "vision_cfg.width=64",
    "vision_cfg.heads=2",
    "text_cfg.layers=1",
    "text_cfg.width=64",
    "text_cfg.heads=2",
]
TINY_BLIP = {
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
    },
}


class MeanColourClip(torch.nn.Module):
    """A stand-in CLIP whose image embedding is the mean RGB of the input."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def preprocess_image(self, image: np.ndarray, geometry) -> torch.Tensor:
        return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)

    def forward_image(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"global_image": x.mean(dim=(2, 3)) + 1e-3}


def test_probabilities_and_reward_on_crafted_embeddings() -> None:
    text = torch.eye(2)
    masked = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # both masks look like class 0
    black = class_probabilities(torch.tensor([[1.0, 1.0]]), text)[0]
    torch.testing.assert_close(black, torch.tensor([0.5, 0.5]))
    probs = class_probabilities(masked, text)
    assert probs[0, 0] > 0.99 and probs[1, 1] < 0.01
    assert image_reward(probs, black) == 1


def test_reward_counts_classes_whose_mask_looks_like_them() -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = (255, 0, 0)
    img[:, 4:] = (0, 0, 255)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # vocabulary: red, blue
    reward = ClipReward(MeanColourClip(), text)
    right = np.zeros((8, 8), np.int64)
    right[:, :4], right[:, 4:] = 1, 2  # local labels: 1 -> classes[0] (red), 2 -> blue
    assert reward.reward(img, right, [0, 1]) == 2
    assert reward.reward(img, 3 - right, [0, 1]) == 0  # swapped masks
    assert reward.reward(img, np.zeros((8, 8), np.int64), [0, 1]) == 0  # empty masks = black
    assert reward.reward(img, right, []) == 0


def test_trials_are_distinct_grid_points_in_seeded_order() -> None:
    a = draw_trials(10, np.random.default_rng(0), (1, 2), (1, 2), (0.15, 0.25), (0.05,))
    b = draw_trials(10, np.random.default_rng(0), (1, 2), (1, 2), (0.15, 0.25), (0.05,))
    assert a == b and len(a) == 8
    assert len({json.dumps(t, sort_keys=True) for t in a}) == 8


def test_config_file_forms(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"settings": {"layer": 3}, "reward": 4}))
    (tmp_path / "b.json").write_text(json.dumps({"head": 2}))
    (tmp_path / "c.json").write_text("[1, 2]")
    assert read_config_file(tmp_path / "a.json") == {"layer": 3}
    assert read_config_file(tmp_path / "b.json") == {"head": 2}
    with pytest.raises(OvssError, match="JSON object"):
        read_config_file(tmp_path / "c.json")
    with pytest.raises(OvssError, match="no config file"):
        read_config_file(tmp_path / "none.json")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from PIL import Image

    from featurestore.extract import ExtractConfig, extract
    from featurestore.images import list_folder_images
    from featurestore.protocol import Protocol

    root = tmp_path_factory.mktemp("tune")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            root / "img" / f"im{i}.png"
        )
    extract(
        list_folder_images(root / "img"),
        ExtractConfig(
            models=["blip-itm-l"],
            protocol=Protocol(resize="square", size=64),
            store=str(root / "s.zarr"),
            random_init=True,
            arch_overrides=TINY_BLIP,
            device="cpu",
        ),
    )
    return root


def _tune_args(root: Path, *extra: str) -> list[str]:
    args = [
        "tune",
        "--store",
        str(root / "s.zarr"),
        "--classes",
        "background,cat,sky",
        "--set",
        "size=64",
        "--set",
        "crf=torch",
        "--set",
        "crf_max_side=32",
        "--set",
        "rounds=2",
        "--random-init",
        "--clip-model",
        "clip-b16",
        "--trials",
        "3",
        "--sample",
        "2",
        "--thresholds",
        "0.15,0.35",
        "--device",
        "cpu",
        "-q",
    ]
    for o in TINY_CLIP:
        args += ["--clip-arch-override", o]
    return args + list(extra)


def test_tune_cli_resumes_its_log_and_writes_a_config_segment_accepts(store: Path) -> None:
    from click.testing import CliRunner

    from ovss_cli.main import cli

    log, best = store / "trials.jsonl", store / "best.json"
    runner = CliRunner()
    res = runner.invoke(cli, _tune_args(store, "--log", str(log), "--out", str(best), "--json"))
    assert res.exit_code == 0, res.output
    first = json.loads(res.output)
    assert len(first["trials"]) == 3 and not any(t["resumed"] for t in first["trials"])
    assert len(log.read_text().splitlines()) == 3
    assert all(t["max_reward"] == 4 for t in first["trials"])  # 2 images x 2 classes
    assert all(0 <= t["reward"] <= 4 for t in first["trials"])
    assert {t["params"]["layer"] for t in first["trials"]} <= {1, 2}  # the model has 2 layers
    saved = json.loads(best.read_text())
    assert saved["settings"]["layer"] == first["best"]["params"]["layer"]
    assert saved["settings"]["size"] == "64"  # the fixed options are kept

    again = runner.invoke(cli, _tune_args(store, "--log", str(log), "--json"))
    assert again.exit_code == 0, again.output
    second = json.loads(again.output)
    assert all(t["resumed"] for t in second["trials"])
    assert [t["reward"] for t in second["trials"]] == [t["reward"] for t in first["trials"]]

    table = runner.invoke(cli, _tune_args(store, "--log", str(log)))
    assert table.exit_code == 0 and "best" in table.output and "reward" in table.output

    other = runner.invoke(cli, _tune_args(store, "--log", str(log), "--sample", "1"))
    assert other.exit_code == 1 and "other images" in other.output

    seg = runner.invoke(
        cli,
        [
            "segment",
            "--store",
            str(store / "s.zarr"),
            "--method",
            "pnp-ovss",
            "--classes",
            "background,cat,sky",
            "--config",
            str(best),
            "--random-init",
            "--out",
            str(store / "seg"),
            "--json",
            "-q",
        ]
        + [x for o in TINY_CLIP for x in ("--text-arch-override", o)],
    )
    assert seg.exit_code == 0, seg.output
    out = json.loads(seg.output)
    assert out["config"]["layer"] == saved["settings"]["layer"]
    assert out["config"]["threshold"] == saved["settings"]["threshold"]


def test_tune_refuses_a_method_without_reward(store: Path) -> None:
    from methods.tune import TuneRequest, tune

    with pytest.raises(OvssError, match="defines no label-free reward"):
        tune(TuneRequest(store=str(store / "s.zarr"), vocab_spec="list:cat", method="maskclip"))
