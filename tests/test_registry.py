"""The registries drive everything: every component plans on every benchmark, and a method
defined in one module appears in ``extract --for``, ``segment --method`` and ``ovss methods``."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import methods  # noqa: F401 - registers every method and trainer
from featurestore.datasets import list_datasets
from featurestore.errors import OvssError
from methods import base
from methods.plan import component_config, feature_groups, get_component, list_components, plan_for
from ovss_cli.main import cli

BENCHMARKS = [d for d in list_datasets() if d != "custom"]


@pytest.mark.parametrize("name", list_components())
@pytest.mark.parametrize("dataset", BENCHMARKS)
def test_every_component_plans_on_every_benchmark(name: str, dataset: str) -> None:
    cls = get_component(name)
    config = component_config(cls, dataset)
    for key, value in cls.presets(dataset).items():  # the preset reached the config
        assert getattr(config, key) == value, key
    try:
        recipe = plan_for(name, dataset)
    except OvssError as e:  # a component that needs a trained artefact says which option
        assert "checkpoint" in str(e), e
        return
    assert recipe.steps or recipe.live
    assert recipe.vocab is not None and recipe.vocab.startswith(f"dataset:{dataset}/")
    assert recipe.groups() == feature_groups(cls, config)  # one rule for extract and segment
    for s in recipe.steps:
        assert "@" in s.feature_set and s.protocol.key() in s.feature_set


TOY = '''
    """A toy method: everything about it lives in this one module."""

    from dataclasses import dataclass

    from featurestore.protocol import Protocol
    from methods.base import FeatureRequirement, Segmenter, VocabularyDefaults, register_method


    @dataclass
    class ToyConfig:
        """Options of ``toy-recipe``.

        Attributes:
            vfm_model: the VFM read.
            size: shorter side S.
        """

        vfm_model: str = "dinov2-s14"
        size: int = 224


    @register_method
    class ToySegmenter(Segmenter):
        name = "toy-recipe"
        Config = ToyConfig
        doc = "toy: one DINOv2 set, its own preset"

        @classmethod
        def requirements(cls, config):
            p = Protocol("short", config.size)
            return [FeatureRequirement("vfm", config.vfm_model, p, ("patch",), "vfm_model")]

        @classmethod
        def presets(cls, dataset):
            return {"size": 336} if dataset == "voc20" else {}

        @classmethod
        def vocabulary_defaults(cls, config):
            return VocabularyDefaults(text_model="clip-b16", templates="clip7", family="sclip")
'''


@pytest.fixture()
def toy_method(tmp_path: Path):
    path = tmp_path / "toy_recipe_method.py"
    path.write_text(textwrap.dedent(TOY))
    spec = importlib.util.spec_from_file_location("toy_recipe_method", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_recipe_method"] = module
    spec.loader.exec_module(module)
    yield "toy-recipe"
    base._METHODS.pop("toy-recipe", None)
    sys.modules.pop("toy_recipe_method", None)


def test_a_method_in_one_module_reaches_every_command(toy_method: str) -> None:
    assert toy_method in list_components()
    r = CliRunner().invoke(
        cli,
        ["extract", "--for", toy_method, "--dataset", "voc20", "-s", "x", "--dry-run", "--json",
         "-m", "dinov2-b14"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    recipe = json.loads(r.output)["recipe"]
    assert [s["feature_set"] for s in recipe["steps"]] == ["dinov2-b14@short336"]
    assert recipe["vocab"] == "dataset:voc20/sclip" and recipe["templates"] == "clip7"
    r = CliRunner().invoke(
        cli, ["extract", "--for", toy_method, "--set", "size=abc", "-s", "x", "--dry-run"]
    )
    assert r.exit_code == 1 and "size expects an integer" in r.output
    # segment --method takes it (free text checked against the registry): the call gets as
    # far as the missing store
    r = CliRunner().invoke(
        cli,
        [
            "segment",
            "--method",
            toy_method,
            "--store",
            "no-such.zarr",
            "--classes",
            "a,b",
            "--out",
            "o",
        ],
    )
    assert r.exit_code != 0 and "not a known method" not in r.output, r.output
    r = CliRunner().invoke(
        cli,
        [
            "segment",
            "--method",
            "no-such-toy",
            "--store",
            "no-such.zarr",
            "--classes",
            "a,b",
            "--out",
            "o",
        ],
    )
    assert r.exit_code != 0 and "not a known method" in r.output, r.output
    r = CliRunner().invoke(cli, ["methods", "--json"])
    assert r.exit_code == 0, r.output
    assert toy_method in r.output


def test_the_toy_is_gone_after_the_test() -> None:
    """Registering in a test leaves the registries as they were (the fixture cleans up)."""
    assert "toy-recipe" not in list_components()
