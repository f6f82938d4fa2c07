"""methods.config: options derived from config dataclasses (types, defaults, docstring help)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from methods.config import (
    ConfigError,
    build_config,
    coerce_value,
    config_fields,
    config_to_dict,
    parse_attribute_docs,
    parse_settings,
)


@dataclass
class ToyConfig:
    """A toy.

    Attributes:
        size: shorter side in pixels.
        beta, gamma: two factors documented at once,
            with a continuation line.
        name_a, name_b,
            name_c: a field list wrapped over two lines.
        flag: a switch.
        thd: optional threshold.
        mode: one of a few.

    Notes:
        not an attribute: ignored.
    """

    size: int = 448
    beta: float = 1.2
    gamma: float = 3.0
    name_a: str = "a"
    name_b: str = "b"
    name_c: str = "c"
    flag: bool = False
    thd: float | None = None
    mode: str = field(default="x", metadata={"choices": ("x", "y")})


def test_docstring_help_per_field():
    docs = parse_attribute_docs(ToyConfig.__doc__)
    assert docs["size"] == "shorter side in pixels."
    assert (
        docs["beta"] == docs["gamma"] == "two factors documented at once, with a continuation line."
    )
    assert docs["name_a"] == docs["name_c"] == "a field list wrapped over two lines."
    assert "not" not in docs


def test_fields_carry_type_default_help_choices():
    rows = {f.name: f for f in config_fields(ToyConfig)}
    assert rows["size"].type is int and rows["size"].default == 448
    assert rows["thd"].type is float and rows["thd"].optional
    assert rows["flag"].type is bool and rows["flag"].help == "a switch."
    assert rows["mode"].choices == ("x", "y")


@pytest.mark.parametrize(
    "key,text,expected",
    [
        ("size", "512", 512),
        ("beta", "2", 2.0),
        ("flag", "on", True),
        ("flag", "false", False),
        ("thd", "null", None),
        ("thd", "0.5", 0.5),
        ("mode", "y", "y"),
    ],
)
def test_coercion(key, text, expected):
    info = {f.name: f for f in config_fields(ToyConfig)}[key]
    assert coerce_value(info, text) == expected


@pytest.mark.parametrize(
    "key,text,words",
    [
        ("size", "abc", "an integer"),
        ("size", "1.5", "an integer"),
        ("beta", "x", "a number"),
        ("flag", "maybe", "boolean"),
        ("mode", "z", "one of x, y"),
        ("size", "null", "int"),
    ],
)
def test_bad_values_name_the_field_and_type(key, text, words):
    with pytest.raises(ConfigError) as e:
        build_config(ToyConfig, None, {key: text}, owner="method toy")
    msg = str(e.value)
    assert key in msg and words in msg and "\n" not in msg
    assert e.value.key == key


def test_unknown_key_lists_options_and_preset_order():
    with pytest.raises(ConfigError, match="has no option nope; options: size"):
        build_config(ToyConfig, None, {"nope": 1})
    cfg = build_config(ToyConfig, {"size": 336, "beta": 2.0}, {"size": "500", "gamma": None})
    assert (cfg.size, cfg.beta, cfg.gamma) == (500, 2.0, 3.0)
    assert config_to_dict(cfg)["size"] == 500


def test_parse_settings():
    assert parse_settings(["cos-fac=3", "x = y=z"]) == {"cos_fac": "3", "x": "y=z"}
    with pytest.raises(ConfigError):
        parse_settings(["novalue"])
