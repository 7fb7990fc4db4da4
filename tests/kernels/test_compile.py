"""Every Triton kernel, at every shipped block configuration, compiles ahead of time for sm_80 and
sm_90 (no GPU needed) without register spills and within the chip's shared memory.

The interpreter cannot see these failures, and a spilling configuration is slow rather than wrong,
so nothing else would catch it.  The compiles run in a subprocess (compile_worker.py) because under
TRITON_INTERPRET=1, which the test session sets when there is no GPU, kernels are not compilable
JIT functions.  "main" compiles each configuration at its heaviest specialisations (most taps,
richest epilogue) in float32 and bfloat16; "slow" sweeps the other kernel sizes, epilogues and
layouts in float16.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_worker.py")
KERNELS = ["dw_pw", "pw_bwd_data", "pw_bwd_weight", "dw_bwd", "dw_fwd"]
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # dynamic shared memory per block: A100, H100/H200


def _compile(kernel, arch, tier):
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, WORKER, kernel, str(arch), tier], capture_output=True, text=True,
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
            bad.append(f"{what}: {r['spill_bytes']} bytes of register spills ({r['regs']} registers)")
        elif r["shared"] > SHARED_LIMIT[arch]:
            bad.append(f"{what}: {r['shared']} bytes of shared memory > {SHARED_LIMIT[arch]}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_without_spills(kernel, arch):
    _check(_compile(kernel, arch, "main"), arch)


# Known defect, kept visible: on sm_80, dw_bwd in float16 + channels_last for LKA (5, 5, d3) spills
# 20 bytes at 96 registers (sm_90 stopped spilling when the weight-gradient rows were unrolled).
# strict: the mark fails the run once the spill is gone, so it cannot outlive the fix.
KNOWN_SPILL = pytest.mark.xfail(strict=True, reason="dw_bwd fp16 channels_last LKA(5,5,d3) spills on sm_80")
SLOW_CASES = [pytest.param(k, a, id=f"{k}-sm{a}", marks=KNOWN_SPILL if (k, a) == ("dw_bwd", 80) else ())
              for k in KERNELS for a in (80, 90)]


@pytest.mark.slow
@pytest.mark.parametrize("kernel,arch", SLOW_CASES)
def test_other_specialisations_compile_without_spills(kernel, arch):
    _check(_compile(kernel, arch, "slow"), arch)
