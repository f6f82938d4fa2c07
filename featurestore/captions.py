"""Image captions as a data source, joined to the images of a feature store.

Formats (chosen by the file's content, not only its suffix):

- **COCO captions JSON** (``annotations/captions_train2017.json``): ``{"images": [{"id",
  "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}``. A caption's image is
  looked up in the store by the file name's stem (``000000397133``, the id the COCO datasets
  give their images), then by the bare id (``397133``) and the 12-digit id.
- **JSON Lines**: one object per line with ``image`` (or ``image_id`` / ``file_name``) and
  ``caption``.
- **CSV** with a header naming the ``image`` (or ``image_id``) and ``caption`` columns.

For JSONL/CSV, ``image`` is a store image id, or a path: matched against the paths the store
recorded (resolved), then by the file's stem as an id. Every caption of an image is its own
training pair. Captions whose image is not in the store are counted and listed in
:class:`CaptionJoin` (never an error); empty captions are skipped and counted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurestore.errors import OvssError

#: Column / key names accepted for the image and the caption of a row.
IMAGE_KEYS = ("image", "image_id", "file_name", "filename", "path")
CAPTION_KEYS = ("caption", "text")


class CaptionsError(OvssError):
    """A caption file is missing, unreadable or malformed.

    Attributes:
        path: the caption file.
        reason: ``missing``, ``unreadable``, ``malformed`` or ``empty``.
        line: the 1-based line of the problem (0 when not tied to a line).
    """

    def __init__(self, message: str, path: str = "", reason: str = "malformed", line: int = 0):
        super().__init__(message)
        self.path = path
        self.reason = reason
        self.line = line


@dataclass(frozen=True)
class CaptionRow:
    """One caption as read from the file.

    Attributes:
        keys: the image keys to try in order (store id, path, stem...).
        caption: the caption text (stripped).
        line: where it came from (1-based line for JSONL/CSV, annotation index + 1 for COCO).
    """

    keys: tuple[str, ...]
    caption: str
    line: int


@dataclass
class CaptionJoin:
    """Captions joined to a store's images.

    Attributes:
        path: the caption file; format: ``coco``, ``jsonl`` or ``csv``; sha256: of its bytes.
        pairs: ``(store image index, caption)`` in file order.
        unknown: ``(image key, caption, line)`` of captions whose image is not in the store.
        empty: rows skipped because the caption is empty.
        rows: caption rows read.
    """

    path: str
    format: str
    sha256: str
    pairs: list[tuple[int, str]] = field(default_factory=list)
    unknown: list[tuple[str, str, int]] = field(default_factory=list)
    empty: int = 0
    rows: int = 0

    @property
    def images(self) -> int:
        """Distinct store images with at least one caption."""
        return len({i for i, _ in self.pairs})

    def summary(self) -> dict[str, Any]:
        return {
            "captions_file": self.path,
            "format": self.format,
            "sha256": self.sha256,
            "rows": self.rows,
            "captions": len(self.pairs),
            "images": self.images,
            "unknown_images": len(self.unknown),
            "empty_captions": self.empty,
        }


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _first(d: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def _path_keys(image: str) -> tuple[str, ...]:
    image = image.strip()
    keys = [image]
    p = Path(image)
    if p.suffix or "/" in image or os.sep in image:
        keys += [str(p.expanduser().resolve()), p.stem]
    return tuple(dict.fromkeys(k for k in keys if k))


def _coco_rows(data: dict, path: Path) -> list[CaptionRow]:
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise CaptionsError(
            f"{path}: a COCO captions JSON needs an 'annotations' list", str(path), "malformed"
        )
    names = {}
    for im in data.get("images") or []:
        if isinstance(im, dict) and "id" in im:
            names[im["id"]] = str(im.get("file_name", ""))
    rows = []
    for n, a in enumerate(anns, start=1):
        if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
            raise CaptionsError(
                f"{path}: annotation {n} lacks 'image_id' or 'caption'", str(path), "malformed", n
            )
        iid = a["image_id"]
        keys = []
        if names.get(iid):
            keys.append(Path(names[iid]).stem)
        keys.append(str(iid))
        if isinstance(iid, int) or str(iid).isdigit():
            keys.append(f"{int(iid):012d}")
        rows.append(CaptionRow(tuple(dict.fromkeys(keys)), str(a["caption"]).strip(), n))
    return rows


def _jsonl_rows(text: str, path: Path) -> list[CaptionRow]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaptionsError(
                f"{path}: line {n} is not JSON ({e.msg})", str(path), "malformed", n
            ) from None
        img = _first(obj, IMAGE_KEYS) if isinstance(obj, dict) else None
        cap = _first(obj, CAPTION_KEYS) if isinstance(obj, dict) else None
        if img is None or cap is None:
            raise CaptionsError(
                f"{path}: line {n} needs an 'image' and a 'caption'", str(path), "malformed", n
            )
        rows.append(CaptionRow(_path_keys(str(img)), str(cap).strip(), n))
    return rows


def _csv_rows(text: str, path: Path) -> list[CaptionRow]:
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    img_col = next((k for k in IMAGE_KEYS if k in fields), None)
    cap_col = next((k for k in CAPTION_KEYS if k in fields), None)
    if img_col is None or cap_col is None:
        raise CaptionsError(
            f"{path}: a caption CSV needs a header with an 'image' and a 'caption' column "
            f"(it has: {', '.join(fields) or 'none'})",
            str(path),
            "malformed",
            1,
        )
    raw = {f.strip().lower(): f for f in reader.fieldnames or []}
    rows = []
    try:
        for r in reader:
            img, cap = r.get(raw[img_col]), r.get(raw[cap_col])
            n = reader.line_num
            if img is None or not str(img).strip():
                raise CaptionsError(f"{path}: line {n} has no image", str(path), "malformed", n)
            rows.append(CaptionRow(_path_keys(str(img)), str(cap or "").strip(), n))
    except csv.Error as e:
        raise CaptionsError(
            f"{path}: line {reader.line_num}: {e}", str(path), "malformed", reader.line_num
        ) from None
    return rows


def read_caption_rows(path: str | os.PathLike) -> tuple[str, list[CaptionRow]]:
    """``(format, rows)`` of a caption file (see the module doc for the formats).

    Raises:
        CaptionsError: the file is missing, unreadable, malformed or holds no caption row.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CaptionsError(f"no caption file at {p}", str(p), "missing")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise CaptionsError(
            f"cannot read the caption file {p}: {e}", str(p), "unreadable"
        ) from None
    head = text.lstrip()[:1]
    if head in ("{", "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if head == "{" and "\n" in text.strip():  # maybe JSON Lines
                fmt, rows = "jsonl", _jsonl_rows(text, p)
            else:
                raise CaptionsError(
                    f"{p}: not valid JSON (line {e.lineno}: {e.msg})", str(p), "malformed", e.lineno
                ) from None
        else:
            if isinstance(data, dict):
                fmt, rows = "coco", _coco_rows(data, p)
            elif isinstance(data, list):
                fmt = "jsonl"
                rows = _jsonl_rows("\n".join(json.dumps(x) for x in data), p)
            else:
                raise CaptionsError(f"{p}: not a caption JSON", str(p), "malformed")
    else:
        fmt, rows = "csv", _csv_rows(text, p)
    if not rows:
        raise CaptionsError(f"{p} holds no caption", str(p), "empty")
    return fmt, rows


def _store_lookup(store: Any) -> dict[str, int]:
    """Every key a store image answers to: its id, its resolved path and its path's stem
    (ids first; a stem shared by two images is not used)."""
    table = store.image_table()
    look: dict[str, int] = {}
    stems: dict[str, list[int]] = {}
    for i, (iid, path) in enumerate(zip(table["id"], table["path"], strict=True)):
        look[str(iid)] = i
        if str(path):
            look.setdefault(str(Path(str(path)).expanduser().resolve()), i)
            stems.setdefault(Path(str(path)).stem, []).append(i)
    for stem, idx in stems.items():
        if len(idx) == 1:
            look.setdefault(stem, idx[0])
    return look


def join_captions(path: str | os.PathLike, store: Any) -> CaptionJoin:
    """Read a caption file and join it to a store's images (see the module doc).

    Args:
        path: the caption file.
        store: a :class:`~featurestore.store.FeatureStore` (or None: every row is unknown,
            which ``ovss captions inspect`` without ``--store`` uses).

    Raises:
        CaptionsError: see :func:`read_caption_rows`.
    """
    fmt, rows = read_caption_rows(path)
    join = CaptionJoin(str(path), fmt, file_sha256(Path(path).expanduser()), rows=len(rows))
    look = _store_lookup(store) if store is not None else {}
    for r in rows:
        if not r.caption:
            join.empty += 1
            continue
        idx = next((look[k] for k in r.keys if k in look), None)
        if idx is None:
            join.unknown.append((r.keys[0], r.caption, r.line))
        else:
            join.pairs.append((idx, r.caption))
    return join


__all__ = [
    "CaptionJoin",
    "CaptionRow",
    "CaptionsError",
    "file_sha256",
    "join_captions",
    "read_caption_rows",
]
