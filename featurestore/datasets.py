"""The evaluated benchmarks and the ``custom`` layout: one registry entry per dataset.

Each :class:`DatasetSpec` holds what ``ovss`` needs to know about a benchmark: number of classes,
class-name files, label rule (``reduce_zero_label``, background), splits and the on-disk layout
(the MMSegmentation layout of docs EVAL.md §1.1, so data prepared for SCLIP/NACLIP/ProxyCLIP/
Trident works as is).

``data_root`` convention of :func:`list_dataset_images` — pass either the folder that *contains*
the dataset folder (the mmseg ``data/`` folder) or the dataset folder itself:

============== ================================== =============================================
dataset        data_root = parent of              or the dataset folder itself
============== ================================== =============================================
ade20k         ``ADEChallengeData2016/``          ``.../ADEChallengeData2016``
voc21, voc20   ``VOCdevkit/VOC2012/``             ``.../VOCdevkit`` or ``.../VOCdevkit/VOC2012``
context60/59   ``VOCdevkit/VOC2010/``             ``.../VOCdevkit`` or ``.../VOCdevkit/VOC2010``
coco_stuff171  ``coco_stuff164k/``                ``.../coco_stuff164k``
coco_object    ``coco_object/`` or                ``.../coco_object`` (``cvt_coco_object.py -o``)
               ``coco_stuff164k/``                or ``.../coco_stuff164k`` (converted in place)
cityscapes     ``cityscapes/``                    ``.../cityscapes``
custom         (none)                             ``<root>`` holding ``images/``
============== ================================== =============================================

The candidates are tried in the order: data_root itself, then the sub-folders listed above; the
first one holding the dataset's marker folder (e.g. ``images/validation`` for ADE20K,
``ImageSets/Segmentation`` for VOC) is used.

Each entry also records the standard image counts of its splits and how its labels are prepared
(a built-in conversion or the steps to follow); reading, converting and checking the labels
themselves is :mod:`featurestore.labels` (``ovss data prepare | verify``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from featurestore.errors import OvssError
from featurestore.images import ImageRecord, is_image_file

CLASSNAMES_PACKAGE = "featurestore.data"
"""Package whose ``classnames/`` folder holds the bundled class-name files."""

FAMILIES: dict[str, str] = {
    "sclip": "sclip",
    "proxyclip": "proxyclip",
    "clearclip": "clearclip",
}
"""Class-file families (lower-case name -> family), named after the class files they read:
``sclip``: the SCLIP/NACLIP files, synonyms separated by ``", "``; ``proxyclip``: the
ProxyCLIP/Trident files, separated by ``"; "``; ``clearclip``: the ClearCLIP files, split on
``","`` (none has a synonym; VOC21 and COCO-Object name their background ``background``).
Which family a method uses is the method's own default (``vocabulary_defaults`` in
``methods``), never keyed here by method name."""

_SEPARATORS = {"sclip": ", ", "proxyclip": "; ", "clearclip": ","}

_CLEARCLIP_FILES = {
    "voc21": "clearclip/voc21.txt",
    "coco_object": "clearclip/coco_object.txt",
    "voc20": "proxyclip_trident/voc20.txt",
}
"""The ClearCLIP files that differ from the SCLIP family (its others are byte-identical)."""


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset's images, labels and split lists live, relative to the dataset folder.

    Templates may contain ``{split}``, replaced by the split's folder/file token
    (:attr:`split_tokens`, default: the split name itself).

    Attributes:
        folders: sub-paths of ``data_root`` that may be the dataset folder, tried in order
            (``""`` = ``data_root`` itself); the last one is the canonical place named in errors.
        marker: path inside the dataset folder whose presence identifies it (a folder).
        img_dir: image folder.
        ann_dir: label folder.
        img_suffix: image file suffix (matched case-sensitively, as mmseg does); None = any of
            :data:`~featurestore.images.IMAGE_SUFFIXES` (case-insensitive).
        seg_suffix: label file suffix appended to the id.
        split_file: text file listing the ids of a split in order (VOC/Context); None = list
            ``img_dir`` recursively and sort by id (ADE/COCO/Cityscapes/custom).
        split_tokens: ``(split, token)`` pairs when the token differs from the split name
            (COCO: ``("val", "val2017")``).
        split_aliases: ``(alias, split)`` pairs accepted in place of a split name.
    """

    folders: tuple[str, ...]
    marker: str
    img_dir: str
    ann_dir: str
    img_suffix: str | None
    seg_suffix: str
    split_file: str | None = None
    split_tokens: tuple[tuple[str, str], ...] = ()
    split_aliases: tuple[tuple[str, str], ...] = ()

    def token(self, split: str) -> str:
        """The folder/file token of ``split`` (``"val"`` -> ``"val2017"`` for COCO)."""
        return dict(self.split_tokens).get(split, split)


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark (or the ``custom`` layout).

    Attributes:
        name: registry name (``"ade20k"``, ``"voc21"``, ...).
        num_classes: number of evaluated classes; 0 for ``custom`` until read from its
            ``classes.txt`` (see :func:`get_dataset` with ``data_root``).
        class_file: file in ``featurestore/data/classnames`` (SCLIP/NACLIP family); ``""`` for
            ``custom`` (its ``<root>/classes.txt`` is used).
        class_file_proxyclip: ProxyCLIP/Trident variant where it differs, else None.
        reduce_zero_label: raw label 0 is ignored and k becomes k-1 (mmseg rule).
        has_background: class 0 is a scored background class.
        splits: accepted split names; ``default_split`` is the evaluated one.
        default_split: split used when none is given.
        doc: one line: what to download and where it goes.
        layout: on-disk layout.
        aliases: other accepted names (matched ignoring case, ``-``, ``_`` and spaces).
        expected_images: ``(split, count)`` pairs: the standard number of images of a split
            (``ovss data verify`` warns, without failing, when a listing differs).
        converter: name of the built-in label conversion ``ovss data prepare`` runs
            (``"coco_stuff"``, ``"coco_object"``; see :mod:`featurestore.labels`), or None when
            the dataset is used as downloaded or needs an external tool.
        prepare_steps: what to do to get the dataset ready, one instruction per entry, printed by
            ``ovss data prepare``. Placeholders: ``{data_root}``, ``{dataset_dir}`` (the dataset
            folder) and ``{dataset_parent}`` (its parent folder).
    """

    name: str
    num_classes: int
    class_file: str
    class_file_proxyclip: str | None
    reduce_zero_label: bool
    has_background: bool
    splits: tuple[str, ...]
    default_split: str
    doc: str
    layout: DatasetLayout
    aliases: tuple[str, ...] = ()
    expected_images: tuple[tuple[str, int], ...] = ()
    converter: str | None = None
    prepare_steps: tuple[str, ...] = ()

    def expected_count(self, split: str) -> int | None:
        """The standard number of images of ``split`` (a canonical split name), if known."""
        return dict(self.expected_images).get(split)


_ADE_LAYOUT = DatasetLayout(
    folders=("", "ADEChallengeData2016"),
    marker="images/{split}",
    img_dir="images/{split}",
    ann_dir="annotations/{split}",
    img_suffix=".jpg",
    seg_suffix=".png",
    split_aliases=(("val", "validation"), ("train", "training")),
)
_VOC_LAYOUT = DatasetLayout(
    folders=("", "VOC2012", "VOCdevkit/VOC2012"),
    marker="ImageSets/Segmentation",
    img_dir="JPEGImages",
    ann_dir="SegmentationClass",
    img_suffix=".jpg",
    seg_suffix=".png",
    split_file="ImageSets/Segmentation/{split}.txt",
)
_CONTEXT_LAYOUT = DatasetLayout(
    folders=("", "VOC2010", "VOCdevkit/VOC2010"),
    marker="ImageSets/SegmentationContext",
    img_dir="JPEGImages",
    ann_dir="SegmentationClassContext",
    img_suffix=".jpg",
    seg_suffix=".png",
    split_file="ImageSets/SegmentationContext/{split}.txt",
)
_COCO_TOKENS = (("val", "val2017"), ("train", "train2017"))
_COCO_ALIASES = (("val2017", "val"), ("train2017", "train"))
_COCO_STUFF_LAYOUT = DatasetLayout(
    folders=("", "coco_stuff164k"),
    marker="images/{split}",
    img_dir="images/{split}",
    ann_dir="annotations/{split}",
    img_suffix=".jpg",
    seg_suffix="_labelTrainIds.png",
    split_tokens=_COCO_TOKENS,
    split_aliases=_COCO_ALIASES,
)
_COCO_OBJECT_LAYOUT = DatasetLayout(
    folders=("", "coco_object", "coco_stuff164k"),
    marker="images/{split}",
    img_dir="images/{split}",
    ann_dir="annotations/{split}",
    img_suffix=".jpg",
    seg_suffix="_instanceTrainIds.png",
    split_tokens=_COCO_TOKENS,
    split_aliases=_COCO_ALIASES,
)
_CITYSCAPES_LAYOUT = DatasetLayout(
    folders=("", "cityscapes"),
    marker="leftImg8bit/{split}",
    img_dir="leftImg8bit/{split}",
    ann_dir="gtFine/{split}",
    img_suffix="_leftImg8bit.png",
    seg_suffix="_gtFine_labelTrainIds.png",
)
_CUSTOM_LAYOUT = DatasetLayout(
    folders=("",),
    marker="images/{split}",
    img_dir="images/{split}",
    ann_dir="annotations/{split}",
    img_suffix=None,
    seg_suffix=".png",
)

_VOC_DOC = (
    "VOCtrainval_11-May-2012.tar extracted into data_root "
    "(data_root/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation})"
)
_CONTEXT_DOC = (
    "VOCtrainval_03-May-2010.tar extracted into data_root (data_root/VOCdevkit/VOC2010), then "
    "SegmentationClassContext/ and ImageSets/SegmentationContext/ written from "
    "trainval_merged.json by mmseg's tools/dataset_converters/pascal_context.py"
)
_COCO_DOC = (
    "val2017.zip unzipped into data_root/coco_stuff164k/images/ and "
    "stuffthingmaps_trainval2017.zip into data_root/coco_stuff164k/annotations/, then "
)

_VOC_STEPS = (
    "nothing to convert: extract VOCtrainval_11-May-2012.tar into {data_root} so that "
    "{dataset_dir}/JPEGImages, SegmentationClass/ and ImageSets/Segmentation/val.txt exist",
    "the official SegmentationClass palette PNGs are used as is and read as palette indices "
    "(do not use SBD / SegmentationClassAug)",
)
_CONTEXT_STEPS = (
    "extract VOCtrainval_03-May-2010.tar into {data_root} (gives {dataset_dir}/JPEGImages)",
    "put the PASCAL-Context annotation file trainval_merged.json into {dataset_dir}/",
    "install the Detail API, an external package (https://github.com/zhanghang1989/detail-api, "
    "folder PythonAPI), and get MMSegmentation's converter tools/dataset_converters/"
    "pascal_context.py (an mmsegmentation checkout)",
    "run: python tools/dataset_converters/pascal_context.py {dataset_parent} "
    "{dataset_dir}/trainval_merged.json",
    "it writes {dataset_dir}/SegmentationClassContext/<id>.png (Context ids mapped to 0..59 with "
    "np.digitize over the 60 ids; featurestore.labels.context_ids_to_labels does the same for "
    "masks you already have) and {dataset_dir}/ImageSets/SegmentationContext/<split>.txt",
)
_COCO_UNZIP_STEP = (
    "unzip val2017.zip into {dataset_dir}/images/ and stuffthingmaps_trainval2017.zip into "
    "{dataset_dir}/annotations/ (train2017 is only needed for --split train)"
)

_REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="ade20k",
            num_classes=150,
            class_file="ade20k.txt",
            class_file_proxyclip=None,
            reduce_zero_label=True,
            has_background=False,
            splits=("validation", "training"),
            default_split="validation",
            doc=(
                "ADEChallengeData2016.zip unzipped into data_root "
                "(data_root/ADEChallengeData2016/{images,annotations}/validation)"
            ),
            layout=_ADE_LAYOUT,
            aliases=("ade", "ade150", "ade20k150", "ade20k_150"),
            expected_images=(("validation", 2000), ("training", 20210)),
            prepare_steps=(
                "nothing to convert: unzip ADEChallengeData2016.zip into {data_root} so that "
                "{dataset_dir}/images/validation and {dataset_dir}/annotations/validation exist",
                "the annotations are used as is (0 = other, ignored through reduce_zero_label)",
            ),
        ),
        DatasetSpec(
            name="voc21",
            num_classes=21,
            class_file="voc21.txt",
            class_file_proxyclip="proxyclip_trident/voc21.txt",
            reduce_zero_label=False,
            has_background=True,
            splits=("val", "train"),
            default_split="val",
            doc=_VOC_DOC,
            layout=_VOC_LAYOUT,
            aliases=("voc", "pascal_voc", "voc2012", "pascalvoc21"),
            expected_images=(("val", 1449), ("train", 1464)),
            prepare_steps=_VOC_STEPS,
        ),
        DatasetSpec(
            name="voc20",
            num_classes=20,
            class_file="voc20.txt",
            class_file_proxyclip="proxyclip_trident/voc20.txt",
            reduce_zero_label=True,
            has_background=False,
            splits=("val", "train"),
            default_split="val",
            doc=_VOC_DOC,
            layout=_VOC_LAYOUT,
            aliases=("pascalvoc20",),
            expected_images=(("val", 1449), ("train", 1464)),
            prepare_steps=_VOC_STEPS,
        ),
        DatasetSpec(
            name="context60",
            num_classes=60,
            class_file="context60.txt",
            class_file_proxyclip=None,
            reduce_zero_label=False,
            has_background=True,
            splits=("val", "train"),
            default_split="val",
            doc=_CONTEXT_DOC,
            layout=_CONTEXT_LAYOUT,
            aliases=("pc60", "pascal_context60", "pcontext60"),
            expected_images=(("val", 5105), ("train", 4998)),
            prepare_steps=_CONTEXT_STEPS,
        ),
        DatasetSpec(
            name="context59",
            num_classes=59,
            class_file="context59.txt",
            class_file_proxyclip=None,
            reduce_zero_label=True,
            has_background=False,
            splits=("val", "train"),
            default_split="val",
            doc=_CONTEXT_DOC,
            layout=_CONTEXT_LAYOUT,
            aliases=("pc59", "pascal_context59", "pcontext59"),
            expected_images=(("val", 5105), ("train", 4998)),
            prepare_steps=_CONTEXT_STEPS,
        ),
        DatasetSpec(
            name="coco_stuff171",
            num_classes=171,
            class_file="coco_stuff171.txt",
            class_file_proxyclip=None,
            reduce_zero_label=False,
            has_background=False,
            splits=("val", "train"),
            default_split="val",
            doc=_COCO_DOC
            + (
                "mmseg's tools/dataset_converters/coco_stuff164k.py writes "
                "annotations/val2017/<id>_labelTrainIds.png"
            ),
            layout=_COCO_STUFF_LAYOUT,
            aliases=("coco_stuff", "cocostuff", "coco_stuff164k", "stuff", "cocostuff171"),
            expected_images=(("val", 5000), ("train", 118287)),
            converter="coco_stuff",
            prepare_steps=(
                _COCO_UNZIP_STEP,
                "the built-in conversion writes annotations/<split>2017/"
                "<id>_labelTrainIds.png from the raw maps (the mapping of mmseg's "
                "tools/dataset_converters/coco_stuff164k.py)",
            ),
        ),
        DatasetSpec(
            name="coco_object",
            num_classes=81,
            class_file="coco_object.txt",
            class_file_proxyclip="proxyclip_trident/coco_object.txt",
            reduce_zero_label=False,
            has_background=True,
            splits=("val", "train"),
            default_split="val",
            doc=_COCO_DOC
            + (
                "SCLIP/ProxyCLIP's datasets/cvt_coco_object.py writes "
                "annotations/val2017/<id>_instanceTrainIds.png (in place, or into "
                "data_root/coco_object with -o)"
            ),
            layout=_COCO_OBJECT_LAYOUT,
            aliases=("coco_obj", "cocoobject", "coco_object81", "object"),
            expected_images=(("val", 5000), ("train", 118287)),
            converter="coco_object",
            prepare_steps=(
                _COCO_UNZIP_STEP,
                "the built-in conversion writes annotations/<split>2017/"
                "<id>_instanceTrainIds.png from the RAW maps (the mapping of cvt_coco_object.py); "
                "with --out DIR it writes under DIR and links DIR/images/<split>2017 to the "
                "source images",
            ),
        ),
        DatasetSpec(
            name="cityscapes",
            num_classes=19,
            class_file="cityscapes.txt",
            class_file_proxyclip=None,
            reduce_zero_label=False,
            has_background=False,
            splits=("val", "train"),
            default_split="val",
            doc=(
                "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip unzipped into "
                "data_root/cityscapes, then mmseg's tools/dataset_converters/cityscapes.py "
                "writes gtFine/<split>/<city>/*_gtFine_labelTrainIds.png"
            ),
            layout=_CITYSCAPES_LAYOUT,
            aliases=("city", "cityscapes19", "city_scapes"),
            expected_images=(("val", 500), ("train", 2975)),
            prepare_steps=(
                "unzip leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into {dataset_dir}",
                "install cityscapesScripts, an external package: pip install cityscapesscripts",
                "run: CITYSCAPES_DATASET={dataset_dir} csCreateTrainIdLabelImgs (or, from an "
                "mmsegmentation checkout: python tools/dataset_converters/cityscapes.py "
                "{dataset_dir} --nproc 8)",
                "it writes gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (trainIds 0..18, "
                "255 = ignore)",
            ),
        ),
        DatasetSpec(
            name="custom",
            num_classes=0,
            class_file="",
            class_file_proxyclip=None,
            reduce_zero_label=False,
            has_background=False,
            splits=("train", "val"),
            default_split="val",
            doc=(
                "your own data: data_root/images/<split>/**/<id>.<jpg|png|...>, optional "
                "data_root/annotations/<split>/<id>.png (label indices, 255 = ignore) and "
                "data_root/classes.txt (one class per line)"
            ),
            layout=_CUSTOM_LAYOUT,
            prepare_steps=(
                "nothing to convert: put the images in {dataset_dir}/images/<split>/, the labels "
                "(8-bit PNG class indices, 255 = ignore) in {dataset_dir}/annotations/<split>/"
                "<id>.png and one class per line in {dataset_dir}/classes.txt",
            ),
        ),
    )
}


def _squash(name: str) -> str:
    """Lower-case ``name`` and drop ``-``, ``_``, ``.`` and spaces (for alias matching)."""
    return "".join(ch for ch in name.lower() if ch not in "-_. ")


def _build_lookup() -> dict[str, str]:
    """Squashed name or alias -> registry name."""
    lookup: dict[str, str] = {}
    for spec in _REGISTRY.values():
        for key in (spec.name, *spec.aliases):
            lookup[_squash(key)] = spec.name
    return lookup


_LOOKUP = _build_lookup()


def list_datasets() -> list[str]:
    """Registry names, in registry order (the eight benchmarks, then ``custom``)."""
    return list(_REGISTRY)


def get_dataset(name: str, data_root: str | os.PathLike | None = None) -> DatasetSpec:
    """The spec of dataset ``name`` (a registry name or an alias such as ``ade``, ``voc``,
    ``pc59``, ``coco-stuff``, ``city``; case, ``-``, ``_`` and spaces are ignored).

    For ``custom`` with ``data_root`` given, ``num_classes`` is read from
    ``data_root/classes.txt``; without it, it stays 0.

    Raises:
        OvssError: unknown name (the message lists the known names).
    """
    key = _LOOKUP.get(_squash(str(name)))
    if key is None:
        raise OvssError(
            f"'{name}' is not a known dataset; choose from {', '.join(list_datasets())}"
        )
    spec = _REGISTRY[key]
    if key == "custom" and data_root is not None:
        spec = dataclasses.replace(spec, num_classes=len(class_names(key, data_root=data_root)))
    return spec


def _resolve_split(spec: DatasetSpec, split: str | None) -> str:
    """Canonical split name for ``split`` (None -> the default split)."""
    if split is None:
        return spec.default_split
    if split in spec.splits:
        return split
    alias = dict(spec.layout.split_aliases).get(split)
    if alias is not None:
        return alias
    if spec.name == "custom" and split and Path(split).name == split and split not in (".", ".."):
        return split  # a custom dataset may use any split folder name
    raise OvssError(f"{spec.name} has no split '{split}'; choose from {', '.join(spec.splits)}")


def _find_dataset_dir(spec: DatasetSpec, data_root: str | os.PathLike, split: str) -> Path:
    """The dataset folder under ``data_root`` (see the module docstring for the candidates)."""
    layout = spec.layout
    root = Path(data_root).expanduser()
    marker = layout.marker.format(split=layout.token(split))
    for sub in layout.folders:
        candidate = root / sub if sub else root
        if (candidate / marker).is_dir():
            return candidate
    tried = [(root / sub if sub else root) / marker for sub in layout.folders]
    also = f" (also looked for {', '.join(map(str, tried[:-1]))})" if len(tried) > 1 else ""
    state = "" if root.is_dir() else f"data_root {root} does not exist; "
    raise OvssError(f"{spec.name}: {state}expected {tried[-1]}{also}; download: {spec.doc}")


def _list_by_walk(img_dir: Path, suffix: str | None) -> dict[str, Path]:
    """Images under ``img_dir`` (recursive, hidden entries skipped), keyed by id = relative POSIX
    path without ``suffix`` (``suffix=None``: any image suffix, case-insensitive)."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(img_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fname in filenames:
            if fname.startswith("."):
                continue
            if suffix is None:
                if not is_image_file(fname):
                    continue
                cut = len(Path(fname).suffix)
            else:
                if not fname.endswith(suffix):
                    continue
                cut = len(suffix)
            full = Path(dirpath) / fname
            image_id = full.relative_to(img_dir).as_posix()[:-cut]
            if image_id in found:
                raise OvssError(
                    f"two images share the id '{image_id}': {found[image_id]} and {full}; "
                    "rename one of them"
                )
            found[image_id] = full
    return found


def _read_split_file(path: Path) -> list[str]:
    """Ids listed in a split file, one per line, in file order (blank lines skipped)."""
    text = path.read_text(encoding="utf-8-sig")
    return [line.strip() for line in text.splitlines() if line.strip()]


def list_dataset_images(
    name: str, data_root: str | os.PathLike, split: str | None = None
) -> list[ImageRecord]:
    """The images of one split of a benchmark (or of a ``custom`` dataset), mmseg order.

    - ADE20K / COCO / Cityscapes / custom: the image folder is listed recursively (files with the
      dataset's image suffix; hidden files skipped) and sorted by id.
    - VOC / PASCAL-Context: the ids of ``ImageSets/.../<split>.txt``, in file order.

    ``label_path`` is the ground-truth path per EVAL.md §1.1 (set even when that file is absent;
    evaluation checks it). For ``custom`` it is None when ``annotations/<split>`` does not exist.
    Image files named in a split file are not checked here; a missing one fails when read
    (:class:`~featurestore.errors.ImageReadError`).

    Args:
        name: dataset name or alias.
        data_root: the folder containing the dataset folder, or the dataset folder itself (see
            the module docstring).
        split: split name (or alias such as ``val`` for ADE, ``val2017`` for COCO); default:
            the dataset's ``default_split``.

    Raises:
        OvssError: unknown dataset or split, dataset folder / split file / image folder not
            found (the message names the expected path and what to download), or no images.
    """
    spec = get_dataset(name)
    split = _resolve_split(spec, split)
    layout = spec.layout
    base = Path(os.path.abspath(_find_dataset_dir(spec, data_root, split)))
    token = layout.token(split)
    img_dir = base / layout.img_dir.format(split=token)
    ann_dir = base / layout.ann_dir.format(split=token)
    if not img_dir.is_dir():
        raise OvssError(f"{spec.name}: image folder {img_dir} not found; download: {spec.doc}")

    if layout.split_file is not None:
        split_file = base / layout.split_file.format(split=token)
        if not split_file.is_file():
            raise OvssError(f"{spec.name}: split file {split_file} not found; download: {spec.doc}")
        suffix = layout.img_suffix or ".jpg"
        ids = _read_split_file(split_file)
        paths = {i: img_dir / f"{i}{suffix}" for i in ids}
        if not ids:
            raise OvssError(f"{spec.name}: split file {split_file} lists no image")
    else:
        paths = _list_by_walk(img_dir, layout.img_suffix)
        ids = sorted(paths)
        if not ids:
            what = f"*{layout.img_suffix}" if layout.img_suffix else "image"
            raise OvssError(f"{spec.name}: no {what} files under {img_dir}")

    with_labels = spec.name != "custom" or ann_dir.is_dir()
    return [
        ImageRecord(
            image_id=i,
            path=str(paths[i]),
            source=spec.name,
            split=split,
            label_path=str(ann_dir / f"{i}{layout.seg_suffix}") if with_labels else None,
        )
        for i in ids
    ]


def resolve_split(name: str, split: str | None = None) -> str:
    """The canonical name of ``split`` of dataset ``name`` (None -> its default split; aliases
    such as ``val`` for ADE20K or ``val2017`` for COCO are accepted).

    Raises:
        OvssError: unknown dataset or split.
    """
    return _resolve_split(get_dataset(name), split)


def _guess_dataset_dir(spec: DatasetSpec, root: Path) -> Path:
    """Where the dataset folder *should* be under ``root`` when it is not there yet.

    ``root`` may already be the dataset folder or part of its path (``.../VOCdevkit`` for
    ``VOCdevkit/VOC2010``); otherwise the canonical sub-folder (last of ``layout.folders``).
    """
    named = [tuple(f.split("/")) for f in spec.layout.folders if f]
    for parts in named:  # root is the dataset folder itself
        if root.parts[-len(parts) :] == parts:
            return root
    for parts in named:  # root is a leading part of the dataset path (e.g. VOCdevkit)
        for k in range(len(parts) - 1, 0, -1):
            if root.parts[-k:] == parts[:k]:
                return root.joinpath(*parts[k:])
    canonical = spec.layout.folders[-1]
    return root / canonical if canonical else root


def dataset_dir(
    name: str, data_root: str | os.PathLike, split: str | None = None, must_exist: bool = True
) -> Path:
    """The dataset folder of ``name`` under ``data_root`` (absolute path).

    The candidates are those of :func:`list_dataset_images` (see the module docstring); the
    first one holding the dataset's marker folder for ``split`` wins.

    Args:
        name: dataset name or alias.
        data_root: the folder containing the dataset folder, or the dataset folder itself.
        split: split whose marker folder identifies the dataset (default: the default split).
        must_exist: when False and no candidate holds the marker, return where the folder is
            expected (``data_root`` itself when it looks like the dataset folder, else the
            canonical sub-folder) instead of raising.

    Raises:
        OvssError: unknown dataset or split; with ``must_exist``, folder not found (the
            message names the expected path and what to download).
    """
    spec = get_dataset(name)
    split = _resolve_split(spec, split)
    try:
        found = _find_dataset_dir(spec, data_root, split)
    except OvssError:
        if must_exist:
            raise
        found = _guess_dataset_dir(spec, Path(data_root).expanduser())
    return Path(os.path.abspath(found))


@dataclass(frozen=True)
class DatasetInfo:
    """One line of ``ovss data list``: a registry entry summarised for people.

    Attributes:
        name: registry name.
        num_classes: evaluated classes (custom: from ``classes.txt`` when ``data_root`` has one,
            else 0).
        split: the evaluated (default) split.
        expected_images: standard image count of that split, None when unknown.
        label_rule: how label values are read (reduce_zero_label, background, ignore).
        layout_root: the dataset folder relative to ``data_root`` (canonical name).
        label_suffix: suffix of the label files.
        dataset_dir: with ``data_root``: the dataset folder found there, else None.
        present: with ``data_root``: whether the folder was found; None without ``data_root``.
    """

    name: str
    num_classes: int
    split: str
    expected_images: int | None
    label_rule: str
    layout_root: str
    label_suffix: str
    dataset_dir: str | None = None
    present: bool | None = None


def _label_rule(spec: DatasetSpec) -> str:
    """One-phrase description of how the labels of ``spec`` are read."""
    if spec.reduce_zero_label:
        return "reduce_zero_label: raw 0 ignored, k -> k-1, 255 ignored"
    if spec.has_background:
        return "0 = background (scored), 255 ignored"
    return "255 ignored"


def describe_datasets(data_root: str | os.PathLike | None = None) -> list[DatasetInfo]:
    """One :class:`DatasetInfo` per registry entry, in registry order.

    With ``data_root``, each entry also says whether its dataset folder (default split) is
    found there; nothing else is read.
    """
    infos = []
    for name, spec in _REGISTRY.items():
        num_classes = spec.num_classes
        found: str | None = None
        present: bool | None = None
        if data_root is not None:
            try:
                found = str(dataset_dir(name, data_root))
                present = True
            except OvssError:
                present = False
            if name == "custom" and present:
                try:
                    num_classes = get_dataset(name, data_root=data_root).num_classes
                except OvssError:
                    num_classes = 0
        canonical = spec.layout.folders[-1]
        infos.append(
            DatasetInfo(
                name=name,
                num_classes=num_classes,
                split=spec.default_split,
                expected_images=spec.expected_count(spec.default_split),
                label_rule=_label_rule(spec),
                layout_root=f"{canonical}/" if canonical else "./",
                label_suffix=spec.layout.seg_suffix,
                dataset_dir=found,
                present=present,
            )
        )
    return infos


def _parse_lines(text: str, separator: str) -> list[list[str]]:
    """Split class-file text into per-class synonym lists, as the reference parsers do:
    ``line.split(separator)`` with newlines removed. Trailing empty lines are dropped."""
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.split(separator) for line in lines]


def _read_bundled(file_name: str) -> str:
    """Text of a bundled class-name file (``featurestore/data/classnames/<file_name>``)."""
    node = resources.files(CLASSNAMES_PACKAGE).joinpath("classnames")
    for part in file_name.split("/"):
        node = node.joinpath(part)
    return node.read_text(encoding="utf-8")


def class_names(
    name: str, family: str = "sclip", data_root: str | os.PathLike | None = None
) -> list[list[str]]:
    """Per class (in label order), its synonyms (the text queries of that class).

    Args:
        name: dataset name or alias.
        family: ``"sclip"`` (files split on ``", "``), ``"proxyclip"`` (split on
            ``"; "``) or ``"clearclip"`` (split on ``","``). ``proxyclip`` uses the
            ProxyCLIP/Trident variant where one exists (voc20, voc21, coco_object) and the SCLIP
            file otherwise (those files contain neither separator, so both parsers agree);
            ``clearclip`` its own voc21 / coco_object files, the ProxyCLIP voc20 and the
            SCLIP file otherwise (no comma in those).
        data_root: required for ``custom``: its ``classes.txt`` is read with
            :func:`read_class_file` (``family`` is then ignored).

    Names are kept byte-exact apart from the removed newline (e.g. context60's last class is
    ``"wood "`` with its trailing space, as in the reference parser).

    Raises:
        OvssError: unknown dataset or family, or ``custom`` without ``data_root``.
    """
    spec = get_dataset(name)
    fam = FAMILIES.get(str(family).lower())
    if fam is None:
        raise OvssError(
            f"'{family}' is not a known class-name family; choose from {', '.join(FAMILIES)}"
        )
    if spec.name == "custom":
        if data_root is None:
            raise OvssError("the custom dataset needs data_root to read its classes.txt")
        return read_class_file(Path(data_root).expanduser() / "classes.txt")
    file_name = spec.class_file
    if fam == "proxyclip" and spec.class_file_proxyclip is not None:
        file_name = spec.class_file_proxyclip
    if fam == "clearclip":
        file_name = _CLEARCLIP_FILES.get(spec.name, file_name)
    names = _parse_lines(_read_bundled(file_name), _SEPARATORS[fam])
    if len(names) != spec.num_classes:  # guards the packaged data, never the user's input
        raise OvssError(
            f"class file {file_name} has {len(names)} lines, expected {spec.num_classes}; "
            "the installed package is damaged, reinstall ovss"
        )
    return names


def read_class_file(path: str | os.PathLike) -> list[list[str]]:
    """A user's class file: one class per line, in label order; each line lists synonyms.

    Separator rule: if any line contains ``"; "`` every line is split on ``"; "`` (ProxyCLIP
    style), otherwise on ``", "`` (SCLIP style). Each synonym is stripped of surrounding
    whitespace and empty synonyms are dropped; trailing blank lines are ignored. A UTF-8 BOM is
    accepted.

    Raises:
        OvssError: file missing/unreadable, no class, or a blank line between classes (which
            would shift every later label id).
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise OvssError(f"class file not found: {p} (one class per line)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise OvssError(f"cannot read class file {p}: {err}") from err
    separator = "; " if "; " in text else ", "
    classes: list[list[str]] = []
    for lineno, raw in enumerate(_parse_lines(text, separator), start=1):
        synonyms = [s.strip() for s in raw if s.strip()]
        if not synonyms:
            raise OvssError(
                f"class file {p}: line {lineno} is empty; every line up to the last must name "
                "a class (label id = line number - 1)"
            )
        classes.append(synonyms)
    if not classes:
        raise OvssError(f"class file {p} holds no class (one class per line)")
    return classes


# -- palettes -----------------------------------------------------------------------------------

MAX_PALETTE_SIZE = 1 << 16
"""Largest ``n`` accepted by :func:`palette`."""

_CITYSCAPES_COLOURS = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)  # the official Cityscapes trainId colours (road, sidewalk, ..., bicycle)


def voc_colour_map(labels: np.ndarray) -> np.ndarray:
    """PASCAL VOC bit-interleave colours of integer ``labels`` (any shape) -> (..., 3) uint8.

    Bits 0, 1, 2 of the label go to the most significant bit of R, G, B, the next three bits to
    the next bit, and so on over 8 rounds, so labels 0..2**24-1 all get distinct colours (0 is
    black, 1 is (128, 0, 0), ...).
    """
    c = np.asarray(labels, dtype=np.int64)
    rgb = np.zeros((*c.shape, 3), dtype=np.int64)
    for bit in range(7, -1, -1):
        for channel in range(3):
            rgb[..., channel] |= ((c >> channel) & 1) << bit
        c = c >> 3
    return rgb.astype(np.uint8)


# The published display colours (mmsegmentation's dataset tables), transcribed as RRGGBB hex, one
# class per entry in the datasets' class order. Pascal Context's 60-class table is the first 60
# entries of the ADE20K one (background first), as in mmsegmentation.
_ADE20K_HEX = (
    "787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 96053d",
    "787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0",
    "0907e6 dcdcdc ff095c 7009ff 08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06",
    "ffc207 ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff 8c8c8c fa0a0f 14ff00 1fff00",
    "ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff 0bc8c8 ff5200 00fff5 003dff 00ff70",
    "00ff85 ff0000 ffa300 ff6600 c2ff00 008fff 33ff00 0052ff 00ff29 00ffad 0a00ff adff00 00ff99",
    "ff5c00 ff00ff ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 00ff52",
    "000aff 0070ff 3300ff 00c2ff 007aff 00ffa3 ff9900 00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00",
    "08b8aa 8500ff 00ff5c b800ff ff001f 00b8ff 00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff",
    "9900ff 47ff00 ff00a3 ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00",
    "00ccff 1400ff ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff 4700ff 7a00ff 00ffb8",
    "005cff b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff",
)
_COCO_STUFF_HEX = (
    "00c040 00c040 004060 80c0c0 004040 00c0e0 00c0c0 80c040 00c060 80c040 8020c0 0000e0 000040",
    "00a0c0 800060 8000c0 0020c0 8080e0 0000c0 80a0c0 808000 800020 802000 800080 408020 00a000",
    "000000 c080a0 002000 008080 4080a0 80a000 008000 c08020 806080 000080 400020 00e080 800000",
    "c000a0 006080 808080 4000a0 80e080 808040 c00020 806000 8000c0 008020 40e000 000040 8080a0",
    "406000 0080c0 0080a0 c0e000 008040 808020 c02080 0040c0 000020 40a080 804040 8000a0 402080",
    "80c0c0 0000a0 c0a080 80c000 800060 c02000 804080 408060 40a000 004000 c080e0 402000 00c080",
    "4080e0 c0a000 00c000 c08060 c06080 004080 400060 40e080 804000 c000e0 406080 80c080 4000e0",
    "c0e080 80c040 c00060 c06000 8040c0 008060 00e000 404040 8080e0 006000 40c0c0 0080e0 80e000",
    "40c040 808060 802080 4000c0 004060 00a080 c00040 8040e0 002080 c080c0 0040e0 80a080 c08000",
    "804020 802040 c00080 40c020 00a040 400000 c0c0a0 002040 408080 40c0a0 80a040 408000 c0c020",
    "8060c0 400080 404020 00e0c0 c00000 c040a0 0060c0 c08080 4040a0 80e0c0 c08040 c04020 806040",
    "c000c0 00c020 40e040 400040 80c0a0 406040 4080c0 00c0a0 c0e040 408040 80c020 c020c0 4040c0",
    "004020 40a0c0 c04040 8040a0 4020c0 c0c0c0 0040a0 c0a0c0 c0c000 804060 c02040 c04080 40c060",
    "40a040 404000",
)


def _hex_colours(table: tuple[str, ...]) -> np.ndarray:
    """(K, 3) uint8 colours of a table of space-separated RRGGBB words."""
    words = " ".join(table).split()
    return np.array([[int(w[i : i + 2], 16) for i in (0, 2, 4)] for w in words], dtype=np.uint8)


def _official_colours(name: str) -> np.ndarray | None:
    """The published colour table of dataset ``name`` (K, 3), or None (VOC rule)."""
    if name == "cityscapes":
        return np.asarray(_CITYSCAPES_COLOURS, dtype=np.uint8)
    if name == "ade20k":
        return _hex_colours(_ADE20K_HEX)
    if name == "context60":
        return _hex_colours(_ADE20K_HEX)[:60]
    if name == "context59":
        return _hex_colours(_ADE20K_HEX)[1:60]
    if name == "coco_stuff171":
        return _hex_colours(_COCO_STUFF_HEX)
    return None


def palette(name: str, n: int) -> np.ndarray:
    """Display colours for ``n`` classes of dataset ``name``: (n, 3) uint8, deterministic.

    - ade20k, coco_stuff171, context60, context59, cityscapes: the datasets' published colour
      tables (mmsegmentation's ADE20K, COCO-Stuff and Pascal Context tables, the official
      Cityscapes trainId colours); context59 is context60 without its background colour.
    - voc21, coco_object (a scored background): the VOC colour map, class i -> VOC colour i
      (background black, aeroplane (128, 0, 0), ...); voc20 and custom: VOC colour i+1, so
      no class is black and voc20 keeps the colours of voc21.

    All colours within one palette are distinct: a colour a published table repeats (ADE20K
    gives skyscraper the colour of road; COCO-Stuff repeats 9 colours, e.g. person and
    bicycle) is replaced, and classes beyond a table get, the first VOC colours (1, 2, ...)
    not already in the palette [ours].

    Raises:
        OvssError: unknown dataset, or ``n`` outside 0..:data:`MAX_PALETTE_SIZE`.
    """
    spec = get_dataset(name)
    if not 0 <= n <= MAX_PALETTE_SIZE:
        raise OvssError(f"palette size must be in 0..{MAX_PALETTE_SIZE}, got {n}")
    table = _official_colours(spec.name)
    if table is None:
        offset = 0 if spec.has_background else 1
        return voc_colour_map(np.arange(n, dtype=np.int64) + offset)
    table = table[:n]
    keep = [
        i
        for i, c in enumerate(map(tuple, table.tolist()))
        if c not in {tuple(x) for x in table[:i].tolist()}
    ]
    taken = {tuple(c) for c in table[keep].tolist()}
    spare = iter(
        c
        for c in voc_colour_map(np.arange(1, 2 * n + len(table) + 2)).tolist()
        if tuple(c) not in taken
    )
    out = np.zeros((n, 3), dtype=np.uint8)
    kept = set(keep)
    for i in range(n):
        out[i] = table[i] if i in kept else next(spare)
    return out
