"""DLKUNet's building blocks.  Modules hold standard parameters and call ``dlkunet.ops``.

Names follow ``docs/architecture.md``: a ``Block`` is two depthwise-separable
convolutions, each followed by BatchNorm and ReLU, then large-kernel attention (LKA).
"""
from __future__ import annotations

from typing import Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops

LKAKernels = Tuple[int, int, int]  # (k0, ks, dilation)
DEFAULT_LKA: LKAKernels = (5, 7, 3)


class DWConvBNAct(nn.Module):
    """Depthwise kxk conv -> pointwise 1x1 conv -> BatchNorm2d -> ReLU (both convs keep their bias)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, relu: bool = True):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"depthwise kernel_size must be odd, got {kernel_size}")
        self.depthwise = nn.Conv2d(cin, cin, kernel_size, padding=kernel_size // 2, groups=cin, bias=True)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=True)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        training = bn.training or bn.running_mean is None
        momentum = bn.momentum
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(bn.num_batches_tracked)
        return ops.dwconv_bn_act(
            x, self.depthwise.weight, self.depthwise.bias, self.pointwise.weight, self.pointwise.bias,
            bn.weight, bn.bias, bn.running_mean, bn.running_var,
            training=training, momentum=momentum if momentum is not None else 0.0, eps=bn.eps, relu=self.relu)


class LKA(nn.Module):
    """Large-kernel attention: depthwise k0, dilated depthwise ks, pointwise, then ``x * attn``."""

    def __init__(self, dim: int, kernels: LKAKernels = DEFAULT_LKA):
        super().__init__()
        k0, ks, d = kernels
        if k0 % 2 == 0 or ks % 2 == 0:
            raise ValueError(f"LKA kernel sizes must be odd, got {k0} and {ks}")
        self.conv0 = nn.Conv2d(dim, dim, k0, padding=(k0 - 1) // 2, groups=dim, bias=True)
        self.conv_spatial = nn.Conv2d(dim, dim, ks, padding=d * (ks - 1) // 2, dilation=d, groups=dim, bias=True)
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=True)
        self.dilation = d

    def forward(self, x: Tensor) -> Tensor:
        return ops.lka_gate(x, self.conv0.weight, self.conv0.bias, self.conv_spatial.weight,
                            self.conv_spatial.bias, self.conv1.weight, self.conv1.bias, dilation=self.dilation)


class Block(nn.Module):
    """DWConvBNAct(cin, cout) -> DWConvBNAct(cout, cout) -> LKA(cout): the paper's EBlock."""

    def __init__(self, cin: int, cout: int, dw_kernel: int = 3, lka_kernels: LKAKernels = DEFAULT_LKA,
                 second_relu: bool = True):
        super().__init__()
        self.conv1 = DWConvBNAct(cin, cout, dw_kernel)
        # The paper's eq. (2) omits this ReLU; the authors' code applies it (the default).
        self.conv2 = DWConvBNAct(cout, cout, dw_kernel, relu=second_relu)
        self.lka = LKA(cout, lka_kernels)

    def forward(self, x: Tensor) -> Tensor:
        return self.lka(self.conv2(self.conv1(x)))


class Down(nn.Module):
    """MaxPool2d(2) (``ops.max_pool2x2``) then a Block."""

    def __init__(self, cin: int, cout: int, **block_kwargs):
        super().__init__()
        self.block = Block(cin, cout, **block_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h < 2 or w < 2:
            # The reference cannot pool a map below 2x2 (tiny inputs at deep levels); replicate it up
            # to 2 so it pools to 1.  Sizes the reference accepts are untouched.
            x = F.pad(x, [0, max(0, 2 - w), 0, max(0, 2 - h)], mode="replicate")
        return self.block(ops.max_pool2x2(x))


class Up(nn.Module):
    """The DFB: transposed conv (k2, s2), zero-pad to the skip's size, concat [skip, up], Block."""

    def __init__(self, cin: int, cout: int, **block_kwargs):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2, bias=True)
        self.block = Block(2 * cout, cout, **block_kwargs)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        # The reference's "auto-resize" pads (a negative difference crops: see Down) inside the op.
        return self.block(ops.upsample_concat(deep, skip, self.up.weight, self.up.bias))
