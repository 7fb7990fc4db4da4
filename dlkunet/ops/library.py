"""``torch.library`` registration of the fused operators: custom ops, fake kernels, autograd.

Each operator is a pair of custom ops, ``dlkunet::<op>_forward`` and ``dlkunet::<op>_backward``,
taking the backend's name as a string argument; the public functions in ``dlkunet.ops`` resolve
the backend and call them.  torch.compile sees these ops as single nodes (no graph break), and the
fake kernels give it shapes without running anything.  Running statistics are not an input the
ops mutate: the forward returns the batch statistics and the caller updates the buffers.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from .backends import implementation
from .layout import memory_format as _memory_format


@torch.library.custom_op("dlkunet::dwconv_bn_act_forward", mutates_args=())
def dwconv_bn_act_forward(
    x: Tensor, w_dw: Tensor, b_dw: Tensor, w_pw: Tensor, b_pw: Tensor, gamma: Tensor, beta: Tensor,
    running_mean: Tensor, running_var: Tensor, training: bool, eps: float, relu: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    return implementation(backend).dwconv_bn_act_forward(
        x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var, training, eps, relu)


@dwconv_bn_act_forward.register_fake
def _(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var, training, eps, relu, backend):
    n, _, h, w = x.shape
    y = torch.empty((n, w_pw.shape[0], h, w), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    stat = x.new_empty((w_pw.shape[0],), dtype=torch.promote_types(x.dtype, torch.float32))
    return y, stat, stat.clone()


@torch.library.custom_op("dlkunet::dwconv_bn_act_backward", mutates_args=())
def dwconv_bn_act_backward(
    grad_y: Tensor, x: Tensor, w_dw: Tensor, b_dw: Tensor, w_pw: Tensor, b_pw: Tensor,
    gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, training: bool, eps: float, relu: bool,
    backend: str,
) -> List[Tensor]:
    return list(implementation(backend).dwconv_bn_act_backward(
        grad_y, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var, training, eps, relu))


@dwconv_bn_act_backward.register_fake
def _(grad_y, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var, training, eps, relu, backend):
    return [torch.empty_like(t) for t in (x, w_dw, b_dw, w_pw, b_pw, gamma, beta)]


def _dwconv_setup(ctx, inputs, output):
    x, w_dw, b_dw, w_pw, b_pw, gamma, beta, _rm, _rv, training, eps, relu, backend = inputs
    _, mean, var = output
    ctx.save_for_backward(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var)
    ctx.options = (training, eps, relu, backend)


def _dwconv_backward(ctx, grad_y, _grad_mean, _grad_var):
    training, eps, relu, backend = ctx.options
    grads = dwconv_bn_act_backward(grad_y.contiguous(memory_format=_memory_format(grad_y)),
                                   *ctx.saved_tensors, training, eps, relu, backend)
    return (*grads, None, None, None, None, None, None)


dwconv_bn_act_forward.register_autograd(_dwconv_backward, setup_context=_dwconv_setup)


@torch.library.custom_op("dlkunet::lka_gate_forward", mutates_args=())
def lka_gate_forward(x: Tensor, w0: Tensor, b0: Tensor, ws: Tensor, bs: Tensor, w1: Tensor, b1: Tensor,
                     dilation: int, backend: str) -> Tensor:
    return implementation(backend).lka_gate_forward(x, w0, b0, ws, bs, w1, b1, dilation)


@lka_gate_forward.register_fake
def _(x, w0, b0, ws, bs, w1, b1, dilation, backend):
    return torch.empty_like(x, memory_format=_memory_format(x))


@torch.library.custom_op("dlkunet::lka_gate_backward", mutates_args=())
def lka_gate_backward(grad_out: Tensor, x: Tensor, w0: Tensor, b0: Tensor, ws: Tensor, bs: Tensor,
                      w1: Tensor, b1: Tensor, dilation: int, backend: str) -> List[Tensor]:
    return list(implementation(backend).lka_gate_backward(grad_out, x, w0, b0, ws, bs, w1, b1, dilation))


@lka_gate_backward.register_fake
def _(grad_out, x, w0, b0, ws, bs, w1, b1, dilation, backend):
    return [torch.empty_like(t) for t in (x, w0, b0, ws, bs, w1, b1)]


def _lka_setup(ctx, inputs, output):
    *tensors, dilation, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = (dilation, backend)


def _lka_backward(ctx, grad_out):
    dilation, backend = ctx.options
    grads = lka_gate_backward(grad_out.contiguous(memory_format=_memory_format(grad_out)),
                              *ctx.saved_tensors, dilation, backend)
    return (*grads, None, None)


lka_gate_forward.register_autograd(_lka_backward, setup_context=_lka_setup)


@torch.library.custom_op("dlkunet::upsample_concat_forward", mutates_args=())
def upsample_concat_forward(deep: Tensor, skip: Tensor, weight: Tensor, bias: Tensor, backend: str) -> Tensor:
    return implementation(backend).upsample_concat_forward(deep, skip, weight, bias)


@upsample_concat_forward.register_fake
def _(deep, skip, weight, bias, backend):
    n, cs, h, w = skip.shape
    return skip.new_empty((n, cs + weight.shape[1], h, w)).contiguous(memory_format=torch.channels_last)


def upsample_concat_runs_on_cpu(deep: Tensor, skip: Tensor, weight: Tensor) -> bool:
    """Whether the cpu kernel takes these inputs: float32/float64, deep and skip channels_last,
    and a skip at least as large as the upsampled map (a pad, not a crop)."""
    return (deep.dtype in (torch.float32, torch.float64)
            and _memory_format(deep) == torch.channels_last and _memory_format(skip) == torch.channels_last
            and skip.shape[2] >= 2 * deep.shape[2] and skip.shape[3] >= 2 * deep.shape[3])


def _upsample_setup(ctx, inputs, output):
    deep, skip, weight, _bias, _backend = inputs
    ctx.save_for_backward(deep, weight)
    ctx.skip_shape = tuple(skip.shape[1:])


def _upsample_backward(ctx, grad):
    deep, weight = ctx.saved_tensors
    cs, hs, ws = ctx.skip_shape
    h, w = 2 * deep.shape[2], 2 * deep.shape[3]
    top, left = (hs - h) // 2, (ws - w) // 2
    grad_up = grad[:, cs:, top:top + h, left:left + w]
    need_deep, need_skip, need_weight, need_bias = ctx.needs_input_grad[:4]
    grad_deep, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_up, deep, weight, [weight.shape[1]], [2, 2], [0, 0], [1, 1], True, [0, 0], 1,
        [need_deep, need_weight, need_bias])
    return grad_deep, (grad[:, :cs] if need_skip else None), grad_weight, grad_bias, None


upsample_concat_forward.register_autograd(_upsample_backward, setup_context=_upsample_setup)


@torch.library.custom_op("dlkunet::max_pool2x2_forward", mutates_args=())
def max_pool2x2_forward(x: Tensor, backend: str) -> Tensor:
    return implementation(backend).max_pool2x2_forward(x)


@max_pool2x2_forward.register_fake
def _(x, backend):
    n, c, h, w = x.shape
    return x.new_empty((n, c, h // 2, w // 2)).contiguous(memory_format=_memory_format(x))


_POOL_ARGS = ([2, 2], [2, 2], [0, 0], [1, 1], False)  # kernel, stride, padding, dilation, ceil_mode


def _pool_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _pool_backward(ctx, grad):
    # The forward kept no argmax (it runs for inference); ATen's pooling recomputes it, with ATen's
    # own rule for ties and NaN, and its backward scatters the gradient.
    (x,) = ctx.saved_tensors
    _, indices = torch.ops.aten.max_pool2d_with_indices(x, *_POOL_ARGS)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *_POOL_ARGS, indices), None


max_pool2x2_forward.register_autograd(_pool_backward, setup_context=_pool_setup)
