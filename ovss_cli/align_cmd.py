"""``ovss align`` (FMbSeg Stage 2 training) and ``ovss cluster`` (k-means masks / codebooks)."""

from __future__ import annotations

import json
from typing import Any

import click

from ovss_cli import render
from ovss_cli.common import parse_overrides, user_errors


def _text_options(fn):
    opts = [
        click.option(
            "--text-model",
            default=None,
            help="CLIP model whose text tower embeds the classes (align default: the CLIP "
            "recorded by the --labels set, else clip-b16; cluster default: the checkpoint's).",
        ),
        click.option(
            "--templates",
            default=None,
            help="Prompt template set (default single: the paper's one template 'a photo of "
            "a {}.'; align with --labels: the set recorded by the label set).",
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
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


DEVICE_HELP = (
    "auto [ours: default] = the GPU of LOCAL_RANK (0 outside torchrun) when CUDA is "
    "available, else Apple MPS when present, else cpu; or cpu, cuda, cuda:N, mps."
)


def _embed(store_path, class_names, text_model, templates, random_init, arch, weights, seed):
    """The class embeddings as a ``Vocab`` and the cached text set they come from."""
    from featurestore.text import get_text_embeddings, parse_vocab
    from methods.segment import vocab_from_text

    vocab = parse_vocab(class_names)
    te = get_text_embeddings(
        store_path,
        text_model,
        vocab,
        templates,
        weights=weights,
        random_init=random_init,
        seed=seed,
        arch_overrides=parse_overrides(arch),
    )
    return vocab_from_text(te, source=vocab.describe()), te


def _rank0_first(ctx, fn):
    """``fn()`` on rank 0 first (it fills the store's text cache), then on the other ranks.

    With ``ctx.world`` > 1 rank 0 broadcasts ``None`` or its error message in place of a
    barrier, so a failure there raises the same one-line ``OvssError`` on every rank instead of
    leaving the others waiting until the collective times out.
    """
    if ctx.world <= 1:
        return fn()
    import torch.distributed as dist

    from featurestore.errors import OvssError

    msg: list[str | None] = [None]
    if ctx.rank == 0:
        try:
            out = fn()
        except OvssError as e:
            msg[0] = str(e)
        except Exception as e:
            msg[0] = f"rank 0 failed to embed the classes: {type(e).__name__}: {e}"
            dist.broadcast_object_list(msg, src=0)
            raise
        dist.broadcast_object_list(msg, src=0)
        if msg[0] is not None:
            raise OvssError(msg[0])
        return out
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise OvssError(msg[0])
    return fn()


@click.command()
@click.option("--store", "-s", "store_path", required=True, help="Feature store to train from.")
@click.option(
    "--method",
    type=click.Choice(["fmbseg"]),
    default="fmbseg",
    show_default=True,
    help="Alignment method (FMbSeg Stage 2, METHODS.md §1.2).",
)
@click.option(
    "--features",
    required=True,
    help="VFM feature set: a key (dinov2-l14@short448) or a model with one set in the store.",
)
@click.option(
    "--labels",
    "label_set",
    help="Label set of the store with the pixel labels, e.g. Stage-1 pseudo-labels from "
    "`ovss segment --method fmbseg-stage1 --write-labels NAME`; its class names are embedded.",
)
@click.option(
    "--gt-dataset",
    help="Train on a dataset's ground truth instead of a label set (e.g. 'custom' for the demo).",
)
@click.option("--data-root", type=click.Path(file_okay=False), help="Root of --gt-dataset.")
@click.option("--split", default=None, help="Split of --gt-dataset used for training.")
@click.option(
    "--loss",
    type=click.Choice(["tsupcon", "supcon", "proto"]),
    default="tsupcon",
    show_default=True,
    help="TSupCon (Eq. 1-4), SupCon (L_out) over patches + the K text vectors as samples "
    "(averaged over the anchors that have a positive [ours]), or the prototype term ℓt only "
    "(normalised by the classes in the batch [ours]). Each class is one prototype, "
    "l2n(mean of its synonyms' embeddings) [ours].",
)
@click.option(
    "--arch",
    type=click.Choice(["block", "mlp", "linear"]),
    default="block",
    show_default=True,
    help="Module: Linear + one pre-norm transformer block (self-attention within one window "
    "[ours]: the whole image for whole-image features; no positional embedding [ours]) + "
    "Linear, a 2-layer GELU MLP, or one Linear.",
)
@click.option(
    "--tau",
    type=float,
    default=0.1,
    show_default=True,
    help="Temperature dividing every dot product [ours]; 1 = the paper's equations literally.",
)
@click.option("--epochs", type=int, default=10, show_default=True, help="Epochs (paper: 10).")
@click.option(
    "--batch-images", type=int, default=5, show_default=True, help="Images per step (paper: 5)."
)
@click.option(
    "--lr",
    type=float,
    default=0.01,
    show_default=True,
    help="SGD learning rate [ours], cosine-annealed to 0 per step.",
)
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True, help="[ours].")
@click.option(
    "--min-frac",
    type=float,
    default=0.5,
    show_default=True,
    help="Patch label = the majority pixel label, ignore counted as a candidate (a mostly "
    "ignore patch is ignored; a class wins a tie [ours]); the class must cover this fraction "
    "of the patch's pixels [ours].",
)
@click.option(
    "--max-patches-per-image",
    type=int,
    default=0,
    show_default=True,
    help="Sample this many labelled patches per image and step (0: all) [ours]; bounds the "
    "O(n²) loss memory.",
)
@click.option("--hidden-dim", type=int, default=512, show_default=True, help="D_m [ours].")
@click.option("--heads", type=int, default=8, show_default=True, help="Block heads [ours].")
@click.option(
    "--mlp-ratio",
    type=float,
    default=4.0,
    show_default=True,
    help="Hidden width of the block's MLP, × --hidden-dim [ours].",
)
@click.option(
    "--no-input-norm",
    is_flag=True,
    help="Do not standardise input dimensions with the training patches' mean/std [ours: on].",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Init/shuffle/text seed.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    help="Checkpoint folder (default <store dir>/align/<features>-<arch>-<loss>).",
)
@click.option("--restart", is_flag=True, help="Ignore an existing last.pt and start over.")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help=DEVICE_HELP + " Under torchrun cuda = the GPU of LOCAL_RANK, and auto without CUDA = "
    "cpu (gloo cannot carry MPS tensors; mps is refused there).",
)
@_text_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def align(
    store_path,
    method,
    features,
    label_set,
    gt_dataset,
    data_root,
    split,
    loss,
    arch,
    tau,
    epochs,
    batch_images,
    lr,
    momentum,
    weight_decay,
    min_frac,
    max_patches_per_image,
    hidden_dim,
    heads,
    mlp_ratio,
    no_input_norm,
    seed,
    out_dir,
    restart,
    device,
    text_model,
    templates,
    text_random_init,
    text_arch_override,
    text_weights,
    as_json,
    quiet,
):
    """Train an alignment module (FMbSeg Stage 2) on cached VFM patches and pixel labels.

    Patch labels = majority pixel label (--min-frac); the module maps patches into CLIP text
    space and is trained with TSupCon against the frozen class text embeddings (SGD, cosine
    schedule, batches of images). A checkpoint with full provenance (feature set, label set,
    vocabulary, text encoder weights / templates, hyperparameters) is written after every
    epoch; rerunning the same command resumes from it. Segment with
    `ovss segment --method aligned --checkpoint OUT/last.pt`.

    \b
    [ours] choices (no public code): τ 0.1, lr 0.01, weight decay 1e-4, D_m 512, 8 heads,
    MLP ratio 4, block attention within a window, one prototype per class = l2n(mean of its
    synonyms' embeddings), SupCon averaged over anchors with a positive, input
    standardisation, patch-label majority with ignore as a candidate and --min-frac 0.5.

    \b
    Data parallel: `torchrun --nproc-per-node N $(which ovss) align ...` (WORLD_SIZE > 1)
    trains with DistributedDataParallel (gloo on cpu, nccl on cuda; LOCAL_RANK picks the GPU).
    Each step's --batch-images images are split among the ranks, whose aligned patches are
    gathered into one loss: the same global batch and objective as one process. Rank 0 alone
    prints, reports progress and writes the checkpoint.
    """
    import torch

    from featurestore.store import FeatureStore
    from methods.fmbseg import (
        AlignConfig,
        DatasetLabelSource,
        StoreLabelSource,
        setup_distributed,
        train_alignment,
    )

    if bool(label_set) == bool(gt_dataset):
        raise click.UsageError("give exactly one of --labels NAME or --gt-dataset DATASET")
    if gt_dataset and not data_root:
        raise click.UsageError("--gt-dataset needs --data-root")
    ctx = setup_distributed(device)  # resolves auto (cpu, not mps, under torchrun w/o CUDA)
    device = str(ctx.device)
    try:
        store = FeatureStore.open(store_path)
        source = (
            StoreLabelSource(store, label_set)
            if label_set
            else DatasetLabelSource(store, gt_dataset, data_root, split)
        )
        # default text space: the CLIP (and templates) that wrote the label set, else clip-b16
        recorded = source.text_defaults() if label_set else {}
        text_model = text_model or recorded.get("text_model", "clip-b16")
        templates = templates or recorded.get("templates", "single")
        vocab, te = _rank0_first(
            ctx,
            lambda: _embed(
                store_path,
                source.class_names,
                text_model,
                templates,
                text_random_init,
                text_arch_override,
                text_weights,
                seed,
            ),
        )
        cfg = AlignConfig(
            arch=arch,
            loss=loss,
            tau=tau,
            hidden_dim=hidden_dim,
            heads=heads,
            mlp_ratio=mlp_ratio,
            epochs=epochs,
            batch_images=batch_images,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            min_frac=min_frac,
            max_patches_per_image=max_patches_per_image,
            seed=seed,
            input_norm=not no_input_norm,
        )
        with _loss_progress(quiet or ctx.rank != 0) as cb:
            path = train_alignment(
                store_path,
                features,
                source,
                vocab,
                cfg,
                progress=cb,
                out_dir=out_dir,
                device=device,
                resume=not restart,
                text_model=text_model,
                text=te,
            )
    finally:
        ctx.close()
    if ctx.rank != 0:
        return
    ck = torch.load(path, map_location="cpu", weights_only=False)
    result = {
        "checkpoint": str(path),
        "epochs_done": ck["epoch"],
        "train_images": ck["train_images"],
        "history": ck["history"],
        "features": ck["provenance"]["features"]["key"],
        "labels": ck["provenance"]["labels"],
        "text": {
            k: ck["provenance"]["vocabulary"].get(k)
            for k in ("text_model", "templates", "text_weights", "vocabulary_key")
        },
        "segment_with": f"ovss segment --store {store_path} --method aligned "
        f"--checkpoint {path} ...",
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        last = result["history"][-1] if result["history"] else {}
        render.kv(
            "align",
            {**{k: v for k, v in result.items() if k != "history"}, "last epoch": last},
            False,
        )


class _loss_progress:
    """A rich bar for training steps showing the current loss and learning rate."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=render.err,
        )
        self.bar.__enter__()
        self.tasks: dict[str, Any] = {}

        def cb(ev: dict[str, Any]) -> None:
            stage = ev["stage"]
            if stage == "epoch":
                self.bar.console.log(
                    f"epoch {ev['epoch']}/{ev['epochs']}: loss {ev['loss']:.4f}, "
                    f"patch acc {ev['patch_acc']:.3f}, {ev['seconds']:.1f} s"
                )
                return
            done, total = (
                (ev["step"], ev["steps"]) if stage == "train" else (ev["done"], ev["total"])
            )
            info = f"loss {ev['loss']:.4f} lr {ev['lr']:.2e}" if stage == "train" else ""
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(stage, total=total, completed=done, info=info)
            self.bar.update(self.tasks[stage], completed=done, total=total, info=info)

        return cb

    def __exit__(self, *exc) -> None:
        if not self.quiet:
            self.bar.__exit__(*exc)


@click.command()
@click.option("--store", "-s", "store_path", required=True, help="Feature store.")
@click.option("--features", required=True, help="Feature set key (or a model with one set).")
@click.option("--tensor", default="patch", show_default=True, help="Token tensor clustered.")
@click.option(
    "--per-image",
    is_flag=True,
    help="k-means of each image's tokens into --k masks, written as a label set (mask set); "
    "token maps become pixel maps by nearest upsampling per window, later windows winning "
    "overlaps [ours].",
)
@click.option(
    "--k",
    type=int,
    default=16,
    show_default=True,
    help="Clusters: masks per image (PixelCLIP's DINO masks: 16) or codebook size.",
)
@click.option(
    "--spherical", is_flag=True, help="Cosine k-means on L2-normalised tokens (default: L2)."
)
@click.option(
    "--niter",
    type=int,
    default=20,
    show_default=True,
    help="Lloyd iterations [ours: 20; FAISS's own default is 25].",
)
@click.option(
    "--max-points",
    type=int,
    default=None,
    help="Codebook: train on a random subset of this many tokens (default: all; FAISS's own "
    "default would silently use k*256).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "faiss", "torch"]),
    default="auto",
    show_default=True,
    help="k-means backend [ours: auto = FAISS when installed, unless --device is a CUDA GPU "
    "and FAISS has no GPU support (faiss-cpu): torch on that GPU then; torch when FAISS is "
    "missing]. torch: k distinct random points as initial centroids, an empty cluster "
    "re-seeded with the worst-fitting point [ours].",
)
@click.option("--seed", type=int, default=0, show_default=True, help="k-means seed [ours: 0].")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option(
    "--name",
    "set_name",
    help="Label set written (default kmeans<k>-<features> per image; the codebook writes "
    "one only when named, e.g. codebook<k>-<features>).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing label set of that name.")
@click.option(
    "--eval-dataset",
    help="Codebook: mIoU/mAcc/aAcc against this dataset's GT after Hungarian matching of "
    "clusters to classes (scipy); clusters left unmatched (k > classes) predict no class [ours].",
)
@click.option("--data-root", type=click.Path(file_okay=False), help="Root of --eval-dataset.")
@click.option("--split", default=None, help="Split of --eval-dataset (clusters only its images).")
@click.option(
    "--name-with",
    "name_with",
    help="Codebook: name each centroid by its 3 nearest queries (cosine) of this vocabulary "
    "[ours: top 3] (dataset, class file or comma list); needs text-space features "
    "(--checkpoint for aligned DINO features).",
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    help="Codebook: cluster aligned features of this 'ovss align' checkpoint.",
)
@_text_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def cluster(
    store_path,
    features,
    tensor,
    per_image,
    k,
    spherical,
    niter,
    max_points,
    backend,
    seed,
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
    from featurestore.store import FeatureStore
    from methods.cluster import cluster_per_image, cluster_store
    from methods.fmbseg import resolve_device

    device = str(resolve_device(device))

    indices = None
    if eval_dataset:
        if not data_root:
            raise click.UsageError("--eval-dataset needs --data-root")
        from featurestore.datasets import list_dataset_images

        ids = {i: n for n, i in enumerate(FeatureStore.open(store_path).image_ids)}
        indices = sorted(
            ids[r.image_id]
            for r in list_dataset_images(eval_dataset, data_root, split)
            if r.image_id in ids
        )
    with render.progress(quiet) as cb:
        if per_image:
            if eval_dataset or name_with or checkpoint:
                raise click.UsageError(
                    "--eval-dataset/--name-with/--checkpoint apply to the codebook mode"
                )
            summary = cluster_per_image(
                store_path,
                features,
                k,
                set_name,
                tensor,
                niter,
                spherical,
                seed,
                backend,
                overwrite,
                progress=cb,
                device=device,
            )
        else:
            vocab = None
            if name_with:
                # the text space the checkpoint was trained into (explicit options win)
                recorded: dict[str, Any] = {}
                if checkpoint:
                    from methods.aligned import checkpoint_provenance

                    recorded = checkpoint_provenance(checkpoint).get("vocabulary", {})
                vocab, _ = _embed(
                    store_path,
                    name_with,
                    text_model or recorded.get("text_model") or "clip-b16",
                    templates or recorded.get("templates") or "single",
                    text_random_init,
                    text_arch_override,
                    text_weights,
                    seed,
                )
            summary = cluster_store(
                store_path,
                features,
                k,
                tensor,
                niter,
                spherical,
                seed,
                backend,
                max_points,
                indices,
                set_name,
                overwrite,
                (eval_dataset, data_root, split) if eval_dataset else None,
                vocab,
                checkpoint,
                progress=cb,
                device=device,
            )
    d = summary.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        render.kv("cluster", {k_: v for k_, v in d.items() if v not in (None, {}, [])}, False)
