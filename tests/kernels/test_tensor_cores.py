"""The planned forward kernels (kernels/_fast.py) compile for sm_90 and sm_80 without a GPU, run their
GEMMs on tensor cores in every dtype and precision mode, and do not spill.

Judged by the PTX and the SASS of the cubins Triton itself builds (tensor_core_worker.py, in a
subprocess: under TRITON_INTERPRET=1 the kernels are not compilable JIT functions):

- sm_90: ``wgmma.mma_async`` in the PTX and ``HGMMA`` in the SASS; sm_80: ``mma.sync`` / ``HMMA``;
- with the operand type of the mode: ``tf32`` for float32 (TF32 and the full-precision tf32x3),
  ``bf16`` / ``f16`` for the half types (one MMA in the input dtype, float32 accumulators);
- the MMA work per K tile: one MMA per product for TF32 and 16-bit (no hi/lo split), >= 3 for tf32x3;
- no bytes of spilled registers, shared memory within the chip's limit.

CI compiles the worker's subset (every GEMM, the widest fused tile, and the worst register cases of
the full sweep); ``python tests/kernels/tensor_core_worker.py ARCH --all`` sweeps every shipped
specialisation by hand.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# Kernels without a GEMM (checked for spills and shared memory only).
NO_GEMM = ("dw", "fold", "merge", "chain")
# The GEMM kernels and their precision modes.
GEMMS = ("fused", "gemm", "stats")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tensor_core_worker.py")
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# 32-bit registers per SM (sm_80 and sm_90): a program needing more than this cannot launch.
REGISTER_FILE = 64 * 1024
PTX_OP = {90: "wgmma.mma_async", 80: "mma.sync"}
SASS_OP = {90: "HGMMA", 80: "HMMA"}
PTX_TYPE = {"fp32": ".tf32", "bf16": ".bf16", "fp16": ".f16"}


@pytest.fixture(scope="module", params=[90, 80], ids=["sm90", "sm80"])
def compiled(request):
    arch = request.param
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, WORKER, str(arch)], capture_output=True, text=True, env=env,
                         timeout=1200)
    assert run.returncode == 0, f"tensor-core worker failed:\n{run.stderr[-3000:]}"
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert results, f"the worker compiled nothing:\n{run.stderr[-3000:]}"
    return arch, results


def _what(r):
    return f"{r['kernel']} {r['dtype']} warps={r['num_warps']} {r['consts']}"


@pytest.mark.slow
def test_no_spills_and_shared_memory_within_limits(compiled):
    arch, results = compiled
    bad = []
    for r in results:
        if not r["ok"]:
            bad.append(f"{_what(r)}: compile failed: {r.get('log')}")
        elif r["spill_bytes"]:
            bad.append(f"{_what(r)}: {r['spill_bytes']} bytes spilled ({r['regs']} registers)")
        elif r["shared"] * r["programs_per_sm"] > SHARED_LIMIT[arch]:
            bad.append(f"{_what(r)}: {r['shared']} bytes of shared memory x {r['programs_per_sm']} programs per SM")
        elif r["regs"] * r["num_warps"] * 32 * r["programs_per_sm"] > REGISTER_FILE:  # (a guard for the chain
            # kernel: at maxnreg 255 its 4 warps x 2 programs fit; more warps or programs would not)
            bad.append(f"{_what(r)}: {r['regs']} registers x {r['num_warps']} warps x {r['programs_per_sm']}"
                       " programs per SM cannot launch")
    assert not bad, "\n".join(bad)
    assert {r["kernel"] for r in results} == set(GEMMS + NO_GEMM)


@pytest.mark.slow
def test_gemms_run_on_tensor_cores_in_every_dtype_and_mode(compiled):
    arch, results = compiled
    seen = set()
    for r in results:
        if r["kernel"] in NO_GEMM or not r["ok"]:
            continue  # the depthwise and BN-folding kernels have no GEMM; failures are the other test's
        mode = r["consts"]["PREC"] if r["dtype"] == "fp32" else r["dtype"]
        seen.add((r["kernel"], mode))
        ptx_ok = [i for i in r["ptx_tc"] if i.startswith(PTX_OP[arch]) and PTX_TYPE[r["dtype"]] in i]
        assert ptx_ok, f"{_what(r)}: no {PTX_OP[arch]} {PTX_TYPE[r['dtype']]} in the PTX: {r['ptx_tc']}"
        assert r["ptx_tc"] == ptx_ok, f"{_what(r)}: other MMA types too: {r['ptx_tc']}"
        assert any(i.startswith(SASS_OP[arch]) for i in r["sass_tc"]), f"{_what(r)}: SASS {r['sass_tc']}"
    assert seen == ({(k, m) for k in GEMMS for m in ("tf32", "tf32x3", "bf16", "fp16")}
                    | {("gemm", "tf32_rounded"), ("stats", "tf32_rounded")}), seen

    # MMA work per K tile, in multiples of the tile's products (tensor_core_worker.mma_work): one
    # MMA per product for TF32 and for 16-bit (the old kernels ran two for 16-bit: hi + lo), at least
    # three for tf32x3.
    def work(r):
        return round(r["mma_work"], 3)

    by_mode = {}
    for r in results:
        if r["kernel"] not in NO_GEMM and r["ok"]:
            mode = r["consts"]["PREC"] if r["dtype"] == "fp32" else r["dtype"]
            by_mode.setdefault((r["kernel"], mode), set()).add(work(r))
    for kernel in GEMMS:
        one = by_mode[(kernel, "tf32")]
        assert len(one) == 1 and one == by_mode[(kernel, "bf16")] == by_mode[(kernel, "fp16")], (kernel, by_mode)
        assert min(by_mode[(kernel, "tf32x3")]) >= 3 * max(one), (kernel, by_mode)
    for kernel in ("gemm", "stats"):
        assert by_mode[(kernel, "tf32_rounded")] == by_mode[(kernel, "tf32")], by_mode


@pytest.mark.slow
def test_gemm_operands_reach_the_tensor_cores_untouched(compiled):
    """The split plan's GEMMs under TF32 read operands its depthwise kernel stored rounded: no
    per-element conversion in it, and on sm_90 the wgmma takes both tiles from shared memory as the
    pipelined loads left them (A as a descriptor, like the 16-bit GEMMs).  Rounding in the kernel
    (the ``tf32`` mode) moves A through registers: the H200 measured that GEMM at 2.0-2.5x cuBLAS's
    time, the 16-bit one (operands untouched) at 1.6x."""
    arch, results = compiled
    gemms = [r for r in results if r["kernel"] in ("gemm", "stats") and r["ok"]]
    untouched = [r for r in gemms if r["dtype"] != "fp32" or r["consts"]["PREC"] == "tf32_rounded"]
    assert {r["dtype"] for r in untouched} == {"fp32", "bf16", "fp16"}
    for r in untouched:
        assert r["tf32_cvt"] == 0, f"{_what(r)}: {r['tf32_cvt']} TF32 conversions"
        if arch == 90:
            assert r["wgmma_a"] == ["shared"], f"{_what(r)}: wgmma A from {r['wgmma_a']}"
    for r in gemms:  # the in-kernel rounding is what the test above can see missing
        if r["dtype"] == "fp32" and r["consts"]["PREC"] == "tf32":
            assert r["tf32_cvt"] > 0, _what(r)
    rounding_dw = [r for r in results if r["kernel"] == "dw" and r["consts"]["ROUND_TF32"]]
    assert rounding_dw and all(r["ok"] and r["tf32_cvt"] > 0 for r in rounding_dw), rounding_dw
