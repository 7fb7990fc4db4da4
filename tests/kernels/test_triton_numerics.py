"""Triton-specific numerics the shared equivalence suite (tests/ops) does not single out: batch
statistics without cancellation, every ablation kernel size, and multi-block reductions.  Under
the interpreter (no GPU) the shapes stay tiny; each case still spans several pixel blocks and
several reduction groups (16-pixel blocks, 2 groups there)."""
from __future__ import annotations

import pytest
import torch

from dlkunet.ops import availability, reference
from dlkunet_testing import BUDGET
from dlkunet_testing import dwconv_inputs as _dwconv_inputs
from dlkunet_testing import eager_mma_dwconv, eager_mma_lka, eager_tf32_dwconv, eager_tf32_lka
from dlkunet_testing import lka_inputs as _lka_inputs
from dlkunet_testing import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ok, why = availability("triton", DEVICE)
pytestmark = [pytest.mark.skipif(not ok, reason=f"triton backend unavailable: {why}")]
if DEVICE == "cuda":  # on a GPU these run the real kernels: part of the GPU suite (-m gpu)
    pytestmark.append(pytest.mark.gpu)


def _kernels():
    from dlkunet import kernels
    return kernels


def test_batch_statistics_survive_a_large_mean():
    # z has mean ~1e3 and variance ~1: E[z^2] - E[z]^2 in float32 would lose every digit.
    g = torch.Generator().manual_seed(1)
    x, p = _dwconv_inputs(2, 5, 17, 7, 6, 3, 1000.0, g)
    y, mean, var = _kernels().dwconv_bn_act_forward(x.float().to(DEVICE), *[t.float().to(DEVICE) for t in p],
                                                    True, 1e-5, True)
    y_ref, mean_ref, var_ref = reference.dwconv_bn_act_forward(x, *p, True, 1e-5, True)
    assert rel_err(mean, mean_ref) <= 1e-6
    assert rel_err(var, var_ref) <= 1e-5
    assert rel_err(y, y_ref) <= 1e-5


@pytest.mark.parametrize("k", [3, 5, 7])
def test_dwconv_bn_act_kernel_sizes(k):
    g = torch.Generator().manual_seed(k)
    x, p = _dwconv_inputs(2, 6, 18, 5, 7, k, 0.0, g)
    gy = torch.randn(2, 18, 5, 7, dtype=torch.float64, generator=g)
    training = k != 5
    K = _kernels()
    dev = lambda t: t.float().to(DEVICE)  # noqa: E731
    y, mean, var = K.dwconv_bn_act_forward(dev(x), *map(dev, p), training, 1e-5, True)
    grads = K.dwconv_bn_act_backward(dev(gy), dev(x), *map(dev, p[:6]), mean, var, training, 1e-5, True)
    y_ref, m_ref, v_ref = reference.dwconv_bn_act_forward(x, *p, training, 1e-5, True)
    ref = reference.dwconv_bn_act_backward(gy, x, *p[:6], m_ref, v_ref, training, 1e-5, True)
    assert rel_err(y, y_ref) <= 1e-5
    for i, (got, want) in enumerate(zip(grads, ref)):
        # training: the bias gradients are exactly zero; judge them at their weights' scale
        scale = float(ref[i - 1].norm()) if training and i in (2, 4) else None
        assert rel_err(got, want, scale) <= 1e-5, f"gradient {i}"


@pytest.mark.parametrize("k0,ks,dilation", [(5, 7, 3), (3, 7, 3), (5, 5, 3)])
def test_lka_gate_ablation_kernels(k0, ks, dilation):
    g = torch.Generator().manual_seed(k0 * 10 + ks)
    c, n, h, w = 17, 2, 6, 5  # H, W below the dilated kernel's reach: a1's zero padding matters
    x, p = _lka_inputs(n, c, h, w, k0, ks, g)
    go = torch.randn_like(x)
    K = _kernels()
    dev = lambda t: t.float().to(DEVICE).contiguous(memory_format=torch.channels_last) if t.dim() == 4 and t.shape[0] == n else t.float().to(DEVICE)  # noqa: E731,E501
    out = K.lka_gate_forward(dev(x), *map(dev, p), dilation)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grads = K.lka_gate_backward(dev(go), dev(x), *map(dev, p), dilation)
    assert rel_err(out, reference.lka_gate_forward(x, *p, dilation)) <= 1e-5
    for i, (got, want) in enumerate(zip(grads, reference.lka_gate_backward(go, x, *p, dilation))):
        assert rel_err(got, want) <= 1e-5, f"gradient {i}"


# ------------------------------------------------------------------------------------------------
# The precision rule of the planned forward paths (kernels/plans.py): float32 runs TF32 exactly when
# torch.backends.cudnn.allow_tf32 is True, full precision (tf32x3) when it is False; 16-bit one MMA.
# Under the interpreter the kernels emulate the MMAs' operand rounding (kernels/_fast.py); on a GPU
# they are real.  Eager TF32 is emulated everywhere (its pointwise conv's operands rounded to TF32).


@pytest.mark.parametrize("plan", ["fused", "split", "split_cublas"])
def test_eval_dwconv_precision_follows_the_cudnn_tf32_flag(plan, tf32_flag, monkeypatch):
    from dlkunet.kernels import plans
    g = torch.Generator().manual_seed(7)
    # Cin 40: the GEMM's K spans several MMA steps; channels_last for the split plan, NCHW for fused.
    x, p = _dwconv_inputs(2, 40, 24, 5, 6, 3, 0.0, g)
    fmt = torch.contiguous_format if plan == "fused" else torch.channels_last
    y_ref = reference.dwconv_bn_act_forward(x, *p, False, 1e-5, True)[0]
    dev = lambda t: t.float().to(DEVICE)  # noqa: E731
    errs = {}
    # split_cublas's GEMM is cuBLAS's: it must run with the matmul flag set from the conv flag.
    gemm_flags = []
    addmm_activation = torch._addmm_activation

    def recording(*args, **kwargs):
        gemm_flags.append(torch.backends.cuda.matmul.allow_tf32)
        return addmm_activation(*args, **kwargs)
    monkeypatch.setattr(torch, "_addmm_activation", recording)
    matmul_flag = torch.backends.cuda.matmul.allow_tf32
    with plans.forced(plan):
        for on in (False, True):
            tf32_flag(on)  # read on every call: the same shape switches precision with the flag
            assert plans.precision(torch.float32) == ("tf32" if on else "tf32x3")
            y, _, _ = _kernels().dwconv_bn_act_forward(dev(x).contiguous(memory_format=fmt), *map(dev, p), False,
                                                       1e-5, True)
            errs[on] = rel_err(y, y_ref)
    eager_tf32 = rel_err(eager_tf32_dwconv(x, p, 1e-5), y_ref)
    assert errs[False] <= 1e-5, errs  # full precision: the float32 budget
    assert errs[True] <= 2 * eager_tf32, (errs, eager_tf32)  # TF32: no worse than 2x eager's TF32 error
    if plan == "split_cublas":
        assert gemm_flags == [False, True], gemm_flags  # the conv flag, call by call
        assert torch.backends.cuda.matmul.allow_tf32 == matmul_flag  # and restored
        if DEVICE == "cpu":
            return  # CPU matrix products have no TF32 mode: the flag is all there is to check
    # TF32 really ran: its error is that of 10-bit mantissas, far above the full-precision path's.
    assert errs[True] > 10 * errs[False], errs


@pytest.mark.parametrize("plan", ["fused", "split"])
def test_lka_gate_precision_follows_the_cudnn_tf32_flag(plan, tf32_flag):
    from dlkunet.kernels import plans
    g = torch.Generator().manual_seed(11)
    dil = 3
    x, p = _lka_inputs(1, 24, 5, 6, 5, 7, g)
    ref = reference.lka_gate_forward(x, *p, dil)
    dev = lambda t: t.float().to(DEVICE)  # noqa: E731
    errs = {}
    with plans.forced(plan):
        for on in (False, True):
            tf32_flag(on)
            errs[on] = rel_err(_kernels().lka_gate_forward(dev(x), *map(dev, p), dil), ref)
    eager_tf32 = rel_err(eager_tf32_lka(x, p, dil), ref)
    assert errs[False] <= 1e-5, errs
    assert errs[True] <= 2 * eager_tf32, (errs, eager_tf32)
    assert errs[True] > 10 * errs[False], errs


def _tf32_ulp_rounded(t: torch.Tensor) -> bool:
    """Every value of float32 t holds a TF32 number (the low 13 mantissa bits zero)."""
    return bool(((t.contiguous().view(torch.int32) & 0x1FFF) == 0).all())


@pytest.mark.parametrize("op", ["dwconv_bn_act", "lka_gate"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_split_gemm_reads_operands_rounded_once_to_tf32(op, layout, tf32_flag):
    """Under TF32 the split plan's depthwise kernel stores its output rounded to TF32 and a rounded
    copy of the pointwise weights, and the GEMM multiplies them as they are: the same products as
    the GEMM rounding both operands itself, bit for bit."""
    from dlkunet.kernels import _fast, plans
    tf32_flag(True)
    g = torch.Generator().manual_seed(13)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    dev = lambda t: t.float().to(DEVICE)  # noqa: E731
    if op == "dwconv_bn_act":
        x, p = _dwconv_inputs(2, 40, 24, 5, 6, 3, 0.0, g)
        x = dev(x).contiguous(memory_format=fmt)
        w_dw, b_dw, w_pw, b_pw = map(dev, p[:4])
        stats = [dev(t) for t in p[4:]] + [torch.empty(24, device=DEVICE) for _ in range(2)]
        t, dil, epi, relu, eps, prm = x, 1, _fast.EPI_BN, True, 1e-5, (b_pw, *stats)
    else:
        x, p = _lka_inputs(1, 24, 5, 6, 5, 7, g)
        x = dev(x).contiguous(memory_format=fmt)
        w0, b0, w_dw, b_dw, w_pw, b1 = map(dev, p)
        dil, epi, relu, eps, prm = 3, _fast.EPI_GATE, False, 0.0, (b1,) * 7
    plan = plans.tiles(plans.SPLIT, x.shape[1], w_pw.shape[0], x.shape[3], torch.float32)
    if op == "lka_gate":
        t = plans._depthwise(x, w0, b0, 1, fmt, plan)  # a1, as the op computes it
    n, cin, h, w = t.shape
    d, w_rounded, prec = plans._gemm_operands(t, w_dw, b_dw, w_pw, dil, fmt, plan, "tf32")
    assert prec == _fast.TF32_ROUNDED
    d_exact = plans._depthwise(t, w_dw, b_dw, dil, fmt, plan)
    for rounded, exact in ((d, d_exact), (w_rounded, w_pw)):
        assert _tf32_ulp_rounded(rounded)
        # to nearest: within half a TF32 ulp (2^-11 relative), and not simply the exact values
        assert ((rounded - exact).abs() <= exact.abs() * 2.0 ** -11).all()
        assert not torch.equal(rounded, exact)
    cl = layout == "cl"
    outs = []
    for a, b, pr in ((d, w_rounded, prec), (d_exact, w_pw, "tf32")):
        out = torch.empty(n, w_pw.shape[0], h, w, device=DEVICE).contiguous(memory_format=fmt)
        plans._launch_gemm(a, b, x, out, prm, eps, epi, relu, cl, pr, plan.gemm)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    # and the op's own split plan is that GEMM
    with plans.forced(plans.SPLIT):
        if op == "dwconv_bn_act":
            y = _kernels().dwconv_bn_act_forward(x, *map(dev, p), False, eps, relu)[0]
        else:
            y = _kernels().lka_gate_forward(x, *map(dev, p), dil)
    assert torch.equal(y, outs[0])


# ------------------------------------------------------------------------------------------------
# The training forward of dwconv_bn_act on the planned kernels (kernels/plans.py
# dwconv_bn_act_train): depthwise kernel, statistics GEMM, on-device merge, GEMM with the affine.


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_statistics_merge_many_row_tiles_per_program(layout, dtype, monkeypatch):
    """Programs of the statistics GEMM that walk several row tiles (and channel tiles beyond the
    first) merge their moments into the batch statistics of z within float32's budget.  The GPU's
    programs are held to those of one SM, so that each walks several tiles at a small shape."""
    from dlkunet.kernels import plans
    monkeypatch.setattr(plans, "_multiprocessors", lambda *a: 1)
    g = torch.Generator().manual_seed(17)
    # more output channels than one GEMM tile: 64 wide under the interpreter, 128 on a GPU
    n, cin, cout, h, w = 2, 8, 40 if DEVICE == "cpu" else 136, 12, 13
    x, p = _dwconv_inputs(n, cin, cout, h, w, 3, 0.0, g)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    bm, bn = plans.tiles(plans.SPLIT, cin, cout, w, dtype).gemm[:2]
    m_tiles = -(-n * h * w // bm) if layout == "cl" else n * -(-h * w // bm)
    n_tiles = -(-cout // bn)
    groups = plans.stats_groups(m_tiles, n_tiles, torch.device(DEVICE))
    assert n_tiles > 1 and m_tiles > groups, (m_tiles, n_tiles, groups)  # the case this test is for
    dev = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    params = [dev(t) for t in p[:4]] + [t.float().to(DEVICE) for t in p[4:]]
    xd = dev(x).contiguous(memory_format=fmt)
    y, mean, var = _kernels().dwconv_bn_act_forward(xd, *params, True, 1e-5, True)
    # The reference on the inputs as the kernels see them (16-bit: rounded), in float64.
    y_ref, mean_ref, var_ref = reference.dwconv_bn_act_forward(xd.double(), *[t.double() for t in params],
                                                              True, 1e-5, True)
    assert mean.dtype == var.dtype == torch.float32
    assert rel_err(mean, mean_ref) <= BUDGET[dtype] and rel_err(var, var_ref) <= BUDGET[dtype], (mean, var)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    assert rel_err(y, y_ref) <= BUDGET[dtype]


def test_training_forward_precision_follows_the_cudnn_tf32_flag(tf32_flag):
    g = torch.Generator().manual_seed(19)
    x, p = _dwconv_inputs(2, 40, 24, 5, 6, 3, 0.0, g)
    y_ref, _, var_ref = reference.dwconv_bn_act_forward(x, *p, True, 1e-5, True)
    dev = lambda t: t.float().to(DEVICE)  # noqa: E731
    errs = {}
    for on in (False, True):
        tf32_flag(on)
        y, _, var = _kernels().dwconv_bn_act_forward(dev(x).contiguous(memory_format=torch.channels_last),
                                                     *map(dev, p), True, 1e-5, True)
        errs[on] = rel_err(y, y_ref)
    eager_tf32 = rel_err(eager_tf32_dwconv(x, p, 1e-5, training=True), y_ref)
    assert errs[False] <= 1e-5, errs
    assert errs[True] <= 2 * eager_tf32, (errs, eager_tf32)
    assert errs[True] > 10 * errs[False], errs  # TF32 really ran


# The backward passes follow the same rule (kernels/_common.py: every GEMM through _precision._mma).
# Eager's TF32 backward is emulated with every product's operands rounded (eager_mma_*); a gradient
# whose error does not come from a product (e.g. grad_beta) is held to float32's budget instead.
DW_GRADS = ("grad_x", "grad_w_dw", "grad_b_dw", "grad_w_pw", "grad_b_pw", "grad_gamma", "grad_beta")
LKA_GRADS = ("grad_x", "grad_w0", "grad_b0", "grad_ws", "grad_bs", "grad_w1", "grad_b1")
# The gradients that carry a GEMM's rounding directly, where TF32 must show: grad_gamma that of the
# recomputed z (sum g * zhat), the others that of the backward's own GEMMs.
TF32_VISIBLE = ("grad_x", "grad_w_pw", "grad_gamma", "grad_w1")


def _judge_tf32_gradients(names, errs, eager_errs):
    f32 = BUDGET[torch.float32]
    for i, name in enumerate(names):
        if errs[False][i] is None:  # exactly zero in both modes (checked by the caller)
            continue
        assert errs[False][i] <= f32, (name, errs[False][i])  # full precision: the float32 budget
        bound = max(2 * eager_errs[i], f32)
        assert errs[True][i] <= bound, (name, errs[True][i], eager_errs[i])
        if name in TF32_VISIBLE:  # TF32 really ran in this gradient's GEMM
            assert errs[True][i] > 10 * errs[False][i], (name, errs[True][i], errs[False][i])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dwconv_backward_precision_follows_the_cudnn_tf32_flag(training, tf32_flag):
    g = torch.Generator().manual_seed(23)
    x, p = _dwconv_inputs(2, 40, 24, 5, 6, 3, 0.0, g)
    x, p = x.float().double(), [t.float().double() for t in p]  # the float32 values the kernels see
    gy = torch.randn(2, 24, 5, 6, dtype=torch.float64, generator=g).float().double()
    _, mean, var = reference.dwconv_bn_act_forward(x, *p, training, 1e-5, True)
    refs = reference.dwconv_bn_act_backward(gy, x, *p[:6], mean, var, training, 1e-5, True)
    dev = lambda t: t.float().to(DEVICE)  # noqa: E731
    errs = {}
    for on in (False, True):
        tf32_flag(on)
        # the exact statistics: the errors are the backward's own, not its forward's
        grads = _kernels().dwconv_bn_act_backward(dev(gy), dev(x), *map(dev, p[:6]), dev(mean), dev(var), training,
                                                  1e-5, True)
        errs[on] = []
        for name, got, ref in zip(DW_GRADS, grads, refs):
            if training and name in ("grad_b_dw", "grad_b_pw"):  # BatchNorm cancels them exactly
                assert torch.equal(got, torch.zeros_like(got)), name
                errs[on].append(None)
            else:
                errs[on].append(rel_err(got, ref))
    eager = eager_mma_dwconv([x, *p[:6]], p[6], p[7], training, 1e-5, True, gy, torch.float32)[3]
    _judge_tf32_gradients(DW_GRADS, errs, [rel_err(e, r) for e, r in zip(eager, refs)])


def test_lka_backward_precision_follows_the_cudnn_tf32_flag(tf32_flag):
    g = torch.Generator().manual_seed(29)
    dil = 3
    x, p = _lka_inputs(1, 24, 5, 6, 5, 7, g)
    x, p = x.float().double(), [t.float().double() for t in p]
    go = torch.randn(1, 24, 5, 6, dtype=torch.float64, generator=g).float().double()
    refs = reference.lka_gate_backward(go, x, *p, dil)
    dev = lambda t: t.float().to(DEVICE)  # noqa: E731
    errs = {}
    for on in (False, True):
        tf32_flag(on)
        grads = _kernels().lka_gate_backward(dev(go), dev(x), *map(dev, p), dil)
        errs[on] = [rel_err(got, ref) for got, ref in zip(grads, refs)]
    eager = eager_mma_lka([x, *p], dil, go, torch.float32)[1]
    _judge_tf32_gradients(LKA_GRADS, errs, [rel_err(e, r) for e, r in zip(eager, refs)])



@pytest.mark.parametrize("transpose,split_last", [(False, False), (True, True), (False, True), (True, False)])
def test_group_sums_are_float64_sums_in_every_layout(transpose, split_last):
    """_sum_groups_kernel, which merges every backward reduction: more groups than one step and more
    elements than one program (the backward tests under the interpreter reach neither), and partial
    rows that cancel across two steps (+-1e4), so that a float32 accumulation would lose ~1e-4
    relative where float64 loses nothing."""
    from dlkunet.kernels import _common as C
    g = torch.Generator().manual_seed(31)
    groups, rows, cols = 2 * C.SUM_GROUP_STEP + 7, 10, 29
    assert rows * cols > 2 * C.SUM_BLOCK
    part = torch.randn(groups, rows, cols, generator=g)
    big = 1e4 * torch.sign(torch.randn(rows, cols, generator=g))
    part[0] += big  # in the first step of groups ...
    part[C.SUM_GROUP_STEP + 1] -= big  # ... and cancelled in the second, whatever the order within a step
    want = part.double().sum(0)
    out_rows = rows - int(split_last)
    out = torch.full((cols, out_rows) if transpose else (out_rows, cols), float("nan"), device=DEVICE)
    last = torch.full((cols,), float("nan"), device=DEVICE) if split_last else None
    C.sum_groups(part.to(DEVICE), out, last, transpose=transpose)
    w = want[:out_rows].t() if transpose else want[:out_rows]
    torch.testing.assert_close(out.cpu().double(), w, rtol=2 ** -23, atol=0)
    if split_last:
        torch.testing.assert_close(last.cpu().double(), want[-1], rtol=2 ** -23, atol=0)
