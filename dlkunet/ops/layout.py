"""Memory layouts of the operators' tensors: one rule, shared by every backend and the fake kernels.

A tensor is treated as channels_last when its strides are ordered so, by ATen's own test
(``Tensor.suggest_memory_format``).  The rule is stride-based because ``is_contiguous`` cannot tell
the layouts apart when C == 1 or H == W == 1: a 1-channel image is "contiguous" in both.

The output layout follows PyTorch's convolution: channels_last when the input *or* a weight is.
So a model converted with ``model.to(memory_format=torch.channels_last)`` runs channels_last from
its first block on, as it does in eager PyTorch, even though its input image has one channel.
"""
from __future__ import annotations

import torch
from torch import Tensor


def channels_last_strides(t: Tensor) -> bool:
    """ATen's ``is_channels_last_strides_2d``: strides ordered C < W < H < N (size-1 dims aside)."""
    if t.dim() != 4:
        return False
    sizes, strides = t.shape, t.stride()  # one call each: this runs several times per operator call
    if strides[1] == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:  # a trivial C dimension defaults to NCHW
            return False
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def memory_format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if channels_last_strides(t) else torch.contiguous_format


def conv_output_format(x: Tensor, *weights: Tensor) -> torch.memory_format:
    """channels_last when x or any weight is, as torch.nn.functional.conv2d decides."""
    return torch.channels_last if any(channels_last_strides(t) for t in (x, *weights)) else torch.contiguous_format


def in_format(x: Tensor, fmt: torch.memory_format) -> Tensor:
    """x dense in ``fmt`` with strides that say so, even when x is ambiguous (then ``contiguous``
    would return x unchanged, with NCHW strides)."""
    if memory_format(x) == fmt and x.is_contiguous(memory_format=fmt):
        return x
    return torch.empty_like(x, memory_format=fmt).copy_(x)
