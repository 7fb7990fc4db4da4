"""Every Triton kernel, at every shipped block configuration, compiles ahead of time for sm_80 and
sm_90 (no GPU needed) without register spills and within the chip's shared memory, and the GEMM
kernels' SASS holds tensor-core instructions in every dtype and precision mode.

The interpreter cannot see these failures, and a spilling configuration is slow rather than wrong,
so nothing else would catch it.  The compiles run in a subprocess (compile_worker.py) because under
TRITON_INTERPRET=1, which the test session sets when there is no GPU, kernels are not compilable
JIT functions.  Each kernel compiles at every shipped configuration, for every constexpr combination
the operators launch (kernel sizes, epilogues, layouts) and every dtype, and is judged by the cubin
Triton itself builds: ptxas's register choice depends on the flags Triton passes it.

By default (CI) each kernel compiles at every shipped configuration, epilogue, layout and dtype but
only at the largest kernel size of each family, where register pressure peaks (102 of 270
specialisations per architecture); ``DLKUNET_FULL_COMPILE_CHECK=1`` compiles every kernel size too:
run it after changing a kernel or its configurations.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_worker.py")
KERNELS = ["dw_pw", "pw_bwd_data", "pw_bwd_weight", "dw_bwd", "dw_fwd", "sum_groups"]
GEMM_KERNELS = ("dw_pw", "pw_bwd_data", "pw_bwd_weight")  # every dtype and precision on tensor cores
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # dynamic shared memory per block: A100, H100/H200
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM (sm_80, sm_90): a larger program cannot launch


FULL = os.environ.get("DLKUNET_FULL_COMPILE_CHECK", "0") not in ("", "0")


def _compile(kernel, arch):
    env = dict(os.environ, TRITON_INTERPRET="0", DLKUNET_COMPILE_SUBSET="0" if FULL else "1")
    run = subprocess.run([sys.executable, WORKER, kernel, str(arch)], capture_output=True, text=True,
                         env=env, timeout=1200)
    assert run.returncode == 0, f"compile worker failed:\n{run.stderr[-3000:]}"
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert results, f"compile worker compiled nothing:\n{run.stderr[-3000:]}"
    return results


def _check(results, arch):
    bad = []
    for r in results:
        what = f"{r['kernel']} {r['dtype']} warps={r['num_warps']} {r['consts']}"
        if not r["ok"]:
            bad.append(f"{what}: compile/ptxas failed: {r['log']}")
        elif r["spill_bytes"]:
            bad.append(f"{what}: {r['spill_bytes']} bytes of spilled registers on the stack ({r['regs']} registers)")
        elif r["shared"] > SHARED_LIMIT[arch]:
            bad.append(f"{what}: {r['shared']} bytes of shared memory > {SHARED_LIMIT[arch]}")
        elif r["regs"] * r["num_warps"] * 32 > REGISTER_FILE:
            bad.append(f"{what}: {r['regs']} registers x {r['num_warps']} warps exceed the register file")
        elif r["kernel"] in GEMM_KERNELS and not r["sass_tc"]:
            bad.append(f"{what}: no tensor-core instruction (HMMA/HGMMA) in the SASS")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_without_spills(kernel, arch):
    _check(_compile(kernel, arch), arch)
