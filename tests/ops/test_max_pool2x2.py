"""max_pool2x2: the reference against nn.MaxPool2d, the cpu kernel against ATen's pooling (bit for
bit: pooling picks a value, so any difference is a bug), its gradient through the custom op's
autograd, when each path runs, the custom op's registration (opcheck), and the checks of its input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlkunet import ops
from dlkunet.ops import library, reference
from dlkunet_testing import backends_run

CL = torch.channels_last
HAS_CPU = ops.availability("cpu", "cpu")[0]
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason=f"cpu backend unavailable: {ops.availability('cpu', 'cpu')[1]}")

# (N, C, H, W): odd sizes (the last row / column is dropped), the smallest map, one channel, an
# odd channel count, and a map large enough for the output cache (over 1 MB).
SHAPES = [(2, 5, 9, 7), (1, 3, 2, 2), (3, 1, 6, 11), (2, 96, 56, 57), (1, 33, 5, 4)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _input(shape, dtype, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = torch.round(x * 4) / 4  # ties inside windows
    flat = x.view(-1)
    picks = torch.randperm(flat.numel(), generator=g)[:6]
    flat[picks[:2]] = float("nan")
    flat[picks[2:4]] = float("inf")
    flat[picks[4:]] = float("-inf")
    return x.to(dtype).contiguous(memory_format=fmt)


def _same(a, b):
    return (a.shape == b.shape and a.stride() == b.stride() and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(0.0, 0.0, 0.0), b.nan_to_num(0.0, 0.0, 0.0)))


def _spied(x):
    with backends_run("max_pool2x2_forward") as ran:
        out = ops.max_pool2x2(x)
    return out, ran


def test_reference_is_the_module_it_replaces():
    x = _input((2, 5, 9, 7), torch.float64, torch.contiguous_format, 0)
    assert _same(reference.max_pool2x2(x), nn.MaxPool2d(2)(x))


@needs_cpu
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_is_atens_pooling(shape, dtype, fmt):
    x = _input(shape, dtype, fmt, seed=sum(shape))
    with ops.use_backend("cpu"), torch.no_grad():
        out, ran = _spied(x)
        again = ops.max_pool2x2(x)  # a block back from the output cache, holding the first result
    assert ran == ["cpu"], "the cpu kernel should have run"
    expected = F.max_pool2d(x, 2)
    assert _same(out, expected) and _same(again, expected)


@needs_cpu
def test_strided_input_is_pooled_as_its_values():
    x = _input((2, 8, 12, 10), torch.float32, torch.contiguous_format, 1)[:, ::2, 1:]  # not dense
    with ops.use_backend("cpu"), torch.no_grad():
        out = ops.max_pool2x2(x)
    assert torch.equal(out.nan_to_num(0.0), F.max_pool2d(x.contiguous(), 2).nan_to_num(0.0))


@needs_cpu
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_gradient_is_atens(fmt):
    """The backward recomputes the argmax: ties send the gradient where ATen's does."""
    x = _input((2, 6, 9, 8), torch.float64, fmt, 2).nan_to_num(0.0, 3.0, -3.0)
    grad = torch.randn(2, 6, 4, 4, dtype=torch.float64).contiguous(memory_format=fmt)
    ours, eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    with ops.use_backend("cpu"):
        out, ran = _spied(ours)
    assert ran == ["cpu"]
    out.backward(grad)
    F.max_pool2d(eager, 2).backward(grad)
    assert torch.equal(ours.grad, eager.grad)


@needs_cpu
def test_auto_takes_the_kernel_for_inference_only():
    x = _input((1, 4, 8, 8), torch.float32, CL, 3)
    with ops.use_backend("auto"):
        with torch.no_grad():
            _, ran = _spied(x)
        assert ran == ["cpu"]
        _, ran = _spied(x.clone().requires_grad_())
        assert ran == [], "training keeps ATen's pooling, whose forward saves the argmax"


@needs_cpu
def test_opcheck():
    x = _input((2, 3, 6, 5), torch.float64, CL, 4).nan_to_num(0.0, 3.0, -3.0).requires_grad_()
    torch.library.opcheck(library.max_pool2x2_forward, (x, "cpu"))


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, 1, 5), r"max_pool2x2: x must be at least 2x2 to pool, got shape \(2, 3, 1, 5\)"),
    (torch.zeros(3, 4, 4), "max_pool2x2: x must be 4-D"),
    (torch.zeros(1, 2, 4, 4, dtype=torch.int32), "max_pool2x2: x must be float32"),
])
def test_bad_inputs_are_named(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ops.max_pool2x2(bad)
