"""Every CUDA source compiles with nvcc alone for sm_80 and sm_90, without register spills, and
its tensor-core GEMM kernels really run on tensor cores (HMMA of their precision in the SASS).

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


def _cuobjdump():
    """cuobjdump from PATH or the CUDA toolkit, else the copy Triton ships (same tool)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "bin" / "cuobjdump").is_file():
            return str(Path(home) / "bin" / "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


NVCC = _nvcc()
CUOBJDUMP = _cuobjdump()
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
    obj = os.path.join(out_dir, f"{source}.{arch}.o")
    cmd = [NVCC, *FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", str(CUDA_DIR / source), "-o", obj]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=CUDA_DIR)
    sass = ""
    if proc.returncode == 0 and CUOBJDUMP:
        sass = subprocess.run([CUOBJDUMP, "-sass", obj], capture_output=True, text=True).stdout
    return proc.returncode, proc.stdout + proc.stderr, sass


_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)


def sass_functions(sass: str):
    """{mangled kernel name: its SASS} from cuobjdump -sass output."""
    marks = list(_FUNCTION.finditer(sass))
    return {m.group(1): sass[m.end():marks[i + 1].start() if i + 1 < len(marks) else len(sass)]
            for i, m in enumerate(marks)}


# common.cuh's Mma enum as it appears in a mangled template argument (Mma::TF32 = 1, ...), and the
# SASS MMA each must contain: TF32 m16n8k4, float16 and bfloat16 m16n8k16, float32 accumulators.
_MMA_ARG = re.compile(r"3MmaELi?(\d)E|3MmaE(\d)E")
MMA_SASS = {1: "HMMA.1684.F32.TF32", 2: "HMMA.16816.F32", 3: "HMMA.16816.F32.BF16"}


def mma_mode_of(name: str):
    m = _MMA_ARG.search(name)
    return int(m.group(1) or m.group(2)) if m else None


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
    rc, log, _ = compiled[(source, arch)]
    assert rc == 0, f"nvcc failed on {source} for sm_{arch}:\n{log[-6000:]}"
    kernels = parse_ptxas(log)
    assert kernels, f"no kernels reported by ptxas for {source} (sm_{arch}); is -Xptxas -v honoured?\n{log[-2000:]}"
    spilling = {k: v for k, v in kernels.items() if v[1] or v[2]}
    assert not spilling, "register spills (kernel: registers, store bytes, load bytes):\n" + "\n".join(
        f"  {k}: {v}" for k, v in spilling.items())
    missing = [k for k, v in kernels.items() if v[0] is None]
    assert not missing, f"ptxas gave no register count for {missing}"


def test_mma_mode_is_read_from_mangled_names():
    assert mma_mode_of("_ZN7dlkunet4cuda19mma_pix_gemm_kernelILNS1_3MmaE1ENS1_9LoadPlaneE") == 1
    assert mma_mode_of("_ZN7dlkunet4cuda21mma_wgrad_gemm_kernelILNS1_3MmaE3ENS1_8LoadProd") == 3
    assert mma_mode_of("_ZN7dlkunet4cuda15pix_gemm_kernelINS1_9LoadPlaneE") is None


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found (PATH, CUDA_HOME, or Triton's copy)")
@pytest.mark.parametrize("source,arch", PAIRS, ids=[f"{s}-sm{a}" for s, a in PAIRS])
def test_gemms_run_on_tensor_cores(compiled, source, arch):
    """Each MMA kernel holds its precision's HMMA (and no other); the fp32 GEMMs hold none, so
    float32 with TF32 off stays exact."""
    rc, log, sass = compiled[(source, arch)]
    assert rc == 0, log[-2000:]
    functions = sass_functions(sass)
    assert functions, f"cuobjdump listed no kernels for {source} (sm_{arch})"
    modes_seen, wrong = set(), []
    for name, body in functions.items():
        hmma = set(re.findall(r"HMMA\.[0-9A-Z.]+", body))
        mode = mma_mode_of(name) if "gemm_kernel" in name else None
        if mode is None:
            if hmma:
                wrong.append(f"{name}: {sorted(hmma)} in a kernel that must not use tensor cores")
            continue
        modes_seen.add(mode)
        if hmma != {MMA_SASS[mode]}:
            wrong.append(f"{name}: {sorted(hmma) or 'no HMMA'}, expected {MMA_SASS[mode]}")
    assert not wrong, "\n".join(wrong)
    assert modes_seen == set(MMA_SASS), f"{source}: MMA kernels of modes {sorted(modes_seen)} only"
