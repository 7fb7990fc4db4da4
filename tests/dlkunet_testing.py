"""Helpers shared by the test suite: backends to test, error measures, input makers."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from dlkunet.ops import availability
from dlkunet.ops import reference as _reference

# Relative-error budgets of docs/design.md, "Verification" (float32 without TF32; half types).
BUDGET = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

HAS_CUDA = torch.cuda.is_available()


def fused_backends() -> List:
    """pytest params (backend, device) for every fused backend; unavailable ones skip with the reason."""
    params = []
    for name, device in (("triton", "cuda" if HAS_CUDA else "cpu"), ("cpu", "cpu"), ("cuda", "cuda")):
        ok, why = availability(name, device)
        marks = [pytest.mark.skipif(not ok, reason=f"{name} backend unavailable: {why}")]
        if device == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, device, marks=marks, id=name))
    return params


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN/inf give inf, so they never pass)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = float(ref64.norm()) if scale is None else scale
    return float((out64 - ref64).norm()) / max(denom, 1e-300)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` in memory layout ``kind``: contiguous, channels_last or strided."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # a view with a gap between rows: neither layout is contiguous
        n, c, h, w = t.shape
        big = torch.empty(n, c, h, w + 3, dtype=t.dtype, device=t.device).normal_()
        big[..., 1:w + 1] = t
        view = big[..., 1:w + 1]
        assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
        return view
    raise ValueError(kind)


@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty inside is filled with NaN (PyTorch's deterministic-mode fill), so an
    output element a kernel forgot to write shows up as NaN and fails the comparison."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@contextlib.contextmanager
def backends_run(op: str):
    """Records the backend of each call of ``dlkunet.ops.library.<op>`` (a custom op taking the
    backend's name last) made inside the block: a list, filled as the calls happen."""
    from dlkunet.ops import library

    ran = []
    real = getattr(library, op)

    def spy(*args):
        ran.append(args[-1])
        return real(*args)

    setattr(library, op, spy)
    try:
        yield ran
    finally:
        setattr(library, op, real)


def load_benchmark_module(name: str):
    """benchmarks/<name>.py, imported by path under a private name (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_dlkunet_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def dwconv_inputs(n, cin, cout, h, w, k, offset, g):
    """float64 x and the 8 parameters of dwconv_bn_act (b_pw around ``offset``)."""
    x = torch.randn(n, cin, h, w, dtype=torch.float64, generator=g)
    p = [torch.randn(cin, 1, k, k, dtype=torch.float64, generator=g) / k,
         torch.randn(cin, dtype=torch.float64, generator=g) * 0.1,
         torch.randn(cout, cin, 1, 1, dtype=torch.float64, generator=g) / cin ** 0.5,
         offset + torch.randn(cout, dtype=torch.float64, generator=g),
         1 + 0.2 * torch.randn(cout, dtype=torch.float64, generator=g),
         0.1 * torch.randn(cout, dtype=torch.float64, generator=g),
         0.1 * torch.randn(cout, dtype=torch.float64, generator=g),
         0.5 + torch.rand(cout, dtype=torch.float64, generator=g)]
    return x, p


def graphed(fn, static_x):
    """fn captured in a CUDA graph on static_x, after two warm-up calls on a side stream (PyTorch's
    recipe: the first calls compile kernels, read plan tables and allocate)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)
    return graph, static_out


def lka_inputs(n, c, h, w, k0, ks, g):
    """float64 x and the 6 parameters of lka_gate (k0 x k0 and ks x ks depthwise kernels)."""
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=g)
    p = [torch.randn(c, 1, k0, k0, dtype=torch.float64, generator=g) / k0,
         torch.randn(c, dtype=torch.float64, generator=g) * 0.1,
         torch.randn(c, 1, ks, ks, dtype=torch.float64, generator=g) / ks,
         torch.randn(c, dtype=torch.float64, generator=g) * 0.1,
         torch.randn(c, c, 1, 1, dtype=torch.float64, generator=g) / c ** 0.5,
         torch.randn(c, dtype=torch.float64, generator=g) * 0.1]
    return x, p


# Eager PyTorch with TF32 on (torch.backends.cudnn.allow_tf32), the yardstick of TF32 kernels.

def tf32_round(t):
    """float32 rounded to TF32 (round to nearest even at 10 mantissa bits)."""
    b = t.float().contiguous().view(torch.int32)
    return ((b + 0xFFF + ((b >> 13) & 1)) & -8192).view(torch.float32)


def eager_tf32_dwconv(x, p, eps, training=False):
    """Eager dwconv_bn_act in float32 with TF32 on, against which TF32 kernels are judged: the
    pointwise conv's operands rounded to TF32 (as cuDNN converts them), float32 elsewhere (training:
    BatchNorm with the batch statistics of that z).  Emulated on every device: on a GPU cuDNN picks a
    non-TF32 algorithm for shapes this small (measured on an H200: error 1.2e-7, float32's), which
    would judge TF32 kernels by float32's budget."""
    w_dw, b_dw, w_pw, b_pw, gamma, beta, rm, rv = [t.float() for t in p]
    d = _reference.depthwise_conv(x.float(), w_dw, b_dw)
    z = torch.nn.functional.conv2d(tf32_round(d), tf32_round(w_pw), b_pw)
    if training:
        rv, rm = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    y = (z - rm.view(1, -1, 1, 1)) * torch.rsqrt(rv + eps).view(1, -1, 1, 1) * gamma.view(1, -1, 1, 1)
    return torch.relu(y + beta.view(1, -1, 1, 1))


def eager_tf32_lka(x, p, dil):
    """Eager lka_gate in float32 with TF32 on, emulated as ``eager_tf32_dwconv`` is."""
    w0, b0, ws, bs, w1, b1 = [t.float() for t in p]
    a2 = _reference.depthwise_conv(_reference.depthwise_conv(x.float(), w0, b0), ws, bs, dil)
    return x.float() * torch.nn.functional.conv2d(tf32_round(a2), tf32_round(w1), b1)


# Eager PyTorch in a tensor-core precision (TF32 for float32, the input dtype for 16-bit), forward
# and backward: the yardstick of MMA kernels' gradients.  As in eager, every op's output (each
# conv's, BN's, the gate's) and the gradient each op's backward returns are stored in the input's
# dtype: rounded to it (float64 arithmetic otherwise); parameter gradients are left unrounded.

def mma_rounding(dtype):
    """How a tensor-core MMA of the mode sees a float operand (float64 in, float64 out)."""
    if dtype == torch.float32:  # TF32: 10 mantissa bits, round to nearest (cuDNN's and our conversion)
        return lambda t: tf32_round(t).double()
    return lambda t: t.to(dtype).double()


class RoundedPointwise(torch.autograd.Function):
    """A 1x1 conv whose forward product and both backward products see their operands rounded by
    `rnd` (float64 arithmetic otherwise): eager's pointwise conv in that precision."""

    @staticmethod
    def forward(ctx, a, w, rnd):
        ctx.save_for_backward(a, w)
        ctx.rnd = rnd
        return torch.nn.functional.conv2d(rnd(a), rnd(w))

    @staticmethod
    def backward(ctx, g):
        a, w = ctx.saved_tensors
        rnd, gr = ctx.rnd, ctx.rnd(g)
        grad_a = torch.nn.functional.conv_transpose2d(gr, rnd(w))
        grad_w = torch.einsum("nohw,nchw->oc", gr, rnd(a)).view_as(w)
        return grad_a, grad_w, None


class _Stored(torch.autograd.Function):
    """An op's output as eager stores it: rounded to `dtype`, and so the gradient its backward
    hands on (float64 tensors in and out)."""

    @staticmethod
    def forward(ctx, t, dtype):
        ctx.dtype = dtype
        return t.to(dtype).double()

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).double(), None


def _stored_as(dtype):
    def stored(t):
        return _Stored.apply(t, dtype)
    return stored


def _leaves(ts):
    return [t.detach().double().clone().requires_grad_() for t in ts]


def eager_mma_dwconv(d, rm, rv, training, eps, relu, gy, dtype):
    """Emulated eager dwconv_bn_act in the MMA precision of `dtype`: (y, grads), float64."""
    rnd, out = mma_rounding(dtype), (lambda t: t.to(dtype).double())
    stored = _stored_as(dtype)
    x, w_dw, b_dw, w_pw, b_pw, gamma, beta = _leaves(d)
    z = stored(RoundedPointwise.apply(stored(_reference.depthwise_conv(x, w_dw, b_dw)), w_pw, rnd)
               + b_pw.view(1, -1, 1, 1))
    y = torch.nn.functional.batch_norm(z, rm.double().clone(), rv.double().clone(), gamma, beta, training, 0.0, eps)
    y = torch.nn.functional.relu(stored(y)) if relu else stored(y)
    y.backward(gy.double())
    mean, var = (z.detach().mean((0, 2, 3)), z.detach().var((0, 2, 3), unbiased=False)) if training else (None, None)
    return out(y.detach()), mean, var, [out(x.grad)] + [t.grad for t in (w_dw, b_dw, w_pw, b_pw, gamma, beta)]


def eager_mma_lka(d, dil, go, dtype):
    """Emulated eager lka_gate in the MMA precision of `dtype`: (out, grads), float64."""
    rnd, out = mma_rounding(dtype), (lambda t: t.to(dtype).double())
    stored = _stored_as(dtype)
    x, w0, b0, wsd, bs, w1, b1 = _leaves(d)
    a1 = stored(_reference.depthwise_conv(x, w0, b0))
    a2 = stored(_reference.depthwise_conv(a1, wsd, bs, dil))
    o = stored(x * stored(RoundedPointwise.apply(a2, w1, rnd) + b1.view(1, -1, 1, 1)))
    o.backward(go.double())
    return out(o.detach()), [out(x.grad)] + [t.grad for t in (w0, b0, wsd, bs, w1, b1)]
