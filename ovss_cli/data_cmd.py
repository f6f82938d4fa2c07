"""``ovss data``: list the benchmark datasets, prepare their labels, verify a download.

Each command calls one library function (:func:`featurestore.datasets.describe_datasets`,
:func:`featurestore.labels.prepare_dataset`, :func:`featurestore.labels.verify_dataset`) and
renders its result: rich tables on stdout, ``--json`` for machines, progress on stderr.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from ovss_cli import render
from ovss_cli.common import user_errors

if TYPE_CHECKING:  # the library is imported inside each command, for a fast `--help`
    from featurestore.labels import PrepareReport, VerifyReport

MAX_TABLE_ROWS = 50
"""Problems shown in the verify table; ``--json`` always lists all of them."""

_DATA_ROOT_HELP = (
    "The folder holding the dataset folder (e.g. data/ with data/ADEChallengeData2016), or "
    "the dataset folder itself."
)


_user_errors = user_errors


def next_step_command(step) -> str:
    """The ``ovss data`` command line of a :class:`featurestore.labels.NextStep`."""
    cmd = f"ovss data {step.action} {step.dataset} --data-root {step.data_root}"
    if step.overwrite:
        cmd += " --overwrite"
    if step.action == "prepare" and not step.run:
        return f"{cmd} (prints the steps)"
    return cmd


def _echo_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout."""
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group()
def data() -> None:
    """Benchmark datasets: list them, prepare their labels, verify a download.

    The layouts are MMSegmentation's (README "Datasets"), so data prepared for SCLIP, NACLIP,
    ProxyCLIP or Trident works as is.
    """


# -- list --------------------------------------------------------------------------------------


@data.command("list")
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    help="Also say which datasets are found under this folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_user_errors
def data_list(data_root: str | None, as_json: bool) -> None:
    """One line per dataset: classes, evaluated split and size, label rule, folder."""
    from featurestore.datasets import describe_datasets

    infos = describe_datasets(data_root)
    if as_json:
        _echo_json([asdict(i) for i in infos])
        return
    table = Table(title="datasets")
    for column in ("name", "classes", "split", "images", "labels", "folder under --data-root"):
        table.add_column(column, justify="right" if column in ("classes", "images") else "left")
    if data_root is not None:
        table.add_column("found")
    for info in infos:
        row = [
            info.name,
            str(info.num_classes) if info.num_classes else "classes.txt",
            info.split,
            str(info.expected_images) if info.expected_images else "-",
            info.label_rule,
            f"{info.layout_root} (*{info.label_suffix})",
        ]
        if data_root is not None:
            row.append(escape(info.dataset_dir or "") if info.present else "[yellow]not found[/]")
        table.add_row(*row)
    render.out.print(table)


# -- prepare -----------------------------------------------------------------------------------


@data.command("prepare")
@click.argument("name")
@click.option("--data-root", required=True, type=click.Path(file_okay=False), help=_DATA_ROOT_HELP)
@click.option(
    "--split",
    default=None,
    help="Split to prepare, or 'all' for every split present (default: the evaluated split; "
    "the COCO conversions never need the train split).",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False),
    help="coco_object only: write the converted labels under this folder (annotations/...) and "
    "link its images/ to the source images, like cvt_coco_object.py -o (default: beside the "
    "raw maps).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Conversion processes (default: the number of CPUs, at most 8).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Rewrite label files that already exist (default: keep them, so a rerun only does the "
    "files still missing).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def data_prepare(
    name: str,
    data_root: str,
    split: str | None,
    out: str | None,
    workers: int | None,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Create the label files `ovss eval` reads, or print exactly what to do.

    coco_stuff171 (_labelTrainIds) and coco_object (_instanceTrainIds) are converted here from
    the raw stuffthingmaps PNGs: in parallel, each file written atomically, existing files kept
    unless --overwrite. ade20k and voc21/voc20 are used as downloaded. context60/59 and
    cityscapes need an external package (Detail API, cityscapesScripts): their commands are
    printed. Exits with status 1 when a file could not be converted.
    """
    from featurestore.labels import prepare_dataset

    with render.progress(quiet) as callback:
        report = prepare_dataset(
            name,
            data_root,
            split=split,
            out=out,
            workers=workers,
            overwrite=overwrite,
            progress=callback,
        )
    if as_json:
        _echo_json(report.to_dict())
    else:
        _print_prepare(report)
    if not report.ok:
        sys.exit(1)


def _print_prepare(report: PrepareReport) -> None:
    """Rich rendering of a :class:`~featurestore.labels.PrepareReport`."""
    out = render.out
    if report.action == "converted":
        state = "[green]done[/]" if report.ok else f"[red]{len(report.failures)} failed[/]"
        out.print(
            f"[bold]{report.dataset}[/] ({', '.join(report.splits)}): {state}: "
            f"{report.written} label files written, {report.skipped} already present, "
            f"in {escape(str(report.out_dir))}"
        )
        for failure in report.failures[:MAX_TABLE_ROWS]:
            out.print(f"[red]failed[/] {escape(failure.image_id)}: {escape(failure.message)}")
        if len(report.failures) > MAX_TABLE_ROWS:
            out.print(f"... and {len(report.failures) - MAX_TABLE_ROWS} more (see --json)")
    else:
        state = "[green]labels present[/]" if report.ready else "[yellow]action needed[/]"
        out.print(f"[bold]{report.dataset}[/]: {state} (dataset folder {report.dataset_dir})")
        for number, step in enumerate(report.steps, start=1):
            out.print(f"  {number}. {escape(step)}")
    for note in report.notes:
        out.print(f"[yellow]note[/]: {escape(note)}")
    for step in report.next_steps:
        out.print(f"[yellow]next[/]: {escape(next_step_command(step))}", soft_wrap=True)


# -- verify ------------------------------------------------------------------------------------


@data.command("verify")
@click.argument("name")
@click.option("--data-root", required=True, type=click.Path(file_okay=False), help=_DATA_ROOT_HELP)
@click.option("--split", default=None, help="Split to check (default: the evaluated split).")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Check only the first N images of the split (the count check still uses all).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Label decoding threads (default: the number of CPUs, at most 8).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def data_verify(
    name: str,
    data_root: str,
    split: str | None,
    limit: int | None,
    workers: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Check a dataset split: image count, every label readable, sizes, label values.

    Labels are read as `ovss eval` reads them (palette indices, reduce_zero_label where the
    benchmark sets it); values must be classes 0..C-1 or 255 (ignore) and each label must have
    its image's size. A count that differs from the standard split (a subset) is a warning.
    Exits with status 1 when a problem is found.
    """
    from featurestore.labels import verify_dataset

    with render.progress(quiet) as callback:
        report = verify_dataset(
            name, data_root, split=split, limit=limit, workers=workers, progress=callback
        )
    if as_json:
        _echo_json(report.to_dict())
    else:
        _print_verify(report)
    if not report.ok:
        sys.exit(1)


def _print_verify(report: VerifyReport) -> None:
    """Rich rendering of a :class:`~featurestore.labels.VerifyReport`."""
    out = render.out
    if report.problems:
        table = Table(title=f"problems in {report.dataset} {report.split}")
        for column in ("image", "problem", "details"):
            table.add_column(column)
        for problem in report.problems[:MAX_TABLE_ROWS]:
            table.add_row(escape(problem.image_id), problem.kind, escape(problem.message))
        out.print(table)
        if len(report.problems) > MAX_TABLE_ROWS:
            out.print(f"... and {len(report.problems) - MAX_TABLE_ROWS} more (see --json)")
    for warning in report.warnings:
        out.print(f"[yellow]warning[/]: {escape(warning)}")
    for step in report.next_steps:
        out.print(f"[yellow]next[/]: {escape(next_step_command(step))}", soft_wrap=True)
    classes = (
        f"{report.classes_present}/{report.num_classes} classes present"
        if report.num_classes
        else "classes not checked"
    )
    if report.ok:
        state = "[green]OK[/]"
    else:
        counts = ", ".join(f"{n} {kind}" for kind, n in report.problem_counts().items())
        state = f"[red]{len(report.problems)} problem(s)[/] ({counts})"
    out.print(
        f"[bold]{report.dataset}[/] {report.split} in {escape(report.dataset_dir)}: {state}; "
        f"{report.images_checked} of {report.images_listed} images checked, "
        f"{report.labels_checked} labels read, {classes}, "
        f"{report.ignored_fraction:.1%} of pixels ignored (255)"
    )
