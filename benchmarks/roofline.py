"""Cost model of the fused GPU operators: what each execution plan moves and computes, and the time
that implies on an H100 or H200.  Runs anywhere (no GPU, no torch kernels):

    python benchmarks/roofline.py                       # every op, pass, level, dtype and plan
    python benchmarks/roofline.py --device H100 --chosen  # only the plan the model would pick

A plan is a sequence of kernels.  Each kernel is described by the DRAM bytes it must move
(compulsory traffic: what it reads from and writes to global memory, not what L2 absorbs), the
FLOPs it runs on tensor cores (the pointwise GEMMs), and the FLOPs it runs on the FP32 FMA units
(depthwise taps, epilogues; 2 FLOPs per multiply-add).  A kernel's predicted time is the slowest of
its three resources at an attainable fraction of the published peak (they overlap within a kernel),
plus a fixed launch gap; a plan's time is the sum over its kernels.  This is a contract for the
design, not a measurement: the measured tables are benchmarks/results/.

Plans (the Triton/CUDA issue's vocabulary):

``current``  the kernels the H200 measured on 2026-11-26, the baseline the plans replace: the
             depthwise taps recomputed for every ``CURRENT_BLOCK_CO``-wide block of output
             channels, the float32 GEMM on FMA units at IEEE precision, 16-bit inputs as two MMAs
             (hi + lo parts), plus the host-side torch ops.  (The backward passes still run those
             kernels' tiling, with their GEMMs since on tensor cores.)
``fused``    one kernel per pass whose tile holds all output channels: each depthwise tap is
             computed once per pass, the depthwise result never leaves the chip, the GEMM runs on
             tensor cores.  For lka_gate (as built) a1 is written first, then the dilated taps of a1
             feed the GEMM, recomputed once per ``FUSED_MAX_COUT`` output channels.
``split``    a depthwise kernel writes its output once (small at the deep levels), then a
             large-tile tensor-core GEMM reads it with the op's epilogue.
``chain``    lka_gate: one kernel runs both depthwise convs with a1 kept on chip over a window
             plus the dilated conv's halo (its a1 computed twice), on sub-tiles that skip the taps
             reaching only padding (``chain_taps``), and writes a2 once; then the GEMM with the gate.
``cuda``     the cuda backend's kernels as shipped (csrc/cuda), predicted at the same attainable
             fractions: a contract for them too, printed in its own table.

Precision follows PyTorch's convolution rule: float32 GEMMs use TF32 when
``torch.backends.cudnn.allow_tf32`` is True (eager's default), else three TF32 MMAs (tf32x3, the
full-precision path); float16/bfloat16 use one MMA.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Device:
    """Published dense peaks (vendor datasheets, SXM parts)."""
    name: str
    hbm_bytes_per_s: float
    fp32_fma_flops: float
    tf32_tensor_flops: float
    half_tensor_flops: float


DEVICES = {
    "H100": Device("H100 SXM", 3.35e12, 67e12, 494.7e12, 989.4e12),
    "H200": Device("H200 SXM", 4.8e12, 67e12, 494.7e12, 989.4e12),
}

# Attainable fractions of those peaks for well-written kernels.  The bandwidth one is what a plain
# device-to-device copy reached on an H200 here (4191 GB/s of 4.8 TB/s); the others are the usual
# ceilings of hand-tiled Triton/CUTLASS kernels with small K (96-1536), not measurements.
BANDWIDTH_EFFICIENCY = 0.87
TENSOR_EFFICIENCY = 0.6
FMA_EFFICIENCY = 0.6
# GPU-side gap between back-to-back kernels of one stream (launch latency not hidden by the queue).
LAUNCH_GAP_S = 3e-6
# The shipped Triton kernels tile output channels 32 wide (kernels/_common.py DW_PW_CONFIGS).
CURRENT_BLOCK_CO = 32
# Widest output-channel tile a fused kernel keeps on chip (the N of one Hopper wgmma; a 64x256 float32
# accumulator is 64 KB of registers per block): wider layers recompute the taps once per such tile.
FUSED_MAX_COUT = 256
# Host-side torch ops per call of the shipped Triton backend (issue 13's count): each is a kernel.
CURRENT_HOST_OPS = {("dwconv_bn_act", "eval", "fwd"): 18, ("dwconv_bn_act", "train", "fwd"): 24,
                    ("dwconv_bn_act", "train", "bwd"): 40, ("lka_gate", "-", "fwd"): 8,
                    ("lka_gate", "-", "bwd"): 20}
# The chain plan's windows and sub-tiles (kernels/plans.py ``chain_window``, mirrored here so that
# this file runs without torch or Triton; tests/benchmarks/test_roofline.py checks that the two
# agree): a whole image side up to CHAIN_WHOLE_SIDE pixels, else windows of max(CHAIN_MIN_WINDOW,
# 4 x radius) rounded up to a power of two, overlapping by the radius on each side; as many
# channels as the slot and a sub-tile of CHAIN_SUB_SIDE x CHAIN_SUB_SIDE pixels allow, the
# sub-tile grown to the register budget when the slot allows fewer.
CHAIN_WHOLE_SIDE = 64
CHAIN_MIN_WINDOW = 16
CHAIN_SLOT_ELEMENTS = 16384
CHAIN_TILE_ELEMENTS = 2048
CHAIN_SUB_SIDE = 8
# Bytes of float32 partial moments per block and channel (mean, M2, count), per-block count.
PARTIAL_BYTES = 12
FP32_BYTES = 4
# DLKUNet-L at batch 16, 224x224: (channels, side) of the five levels.
LEVELS = ((96, 224), (192, 112), (384, 56), (768, 28), (1536, 14))
BATCH = 16
DW_KERNEL = 3
LKA_KERNELS = (5, 7, 3)  # k0, ks, dilation
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Kernel:
    bytes: float
    tensor_flops: float = 0.0
    fma_flops: float = 0.0

    def seconds(self, dev: Device, dtype: str, tf32: bool) -> float:
        if dtype == "float32":
            # tf32x3 runs three TF32 MMAs per product: the full-precision path.
            tensor_rate = dev.tf32_tensor_flops / (1 if tf32 else 3)
        else:
            tensor_rate = dev.half_tensor_flops
        return max(self.bytes / (dev.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY),
                   self.tensor_flops / (tensor_rate * TENSOR_EFFICIENCY),
                   self.fma_flops / (dev.fp32_fma_flops * FMA_EFFICIENCY)) + LAUNCH_GAP_S


@dataclass(frozen=True)
class Plan:
    name: str
    kernels: Tuple[Kernel, ...]

    @property
    def bytes(self) -> float:
        return sum(k.bytes for k in self.kernels)

    @property
    def tensor_flops(self) -> float:
        return sum(k.tensor_flops for k in self.kernels)

    @property
    def fma_flops(self) -> float:
        return sum(k.fma_flops for k in self.kernels)

    def seconds(self, dev: Device, dtype: str, tf32: bool) -> float:
        return sum(k.seconds(dev, dtype, tf32) for k in self.kernels)


def _tiny(n: int) -> Tuple[Kernel, ...]:
    """n host-side torch ops on per-channel vectors: launch gaps only."""
    return tuple(Kernel(0.0) for _ in range(n))


def tf32_weight_copy(dtype: str, cin: int, cout: int) -> float:
    """Bytes of the split forward's TF32-rounded copy of the pointwise weights (read and written by
    its depthwise kernel, so the GEMM's operands reach the tensor cores untouched).  Counted for
    float32 in both precision modes, though tf32x3 skips it: there the GEMM's three MMAs bound
    the time at the levels where the copy is large (C >= 768)."""
    return 2.0 * cin * cout * FP32_BYTES if dtype == "float32" else 0.0


def dwconv_plans(n: int, cin: int, cout: int, hw: int, dtype: str, mode: str, pass_: str,
                 k: int = DW_KERNEL) -> List[Plan]:
    """Plans of dwconv_bn_act for one pass ('fwd' or 'bwd'); mode 'eval' or 'train'."""
    es = DTYPE_BYTES[dtype]
    p = n * hw * hw
    x, y, d = p * cin * es, p * cout * es, p * cin * es
    weights = (cin * k * k + cin + cout * cin + cout) * es + 4 * cout * FP32_BYTES
    dw = 2.0 * p * cin * k * k           # depthwise FLOPs
    pw = 2.0 * p * cin * cout            # pointwise GEMM FLOPs
    recompute = math.ceil(cout / CURRENT_BLOCK_CO)
    tiles = math.ceil(cout / FUSED_MAX_COUT)  # the fused plan's tap recomputation
    # current: taps recomputed per output block; fp32 GEMM on FMA units; 16-bit as two MMAs.
    cur_tc, cur_fma = (0.0, pw) if dtype == "float32" else (2 * pw, 0.0)
    if pass_ == "fwd":
        if mode == "eval":
            fused = (Kernel(x + y + weights, pw, dw * tiles),)
            split = (Kernel(x + d + tf32_weight_copy(dtype, cin, cout), 0, dw), Kernel(d + y + weights, pw))
            current = (Kernel(x + y + weights, cur_tc, cur_fma + dw * recompute),)
        else:
            # statistics pass, then the apply pass recomputing z (no z written and re-read).
            fused = (Kernel(x + weights, pw, dw * tiles), Kernel(x + y + weights, pw, dw * tiles))
            # split (as built, kernels/plans.py dwconv_bn_act_train): d written once, the statistics
            # GEMM, the merge of its per-program moments (a launch, bytes negligible), the apply GEMM.
            split = (Kernel(x + d + tf32_weight_copy(dtype, cin, cout), 0, dw), Kernel(d + weights, pw), Kernel(0.0),
                     Kernel(d + y + weights, pw))
            current = (Kernel(x + weights, cur_tc, cur_fma + dw * recompute),
                       Kernel(x + y + weights, cur_tc, cur_fma + dw * recompute))
        host = CURRENT_HOST_OPS[("dwconv_bn_act", mode, "fwd")]
    else:
        gy, gx, gd = y, x, p * cin * es
        # A: BN-backward sums (z recomputed); B: gz -> gd = gz W, dW_pw = gz^T d, depthwise weight
        # grads from gd and x's taps; C: grad_x = transposed depthwise conv of gd (needs gd's halo).
        a_pass = Kernel(x + gy + weights, pw, dw * tiles) if mode == "train" else None
        b_pass = Kernel(x + gy + gd + 2 * weights, 3 * pw, dw * tiles + dw)
        c_pass = Kernel(gd + gx, 0, dw)
        fused = tuple(kk for kk in (a_pass, b_pass, c_pass) if kk is not None)
        s_dw = Kernel(x + d, 0, dw)
        s_a = Kernel(d + gy + weights, pw) if mode == "train" else None
        s_b = Kernel(d + x + gy + gd + 2 * weights, 3 * pw, dw)
        split = tuple(kk for kk in (s_dw, s_a, s_b, c_pass) if kk is not None)
        c_a = Kernel(x + gy + weights, cur_tc, cur_fma + dw * recompute) if mode == "train" else None
        c_b = Kernel(x + gy + gd + 2 * weights, 3 * cur_tc, 3 * cur_fma + 2 * dw * recompute)
        current = tuple(kk for kk in (c_a, c_b, c_pass) if kk is not None)
        host = CURRENT_HOST_OPS[("dwconv_bn_act", "train", "bwd")]
    return [Plan("current", current + _tiny(host)), Plan("fused", fused), Plan("split", split)]


def _pow2(v: int) -> int:
    return 1 << max(0, math.ceil(math.log2(v)))


def chain_window(c: int, side: int, radius: int) -> Tuple[int, int, int, int, int]:
    """The chain kernel's (window, halo, channels, sub-tile rows, sub-tile columns) on square images."""
    if side <= CHAIN_WHOLE_SIDE or radius == 0:
        q, halo = _pow2(min(side, CHAIN_WHOLE_SIDE)), 0
    else:
        q, halo = max(CHAIN_MIN_WINDOW, _pow2(4 * radius + 1)), radius
    sh = sw = min(q, CHAIN_SUB_SIDE)
    bc = max(1, min(CHAIN_SLOT_ELEMENTS // (q * q), CHAIN_TILE_ELEMENTS // (sh * sw), _pow2(c)))
    while 2 * sh * sw * bc <= CHAIN_TILE_ELEMENTS and (sw < q or sh < q):
        if sw < q and sw <= sh:
            sw *= 2
        else:
            sh *= 2
    return q, halo, bc, sh, sw


def _reaching(s0: int, size: int, lo: int, hi: int, k: int, dil: int) -> int:
    pad = dil * (k - 1) // 2
    return sum(1 for i in range(k) if s0 + i * dil - pad < hi and s0 + size - 1 + i * dil - pad >= lo)


def _chain_taps_1d(side: int, q: int, halo: int, sub: int, k: int, dil: int, second: bool) -> int:
    total = 0
    for left in range(-halo, side - halo, q - 2 * halo):
        v_lo, v_hi = max(-left, 0), min(side - left, q)  # the window's image pixels
        lo, hi = (max(v_lo, halo), min(v_hi, q - halo)) if second else (v_lo, v_hi)
        reach = (v_lo, v_hi) if second else (-left, side - left)  # a1 in the window; x anywhere
        total += sum(sub * _reaching(s0, sub, *reach, k, dil) for s0 in range(lo // sub * sub, hi, sub))
    return total


def chain_taps(c: int, side: int, k0: int, ks: int, dilation: int) -> int:
    """Multiply-adds per channel of a side x side image that the chain kernel runs for both convs:
    a1 on the sub-tiles holding image pixels, a2 on those holding own (not halo) pixels, each with
    the tap rows and columns that reach what they read (x in the image; a1 in the window)."""
    q, halo, _, sh, sw = chain_window(c, side, dilation * (ks - 1) // 2)
    return sum(_chain_taps_1d(side, q, halo, sh, k, dil, second) * _chain_taps_1d(side, q, halo, sw, k, dil, second)
               for k, dil, second in ((k0, 1, False), (ks, dilation, True)))


def lka_halo_factor(k0: int, ks: int, dilation: int, tile: Tuple[int, int]) -> float:
    """a1 positions computed per output pixel when a1 lives in shared memory with its halo."""
    r = dilation * (ks - 1) // 2
    th, tw = tile
    return (th + 2 * r) * (tw + 2 * r) / (th * tw)


def lka_plans(n: int, c: int, hw: int, dtype: str, pass_: str,
              kernels: Tuple[int, int, int] = LKA_KERNELS) -> List[Plan]:
    k0, ks, dil = kernels
    es = DTYPE_BYTES[dtype]
    p = n * hw * hw
    act = p * c * es
    weights = (c * k0 * k0 + c + c * ks * ks + c + c * c + c) * es
    dw0, dws = 2.0 * p * c * k0 * k0, 2.0 * p * c * ks * ks
    pw = 2.0 * p * c * c
    bc = chain_window(c, hw, dil * (ks - 1) // 2)[2]
    chain_fma = 2.0 * n * math.ceil(c / bc) * bc * chain_taps(c, hw, k0, ks, dil)  # padding channels run too
    recompute = math.ceil(c / CURRENT_BLOCK_CO)
    cur_tc, cur_fma = (0.0, pw) if dtype == "float32" else (2 * pw, 0.0)
    if pass_ == "fwd":
        w0_bytes, ws_bytes = (c * k0 * k0 + c) * es, (c * ks * ks + c) * es
        w1_bytes = weights - w0_bytes - ws_bytes
        # (split and chain write a2 for a GEMM, so both make its TF32 weight copy)
        copy = tf32_weight_copy(dtype, c, c)
        # fused: a1 written, then the dilated taps of a1 -> GEMM -> gate.
        fused = (Kernel(2 * act + w0_bytes, 0, dw0),
                 Kernel(3 * act + ws_bytes + w1_bytes, pw, dws * math.ceil(c / FUSED_MAX_COUT)))
        # split: a1 written, a2 written, GEMM + gate.
        split = (Kernel(2 * act + w0_bytes, 0, dw0), Kernel(2 * act + ws_bytes + copy, 0, dws),
                 Kernel(3 * act + w1_bytes, pw))
        # chain: a1 on chip over its windows, a2 written once, GEMM + gate.
        chain = (Kernel(2 * act + w0_bytes + ws_bytes + copy, 0, chain_fma), split[2])
        current = (Kernel(2 * act, 0, dw0), Kernel(3 * act + weights, cur_tc, cur_fma + dws * recompute))
        host = CURRENT_HOST_OPS[("lka_gate", "-", "fwd")]
    else:
        # a1 and a2 (split: two kernels; chain: one, a1 on chip while a2 is computed, both written);
        # gu = g*x and g*u (GEMM + epilogue); ga2 = gu W1 with dW1 = gu^T a2 (two GEMMs);
        # ga1 = dw_ks^T(ga2) with the dws grads; grad_x.  After the fused forward (as built) a2 is
        # not written: the two kernels that need it recompute its taps per 32 output channels.
        rest = (Kernel(4 * act + weights, pw),
                Kernel(3 * act + 2 * weights, 2 * pw),
                Kernel(2 * act + act, 0, 2 * dws),
                Kernel(3 * act + act, 0, 2 * dw0))
        split = (Kernel(2 * act, 0, dw0), Kernel(2 * act, 0, dws)) + rest
        chain = (Kernel(3 * act, 0, chain_fma),) + rest
        fused = ((Kernel(2 * act, 0, dw0), Kernel(4 * act + weights, pw, dws * recompute),
                  Kernel(3 * act + 2 * weights, 2 * pw, dws * recompute)) + rest[2:])
        current = (Kernel(2 * act, 0, dw0),
                   Kernel(5 * act + weights, cur_tc, cur_fma + dws * recompute),
                   Kernel(3 * act + 2 * weights, 2 * cur_tc, 2 * cur_fma + 2 * dws * recompute),
                   Kernel(3 * act, 0, 2 * dws), Kernel(4 * act, 0, 2 * dw0))
        host = CURRENT_HOST_OPS[("lka_gate", "-", "bwd")]
    return [Plan("current", current + _tiny(host)), Plan("fused", fused), Plan("split", split),
            Plan("chain", chain)]


# ------------------------------------------------------------------------------------------------
# The cuda backend as shipped (csrc/cuda): 64 x 64 WMMA tiles, a block holding up to
# CUDA_FUSED_ROW_TILES of them on one pixel tile in the forward (TF32 for float32, as the cuda
# table assumes); the depthwise output goes through a plane when Cout spans more; backward
# intermediates are planes of the input's dtype; the lka stage kernel computes a1 over a 16 x 64
# tile plus its dilated halo.  (A 3 x 3 forward on tensor cores stages its operand in shared memory
# over rectangles whose halo is 1.6-1.7x their pixels: L1/L2 traffic, which this model leaves out.
# A channels_last lka stage with 16-byte channel groups runs 16 x 32 tiles: more a1 taps than the
# NCHW tile modelled here.)
CUDA_ROW_TILE = 64
CUDA_FUSED_ROW_TILES = {"float32": 3, "bfloat16": 6, "float16": 6}
CUDA_LKA_TILE = (16, 64)


def cuda_dwconv_plan(n: int, cin: int, cout: int, hw: int, dtype: str, mode: str, pass_: str,
                     k: int = DW_KERNEL) -> Plan:
    es = DTYPE_BYTES[dtype]
    p = n * hw * hw
    # d and dz planes: the dtype's own for 16-bit MMAs, float32 with TF32
    x, y, d_plane = p * cin * es, p * cout * es, p * cin * es
    weights = (cin * k * k + cin + cout * cin + cout) * es + 4 * cout * FP32_BYTES
    dw, pw = 2.0 * p * cin * k * k, 2.0 * p * cin * cout
    finalize = Kernel(0.0)
    if pass_ == "fwd":
        if cout > CUDA_ROW_TILE * CUDA_FUSED_ROW_TILES[dtype]:  # plane, [statistics GEMM, finalize,] apply GEMM
            plane = Kernel(x + d_plane, 0, dw)
            train = (Kernel(d_plane + weights, pw), finalize) if mode == "train" else ()
            return Plan("cuda", (plane, *train, Kernel(d_plane + y + weights, pw)))
        train = (Kernel(x + weights, pw, dw), finalize) if mode == "train" else ()
        return Plan("cuda", (*train, Kernel(x + y + weights, pw, dw)))
    gy, gx, dz_plane, gd_plane = y, x, p * cout * es, p * cin * es
    return Plan("cuda", (Kernel(x + d_plane, 0, dw),                      # d plane
                         Kernel(d_plane + gy + weights, pw), finalize,    # BN-backward sums
                         Kernel(d_plane + gy + dz_plane + weights, pw),       # dz
                         Kernel(dz_plane + gd_plane + weights, pw),           # grad_d = W^T dz
                         Kernel(dz_plane + d_plane, pw), Kernel(0.0),         # grad_w_pw, split sums
                         Kernel(gd_plane + gx, 0, dw),                    # grad_x
                         Kernel(gd_plane + x, 0, dw), Kernel(0.0)))       # grad_w_dw, grad_b_dw


def cuda_lka_plan(n: int, c: int, hw: int, dtype: str, pass_: str,
                  kernels: Tuple[int, int, int] = LKA_KERNELS) -> Plan:
    k0, ks, dil = kernels
    es = DTYPE_BYTES[dtype]
    p = n * hw * hw
    # a2 is read only by GEMMs: a plane of their operand type (16-bit under 16-bit MMAs); the
    # backward's other planes (a1, g * u, grad_a2, grad_a1) in the input's dtype, as eager keeps them.
    act, plane, a2 = p * c * es, p * c * es, p * c * es
    w1 = (c * c + c) * es
    dw0, dws, pw = 2.0 * p * c * k0 * k0, 2.0 * p * c * ks * ks, 2.0 * p * c * c
    halo = lka_halo_factor(k0, ks, dil, CUDA_LKA_TILE)
    if pass_ == "fwd":  # stage (a1 on chip, a2 to a plane), GEMM with the gate
        return Plan("cuda", (Kernel(act + a2, 0, dw0 * halo + dws), Kernel(a2 + 2 * act + w1, pw)))
    return Plan("cuda", (Kernel(act + plane + a2, 0, dw0 * halo + dws),  # a1, a2 planes
                         Kernel(a2 + act + plane + w1, pw),             # g * u (gxd plane)
                         Kernel(2 * act + plane + w1, pw),              # grad_a2 = W1^T (g * x)
                         Kernel(2 * act + a2, pw), Kernel(0.0),         # grad_w1, grad_b1; split sums
                         Kernel(2 * plane, 0, dws),                     # grad_a1
                         Kernel(2 * plane, 0, dws), Kernel(0.0),        # grad_ws, grad_bs
                         Kernel(2 * plane + act, 0, dw0),               # grad_x
                         Kernel(plane + act, 0, dw0), Kernel(0.0)))     # grad_w0, grad_b0


def cuda_summary(dev_name: str, tf32: bool, dtypes: Sequence[str], measured: Dict) -> str:
    """The cuda backend's kernels: predicted time against the committed eager and cuda times."""
    dev = DEVICES[dev_name]
    head = ["op", "mode", "pass", "level", "dtype", "kernels", "DRAM MB", f"predicted {dev_name} ms",
            "eager ms", "predicted speedup", "cuda ms (committed)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, side in LEVELS:
        for dtype in dtypes:
            for op, mode, pass_, passes in TIMED:
                plans = [cuda_dwconv_plan(BATCH, c, c, side, dtype, m, q) if op == "dwconv_bn_act"
                         else cuda_lka_plan(BATCH, c, side, dtype, q) for m, q in passes]
                ms = sum(pl.seconds(dev, dtype, tf32) for pl in plans) * 1e3
                ref = measured.get(("eager", op, mode, pass_, c, side, dtype, "nchw"))
                old = measured.get(("cuda", op, mode, pass_, c, side, dtype, "nchw"))
                cells = [op, mode, pass_, f"C{c} {side}x{side}", dtype, str(sum(len(pl.kernels) for pl in plans)),
                         f"{sum(pl.bytes for pl in plans) / 1e6:.0f}", f"{ms:.3f}",
                         f"{ref:.3f}" if ref else "", f"{ref / ms:.1f}x" if ref else "",
                         f"{old:.3f}" if old else ""]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def single_pass_floor_ms(op: str, c: int, side: int, dtype: str, dev: Device, tf32: bool = True,
                         batch: int = BATCH) -> float:
    """The forward's floor at the model's efficiencies: one kernel reading x once, writing the output
    once, with the GEMM on tensor cores and the taps on FMA units.  No plan predicts less; where
    eager is already within 4x of it, no plan can predict 4x eager."""
    es = DTYPE_BYTES[dtype]
    p = batch * side * side
    act = p * c * es
    taps = 2.0 * p * c * (DW_KERNEL ** 2 if op == "dwconv_bn_act" else LKA_KERNELS[0] ** 2 + LKA_KERNELS[1] ** 2)
    return Kernel(2 * act, 2.0 * p * c * c, taps).seconds(dev, dtype, tf32) * 1e3


def choose(plans: Sequence[Plan], dev: Device, dtype: str, tf32: bool) -> Plan:
    """The new plan (never 'current') with the lowest predicted time."""
    return min((p for p in plans if p.name != "current"), key=lambda p: p.seconds(dev, dtype, tf32))


@dataclass(frozen=True)
class Row:
    op: str
    mode: str
    pass_: str
    channels: int
    side: int
    dtype: str
    plan: Plan


def rows(levels: Iterable[Tuple[int, int]] = LEVELS, batch: int = BATCH,
         dtypes: Sequence[str] = ("float32", "bfloat16")) -> List[Row]:
    out = []
    for c, side in levels:
        for dtype in dtypes:
            for mode, pass_ in (("eval", "fwd"), ("train", "fwd"), ("train", "bwd")):
                for plan in dwconv_plans(batch, c, c, side, dtype, mode, pass_):
                    out.append(Row("dwconv_bn_act", mode, pass_, c, side, dtype, plan))
            for pass_ in ("fwd", "bwd"):
                for plan in lka_plans(batch, c, side, dtype, pass_):
                    out.append(Row("lka_gate", "-", pass_, c, side, dtype, plan))
    return out


def measured_times(device_kind: str = "h200") -> Dict[Tuple[str, str, str, str, int, int, str, str], float]:
    """Committed medians in ms, keyed (backend, op, mode, pass, C, side, dtype, layout).

    Read from ``benchmarks/results/<device_kind>.csv``; only the C -> C Blocks (decoder 2C -> C rows
    are left out: the model predicts the C -> C ones).  Empty when the table is absent.
    """
    path = RESULTS / f"{device_kind}.csv"
    if not path.exists():
        return {}
    found = {}
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            if r.get("kind") != "op":
                continue
            shape = dict(kv.split("=", 1) for kv in r["shape"].split() if "=" in kv)
            c = int(shape.get("Cin", shape.get("C", 0)))
            if "Cout" in shape and int(shape["Cout"]) != c:
                continue
            key = (r["backend"], r["op"], r["mode"], r["pass"], c, int(shape["H"]), r["dtype"], r["layout"])
            found[key] = float(r["median_ms"])
    return found


# The passes the benchmarks time, as sums of the model's passes.
TIMED = (("dwconv_bn_act", "eval", "fwd", (("eval", "fwd"),)),
         ("dwconv_bn_act", "train", "fwd+bwd", (("train", "fwd"), ("train", "bwd"))),
         ("lka_gate", "-", "fwd", (("-", "fwd"),)),
         ("lka_gate", "-", "fwd+bwd", (("-", "fwd"), ("-", "bwd"))))


def plans_for(op: str, mode: str, pass_: str, c: int, side: int, dtype: str) -> List[Plan]:
    if op == "dwconv_bn_act":
        return dwconv_plans(BATCH, c, c, side, dtype, mode, pass_)
    return lka_plans(BATCH, c, side, dtype, pass_)


def predicted_ms(op: str, mode: str, passes, c: int, side: int, dtype: str, dev: Device, tf32: bool,
                 plan_name: Optional[str] = None) -> Tuple[float, str]:
    """Predicted ms of a timed pass (sum of its model passes) and the plan names used."""
    total, names = 0.0, []
    for m, p in passes:
        plans = plans_for(op, m, p, c, side, dtype)
        plan = choose(plans, dev, dtype, tf32) if plan_name is None else next(x for x in plans if x.name == plan_name)
        total += plan.seconds(dev, dtype, tf32) * 1e3
        names.append(plan.name)
    return total, "+".join(dict.fromkeys(names))


def summary(dev_name: str, tf32: bool, dtypes: Sequence[str], measured: Dict) -> str:
    """Chosen plan's prediction against the committed eager times (same dtype, each layout)."""
    dev = DEVICES[dev_name]
    kind = dev_name.lower()
    head = ["op", "mode", "pass", "level", "dtype", "plan", f"predicted {dev_name} ms",
            "eager ms", "speedup", "eager_cl ms", "speedup", "current triton ms (model)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, side in LEVELS:
        for dtype in dtypes:
            for op, mode, pass_, passes in TIMED:
                ms, names = predicted_ms(op, mode, passes, c, side, dtype, dev, tf32)
                cur, _ = predicted_ms(op, mode, passes, c, side, dtype, dev, tf32, "current")
                cells = [op, mode, pass_, f"C{c} {side}x{side}", dtype, names, f"{ms:.3f}"]
                for layout in ("nchw", "channels_last"):
                    ref = measured.get(("eager", op, mode, pass_, c, side, dtype, layout))
                    cells += [f"{ref:.3f}", f"{ref / ms:.1f}x"] if ref else ["", ""]
                trit = measured.get(("triton", op, mode, pass_, c, side, dtype, "nchw"))
                cells.append(f"{trit:.3f} ({cur:.3f})" if trit else f"({cur:.3f})")
                lines.append("| " + " | ".join(cells) + " |")
    if not measured:
        lines.append(f"\n(no committed {kind} results: benchmarks/results/{kind}.csv is absent)")
    return "\n".join(lines)


def _fmt_row(row: Row, dev_names: Sequence[str], tf32: bool) -> List[str]:
    p = row.plan
    times = [p.seconds(DEVICES[d], row.dtype, tf32) * 1e3 for d in dev_names]
    return [row.op, row.mode, row.pass_, f"C{row.channels} {row.side}x{row.side}", row.dtype, p.name,
            f"{p.bytes / 1e6:.0f}", f"{p.tensor_flops / 1e9:.1f}", f"{p.fma_flops / 1e9:.1f}",
            str(len(p.kernels))] + [f"{t:.3f}" for t in times]


def render(selected: Sequence[Row], dev_names: Sequence[str], tf32: bool) -> str:
    head = ["op", "mode", "pass", "level", "dtype", "plan", "DRAM MB", "TC GFLOP", "FMA GFLOP",
            "kernels"] + [f"{d} ms" for d in dev_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt_row(r, dev_names, tf32)) + " |" for r in selected]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=sorted(DEVICES), action="append",
                    help="device(s) to predict for [H100 and H200]")
    ap.add_argument("--no-tf32", dest="tf32", action="store_false",
                    help="float32 GEMMs at full precision (torch.backends.cudnn.allow_tf32=False)")
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), action="append", help="[float32 and bfloat16]")
    ap.add_argument("--plans", action="store_true", help="also print every plan of every model pass")
    args = ap.parse_args(argv)
    dev_names = args.device or ["H100", "H200"]
    dtypes = args.dtype or ("float32", "bfloat16")
    print(f"DLKUNet-L, batch {BATCH}, 224x224; float32 GEMMs {'TF32' if args.tf32 else 'tf32x3'}; "
          f"attainable: {BANDWIDTH_EFFICIENCY:.0%} of HBM, {TENSOR_EFFICIENCY:.0%} of tensor, "
          f"{FMA_EFFICIENCY:.0%} of FMA peak; {LAUNCH_GAP_S * 1e6:.0f} us per kernel\n")
    for name in dev_names:
        print(f"## Chosen plans on {name} against the committed {name} measurements\n")
        print(summary(name, args.tf32, dtypes, measured_times(name.lower())) + "\n")
    for name in dev_names:
        print(f"## The cuda backend's kernels on {name} (the committed cuda times predate tensor cores)\n")
        print(cuda_summary(name, args.tf32, dtypes, measured_times(name.lower())) + "\n")
    if args.plans:
        print("## Every plan of every pass\n")
        print(render(rows(dtypes=dtypes), dev_names, args.tf32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
