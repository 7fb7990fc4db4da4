"""The fused operators of DLKUNet, dispatched to the selected backend.

``dwconv_bn_act``  depthwise conv -> pointwise conv -> BatchNorm -> ReLU
``lka_gate``       large-kernel attention with the Hadamard gate
``upsample_concat`` the decoder's 2x2 transposed convolution joined to the skip connection
``max_pool2x2``    the encoder's 2x2 max pooling

The formulas are in ``dlkunet.ops.reference``; backends in ``dlkunet.ops.backends``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import layout, library, reference
from .backends import (BACKENDS, BackendUnavailableError, availability, get_backend, resolve,
                       set_backend, use_backend)
from .extension import release_cpu_scratch
from . import sync_bn
from .validation import (check_backend, check_batch_statistics, check_depthwise, check_dilation, check_eps,
                         check_input, check_pointwise, check_poolable, check_skip, check_tensor,
                         check_transposed)

__all__ = ["dwconv_bn_act", "lka_gate", "upsample_concat", "max_pool2x2", "BACKENDS", "BackendUnavailableError",
           "availability", "get_backend", "set_backend", "use_backend", "resolve", "reference", "release_cpu_scratch"]


def _autocast(device_type: str, *tensors: Tensor):
    """Cast to the autocast dtype, as autocast would cast a convolution's inputs."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)
    return tensors


def _mode(*tensors: Tensor) -> str:
    """'training' when autograd will need this op's backward, else 'inference'."""
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)
    return "training" if needs_grad else "inference"


def _shape(x: Tensor, fmt: torch.memory_format, cout: int, kernels: tuple):
    """What auto's choice on CUDA looks up in the triton backend's measured table (x is in layout
    ``fmt``, the call's output layout); None on CPU."""
    if x.device.type != "cuda":
        return None
    n, cin, h, w = x.shape
    return (x.dtype, fmt == torch.channels_last, cin, cout, h, w, kernels)


def dwconv_bn_act(
    x: Tensor, w_dw: Tensor, b_dw: Tensor, w_pw: Tensor, b_pw: Tensor,
    gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
    *, training: bool, momentum: float = 0.1, eps: float = 1e-5, relu: bool = True,
) -> Tensor:
    """``relu(batch_norm(pointwise(depthwise(x))))`` in one operator.

    Shapes: x (N, Cin, H, W); w_dw (Cin, 1, k, k), k odd; b_dw (Cin,); w_pw (Cout, Cin, 1, 1);
    b_pw, gamma, beta, running_mean, running_var (Cout,).  With ``training=True`` the batch
    statistics normalise and the running statistics are updated in place with ``momentum``
    exactly as ``nn.BatchNorm2d`` does; otherwise the running statistics normalise.  The output is
    channels_last when x or a weight is (PyTorch's convolution rule,
    ``dlkunet.ops.layout``), else NCHW.
    """
    op = "dwconv_bn_act"
    check_input(op, x)
    x, w_dw, b_dw, w_pw, b_pw = _autocast(x.device.type, x, w_dw, b_dw, w_pw, b_pw)
    cin = x.shape[1]
    k = check_depthwise(op, "w_dw", w_dw, cin, x)
    check_tensor(op, "b_dw", b_dw, (cin,), x)
    cout = check_pointwise(op, "w_pw", w_pw, cin, x)
    check_tensor(op, "b_pw", b_pw, (cout,), x)
    bn_dtypes = (x.dtype, torch.float32)
    for name, t in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)):
        check_tensor(op, name, t, (cout,), x, bn_dtypes)
    check_eps(op, eps)
    if training:
        check_batch_statistics(op, x)

    fmt = layout.conv_output_format(x, w_dw, w_pw)
    x = layout.in_format(x, fmt)
    if training and sync_bn.active():  # DDP with --sync-bn: the whole process group's statistics
        return sync_bn.dwconv_bn_act(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var,
                                     momentum, eps, relu)
    # The measured table times the eval forward: a training forward (batch statistics) never asks it.
    shape = None if training else _shape(x, fmt, cout, (k,))
    backend = resolve(x.device.type, op, _mode(x, w_dw, b_dw, w_pw, b_pw, gamma, beta), shape)
    check_backend(op, backend, x, (("w_dw", k),), out_channels=cout)
    if backend == "torch":
        return reference.dwconv_bn_act(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var,
                                       training, momentum, eps, relu)
    y, mean, var = library.dwconv_bn_act_forward(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean,
                                                 running_var, training, eps, relu, backend)
    if training:
        with torch.no_grad():
            n = x.shape[0] * x.shape[2] * x.shape[3]
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(var.to(running_var.dtype), alpha=momentum * n / (n - 1))
    return y


def lka_gate(x: Tensor, w0: Tensor, b0: Tensor, ws: Tensor, bs: Tensor, w1: Tensor, b1: Tensor,
             *, dilation: int = 3) -> Tensor:
    """``x * pointwise(dilated_depthwise(depthwise(x)))``: large-kernel attention with its gate.

    Shapes: x (N, C, H, W); w0 (C, 1, k0, k0); ws (C, 1, ks, ks) applied with ``dilation``;
    w1 (C, C, 1, 1); biases (C,).  Kernel sizes are odd; padding keeps H x W.  The output is
    channels_last when x or a weight is, else NCHW.
    """
    op = "lka_gate"
    check_input(op, x)
    x, w0, b0, ws, bs, w1, b1 = _autocast(x.device.type, x, w0, b0, ws, bs, w1, b1)
    c = x.shape[1]
    k0 = check_depthwise(op, "w0", w0, c, x)
    check_tensor(op, "b0", b0, (c,), x)
    ks = check_depthwise(op, "ws", ws, c, x)
    check_tensor(op, "bs", bs, (c,), x)
    check_tensor(op, "w1", w1, (c, c, 1, 1), x)
    check_tensor(op, "b1", b1, (c,), x)
    dilation = check_dilation(op, dilation)
    fmt = layout.conv_output_format(x, w0, ws, w1)
    x = layout.in_format(x, fmt)
    backend = resolve(x.device.type, op, _mode(x, w0, b0, ws, bs, w1, b1), _shape(x, fmt, c, (k0, ks)))
    check_backend(op, backend, x, (("w0", k0), ("ws", ks)), dilation=dilation)
    if backend == "torch":
        return reference.lka_gate(x, w0, b0, ws, bs, w1, b1, dilation)
    return library.lka_gate_forward(x, w0, b0, ws, bs, w1, b1, dilation, backend)


def upsample_concat(deep: Tensor, skip: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``cat([skip, fit(conv_transpose2d(deep, weight, bias, stride=2))], dim=1)``: the decoder's join.

    Shapes: deep (N, Cin, h, w); skip (N, Cs, H, W); weight (Cin, Cout, 2, 2) and bias (Cout,), as
    ``nn.ConvTranspose2d(Cin, Cout, kernel_size=2, stride=2)`` holds them.  ``fit`` zero-pads the
    (2h, 2w) upsampled map to (H, W) (crops it where it is larger), the extra row or column below
    and right.  The ``cpu`` backend writes the transposed convolution straight into the
    concatenated buffer (float32 and float64, channels_last skip and deep, no crop); everything
    else, and the backward, runs the reference (``dlkunet.ops.reference.upsample_concat``).
    """
    op = "upsample_concat"
    check_input(op, deep)
    check_skip(op, skip, deep)
    deep, skip, weight, bias = _autocast(deep.device.type, deep, skip, weight, bias)
    cout = check_transposed(op, "weight", weight, deep.shape[1], deep)
    check_tensor(op, "bias", bias, (cout,), deep)
    backend = resolve(deep.device.type, op, _mode(deep, skip, weight, bias))
    if backend == "cpu" and library.upsample_concat_runs_on_cpu(deep, skip, weight):
        return library.upsample_concat_forward(deep, skip, weight, bias, backend)
    return reference.upsample_concat(deep, skip, weight, bias)


def max_pool2x2(x: Tensor) -> Tensor:
    """``max_pool2d(x, 2)``: the encoder's pooling, window and stride 2, floor mode (``nn.MaxPool2d(2)``).

    x (N, C, H, W) with H and W at least 2; the output keeps x's layout.  The ``cpu`` backend runs
    the forward without argmax indices (its backward recomputes them, so ``auto`` takes it for
    inference only); everything else runs the reference (``dlkunet.ops.reference.max_pool2x2``).
    """
    op = "max_pool2x2"
    check_input(op, x)
    check_poolable(op, x)
    backend = resolve(x.device.type, op, _mode(x))
    if backend == "cpu":
        return library.max_pool2x2_forward(x, backend)
    return reference.max_pool2x2(x)
