"""lka_gate: the reference against nn modules, the custom-op plumbing, and every fused backend
against the float64 reference (output and every gradient)."""
from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

from dlkunet import ops
from dlkunet.ops import library, reference
from dlkunet_testing import BUDGET, HAS_CUDA, fused_backends, layout, poisoned_allocations, rel_err

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
LKA, LKA1, LKA2 = (5, 7, 3), (3, 7, 3), (5, 5, 3)  # the paper's default and its two ablations

# (N, C, H, W, (k0, ks, dilation), dtype, layout)
CASES = [
    (2, 3, 7, 9, LKA, F32, "contiguous"),
    (1, 4, 2, 3, LKA, F32, "channels_last"),
    (2, 17, 11, 6, LKA1, F32, "strided"),
    (1, 8, 13, 10, LKA2, F32, "contiguous"),
    (1, 5, 1, 1, LKA, F32, "contiguous"),
    (2, 16, 12, 12, LKA, F16, "channels_last"),
    (2, 16, 9, 14, LKA2, BF16, "contiguous"),
    (3, 12, 20, 21, LKA1, BF16, "strided"),
    # wide enough for the cpu kernels' blocked interior (every tap inside) at dilation 3, and
    # 40 channels: vector blocks plus a ragged channel tail
    (1, 40, 9, 29, LKA, F32, "channels_last"),
]
GPU_CASES = [
    (2, 96, 56, 56, LKA, F32, "contiguous"),
    (2, 192, 28, 28, LKA, BF16, "channels_last"),
    (4, 130, 23, 17, LKA1, F32, "channels_last"),
    (2, 384, 14, 14, LKA2, F16, "contiguous"),
]
GRAD_NAMES = ("x", "w0", "b0", "ws", "bs", "w1", "b1")


def _case_id(case):
    n, c, h, w, (k0, ks, d), dtype, lay = case
    return f"{n}x{c}x{h}x{w}-lka{k0}.{ks}d{d}-{str(dtype)[6:]}-{lay}"


def make_params(c, kernels, generator=None):
    k0, ks, _ = kernels
    g = generator
    return dict(
        w0=torch.randn(c, 1, k0, k0, dtype=torch.float64, generator=g) / k0,
        b0=torch.randn(c, dtype=torch.float64, generator=g) * 0.1,
        ws=torch.randn(c, 1, ks, ks, dtype=torch.float64, generator=g) / ks,
        bs=torch.randn(c, dtype=torch.float64, generator=g) * 0.1,
        w1=torch.randn(c, c, 1, 1, dtype=torch.float64, generator=g) / c ** 0.5,
        b1=torch.randn(c, dtype=torch.float64, generator=g) * 0.1,
    )


def _run_and_check(case, backend, device):
    n, c, h, w, kernels, dtype, lay = case
    g = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))  # stable across processes
    x64 = torch.randn(n, c, h, w, dtype=torch.float64, generator=g)
    p64 = make_params(c, kernels, g)
    gout64 = torch.randn(n, c, h, w, dtype=torch.float64, generator=g)
    x = layout(x64.to(device, dtype), lay).detach().requires_grad_()
    p = {name: t.to(device, dtype).requires_grad_() for name, t in p64.items()}
    with ops.use_backend(backend), poisoned_allocations():
        out = ops.lka_gate(x, **p, dilation=kernels[2])
        out.backward(layout(gout64.to(device, dtype), lay))
    assert out.dtype == dtype and out.shape == x.shape
    if lay == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last), "output should keep channels_last"

    r = {name: t.detach().double().cpu().requires_grad_() for name, t in p.items()}
    r["x"] = x.detach().double().cpu().requires_grad_()
    ref = reference.lka_gate(r["x"], r["w0"], r["b0"], r["ws"], r["bs"], r["w1"], r["b1"], kernels[2])
    ref.backward(gout64.to(dtype).double())

    errors = {"out": rel_err(out, ref)}
    for name in GRAD_NAMES:
        errors[f"grad_{name}"] = rel_err((x if name == "x" else p[name]).grad, r[name].grad)
    budget = BUDGET[dtype]
    bad = {k: e for k, e in errors.items() if not e <= budget}
    assert not bad, f"relative errors over the {budget:g} budget: {bad}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend,device", fused_backends())
def test_fused_backend_matches_float64_reference(backend, device, case):
    _run_and_check(case, backend, device)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
@pytest.mark.parametrize("backend,device", [p for p in fused_backends() if p.values[1] == "cuda"])
def test_fused_backend_matches_float64_reference_real_shapes(backend, device, case):
    _run_and_check(case, backend, device)


# --- the reference itself ----------------------------------------------------------------------

def _nn_lka(c, kernels):
    k0, ks, d = kernels
    return (nn.Conv2d(c, c, k0, padding=(k0 - 1) // 2, groups=c), nn.Conv2d(c, c, ks, padding=d * (ks - 1) // 2,
            dilation=d, groups=c), nn.Conv2d(c, c, 1))


@pytest.mark.parametrize("kernels", [LKA, LKA1, LKA2], ids=["lka", "lka1", "lka2"])
def test_reference_equals_nn_modules(kernels):
    torch.manual_seed(0)
    conv0, conv_spatial, conv1 = _nn_lka(6, kernels)
    x = torch.randn(2, 6, 11, 8)
    want = x * conv1(conv_spatial(conv0(x)))
    with ops.use_backend("torch"):
        got = ops.lka_gate(x, conv0.weight, conv0.bias, conv_spatial.weight, conv_spatial.bias, conv1.weight,
                           conv1.bias, dilation=kernels[2])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_two_convolutions_differ_from_one_composed_kernel_at_the_border():
    """The spec's warning, checked: a1 is zero-padded before the dilated conv, so folding both
    depthwise kernels into one 23x23 kernel changes the border values.  The reference must be
    the two-convolution function."""
    torch.manual_seed(1)
    c = 2
    w0, b0 = torch.randn(c, 1, 5, 5, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    ws, bs = torch.randn(c, 1, 7, 7, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    eye = torch.eye(c, dtype=torch.float64).view(c, c, 1, 1)
    x = torch.randn(1, c, 30, 30, dtype=torch.float64)
    out = reference.lka_gate(x, w0, b0, ws, bs, eye, torch.zeros(c, dtype=torch.float64), 3) / x
    # compose: a 23x23 kernel = dilated ws convolved with w0
    big = torch.zeros(c, 1, 23, 23, dtype=torch.float64)
    for i in range(7):
        for j in range(7):
            big[:, :, 3 * i:3 * i + 5, 3 * j:3 * j + 5] += ws[:, :, i:i + 1, j:j + 1] * w0
    composed = torch.nn.functional.conv2d(x, big, padding=11, groups=c)
    interior = (slice(None), slice(None), slice(11, -11), slice(11, -11))
    torch.testing.assert_close(out[interior], composed[interior])
    assert (out - composed).abs().max() > 1e-3


def test_fused_path_equals_nn_modules(reference_kernels_as_fused_backend):
    """The custom-op path of every fused backend, driven by the reference kernels, against nn modules."""
    torch.manual_seed(2)
    conv0, conv_spatial, conv1 = _nn_lka(5, LKA)
    x = torch.randn(2, 5, 9, 7, requires_grad=True)
    gout = torch.randn(2, 5, 9, 7)
    params = [conv0.weight, conv0.bias, conv_spatial.weight, conv_spatial.bias, conv1.weight, conv1.bias]
    want = x * conv1(conv_spatial(conv0(x)))
    want_grads = torch.autograd.grad(want, [x] + params, gout)
    got = ops.lka_gate(x, *params, dilation=3)
    got_grads = torch.autograd.grad(got, [x] + params, gout)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["reference", "library-torch", "library-cpu"])
def test_gradcheck_float64(path):
    if path == "library-cpu":
        ok, why = ops.availability("cpu", "cpu")
        if not ok:
            pytest.skip(f"cpu backend unavailable: {why}")
    torch.manual_seed(3)
    inputs = [torch.randn(1, 3, 6, 5, dtype=torch.float64)] + list(make_params(3, LKA).values())
    inputs = [t.requires_grad_() for t in inputs]
    if path == "reference":
        fn = lambda *a: reference.lka_gate(*a, 3)  # noqa: E731
    else:
        fn = lambda *a: library.lka_gate_forward(*a, 3, path.split("-")[1])  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)
