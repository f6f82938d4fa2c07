"""``fmbseg-stage1`` (METHODS.md §1.1): the pieces on controlled CLIP/SAM outputs, then the
method on a store of tiny random-init CLIP-B/16 and SAM-B where the vocabulary is built from the
cached crop embeddings (so detection is known) and the automatic masks are controlled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featurestore.backbones import tiny_arch_overrides
from featurestore.errors import OvssError
from featurestore.extract import ExtractConfig, extract
from featurestore.images import list_folder_images
from featurestore.protocol import Protocol
from featurestore.store import FeatureStore
from methods import fmbseg_stage1 as st1
from methods.base import ScoringConfig, Vocab, build_config, get_method
from methods.fmbseg_stage1 import (
    IGNORE,
    FMbSegStage1Config,
    ScoredMask,
    detect_classes,
    label_auto_masks,
    merge_stage1,
    nearest_patch_index,
    patch_centres,
    stage11_masks,
)
from methods.segment import segment_image

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "heads": 2},
    "text_cfg": {"layers": 2, "width": 64, "heads": 2},
}
TINY_SAM = tiny_arch_overrides("sam-b")
SIZE = (61, 93)
CLIP_PROTO = Protocol("short", 64, crop=32, stride=16)
OPTS = {"clip_model": "clip-b16", "sam_model": "sam-b", "size": 64, "crop": 32, "stride": 16}


def onehot(*rows: int, dim: int = 4) -> torch.Tensor:
    return torch.eye(dim)[list(rows)]


# --------------------------------------------------------------------------------------------
# The pieces on controlled inputs
# --------------------------------------------------------------------------------------------


def test_config_defaults_match_the_fmbseg_recipe() -> None:
    cfg = FMbSegStage1Config()
    assert cfg.clip_protocol == Protocol("short", 448, crop=224, stride=112)
    assert (cfg.clip_model, cfg.sam_model, cfg.text_model) == ("clip-l14", "sam-h", "clip-l14")
    assert cfg.sam_protocol == Protocol("long", 1024)
    assert (cfg.min_crops, cfg.top_k, cfg.stage, cfg.class_family) == (2, 5, "both", "sclip")
    amg = (cfg.points_per_side, cfg.pred_iou_thresh, cfg.stability_score_thresh)
    assert amg + (cfg.box_nms_thresh,) == (32, 0.88, 0.95, 0.7)


def test_detection_counts_crops_per_class_and_merges_synonyms() -> None:
    # queries: class 0, class 1, class 2 (two synonyms: queries 2 and 3)
    text = onehot(0, 1, 2, 3)
    q2c = torch.tensor([0, 1, 2, 2])
    crops = torch.stack([onehot(0)[0] * 3, onehot(0)[0], onehot(1)[0], onehot(2)[0], onehot(3)[0]])
    assert detect_classes(crops, text, q2c, 3, min_crops=2) == [0, 2]
    assert detect_classes(crops, text, q2c, 3, min_crops=1) == [0, 1, 2]
    assert detect_classes(crops, text, q2c, 3, min_crops=3) == []


class FakePredictor:
    """Three fixed masks with fixed IoU predictions; records the prompts."""

    def __init__(self, masks: np.ndarray, iou: np.ndarray):
        self.masks, self.iou, self.calls = masks, iou, []

    def predict(self, point_coords: np.ndarray, point_labels: np.ndarray, multimask_output: bool):
        self.calls.append((point_coords.copy(), point_labels.copy(), multimask_output))
        return self.masks, self.iou, np.zeros((3, 4, 4), np.float32)


def test_stage11_prompts_top_k_patch_centres_and_keeps_best_iou_mask() -> None:
    gh, gw, patch = 4, 6, 16
    canvas, original = (64, 96), (32, 48)  # original = canvas / 2
    grid = torch.zeros(gh, gw, 4)
    grid[..., 0] = 1.0  # every patch looks like class 0 ...
    hot = [(0, 1), (1, 4), (2, 2), (3, 5), (3, 0)]  # ... except 5 patches, class 1
    for r, s in hot:
        grid[r, s] = torch.tensor([0.1, 1.0, 0.0, 0.0])
    grid[0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0])  # the 6th best for class 1
    masks = np.zeros((3, *original), bool)
    masks[0, :5], masks[1, 5:10], masks[2, 10:] = True, True, True
    pred = FakePredictor(masks, np.array([0.3, 0.9, 0.5], np.float32))
    centres = patch_centres((gh, gw), patch, canvas, original)
    out = stage11_masks(pred, grid, onehot(0, 1), torch.tensor([0, 1]), 2, [1], centres, 5)
    assert len(out) == 1 and out[0].cls == 1 and out[0].score == pytest.approx(0.9)
    assert np.array_equal(out[0].mask, masks[1])
    coords, labels, multi = pred.calls[0]
    assert multi is True and labels.tolist() == [1] * 5
    want = {((s + 0.5) * patch / 2, (r + 0.5) * patch / 2) for r, s in hot}  # (x, y), original
    assert {tuple(p) for p in coords.tolist()} == want


def test_patch_centres_clamp_inside_the_canvas() -> None:
    ys, xs = patch_centres((2, 3), 16, (20, 40), (20, 40))
    assert ys.tolist() == [8.0, 19.5] and xs.tolist() == [8.0, 24.0, 39.5]


def test_stage12_labels_masks_by_mean_feature_among_present_classes() -> None:
    gh, gw = 2, 4
    grid = torch.zeros(gh, gw, 4)
    grid[:, :2, 0] = 1.0  # left half: class 0
    grid[:, 2:, 2] = 5.0  # right half: class 2 (large norm: features are normalised first)
    grid[0, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # one class-1 patch
    pix = nearest_patch_index((8, 16), (8, 16), (gh, gw), 4)
    text, q2c = onehot(0, 1, 2), torch.tensor([0, 1, 2])

    def rec(mask: np.ndarray, iou: float) -> dict[str, Any]:
        return {"segmentation": mask, "predicted_iou": iou}

    left, right, tiny = (np.zeros((8, 16), bool) for _ in range(3))
    left[:, :8], right[:, 8:], tiny[0, 0] = True, True, True
    out = label_auto_masks(
        [rec(left, 0.9), rec(right, 0.8), rec(tiny, 0.7)], grid, pix, text, q2c, 3, [0, 1, 2], 2
    )
    assert [(m.cls, m.score) for m in out] == [(0, pytest.approx(0.9)), (2, pytest.approx(0.8))]
    # class 0 absent: the left mask takes the best *present* class
    out = label_auto_masks([rec(left, 0.9)], grid, pix, text, q2c, 3, [1, 2])
    assert [m.cls for m in out] == [1]
    assert label_auto_masks([rec(left, 0.9)], grid, pix, text, q2c, 3, []) == []


def test_nearest_patch_index_maps_original_pixels_to_canvas_patches() -> None:
    idx = nearest_patch_index((4, 6), (8, 12), (2, 3), 4)
    assert idx.tolist() == [[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2


def test_merge_rule_11_by_score_then_12_on_unlabelled_only() -> None:
    hw = (1, 6)

    def m(cols: list[int], cls: int, score: float, stage: str) -> ScoredMask:
        mask = np.zeros(hw, bool)
        mask[0, cols] = True
        return ScoredMask(mask, cls, score, stage)

    masks11 = [m([0, 1, 2], 1, 0.5, "1.1"), m([2, 3], 2, 0.9, "1.1"), m([0], 3, 0.1, "1.1")]
    masks12 = [m([3, 4], 4, 0.99, "1.2"), m([4, 5], 5, 0.95, "1.2")]
    labels, scores = merge_stage1(masks11, masks12, hw)
    assert labels.tolist() == [[1, 1, 2, 2, 4, 5]]
    assert np.allclose(scores, [[0.5, 0.5, 0.9, 0.9, 0.99, 0.95]])
    labels, scores = merge_stage1(masks11, [], hw)
    assert labels.tolist() == [[1, 1, 2, 2, IGNORE, IGNORE]] and scores[0, 5] == 0
    labels, _ = merge_stage1([], masks12, hw)
    assert labels.tolist() == [[IGNORE, IGNORE, IGNORE, 4, 4, 5]]


# --------------------------------------------------------------------------------------------
# The method on a tiny store
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    tmp = tmp_path_factory.mktemp("fmbseg_stage1")
    (tmp / "imgs").mkdir()
    h, w = SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx / 5)[..., None] * np.cos(yy / 7)[..., None]
    noise = np.random.default_rng(0).normal(0, 25, (h, w, 3))
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(tmp / "imgs" / "a.png")
    recs = list_folder_images(tmp / "imgs")
    common = dict(store=str(tmp / "s.zarr"), random_init=True, dtype="float32", block_mb=1)
    for model, proto, arch in (
        ("clip-b16", CLIP_PROTO, TINY_CLIP),
        ("sam-b", Protocol("long", 256), TINY_SAM),
    ):
        extract(recs, ExtractConfig(models=[model], protocol=proto, arch_overrides=arch, **common))
    return FeatureStore.open(tmp / "s.zarr")


def segmenter(store: FeatureStore, **overrides: Any) -> Any:
    cls = get_method("fmbseg-stage1")
    return cls(store, build_config(cls, None, {**OPTS, "sam_size": 256, **overrides}))


@pytest.fixture(scope="module")
def vocab(store: FeatureStore) -> Vocab:
    """Class 0 = the mean crop embedding (every crop is assigned to it), class 1 its opposite
    (no crop), class 2 a synonym pair orthogonal-ish to both."""
    fs = store.require("clip-b16", CLIP_PROTO)
    crops = torch.from_numpy(np.asarray(fs.read(0, names=["global"]).tensors["global"]))
    mean = F.normalize(crops.float().mean(0), dim=0)
    other = torch.randn(len(mean), generator=torch.Generator().manual_seed(0))
    other = F.normalize(other - (other @ mean) * mean, dim=0)
    emb = torch.stack([mean, -mean, other, -other])
    return Vocab([["a"], ["b"], ["c", "c2"]], emb, torch.tensor([0, 1, 2, 2]))


@pytest.fixture()
def fake_auto_masks(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Stage 1.2's automatic masks controlled: the left third of the image, predicted IoU 0.97."""
    mask = np.zeros(SIZE, bool)
    mask[:, : SIZE[1] // 3] = True
    records = [{"segmentation": mask, "predicted_iou": 0.97}]
    monkeypatch.setattr(st1, "generate_masks", lambda model, sam, cfg: records)
    return records


def test_n_crops_and_detection_in_the_store(store: FeatureStore, vocab: Vocab) -> None:
    seg = segmenter(store)
    d = seg.dense(0)
    assert d.crops.shape[0] == 18 and d.patch == 16  # 64x98 canvas, crop 32, stride 16
    assert tuple(d.grid.shape[:2]) == (4, 7)
    text = F.normalize(vocab.embeddings, dim=-1)
    assert detect_classes(d.crops, text, vocab.query_to_class, 3, 2) == [0]


def test_stage_11_is_the_best_iou_mask_of_the_top5_points(
    store: FeatureStore, vocab: Vocab, fake_auto_masks: list
) -> None:
    from methods.fmbseg_stage1 import class_similarities, top_k_points
    from methods.sam_cache import CachedSamPredictor

    seg = segmenter(store, stage="1.1")
    labels, scores, present = seg.stage1(0, vocab)
    assert present == [0] and labels.shape == SIZE
    # independent decode of the same prompts with the cached predictor
    d = seg.dense(0)
    sim = class_similarities(
        d.grid.reshape(-1, d.grid.shape[-1]), vocab.embeddings, vocab.query_to_class, 3
    )[:, 0].reshape(d.grid.shape[:2])
    points = top_k_points(sim, 5, *patch_centres(tuple(sim.shape), 16, d.canvas_hw, SIZE))
    pred = CachedSamPredictor(seg._sam_model())
    pred.set_features(seg.sets["sam"].read(0, names=["embedding"]))
    masks, iou, _ = pred.predict(points, np.ones(5), multimask_output=True)
    best = masks[int(np.argmax(iou))]
    assert np.array_equal(labels == 0, best) and np.all(labels[~best] == IGNORE)
    assert np.allclose(scores[best], iou.max()) and np.all(scores[~best] == 0)


def test_stage_12_only_and_both(store: FeatureStore, vocab: Vocab, fake_auto_masks: list) -> None:
    mask = fake_auto_masks[0]["segmentation"]
    labels12, scores12, _ = segmenter(store, stage="1.2").stage1(0, vocab)
    assert np.array_equal(labels12 == 0, mask) and np.all(labels12[~mask] == IGNORE)
    assert np.allclose(scores12[mask], 0.97)
    labels11, scores11, _ = segmenter(store, stage="1.1").stage1(0, vocab)
    both, scores, _ = segmenter(store).stage1(0, vocab)
    lab11 = labels11 != IGNORE
    assert np.array_equal(both[lab11], labels11[lab11])  # 1.1 first, whatever 1.2's score
    assert np.array_equal(scores[lab11], scores11[lab11])
    assert np.array_equal(both != IGNORE, lab11 | mask)  # 1.2 only on unlabelled pixels
    assert np.allclose(scores[mask & ~lab11], 0.97)


def test_driver_returns_stage1_labels_and_nothing_without_detection(
    store: FeatureStore, vocab: Vocab, fake_auto_masks: list
) -> None:
    seg = segmenter(store)
    labels, max_prob, cos = segment_image(seg, 0, vocab, ScoringConfig())
    want, scores, _ = seg.stage1(0, vocab)
    assert np.array_equal(labels, want) and np.array_equal(max_prob, scores)
    assert cos.shape == (4, 4, 7)
    none = segmenter(store, min_crops=19)  # 18 crops: nothing can be present
    labels, max_prob, _ = segment_image(none, 0, vocab, ScoringConfig())
    assert np.all(labels == IGNORE) and np.all(max_prob == 0)


def test_real_automatic_mask_generator_runs_on_the_cache(store: FeatureStore, vocab: Vocab) -> None:
    seg = segmenter(
        store,
        stage="1.2",
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
    )
    labels, scores, _ = seg.stage1(0, vocab)
    assert labels.shape == SIZE and set(np.unique(labels).tolist()) <= {0, IGNORE}
    assert np.all((scores > 0) == (labels != IGNORE))


def test_bad_options_are_refused(store: FeatureStore) -> None:
    with pytest.raises(OvssError, match="stage"):
        segmenter(store, stage="2")
    with pytest.raises(OvssError, match="min_crops"):
        segmenter(store, min_crops=0)
    with pytest.raises(OvssError, match="no option"):
        segmenter(store, nonsense=1)


def test_write_labels_round_trip_with_ignore(
    store: FeatureStore, vocab: Vocab, fake_auto_masks: list, tmp_path: Any
) -> None:
    from featurestore.labelsets import LabelSet
    from methods.segment import segment_store

    overrides = {**OPTS, "sam_size": 256}
    summary = segment_store(
        str(store.path),
        "fmbseg-stage1",
        vocab,
        str(tmp_path),
        overrides=overrides,
        write_labels="pseudo",
        overwrite_labels=True,
    )
    assert summary.label_set == "pseudo" and summary.images == 1
    written = LabelSet(FeatureStore.open(store.path), "pseudo").read(0)
    want, _, _ = segmenter(store).stage1(0, vocab)
    assert np.array_equal(written, want) and (written == IGNORE).any()


def test_cli_stage1_pseudo_labels_train_stage2_and_segment(
    store: FeatureStore, fake_auto_masks: list, tmp_path: Any
) -> None:
    """FMbSeg end to end through the CLI on a tiny store: `ovss segment --method fmbseg-stage1
    --write-labels stage1` (templates default to the fmbseg recipe's `single`), `ovss align
    --labels stage1` on tiny random-init DINOv2 patches, `ovss segment --method aligned
    --checkpoint` (templates and text model from the checkpoint)."""
    import json
    import shutil

    from click.testing import CliRunner

    from featurestore.labelsets import LabelSet
    from methods.fmbseg import load_checkpoint
    from ovss_cli.main import cli

    path = tmp_path / "s.zarr"
    shutil.copytree(store.path, path)
    recs = FeatureStore.open(path).image_table()["path"]
    extract(
        list_folder_images(Path(recs[0]).parent),
        ExtractConfig(
            models=["dinov2-s14"],
            protocol=Protocol("short", 64),
            store=str(path),
            random_init=True,
            arch_overrides={"depth": 2, "embed_dim": 64, "num_heads": 2},
            dtype="float32",
            block_mb=1,
        ),
    )
    text = ["--text-random-init"]
    for k in ("embed_dim=32", "text_cfg.layers=2", "text_cfg.width=64", "text_cfg.heads=2"):
        text += ["--text-arch-override", k]
    sets = [f"{k}={v}" for k, v in {**OPTS, "sam_size": 256, "stage": "1.2"}.items()]

    def run(*args: Any) -> dict:
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    out = run(
        "segment", "--store", path, "--method", "fmbseg-stage1",
        *[x for s in sets for x in ("--set", s)], "--classes", "a,b,c", *text,
        "--write-labels", "stage1", "--device", "cpu", "--json", "-q",
    )  # fmt: skip
    assert out["label_set"] == "stage1" and out["vocabulary"]["templates"] == "single"
    pseudo = LabelSet(FeatureStore.open(path), "stage1").read(0)
    mask = fake_auto_masks[0]["segmentation"]
    assert np.all(pseudo[~mask] == IGNORE) and np.all(pseudo[mask] != IGNORE)

    key = next(k for k in FeatureStore.open(path).feature_sets() if k.startswith("dinov2-s14"))
    out = run(
        "align", "--store", path, "--features", key, "--labels", "stage1", "--arch", "linear",
        "--epochs", "1", *text, "--out", tmp_path / "ck", "--json", "-q",
    )  # fmt: skip
    assert out["epochs_done"] == 1 and out["labels"]["name"] == "stage1"
    _, meta = load_checkpoint(out["checkpoint"])
    voc = meta["provenance"]["vocabulary"]
    assert voc["class_names"] == [["a"], ["b"], ["c"]] and voc["templates"] == "single"
    assert voc["text_weights"] == "random-init:0" and voc["text_model"] == "clip-b16"

    out = run(
        "segment", "--store", path, "--method", "aligned", "--checkpoint", out["checkpoint"],
        "--classes", "a,b,c", *text, "--out", tmp_path / "seg", "--no-overlay", "--json", "-q",
    )  # fmt: skip
    assert out["images"] == 1 and out["vocabulary"]["templates"] == "single"
