"""Which backend runs an operator: the one place where dispatch is decided.

Backends (see ``../shared/spec/kernels.md``):

- ``torch``  the reference formulas (``dlkunet.ops.reference``); always available.
- ``triton`` Triton kernels (``dlkunet.kernels``); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (how CI tests them).
- ``cuda``   CUDA kernels in the compiled extension ``dlkunet._C``.
- ``cpu``    C++ kernels in the compiled extension ``dlkunet._C``.

Selection, strongest first: the ``use_backend`` context manager, ``set_backend``, the
``DLKUNET_BACKEND`` environment variable (read at import), and ``auto``.  ``auto`` picks the
first available backend of ``AUTO_PREFERENCE`` for the tensor's device, the operator and whether
gradients are needed, and falls back to ``torch`` with a single warning that says what is missing.
A backend named explicitly that cannot run is an error that says why.

Every backend module provides the four functions documented in ``dlkunet.ops.reference``:
``dwconv_bn_act_forward``, ``dwconv_bn_act_backward``, ``lka_gate_forward``, ``lka_gate_backward``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from types import ModuleType
from typing import Dict, Iterator, Optional, Tuple

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
CHOICES = ("auto",) + BACKENDS

# Decided by measurement, per device, operator and mode ("inference": no gradient is needed;
# "training": autograd will call the backward); the first available one wins under "auto".
# - GPU: on an H200 (benchmarks/results/h200-2026-11-26.md) eager PyTorch beat both fused GPU
#   backends at the model's shapes (triton 0.08-0.78x, cuda 0.17-1.04x of eager): the reference.
# - CPU: on a 2-core EPYC (benchmarks/results/cpu-2026-11-26-a702306-{1,2,3}.md, against eager in
#   the same layout) the cpu backend runs lka_gate 1.1-4.0x (median 2.2-2.6x), but dwconv_bn_act
#   0.4-2.2x (median 0.65-0.96x: the op is GEMM-bound, the depthwise loop reaches a third of
#   oneDNN's rate, and the backward recomputes).  Whole models with dwconv_bn_act on the reference
#   and lka_gate on the cpu backend beat all-reference in every interleaved comparison and
#   all-cpu in 16 of 18, NCHW and channels_last (DLKUNet-S/M/L: inference 1.06-1.55x, training
#   steps 1.3-2.0x eager).
AUTO_PREFERENCE: Dict[Tuple[str, str, str], Tuple[str, ...]] = {
    ("cuda", "dwconv_bn_act", "inference"): ("torch",),
    ("cuda", "dwconv_bn_act", "training"): ("torch",),
    ("cuda", "lka_gate", "inference"): ("torch",),
    ("cuda", "lka_gate", "training"): ("torch",),
    ("cpu", "dwconv_bn_act", "inference"): ("torch",),
    ("cpu", "dwconv_bn_act", "training"): ("torch",),
    ("cpu", "lka_gate", "inference"): ("cpu",),
    ("cpu", "lka_gate", "training"): ("cpu",),
}
OPERATORS = ("dwconv_bn_act", "lka_gate")
MODES = ("inference", "training")

# Which device types each backend's kernels accept.
_DEVICES = {"torch": None, "triton": ("cuda",), "cuda": ("cuda",), "cpu": ("cpu",)}

_MODULES = {
    "torch": "dlkunet.ops.reference",
    "triton": "dlkunet.kernels",
    "cuda": "dlkunet.ops.extension",
    "cpu": "dlkunet.ops.extension",
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def _check_name(name: str) -> str:
    name = str(name).strip().lower()
    if name not in CHOICES:
        raise ValueError(f"unknown dlkunet backend {name!r}; choose one of {', '.join(CHOICES)}")
    return name


_state = {"setting": _check_name(os.environ.get("DLKUNET_BACKEND", "auto") or "auto"), "warned": set()}
_probe_cache: Dict[str, Tuple[Optional[ModuleType], str]] = {}


def set_backend(name: str) -> None:
    """Set the process-wide backend: 'auto', 'torch', 'triton', 'cuda' or 'cpu'."""
    _state["setting"] = _check_name(name)


def get_backend() -> str:
    """The current setting (possibly 'auto'; see ``resolve`` for what it means for a device)."""
    return _state["setting"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block of code with another backend setting."""
    previous = _state["setting"]
    _state["setting"] = _check_name(name)
    try:
        yield
    finally:
        _state["setting"] = previous


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe(name: str) -> Tuple[Optional[ModuleType], str]:
    """Import a backend's module once; return (module, '') or (None, why it is missing)."""
    if name in _probe_cache:
        return _probe_cache[name]
    module, why = None, ""
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        why = f"{_MODULES[name]} could not be imported ({exc})"
    if module is not None and name in ("cpu", "cuda"):
        why = module.unavailable_reason(name)
        module = None if why else module
    _probe_cache[name] = (module, why)
    return module, why


def availability(name: str, device_type: Optional[str] = None) -> Tuple[bool, str]:
    """Whether ``name`` can run (on ``device_type`` if given) and, if not, why."""
    name = _check_name(name)
    if name == "auto":
        return True, ""
    _, why = _probe(name)
    if why:
        return False, why
    devices = _DEVICES[name]
    if name == "triton" and triton_interpret():
        devices = ("cuda", "cpu")
    if device_type is not None and devices is not None and device_type not in devices:
        if name == "triton":
            return False, "the triton backend runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1)"
        return False, f"the {name} backend runs on {'/'.join(devices)} tensors, not {device_type} tensors"
    needs_gpu = device_type == "cuda" if device_type is not None else (
        name == "cuda" or (name == "triton" and not triton_interpret()))
    if needs_gpu and not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to PyTorch"
    return True, ""


@torch.compiler.assume_constant_result
def resolve(device_type: str, op: str, mode: str) -> str:
    """The backend that runs ``op`` in ``mode`` ('inference' or 'training') for tensors on
    ``device_type`` under the current setting; only 'auto' looks at op and mode."""
    setting = _state["setting"]
    if setting != "auto":
        ok, why = availability(setting, device_type)
        if not ok:
            raise BackendUnavailableError(f"dlkunet backend {setting!r} is not available: {why}")
        return setting
    missing = []
    for name in AUTO_PREFERENCE.get((device_type, op, mode), ()):
        ok, why = availability(name, device_type)
        if ok:
            return name
        missing.append(f"{name}: {why}")
    if missing and device_type not in _state["warned"]:
        _state["warned"].add(device_type)
        warnings.warn(
            "dlkunet: no fused backend for " + device_type + " tensors, using the pure-PyTorch "
            "reference (" + "; ".join(missing) + "). Run `dlkunet info` for details.",
            RuntimeWarning, stacklevel=3)
    return "torch"


def implementation(name: str) -> ModuleType:
    """The module holding ``name``'s four kernel entry points."""
    module, why = _probe(name)
    if module is None:
        raise BackendUnavailableError(f"dlkunet backend {name!r} is not available: {why}")
    return module
