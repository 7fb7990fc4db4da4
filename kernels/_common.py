"""The Triton kernels of both operators' backward passes: six kernels and their launchers (the
forward paths are the planned kernels of ``_fast`` and ``plans``).

Every activation tensor is (N, C, H, W), NCHW-contiguous or channels_last (the ``CL`` constexpr), and
is tiled as (BLOCK_P pixels of the flattened N*H*W) x (a block of channels).  Depthwise taps are
gathered loads (neighbouring pixels of a tile hit L1/L2), accumulated in float32 registers.

- ``_dw_pw_kernel``   depthwise conv of t (recomputed from its taps, or read where the host wrote it
  once: ``D_STORED``), fed block by block over input channels to the tensor cores with the
  pointwise weights; the epilogue (``MODE``) turns the pointwise result into the backward
  quantities, so the pointwise result is never written.
- ``_pw_bwd_data_kernel``  gd = gz @ W_pw (the gradient reaching the depthwise output), with the
  depthwise weight/bias gradients reduced from gd and the recomputed taps of t.
- ``_pw_bwd_weight_kernel``  grad W_pw = gz^T @ dw(t) (dw recomputed or read), grad b_pw = sum gz.
- ``_dw_bwd_kernel``  transposed depthwise conv (the input gradient), optionally plus another
  tensor, optionally with the weight gradients of a *preceding* depthwise conv.
- ``_dw_fwd_kernel``  a plain depthwise conv (LKA's first conv, recomputed once by its backward).
- ``_sum_groups_kernel``  the other kernels' partial rows summed over programs (float64).

Products run on tensor cores in the precision mode the caller passes (``PREC``, PyTorch's
convolution rule as in the forward: ``plans.precision``); operands in 16-bit inputs are rounded to
their dtype as the forward rounds them.

Reductions over pixels never use atomics: each program walks a fixed set of pixel blocks
(grid-stride over ``NUM_GROUPS`` groups) and writes one partial row; ``_sum_groups_kernel`` sums
the rows in float64, in a fixed order, on the device.  That keeps results deterministic and every
kernel safe to re-run while autotuning, and the host runs no torch op but allocations, views
and (training) the zero bias gradients.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._precision import INTERPRET, _mma, _to


# Epilogues of _dw_pw_kernel, all of the backward passes (the kernel compares the numbers):
# BatchNorm's per-channel sums of g and g * zhat; gz in eval (and those sums); lka's gate; gz in
# training (the batch means of those sums subtracted).
BN_BWD_STATS, BN_BWD_GZ, GATE_BWD, BN_BWD_GZ_CENTRED = 3, 4, 5, 6
_STATS, _GZ, _GATE, _GZ_CENTRED = (tl.constexpr(m) for m in (BN_BWD_STATS, BN_BWD_GZ, GATE_BWD, BN_BWD_GZ_CENTRED))
# Partial rows summed per step of _sum_groups_kernel, and the columns of one of its programs.
SUM_GROUP_STEP = 32
SUM_BLOCK = 128


# Every configuration states the hardware's register limit.  Without a .maxnreg, ptxas (run by Triton
# with --regAllocOptLevel=2) aims at an occupancy step (64 to 168 registers) and spilled 8-40 bytes
# in about one specialisation in fifteen; with the limit it allocates what the kernel needs.
MAX_REGISTERS = 255


def _cfg(kw, warps, stages=2):
    return triton.Config(kw, num_warps=warps, num_stages=stages, maxnreg=MAX_REGISTERS)


# Shipped block configurations (tests/kernels/test_compile.py compiles every one of them).  Under
# the interpreter one small configuration: autotuning there only costs time.
if INTERPRET:
    PW_BWD_WEIGHT_STORED_CONFIGS = []
    DW_PW_CONFIGS = [_cfg(dict(BLOCK_P=64, BLOCK_CO=16, BLOCK_CI=16), 1)]
    PW_BWD_DATA_CONFIGS = [_cfg(dict(BLOCK_P=64, BLOCK_CI=16, BLOCK_CO=16), 1)]
    PW_BWD_WEIGHT_CONFIGS = [_cfg(dict(BLOCK_P=64, BLOCK_CO=16, BLOCK_CI=16), 1)]
    DW_CONFIGS = [_cfg(dict(BLOCK_P=64, BLOCK_C=16), 1)]
    DW_BWD_CONFIGS = DW_CONFIGS
else:
    # Kept only where the cubins of every shipped specialisation, in every dtype, have no spills on
    # sm_80 and sm_90a (tests/kernels/test_compile.py).  dw_pw needs 8 warps: at 4, float16
    # BN_BWD_STATS with 7x7 taps spilled at 255 registers on sm_80.  Larger tiles (e.g. 128x64x32)
    # spilled.
    DW_PW_CONFIGS = [
        _cfg(dict(BLOCK_P=64, BLOCK_CO=32, BLOCK_CI=16), 8),
    ]
    PW_BWD_DATA_CONFIGS = [
        _cfg(dict(BLOCK_P=64, BLOCK_CI=16, BLOCK_CO=32), 8),
    ]
    # The weight GEMM reading the stored depthwise output (no taps in registers) runs a 64x64x64
    # tile, which spilled with the taps recomputed.  One tile per case, not an autotuned choice:
    # tiles of different BLOCK_P sum the pixels in a different order, and the gradients must be the
    # same bits in every process (_one_tile_per_case).
    PW_BWD_WEIGHT_STORED_CONFIGS = [_cfg(dict(BLOCK_P=64, BLOCK_CO=64, BLOCK_CI=64), 4, 3)]
    PW_BWD_WEIGHT_CONFIGS = [
        _cfg(dict(BLOCK_P=32, BLOCK_CO=32, BLOCK_CI=32), 4),
    ]
    DW_CONFIGS = [
        _cfg(dict(BLOCK_P=32, BLOCK_C=32), 4),
    ]
    DW_BWD_CONFIGS = [
        _cfg(dict(BLOCK_P=32, BLOCK_C=32), 4),
    ]

_KEY = ["N", "H", "W", "CIN", "COUT", "K", "DIL", "MODE", "CL", "PREC"]
_STORED_KEY = _KEY + ["D_STORED"]


def config_applies(config: triton.Config, d_stored: bool) -> bool:
    """Whether a block configuration serves a launch with (or without) the stored depthwise output."""
    if not PW_BWD_WEIGHT_STORED_CONFIGS or config not in PW_BWD_WEIGHT_CONFIGS + PW_BWD_WEIGHT_STORED_CONFIGS:
        return True
    return (config in PW_BWD_WEIGHT_STORED_CONFIGS) == d_stored


def _one_tile_per_case(configs, named_args, **kwargs):
    return [c for c in configs if config_applies(c, bool(kwargs.get("D_STORED", False)))]


_DW_KEY = ["N", "H", "W", "C", "K", "DIL", "K2", "ADD", "CL"]


# ----------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _offsets(p, n, hw, c, C, HW, CL: tl.constexpr):
    """Element offsets of pixels (p = n*HW + hw) x channels c in an (N, C, H, W) tensor."""
    if CL:
        return p[:, None] * C + c[None, :]
    else:
        return (n * (C * HW) + hw)[:, None] + c[None, :] * HW


@triton.jit
def _pixel_step(C, CL: tl.constexpr):
    """Element distance between horizontally neighbouring pixels."""
    if CL:
        return C
    else:
        return 1


@triton.jit
def _dw_tile(t_ptr, w_ptr, b_ptr, n, h, w, pmask, c, cmask, C, H, W,
             K: tl.constexpr, DIL: tl.constexpr, CL: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """float32 depthwise conv (zero padding DIL*(K-1)//2, plus bias) at a pixel x channel tile."""
    HW = H * W
    step = _pixel_step(C, CL)
    # One pointer tile; a tap is a scalar shift of it (the mask keeps it inside the image).
    base = t_ptr + _offsets(n * HW + h * W + w, n, h * W + w, c, C, HW, CL)
    return _dw_taps(base, w_ptr, b_ptr, h, w, pmask, c, cmask, 0, H, 0, W, W * step, step, 0, K, 0, K,
                    K, DIL, BLOCK_P, BLOCK_C)


@triton.jit
def _dw_taps(base, w_ptr, b_ptr, h, w, pmask, c, cmask, h_lo, h_hi, w_lo, w_hi, row_step, col_step,
             ky_lo, ky_hi, kx_lo, kx_hi, K: tl.constexpr, DIL: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """float32 depthwise conv (plus bias) at a pixel x channel tile of pointers ``base`` at (h, w):
    tap (ky, kx) reads base + dy * row_step + dx * col_step, zero outside [h_lo, h_hi) x [w_lo,
    w_hi) (the padding).  Only the taps ky_lo <= ky < ky_hi, kx_lo <= kx < kx_hi run: the caller
    knows the others read padding at every pixel of the tile (``_tap_range``)."""
    PAD: tl.constexpr = DIL * (K - 1) // 2
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    # A loop (not unrolled) over rows keeps only K taps' loads in flight: K*K unrolled gathered
    # loads were all hoisted and spilled.
    for ky in range(ky_lo, ky_hi):
        dy = ky * DIL - PAD
        hh = h + dy
        hok = pmask & (hh >= h_lo) & (hh < h_hi)
        for kx in tl.static_range(K):
            if (kx >= kx_lo) & (kx < kx_hi):
                dx = kx * DIL - PAD
                ww = w + dx
                ok = hok & (ww >= w_lo) & (ww < w_hi)
                v = tl.load(base + (dy * row_step + dx * col_step), mask=ok[:, None] & cmask[None, :], other=0.0)
                wt = tl.load(w_ptr + c * (K * K) + (ky * K + kx), mask=cmask, other=0.0)
                acc += v.to(tl.float32) * wt.to(tl.float32)[None, :]
    bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _tap_range(s0, S: tl.constexpr, lo, hi, K: tl.constexpr, DIL: tl.constexpr):
    """The taps [k_lo, k_hi) of a centred K-tap conv (dilation DIL) along one dimension that reach
    [lo, hi) from at least one of the positions s0 .. s0 + S - 1; every other tap reads outside it
    at all of them.  (Operands kept non-negative: the interpreter's // floors, the GPU's truncates.)"""
    PAD: tl.constexpr = DIL * (K - 1) // 2
    k_lo = (tl.maximum(lo - (s0 + S - 1) + PAD, 0) + DIL - 1) // DIL
    k_hi = tl.minimum((tl.maximum(hi - s0 + PAD, 0) + DIL - 1) // DIL, K)
    return k_lo, k_hi


@triton.jit
def _depthwise(t_ptr, w_ptr, b_ptr, d_ptr, p, n, hw, h, w, pmask, c, cmask, C, H, W,
               K: tl.constexpr, DIL: tl.constexpr, CL: tl.constexpr, D_STORED: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The depthwise output at a tile (float32): read from d_ptr where the host wrote it once
    (D_STORED), else recomputed from t's taps."""
    if D_STORED:
        return tl.load(d_ptr + _offsets(p, n, hw, c, C, H * W, CL), mask=pmask[:, None] & cmask[None, :],
                       other=0.0).to(tl.float32)
    return _dw_tile(t_ptr, w_ptr, b_ptr, n, h, w, pmask, c, cmask, C, H, W, K, DIL, CL, BLOCK_P, BLOCK_C)


@triton.jit
def _pixels(pb, P, HW, W, BLOCK_P: tl.constexpr):
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = p // HW
    hw = p % HW
    return p, p < P, n, hw, hw // W, hw % W


@triton.jit
def _groups(NUM_GROUPS, n_pb):
    """Pixel-block stride of a program: NUM_GROUPS, or one block per program when it is 0."""
    return tl.where(NUM_GROUPS > 0, NUM_GROUPS, n_pb)


# ----------------------------------------------------------------------------------------------
# kernels


@triton.autotune(configs=DW_PW_CONFIGS, key=_STORED_KEY)
@triton.jit
def _dw_pw_kernel(t_ptr, wdw_ptr, bdw_ptr, d_ptr, wpw_ptr, b_ptr, g_ptr, be_ptr, mean_ptr, var_ptr, sg_ptr, sgz_ptr,
                  out_ptr, out2_ptr, aux_ptr, aux2_ptr, part_ptr, eps, N, H, W, CIN, COUT, NUM_GROUPS,
                  K: tl.constexpr, DIL: tl.constexpr, MODE: tl.constexpr, RELU: tl.constexpr,
                  CL: tl.constexpr, PREC: tl.constexpr, D_STORED: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
    pid = tl.program_id(0)
    n_co = tl.cdiv(COUT, BLOCK_CO)
    pid_co = pid % n_co  # programs sharing a pixel block run together: t stays in L2
    pid_g = pid // n_co
    HW = H * W
    P = N * HW
    n_pb = tl.cdiv(P, BLOCK_P)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < COUT
    ci_range = tl.arange(0, BLOCK_CI)
    # Per-channel reductions carried over this program's pixel blocks.
    r_a = tl.zeros([BLOCK_CO], dtype=tl.float32)
    r_b = tl.zeros([BLOCK_CO], dtype=tl.float32)
    for pb in range(pid_g, n_pb, _groups(NUM_GROUPS, n_pb)):
        p, pmask, n, hw, h, w = _pixels(pb, P, HW, W, BLOCK_P)
        acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
        for ci0 in range(0, CIN, BLOCK_CI):
            ci = ci0 + ci_range
            cimask = ci < CIN
            d = _depthwise(t_ptr, wdw_ptr, bdw_ptr, d_ptr, p, n, hw, h, w, pmask, ci, cimask, CIN, H, W,
                           K, DIL, CL, D_STORED, BLOCK_P, BLOCK_CI)
            wp = tl.load(wpw_ptr + co[None, :] * CIN + ci[:, None],
                         mask=cimask[:, None] & comask[None, :], other=0.0)
            # d rounded to the input dtype, as the forward's depthwise stage stores it: the z
            # recomputed here is the forward's (its ReLU mask and statistics), up to summation order.
            acc = _mma(_to(d, wp.dtype), wp, acc, PREC)
        # Loaded here, not before the loops: kept live across them they cost ~100 registers.
        off = _offsets(p, n, hw, co, COUT, HW, CL)
        omask = pmask[:, None] & comask[None, :]
        b = tl.load(b_ptr + co, mask=comask, other=0.0).to(tl.float32)[None, :]  # b1, or b_pw
        if MODE == _GATE:  # the gate's backward: grad of the pointwise output (g*x) and x's direct share (g*u)
            g = tl.load(aux_ptr + off, mask=omask, other=0.0).to(tl.float32)
            xv = tl.load(aux2_ptr + off, mask=omask, other=0.0).to(tl.float32)
            tl.store(out_ptr + off, (g * xv).to(out_ptr.dtype.element_ty), mask=omask)
            tl.store(out2_ptr + off, (g * (acc + b)).to(out2_ptr.dtype.element_ty), mask=omask)
        else:  # BatchNorm's backward with the statistics the forward normalised with
            var = tl.load(var_ptr + co, mask=comask, other=1.0).to(tl.float32)[None, :]
            rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
            mean = tl.load(mean_ptr + co, mask=comask, other=0.0).to(tl.float32)[None, :]
            gamma = tl.load(g_ptr + co, mask=comask, other=0.0).to(tl.float32)[None, :]
            beta = tl.load(be_ptr + co, mask=comask, other=0.0).to(tl.float32)[None, :]
            zhat = acc * rstd + (b - mean) * rstd
            g = tl.load(aux_ptr + off, mask=omask, other=0.0).to(tl.float32)
            if RELU:
                g = tl.where(zhat * gamma + beta > 0.0, g, 0.0)
            if MODE == _GZ_CENTRED:  # training: minus the batch means of g and g * zhat (their sums / P)
                c1 = tl.load(sg_ptr + co, mask=comask, other=0.0)[None, :] / P
                c2 = tl.load(sgz_ptr + co, mask=comask, other=0.0)[None, :] / P
                gz = gamma * rstd * (g - c1 - zhat * c2)
                tl.store(out_ptr + off, gz.to(out_ptr.dtype.element_ty), mask=omask)
            else:
                r_a += tl.sum(g, axis=0)
                r_b += tl.sum(g * zhat, axis=0)
                if MODE == _GZ:
                    tl.store(out_ptr + off, (gamma * rstd * g).to(out_ptr.dtype.element_ty), mask=omask)
    if MODE == _STATS or MODE == _GZ:
        row = part_ptr + pid_g * (2 * COUT) + co
        tl.store(row, r_a, mask=comask)
        tl.store(row + COUT, r_b, mask=comask)


@triton.autotune(configs=PW_BWD_DATA_CONFIGS, key=_KEY)
@triton.jit
def _pw_bwd_data_kernel(gz_ptr, wpw_ptr, t_ptr, gd_ptr, part_ptr, N, H, W, CIN, COUT, NUM_GROUPS,
                        K: tl.constexpr, DIL: tl.constexpr, MODE: tl.constexpr, CL: tl.constexpr,
                        PREC: tl.constexpr, KKP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr,
                        BLOCK_CO: tl.constexpr):
    """gd = gz @ W_pw; partial rows of grad w_dw[c, tap] = sum gd * t(tap) and grad b_dw = sum gd."""
    PAD: tl.constexpr = DIL * (K - 1) // 2
    pid = tl.program_id(0)
    n_ci = tl.cdiv(CIN, BLOCK_CI)
    pid_ci = pid % n_ci
    pid_g = pid // n_ci
    HW = H * W
    P = N * HW
    n_pb = tl.cdiv(P, BLOCK_P)
    ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    cimask = ci < CIN
    co_range = tl.arange(0, BLOCK_CO)
    taps = tl.arange(0, KKP)
    wacc = tl.zeros([KKP, BLOCK_CI], dtype=tl.float32)
    bacc = tl.zeros([BLOCK_CI], dtype=tl.float32)
    for pb in range(pid_g, n_pb, _groups(NUM_GROUPS, n_pb)):
        p, pmask, n, hw, h, w = _pixels(pb, P, HW, W, BLOCK_P)
        acc = tl.zeros([BLOCK_P, BLOCK_CI], dtype=tl.float32)
        for co0 in range(0, COUT, BLOCK_CO):
            co = co0 + co_range
            comask = co < COUT
            gz = tl.load(gz_ptr + _offsets(p, n, hw, co, COUT, HW, CL),
                         mask=pmask[:, None] & comask[None, :], other=0.0)
            wp = tl.load(wpw_ptr + co[:, None] * CIN + ci[None, :],
                         mask=comask[:, None] & cimask[None, :], other=0.0)
            acc = _mma(gz, wp.to(gz.dtype), acc, PREC)
        tl.store(gd_ptr + _offsets(p, n, hw, ci, CIN, HW, CL), acc.to(gd_ptr.dtype.element_ty),
                 mask=pmask[:, None] & cimask[None, :])
        bacc += tl.sum(acc, axis=0)
        base = t_ptr + _offsets(p, n, hw, ci, CIN, HW, CL)
        step = _pixel_step(CIN, CL)
        for ky in range(K):
            dy = ky * DIL - PAD
            hh = h + dy
            hok = pmask & (hh >= 0) & (hh < H)
            for kx in tl.static_range(K):
                dx = kx * DIL - PAD
                ww = w + dx
                ok = hok & (ww >= 0) & (ww < W)
                tv = tl.load(base + (dy * W + dx) * step, mask=ok[:, None] & cimask[None, :], other=0.0)
                contrib = tl.sum(acc * tv.to(tl.float32), axis=0)
                wacc += tl.where(taps[:, None] == ky * K + kx, contrib[None, :], 0.0)
    row = part_ptr + pid_g * ((K * K + 1) * CIN)
    tl.store(row + taps[:, None] * CIN + ci[None, :], wacc,
             mask=(taps[:, None] < K * K) & cimask[None, :])
    tl.store(row + K * K * CIN + ci, bacc, mask=cimask)


@triton.autotune(configs=PW_BWD_WEIGHT_CONFIGS + PW_BWD_WEIGHT_STORED_CONFIGS, key=_STORED_KEY,
                 prune_configs_by={"early_config_prune": _one_tile_per_case})
@triton.jit
def _pw_bwd_weight_kernel(gz_ptr, t_ptr, wdw_ptr, bdw_ptr, d_ptr, wpart_ptr, bpart_ptr,
                          N, H, W, CIN, COUT, NUM_GROUPS,
                          K: tl.constexpr, DIL: tl.constexpr, MODE: tl.constexpr, CL: tl.constexpr,
                          PREC: tl.constexpr, D_STORED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr,
                          BLOCK_CI: tl.constexpr):
    """Partial rows of grad W_pw = gz^T @ dw(t) (dw recomputed, or read: D_STORED) and of grad b_pw = sum gz."""
    pid = tl.program_id(0)
    n_co = tl.cdiv(COUT, BLOCK_CO)
    n_ci = tl.cdiv(CIN, BLOCK_CI)
    pid_co = pid % n_co
    pid_ci = (pid // n_co) % n_ci
    pid_g = pid // (n_co * n_ci)
    HW = H * W
    P = N * HW
    n_pb = tl.cdiv(P, BLOCK_P)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < COUT
    ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    cimask = ci < CIN
    acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=tl.float32)
    bacc = tl.zeros([BLOCK_CO], dtype=tl.float32)
    for pb in range(pid_g, n_pb, NUM_GROUPS):
        p, pmask, n, hw, h, w = _pixels(pb, P, HW, W, BLOCK_P)
        gz = tl.load(gz_ptr + _offsets(p, n, hw, co, COUT, HW, CL),
                     mask=pmask[:, None] & comask[None, :], other=0.0)
        d = _depthwise(t_ptr, wdw_ptr, bdw_ptr, d_ptr, p, n, hw, h, w, pmask, ci, cimask, CIN, H, W,
                       K, DIL, CL, D_STORED, BLOCK_P, BLOCK_CI)
        acc = _mma(tl.trans(gz), _to(d, gz.dtype), acc, PREC)
        bacc += tl.sum(gz.to(tl.float32), axis=0)
    tl.store(wpart_ptr + pid_g * (COUT * CIN) + co[:, None] * CIN + ci[None, :], acc,
             mask=comask[:, None] & cimask[None, :])
    if pid_ci == 0:
        tl.store(bpart_ptr + pid_g * COUT + co, bacc, mask=comask)


@triton.autotune(configs=DW_BWD_CONFIGS, key=_DW_KEY)
@triton.jit
def _dw_bwd_kernel(g_ptr, w_ptr, add_ptr, out_ptr, t2_ptr, part_ptr, N, H, W, C, NUM_GROUPS,
                   K: tl.constexpr, DIL: tl.constexpr, ADD: tl.constexpr, K2: tl.constexpr,
                   KK2P: tl.constexpr, CL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = transposed depthwise conv of g (+ add).  With K2 > 0, out is also the gradient at the
    output of an earlier K2 x K2 depthwise conv of t2, whose weight and bias gradients are reduced
    here into partial rows."""
    PAD: tl.constexpr = DIL * (K - 1) // 2
    PAD2: tl.constexpr = (K2 - 1) // 2
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    pid_c = pid % n_c
    pid_g = pid // n_c
    HW = H * W
    P = N * HW
    n_pb = tl.cdiv(P, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    taps = tl.arange(0, KK2P)
    wacc = tl.zeros([KK2P, BLOCK_C], dtype=tl.float32)
    bacc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for pb in range(pid_g, n_pb, _groups(NUM_GROUPS, n_pb)):
        p, pmask, n, hw, h, w = _pixels(pb, P, HW, W, BLOCK_P)
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        step = _pixel_step(C, CL)
        base = g_ptr + _offsets(p, n, hw, c, C, HW, CL)
        for ky in range(K):
            dy = ky * DIL - PAD
            hh = h - dy
            hok = pmask & (hh >= 0) & (hh < H)
            for kx in tl.static_range(K):
                dx = kx * DIL - PAD
                ww = w - dx
                ok = hok & (ww >= 0) & (ww < W)
                v = tl.load(base - (dy * W + dx) * step, mask=ok[:, None] & cmask[None, :], other=0.0)
                wt = tl.load(w_ptr + c * (K * K) + (ky * K + kx), mask=cmask, other=0.0)
                acc += v.to(tl.float32) * wt.to(tl.float32)[None, :]
        off = _offsets(p, n, hw, c, C, HW, CL)
        omask = pmask[:, None] & cmask[None, :]
        if ADD:
            out = acc + tl.load(add_ptr + off, mask=omask, other=0.0).to(tl.float32)
        else:
            out = acc
        tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=omask)
        if K2 > 0:
            bacc += tl.sum(tl.where(omask, acc, 0.0), axis=0)
            base2 = t2_ptr + _offsets(p, n, hw, c, C, HW, CL)
            # Loops, not unrolled: unrolled, all K2*K2 loads were hoisted and spilled even at 255
            # registers (sm_90, channels_last, 16-bit).
            for ky in range(K2):
                dy = ky - PAD2
                hh = h + dy
                hok = pmask & (hh >= 0) & (hh < H)
                for kx in range(K2):
                    dx = kx - PAD2
                    ww = w + dx
                    ok = hok & (ww >= 0) & (ww < W)
                    tv = tl.load(base2 + (dy * W + dx) * step, mask=ok[:, None] & cmask[None, :], other=0.0)
                    contrib = tl.sum(acc * tv.to(tl.float32), axis=0)
                    wacc += tl.where(taps[:, None] == ky * K2 + kx, contrib[None, :], 0.0)
    if K2 > 0:
        row = part_ptr + pid_g * ((K2 * K2 + 1) * C)
        tl.store(row + taps[:, None] * C + c[None, :], wacc,
                 mask=(taps[:, None] < K2 * K2) & cmask[None, :])
        tl.store(row + K2 * K2 * C + c, bacc, mask=cmask)


@triton.autotune(configs=DW_CONFIGS, key=_DW_KEY)
@triton.jit
def _dw_fwd_kernel(t_ptr, w_ptr, b_ptr, out_ptr, N, H, W, C,
                   K: tl.constexpr, DIL: tl.constexpr, K2: tl.constexpr, ADD: tl.constexpr,
                   CL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    pid_c = pid % n_c
    pb = pid // n_c
    HW = H * W
    p, pmask, n, hw, h, w = _pixels(pb, N * HW, HW, W, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    d = _dw_tile(t_ptr, w_ptr, b_ptr, n, h, w, pmask, c, cmask, C, H, W, K, DIL, CL, BLOCK_P, BLOCK_C)
    tl.store(out_ptr + _offsets(p, n, hw, c, C, HW, CL), d.to(out_ptr.dtype.element_ty),
             mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _sum_groups_kernel(part_ptr, out_ptr, last_ptr, GROUPS, ROWS, COLS,
                       TRANSPOSE: tl.constexpr, SPLIT_LAST: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
    """The reducing kernels' partial rows summed on the device: part is (GROUPS, ROWS, COLS),
    summed over GROUPS in float64 in a fixed order (deterministic) and stored as float32.  out is
    (ROWS, COLS), or (COLS, ROWS) with TRANSPOSE; with SPLIT_LAST the last row goes to last_ptr
    (COLS,) and out holds the other ROWS - 1 (a weight's gradient and its bias's from one partial
    matrix)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    jmask = j < ROWS * COLS
    g_range = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for g0 in range(0, GROUPS, BLOCK_G):
        g = g0 + g_range
        v = tl.load(part_ptr + g[:, None] * (ROWS * COLS) + j[None, :], mask=(g < GROUPS)[:, None] & jmask[None, :],
                    other=0.0)
        acc += tl.sum(v.to(tl.float64), axis=0)
    total = acc.to(tl.float32)
    r = j // COLS
    c = j % COLS
    if SPLIT_LAST:
        out_rows = ROWS - 1
        tl.store(last_ptr + c, total, mask=jmask & (r == out_rows))
    else:
        out_rows = ROWS
    if TRANSPOSE:
        dst = c * out_rows + r
    else:
        dst = j
    tl.store(out_ptr + dst, total, mask=jmask & (r < out_rows))


# ----------------------------------------------------------------------------------------------
# host side

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ksize(w_dw: torch.Tensor) -> int:
    """k of depthwise weights passed flattened as (C, k*k)."""
    k = math.isqrt(w_dw.shape[-1])
    assert w_dw.dim() == 2 and k * k == w_dw.shape[-1], "depthwise weights go in as (C, k*k)"
    return k


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels read x in and write outputs in: dlkunet.ops.layout's rule."""
    from dlkunet.ops.layout import memory_format as rule  # late: dlkunet.ops imports this package lazily
    return rule(x)


def prepare(op: str, x: torch.Tensor):
    """x in a layout the kernels read (NCHW or channels_last, dense) and that layout's flag.

    The inputs were validated by ``dlkunet.ops.validation`` (the contract and ``check_backend``); the
    asserts here only keep a direct caller from launching on what the kernels cannot index."""
    assert x.dim() == 4 and x.dtype in _DTYPES, f"{op}: x must be a 4-D float32/float16/bfloat16 tensor"
    assert x.device.type == "cuda" or INTERPRET, f"{op}: CUDA tensors (or TRITON_INTERPRET=1)"
    assert x.numel() < 2 ** 30, f"{op}: 32-bit offsets, with room for the widest intermediate"
    fmt = memory_format(x)
    return x.contiguous(memory_format=fmt), fmt, fmt == torch.channels_last


def as_input(grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A gradient in its input's dtype and strides, as the custom op's fake kernel promises
    (``torch.empty_like(t)``); a weight gradient assembled from a transposed buffer is copied."""
    if grad.dtype != t.dtype:
        grad = grad.to(t.dtype)
    if grad.stride() == t.stride():
        return grad
    return torch.empty_like(t).copy_(grad)


def dense(t: torch.Tensor, dtype=None, fmt=torch.contiguous_format) -> torch.Tensor:
    """t itself when already of ``dtype`` and dense in fmt (no torch op: a no-op ``.to`` still
    costs a dispatch per call), else a converted dense copy."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def like(x: torch.Tensor, channels: int, fmt, dtype=None) -> torch.Tensor:
    n, _, h, w = x.shape
    return torch.empty((n, channels, h, w), dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def num_groups(pixels: int, tiles: int) -> int:
    """Programs per channel tile for the reducing kernels: enough to fill a GPU, few partial rows."""
    if INTERPRET:
        return max(1, min(2, triton.cdiv(pixels, 16)))
    return max(1, min(triton.cdiv(pixels, 128), max(1, 1024 // max(tiles, 1))))


def sum_groups(part, out, last=None, transpose: bool = False):
    """Launch _sum_groups_kernel: out (and last) = the float64 sum over part's first dimension."""
    groups, rows, cols = part.shape
    _sum_groups_kernel[(triton.cdiv(rows * cols, SUM_BLOCK),)](
        part, out, last if last is not None else out, groups, rows, cols, TRANSPOSE=transpose,
        SPLIT_LAST=last is not None, BLOCK_G=SUM_GROUP_STEP, BLOCK=SUM_BLOCK)


def dw_pw(mode, t, w_dw, b_dw, w_pw, bias, dilation, cl, prec, relu=False, bn=None, eps=0.0, centred=None,
          out=None, out2=None, aux=None, aux2=None, groups=0, d=None):
    """Launch _dw_pw_kernel (products in precision mode ``prec``, ``_precision._mma``).  ``bias``:
    the pointwise bias; ``bn``: (gamma, beta, mean, var) for the BatchNorm modes, ``centred`` the
    merged sums of g and g * zhat from BN_BWD_STATS (grad_beta, grad_gamma) for BN_BWD_GZ_CENTRED,
    which divides them by the pixel count; ``d``: the depthwise output
    of t when written once (else recomputed per output-channel block).  Returns the partial-row
    matrix (groups, 2, Cout) of the modes that make one."""
    n, cin, h, w = t.shape
    cout = w_pw.shape[0]
    k = _ksize(w_dw)
    sums = mode in (BN_BWD_STATS, BN_BWD_GZ)
    part = torch.empty((groups, 2, cout), dtype=torch.float32, device=t.device) if sums else bias
    gamma, beta, mean, var = bn if bn is not None else (bias,) * 4
    dummy = t
    grid = lambda meta: (triton.cdiv(cout, meta["BLOCK_CO"]) *
                         (groups or triton.cdiv(n * h * w, meta["BLOCK_P"])),)
    _dw_pw_kernel[grid](t, w_dw, b_dw, d if d is not None else t, w_pw, bias, gamma, beta, mean, var,
                        *(centred if centred is not None else (bias, bias)), out if out is not None else dummy,
                        out2 if out2 is not None else dummy, aux if aux is not None else dummy,
                        aux2 if aux2 is not None else dummy, part, float(eps), n, h, w, cin, cout, groups,
                        K=k, DIL=dilation, MODE=mode, RELU=relu, CL=cl, PREC=prec, D_STORED=d is not None)
    return part if sums else None


def pw_bwd_data(gz, w_pw, t, k, dilation, cl, prec, gd):
    """gd = gz @ W_pw, and the float32 gradients of the depthwise weights (Cin, k*k) and bias (Cin,)."""
    n, cin, h, w = t.shape
    cout = w_pw.shape[0]
    groups = num_groups(n * h * w, triton.cdiv(cin, 32))
    part = torch.empty((groups, k * k + 1, cin), dtype=torch.float32, device=t.device)
    grid = lambda meta: (triton.cdiv(cin, meta["BLOCK_CI"]) * groups,)
    _pw_bwd_data_kernel[grid](gz, w_pw, t, gd, part, n, h, w, cin, cout, groups,
                              K=k, DIL=dilation, MODE=0, CL=cl, PREC=prec,
                              KKP=triton.next_power_of_2(k * k))
    return _weight_and_bias(part)


def _weight_and_bias(part):
    """A depthwise conv's gradients from partial rows (groups, k*k + 1, C): weights (C, k*k), bias (C,)."""
    _, taps_and_bias, c = part.shape
    grad_w = torch.empty((c, taps_and_bias - 1), dtype=torch.float32, device=part.device)
    grad_b = torch.empty(c, dtype=torch.float32, device=part.device)
    sum_groups(part, grad_w, grad_b, transpose=True)
    return grad_w, grad_b


def pw_bwd_weight(gz, t, w_dw, b_dw, dilation, cl, prec, d=None):
    """grad W_pw (Cout, Cin) and grad b_pw (Cout,), float32; ``d`` as for ``dw_pw``."""
    n, cin, h, w = t.shape
    cout = gz.shape[1]
    groups = num_groups(n * h * w, triton.cdiv(cin, 64) * triton.cdiv(cout, 64))
    wpart = torch.empty((groups, cout, cin), dtype=torch.float32, device=t.device)
    bpart = torch.empty((groups, 1, cout), dtype=torch.float32, device=t.device)
    grid = lambda meta: (triton.cdiv(cout, meta["BLOCK_CO"]) * triton.cdiv(cin, meta["BLOCK_CI"]) * groups,)
    _pw_bwd_weight_kernel[grid](gz, t, w_dw, b_dw, d if d is not None else t, wpart, bpart, n, h, w, cin, cout,
                                groups, K=_ksize(w_dw), DIL=dilation, MODE=0, CL=cl, PREC=prec,
                                D_STORED=d is not None)
    grad_w = torch.empty((cout, cin), dtype=torch.float32, device=t.device)
    grad_b = torch.empty(cout, dtype=torch.float32, device=t.device)
    sum_groups(wpart, grad_w)
    sum_groups(bpart, grad_b)
    return grad_w, grad_b


def dw_bwd(g, w_dw, dilation, cl, out, add=None, t2=None, k2=0):
    """out = transposed depthwise conv of g (+ add); with t2, also the float32 gradients of the
    weights (C, k2*k2) and bias (C,) of the k2 x k2 depthwise conv that produced g's forward
    counterpart."""
    n, c, h, w = g.shape
    groups = num_groups(n * h * w, triton.cdiv(c, 32)) if k2 else 0
    part = torch.empty((max(groups, 1), k2 * k2 + 1, c), dtype=torch.float32, device=g.device)
    grid = lambda meta: (triton.cdiv(c, meta["BLOCK_C"]) * (groups or triton.cdiv(n * h * w, meta["BLOCK_P"])),)
    _dw_bwd_kernel[grid](g, w_dw, add if add is not None else g, out, t2 if t2 is not None else g, part,
                         n, h, w, c, groups, K=_ksize(w_dw), DIL=dilation, ADD=add is not None,
                         K2=k2, KK2P=triton.next_power_of_2(max(k2 * k2, 1)), CL=cl)
    return _weight_and_bias(part) if k2 else None


def dw_fwd(t, w_dw, b_dw, dilation, cl, out):
    n, c, h, w = t.shape
    grid = lambda meta: (triton.cdiv(c, meta["BLOCK_C"]) * triton.cdiv(n * h * w, meta["BLOCK_P"]),)
    _dw_fwd_kernel[grid](t, w_dw, b_dw, out, n, h, w, c, K=_ksize(w_dw), DIL=dilation, K2=0, ADD=False, CL=cl)
    return out
