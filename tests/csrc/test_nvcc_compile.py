"""Every CUDA source compiles with nvcc alone for sm_80 and sm_90, without register spills.

The .cu files include only CUDA headers (see csrc/cuda/launch.h), so this needs nvcc but no GPU
and no CUDA build of torch.  ptxas -v reports, per kernel, the registers used and the bytes
spilled; a spill (or a compile error) fails the test.  All compiles run in parallel once per
session; the tests then read their own file's and architecture's result.

By default (CI) each source compiles for one of the two architectures, alternating, so that every
source and both architectures are compiled at half the cost; ``DLKUNET_FULL_COMPILE_CHECK=1``
compiles every source for both: run it after changing a kernel.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90")
FULL = os.environ.get("DLKUNET_FULL_COMPILE_CHECK", "0") not in ("", "0")
# (source, arch) pairs: all of them, or each source for one architecture, alternating.
PAIRS = [(s, a) for s in SOURCES for a in ARCHS] if FULL else [(s, ARCHS[i % 2]) for i, s in enumerate(SOURCES)]
# The flags setup.py gives nvcc for the extension.
FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-Xptxas", "-v"]


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str):
    """{kernel: (registers, spill_store_bytes, spill_load_bytes)} from nvcc -Xptxas -v output."""
    kernels, current = {}, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            kernels[current] = [None, 0, 0]
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            kernels[current][1] += int(m.group(2))
            kernels[current][2] += int(m.group(3))
        m = _REGS.search(line)
        if m:
            kernels[current][0] = int(m.group(1))
    return {k: tuple(v) for k, v in kernels.items()}


def test_parse_ptxas_sees_spills():
    sample = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    24 bytes stack frame, 32 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 80 registers, used 1 barriers\n")
    assert parse_ptxas(sample) == {"_Z1kv": (80, 32, 16)}


def _compile(source: str, arch: str, out_dir: str):
    cmd = [NVCC, *FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", str(CUDA_DIR / source),
           "-o", os.path.join(out_dir, f"{source}.{arch}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=CUDA_DIR)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compiled():
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        jobs = {(s, a): pool.submit(_compile, s, a, out_dir) for s, a in PAIRS}
        return {key: job.result() for key, job in jobs.items()}


def test_sources_exist():
    expected = {"dwconv_bn_act_fwd.cu", "dwconv_bn_act_bwd.cu", "lka_gate_fwd.cu", "lka_gate_bwd.cu"}
    assert expected <= set(SOURCES)


def test_the_default_subset_covers_every_source_and_both_architectures():
    assert {s for s, _ in PAIRS} == set(SOURCES) and {a for _, a in PAIRS} == set(ARCHS)


@pytest.mark.parametrize("source,arch", PAIRS, ids=[f"{s}-sm{a}" for s, a in PAIRS])
def test_compiles_without_spills(compiled, source, arch):
    rc, log = compiled[(source, arch)]
    assert rc == 0, f"nvcc failed on {source} for sm_{arch}:\n{log[-6000:]}"
    kernels = parse_ptxas(log)
    assert kernels, f"no kernels reported by ptxas for {source} (sm_{arch}); is -Xptxas -v honoured?\n{log[-2000:]}"
    spilling = {k: v for k, v in kernels.items() if v[1] or v[2]}
    assert not spilling, "register spills (kernel: registers, store bytes, load bytes):\n" + "\n".join(
        f"  {k}: {v}" for k, v in spilling.items())
    missing = [k for k, v in kernels.items() if v[0] is None]
    assert not missing, f"ptxas gave no register count for {missing}"
