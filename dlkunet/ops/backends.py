"""Which backend runs an operator: the one place where dispatch is decided.

Backends (``docs/design.md``):

- ``torch``  the reference formulas (``dlkunet.ops.reference``); always available.
- ``triton`` Triton kernels (``dlkunet.kernels``); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (how CI tests them).
- ``cuda``   CUDA kernels in the compiled extension ``dlkunet._C``.
- ``cpu``    C++ kernels in the compiled extension ``dlkunet._C``.

Selection, strongest first: the ``use_backend`` context manager, ``set_backend``, the
``DLKUNET_BACKEND`` environment variable (read at import), and ``auto``.  ``auto`` picks the
first available backend of ``AUTO_PREFERENCE`` for the tensor's device, the operator and whether
gradients are needed, and falls back to ``torch`` with a single warning that says what is missing.

A backend named explicitly that cannot run on this machine at all is refused when it is named,
with the reason (``BackendUnavailableError``): by ``set_backend`` and ``use_backend`` after
loading (or, when the install has none, compiling: ``dlkunet.ops.jit_build``) the extension of a
compiled backend; by ``DLKUNET_BACKEND`` at import, where nothing is compiled, for every reason
known without compiling (a failed compile then surfaces at the first use).  A backend that runs
on some device type only (``cuda`` on CUDA tensors, ``triton`` on CPU tensors only under
``TRITON_INTERPRET=1``) is accepted, and refused per tensor by ``resolve``.

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
# "training": autograd will call the backward); the first available one wins under "auto".  The
# measurements behind each entry: docs/design.md, "Why auto chooses what it chooses".
AUTO_PREFERENCE: Dict[Tuple[str, str, str], Tuple[str, ...]] = {
    # triton only where this GPU model's measured table has it faster at the shape (``_measured_faster``).
    ("cuda", "dwconv_bn_act", "inference"): ("triton", "torch"),
    ("cuda", "dwconv_bn_act", "training"): ("torch",),
    ("cuda", "lka_gate", "inference"): ("triton", "torch"),
    ("cuda", "lka_gate", "training"): ("torch",),
    ("cpu", "dwconv_bn_act", "inference"): ("cpu",),
    ("cpu", "dwconv_bn_act", "training"): ("cpu",),
    ("cpu", "lka_gate", "inference"): ("cpu",),
    ("cpu", "lka_gate", "training"): ("cpu",),
    ("cuda", "upsample_concat", "inference"): ("torch",),
    ("cuda", "upsample_concat", "training"): ("torch",),
    ("cpu", "upsample_concat", "inference"): ("cpu",),
    ("cpu", "upsample_concat", "training"): ("cpu",),
    ("cuda", "max_pool2x2", "inference"): ("torch",),
    ("cuda", "max_pool2x2", "training"): ("torch",),
    ("cpu", "max_pool2x2", "inference"): ("cpu",),
    ("cpu", "max_pool2x2", "training"): ("torch",),
}
OPERATORS = ("dwconv_bn_act", "lka_gate", "upsample_concat", "max_pool2x2")
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


_probe_cache: Dict[str, Tuple[Optional[ModuleType], str]] = {}
_ran: Dict[Tuple[str, str], str] = {}  # (device type, operator) -> the backend resolve last chose


def _named(name: str, source: str, compile_now: bool = True) -> str:
    """``name`` checked, and refused when it cannot run here at all; ``source`` names who asked."""
    name = _check_name(name)
    ok, why = availability(name, compile_now=compile_now)
    if not ok:
        raise BackendUnavailableError(f"dlkunet backend {name!r} ({source}) cannot run here: {why}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide backend: 'auto', 'torch', 'triton', 'cuda' or 'cpu'.

    A backend that cannot run here raises BackendUnavailableError with the reason."""
    _state["setting"] = _named(name, "set_backend")


def get_backend() -> str:
    """The current setting (possibly 'auto'; see ``resolve`` for what it means for a device)."""
    return _state["setting"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block of code with another backend setting."""
    previous = _state["setting"]
    _state["setting"] = _named(name, "use_backend")
    try:
        yield
    finally:
        _state["setting"] = previous


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe(name: str, compile_now: bool = True) -> Tuple[Optional[ModuleType], str]:
    """Import a backend's module once; return (module, '') or (None, why it is missing).

    For a compiled backend this loads the extension, compiling it first when the install has none
    (unless not ``compile_now``: then a build still to come counts as available, and nothing is
    remembered)."""
    if name in _probe_cache:
        return _probe_cache[name]
    module, why = None, ""
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        why = f"{_MODULES[name]} could not be imported ({exc})"
    if module is not None and name in ("cpu", "cuda"):
        why = module.unavailable_reason(name, compile_now)
        module = None if why else module
        if not compile_now:
            return module, why
    _probe_cache[name] = (module, why)
    return module, why


def availability(name: str, device_type: Optional[str] = None, compile_now: bool = True) -> Tuple[bool, str]:
    """Whether ``name`` can run (on ``device_type`` if given) and, if not, why.

    For ``cpu`` and ``cuda`` this is a use: an extension the install lacks is compiled first
    (``dlkunet.ops.jit_build``), unless ``compile_now`` is False, which answers whether it could run
    once compiled."""
    name = _check_name(name)
    if name == "auto":
        return True, ""
    _, why = _probe(name, compile_now)
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
def resolve(device_type: str, op: str, mode: str, shape: Optional[tuple] = None) -> str:
    """The backend that runs ``op`` in ``mode`` ('inference' or 'training') for tensors on
    ``device_type`` under the current setting; only 'auto' looks at op, mode and ``shape``, the
    call's (dtype, channels_last, Cin, Cout, H, W, kernel sizes) for the triton backend's measured
    table."""
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return "torch"  # an export records the reference formulas (dlkunet.export)
    setting = _state["setting"]
    if setting != "auto":
        ok, why = availability(setting, device_type)
        if not ok:
            raise BackendUnavailableError(f"dlkunet backend {setting!r} is not available: {why}")
        _ran[(device_type, op)] = setting
        return setting
    name, missing = auto_choice(device_type, op, mode, shape=shape)
    _ran[(device_type, op)] = name
    if missing and device_type not in _state["warned"]:
        _state["warned"].add(device_type)
        warnings.warn(
            "dlkunet: no fused backend for " + device_type + " tensors, using the pure-PyTorch "
            "reference (" + "; ".join(missing) + "). Run `dlkunet info` for details.",
            RuntimeWarning, stacklevel=3)
    return name


def auto_choice(device_type: str, op: str, mode: str, compile_now: bool = True,
                shape: Optional[tuple] = None) -> Tuple[str, list]:
    """What ``auto`` runs ``op`` in ``mode`` on, and the preferred backends passed over because they
    are missing, with why (a backend measured slower at ``shape`` is passed over silently).

    Without ``compile_now`` nothing is compiled: a compiled backend still to be built counts."""
    missing = []
    for name in AUTO_PREFERENCE.get((device_type, op, mode), ()):
        ok, why = availability(name, device_type, compile_now)
        if ok and name == "triton" and device_type == "cuda" and not _measured_faster(op, shape):
            continue
        if ok:
            return name, missing
        missing.append(f"{name}: {why}")
    return "torch", missing


def _measured_faster(op: str, shape: Optional[tuple]) -> bool:
    """Whether the triton backend's measured table (``dlkunet.kernels.plans``) has it faster than
    eager PyTorch for ``op`` at ``shape`` on the current GPU; False for shapes, dtypes or GPU models
    it never measured, since the reference (cuDNN) is what it must beat."""
    if shape is None:
        return False
    from dlkunet.kernels import plans
    dtype, cl, cin, cout, h, w, kernels = shape
    return plans.faster_than_eager(op, cin, cout, h, w, kernels, dtype, cl, torch.device("cuda"))


# After set_backend, so a refusal can name the variable; nothing is compiled at import.
_state = {"setting": "auto", "warned": set()}
_state["setting"] = _named(os.environ.get("DLKUNET_BACKEND", "auto") or "auto", "DLKUNET_BACKEND", compile_now=False)


def ran_on() -> str:
    """Which backend the operators ran on in this process so far, for a report line, e.g.
    'cpu (dlkunet._C compiled at first use) for dwconv_bn_act, lka_gate on cpu tensors'."""
    parts = []
    for (device, name) in sorted({(d, n) for (d, _), n in _ran.items()}):
        ops = ", ".join(sorted(op for (d, op), n in _ran.items() if (d, n) == (device, name)))
        where = ""
        if name in ("cpu", "cuda"):
            from . import extension
            where = {"install": " (dlkunet._C from the install)", "cache": " (dlkunet._C from the first-use cache)",
                     "compiled": " (dlkunet._C compiled at first use)"}.get(extension.origin()[0], "")
        parts.append(f"{name}{where} for {ops} on {device} tensors")
    return "; ".join(parts) or "no fused operator ran"


def implementation(name: str) -> ModuleType:
    """The module holding ``name``'s four kernel entry points."""
    module, why = _probe(name)
    if module is None:
        raise BackendUnavailableError(f"dlkunet backend {name!r} is not available: {why}")
    return module
