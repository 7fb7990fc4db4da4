"""Compile the planned forward kernels (kernels/_fast.py, tiles from kernels/plans.py) for a GPU target
without a GPU and report, per specialisation, the tensor-core instructions of its PTX and SASS,
registers, spilled bytes and shared memory.

Run as a script, never under TRITON_INTERPRET (the kernels must be real JIT functions):
``python tensor_core_worker.py ARCH [KERNEL...]`` prints one JSON line per compiled specialisation.
test_tensor_cores.py drives it; by hand it is the way to read a kernel's PTX/SASS while tuning
(``--dump DIR`` also writes the .ptx and .sass files).
"""
from __future__ import annotations

import argparse
import json
import os
import re

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

import compile_worker as CW  # noqa: E402  (beside this script: the same compile path as test_compile)
from dlkunet.kernels import _fast as F  # noqa: E402
from dlkunet.kernels import plans as P  # noqa: E402

# Per-channel parameter pointers and the statistics copies are float32; eps is a float.
FP32_PTRS = {"b_ptr", "g_ptr", "be_ptr", "rm_ptr", "rv_ptr", "mean_ptr", "var_ptr", "part_ptr", "scale_ptr",
             "shift_ptr"}
# Channel counts of the real shapes are multiples of 16 (Triton specialises such ints at run time).
DIVISIBLE = {"CIN", "COUT", "C", "HW"}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Instructions that run on tensor cores.
PTX_TC = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\.[\w.]+")
# A wgmma's A operand: a shared-memory descriptor (a 64-bit register) or a fragment in registers.
WGMMA_A = re.compile(r"wgmma\.mma_async\S* \{[^}]*\}, (%rd\d+|\{)")
SASS_TC = re.compile(r"\b(HGMMA|HMMA)\.[\w.]+")


def _precs(dtype):
    """The GEMM kernel's precisions per dtype: float32 TF32 on pre-rounded operands (the split
    plan), TF32 rounding in the kernel (split_cudnn, and the fused kernel's only TF32 mode) and
    tf32x3; 16-bit one mode."""
    if dtype != torch.float32:
        return ["ieee"]
    return [F.TF32_ROUNDED, "tf32", "tf32x3"]


def specialisations(kernels):
    """(kernel name, dtype, precision, constexprs, num_warps, num_stages) of every shipped tile and
    launch combination: eval dwconv (EPI_BN, RELU, k=3), the lka gate (EPI_GATE, ks=7, d=3), the
    training forward (the statistics GEMM, its merge, EPI_AFFINE);
    both layouts; float32 with TF32 and with tf32x3, bfloat16 and float16."""
    out = []
    for kind, family, tile in P.shipped_configs():
        if kind not in kernels:
            continue
        dtypes = [torch.float32] if family == torch.float32 else [torch.bfloat16, torch.float16]
        for dtype in dtypes:
            for cl in (False, True):
                if kind == "fused":
                    bh, bw, bco, bci, warps, stages = tile
                    for prec in _precs(dtype):
                        if prec == F.TF32_ROUNDED:
                            continue  # the fused kernel computes its operand: it rounds it itself
                        for epi, k, dil, relu in ((F.EPI_BN, 3, 1, True), (F.EPI_GATE, 7, 3, False)):
                            consts = dict(K=k, DIL=dil, EPI=epi, RELU=relu, CL=cl, PREC=prec,
                                          BH=bh, BW=bw, BLOCK_CO=bco, BLOCK_CI=bci)
                            out.append(("fused", F._fused_kernel, dtype, consts, warps, stages))
                elif kind == "gemm":
                    bm, bn, bk, warps, stages = tile
                    for prec in _precs(dtype):
                        for epi, relu in ((F.EPI_BN, True), (F.EPI_GATE, False), (F.EPI_AFFINE, True)):
                            consts = dict(EPI=epi, RELU=relu, CL=cl, PREC=prec, BLOCK_M=bm, BLOCK_N=bn,
                                          BLOCK_K=bk)
                            out.append(("gemm", F._gemm_kernel, dtype, consts, warps, stages))
                        # the training forward's statistics pass, on the same tile
                        consts = dict(CL=cl, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
                        out.append(("stats", F._gemm_stats_kernel, dtype, consts, warps, stages))
                elif kind == "dw":
                    bh, bw, bc, warps = tile
                    for k, dil in ((3, 1), (5, 1), (7, 3)):
                        # float32 also with the TF32 rounding of its output and the weight copy
                        for rounded in ((False, True) if dtype == torch.float32 else (False,)):
                            consts = dict(K=k, DIL=dil, CL=cl, ROUND_TF32=rounded, BH=bh, BW=bw, BLOCK_C=bc)
                            out.append(("dw", F._dw_kernel, dtype, consts, warps, 1))
                elif kind == "chain":
                    qh, qw, halo_h, halo_w, bc, sh, sw, warps = tile
                    for k0, ks, dil in ((5, 7, 3), (3, 7, 3), (5, 5, 3)):
                        for rounded in ((False, True) if dtype == torch.float32 else (False,)):
                            for store_a1 in (False, True):  # the forward; the backward's a1 and a2
                                consts = dict(K0=k0, KS=ks, DIL=dil, CL=cl, ROUND_TF32=rounded, STORE_A1=store_a1,
                                              QH=qh, QW=qw, HALO_H=halo_h, HALO_W=halo_w, BLOCK_C=bc,
                                              SH=sh, SW=sw)
                                out.append(("chain", F._lka_chain_kernel, dtype, consts, warps, 1))
    if "fold" in kernels:  # split_cublas's BN folding (no MMA; checked for spills)
        bco, bci = P.FOLD_TILE
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out.append(("fold", F._fold_bn_kernel, dtype, dict(BLOCK_CO=bco, BLOCK_CI=bci), P.FOLD_WARPS, 3))
    if "merge" in kernels:  # the training forward's float64 merge of the statistics (no MMA)
        consts = dict(BLOCK_G=P.STATS_MERGE_ROWS, BLOCK_C=P.STATS_MERGE_CHANNELS)
        out.append(("merge", F._bn_batch_stats_kernel, torch.float32, consts, 4, 1))
    return out


def ci_subset(specs):
    """The specialisations the CI test compiles (a full sweep is ~200 per arch): every GEMM with the
    BN epilogue (each dtype and precision, both layouts), the widest fused tile with the BN epilogue
    likewise, and the worst register cases seen in the full sweep (16-bit NCHW with the 49-tap
    dilated conv: the fused gate kernel at its narrowest and widest tiles, the depthwise kernel), and
    lka's chain kernel at every window."""
    keep = []
    for spec in specs:
        name, _, dtype, c, warps, _ = spec
        if name in ("gemm", "stats") and c.get("EPI", F.EPI_BN) == F.EPI_BN:
            keep.append(spec)
        elif name == "fused" and c["EPI"] == F.EPI_BN and c["BLOCK_CO"] == 256 and c["BW"] == 32:
            keep.append(spec)
        elif (name == "fused" and c["EPI"] == F.EPI_GATE and not c["CL"] and dtype == torch.bfloat16
              and c["BW"] == 32 and c["BLOCK_CO"] in (16, 256)):
            keep.append(spec)
        elif name == "dw" and c["K"] == 7 and not c["CL"] and dtype == torch.bfloat16 and c["BW"] == 32:
            keep.append(spec)
        elif name == "dw" and c["ROUND_TF32"] and c["K"] == 7 and c["BW"] == 32:
            keep.append(spec)
        elif name in ("fold", "merge") and dtype == torch.float32:
            keep.append(spec)
        elif name == "chain" and (c["K0"], c["KS"]) == (5, 7) and (c["ROUND_TF32"] or dtype == torch.bfloat16):
            keep.append(spec)  # every window and layout at the largest taps: the forward, and with a1 stored
    return keep


def mma_work(sass, consts, num_warps):
    """MMA work of one K tile as a multiple of the tile's products: the SASS tensor-core instructions
    times their m*n*k (HGMMA is issued per warpgroup of 4 warps, HMMA per warp) over BM*BN*BK.
    1 for one MMA per product, 2 for a hi/lo split, 3 or more for tf32x3 (up to the unrolling)."""
    if "BLOCK_M" in consts:
        tile = consts["BLOCK_M"] * consts["BLOCK_N"] * consts["BLOCK_K"]
    elif "BH" in consts and "BLOCK_CO" in consts:
        tile = consts["BH"] * consts["BW"] * consts["BLOCK_CO"] * consts["BLOCK_CI"]
    else:
        return 0.0
    work = 0.0
    for m, n, k in re.findall(r"\bHGMMA\.(\d+)x(\d+)x(\d+)", sass):
        work += int(m) * int(n) * int(k) * (num_warps / 4)
    for shape in re.findall(r"\bHMMA\.(\d+)", sass):
        m, n, k = int(shape[:2]), int(shape[2]), int(shape[3:])
        work += m * n * k * num_warps
    return work / tile


def compile_one(fn, consts, dtype, arch, num_warps, num_stages):
    kernel = CW.compile_kernel(fn, consts, DTYPE_NAMES[dtype], arch, num_warps, num_stages, P.MAX_REGISTERS,
                               fp32_args=FP32_PTRS, divisible=DIVISIBLE, float_args={"eps"})
    sass = CW.cuobjdump(kernel, "-sass").stdout
    ptx = kernel.asm["ptx"]
    return dict(CW.resources(kernel),
                ptx_tc=sorted(set(m.group(0) for m in PTX_TC.finditer(ptx))),
                sass_tc=sorted(set(m.group(0) for m in SASS_TC.finditer(sass))),
                sass_tc_count=len(SASS_TC.findall(sass)), mma_work=mma_work(sass, consts, num_warps),
                # per-element TF32 conversions, and where the wgmma's A operand comes from
                tf32_cvt=ptx.count("cvt.rna.tf32.f32"),
                wgmma_a=sorted({"shared" if a.startswith("%rd") else "registers" for a in WGMMA_A.findall(ptx)})
                ), ptx, sass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("arch", type=int)
    ap.add_argument("kernels", nargs="*", default=["fused", "gemm", "dw", "fold", "merge", "chain"])
    ap.add_argument("--dump", default=None)
    ap.add_argument("--all", action="store_true", help="every shipped specialisation, not the CI subset")
    args = ap.parse_args()
    specs = specialisations(args.kernels)
    if not args.all:
        specs = ci_subset(specs)
    for i, (name, fn, dtype, consts, warps, stages) in enumerate(specs):
        # the chain kernel's persistent grid places several programs on an SM; the others one at least
        head = dict(kernel=name, arch=args.arch, dtype=DTYPE_NAMES[dtype], consts=consts, num_warps=warps,
                    num_stages=stages, programs_per_sm=P.CHAIN_PROGRAMS_PER_SM if name == "chain" else 1)
        try:
            res, ptx, sass = compile_one(fn, consts, dtype, args.arch, warps, stages)
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                stem = os.path.join(args.dump, f"{i:03d}_{name}_{head['dtype']}_sm{args.arch}")
                open(stem + ".ptx", "w").write(ptx)
                open(stem + ".sass", "w").write(sass)
        except Exception as exc:  # reported, and failed, by the test
            res = dict(ok=False, log=f"{type(exc).__name__}: {exc}"[-2000:])
        print(json.dumps(dict(head, **res)), flush=True)


if __name__ == "__main__":
    main()
