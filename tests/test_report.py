"""methods.report / ``ovss report``: one self-contained page, escaped text, and the page in a
real headless browser (Chromium): no script error, its tables, charts and images shown."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from methods.report import build_report, load_results
from methods.sweep import run_sweep
from ovss_cli.main import cli
from tests.test_segment_eval import _one_line_error, make_dataset, make_store
from tests.test_sweep import request

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture()
def results(tmp_path):
    """A sweep and a plain evaluation whose first class is named like an XSS probe."""
    gts = make_dataset(tmp_path / "data")
    store = make_store(tmp_path, gts)
    sweep = run_sweep(request(tmp_path, store, sweep={"prob_thd": ["0.5", "0.9"]})).to_dict()
    single = json.loads(json.dumps(sweep["rows"][0]["result"]))
    single["class_names"][0] = EVIL
    single["metrics"]["per_class"]["name"][0] = EVIL
    single["gallery"][0]["image_id"] = EVIL
    (tmp_path / "eval.json").write_text(json.dumps(single))
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    return tmp_path


def test_page_is_self_contained_and_escapes_every_result_string(results):
    page = build_report(load_results([results / "eval.json", results / "sweep.json"]))
    assert EVIL not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)  # nothing from the network
    assert "<script src" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") >= 2 * 3 * 3  # 2 galleries x 3 images x 3
    for part in ("Per-class IoU", "Confusion matrix", "metrics against prob_thd", "Δ mIoU"):
        assert part in page


def test_report_command_and_eval_report(results):
    out = results / "r.html"
    res = CliRunner().invoke(cli, ["report", str(results / "eval.json"), "--out", str(out)])
    assert res.exit_code == 0, res.output and out.exists()
    (results / "bad.json").write_text('{"x": 1}')
    _one_line_error(
        CliRunner().invoke(cli, ["report", str(results / "bad.json"), "--out", str(out)]),
        "not an evaluation result",
    )
    _one_line_error(
        CliRunner().invoke(cli, ["report", str(results / "nope.json"), "--out", str(out)]),
        "nope.json",
    )


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _dump_dom(browser: str, page, tmp_path) -> str:
    """The DOM after the page ran, with script errors written into it (an injected
    ``window.onerror`` ahead of the page's own script)."""
    html = page.read_text()
    probe = (
        "<script>window.__errors=[];window.onerror=function(m){window.__errors.push(String(m));};"
        "window.addEventListener('load',function(){var d=document.createElement('pre');"
        "d.id='js-errors';d.textContent=JSON.stringify(window.__errors);"
        "document.body.appendChild(d);});</script>"
    )
    probed = tmp_path / "probed.html"
    probed.write_text(
        html.replace("<head>", "<head>" + probe.replace("<script>", "<script>", 1), 1)
    )
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    run = subprocess.run(
        [*args, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*args, f"--screenshot={shot}", "--window-size=1300,2400", probed.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 10_000
    return run.stdout


def test_page_in_a_headless_browser(results, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "no Chromium: `make test` installs it with apt where apt and root (or sudo) are "
            "available; elsewhere install chromium to run this test"
        )
    page = tmp_path / "report.html"
    res = CliRunner().invoke(
        cli, ["report", str(results / "eval.json"), str(results / "sweep.json"), "--out", str(page)]
    )
    assert res.exit_code == 0, res.output
    dom = _dump_dom(browser, page, tmp_path)
    errors = re.search(r'<pre id="js-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None, "the page did not finish loading"
    assert errors.group(1) == "[]", errors.group(1)
    assert 'data-ready="1"' in dom  # the page's own script ran to its end
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom  # shown as text
    assert '<img src="x"' not in dom and "alert(1)" not in re.sub(r"&lt;.*?&gt;", "", dom)
    assert dom.count("<table") >= 6 and dom.count("<svg") >= 3 and dom.count("<polyline") >= 3
    assert dom.count('src="data:image/png;base64,') >= 18
