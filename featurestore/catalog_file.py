"""The generated JSON tables checked into the package (``ovss models``: ``data/models.json``;
``ovss methods``: ``methods/method_catalog.json``): one format, one reader and one writer.

Each table is a list of row dicts, written as 2-space JSON with the keys in their order and
one trailing newline, so that a regenerated file differs from the checked-in one only where
the live table does. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of the table file ``path``."""
    return json.loads(path.read_text(encoding="utf-8"))


def render_rows(rows: list[dict[str, Any]]) -> str:
    """The file text of ``rows`` (2-space JSON, key order kept, one trailing newline)."""
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` to ``path``; returns the path."""
    path.write_text(render_rows(rows), encoding="utf-8")
    return path
