"""torch.library.opcheck over the four dlkunet::* custom ops, on every backend that can run here.

opcheck runs each op under its schema check (no input mutated or aliased, as the schema says), the
fake (meta) kernel against the real one (shapes, strides, dtypes), the autograd registration, and
AOT dispatch with dynamic shapes: what torch.compile and torch.export rely on.  The backend is an
argument of the op, so each backend's kernels are checked through the same registration.
"""
from __future__ import annotations

import pytest
import torch

from dlkunet.ops import library
from dlkunet_testing import fused_backends

BACKENDS = [pytest.param("torch", "cpu", id="torch")] + fused_backends()

# Under Triton's CPU interpreter every kernel launch is slow, and AOT dispatch with dynamic shapes
# runs each op several more times: there the triton backend gets the checks that concern it (its
# outputs' metadata against the fake kernels, the schema, the autograd registration), and the
# registration's AOT path is covered by the other backends.  On a GPU it gets all of them.
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _utils(backend, device):
    if backend == "triton" and device == "cpu":
        return ALL_UTILS[:3]
    return ALL_UTILS


def _dw_inputs(device, dtype, channels_last, requires_grad):
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=requires_grad):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)

    x = r(2, 3, 5, 6)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(requires_grad)
    return [x, r(3, 1, 3, 3), r(3), r(4, 3, 1, 1), r(4), r(4), r(4),
            r(4, grad=False), torch.rand(4, generator=g, dtype=dtype).add(0.5).to(device)]


def _lka_inputs(device, dtype, channels_last, requires_grad):
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)

    x = r(1, 3, 7, 5)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(requires_grad)
    return [x, r(3, 1, 5, 5), r(3), r(3, 1, 7, 7), r(3), r(3, 3, 1, 1), r(3)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dwconv_bn_act_ops(backend, device, channels_last):
    for training in (True, False):
        args = _dw_inputs(device, torch.float32, channels_last, requires_grad=True)
        torch.library.opcheck(library.dwconv_bn_act_forward, (*args, training, 1e-5, True, backend),
                              test_utils=_utils(backend, device))
        y, mean, var = library.dwconv_bn_act_forward(*[a.detach() for a in args], training, 1e-5, True, backend)
        plain = [a.detach() for a in args]
        grad_y = torch.randn_like(y)
        torch.library.opcheck(library.dwconv_bn_act_backward,
                              (grad_y, *plain[:7], mean, var, training, 1e-5, True, backend),
                              test_utils=_utils(backend, device))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lka_gate_ops(backend, device, channels_last):
    args = _lka_inputs(device, torch.float32, channels_last, requires_grad=True)
    torch.library.opcheck(library.lka_gate_forward, (*args, 3, backend), test_utils=_utils(backend, device))
    plain = [a.detach() for a in args]
    grad_out = torch.randn_like(plain[0])
    torch.library.opcheck(library.lka_gate_backward, (grad_out, *plain, 3, backend),
                          test_utils=_utils(backend, device))


def test_opcheck_catches_a_fake_kernel_that_disagrees(monkeypatch):
    """The check can fail: a fake kernel with the wrong output shape is reported."""
    args = _lka_inputs("cpu", torch.float32, False, requires_grad=False)

    @torch.library.custom_op("dlkunet_test::lka_gate_wrong_fake", mutates_args=())
    def wrong(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor,
              w1: torch.Tensor, b1: torch.Tensor, dilation: int, backend: str) -> torch.Tensor:
        return library.lka_gate_forward(x, w0, b0, ws, bs, w1, b1, dilation, backend)

    @wrong.register_fake
    def _(x, w0, b0, ws, bs, w1, b1, dilation, backend):
        return x.new_empty((x.shape[0], x.shape[1], x.shape[2] + 1, x.shape[3]))

    with pytest.raises(Exception, match="(?i)shape|size"):
        torch.library.opcheck(wrong, (*args, 3, "torch"), test_utils=("test_faketensor",))
