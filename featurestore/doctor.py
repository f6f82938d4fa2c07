"""``ovss doctor``: what this environment can do (versions, devices, FAISS, weights)."""

from __future__ import annotations

import importlib
import os
import platform


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # report, never fail
        return f"missing ({type(e).__name__})"
    return str(getattr(m, "__version__", "installed"))


def doctor_report(store_path: str | None = None) -> dict:
    """A flat dict of check -> result, JSON-safe."""
    import torch

    from featurestore import __version__

    rep: dict = {
        "ovss": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "cuda": (
            f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"
            if torch.cuda.is_available()
            else "not available"
        ),
        "mps": "available"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        else "not available",
    }
    for mod in ("timm", "zarr", "open_clip", "segment_anything", "transformers", "h5py"):
        rep[mod] = _version(mod)
    try:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        rep["faiss"] = f"{faiss.__version__} ({gpus} GPU(s))"
    except Exception:
        rep["faiss"] = "missing (pip install ovss[faiss])"
    wdir = os.environ.get("OVSS_WEIGHTS")
    if wdir:
        files = sorted(os.listdir(wdir)) if os.path.isdir(wdir) else []
        rep["OVSS_WEIGHTS"] = f"{wdir}: {len(files)} file(s) {', '.join(files[:8])}"
    else:
        rep["OVSS_WEIGHTS"] = "not set (checkpoints: --weights PATH or $OVSS_WEIGHTS/<file>)"
    rep["DINOv3 weights"] = dinov3_weights_found()
    if store_path:
        from featurestore.errors import OvssError
        from featurestore.store import FeatureStore

        try:
            st = FeatureStore.open(store_path)
            rep["store"] = f"{store_path}: {st.n_images} images, sets {st.feature_sets()}"
        except OvssError as e:
            rep["store"] = f"unreadable: {e}"
    return rep


def dinov3_weights_found() -> str:
    """The DINOv3 checkpoints found without the network, ``name: path`` joined by ``, `` (in
    ``$OVSS_WEIGHTS``: Meta's ``dinov3_*_pretrain_*.pth`` or timm's ``timm/<model>.<tag>/``
    files; the huggingface_hub and torch.hub caches), or a line saying none was found."""
    from featurestore.backbones.dinov3 import VARIANTS, weights_spec
    from featurestore.weights import find_local_weights

    found = []
    for v in VARIANTS:
        path = find_local_weights(weights_spec(v))
        if path is not None:
            found.append(f"{v.name}: {path}")
    if found:
        return ", ".join(found)
    return (
        "none found (Meta's dinov3_<arch>_pretrain_<lvd1689m|sat493m>-<hash>.pth or timm's "
        "timm/vit_*_dinov3*.<tag>/model.safetensors in $OVSS_WEIGHTS, or the Hugging Face / "
        "torch.hub caches)"
    )
