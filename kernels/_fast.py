"""Tensor-core kernels of the planned forward paths (issue 13): eval dwconv_bn_act and lka_gate.

The kernels, combined by ``kernels/plans.py`` into a plan per shape:

- ``_fused_kernel``  depthwise conv + pointwise GEMM + epilogue in one pass.  A program owns a
  spatial patch (n, BH rows, BW columns; W innermost, so NCHW tap loads are coalesced rows) and a
  ``BLOCK_CO``-wide block of output channels: with BLOCK_CO >= Cout (the plans keep it so up to
  256 channels) each depthwise tap is computed once.  The depthwise tile of ``BLOCK_CI`` input
  channels feeds the tensor cores directly (``tl.dot``), never leaving the chip.
- ``_dw_kernel``     a depthwise conv writing its output once, on the same spatial patches (the
  split plan's first kernel, and lka_gate's first conv in the fused and split plans).
- ``_lka_chain_kernel``  lka_gate's two depthwise convs with a1 kept on chip over a window of
  pixels, a2 written once (the chain plan's first kernel, and its backward's a1 and a2).
- ``_gemm_kernel``   a large-tile tensor-core GEMM of the depthwise output with the pointwise
  weights, pipelined over K (``num_stages``), with the op's epilogue.  NCHW tiles are pixel runs
  inside one image (contiguous), channels_last tiles are flattened pixels (contiguous along C).
- ``_gemm_stats_kernel`` and ``_bn_batch_stats_kernel``  the training forward of dwconv_bn_act:
  the same GEMM reduced to BatchNorm's batch moments (z never written), merged on the device in a
  fixed order into the batch statistics and the epilogue's scale and shift; ``_gemm_kernel`` then
  recomputes z (the same tiles, the same bits) and applies them (``EPI_AFFINE``).

Precision (``PREC``, read from ``torch.backends.cudnn.allow_tf32`` on the host per call): float32
operands multiply as TF32 ("tf32") or at full precision ("tf32x3", three TF32 MMAs); float16 and
bfloat16 operands run ONE MMA in their own dtype with float32 accumulation.  ``TF32_ROUNDED`` is TF32
on operands that already hold TF32 values in memory: the split plan's depthwise kernel stores its
output rounded and a rounded copy of the pointwise weights (``ROUND_TF32``), so the GEMM's wgmma
reads both tiles from shared memory as they arrived, with no per-element conversion between the
pipelined loads and the tensor cores (with it, Triton moves the A tile through registers and the B
tile through registers and back to shared memory on every K step).

Epilogues (``EPI``): ``EPI_BN`` folds eval BatchNorm and the pointwise bias in the prologue from
gamma, beta and the running statistics (float32, on the device; the program of pixel block 0 also
writes the returned copies of the statistics), then ReLU; ``EPI_GATE`` is lka's
``x * (pointwise + b1)``; ``EPI_AFFINE`` a per-channel scale and shift from a buffer (training),
then ReLU.  The host runs no torch op besides allocating the outputs.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import _dw_taps, _dw_tile, _offsets, _pixel_step, _tap_range
from ._precision import _mma, _tf32, _to

EPI_BN, EPI_GATE, EPI_AFFINE = 0, 1, 2
TF32_ROUNDED = "tf32_rounded"
# Weight rows per step of the depthwise kernel's TF32 weight copy (x its BLOCK_C columns).
WPW_ROW_STEP = tl.constexpr(16)


@triton.jit
def _patch(pid, H, W, BH: tl.constexpr, BW: tl.constexpr):
    """Spatial patch pid of an (N, H, W) grid of BH x BW patches: image n (a scalar), the rows h
    and columns w of its BH*BW pixels (W innermost) and their in-image mask."""
    n_tw = tl.cdiv(W, BW)
    per_image = tl.cdiv(H, BH) * n_tw
    n = pid // per_image
    r = pid % per_image
    i = tl.arange(0, BH * BW)
    h = (r // n_tw) * BH + i // BW
    w = (r % n_tw) * BW + i % BW
    return n, h, w, (h < H) & (w < W)


@triton.jit
def _prologue(co, comask, stat_lim, b_ptr, g_ptr, be_ptr, rm_ptr, rv_ptr, mean_ptr, var_ptr, eps,
              EPI: tl.constexpr):
    """Per-channel epilogue parameters (p0, p1): BN's folded scale and shift (b_pw included), the
    gate's bias b1, or (EPI_AFFINE) a scale and shift computed before the launch, read from b_ptr
    and g_ptr.  EPI_BN: channels below ``stat_lim`` (COUT in the first pixel block's programs, else
    0) also get the returned copies of the statistics written."""
    p0 = tl.load(b_ptr + co, mask=comask, other=0.0).to(tl.float32)
    p1 = p0
    if EPI == 2:
        p1 = tl.load(g_ptr + co, mask=comask, other=0.0)
    if EPI == 0:
        gamma = tl.load(g_ptr + co, mask=comask, other=0.0).to(tl.float32)
        beta = tl.load(be_ptr + co, mask=comask, other=0.0).to(tl.float32)
        rm = tl.load(rm_ptr + co, mask=comask, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptr + co, mask=comask, other=1.0).to(tl.float32)
        # Correctly rounded sqrt and division: the folded scale is within an ulp of float64's.
        scale = tl.div_rn(gamma, tl.sqrt_rn(rv + eps))
        p1 = (p0 - rm) * scale + beta
        p0 = scale
        tl.store(mean_ptr + co, rm, mask=co < stat_lim)
        tl.store(var_ptr + co, rv, mask=co < stat_lim)
    return p0, p1


@triton.jit
def _epilogue(acc, p0, p1, off, omask, out_ptr, x_ptr, EPI: tl.constexpr, RELU: tl.constexpr):
    if EPI == 1:
        xv = tl.load(x_ptr + off, mask=omask, other=0.0).to(tl.float32)
        y = xv * (acc + p0[None, :])
    else:
        y = acc * p0[None, :] + p1[None, :]
        if RELU:
            y = tl.maximum(y, 0.0)
    tl.store(out_ptr + off, _to(y, out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _fused_kernel(t_ptr, wdw_ptr, bdw_ptr, wpw_ptr, x_ptr, out_ptr,
                  b_ptr, g_ptr, be_ptr, rm_ptr, rv_ptr, mean_ptr, var_ptr, eps,
                  N, H, W, CIN, COUT,
                  K: tl.constexpr, DIL: tl.constexpr, EPI: tl.constexpr, RELU: tl.constexpr,
                  CL: tl.constexpr, PREC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                  BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
    """out = epilogue(dw_K,DIL(t) @ W_pw^T) on a spatial patch x BLOCK_CO output channels."""
    BLOCK_P: tl.constexpr = BH * BW
    pid_s = tl.program_id(0)
    pid_co = tl.program_id(1)
    n, h, w, pmask = _patch(pid_s, H, W, BH, BW)
    HW = H * W
    hw = h * W + w
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < COUT
    ci_range = tl.arange(0, BLOCK_CI)
    acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    for ci0 in range(0, CIN, BLOCK_CI):
        ci = ci0 + ci_range
        cimask = ci < CIN
        d = _dw_tile(t_ptr, wdw_ptr, bdw_ptr, n, h, w, pmask, ci, cimask, CIN, H, W,
                     K, DIL, CL, BLOCK_P, BLOCK_CI)
        wp = tl.load(wpw_ptr + co[None, :] * CIN + ci[:, None],
                     mask=cimask[:, None] & comask[None, :], other=0.0)
        # 16-bit: d rounded once to the input dtype, as eager's depthwise output is; one MMA.
        acc = _mma(_to(d, t_ptr.dtype.element_ty), wp.to(t_ptr.dtype.element_ty), acc, PREC)
    # After the loop: live across it the parameters would cost registers.
    p0, p1 = _prologue(co, comask, COUT * (1 - tl.minimum(pid_s, 1)), b_ptr, g_ptr, be_ptr, rm_ptr, rv_ptr, mean_ptr,
                       var_ptr, eps, EPI)
    off = _offsets(n * HW + hw, n, hw, co, COUT, HW, CL)
    _epilogue(acc, p0, p1, off, pmask[:, None] & comask[None, :], out_ptr, x_ptr, EPI, RELU)


@triton.jit
def _dw_kernel(t_ptr, w_ptr, b_ptr, out_ptr, wpw_ptr, wpw_out_ptr, N, H, W, C, COUT, WPW_ROWS,
               K: tl.constexpr, DIL: tl.constexpr, CL: tl.constexpr, ROUND_TF32: tl.constexpr,
               BH: tl.constexpr, BW: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = depthwise K x K conv (dilation DIL, zero padding, plus bias) of t, written once.

    ROUND_TF32 (float32 feeding a TF32 GEMM): out is stored rounded to TF32, and the program also
    stores its share of the pointwise weights (COUT x C) rounded to TF32 in wpw_out: the rows
    [pid_s * WPW_ROWS, (pid_s + 1) * WPW_ROWS) of its channel block, so one pass over the
    weights is spread over the whole grid."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n, h, w, pmask = _patch(pid_s, H, W, BH, BW)
    HW = H * W
    hw = h * W + w
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    d = _dw_tile(t_ptr, w_ptr, b_ptr, n, h, w, pmask, c, cmask, C, H, W, K, DIL, CL, BH * BW, BLOCK_C)
    if ROUND_TF32:
        d = _tf32(d)
    tl.store(out_ptr + _offsets(n * HW + hw, n, hw, c, C, HW, CL), _to(d, out_ptr.dtype.element_ty),
             mask=pmask[:, None] & cmask[None, :])
    if ROUND_TF32:
        _round_weight_share(wpw_ptr, wpw_out_ptr, pid_s, WPW_ROWS, COUT, c, cmask, C)


@triton.jit
def _round_weight_share(wpw_ptr, wpw_out_ptr, part, WPW_ROWS, COUT, c, cmask, C):
    """Share ``part`` (a spatial program, or a chain window) of the TF32-rounded copy of the
    pointwise weights (COUT x C): the rows [part * WPW_ROWS, (part + 1) * WPW_ROWS) of the channels c."""
    row_lo = part * WPW_ROWS
    row_hi = tl.minimum(row_lo + WPW_ROWS, COUT)
    for r0 in range(row_lo, row_hi, WPW_ROW_STEP):
        r = r0 + tl.arange(0, WPW_ROW_STEP)
        m = (r < row_hi)[:, None] & cmask[None, :]
        off = r[:, None] * C + c[None, :]
        tl.store(wpw_out_ptr + off, _tf32(tl.load(wpw_ptr + off, mask=m, other=0.0)), mask=m)


@triton.jit
def _lka_chain_kernel(x_ptr, w0_ptr, b0_ptr, ws_ptr, bs_ptr, a2_ptr, a1_ptr, scratch_ptr, wpw_ptr, wpw_out_ptr,
                      N, H, W, C, COUT, WPW_ROWS,
                      K0: tl.constexpr, KS: tl.constexpr, DIL: tl.constexpr, CL: tl.constexpr,
                      ROUND_TF32: tl.constexpr, STORE_A1: tl.constexpr, QH: tl.constexpr, QW: tl.constexpr,
                      HALO_H: tl.constexpr, HALO_W: tl.constexpr, BLOCK_C: tl.constexpr,
                      SH: tl.constexpr, SW: tl.constexpr):
    """lka_gate's depthwise chain a2 = dw_KS,DIL(dw_K0(x)), written once; a1 never goes to DRAM.

    Work items are (QH x QW window of an image, BLOCK_C channels); a persistent program walks the
    items pid, pid + programs, ...  It computes a1 on the window, stores it in its own scratch slot
    (window-sized, so all slots together stay in L2; the taps read it back through L1), and runs
    the dilated conv on the slot: zero padding outside the image.  a2 is written at the window's
    inner (QH - 2 HALO_H) x (QW - 2 HALO_W) pixels, its own.  HALO is the dilated conv's radius
    along a dimension that several windows tile, 0 along one that a single window covers (every
    tap outside it is outside the image, where a1 is zero: the second conv's padding) or where the
    radius is 0; neighbouring windows overlap by their halos, whose a1 is computed twice.
    (Triton has no addressable shared memory, and ``tl.gather`` from a register tile compiles to
    warp shuffles: about eight shuffles and selects per tap and element.)

    Both convs run on SH x SW sub-tiles of the window (the registers' tile, x BLOCK_C channels):
    a1 on those that hold image pixels, a2 on those that hold own pixels, each with only the tap
    rows and columns that reach x's image (a1's part of the window) from one of its pixels
    (``_tap_range``).  Windows are powers of two and the dilated conv's taps mostly fall outside
    small images (at 14 x 14, 60% of the 7 x 7 dilation-3 taps), so the sub-tiles skip most of
    that padding and the pixels past the image.  A skipped tap would add exact zeros: same bits.

    16-bit inputs: a1 is rounded to the input dtype, as when it is written (the split plan), so a2
    is the same bits.  ROUND_TF32 and the weight share as in ``_dw_kernel``.  STORE_A1 (the
    backward, which needs both) also writes a1 at the own pixels."""
    Q: tl.constexpr = QH * QW
    OH: tl.constexpr = QH - 2 * HALO_H
    OW: tl.constexpr = QW - 2 * HALO_W
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n_ww = tl.cdiv(W, OW)
    per_image = tl.cdiv(H, OH) * n_ww
    n_cb = tl.cdiv(C, BLOCK_C)
    HW = H * W
    step = _pixel_step(C, CL)
    slot_step = _pixel_step(BLOCK_C, CL)
    s = tl.arange(0, SH * SW)
    sh = s // SW
    sw = s % SW
    c_local = tl.arange(0, BLOCK_C)
    slot = scratch_ptr + pid * (Q * BLOCK_C)
    for item in range(pid, N * per_image * n_cb, programs):
        window = item // n_cb
        c0 = (item % n_cb) * BLOCK_C
        n = window // per_image
        win = window % per_image
        top = (win // n_ww) * OH - HALO_H  # the window's origin in the image
        left = (win % n_ww) * OW - HALO_W
        # in window coordinates: the pixels inside the image (v), and the own ones (o)
        vh_lo = tl.maximum(-top, 0)
        vh_hi = tl.minimum(H - top, QH)
        vw_lo = tl.maximum(-left, 0)
        vw_hi = tl.minimum(W - left, QW)
        oh_lo = tl.maximum(vh_lo, HALO_H)
        oh_hi = tl.minimum(vh_hi, QH - HALO_H)
        ow_lo = tl.maximum(vw_lo, HALO_W)
        ow_hi = tl.minimum(vw_hi, QW - HALO_W)
        c = c0 + c_local
        cmask = c < C
        tl.debug_barrier()  # the previous item's taps have read the slot
        for th in range(vh_lo // SH, tl.cdiv(vh_hi, SH)):
            for tw in range(vw_lo // SW, tl.cdiv(vw_hi, SW)):
                qh = th * SH + sh
                qw = tw * SW + sw
                h = top + qh
                w = left + qw
                inside = (qh >= vh_lo) & (qh < vh_hi) & (qw >= vw_lo) & (qw < vw_hi)
                ky_lo, ky_hi = _tap_range(th * SH, SH, -top, H - top, K0, 1)  # x's taps: the image's
                kx_lo, kx_hi = _tap_range(tw * SW, SW, -left, W - left, K0, 1)
                hw = h * W + w
                off = _offsets(n * HW + hw, n, hw, c, C, HW, CL)
                a1 = _dw_taps(x_ptr + off, w0_ptr, b0_ptr, h, w, inside, c, cmask, 0, H, 0, W, W * step, step,
                              ky_lo, ky_hi, kx_lo, kx_hi, K0, 1, SH * SW, BLOCK_C)
                a1 = tl.where(inside[:, None], _to(a1, x_ptr.dtype.element_ty).to(tl.float32), 0.0)
                q = qh * QW + qw
                # exact: a1 holds x's dtype's values
                tl.store(slot + _offsets(q, 0, q, c_local, BLOCK_C, Q, CL), a1.to(scratch_ptr.dtype.element_ty))
                if STORE_A1:
                    own = (qh >= oh_lo) & (qh < oh_hi) & (qw >= ow_lo) & (qw < ow_hi)
                    tl.store(a1_ptr + off, a1.to(a1_ptr.dtype.element_ty), mask=own[:, None] & cmask[None, :])
        tl.debug_barrier()  # every thread's a1 is in the slot
        for th in range(oh_lo // SH, tl.cdiv(oh_hi, SH)):
            for tw in range(ow_lo // SW, tl.cdiv(ow_hi, SW)):
                qh = th * SH + sh
                qw = tw * SW + sw
                own = (qh >= oh_lo) & (qh < oh_hi) & (qw >= ow_lo) & (qw < ow_hi)
                ky_lo, ky_hi = _tap_range(th * SH, SH, vh_lo, vh_hi, KS, DIL)  # a1's: the window's
                kx_lo, kx_hi = _tap_range(tw * SW, SW, vw_lo, vw_hi, KS, DIL)
                q = qh * QW + qw
                a2 = _dw_taps(slot + _offsets(q, 0, q, c_local, BLOCK_C, Q, CL), ws_ptr + c0 * (KS * KS), bs_ptr + c0,
                              qh, qw, own, c_local, cmask, vh_lo, vh_hi, vw_lo, vw_hi, QW * slot_step, slot_step,
                              ky_lo, ky_hi, kx_lo, kx_hi, KS, DIL, SH * SW, BLOCK_C)
                if ROUND_TF32:
                    a2 = _tf32(a2)
                hw = (top + qh) * W + (left + qw)
                tl.store(a2_ptr + _offsets(n * HW + hw, n, hw, c, C, HW, CL), _to(a2, a2_ptr.dtype.element_ty),
                         mask=own[:, None] & cmask[None, :])
        if ROUND_TF32:
            _round_weight_share(wpw_ptr, wpw_out_ptr, window, WPW_ROWS, COUT, c, cmask, C)


@triton.jit
def _m_tile(pid_m, N, HW, CL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Pixels of GEMM row tile pid_m: p = n*HW + hw, n, hw and their mask.  NCHW tiles are runs
    inside one image (contiguous), channels_last tiles flattened pixels."""
    if CL:
        p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pmask = p < N * HW
        n = p // HW
        hw = p % HW
    else:
        per_image = tl.cdiv(HW, BLOCK_M)
        n = pid_m // per_image
        hw = (pid_m % per_image) * BLOCK_M + tl.arange(0, BLOCK_M)
        pmask = hw < HW
        p = n * HW + hw
    return p, n, hw, pmask


@triton.jit
def _m_tiles(N, HW, CL: tl.constexpr, BLOCK_M: tl.constexpr):
    if CL:
        return tl.cdiv(N * HW, BLOCK_M)
    return N * tl.cdiv(HW, BLOCK_M)


@triton.jit
def _gemm_tile(a_ptr, w_ptr, p, n, hw, pmask, co, comask, HW, CIN, CL: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 accumulator of a[p, :] @ W[co, :]^T over K = CIN, pipelined over K."""
    k_range = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, CIN, BLOCK_K):
        ci = k0 + k_range
        cimask = ci < CIN
        a = tl.load(a_ptr + _offsets(p, n, hw, ci, CIN, HW, CL), mask=pmask[:, None] & cimask[None, :],
                    other=0.0)
        b = tl.load(w_ptr + co[None, :] * CIN + ci[:, None], mask=cimask[:, None] & comask[None, :],
                    other=0.0)
        acc = _mma(a, b.to(a.dtype), acc, PREC)
    return acc


@triton.jit
def _gemm_kernel(a_ptr, w_ptr, x_ptr, out_ptr, b_ptr, g_ptr, be_ptr, rm_ptr, rv_ptr, mean_ptr, var_ptr,
                 eps, N, HW, CIN, COUT,
                 EPI: tl.constexpr, RELU: tl.constexpr, CL: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = epilogue(a @ W^T): a is (N, CIN, H, W) activations, W is (COUT, CIN)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(COUT, BLOCK_N)
    pid_n = pid % n_tiles  # the output-channel tiles of one pixel block run together: a stays in L2
    pid_m = pid // n_tiles
    p, n, hw, pmask = _m_tile(pid_m, N, HW, CL, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    comask = co < COUT
    acc = _gemm_tile(a_ptr, w_ptr, p, n, hw, pmask, co, comask, HW, CIN, CL, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    p0, p1 = _prologue(co, comask, COUT * (1 - tl.minimum(pid_m, 1)), b_ptr, g_ptr, be_ptr, rm_ptr, rv_ptr,
                       mean_ptr, var_ptr, eps, EPI)
    off = _offsets(p, n, hw, co, COUT, HW, CL)
    _epilogue(acc, p0, p1, off, pmask[:, None] & comask[None, :], out_ptr, x_ptr, EPI, RELU)


@triton.jit
def _gemm_stats_kernel(a_ptr, w_ptr, part_ptr, N, HW, CIN, COUT, GROUPS,
                       CL: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """BatchNorm's batch moments of z = a @ W^T (b_pw left out: it moves the mean only), z never
    stored.  Program (g, channel tile) walks the row tiles g, g + GROUPS, ... in order, centres
    each tile's moments on the tile's own mean and merges them into its running (mean, M2, count)
    by Chan's formula, then writes them as part[g] = (mean, M2, count) x COUT: GROUPS rows that
    ``_bn_batch_stats_kernel`` merges, in a fixed order (no atomics: the same bits every run)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(COUT, BLOCK_N)
    pid_n = pid % n_tiles
    pid_g = pid // n_tiles
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    comask = co < COUT
    run_mean = tl.zeros([BLOCK_N], dtype=tl.float32)
    run_m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    run_cnt = 0.0
    for pid_m in range(pid_g, _m_tiles(N, HW, CL, BLOCK_M), GROUPS):
        p, n, hw, pmask = _m_tile(pid_m, N, HW, CL, BLOCK_M)
        acc = _gemm_tile(a_ptr, w_ptr, p, n, hw, pmask, co, comask, HW, CIN, CL, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        cnt = tl.sum(pmask.to(tl.float32), axis=0)
        mean = tl.sum(tl.where(pmask[:, None], acc, 0.0), axis=0) / cnt
        dev = tl.where(pmask[:, None], acc - mean[None, :], 0.0)
        m2 = tl.sum(dev * dev, axis=0)
        total = run_cnt + cnt
        delta = mean - run_mean
        run_mean += delta * (cnt / total)
        run_m2 += m2 + delta * delta * (run_cnt * cnt / total)
        run_cnt = total
    row = part_ptr + pid_g * 3 * COUT + co
    tl.store(row, run_mean, mask=comask)
    tl.store(row + COUT, run_m2, mask=comask)
    tl.store(row + 2 * COUT, tl.zeros([BLOCK_N], dtype=tl.float32) + run_cnt, mask=comask)


@triton.jit
def _stats_rows(part_ptr, g, c, cmask, GROUPS, COUT):
    """Rows g of ``_gemm_stats_kernel``'s output, channels c: (mean, M2, count) in float64, zero
    past GROUPS and COUT."""
    m = (g < GROUPS)[:, None] & cmask[None, :]
    row = part_ptr + g[:, None] * 3 * COUT + c[None, :]
    mean_i = tl.load(row, mask=m, other=0.0).to(tl.float64)
    m2_i = tl.load(row + COUT, mask=m, other=0.0).to(tl.float64)
    cnt_i = tl.load(row + 2 * COUT, mask=m, other=0.0).to(tl.float64)
    return mean_i, m2_i, cnt_i


@triton.jit
def _bn_batch_stats_kernel(part_ptr, b_ptr, g_ptr, be_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, eps, GROUPS, COUT,
                           BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """The GROUPS rows of ``_gemm_stats_kernel`` merged in float64 (Chan's formula, a fixed order):
    the batch mean (b_pw added back) and biased variance of z as float32 (the op's returned
    statistics), and the training epilogue's scale = gamma /
    sqrt(var + eps), shift = beta - (mean - b_pw) * scale, formed in float64 so that a large b_pw
    cancels exactly.  Two passes over the rows: the count-weighted mean, then the centred M2."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < COUT
    g_range = tl.arange(0, BLOCK_G)
    total = tl.zeros([BLOCK_C], dtype=tl.float64)
    weighted = tl.zeros([BLOCK_C], dtype=tl.float64)
    for g0 in range(0, GROUPS, BLOCK_G):
        mean_i, m2_i, cnt_i = _stats_rows(part_ptr, g0 + g_range, c, cmask, GROUPS, COUT)
        total += tl.sum(cnt_i, axis=0)
        weighted += tl.sum(cnt_i * mean_i, axis=0)
    total = tl.where(cmask, total, 1.0)  # channels past COUT: no 0/0
    mean = weighted / total
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for g0 in range(0, GROUPS, BLOCK_G):
        mean_i, m2_i, cnt_i = _stats_rows(part_ptr, g0 + g_range, c, cmask, GROUPS, COUT)
        d = mean_i - mean[None, :]
        m2 += tl.sum(m2_i + cnt_i * d * d, axis=0)
    var = m2 / total
    b_pw = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float64)
    gamma = tl.load(g_ptr + c, mask=cmask, other=0.0).to(tl.float64)
    beta = tl.load(be_ptr + c, mask=cmask, other=0.0).to(tl.float64)
    scale = gamma / tl.sqrt(var + eps)
    tl.store(mean_ptr + c, (mean + b_pw).to(tl.float32), mask=cmask)
    tl.store(var_ptr + c, var.to(tl.float32), mask=cmask)
    tl.store(scale_ptr + c, scale.to(tl.float32), mask=cmask)
    tl.store(shift_ptr + c, (beta - mean * scale).to(tl.float32), mask=cmask)


@triton.jit
def _fold_bn_kernel(w_ptr, wout_ptr, shift_ptr, b_ptr, g_ptr, be_ptr, rm_ptr, rv_ptr, mean_ptr, var_ptr, eps,
                    CIN, COUT, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
    """Eval BatchNorm folded into the pointwise weights for a library GEMM with a bias(+ReLU)
    epilogue: wout = W * scale (per output row, in W's dtype), shift = (b_pw - mean) * scale + beta
    (in shift's dtype), and the returned copies of the running statistics (the same per-channel
    arithmetic as the tensor-core kernels' prologue)."""
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < COUT
    scale, shift = _prologue(co, comask, COUT, b_ptr, g_ptr, be_ptr, rm_ptr, rv_ptr, mean_ptr, var_ptr, eps, 0)
    tl.store(shift_ptr + co, _to(shift, shift_ptr.dtype.element_ty), mask=comask)
    for ci0 in range(0, CIN, BLOCK_CI):
        ci = ci0 + tl.arange(0, BLOCK_CI)
        m = comask[:, None] & (ci < CIN)[None, :]
        w = tl.load(w_ptr + co[:, None] * CIN + ci[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(wout_ptr + co[:, None] * CIN + ci[None, :], _to(w * scale[:, None], wout_ptr.dtype.element_ty),
                 mask=m)
