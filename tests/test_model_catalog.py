"""``featurestore.model_catalog``: the generated backbone table equals the live registry's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from featurestore import model_catalog as mc
from featurestore.catalog_file import render_rows

ROOT = Path(__file__).resolve().parents[1]


def test_the_catalog_file_is_the_live_registry():
    # Fails when a backbone or its one-line doc changed without regenerating: run
    # `python -m featurestore.model_catalog`.
    live = mc.live_rows()
    assert mc.CATALOG_PATH.read_text(encoding="utf-8") == render_rows(live), (
        "featurestore/data/models.json is stale: run `python -m featurestore.model_catalog`"
    )
    assert mc.catalog_rows() == live
    assert {"dinov2-s14", "clip-b16", "sam-b"} <= {r["name"] for r in live}


def test_a_process_with_a_registered_backbone_reads_the_live_registry(monkeypatch):
    from featurestore.backbones.base import list_backbones

    list_backbones()  # imports every family
    assert mc.registry_in_use()
    monkeypatch.setattr(mc, "catalog_rows", lambda: [])  # never read once the registry is live
    assert mc.model_rows() == mc.live_rows() != []


def test_a_fresh_process_reads_the_file_and_imports_no_backbone():
    code = (
        "import json, sys\n"
        "from featurestore.model_catalog import model_rows, CATALOG_PATH\n"
        "rows = model_rows()\n"
        "print(json.dumps([rows == json.loads(CATALOG_PATH.read_text()),"
        " sorted(m for m in sys.modules if m.startswith('featurestore.backbones') or m == 'torch')]))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    same, loaded = json.loads(res.stdout)
    assert same
    assert loaded == []
