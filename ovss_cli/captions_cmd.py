"""``ovss captions inspect``: the concepts SimZSS finds in a caption file."""

from __future__ import annotations

import click

from ovss_cli import render
from ovss_cli.common import user_errors


@click.group()
def captions():
    """Caption files (training data of `ovss align --method simzss`)."""


@captions.command("inspect")
@click.option(
    "--captions",
    "captions_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="COCO captions JSON, or a CSV / JSONL of image,caption rows (image = store id or path).",
)
@click.option(
    "--store",
    "-s",
    "store_path",
    help="Join the captions to this store's images; captions of other images are counted "
    "(listed with --verbose).",
)
@click.option(
    "--concepts",
    type=click.Path(dir_okay=False),
    help="Extra concepts (one per line) added to the bank of the shipped class names.",
)
@click.option(
    "--spacy-model",
    help="Installed spaCy pipeline (package name or folder) for noun phrases; nothing is "
    "downloaded. Default: the offline bank matcher [ours] (lowercase, simple plurals, "
    "multi-word concepts, longest match first, word boundaries).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Captions listed (0: all); the summary counts every caption.",
)
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Concept frequencies shown.",
)
@click.option("--verbose", "-v", is_flag=True, help="Also list the captions of unknown images.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def inspect_cmd(
    captions_path, store_path, concepts, spacy_model, limit, top, verbose, as_json, quiet
):
    """Show, per caption, the concepts found and their token spans, and a summary.

    Spans are indices into the text tower's tokens (open_clip's tokenizer; 0 is the
    start-of-text token). The summary counts captions without a concept, captions whose
    image is not in --store, and the frequency of every concept.
    """
    from methods.concepts import inspect_captions

    with render.progress(quiet) as cb:
        rep = inspect_captions(
            captions_path,
            store_path,
            concepts,
            spacy_model,
            limit=None if limit == 0 else limit,
            progress=cb,
        )
    d = rep.to_dict()
    if not verbose:
        d["unknown"] = d["unknown"][:0]
    if as_json:
        render._json(d)
        return
    t = render.Table(title="concepts per caption")
    t.add_column("image")
    t.add_column("caption")
    t.add_column("concepts (token indices)")
    for row in d["captions"]:
        found = ", ".join(f"{c['name']} {c['tokens']}" for c in row["concepts"]) or "-"
        t.add_row(str(row["image"]), row["caption"], found)
    render.out.print(t)
    f = render.Table(title="concept frequencies")
    f.add_column("concept")
    f.add_column("occurrences", justify="right")
    for name, n in list(d["frequencies"].items())[:top]:
        f.add_row(name, str(n))
    render.out.print(f)
    render.kv("summary", d["summary"], False)
    if verbose and d["unknown"]:
        u = render.Table(title="captions of images not in the store")
        u.add_column("line", justify="right")
        u.add_column("image")
        u.add_column("caption")
        for r in d["unknown"]:
            u.add_row(str(r["line"]), r["image"], r["caption"])
        render.out.print(u)
