"""Typed configs: one place for each option's type, default and help.

Every method and trainer has a ``Config`` dataclass. Its fields are the options: the field's
annotation is the type, its default the default, and its entry in the class docstring's
``Attributes:`` section the help (Google style; ``a, b: text`` documents several fields at
once). Everything a user can set is derived from that:

- ``config_fields(Config)`` lists :class:`FieldInfo` rows (name, type, default, help, choices);
  the CLI turns them into ``--option`` flags and ``ovss methods`` prints them.
- ``build_config(Config, preset, overrides)`` applies a preset and user values, coercing
  strings (``--set key=value``) to the field's type; a bad value is a :class:`ConfigError`
  that names the field, the value and the expected type.

Choices: a field may declare them with ``field(metadata={"choices": (...)})``; they are checked
on coercion and listed in the help.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from featurestore.errors import OvssError
from featurestore.protocol import Protocol


class ConfigError(OvssError):
    """A config value is unknown or of the wrong type.

    Attributes:
        owner: the method or trainer whose config it is.
        key: the field name (None for a general error).
        value: the value given.
        expected: the expected type or choices, in words.
    """

    def __init__(
        self,
        message: str,
        owner: str = "",
        key: str | None = None,
        value: Any = None,
        expected: str = "",
    ):
        super().__init__(message)
        self.owner = owner
        self.key = key
        self.value = value
        self.expected = expected


@dataclass(frozen=True)
class FieldInfo:
    """One option of a config.

    Attributes:
        name: field name (``cos_fac``); the CLI flag is ``--cos-fac``.
        type: the base type: ``int``, ``float``, ``bool`` or ``str``.
        optional: whether ``None`` is allowed (``X | None``).
        default: the default value (``dataclasses.MISSING`` when required).
        help: the docstring entry for the field ('' when undocumented).
        choices: allowed values, or () for any.
    """

    name: str
    type: type
    optional: bool
    default: Any
    help: str
    choices: tuple[Any, ...] = ()

    @property
    def type_name(self) -> str:
        base = self.type.__name__
        return f"{base} or null" if self.optional else base


_ATTR_LINE = re.compile(
    r"^(\s*)([A-Za-z_][A-Za-z0-9_]*(?:\s*,\s*[A-Za-z_][A-Za-z0-9_]*)*):\s?(.*)$"
)


_NAME_LIST = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*(?:\s*,\s*[A-Za-z_][A-Za-z0-9_]*)*\s*,\s*$")


def parse_attribute_docs(doc: str | None) -> dict[str, str]:
    """``{field: help}`` from the ``Attributes:`` section of a Google-style docstring.

    ``a, b: text`` documents both ``a`` and ``b``; continuation lines (deeper indent) are
    joined with single spaces.
    """
    if not doc:
        return {}
    lines = doc.expandtabs().splitlines()
    out: dict[str, str] = {}
    in_section = False
    base_indent: int | None = None
    current: list[str] = []
    text: list[str] = []

    def flush() -> None:
        if current:
            joined = " ".join(t.strip() for t in text if t.strip())
            for name in current:
                out[name] = joined

    pending = ""  # a field list wrapped over lines: "a, b,\n    c: text"
    for line in lines:
        stripped = line.strip()
        if pending and stripped:
            line = pending + " " + stripped
            stripped = line.strip()
            pending = ""
        if not in_section:
            if stripped == "Attributes:":
                in_section = True
                section_indent = len(line) - len(line.lstrip())
            continue
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= section_indent:  # the next section or the end of the docstring
            break
        if _NAME_LIST.match(line) and (base_indent is None or indent <= base_indent):
            pending = line.rstrip()
            continue
        m = _ATTR_LINE.match(line)
        if m and (base_indent is None or len(m.group(1)) <= base_indent):
            flush()
            base_indent = len(m.group(1))
            current = [n.strip() for n in m.group(2).split(",")]
            text = [m.group(3)]
        else:
            text.append(stripped)
    flush()
    return out


def _base_type(annotation: Any) -> tuple[type, bool]:
    """``(base type, optional)`` of a field annotation such as ``float | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return _base_type(args[0])[0], optional
        return str, optional
    if annotation in (int, float, bool, str):
        return annotation, False
    if annotation is Protocol:
        return Protocol, False
    return str, False


@functools.cache
def config_fields(config_cls: type) -> tuple[FieldInfo, ...]:
    """The options of a config dataclass, in declaration order (see the module doc)."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass")
    hints = typing.get_type_hints(config_cls)
    docs: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        docs.update(parse_attribute_docs(klass.__doc__))
    rows = []
    for f in dataclasses.fields(config_cls):
        if not f.init or f.name.startswith("_"):
            continue
        base, optional = _base_type(hints.get(f.name, str))
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        rows.append(
            FieldInfo(
                name=f.name,
                type=base,
                optional=optional,
                default=default,
                help=f.metadata.get("help", docs.get(f.name, "")),
                choices=tuple(f.metadata.get("choices", ())),
            )
        )
    return tuple(rows)


_TRUE = ("true", "on", "yes", "1")
_FALSE = ("false", "off", "no", "0")


def coerce_value(info: FieldInfo, value: Any, owner: str = "") -> Any:
    """``value`` (a string from ``--set``, or a Python value) as the field's type.

    Raises:
        ConfigError: the value cannot be read as the field's type, or is not a choice.
    """

    def bad(expected: str) -> ConfigError:
        where = f"{owner}: " if owner else ""
        return ConfigError(
            f"{where}option {info.name} expects {expected}, got {value!r}",
            owner=owner,
            key=info.name,
            value=value,
            expected=expected,
        )

    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none")):
        if info.optional:
            return None
        if value is None:
            raise bad(info.type_name)
        if info.type is not str:
            raise bad(info.type_name)
    out: Any
    if info.type is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            out = value.strip().lower() in _TRUE
        elif isinstance(value, int) and value in (0, 1):
            out = bool(value)
        else:
            raise bad("a boolean (on/off, true/false)")
    elif info.type is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        else:
            try:
                out = int(str(value).strip())
            except ValueError:
                raise bad("an integer") from None
    elif info.type is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            out = float(value)
        else:
            try:
                out = float(str(value).strip())
            except ValueError:
                raise bad("a number") from None
    elif info.type is Protocol:
        if isinstance(value, Protocol):
            out = value
        elif isinstance(value, dict):
            out = Protocol(**value)
        else:
            raise bad("a protocol")
    else:
        out = value if isinstance(value, str) else str(value)
    if info.choices and out not in info.choices:
        raise bad("one of " + ", ".join(str(c) for c in info.choices))
    return out


def parse_settings(items: typing.Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--set``) -> ``{key: value}`` (values left as text: the config
    coerces them to its field types). Dashes in keys become underscores.

    Raises:
        ConfigError: an item without ``=``.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r}: use KEY=VALUE, e.g. beta=1.2", value=item)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def build_config(
    config_cls: type,
    preset: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    owner: str = "",
) -> Any:
    """``config_cls`` from its defaults, then ``preset``, then ``overrides`` (``None`` values
    in ``overrides`` are skipped: "not given"). Every value is coerced to its field's type.

    Raises:
        ConfigError: an unknown key (naming the valid ones) or a value of the wrong type.
        OvssError: the config's own validation (``__post_init__``).
    """
    fields = {f.name: f for f in config_fields(config_cls)}
    values: dict[str, Any] = dict(preset or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = [k for k in values if k not in fields]
    if unknown:
        where = f"{owner} " if owner else ""
        raise ConfigError(
            f"{where}has no option {', '.join(unknown)}; options: {', '.join(fields)}",
            owner=owner,
            key=unknown[0],
            value=values[unknown[0]],
        )
    typed = {k: coerce_value(fields[k], v, owner) for k, v in values.items()}
    try:
        return config_cls(**typed)
    except (ValueError, TypeError) as e:
        where = f"{owner}: " if owner else ""
        raise ConfigError(f"{where}{e}", owner=owner) from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as JSON-ready values (protocols as dicts, tuples as lists)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Protocol):
            return v.to_dict()
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {k: conv(x) for k, x in dataclasses.asdict(v).items()}
        if isinstance(v, tuple):
            return list(v)
        return v

    return {f.name: conv(getattr(config, f.name)) for f in dataclasses.fields(config)}


__all__ = [
    "ConfigError",
    "FieldInfo",
    "build_config",
    "coerce_value",
    "config_fields",
    "config_to_dict",
    "parse_attribute_docs",
    "parse_settings",
]
