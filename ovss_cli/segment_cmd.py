"""``ovss segment`` and ``ovss eval``: thin commands over ``methods.segment`` / ``methods.evaluate``."""

from __future__ import annotations

import json
import sys

import click

from ovss_cli import render
from ovss_cli.common import parse_overrides, parse_settings, user_errors

#: The [ours] choices of the FMbSeg methods, shown under `segment --help` / `eval --help`.
FMBSEG_EPILOG = """\b
FMbSeg choices marked [ours] (no public code; `ovss methods` lists every option):
  fmbseg-stage1: a class is present when >= min_crops [ours: 2] crops are assigned
    to it; synonyms are merged by max over their queries [ours]; an automatic mask
    (Stage 1.2) gets the present class most similar to the mean of the l2-normalised
    dense features under its pixels [ours]; min_area [ours: 0 px]; merge [ours]: 1.1
    first (higher SAM score wins overlaps), 1.2 only on unlabelled pixels, 255 else.
  aligned: --checkpoint from `ovss align`; text model and templates default to the
    checkpoint's (else clip-b16 / single).
"""


def method_options(fn):
    opts = [
        click.option(
            "--method",
            "-M",
            "method",
            default="prototype",
            show_default=True,
            help="Segmentation method (see `ovss methods`).",
        ),
        click.option(
            "--set",
            "settings",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override a method option (repeatable), e.g. --set beta=1.2.",
        ),
        click.option(
            "--checkpoint",
            type=click.Path(dir_okay=False),
            default=None,
            help="Trained module of a method that takes one (aligned: the last.pt of "
            "`ovss align`); same as --set checkpoint=PATH. An error for other methods.",
        ),
        click.option(
            "--sam-refine",
            is_flag=True,
            help="Trident: refine labels with SAM prompts decoded from the cached embedding.",
        ),
        click.option(
            "--logit-scale",
            type=float,
            default=None,
            help="Softmax temperature on cosine logits (default 40 or the preset).",
        ),
        click.option(
            "--prob-thd",
            type=float,
            default=None,
            help="Pixels whose best class probability is below this become class 0 "
            "(default: the dataset preset; 0 without background).",
        ),
        click.option(
            "--area-thd", type=float, default=None, help="SCLIP's VOC21 area rule (off by default)."
        ),
        click.option(
            "--templates",
            default=None,
            help="Prompt template set for the class names (see README). Default: openai80; "
            "aligned: the set recorded in --checkpoint (else single, as FMbSeg); "
            "fmbseg-stage1: the fmbseg recipe's (single).",
        ),
        click.option(
            "--text-model",
            default=None,
            help="CLIP model whose text tower embeds the classes (default: the method's).",
        ),
        click.option(
            "--family",
            type=click.Choice(["sclip", "proxyclip"]),
            default=None,
            help="Class-file family for dataset vocabularies (default: the method's).",
        ),
        click.option(
            "--text-random-init",
            is_flag=True,
            help="Embed classes with a seeded random-init text tower (tests, demos).",
        ),
        click.option(
            "--text-arch-override",
            multiple=True,
            metavar="KEY=INT",
            help="Reduced text-tower configuration (with --text-random-init).",
        ),
        click.option(
            "--text-weights",
            type=click.Path(dir_okay=False),
            help="Checkpoint of the CLIP text tower (else the usual resolution).",
        ),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Seed for --text-random-init."
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="auto [ours: default] = the GPU of LOCAL_RANK (0 outside torchrun) when CUDA "
            "is available, else Apple MPS when present, else cpu; or cpu, cuda, cuda:N, mps.",
        ),
        click.option("--limit", type=int, default=None, help="Only the first N images."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _method_setup(
    method,
    settings,
    logit_scale,
    prob_thd,
    area_thd,
    dataset,
    sam_refine=False,
    checkpoint=None,
):
    import dataclasses

    from methods.base import ScoringConfig, get_method

    cls = get_method(method)
    overrides: dict = dict(parse_settings(settings))
    if sam_refine:
        overrides["sam_refine"] = True
    if checkpoint:
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        if "checkpoint" not in fields:
            raise click.UsageError(
                f"--checkpoint: method '{method}' takes no checkpoint (the aligned method does)"
            )
        given = overrides.get("checkpoint")
        if given not in (None, "") and str(given) != str(checkpoint):
            raise click.UsageError(
                f"--checkpoint {checkpoint} and --set checkpoint={given} disagree; give one"
            )
        overrides["checkpoint"] = str(checkpoint)
    scoring = dict(cls.scoring_presets(dataset) if dataset else {})
    for k, v in (("logit_scale", logit_scale), ("prob_thd", prob_thd), ("area_thd", area_thd)):
        if v is not None:
            scoring[k] = v
    return cls, overrides, ScoringConfig(**scoring)


def default_templates(method: str, overrides: dict, dataset: str | None = None) -> str:
    """The template set used when --templates is not given.

    ``aligned``: the set recorded in its checkpoint (the module was trained against those
    embeddings; read from its cached provenance), else ``single`` (FMbSeg's one template);
    ``fmbseg-stage1``: the ``fmbseg`` extraction recipe's (the same on every ``dataset``); any
    other method: ``openai80`` (METHODS.md §0.1).
    """
    from featurestore.text import DEFAULT_TEMPLATES

    if method == "aligned":
        ckpt = overrides.get("checkpoint")
        if ckpt:
            from methods.aligned import checkpoint_provenance

            voc = checkpoint_provenance(str(ckpt)).get("vocabulary", {})
            if voc.get("templates"):
                return str(voc["templates"])
        return "single"
    if method == "fmbseg-stage1":
        from featurestore.recipes import BENCHMARKS, recipe_for

        # the fmbseg recipe's templates do not depend on the benchmark
        return recipe_for("fmbseg", BENCHMARKS[0]).templates
    return DEFAULT_TEMPLATES


def _vocab(
    store,
    cls,
    overrides,
    vocab_spec,
    family,
    templates,
    text_model,
    dataset,
    data_root,
    text_random_init,
    text_arch_override,
    text_weights,
    seed,
    quiet,
):
    from featurestore.text import get_text_embeddings, parse_vocab
    from methods.base import build_config
    from methods.segment import vocab_from_text

    config = build_config(cls, dataset, overrides)
    templates = templates or default_templates(cls.name, overrides, dataset)
    text_model = text_model or getattr(config, "text_model", "clip-b16")
    family = family or getattr(config, "class_family", "sclip")
    vocab = parse_vocab(vocab_spec, family=family, data_root=data_root)
    te = get_text_embeddings(
        store,
        text_model,
        vocab,
        templates,
        weights=text_weights,
        random_init=text_random_init,
        seed=seed,
        arch_overrides=parse_overrides(text_arch_override),
    )
    return vocab_from_text(te, source=vocab.describe())


def _device(device: str) -> str:
    """``--device`` as a torch device string (``auto`` resolved, see ``resolve_device``)."""
    from methods.fmbseg import resolve_device

    return str(resolve_device(device))


@click.command(epilog=FMBSEG_EPILOG)
@click.option("--store", "-s", "store_path", help="Feature store to segment.")
@click.option(
    "--images",
    "image_paths",
    multiple=True,
    type=click.Path(exists=True),
    help="Images or folders to segment instead of a store: the method's features are "
    "extracted on the fly into a temporary store (or --keep-store PATH).",
)
@click.option(
    "--keep-store",
    type=click.Path(file_okay=False),
    help="With --images: extract into this store (kept, resumable) instead of a temporary one.",
)
@click.option(
    "--random-init",
    is_flag=True,
    help="With --images: image backbones with seeded random weights (tests, demos).",
)
@click.option(
    "--arch-override",
    multiple=True,
    metavar="KEY=INT",
    help="With --images: reduced image-backbone configuration (dotted keys nest).",
)
@click.option("--classes", help="Comma-separated class names, e.g. 'sky,tree,horse'.")
@click.option(
    "--vocab",
    "vocab_file",
    type=click.Path(dir_okay=False),
    help="A class file (one class per line; synonyms separated by ', ' or '; ').",
)
@click.option("--dataset", help="Use a benchmark's classes (and its method presets).")
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    help="Root of the 'custom' dataset (its classes.txt).",
)
@click.option(
    "--out",
    "-o",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for label PNGs, overlays and score maps.",
)
@click.option("--no-overlay", is_flag=True, help="Do not write colour overlays.")
@click.option("--score-maps", is_flag=True, help="Also write per-class probability maps (.npy).")
@click.option(
    "--write-labels",
    metavar="NAME",
    help="Store the label maps in the store as label set NAME (pseudo-labels).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing label set NAME.")
@method_options
@user_errors
def segment(
    store_path,
    image_paths,
    keep_store,
    random_init,
    arch_override,
    classes,
    vocab_file,
    dataset,
    data_root,
    out_dir,
    no_overlay,
    score_maps,
    write_labels,
    overwrite,
    method,
    settings,
    checkpoint,
    sam_refine,
    logit_scale,
    prob_thd,
    area_thd,
    templates,
    text_model,
    family,
    text_random_init,
    text_arch_override,
    text_weights,
    seed,
    device,
    limit,
    as_json,
    quiet,
):
    """Segment the images of a store with any method and vocabulary.

    Writes per image a label PNG (class indices), a colour overlay with a legend and, with
    --score-maps, per-class probability maps; --write-labels stores the result in the store.
    """
    import tempfile

    from methods.segment import extract_for_method, records_from_paths, segment_store

    if bool(store_path) == bool(image_paths):
        raise click.UsageError("give exactly one of --store or --images")
    given = [x for x in (classes, vocab_file, dataset) if x]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --classes, --vocab or --dataset")
    if not out_dir and not write_labels:
        raise click.UsageError("nothing to write: give --out DIR and/or --write-labels NAME")
    cls, overrides, scoring = _method_setup(
        method, settings, logit_scale, prob_thd, area_thd, dataset, sam_refine, checkpoint
    )
    device = _device(device)
    tmp = None
    if image_paths and write_labels and not keep_store:
        raise click.UsageError("--write-labels with --images needs --keep-store PATH")
    if image_paths:
        records = records_from_paths(image_paths)
        if keep_store:
            store_path = keep_store
        else:
            tmp = tempfile.TemporaryDirectory(prefix="ovss-segment-")
            store_path = f"{tmp.name}/store.zarr"
        with render.progress(quiet) as cb:
            extract_for_method(
                records,
                store_path,
                method,
                dataset,
                overrides,
                random_init=random_init,
                seed=seed,
                arch_overrides=parse_overrides(arch_override),
                device=device,
                progress=cb,
            )
    spec = classes if classes else (f"file:{vocab_file}" if vocab_file else dataset)
    vocab = _vocab(
        store_path,
        cls,
        overrides,
        spec,
        family,
        templates,
        text_model,
        dataset,
        data_root,
        text_random_init,
        text_arch_override,
        text_weights,
        seed,
        quiet,
    )
    indices = list(range(limit)) if limit else None
    with render.progress(quiet) as cb:
        summary = segment_store(
            store_path,
            method,
            vocab,
            out_dir,
            dataset=dataset,
            overrides=overrides,
            scoring=scoring,
            overlays=not no_overlay,
            score_maps=score_maps,
            indices=indices,
            device=device,
            progress=cb,
            write_labels=write_labels,
            overwrite_labels=overwrite,
        )
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        d = summary.to_dict()
        d.pop("files")
        render.kv("segment", d, False)
    if tmp is not None:
        tmp.cleanup()


@click.command("eval", epilog=FMBSEG_EPILOG)
@click.option("--dataset", required=True, help="Benchmark name (see `ovss data list`).")
@click.option(
    "--data-root", required=True, type=click.Path(file_okay=False), help="Where the dataset lives."
)
@click.option("--split", default=None, help="Split (default: the benchmark's evaluation split).")
@click.option("--store", "-s", "store_path", help="Feature store of the dataset's images.")
@click.option(
    "--predictions",
    type=click.Path(file_okay=False),
    help="Score a folder of label PNGs (<image id>.png) instead of running a method.",
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False),
    help="Also write the per-class table as CSV.",
)
@click.option(
    "--out-json",
    type=click.Path(dir_okay=False),
    help="Also write the full result (metrics + protocol) as a JSON file.",
)
@click.option(
    "--check-reference",
    is_flag=True,
    help="Compare with the published numbers when the configuration matches one.",
)
@method_options
@user_errors
def eval_cmd(
    dataset,
    data_root,
    split,
    store_path,
    predictions,
    csv_path,
    out_json,
    check_reference,
    method,
    settings,
    checkpoint,
    sam_refine,
    logit_scale,
    prob_thd,
    area_thd,
    templates,
    text_model,
    family,
    text_random_init,
    text_arch_override,
    text_weights,
    seed,
    device,
    limit,
    as_json,
    quiet,
):
    """mIoU / mAcc / aAcc with mmseg IoUMetric semantics, per-class table, full protocol.

    Either runs --method on --store, or scores --predictions from any tool.
    """
    from methods.evaluate import evaluate_predictions, evaluate_store
    from methods.reference import check_reference as check

    if bool(store_path) == bool(predictions):
        raise click.UsageError("give exactly one of --store or --predictions")
    with render.progress(quiet) as cb:
        if predictions:
            result = evaluate_predictions(dataset, data_root, predictions, split, limit, cb)
        else:
            cls, overrides, scoring = _method_setup(
                method, settings, logit_scale, prob_thd, area_thd, dataset, sam_refine, checkpoint
            )
            device = _device(device)
            vocab = _vocab(
                store_path,
                cls,
                overrides,
                dataset,
                family,
                templates,
                text_model,
                dataset,
                data_root,
                text_random_init,
                text_arch_override,
                text_weights,
                seed,
                quiet,
            )
            result = evaluate_store(
                store_path,
                dataset,
                data_root,
                method,
                vocab,
                split,
                overrides,
                scoring,
                limit,
                device,
                cb,
            )
    if check_reference:
        result.reference = check(result)
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(result.to_dict(), fh, indent=2)
    if csv_path:
        render.eval_csv(result, csv_path)
    render.eval_result(result, as_json)
    if not result.images:
        sys.exit(1)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def methods(as_json):
    """List the segmentation methods with their options and defaults."""
    import dataclasses

    from methods.base import config_to_dict, get_method, list_methods

    rows = []
    for name in list_methods():
        cls = get_method(name)
        defaults = config_to_dict(cls.Config())
        rows.append(
            {
                "name": name,
                "doc": cls.doc,
                "options": defaults,
                "fields": [f.name for f in dataclasses.fields(cls.Config)],
            }
        )
    render.methods(rows, as_json)
