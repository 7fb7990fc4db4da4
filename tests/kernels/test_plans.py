"""The per-shape plans of the Triton forward paths (kernels/plans.py): each plan forced on small shapes
in every dtype and layout against float64, multi-tile coverage with forced small tiles, the plan
choice and its cache, and the host side of a call (launches and torch ops, counted with the torch
profiler while the kernels' launches are counted instead of run).

Float32 here runs with torch.backends.cudnn.allow_tf32 False (conftest), i.e. the full-precision
path, judged by the float32 budget; the TF32 path is test_triton_numerics.py's."""
from __future__ import annotations

import pytest
import torch

from dlkunet.ops import availability, reference
from dlkunet_testing import BUDGET, dwconv_inputs, lka_inputs, poisoned_allocations, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ok, why = availability("triton", DEVICE)
pytestmark = [pytest.mark.skipif(not ok, reason=f"triton backend unavailable: {why}")]
if DEVICE == "cuda":  # on a GPU these run the real kernels: part of the GPU suite (-m gpu)
    pytestmark.append(pytest.mark.gpu)


def _modules():
    from dlkunet import kernels
    from dlkunet.kernels import plans
    return kernels, plans


def _dwconv(n, cin, cout, h, w, k, g):
    """b_pw and the running statistics of order 1."""
    return dwconv_inputs(n, cin, cout, h, w, k, 0.0, g)


def _lka(c, n, h, w, k0, ks, g):
    return lka_inputs(n, c, h, w, k0, ks, g)


def _on(t, dtype, fmt=torch.contiguous_format):
    t = t.to(dtype).to(DEVICE)
    return t.contiguous(memory_format=fmt) if t.dim() == 4 and t.shape[1] > 1 and t.shape[-1] > 1 else t


CASES = [("fused", torch.float32, "nchw"), ("fused", torch.bfloat16, "cl"), ("fused", torch.float16, "nchw"),
         ("split", torch.float32, "cl"), ("split", torch.bfloat16, "nchw"), ("split", torch.float16, "cl"),
         ("split_cudnn", torch.float32, "nchw"), ("split_cudnn", torch.bfloat16, "cl"),
         # split_cublas is a channels_last plan; on NCHW it runs split
         ("split_cublas", torch.float32, "cl"), ("split_cublas", torch.bfloat16, "cl"),
         ("split_cublas", torch.float16, "cl"), ("split_cublas", torch.float32, "nchw")]


@pytest.mark.parametrize("plan,dtype,layout", CASES)
def test_eval_dwconv_bn_act_each_plan(plan, dtype, layout):
    kernels, plans = _modules()
    g = torch.Generator().manual_seed(3)
    x, p = _dwconv(2, 6, 18, 5, 7, 3, g)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    y_ref, _, _ = reference.dwconv_bn_act_forward(x, *p, False, 1e-5, True)
    params = [_on(t, dtype) for t in p[:4]] + [t.float().to(DEVICE) for t in p[4:]]
    with plans.forced(plan), poisoned_allocations():
        y, mean, var = kernels.dwconv_bn_act_forward(_on(x, dtype, fmt), *params, False, 1e-5, True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    assert rel_err(y, y_ref) <= BUDGET[dtype]
    # the returned statistics are copies of the running ones, written by the kernel
    assert torch.equal(mean, params[6]) and torch.equal(var, params[7])
    assert mean.data_ptr() != params[6].data_ptr() and var.data_ptr() != params[7].data_ptr()


# lka_gate's own plan; forced on dwconv_bn_act it runs split
CHAIN_CASES = [("chain", torch.float32, "nchw"), ("chain", torch.bfloat16, "cl"), ("chain", torch.float16, "nchw")]


@pytest.mark.parametrize("plan,dtype,layout", [c for c in CASES if c[1] != torch.float16] + CHAIN_CASES)
def test_lka_gate_forward_each_plan(plan, dtype, layout):
    kernels, plans = _modules()
    g = torch.Generator().manual_seed(5)
    x, p = _lka(17, 1, 6, 5, 5, 7, g)  # H, W below the dilated kernel's reach: a1's zero padding matters
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    with plans.forced(plan), poisoned_allocations():
        out = kernels.lka_gate_forward(_on(x, dtype, fmt), *[_on(t, dtype) for t in p], 3)
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    assert rel_err(out, reference.lka_gate_forward(x, *p, 3)) <= BUDGET[dtype]


BACKWARD_CASES = [("fused", torch.float32, "nchw"), ("split", torch.float32, "cl"), ("split", torch.bfloat16, "nchw"),
                  ("split", torch.float16, "cl"), ("split_cudnn", torch.float32, "nchw"),
                  ("chain", torch.float32, "cl"), ("chain", torch.bfloat16, "nchw")]
DW_GRADS = ("x", "w_dw", "b_dw", "w_pw", "b_pw", "gamma", "beta")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("plan,dtype,layout", BACKWARD_CASES)
def test_backward_each_plan(plan, dtype, layout, training):
    """Both backwards under each forward plan: after `fused` the kernels recompute the depthwise
    output per output-channel block, after the split plans it is written once (ours, or cuDNN's)
    and read, after `chain` lka's a1 and a2 come from one launch; every gradient against float64."""
    kernels, plans = _modules()
    g = torch.Generator().manual_seed(12)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x, p = _dwconv(2, 6, 18, 5, 7, 3, g)
    x, p = x.to(dtype).double(), [t.to(dtype).double() for t in p[:4]] + [t.float().double() for t in p[4:]]
    gy = torch.randn(2, 18, 5, 7, dtype=torch.float64, generator=g).to(dtype).double()
    _, mean, var = reference.dwconv_bn_act_forward(x, *p, training, 1e-5, True)
    refs = reference.dwconv_bn_act_backward(gy, x, *p[:6], mean, var, training, 1e-5, True)
    params = [_on(t, dtype) for t in p[:4]] + [t.float().to(DEVICE) for t in p[4:6]]
    with plans.forced(plan), poisoned_allocations():
        grads = kernels.dwconv_bn_act_backward(_on(gy, dtype, fmt), _on(x, dtype, fmt), *params,
                                               mean.float().to(DEVICE), var.float().to(DEVICE), training, 1e-5, True)
    for name, got, ref in zip(DW_GRADS, grads, refs):
        if training and name in ("b_dw", "b_pw"):
            assert torch.equal(got, torch.zeros_like(got)), name  # BatchNorm cancels them exactly
        else:
            assert rel_err(got, ref) <= BUDGET[dtype], (name, rel_err(got, ref))

    xl, pl = _lka(17, 1, 6, 5, 5, 7, g)
    xl, pl = xl.to(dtype).double(), [t.to(dtype).double() for t in pl]
    go = torch.randn(xl.shape, dtype=torch.float64, generator=g).to(dtype).double()
    refs = reference.lka_gate_backward(go, xl, *pl, 3)
    with plans.forced(plan), poisoned_allocations():
        grads = kernels.lka_gate_backward(_on(go, dtype, fmt), _on(xl, dtype, fmt), *[_on(t, dtype) for t in pl], 3)
    for i, (got, ref) in enumerate(zip(grads, refs)):
        assert rel_err(got, ref) <= BUDGET[dtype], (i, rel_err(got, ref))


def test_backward_kernels_read_the_stored_depthwise_output(monkeypatch):
    """Under a split plan the backward kernels read the depthwise output written once instead of
    recomputing it: a poisoned copy reaches the z recompute (grad_gamma) and the weight GEMM
    (grad_w_pw) of dwconv_bn_act, and lka_gate's gate and weight GEMM (grad_w1); under chain,
    lka's a2 from the chain kernel likewise."""
    kernels, plans = _modules()
    written = plans.backward_depthwise
    monkeypatch.setattr(plans, "backward_depthwise", lambda *a: torch.full_like(written(*a), float("nan")))
    chained = plans.backward_lka_stages

    def poisoned_a2(*args):
        stages = chained(*args)
        return None if stages is None else (stages[0], torch.full_like(stages[1], float("nan")))
    monkeypatch.setattr(plans, "backward_lka_stages", poisoned_a2)
    g = torch.Generator().manual_seed(13)
    x, p = _dwconv(2, 6, 18, 5, 7, 3, g)
    x, p = x.float().to(DEVICE), [t.float().to(DEVICE) for t in p]
    gy = torch.randn(2, 18, 5, 7, generator=g).to(DEVICE)
    xl, pl = _lka(17, 1, 6, 5, 5, 7, g)
    xl, pl = xl.float().to(DEVICE), [t.float().to(DEVICE) for t in pl]
    with plans.forced("split"):
        grads = kernels.dwconv_bn_act_backward(gy, x, *p, False, 1e-5, True)
        lka = kernels.lka_gate_backward(torch.randn_like(xl), xl, *pl, 3)
    assert grads[5].isnan().all() and grads[3].isnan().all()
    assert lka[0].isnan().all() and lka[5].isnan().all()
    with plans.forced("chain"):
        lka = kernels.lka_gate_backward(torch.randn_like(xl), xl, *pl, 3)
    assert lka[0].isnan().all() and lka[5].isnan().all()


# (k0, ks, (QH, QW, HALO_H, HALO_W, BLOCK_C, SH, SW, warps)) on 11 x 13 images at dilation 3,
# radius 3 (3x3 convs) or 9 (DLKUNet's 5x5 and 7x7): whole images; halos along one side (6 windows
# of 2 rows; 2 of 10 columns, the second partial) or both; several channel blocks; the persistent
# programs each walk several work items through one slot (also at 8 warps on a GPU).  Sub-tiles
# as large as the window, or smaller: sub-tiles past the image or (the dilated conv) in the halo
# skipped, tap rows and columns that only reach the padding skipped.
CHAIN_WINDOWS = [(3, 3, (16, 16, 0, 0, 4, 16, 16, 1)), (3, 3, (8, 16, 3, 0, 2, 8, 8, 1)),
                 (3, 3, (16, 16, 0, 3, 4, 8, 4, 1)), (3, 3, (16, 16, 3, 3, 8, 8, 4, 1)),
                 (5, 7, (32, 16, 9, 0, 2, 8, 8, 8)), (5, 7, (16, 32, 0, 9, 4, 4, 16, 8)),
                 (5, 7, (16, 16, 0, 0, 4, 4, 4, 1))]


@pytest.mark.parametrize("k0,ks,window", CHAIN_WINDOWS)
@pytest.mark.parametrize("dtype,layout,tf32", [(torch.float32, "nchw", False), (torch.float32, "cl", True),
                                               (torch.bfloat16, "cl", False), (torch.float16, "nchw", False)])
def test_chain_plan_matches_split_bit_for_bit(k0, ks, window, dtype, layout, tf32, tf32_flag):
    """The chain kernel keeps a1 on chip and computes the same a2 as the split plan's two kernels
    (a1 rounded to the input dtype as when written; under TF32 a2 and the weight copy rounded): the
    outputs are the same bits, within budget of float64 (TF32 off).  The backward's a1 and a2 from
    the chain kernel are the depthwise outputs, bit for bit."""
    kernels, plans = _modules()
    tf32_flag(tf32)
    g = torch.Generator().manual_seed(21)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x, p = _lka(10, 2, 11, 13, k0, ks, g)
    xd, pd = _on(x, dtype, fmt), [_on(t, dtype) for t in p]
    chain = plans.Plan("chain", dw=window, gemm=plans.tiles("split", 10, 10, 13, dtype).gemm)
    with plans.forced(chain), poisoned_allocations():  # a pixel or weight row left unwritten is NaN
        out = kernels.lka_gate_forward(xd, *pd, 3)
        a1, a2 = plans.backward_lka_stages(xd, pd[0], pd[1], pd[2], pd[3], 3)
    with plans.forced("split"):
        ref = kernels.lka_gate_forward(xd, *pd, 3)
    assert torch.equal(out, ref)
    if not tf32:  # (the split plan's TF32 error is test_triton_numerics.py's)
        assert rel_err(out, reference.lka_gate_forward(x, *p, 3)) <= BUDGET[dtype]
    split = plans.tiles("split", 10, 10, 13, dtype)
    assert not out.isnan().any() and not a1.isnan().any() and not a2.isnan().any()
    a1_split = plans._depthwise(xd, pd[0], pd[1], 1, fmt, split)
    a2_split = plans._depthwise(a1_split, pd[2], pd[3], 3, fmt, split)
    assert a1.is_contiguous(memory_format=fmt) and a2.is_contiguous(memory_format=fmt)
    assert torch.equal(a1, a1_split) and torch.equal(a2, a2_split)


def test_chain_sub_tiles_narrower_than_the_first_conv_read_x_past_their_window():
    """2 x 4 sub-tiles under a 5 x 5 first conv, in windows of 2 own rows with a halo of 3: from
    a window's first rows the taps that leave the window still read x inside the image (skipping
    them as padding would change a1 there), from the image's first rows they are padding."""
    kernels, plans = _modules()
    g = torch.Generator().manual_seed(23)
    x, p = _lka(3, 1, 11, 13, 5, 3, g)
    xd, pd = _on(x, torch.float32), [_on(t, torch.float32) for t in p]
    chain = plans.Plan("chain", dw=(8, 16, 3, 0, 2, 2, 4, 1), gemm=plans.tiles("split", 3, 3, 13, x.dtype).gemm)
    with plans.forced(chain), poisoned_allocations():
        a1, a2 = plans.backward_lka_stages(xd, pd[0], pd[1], pd[2], pd[3], 3)
    a1_ref = torch.nn.functional.conv2d(x.double(), p[0].double(), p[1].double(), padding=2, groups=3)
    a2_ref = torch.nn.functional.conv2d(a1_ref, p[2].double(), p[3].double(), padding=3, dilation=3, groups=3)
    assert rel_err(a1, a1_ref) <= BUDGET[torch.float32] and rel_err(a2, a2_ref) <= BUDGET[torch.float32]
    split = plans.tiles("split", 3, 3, 13, torch.float32)  # and the split plan's bits
    a1_split = plans._depthwise(xd, pd[0], pd[1], 1, torch.contiguous_format, split)
    assert torch.equal(a1, a1_split) and torch.equal(a2, plans._depthwise(a1_split, pd[2], pd[3], 3,
                                                                          torch.contiguous_format, split))


@pytest.mark.skipif(DEVICE == "cuda", reason="counts the taps through the interpreter (CPU tensors)")
@pytest.mark.parametrize("window", [(32, 16, 9, 0, 4, 8, 8, 1), (16, 16, 0, 0, 4, 4, 8, 1), (16, 32, 0, 9, 8, 8, 4, 1)])
def test_chain_taps_are_what_the_kernel_runs(window, monkeypatch):
    """The cost model's multiply-adds (chain_taps, x the channels the kernel runs, padding ones
    included) are the kernel's: every _dw_taps call counted with the tap ranges and sub-tile the
    kernel computed for it."""
    _, plans = _modules()
    from dlkunet.kernels import _fast
    run, count = _fast._dw_taps, [0]

    def counting(*args):
        ky_lo, ky_hi, kx_lo, kx_hi = (int(getattr(v, "data", v)) for v in args[14:18])
        pixels, channels = (int(getattr(v, "value", v)) for v in args[20:22])
        count[0] += max(0, ky_hi - ky_lo) * max(0, kx_hi - kx_lo) * pixels * channels
        return run(*args)

    monkeypatch.setattr(_fast, "_dw_taps", counting)
    g = torch.Generator().manual_seed(2)
    x, p = _lka(10, 2, 11, 13, 5, 7, g)
    chain = plans.Plan("chain", dw=window, gemm=plans.tiles("split", 10, 10, 13, x.dtype).gemm)
    with plans.forced(chain):
        plans.backward_lka_stages(x, p[0], p[1], p[2], p[3], 3)
    channels = -(-10 // window[4]) * window[4]
    assert count[0] == 2 * channels * plans.chain_taps(11, 13, window, 5, 7, 3) > 0


def test_small_tiles_cover_every_tile_loop():
    """Tiles smaller than the shape: several spatial patches per image (partial ones at the edges),
    several output-channel tiles (the fused plan recomputing its taps per tile), several K steps."""
    kernels, plans = _modules()
    g = torch.Generator().manual_seed(9)
    x, p = _dwconv(1, 20, 20, 5, 9, 3, g)  # 2 K steps, 2 channel tiles, 3 x 3 patches (partial ones)
    y_ref, _, _ = reference.dwconv_bn_act_forward(x, *p, False, 1e-5, False)
    dev = lambda t: t.float().to(DEVICE)  # noqa: E731
    small = {"fused": plans.Plan("fused", fused=(2, 4, 16, 16, 1, 1), dw=(2, 4, 16, 1)),
             "split": plans.Plan("split", dw=(2, 4, 16, 1), gemm=(16, 16, 16, 1, 1))}
    for name, plan in small.items():
        with plans.forced(plan), poisoned_allocations():
            y, _, _ = kernels.dwconv_bn_act_forward(dev(x), *map(dev, p), False, 1e-5, False)
        assert rel_err(y, y_ref) <= BUDGET[torch.float32], name


def test_plan_choice_is_the_cost_models_and_cached(tmp_path):
    _, plans = _modules()
    dev = torch.device(DEVICE)
    with plans.tuned_table(tmp_path / "none.csv"):  # no measured row: the cost model decides
        _model_choices(plans, dev)


def _model_choices(plans, dev):
    levels = ((96, 224), (192, 112), (384, 56), (768, 28), (1536, 14))
    for c, side in levels:
        for dtype in (torch.float32, torch.bfloat16):
            prec = plans.precision(dtype)
            for op, ks in (("dwconv_bn_act", (3,)), ("lka_gate", (5, 7, 3))):
                plan = plans.choose(op, 16, c, c, side, side, ks, dtype, False, dev, prec)
                times = {name: plans.predicted_seconds(name, op, 16, c, c, side, side, ks, dtype, prec,
                                                       plans._peaks(dev)) for name in plans.PLANS}
                assert plan.name == min(times, key=times.get)
                assert plans.choose(op, 16, c, c, side, side, ks, dtype, False, dev, prec) is plan  # cached
    # The design's two regimes: taps computed once at the shallow levels, the depthwise output
    # written once (lka's: both convs in the chain kernel) and a GEMM where the fused tile could not
    # hold every output channel.
    shallow = plans.choose("dwconv_bn_act", 16, 96, 96, 224, 224, (3,), torch.bfloat16, False, dev, "ieee")
    deep = plans.choose("lka_gate", 16, 1536, 1536, 14, 14, (5, 7, 3), torch.bfloat16, False, dev, "ieee")
    assert (shallow.name, deep.name) == ("fused", "chain")
    with plans.forced("split"):
        assert plans.choose("dwconv_bn_act", 16, 96, 96, 224, 224, (3,), torch.bfloat16, False, dev,
                            "ieee").name == "split"


# ------------------------------------------------------------------------------------------------
# host side


def _count_host_work(fn):
    """(kernel launches, torch ops) of fn(): the launches are counted and skipped (the interpreter
    would add its own torch ops copying arguments), the torch ops recorded by the profiler."""
    from triton.runtime import interpreter
    launches = []
    original = interpreter.GridExecutor.__call__

    def count(self, *args, **kwargs):
        launches.append(self.fn.__name__)

    interpreter.GridExecutor.__call__ = count
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        interpreter.GridExecutor.__call__ = original
    ops = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    return launches, ops


@pytest.mark.skipif(DEVICE == "cuda", reason="counts interpreter launches (CPU tensors)")
@pytest.mark.parametrize("plan", ["fused", "split", "chain"])
def test_eval_forward_host_overhead(plan):
    """Eval dwconv_bn_act: at most 3 launches (1 fused, 2 split; chain runs split) and no torch op
    but the allocations of y, the two statistics copies and (split) the depthwise output, plus under
    TF32 the split plan's rounded weight copy; lka_gate: 2-3 launches, the allocations of out and
    a1 (fused), a1 and a2 (split) or a2 and the scratch slots (chain), and the rounded copy."""
    kernels, plans = _modules()
    rounded_copy = int(plan != "fused" and plans.precision(torch.float32) == "tf32")
    g = torch.Generator().manual_seed(1)
    x, p = _dwconv(2, 8, 16, 5, 6, 3, g)
    xf, pf = x.float(), [t.float() for t in p]
    with plans.forced(plan):
        kernels.dwconv_bn_act_forward(xf, *pf, False, 1e-5, True)  # warm: plan cache, layouts
        launches, ops = _count_host_work(lambda: kernels.dwconv_bn_act_forward(xf, *pf, False, 1e-5, True))
    assert len(launches) == (1 if plan == "fused" else 2) <= 3, launches
    assert set(ops) <= {"aten::empty", "aten::empty_like"}, ops
    assert len(ops) == (3 if plan == "fused" else 4 + rounded_copy), ops

    xl, pl = _lka(8, 1, 5, 6, 5, 7, g)
    xl, pl = xl.float(), [t.float() for t in pl]
    with plans.forced(plan):
        kernels.lka_gate_forward(xl, *pl, 3)
        launches, ops = _count_host_work(lambda: kernels.lka_gate_forward(xl, *pl, 3))
    expected = {"fused": ["_dw_kernel", "_fused_kernel"], "split": ["_dw_kernel", "_dw_kernel", "_gemm_kernel"],
                "chain": ["_lka_chain_kernel", "_gemm_kernel"]}[plan]
    assert launches == expected, launches
    assert set(ops) <= {"aten::empty", "aten::empty_like"}, ops
    assert len(ops) == (2 if plan == "fused" else 3 + rounded_copy), ops


@pytest.mark.skipif(DEVICE == "cuda", reason="counts interpreter launches (CPU tensors)")
@pytest.mark.parametrize("tf32", [False, True])
def test_training_forward_host_overhead(tf32, tf32_flag):
    """Training dwconv_bn_act forward: the depthwise kernel, the statistics GEMM, the on-device
    merge and the GEMM with the batch-statistics affine, in that order; no torch op but the
    allocations of d, the partial moments, the two statistics, scale, shift and y (and under TF32
    the rounded weight copy).  The statistics merge used to be ~10 host torch ops in float64."""
    kernels, _ = _modules()
    tf32_flag(tf32)
    g = torch.Generator().manual_seed(8)
    x, p = _dwconv(2, 8, 16, 5, 6, 3, g)
    xf, pf = x.float(), [t.float() for t in p]
    kernels.dwconv_bn_act_forward(xf, *pf, True, 1e-5, True)
    launches, ops = _count_host_work(lambda: kernels.dwconv_bn_act_forward(xf, *pf, True, 1e-5, True))
    assert launches == ["_dw_kernel", "_gemm_stats_kernel", "_bn_batch_stats_kernel", "_gemm_kernel"], launches
    assert set(ops) <= {"aten::empty", "aten::empty_like"} and len(ops) == 7 + int(tf32), ops


@pytest.mark.skipif(DEVICE == "cuda", reason="counts interpreter launches (CPU tensors)")
@pytest.mark.parametrize("plan", ["fused", "split", "chain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_host_overhead(training, plan):
    """The backward passes merge every reduction on the device (_sum_groups_kernel, float64, fixed
    order) and form BatchNorm's factors inside the kernels: no torch op but allocations, views and,
    in training, the two exactly-zero bias gradients; under a split plan the depthwise output is
    written once first.  Before: 66-90 host ops (float64 casts and
    sums, a parameter matrix filled row by row, transposed copies).  After lka's chain plan one
    launch writes both of its depthwise outputs."""
    kernels, plans = _modules()
    stored = ["_dw_kernel"] if plan != "fused" else []  # the depthwise output written once (chain: split's)
    g = torch.Generator().manual_seed(9)
    x, p = _dwconv(2, 8, 16, 5, 6, 3, g)
    xf, pf = x.float(), [t.float() for t in p]
    _, mean, var = kernels.dwconv_bn_act_forward(xf, *pf, training, 1e-5, True)
    gy = torch.randn(2, 16, 5, 6, generator=g)

    def backward():
        return kernels.dwconv_bn_act_backward(gy, xf, *pf[:6], mean, var, training, 1e-5, True)
    with plans.forced(plan):
        backward()
        launches, ops = _count_host_work(backward)
    bn = (["_dw_pw_kernel", "_sum_groups_kernel", "_dw_pw_kernel"] if training
          else ["_dw_pw_kernel", "_sum_groups_kernel"])
    assert launches == stored + bn + ["_pw_bwd_data_kernel", "_sum_groups_kernel", "_pw_bwd_weight_kernel",
                             "_sum_groups_kernel", "_sum_groups_kernel", "_dw_bwd_kernel"], launches
    allowed = {"aten::empty", "aten::view"} | ({"aten::zeros_like"} if training else set())
    assert set(ops) <= allowed and ops.count("aten::zeros_like") == 2 * training, ops
    assert len(ops) == (20 if training else 18) + len(stored), ops  # + the stored output's allocation

    xl, pl = _lka(8, 1, 5, 6, 5, 7, g)
    xl, pl = xl.float(), [t.float() for t in pl]
    go = torch.randn_like(xl)
    with plans.forced(plan):
        kernels.lka_gate_backward(go, xl, *pl, 3)
        launches, ops = _count_host_work(lambda: kernels.lka_gate_backward(go, xl, *pl, 3))
    depthwise = ["_lka_chain_kernel"] if plan == "chain" else ["_dw_fwd_kernel"] + stored
    assert launches == depthwise + ["_dw_pw_kernel", "_pw_bwd_data_kernel", "_sum_groups_kernel",
                        "_pw_bwd_weight_kernel", "_sum_groups_kernel", "_sum_groups_kernel", "_dw_bwd_kernel",
                        "_sum_groups_kernel", "_dw_bwd_kernel"], launches
    assert set(ops) <= {"aten::empty", "aten::view"}, ops
    # split allocates a2 besides; chain allocates a1, a2 and its scratch slots (the fused path's a1
    # comes from an allocation too)
    assert len(ops) == {"fused": 23, "split": 24, "chain": 25}[plan], ops


@pytest.mark.skipif(DEVICE == "cuda", reason="counts interpreter launches (CPU tensors)")
def test_split_cublas_host_work():
    """Eval dwconv_bn_act on split_cublas: 2 Triton launches (depthwise, BN folding) and one library
    GEMM with its bias+ReLU epilogue on views of d and y: 3 launches in all, no copy."""
    kernels, plans = _modules()
    g = torch.Generator().manual_seed(2)
    x, p = _dwconv(2, 8, 16, 5, 6, 3, g)
    xf = x.float().contiguous(memory_format=torch.channels_last)
    pf = [t.float() for t in p]
    with plans.forced("split_cublas"):
        kernels.dwconv_bn_act_forward(xf, *pf, False, 1e-5, True)
        launches, ops = _count_host_work(lambda: kernels.dwconv_bn_act_forward(xf, *pf, False, 1e-5, True))
    assert sorted(launches) == ["_dw_kernel", "_fold_bn_kernel"], launches
    assert ops.count("aten::_addmm_activation") == 1, ops
    assert set(ops) <= {"aten::empty", "aten::permute", "aten::view", "aten::t", "aten::_addmm_activation"}, ops


def test_gpu_tiles_cover_every_stage_of_every_plan(monkeypatch):
    """The GPU tiles (not the interpreter's) of each plan name hold a tile for every kernel that
    plan launches: forcing a plan by name must never launch a kernel without one."""
    _, plans = _modules()
    monkeypatch.setattr(plans, "INTERPRET", False)
    for name in plans.MEASURED_PLANS:
        for dtype in (torch.float32, torch.bfloat16):
            t = plans.tiles(name, 96, 96, 224, dtype)
            if name == plans.CHAIN:  # its window follows from the shape (test_chain_windows)
                assert t.dw == () and len(t.gemm) == 5 and t.fused == (), (name, t)
                continue
            assert len(t.dw) == 4, (name, t)  # lka_gate's a1 runs the depthwise kernel in every other plan
            if name == plans.FUSED:
                assert len(t.fused) == 6 and t.gemm == (), (name, t)
            else:
                assert len(t.gemm) == 5 and t.fused == (), (name, t)


@pytest.mark.parametrize("h,w", [(224, 224), (112, 112), (56, 56), (28, 28), (14, 14), (300, 40), (7, 90), (65, 64)])
@pytest.mark.parametrize("radius", [9, 6, 3])
def test_chain_windows(h, w, radius, monkeypatch):
    """The chain plan's GPU windows: a side up to CHAIN_WHOLE_SIDE whole (no halo), longer ones
    tiled with the radius as halo and more output than halo; pixels x channels within the slot; a
    sub-tile of at least CHAIN_SUB_SIDE a side (or the window's), tiling the window, within the
    compiled register budget at CHAIN_WARPS warps, and no smaller than the budget allows."""
    _, plans = _modules()
    monkeypatch.setattr(plans, "INTERPRET", False)
    qh, qw, halo_h, halo_w, bc, sh, sw, warps = plans.chain_window(96, h, w, radius)
    for side, q, halo, sub in ((h, qh, halo_h, sh), (w, qw, halo_w, sw)):
        if side <= plans.CHAIN_WHOLE_SIDE:
            assert halo == 0 and side <= q < 2 * side, (side, q, halo)
        else:
            assert halo == radius and q - 2 * halo >= q // 2, (side, q, halo)
        assert q % sub == 0 and sub >= min(q, plans.CHAIN_SUB_SIDE), (q, sub)
    assert qh * qw * bc <= plans.CHAIN_SLOT_ELEMENTS and warps == plans.CHAIN_WARPS
    assert sh * sw * bc <= plans.CHAIN_TILE_ELEMENTS
    assert 2 * sh * sw * bc > plans.CHAIN_TILE_ELEMENTS or (sh, sw) == (qh, qw)
    most, sub = 128, plans.CHAIN_SUB_SIDE  # (96 channels: one block of 128 at most)
    assert 1 <= bc <= most and (bc == most or 2 * bc * qh * qw > plans.CHAIN_SLOT_ELEMENTS
                                or 2 * bc * min(qh, sub) * min(qw, sub) > plans.CHAIN_TILE_ELEMENTS)


def test_chain_taps_skip_the_padding_of_small_images():
    """The chain kernel's multiply-adds per image channel (the cost model's), counted by hand: 14 x
    14 in one 16 x 16 window of 8 x 8 sub-tiles.  The 5 x 5 conv runs all its taps on all 16 x 16
    pixels (each tap reaches the image from each 8-pixel band).  The dilated 7 x 7 (offsets -9 .. 9
    step 3) reaches the image from rows 0-7 with the offsets -6 .. 9 (6 taps), from rows 8-15 with
    -9 .. 3 (5 taps); likewise along the columns.  Fewer than eager's dense 74 x 196."""
    _, plans = _modules()
    expect = (16 * 5) ** 2 + (8 * 6 + 8 * 5) ** 2
    assert plans.chain_taps(14, 14, (16, 16, 0, 0, 32, 8, 8, 4), 5, 7, 3) == expect < 74 * 196


def _taps_by_brute_force(side, q, halo, sub, k, dil, own):
    """One dimension of chain_taps, from the definitions: every window, every sub-tile that holds an
    image pixel (the dilated conv, ``own``: an own pixel), times its taps that reach from one of
    its pixels an image pixel (the dilated conv: one of the window, where a1 is)."""
    pad, total = dil * (k - 1) // 2, 0
    for left in range(-halo, side - halo, q - 2 * halo):
        image = [r for r in range(q) if 0 <= left + r < side]
        wanted = [r for r in image if halo <= r < q - halo] if own else image
        readable = image if own else range(-left, side - left)
        for s0 in range(0, q, sub):
            if any(r in wanted for r in range(s0, s0 + sub)):
                total += sub * sum(1 for i in range(k)
                                   if any(r + i * dil - pad in readable for r in range(s0, s0 + sub)))
    return total


@pytest.mark.parametrize("side,window", [(28, (32, 32, 0, 0, 32, 8, 16, 8)), (112, (64, 64, 9, 9, 8, 16, 32, 8)),
                                         (21, (16, 32, 3, 0, 8, 8, 8, 8)), (21, (16, 16, 3, 3, 8, 2, 2, 8))])
def test_chain_taps_are_the_sub_tiles_taps(side, window):
    _, plans = _modules()
    qh, qw, halo_h, halo_w, _, sh, sw, _ = window
    expect = 0
    for k, dil, own in ((5, 1, False), (7, 3, True)):
        expect += (_taps_by_brute_force(side, qh, halo_h, sh, k, dil, own)
                   * _taps_by_brute_force(side, qw, halo_w, sw, k, dil, own))
    assert plans.chain_taps(side, side, window, 5, 7, 3) == expect


def test_cost_model_counts_the_fused_conv_s_taps():
    """lka_gate's kernels are (k0, ks, dilation): the fused and split plans' time follows the
    dilated conv's taps, never the dilation."""
    _, plans = _modules()
    for name in ("fused", "split"):
        # bfloat16: the 49 taps bound the depthwise kernel's time, 9 would not
        t = {k: plans.predicted_seconds(name, "lka_gate", 16, 768, 768, 28, 28, k, torch.bfloat16, "ieee")
             for k in ((5, 7, 3), (5, 7, 1), (5, 3, 3))}
        assert t[(5, 7, 3)] == t[(5, 7, 1)] > t[(5, 3, 3)], (name, t)


def test_weight_gemm_runs_one_tile_per_case(monkeypatch):
    """The backward weight GEMM's tile follows from D_STORED by rule, never from an autotuned race:
    tiles of different pixel blocks sum in different orders, and the gradients must be the same
    bits in every process.  The shipped lists (two tiles on a GPU, one under the interpreter) keep
    exactly one per case; other kernels' configurations are untouched."""
    import triton
    from dlkunet.kernels import _common as C
    shipped = C._pw_bwd_weight_kernel.configs
    for stored in (False, True):
        assert len(C._one_tile_per_case(shipped, {}, D_STORED=stored)) == 1
    recompute_tile = triton.Config(dict(BLOCK_P=32, BLOCK_CO=32, BLOCK_CI=32), num_warps=4)
    stored_tile = triton.Config(dict(BLOCK_P=64, BLOCK_CO=64, BLOCK_CI=64), num_warps=4)
    monkeypatch.setattr(C, "PW_BWD_WEIGHT_CONFIGS", [recompute_tile])
    monkeypatch.setattr(C, "PW_BWD_WEIGHT_STORED_CONFIGS", [stored_tile])
    both = [recompute_tile, stored_tile]
    assert C._one_tile_per_case(both, {}, D_STORED=False) == [recompute_tile]
    assert C._one_tile_per_case(both, {}, D_STORED=True) == [stored_tile]
    other = triton.Config(dict(BLOCK_P=16, BLOCK_C=8), num_warps=2)
    assert C.config_applies(other, True) and C.config_applies(other, False)
