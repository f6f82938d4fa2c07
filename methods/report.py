"""``ovss report``: one self-contained HTML page of evaluation, sweep and comparison results.

The page needs nothing but itself: CSS and JavaScript inline, images as ``data:`` URIs, charts
as inline SVG, no network request. Per result it shows:

- the **protocol** (method, config, backbones, scoring, vocabulary, version) and the
  **summary** (mIoU, mAcc, aAcc, images, skipped);
- **per-class IoU bars**, a table sortable by class, IoU or accuracy (click a column head);
- the **confusion matrix** as a heat map, each ground-truth row normalised to its pixels (SVG
  cells with the counts as tooltips up to :data:`SVG_HEATMAP_MAX` classes, a scaled PNG
  beyond) [ours];
- **galleries** ``image | prediction | ground truth`` of the best and worst images by
  per-image mIoU, with a legend of the classes shown (the image and its label are read from the
  paths the result records; a missing file is named in the page instead);
- sweeps: the table of configurations (Δ to the default, the best marked) and one **chart per
  swept key** (mIoU, mAcc, aAcc against the key's values; one line per combination of the other
  keys); comparisons: the per-class IoU of every method side by side and a bar chart.

Every string that comes from a result (class names, ids, paths, config values) is escaped: a
class named ``<img src=x onerror=alert(1)>`` shows as that text.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featurestore.errors import OvssError

#: Above this many classes the confusion heat map is a scaled PNG instead of SVG cells.
SVG_HEATMAP_MAX = 40
#: Longer side of gallery pictures (px) [ours].
THUMB = 320
SERIES_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")


def esc(value: Any) -> str:
    """Text for HTML (element content and quoted attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{float(v):.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Result files (``eval --out-json``: an evaluation, a sweep or a comparison).

    Raises:
        OvssError: a file that cannot be read or is not an ovss result.
    """
    out = []
    for p in paths:
        path = Path(p)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise OvssError(f"cannot read result file {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise OvssError(f"result file {path} is not JSON: {e}") from None
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind is None and isinstance(data, dict) and "metrics" in data:
            kind = data["kind"] = "eval"  # results written before the kind field
        if kind not in ("eval", "sweep", "compare"):
            raise OvssError(f"{path} is not an evaluation result (write one with eval --out-json)")
        out.append(data)
    if not out:
        raise OvssError("no result file given")
    return out


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def _png_uri(
    arr: np.ndarray, resample: int = Image.NEAREST, max_side: int = THUMB, min_side: int = 160
) -> str:
    """A PNG ``data:`` URI of an image array, its longer side brought to at most
    ``max_side`` (small pictures are enlarged by an integer factor to ``min_side``)."""
    im = Image.fromarray(arr)
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize(
            (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), resample
        )
    elif max(im.size) < min_side:
        k = min_side // max(im.size)
        im = im.resize((im.size[0] * k, im.size[1] * k), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _palette(dataset: str, n: int) -> np.ndarray:
    from featurestore.datasets import palette

    try:
        return palette(dataset, n)
    except OvssError:
        return palette("custom", n)


def _colour(labels: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """Class colours; unlabelled pixels (255, out of range) white."""
    bad = (labels < 0) | (labels >= len(pal))
    rgb = pal[np.where(bad, 0, labels)].astype(np.uint8)
    rgb[bad] = 255
    return rgb


def _label_loader(dataset: str, data_root: str | None):
    from featurestore.datasets import get_dataset
    from featurestore.labels import load_label

    try:
        spec = get_dataset(dataset, data_root) if dataset == "custom" else get_dataset(dataset)
    except (OvssError, TypeError):
        return None
    return lambda path: load_label(spec, path)


def _gallery_html(result: dict[str, Any]) -> str:
    from featurestore.images import load_image_rgb
    from methods.evaluate import decode_label_png

    entries = result.get("gallery") or []
    if not entries:
        return "<p class=note>No gallery (the result records no per-image predictions).</p>"
    names = result.get("class_names") or []
    pal = _palette(result.get("dataset", "custom"), max(len(names), 1))
    load_gt = _label_loader(result.get("dataset", "custom"), result.get("data_root"))
    parts = []
    for rank in ("best", "worst"):
        items = [e for e in entries if e.get("rank") == rank]
        if not items:
            continue
        parts.append(f"<h4>{'Best' if rank == 'best' else 'Worst'} images by per-image mIoU</h4>")
        parts.append("<table class=gallery><tr><th>image</th><th>prediction</th>")
        parts.append("<th>ground truth</th><th>classes</th></tr>")
        for e in items:
            pred = decode_label_png(e["prediction_png"])
            cells = []
            try:
                img = load_image_rgb(str(e.get("image_path", "")))
                cells.append(f"<img alt='image' src='{_png_uri(img, Image.BILINEAR)}'>")
            except (OvssError, OSError):
                cells.append(
                    f"<span class=missing>image not found: {esc(e.get('image_path'))}</span>"
                )
            cells.append(f"<img alt='prediction' src='{_png_uri(_colour(pred, pal))}'>")
            gt = None
            if load_gt is not None and e.get("label_path"):
                try:
                    gt = np.asarray(load_gt(e["label_path"])).astype(np.int64)
                except (OvssError, OSError):
                    gt = None
            if gt is not None:
                cells.append(f"<img alt='ground truth' src='{_png_uri(_colour(gt, pal))}'>")
            else:
                cells.append(
                    f"<span class=missing>label not found: {esc(e.get('label_path'))}</span>"
                )
            present = sorted(
                {int(c) for c in np.unique(pred) if 0 <= c < len(names)}
                | (
                    {int(c) for c in np.unique(gt) if 0 <= c < len(names)}
                    if gt is not None
                    else set()
                )
            )
            legend = "".join(
                f"<div class=lg><span class=sw style='background:rgb{tuple(int(x) for x in pal[c])}'>"
                f"</span>{esc(names[c])}</div>"
                for c in present
            )
            title = f"<div class=cap>{esc(e.get('image_id'))} · mIoU {_num(e.get('mIoU'))}</div>"
            parts.append(
                "<tr>"
                + "".join(f"<td>{c}{title if k == 1 else ''}</td>" for k, c in enumerate(cells))
                + f"<td class=legend>{legend}</td></tr>"
            )
        parts.append("</table>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Tables and charts
# ---------------------------------------------------------------------------------------------


def _kv_table(d: dict[str, Any]) -> str:
    rows = []
    for k, v in d.items():
        text = v if isinstance(v, str) else json.dumps(v, indent=None, default=str)
        rows.append(f"<tr><th>{esc(k)}</th><td><code>{esc(text)}</code></td></tr>")
    return "<table class=kv>" + "".join(rows) + "</table>"


def _summary(result: dict[str, Any]) -> str:
    m = result.get("metrics", {})
    skipped = result.get("skipped") or {}
    cells = [
        ("mIoU", _num(m.get("mIoU"))),
        ("mAcc", _num(m.get("mAcc"))),
        ("aAcc", _num(m.get("aAcc"))),
        ("images", str(result.get("images", ""))),
        ("skipped", str(len(skipped))),
    ]
    out = (
        "<div class=summary>"
        + "".join(
            f"<div class=metric><div class=v>{esc(v)}</div><div class=k>{esc(k)}</div></div>"
            for k, v in cells
        )
        + "</div>"
    )
    ref = result.get("reference")
    if ref:
        out += f"<p class=note>Reference check: <code>{esc(json.dumps(ref))}</code></p>"
    if skipped:
        items = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in list(skipped.items())[:20])
        out += f"<details><summary>skipped images</summary><ul>{items}</ul></details>"
    return out


def _per_class(result: dict[str, Any], uid: str) -> str:
    pc = result.get("metrics", {}).get("per_class", {})
    ious = pc.get("iou", [])
    accs = pc.get("acc", [])
    names = pc.get("name") or result.get("class_names") or [str(i) for i in range(len(ious))]
    rows = []
    for i, (name, iou, acc) in enumerate(zip(names, ious, accs, strict=False)):
        width = 0 if iou is None else max(0.0, min(100.0, 100 * iou))
        rows.append(
            f"<tr data-index='{i}'><td class=name>{esc(name)}</td>"
            f"<td class=num data-v='{-1 if iou is None else iou}'>{_num(None if iou is None else 100 * iou)}</td>"
            f"<td class=barcell><div class=bar style='width:{width:.1f}%'></div></td>"
            f"<td class=num data-v='{-1 if acc is None else acc}'>{_num(None if acc is None else 100 * acc)}</td></tr>"
        )
    return (
        f"<table class='perclass sortable' id='pc-{uid}'><thead><tr>"
        "<th data-sort=text>class ⇅</th><th data-sort=num>IoU ⇅</th><th>IoU</th>"
        "<th data-sort=num>Acc ⇅</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _heat_colour(x: float) -> str:
    """0 -> white, 1 -> dark blue."""
    x = min(max(x, 0.0), 1.0)
    r = round(255 - 247 * x)
    g = round(255 - 207 * x)
    b = round(255 - 148 * x)
    return f"rgb({r},{g},{b})"


def _confusion(result: dict[str, Any]) -> str:
    cm = np.asarray(result.get("confusion") or [], dtype=np.float64)
    if cm.ndim != 2 or cm.size == 0:
        return "<p class=note>No confusion matrix in this result.</p>"
    names = result.get("class_names") or [str(i) for i in range(len(cm))]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    c = len(cm)
    if c > SVG_HEATMAP_MAX:
        rgb = (
            np.stack([255 - 247 * norm, 255 - 207 * norm, 255 - 148 * norm], axis=-1)
            .round()
            .astype(np.uint8)
        )
        scale = max(1, 600 // c)
        big = np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8))
        return (
            f"<p class=note>{c} classes: rows are ground truth, columns predictions, each row "
            "normalised to its pixels.</p>"
            f"<img class=heatmap alt='confusion matrix' src='{_png_uri(big, max_side=10_000)}'>"
        )
    cell = 16
    label_w = 8 * max(len(str(n)) for n in names) + 10
    size = label_w + cell * c + 10
    parts = [
        f"<svg class=heatmap xmlns='http://www.w3.org/2000/svg' width='{size}' "
        f"height='{size}' role='img' aria-label='confusion matrix'>"
    ]
    for i, name in enumerate(names):
        y = label_w + i * cell
        parts.append(
            f"<text x='{label_w - 4}' y='{y + 12}' text-anchor='end' class=ax>{esc(name)}</text>"
        )
        x = label_w + i * cell
        parts.append(
            f"<text transform='translate({x + 12},{label_w - 4}) rotate(-90)' class=ax>"
            f"{esc(name)}</text>"
        )
    for i in range(c):
        for j in range(c):
            parts.append(
                f"<rect x='{label_w + j * cell}' y='{label_w + i * cell}' width='{cell}' "
                f"height='{cell}' fill='{_heat_colour(norm[i, j])}'><title>"
                f"{esc(names[i])} → {esc(names[j])}: {int(cm[i, j])} px "
                f"({100 * norm[i, j]:.1f}%)</title></rect>"
            )
    parts.append("</svg>")
    return (
        "<p class=note>Rows: ground truth; columns: prediction; each row normalised to its "
        "pixels (hover a cell for the count).</p>" + "".join(parts)
    )


def _line_chart(title: str, xs: list[str], series: dict[str, dict[str, list]]) -> str:
    """An SVG chart: ``series`` name -> {"mIoU": [...], "mAcc": [...], "aAcc": [...]} per x."""
    w, h, left, bottom, top = 520, 260, 50, 40, 20
    vals = [v for s in series.values() for m in s.values() for v in m if v is not None]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.1
    lo, hi = lo - pad, hi + pad
    n = len(xs)

    def px(k: int) -> float:
        return left + (w - left - 20) * (0.5 if n == 1 else k / (n - 1))

    def py(v: float) -> float:
        return top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))

    parts = [
        f"<svg class=chart xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h + 20 * len(series) * 3}' "
        f"role='img' aria-label='{esc(title)}'>",
        f"<text x='{w / 2}' y='14' text-anchor='middle' class=ct>{esc(title)}</text>",
        f"<line x1='{left}' y1='{h - bottom}' x2='{w - 10}' y2='{h - bottom}' class='axis'/>",
        f"<line x1='{left}' y1='{top}' x2='{left}' y2='{h - bottom}' class='axis'/>",
    ]
    for t in range(5):
        v = lo + (hi - lo) * t / 4
        parts.append(
            f"<text x='{left - 4}' y='{py(v) + 4}' text-anchor='end' class=ax>{v:.1f}</text>"
        )
    for k, x in enumerate(xs):
        parts.append(
            f"<text x='{px(k)}' y='{h - bottom + 16}' text-anchor='middle' class=ax>{esc(x)}</text>"
        )
    legend_y = h + 4
    dashes = {"mIoU": "", "mAcc": "6,3", "aAcc": "2,3"}
    for s_i, (name, metrics) in enumerate(series.items()):
        colour = SERIES_COLOURS[s_i % len(SERIES_COLOURS)]
        for metric, ys in metrics.items():
            pts = [(px(k), py(v)) for k, v in enumerate(ys) if v is not None]
            if not pts:
                continue
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(
                f"<polyline points='{path}' fill='none' stroke='{colour}' stroke-width='2' "
                f"stroke-dasharray='{dashes.get(metric, '')}'/>"
            )
            for (x, y), v in zip(pts, [v for v in ys if v is not None], strict=True):
                parts.append(
                    f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{colour}'><title>"
                    f"{esc(name)} {esc(metric)} {v:.2f}</title></circle>"
                )
            legend_y += 18
            parts.append(
                f"<line x1='{left}' y1='{legend_y - 4}' x2='{left + 24}' y2='{legend_y - 4}' "
                f"stroke='{colour}' stroke-width='2' stroke-dasharray='{dashes.get(metric, '')}'/>"
                f"<text x='{left + 30}' y='{legend_y}' class=ax>{esc(metric)}"
                f"{' — ' + esc(name) if name else ''}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _bar_chart(title: str, labels: list[str], values: list[float | None]) -> str:
    w, bar, left = 520, 22, 160
    hi = max([v for v in values if v is not None] + [1.0])
    h = 30 + bar * len(labels)
    parts = [
        f"<svg class=chart xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' "
        f"role='img' aria-label='{esc(title)}'>",
        f"<text x='{w / 2}' y='14' text-anchor='middle' class=ct>{esc(title)}</text>",
    ]
    for k, (lab, v) in enumerate(zip(labels, values, strict=True)):
        y = 24 + k * bar
        length = 0 if v is None else (w - left - 60) * v / hi
        parts.append(
            f"<text x='{left - 6}' y='{y + 14}' text-anchor='end' class=ax>{esc(lab)}</text>"
            f"<rect x='{left}' y='{y + 2}' width='{length:.1f}' height='{bar - 6}' "
            f"fill='{SERIES_COLOURS[k % len(SERIES_COLOURS)]}'><title>{esc(lab)}: "
            f"{_num(v)}</title></rect><text x='{left + length + 4:.1f}' y='{y + 14}' "
            f"class=ax>{_num(v)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _sweep_charts(result: dict[str, Any]) -> str:
    keys = [k for k in result.get("keys", [])]
    rows = result.get("rows", [])
    charts = []
    for key in keys:
        others = [k for k in keys if k != key]
        xs: list[str] = []
        for r in rows:
            x = json.dumps(r["values"].get(key), default=str).strip('"')
            if x not in xs:
                xs.append(x)
        try:
            xs.sort(key=float)
        except ValueError:
            pass
        series: dict[str, dict[str, list]] = {}
        for r in rows:
            name = " ".join(f"{k}={r['values'].get(k)}" for k in others)
            s = series.setdefault(name, {m: [None] * len(xs) for m in ("mIoU", "mAcc", "aAcc")})
            x = json.dumps(r["values"].get(key), default=str).strip('"')
            for m in s:
                s[m][xs.index(x)] = r["result"]["metrics"].get(m)
        if key == "method" and not others:
            charts.append(
                _bar_chart(
                    "mIoU per method",
                    xs,
                    [series[""]["mIoU"][k] for k in range(len(xs))],
                )
            )
        else:
            charts.append(_line_chart(f"metrics against {key}", xs, series))
    return "<div class=charts>" + "".join(charts) + "</div>"


def _sweep_table(result: dict[str, Any]) -> str:
    keys = result.get("keys", [])
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    body = []
    for r in result.get("rows", []):
        m = r["result"]["metrics"]
        marks = " ".join(
            x for x, on in (("best", r.get("best")), ("default", r.get("default"))) if on
        )
        vals = "".join(
            f"<td>{esc(json.dumps(r['values'].get(k), default=str).strip(chr(34)))}</td>"
            for k in keys
        )
        delta = r.get("delta_miou")
        body.append(
            f"<tr class='{'best' if r.get('best') else ''}'>{vals}<td class=num>{_num(m.get('mIoU'))}</td>"
            f"<td class=num>{_num(m.get('mAcc'))}</td><td class=num>{_num(m.get('aAcc'))}</td>"
            f"<td class=num>{'–' if delta is None else f'{delta:+.2f}'}</td>"
            f"<td>{esc(marks)}</td></tr>"
        )
    return (
        f"<table class='rows sortable'><thead><tr>{head}<th data-sort=num>mIoU ⇅</th>"
        "<th data-sort=num>mAcc ⇅</th><th data-sort=num>aAcc ⇅</th><th>Δ mIoU</th><th></th></tr>"
        "</thead><tbody>" + "".join(body) + "</tbody></table>"
    )


def _side_by_side(result: dict[str, Any]) -> str:
    rows = result.get("rows", [])
    if not rows:
        return ""
    names = rows[0]["result"].get("class_names") or []
    head = "".join(f"<th data-sort=num>{esc(r['label'])} ⇅</th>" for r in rows)
    body = []
    for c, name in enumerate(names):
        cells = []
        for r in rows:
            iou = r["result"]["metrics"]["per_class"]["iou"][c]
            cells.append(f"<td class=num>{_num(None if iou is None else 100 * iou)}</td>")
        body.append(f"<tr><td class=name>{esc(name)}</td>{''.join(cells)}</tr>")
    summary = "".join(
        f"<td class=num><b>{_num(r['result']['metrics'].get('mIoU'))}</b></td>" for r in rows
    )
    return (
        "<table class='perclass sortable'><thead><tr><th data-sort=text>class ⇅</th>"
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody><tfoot><tr><th>mIoU</th>{summary}"
        "</tr></tfoot></table>"
    )


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:36px}
h3{font-size:16px;margin-top:24px}table{border-collapse:collapse;margin:8px 0}
td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th[data-sort]{cursor:pointer;user-select:none}td.num{text-align:right;font-variant-numeric:tabular-nums}
.barcell{width:260px}.bar{height:12px;background:#3b7dd8;border-radius:2px}
.kv code{white-space:pre-wrap;word-break:break-all;font-size:12px}
.summary{display:flex;gap:16px;margin:8px 0}.metric{border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.metric .v{font-size:20px;font-weight:600}.metric .k{color:#666;font-size:12px}
.note{color:#555;font-size:13px}.missing{color:#a00;font-size:12px}
.gallery img{max-width:320px;display:block;image-rendering:auto}.cap{font-size:12px;color:#444}
.legend .lg{font-size:12px;white-space:nowrap}.sw{display:inline-block;width:11px;height:11px;
margin-right:4px;border:1px solid #999;vertical-align:middle}
svg text.ax{font-size:11px;fill:#333}svg text.ct{font-size:13px;font-weight:600}
svg .axis{stroke:#999}.heatmap{image-rendering:pixelated;max-width:100%}
tr.best td{background:#eef7ee}.charts{display:flex;flex-wrap:wrap;gap:16px}
#errors{color:#a00}
"""

JS = """
(function(){
  function key(td, kind){
    if(kind==='num'){var v=td.getAttribute('data-v');if(v===null){v=td.textContent;}
      var x=parseFloat(v);return isNaN(x)?-Infinity:x;}
    return td.textContent.toLowerCase();
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    table.querySelectorAll('th[data-sort]').forEach(function(th){
      th.addEventListener('click',function(){
        var col=Array.prototype.indexOf.call(th.parentNode.children,th);
        var kind=th.getAttribute('data-sort');
        var asc=th.getAttribute('data-dir')!=='asc';
        th.setAttribute('data-dir',asc?'asc':'desc');
        var body=table.tBodies[0];
        var rows=Array.prototype.slice.call(body.rows);
        rows.sort(function(a,b){
          var x=key(a.cells[col],kind),y=key(b.cells[col],kind);
          return (x<y?-1:x>y?1:0)*(asc?1:-1);
        });
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
  document.body.setAttribute('data-ready','1');
})();
"""


def _eval_section(result: dict[str, Any], uid: str, title: str) -> str:
    return (
        f"<h3>{esc(title)}</h3>"
        + _summary(result)
        + "<details><summary>protocol</summary>"
        + _kv_table(result.get("protocol", {}))
        + "</details><h4>Per-class IoU</h4>"
        + _per_class(result, uid)
        + "<h4>Confusion matrix</h4>"
        + _confusion(result)
        + "<h4>Galleries</h4>"
        + _gallery_html(result)
    )


def _section(data: dict[str, Any], k: int) -> str:
    kind = data.get("kind", "eval")
    if kind == "eval":
        title = f"{data.get('protocol', {}).get('method', '')} on {data.get('dataset')} ({data.get('split')})"
        return (
            f"<section class=result id='r{k}'><h2>{esc(title)}</h2>"
            + _eval_section(data, f"{k}", "Result")
            + "</section>"
        )
    rows = data.get("rows", [])
    what = "Comparison" if kind == "compare" else "Sweep"
    keys = ", ".join(data.get("keys", []))
    parts = [
        f"<section class=result id='r{k}'><h2>{esc(what)} of {esc(keys)} on "
        f"{esc(data.get('dataset'))} ({esc(data.get('split'))}): {len(rows)} configurations</h2>",
        f"<p class=note>One pass over {esc(data.get('store'))} in {_num(data.get('seconds'), 1)} s; "
        f"shared: <code>{esc(json.dumps(data.get('sharing', {})))}</code></p>",
        _sweep_table(data),
        _sweep_charts(data),
    ]
    if kind == "compare" or "method" in data.get("keys", []):
        parts.append("<h3>Per-class IoU side by side</h3>" + _side_by_side(data))
    best = next((r for r in rows if r.get("best")), rows[0] if rows else None)
    if best is not None:
        parts.append(_eval_section(best["result"], f"{k}b", f"Best configuration: {best['label']}"))
    for j, r in enumerate(rows):
        if r is best:
            continue
        parts.append(
            f"<details><summary>{esc(r['label'])}: mIoU {_num(r['result']['metrics'].get('mIoU'))}"
            f"</summary>{_eval_section(r['result'], f'{k}r{j}', r['label'])}</details>"
        )
    parts.append("</section>")
    return "".join(parts)


def build_report(results: Sequence[dict[str, Any]], title: str = "ovss report") -> str:
    """The HTML page of ``results`` (dicts of ``EvalResult.to_dict`` / ``SweepResult.to_dict``,
    or loaded by :func:`load_results`)."""
    from featurestore import __version__

    body = "".join(_section(d, k) for k, d in enumerate(results))
    toc = "".join(
        f"<li><a href='#r{k}'>{esc(d.get('kind'))}: {esc(d.get('dataset'))}"
        f"{' — ' + esc(d.get('protocol', {}).get('method', '')) if d.get('kind') == 'eval' else ''}"
        "</a></li>"
        for k, d in enumerate(results)
    )
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class=note>ovss {esc(__version__)}; "
        f"{len(results)} result(s).</p><ul>{toc}</ul>{body}"
        f"<script>{JS}</script></body></html>"
    )


def write_report(
    results: Sequence[dict[str, Any]], out: str | Path, title: str = "ovss report"
) -> Path:
    """Write :func:`build_report` to ``out`` (parent folders created); returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(results, title), encoding="utf-8")
    return path


__all__ = ["build_report", "esc", "load_results", "write_report"]
