"""Per-shape execution plans of the forward paths on the kernels of ``_fast``, and the precision rule.

Plans (benchmarks/roofline.py's vocabulary; docs/gpu-plans.md):

``fused``  one kernel per pass whose tile holds all output channels (up to ``FUSED_MAX_COUT``; wider
           layers recompute the depthwise taps once per such tile): the depthwise result never
           leaves the chip and feeds the tensor cores.  For lka_gate the 5x5 conv a1 is written once
           first, then the dilated conv, pointwise GEMM and gate run fused.
``split``  a depthwise kernel writes its output once, then a large-tile tensor-core GEMM with the
           op's epilogue (lka_gate: a1, then a2, then the GEMM with the gate).
``chain``  lka_gate only: one kernel runs both depthwise convs with a1 kept on chip over a window
           of pixels plus the dilated conv's halo, writing a2 once; then the split plan's GEMM
           with the gate.  a1 never goes to DRAM (``chain_window`` has the windows).
``split_cudnn``   ``split`` with PyTorch's depthwise convolution (cuDNN) as its first stage.
``split_cublas``  eval dwconv_bn_act in channels_last: our depthwise kernel, BN folded into the
           pointwise weights by a small kernel, cuBLASLt's GEMM with its bias+ReLU epilogue on the
           [pixels x C] views (on the H200 cuBLAS ran this GEMM 2.0-2.5x faster than ours).
The last two are only ever chosen from the measured table.

The choice is the measured table ``tuned_plans.csv`` (benchmarks/tune_plans.py: the fastest plan
and tiles per shape on a GPU model, beside eager's time) where it has this GPU model, op, dtype,
layout and channels; elsewhere a small cost model (``predicted_seconds``: the roofline's terms,
DRAM bytes, tensor and FMA FLOPs, a launch gap per kernel, with the fused kernel's depthwise and MMA
work serialised as they are within one un-specialised Triton program).  Cached per (op, shape,
dtype, layout, device, precision).  ``forced`` overrides both (tests; DLKUNET_TRITON_PLAN=fused|split
for runs).

Precision rule (``precision``): float32 inputs use TF32 tensor cores exactly when
``torch.backends.cudnn.allow_tf32`` is True (eager convolution's rule and default), and three TF32
MMAs (tf32x3, float32-level accuracy) when it is False; float16/bfloat16 run one MMA in the input
dtype with float32 accumulation.  The flag is read on every call.

Host side of a call: no torch op besides allocating outputs and intermediates (BN folding happens
in the kernels' prologue); eval dwconv_bn_act launches 1 (fused) or 2 (split) kernels, lka_gate's
forward 2 (fused, chain) or 3 (split).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
import triton

from . import _fast as F
# Every launch states the register limit: without it ptxas aims at an occupancy step (e.g. 128 or 40
# registers on sm_80) and spilled; with it, it allocates what the kernel needs (as _common does).
from ._common import MAX_REGISTERS
from ._common import dense as _dense
from ._precision import INTERPRET

FUSED, SPLIT, CHAIN, SPLIT_CUDNN, SPLIT_CUBLAS = "fused", "split", "chain", "split_cudnn", "split_cublas"
# The cost model's plans.  The measured table may also name two it cannot predict: split_cudnn (the
# split plan with PyTorch's depthwise convolution, cuDNN on a GPU, as its first stage) and, for eval
# dwconv_bn_act in channels_last, split_cublas (our depthwise kernel, BN folded into the pointwise
# weights by a small kernel, then the GEMM with its bias+ReLU epilogue in cuBLASLt).
PLANS = (FUSED, SPLIT, CHAIN)
MEASURED_PLANS = PLANS + (SPLIT_CUDNN, SPLIT_CUBLAS)
# Output channels per program of the BN-folding kernel, and input channels per step.
FOLD_TILE = (16, 64)
FOLD_WARPS = 4
# Widest output-channel tile of the fused kernel (a 64 x 256 float32 accumulator is 64 registers
# per thread at 8 warps).  Wider layers recompute the depthwise taps once per tile.
FUSED_MAX_COUT = 256
# The chain plan's windows (``chain_window``): a window spans a whole image side up to
# CHAIN_WHOLE_SIDE pixels (no halo along it: the taps past it are the second conv's zero padding);
# longer sides are tiled by windows of at least CHAIN_MIN_WINDOW and 4x the dilated conv's radius,
# so that at least half of each is output.  A window of pixels x channels is the program's scratch
# slot, at most CHAIN_SLOT_ELEMENTS (64 KB in float32).  The convs run on sub-tiles of CHAIN_TILE_ELEMENTS
# pixels x channels, at least CHAIN_SUB_SIDE pixels a side (8 float32: one 32-byte sector of an
# NCHW row): the window's channels are as many as such a sub-tile allows, and the sub-tile grows
# to the budget when the slot allows fewer.  16 elements per thread at CHAIN_WARPS warps compiled
# for sm_90 without spills in at most 199 registers (4096 at 8 warps spilled in NCHW float32 at 64
# channels), so CHAIN_PROGRAMS_PER_SM programs fit an SM's register file: the grid is persistent,
# each program with its own slot (together at most 17 MB on 132 SMs, within an H100's or H200's L2),
# and one program's barriers overlap the other's taps.
CHAIN_WHOLE_SIDE = 64
CHAIN_MIN_WINDOW = 16
CHAIN_SLOT_ELEMENTS = 16384
CHAIN_TILE_ELEMENTS = 2048
CHAIN_SUB_SIDE = 8
CHAIN_WARPS = 4
CHAIN_PROGRAMS_PER_SM = 2
# The interpreter's: small windows and sub-tiles, so that small test images are tiled by several.
CHAIN_INTERPRET_WHOLE_SIDE = 16
CHAIN_INTERPRET_SLOT_ELEMENTS = 4096
CHAIN_INTERPRET_TILE_ELEMENTS = 512
CHAIN_INTERPRET_SUB_SIDE = 4
# DLKUNet's lka_gate: the dilated conv's taps and dilation (its chain windows are compiled).
DLKUNET_LKA_TAPS, DLKUNET_LKA_DILATION = 7, 3


@dataclass(frozen=True)
class Plan:
    """A plan and its tiles.  fused: (BH, BW, BLOCK_CO, BLOCK_CI, warps, stages); dw: (BH, BW,
    BLOCK_C, warps), or for chain its window (QH, QW, HALO_H, HALO_W, BLOCK_C, SH, SW, warps),
    empty for ``chain_window``'s; gemm: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    name: str
    fused: Tuple[int, ...] = ()
    dw: Tuple[int, ...] = ()
    gemm: Tuple[int, ...] = ()


# ------------------------------------------------------------------------------------------------
# precision


def precision(dtype: torch.dtype) -> str:
    """``PREC`` of the kernels for inputs of ``dtype``, by PyTorch's convolution rule."""
    if dtype != torch.float32:
        return "ieee"  # unused: 16-bit operands run one MMA in their own dtype
    return "tf32" if torch.backends.cudnn.allow_tf32 else "tf32x3"


# ------------------------------------------------------------------------------------------------
# tiles


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


def _patch(w: int, pixels: int) -> Tuple[int, int]:
    """(BH, BW) of a spatial patch of ``pixels`` pixels: rows as wide as the image allows."""
    bw = _pow2(w, 8 if INTERPRET else 16, 8 if INTERPRET else 32)
    return max(1, pixels // bw), bw


def tiles(name: str, cin: int, cout: int, w: int, dtype: torch.dtype) -> Plan:
    """The shipped tiles of plan ``name`` (all listed by ``shipped_configs`` for the compile tests)."""
    half = dtype != torch.float32
    dw_stage = name != CHAIN  # the chain plan's window follows from the shape (chain_window)
    if INTERPRET:  # the interpreter's cost is per operation, not per element: few, mid-size tiles
        bco = _pow2(cout, 16, FUSED_MAX_COUT)
        return Plan(name, fused=(8, 8, bco, 32, 1, 1) if name == FUSED else (),
                    dw=(8, 8, 32, 1) if dw_stage else (), gemm=(64, 32, 32, 1, 1) if name != FUSED else ())
    bco = _pow2(cout, 16, FUSED_MAX_COUT)
    bh, bw = _patch(w, 64)
    dh, dwd = _patch(w, 64)
    # BLOCK_CI 16: at 32, 16-bit NCHW with the 49-tap dilated conv spilled at 4 warps (sm_90).
    fused = (bh, bw, bco, 16, 8 if bco >= 128 else 4, 1)
    # float32 at 8 warps: at 4, tf32x3 spilled 176-248 bytes on sm_80 (its hi/lo operand parts);
    # 128x128 tiles at 8 warps spilled 32 bytes for float32 NCHW on sm_90.
    gemm = (64, 128, 64, 4, 3) if half else (64, 128, 32, 8, 3)
    # dw at 8 warps: at 4, NCHW with k >= 5 spilled (255 registers on sm_90, 96 on sm_80).
    return Plan(name, fused=fused if name == FUSED else (), dw=(dh, dwd, 32, 8) if dw_stage else (),
                gemm=gemm if name != FUSED else ())


def dilated_radius(taps: int, dilation: int) -> int:
    """How far a taps x taps conv at ``dilation`` reaches from its centre: a chain window's halo."""
    return dilation * (taps - 1) // 2


def chain_window(c: int, h: int, w: int, radius: int) -> Tuple[int, ...]:
    """The chain plan's window for C channels of H x W images and the dilated conv's radius:
    (QH, QW, HALO_H, HALO_W, BLOCK_C, SH, SW, warps), SH x SW the sub-tile."""
    whole, slot, tile, sub = (
        (CHAIN_INTERPRET_WHOLE_SIDE, CHAIN_INTERPRET_SLOT_ELEMENTS, CHAIN_INTERPRET_TILE_ELEMENTS,
         CHAIN_INTERPRET_SUB_SIDE) if INTERPRET else
        (CHAIN_WHOLE_SIDE, CHAIN_SLOT_ELEMENTS, CHAIN_TILE_ELEMENTS, CHAIN_SUB_SIDE))

    def side(n: int) -> Tuple[int, int]:
        if n <= whole or radius == 0:  # (no tap crosses a window without a radius)
            return triton.next_power_of_2(min(n, whole)), 0
        return max(CHAIN_MIN_WINDOW, triton.next_power_of_2(4 * radius + 1)), radius

    (qh, halo_h), (qw, halo_w) = side(h), side(w)
    sh, sw = min(qh, sub), min(qw, sub)
    bc = max(1, min(slot // (qh * qw), tile // (sh * sw), triton.next_power_of_2(c)))
    while 2 * sh * sw * bc <= tile and (sw < qw or sh < qh):  # wider rows first (NCHW: contiguous)
        if sw < qw and (sw <= sh or sh == qh):
            sw *= 2
        else:
            sh *= 2
    return qh, qw, halo_h, halo_w, bc, sh, sw, 1 if INTERPRET else CHAIN_WARPS


def chain_windows(n: int, h: int, w: int, window) -> int:
    """Windows over n images."""
    qh, qw, halo_h, halo_w = window[:4]
    return n * triton.cdiv(h, qh - 2 * halo_h) * triton.cdiv(w, qw - 2 * halo_w)


def _taps_reaching(s0: int, size: int, lo: int, hi: int, k: int, dil: int) -> int:
    """How many of a centred k-tap conv's taps (dilation dil) reach [lo, hi) from some position of
    s0 .. s0 + size - 1: the kernel's ``_tap_range``."""
    pad = dil * (k - 1) // 2
    return sum(1 for i in range(k) if s0 + i * dil - pad < hi and s0 + size - 1 + i * dil - pad >= lo)


def _chain_taps_1d(side: int, q: int, halo: int, sub: int, k: int, dil: int, own: bool) -> int:
    """Sum over one dimension's windows and sub-tiles (those holding image pixels; for the second
    conv, ``own``, own pixels) of the sub-tile's size x its taps that reach what they read."""
    total = 0
    for left in range(-halo, side - halo, q - 2 * halo):
        v_lo, v_hi = max(-left, 0), min(side - left, q)
        lo, hi = (max(v_lo, halo), min(v_hi, q - halo)) if own else (v_lo, v_hi)
        # the first conv's taps read x anywhere in the image, the second's a1 in the window
        reach_lo, reach_hi = (v_lo, v_hi) if own else (-left, side - left)
        for s0 in range(lo // sub * sub, hi, sub):
            total += sub * _taps_reaching(s0, sub, reach_lo, reach_hi, k, dil)
    return total


def chain_taps(h: int, w: int, window, k0: int, ks: int, dil: int) -> int:
    """Multiply-adds per channel of one H x W image that the chain kernel runs (both convs): the
    sub-tiles' taps that reach the image, halos, padding to the sub-tiles and all."""
    qh, qw, halo_h, halo_w, _, sh, sw = window[:7]
    a1 = _chain_taps_1d(h, qh, halo_h, sh, k0, 1, False) * _chain_taps_1d(w, qw, halo_w, sw, k0, 1, False)
    a2 = _chain_taps_1d(h, qh, halo_h, sh, ks, dil, True) * _chain_taps_1d(w, qw, halo_w, sw, ks, dil, True)
    return a1 + a2


def shipped_configs():
    """Every (kernel, tile) the GPU plans can launch, for the compile tests: the fused tiles for
    each BLOCK_CO and patch width, the dw, gemm and chain tiles, per dtype family (fp32 vs 16-bit)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for cout in (16, 32, 64, 128, 256):
            for w in (16, 32):
                out.append(("fused", dtype, tiles(FUSED, cout, cout, w, dtype).fused))
        for w in (16, 32):
            out.append(("dw", dtype, tiles(SPLIT, 64, 64, w, dtype).dw))
        out.append(("gemm", dtype, tiles(SPLIT, 512, 512, 32, dtype).gemm))
        # lka's chain windows at the DLKUNet levels (its dilated 7x7 at dilation 3): halos at 224
        # and 112, whole images from 56 down
        radius = dilated_radius(DLKUNET_LKA_TAPS, DLKUNET_LKA_DILATION)
        for c, side in ((96, 224), (384, 56), (768, 28), (1536, 14)):
            out.append(("chain", dtype, chain_window(c, side, side, radius)))
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------------
# cost model (the terms of benchmarks/roofline.py; H100 SXM peaks unless the device is an H200)

_PEAKS = {"H200": (4.8e12, 67e12, 494.7e12, 989.4e12), "H100": (3.35e12, 67e12, 494.7e12, 989.4e12)}
_EFF_BW, _EFF_TC, _EFF_FMA, _GAP = 0.87, 0.6, 0.6, 3e-6


def _peaks(device: torch.device):
    if device.type == "cuda" and not INTERPRET:
        name = torch.cuda.get_device_name(device)
        if "H200" in name:
            return _PEAKS["H200"]
    return _PEAKS["H100"]


def predicted_seconds(name: str, op: str, n: int, cin: int, cout: int, h: int, w: int,
                      kernels: Tuple[int, ...], dtype: torch.dtype, prec: str,
                      peaks=_PEAKS["H100"]) -> float:
    """Predicted time of plan ``name`` for one forward call.  kernels: (k,) for dwconv_bn_act,
    (k0, ks, dilation) for lka_gate.  The chain plan runs both of lka's depthwise convs on its
    windows' sub-tiles (``chain_taps``: halos and padding included) and writes a2 once."""
    bw, fma, tf32, half = peaks
    es = 2 if dtype != torch.float32 else 4
    tc = half if dtype != torch.float32 else (tf32 if prec == "tf32" else tf32 / 3)
    p = n * h * w
    t_bw = lambda b: b / (bw * _EFF_BW)  # noqa: E731
    t_tc = lambda f: f / (tc * _EFF_TC)  # noqa: E731
    t_fma = lambda f: f / (fma * _EFF_FMA)  # noqa: E731
    x_in, y_out, gemm = p * cin * es, p * cout * es, 2.0 * p * cin * cout
    k = kernels[0] if op == "dwconv_bn_act" else kernels[1]  # the conv fused with the GEMM
    taps = 2.0 * p * cin * k * k
    recompute = math.ceil(cout / FUSED_MAX_COUT)
    extra_in = 0.0
    total = 0.0
    weight_copy = 2.0 * cin * cout * es if prec == "tf32" else 0.0  # the GEMM's TF32-rounded weights
    if name == CHAIN:
        if op != "lka_gate":
            return math.inf
        k0, ks, dil = kernels
        window = chain_window(cin, h, w, dilated_radius(ks, dil))
        channels = triton.cdiv(cin, window[4]) * window[4]  # the last block's padding channels run too
        chain_flops = 2.0 * n * channels * chain_taps(h, w, window, k0, ks, dil)
        total += max(t_bw(2 * x_in + weight_copy), t_fma(chain_flops)) + _GAP
        return total + max(t_bw(2 * x_in + y_out), t_tc(gemm)) + _GAP  # reads a2 and x (the gate)
    if op == "lka_gate":
        k0 = kernels[0]
        total += max(t_bw(2 * x_in), t_fma(2.0 * p * cin * k0 * k0)) + _GAP  # a1 written once
        extra_in = x_in  # the gate reads x
    if name == FUSED:
        total += max(t_bw(x_in + extra_in + y_out), t_tc(gemm) + t_fma(taps * recompute)) + _GAP
    else:
        total += max(t_bw(2 * x_in + weight_copy), t_fma(taps)) + _GAP
        total += max(t_bw(x_in + extra_in + y_out), t_tc(gemm)) + _GAP
    return total


# ------------------------------------------------------------------------------------------------
# the measured table (benchmarks/tune_plans.py on a GPU; docs/gpu-plans.md has the numbers)

TUNED_TABLE = Path(__file__).with_name("tuned_plans.csv")
_TUNED: Dict[str, Dict[tuple, dict]] = {}  # path -> rows by key
_TABLE_PATH: Optional[Path] = None  # another table to read instead (tuned_table)


def _ints(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.split())


def _table_key(device_name: str, op: str, dtype: str, cl: bool, cin: int, cout: int, kernels: Tuple[int, ...]):
    # lka_gate's dilation does not change which tiles win; the table's kernels column holds it too.
    return (device_name, op, dtype, bool(cl), int(cin), int(cout), tuple(kernels[:2]))


def _rows(path: Optional[Path] = None) -> Dict[tuple, dict]:
    """The table's rows by (device, op, dtype, layout, channels, kernel sizes), each a dict from
    the measured (h, w) sizes to their rows."""
    path = str(path or _TABLE_PATH or TUNED_TABLE)
    if path not in _TUNED:
        rows: Dict[tuple, dict] = {}
        if os.path.exists(path):
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    key = _table_key(r["device"], r["op"], r["dtype"], r["layout"] == "cl", r["cin"], r["cout"],
                                     _ints(r["kernels"]))
                    rows.setdefault(key, {})[(int(r["h"]), int(r["w"]))] = r
        _TUNED[path] = rows
    return _TUNED[path]


@contextlib.contextmanager
def tuned_table(path: Union[str, Path]) -> Iterator[None]:
    """Read the measured table from ``path`` instead of the shipped one (tests)."""
    global _TABLE_PATH
    prev, _TABLE_PATH = _TABLE_PATH, Path(path)
    _CACHE.clear()
    try:
        yield
    finally:
        _TABLE_PATH = prev
        _CACHE.clear()


def measured_models() -> Dict[str, int]:
    """GPU models in the measured table, with how many shapes each has (``dlkunet info``)."""
    counts: Dict[str, int] = {}
    for key, sizes in _rows().items():
        counts[key[0]] = counts.get(key[0], 0) + len(sizes)
    return counts


def device_name(device: torch.device) -> str:
    """The table's name for ``device``: the GPU model, or the interpreter's (whose rows only tests
    and benchmarks/tune_plans.py --smoke write)."""
    if device.type == "cuda" and not INTERPRET:
        return _gpu_name(device.index if device.index is not None else torch.cuda.current_device())
    return "cpu (interpreter)"


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:  # asked on every auto-dispatched call
    return torch.cuda.get_device_name(index)


def measured(op: str, cin: int, cout: int, h: int, w: int, kernels: Tuple[int, ...], dtype: torch.dtype,
             cl: bool, device: torch.device) -> Optional[dict]:
    """The measured row for this shape on this GPU model: the same image size if it was measured,
    else the same channels at the nearest measured size; None where this GPU model, op, dtype,
    layout or channel count was never measured."""
    sizes = _rows().get(_table_key(device_name(device), op, str(dtype)[6:], cl, cin, cout, kernels))
    if not sizes:
        return None
    return sizes.get((h, w)) or sizes[min(sizes, key=lambda hw: abs(hw[0] * hw[1] - h * w))]


def faster_than_eager(op: str, cin: int, cout: int, h: int, w: int, kernels: Tuple[int, ...], dtype: torch.dtype,
                      cl: bool, device: torch.device) -> bool:
    """Whether this GPU model's measured table has the planned kernels faster than eager PyTorch
    (cuDNN) at this shape (what ``auto`` asks before it runs the triton backend)."""
    row = measured(op, cin, cout, h, w, kernels, dtype, cl, device)
    return row is not None and float(row["ms"]) < float(row["eager_ms"])


def _plan_of(row: dict) -> Plan:
    return Plan(row["plan"], fused=_ints(row["fused"]), dw=_ints(row["dw"]), gemm=_ints(row["gemm"]))


# ------------------------------------------------------------------------------------------------
# choice and cache

_CACHE: Dict[tuple, Plan] = {}
_FORCED: Optional[Union[str, Plan]] = None


@contextlib.contextmanager
def forced(plan: Union[str, Plan]) -> Iterator[None]:
    """Run with plan ``plan`` (a name, or a Plan with explicit tiles) instead of the model's."""
    global _FORCED
    assert isinstance(plan, Plan) or plan in MEASURED_PLANS, plan
    prev, _FORCED = _FORCED, plan
    try:
        yield
    finally:
        _FORCED = prev


def choose(op: str, n: int, cin: int, cout: int, h: int, w: int, kernels: Tuple[int, ...],
           dtype: torch.dtype, cl: bool, device: torch.device, prec: str) -> Plan:
    forced_plan = _FORCED or os.environ.get("DLKUNET_TRITON_PLAN") or None
    if isinstance(forced_plan, Plan):
        return forced_plan
    key = (op, n, cin, cout, h, w, kernels, dtype, cl, device.type, device.index, prec, forced_plan)
    plan = _CACHE.get(key)
    if plan is None:
        row = measured(op, cin, cout, h, w, kernels, dtype, cl, device)
        if forced_plan is not None:
            assert forced_plan in MEASURED_PLANS, f"DLKUNET_TRITON_PLAN must be one of {MEASURED_PLANS}"
            name = SPLIT if forced_plan == CHAIN and op != "lka_gate" else forced_plan  # lka's own plan
        elif row is not None:
            plan = _CACHE[key] = _plan_of(row)
            return plan
        else:
            peaks = _peaks(device)
            name = min(PLANS, key=lambda nm: predicted_seconds(nm, op, n, cin, cout, h, w, kernels, dtype,
                                                               prec, peaks))
        plan = _CACHE[key] = tiles(name, cin, cout, w, dtype)
    return plan


# ------------------------------------------------------------------------------------------------
# launchers


def _empty(n, c, h, w, x, fmt) -> torch.Tensor:
    return torch.empty((n, c, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)


def _depthwise(t, w_dw, b_dw, dil, fmt, plan):
    """A depthwise conv written once, in t's layout: ours, or PyTorch's (cuDNN) for split_cudnn."""
    if plan.name == SPLIT_CUDNN:
        k = w_dw.shape[-1]
        out = torch.nn.functional.conv2d(t, w_dw, b_dw, padding=dil * (k - 1) // 2, dilation=dil, groups=t.shape[1])
        return _dense(out, fmt=fmt)
    n, c, h, w = t.shape
    out = _empty(n, c, h, w, t, fmt)
    _launch_dw(t, w_dw, b_dw, out, dil, fmt == torch.channels_last, plan.dw)
    return out


def _gemm_operands(t, w_dw, b_dw, w_pw, dil, fmt, plan, prec):
    """(d, weights, precision) of the split plan's GEMM: the depthwise output d of t, and the
    pointwise weights.  Under TF32 our depthwise kernel stores d rounded to TF32 and writes a
    TF32-rounded copy of the weights in the same launch, so the GEMM runs ``TF32_ROUNDED`` (its
    operands go from shared memory to the tensor cores untouched); the products are the ones the
    in-GEMM rounding gave.  cuDNN's depthwise output (split_cudnn) is rounded in the GEMM."""
    if prec != "tf32" or plan.name == SPLIT_CUDNN:
        return _depthwise(t, w_dw, b_dw, dil, fmt, plan), w_pw, prec
    n, c, h, w = t.shape
    d = _empty(n, c, h, w, t, fmt)
    w_rounded = torch.empty_like(w_pw)
    _launch_dw(t, w_dw, b_dw, d, dil, fmt == torch.channels_last, plan.dw, w_pw, w_rounded)
    return d, w_rounded, F.TF32_ROUNDED


def _launch_dw(t, w_dw, b_dw, out, dil, cl, tile, w_pw=None, w_pw_rounded=None):
    """Our depthwise kernel; with w_pw, also the TF32 rounding of out and of w_pw into w_pw_rounded."""
    n, c, h, w = t.shape
    bh, bw, bc, warps = tile
    k = w_dw.shape[-1]
    spatial = n * triton.cdiv(h, bh) * triton.cdiv(w, bw)
    grid = (spatial, triton.cdiv(c, bc))
    rounded = w_pw is not None
    cout = w_pw.shape[0] if rounded else 0
    F._dw_kernel[grid](t, w_dw, b_dw, out, w_pw if rounded else out, w_pw_rounded if rounded else out,
                       n, h, w, c, cout, triton.cdiv(cout, spatial), K=k, DIL=dil, CL=cl, ROUND_TF32=rounded,
                       BH=bh, BW=bw, BLOCK_C=bc, num_warps=warps, maxnreg=MAX_REGISTERS)


def _launch_chain(x, w0, b0, ws, bs, a2, dil, cl, window, a1=None, w_pw=None, w_pw_rounded=None):
    """lka_gate's depthwise chain: a2 (and, given a1, a1) written once; with w_pw, a2 rounded to TF32
    and the TF32 rounding of w_pw into w_pw_rounded, as ``_launch_dw``."""
    n, c, h, w = x.shape
    qh, qw, halo_h, halo_w, bc, sh, sw, warps = window
    radius = dilated_radius(ws.shape[-1], dil)
    for side, q, halo in ((h, qh, halo_h), (w, qw, halo_w)):
        # a side a window leaves without a halo is one the window spans (or no tap crosses windows)
        assert halo >= radius or halo == 0 and (q >= side or radius == 0), (window, radius)
        assert q > 2 * halo, "a window has pixels inside its halo"
    assert qh % sh == 0 and qw % sw == 0, ("sub-tiles tile the window", window)
    windows = chain_windows(n, h, w, window)
    items = windows * triton.cdiv(c, bc)
    # at least two: under the interpreter (one "SM") too, programs walk items through separate slots
    programs = min(items, max(2, CHAIN_PROGRAMS_PER_SM * _multiprocessors(x.device.type, x.device.index)))
    scratch = torch.empty(programs * qh * qw * bc, dtype=x.dtype, device=x.device)
    rounded = w_pw is not None
    cout = w_pw.shape[0] if rounded else 0
    F._lka_chain_kernel[(programs,)](x, w0, b0, ws, bs, a2, a2 if a1 is None else a1, scratch,
                                     w_pw if rounded else a2, w_pw_rounded if rounded else a2,
                                     n, h, w, c, cout, triton.cdiv(cout, windows), K0=w0.shape[-1], KS=ws.shape[-1],
                                     DIL=dil, CL=cl, ROUND_TF32=rounded, STORE_A1=a1 is not None, QH=qh, QW=qw,
                                     HALO_H=halo_h, HALO_W=halo_w, BLOCK_C=bc, SH=sh, SW=sw, num_warps=warps,
                                     maxnreg=MAX_REGISTERS)


def _window_of(plan: Plan, x, ws, dil: int):
    """The chain plan's window: the plan's own (tests force some), else the rule's for x."""
    n, c, h, w = x.shape
    return plan.dw or chain_window(c, h, w, dilated_radius(ws.shape[-1], dil))


def _launch_fused(t, w_dw, b_dw, w_pw, x, out, prm, eps, dil, epi, relu, cl, prec, tile):
    n, cin, h, w = t.shape
    cout = w_pw.shape[0]
    bh, bw, bco, bci, warps, stages = tile
    grid = (n * triton.cdiv(h, bh) * triton.cdiv(w, bw), triton.cdiv(cout, bco))
    F._fused_kernel[grid](t, w_dw, b_dw, w_pw, x, out, *prm, eps, n, h, w, cin, cout,
                          K=w_dw.shape[-1], DIL=dil, EPI=epi, RELU=relu, CL=cl, PREC=prec, BH=bh, BW=bw,
                          BLOCK_CO=bco, BLOCK_CI=bci, num_warps=warps, num_stages=stages,
                          maxnreg=MAX_REGISTERS)


def _launch_gemm(a, w_pw, x, out, prm, eps, epi, relu, cl, prec, tile):
    n, cin, h, w = a.shape
    cout = w_pw.shape[0]
    bm, bn, bk, warps, stages = tile
    m_tiles = triton.cdiv(n * h * w, bm) if cl else n * triton.cdiv(h * w, bm)
    grid = (m_tiles * triton.cdiv(cout, bn),)
    F._gemm_kernel[grid](a, w_pw, x, out, *prm, eps, n, h * w, cin, cout, EPI=epi, RELU=relu, CL=cl,
                         PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
                         maxnreg=MAX_REGISTERS)


def _cublas_gemm(d, w_pw, b_pw, gamma, beta, running_mean, running_var, mean, var, eps, relu):
    """split_cublas's pointwise stage on channels_last d: its [pixels x C] view is the GEMM's
    operand (no copy), BN folded into the weights by one small kernel, then cuBLASLt's GEMM with
    its bias(+ReLU) epilogue, TF32 by the convolution flag as eager's conv.  Returns y, the GEMM's
    [pixels x Cout] output seen as a channels_last (N, Cout, H, W) tensor."""
    cout, cin = w_pw.shape[0], w_pw.shape[1]
    w_fold = torch.empty((cout, cin), dtype=d.dtype, device=d.device)
    shift = torch.empty(cout, dtype=d.dtype, device=d.device)
    bco, bci = FOLD_TILE
    F._fold_bn_kernel[(triton.cdiv(cout, bco),)](w_pw, w_fold, shift, b_pw, gamma, beta, running_mean, running_var,
                                                mean, var, eps, cin, cout, BLOCK_CO=bco, BLOCK_CI=bci,
                                                num_warps=FOLD_WARPS, maxnreg=MAX_REGISTERS)
    n, _, h, w = d.shape
    rows = d.permute(0, 2, 3, 1).view(n * h * w, cin)  # a view: d is channels_last
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        out = torch._addmm_activation(shift, rows, w_fold.t()) if relu else torch.addmm(shift, rows, w_fold.t())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out.view(n, h, w, cout).permute(0, 3, 1, 2)


def _layout(x: torch.Tensor):
    from dlkunet.ops.layout import memory_format  # late: dlkunet.ops imports this package lazily
    fmt = memory_format(x)
    return _dense(x, fmt=fmt), fmt, fmt == torch.channels_last


def backward_depthwise(op: str, t, w_dw, b_dw, dil: int, cout: int, kernels: Tuple[int, ...]):
    """The depthwise output of t for a backward pass, written once where the eval forward's plan for
    this shape splits (the same table and cost model weigh the same write of d against the same
    recompute per output-channel block), else None: the backward kernels then recompute it from t's
    taps.  (The training forward always writes d; its choice is not what decides here.)"""
    t, fmt, cl = _layout(t)
    n, cin, h, w = t.shape
    plan = choose(op, n, cin, cout, h, w, kernels, t.dtype, cl, t.device, precision(t.dtype))
    if plan.name == FUSED:
        return None
    return _depthwise(t, w_dw, b_dw, dil, fmt, plan)


def backward_lka_stages(x, w0, b0, ws, bs, dil: int):
    """(a1, a2) of lka_gate for its backward in one launch where the eval forward's plan for this
    shape is ``chain`` (the kernel writes a1 beside a2), else None: the backward then writes a1,
    and a2 by ``backward_depthwise``."""
    x, fmt, cl = _layout(x)
    n, c, h, w = x.shape
    kernels = (w0.shape[-1], ws.shape[-1], dil)
    plan = choose("lka_gate", n, c, c, h, w, kernels, x.dtype, cl, x.device, precision(x.dtype))
    if plan.name != CHAIN:
        return None
    a1, a2 = _empty(n, c, h, w, x, fmt), _empty(n, c, h, w, x, fmt)
    _launch_chain(x, _dense(w0), _dense(b0), _dense(ws), _dense(bs), a2, dil, cl, _window_of(plan, x, ws, dil),
                  a1=a1)
    return a1, a2


def dwconv_bn_act_eval(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var, eps: float,
                       relu: bool):
    """Eval forward of dwconv_bn_act: (y, running_mean copy, running_var copy), float32 statistics.
    1 launch (fused), 2 (split, split_cudnn) or 3 (split_cublas: depthwise, BN folding, GEMM); the
    only other host-side torch ops allocate y, d and the statistics."""
    x, fmt, cl = _layout(x)
    n, cin, h, w = x.shape
    cout = w_pw.shape[0]
    k = w_dw.shape[-1]
    w_dw, w_pw = _dense(w_dw), _dense(w_pw)
    b_dw, b_pw, gamma, beta = _dense(b_dw), _dense(b_pw), _dense(gamma), _dense(beta)
    running_mean, running_var = _dense(running_mean), _dense(running_var)
    prec = precision(x.dtype)
    plan = choose("dwconv_bn_act", n, cin, cout, h, w, (k,), x.dtype, cl, x.device, prec)
    mean = torch.empty(cout, dtype=torch.float32, device=x.device)
    var = torch.empty(cout, dtype=torch.float32, device=x.device)
    if plan.name == SPLIT_CUBLAS and cl:
        d = _depthwise(x, w_dw, b_dw, 1, fmt, plan)
        y = _cublas_gemm(d, w_pw, b_pw, gamma, beta, running_mean, running_var, mean, var, float(eps), bool(relu))
        return y, mean, var
    y = _empty(n, cout, h, w, x, fmt)
    prm = (b_pw, gamma, beta, running_mean, running_var, mean, var)
    if plan.name == FUSED:
        _launch_fused(x, w_dw, b_dw, w_pw, x, y, prm, float(eps), 1, F.EPI_BN, bool(relu), cl, prec, plan.fused)
    else:  # split, split_cudnn, and split_cublas on NCHW (whose pixels are not rows of a matrix view)
        d, w_gemm, gemm_prec = _gemm_operands(x, w_dw, b_dw, w_pw, 1, fmt, plan, prec)
        _launch_gemm(d, w_gemm, x, y, prm, float(eps), F.EPI_BN, bool(relu), cl, gemm_prec, plan.gemm)
    return y, mean, var


# Programs of the statistics GEMM per SM (each walks several row tiles): its partial rows are few
# enough for one merging program per channel block.  Rows per step of that merge.
STATS_PROGRAMS_PER_SM = 4
STATS_MERGE_ROWS = 64
STATS_MERGE_CHANNELS = 32


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda" and not INTERPRET:
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                                ).multi_processor_count
    return 1  # the interpreter: a couple of programs, each walking several tiles


def stats_groups(m_tiles: int, n_tiles: int, device: torch.device) -> int:
    """Programs along the pixels of the statistics GEMM: enough for STATS_PROGRAMS_PER_SM per SM
    together with the channel tiles, at most one per row tile."""
    programs = STATS_PROGRAMS_PER_SM * _multiprocessors(device.type, device.index)
    return max(1, min(m_tiles, triton.cdiv(programs, n_tiles)))


def dwconv_bn_act_train(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, eps: float, relu: bool):
    """Training forward of dwconv_bn_act on the split plan's kernels: (y, batch mean, biased batch
    variance), float32 statistics.  4 launches: the depthwise kernel writes d once (under TF32
    rounded, with the weight copy), the statistics GEMM reduces z's moments (z never stored), one
    program per channel block merges them in float64, and the GEMM recomputes z with the same tile
    (the same bits the statistics saw) and applies the batch-statistics affine and ReLU.  Recomputing
    z costs a second GEMM; storing it would cost writing and re-reading the output, which at the
    shallow, memory-bound levels is the larger of the two.  No host torch op but allocations."""
    x, fmt, cl = _layout(x)
    n, cin, h, w = x.shape
    cout = w_pw.shape[0]
    w_dw, w_pw = _dense(w_dw), _dense(w_pw)
    b_dw, b_pw, gamma, beta = _dense(b_dw), _dense(b_pw), _dense(gamma), _dense(beta)
    prec = precision(x.dtype)
    plan = tiles(SPLIT, cin, cout, w, x.dtype)
    d, w_gemm, gemm_prec = _gemm_operands(x, w_dw, b_dw, w_pw, 1, fmt, plan, prec)
    bm, bn, bk, warps, stages = plan.gemm
    m_tiles = triton.cdiv(n * h * w, bm) if cl else n * triton.cdiv(h * w, bm)
    n_tiles = triton.cdiv(cout, bn)
    groups = stats_groups(m_tiles, n_tiles, x.device)
    part = torch.empty((groups, 3, cout), dtype=torch.float32, device=x.device)
    F._gemm_stats_kernel[(groups * n_tiles,)](d, w_gemm, part, n, h * w, cin, cout, groups, CL=cl, PREC=gemm_prec,
                                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                              num_stages=stages, maxnreg=MAX_REGISTERS)
    mean = torch.empty(cout, dtype=torch.float32, device=x.device)
    var = torch.empty(cout, dtype=torch.float32, device=x.device)
    scale = torch.empty(cout, dtype=torch.float32, device=x.device)
    shift = torch.empty(cout, dtype=torch.float32, device=x.device)
    F._bn_batch_stats_kernel[(triton.cdiv(cout, STATS_MERGE_CHANNELS),)](
        part, b_pw, gamma, beta, mean, var, scale, shift, float(eps), groups, cout, BLOCK_G=STATS_MERGE_ROWS,
        BLOCK_C=STATS_MERGE_CHANNELS)
    y = _empty(n, cout, h, w, x, fmt)
    prm = (scale, shift, scale, scale, scale, scale, scale)  # EPI_AFFINE reads the first two
    _launch_gemm(d, w_gemm, x, y, prm, 0.0, F.EPI_AFFINE, bool(relu), cl, gemm_prec, plan.gemm)
    return y, mean, var


def lka_gate_fwd(x, w0, b0, ws, bs, w1, b1, dilation: int):
    """lka_gate forward: a1 = dw_k0(x) written once, then fused (dilated dw + GEMM + gate) or split
    (a2 written once, then the GEMM with the gate); or chain (a2 written once with a1 on chip, then
    the GEMM).  2 (fused, chain) or 3 (split) launches."""
    x, fmt, cl = _layout(x)
    n, c, h, w = x.shape
    dil = int(dilation)
    w0, ws, w1 = _dense(w0), _dense(ws), _dense(w1)
    b0, bs, b1 = _dense(b0), _dense(bs), _dense(b1)
    prec = precision(x.dtype)
    plan = choose("lka_gate", n, c, c, h, w, (w0.shape[-1], ws.shape[-1], dil), x.dtype, cl, x.device, prec)
    out = _empty(n, c, h, w, x, fmt)
    prm = (b1, b1, b1, b1, b1, b1, b1)  # only b1 is read (EPI_GATE)
    if plan.name == CHAIN:
        a2 = _empty(n, c, h, w, x, fmt)
        window = _window_of(plan, x, ws, dil)
        if prec == "tf32":  # as _gemm_operands: a2 and a weight copy rounded, the GEMM converts nothing
            w_gemm = torch.empty_like(w1)
            _launch_chain(x, w0, b0, ws, bs, a2, dil, cl, window, w_pw=w1, w_pw_rounded=w_gemm)
            prec = F.TF32_ROUNDED
        else:
            w_gemm = w1
            _launch_chain(x, w0, b0, ws, bs, a2, dil, cl, window)
        _launch_gemm(a2, w_gemm, x, out, prm, 0.0, F.EPI_GATE, False, cl, prec, plan.gemm)
        return out
    a1 = _depthwise(x, w0, b0, 1, fmt, plan)
    if plan.name == FUSED:
        _launch_fused(a1, ws, bs, w1, x, out, prm, 0.0, dil, F.EPI_GATE, False, cl, prec, plan.fused)
    else:
        a2, w_gemm, gemm_prec = _gemm_operands(a1, ws, bs, w1, dil, fmt, plan, prec)
        _launch_gemm(a2, w_gemm, x, out, prm, 0.0, F.EPI_GATE, False, cl, gemm_prec, plan.gemm)
    return out


def with_tiles(plan: Plan, **kw) -> Plan:
    """A copy of ``plan`` with some tiles replaced (tests force small co tiles, etc.)."""
    return replace(plan, **kw)
