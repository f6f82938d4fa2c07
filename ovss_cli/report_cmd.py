"""``ovss report``: parse, call ``methods.report.write_report``, say where the page is."""

from __future__ import annotations

import click

from ovss_cli.common import user_errors


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--out",
    "-o",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="The HTML file to write (one self-contained page: no network, images embedded).",
)
@click.option("--title", default="ovss report", show_default=True, help="The page title.")
@user_errors
def report(results, out, title):
    """One HTML page of evaluation results (files of `ovss eval --out-json`).

    Shows the protocol, the summary, per-class IoU bars (sortable), the confusion matrix as a
    heat map, galleries image | prediction | ground truth of the best and worst images by
    per-image mIoU (read from the paths the result records), and sweeps as charts (metric
    against value) or comparisons side by side. Exit codes: 0 written, 1 error.
    """
    from methods.report import load_results, write_report

    path = write_report(load_results(results), out, title)
    click.echo(f"report written to {path}")
