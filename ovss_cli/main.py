"""The ``ovss`` command line. Each command parses options, calls one library function and
renders its result; results go to stdout (``--json`` for machines), progress/logs to stderr."""

from __future__ import annotations

import json
import sys

import click

from featurestore import __version__
from featurestore.images import HUGE_IMAGE_PIXELS
from ovss_cli import render
from ovss_cli.render import Table
from ovss_cli.common import (
    EXIT_PARTIAL,
    RegistryChoice,
    parse_overrides,
    parse_settings,
    parse_shard,
    storage_options_option,
    user_errors,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ovss")
def cli() -> None:
    """ovss: open-vocabulary semantic segmentation on cached feature stores.

    Run the expensive backbones once (`ovss extract`), then work from the store.
    """


# ------------------------------------------------------------------------------------------
# extract
# ------------------------------------------------------------------------------------------


def protocol_options(fn):
    opts = [
        click.option(
            "--resize",
            type=click.Choice(["short", "square", "long", "none", "halves"]),
            default="short",
            show_default=True,
            help="Resize rule: shorter side to --size (longer side capped at 2048, the "
            "benchmark rule), a --size square, longer side to --size, none, or halves (SAM "
            "only: the left and right image halves, each longer side to --size; Trident's "
            "Cityscapes input).",
        ),
        click.option(
            "--size",
            type=click.IntRange(min=1),
            default=448,
            show_default=True,
            help="Target side in pixels for the resize rule.",
        ),
        click.option(
            "--crop",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Sliding-window size in pixels (0: one window = whole resized image).",
        ),
        click.option(
            "--stride",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Sliding-window stride in pixels (needed with --crop).",
        ),
        click.option(
            "--pad-multiple",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Pad windows symmetrically to a multiple of this many pixels "
            "(0: the model's patch size).",
        ),
        click.option(
            "--align",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="SAM with --resize long/halves: first resize the image (OpenCV bilinear) so "
            "H and W round up to multiples of this many pixels, Trident's SAM input (its CLIP "
            "patch: 16, or 14 for CLIP-L/H). --for trident sets it itself.",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def make_protocol(resize, size, crop, stride, pad_multiple, align=0):
    from featurestore.protocol import Protocol

    try:
        return Protocol(
            resize=resize,
            size=size,
            crop=crop,
            stride=stride,
            pad_multiple=pad_multiple,
            align=align,
        )
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _component_names() -> list[str]:
    """``--for`` choices: every registered method and trainer."""
    from methods.plan import list_components

    return list_components()


def _template_sets() -> list[str]:
    from featurestore.text import list_template_sets

    return list_template_sets()


def image_source_options(fn):
    opts = [
        click.option(
            "--images",
            "images_dir",
            type=click.Path(file_okay=False),
            help="A folder of images (searched recursively).",
        ),
        click.option(
            "--dataset",
            help="A benchmark dataset name (ade20k, voc21, voc20, "
            "context60, context59, coco_stuff171, coco_object, "
            "cityscapes, custom).",
        ),
        click.option(
            "--data-root",
            type=click.Path(file_okay=False),
            help="Where the dataset lives (see README 'Datasets').",
        ),
        click.option(
            "--split",
            default=None,
            help="Dataset split (default: the benchmark's evaluation split).",
        ),
        click.option(
            "--limit",
            type=click.IntRange(min=1),
            default=None,
            help="Only the first N images (quick tries).",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def load_records(images_dir, dataset, data_root, split, limit):
    from featurestore.datasets import list_dataset_images
    from featurestore.images import list_folder_images

    if bool(images_dir) == bool(dataset):
        raise click.UsageError("give exactly one of --images DIR or --dataset NAME")
    if dataset:
        if not data_root:
            raise click.UsageError("--dataset needs --data-root")
        records = list_dataset_images(dataset, data_root, split)
    else:
        records = list_folder_images(images_dir)
    return records[:limit] if limit else records


@cli.command()
@click.option(
    "--model",
    "-m",
    "models",
    multiple=True,
    help="Backbone short name; repeat for several (see `ovss models`). With --for: replaces "
    "the model of the same family (CLIP, SAM, DINO...), else the one whose tensors it makes.",
)
@click.option(
    "--for",
    "for_method",
    type=RegistryChoice(_component_names),
    help="Extract exactly what a method or trainer needs (its feature sets, vocabulary, "
    "templates), with its --dataset preset; --set KEY=VALUE and "
    "--size/--crop/--stride/--pad-multiple change its config fields of those names "
    "(`ovss methods` lists them). Images come from --data-root or --images.",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="With --for: a config option of that method or trainer (repeatable; typed by its "
    "config, e.g. --set vfm_model=dinov2-b14 --set sam_refine=on).",
)
@click.option(
    "--vocab",
    "vocabs",
    multiple=True,
    metavar="SPEC",
    help="Also cache text embeddings of a vocabulary (repeatable): a dataset name "
    "(ade20k, voc21/proxyclip for the ProxyCLIP class file), a class file, or a comma list "
    "'sky,tree;trees,horse' (commas separate classes, ';' synonyms). Works on an existing "
    "store without --model.",
)
@click.option(
    "--templates",
    type=RegistryChoice(_template_sets),
    default=None,
    help="Template set of the text embeddings (default: openai80; with --for: the method's).",
)
@click.option(
    "--text-model",
    default=None,
    help="Text encoder that embeds --vocab: a CLIP (clip-b16, openclip:MODEL:TAG) or a kind a "
    "method registers (KIND:CHECKPOINT) (default: every clip-* model of the call, else "
    "clip-b16). --random-init/--seed/--weights/--arch-override apply to it too.",
)
@image_source_options
@click.option(
    "--store", "-s", required=True, help="Store path (created if absent, resumed if present)."
)
@protocol_options
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Windows per forward pass; higher is faster on GPU but uses more memory.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
    default="auto",
    show_default=True,
    help="Compute precision (auto: fp16 autocast on CUDA, fp32 on CPU).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32", "bfloat16"]),
    default="float16",
    show_default=True,
    help="Storage dtype of the features.",
)
@click.option(
    "--shard",
    help="i/n: write only this process's part (SLURM arrays). Default: "
    "RANK/WORLD_SIZE under torchrun, else 0/1.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace existing feature sets of these models and protocol (the store itself is kept).",
)
@click.option(
    "--weights",
    type=click.Path(),
    help="Checkpoint file, or a Hugging Face model folder for BLIP (else $OVSS_WEIGHTS, "
    "library caches, hub when online).",
)
@click.option(
    "--random-init",
    is_flag=True,
    help="Real architecture with seeded random weights (recorded in provenance).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-init.")
@click.option("--layers", default="", help="Extra intermediate layers to cache, e.g. '3,7'.")
@click.option(
    "--block-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=32.0,
    show_default=True,
    help="Target size of one store block (one chunk file per tensor).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Image decoding threads.",
)
@click.option(
    "--arch-override",
    "arch_override",
    multiple=True,
    metavar="KEY=INT",
    help="Reduced configuration of the same architecture, e.g. depth=2 "
    "embed_dim=64 num_heads=2; dotted keys nest (CLIP: embed_dim=32 vision_cfg.layers=2 "
    "vision_cfg.width=64 vision_cfg.heads=2 text_cfg.layers=1 ...). Tests and demos; "
    "recorded in provenance.",
)
@click.option(
    "--pos-interp",
    "pos_interp",
    default=None,
    metavar="RULE",
    help="How absolute position embeddings are resampled to a window's patch grid: offset "
    "(scale factor (g + 0.1) / g0, the authors'), size (exact output size) or size-aa (with "
    "antialiasing). Default: each model's authors' rule (offset for CLIP, DINO and DINOv2; "
    "size-aa for DINOv2 with registers). Recorded in provenance.",
)
@click.option(
    "--dry-run", is_flag=True, help="Show images, windows, tokens and bytes; write nothing."
)
@click.option(
    "--allow-failed",
    is_flag=True,
    help="Exit 0 even when some images could not be read (default: exit status 3; the "
    "readable ones are extracted either way and the others listed).",
)
@click.option(
    "--max-pixels",
    "max_pixels",
    type=click.IntRange(min=1),
    default=None,
    help="Images with more pixels than this (height x width) are decoded reduced to just above "
    "the size they are resized to, so memory follows that size; their features differ slightly "
    f"from a full decode [ours] (default: {HUGE_IMAGE_PIXELS}). Images over twice PIL's "
    "decompression-bomb limit (about 179 million pixels) are refused as unreadable.",
)
@storage_options_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def extract(
    models,
    for_method,
    settings,
    vocabs,
    templates,
    text_model,
    images_dir,
    dataset,
    data_root,
    split,
    limit,
    store,
    resize,
    size,
    crop,
    stride,
    pad_multiple,
    align,
    batch_size,
    device,
    precision,
    dtype,
    shard,
    overwrite,
    weights,
    random_init,
    seed,
    layers,
    block_mb,
    workers,
    arch_override,
    pos_interp,
    dry_run,
    allow_failed,
    max_pixels,
    as_json,
    quiet,
):
    """Run backbones over images and write their dense features into a store.

    Resumes by default: finished blocks of images are never recomputed. Concurrent processes
    with --shard i/n write disjoint blocks of the same store. `--for NAME --dataset DS`
    extracts what a method or trainer needs with its per-dataset preset; `--vocab` caches
    text embeddings (computed by shard 0 only).
    """
    from methods.plan import ExtractRequest, plan_extract, run_extract

    if (templates or text_model) and not (for_method or vocabs):
        raise click.UsageError("--templates and --text-model go with --vocab or --for")
    ctx = click.get_current_context()
    names = ("resize", "size", "crop", "stride", "pad_multiple", "align")
    given = tuple(
        n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE
    )
    records = extract_records(
        models, for_method, vocabs, images_dir, dataset, data_root, split, limit, dry_run
    )
    try:
        layer_ids = tuple(int(x) for x in layers.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter("--layers takes comma-separated integers") from None
    request = ExtractRequest(
        store=store,
        records=records,
        models=list(models),
        component=for_method,
        dataset=dataset,
        settings=parse_settings(settings),
        protocol=dict(zip(names, (resize, size, crop, stride, pad_multiple, align), strict=True)),
        protocol_given=given,
        vocabs=list(vocabs),
        templates=templates,
        text_model=text_model,
        data_root=data_root,
        runtime={
            "batch_size": batch_size,
            "device": device,
            "precision": precision,
            "dtype": dtype,
            "shard": parse_shard(shard),
            "overwrite": overwrite,
            "weights": weights,
            "random_init": random_init,
            "seed": seed,
            "layers": layer_ids,
            "block_mb": block_mb,
            "workers": workers,
            "arch_overrides": parse_overrides(arch_override),
            "pos_interp": pos_interp,
            **({} if max_pixels is None else {"max_pixels": max_pixels}),
        },
    )
    if dry_run:
        job_plan = plan_extract(request)
        if job_plan.plain:  # the plain call: the original report shape
            render.plan(job_plan.feature_sets, as_json)
        else:
            render_job_plan(job_plan, as_json)
        return
    with render.progress(quiet) as cb:
        report = run_extract(request, progress=cb)
    if report.plain:
        render.extract_report(report, as_json)
    else:
        render_job_report(report, as_json)
    if not allow_failed and any(m.images_failed for m in report.models):
        sys.exit(EXIT_PARTIAL)


def extract_records(
    models: tuple[str, ...],
    for_method: str | None,
    vocabs: tuple[str, ...],
    images_dir: str | None,
    dataset: str | None,
    data_root: str | None,
    split: str | None,
    limit: int | None,
    dry_run: bool,
) -> list:
    """The images of an `extract` call (see its help for which options name them)."""
    from featurestore.datasets import list_dataset_images
    from featurestore.images import list_folder_images

    if for_method:
        if images_dir:
            records = list_folder_images(images_dir)
        elif data_root and dataset:
            records = list_dataset_images(dataset, data_root, split)
        elif dry_run:
            return []  # the recipe alone, without sizes
        else:
            where = f"--data-root PATH (the {dataset} dataset)" if dataset else "--dataset NAME"
            raise click.UsageError(f"--for {for_method} needs the images: {where} or --images DIR")
        return records[:limit] if limit else records
    if not models:
        if not vocabs:
            raise click.UsageError("give --model NAME (or --for METHOD, or --vocab SPEC)")
        if not images_dir and not (dataset and data_root):
            return []  # text sets only, into an existing store
    return load_records(images_dir, dataset, data_root, split, limit)


def render_job_plan(job_plan, as_json: bool) -> None:
    """Dry run of a recipe / --vocab call: the recipe, the feature sets, the text sets."""
    if as_json:
        click.echo(json.dumps(job_plan.to_dict(), indent=2, default=str))
        return
    if job_plan.recipe:
        render_recipe(job_plan.recipe)
    if job_plan.feature_sets:
        if all(r.images == 0 for r in job_plan.feature_sets):
            render.out.print("no images given: sizes need --data-root PATH or --images DIR")
        else:
            render.plan(job_plan.feature_sets, False)
    if job_plan.text_sets:
        t = Table(title="text embeddings (dry run)")
        for c in ("text set", "source", "classes", "queries", "templates", "dim", "size", "state"):
            t.add_column(c)
        for r in job_plan.text_sets:
            t.add_row(
                r.key,
                r.source,
                str(r.classes),
                str(r.queries),
                f"{r.template_set} ({r.templates})",
                str(r.dim) if r.dim is not None else "-",
                render.human_bytes(r.bytes),
                "cached" if r.cached else "to compute",
            )
        render.out.print(t)


def _protocol_words(p: dict) -> str:
    desc = f"{p['resize']} {p['size']}"
    if p.get("align"):
        desc += f", sides rounded up to x{p['align']}"
    if p["crop"]:
        desc += f", windows {p['crop']}/{p['stride']}"
    if p["pad_multiple"]:
        desc += f", pad to {p['pad_multiple']}"
    return desc


def plain_extract_command(step: dict, dataset: str | None) -> str | None:
    """The plain `ovss extract` call that makes one recipe step's feature set, or None when
    its resize rule has no --resize of its own (a canvas only --for makes)."""
    from featurestore.protocol import Protocol

    p = Protocol.from_dict(step["protocol"])
    resize_opt = next(o for o in cli.commands["extract"].params if o.name == "resize")
    if p.resize not in resize_opt.type.choices:
        return None
    cmd = f"ovss extract --store STORE --model {step['model']} --resize {p.resize}"
    if p.resize != "none":
        cmd += f" --size {p.size}"
    for name in ("crop", "stride", "pad_multiple", "align"):
        if getattr(p, name):
            cmd += f" --{name.replace('_', '-')} {getattr(p, name)}"
    where = f"--dataset {dataset} --data-root PATH" if dataset else "--images DIR"
    return f"{cmd} {where}"


def render_recipe(recipe: dict) -> None:
    """The recipe of a `--for` call: steps, vocabulary, method settings, notes."""
    title = f"recipe: --for {recipe['method']}"
    if recipe["dataset"]:
        title += f" --dataset {recipe['dataset']}"
    t = Table(title=title)
    for c in ("role", "model", "feature set", "protocol"):
        t.add_column(c)
    for s in recipe["steps"]:
        t.add_row(s["role"], s["model"], s["feature_set"], _protocol_words(s["protocol"]))
    for s in recipe.get("live", []):
        t.add_row(s["role"], s["model"], "-", "runs on pixels (needs the images)")
    render.out.print(t)
    if recipe["vocab"]:
        render.out.print(
            f"vocabulary {recipe['vocab']}, templates {recipe['templates']}, "
            f"text model {recipe['text_model']}"
        )
    settings = ", ".join(f"{k}={v}" for k, v in recipe["settings"].items())
    if settings:
        render.out.print(f"method settings (same preset row): {settings}")
    for n in recipe["notes"]:
        render.out.print(f"[yellow]note[/]: {n}")
    for s in recipe.get("optional", []):
        cmd = plain_extract_command(s, recipe["dataset"])
        how = f": {cmd}" if cmd else ""
        render.out.print(
            f"[yellow]optional[/]: {s['feature_set']} ({s['role']}) is read when present, "
            f"not extracted by this recipe{how}",
            soft_wrap=True,
        )


def render_job_report(rep, as_json: bool) -> None:
    """Report of a recipe / --vocab call: feature sets as usual, then the text sets."""
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2, default=str))
        return
    if rep.models:
        render.extract_report(rep, False)
    if rep.text_sets:
        t = Table(title=f"text embeddings in {rep.store}")
        for c in ("text set", "source", "classes", "queries", "templates", "status", "s"):
            t.add_column(c)
        for r in rep.text_sets:
            t.add_row(
                r.key or "-",
                r.source,
                str(r.classes),
                str(r.queries),
                r.template_set,
                r.status,
                f"{r.seconds:.1f}",
            )
        render.out.print(t)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def models(as_json):
    """List the backbones `ovss extract --model` accepts."""
    from featurestore.model_catalog import model_rows

    render.models(model_rows(), as_json)


# ------------------------------------------------------------------------------------------
# store
# ------------------------------------------------------------------------------------------


@cli.group()
def store():
    """Inspect, check and export feature stores."""


@store.command("info")
@click.argument("store_path", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@storage_options_option
@user_errors
def store_info(store_path, as_json):
    """Feature sets, tensors, provenance, completeness and sizes of a store."""
    from featurestore.inspect import store_info as info

    render.store_info(info(store_path), as_json)


@store.command("ls")
@click.argument("store_path", metavar="STORE")
@click.option("--images", is_flag=True, help="List image ids instead of feature sets.")
@storage_options_option
@user_errors
def store_ls(store_path, images):
    """One line per feature set (or per image with --images)."""
    from featurestore.store import FeatureStore

    st = FeatureStore.open(store_path)
    for line in st.image_ids if images else st.feature_sets():
        click.echo(line)


@store.command("verify")
@click.argument("store_path", metavar="STORE")
@click.option(
    "--no-values",
    is_flag=True,
    help="Skip reading the data: no checksum or NaN/inf check (metadata and chunk sizes only).",
)
@click.option(
    "--fix",
    is_flag=True,
    help="Mark every damaged block pending again, so rerunning the extraction that made the "
    "set recomputes exactly those blocks.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print as JSON (each finding with its location)."
)
@storage_options_option
@user_errors
def store_verify(store_path, no_values, fix, as_json):
    """Check a store: the image table, unfinished sets, provenance, geometry, shapes, dtypes,
    pending images, and per finished block its chunk files, checksums and NaN/inf.

    Exits with status 1 when a problem is found (also with --fix, which repairs by marking).
    """
    from featurestore.inspect import verify_store

    rep = verify_store(store_path, scan_values=not no_values, fix=fix)
    render.verify(rep, as_json)
    if not rep.ok:
        sys.exit(1)


@store.command("export")
@click.argument("store_path", metavar="STORE")
@click.argument("out", metavar="OUT")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hdf5"]),
    default="hdf5",
    show_default=True,
    help="Output format (HDF5 layout: see README).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@storage_options_option
@user_errors
def store_export(store_path, out, fmt, as_json):
    """Export a store to one HDF5 file, readable back as a store (`ovss store info OUT.h5`)."""
    from featurestore.hdf5 import export_hdf5

    summary = export_hdf5(store_path, out)
    render.kv("export", summary, as_json)


# ------------------------------------------------------------------------------------------
# demo / doctor
# ------------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--out",
    default="demo_out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo writes its dataset, store and outputs.",
)
@click.option("--model", default="dinov2-s14", show_default=True, help="DINO backbone.")
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    help="Real checkpoint for --model (default: random init, real architecture).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data and weights.")
@click.option(
    "--n-train",
    type=click.IntRange(min=1),
    default=24,
    show_default=True,
    help="Training collages.",
)
@click.option(
    "--n-val", type=click.IntRange(min=1), default=8, show_default=True, help="Validation collages."
)
@click.option(
    "--with-maskclip",
    is_flag=True,
    help="Also extract CLIP ViT-B/16 (random init) and run maskclip on the val split.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def demo(out, model, weights, seed, n_train, n_val, with_maskclip, as_json, quiet):
    """The embedded default, end to end on CPU in under a minute.

    \b
    Builds Voronoi collages of scikit-image photographs (8 texture classes, train/val), then:
    extract DINOv2 ViT-S/14 features (real architecture, random weights unless --weights) ->
    cluster (per-image k=16 masks; k=8 codebook scored with Hungarian matching) ->
    align (FMbSeg Stage 2, TSupCon; the train labels stand in for Stage-1 pseudo-labels) ->
    segment + eval the val collages (per-class IoU table, label PNGs and overlays) ->
    Trident with tiny random CLIP/DINO/SAM (pipeline check). Re-running resumes.
    """
    from methods.demo import run_demo

    with render.progress(quiet) as cb:
        result = run_demo(
            out,
            model=model,
            weights=weights,
            seed=seed,
            n_train=n_train,
            n_val=n_val,
            progress=cb,
            with_maskclip=with_maskclip,
        )
    render.demo(result, as_json)


@cli.command()
@click.option("--store", "store_path", help="Also check that this store opens.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def doctor(store_path, as_json):
    """Environment report: versions, devices, FAISS, weights found or missing, whether the
    scoring kernel is compiled."""
    from methods.doctor import doctor_report

    render.doctor(doctor_report(store_path), as_json)


# Commands defined in their own modules (one line each).
# -- command registry (keep one import + add_command per line pair) --
from ovss_cli.data_cmd import data  # noqa: E402

cli.add_command(data)
from ovss_cli.segment_cmd import eval_cmd, methods, segment  # noqa: E402

cli.add_command(segment)
cli.add_command(eval_cmd)
cli.add_command(methods)
from ovss_cli.align_cmd import align, cluster  # noqa: E402

cli.add_command(align)
cli.add_command(cluster)
from ovss_cli.captions_cmd import captions  # noqa: E402

cli.add_command(captions)
from ovss_cli.tune_cmd import tune  # noqa: E402

cli.add_command(tune)
from ovss_cli.report_cmd import report  # noqa: E402

cli.add_command(report)


def main() -> None:  # pragma: no cover
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
