"""upsample_concat: the reference against the nn modules it replaces, the cpu kernel against the
float64 reference (output and every gradient, through the custom op's autograd), when each path
runs, the custom op's registration (opcheck), and the checks of its inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlkunet import ops
from dlkunet.ops import library, reference
from dlkunet_testing import BUDGET, backends_run, rel_err

CL = torch.channels_last
HAS_CPU = ops.availability("cpu", "cpu")[0]
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason=f"cpu backend unavailable: {ops.availability('cpu', 'cpu')[1]}")

# (N, Cin, h, w, Cout, Cs, H, W): exact fits, odd skips (one row / column of padding, split as
# the authors' auto-resize splits it), padding on both sides, a skip wider than the map, a larger
# map, and one large enough for the tiled plan (GEMM output over the whole-batch limit, with a
# partial 16-column panel and padding).
CASES = [
    (2, 8, 5, 6, 4, 4, 10, 12),
    (1, 8, 5, 6, 4, 3, 11, 13),
    (3, 16, 3, 4, 8, 5, 9, 11),
    (1, 6, 1, 2, 3, 2, 2, 5),
    (1, 96, 40, 44, 48, 48, 80, 88),
    (1, 16, 64, 64, 136, 8, 130, 129),
]
WHOLE_BATCH_BYTES = 8 << 20  # csrc/cpu/upsample_concat.cpp kWholeBatchBytes: larger GEMM outputs go by tiles


def test_cases_reach_both_plans():
    """The kernel's two plans (one whole-batch GEMM, tiles) each get cases, in both dtypes."""
    for itemsize in (4, 8):
        sizes = [n * h * w * 4 * cout * itemsize for n, _, h, w, cout, *_ in CASES]
        assert min(sizes) <= WHOLE_BATCH_BYTES < max(sizes)


def _inputs(case, dtype, generator):
    n, cin, h, w, cout, cs, hs, ws = case

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    deep = r(n, cin, h, w).contiguous(memory_format=CL)
    skip = r(n, cs, hs, ws).contiguous(memory_format=CL)
    return deep, skip, r(cin, cout, 2, 2, scale=cin ** -0.5), r(cout, scale=0.1)


def test_reference_is_the_modules_it_replaces():
    g = torch.Generator().manual_seed(0)
    up = nn.ConvTranspose2d(8, 4, kernel_size=2, stride=2).double()
    deep, skip = torch.randn(2, 8, 5, 6, generator=g).double(), torch.randn(2, 3, 11, 13, generator=g).double()
    u = up(deep)
    expected = torch.cat([skip, F.pad(u, [0, 1, 0, 1])], dim=1)  # 11 - 10 = 1 row: below; 13 - 12: right
    assert torch.equal(reference.upsample_concat(deep, skip, up.weight, up.bias), expected)
    crop_skip = skip[:, :, :9, :11]  # smaller than the upsampled map: a negative pad, top and left first
    expected = torch.cat([crop_skip, u[:, :, 1:, 1:]], dim=1)
    assert torch.equal(reference.upsample_concat(deep, crop_skip, up.weight, up.bias), expected)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_cpu_kernel_matches_float64_reference(case, dtype):
    g = torch.Generator().manual_seed(sum(case))
    inputs = _inputs(case, dtype, g)
    leaves = [t.detach().requires_grad_() for t in inputs]
    with backends_run("upsample_concat_forward") as ran, ops.use_backend("cpu"):
        out = ops.upsample_concat(*leaves)
    assert ran == ["cpu"], "the cpu kernel should have run"
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference.upsample_concat(*ref_leaves)
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous(memory_format=CL)
    assert rel_err(out, ref) <= BUDGET[dtype]
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for name, a, b in zip(("deep", "skip", "weight", "bias"), leaves, ref_leaves):
        assert a.grad is not None and rel_err(a.grad, b.grad) <= BUDGET[dtype], name


@needs_cpu
def test_padding_is_zero_even_over_reused_memory():
    """The cached output blocks hold old values: every padding element must still be written."""
    g = torch.Generator().manual_seed(3)
    deep, skip, w, b = _inputs((1, 32, 40, 40, 64, 16, 83, 85), torch.float32, g)
    with ops.use_backend("cpu"):
        for _ in range(2):  # the second call gets the first output's (non-zero) block back
            out = ops.upsample_concat(deep, skip, w, b)
            expected = reference.upsample_concat(deep, skip, w, b)
            assert rel_err(out, expected) <= BUDGET[torch.float32]
            assert out[:, 16:, 81:].abs().max() == 0 and out[:, 16:, :, :2].abs().max() == 0
            del out


@needs_cpu
@pytest.mark.parametrize("variant", ["nchw", "float16", "crop"])
def test_inputs_the_kernel_does_not_take_run_the_reference(variant):
    g = torch.Generator().manual_seed(4)
    deep, skip, w, b = _inputs((1, 8, 5, 6, 4, 4, 10, 12), torch.float32, g)
    if variant == "nchw":
        deep, skip = deep.contiguous(), skip.contiguous()
    elif variant == "float16":
        deep, skip, w, b = (t.half() for t in (deep, skip, w, b))
    else:
        skip = skip[:, :, :9, :11]
    assert not library.upsample_concat_runs_on_cpu(deep, skip, w)
    with ops.use_backend("cpu"):
        out = ops.upsample_concat(deep, skip, w, b)
    assert torch.equal(out, reference.upsample_concat(deep, skip, w, b))


@needs_cpu
def test_opcheck():
    g = torch.Generator().manual_seed(5)
    deep, skip, w, b = (t.requires_grad_() for t in _inputs((2, 6, 3, 4, 5, 3, 7, 9), torch.float64, g))
    torch.library.opcheck(library.upsample_concat_forward, (deep, skip, w, b, "cpu"))


@pytest.mark.parametrize("bad, message", [
    (dict(skip=torch.zeros(3, 4, 10, 12)), "skip has batch size 3 but deep has 2"),
    (dict(skip=torch.zeros(2, 4, 10)), "skip must be 4-D"),
    (dict(skip=torch.zeros(2, 4, 10, 12, dtype=torch.float64)), "skip has dtype torch.float64"),
    (dict(weight=torch.zeros(8, 4, 3, 3)), "weight must have shape (8, Cout, 2, 2)"),
    (dict(weight=torch.zeros(7, 4, 2, 2)), "weight must have shape (8, Cout, 2, 2)"),
    (dict(bias=torch.zeros(5)), "bias must have shape 4"),
])
def test_bad_inputs_are_named(bad, message):
    args = dict(deep=torch.zeros(2, 8, 5, 6), skip=torch.zeros(2, 4, 10, 12), weight=torch.zeros(8, 4, 2, 2),
                bias=torch.zeros(4))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.upsample_concat(**args)
