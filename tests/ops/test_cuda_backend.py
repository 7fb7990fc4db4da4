"""The cuda backend on a GPU (issue 14): its GEMMs follow torch.backends.cudnn.allow_tf32 as eager
convolutions do, an eval forward launches at most 3 kernels, and both operators replay inside a
CUDA graph.  GPU only; the kernels' numerics in every precision mode also run on the CPU, through
tests/csrc/test_cuda_emulated.py."""
from __future__ import annotations

import pytest
import torch

from dlkunet import ops
from dlkunet.ops import availability, reference
from dlkunet_testing import dwconv_inputs, eager_tf32_dwconv, eager_tf32_lka, graphed, lka_inputs, rel_err

ok, why = availability("cuda", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=f"cuda backend unavailable on CUDA: {why}")]

# float32 output channels of one 64-wide row tile (depthwise taps inside the GEMM), of two and
# three (one TF32 block; via a plane for the exact fp32 kernel) and of five (via a plane, TF32 or not).
COUTS = (24, 80, 160, 300)
FUSED_TF32_COUT = 3 * 64
MAX_EVAL_LAUNCHES = 3
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _cuda(ts, dtype=torch.float32):
    return [t.to("cuda", dtype) for t in ts]


def _dwconv_eval(x, p):
    return ops.dwconv_bn_act(x, *p[:4], *[t.float() for t in p[4:]], training=False)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cout", COUTS)
def test_eval_dwconv_precision_follows_the_cudnn_tf32_flag(cout, fmt, tf32_flag):
    g = torch.Generator().manual_seed(cout)
    x, p = dwconv_inputs(2, 40, cout, 9, 10, 3, 0.0, g)
    y_ref = reference.dwconv_bn_act_forward(x, *p, False, 1e-5, True)[0]
    errs = {}
    with ops.use_backend("cuda"), torch.no_grad():
        for on in (False, True):
            tf32_flag(on)  # read on every call
            errs[on] = rel_err(_dwconv_eval(x.cuda().float().contiguous(memory_format=FORMATS[fmt]), _cuda(p)), y_ref)
    eager_tf32 = rel_err(eager_tf32_dwconv(x, p, 1e-5), y_ref)
    assert errs[False] <= 1e-5, errs  # full precision: float32's budget
    assert errs[True] <= 2 * eager_tf32, (errs, eager_tf32)  # TF32: no worse than 2x eager's TF32 error
    assert errs[True] > 10 * errs[False], errs  # and TF32 really ran (10-bit mantissas)


def test_lka_gate_precision_follows_the_cudnn_tf32_flag(tf32_flag):
    g = torch.Generator().manual_seed(11)
    x, p = lka_inputs(1, 72, 9, 10, 5, 7, g)
    ref = reference.lka_gate_forward(x, *p, 3)
    errs = {}
    with ops.use_backend("cuda"), torch.no_grad():
        for on in (False, True):
            tf32_flag(on)
            errs[on] = rel_err(ops.lka_gate(x.cuda().float(), *_cuda(p), dilation=3), ref)
    eager_tf32 = rel_err(eager_tf32_lka(x, p, 3), ref)
    assert errs[False] <= 1e-5, errs
    assert errs[True] <= 2 * eager_tf32, (errs, eager_tf32)
    assert errs[True] > 10 * errs[False], errs


def _kernel_launches(fn):
    """Names of the GPU kernels (and copies) one call of fn runs, after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("cout", COUTS)
def test_eval_forward_launches_at_most_three_kernels(cout, tf32, tf32_flag):
    """dwconv_bn_act: one launch where a block holds every output channel (three 64-row TF32 tiles,
    one for the exact fp32 kernel), else two (the depthwise plane, the GEMM)."""
    tf32_flag(tf32)
    g = torch.Generator().manual_seed(3)
    x, p = dwconv_inputs(2, 40, cout, 9, 10, 3, 0.0, g)
    xc, pc = x.cuda().float(), _cuda(p)
    with ops.use_backend("cuda"), torch.no_grad():
        dw = _kernel_launches(lambda: _dwconv_eval(xc, pc))
        lka_x, lka_p = lka_inputs(1, cout, 9, 10, 5, 7, g)
        lka = _kernel_launches(lambda: ops.lka_gate(lka_x.cuda().float(), *_cuda(lka_p), dilation=3))
    assert len(dw) == (1 if cout <= (FUSED_TF32_COUT if tf32 else 64) else 2) <= MAX_EVAL_LAUNCHES, dw
    assert 1 <= len(lka) <= MAX_EVAL_LAUNCHES, lka


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["dwconv_bn_act-24", "dwconv_bn_act-80", "lka_gate"])
def test_eval_forward_replays_in_a_cuda_graph(op, dtype):
    g = torch.Generator().manual_seed(5)
    if op == "lka_gate":
        x, p = lka_inputs(2, 40, 18, 22, 5, 7, g)
        weights = _cuda(p, dtype)

        def fn(inp):
            return ops.lka_gate(inp, *weights, dilation=3)
    else:
        x, p = dwconv_inputs(2, 32, int(op.split("-")[1]), 18, 22, 3, 0.0, g)
        params = _cuda(p[:4], dtype) + _cuda(p[4:])

        def fn(inp):
            return _dwconv_eval(inp, params)
    static_x = x.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    with ops.use_backend("cuda"), torch.no_grad():
        graph, static_out = graphed(fn, static_x)
        for seed in (1, 2):
            static_x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_out, fn(static_x)), (op, dtype, seed)  # deterministic kernels: bit for bit
