"""User-facing text points only inside the repository: the README, docs/, every command's
--help (trainers' generated options included) and the method options `ovss methods` shows
never name the developer notes or numbered papers; docs/ has a page per method and trainer,
and every relative link in the README and docs/ resolves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
from click.testing import CliRunner

from ovss_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"spec/|METHODS\.md|EVAL\.md|PRODUCT\.md|STYLE\.md|\.\./shared|paper 00\d|§\d")


def _hits(where: str, text: str) -> list[str]:
    return [
        f"{where}: ...{text[max(0, m.start() - 50) : m.end() + 20]!r}"
        for m in OUTSIDE.finditer(text)
    ]


def _commands(cmd: click.Command, path: list[str]):
    yield path
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, [*path, name])


def _user_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_nothing_a_user_reads_points_outside_the_repository():
    from methods.segment import describe_methods
    from methods.train import list_trainers

    hits: list[str] = []
    for path in _user_files():
        hits += _hits(str(path.relative_to(ROOT)), path.read_text())
    runner = CliRunner()
    for path in _commands(cli, []):
        out = runner.invoke(cli, [*path, "--help"], terminal_width=200).output
        hits += _hits(f"ovss {' '.join(path)} --help", out)
    for name in list_trainers():
        out = runner.invoke(cli, ["align", "--method", name, "--help"], terminal_width=200).output
        hits += _hits(f"ovss align --method {name} --help", out)
    hits += _hits("ovss methods", json.dumps(describe_methods(), ensure_ascii=False))
    assert not hits, "\n".join(hits)


def test_the_check_fails_on_an_outside_pointer():
    assert _hits("x", "see spec/EVAL.md §4") and _hits("x", "(paper 003, Table 3)")
    assert not _hits("x", "see docs/evaluation.md")


def test_every_method_and_trainer_has_a_page_and_links_resolve():
    from methods.base import list_methods
    from methods.train import list_trainers

    pages = {p.stem for p in (ROOT / "docs" / "methods").glob("*.md")}
    for name in list_methods():
        assert name in pages, f"docs/methods/{name}.md missing (run docs/generate.py)"
    for name in list_trainers():
        assert name in pages or f"{name}-train" in pages, name
    broken = []
    for path in _user_files():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, "\n".join(broken)
