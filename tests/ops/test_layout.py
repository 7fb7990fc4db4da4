"""dlkunet.ops.layout: the stride rule (ATen's) and the output layout every backend gives."""
import pytest
import torch
import torch._prims_common as prims_common

from dlkunet import ops
from dlkunet.ops import layout
from dlkunet_testing import BUDGET, fused_backends, rel_err

CL = torch.channels_last


def _tensors():
    yield torch.randn(2, 6, 5, 7)
    yield torch.randn(2, 6, 5, 7).to(memory_format=CL)
    yield torch.randn(2, 1, 5, 7)                          # ambiguous by is_contiguous
    yield torch.randn(2, 1, 5, 7).to(memory_format=CL)     # same memory, CL strides
    yield torch.randn(2, 6, 1, 1)
    yield torch.randn(2, 6, 1, 1).to(memory_format=CL)
    yield torch.randn(4, 6, 1, 1).to(memory_format=CL)     # a 1x1 conv weight after Module.to(CL)
    yield torch.randn(4, 1, 1, 1).to(memory_format=CL)
    yield torch.randn(6, 1, 3, 3).to(memory_format=CL)     # a depthwise weight after Module.to(CL)
    yield torch.randn(2, 6, 5, 9)[..., 1:8]                # strided NCHW view
    yield torch.randn(2, 5, 9, 6).permute(0, 3, 1, 2)[:, :, :, 1:8]  # strided CL view


def _tensor_id(t):
    return "x".join(map(str, t.shape)) + "-" + "-".join(map(str, t.stride()))


@pytest.mark.parametrize("t", list(_tensors()), ids=_tensor_id)
def test_stride_rule_is_atens_suggest_memory_format(t):
    assert layout.memory_format(t) == prims_common.suggest_memory_format(t)


def test_in_format_gives_strides_that_say_channels_last_even_for_one_channel():
    x = torch.randn(2, 1, 5, 7)
    assert x.contiguous(memory_format=CL).stride() == x.stride()  # contiguous() cannot
    y = layout.in_format(x, CL)
    assert layout.channels_last_strides(y) and torch.equal(y, x)


# --- the output layout: PyTorch's convolution rule, the same on every backend --------------------

def _layout_params():
    return [pytest.param("torch", "cpu", id="torch")] + [p for p in fused_backends() if p.values[1] == "cpu"]


@pytest.mark.parametrize("c", [1, 6], ids=["1ch", "6ch"])  # 1 channel: the model's first block
@pytest.mark.parametrize("x_cl,w_cl", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["x-nchw-w-nchw", "x-nchw-w-cl", "x-cl-w-nchw", "x-cl-w-cl"])
@pytest.mark.parametrize("backend,device", _layout_params())
def test_output_layout_follows_x_or_the_weights_like_conv2d(backend, device, x_cl, w_cl, c):
    g = torch.Generator().manual_seed(3)
    cl = torch.channels_last
    as_model = (lambda t: t.to(memory_format=cl)) if w_cl else (lambda t: t)  # what Module.to(channels_last) does
    x = torch.randn(2, c, 5, 7, generator=g)
    xs = x.to(memory_format=cl) if x_cl else x
    w_dw, b_dw = as_model(torch.randn(c, 1, 3, 3, generator=g)), torch.randn(c, generator=g)
    w_pw, b_pw = as_model(torch.randn(4, c, 1, 1, generator=g)), torch.randn(4, generator=g)
    bn = [torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4)]
    lka_w = [as_model(torch.randn(c, 1, 5, 5, generator=g)), torch.randn(c, generator=g),
             as_model(torch.randn(c, 1, 7, 7, generator=g)), torch.randn(c, generator=g),
             as_model(torch.randn(c, c, 1, 1, generator=g)), torch.randn(c, generator=g)]
    # The layout PyTorch's own convolutions give the same chain.
    z = torch.nn.functional.conv2d(xs, w_dw, padding=1, groups=c)
    want_cl = torch.nn.functional.conv2d(z, w_pw).stride(1) == 1
    with ops.use_backend(backend):
        y = ops.dwconv_bn_act(xs, w_dw, b_dw, w_pw, b_pw, *bn, training=False)
        a = ops.lka_gate(xs, *lka_w, dilation=3)
    ref_y = ops.reference.dwconv_bn_act(x, w_dw, b_dw, w_pw, b_pw, *bn, False, 0.1, 1e-5, True)
    ref_a = ops.reference.lka_gate(x, *lka_w, 3)
    # A 1-channel tensor is the same memory in both layouts; the torch backend's gate (an
    # elementwise multiply) gives it NCHW strides then, so only the 1-channel dwconv is checked.
    checks = ((y, ref_y), (a, ref_a)) if c > 1 or backend != "torch" else ((y, ref_y),)
    assert rel_err(a, ref_a) <= BUDGET[torch.float32]
    for out, ref in checks:
        assert (out.stride(1) == 1) == want_cl, f"strides {out.stride()}, PyTorch's conv gives channels_last={want_cl}"
        assert out.is_contiguous(memory_format=cl if want_cl else torch.contiguous_format)
        assert rel_err(out, ref) <= BUDGET[torch.float32]
