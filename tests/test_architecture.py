"""Guards of the package architecture (README "Architecture"), read from the source with ``ast``:

- imports point one way: ``featurestore`` imports nothing of ``methods`` or ``ovss_cli``;
  ``methods`` nothing of ``ovss_cli`` (function-level imports included);
- no library module builds an ``ovss <command>`` line (the CLI renders them in
  ``ovss_cli/hints.py`` from the facts of structured errors); docstrings and comments may name
  commands;
- command modules share helpers through ``ovss_cli.common`` and never import ``ovss_cli.main``
  (which imports them);
- every registered method and trainer has a ``Config`` dataclass whose fields all have help.

Each scanner also runs on a crafted bad module, so each guard can fail.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Library packages and the top-level packages they must not import.
FORBIDDEN = {"featurestore": ("methods", "ovss_cli"), "methods": ("ovss_cli",)}
#: What a command module may import from its own package.
CLI_SHARED = ("ovss_cli.common", "ovss_cli.render", "ovss_cli.hints")
#: Library strings that still build a command line, with the reason they are tolerated.
#: Remove an entry when its module raises a structured error instead.
KNOWN_COMMAND_STRINGS = {
    # Trident's missing-window message names its `extract --for trident` call (the halves and
    # rounded-up SAM variants are not expressible through MissingFeatureSetError's facts yet).
    ("methods/trident.py", "ovss extract"),
}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_modules(path: Path, package: str) -> list[tuple[str, int]]:
    """``(module, line)`` of every import in ``path`` (any depth; relative ones resolved
    against ``package``, the dotted package of the file)."""
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, node.lineno))
            out += [(f"{module}.{a.name}", node.lineno) for a in node.names]
    return out


def import_violations(path: Path, package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.name}:{line} imports {module}"
        for module, line in imported_modules(path, package)
        if module.split(".")[0] in forbidden
    ]


def _command_names() -> tuple[set[str], dict[str, set[str]]]:
    """Top-level command names and, for groups, their subcommands (from the CLI itself)."""
    from ovss_cli.main import cli

    groups = {
        name: set(cmd.commands)
        for name, cmd in cli.commands.items()
        if isinstance(cmd, click.Group)
    }
    return set(cli.commands), groups


def command_pattern(commands: set[str], groups: dict[str, set[str]]) -> re.Pattern:
    """``ovss CMD`` as a command line: followed by an option (``ovss extract --store``), a
    subcommand of a group (``ovss store verify``), or quoted on its own (``'ovss align'``).
    A noun phrase (``an ovss store at``, ``the ovss report`` title) does not match."""
    plain = "|".join(sorted(map(re.escape, commands - set(groups)), key=len, reverse=True))
    subs = "|".join(
        f"{re.escape(g)}\\s+(?:{'|'.join(map(re.escape, sorted(s)))})\\b"
        for g, s in sorted(groups.items())
        if s
    )
    alternatives = [
        rf"(?<![\w-])ovss\s+(?:{plain})(?=\s+-)",  # options follow
        rf"(?<=[`'\"])ovss\s+(?:{plain})(?=[`'\"])",  # quoted on its own
    ]
    if subs:
        alternatives.insert(0, rf"(?<![\w-])ovss\s+(?:{subs})")
    return re.compile("|".join(alternatives))


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
            if isinstance(node, ast.ClassDef):  # a component's ``doc = "..."`` line is its
                for stmt in body:  # description (``ovss methods``, docs), like a docstring
                    if isinstance(stmt, ast.Assign) and [
                        getattr(t, "id", "") for t in stmt.targets
                    ] == ["doc"]:
                        ids.update(id(n) for n in ast.walk(stmt.value))
    return ids


def command_strings(path: Path, pattern: re.Pattern) -> list[tuple[int, str]]:
    """``(line, match)`` of command lines in string literals and f-strings (docstrings and a
    class's ``doc`` description excepted; comments are not strings)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstring_nodes(tree)
    for node in ast.walk(tree):  # an f-string's literal parts are read with the f-string
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
    hits = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):  # the literal parts joined, values as {}
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        hits += [(node.lineno, m.group(0)) for m in pattern.finditer(text)]
    return hits


def cli_import_violations(path: Path) -> list[str]:
    """Imports of a command module from ``ovss_cli`` other than the shared helper modules."""
    return [
        f"{path.name}:{line} imports {module}"
        for module, line in imported_modules(path, "ovss_cli")
        if module.startswith("ovss_cli.")
        and not any(module == s or module.startswith(s + ".") for s in CLI_SHARED)
    ]


def undocumented_fields(config_cls: type) -> list[str]:
    from methods.config import config_fields

    return [f.name for f in config_fields(config_cls) if not f.help.strip()]


# -- the tree -------------------------------------------------------------------------------------


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_library_imports_point_one_way(package):
    bad = [
        v
        for path in _modules(package)
        for v in import_violations(path, package, FORBIDDEN[package])
    ]
    assert not bad, "\n".join(bad)


def test_no_library_module_builds_an_ovss_command_line():
    pattern = command_pattern(*_command_names())
    bad = []
    for package in FORBIDDEN:
        for path in _modules(package):
            rel = path.relative_to(ROOT).as_posix()
            for line, text in command_strings(path, pattern):
                if not any(rel == f and text.startswith(s) for f, s in KNOWN_COMMAND_STRINGS):
                    bad.append(f"{rel}:{line}: {text!r}")
    assert not bad, "\n".join(bad)


def test_known_command_strings_are_still_there():
    """An allowance that no longer matches is removed (the list only shrinks)."""
    pattern = command_pattern(*_command_names())
    for rel, start in KNOWN_COMMAND_STRINGS:
        found = [t for _, t in command_strings(ROOT / rel, pattern)]
        assert any(t.startswith(start) for t in found), (rel, start)


def test_command_modules_import_shared_helpers_never_main():
    modules = [p for p in sorted((ROOT / "ovss_cli").glob("*.py")) if p.name != "main.py"]
    assert any(p.name.endswith("_cmd.py") for p in modules)
    bad = [v for path in modules for v in cli_import_violations(path)]
    assert not bad, "\n".join(bad)


def test_every_registered_component_has_a_documented_config():
    from methods.base import get_method, list_methods
    from methods.train import get_trainer, list_trainers

    components = [get_method(n) for n in list_methods()] + [get_trainer(n) for n in list_trainers()]
    assert len(components) >= 10
    for cls in components:
        assert dataclasses.is_dataclass(getattr(cls, "Config", None)), cls.name
        assert not undocumented_fields(cls.Config), (cls.name, undocumented_fields(cls.Config))


# -- each guard can fail --------------------------------------------------------------------------

BAD_LIBRARY = '''
"""Docstrings may say: run `ovss extract --store S` first."""
import os
from methods.base import Segmenter  # a forbidden top-level import


class X:
    doc = "trained by `ovss align --method x`"  # a description, like a docstring


def f(store):
    from ovss_cli import hints  # a forbidden function-level import
    from ..ovss_cli.render import Table  # relative, resolved against the package
    a = f"run: ovss extract --store {store} --model m"
    b = "train one with 'ovss align'"
    c = "then ovss store verify " + store
    d = "an ovss store at " + store  # a noun, not a command
    e = "ovss report"  # a title
    return a, b, c, d, e
'''


def test_the_scanners_find_a_crafted_bad_module(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(BAD_LIBRARY)
    found = import_violations(path, "featurestore", FORBIDDEN["featurestore"])
    assert [v.split(" imports ")[1] for v in found] == [
        "methods.base",
        "methods.base.Segmenter",
        "ovss_cli",
        "ovss_cli.hints",
        "ovss_cli.render",
        "ovss_cli.render.Table",
    ]
    assert import_violations(path, "featurestore", ()) == []

    pattern = command_pattern({"extract", "align", "report", "store"}, {"store": {"verify"}})
    hits = [t for _, t in command_strings(path, pattern)]
    assert hits == ["ovss extract", "ovss align", "ovss store verify"]

    cli_mod = tmp_path / "x_cmd.py"
    cli_mod.write_text(
        "from ovss_cli.common import user_errors\nfrom ovss_cli import render\n"
        "def g():\n    from ovss_cli.main import cli\n    from ovss_cli.segment_cmd import segment\n"
    )
    assert [v.split(" imports ")[1] for v in cli_import_violations(cli_mod)] == [
        "ovss_cli.main",
        "ovss_cli.main.cli",
        "ovss_cli.segment_cmd",
        "ovss_cli.segment_cmd.segment",
    ]

    @dataclasses.dataclass
    class Config:
        """Attributes:
        a: documented.
        """

        a: int = 1
        b: int = 2

    assert undocumented_fields(Config) == ["b"]
