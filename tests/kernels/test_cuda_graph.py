"""The Triton forward paths (eval and training) and backward passes inside a CUDA graph (issue 13):
captured once, replayed on new inputs, they give what a direct call gives.  Needs a GPU (the
interpreter has no graphs)."""
from __future__ import annotations

import pytest
import torch

from dlkunet import ops
from dlkunet.ops import availability, reference
from dlkunet_testing import BUDGET, dwconv_inputs, graphed, lka_inputs, rel_err

ok, why = availability("triton", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=f"triton backend unavailable on CUDA: {why}")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plan", ["fused", "split", "split_cublas"])
def test_eval_dwconv_bn_act_replays_in_a_cuda_graph(plan, dtype):
    from dlkunet.kernels import plans
    g = torch.Generator().manual_seed(4)
    x, p = dwconv_inputs(4, 32, 48, 20, 24, 3, 0.0, g)
    conv = [t.to("cuda", dtype) for t in p[:4]]
    bn = [t.float().cuda() for t in p[4:]]
    fmt = torch.channels_last

    def fn(inp):
        return ops.dwconv_bn_act(inp, *conv, *bn, training=False)
    static_x = x.to("cuda", dtype).contiguous(memory_format=fmt)
    with ops.use_backend("triton"), plans.forced(plan), torch.no_grad():
        graph, static_out = graphed(fn, static_x)
        for seed in (1, 2):
            fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)
            static_x.copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            if plan == "split_cublas":  # cuBLAS may pick another algorithm under capture: judge by float64
                want = reference.dwconv_bn_act_forward(fresh.double().cpu(), *[t.double().cpu() for t in p[:4]],
                                                       *[t.double().cpu() for t in bn], False, 1e-5, True)[0]
                assert rel_err(static_out, want) <= BUDGET[dtype], (plan, dtype, seed)
            else:  # our kernels are deterministic: the replay is the direct call, bit for bit
                assert torch.equal(static_out, fn(static_x)), (plan, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_dwconv_bn_act_forward_replays_in_a_cuda_graph(dtype):
    """The training forward (statistics merged on the device, no host sync) captured and replayed:
    the output and the batch statistics of a direct call, bit for bit."""
    from dlkunet import kernels
    g = torch.Generator().manual_seed(5)
    x, p = dwconv_inputs(4, 32, 48, 20, 24, 3, 0.0, g)
    params = [t.to("cuda", dtype) for t in p[:4]] + [t.float().cuda() for t in p[4:]]

    def fn(inp):
        return kernels.dwconv_bn_act_forward(inp, *params, True, 1e-5, True)
    static_x = x.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    graph, static_out = graphed(fn, static_x)
    for seed in (7, 8):
        static_x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(static_out, fn(static_x)):
            assert torch.equal(got, want), (dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plan", ["fused", "split", "chain"])
def test_lka_gate_replays_in_a_cuda_graph(plan, dtype):
    from dlkunet.kernels import plans
    g = torch.Generator().manual_seed(6)
    x, p = lka_inputs(2, 40, 18, 22, 5, 7, g)
    weights = [t.to("cuda", dtype) for t in p]

    def fn(inp):
        return ops.lka_gate(inp, *weights, dilation=3)
    static_x = x.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
    with ops.use_backend("triton"), plans.forced(plan), torch.no_grad():
        graph, static_out = graphed(fn, static_x)
        for seed in (3, 4):
            static_x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_out, fn(static_x)), (plan, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_passes_replay_in_a_cuda_graph(dtype):
    """Both backwards (every reduction merged on the device, BatchNorm's factors formed in the
    kernels: no host sync) captured and replayed on new output gradients: every gradient of a
    direct call, bit for bit."""
    from dlkunet import kernels
    g = torch.Generator().manual_seed(10)
    cl = torch.channels_last
    x, p = dwconv_inputs(4, 32, 48, 20, 24, 3, 0.0, g)
    xc = x.to("cuda", dtype).contiguous(memory_format=cl)
    params = [t.to("cuda", dtype) for t in p[:4]] + [t.float().cuda() for t in p[4:]]
    _, mean, var = kernels.dwconv_bn_act_forward(xc, *params, True, 1e-5, True)
    xl, pl = lka_inputs(2, 40, 18, 22, 5, 7, g)
    xl = xl.to("cuda", dtype).contiguous(memory_format=cl)
    weights = [t.to("cuda", dtype) for t in pl]

    def dwconv_backward(gy):
        return kernels.dwconv_bn_act_backward(gy, xc, *params[:6], mean, var, True, 1e-5, True)

    def lka_backward(go):
        return kernels.lka_gate_backward(go, xl, *weights, 3)
    for fn, shape in ((dwconv_backward, (4, 48, 20, 24)), (lka_backward, tuple(xl.shape))):
        static = torch.randn(shape, generator=g).to("cuda", dtype).contiguous(memory_format=cl)
        graph, static_out = graphed(fn, static)
        for seed in (11, 12):
            static.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype))
            graph.replay()
            torch.cuda.synchronize()
            for i, (got, want) in enumerate(zip(static_out, fn(static))):
                assert torch.equal(got, want), (fn.__name__, dtype, seed, i)
