"""The compiled extension ``dlkunet._C`` as a backend module (the ``cpu`` and ``cuda`` backends).

``_C`` exports, per device ``cpu`` / ``cuda``, four functions with the signatures documented in
``dlkunet.ops.reference`` (``cpu_dwconv_bn_act_forward``, ``cuda_lka_gate_backward``, ...).  This
module picks the one for the tensor's device.  Whether the extension exists, and why not, is
decided once, here; ``dlkunet info`` prints it.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

_OPS = ("dwconv_bn_act_forward", "dwconv_bn_act_backward", "lka_gate_forward", "lka_gate_backward")
_loaded = {}


def _build_record():
    try:
        from dlkunet import _build  # written by setup.py at build time
    except ImportError:
        return None
    return _build


def load_extension():
    """Return ``(module, reason)``: the imported ``dlkunet._C``, or None and why it is missing."""
    if "result" in _loaded:
        return _loaded["result"]
    module, reason = None, ""
    record = _build_record()
    if record is not None and not record.EXTENSION:
        reason = f"the compiled extension was not built: {record.REASON}"
    elif record is not None and record.TORCH_VERSION != torch.__version__:
        reason = (f"the compiled extension was built against torch {record.TORCH_VERSION} but torch "
                  f"{torch.__version__} is installed; reinstall dlkunet (pip install --no-build-isolation .)")
    else:
        try:
            module = importlib.import_module("dlkunet._C")
        except ImportError as exc:
            reason = f"dlkunet._C could not be loaded ({exc})"
    _loaded["result"] = (module, reason)
    return module, reason


def unavailable_reason(device_type: str) -> str:
    """Empty when the ``device_type`` backend ('cpu' or 'cuda') can run, else why it cannot."""
    module, reason = load_extension()
    if module is None:
        return reason
    if not all(hasattr(module, f"{device_type}_{op}") for op in _OPS):
        return f"the compiled extension has no {device_type} kernels (built without them)"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
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


def release_cpu_scratch() -> int:
    """Free the scratch buffers the ``cpu`` kernels keep for the calling thread; returns the bytes freed.

    The kernels keep their large intermediates between calls (a fresh multi-MB buffer costs a page
    fault per 4 KiB, which made small ops up to 2x slower), so a thread that ran them holds up to a
    few activations' worth of memory until it ends or calls this.
    """
    module, _ = load_extension()
    if module is None or not hasattr(module, "cpu_release_scratch"):
        return 0
    held = module.cpu_scratch_bytes()
    module.cpu_release_scratch()
    return held
