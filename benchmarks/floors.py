"""The bytes an operation must move: the floor every timing is compared against.

The rule (``docs/design.md``, "Performance: how it is measured"): inputs read once, outputs written
once, weights.  A backward additionally reads the incoming gradient and the saved input once, writes
the input's gradient once, reads the weights and writes their gradients.  Intermediates (z, a1, a2, the ReLU mask) are
not counted: a fused kernel need not store them.  The achieved fraction of the floor is
``(bytes / measured_bandwidth) / time``.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch import nn

FP32 = 4


def esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dwconv_bytes(n: int, cin: int, cout: int, h: int, w: int, k: int, dtype: torch.dtype,
                 backward: bool) -> int:
    """dwconv_bn_act: conv weights in ``dtype``; gamma, beta and running stats in float32."""
    es = esize(dtype)
    x, y = n * cin * h * w * es, n * cout * h * w * es
    conv_w = (cin * k * k + cin + cout * cin + cout) * es
    bn = 4 * cout * FP32
    fwd = x + y + conv_w + bn
    if not backward:
        return fwd
    # grad_y and x read, grad_x written; weights read again and their gradients written.
    return fwd + y + x + x + conv_w + bn + conv_w + 2 * cout * FP32


def lka_bytes(n: int, c: int, h: int, w: int, k0: int, ks: int, dtype: torch.dtype, backward: bool) -> int:
    es = esize(dtype)
    act = n * c * h * w * es
    weights = (c * k0 * k0 + c + c * ks * ks + c + c * c + c) * es
    fwd = 2 * act + weights
    return fwd + (3 * act + 2 * weights if backward else 0)


def _nbytes(tensors: Iterable) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def model_bytes(model: nn.Module, x: torch.Tensor, train: bool, optimizer_state_factor: int = 5) -> Dict[str, int]:
    """Sum of the floors of the model's units, measured with hooks during one forward.

    Units: each fused operator module (DWConvBNAct, LKA), each remaining leaf layer (max-pool,
    transposed conv, head conv), and the concatenation in front of each decoder Block.
    ``train`` adds each unit's backward floor, the loss reading logits and writing their
    gradient, and the optimizer (SGD with momentum reads p, grad, buffer; writes p, buffer).
    """
    import dlkunet.ops as ops
    from dlkunet.models.blocks import LKA, Down, DWConvBNAct, Up

    units = (DWConvBNAct, LKA)
    totals = {"fwd": 0, "bwd": 0}
    handles = []

    def unit_hook(module, inputs, output):
        params = _nbytes(module.parameters()) + _nbytes(module.buffers())
        din, dout = _nbytes(inputs), _nbytes([output])
        totals["fwd"] += din + dout + params
        grad_in = _nbytes(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)
        totals["bwd"] += dout + din + grad_in + 2 * _nbytes(module.parameters())

    def cat_hook(module, inputs):
        size = _nbytes(inputs)  # the concatenated tensor: both halves read, the whole written
        totals["fwd"] += 2 * size
        totals["bwd"] += 2 * size

    def pool_hook(module, inputs):  # Down's max_pool2x2, as unit_hook counts a module
        x = inputs[0]
        n, c, h, w = x.shape
        din, dout = _nbytes([x]), n * c * (h // 2) * (w // 2) * x.element_size()
        totals["fwd"] += din + dout
        totals["bwd"] += dout + din + (din if x.requires_grad else 0)

    def inside_unit(name: str) -> bool:
        return any(name.startswith(u + ".") for u in unit_names)

    unit_names = [name for name, m in model.named_modules() if isinstance(m, units)]
    for name, m in model.named_modules():
        if isinstance(m, units):
            handles.append(m.register_forward_hook(unit_hook))
        elif isinstance(m, Up):
            handles.append(m.block.register_forward_pre_hook(cat_hook))
        elif isinstance(m, Down):
            handles.append(m.register_forward_pre_hook(pool_hook))
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and not inside_unit(name):
            handles.append(m.register_forward_hook(unit_hook))
    try:
        with torch.set_grad_enabled(train), ops.use_backend("torch"):
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    params = _nbytes(model.parameters())
    result = {"fwd": totals["fwd"]}
    if train:
        loss = 2 * _nbytes([logits])  # read once by the loss, its gradient written once
        result["train_step"] = totals["fwd"] + totals["bwd"] + loss + optimizer_state_factor * params
    return result
