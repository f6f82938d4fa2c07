"""The table of ``ovss methods`` without importing a method module (so without torch).

``ovss methods`` lists every registered method with its options; the options come from each
method's ``Config`` dataclass (``methods.config.config_fields``), which lives in the method's
module next to its torch code, so the live table (``methods.segment.describe_methods``)
imports torch and every model library (2-3 s). :func:`describe_methods` answers from
``method_catalog.json`` (next to this module), a generated copy of that live table for the
built-in methods, as long as this process has registered no method; once one is registered (a
method module imported, or a method defined at run time) it returns the live table, which is
then the same or a superset. ``tests/test_method_catalog.py`` fails when the copy drifts from
the live table; regenerate it with ``python -m methods.method_catalog``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from featurestore.catalog_file import read_rows, write_rows

#: The generated copy of the live table (``python -m methods.method_catalog`` writes it).
CATALOG_PATH = Path(__file__).with_name("method_catalog.json")


def catalog_rows() -> list[dict[str, Any]]:
    """The rows of :data:`CATALOG_PATH`: per built-in method ``name``, ``doc``, ``default``
    and ``options`` (as ``methods.segment.describe_methods``)."""
    return read_rows(CATALOG_PATH)


def live_rows() -> list[dict[str, Any]]:
    """The live table: imports every method module (torch and the model libraries)."""
    from methods.segment import describe_methods as live

    return live()


def registry_in_use() -> bool:
    """True when this process has registered a method (the live table may then hold more
    than the built-ins); reads ``sys.modules`` only, so it imports nothing."""
    base = sys.modules.get("methods.base")
    return bool(base is not None and getattr(base, "_METHODS", None))


def describe_methods() -> list[dict[str, Any]]:
    """Every registered method with its options (``name``, ``doc``, ``default``, ``options``
    of ``{name, type, default, required, help, choices}``): the generated copy while no method
    is registered in this process, else the live table."""
    return live_rows() if registry_in_use() else catalog_rows()


def write_catalog(path: Path = CATALOG_PATH) -> Path:
    """Write the live rows to ``path`` (default :data:`CATALOG_PATH`); returns the path."""
    return write_rows(path, live_rows())


if __name__ == "__main__":  # pragma: no cover - the regeneration entry point
    print(f"wrote {write_catalog()}")
