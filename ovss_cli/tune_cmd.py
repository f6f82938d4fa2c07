"""``ovss tune``: a thin command over ``methods.tune.tune`` (label-free hyperparameter search)."""

from __future__ import annotations

import json

import click

from ovss_cli import render
from ovss_cli.common import parse_overrides, parse_settings, user_errors


def _floats(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated numbers") from None


def _ints(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated integers") from None


@click.command()
@click.option("--method", "-M", default="pnp-ovss", show_default=True, help="Method to tune.")
@click.option("--store", "-s", "store_path", required=True, help="Store of the images to score.")
@click.option("--classes", help="Comma-separated class names, e.g. 'sky,tree,horse'.")
@click.option(
    "--vocab",
    "vocab_file",
    type=click.Path(dir_okay=False),
    help="A class file (one class per line).",
)
@click.option("--dataset", help="Use a benchmark's classes.")
@click.option("--data-root", type=click.Path(file_okay=False), help="Root of the 'custom' dataset.")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="A fixed method option (repeatable), e.g. --set rounds=4.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="Fixed method options from a JSON file (as --set; --set wins).",
)
@click.option(
    "--image-classes",
    type=click.Path(dir_okay=False),
    help="JSON or CSV file: image id -> the classes in it (the paper's K(I)); default: every "
    "vocabulary class [ours]. Same as --set image_classes=FILE.",
)
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Random-search trials.",
)
@click.option(
    "--sample",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Images drawn from the store for the reward (0: all).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sample and search.")
@click.option(
    "--clip-model",
    default="clip-l14-336",
    show_default=True,
    help="CLIP of the reward (the paper: ViT-L/14 at 336 px); any CLIP of `ovss models`.",
)
@click.option(
    "--templates",
    default="single",
    show_default=True,
    help="Prompt templates of the reward's class texts [ours: single].",
)
@click.option(
    "--random-init",
    is_flag=True,
    help="Seeded random-init reward CLIP (tests, demos); BLIP comes from the store's set.",
)
@click.option(
    "--clip-arch-override",
    multiple=True,
    metavar="KEY=INT",
    help="Reduced reward-CLIP architecture (with --random-init; dotted keys nest).",
)
@click.option(
    "--clip-weights", type=click.Path(dir_okay=False), help="Checkpoint of the reward CLIP."
)
@click.option("--layers", help="Layers to search, counted from 1 (default 1-12).")
@click.option("--heads", help="Heads to search, counted from 1 (default 1-12).")
@click.option("--thresholds", help="Thresholds T (default 0.05,0.15,0.25,0.35,0.45).")
@click.option(
    "--blur-sigmas", help="Blur σ, fractions of the longer side (default 0.025,0.05,0.075,0.1)."
)
@click.option(
    "--log",
    "log_path",
    type=click.Path(dir_okay=False),
    help="Trials log (JSON lines): resumed when it exists, each new trial appended.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False),
    help="Write the best configuration here (JSON; segment/eval --config FILE).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N, mps.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def tune(
    method,
    store_path,
    classes,
    vocab_file,
    dataset,
    data_root,
    settings,
    config_file,
    image_classes,
    trials,
    sample,
    seed,
    clip_model,
    templates,
    random_init,
    clip_arch_override,
    clip_weights,
    layers,
    heads,
    thresholds,
    blur_sigmas,
    log_path,
    out_path,
    device,
    as_json,
    quiet,
):
    """Label-free hyperparameter search: PnP-OVSS's CLIP reward (masked image vs a black
    image) maximised by random search over layer, head, threshold and blur σ.

    Prints a table of trials with the best marked; --out writes the best configuration.
    """
    from featurestore.extract import resolve_device
    from methods.tune import TuneRequest, read_config_file
    from methods.tune import tune as run

    given = [x for x in (classes, vocab_file, dataset) if x]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --classes, --vocab or --dataset")
    spec = f"list:{classes}" if classes else (f"file:{vocab_file}" if vocab_file else dataset)
    fixed = dict(read_config_file(config_file)) if config_file else {}
    fixed.update(parse_settings(settings))
    if image_classes:
        fixed["image_classes"] = image_classes
    grid = {
        k: v
        for k, v in {
            "layers": _ints(layers),
            "heads": _ints(heads),
            "thresholds": _floats(thresholds),
            "blur_sigmas": _floats(blur_sigmas),
        }.items()
        if v is not None
    }
    request = TuneRequest(
        store=store_path,
        vocab_spec=spec,
        method=method,
        settings=fixed,
        trials=trials,
        sample=sample,
        seed=seed,
        clip_model=clip_model,
        templates=templates,
        random_init=random_init,
        clip_seed=seed,
        clip_arch_overrides=parse_overrides(clip_arch_override) or None,
        clip_weights=clip_weights,
        log=log_path,
        out=out_path,
        device=str(resolve_device(device)),
        data_root=data_root,
        **grid,
    )
    with render.progress(quiet) as cb:
        result = run(request, cb)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    table = render.Table(title=f"tune {result.method} (reward CLIP {result.clip_model})")
    for col in ("trial", "layer", "head", "threshold", "blur σ", "reward", "s", ""):
        table.add_column(col, justify="right")
    for r in result.trials:
        p = r["params"]
        mark = "best" if r["trial"] == result.best["trial"] else ("resumed" if r["resumed"] else "")
        table.add_row(
            str(r["trial"]),
            str(p["layer"]),
            str(p["head"]),
            f"{p['threshold']:g}",
            f"{p['blur_sigma']:g}",
            f"{r['reward']}/{r['max_reward']}",
            f"{r['seconds']:.1f}",
            mark,
        )
    render.out.print(table)
    render.out.print(
        f"best: {json.dumps(result.best_settings)}"
        + (f"; written to {result.out}" if result.out else "")
    )
