"""Compile dlkunet's Triton kernels for a GPU target and report the registers, spills and shared
memory of the cubins.

Run as a script (never under TRITON_INTERPRET: the kernels must be real JIT functions):
``python compile_worker.py KERNEL ARCH`` prints one JSON line per compiled specialisation: every
shipped block configuration x every constexpr combination the operators launch x every dtype.
test_compile.py drives it; it is also handy by hand when tuning block sizes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from dlkunet.kernels import _common as C  # noqa: E402

FP32_ARGS = {"mean_ptr", "var_ptr", "sg_ptr", "sgz_ptr", "part_ptr", "wpart_ptr", "bpart_ptr", "out2_ptr", "add_ptr"}
FLOAT_ARGS = frozenset({"eps"})
# Channel counts of the real shapes are multiples of 16; Triton specialises such ints at run time.
DIVISIBLE_INTS = {"CIN", "COUT", "C"}
DTYPES = ("fp32", "bf16", "fp16")

# The backward GEMM kernels multiply in a precision mode (PREC, kernels/_precision.py): float32 in
# TF32 or tf32x3 by the TF32 flag, 16-bit in its own dtype (PREC unused).
GEMM_KERNELS = ("dw_pw", "pw_bwd_data", "pw_bwd_weight")
SASS_TC = re.compile(r"\b(HGMMA|HMMA)\.[\w.]+")


def _precs(name, dtype):
    if name not in GEMM_KERNELS:
        return [None]
    return ["tf32", "tf32x3"] if dtype == "fp32" else ["ieee"]


KERNELS = {
    "dw_pw": (C._dw_pw_kernel, C.DW_PW_CONFIGS),
    "pw_bwd_data": (C._pw_bwd_data_kernel, C.PW_BWD_DATA_CONFIGS),
    "pw_bwd_weight": (C._pw_bwd_weight_kernel, C.PW_BWD_WEIGHT_CONFIGS + C.PW_BWD_WEIGHT_STORED_CONFIGS),
    "dw_bwd": (C._dw_bwd_kernel, C.DW_BWD_CONFIGS),
    "dw_fwd": (C._dw_fwd_kernel, C.DW_CONFIGS),
    "sum_groups": (C._sum_groups_kernel,
                   [triton.Config(dict(BLOCK_G=C.SUM_GROUP_STEP, BLOCK=C.SUM_BLOCK), num_warps=4)]),
}


# The kernel sizes of the paper's ablation (issue 3, item 4): depthwise k of dwconv_bn_act, and
# (k0, ks, dilation) of lka_gate.
DW_SIZES = (3, 5, 7)
LKA_SIZES = ((5, 7, 3), (3, 7, 3), (5, 5, 3))
LAYOUTS = (False, True)  # CL: NCHW, channels_last


def _kkp(k):
    return triton.next_power_of_2(max(k * k, 1))


def _specialisations(name):
    """Every constexpr combination the launchers in kernels/dwconv_bn_act.py and lka_gate.py pass."""
    if name == "dw_pw":
        dw = [dict(K=k, DIL=1, MODE=m, RELU=r) for k in DW_SIZES
              for m in (C.BN_BWD_STATS, C.BN_BWD_GZ, C.BN_BWD_GZ_CENTRED) for r in (True, False)]
        ks = sorted({(ks, d) for _, ks, d in LKA_SIZES})
        lka = [dict(K=k, DIL=d, MODE=C.GATE_BWD, RELU=False) for k, d in ks]
        base = dw + lka
    elif name in ("pw_bwd_data", "pw_bwd_weight"):
        kd = [(k, 1) for k in DW_SIZES] + sorted({(ks, d) for _, ks, d in LKA_SIZES})
        base = [dict(K=k, DIL=d, MODE=0) for k, d in kd]
        if name == "pw_bwd_data":
            base = [dict(b, KKP=_kkp(b["K"])) for b in base]
    elif name == "dw_bwd":
        # dwconv's input gradient; LKA's spatial conv with the first conv's weight gradient (K2 = k0);
        # LKA's first conv plus the gate's direct gradient (ADD).
        base = [dict(K=k, DIL=1, ADD=False, K2=0) for k in DW_SIZES]
        base += [dict(K=ks, DIL=d, ADD=False, K2=k0) for k0, ks, d in LKA_SIZES]
        base += [dict(K=k0, DIL=1, ADD=True, K2=0) for k0 in sorted({k0 for k0, _, _ in LKA_SIZES})]
        base = [dict(b, KK2P=_kkp(b["K2"])) for b in base]
    elif name == "dw_fwd":
        base = [dict(K=k0, DIL=1, K2=0, ADD=False) for k0 in sorted({k0 for k0, _, _ in LKA_SIZES})]
    elif name == "sum_groups":  # float32 partial rows only: one dtype's compile says it all
        return [dict(TRANSPOSE=t, SPLIT_LAST=sl) for t in (False, True) for sl in (False, True)]
    else:
        raise KeyError(name)
    if name in ("dw_pw", "pw_bwd_weight"):  # depthwise output recomputed, or read where written once
        base = [dict(b, D_STORED=stored) for b in base for stored in (False, True)]
    specs = [dict(b, CL=cl) for b in base for cl in LAYOUTS]
    if os.environ.get("DLKUNET_COMPILE_SUBSET") == "1":
        specs = [s for s in specs if _representative(name, s)]
    return specs


def _representative(name, spec):
    """The default (CI) subset: every epilogue, layout and dtype, at the largest kernel of each
    family (depthwise k = 7; LKA's dilated 7x7 after its 5x5), where register pressure peaks.
    The test sets DLKUNET_COMPILE_SUBSET=1 unless DLKUNET_FULL_COMPILE_CHECK=1."""
    k, dil = spec.get("K"), spec.get("DIL")
    if dil == 1 and spec.get("K2", 0) == 0 and not spec.get("ADD", False):
        return k == max(DW_SIZES) or name == "dw_fwd" and k == LKA_SIZES[0][0]
    if spec.get("ADD", False) or name == "dw_fwd":
        return k == LKA_SIZES[0][0]
    return (k, dil) == LKA_SIZES[0][1:] and spec.get("K2", 0) in (0, LKA_SIZES[0][0])


def compile_kernel(fn, consts, dtype, arch, num_warps, num_stages, maxnreg=None, fp32_args=FP32_ARGS,
                   divisible=DIVISIBLE_INTS, float_args=frozenset()):
    """Compile ``fn`` for sm_``arch`` as the runtime would: pointers in ``dtype`` (float32 for
    ``fp32_args``), ints (16-divisible for ``divisible``), float32 scalars for ``float_args``."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_args else "*" + dtype
            attrs[(i,)] = backend.parse_attr("D")
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in divisible:
                attrs[(i,)] = backend.parse_attr("D")
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=target, options=options)


def cuobjdump(kernel, flag: str) -> subprocess.CompletedProcess:
    """Triton's own cuobjdump on the kernel's cubin (``-res-usage``, ``-sass``)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, cubin], capture_output=True, text=True)


def resources(kernel) -> dict:
    """Registers, spilled bytes and shared memory of Triton's own cubin: ptxas's flags (e.g.
    --regAllocOptLevel) change its register choice, so a separate ptxas run can disagree."""
    run = cuobjdump(kernel, "-res-usage")
    log = run.stdout + run.stderr
    usage = re.search(r"REG:(\d+) STACK:(\d+)", log)
    # Triton kernels have no local arrays or calls: a stack frame holds spilled registers.
    return dict(ok=run.returncode == 0 and usage is not None, log=log[-2000:],
                regs=int(usage.group(1)) if usage else None, spill_bytes=int(usage.group(2)) if usage else None,
                shared=kernel.metadata.shared)


def tensor_core_instructions(kernel) -> int:
    """How many tensor-core instructions (HMMA on sm_80, HGMMA or HMMA on sm_90) the SASS holds."""
    return len(SASS_TC.findall(cuobjdump(kernel, "-sass").stdout))


def compile_one(fn, consts, dtype, arch, num_warps, num_stages, maxnreg=None):
    kernel = compile_kernel(fn, consts, dtype, arch, num_warps, num_stages, maxnreg, float_args=FLOAT_ARGS)
    return dict(resources(kernel), sass_tc=tensor_core_instructions(kernel))


def main(name, arch):
    kernel, configs = KERNELS[name]
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the JIT function under an autotuner
    for cfg in configs:
        for spec in _specialisations(name):
            if not C.config_applies(cfg, spec.get("D_STORED", False)):
                continue
            for dtype in DTYPES if name != "sum_groups" else ("fp32",):
                for prec in _precs(name, dtype):
                    consts = dict(spec, **cfg.kwargs)
                    if prec is not None:
                        consts["PREC"] = prec
                    try:
                        res = compile_one(fn, consts, dtype, arch, cfg.num_warps, cfg.num_stages, cfg.maxnreg)
                    except Exception as exc:  # reported, and failed, by the test
                        res = dict(ok=False, log=f"{type(exc).__name__}: {exc}"[-2000:], regs=None,
                                   spill_bytes=None, shared=None, sass_tc=None)
                    res.update(kernel=name, arch=arch, dtype=dtype, consts=consts, num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
                    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
