"""Text embeddings: template sets, vocabularies, METHODS.md §0.1, the store cache, ``--vocab``.

The text encoder is the real open_clip ``CLIP`` class of ``clip-b16`` shrunk with
``arch_overrides`` and random-initialised (``featurestore.backbones.clip.load_open_clip``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import featurestore.backbones.clip as clip_module
from featurestore.backbones.clip import load_open_clip
from featurestore.errors import (
    MissingTextSetError,
    OvssError,
    ProvenanceMismatchError,
    StoreError,
    WeightsNotFoundError,
)
from featurestore.images import list_folder_images
from featurestore.store import FeatureStore
from featurestore.text import (
    ClipTextEncoder,
    TextEncoder,
    TextEncoderOptions,
    TextSetReport,
    Vocabulary,
    create_text_encoder,
    embed_vocabulary,
    file_identity,
    get_templates,
    get_text_embeddings,
    list_template_sets,
    list_text_encoders,
    list_text_sets,
    load_text_embeddings,
    load_text_encoder,
    lookup_text_encoder,
    parse_vocab,
    register_text_encoder,
    store_text_embeddings,
    text_set_key,
)
from ovss_cli.hints import render_error
from ovss_cli.main import cli

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 1, "width": 32, "heads": 2},
    "text_cfg": {"layers": 1, "width": 32, "heads": 2},
}
TINY_CLIP_ARGS = [
    "--random-init",
    "--arch-override",
    "embed_dim=32",
    "--arch-override",
    "vision_cfg.layers=1",
    "--arch-override",
    "vision_cfg.width=32",
    "--arch-override",
    "vision_cfg.heads=2",
    "--arch-override",
    "text_cfg.layers=1",
    "--arch-override",
    "text_cfg.width=32",
    "--arch-override",
    "text_cfg.heads=2",
]
CLIP7 = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network, an empty $OVSS_WEIGHTS and empty library caches."""
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OVSS_WEIGHTS", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(clip_module, "OPENAI_CACHE_DIR", tmp_path / "clip_cache")
    return weights_dir


@pytest.fixture(scope="module")
def tiny_clip():
    model, tokenizer, info = load_open_clip("clip-b16", random_init=True, arch_overrides=TINY_CLIP)
    return model, tokenizer, info


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(
            root / f"a{i}.png"
        )
    return root


@pytest.fixture()
def store(tmp_path: Path, images: Path) -> FeatureStore:
    return FeatureStore.open_or_create(tmp_path / "s.zarr", list_folder_images(images))


# -- templates --------------------------------------------------------------------------------


def test_openai80_is_open_clips_list_as_format_strings() -> None:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    t = get_templates("openai80")
    assert len(t) == 80
    assert t[0] == "a bad photo of a {}." and t[-1] == "a tattoo of the {}."
    assert [s.format("cat") for s in t] == [f("cat") for f in OPENAI_IMAGENET_TEMPLATES]


def test_short_template_sets_exact() -> None:
    assert get_templates("clip7") == CLIP7
    assert get_templates("pixelclip8") == [*CLIP7, "A photo of a {} in the scene"]
    sub = get_templates("sub_imagenet7")
    assert sub[1] == "a bad photo of a {}." and sub[:1] + sub[2:] == CLIP7[:1] + CLIP7[2:]
    assert get_templates("tcl9") == [*sub, "a photo of many {}.", "a photo of {}s."]
    m5 = get_templates("maskclip5")
    assert len(m5) == 5
    assert m5[0] == "there is a {} in the scene." and m5[-1] == "this is one {} in the scene."
    assert get_templates("single") == ["a photo of a {}."]
    for name in list_template_sets():
        assert all(s.count("{}") == 1 for s in get_templates(name)), name


def test_unknown_template_set_lists_names() -> None:
    with pytest.raises(OvssError, match="openai80.*clip7.*pixelclip8.*single"):
        get_templates("imagenet81")


# -- vocabularies -----------------------------------------------------------------------------


def test_dataset_vocab_both_families() -> None:
    ade = parse_vocab("ade20k")
    assert ade.n_classes == ade.n_queries == 150
    assert ade.source == "dataset:ade20k/sclip" and ade.queries[:3] == ["wall", "building", "sky"]

    sclip = parse_vocab("coco_object")
    prox = parse_vocab("coco_object", family="proxyclip")
    assert prox.source == "dataset:coco_object/proxyclip"
    assert len(sclip.classes[0]) == 26 and len(prox.classes[0]) == 17  # background words
    assert sclip.classes[1][:2] == ("person", "person in shirt") and prox.classes[1] == ("person",)
    assert sclip.n_classes == prox.n_classes == 81
    q2c = sclip.query_to_class
    assert q2c.shape == (sclip.n_queries,) and q2c.dtype == np.int64
    assert (q2c[:26] == 0).all() and (q2c[26:34] == 1).all() and q2c[-1] == 80
    assert np.array_equal(np.bincount(q2c), [len(c) for c in sclip.classes])
    # the family inside the spec, and the explicit prefix
    assert parse_vocab("coco_object/proxyclip").key() == prox.key()
    assert parse_vocab("dataset:coco-object/proxyclip").key() == prox.key()
    assert parse_vocab("voc21/proxyclip").classes[0] == parse_vocab("voc21").classes[0]


def test_file_and_list_vocab(tmp_path: Path) -> None:
    f = tmp_path / "cls.txt"
    f.write_text("sky; clouds\ntree\nhorse; pony\n")
    from_file = parse_vocab(str(f))
    assert from_file.class_names == [["sky", "clouds"], ["tree"], ["horse", "pony"]]
    assert from_file.source == f"file:{hashlib.sha256(f.read_bytes()).hexdigest()}"
    from_list = parse_vocab("sky;clouds, tree ,horse;pony")
    assert from_list.queries == ["sky", "clouds", "tree", "horse", "pony"]
    assert from_list.query_to_class.tolist() == [0, 0, 1, 2, 2]
    assert from_list.source == "list"
    # same names and grouping -> same key, whatever the source; other grouping -> other key
    assert from_list.key() == from_file.key() == parse_vocab(f"file:{f}").key()
    assert parse_vocab("sky,clouds,tree,horse;pony").key() != from_list.key()
    assert len(from_list.key()) == 16
    assert parse_vocab("sky,").class_names == [["sky"]]
    assert parse_vocab("list:ade20k").class_names == [["ade20k"]]
    # spec() reproduces every kind
    for v in (from_file, from_list, parse_vocab("voc21/proxyclip")):
        assert parse_vocab(v.spec()).key() == v.key()


@pytest.mark.parametrize(
    "spec,match",
    [
        ("ade21", "not a dataset.*comma list"),
        ("a,,b", "item 2 is empty"),
        ("", "empty vocabulary"),
        ("dataset:nope", "not a known dataset"),
        ("file:/no/such/file.txt", "class file not found"),
    ],
)
def test_bad_vocab_specs(spec: str, match: str) -> None:
    with pytest.raises(OvssError, match=match):
        parse_vocab(spec)


# -- embedding --------------------------------------------------------------------------------


def test_embedding_equals_loop_reference(tiny_clip) -> None:
    model, tokenizer, _ = tiny_clip
    vocab = parse_vocab("sky;clouds,tree,a horse")
    templates = get_templates("clip7")
    got = embed_vocabulary(model, tokenizer, vocab, templates, batch_size=5)
    rows = []
    with torch.no_grad():
        for q in vocab.queries:
            per_t = []
            for t in templates:
                e = model.encode_text(tokenizer([t.format(q)]))[0].double()
                per_t.append(e / e.norm())
            m = torch.stack(per_t).mean(0)
            rows.append((m / m.norm()).numpy())
    ref = np.stack(rows)
    assert got.dtype == np.float32 and got.shape == (4, 32)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    same = embed_vocabulary(model, tokenizer, vocab, templates, batch_size=256)
    np.testing.assert_allclose(same, got, atol=1e-6)


# -- the store cache --------------------------------------------------------------------------


def test_cache_round_trip(store: FeatureStore, tiny_clip) -> None:
    model, tokenizer, info = tiny_clip
    vocab = parse_vocab("voc20")
    emb = embed_vocabulary(model, tokenizer, vocab, get_templates("single"))
    prov = {"weights": info.weights, "arch": info.arch, "library": info.library}
    key = store_text_embeddings(store, "clip-b16", vocab, "single", emb, prov)
    assert key == f"text/clip-b16/{vocab.key()}-single"
    assert Path(store.path, key, "embeddings").is_dir()
    got = load_text_embeddings(FeatureStore.open(store.path), "clip-b16", vocab, "single")
    np.testing.assert_array_equal(got.embeddings, emb)
    assert got.query_to_class.tolist() == vocab.query_to_class.tolist()
    assert got.queries == vocab.queries and got.class_names == vocab.class_names
    assert got.templates == ["a photo of a {}."] and got.weights == "random-init:0"
    assert got.provenance["vocabulary"]["source"] == "dataset:voc20/sclip"
    assert got.provenance["ovss_version"] and got.provenance["encoder"]["arch"] == info.arch
    assert got.vocabulary.key() == vocab.key()
    [row] = list_text_sets(store.path)
    assert row["key"] == key and row["classes"] == 20 and row["dim"] == 32
    assert row["queries"] == vocab.n_queries == 30  # SCLIP's voc20 has person/tv synonyms
    with pytest.raises(StoreError, match="already holds"):
        store_text_embeddings(store, "clip-b16", vocab, "single", emb, prov)
    with pytest.raises(StoreError, match="shape"):
        store_text_embeddings(store, "clip-b16", vocab, "clip7", emb[:3], prov)
    with pytest.raises(ProvenanceMismatchError, match="weights random-init:0, not sha256:x"):
        load_text_embeddings(store, "clip-b16", vocab, "single", weights="sha256:x")


def test_incomplete_set_counts_as_missing(store: FeatureStore) -> None:
    vocab = parse_vocab("a,b")
    FeatureStore.open(store.path, mode="a").root.require_group(
        text_set_key("clip-b16", vocab, "single")
    )
    assert list_text_sets(store) == []
    with pytest.raises(ProvenanceMismatchError, match="no clip-b16 text embeddings"):
        load_text_embeddings(store, "clip-b16", vocab, "single")


def test_missing_set_names_the_command_that_makes_it(store: FeatureStore) -> None:
    vocab = parse_vocab("sky;clouds,tree")
    with pytest.raises(MissingTextSetError) as e:
        load_text_embeddings(store.path, "clip-b16", vocab, "clip7")
    err = e.value
    assert "get_text_embeddings" in str(err) and "ovss " not in str(err)  # no CLI in the library
    assert (err.store, err.text_model, err.templates, err.reason) == (
        store.path,
        "clip-b16",
        "clip7",
        "missing",
    )
    assert parse_vocab(err.vocab_spec).key() == vocab.key()
    cmd = render_error(err).split("run: ", 1)[1]
    assert cmd.startswith(f"ovss extract --store {store.path} --text-model clip-b16")
    # the named command really makes it
    res = CliRunner().invoke(cli, [*shlex.split(cmd)[1:], *TINY_CLIP_ARGS, "-q"])
    assert res.exit_code == 0, res.output
    got = load_text_embeddings(store.path, "clip-b16", vocab, "clip7")
    assert got.queries == ["sky", "clouds", "tree"] and got.embeddings.shape == (3, 32)


def test_on_demand_embedding_and_cache_hit(
    store: FeatureStore, tiny_clip, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer, _ = tiny_clip
    report: list[TextSetReport] = []
    got = get_text_embeddings(
        store, "clip-b16", "sky,tree", "single", random_init=True,
        arch_overrides=TINY_CLIP, report=report,
    )  # fmt: skip
    ref = embed_vocabulary(model, tokenizer, parse_vocab("sky,tree"), ["a photo of a {}."])
    np.testing.assert_allclose(got.embeddings, ref, atol=1e-6)
    assert report[-1].status == "computed" and got.weights == "random-init:0"
    assert got.provenance["encoder"]["arch_overrides"] == TINY_CLIP

    def no_encoder(*a, **k):
        raise AssertionError("a cached set must not load the encoder")

    monkeypatch.setattr("featurestore.text._build", no_encoder)
    monkeypatch.setattr(clip_module, "load_open_clip", no_encoder)
    again = get_text_embeddings(
        store.path, "clip-b16", parse_vocab("sky,tree"), "single", random_init=True,
        arch_overrides=TINY_CLIP, report=report,
    )  # fmt: skip
    assert report[-1].status == "cached"
    np.testing.assert_array_equal(again.embeddings, got.embeddings)


def test_cached_set_of_another_encoder_is_refused(store: FeatureStore) -> None:
    kw = {"random_init": True, "arch_overrides": TINY_CLIP}
    get_text_embeddings(store, "clip-b16", "sky,tree", "single", **kw)
    with pytest.raises(MissingTextSetError) as e:
        get_text_embeddings(store, "clip-b16", "sky,tree", "single", seed=1, **kw)
    assert e.value.reason == "mismatch" and e.value.weights == "random-init:1"
    assert "ovss " not in str(e.value)
    assert render_error(e.value).endswith(
        f"recompute it: ovss extract --store {store.path} --text-model clip-b16 "
        "--vocab sky,tree --templates single --random-init --seed 1 --overwrite"
    )
    with pytest.raises(ProvenanceMismatchError, match="real \\(non-random\\) weights"):
        get_text_embeddings(store, "clip-b16", "sky,tree", "single")
    other = dict(TINY_CLIP, embed_dim=16)
    with pytest.raises(ProvenanceMismatchError, match="arch overrides"):
        get_text_embeddings(store, "clip-b16", "sky,tree", "single", random_init=True,
                            arch_overrides=other)  # fmt: skip
    redone = get_text_embeddings(store, "clip-b16", "sky,tree", "single", seed=1, overwrite=True,
                                 **kw)  # fmt: skip
    assert redone.weights == "random-init:1"


def test_missing_encoder_error(store: FeatureStore) -> None:
    with pytest.raises(WeightsNotFoundError) as e:
        get_text_embeddings(store, "clip-b16", "sky,tree", "single")
    msg = str(e.value)
    assert "text encoder cannot be loaded" in msg and "ViT-B-16.pt" in msg
    assert "--random-init" in msg and "OVSS_WEIGHTS" in msg
    assert list_text_sets(store) == []  # nothing half-written
    with pytest.raises(MissingTextSetError) as e:
        get_text_embeddings(store, "clip-b16", "sky,tree", "single", compute_if_missing=False)
    assert e.value.reason == "missing" and e.value.weights is None
    assert "run: ovss extract --store" in render_error(e.value)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        get_text_embeddings(store, "clip-b16", "sky,tree", "single", weights="/no/file.pt")


# -- ovss extract --vocab ---------------------------------------------------------------------


def test_cli_vocab_with_clip_model(tmp_path: Path, images: Path, tiny_clip) -> None:
    r = CliRunner()
    s = str(tmp_path / "cli.zarr")
    args = ["extract", "-m", "clip-b16", "--images", str(images), "--store", s, "--size", "32",
            "--vocab", "voc20", "--vocab", "sky;clouds,tree", "--templates", "clip7",
            "--json", "-q", *TINY_CLIP_ARGS]  # fmt: skip
    res = r.invoke(cli, args)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["models"][0]["feature_set"] == "clip-b16@short32"
    assert [t["status"] for t in rep["text_sets"]] == ["computed", "computed"]
    assert [(t["classes"], t["queries"]) for t in rep["text_sets"]] == [(20, 30), (2, 3)]
    model, tokenizer, _ = tiny_clip
    voc = parse_vocab("sky;clouds,tree")
    got = load_text_embeddings(s, "clip-b16", voc, "clip7", weights="random-init:0")
    ref = embed_vocabulary(model, tokenizer, voc, CLIP7)
    np.testing.assert_allclose(got.embeddings, ref, atol=1e-6)
    # resume: images and text sets are both already there
    res = r.invoke(cli, args)
    rep = json.loads(res.output)
    assert [t["status"] for t in rep["text_sets"]] == ["cached", "cached"]
    assert rep["models"][0]["images_done_before"] == 2
    # a text-only call on the existing store, human-readable output
    res = r.invoke(cli, ["extract", "--store", s, "--vocab", "ade20k", "--templates", "single",
                         *TINY_CLIP_ARGS])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "computed" in res.output and len(list_text_sets(s)) == 3


def test_cli_vocab_errors(tmp_path: Path) -> None:
    r = CliRunner()
    res = r.invoke(cli, ["extract", "--store", str(tmp_path / "none.zarr"), "--vocab", "a,b",
                         *TINY_CLIP_ARGS])  # fmt: skip
    assert res.exit_code == 1 and "no ovss store" in res.output
    assert "Traceback" not in res.output
    res = r.invoke(cli, ["extract", "--store", str(tmp_path / "x.zarr")])
    assert res.exit_code == 2 and "--model" in res.output
    res = r.invoke(cli, ["extract", "--store", "x", "--vocab", "ade21", "--dry-run"])
    assert res.exit_code == 1 and "not a dataset" in res.output
    res = r.invoke(cli, ["extract", "--store", "x", "--vocab", "a,b", "--templates", "nope"])
    assert res.exit_code == 2 and "'nope' is not one of" in res.output  # choices: the registry
    res = r.invoke(cli, ["extract", "-m", "clip-b16", "--images", str(tmp_path), "--store", "x",
                         "--templates", "clip7"])  # fmt: skip
    assert res.exit_code == 2 and "go with --vocab" in res.output


def test_vocabulary_validation() -> None:
    with pytest.raises(OvssError, match="at least one class"):
        Vocabulary(())
    with pytest.raises(OvssError, match="empty name"):
        Vocabulary((("a", ""),))


# -- the text-encoder registry ----------------------------------------------------------------


class HashEncoder(TextEncoder):
    """A toy checkpoint kind: a random (vocab x dim) table from the checkpoint's seed, summed
    over the prompt's bytes. Stands for a method's trained tower loaded from a file."""

    kind = "toyckpt"
    dim = 8
    builds = 0

    def __init__(self, spec: str, opts: TextEncoderOptions):
        HashEncoder.builds += 1
        self.name = spec
        self.path = spec.split(":", 1)[1]
        seed = int(Path(self.path).read_text())
        self.table = torch.randn(256, self.dim, generator=torch.Generator().manual_seed(seed))

    def identity(self) -> dict:
        return {"kind": "toyckpt", "checkpoint": file_identity(self.path)}

    def encode_batch(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([self.table[list(p.encode())].sum(0) for p in prompts])


def _identify_toy(spec: str, opts: TextEncoderOptions) -> dict:
    return {"kind": "toyckpt", "checkpoint": file_identity(spec.split(":", 1)[1])}


@pytest.fixture()
def toy_kind(monkeypatch: pytest.MonkeyPatch):
    import featurestore.text_encoders as te

    monkeypatch.setattr(te, "_KINDS", dict(te._KINDS))  # registrations end with the test
    register_text_encoder("toyckpt:", HashEncoder, identify=_identify_toy, help="toy")
    HashEncoder.builds = 0
    return HashEncoder


def test_registry_knows_clip_and_registered_kinds(toy_kind) -> None:
    keys = [k.key for k in list_text_encoders()]
    assert {"clip-b16", "clip-l14", "clip-h14"} <= set(keys)
    assert "openclip:" in keys and "toyckpt:" in keys
    assert lookup_text_encoder("openclip:ViT-B-16:laion2b_s34b_b88k").key == "openclip:"
    assert lookup_text_encoder("toyckpt:/a/b.pt").key == "toyckpt:"
    assert not lookup_text_encoder("clip-b16").keyed_by_identity
    with pytest.raises(OvssError, match="not a known text encoder.*clip-b16.*toyckpt:"):
        lookup_text_encoder("nosuchkind:/x.pt")
    with pytest.raises(OvssError, match="already registered"):
        register_text_encoder("toyckpt:", lambda s, o: None)
    enc = create_text_encoder("clip-b16", random_init=True, seed=3, arch_overrides=TINY_CLIP)
    assert isinstance(enc, ClipTextEncoder) and enc.dim == 32
    assert enc.identity() == {
        "kind": "clip", "model": "clip-b16", "weights": "random-init:3",
        "arch_overrides": TINY_CLIP,
    }  # fmt: skip


def test_checkpoint_kind_cache_keys_on_identity(
    store: FeatureStore, tmp_path: Path, toy_kind
) -> None:
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    a.write_text("1")
    b.write_text("2")
    got_a = get_text_embeddings(store, f"toyckpt:{a}", "sky,tree", "clip7")
    got_b = get_text_embeddings(store, f"toyckpt:{b}", "sky,tree", "clip7")
    assert toy_kind.builds == 2
    assert got_a.key != got_b.key and got_a.key.startswith("text/toyckpt-")
    assert not np.allclose(got_a.embeddings, got_b.embeddings)
    # reference: §0.1 by hand with the toy encoder
    enc = HashEncoder(f"toyckpt:{a}", TextEncoderOptions())
    rows = []
    for q in ("sky", "tree"):
        e = torch.nn.functional.normalize(enc.encode_batch([t.format(q) for t in CLIP7]), dim=-1)
        rows.append(torch.nn.functional.normalize(e.mean(0), dim=0).numpy())
    np.testing.assert_allclose(got_a.embeddings, np.stack(rows), atol=1e-6)
    assert got_a.provenance["identity"]["checkpoint"] == file_identity(str(a))
    # same checkpoint (another path, same bytes): found without building the encoder
    c = tmp_path / "copy.ckpt"
    c.write_text("1")
    toy_kind.builds = 0
    again = get_text_embeddings(store, f"toyckpt:{c}", "sky,tree", "clip7")
    assert toy_kind.builds == 0 and again.key == got_a.key
    np.testing.assert_array_equal(again.embeddings, got_a.embeddings)
    # an encoder object finds the same set; load_text_embeddings reads it by spec
    assert get_text_embeddings(store, enc, "sky,tree", "clip7").key == got_a.key
    assert load_text_embeddings(store, f"toyckpt:{b}", parse_vocab("sky,tree"), "clip7").key == (
        got_b.key
    )
    rows = {r["key"]: r for r in list_text_sets(store)}
    assert rows[got_b.key]["text_model"] == f"toyckpt:{b}" and rows[got_b.key]["dim"] == 8
    # a changed checkpoint is another encoder: its set is missing, not the old one reused
    a.write_text("3")
    with pytest.raises(MissingTextSetError, match="has no toyckpt"):
        get_text_embeddings(store, f"toyckpt:{a}", "sky,tree", "clip7", compute_if_missing=False)


def test_identify_must_agree_with_identity(store: FeatureStore, tmp_path: Path, toy_kind) -> None:
    import featurestore.text_encoders as te

    ck = tmp_path / "a.ckpt"
    ck.write_text("1")
    te._KINDS["toyckpt:"] = dataclasses.replace(
        te._KINDS["toyckpt:"], identify=lambda s, o: {"kind": "toyckpt", "checkpoint": "other"}
    )
    with pytest.raises(OvssError, match=r"identity\(\).*differs.*identify"):
        get_text_embeddings(store, f"toyckpt:{ck}", "sky,", "single")


def test_missing_text_set_hint() -> None:
    e = MissingTextSetError(
        "no set", store="/s/x y.zarr", text_model="simzss:/c/k.pt", vocab_spec="sky;clouds,tree",
        templates="clip7", weights="random-init:2",
    )  # fmt: skip
    assert render_error(e) == (
        "no set; run: ovss extract --store '/s/x y.zarr' --text-model simzss:/c/k.pt "
        "--vocab 'sky;clouds,tree' --templates clip7 --random-init --seed 2"
    )
    e.reason, e.weights = "mismatch", None
    assert render_error(e).endswith("--templates clip7 --overwrite")
    assert "recompute it:" in render_error(e)


# -- the exact fast path of CLIP towers -------------------------------------------------------

MIXED = [
    "a",
    "a photo of a cat.",
    "there is a " + "very " * 40 + "big dog in the scene.",
    "sky",
    "a bad photo of the traffic light.",
    "x " * 100,  # longer than the context: the tokenizer cuts it, EOT at the last position
    "art of the tree.",
]


@pytest.fixture(scope="module")
def tiny_clip2():
    """Two text layers (one layer hides mixing errors less well)."""
    arch = dict(TINY_CLIP, text_cfg={"layers": 2, "width": 32, "heads": 2})
    return load_open_clip("clip-b16", random_init=True, seed=5, arch_overrides=arch)


@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_truncated_context_equals_full(tiny_clip2, batch_size: int) -> None:
    model, tokenizer, info = tiny_clip2
    enc = ClipTextEncoder("clip-b16", model, tokenizer, {"weights": info.weights})
    lengths: list[int] = []
    real = enc._forward_truncated

    def spy(tokens):
        lengths.append(tokens.shape[1])
        return real(tokens)

    enc._forward_truncated = spy
    calls: list[tuple[str, int, int]] = []
    got = enc.encode(MIXED, batch_size=batch_size, progress=lambda *a: calls.append(a))
    with torch.no_grad():
        ref = model.encode_text(tokenizer(MIXED))
    assert got.shape == (len(MIXED), 32) and got.dtype == torch.float32
    assert float((got - ref).abs().max()) < 1e-5  # in prompt order
    assert "truncated" in enc.provenance()["context"]
    probe, batches = lengths[0], lengths[1:]
    assert probe < 77 and len(batches) == -(-len(MIXED) // batch_size)
    assert batches[0] == 77 and batches == sorted(batches, reverse=True)  # longest first
    if batch_size == 1:
        assert batches[-1] == 3  # "a": start-of-text, a, end-of-text
    assert calls[0] == ("text clip-b16", 0, len(MIXED)) and calls[-1][1:] == (7, 7)
    assert len(calls) == len(batches) + 1


def test_full_context_switch_and_fallbacks(tiny_clip2) -> None:
    import copy

    model, tokenizer, info = tiny_clip2
    with torch.no_grad():
        ref = model.encode_text(tokenizer(MIXED))
    full = ClipTextEncoder("clip-b16", model, tokenizer, truncate=False)
    np.testing.assert_allclose(full.encode(MIXED, batch_size=4), ref, atol=1e-6)
    assert full.provenance()["context"] == "full (truncation disabled)"
    # a tower whose pooled position sees the padding runs the full context, and says why
    last = copy.deepcopy(model)
    last.text_pool_type = "last"
    enc = ClipTextEncoder("clip-b16", last, tokenizer)
    with torch.no_grad():
        ref_last = last.encode_text(tokenizer(MIXED))
    np.testing.assert_allclose(enc.encode(MIXED), ref_last, atol=1e-6)
    assert "pool type 'last'" in enc.provenance()["context"]
    nomask = copy.deepcopy(model)
    nomask.attn_mask = None
    assert "no causal mask" in ClipTextEncoder("x", nomask, tokenizer).context_mode()
    # a truncated forward that disagrees on the probe is dropped for the full context
    bad = ClipTextEncoder("clip-b16", model, tokenizer)
    bad._forward_truncated = lambda tokens: torch.zeros(tokens.shape[0], 32)
    np.testing.assert_allclose(bad.encode(MIXED), ref, atol=1e-6)
    assert "differs" in bad.provenance()["context"]


def test_text_transformer_tower_truncates_exactly() -> None:
    """open_clip's TextTransformer (CustomTextCLIP.text): its own attribute names, its mask."""
    from open_clip.tokenizer import tokenize
    from open_clip.transformer import TextTransformer

    torch.manual_seed(0)

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text = TextTransformer(width=32, heads=2, layers=2, output_dim=16)

        def encode_text(self, tokens):
            return self.text(tokens)

    model = Custom().eval()
    enc = ClipTextEncoder("custom", model, tokenize)
    got = enc.encode(MIXED, batch_size=3)
    with torch.no_grad():
        ref = model.encode_text(tokenize(MIXED))
    assert enc.dim == 16 and "truncated" in enc.context_mode()
    assert float((got - ref).abs().max()) < 1e-5


def test_vocabulary_progress_names_the_model(store: FeatureStore) -> None:
    calls: list[tuple[str, int, int]] = []
    get_text_embeddings(
        store, "clip-b16", "sky;clouds,tree", "clip7", random_init=True,
        arch_overrides=TINY_CLIP, batch_size=8, progress=lambda *a: calls.append(a),
    )  # fmt: skip
    assert {c[0] for c in calls} == {"text clip-b16"}
    assert [c[1] for c in calls] == [0, 8, 16, 21] and {c[2] for c in calls} == {21}
    [row] = list_text_sets(store)
    te = load_text_embeddings(store, "clip-b16", parse_vocab("sky;clouds,tree"), "clip7")
    assert "truncated" in te.provenance["encoder"]["context"] and row["identity"]


def test_store_text_embeddings_of_a_checkpoint_kind(
    store: FeatureStore, tmp_path: Path, toy_kind
) -> None:
    ck = tmp_path / "a.ckpt"
    ck.write_text("4")
    vocab = parse_vocab("sky,tree")
    emb = np.eye(2, 8, dtype=np.float32)
    ident = _identify_toy(f"toyckpt:{ck}", TextEncoderOptions())
    key = store_text_embeddings(store, f"toyckpt:{ck}", vocab, "single", emb, {}, identity=ident)
    assert key == text_set_key(f"toyckpt:{ck}", vocab, "single") and "/toyckpt-" in key
    got = get_text_embeddings(store, f"toyckpt:{ck}", vocab, "single")
    assert toy_kind.builds == 0  # found by identity, nothing built
    np.testing.assert_array_equal(got.embeddings, emb)


def test_load_text_encoder_on_meta_builds_no_weights() -> None:
    """The dry run tells a text tower's width without weights (``recipes.plan_job``)."""
    with torch.device("meta"):
        model, tokenizer, prov = load_text_encoder("clip-b16", random_init=True)
    assert model.text_projection.shape == (512, 512) and model.text_projection.is_meta
    assert prov["weights"] == "random-init:0" and callable(tokenizer)
