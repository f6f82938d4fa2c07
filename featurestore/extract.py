"""The extraction pipeline: images -> backbone -> feature store.

Decoding and preprocessing run in background threads, store writes in a background writer
thread, so the model forward is the only thing on the critical path. Work is done block by
block (see ``featurestore.store``): a block is written whole and only then marked finished, so a
killed run resumes at the first unfinished block of its shard.

The stream [ours]: images reach the forward one by one as they are decoded (the first batch
of a block starts as soon as its own images are ready, not when the whole block is), with the
decoders a batch and more ahead; the windows of a block are batched exactly as before
(``batch_size`` windows of one shape, in image order, a block's last batch possibly short), so
the stored bytes do not depend on the timing. On CUDA a batch goes up from pinned memory and
its outputs come down while the next batch computes (they are placed into the block buffers
after the next forward is launched).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from featurestore.backbones.base import Backbone, TensorSpec, create_backbone
from featurestore.errors import ImageReadError, OvssError
from featurestore.images import (
    HUGE_IMAGE_PIXELS,
    ImageRecord,
    load_image_reduced,
    load_image_rgb,
    probe_image,
)
from featurestore.protocol import ImageGeometry, Protocol, preprocess_windows
from featurestore.store import (
    DEFAULT_BLOCK_MB,
    STATUS_FAILED,
    STATUS_OK,
    FeatureSet,
    FeatureStore,
    _storage_dtype,
    plan_layout,
    set_key,
)

preprocess = preprocess_windows  # the default window preprocessing, re-exported
ProgressCallback = Callable[[str, int, int], None]  # (model, images done, images total)


@dataclass
class ExtractConfig:
    """Options of ``ovss extract`` (every field is a CLI flag of the same name).

    Attributes:
        models: backbone short names, run one after the other over the same images.
        protocol: resize / window rule shared by all models of the call.
        store: store path or URL; created if absent, resumed if present.
        batch_size: windows per forward pass (windows of one shape are batched across images).
        device: ``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        precision: compute precision: ``auto`` (fp16 autocast on CUDA, fp32 elsewhere),
            ``fp32``, ``fp16``, ``bf16``.
        dtype: storage dtype of features: ``float16`` (default), ``float32``, ``bfloat16``.
        shard: ``(i, n)``: this process writes blocks ``b % n == i``. ``None``: from
            ``RANK``/``WORLD_SIZE`` under torchrun, else ``(0, 1)``.
        overwrite: replace existing feature sets of these models/protocol (never the store).
        weights: checkpoint path (only with a single model).
        random_init: build the real architecture with seeded random weights.
        seed: the random-init seed (recorded as ``random-init:<seed>``).
        layers: extra intermediate layers to cache (block indices).
        block_mb: target size of one block (= one chunk file per tensor).
        workers: image decoding threads.
        arch_overrides: architecture overrides (tiny test models of the real classes).
        pos_interp: position-embedding resampling rule at non-native grids (``offset``,
            ``size``, ``size-aa``; ``featurestore.backbones.posembed``); ``None``: each model's
            authors' rule. Recorded in the feature set's provenance.
        max_pixels: images with more pixels (height x width of the original) are decoded
            reduced to just above the size the protocol resizes them to
            (``featurestore.images.load_image_reduced``: JPEG DCT scaling, else an integer box
            reduction), so memory follows the resized size; their features differ slightly
            from a full-resolution decode. Images at or below it are decoded whole, exactly
            as always. Default ``HUGE_IMAGE_PIXELS`` (40 MP) [ours].
    """

    models: list[str]
    protocol: Protocol
    store: str
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float16"
    shard: tuple[int, int] | None = None
    overwrite: bool = False
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    layers: tuple[int, ...] = ()
    block_mb: float = DEFAULT_BLOCK_MB
    workers: int = 2
    arch_overrides: dict | None = None
    pos_interp: str | None = None
    max_pixels: int = HUGE_IMAGE_PIXELS


@dataclass
class ModelReport:
    model: str
    feature_set: str
    images_total: int
    images_done_before: int
    images_extracted: int
    images_failed: int
    seconds: float
    images_per_s: float
    failures: dict[str, str] = field(default_factory=dict)


@dataclass
class ExtractReport:
    """What :func:`extract` did; ``notes``: what it did on the side, one line each (the
    leftovers of an interrupted creation it removed)."""

    store: str
    shard: tuple[int, int]
    models: list[ModelReport]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """``(i, n)`` from the argument, else torchrun's RANK/WORLD_SIZE, else ``(0, 1)``."""
    if shard is None:
        n = int(os.environ.get("WORLD_SIZE", "1"))
        i = int(os.environ.get("RANK", "0"))
        shard = (i, n)
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise OvssError(f"invalid shard {i}/{n}: need 0 <= i < n")
    return i, n


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device of a ``--device`` value (every command shares this rule).

    ``auto`` **[ours: the default]** is the GPU of ``LOCAL_RANK`` (0 outside torchrun) when CUDA
    is available, else Apple's MPS when present, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and
    ``mps`` are taken as given (a CUDA device where CUDA is missing is an error). Under torchrun
    ``methods.fmbseg.setup_distributed`` takes ``auto`` as the CPU when CUDA is missing (gloo
    cannot carry MPS tensors).
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise OvssError(f"'{device}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OvssError(f"--device {device} was asked for but CUDA is not available here")
    return dev


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision not in ("fp16", "bf16"):
        raise OvssError(f"precision must be auto, fp32, fp16 or bf16, not {precision!r}")
    dt = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dt)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def geometries_for(
    sizes: np.ndarray, backbone: Backbone, protocol: Protocol
) -> list[ImageGeometry]:
    """Geometry of every image for a backbone; an unreadable image (size 0) gets no windows."""
    out = []
    for h, w in sizes.tolist():
        if h <= 0 or w <= 0:
            out.append(ImageGeometry(original=(h, w), resized=(0, 0)))
        else:
            out.append(backbone.geometry(protocol, h, w))
    return out


def check_protocol_fits(models: Sequence[str], protocol: Protocol) -> None:
    """Refuse, before any model is built, a SAM-only protocol (``halves``, or ``long`` with
    ``align``: ``Protocol.sam_only``) for a model that is not SAM.

    Raises:
        OvssError: one line naming the models and the rule.
    """
    if not protocol.sam_only:
        return
    from featurestore.backbones.sam import VARIANTS

    sam = [v.name for v in VARIANTS]
    others = [m for m in models if m not in sam]
    if others:
        rule = "--resize halves" if protocol.resize == "halves" else "--align with --resize long"
        raise OvssError(
            f"{rule} ({protocol.key()}) is SAM's input; only SAM models take it "
            f"({', '.join(sam)}), not {', '.join(others)}: extract those with another --resize"
        )


# --------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------


@dataclass
class PlanRow:
    model: str
    feature_set: str
    images: int
    unreadable: int
    windows: int
    tokens: int
    bytes: int
    blocks: int


def plan(records: Sequence[ImageRecord], cfg: ExtractConfig) -> list[PlanRow]:
    """What ``extract`` would write (images, windows, tokens, bytes per model); builds the models
    on the meta device only to read their output specs, loads no weights."""
    check_protocol_fits(cfg.models, cfg.protocol)
    sizes = np.zeros((len(records), 2), dtype=np.int64)
    for i, r in enumerate(records):
        try:
            sizes[i] = probe_image(r.path)
        except ImageReadError:
            pass
    rows = []
    for name in cfg.models:
        with torch.device("meta"):
            bb = create_backbone(
                name,
                random_init=True,
                seed=cfg.seed,
                layers=cfg.layers,
                arch_overrides=cfg.arch_overrides,
                **pos_interp_kwargs(cfg),
            )
        geos = geometries_for(sizes, bb, cfg.protocol)
        specs = bb.tensor_specs()
        layout = plan_layout(geos, specs, cfg.dtype, cfg.block_mb)
        itemsize = _storage_dtype(cfg.dtype).itemsize
        nbytes = sum(
            int(layout.row_count[s.unit].sum()) * int(np.prod(s.row_shape)) * itemsize
            for s in specs
        )
        rows.append(
            PlanRow(
                model=name,
                feature_set=set_key(name, cfg.protocol),
                images=len(records),
                unreadable=int((sizes[:, 0] == 0).sum()),
                windows=int(layout.row_count["window"].sum()),
                tokens=int(layout.row_count["token"].sum()),
                bytes=nbytes,
                blocks=layout.n_blocks,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def build_backbone(name: str, cfg: ExtractConfig) -> Backbone:
    if cfg.weights and len(cfg.models) > 1:
        raise OvssError("--weights names one checkpoint: use it with a single --model")
    return create_backbone(
        name,
        weights=cfg.weights,
        random_init=cfg.random_init,
        seed=cfg.seed,
        layers=tuple(cfg.layers),
        arch_overrides=cfg.arch_overrides,
        **pos_interp_kwargs(cfg),
    )


def pos_interp_kwargs(cfg: ExtractConfig) -> dict:
    """``{"pos_interp": rule}`` when the call names one; else nothing, so every family (also
    one without a position-embedding rule) builds with its authors' default."""
    return {} if cfg.pos_interp is None else {"pos_interp": cfg.pos_interp}


def extract(
    records: Sequence[ImageRecord],
    cfg: ExtractConfig,
    progress: ProgressCallback | None = None,
) -> ExtractReport:
    """Extract every model of ``cfg`` over ``records`` into ``cfg.store`` (resuming).

    Unreadable images are skipped, recorded in the feature set (status *failed* + message) and
    listed in the report; finished blocks are never recomputed.
    """
    if not records:
        raise OvssError("no images to extract")
    check_protocol_fits(cfg.models, cfg.protocol)
    shard = resolve_shard(cfg.shard)
    device = resolve_device(cfg.device)
    store = None
    reports = []
    for name in cfg.models:
        # The model is built (weights found) before the store is touched, so a missing
        # checkpoint leaves nothing behind.
        backbone = build_backbone(name, cfg).to(device).eval()
        if store is None:
            # On object storage only shard 0 creates (there is no lock); the others wait.
            store = FeatureStore.open_or_create(cfg.store, records, creator=shard[0] == 0)
        reports.append(_extract_model(store, records, backbone, cfg, shard, device, progress))
        del backbone
    notes = list(store.notes) if store is not None else []
    return ExtractReport(store=cfg.store, shard=shard, models=reports, notes=notes)


def _extract_model(
    store: FeatureStore,
    records: Sequence[ImageRecord],
    backbone: Backbone,
    cfg: ExtractConfig,
    shard: tuple[int, int],
    device: torch.device,
    progress: ProgressCallback | None,
) -> ModelReport:
    info = backbone.info
    sizes = store.root["images/size"][...]
    geos = geometries_for(sizes, backbone, cfg.protocol)
    specs = backbone.tensor_specs()
    fs = store.create_feature_set(
        info.name,
        cfg.protocol,
        asdict(info),
        specs,
        geos,
        dtype=cfg.dtype,
        target_block_mb=cfg.block_mb,
        overwrite=cfg.overwrite,
        static=backbone.static_tensors(),
        default_geometry=type(backbone).geometry is Backbone.geometry,
        creator=shard[0] == 0,
    )
    done = fs.done_blocks()
    mine = [b for b in range(fs.n_blocks) if b % shard[1] == shard[0]]
    todo = [b for b in mine if not done[b]]
    n_mine = sum(len(fs.block_images(b)) for b in mine)
    n_before = n_mine - sum(len(fs.block_images(b)) for b in todo)
    if progress:
        progress(info.name, n_before, n_mine)

    t0 = time.perf_counter()
    failures: dict[str, str] = {}
    n_done = 0

    def image_done() -> None:
        nonlocal n_done
        n_done += 1
        if progress:
            progress(info.name, n_before + n_done, n_mine)

    runner = _BatchRunner(fs, backbone, specs, geos, cfg, device, image_done)
    writer = _BlockWriter(fs)
    block: _Block | None = None
    try:
        for b, d in _decoded_images(
            fs,
            records,
            geos,
            todo,
            backbone,
            cfg.workers,
            cfg.max_pixels,
            lookahead=_lookahead(cfg.workers, cfg.batch_size),
        ):
            if block is None:
                block = _Block(b, fs.block_images(b), fs.new_block_buffers(b))
            if d.error:
                failures[records[d.index].image_id] = d.error
            block.add(d)
            runner.add(d, block.buffers)
            if block.complete:
                runner.finish()  # the block's last (possibly short) batch, all outputs placed
                writer.put(b, block.buffers, block.status, block.errors)
                block = None
    finally:
        writer.close()
    dt = time.perf_counter() - t0
    return ModelReport(
        model=info.name,
        feature_set=fs.key,
        images_total=n_mine,
        images_done_before=n_before,
        images_extracted=n_done - len(failures),
        images_failed=len(failures),
        seconds=round(dt, 3),
        images_per_s=round(n_done / dt, 3) if dt > 0 and n_done else 0.0,
        failures=failures,
    )


@dataclass
class DecodedImage:
    """One decoded image: its windows (and whole-image input), or why it failed."""

    index: int
    windows: list[torch.Tensor] = field(default_factory=list)
    image_input: torch.Tensor | None = None
    error: str = ""


def _lookahead(workers: int, batch_size: int) -> int:
    """Images decoded ahead of the forward: a batch and each decoder's next image (at least 4,
    at most 64 + workers) [ours]."""
    return max(4, 2 * max(1, workers), min(batch_size, 64) + max(1, workers))


def _decoded_images(
    fs: FeatureSet,
    records: Sequence[ImageRecord],
    geos: list[ImageGeometry],
    blocks: Sequence[int],
    backbone: Backbone,
    workers: int,
    max_pixels: int = HUGE_IMAGE_PIXELS,
    lookahead: int = 4,
) -> Iterator[tuple[int, DecodedImage]]:
    """Yield ``(block, DecodedImage)`` for every image of ``blocks``, in block then image
    order, each as soon as it is decoded; ``workers`` background threads keep ``lookahead``
    images in flight. Images above ``max_pixels`` are decoded reduced (:func:`decode_for`).
    """

    wants_image = any(s.unit == "image" for s in backbone.tensor_specs())

    def load(i: int) -> DecodedImage:
        g = geos[i]
        if not g.n_windows:
            return DecodedImage(i, error=probe_failure(records[i].path))
        try:
            img, size = decode_for(records[i].path, g, max_pixels, wants_image)
        except ImageReadError as e:
            return DecodedImage(i, error=str(e))
        if size != g.original:
            return DecodedImage(
                i,
                error=f"image {records[i].path} is {size[0]}x{size[1]} but was "
                f"{g.original[0]}x{g.original[1]} when the store was created",
            )
        whole = backbone.preprocess_image(img, g) if wants_image else None
        return DecodedImage(i, backbone.preprocess(img, g), whole)

    order = [(b, i) for b in blocks for i in fs.block_images(b)]
    # The decoders keep the process's torch thread count: the resize and normalisation results
    # depend (in the last bits) on how their loops are split between threads.
    ex = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ovss-decode")
    futures: deque = deque()
    pos = 0

    def fill() -> None:
        nonlocal pos
        while pos < len(order) and len(futures) < lookahead:
            futures.append((order[pos][0], ex.submit(load, order[pos][1])))
            pos += 1

    try:
        fill()
        while futures:
            b, fut = futures.popleft()
            fill()
            yield b, fut.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def probe_failure(path: str) -> str:
    """Why an image without a size in the store (it failed when the store was created)
    cannot be read: the reason of probing it again, else that its header read failed then."""
    try:
        probe_image(path)
    except ImageReadError as e:
        return str(e)
    return f"cannot read image {path}: its header could not be read when the store was created"


def decode_for(
    path: str, geometry: ImageGeometry, max_pixels: int, wants_image: bool = False
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one image for a backbone: ``(array (h, w, 3) uint8, full size (H, W))``.

    At most ``max_pixels`` pixels: the whole image (``load_image_rgb``). Above: reduced to no
    less than what its preprocessing reads (the resized size, SAM's rounded size, and 448 px
    a side when whole-image tensors are made), ``load_image_reduced``.
    """
    h, w = geometry.original
    if h * w <= max_pixels:
        img = load_image_rgb(path)
        return img, (int(img.shape[0]), int(img.shape[1]))
    need_h, need_w = geometry.resized
    if geometry.rounded is not None:
        need_h, need_w = max(need_h, geometry.rounded[0]), max(need_w, geometry.rounded[1])
    if wants_image:
        need_h, need_w = max(need_h, 448), max(need_w, 448)
    return load_image_reduced(path, (need_h, need_w))


class _Block:
    """One block being filled: its chunk buffers, per-image status and errors."""

    def __init__(self, b: int, images: range, buffers: dict[str, np.ndarray]):
        self.b, self.images, self.buffers = b, images, buffers
        self.status = np.full(len(images), STATUS_OK, dtype=np.uint8)
        self.errors = [""] * len(images)
        self.received = 0

    def add(self, d: DecodedImage) -> None:
        if d.error:
            j = d.index - self.images.start
            self.status[j] = STATUS_FAILED
            self.errors[j] = d.error
        self.received += 1

    @property
    def complete(self) -> bool:
        return self.received == len(self.images)


class _BatchRunner:
    """Forward the windows of a block's images in batches and place the outputs in its buffers.

    Windows are batched in image order, ``batch_size`` of one shape per ``forward_dense`` (a
    window of another shape, or :meth:`finish` at the block's end, closes a batch); each image's
    ``image``-unit tensors come from a ``forward_image`` of that image alone, run when the image
    arrives. A forward's outputs are placed after the next forward has been launched (on CUDA
    their device->host copy overlaps it; on the CPU this is the same work in the same order of
    results). ``image_done`` is called once per image when its last window has been placed (and
    once per failed image, when it arrives), to drive progress.
    """

    def __init__(
        self,
        fs: FeatureSet,
        backbone: Backbone,
        specs: list[TensorSpec],
        geos: list[ImageGeometry],
        cfg: ExtractConfig,
        device: torch.device,
        image_done: Callable[[], None] | None = None,
    ):
        self.fs, self.backbone, self.geos, self.device = fs, backbone, geos, device
        self.batch_size, self.precision = cfg.batch_size, cfg.precision
        self.window_specs = [s for s in specs if s.unit != "image"]
        self.image_specs = [s for s in specs if s.unit == "image"]
        self.image_done = image_done
        # (image, window, token offset, x, the block's buffers)
        self.pending: list[tuple[int, int, int, torch.Tensor, dict[str, np.ndarray]]] = []
        self.unplaced: tuple | None = None  # (outputs on the host, wait for them, place)

    def add(self, d: DecodedImage, buffers: dict[str, np.ndarray]) -> None:
        """Queue the windows of one decoded image (forwarding full batches)."""
        if d.error:
            if self.image_done:
                self.image_done()
            return
        i = d.index
        if self.image_specs:
            x = d.image_input[None].to(self.device)
            self._launch(lambda: self.backbone.forward_image(x), self._image_placer(i, buffers))
        tok_off = 0
        for w, x in enumerate(d.windows):
            p = self.pending
            if p and (len(p) >= self.batch_size or p[0][3].shape != x.shape):
                self._flush()
            self.pending.append((i, w, tok_off, x, buffers))
            gh, gw = self.geos[i].windows[w].grid
            tok_off += gh * gw

    def finish(self) -> None:
        """Forward what is queued and place every output (the block is then complete)."""
        self._flush()
        self._place()

    def _flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        xs = [p[3] for p in batch]
        if self.device.type == "cuda":  # up from pinned memory, asynchronously
            x = torch.stack(xs, out=torch.empty((len(xs), *xs[0].shape), pin_memory=True))
            x = x.to(self.device, non_blocking=True)
        else:
            x = torch.stack(xs).to(self.device)
        grids = [self.geos[i].windows[w].grid for i, w, _, _, _ in batch]
        self._launch(lambda: self.backbone.forward_dense(x, grids), self._window_placer(batch))

    def _launch(self, forward: Callable[[], dict], place: Callable[[dict], None]) -> None:
        """Run ``forward``, start bringing its outputs to the host, place the previous ones."""
        with torch.inference_mode(), _autocast(self.device, self.precision):
            out = forward()
        if self.device.type == "cuda":
            # Pinned host copies, ready when the event is; the values are those of .cpu().
            out = {k: v.to("cpu", non_blocking=True) for k, v in out.items()}
            ready = torch.cuda.Event()
            ready.record()
            wait = ready.synchronize
        else:
            wait = _nothing
        self._place()
        self.unplaced = (out, wait, place)

    def _place(self) -> None:
        if self.unplaced is not None:
            out, wait, place = self.unplaced
            self.unplaced = None
            wait()
            place(out)

    def _image_placer(self, i: int, buffers: dict[str, np.ndarray]) -> Callable[[dict], None]:
        fs = self.fs

        def place(out: dict) -> None:
            for s in self.image_specs:
                buffers[s.name][fs.local_rows("image", i).start] = fs.encode(out[s.name])[0]

        return place

    def _window_placer(self, batch: list) -> Callable[[dict], None]:
        fs, geos = self.fs, self.geos

        def place(out: dict) -> None:
            for s in self.window_specs:
                arr = fs.encode(out[s.name])
                buf = batch[0][4][s.name]
                for k, (i, w, tok_off, _, _) in enumerate(batch):
                    if s.unit == "token":
                        gh, gw = geos[i].windows[w].grid
                        base = fs.local_rows("token", i).start + tok_off
                        buf[base : base + gh * gw] = arr[k][: gh * gw]
                    else:
                        buf[fs.local_rows("window", i).start + w] = arr[k]
            if self.image_done:
                for i, w, _, _, _ in batch:
                    if w == geos[i].n_windows - 1:
                        self.image_done()

        return place


def _nothing() -> None:
    return None


class _BlockWriter:
    """One background thread writing finished blocks, so compute continues meanwhile."""

    def __init__(self, fs: FeatureSet, depth: int = 2):
        self.fs = fs
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="ovss-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.fs.write_block(*item)
                except BaseException as e:  # surfaced in put()/close()
                    self.error = e

    def put(self, b, buffers, status, errors) -> None:
        self._raise()
        self.q.put((b, buffers, status, errors))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            if isinstance(e, OSError):
                raise OvssError(f"writing the store failed: {e}") from e
            raise e
