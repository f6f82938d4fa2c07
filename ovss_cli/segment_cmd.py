"""``ovss segment``, ``ovss eval`` and ``ovss methods``: parse, build the request, call one
library function (``methods.segment.run_segment`` / ``methods.evaluate.run_eval`` /
``methods.method_catalog.describe_methods``), render."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ovss_cli import render
from ovss_cli.common import (
    add_options,
    parse_overrides,
    parse_settings,
    storage_options_option,
    store_name,
    user_errors,
)
from ovss_cli.hints import checkpoint_hint, hint_for, render_error

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

#: The flags a library ``RequestError.option`` stands for, per command.
SEGMENT_FLAGS = {
    "store": "--store / --images",
    "classes": "--classes / --vocab / --dataset",
    "out_dir": "--out / --write-labels",
    "keep_store": "--keep-store",
}
EVAL_FLAGS = {"store": "--store / --predictions", "dataset": "--dataset / --data-root"}
METHOD_FLAGS = {
    "checkpoint": "--checkpoint",
    "sam_refine": "--sam-refine",
    "weights": "--weights",
}

METHOD_OPTIONS = [
    click.option(
        "--method",
        "-M",
        "method",
        default=None,
        help="Segmentation method (see `ovss methods`; default: prototype [ours]).",
    ),
    click.option(
        "--set",
        "settings",
        multiple=True,
        metavar="KEY=VALUE",
        help="Set a method option (repeatable), e.g. --set size=336; the value is read as the "
        "option's type (a wrong one is an error naming the option and the type).",
    ),
    click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Method options from a JSON file (`ovss tune --out`, or a flat object of options); "
        "equivalent to --set, which wins where both give an option.",
    ),
    click.option(
        "--image-classes",
        type=click.Path(dir_okay=False),
        default=None,
        help="pnp-ovss: JSON or CSV file of the classes in each image (image id -> classes); "
        "same as --set image_classes=FILE. Default: every vocabulary class [ours].",
    ),
    click.option(
        "--checkpoint",
        type=click.Path(dir_okay=False),
        default=None,
        help="Trained module of a method that takes one (aligned: the last.pt of "
        "`ovss align`); same as --set checkpoint=PATH. An error for other methods.",
    ),
    click.option(
        "--trust-checkpoint",
        is_flag=True,
        default=None,
        help="Load the --checkpoint file even if it holds pickled Python objects (an old "
        "checkpoint, refused otherwise): code in the file runs, so only for a file whose "
        "origin you know.",
    ),
    click.option(
        "--sam-refine",
        is_flag=True,
        default=None,
        help="Refine labels with SAM prompts decoded from the cached embedding (trident); "
        "an error for methods without SAM refinement.",
    ),
    click.option(
        "--logit-scale",
        type=float,
        default=None,
        help="Softmax temperature on cosine logits (default: the dataset preset, else 40).",
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
        help="Prompt template set for the class names (see README). Default: the method's "
        "(openai80; aligned: the set recorded in --checkpoint, else single; fmbseg-stage1: "
        "single).",
    ),
    click.option(
        "--text-model",
        default=None,
        help="Text encoder that embeds the classes (default: the method's, e.g. its CLIP).",
    ),
    click.option(
        "--family",
        type=click.Choice(["sclip", "proxyclip", "clearclip"]),
        default=None,
        help="Class-file family for dataset vocabularies (default: the method's).",
    ),
    click.option(
        "--random-init",
        is_flag=True,
        default=None,
        help="Seeded random weights for every tower the command builds: the image backbones "
        "of --images and the text tower (tests, demos).",
    ),
    click.option(
        "--text-random-init",
        is_flag=True,
        default=None,
        help="Seeded random weights for the text tower only (--random-init covers it too).",
    ),
    click.option(
        "--weights",
        type=click.Path(),
        default=None,
        help="Checkpoint of the image backbone of --images (methods reading one model; a "
        "Hugging Face folder for BLIP), also "
        "used for the text tower when that is the same CLIP, or when no image model is "
        "built [ours]. Else the usual resolution ($OVSS_WEIGHTS, caches, hub).",
    ),
    click.option(
        "--text-weights",
        type=click.Path(dir_okay=False),
        default=None,
        help="Checkpoint of the text tower (wins over --weights for it).",
    ),
    click.option(
        "--arch-override",
        multiple=True,
        metavar="KEY=INT",
        help="Reduced architecture (with --random-init; dotted keys nest): the image "
        "backbones of --images, and the text tower of the same CLIP or when no image model "
        "is built.",
    ),
    click.option(
        "--text-arch-override",
        multiple=True,
        metavar="KEY=INT",
        help="Reduced text-tower architecture (wins over --arch-override for it).",
    ),
    click.option(
        "--seed", type=int, default=None, help="Seed of the random initialisations (default 0)."
    ),
    click.option(
        "--device",
        default=None,
        help="auto [ours: default] = the GPU of LOCAL_RANK (0 outside torchrun) when CUDA "
        "is available, else Apple MPS when present, else cpu; or cpu, cuda, cuda:N, mps.",
    ),
    click.option(
        "--limit", type=click.IntRange(min=1), default=None, help="Only the first N images."
    ),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
]


def _settings(config_file, settings, image_classes) -> dict[str, Any]:
    """``--config FILE`` options, then ``--set`` (wins), then ``--image-classes``."""
    out: dict[str, Any] = {}
    if config_file:
        from methods.tune import read_config_file  # torch: only when a file is given

        out.update(read_config_file(config_file))
    out.update(parse_settings(settings))
    if image_classes:
        out["image_classes"] = image_classes
    return out


def _method_fields(kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the shared method options from the command's keyword arguments into request
    fields; options not given are left out (the request's defaults apply)."""
    out = {
        "method": kw.pop("method"),
        "settings": _settings(kw.pop("config_file"), kw.pop("settings"), kw.pop("image_classes")),
        "checkpoint": kw.pop("checkpoint"),
        "trust_checkpoint": kw.pop("trust_checkpoint"),
        "sam_refine": kw.pop("sam_refine"),
        "logit_scale": kw.pop("logit_scale"),
        "prob_thd": kw.pop("prob_thd"),
        "area_thd": kw.pop("area_thd"),
        "templates": kw.pop("templates"),
        "text_model": kw.pop("text_model"),
        "family": kw.pop("family"),
        "random_init": kw.pop("random_init"),
        "text_random_init": kw.pop("text_random_init"),
        "weights": kw.pop("weights"),
        "text_weights": kw.pop("text_weights"),
        "arch_overrides": parse_overrides(kw.pop("arch_override")),
        "text_arch_overrides": parse_overrides(kw.pop("text_arch_override")),
        "seed": kw.pop("seed"),
        "device": kw.pop("device"),
        "limit": kw.pop("limit"),
    }
    return {k: v for k, v in out.items() if v is not None}


def _overlay_style(alpha: float | None, legend: str | None):
    """The overlay style of the options given (the others keep ``OverlayStyle``'s defaults)."""
    from methods.overlay import OverlayStyle

    given = {k: v for k, v in (("alpha", alpha), ("legend", legend)) if v is not None}
    return OverlayStyle(**given)


def _call(fn, request, quiet: bool, flags: dict[str, str]):
    """``fn(request, progress)``; a ``RequestError`` becomes a usage error (exit 2). The hints
    are registered when an error comes (see :func:`_register_hints`)."""
    from featurestore.errors import OvssError
    from methods.segment import RequestError

    try:
        with render.progress(quiet) as cb:
            return fn(request, cb)
    except RequestError as e:
        flag = {**METHOD_FLAGS, **flags}.get(e.option)
        raise click.UsageError(f"{e} ({flag})" if flag else str(e)) from None
    except OvssError:
        _register_hints()
        raise


_HINTS_DONE = False


def _register_hints() -> None:
    """Hints of the library errors of these commands, registered when one comes (importing
    ``methods.train`` would import torch, which ``ovss --help`` and ``eval --predictions``
    need not: its ``CheckpointError`` hint is registered once the module is loaded)."""
    global _HINTS_DONE
    train = sys.modules.get("methods.train")  # a CheckpointError exists only once it is imported
    if train is not None:
        hint_for(train.CheckpointError)(checkpoint_hint)
    if _HINTS_DONE:
        return
    _HINTS_DONE = True
    from methods.evaluate import MissingPredictionsError
    from methods.segment import KeptStoreError, TensorNotComputedError

    @hint_for(MissingPredictionsError)
    def _missing(e: MissingPredictionsError) -> str:
        n = e.total - len(e.missing)
        return f"pass --allow-missing to report the number over the {n} of {e.total} scored"

    @hint_for(KeptStoreError)
    def _kept(e: KeptStoreError) -> str:
        parts = []
        if e.cause is not None:
            inner, own = render_error(e.cause), str(e.cause)
            if inner.startswith(own) and len(inner) > len(own):
                parts.append(inner[len(own) :].lstrip("; "))
        parts.append(f"rerun with --keep-store {e.store} to resume")
        return "; ".join(parts)

    @hint_for(TensorNotComputedError)
    def _tensor(e: TensorNotComputedError) -> str:
        other = f"--set {e.model_field}=NAME for another model, " if e.model_field else ""
        return f"choose with {other}or see the method's options in `ovss methods`"


@click.command(epilog=FMBSEG_EPILOG)
@click.option("--store", "-s", "store", help="Feature store to segment.")
@click.option(
    "--images",
    "images",
    multiple=True,
    type=click.Path(exists=True),
    help="Image file or folder to segment instead of a store (repeat the flag for more): the "
    "method's feature sets are extracted on the fly into a temporary store (or --keep-store).",
)
@click.option(
    "--keep-store",
    type=click.Path(file_okay=False),
    help="With --images: extract into this store (kept; a rerun resumes, and builds no model "
    "when everything is there) instead of a temporary one.",
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
    help="Folder for label PNGs, overlays, score maps and segment.json.",
)
@click.option("--no-overlay", is_flag=True, help="Do not write colour overlays.")
@click.option(
    "--alpha",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Weight of the class colours over the image in overlays, 0..1 (default 0.5).",
)
@click.option(
    "--legend",
    type=click.Choice(["present", "all"]),
    default=None,
    help="Overlay legend: the classes present in the image (default) or all classes.",
)
@click.option(
    "--side-by-side",
    is_flag=True,
    help="Also write <id>_compare.png: image | prediction | ground truth with the image's mIoU "
    "(the ground truth where --dataset and --data-root give a label for the image id; else "
    "image | prediction).",
)
@click.option("--score-maps", is_flag=True, help="Also write per-class probability maps (.npy).")
@click.option(
    "--write-labels",
    metavar="NAME",
    callback=store_name,
    help="Store the label maps in the store as label set NAME (pseudo-labels).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing label set NAME.")
@add_options(METHOD_OPTIONS)
@storage_options_option
@user_errors
def segment(**kw):
    """Segment the images of a store (or image files) with any method and vocabulary.

    Writes per image a label PNG (class indices), a colour overlay with a legend and, with
    --score-maps, per-class probability maps; --write-labels stores the result in the store.
    Exit codes: 0 done, 1 error (one line), 2 usage error.
    """
    from methods.segment import SegmentRequest, run_segment

    as_json, quiet = kw.pop("as_json"), kw.pop("quiet")
    fields = _method_fields(kw)
    request = SegmentRequest(
        store=kw["store"],
        images=tuple(kw["images"]),
        keep_store=kw["keep_store"],
        classes=kw["classes"],
        vocab_file=kw["vocab_file"],
        dataset=kw["dataset"],
        data_root=kw["data_root"],
        out_dir=kw["out_dir"],
        overlays=not kw["no_overlay"],
        overlay_style=_overlay_style(kw["alpha"], kw["legend"]),
        side_by_side=kw["side_by_side"],
        score_maps=kw["score_maps"],
        write_labels=kw["write_labels"],
        overwrite_labels=kw["overwrite"],
        **fields,
    )
    summary = _call(run_segment, request, quiet, SEGMENT_FLAGS)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        d = summary.to_dict()
        d.pop("files")
        if d["store"] is None:
            d["store"] = "(temporary, removed)"
        render.kv("segment", d, False)


def _eval_method_options() -> list:
    """The shared method options with a repeatable ``--method`` (a comparison)."""
    multi = click.option(
        "--method",
        "-M",
        "method",
        multiple=True,
        help="Segmentation method (see `ovss methods`; default: prototype [ours]). Repeat it "
        "to compare methods on one store in one pass (per-class IoU side by side); "
        "--set METHOD:KEY=VALUE sets an option of one of them.",
    )
    return [multi, *METHOD_OPTIONS[1:]]


SWEEP_EPILOG = """\b
Sweeps and comparisons (one pass over the store):
  --sweep KEY=v1,v2 (repeatable: the grid of all keys) over any option of the
  method, logit_scale, prob_thd, area_thd, templates, family, text_model or
  method; each value is read as the option's type. The default configuration
  (the command without --sweep) is added when the grid lacks it: Δ is taken
  against it. Features are read once per image, text embedded once per template
  set, the method's dense output computed once when only scoring keys change
  (trident: window outputs once when only cos_fac/cos_cap/refine_neg_cos/
  neg_cos_thr change). --cache-dense keeps the dense output for later runs.
"""


@click.command("eval", epilog=FMBSEG_EPILOG + SWEEP_EPILOG)
@click.option("--dataset", required=True, help="Benchmark name (see `ovss data list`).")
@click.option(
    "--data-root", required=True, type=click.Path(file_okay=False), help="Where the dataset lives."
)
@click.option("--split", default=None, help="Split (default: the benchmark's evaluation split).")
@click.option("--store", "-s", "store", help="Feature store of the dataset's images.")
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
    help="Compare with the published numbers when the configuration matches one (per "
    "method / configuration in a comparison or sweep).",
)
@click.option(
    "--sweep",
    "sweep_items",
    multiple=True,
    metavar="KEY=V1,V2,...",
    help="Evaluate every value of KEY (repeatable: the grid of all keys) in one pass: a "
    "method option, logit_scale, prob_thd, area_thd, templates, family, text_model or "
    "method. One row per configuration (mIoU, mAcc, aAcc, Δ to the default, best marked).",
)
@click.option(
    "--sweep-file",
    type=click.Path(dir_okay=False),
    help="The sweep as a JSON or YAML mapping KEY: [values] (combined with --sweep).",
)
@click.option(
    "--cache-dense",
    metavar="FOLDER|store",
    help="Derived cache of the method's dense output (cosine logits per image): a folder, "
    "or 'store' for inside the store. Keyed by method config, vocabulary and feature sets; "
    "an entry made under others is refused; later runs read it instead of the features.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Also write the self-contained HTML report (as `ovss report`).",
)
@click.option(
    "--gallery",
    type=click.IntRange(min=0),
    default=None,
    help="Images kept at each end (best / worst per-image mIoU) of the result's gallery "
    "(default 4 [ours]; 0: none).",
)
@click.option(
    "--allow-missing",
    is_flag=True,
    default=None,
    help="Score the images that have a usable prediction and say how many of the split's "
    "the number covers (default: any image without one, e.g. a missing or wrong-size PNG, "
    "an image the method skipped or whose features were not extracted, fails the run).",
)
@add_options(_eval_method_options())
@storage_options_option
@user_errors
def eval_cmd(**kw):
    """mIoU / mAcc / aAcc with mmseg IoUMetric semantics, per-class table, full protocol.

    Either runs --method on --store, or scores --predictions from any tool; --sweep and a
    repeated --method evaluate several configurations in one pass over the store. Every
    image of the split must have a usable prediction unless --allow-missing. Exit codes: 0
    done, 1 error (an image without a usable prediction included), 2 usage error.
    """
    from methods.evaluate import EvalRequest, run_eval

    as_json, quiet = kw.pop("as_json"), kw.pop("quiet")
    methods_given = tuple(kw.pop("method") or ())
    kw["method"] = methods_given[0] if len(methods_given) == 1 else None
    sweep_items, sweep_file = kw.pop("sweep_items"), kw.pop("sweep_file")
    cache_dense, report_path, gallery = (
        kw.pop("cache_dense"),
        kw.pop("report_path"),
        kw.pop("gallery"),
    )
    fields = _method_fields(kw)
    if gallery is not None:
        fields["gallery"] = gallery
    if kw.pop("allow_missing"):
        fields["allow_missing"] = True
    common = dict(
        dataset=kw["dataset"],
        data_root=kw["data_root"],
        split=kw["split"],
        store=kw["store"],
        predictions=kw["predictions"],
        check_reference=kw["check_reference"],
        **fields,
    )
    if sweep_items or sweep_file or len(methods_given) > 1 or cache_dense:
        result = _sweep(common, methods_given, sweep_items, sweep_file, cache_dense, quiet)
    else:
        result = _call(run_eval, EvalRequest(**common), quiet, EVAL_FLAGS)
    if kw["out_json"]:
        with open(kw["out_json"], "w") as fh:
            json.dump(result.to_dict(), fh, indent=2)
    if report_path:
        from methods.report import write_report

        write_report([result.to_dict()], report_path)
    single = getattr(result, "rows", None) is None
    if kw["csv_path"]:
        (render.eval_csv if single else render.sweep_csv)(result, kw["csv_path"])
    if single:
        render.eval_result(result, as_json)
    else:
        render.sweep_result(result, as_json)
    if not (result.images if single else all(r.result.images for r in result.rows)):
        sys.exit(1)


def _sweep(common, methods_given, sweep_items, sweep_file, cache_dense, quiet):
    """Run a sweep / comparison; a lone configuration (``--cache-dense`` alone) comes back as
    its evaluation."""
    from methods.sweep import SweepRequest, parse_sweep_items, read_sweep_file, run_sweep

    sweep: dict[str, list] = {}
    if sweep_file:
        sweep.update(read_sweep_file(sweep_file))
    for key, values in parse_sweep_items(sweep_items).items():
        if key in sweep:
            raise click.UsageError(f"sweep key {key} is both in --sweep-file and --sweep")
        sweep[key] = values
    request = SweepRequest(
        **common,
        sweep=sweep,
        methods=methods_given if len(methods_given) > 1 else (),
        cache_dense=cache_dense,
    )
    result = _call(run_sweep, request, quiet, {**EVAL_FLAGS, "store": "--store"})
    if not sweep and len(methods_given) <= 1 and len(result.rows) == 1:
        return result.rows[0].result
    return result


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@user_errors
def methods(as_json):
    """List the segmentation methods with their options: name, type, default and help."""
    from methods.method_catalog import describe_methods

    render.methods(describe_methods(), as_json)
