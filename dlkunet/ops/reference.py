"""The fused operators written as plain PyTorch: the formulas every backend must compute.

This module is both the `torch` backend and the test oracle. Each operator has a *forward* and a
*backward* with the exact signature every backend implements (see ``dlkunet.ops.backends``):

``dwconv_bn_act_forward(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var,
training, eps, relu) -> (y, mean, var)``
    ``z = conv2d(conv2d(x, w_dw, b_dw, padding=k//2, groups=Cin), w_pw, b_pw)``;
    training: ``mean, var`` are the batch statistics of ``z`` over (N, H, W) (biased variance);
    eval: ``mean, var`` are ``running_mean, running_var``.  ``y = act((z - mean) * rsqrt(var + eps)
    * gamma + beta)``.  ``mean`` and ``var`` come back as float32 tensors of shape (Cout,), the
    statistics the backward needs (float64 for float64 inputs).  Backends never touch the running
    statistics: the public op updates them from the returned batch statistics, exactly as
    ``nn.BatchNorm2d`` would.

``dwconv_bn_act_backward(grad_y, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var, training,
eps, relu) -> (grad_x, grad_w_dw, grad_b_dw, grad_w_pw, grad_b_pw, grad_gamma, grad_beta)``
    Intermediates (z, the ReLU mask) are recomputed from x rather than saved.

``lka_gate_forward(x, w0, b0, ws, bs, w1, b1, dilation) -> out``
    ``a1 = dwconv(x, w0, b0)`` (k0 x k0, padding (k0-1)//2), ``a2 = dwconv(a1, ws, bs)`` (ks x ks,
    dilation d, padding d*(ks-1)//2, a1 zero-padded outside the image), ``out = x * (w1 @ a2 + b1)``.

``lka_gate_backward(grad_out, x, w0, b0, ws, bs, w1, b1, dilation) -> (grad_x, grad_w0, grad_b0,
grad_ws, grad_bs, grad_w1, grad_b1)``

``upsample_concat(deep, skip, weight, bias) -> out``
    The decoder's join: ``up = conv_transpose2d(deep, weight, bias, stride=2)`` (2x2 kernel),
    zero-padded to the skip's height and width (cropped where it is larger), and
    ``out = cat([skip, up], dim=1)``.  Its backward is autograd's (one transposed convolution's
    gradient and two slices), whatever backend ran the forward.

``max_pool2x2(x) -> out``
    The encoder's pooling: ``max_pool2d(x, 2)`` (window and stride 2, floor mode; a NaN in a window
    gives NaN).  Its backward is ATen's, from argmax indices recomputed from x.

Gradients come back in the dtype of the tensor they belong to.  Computation happens in the input
dtype (PyTorch's convolutions accumulate in float32 for half types).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor, dilation: int = 1) -> Tensor:
    """Depthwise conv2d that keeps H x W: padding dilation * (k - 1) // 2 (k odd)."""
    k = weight.shape[-1]
    return F.conv2d(x, weight, bias, padding=dilation * (k - 1) // 2, dilation=dilation, groups=x.shape[1])


def dwconv_bn_act(
    x: Tensor, w_dw: Tensor, b_dw: Tensor, w_pw: Tensor, b_pw: Tensor,
    gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
    training: bool, momentum: float | None, eps: float, relu: bool = True,
) -> Tensor:
    """The composed reference: ``relu(batch_norm(pw(dw(x))))`` via F.batch_norm (updates running stats)."""
    z = F.conv2d(depthwise_conv(x, w_dw, b_dw), w_pw, b_pw)
    # F.batch_norm wants momentum as a float; None (cumulative average) is resolved by the caller.
    y = F.batch_norm(z, running_mean, running_var, gamma, beta, training, momentum or 0.0, eps)
    return F.relu(y) if relu else y


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for the half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _pw_bn_act(z: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, eps: float, relu: bool) -> Tensor:
    shape, acc = (1, -1, 1, 1), _acc(z.dtype)
    scale = (torch.rsqrt(var.to(acc) + eps) * gamma.to(acc)).view(shape)
    y = (z.to(acc) - mean.to(acc).view(shape)) * scale + beta.to(acc).view(shape)
    y = y.to(z.dtype)
    return F.relu(y) if relu else y


def dwconv_bn_act_forward(
    x: Tensor, w_dw: Tensor, b_dw: Tensor, w_pw: Tensor, b_pw: Tensor,
    gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
    training: bool, eps: float, relu: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    z = F.conv2d(depthwise_conv(x, w_dw, b_dw), w_pw, b_pw)
    if training:
        var, mean = torch.var_mean(z.to(_acc(z.dtype)), dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = running_mean, running_var
    # float32 statistics (float64 for float64 inputs); clone: outputs never alias inputs.
    mean, var = mean.to(_acc(x.dtype)).clone(), var.to(_acc(x.dtype)).clone()
    return _pw_bn_act(z, gamma, beta, mean, var, eps, relu), mean, var


def _conv_backward(grad_out: Tensor, inp: Tensor, weight: Tensor, padding: int = 0, dilation: int = 1,
                   groups: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of a stride-1 conv2d; plain ATen, no autograd needed."""
    return torch.ops.aten.convolution_backward(
        grad_out, inp, weight, [weight.shape[0]], [1, 1], [padding, padding], [dilation, dilation],
        False, [0, 0], groups, [True, True, True])


def dwconv_bn_act_backward(
    grad_y: Tensor, x: Tensor, w_dw: Tensor, b_dw: Tensor, w_pw: Tensor, b_pw: Tensor,
    gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor,
    training: bool, eps: float, relu: bool,
) -> Tuple[Tensor, ...]:
    # Recompute the intermediates from x (nothing but the statistics was saved).
    k = w_dw.shape[-1]
    a = depthwise_conv(x, w_dw, b_dw)
    z = F.conv2d(a, w_pw, b_pw)
    shape, acc = (1, -1, 1, 1), _acc(z.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    xhat = (z.to(acc) - mean.to(acc).view(shape)) * invstd.view(shape)
    g = grad_y.to(acc)
    if relu:
        g = g * ((xhat * gamma.to(acc).view(shape) + beta.to(acc).view(shape)) > 0)
    grad_gamma = (g * xhat).sum((0, 2, 3))
    grad_beta = g.sum((0, 2, 3))
    scale = (gamma.to(acc) * invstd).view(shape)
    if training:  # the batch statistics depend on z too
        count = z.shape[0] * z.shape[2] * z.shape[3]
        grad_z = scale * (g - grad_beta.view(shape) / count - xhat * (grad_gamma.view(shape) / count))
    else:
        grad_z = g * scale
    grad_z = grad_z.to(z.dtype)
    grad_a, grad_w_pw, grad_b_pw = _conv_backward(grad_z, a, w_pw)
    grad_x, grad_w_dw, grad_b_dw = _conv_backward(grad_a, x, w_dw, k // 2, 1, x.shape[1])
    return (grad_x, grad_w_dw, grad_b_dw, grad_w_pw, grad_b_pw,
            grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype))


def lka_gate(x: Tensor, w0: Tensor, b0: Tensor, ws: Tensor, bs: Tensor, w1: Tensor, b1: Tensor,
             dilation: int = 3) -> Tensor:
    a1 = depthwise_conv(x, w0, b0)
    a2 = depthwise_conv(a1, ws, bs, dilation)
    return x * F.conv2d(a2, w1, b1)


def lka_gate_forward(x, w0, b0, ws, bs, w1, b1, dilation: int) -> Tensor:
    return lka_gate(x, w0, b0, ws, bs, w1, b1, dilation)


def lka_gate_backward(grad_out, x, w0, b0, ws, bs, w1, b1, dilation: int) -> Tuple[Tensor, ...]:
    a1 = depthwise_conv(x, w0, b0)
    a2 = depthwise_conv(a1, ws, bs, dilation)
    a3 = F.conv2d(a2, w1, b1)
    grad_a2, grad_w1, grad_b1 = _conv_backward(grad_out * x, a2, w1)
    grad_a1, grad_ws, grad_bs = _conv_backward(grad_a2, a1, ws, dilation * (ws.shape[-1] - 1) // 2, dilation,
                                               x.shape[1])
    grad_x, grad_w0, grad_b0 = _conv_backward(grad_a1, x, w0, (w0.shape[-1] - 1) // 2, 1, x.shape[1])
    return grad_x + grad_out * a3, grad_w0, grad_b0, grad_ws, grad_bs, grad_w1, grad_b1


def upsample_offsets(deep: Tensor, skip: Tensor) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding that fits the upsampled ``deep`` to ``skip``'s size
    (negative: a crop), split as the authors' "auto-resize" splits it (the extra row below)."""
    dh, dw = skip.shape[-2] - 2 * deep.shape[-2], skip.shape[-1] - 2 * deep.shape[-1]
    return dh // 2, dh - dh // 2, dw // 2, dw - dw // 2


def upsample_concat(deep: Tensor, skip: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    up = F.conv_transpose2d(deep, weight, bias, stride=2)
    top, bottom, left, right = upsample_offsets(deep, skip)
    # An export pads always, so that a graph with dynamic height and width stays right for odd sizes.
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or top or bottom or left or right:
        up = F.pad(up, [left, right, top, bottom])
    return torch.cat([skip, up], dim=1)


def max_pool2x2(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 2)
