"""``ovss align`` (every registered trainer; FMbSeg Stage 2 by default) and ``ovss cluster``
(k-means masks / codebooks).

``ovss align`` resolves ``--method`` first and then offers that trainer's options, generated
from its ``Config`` dataclass (``ovss_cli.common.config_options``): ``ovss align --method X
--help`` lists X's options. The command parses, builds a ``methods.train.TrainRequest``, calls
the trainer's ``fit`` and renders the result.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from ovss_cli import render
from ovss_cli.common import (
    collect_config,
    config_options,
    json_option,
    parse_overrides,
    parse_settings,
    quiet_option,
    storage_options_option,
    store_name,
    user_errors,
)
from ovss_cli.hints import checkpoint_hint, hint_for

#: ``ovss align`` without ``--method`` trains this trainer.
DEFAULT_TRAINER = "fmbseg"


def _text_options(fn):
    opts = [
        click.option(
            "--text-model",
            default=None,
            help="Text encoder that embeds the classes (align default: the CLIP recorded by "
            "the --labels set, else the trainer's, clip-b16 for fmbseg; cluster default: the "
            "checkpoint's).",
        ),
        click.option(
            "--templates",
            default=None,
            help="Prompt template set (align default: the set recorded by the --labels set, "
            "else the trainer's: fmbseg uses the paper's one template 'a photo of a {}.', "
            "single; cluster default: the checkpoint's).",
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
            help="Checkpoint of the text tower (else the usual resolution).",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _text_request(text_model, templates, random_init, arch_override, weights):
    """The ``methods.train.TextOptions`` of the :func:`_text_options` values."""
    from methods.train import TextOptions

    return TextOptions(
        text_model=text_model,
        templates=templates,
        random_init=random_init,
        arch_overrides=parse_overrides(arch_override),
        weights=weights,
    )


DEVICE_HELP = (
    "auto [ours: default] = the GPU of LOCAL_RANK (0 outside torchrun) when CUDA is "
    "available, else Apple MPS when present, else cpu; or cpu, cuda, cuda:N, mps."
)


# -- ovss align ----------------------------------------------------------------------------------


def _request_params(trainers: list[str]) -> list:
    """The options every trainer shares (store, features, labels, output, device, text)."""
    opts = [
        click.option(
            "--store", "-s", "store_path", required=True, help="Feature store to train from."
        ),
        click.option(
            "--method",
            type=click.Choice(trainers),
            default=DEFAULT_TRAINER,
            show_default=True,
            help="Trainer; `ovss align --method NAME --help` lists its options.",
        ),
        click.option(
            "--features",
            help="Feature set trained on: a key (dinov2-l14@short448) or a model with one set "
            "in the store (default: the trainer's; fmbseg: dinov2-l14@short448).",
        ),
        click.option(
            "--labels",
            "label_set",
            callback=store_name,
            help="Label set of the store with the pixel labels, e.g. Stage-1 pseudo-labels "
            "from `ovss segment --method fmbseg-stage1 --write-labels NAME`; its class names "
            "are embedded (with the CLIP and templates it records, unless given).",
        ),
        click.option(
            "--gt-dataset",
            help="Train on a dataset's ground truth instead of a label set (e.g. 'custom' for "
            "the demo).",
        ),
        click.option("--data-root", type=click.Path(file_okay=False), help="Root of --gt-dataset."),
        click.option("--split", default=None, help="Split of --gt-dataset used for training."),
        click.option(
            "--set",
            "settings",
            multiple=True,
            metavar="KEY=VALUE",
            help="A trainer option by its field name (typed like the option; the named options "
            "win).",
        ),
        click.option(
            "--out",
            "out_dir",
            type=click.Path(file_okay=False),
            help="Checkpoint folder (fmbseg default: <store dir>/align/<features>-<arch>-<loss>).",
        ),
        click.option("--restart", is_flag=True, help="Ignore an existing last.pt and start over."),
        click.option(
            "--trust-checkpoint",
            is_flag=True,
            help="Resume from an old last.pt that holds pickled Python objects (refused "
            "otherwise): code in the file runs, so only for a file whose origin you know.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help=DEVICE_HELP + " Under torchrun cuda = the GPU of LOCAL_RANK, and auto without "
            "CUDA = cpu (gloo cannot carry MPS tensors; mps is refused there).",
        ),
        _text_options,
        storage_options_option,
        json_option,
        quiet_option,
    ]
    return opts


def _harvest(decorators: list) -> list[click.Parameter]:
    """The click parameters a list of option decorators would add, in the order given."""

    def f() -> None:
        pass

    for d in reversed(decorators):
        f = d(f)
    return list(reversed(getattr(f, "__click_params__", [])))


_DATA_PARALLEL_HELP = """\b
Data parallel: `torchrun --nproc-per-node N $(which ovss) align ...` (WORLD_SIZE > 1)
trains with DistributedDataParallel (gloo on cpu, nccl on cuda; LOCAL_RANK picks the GPU).
Each step's items are split among the ranks, whose outputs are gathered into one loss: the
same global batch and objective as one process. Rank 0 alone prints, reports progress and
writes the checkpoint; a checkpoint is loaded with weights_only (no pickled objects)."""


class AlignCommand(click.Command):
    """``ovss align``: its options are those of the trainer ``--method`` names (read from the
    arguments before parsing), so ``--method X --help`` shows X's options. Parameters and help
    are built on first use (the trainer registry imports torch)."""

    def __init__(self) -> None:
        super().__init__("align", callback=user_errors(_align))
        self.short_help = "Train a method's module on cached features (default: FMbSeg Stage 2)."

    @property
    def params(self) -> list[click.Parameter]:  # type: ignore[override]
        if self._params is None:
            self.configure(DEFAULT_TRAINER)
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params = value or None

    @property
    def help(self) -> str:  # type: ignore[override]
        if self._help is None:
            self.configure(DEFAULT_TRAINER)
        return self._help

    @help.setter
    def help(self, value: str | None) -> None:
        self._help = value

    def configure(self, name: str) -> None:
        """Set the parameters and help of trainer ``name``."""
        import inspect

        from methods.train import get_trainer, list_trainers

        _register_hints()
        trainers = list_trainers()
        cls = get_trainer(name)
        shared = _harvest(_request_params(trainers))
        taken = {o for p in shared for o in getattr(p, "opts", [])}
        clash = tuple(
            f.name for f in _config_fields(cls.Config) if "--" + f.name.replace("_", "-") in taken
        )
        self._params = shared + _harvest([config_options(cls.Config, exclude=clash)])
        listing = "\n".join(f"  {n}: {get_trainer(n).doc}" for n in trainers)
        own = inspect.cleandoc(cls.__doc__ or cls.doc)
        hidden = f" (settable with --set: {', '.join(clash)})" if clash else ""
        self._help = (
            f"Train with trainer '{name}'{hidden}; --method NAME --help lists another "
            f"trainer's options.\n\n\b\nTrainers:\n{listing}\n\n{own}\n\n{_DATA_PARALLEL_HELP}"
        )

    def make_context(self, info_name, args, parent=None, **extra):
        from methods.train import list_trainers

        name = _method_in(list(args))
        self.configure(name if name in list_trainers() else DEFAULT_TRAINER)
        return super().make_context(info_name, args, parent=parent, **extra)


def _register_hints() -> None:
    """The CLI's hint for checkpoint errors (registered when the trainers are first used)."""
    from methods.train import CheckpointError

    hint_for(CheckpointError)(checkpoint_hint)


def _config_fields(config_cls: type):
    from methods.config import config_fields

    return config_fields(config_cls)


def _method_in(args: list[str]) -> str:
    """The value of ``--method`` in raw arguments (the default when absent)."""
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--method" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return DEFAULT_TRAINER


def _align(
    store_path,
    method,
    features,
    label_set,
    gt_dataset,
    data_root,
    split,
    settings,
    out_dir,
    restart,
    trust_checkpoint,
    device,
    text_model,
    templates,
    text_random_init,
    text_arch_override,
    text_weights,
    as_json,
    quiet,
    **config_kwargs,
):
    from methods.train import LabelRequest, TrainRequest, get_trainer

    trainer = get_trainer(method)
    overrides = {**parse_settings(settings), **collect_config(config_kwargs)}
    config = trainer.build_config(None, overrides)
    if label_set and gt_dataset:
        raise click.UsageError("give one of --labels NAME or --gt-dataset DATASET, not both")
    if trainer.needs_labels and not (label_set or gt_dataset):
        raise click.UsageError(
            f"{method} trains on pixel labels: give --labels NAME or --gt-dataset DATASET"
        )
    if gt_dataset and not data_root:
        raise click.UsageError("--gt-dataset needs --data-root")
    labels = (
        LabelRequest(set_name=label_set, dataset=gt_dataset, data_root=data_root, split=split)
        if (label_set or gt_dataset)
        else None
    )
    request = TrainRequest(
        store=store_path,
        config=config,
        features=features,
        labels=labels,
        text=_text_request(
            text_model, templates, text_random_init, text_arch_override, text_weights
        ),
        out_dir=out_dir,
        restart=restart,
        device=device,
        trust_checkpoint=trust_checkpoint,
    )
    with _TrainProgress(quiet) as cb:
        result = trainer().fit(request, cb)
    if result.rank != 0:
        return
    out = result.to_dict()
    if result.segment_method:
        out["segment_with"] = (
            f"ovss segment --store {store_path} --method {result.segment_method} "
            f"--checkpoint {result.checkpoint} ..."
        )
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        last = out["history"][-1] if out["history"] else {}
        render.kv(
            "align", {**{k: v for k, v in out.items() if k != "history"}, "last epoch": last}, False
        )


align = AlignCommand()


class _TrainProgress:
    """Training progress on stderr: a rich bar (loss, lr, items/s) on a terminal, plain lines
    otherwise (every epoch, and a step line at most every 10 s). Started by the first event,
    so ranks that report nothing print nothing."""

    EVERY_S = 10.0

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.tasks: dict[str, Any] = {}
        self.last = 0.0

    def __enter__(self):
        return None if self.quiet else self.event

    def event(self, ev: dict[str, Any]) -> None:
        from methods.train import format_event

        stage = ev["stage"]
        if not render.err.is_terminal:
            now = time.monotonic()
            if (
                stage == "epoch"
                or (stage == "train" and now - self.last >= self.EVERY_S)
                or (stage not in ("train", "epoch") and ev.get("done") == ev.get("total"))
            ):
                self.last = now
                click.echo(format_event(ev), err=True)
            return
        if self.bar is None:
            self.bar = self._start()
        if stage == "epoch":
            self.bar.console.log(format_event(ev))
            return
        done, total = (ev["step"], ev["steps"]) if stage == "train" else (ev["done"], ev["total"])
        info = ""
        if stage == "train":
            lr = f" lr {ev['lr']:.2e}" if ev.get("lr") is not None else ""
            info = f"loss {ev['loss']:.4f}{lr} {ev.get('items_per_s', 0):.1f} {ev.get('unit')}/s"
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total, completed=done, info=info)
        self.bar.update(self.tasks[stage], completed=done, total=total, info=info)

    def _start(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=render.err,
        )
        bar.__enter__()
        return bar

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# -- ovss cluster --------------------------------------------------------------------------------


def _cluster_options(kmeans_options) -> list:
    """The options of ``ovss cluster``; ``kmeans_options`` are generated from
    ``methods.cluster.KMeansConfig`` (k, niter, spherical, seed, backend, max_points)."""
    return [
        click.option("--store", "-s", "store_path", required=True, help="Feature store."),
        click.option(
            "--features", required=True, help="Feature set key (or a model with one set)."
        ),
        click.option(
            "--tensor", default="patch", show_default=True, help="Token tensor clustered."
        ),
        click.option(
            "--per-image",
            is_flag=True,
            help="k-means of each image's tokens into --k masks, written as a label set (mask "
            "set); token maps become pixel maps by nearest upsampling per window, later "
            "windows winning overlaps [ours].",
        ),
        kmeans_options,
        click.option("--device", default="auto", show_default=True, help=DEVICE_HELP),
        click.option(
            "--name",
            "set_name",
            callback=store_name,
            help="Label set written (default kmeans<k>-<features> per image; the codebook "
            "writes one only when named, e.g. codebook<k>-<features>).",
        ),
        click.option(
            "--overwrite", is_flag=True, help="Replace an existing label set of that name."
        ),
        click.option(
            "--eval-dataset",
            help="Codebook: mIoU/mAcc/aAcc against this dataset's GT after Hungarian matching "
            "of clusters to classes (scipy); clusters left unmatched (k > classes) predict no "
            "class [ours].",
        ),
        click.option(
            "--data-root", type=click.Path(file_okay=False), help="Root of --eval-dataset."
        ),
        click.option(
            "--split", default=None, help="Split of --eval-dataset (clusters only its images)."
        ),
        click.option(
            "--name-with",
            "name_with",
            help="Codebook: name each centroid by its 3 nearest queries (cosine) of this "
            "vocabulary [ours: top 3] (dataset, class file or comma list); needs text-space "
            "features (--checkpoint for aligned DINO features).",
        ),
        click.option(
            "--checkpoint",
            type=click.Path(dir_okay=False),
            help="Codebook: cluster aligned features of this 'ovss align' checkpoint.",
        ),
        _text_options,
        storage_options_option,
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        quiet_option,
    ]


class ClusterCommand(click.Command):
    """``ovss cluster``: its k-means options are generated from ``methods.cluster.KMeansConfig``
    on first use (importing ``methods`` imports torch, which ``ovss --help`` must not)."""

    def __init__(self) -> None:
        super().__init__("cluster", callback=user_errors(_cluster), help=_cluster.__doc__)
        self.short_help = "k-means of cached patch features: per-image masks or a codebook."

    @property
    def params(self) -> list[click.Parameter]:  # type: ignore[override]
        if self._params is None:
            from methods.cluster import KMeansConfig

            self._params = _harvest(_cluster_options(config_options(KMeansConfig)))
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params = value or None


def _cluster(
    store_path,
    features,
    tensor,
    per_image,
    device,
    set_name,
    overwrite,
    eval_dataset,
    data_root,
    split,
    name_with,
    checkpoint,
    text_model,
    templates,
    text_random_init,
    text_arch_override,
    text_weights,
    as_json,
    quiet,
    **config_kwargs,
):
    """k-means of cached patch features: per-image masks or a store-level codebook.

    --per-image writes k masks per image into the store (PixelCLIP's DINO masks: --k 16).
    Otherwise one codebook is fitted on all tokens (all points used); its assignments are an
    unsupervised segmentation, scored with Hungarian matching (--eval-dataset) and optionally
    written as a label set (--name) and named with a vocabulary (--name-with; with
    --checkpoint the text model and templates default to the checkpoint's).

    \b
    Backend auto [ours]: FAISS when installed, except on a CUDA --device without faiss-gpu,
    where the torch k-means runs on that GPU; torch when FAISS is missing. --device auto picks
    the CUDA GPU when there is one, so on a CUDA host with faiss-cpu auto means torch on the GPU.
    Sinkhorn-Knopp balanced assignment is the library function methods.cluster.sinkhorn_knopp.
    """
    from methods.cluster import ClusterRequest, KMeansConfig, run_cluster
    from methods.config import build_config

    if eval_dataset and not data_root:
        raise click.UsageError("--eval-dataset needs --data-root")
    if per_image and (eval_dataset or name_with or checkpoint):
        raise click.UsageError("--eval-dataset/--name-with/--checkpoint apply to the codebook mode")
    request = ClusterRequest(
        store=store_path,
        features=features,
        config=build_config(KMeansConfig, None, collect_config(config_kwargs), owner="cluster"),
        tensor=tensor,
        per_image=per_image,
        device=device,
        name=set_name,
        overwrite=overwrite,
        eval_dataset=eval_dataset,
        data_root=data_root,
        split=split,
        name_with=name_with,
        checkpoint=checkpoint,
        text=_text_request(
            text_model, templates, text_random_init, text_arch_override, text_weights
        ),
    )
    with render.progress(quiet) as cb:
        summary = run_cluster(request, cb)
    d = summary.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        render.kv("cluster", {k_: v for k_, v in d.items() if v not in (None, {}, [])}, False)


cluster = ClusterCommand()
