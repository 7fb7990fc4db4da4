"""Compile dlkunet's Triton kernels for a GPU target and report ptxas's resource usage.

Run as a script (never under TRITON_INTERPRET: the kernels must be real JIT functions):
``python compile_worker.py KERNEL ARCH TIER`` prints one JSON line per compiled specialisation.
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
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from dlkunet.kernels import _common as C  # noqa: E402

FP32_ARGS = {"prm_ptr", "part_ptr", "wpart_ptr", "bpart_ptr", "out2_ptr", "add_ptr"}
# Channel counts of the real shapes are multiples of 16; Triton specialises such ints at run time.
DIVISIBLE_INTS = {"CIN", "COUT", "C"}
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}

KERNELS = {
    "dw_pw": (C._dw_pw_kernel, C.DW_PW_CONFIGS),
    "pw_bwd_data": (C._pw_bwd_data_kernel, C.PW_BWD_DATA_CONFIGS),
    "pw_bwd_weight": (C._pw_bwd_weight_kernel, C.PW_BWD_WEIGHT_CONFIGS),
    "dw_bwd": (C._dw_bwd_kernel, C.DW_BWD_CONFIGS),
    "dw_fwd": (C._dw_fwd_kernel, C.DW_CONFIGS),
}


def _dw_pw(k, dil, mode, relu=True, cl=False):
    return dict(K=k, DIL=dil, MODE=mode, RELU=relu, CL=cl)


def _pw_bwd(k, dil, cl=False):
    return dict(K=k, DIL=dil, MODE=0, CL=cl, KKP=triton.next_power_of_2(k * k))


def _dw_bwd(k, dil, add, k2, cl=False):
    return dict(K=k, DIL=dil, ADD=add, K2=k2, KK2P=triton.next_power_of_2(max(k2 * k2, 1)), CL=cl)


# Specialisations the operators launch.  "main": the heaviest ones (most taps, richest epilogue);
# "slow": every other kernel size, epilogue and layout.
SPECS = {
    "dw_pw": {
        "main": [_dw_pw(7, 1, C.BN_BWD_GZ), _dw_pw(7, 3, C.GATE_BWD), _dw_pw(7, 1, C.STATS)],
        "slow": [_dw_pw(k, 1, m, r, cl) for k in (3, 5) for m in (C.AFFINE, C.BN_BWD_STATS, C.BN_BWD_GZ)
                 for r, cl in ((True, False), (False, True))]
                + [_dw_pw(7, 1, C.AFFINE, False, True), _dw_pw(5, 3, C.GATE, cl=True), _dw_pw(7, 3, C.GATE),
                   _dw_pw(5, 3, C.GATE_BWD, cl=True)],
    },
    "pw_bwd_data": {
        "main": [_pw_bwd(7, 3)],
        "slow": [_pw_bwd(3, 1), _pw_bwd(5, 1, True), _pw_bwd(7, 1), _pw_bwd(5, 3, True)],
    },
    "pw_bwd_weight": {
        "main": [_pw_bwd(7, 3)],
        "slow": [dict(K=k, DIL=d, MODE=0, CL=cl) for k, d, cl in ((3, 1, True), (5, 1, False), (5, 3, True))],
    },
    "dw_bwd": {
        "main": [_dw_bwd(7, 3, False, 5), _dw_bwd(5, 1, True, 0)],
        "slow": [_dw_bwd(3, 1, False, 0, True), _dw_bwd(7, 1, False, 0), _dw_bwd(5, 3, False, 5, True),
                 _dw_bwd(7, 3, False, 3), _dw_bwd(3, 1, True, 0, True)],
    },
    "dw_fwd": {
        "main": [dict(K=5, DIL=1, K2=0, ADD=False, CL=False)],
        "slow": [dict(K=k, DIL=1, K2=0, ADD=False, CL=True) for k in (3, 5)],
    },
}


def compile_one(fn, consts, dtype, arch, num_warps, num_stages):
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32_ARGS else "*" + dtype
            attrs[(i,)] = backend.parse_attr("D")
        else:
            signature[name] = "i32"
            if name in DIVISIBLE_INTS:
                attrs[(i,)] = backend.parse_attr("D")
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    sm = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        run = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", sm, ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    log = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return dict(ok=run.returncode == 0 and regs is not None, log=log[-2000:],
                regs=int(regs.group(1)) if regs else None, spill_bytes=sum(spills) if spills else None,
                shared=kernel.metadata.shared)


def main(name, arch, tier):
    fn_auto, configs = KERNELS[name]
    fn = fn_auto.fn
    specs = SPECS[name][tier]
    dtypes = ["fp32", "bf16"] if tier == "main" else ["fp16"]
    for cfg in configs:
        for spec in specs:
            if name == "pw_bwd_weight":
                spec = {k: v for k, v in spec.items() if k != "KKP"}
            for dtype in dtypes:
                consts = dict(spec, **cfg.kwargs)
                try:
                    res = compile_one(fn, consts, dtype, arch, cfg.num_warps, cfg.num_stages)
                except Exception as exc:  # reported, and failed, by the test
                    res = dict(ok=False, log=f"{type(exc).__name__}: {exc}"[-2000:], regs=None, spill_bytes=None,
                               shared=None)
                res.update(kernel=name, arch=arch, dtype=dtype, consts=consts, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)
                print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
