"""Ground-truth labels: MMSegmentation's decoding rule, built-in conversions, dataset checks.

Decoding (:func:`load_label`) is mmseg's ``LoadAnnotations`` (docs EVAL.md §1.1 and §7 item 1):
the PNG is opened with PIL and converted with ``np.array`` (a palette PNG gives its palette
*indices*, never RGB colours), cast to ``uint8``, then ``reduce_zero_label`` is applied for
ADE20K, VOC20 and Context59 (0 -> 255, k -> k-1, 255 stays 255). 255 is the ignore value. Labels
are never resized and no EXIF orientation is applied (mmcv's ``flag='unchanged'`` applies none).

Deliberate departures from mmseg, all on inputs the official benchmark files never contain:

- a label whose values do not fit in 8 bits (16/32-bit PNG with a value above 255) is refused;
  mmseg's ``astype(np.uint8)`` would wrap it silently;
- a multi-channel label (RGB colours, grey + alpha) is refused; mmseg would keep 3 channels and
  fail later in the metric;
- an image whose label has another size is reported and skipped by :class:`LabelSource` (mmseg
  would crash on it, EVAL.md §4.3);
- the COCO conversions map the 11 unused raw thing ids and raw 182..254, which never occur in
  COCO-Stuff, to 255 (ignore) and report the files holding them; mmseg's loop over its id
  dictionary would leave such values unchanged.

Conversions (``ovss data prepare``): COCO-Stuff ``_labelTrainIds`` and COCO-Object
``_instanceTrainIds`` from the raw ``stuffthingmaps`` PNGs (256-entry lookup tables, several
processes, atomic writes, idempotent). PASCAL-Context needs the external Detail API and
Cityscapes the external cityscapesScripts, so for those (and for the datasets used as downloaded)
:func:`prepare_dataset` returns the instructions; :func:`context_ids_to_labels` is the Context
id -> label step of mmseg's converter, for masks already exported from the Detail API.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from featurestore.datasets import (
    DatasetSpec,
    dataset_dir,
    get_dataset,
    list_dataset_images,
    resolve_split,
)
from featurestore.errors import ImageReadError, OvssError
from featurestore.images import ImageRecord, probe_image

ProgressFn = Callable[[str, int, int], None]
"""Progress callback ``(label, done, total)`` (what ``ovss_cli.render.progress`` yields)."""

IGNORE_INDEX = 255
"""Label value ignored by the metric (mmseg ``ignore_index``)."""

# -- decoding -----------------------------------------------------------------------------------


class LabelError(OvssError):
    """A label file is missing, unreadable or not a single-channel 8-bit index image."""


def _reason(err: BaseException) -> str:
    """A short human-readable reason for a failure to open or decode a label file."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(err, UnidentifiedImageError):
        return "not an image, or a format PIL cannot decode"
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def decode_label(path: str | os.PathLike) -> np.ndarray:
    """Raw label values of a label image: (H, W) uint8, before any label rule.

    PIL decodes the file and ``np.array`` converts it, so a palette (``P``) PNG gives its
    indices, a grey (``L``) PNG its values, a bilevel (``1``) image 0/1. 16/32-bit integer
    images are accepted when every value lies in 0..255.

    Raises:
        LabelError: missing, unreadable or truncated file; values outside 0..255; a
            multi-channel or float image (message: ``"cannot read label <path>: <reason>"``).
    """
    where = os.fspath(path)
    try:
        with Image.open(where) as im:
            im.load()
            mode = im.mode
            values = np.array(im)
    except Exception as err:  # any failure on bad input is a read error for this file
        raise LabelError(f"cannot read label {where}: {_reason(err)}") from err
    if mode in ("L", "P"):
        return values
    if mode == "1":
        return values.astype(np.uint8)
    if mode == "I" or mode.startswith("I;16"):
        if values.size and (int(values.min()) < 0 or int(values.max()) > 255):
            raise LabelError(
                f"cannot read label {where}: values {int(values.min())}..{int(values.max())} of "
                f"this {mode} image do not fit in 8 bits (labels are class indices 0..255)"
            )
        return values.astype(np.uint8)
    raise LabelError(
        f"cannot read label {where}: it is a {mode} image; a label must be one channel of "
        "class indices (palette or grey PNG), not colours"
    )


_REDUCE_LUT = np.concatenate([[255], np.arange(255)]).astype(np.uint8)
_REDUCE_LUT[255] = 255  # raw 255 stays ignored


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label`` on a uint8 label: 0 -> 255, k -> k-1 (1..254), 255 -> 255.

    Same result as mmseg's ``gt[gt == 0] = 255; gt = gt - 1; gt[gt == 254] = 255``, done with a
    256-entry lookup table. Returns a new (H, W) uint8 array.
    """
    return _REDUCE_LUT[np.asarray(label, dtype=np.uint8)]


def _spec_of(dataset: str | DatasetSpec) -> DatasetSpec:
    """The registry entry of ``dataset`` (a name, an alias, or a spec passed through)."""
    return dataset if isinstance(dataset, DatasetSpec) else get_dataset(dataset)


def load_label(dataset: str | DatasetSpec, path: str | os.PathLike) -> np.ndarray:
    """The ground truth of one image as the metric sees it: (H, W) uint8, 255 = ignore.

    :func:`decode_label`, then ``reduce_zero_label`` when the dataset sets it (ade20k, voc20,
    context59). Never resized.

    Args:
        dataset: dataset name or alias, or its :class:`~featurestore.datasets.DatasetSpec`.
        path: the label file (``ImageRecord.label_path``).

    Raises:
        LabelError: see :func:`decode_label`.
        OvssError: unknown dataset.
    """
    spec = _spec_of(dataset)
    label = decode_label(path)
    return reduce_zero_label(label) if spec.reduce_zero_label else label


def _out_of_range(histogram: np.ndarray, num_classes: int) -> np.ndarray:
    """Values with a non-zero count in a 256-bin ``histogram`` outside 0..C-1 and 255."""
    bad = np.flatnonzero(histogram)
    return bad[(bad >= num_classes) & (bad != IGNORE_INDEX)]


def check_label(label: np.ndarray, num_classes: int) -> np.ndarray:
    """The distinct values of ``label`` that are neither a class (0..num_classes-1) nor 255.

    Args:
        label: an integer label array of any shape (usually :func:`load_label`'s output, so
            ``reduce_zero_label`` already applied).
        num_classes: number of classes C.

    Returns:
        Sorted int64 array of the offending values (empty when the label is valid).
    """
    values = np.asarray(label)
    if values.dtype == np.uint8:
        return _out_of_range(np.bincount(values.ravel(), minlength=256), num_classes)
    found = np.unique(values).astype(np.int64)
    return found[((found < 0) | (found >= num_classes)) & (found != IGNORE_INDEX)]


# -- COCO-Stuff / COCO-Object / PASCAL-Context mappings -------------------------------------------

COCO_UNUSED_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
"""Raw COCO-Stuff thing ids (category_id - 1) that no annotation uses."""

COCO_RAW_IDS: tuple[int, ...] = tuple(sorted(set(range(182)) - set(COCO_UNUSED_IDS)))
"""The 171 raw ids in use, in trainId order: things 0..89 (80 ids), stuff 91..181 (91 ids)."""

_COCO_THING_MAX = 90  # raw ids 0..90 are things (90 itself is unused), 91..181 stuff


def _coco_luts() -> dict[str, np.ndarray]:
    """The 256-entry raw -> trainId tables of both COCO conversions (see :func:`coco_lut`)."""
    raw = np.asarray(COCO_RAW_IDS)
    stuff = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    stuff[raw] = np.arange(len(raw))
    obj = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    things = raw[raw <= _COCO_THING_MAX]
    obj[things] = stuff[things] + 1
    obj[raw[raw > _COCO_THING_MAX]] = 0
    obj[IGNORE_INDEX] = 0
    return {"coco_stuff": stuff, "coco_object": obj}


_COCO_LUTS = _coco_luts()


def coco_lut(target: str) -> np.ndarray:
    """Lookup table raw stuffthingmaps value -> label value, (256,) uint8 (a copy).

    - ``"coco_stuff"`` (``_labelTrainIds``, mmseg ``coco_stuff164k.py``): trainId = rank of the
      raw id in :data:`COCO_RAW_IDS` (things 0..79, stuff 80..170); 255 stays 255.
    - ``"coco_object"`` (``_instanceTrainIds``, GroupViT ``cvt_coco_object.py``): thing ->
      its COCO-Stuff trainId + 1 (1..80); stuff 91..181 and 255 (unlabeled) -> 0 (background).

    In both, the unused raw ids (:data:`COCO_UNUSED_IDS`) and 182..254 map to 255.

    Raises:
        OvssError: unknown ``target``.
    """
    if target not in _COCO_LUTS:
        raise OvssError(f"'{target}' is not a COCO conversion; choose from coco_stuff, coco_object")
    return _COCO_LUTS[target].copy()


def coco_stuff_train_ids(raw: np.ndarray) -> np.ndarray:
    """Raw stuffthingmaps values -> COCO-Stuff-171 trainIds (same shape, uint8)."""
    return _COCO_LUTS["coco_stuff"][np.asarray(raw, dtype=np.uint8)]


def coco_object_train_ids(raw: np.ndarray) -> np.ndarray:
    """Raw stuffthingmaps values -> COCO-Object labels, 0 = background (same shape, uint8)."""
    return _COCO_LUTS["coco_object"][np.asarray(raw, dtype=np.uint8)]


_COCO_KNOWN_RAW = np.zeros(256, dtype=bool)
_COCO_KNOWN_RAW[list(COCO_RAW_IDS)] = True
_COCO_KNOWN_RAW[IGNORE_INDEX] = True

CONTEXT_IDS: tuple[int, ...] = tuple(
    sorted(
        [
            0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416,
            33, 162, 420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354,
            424, 68, 326, 72, 458, 34, 207, 80, 355, 85, 347, 220, 349, 360, 98, 187, 104, 105,
            366, 189, 368, 113, 115,
        ]
    )
)  # fmt: skip
"""The 60 PASCAL-Context category ids of the 59-class set plus 0 (background), sorted: mmseg's
``_mapping`` in ``tools/dataset_converters/pascal_context.py``."""


def context_ids_to_labels(mask: np.ndarray) -> np.ndarray:
    """PASCAL-Context category ids (a Detail API ``getMask``) -> labels 0..59, uint8.

    ``np.digitize(mask, CONTEXT_IDS, right=True)``, the mapping of mmseg's converter: 0 stays
    background, the 59 classes become 1..59 in alphabetical order (aeroplane = 1, ...,
    wood = 59), the order of ``context60.txt``.

    Raises:
        OvssError: the mask holds a value that is not one of :data:`CONTEXT_IDS` (mmseg's
            converter asserts the same).
    """
    values = np.asarray(mask)
    known = np.asarray(CONTEXT_IDS)
    unknown = np.setdiff1d(np.unique(values), known)
    if unknown.size:
        shown = ", ".join(str(v) for v in unknown[:10].tolist())
        raise OvssError(
            f"mask holds value(s) {shown} that are not among the 60 PASCAL-Context ids "
            "(0 = background and the ids of the 59 classes)"
        )
    return np.digitize(values, known, right=True).astype(np.uint8)


# -- (record, label) pairs -------------------------------------------------------------------------

PROBLEM_KINDS: tuple[str, ...] = (
    "missing_image",
    "unreadable_image",
    "no_label",
    "missing_label",
    "unreadable_label",
    "size_mismatch",
    "out_of_range",
    "write_failed",
)
"""Every :attr:`LabelProblem.kind`."""


@dataclass(frozen=True)
class LabelProblem:
    """A problem with one image's ground truth.

    Attributes:
        image_id: the record's id (for conversions: the raw map's id).
        kind: one of :data:`PROBLEM_KINDS`.
        message: one line saying what is wrong, with the file path.
        skipped: whether the image is left out of evaluation (False for ``out_of_range``, which
            mmseg scores too: such pixels count in no class's label area).
    """

    image_id: str
    kind: str
    message: str
    skipped: bool = True


def _shape_text(shape: tuple[int, ...]) -> str:
    """``(H, W)`` as ``"WxH"`` (the order image tools print)."""
    return f"{shape[1]}x{shape[0]}"


def _inspect(
    spec: DatasetSpec,
    num_classes: int | None,
    record: ImageRecord,
    image_size: tuple[int, int] | None,
) -> tuple[np.ndarray | None, list[LabelProblem], np.ndarray | None]:
    """Read and check the label of ``record``.

    Returns ``(label, problems, histogram)``: the label (None when it cannot be read, or when
    the record has no label file), the problems found, and the 256-bin value histogram of the
    label. ``image_size`` None: the image header is read for its size.
    """
    problems: list[LabelProblem] = []
    if image_size is None:
        try:
            image_size = probe_image(record.path)
        except ImageReadError as err:
            kind = "missing_image" if not os.path.exists(record.path) else "unreadable_image"
            problems.append(LabelProblem(record.image_id, kind, str(err)))
    if record.label_path is None:
        return None, problems, None
    try:
        label = load_label(spec, record.label_path)
    except LabelError as err:
        kind = "missing_label" if not os.path.exists(record.label_path) else "unreadable_label"
        problems.append(LabelProblem(record.image_id, kind, str(err)))
        return None, problems, None
    if image_size is not None and label.shape != tuple(image_size):
        problems.append(
            LabelProblem(
                record.image_id,
                "size_mismatch",
                f"label {record.label_path} is {_shape_text(label.shape)} but image "
                f"{record.path} is {_shape_text(tuple(image_size))} (W x H); labels are never "
                "resized, so this image cannot be scored",
            )
        )
    histogram = np.bincount(label.ravel(), minlength=256)
    if num_classes:
        bad = _out_of_range(histogram, num_classes)
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:10].tolist())
            raw = ""
            if spec.reduce_zero_label:
                raw = " after reduce_zero_label (raw " + ", ".join(
                    str(v + 1) for v in bad[:10].tolist()
                )
                raw += ")"
            problems.append(
                LabelProblem(
                    record.image_id,
                    "out_of_range",
                    f"label {record.label_path} holds value(s) {shown}{raw}, outside classes "
                    f"0..{num_classes - 1} and ignore 255 ({int(histogram[bad].sum())} pixels)",
                    skipped=False,
                )
            )
    return label, problems, histogram


class LabelSource:
    """The (record, label) pairs of a list of dataset images, for evaluation.

    Iterating yields ``(record, label)`` with ``label`` from :func:`load_label`. An image whose
    label cannot be scored is **skipped** and reported in :attr:`problems` (and passed to
    ``on_problem`` as it happens), iteration goes on:

    - label file missing or unreadable (``missing_label``, ``unreadable_label``);
    - record without a label file (``no_label``: a custom dataset without ``annotations/``);
    - image and label of different sizes (``size_mismatch``): mmseg would crash here (EVAL.md
      §4.3); we skip the image with a message naming both sizes instead;
    - image missing or unreadable when its size has to be read from its header
      (``missing_image``, ``unreadable_image``).

    A label holding values outside 0..C-1 and 255 is reported (``out_of_range``) but **kept**:
    mmseg scores it too (those pixels count in the prediction area of the predicted class and in
    no class's label area).

    Args:
        dataset: dataset name or alias, or its spec.
        records: the images, e.g. :func:`~featurestore.datasets.list_dataset_images`.
        image_sizes: image id -> (H, W) after EXIF orientation, e.g. from a feature store; ids
            not in it (or all ids, when None) are sized by reading the image header.
        data_root: for ``custom``: where its ``classes.txt`` lives (to range-check labels);
            without it custom labels are not range-checked.
        on_problem: called with each :class:`LabelProblem` when it is found.
    """

    def __init__(
        self,
        dataset: str | DatasetSpec,
        records: Iterable[ImageRecord],
        image_sizes: Mapping[str, tuple[int, int]] | None = None,
        data_root: str | os.PathLike | None = None,
        on_problem: Callable[[LabelProblem], None] | None = None,
    ) -> None:
        spec = _spec_of(dataset)
        if spec.name == "custom" and data_root is not None and not spec.num_classes:
            spec = get_dataset("custom", data_root=data_root)
        self.spec = spec
        self.records = list(records)
        self.image_sizes = image_sizes
        self.on_problem = on_problem
        self.problems: list[LabelProblem] = []

    def __len__(self) -> int:
        """Number of records (the number of pairs yielded is smaller when some are skipped)."""
        return len(self.records)

    def _report(self, problem: LabelProblem) -> None:
        self.problems.append(problem)
        if self.on_problem is not None:
            self.on_problem(problem)

    def __iter__(self) -> Iterator[tuple[ImageRecord, np.ndarray]]:
        """Yield ``(record, label)`` in record order; see the class docstring for skips."""
        num_classes = self.spec.num_classes or None
        for record in self.records:
            size = self.image_sizes.get(record.image_id) if self.image_sizes else None
            if record.label_path is None:
                self._report(
                    LabelProblem(
                        record.image_id, "no_label", f"image {record.path} has no label file"
                    )
                )
                continue
            label, problems, _ = _inspect(self.spec, num_classes, record, size)
            for problem in problems:
                self._report(problem)
            if label is not None and not any(p.skipped for p in problems):
                yield record, label

    @property
    def skipped_ids(self) -> list[str]:
        """Ids of the images skipped so far, in order."""
        seen: dict[str, None] = {}
        for p in self.problems:
            if p.skipped:
                seen.setdefault(p.image_id)
        return list(seen)


# -- ovss data verify ------------------------------------------------------------------------------


@dataclass
class NextStep:
    """A data command worth running next, as facts (the CLI renders the command line).

    Attributes:
        action: ``prepare`` (make the labels) or ``verify`` (check them).
        dataset: registry name.
        data_root: the data root the command takes.
        overwrite: redo labels that exist (``prepare``).
        run: the preparation is a built-in conversion that runs (``prepare``); False: it prints
            the steps to follow.
    """

    action: str
    dataset: str
    data_root: str
    overwrite: bool = False
    run: bool = True


@dataclass
class VerifyReport:
    """What :func:`verify_dataset` found.

    Attributes:
        dataset: registry name.
        split: canonical split name.
        dataset_dir: the dataset folder that was read.
        num_classes: C used for the range check (None: not checked, custom without classes).
        reduce_zero_label: whether labels were reduced before the range check.
        images_listed: images in the split listing.
        images_checked: images checked (the first ``limit`` of the listing).
        expected_images: standard size of the split (None when unknown).
        labels_checked: labels decoded successfully.
        classes_present: classes with at least one pixel in the checked labels.
        ignored_fraction: share of checked label pixels equal to 255.
        warnings: facts worth knowing that are not errors (subset of the split, ...).
        problems: one entry per problem found (see :data:`PROBLEM_KINDS`).
        next_steps: what to run next (a :class:`NextStep` each; the CLI renders the command).
    """

    dataset: str
    split: str
    dataset_dir: str
    num_classes: int | None
    reduce_zero_label: bool
    images_listed: int
    images_checked: int
    expected_images: int | None
    labels_checked: int = 0
    classes_present: int = 0
    ignored_fraction: float = 0.0
    warnings: list[str] = field(default_factory=list)
    problems: list[LabelProblem] = field(default_factory=list)
    next_steps: list[NextStep] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found (warnings do not count)."""
        return not self.problems

    def problem_counts(self) -> dict[str, int]:
        """Number of problems per kind, kinds in :data:`PROBLEM_KINDS` order, zeros left out."""
        counts = {kind: 0 for kind in PROBLEM_KINDS}
        for p in self.problems:
            counts[p.kind] += 1
        return {k: n for k, n in counts.items() if n}

    def to_dict(self) -> dict:
        """JSON-ready dict: every attribute plus ``ok`` and ``problem_counts``."""
        d = asdict(self)
        d["ok"] = self.ok
        d["problem_counts"] = self.problem_counts()
        return d


def default_workers() -> int:
    """Default number of worker processes/threads: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def verify_dataset(
    name: str,
    data_root: str | os.PathLike,
    split: str | None = None,
    limit: int | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> VerifyReport:
    """Check one split of a dataset: image count, every label readable, sizes, value ranges.

    For each image (the first ``limit`` ones when given): the image header is read (size after
    EXIF orientation), the label is decoded with :func:`load_label`, its size must equal the
    image's and its values must lie in 0..C-1 or be 255 (after ``reduce_zero_label``). Problems
    are collected, never raised. A split whose image count differs from the standard one (EVAL.md
    §1.1) gives a warning only: a subset is legitimate.

    Args:
        name: dataset name or alias.
        data_root: the folder containing the dataset folder, or the dataset folder itself.
        split: split name or alias (default: the evaluated split).
        limit: check only the first N images of the listing.
        workers: decoding threads (default: :func:`default_workers`).
        progress: callback ``(label, done, total)``.

    Raises:
        OvssError: unknown dataset or split, dataset folder / split file / image folder missing
            (nothing to check: the message says what to download).
    """
    spec = get_dataset(name)
    split = resolve_split(spec.name, split)
    records = list_dataset_images(spec.name, data_root, split)
    base = dataset_dir(spec.name, data_root, split)
    warnings: list[str] = []
    num_classes: int | None = spec.num_classes
    if spec.name == "custom":
        try:
            num_classes = get_dataset("custom", data_root=base).num_classes
        except OvssError as err:
            num_classes = None
            warnings.append(f"{err}; label values were not range-checked")
        if records[0].label_path is None:
            warnings.append(f"no annotations/{split} folder in {base}: only images were checked")
    expected = spec.expected_count(split)
    if expected is not None and len(records) != expected:
        warnings.append(
            f"{len(records)} images listed; the standard {spec.name} {split} split has "
            f"{expected} (fine for a subset, not for published numbers)"
        )
    checked = records[:limit] if limit else records
    report = VerifyReport(
        dataset=spec.name,
        split=split,
        dataset_dir=str(base),
        num_classes=num_classes,
        reduce_zero_label=spec.reduce_zero_label,
        images_listed=len(records),
        images_checked=len(checked),
        expected_images=expected,
        warnings=warnings,
    )
    histogram = np.zeros(256, dtype=np.int64)
    label_text = f"verify {spec.name} {split}"
    if progress is not None:
        progress(label_text, 0, len(checked))

    def check(record: ImageRecord) -> tuple[list[LabelProblem], np.ndarray | None]:
        _label, problems, hist = _inspect(spec, num_classes, record, None)
        return problems, hist

    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        for done, (problems, hist) in enumerate(pool.map(check, checked), start=1):
            report.problems.extend(problems)
            if hist is not None:
                histogram += hist
                report.labels_checked += 1
            if progress is not None:
                progress(label_text, done, len(checked))
    total = int(histogram.sum())
    report.ignored_fraction = float(histogram[IGNORE_INDEX]) / total if total else 0.0
    if num_classes:
        report.classes_present = int(np.count_nonzero(histogram[:num_classes]))
    _add_hints(report, spec, data_root, histogram)
    return report


def _add_hints(
    report: VerifyReport, spec: DatasetSpec, data_root: str | os.PathLike, histogram: np.ndarray
) -> None:
    """Warnings that explain a pattern of problems (missing labels) or a suspicious histogram."""
    counts = report.problem_counts()
    if counts.get("missing_label"):
        how = "the built-in conversion" if spec.converter is not None else "the preparation steps"
        report.warnings.append(
            f"{counts['missing_label']} label file(s) missing ({spec.layout.seg_suffix} files); "
            f"{how} create them"
        )
        report.next_steps.append(
            NextStep("prepare", spec.name, str(data_root), run=spec.converter is not None)
        )
    if spec.name == "coco_object" and histogram[IGNORE_INDEX]:
        report.warnings.append(
            "coco_object labels hold 255 pixels, but the reference conversion maps unlabeled "
            "pixels to 0 (background): were they converted from the raw maps? (the built-in "
            "conversion with overwrite redoes it)"
        )
        report.next_steps.append(NextStep("prepare", spec.name, str(data_root), overwrite=True))


# -- ovss data prepare -----------------------------------------------------------------------------

_COCO_OUTPUT_SUFFIX = {"coco_stuff": "_labelTrainIds.png", "coco_object": "_instanceTrainIds.png"}


@dataclass
class PrepareReport:
    """What :func:`prepare_dataset` did or what the user has to do.

    Attributes:
        dataset: registry name.
        action: ``"converted"`` (a built-in conversion ran) or ``"instructions"`` (nothing to
            run here; see ``steps``).
        ready: whether the labels are in place now (instructions: label files were found).
        dataset_dir: the dataset folder (found, or where it is expected).
        splits: canonical splits handled.
        steps: what to do, one instruction per entry, paths filled in.
        out_dir: where converted labels were written (conversions only).
        written: label files written.
        skipped: label files already present and kept (rerun without ``overwrite``).
        failures: files that could not be converted (``unreadable_label``/``write_failed``).
        unexpected_values: raw map -> values that are no COCO-Stuff id (mapped to 255).
        notes: other facts (images linked, source maps absent, ...).
        next_steps: what to run next (a :class:`NextStep` each; the CLI renders the command).
    """

    dataset: str
    action: str
    ready: bool
    dataset_dir: str
    splits: list[str]
    steps: list[str]
    out_dir: str | None = None
    written: int = 0
    skipped: int = 0
    failures: list[LabelProblem] = field(default_factory=list)
    unexpected_values: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    next_steps: list[NextStep] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no file failed."""
        return not self.failures

    def to_dict(self) -> dict:
        """JSON-ready dict: every attribute plus ``ok``."""
        d = asdict(self)
        d["ok"] = self.ok
        return d


def prepare_dataset(
    name: str,
    data_root: str | os.PathLike,
    split: str | None = None,
    out: str | os.PathLike | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> PrepareReport:
    """Get a dataset's labels ready: run the built-in conversion, or say what to do.

    - coco_stuff171: raw stuffthingmaps ``annotations/<split>2017/<id>.png`` ->
      ``<id>_labelTrainIds.png`` beside them (:func:`coco_lut` ``"coco_stuff"``).
    - coco_object: the same raw maps -> ``<id>_instanceTrainIds.png`` beside them, or under
      ``out/annotations/<split>2017/`` with ``out/images/<split>2017`` linked to the source
      images (:func:`coco_lut` ``"coco_object"``).
    - ade20k, voc21, voc20, custom: nothing to convert; the report says where the files go.
    - context60/59, cityscapes: the conversion needs an external package (Detail API,
      cityscapesScripts); the report gives the commands.

    Conversions write each file atomically (temporary hidden file + rename), skip outputs that
    exist unless ``overwrite``, and run on ``workers`` processes. Only the requested split is
    needed (COCO: the train split is not required).

    Args:
        name: dataset name or alias.
        data_root: the folder containing the dataset folder, or the dataset folder itself.
        split: split name or alias; ``"all"`` = every split present (conversions); default:
            the evaluated split.
        out: coco_object only: write the converted dataset under this folder.
        workers: conversion processes (default: :func:`default_workers`; 1 = in this process).
        overwrite: rewrite outputs that already exist.
        progress: callback ``(label, done, total)``.

    Raises:
        OvssError: unknown dataset or split, ``out`` for another dataset than coco_object, or
            COCO raw maps not found.
    """
    spec = get_dataset(name)
    root = Path(data_root).expanduser()
    if out is not None and spec.converter != "coco_object":
        raise OvssError(f"--out applies to coco_object only, not to {spec.name}")
    if spec.converter is None:
        return _instructions(spec, root, split)
    return _convert_coco(spec, root, split, out, workers, overwrite, progress)


def _fill(spec: DatasetSpec, root: Path, base: Path) -> list[str]:
    """``spec.prepare_steps`` with the paths filled in."""
    return [
        step.format(data_root=root, dataset_dir=base, dataset_parent=base.parent)
        for step in spec.prepare_steps
    ]


def _has_file_with_suffix(folder: Path, suffix: str) -> bool:
    """True when ``folder`` holds (recursively) a non-hidden file ending with ``suffix``."""
    for _dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(f.endswith(suffix) and not f.startswith(".") for f in filenames):
            return True
    return False


def _instructions(spec: DatasetSpec, root: Path, split: str | None) -> PrepareReport:
    """The report of a dataset without built-in conversion: steps and whether labels exist."""
    split = resolve_split(spec.name, None if split == "all" else split)
    base = dataset_dir(spec.name, root, split, must_exist=False)
    layout = spec.layout
    ann_dir = base / layout.ann_dir.format(split=layout.token(split))
    ready = (base / layout.marker.format(split=layout.token(split))).is_dir() and (
        _has_file_with_suffix(ann_dir, layout.seg_suffix)
    )
    notes = []
    next_steps = []
    if ready:
        notes.append(f"labels found in {ann_dir}")
        next_steps.append(NextStep("verify", spec.name, str(root)))
    else:
        notes.append(f"no {spec.name} labels in {ann_dir} yet")
    return PrepareReport(
        dataset=spec.name,
        action="instructions",
        ready=ready,
        dataset_dir=str(base),
        splits=[split],
        steps=_fill(spec, root, base),
        notes=notes,
        next_steps=next_steps,
    )


def _coco_source(spec: DatasetSpec, root: Path, tokens: list[str]) -> Path:
    """The COCO-Stuff folder holding ``annotations/<token>`` for one of ``tokens``."""
    candidates = [root, root / "coco_stuff164k"]
    for candidate in candidates:
        if any((candidate / "annotations" / t).is_dir() for t in tokens):
            return Path(os.path.abspath(candidate))
    expected = candidates[-1] / "annotations" / tokens[0]
    state = "" if root.is_dir() else f"data_root {root} does not exist; "
    raise OvssError(
        f"{spec.name}: {state}raw COCO-Stuff maps not found: expected {expected} (also looked "
        f"for {candidates[0] / 'annotations' / tokens[0]}); unzip stuffthingmaps_trainval2017.zip "
        f"into {candidates[-1] / 'annotations'}"
    )


def _raw_maps(folder: Path) -> list[Path]:
    """Raw stuffthingmaps PNGs of one split folder, sorted (converted outputs left out)."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.name.endswith(".png")
        and not p.name.startswith(".")
        and not p.name.endswith("TrainIds.png")
        and p.is_file()
    )


def _link_images(source: Path, out: Path, token: str, notes: list[str]) -> None:
    """Make ``out/images/<token>`` point to ``source/images/<token>`` (symbolic link)."""
    src = source / "images" / token
    dst = out / "images" / token
    if dst.exists():
        return
    if not src.is_dir():
        notes.append(f"source images {src} not found; put the {token} images in {dst}")
        return
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst, target_is_directory=True)
        notes.append(f"linked {dst} -> {src}")
    except OSError as err:
        notes.append(f"could not link {dst} to {src} ({_reason(err)}); copy the images there")


@dataclass(frozen=True)
class _FileResult:
    """Outcome of converting one raw map (returned by the worker processes)."""

    source: str
    status: str  # "written" or "failed"
    kind: str = ""
    message: str = ""
    unexpected: tuple[int, ...] = ()


def write_png_atomic(label: np.ndarray, path: str | os.PathLike) -> None:
    """Write a (H, W) uint8 array as a grey PNG so that ``path`` is either absent or complete.

    The PNG goes to a hidden temporary file in the same folder (``.<name>.<pid>.tmp``), is
    flushed to disk (fsync), then renamed over ``path``; on any failure the temporary file is
    removed. A process killed mid-write leaves at most that hidden temporary file.
    """
    dst = Path(path)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(fh, format="PNG")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _convert_one(task: tuple[str, str, str]) -> _FileResult:
    """Convert one raw map (worker process entry point): ``(source, destination, target)``."""
    source, destination, target = task
    try:
        raw = decode_label(source)
    except LabelError as err:
        return _FileResult(source, "failed", "unreadable_label", str(err))
    present = np.bincount(raw.ravel(), minlength=256) > 0
    unexpected = tuple(int(v) for v in np.flatnonzero(present & ~_COCO_KNOWN_RAW))
    try:
        write_png_atomic(_COCO_LUTS[target][raw], destination)
    except OSError as err:
        return _FileResult(
            source, "failed", "write_failed", f"cannot write {destination}: {_reason(err)}"
        )
    return _FileResult(source, "written", unexpected=unexpected)


def _convert_coco(
    spec: DatasetSpec,
    root: Path,
    split: str | None,
    out: str | os.PathLike | None,
    workers: int | None,
    overwrite: bool,
    progress: ProgressFn | None,
) -> PrepareReport:
    """The COCO-Stuff / COCO-Object conversion of :func:`prepare_dataset`."""
    target = str(spec.converter)
    if target not in _COCO_OUTPUT_SUFFIX:
        raise OvssError(f"{spec.name}: unknown label conversion '{target}'")
    suffix = _COCO_OUTPUT_SUFFIX[target]
    layout = spec.layout
    splits = list(spec.splits) if split == "all" else [resolve_split(spec.name, split)]
    source = _coco_source(spec, root, [layout.token(s) for s in splits])
    if split == "all":
        splits = [s for s in splits if (source / "annotations" / layout.token(s)).is_dir()]
    out_root = Path(os.path.abspath(Path(out).expanduser())) if out is not None else source
    report = PrepareReport(
        dataset=spec.name,
        action="converted",
        ready=False,
        dataset_dir=str(out_root),
        splits=splits,
        steps=_fill(spec, root, source),
        out_dir=str(out_root),
    )
    tasks: list[tuple[str, str, str]] = []
    n_sources = 0
    for name in splits:
        token = layout.token(name)
        raw_dir = source / "annotations" / token
        dst_dir = out_root / "annotations" / token
        raws = _raw_maps(raw_dir)
        n_sources += len(raws)
        if not raws:
            kept = len(list(dst_dir.glob(f"*{suffix}"))) if dst_dir.is_dir() else 0
            report.notes.append(
                f"no raw maps (<id>.png) in {raw_dir}"
                + (f"; {kept} existing *{suffix} files kept" if kept else "")
            )
            report.skipped += kept
            continue
        if out_root != source:
            _link_images(source, out_root, token, report.notes)
        try:
            dst_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OvssError(f"cannot create {dst_dir}: {_reason(err)}") from err
        for raw in raws:
            dst = dst_dir / (raw.name[: -len(".png")] + suffix)
            if not overwrite and dst.exists():
                report.skipped += 1
            else:
                tasks.append((str(raw), str(dst), target))
    if not n_sources and not report.skipped:
        raise OvssError(
            f"{spec.name}: no raw COCO-Stuff maps (<id>.png) under {source / 'annotations'} "
            f"for split(s) {', '.join(splits)}; unzip stuffthingmaps_trainval2017.zip there"
        )
    total = report.skipped + len(tasks)
    label_text = f"prepare {spec.name}"
    if progress is not None:
        progress(label_text, report.skipped, total)
    for done, result in enumerate(_run_conversions(tasks, workers), start=report.skipped + 1):
        image_id = Path(result.source).name[: -len(".png")]
        if result.status == "written":
            report.written += 1
            if result.unexpected:
                report.unexpected_values[result.source] = list(result.unexpected)
        else:
            report.failures.append(LabelProblem(image_id, result.kind, result.message))
        if progress is not None:
            progress(label_text, done, total)
    if report.unexpected_values:
        report.notes.append(
            f"{len(report.unexpected_values)} raw map(s) hold values that are no COCO-Stuff id "
            "(unused thing ids or 182..254); those pixels were set to 255 (ignore)"
        )
    report.ready = report.ok and total > 0
    return report


def _run_conversions(
    tasks: list[tuple[str, str, str]], workers: int | None
) -> Iterator[_FileResult]:
    """Results of :func:`_convert_one` over ``tasks``, in completion order."""
    n_workers = min(workers or default_workers(), len(tasks))
    if n_workers <= 1:
        yield from map(_convert_one, tasks)
        return
    chunk = max(1, min(32, len(tasks) // (n_workers * 4)))
    with multiprocessing.get_context("spawn").Pool(n_workers) as pool:
        yield from pool.imap_unordered(_convert_one, tasks, chunksize=chunk)
