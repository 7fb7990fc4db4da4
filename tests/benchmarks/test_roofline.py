"""The GPU cost model (benchmarks/roofline.py): its counts agree with the byte floors and its
arithmetic, and the plans it chooses meet the design contract against the committed eager times."""
from __future__ import annotations

import math

import pytest
import torch

from dlkunet_testing import load_benchmark_module as _load

roofline, floors = _load("roofline"), _load("floors")


@pytest.mark.parametrize("c,side", roofline.LEVELS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_eval_plan_moves_exactly_the_byte_floor(c, side, dtype):
    (fused,) = [p for p in roofline.dwconv_plans(16, c, c, side, dtype, "eval", "fwd") if p.name == "fused"]
    floor = floors.dwconv_bytes(16, c, c, side, side, 3, getattr(torch, dtype), backward=False)
    assert fused.bytes == floor
    assert len(fused.kernels) == 1
    # one depthwise pass over Cin (at most one recomputation per 256-wide output tile), one GEMM
    p = 16 * side * side
    assert fused.tensor_flops == 2 * p * c * c
    assert fused.fma_flops == 2 * p * c * 9 * math.ceil(c / roofline.FUSED_MAX_COUT)


def test_lka_chain_forward_moves_less_than_split_and_computes_its_windows():
    plans = {p.name: p for p in roofline.lka_plans(16, 96, 224, "float32", "fwd")}
    act = 16 * 96 * 224 * 224 * 4
    assert plans["split"].bytes - plans["chain"].bytes == 2 * act  # a1 written and read back
    assert plans["chain"].fma_flops > plans["split"].fma_flops  # the halos' a1, computed twice
    # radius 9 (7 taps, dilation 3): 224-wide images in 64-wide windows of 46 output pixels, 5 per
    # side, 16 x 32 sub-tiles of 4 channels; 14-wide ones in one 16-wide window of 8 x 8 sub-tiles
    # of 32 channels, where the dilated conv's taps mostly reach past the image and are skipped
    assert roofline.chain_window(96, 224, 9) == (64, 9, 4, 16, 32)
    assert roofline.chain_window(1536, 14, 9) == (16, 0, 32, 8, 8)
    assert roofline.chain_taps(1536, 14, 5, 7, 3) == (16 * 5) ** 2 + (8 * 6 + 8 * 5) ** 2 < 74 * 14 * 14
    # the cuda backend's stage kernel: a 32x32 tile needs a1 on 50x50
    assert roofline.lka_halo_factor(5, 7, 3, (32, 32)) == pytest.approx(2500 / 1024)


@pytest.mark.parametrize("c", [96, 1536, 10])
@pytest.mark.parametrize("side", [14, 28, 56, 64, 65, 112, 224, 300])
@pytest.mark.parametrize("ks,dilation", [(7, 3), (5, 3), (3, 1), (1, 3)])
def test_chain_windows_are_the_kernels(c, side, ks, dilation, monkeypatch):
    """The roofline's copy of the chain plan's window rule counts the multiply-adds that
    kernels/plans.py's windows and sub-tiles run (GPU rule, not the interpreter's)."""
    pytest.importorskip("triton")
    from dlkunet.kernels import plans
    monkeypatch.setattr(plans, "INTERPRET", False)
    radius = plans.dilated_radius(ks, dilation)
    window = plans.chain_window(c, side, side, radius)
    assert roofline.chain_window(c, side, radius) == tuple(window[i] for i in (0, 2, 4, 5, 6))
    assert roofline.chain_taps(c, side, 5, ks, dilation) == plans.chain_taps(side, side, window, 5, ks, dilation)


def test_kernel_time_is_its_slowest_resource_plus_the_launch_gap():
    dev = roofline.DEVICES["H200"]
    k = roofline.Kernel(bytes=1e9, tensor_flops=1e12, fma_flops=1e9)
    t_bytes = 1e9 / (dev.hbm_bytes_per_s * roofline.BANDWIDTH_EFFICIENCY)
    t_tf32 = 1e12 / (dev.tf32_tensor_flops * roofline.TENSOR_EFFICIENCY)
    assert k.seconds(dev, "float32", tf32=True) == pytest.approx(max(t_bytes, t_tf32) + roofline.LAUNCH_GAP_S)
    # full precision (tf32x3) triples the tensor-core time; 16-bit halves TF32's
    assert k.seconds(dev, "float32", tf32=False) == pytest.approx(max(t_bytes, 3 * t_tf32) + roofline.LAUNCH_GAP_S)
    t_half = 1e12 / (dev.half_tensor_flops * roofline.TENSOR_EFFICIENCY)
    assert k.seconds(dev, "bfloat16", tf32=True) == pytest.approx(max(t_bytes, t_half) + roofline.LAUNCH_GAP_S)


FORWARD_CASES = [pytest.param(op, mode, pass_, passes, c, side, dtype, layout, id=f"{op}-C{c}-{dtype}-{layout}")
                 for c, side in roofline.LEVELS for dtype in ("float32", "bfloat16")
                 for op, mode, pass_, passes in roofline.TIMED if pass_ == "fwd"
                 for layout in ("nchw", "channels_last")]


@pytest.mark.parametrize("op,mode,pass_,passes,c,side,dtype,layout", FORWARD_CASES)
def test_chosen_plan_predicts_four_times_eager_forward_on_the_committed_h200_table(op, mode, pass_, passes, c,
                                                                                   side, dtype, layout):
    """Issue 13's contract: the chosen plan predicts >= 4x eager's measured forward, except where
    eager already runs within 4x of the single-pass floor (no plan can), and there the chosen plan
    must predict that floor."""
    eager = roofline.measured_times("h200").get(("eager", op, mode, pass_, c, side, dtype, layout))
    if eager is None:
        pytest.skip("no committed eager time for this case in benchmarks/results/h200.csv")
    dev = roofline.DEVICES["H200"]
    ms, plan = roofline.predicted_ms(op, mode, passes, c, side, dtype, dev, tf32=True)
    floor = roofline.single_pass_floor_ms(op, c, side, dtype, dev)
    assert ms >= floor * (1 - 1e-9)
    if eager < 4.0 * floor:
        assert ms <= 1.1 * floor, (plan, ms, floor, eager)
    else:
        assert eager / ms >= 4.0, (plan, ms, eager)


def test_the_committed_h200_table_covers_most_forward_cases():
    measured = roofline.measured_times("h200")
    have = [p for p in FORWARD_CASES if ("eager", *p.values[:3], *p.values[4:]) in measured]
    assert len(have) >= 20, len(have)


@pytest.mark.parametrize("dtype,cout,fused", [("bfloat16", 384, True), ("bfloat16", 385, False),
                                              ("float32", 192, True), ("float32", 193, False)])
def test_cuda_eval_plan_fuses_the_taps_within_a_block_s_row_tiles_else_writes_a_plane(dtype, cout, fused):
    """The cuda forward's blocks hold 6 row tiles of 64 for 16-bit MMAs, 3 for TF32 (the kernels'
    rule: tests/csrc/test_cuda_emulated.py); wider layers go through a plane of the operand type."""
    es = roofline.DTYPE_BYTES[dtype]
    plan = roofline.cuda_dwconv_plan(16, 96, cout, 56, dtype, "eval", "fwd")
    p = 16 * 56 * 56
    x, y, plane = p * 96 * es, p * cout * es, p * 96 * es
    if fused:
        assert len(plan.kernels) == 1
        assert 0 < plan.bytes - x - y < 1e6  # only the weights besides x and y
    else:
        assert len(plan.kernels) == 2
        assert plan.kernels[0].bytes == x + plane and plan.kernels[1].bytes - plane - y < 1e6
    assert plan.tensor_flops == 2 * p * 96 * cout and plan.fma_flops == 2 * p * 96 * 9


@pytest.mark.parametrize("dtype,a2_bytes", [("float32", 4), ("bfloat16", 2)])
def test_cuda_lka_writes_its_planes_in_the_input_dtype(dtype, a2_bytes):
    """a2 feeds only GEMMs: a 16-bit plane under 16-bit MMAs (half the bytes, the same numbers);
    the backward's other planes are in the input's dtype too, as eager stores them."""
    es, p, c = roofline.DTYPE_BYTES[dtype], 16 * 14 * 14, 64
    act, a2, w1 = p * c * es, p * c * a2_bytes, (c * c + c) * es
    stage, gemm = roofline.cuda_lka_plan(16, c, 14, dtype, "fwd").kernels
    assert (stage.bytes, gemm.bytes) == (act + a2, a2 + 2 * act + w1)
    bwd = roofline.cuda_lka_plan(16, c, 14, dtype, "bwd").kernels
    assert bwd[0].bytes == act + p * c * es + a2  # the stage writes a1 and a2
    assert bwd[5].bytes == 2 * p * c * es  # grad_a1 from grad_a2


def test_cuda_training_forward_writes_y_once_and_never_z():
    fwd = roofline.cuda_dwconv_plan(16, 64, 64, 56, "float32", "train", "fwd")
    act = 16 * 56 * 56 * 64 * 4
    # statistics pass reads x, apply pass reads x and writes y: 3 activations (+ weights)
    assert 3 * act < fwd.bytes < 3 * act + 1e6
    assert len(fwd.kernels) == 3  # statistics GEMM, finalize, apply GEMM


def test_cli_prints_a_table_per_device(capsys):
    assert roofline.main(["--device", "H100", "--dtype", "bfloat16", "--plans"]) == 0
    out = capsys.readouterr().out
    assert "## Chosen plans on H100" in out and "## Every plan of every pass" in out
    assert "## The cuda backend's kernels on H100" in out
    assert "| lka_gate | - | fwd | C96 224x224 | bfloat16 |" in out
