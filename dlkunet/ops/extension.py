"""The compiled extension ``dlkunet._C`` as a backend module (the ``cpu`` and ``cuda`` backends).

``_C`` exports, per device ``cpu`` / ``cuda``, four functions with the signatures documented in
``dlkunet.ops.reference`` (``cpu_dwconv_bn_act_forward``, ``cuda_lka_gate_backward``, ...).  This
module picks the one for the tensor's device.

Where the extension comes from is decided once per process, at the first use of a compiled
backend (never at import): the one built at install time (``dlkunet._C``), else the first-use
build in the cache, else compiled now (``dlkunet.ops.jit_build``), else none, with the reason.
``dlkunet info`` prints it (``origin``) without compiling anything.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

from . import jit_build

_OPS = ("dwconv_bn_act_forward", "dwconv_bn_act_backward", "lka_gate_forward", "lka_gate_backward")
_DEVICE_OPS = {"cpu": ("upsample_concat_forward", "max_pool2x2_forward")}  # kernels one device type has
_loaded = {}  # "installed": (module, reason); "result": (module, reason, origin), once decided


def _build_record():
    try:
        from dlkunet import _build  # written by setup.py at build time
    except ImportError:
        return None
    return _build


def installed_extension():
    """``(module, reason)``: ``dlkunet._C`` as installed, or None and why it is missing or unusable."""
    if "installed" in _loaded:
        return _loaded["installed"]
    module, reason = None, ""
    record = _build_record()
    if record is not None and not record.EXTENSION:
        reason = f"not built at install time: {record.REASON}"
    elif record is not None and record.TORCH_VERSION != torch.__version__:
        reason = (f"the installed dlkunet._C was built against torch {record.TORCH_VERSION}, "
                  f"but torch {torch.__version__} is running")
    else:
        try:
            module = importlib.import_module("dlkunet._C")
        except ImportError as exc:
            reason = f"dlkunet._C could not be loaded ({exc})"
    _loaded["installed"] = (module, reason)
    return module, reason


def _decide(compile_now: bool) -> Tuple[Optional[object], str, str]:
    if "result" in _loaded:
        return _loaded["result"]
    module, reason = installed_extension()
    result = (module, "", "install") if module is not None else jit_build.obtain(reason, compile_now)
    if result[2] != "pending":
        _loaded["result"] = result
    return result


def load_extension(compile_now: bool = True):
    """``(module, reason)``: the extension, or None and why it is missing.

    With ``compile_now`` (a use of a compiled backend) a missing extension is compiled into the
    cache first, unless DLKUNET_JIT=0; without it nothing is compiled, and a build that a first use
    would make gives None and says so."""
    module, reason, _ = _decide(compile_now)
    return module, reason


def origin() -> Tuple[str, str]:
    """Where the extension comes from, without compiling: ``(origin, detail)``, origin one of
    'install', 'cache', 'compiled' (by this process, into the cache), 'pending' (a first use will
    compile it) or 'missing' (detail: why)."""
    module, reason, where = _decide(compile_now=False)
    if module is None:
        return where, reason
    return where, str(getattr(module, "__file__", "") or "")


def unavailable_reason(device_type: str, compile_now: bool = True) -> str:
    """Empty when the ``device_type`` backend ('cpu' or 'cuda') can run (without ``compile_now``:
    could run once compiled at first use), else why it cannot."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"  # first: nothing is compiled only to find this
    module, reason, where = _decide(compile_now)
    if module is None and where != "pending":
        return reason
    if module is None:
        plan = jit_build.make_plan()
        if device_type == "cuda" and not plan.with_cuda:
            return f"the first-use build would have no CUDA kernels ({plan.why_no_cuda})"
    elif not all(hasattr(module, f"{device_type}_{op}") for op in _OPS + _DEVICE_OPS.get(device_type, ())):
        return f"the compiled extension has no {device_type} kernels (built without them)"
    return ""


def _kernel(op: str, x: torch.Tensor):
    module, reason = load_extension()
    if module is None:
        raise RuntimeError(reason)
    return getattr(module, f"{x.device.type}_{op}")


def dwconv_bn_act_forward(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var,
                          training: bool, eps: float, relu: bool):
    return tuple(_kernel("dwconv_bn_act_forward", x)(
        x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var, training, eps, relu))


def dwconv_bn_act_backward(grad_y, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var,
                           training: bool, eps: float, relu: bool):
    return tuple(_kernel("dwconv_bn_act_backward", x)(
        grad_y, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var, training, eps, relu))


def lka_gate_forward(x, w0, b0, ws, bs, w1, b1, dilation: int):
    return _kernel("lka_gate_forward", x)(x, w0, b0, ws, bs, w1, b1, dilation)


def lka_gate_backward(grad_out, x, w0, b0, ws, bs, w1, b1, dilation: int):
    return tuple(_kernel("lka_gate_backward", x)(grad_out, x, w0, b0, ws, bs, w1, b1, dilation))


def upsample_concat_forward(deep, skip, weight, bias):
    return _kernel("upsample_concat_forward", deep)(deep, skip, weight, bias)


def max_pool2x2_forward(x):
    return _kernel("max_pool2x2_forward", x)(x)


def release_cpu_scratch() -> int:
    """Free the memory the ``cpu`` kernels keep between calls; returns the bytes freed.

    The kernels keep their large intermediates per thread, and freed output blocks of a megabyte or
    more in a process-wide cache (at most ``DLKUNET_CPU_CACHE_MB``, default a quarter of physical
    memory: a batch-8 forward at 224 x 224 frees about 1.1 GiB that the next one reuses), because a fresh
    multi-MB buffer costs a page fault per 4 KiB: that made small ops up to 2x slower and a whole
    DLKUNet-S forward about a fifth slower.  This frees the calling thread's intermediates and the
    cached output blocks.
    """
    module, _ = load_extension(compile_now=False)
    if module is None or not hasattr(module, "cpu_release_scratch"):
        return 0
    return module.cpu_release_scratch()
