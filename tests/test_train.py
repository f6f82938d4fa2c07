"""The trainer seam (``methods.train``): every registered trainer trains two tiny steps and
resumes bitwise; a toy trainer written in one module appears in ``ovss align --method toy
--help`` with its generated options and trains through the CLI; checkpoints are loaded with
``weights_only`` (a pickled object is refused with one line); the shared helpers."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from featurestore.backbones.base import TensorSpec
from featurestore.datasets import list_dataset_images
from featurestore.protocol import image_geometry
from featurestore.store import STATUS_OK, FeatureStore
from featurestore.text import Vocabulary, store_text_embeddings
from methods import train as tr
from methods.base import FeatureRequirement
from ovss_cli.main import cli

torch.set_num_threads(1)

CLASSES = ["sky", "grass", "brick"]
H, W = 28, 42  # original image size; a block of 7 px per GT cell
D_TXT = 4


def _unit(tensor: str) -> str:
    return {"global": "window", "embedding": "image", "cls": "window"}.get(tensor, "token")


def _patch(model: str) -> int:
    m = re.search(r"(\d+)$", model)
    return int(m.group(1)) if m else 16


def _dataset(tmp_path, n: int, seed: int = 0):
    """A `custom` dataset of ``n`` random images with block-constant GT of 3 classes."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "data"
    for sub in ("images/train", "annotations/train"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for i in range(n):
        gt = np.kron(rng.integers(0, 3, (H // 7, W // 7)), np.ones((7, 7), np.int64))
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            root / "images/train" / f"im{i}.png"
        )
        Image.fromarray(gt.astype(np.uint8)).save(root / "annotations/train" / f"im{i}.png")
    return root


def _store_for(tmp_path, requirements, n: int = 4, seed: int = 0):
    """A store of ``n`` images holding a synthetic set (random values, real geometry) for
    every required feature set, and a `custom` dataset with their GT."""
    rng = np.random.default_rng(seed)
    root = _dataset(tmp_path, n, seed)
    store = FeatureStore.open_or_create(
        tmp_path / "s.zarr", list_dataset_images("custom", root, "train")
    )
    sizes = store.root["images/size"][...]
    for r in requirements:
        if not isinstance(r, FeatureRequirement) or r.optional:
            continue
        geos = [image_geometry(r.protocol, h, w, _patch(r.model)) for h, w in sizes.tolist()]
        specs = [
            TensorSpec(t, _unit(t), (2, 2, 2) if _unit(t) == "image" else (6,)) for t in r.tensors
        ]
        fs = store.create_feature_set(
            r.model, r.protocol, {"name": r.model, "weights": "random-init:0"}, specs, geos
        )
        for b in range(fs.n_blocks):
            bufs = fs.new_block_buffers(b)
            for i in fs.block_images(b):
                for s in specs:
                    rows = bufs[s.name][fs.local_rows(s.unit, i)]
                    x = rng.normal(size=rows.shape[:1] + tuple(s.row_shape)) + 3.0
                    bufs[s.name][fs.local_rows(s.unit, i)] = fs.encode(x.astype(np.float32))
            imgs = fs.block_images(b)
            fs.write_block(b, bufs, np.full(len(imgs), STATUS_OK), [""] * len(imgs))
    return store, root


def _cache_text(store, text_model: str, templates: str, seed: int = 1) -> None:
    emb = torch.nn.functional.normalize(
        torch.randn(len(CLASSES), D_TXT, generator=torch.Generator().manual_seed(seed)), dim=1
    )
    store_text_embeddings(
        store,
        text_model,
        Vocabulary.from_names(CLASSES),
        templates,
        emb.numpy(),
        {"weights": "random-init:0"},
    )


def _request(store, root, config, out, **kw) -> tr.TrainRequest:
    return tr.TrainRequest(
        store=str(store.path),
        config=config,
        labels=tr.LabelRequest(dataset="custom", data_root=str(root), split="train"),
        text=tr.TextOptions(random_init=True, seed=0),
        out_dir=str(out),
        device="cpu",
        **kw,
    )


def _weights(path) -> dict[str, torch.Tensor]:
    ck = tr.read_checkpoint(path)
    return {k: v for k, v in ck.items() if isinstance(v, dict) and k in ("module", "model")}


# ------------------------------------------------------------------ every registered trainer


@pytest.mark.parametrize("name", tr.list_trainers())
def test_every_trainer_trains_two_steps_and_resumes_bitwise(tmp_path, name):
    cls = tr.get_trainer(name)
    reqs = cls.requirements(cls.build_config(None, cls.smoke_overrides))
    store, root = _store_for(tmp_path, reqs)
    smoke = cls.smoke_config(tmp_path / "inputs", store)
    config = cls.build_config(None, smoke)
    d = cls.training_text_defaults(config)
    _cache_text(store, d.text_model, d.templates)
    events: list[dict] = []
    full = cls().fit(_request(store, root, config, tmp_path / "full"), events.append)
    assert full.trainer == name and full.steps_done == 2, full
    assert any(e["stage"] == "train" and e["items_per_s"] >= 0 for e in events)
    assert [e["epoch"] for e in events if e["stage"] == "epoch"] == [1, 2]

    # a run stopped after its first epoch, then resumed == one uninterrupted run (bitwise)
    def stop(ev):
        if ev["stage"] == "epoch":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cls().fit(_request(store, root, config, tmp_path / "part"), stop)
    assert tr.read_checkpoint(tmp_path / "part" / tr.CHECKPOINT_NAME)["step"] == 1
    again = cls().fit(_request(store, root, config, tmp_path / "part"))
    assert again.steps_done == 2
    a, b = _weights(full.checkpoint), _weights(again.checkpoint)
    assert a and a.keys() == b.keys()
    for part in a:
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    # the checkpoint's provenance: plain JSON with the run's identity
    prov = tr.read_checkpoint(full.checkpoint)["provenance"]
    assert json.loads(json.dumps(prov)) == prov
    assert prov["trainer"] == name and prov["versions"]["torch"]
    assert prov["config"] == tr.plain(tr.config_to_dict(config))
    # another run's hyperparameters are refused, --restart trains from scratch
    other = cls.build_config(None, {**smoke, "seed": 7})
    with pytest.raises(tr.CheckpointError, match="config.seed") as e:
        cls().fit(_request(store, root, other, tmp_path / "full"))
    assert e.value.reason == "mismatch" and "\n" not in str(e.value)
    cls().fit(_request(store, root, other, tmp_path / "full", restart=True))
    assert tr.read_checkpoint(full.checkpoint)["provenance"]["config"]["seed"] == 7


def test_fmbseg_declares_the_recipe_sets():
    cls = tr.get_trainer("fmbseg")
    got = {(r.role, r.model, r.protocol.key(), r.tensors) for r in cls.requirements(cls.Config())}
    assert got == {
        ("clip", "clip-l14", "short448-c224s112", ("pre_last", "global")),
        ("sam", "sam-h", "long1024", ("embedding",)),
        ("vfm", "dinov2-l14", "short448", ("patch",)),
    }
    d = cls.vocabulary_defaults(cls.Config())  # the recipe's text side: Stage 1's CLIP
    assert (d.text_model, d.templates, d.family) == ("clip-l14", "single", "sclip")
    d = cls.training_text_defaults(cls.Config())  # labels recording no CLIP (a dataset's GT)
    assert (d.text_model, d.templates) == ("clip-b16", "single")
    assert all(not r.model_field for r in cls.requirements(cls.Config()))


# ------------------------------------------------------------------ a toy trainer, one module

TOY_MODULE = '''
"""A toy trainer: a linear probe of cached patch tokens onto the label classes."""

from dataclasses import dataclass

import numpy as np
import torch

from featurestore.protocol import Protocol
from featurestore.store import FeatureStore
from methods.base import FeatureRequirement
from methods import train as tr

PROTO = Protocol(resize="none", size=0)


@dataclass
class ToyConfig:
    """Options of the toy.

    Attributes:
        epochs: passes over the images.
        lr: SGD learning rate.
        probe_scale: multiplies the logits [ours].
    """

    epochs: int = 2
    lr: float = 0.1
    probe_scale: float = 1.0


@tr.register_trainer
class ToyTrainer(tr.Trainer):
    """A linear probe (tests)."""

    name = "toy"
    Config = ToyConfig
    doc = "toy linear probe"
    needs_labels = True
    smoke_overrides = {"epochs": 2}

    @classmethod
    def requirements(cls, config):
        return [FeatureRequirement("vfm", "toy-vfm", PROTO, ("patch",))]

    def fit(self, request, progress=None):
        cfg = request.config or ToyConfig()
        with tr.setup_distributed(request.device) as ctx:
            store = FeatureStore.open(request.store)
            source = tr.open_labels(store, request.labels)
            fs = store.require("toy-vfm", PROTO)
            k = len(source.class_names)
            torch.manual_seed(0)
            probe = torch.nn.Linear(fs.specs[0].row_shape[0], k)
            opt = torch.optim.SGD(probe.parameters(), lr=cfg.lr)
            prov = tr.checkpoint_provenance(
                self.name, cfg, features=fs, tensor="patch", labels=source.describe()
            )
            path = __import__("pathlib").Path(request.out_dir) / tr.CHECKPOINT_NAME
            path.parent.mkdir(parents=True, exist_ok=True)
            ck = tr.resume_state(path, prov, request.restart)
            epoch, step, history = 0, 0, []
            if ck is not None:
                probe.load_state_dict(ck["module"])
                opt.load_state_dict(ck["optimizer"])
                epoch, step, history = ck["epoch"], ck["step"], ck["history"]
            meter = tr.StepMeter(progress, cfg.epochs, cfg.epochs, unit="images")
            for e in range(epoch, cfg.epochs):
                meter.start_epoch()
                xs, ys = [], []
                for i in range(store.n_images):
                    f = fs.read(i, names=["patch"])
                    lab = source.labels(i)
                    xs.append(torch.from_numpy(np.asarray(f.tensors["patch"], np.float32)))
                    ys.append(torch.full((len(xs[-1]),), int(np.bincount(lab.ravel()).argmax())))
                x, y = torch.cat(xs), torch.cat(ys)
                loss = torch.nn.functional.cross_entropy(probe(x) * cfg.probe_scale, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                meter.step(e + 1, step, float(loss.detach()), cfg.lr, store.n_images)
                history.append(meter.end_epoch({"epoch": e + 1, "loss": float(loss.detach())}))
                tr.save_checkpoint(
                    {
                        "module": probe.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": e + 1,
                        "step": step,
                        "history": history,
                        "provenance": prov,
                    },
                    path,
                )
                meter.report_epoch(history[-1])
            return tr.TrainResult(self.name, str(path), cfg.epochs, step, history, prov)
'''


@pytest.fixture()
def toy_trainer(tmp_path):
    """The toy trainer module written to tmp_path and imported (it registers itself)."""
    path = tmp_path / "toy_trainer_mod.py"
    path.write_text(textwrap.dedent(TOY_MODULE))
    spec = importlib.util.spec_from_file_location("toy_trainer_mod", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["toy_trainer_mod"] = mod
    spec.loader.exec_module(mod)
    yield mod
    tr._TRAINERS.pop("toy", None)
    sys.modules.pop("toy_trainer_mod", None)


def test_toy_trainer_in_one_module_appears_in_align_and_trains(tmp_path, toy_trainer):
    from methods.plan import list_components

    assert "toy" in tr.list_trainers() and "toy" in list_components()  # extract --for toy
    r = CliRunner().invoke(cli, ["align", "--method", "toy", "--help"])
    assert r.exit_code == 0, r.output
    assert "--probe-scale" in r.output and "multiplies the logits [ours]" in r.output
    assert "A linear probe (tests)." in r.output
    assert "--arch" not in r.output  # fmbseg's options belong to fmbseg
    r = CliRunner().invoke(cli, ["align", "--help"])
    assert "--arch" in r.output and "--probe-scale" not in r.output  # the default: fmbseg
    assert "toy: toy linear probe" in r.output  # every trainer listed

    store, root = _store_for(tmp_path, toy_trainer.ToyTrainer.requirements(None))
    args = [
        "align", "--method", "toy", "--store", str(store.path), "--gt-dataset", "custom",
        "--data-root", str(root), "--split", "train", "--probe-scale", "2", "--set",
        "epochs=3", "--out", str(tmp_path / "ck"), "--device", "cpu", "--json",
    ]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["trainer"] == "toy" and out["epochs_done"] == 3 and out["steps_done"] == 3
    prov = tr.read_checkpoint(out["checkpoint"])["provenance"]
    assert prov["config"] == {"epochs": 3, "lr": 0.1, "probe_scale": 2.0}
    # progress without a terminal: plain lines with loss and throughput
    assert re.search(r"epoch 3/3: loss \d+\.\d+, [\d.]+ images/s", r.stderr), r.stderr
    # a bad typed value is one line naming the field
    r = CliRunner().invoke(cli, [*args[:-1], "--set", "lr=fast"])
    assert r.exit_code != 0 and "lr" in r.output and "Traceback" not in r.output
    # the toy needs labels: a usage error without them
    r = CliRunner().invoke(cli, ["align", "--method", "toy", "--store", str(store.path)])
    assert r.exit_code == 2 and "--labels" in r.output


def test_unknown_method_lists_the_trainers():
    r = CliRunner().invoke(cli, ["align", "--method", "nosuch", "--store", "x"])
    assert r.exit_code == 2 and "fmbseg" in r.output


# ------------------------------------------------------------------ safe checkpoints


class _Evil:
    def __reduce__(self):
        return (print, ("code ran on load",))


def test_a_pickled_object_in_a_checkpoint_is_refused_with_one_line(tmp_path, capsys):
    from methods.fmbseg import load_checkpoint

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "provenance": {}, "payload": _Evil()}, path)
    with pytest.raises(tr.CheckpointError) as e:
        tr.read_checkpoint(path)
    assert e.value.reason == "unsafe" and "\n" not in str(e.value)
    assert "pickled" in str(e.value) and "code ran" not in capsys.readouterr().out
    with pytest.raises(tr.CheckpointError, match="pickled"):
        load_checkpoint(path)
    # through the CLI: resuming from such a last.pt is one line, exit 1, no traceback
    cls = tr.get_trainer("fmbseg")
    store, root = _store_for(tmp_path, cls.requirements(cls.Config()), n=2)
    _cache_text(store, "clip-b16", "single")
    (tmp_path / "ck").mkdir()
    torch.save({"payload": _Evil()}, tmp_path / "ck" / "last.pt")
    r = CliRunner().invoke(
        cli,
        ["align", "--store", str(store.path), "--gt-dataset", "custom", "--data-root",
         str(root), "--split", "train", "--arch", "linear", "--epochs", "1",
         "--text-random-init", "--out", str(tmp_path / "ck"), "--device", "cpu", "-q"],
    )  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "pickled" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and "code ran" not in r.output


def test_save_checkpoint_refuses_non_plain_provenance_and_is_atomic(tmp_path):
    path = tmp_path / "last.pt"
    tr.save_checkpoint({"step": 1, "provenance": {"p": tmp_path, "t": (1, 2)}}, path)
    ck = tr.read_checkpoint(path)
    assert ck["provenance"] == {"p": str(tmp_path), "t": [1, 2]}
    with pytest.raises(TypeError):
        tr.save_checkpoint({"provenance": {"x": object()}}, path)
    assert tr.read_checkpoint(path)["step"] == 1  # the old file is intact
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors_render_with_their_hint(tmp_path):
    from ovss_cli.hints import render_error

    CliRunner().invoke(cli, ["align", "--help"])  # registers the align hints
    e = tr.CheckpointError("x was trained with other config.lr", "x", "mismatch", ("config.lr",))
    assert render_error(e).endswith("pass --restart (or another --out) to train from scratch")


# ------------------------------------------------------------------ shared helpers


def test_loss_registry_drives_the_loss_choices():
    from methods.fmbseg import LOSS_FAMILY, AlignConfig

    names = tr.list_losses(LOSS_FAMILY)
    assert names == ("tsupcon", "supcon", "proto")
    field = next(f for f in tr_config_fields(AlignConfig) if f.name == "loss")
    assert field.choices == names
    with pytest.raises(tr.OvssError, match="not a patch-text loss"):
        tr.get_loss("nosuch", LOSS_FAMILY)
    with pytest.raises(ValueError, match="twice"):
        tr.register_loss("tsupcon", LOSS_FAMILY)(lambda *a: None)
    r = CliRunner().invoke(cli, ["align", "--help"])
    assert "[tsupcon|supcon|proto]" in r.output


def tr_config_fields(cls):
    from methods.config import config_fields

    return config_fields(cls)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_slices_partition_in_order(world):
    for n in range(8):
        parts = [tr.DistContext(rank=r, world=world).rank_slice(n) for r in range(world)]
        got = [i for s in parts for i in range(n)[s]]
        assert got == list(range(n))
        assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


def test_single_process_context_passes_through():
    ctx = tr.setup_distributed("cpu")
    z, y = torch.randn(3, 2), torch.arange(3)
    assert ctx.world == 1 and ctx.gather_rows(z, y)[0] is z
    assert ctx.rank0_first(lambda: 5) == 5


def test_text_defaults_explicit_then_label_set_then_trainer():
    class Src:
        def text_defaults(self):
            return {"templates": "clip7"}

    d = tr.VocabularyDefaults("clip-b16", "single")
    assert tr.resolve_text(tr.TextOptions(), Src(), d) == ("clip-b16", "clip7")
    assert tr.resolve_text(tr.TextOptions("clip-l14", "x"), Src(), d) == ("clip-l14", "x")
    assert tr.resolve_text(tr.TextOptions(), object(), d) == ("clip-b16", "single")


def test_format_event_lines():
    line = tr.format_event(
        {"stage": "train", "epoch": 1, "epochs": 2, "step": 3, "steps": 8, "loss": 0.5,
         "lr": 0.01, "items_per_s": 12.5, "unit": "images"}
    )  # fmt: skip
    assert line == "epoch 1/2 step 3/8: loss 0.5000 lr 1.00e-02, 12.5 images/s"
    line = tr.format_event(
        {"stage": "epoch", "epoch": 2, "epochs": 2, "loss": 0.25, "patch_acc": 0.5,
         "seconds": 1.5, "items_per_s": 4.0, "unit": "images"}
    )  # fmt: skip
    assert line == "epoch 2/2: loss 0.2500, patch acc 0.500, 4.0 images/s, 1.5 s"
