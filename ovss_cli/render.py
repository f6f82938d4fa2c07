"""Rendering of results: rich tables on stdout, JSON with --json, progress bars on stderr.

Text from users and files (class names, captions, paths, image ids, messages) is never read as
rich markup: :class:`Table` cells and titles given as ``str`` are literal text, and every
interpolation into a marked-up line goes through ``escape`` (a class named ``[bold]x`` or
``[ours: 2]`` prints as written).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict, is_dataclass

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table as _RichTable
from rich.text import Text

# Tables are wide: outside a terminal (pipes, CI logs) rich would wrap them at 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
# stderr lines (skips, notes, errors) are never hard-wrapped: a log keeps one line per message.
err = Console(stderr=True, soft_wrap=True)

PLAIN_PROGRESS_INTERVAL_S = 5.0
"""Seconds between two plain progress lines when stderr is not a terminal [ours]."""


class Table(_RichTable):
    """A rich table whose ``str`` title and cells are literal text, never markup; pass a
    ``rich.text.Text`` for styled text of our own."""

    def __init__(self, *args, title=None, **kwargs):
        super().__init__(*args, title=Text(title) if isinstance(title, str) else title, **kwargs)

    def add_row(self, *cells, **kwargs) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kwargs)


def _json(obj) -> None:
    from featurestore.names import redact

    if is_dataclass(obj):
        obj = asdict(obj)
    click.echo(redact(json.dumps(obj, indent=2, default=str)))  # no credentials in a store URL


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class _Rate(TextColumn):
    """images/s column."""

    def __init__(self):
        super().__init__("")

    def render(self, task):
        speed = task.finished_speed or task.speed
        return f"{speed:.2f} img/s" if speed else "– img/s"


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """Progress for batch jobs (stderr not a terminal): one plain line per label at most every
    ``interval`` seconds, and when a label completes, e.g.
    ``dinov2-s14: 120/4000 (3.0%) 4.12 img/s ETA 15:41``. The rate counts only what this run
    did (images already done when a label first reports are left out); ``clock`` is
    ``time.monotonic`` (tests pass their own)."""

    def __init__(self, stream=None, interval: float = PLAIN_PROGRESS_INTERVAL_S, clock=None):
        import time

        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.clock = clock or time.monotonic
        self.state: dict[str, list] = {}  # label -> [t0, done0, last print time, last done]

    def __call__(self, label: str, done: int, total: int) -> None:
        now = self.clock()
        st = self.state.get(label)
        if st is None:
            self.state[label] = [now, done, now, done]
            return
        finished = total and done >= total
        if done == st[3] or (now - st[2] < self.interval and not finished):
            return
        st[2], st[3] = now, done
        elapsed, count = now - st[0], done - st[1]
        rate = count / elapsed if elapsed > 0 and count > 0 else 0.0
        pct = f" ({100.0 * done / total:.1f}%)" if total else ""
        line = f"{label}: {done}/{total}{pct}"
        line += f" {rate:.2f} img/s" if rate else " - img/s"
        if finished:
            line += f" done in {_eta(elapsed)}"
        elif rate:
            line += f" ETA {_eta((total - done) / rate)}"
        self.stream.write(line + "\n")
        self.stream.flush()


@contextlib.contextmanager
def progress(quiet: bool = False):
    """Yield a callback ``(label, done, total)`` driving a rich progress bar on stderr, or,
    when stderr is not a terminal (batch jobs, pipes), :class:`PlainProgress` lines."""
    if quiet:
        yield None
        return
    if not err.is_terminal:
        yield PlainProgress()
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, int] = {}

    def cb(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total, completed=done)
            # The speed estimate must not count work finished in an earlier run.
            bar.tasks[tasks[label]].start_time = None
            bar.reset(tasks[label], total=total, completed=done)
        else:
            bar.update(tasks[label], completed=done, total=total)

    with bar:
        yield cb


def plan(rows, as_json: bool) -> None:
    if as_json:
        _json([asdict(r) for r in rows])
        return
    t = Table(title="extraction plan (dry run)")
    for c in ("feature set", "images", "unreadable", "windows", "tokens", "blocks", "size"):
        t.add_column(c, justify="right" if c != "feature set" else "left")
    for r in rows:
        t.add_row(
            r.feature_set,
            str(r.images),
            str(r.unreadable),
            str(r.windows),
            str(r.tokens),
            str(r.blocks),
            human_bytes(r.bytes),
        )
    out.print(t)


def extract_report(rep, as_json: bool) -> None:
    if as_json:
        _json(rep)
        return
    t = Table(title=f"extracted into {rep.store} (shard {rep.shard[0]}/{rep.shard[1]})")
    for c in ("feature set", "images", "already done", "extracted", "failed", "img/s"):
        t.add_column(c, justify="right" if c != "feature set" else "left")
    for m in rep.models:
        t.add_row(
            m.feature_set,
            str(m.images_total),
            str(m.images_done_before),
            str(m.images_extracted),
            str(m.images_failed),
            f"{m.images_per_s:.2f}",
        )
    out.print(t)
    for note in getattr(rep, "notes", []):
        err.print(f"[yellow]note[/]: {escape(str(note))}", soft_wrap=True)
    for m in rep.models:
        for image_id, msg in m.failures.items():
            err.print(f"[yellow]skipped[/] {escape(str(image_id))}: {escape(str(msg))}")


def models(rows, as_json: bool) -> None:
    if as_json:
        _json(rows)
        return
    t = Table(title="backbones")
    t.add_column("name")
    t.add_column("description")
    for r in rows:
        t.add_row(r["name"], r["doc"])
    out.print(t)


def store_info(info: dict, as_json: bool) -> None:
    if as_json:
        _json(info)
        return
    out.print(
        f"[bold]{escape(str(info['store']))}[/]: {info['images']} images "
        f"({escape(', '.join(info['sources'])) or 'no source'}), "
        f"{human_bytes(info['disk_bytes'])} on disk"
    )
    t = Table(title="feature sets")
    for c in (
        "feature set",
        "weights",
        "dtype",
        "tensors",
        "done",
        "pending",
        "failed",
        "windows",
        "tokens",
        "size",
    ):
        t.add_column(c)
    for s in info["feature_sets"]:
        tensors = ", ".join(
            f"{x['name']}[{x['unit']}]{tuple(x['row_shape'])}" for x in s["tensors"]
        )
        w = s["weights"] or "-"
        t.add_row(
            s["key"],
            w if len(w) < 28 else w[:27] + "…",
            s["dtype"],
            tensors,
            str(s["images_done"]),
            str(s["images_pending"]),
            str(s["images_failed"]),
            str(s["windows"]),
            str(s["tokens"]),
            human_bytes(s["bytes"]),
        )
    out.print(t)
    for key in info.get("unfinished_sets", []):
        out.print(
            f"[yellow]unfinished[/]: {escape(key)} (its creation was interrupted; the next extraction "
            "of it makes it anew)"
        )
    if info.get("text_sets"):
        tt = Table(title="text sets (class embeddings)")
        for c in ("key", "source", "templates", "classes", "queries", "dim", "weights"):
            tt.add_column(c)
        for x in info["text_sets"]:
            tt.add_row(
                x["key"],
                x["source"],
                x["template_set"],
                str(x["classes"]),
                str(x["queries"]),
                str(x["dim"]),
                str(x["weights"]),
            )
        out.print(tt)
    if info.get("label_sets"):
        out.print(f"label sets: {', '.join(info['label_sets'])}", markup=False)


def verify(rep, as_json: bool) -> None:
    if as_json:
        _json(rep.to_dict())
        return
    for n in rep.notes:
        out.print(f"[yellow]note[/]: {escape(str(n))}")
    for p in rep.problems:
        out.print(f"[red]problem[/]: {escape(str(p))}")
    status = "[green]OK[/]" if rep.ok else f"[red]{len(rep.problems)} problem(s)[/]"
    out.print(
        f"{escape(str(rep.store))}: {status} ({rep.checked_sets} feature sets, "
        f"{rep.checked_blocks} blocks checked)"
    )


def kv(title: str, d: dict, as_json: bool) -> None:
    if as_json:
        _json(d)
        return
    t = Table(title=title, show_header=False)
    t.add_column("key")
    t.add_column("value")
    for k, v in d.items():
        t.add_row(str(k), human_bytes(v) if k == "bytes" else str(v))
    out.print(t)


def demo(result: dict, as_json: bool) -> None:
    if as_json:
        _json(result)
        return
    out.print(
        f"[bold]ovss demo[/]: {result['dataset']['n_train']} train + "
        f"{result['dataset']['n_val']} val collages of {len(result['dataset']['classes'])} "
        f"classes in {result['dataset']['root']}"
    )
    out.print(f"backbone {result['model']} ({result['weights']})")
    store_info(result["store_info"], False)
    st = result.get("stages", {})
    cl = st.get("cluster")
    if cl and cl.get("hungarian"):
        h = cl["hungarian"]
        out.print(
            f"cluster: per-image k=16 masks -> label set {cl['per_image_masks']}; "
            f"codebook k={cl['codebook_k']} on val, Hungarian-matched mIoU "
            f"{h.get('mIoU')}"
        )
    if "align" in st:
        out.print(
            "align: MLP module, TSupCon loss, on the train collages' known labels "
            "(standing in for FMbSeg Stage-1 pseudo-labels, which random-init CLIP/SAM "
            "cannot produce)"
        )
    ev = st.get("eval")
    if ev:
        out.print(
            f"aligned segmentation of {ev['images']} val collages: [bold]mIoU {ev['mIoU']}"
            f"[/] (chance {ev['chance_mIoU']}; mAcc {ev['mAcc']}, aAcc {ev['aAcc']}); "
            f"label PNGs and overlays in {st['segment']['out_dir']}"
        )
        t = Table(title="aligned model, val collages: IoU per class")
        t.add_column("class")
        t.add_column("IoU", justify="right")
        for name, iou in ev.get("per_class_iou", {}).items():
            t.add_row(name, "nan" if iou is None else f"{iou:.2f}")
        t.add_row(Text("mIoU", style="bold"), Text(f"{ev['mIoU']:.2f}", style="bold"))
        out.print(t)
    if st.get("simzss_eval"):
        se = st["simzss_eval"]
        out.print(
            f"simzss (tiny text tower trained on {st['simzss']['captions']} captions of the "
            f"train collages' classes): [bold]val mIoU {se['mIoU']}[/] (chance "
            f"{se['chance_mIoU']}; aAcc {se['aAcc']})"
        )
    if st.get("trident_eval"):
        out.print(
            f"trident (tiny random CLIP/DINO/SAM, SAM refinement on; numbers meaningless, "
            f"pipeline real): mIoU {st['trident_eval']['mIoU']}"
        )
    if st.get("pnp_ovss_eval"):
        pe, pt = st["pnp_ovss_eval"], st.get("pnp_ovss_tune", {}).get("best", {})
        out.print(
            f"pnp-ovss (tiny random BLIP + CLIP, {st['pnp_ovss']['crf_backend']} CRF; numbers "
            f"meaningless, pipeline real) on {pe['images']} val collages: mIoU {pe['mIoU']}; "
            f"tune: best reward {pt.get('reward')}/{pt.get('max_reward')}"
        )
    if st.get("maskclip_eval"):
        out.print(f"maskclip on the same val collages: mIoU {st['maskclip_eval']['mIoU']}")
    for stage, secs in result["timings"].items():
        out.print(f"  {stage}: {secs:.1f} s")
    if result.get("note"):
        out.print(result["note"])
    out.print(f"outputs in {result['out']}")


def doctor(rep: dict, as_json: bool) -> None:
    if as_json:
        _json(rep)
        return
    t = Table(title="ovss doctor", show_header=False)
    t.add_column("check")
    t.add_column("result")
    for k, v in rep.items():
        t.add_row(k, v if isinstance(v, str) else json.dumps(v))
    out.print(t)


def coverage(result) -> str:
    """``mIoU over N images``, or ``mIoU over N of M images`` when some were not scored
    (``eval --allow-missing``)."""
    total = getattr(result, "total", 0) or result.images
    if result.images < total:
        return f"mIoU over {result.images} of {total} images"
    return f"mIoU over {result.images} images"


def eval_result(result, as_json: bool) -> None:
    d = result.to_dict()
    if as_json:
        _json(d)
        return
    m = result.metrics
    t = Table(title=escape(f"{result.dataset} ({result.split}): {coverage(result)}"))
    for c in ("class", "IoU", "Acc"):
        t.add_column(c, justify="left" if c == "class" else "right")
    pc = m.get("per_class", {})
    names = pc.get("name", [str(i) for i in range(len(pc.get("iou", [])))])
    for name, iou, acc in zip(names, pc.get("iou", []), pc.get("acc", []), strict=True):
        t.add_row(
            str(name),
            "-" if iou is None else f"{100 * iou:.2f}",
            "-" if acc is None else f"{100 * acc:.2f}",
        )
    out.print(t)
    out.print(f"[bold]mIoU {m.get('mIoU')}[/]  mAcc {m.get('mAcc')}  aAcc {m.get('aAcc')}")
    proto = result.protocol
    out.print(f"protocol: {json.dumps(proto)}", markup=False)
    if result.skipped:
        err.print(
            f"[yellow]{len(result.skipped)} image(s) skipped[/]: "
            + escape("; ".join(f"{k}: {v}" for k, v in list(result.skipped.items())[:5]))
        )
    if result.reference is not None:
        out.print(f"reference: {json.dumps(result.reference)}", markup=False)


def eval_csv(result, path: str) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "iou", "acc"])
        pc = result.metrics.get("per_class", {})
        names = pc.get("name", [str(i) for i in range(len(pc.get("iou", [])))])
        for name, iou, acc in zip(names, pc.get("iou", []), pc.get("acc", []), strict=True):
            w.writerow([name, iou, acc])
        w.writerow(["mIoU", result.metrics.get("mIoU"), ""])


def methods(rows, as_json: bool) -> None:
    """``methods.segment.describe_methods`` rows: one table per method, one row per option
    (literal text: ``[ours: 2]`` is not rich markup)."""
    if as_json:
        _json(rows)
        return
    for r in rows:
        title = f"{r['name']}{' (default)' if r.get('default') else ''}: {r['doc']}"
        t = Table(title=title, title_justify="left")
        for col in ("option", "type", "default", "help"):
            t.add_column(col, overflow="fold")
        for o in r["options"]:
            default = "(required)" if o["required"] else json.dumps(o["default"])
            help_text = o["help"]
            if o["choices"]:
                help_text += f" Choices: {', '.join(str(c) for c in o['choices'])}."
            t.add_row(o["name"], o["type"], default, help_text)
        out.print(t)


# -- sweeps and comparisons (ovss eval --sweep / --method A --method B) -----------------------


def _cell(v) -> str:
    if v is None:
        return "none"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def sweep_result(result, as_json: bool) -> None:
    """A ``methods.sweep.SweepResult``: one row per configuration; for a comparison the
    per-class IoU of every method side by side, a paper-style row and the reference checks.
    Text from results is literal (``rich.text.Text``), never markup."""
    from rich.table import Table as RichTable
    from rich.text import Text

    if as_json:
        _json(result.to_dict())
        return
    rows = result.rows
    partial = [r for r in rows if r.result.skipped]
    over = f", {coverage(partial[0].result)}" if partial else ""
    t = RichTable(
        title=Text(
            f"{result.dataset} ({result.split}): {len(rows)} configurations in one pass, "
            f"{result.seconds:.1f} s{over}"
        )
    )
    for k in result.keys:
        t.add_column(Text(k))
    for c in ("mIoU", "mAcc", "aAcc", "Δ mIoU", "images", ""):
        t.add_column(c, justify="right" if c not in ("",) else "left")
    for r in rows:
        m = r.result.metrics
        marks = " ".join(x for x, on in (("best", r.best), ("default", r.default)) if on)
        delta = "-" if r.delta_miou is None else f"{r.delta_miou:+.2f}"
        t.add_row(
            *(Text(_cell(r.values.get(k))) for k in result.keys),
            Text(_cell(m.get("mIoU"))),
            Text(_cell(m.get("mAcc"))),
            Text(_cell(m.get("aAcc"))),
            Text(delta),
            Text(str(r.result.images)),
            Text(marks, style="bold green" if r.best else ""),
        )
    out.print(t)
    if "method" in result.keys:
        names = rows[0].result.class_names
        pc = RichTable(title=Text("IoU per class, side by side"))
        pc.add_column("class")
        for r in rows:
            pc.add_column(Text(r.label), justify="right")
        for c, name in enumerate(names):
            cells = []
            for r in rows:
                iou = r.result.metrics["per_class"]["iou"][c]
                cells.append(Text("-" if iou is None else f"{100 * iou:.2f}"))
            pc.add_row(Text(str(name)), *cells)
        for metric in ("mIoU", "mAcc", "aAcc"):
            pc.add_row(
                Text(metric, style="bold"),
                *(Text(_cell(r.result.metrics.get(metric)), style="bold") for r in rows),
            )
        out.print(pc)
        paper = " | ".join(f"{r.label} {_cell(r.result.metrics.get('mIoU'))}" for r in rows)
        out.print(Text(f"{result.dataset} mIoU: {paper}"))
    sharing = ", ".join(f"{k} {v}" for k, v in result.sharing.items())
    err.print(Text(f"shared: {sharing}"))
    for c in result.cache:
        err.print(
            Text(
                f"derived cache {c['path']}: {c['hits']} read, {c['writes']} written, "
                f"{c['images']} images"
            )
        )
    for r in rows:
        if r.result.reference is not None:
            out.print(Text(f"reference ({r.label}): {json.dumps(r.result.reference)}"))
        if r.result.skipped:
            err.print(Text(f"{r.label}: {coverage(r.result)}, {len(r.result.skipped)} skipped"))


def sweep_csv(result, path: str) -> None:
    """One CSV row per configuration: the swept values, mIoU, mAcc, aAcc, Δ, best, default,
    images and the full protocol (JSON)."""
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [*result.keys, "mIoU", "mAcc", "aAcc", "delta_mIoU", "best", "default", "images"]
            + ["protocol"]
        )
        for r in result.rows:
            m = r.result.metrics
            w.writerow(
                [_cell(r.values.get(k)) for k in result.keys]
                + [m.get("mIoU"), m.get("mAcc"), m.get("aAcc"), r.delta_miou, r.best, r.default]
                + [r.result.images, json.dumps(r.result.protocol, sort_keys=True)]
            )
