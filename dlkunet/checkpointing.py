"""Checkpoints: atomic writes, ``weights_only`` loading, RNG states, optional safetensors.

A checkpoint is a dict of tensors, plain containers, numbers and strings only, so that
``torch.load(path, weights_only=True)`` reads it without unpickling arbitrary objects.  It
carries the model's ``config`` so evaluation and prediction rebuild the model from the file alone.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

FORMAT = "dlkunet-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit what it is used for."""


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic on POSIX and Windows (``os.replace``), so an interrupted save leaves the
    previous file intact; the temporary file is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:  # data on disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_save(obj: Any, path) -> Path:
    """``torch.save(obj, path)`` through ``atomic_write``."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


# --------------------------------------------------------------------------------------- RNG states

def get_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and numbers."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: Dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``get_rng_state`` captured (CUDA states only where the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------- load / build

def make_checkpoint(model: nn.Module, data: Optional[Mapping[str, Any]] = None, variant: Optional[str] = None,
                    **extra) -> Dict[str, Any]:
    """The checkpoint dict of a model (``extra``: optimizer, epoch, ... as training adds them).

    ``data``: what evaluation and prediction need to know about the training data:
    ``num_classes``, ``class_names``, ``image_size``, ``fmt``, ``intensity``.
    """
    from . import __version__

    core = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    return {"format": FORMAT, "version": FORMAT_VERSION, "dlkunet_version": __version__,
            "model_config": dict(core.config), "variant": variant, "model": core.state_dict(),
            "data": dict(data or {}), **extra}


def _foreign_format(path: Path) -> Optional[str]:
    """What a file that is not a PyTorch checkpoint looks like, from its first bytes; None if it may be one."""
    with open(path, "rb") as handle:
        head = handle.read(352)
    if head[:2] == b"\x1f\x8b":
        return "a gzip-compressed file (a .nii.gz volume?)"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "an HDF5 file (a .h5 volume?)"
    if head[:6] == b"\x93NUMPY":
        return "a NumPy .npy array"
    nifti_magic = head[344:347] in (b"n+1", b"ni1", b"n+2")
    if len(head) >= 348 and int.from_bytes(head[:4], "little") in (348, 540) and nifti_magic:
        return "a NIfTI image"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None  # a damaged archive: torch.load names the damage below
        if not any(n.endswith("data.pkl") for n in names):
            return "a zip archive without PyTorch data (an .npz array file?)"
    return None


def torch_load_weights(path, map_location="cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with our own messages instead of PyTorch's.

    A file that asks to unpickle Python objects is refused: dlkunet never unpickles objects from
    a checkpoint (unpickling can run any code), so PyTorch's advice to retry with
    ``weights_only=False`` is never passed on.
    """
    path = Path(path)
    try:
        foreign = _foreign_format(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if foreign:
        raise CheckpointError(f"{path} is not a dlkunet {what}: it is {foreign}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if refused:
            raise CheckpointError(
                f"{path}: refused: the file asks to unpickle Python objects ({refused.group(1)}); dlkunet "
                f"never unpickles objects from a {what} (that can run arbitrary code), so it cannot be used. "
                f"A dlkunet {what} holds only tensors, numbers and strings.") from None
        reason = "not a PyTorch file"
    except Exception as exc:  # truncated or damaged archives, other formats
        reason = f"not a readable PyTorch file: truncated, damaged or another format ({type(exc).__name__})"
    raise CheckpointError(f"{path} is not a dlkunet {what} ({reason})") from None


def load_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Read a dlkunet checkpoint with ``weights_only=True``; clear errors for anything else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path} "
                              f"(training writes {path / 'best.pt'} and {path / 'last.pt'})")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    ckpt = torch_load_weights(path, map_location)
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dlkunet checkpoint (no '{FORMAT}' marker); "
                              "checkpoints of the authors' code load with "
                              "dlkunet.models.load_reference_checkpoint")
    for key in ("model", "model_config"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'")
    return dict(ckpt)


def model_from_checkpoint(ckpt: Mapping[str, Any], device="cpu") -> nn.Module:
    """Rebuild the model from the stored config and load its weights."""
    from .models import DLKUNet

    config = dict(ckpt["model_config"])
    if "lka_kernels" in config:
        config["lka_kernels"] = tuple(config["lka_kernels"])
    try:
        model = DLKUNet(**config)
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint weights do not fit its model config {config}: {exc}") from None
    return model.to(device).eval()


def load_model(path, device="cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model in eval mode, checkpoint dict)`` from a ``.pt`` or ``.safetensors`` file."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, device), ckpt


# --------------------------------------------------------------------------------------- safetensors

def _meta_of(ckpt: Mapping[str, Any]) -> Dict[str, str]:
    keys = ("model_config", "data", "epoch", "variant", "dlkunet_version")
    return {"dlkunet": json.dumps({k: ckpt.get(k) for k in keys})}


def save_safetensors(ckpt: Mapping[str, Any], path) -> Optional[Path]:
    """Model weights (and the config, as metadata) as ``.safetensors``; None if not installed."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        return None
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt["model"].items()}
    meta = _meta_of(ckpt)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_safetensors(path) -> Dict[str, Any]:
    """A checkpoint-like dict (model weights and config) from a ``.safetensors`` file."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f"reading {path} needs the safetensors package "
                              "(pip install safetensors, or dlkunet[safetensors])") from None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from None
    if "dlkunet" not in meta:
        raise CheckpointError(f"{path} has no dlkunet metadata (model config); cannot rebuild the model")
    info = json.loads(meta["dlkunet"])
    return {"format": FORMAT, "model": tensors, **info}
