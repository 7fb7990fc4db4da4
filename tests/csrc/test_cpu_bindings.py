"""The CPU kernels' bindings in dlkunet._C, called directly: bad inputs raise a clear Python error
(never a crash), and good inputs give the reference's values without touching the inputs.

Numerics over the full grid of shapes/dtypes/layouts live in tests/ops (every backend); here a
few small cases check the binding-level contract the ops layer relies on.
"""
from __future__ import annotations

import pytest
import torch

from dlkunet.ops import extension, reference
from dlkunet_testing import BUDGET

_C, _why = extension.load_extension()
_missing = _why or extension.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"CPU kernels of dlkunet._C unavailable: {_missing}")

F64 = torch.float64


def _dw_args(n=2, cin=3, cout=5, h=6, w=7, k=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype)  # noqa: E731
    x, wd, bd, wp, bp = r(n, cin, h, w), r(cin, 1, k, k), r(cin), r(cout, cin, 1, 1), r(cout)
    gamma, beta = r(cout).abs() + 0.5, r(cout)
    rm, rv = r(cout) * 0.1, r(cout).abs() + 0.5
    return [x, wd, bd, wp, bp, gamma, beta, rm, rv]


def _lka_args(n=2, c=4, h=9, w=8, k0=5, ks=7, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype)  # noqa: E731
    return [r(n, c, h, w), r(c, 1, k0, k0), r(c), r(c, 1, ks, ks), r(c), r(c, c, 1, 1), r(c)]


def _dw_fwd(args, training=True, eps=1e-5, relu=True):
    return _C.cpu_dwconv_bn_act_forward(*args, training, eps, relu)


def _dw_bwd(args, grad_y=None, training=True, eps=1e-5, relu=True):
    x, wd, bd, wp, bp, gamma, beta, m, v = args
    if grad_y is None:
        grad_y = torch.randn(x.shape[0], wp.shape[0], *x.shape[2:], dtype=x.dtype)
    return _C.cpu_dwconv_bn_act_backward(grad_y, x, wd, bd, wp, bp, gamma, beta, m, v, training, eps, relu)


def _lka_fwd(args, dilation=3):
    return _C.cpu_lka_gate_forward(*args, dilation)


def _lka_bwd(args, grad_out=None, dilation=3):
    if grad_out is None:
        grad_out = torch.randn_like(args[0])
    return _C.cpu_lka_gate_backward(grad_out, *args, dilation)


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ---- unsafe inputs: a RuntimeError from DLK_CHECK, never a crash -------------------------------
# (User-facing messages are dlkunet/ops/validation.py's; the kernels check only what keeps them
# memory-safe, so a dtype mismatch between x and a weight is converted, not refused.)

UNSAFE = "dlkunet cpu kernel: unsafe arguments"


def _replace(args, i, value):
    out = list(args)
    out[i] = value
    return out


DW_BAD = [
    ("x on the meta device", lambda a: _replace(a, 0, a[0].to("meta")), "x"),
    ("w_pw on the meta device", lambda a: _replace(a, 3, a[3].to("meta")), "w_pw"),
    ("integer x", lambda a: _replace(a, 0, a[0].to(torch.int32)), "x"),
    ("3-D x", lambda a: _replace(a, 0, a[0][0]), "x"),
    ("empty x", lambda a: _replace(a, 0, a[0][:0]), "x"),
    ("even depthwise kernel", lambda a: _replace(a, 1, torch.randn(3, 1, 4, 4)), "w_dw"),
    ("non-square depthwise kernel", lambda a: _replace(a, 1, torch.randn(3, 1, 3, 5)), "w_dw"),
    ("depthwise kernel over kMaxKernel", lambda a: _replace(a, 1, torch.randn(3, 1, 65, 65)), "w_dw"),
    ("depthwise channel mismatch", lambda a: _replace(a, 1, torch.randn(4, 1, 3, 3)), "w_dw"),
    ("2-D pointwise weight", lambda a: _replace(a, 3, a[3].flatten(1)), "w_pw"),
    ("pointwise Cin mismatch", lambda a: _replace(a, 3, torch.randn(5, 4, 1, 1)), "w_pw"),
    ("b_dw of the wrong length", lambda a: _replace(a, 2, torch.randn(4)), "b_dw"),
    ("gamma of the wrong length", lambda a: _replace(a, 5, torch.randn(6)), "gamma"),
    ("running_var of rank 2", lambda a: _replace(a, 8, a[8].view(5, 1)), "var"),
]


@pytest.mark.parametrize("what,mutate,name", DW_BAD, ids=[c[0] for c in DW_BAD])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_dwconv_unsafe_inputs_raise(what, mutate, name, direction):
    args = mutate(_dw_args())
    with pytest.raises(RuntimeError, match=f"{UNSAFE}.*{name}"):
        if direction == "forward":
            _dw_fwd(args)
        else:
            x = args[0]
            gy = torch.randn(2, 5, 6, 7) if x.dim() != 4 or x.numel() == 0 or x.device.type != "cpu" or \
                not x.is_floating_point() else torch.randn(x.shape[0], 5, *x.shape[2:], dtype=x.dtype)
            _dw_bwd(args, grad_y=gy)


def test_dwconv_unsafe_grads_raise_and_dtype_mismatches_convert():
    args = _dw_args()
    with pytest.raises(RuntimeError, match=f"{UNSAFE}.*grad_y"):
        _dw_bwd(args, grad_y=torch.randn(2, 4, 6, 7))
    with pytest.raises(RuntimeError, match=f"{UNSAFE}.*grad_y"):
        _dw_bwd(args, grad_y=torch.randn(2, 5, 6, 7, device="meta"))
    with pytest.raises(TypeError):  # pybind11 rejects a non-tensor before any kernel runs
        _C.cpu_dwconv_bn_act_forward("x", *args[1:], True, 1e-5, True)
    # Safe, if unusual: float64 and half weights for float32 x are converted.
    mixed = _replace(_replace(args, 1, args[1].double()), 4, args[4].half())
    y, _, _ = _dw_fwd(mixed)
    want, _, _ = reference.dwconv_bn_act_forward(*[t.double() for t in mixed], True, 1e-5, True)
    assert y.dtype == torch.float32 and _rel(y, want) < 1e-3  # b_pw was rounded to half


LKA_BAD = [
    ("x on the meta device", lambda a: _replace(a, 0, a[0].to("meta")), "x"),
    ("integer x", lambda a: _replace(a, 0, a[0].long()), "x"),
    ("5-D x", lambda a: _replace(a, 0, a[0][None]), "x"),
    ("even spatial kernel", lambda a: _replace(a, 3, torch.randn(4, 1, 6, 6)), "ws"),
    ("w0 channel mismatch", lambda a: _replace(a, 1, torch.randn(3, 1, 5, 5)), "w0"),
    ("w1 not square in channels", lambda a: _replace(a, 5, torch.randn(4, 3, 1, 1)), "w1"),
    ("bs of the wrong length", lambda a: _replace(a, 4, torch.randn(5)), "bs"),
    ("b1 on the meta device", lambda a: _replace(a, 6, a[6].to("meta")), "b1"),
]


@pytest.mark.parametrize("what,mutate,name", LKA_BAD, ids=[c[0] for c in LKA_BAD])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_lka_unsafe_inputs_raise(what, mutate, name, direction):
    args = mutate(_lka_args())
    with pytest.raises(RuntimeError, match=f"{UNSAFE}.*{name}"):
        if direction == "forward":
            _lka_fwd(args)
        else:
            _lka_bwd(args, grad_out=torch.randn(2, 4, 9, 8))


def test_lka_unsafe_dilation_and_grads_raise():
    args = _lka_args()
    for d in (0, -3):
        with pytest.raises(RuntimeError, match=f"{UNSAFE}.*dilation"):
            _lka_fwd(args, dilation=d)
        with pytest.raises(RuntimeError, match=f"{UNSAFE}.*dilation"):
            _lka_bwd(args, dilation=d)
    with pytest.raises(RuntimeError, match=f"{UNSAFE}.*grad_out"):
        _lka_bwd(args, grad_out=torch.randn(2, 4, 9, 7))


# ---- good inputs: the contract the ops layer relies on ----------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dwconv_outputs_are_new_and_inputs_untouched(training):
    args = _dw_args()
    before = [t.clone() for t in args]
    y, mean, var = _dw_fwd(args, training=training)
    gy = torch.randn_like(y)
    gy_before = gy.clone()
    grads = _dw_bwd(args, grad_y=gy, training=training)
    for t, b in zip(args + [gy], before + [gy_before]):
        assert torch.equal(t, b), "a kernel wrote into one of its inputs"
    for out in (y, mean, var):
        assert all(out.data_ptr() != t.data_ptr() for t in args)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (5,)
    assert [g.dtype for g in grads] == [t.dtype for t in args[:7]]
    assert [g.shape for g in grads] == [t.shape for t in args[:7]]
    if not training:
        assert torch.equal(mean, args[7]) and torch.equal(var, args[8])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_dwconv_matches_reference_on_any_strides(layout):
    args = _dw_args(k=5, h=3, w=2)  # H, W smaller than the kernel
    ref_args = [t.double() for t in args]
    x = args[0]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(*x.shape[:3], x.shape[3] * 2)[..., ::2].copy_(x)
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    y, mean, var = _dw_fwd([x] + args[1:], training=True)
    y_ref, m_ref, v_ref = reference.dwconv_bn_act_forward(*ref_args, True, 1e-5, True)
    assert _rel(y, y_ref) < 1e-5 and _rel(mean, m_ref) < 1e-5 and _rel(var, v_ref) < 1e-5
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    gy = torch.randn_like(y_ref)
    grads = _C.cpu_dwconv_bn_act_backward(gy.float(), x, *args[1:7], mean, var, True, 1e-5, True)
    want = reference.dwconv_bn_act_backward(gy, *ref_args[:7], m_ref, v_ref, True, 1e-5, True)
    for name, g, w in zip(("x", "w_dw", "w_pw", "gamma", "beta"), [grads[i] for i in (0, 1, 3, 5, 6)],
                          [want[i] for i in (0, 1, 3, 5, 6)]):
        assert _rel(g, w) < 1e-5, name


def test_dwconv_float64_statistics_stay_float64():
    args = _dw_args(dtype=F64)
    y, mean, var = _dw_fwd(args, training=True)
    y_ref, m_ref, v_ref = reference.dwconv_bn_act_forward(*args, True, 1e-5, True)
    assert mean.dtype == var.dtype == F64
    assert _rel(y, y_ref) < 1e-12 and _rel(mean, m_ref) < 1e-12 and _rel(var, v_ref) < 1e-12


@pytest.mark.parametrize("dilation", [1, 3])
def test_lka_matches_reference_and_leaves_inputs(dilation):
    args = _lka_args(h=4, w=11)  # H smaller than the dilated kernel's reach
    before = [t.clone() for t in args]
    out = _lka_fwd(args, dilation)
    go = torch.randn_like(out)
    grads = _lka_bwd(args, grad_out=go, dilation=dilation)
    for t, b in zip(args, before):
        assert torch.equal(t, b)
    ref_args = [t.double() for t in args]
    assert _rel(out, reference.lka_gate_forward(*ref_args, dilation)) < 1e-5
    want = reference.lka_gate_backward(go.double(), *ref_args, dilation)
    assert [g.dtype for g in grads] == [t.dtype for t in args]
    for i, (g, w) in enumerate(zip(grads, want)):
        assert _rel(g, w) < 1e-5, f"gradient {i}"


# ---- threading --------------------------------------------------------------------------------

@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_kernels_run_on_torchs_threads(two_threads):
    # at::parallel_for is a header template: built without -fopenmp it ran serially inside the
    # extension while torch itself used every core.
    assert _C.cpu_parallel_threads() == 2


@pytest.mark.parametrize("op", ["dwconv_bn_act", "lka_gate"])
def test_results_agree_across_thread_counts(two_threads, op):
    """Per-thread partial sums are merged in thread order: one thread and two give the same
    values up to float32 reassociation, and two threads twice give the same bits."""
    if op == "dwconv_bn_act":
        args = _dw_args(n=2, cin=16, cout=24, h=40, w=33)
        grad_dw = torch.randn(2, 24, 40, 33)

        def run():
            y, mean, var = _dw_fwd(args)
            return [y, mean, var] + list(_dw_bwd(args[:7] + [mean, var], grad_y=grad_dw))
    else:
        args = _lka_args(n=2, c=16, h=40, w=33)
        grad_lka = torch.randn(2, 16, 40, 33)
        run = lambda: [_lka_fwd(args)] + list(_lka_bwd(args, grad_out=grad_lka))  # noqa: E731
    two = run()
    again = run()
    torch.set_num_threads(1)
    one = run()
    for a, b, c in zip(two, again, one):
        assert torch.equal(a, b)
        # the training-mode bias gradients are exactly zero on any thread count
        assert torch.equal(a, c) if not c.any() else _rel(a, c) < 1e-5


# ---- the kernels' two plans: row tiles per thread, and whole-batch GEMMs ------------------------

# common.h's plan_tiles: tiles of whole rows holding ~768 KiB of (Cin + Cout) channels, taken when
# a tile has >= 192 pixels and there are >= 2 tiles per thread.  96 + 96 channels at 41 x 37 give
# two uneven tiles per image (27 + 14 rows), four in all; 16 + 24 channels fit an image in one.
PLANS = {"tiled": dict(n=2, cin=96, cout=96, h=41, w=37), "whole": dict(n=2, cin=16, cout=24, h=19, w=23)}


def _dw_grads_close(got, want, training):
    for name, g, w in zip(("x", "w_dw", "b_dw", "w_pw", "b_pw", "gamma", "beta"), got, want):
        if training and name in ("b_dw", "b_pw"):
            assert not g.any(), name  # the batch mean absorbs both biases
        else:
            assert _rel(g, w) < 1e-5, name


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dwconv_plans_match_reference(two_threads, plan, training, layout):
    args = _dw_args(**PLANS[plan], seed=3)
    args[3] = args[3] / args[3].shape[1] ** 0.5  # keep z's scale near 1 at 96 input channels
    ref_args = [t.double() for t in args]
    if layout == "channels_last":
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    y, mean, var = _dw_fwd(args, training=training)
    y_ref, m_ref, v_ref = reference.dwconv_bn_act_forward(*ref_args, training, 1e-5, True)
    assert _rel(y, y_ref) < 1e-5 and _rel(mean, m_ref) < 1e-5 and _rel(var, v_ref) < 1e-5
    gy = torch.randn(y.shape, dtype=F64)
    grads = _C.cpu_dwconv_bn_act_backward(gy.float(), args[0], *args[1:7], mean, var, training, 1e-5, True)
    want = reference.dwconv_bn_act_backward(gy, *ref_args[:7], m_ref, v_ref, training, 1e-5, True)
    _dw_grads_close(grads, want, training)


# lka_gate plans on 2C channels: C = 96 at 41 x 37 tiles (27 + 14 rows per image), C = 8 does not.
# "runs": one image, so at two threads the float32 forward splits it into two runs of rows, each
# computing a1's halo itself (lka_gate.cpp's forward_blocked).
LKA_PLANS = {"tiled": dict(n=2, c=96, h=41, w=37), "whole": dict(n=2, c=8, h=19, w=23),
             "runs": dict(n=1, c=40, h=41, w=37)}


@pytest.mark.parametrize("plan", list(LKA_PLANS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_lka_plans_match_reference(two_threads, plan, dtype, layout):
    args = _lka_args(**LKA_PLANS[plan], seed=5)
    args[5] = args[5] / args[5].shape[1] ** 0.5
    args = [t.to(dtype) for t in args]
    ref_args = [t.double() for t in args]  # the rounded inputs: the budget is for the kernel's own error
    if layout == "channels_last":
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    budget = BUDGET[dtype]
    out = _lka_fwd(args)
    assert out.dtype == dtype
    assert _rel(out, reference.lka_gate_forward(*ref_args, 3)) < budget
    go = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(6)).to(dtype).double()
    grads = _lka_bwd(args, grad_out=go.to(dtype))
    for name, g, w in zip(("x", "w0", "b0", "ws", "bs", "w1", "b1"), grads,
                          reference.lka_gate_backward(go, *ref_args, 3)):
        assert _rel(g, w) < budget, name


# ---- scratch kept between calls (scratch.cpp) ---------------------------------------------------

def _run_both(op, args):
    """Forward and backward outputs of one call pair; the gradient fed back is fixed by a seed."""
    def grad_like(y):
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
        return g.contiguous(memory_format=torch.channels_last) if not y.is_contiguous() else g
    if op == "dwconv_bn_act":
        y, mean, var = _dw_fwd(args)
        return [y, mean, var] + list(_dw_bwd(args[:7] + [mean, var], grad_y=grad_like(y)))
    out = _lka_fwd(args)
    return [out] + list(_lka_bwd(args, grad_out=grad_like(out)))


def _scratch_case(op, plan, layout, seed, dtype=torch.float32):
    shape = (PLANS if op == "dwconv_bn_act" else LKA_PLANS)[plan]
    args = (_dw_args if op == "dwconv_bn_act" else _lka_args)(**shape, seed=seed, dtype=dtype)
    if layout == "channels_last":
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    return args


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("plan", ["tiled", "whole"])
@pytest.mark.parametrize("op", ["dwconv_bn_act", "lka_gate"])
def test_outputs_survive_later_calls(two_threads, op, plan, layout, dtype):
    """No output may live in a scratch buffer: the next call, same shape or larger, rewrites them."""
    first = _run_both(op, _scratch_case(op, plan, layout, seed=1, dtype=dtype))
    kept = [t.clone() for t in first]
    _run_both(op, _scratch_case(op, plan, layout, seed=2, dtype=dtype))
    nan_filled = _scratch_case(op, "tiled", "contiguous", seed=3, dtype=dtype)  # grows every slot
    nan_filled[0].fill_(float("nan"))
    _run_both(op, nan_filled)
    for i, (a, b) in enumerate(zip(first, kept)):
        assert torch.equal(a, b), f"output {i} changed when the kernels ran again"
    # and the buffers' stale contents (NaN now) never reach a result
    for i, (a, b) in enumerate(zip(_run_both(op, _scratch_case(op, plan, layout, seed=1, dtype=dtype)), kept)):
        assert torch.equal(a, b), f"output {i} differs on a rerun over used scratch"


@pytest.mark.parametrize("shape", [dict(cin=1, cout=1), dict(h=1, w=1)], ids=["one_channel", "one_pixel"])
def test_degenerate_shapes_survive_later_calls(shape):
    # from_nhwc returns a view of its buffer when the permute is a no-op: only fresh buffers may reach it
    first = _run_both("dwconv_bn_act", _dw_args(**shape, seed=1))
    kept = [t.clone() for t in first]
    _run_both("dwconv_bn_act", _dw_args(**shape, seed=2))
    for a, b in zip(first, kept):
        assert torch.equal(a, b)


def test_scratch_is_reused_and_released(two_threads):
    from dlkunet.ops import release_cpu_scratch
    release_cpu_scratch()
    assert _C.cpu_scratch_bytes() == 0
    args = _scratch_case("dwconv_bn_act", "tiled", "contiguous", seed=1)
    first = _run_both("dwconv_bn_act", args)
    held = _C.cpu_scratch_bytes()
    # the backward's NHWC copies of x and grad_y, the depthwise output and z: 2x96 + 2x96 channels
    assert held >= 4 * 2 * 41 * 37 * 96 * 4
    again = _run_both("dwconv_bn_act", args)
    assert _C.cpu_scratch_bytes() == held, "a same-shaped call should reuse the buffers, not grow them"
    import gc
    gc.collect()
    gc.disable()  # a collection in between could free an output into the cache
    try:
        cached = _C.cpu_cached_output_bytes()
        assert release_cpu_scratch() == held + cached
    finally:
        gc.enable()
    assert _C.cpu_scratch_bytes() == 0 and _C.cpu_cached_output_bytes() == 0
    after = _run_both("dwconv_bn_act", args)
    for a, b, c in zip(first, again, after):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_freed_outputs_are_reused_and_released():
    from dlkunet.ops import release_cpu_scratch
    release_cpu_scratch()
    c = 64
    x = torch.randn(1, c, 96, 96).to(memory_format=torch.channels_last)  # 2.4 MB outputs: cached
    w = [torch.randn(c, 1, 5, 5), torch.randn(c), torch.randn(c, 1, 7, 7), torch.randn(c),
         torch.randn(c, c, 1, 1), torch.randn(c)]
    out = _C.cpu_lka_gate_forward(x, *w, 3)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == x.shape
    expected = out.clone()
    first_ptr, nbytes = out.data_ptr(), out.numel() * out.element_size()
    del out
    assert _C.cpu_cached_output_bytes() == nbytes, "a freed output should go back to the cache"
    again = _C.cpu_lka_gate_forward(x, *w, 3)
    assert again.data_ptr() == first_ptr and _C.cpu_cached_output_bytes() == 0
    assert torch.equal(again, expected)
    kept = again  # an output still referenced is never handed out again
    other = _C.cpu_lka_gate_forward(x, *w, 3)
    assert other.data_ptr() != kept.data_ptr() and torch.equal(other, kept)
    del kept, again, other
    assert release_cpu_scratch() >= 2 * nbytes and _C.cpu_cached_output_bytes() == 0


_CACHE_LIMIT_SCRIPT = """
import os, torch
from dlkunet.ops import extension
C, why = extension.load_extension()
assert C is not None, why
x = torch.randn(1, 64, 96, 96).to(memory_format=torch.channels_last)  # 2.4 MB output
w = [torch.randn(64, 1, 5, 5), torch.randn(64), torch.randn(64, 1, 7, 7), torch.randn(64),
     torch.randn(64, 64, 1, 1), torch.randn(64)]
out = C.cpu_lka_gate_forward(x, *w, 3)
del out
print(C.cpu_output_cache_limit(), C.cpu_cached_output_bytes())
"""


@pytest.mark.parametrize("limit_mb", [None, "1"], ids=["default", "1MiB"])
def test_output_cache_limit(limit_mb, tmp_path):
    """The default keeps a quarter of physical memory (a batch-8 forward frees over 1 GiB that the
    next one reuses); DLKUNET_CPU_CACHE_MB overrides it, and a block over the limit is freed."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("DLKUNET_CPU_CACHE_MB", None)
    if limit_mb is not None:
        env["DLKUNET_CPU_CACHE_MB"] = limit_mb
    done = subprocess.run([sys.executable, "-c", _CACHE_LIMIT_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    limit, cached = map(int, done.stdout.split())
    if limit_mb is None:
        assert limit == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGESIZE") // 4
        assert cached == 64 * 96 * 96 * 4
    else:
        assert limit == 1 << 20 and cached == 0


def test_concurrent_callers_have_their_own_scratch(two_threads):
    """The kernels release the GIL: two Python threads run them at once, each on its own buffers."""
    import threading
    cases = [_scratch_case(op, "tiled", "contiguous", seed=s) for op, s in
             (("dwconv_bn_act", 1), ("dwconv_bn_act", 2), ("lka_gate", 3), ("lka_gate", 4))]
    ops = ["dwconv_bn_act", "dwconv_bn_act", "lka_gate", "lka_gate"]
    want = [_run_both(op, a) for op, a in zip(ops, cases)]
    errors = []

    def worker(i):
        try:
            for _ in range(4):
                for a, b in zip(_run_both(ops[i], cases[i]), want[i]):
                    if not torch.equal(a, b):
                        errors.append(f"thread {i}: a result differs from the single-thread run")
                        return
        except Exception as exc:  # surfaced below, not lost in the thread
            errors.append(f"thread {i}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ---- the blocked depthwise row kernel (depthwise.cpp) -------------------------------------------

# (N, C, H, W, k, dilation): the unrolled sizes (3/5/7 at dilation 1 and 3) and the generic loop
# (9 at dilation 2); channel tails (C not a multiple of 16), maps narrower than the register block
# and than the kernel, one pixel.
DEPTHWISE = [(2, 20, 17, 13, 5, 3), (1, 33, 9, 70, 7, 1), (1, 16, 3, 3, 3, 1), (1, 40, 30, 31, 7, 3),
             (1, 17, 12, 11, 9, 2), (2, 7, 1, 1, 3, 3), (1, 48, 8, 29, 5, 1), (1, 9, 5, 23, 3, 3)]


@pytest.mark.parametrize("n,c,h,w,k,d", DEPTHWISE, ids=["x".join(map(str, s)) for s in DEPTHWISE])
def test_blocked_depthwise_matches_float64(n, c, h, w, k, d):
    g = torch.Generator().manual_seed(n * 1000 + c * 10 + k)
    x, wt, b = (torch.randn(*s, generator=g, dtype=F64) for s in ((n, c, h, w), (c, 1, k, k), (c,)))
    want = torch.nn.functional.conv2d(x, wt, b, padding=d * (k - 1) // 2, dilation=d, groups=c)
    got = _C.cpu_depthwise_forward(x.float(), wt.float(), b.float(), d)
    eager = torch.nn.functional.conv2d(x.float(), wt.float(), b.float(), padding=d * (k - 1) // 2, dilation=d,
                                       groups=c)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert _rel(got, want) <= max(2 * _rel(eager, want), BUDGET[torch.float32] / 10)


def test_cpu_isa_is_reported():
    assert _C.cpu_isa() in ("avx512", "avx2", "generic")


_ISA_SCRIPT = """
import torch
from dlkunet.ops import extension, reference
C, why = extension.load_extension()
assert C is not None, why
print(C.cpu_isa())
g = torch.Generator().manual_seed(0)
# channels_last and large enough for the tiled plan, whose GEMM DLKUNET_CPU_GEMM picks
x = torch.randn(1, 40, 64, 96, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
w0, ws, b, w1 = r(40, 1, 5, 5) / 5, r(40, 1, 7, 7) / 7, r(40), r(40, 40, 1, 1) / 40 ** 0.5
args = [x, w0, b, ws, b, w1, b]
got = C.cpu_lka_gate_forward(*[t.float() for t in args], 3)
assert got.is_contiguous(memory_format=torch.channels_last)
want = reference.lka_gate_forward(*args, 3)
print(float((got.double() - want).norm() / want.norm()))
"""


@pytest.mark.parametrize("isa,gemm", [("generic", ""), ("avx2", ""), ("avx2", "mkl")])
def test_each_instruction_set_matches_float64(isa, gemm, tmp_path):
    """DLKUNET_CPU_ISA narrows the run-time choice: the other clones are tested where the CPU runs them.
    DLKUNET_CPU_GEMM=mkl puts the tiles' GEMMs back on at::mm (what AVX-512 and other CPUs run)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, DLKUNET_CPU_ISA=isa, DLKUNET_CPU_GEMM=gemm)
    # run outside the checkout: from its root, ``import dlkunet`` would find the source tree, not the install
    done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got_isa, err = done.stdout.split()
    if got_isa != isa:
        assert isa != "generic", "the generic kernel must always be selectable"
        pytest.skip(f"this CPU does not run the {isa} kernel (picked {got_isa})")
    assert float(err) < BUDGET[torch.float32]


@pytest.mark.skipif(_C is None or not _C.cpu_tile_gemm_available(),
                    reason="the tile GEMM runs only on AVX2 machines without AVX-512 (elsewhere at::mm)")
@pytest.mark.parametrize("m,k,n", [(448, 96, 96), (7, 300, 40), (13, 513, 17), (1, 5, 3), (100, 1536, 33),
                                   (6, 128, 16), (403, 200, 150)])
@pytest.mark.parametrize("transposed", [True, False], ids=["weight", "plain"])
@pytest.mark.parametrize("all_threads", [False, True], ids=["tile", "whole_batch"])
def test_tile_gemm_matches_float64(m, k, n, transposed, all_threads, two_threads):
    """Row blocks of 6 and their remainders, panels of 16 columns and a partial last one, K blocks of
    128 (added into C) and a tail: no worse than at::mm's own float32 error, against float64.  The
    whole-batch GEMM splits rows into blocks of up to 198 and columns into groups of 8 panels."""
    g = torch.Generator().manual_seed(m * k + n)
    a = torch.randn(m, k, generator=g)
    b = torch.randn(n, k, generator=g) if transposed else torch.randn(k, n, generator=g)
    exact = a.double() @ (b.double().t() if transposed else b.double())
    ours = _C.cpu_tile_gemm(a, b, transposed, all_threads)
    theirs = a @ (b.t() if transposed else b)
    assert ours.shape == (m, n)
    assert (ours.double() - exact).abs().max() <= 2 * max((theirs.double() - exact).abs().max(), 1e-6)
