"""The table of ``ovss models`` without importing a backbone family (so without torch).

The backbone registry fills itself by importing every family module (``featurestore.backbones``,
``register_variants``), and those import torch, timm, open_clip and segment_anything (4 s).
:func:`model_rows` answers from ``data/models.json``, a generated copy of the registry's names
and one-line docs, as long as this process has registered no backbone; once one is registered
(a family imported) it reads the live registry. ``tests/test_model_catalog.py`` fails when the
copy drifts from the registry; regenerate it with ``python -m featurestore.model_catalog``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from featurestore.catalog_file import read_rows, write_rows

#: The generated copy of the registry (``python -m featurestore.model_catalog`` writes it).
CATALOG_PATH = Path(__file__).parent / "data" / "models.json"


def catalog_rows() -> list[dict[str, str]]:
    """The rows of :data:`CATALOG_PATH`: ``{name, doc}`` per registered backbone, sorted."""
    return read_rows(CATALOG_PATH)


def live_rows() -> list[dict[str, str]]:
    """``{name, doc}`` per registered backbone, sorted, from the live registry (imports every
    family: torch and the model libraries)."""
    from featurestore.backbones.base import backbone_doc, list_backbones

    return [{"name": n, "doc": backbone_doc(n)} for n in list_backbones()]


def registry_in_use() -> bool:
    """True when this process has registered a backbone; reads ``sys.modules`` only."""
    base = sys.modules.get("featurestore.backbones.base")
    return bool(base is not None and getattr(base, "_REGISTRY", None))


def model_rows() -> list[dict[str, str]]:
    """``{name, doc}`` per backbone ``ovss extract --model`` accepts: the generated copy while
    no backbone is registered in this process, else the live registry."""
    return live_rows() if registry_in_use() else catalog_rows()


def write_catalog(path: Path = CATALOG_PATH) -> Path:
    """Write the live rows to ``path`` (default :data:`CATALOG_PATH`); returns the path."""
    return write_rows(path, live_rows())


if __name__ == "__main__":  # pragma: no cover - the regeneration entry point
    print(f"wrote {write_catalog()}")
