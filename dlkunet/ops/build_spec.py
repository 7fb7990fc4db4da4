"""What the compiled extension ``dlkunet._C`` is built from: sources, flags, macros.

One list, read by ``setup.py`` (the build at install time) and by ``dlkunet.ops.jit_build`` (the
build at first use), so that the two can never drift.  Standard library only: setup.py loads
this file by its path, before dlkunet (or even torch) may be importable.

Paths are relative to the C++/CUDA source folder: ``csrc/`` in a source checkout, shipped in the
wheel as the package data ``dlkunet/_csrc/``.
"""
from __future__ import annotations

import glob
import os
import sys
from typing import List, Tuple

CPU_SOURCES = ("*.cpp", "cpu/*.cpp")
CUDA_SOURCES = ("cuda/*.cpp", "cuda/*.cu")
# Every file a build reads (compiled or included): what the JIT cache key hashes and the wheel ships.
SOURCE_SUFFIXES = (".cpp", ".h", ".hpp", ".cu", ".cuh")
CUDA_MACROS: List[Tuple[str, None]] = [("DLKUNET_WITH_CUDA", None)]
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
# setup.py's GPU architectures when TORCH_CUDA_ARCH_LIST is unset (the JIT build uses the visible GPUs).
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0"


def sources(csrc: str, with_cuda: bool, relative_to: str = "") -> List[str]:
    """The translation units to compile, sorted; relative to ``relative_to`` when given."""
    patterns = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    found = sorted(p for pattern in patterns for p in glob.glob(os.path.join(csrc, pattern)))
    return [os.path.relpath(p, relative_to) for p in found] if relative_to else [os.path.abspath(p) for p in found]


def all_files(csrc: str) -> List[str]:
    """Every source and header under ``csrc``, as sorted paths relative to it."""
    found = []
    for folder, _, names in os.walk(csrc):
        found += [os.path.relpath(os.path.join(folder, n), csrc) for n in names if n.endswith(SOURCE_SUFFIXES)]
    return sorted(p.replace(os.sep, "/") for p in found)


def build_inputs(csrc: str, with_cuda: bool) -> List[str]:
    """The files a build reads: those of ``all_files`` beside the CPU sources (and the CUDA ones
    with ``with_cuda``); what a first-use build's cache key hashes."""
    folders = {os.path.dirname(p) for p in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())}
    return [p for p in all_files(csrc) if os.path.dirname(p) in folders]


def cxx_flags(torch_has_openmp: bool) -> List[str]:
    """Flags for the C++ compiler, given ``torch._C.has_openmp`` of the torch built against."""
    flags = ["-O3", "-std=c++17"]
    # at::parallel_for is a header template: compiled without -fopenmp it runs serially inside this
    # extension even though torch itself is threaded.  Compile flag only: the GOMP_* calls stay
    # undefined here and bind, through libtorch_cpu's dependencies, to the OpenMP runtime torch
    # loaded (wheels may ship it renamed); linking -lgomp could load a second runtime.
    if torch_has_openmp and sys.platform.startswith("linux"):
        flags.append("-fopenmp")
    return flags


def macro_flags(macros: List[Tuple[str, None]]) -> List[str]:
    """``define_macros`` (setup.py's form) as -D flags (what torch.utils.cpp_extension.load takes)."""
    return [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in macros]
