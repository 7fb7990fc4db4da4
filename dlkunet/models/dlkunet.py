"""DLKUNet and its S / M / L variants (``docs/architecture.md``)."""
from __future__ import annotations

from typing import List

from torch import Tensor, nn

from .blocks import DEFAULT_LKA, Block, Down, LKAKernels, Up

DEPTHS = {"S": 3, "M": 4, "L": 5}


class DLKUNet(nn.Module):
    """A U-Net of ``depth`` levels of Blocks; widths ``base_width * 2**level``.

    Args:
        in_channels: image channels (1 for CT / MRI slices).
        num_classes: output channels (logits, background included).
        depth: encoder levels including the stem (S 3, M 4, L 5).
        base_width: C, the first level's width (96 in the paper; 64 and 128 in its ablation).
        dw_kernel: depthwise kernel of every DWConv (3; 5 and 7 in the ablation).
        lka_kernels: (k0, ks, dilation) of the attention: (5, 7, 3) default, (3, 7, 3) "LKA1",
            (5, 5, 3) "LKA2".
        second_relu: ReLU after each Block's second BatchNorm (the authors' code has it).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 9, depth: int = 5, base_width: int = 96,
                 dw_kernel: int = 3, lka_kernels: LKAKernels = DEFAULT_LKA, second_relu: bool = True):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (a stem and one Down), got {depth}")
        if in_channels < 1 or num_classes < 1 or base_width < 1:
            raise ValueError("in_channels, num_classes and base_width must be positive")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, depth=depth, base_width=base_width,
                           dw_kernel=dw_kernel, lka_kernels=tuple(lka_kernels), second_relu=second_relu)
        kw = dict(dw_kernel=dw_kernel, lka_kernels=tuple(lka_kernels), second_relu=second_relu)
        widths = [base_width * 2 ** i for i in range(depth)]
        self.stem = Block(in_channels, widths[0], **kw)
        self.downs = nn.ModuleList(Down(widths[i - 1], widths[i], **kw) for i in range(1, depth))
        self.ups = nn.ModuleList(Up(widths[i], widths[i - 1], **kw) for i in reversed(range(1, depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1, bias=True)

    @property
    def num_classes(self) -> int:
        return self.head.out_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"DLKUNet expects input (N, {self.config['in_channels']}, H, W), got {tuple(x.shape)}")
        skips: List[Tensor] = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)




class DLKUNetS(DLKUNet):
    """DLKUNet-S: 3 levels (1,131,379 parameters at C=96, 1 channel in, 9 classes)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 9, base_width: int = 96, **kwargs):
        super().__init__(in_channels, num_classes, depth=DEPTHS["S"], base_width=base_width, **kwargs)


class DLKUNetM(DLKUNet):
    """DLKUNet-M: 4 levels (4,494,451 parameters at C=96, 1 channel in, 9 classes)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 9, base_width: int = 96, **kwargs):
        super().__init__(in_channels, num_classes, depth=DEPTHS["M"], base_width=base_width, **kwargs)


class DLKUNetL(DLKUNet):
    """DLKUNet-L: 5 levels (17,708,659 parameters at C=96, 1 channel in, 9 classes)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 9, base_width: int = 96, **kwargs):
        super().__init__(in_channels, num_classes, depth=DEPTHS["L"], base_width=base_width, **kwargs)


VARIANTS = {"S": DLKUNetS, "M": DLKUNetM, "L": DLKUNetL}


def build_model(variant: str = "S", **kwargs) -> DLKUNet:
    """Build a variant by letter ('S', 'M', 'L'); keyword arguments go to DLKUNet."""
    try:
        cls = VARIANTS[variant.upper()]
    except KeyError:
        raise ValueError(f"unknown DLKUNet variant {variant!r}; choose S, M or L") from None
    return cls(**kwargs)
