"""Caption files: COCO JSON joined by image id, CSV / JSONL with store ids or paths, unknown
images counted (never a crash), malformed files as one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from featurestore.captions import CaptionsError, join_captions, read_caption_rows
from featurestore.images import ImageRecord
from featurestore.store import FeatureStore


@pytest.fixture()
def store(tmp_path):
    recs = []
    for name in ("000000000139", "000000000285", "holiday"):
        p = tmp_path / f"{name}.jpg"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
        recs.append(ImageRecord(name, str(p), "folder", ""))
    return FeatureStore.open_or_create(tmp_path / "s.zarr", recs)


def test_coco_json_joined_by_image_id(tmp_path, store):
    data = {
        "images": [
            {"id": 139, "file_name": "000000000139.jpg"},
            {"id": 285, "file_name": "000000000285.jpg"},
            {"id": 999, "file_name": "000000000999.jpg"},
        ],
        "annotations": [
            {"image_id": 139, "id": 1, "caption": "A woman in a kitchen."},
            {"image_id": 139, "id": 2, "caption": "  Two dogs.  "},
            {"image_id": 285, "id": 3, "caption": "A bear."},
            {"image_id": 999, "id": 4, "caption": "Not in the store."},
            {"image_id": 285, "id": 5, "caption": ""},
        ],
    }
    p = tmp_path / "captions_val2017.json"
    p.write_text(json.dumps(data))
    j = join_captions(p, store)
    assert j.format == "coco" and j.rows == 5
    assert j.pairs == [(0, "A woman in a kitchen."), (0, "Two dogs."), (1, "A bear.")]
    assert j.unknown == [("000000000999", "Not in the store.", 4)] and j.empty == 1
    assert j.images == 2 and j.summary()["unknown_images"] == 1
    assert j.sha256.startswith("sha256:")


def test_csv_and_jsonl_with_ids_and_paths(tmp_path, store):
    img = tmp_path / "holiday.jpg"
    csv = tmp_path / "c.csv"
    csv.write_text(f'image,caption\n000000000285,a bear\n{img},"a beach, with sand"\nother.png,x\n')
    j = join_captions(csv, store)
    assert j.format == "csv" and j.pairs == [(1, "a bear"), (2, "a beach, with sand")]
    assert [u[0] for u in j.unknown] == ["other.png"]
    jl = tmp_path / "c.jsonl"
    jl.write_text(
        json.dumps({"image_id": "holiday", "caption": "sun"})
        + "\n\n"
        + json.dumps({"file_name": "000000000139.jpg", "text": "kitchen"})
    )
    j = join_captions(jl, store)
    assert j.format == "jsonl" and j.pairs == [(2, "sun"), (0, "kitchen")]
    lst = tmp_path / "l.json"
    lst.write_text(json.dumps([{"image": "holiday", "caption": "sun"}]))
    assert join_captions(lst, store).pairs == [(2, "sun")]
    fmt, rows = read_caption_rows(csv)
    assert fmt == "csv" and rows[1].line == 3


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("a.json", "{not json", "not valid JSON"),
        ("b.json", json.dumps({"images": []}), "needs an 'annotations' list"),
        ("c.jsonl", '{"image": "x", "caption": "y"}\n{"image": "x"}\n', "line 2 needs"),
        ("d.jsonl", '{"image": "x", "caption": "y"}\nnope\n', "line 2 is not JSON"),
        ("e.csv", "path_of_it,words\na,b\n", "needs a header"),
        ("f.csv", "image,caption\n", "holds no caption"),
    ],
)
def test_malformed_files_are_one_line_errors(tmp_path, store, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(CaptionsError, match=match) as e:
        join_captions(p, store)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path, store):
    with pytest.raises(CaptionsError, match="no caption file") as e:
        join_captions(tmp_path / "nope.json", store)
    assert e.value.reason == "missing"
