"""``methods.method_catalog``: the generated method table equals the live registry's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from featurestore.catalog_file import render_rows
from methods import method_catalog as mc

ROOT = Path(__file__).resolve().parents[1]


def test_the_catalog_file_is_the_live_table():
    # Fails when a method, an option, a default or a docstring changed without regenerating:
    # run `python -m methods.method_catalog`.
    live = mc.live_rows()
    assert mc.CATALOG_PATH.read_text(encoding="utf-8") == render_rows(live), (
        "methods/method_catalog.json is stale: run `python -m methods.method_catalog`"
    )
    assert mc.catalog_rows() == json.loads(json.dumps(live))
    assert {r["name"] for r in live} >= {"prototype", "sclip", "trident", "simzss"}


def test_a_process_with_a_registered_method_reads_the_live_table(monkeypatch):
    from methods import base

    base.list_methods()  # loads the registry
    assert mc.registry_in_use()
    monkeypatch.setattr(mc, "catalog_rows", lambda: [])  # never read once methods are live
    assert mc.describe_methods() == mc.live_rows() != []


def test_a_fresh_process_reads_the_file_and_imports_no_method_module():
    code = (
        "import json, sys\n"
        "from methods.method_catalog import describe_methods, CATALOG_PATH\n"
        "rows = describe_methods()\n"
        "print(json.dumps([rows == json.loads(CATALOG_PATH.read_text()),"
        " sorted(m for m in sys.modules if m.startswith('methods.') or m == 'torch')]))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    same, loaded = json.loads(res.stdout)
    assert same
    assert loaded == ["methods.method_catalog"]
