"""The compiled extension built at first use (DeepSpeed-style) and cached.

When the installed package has no usable ``dlkunet._C`` (an isolated ``pip install .``, which
cannot see torch; a failed install-time build; or one built against another torch), the first use
of a compiled backend compiles the C++/CUDA sources the wheel ships (``dlkunet/_csrc``; ``csrc/``
in a source checkout) with ``torch.utils.cpp_extension.load`` and ninja, against the running
torch, with the sources and flags of ``dlkunet.ops.build_spec`` (those setup.py uses).

The result goes to a cache folder whose name is a key over everything that makes two builds
differ: torch and CUDA versions, the Python ABI, the compiler (path and version), nvcc, the GPU
architecture list, the flags and a hash of every source and header.  Later processes load it from
there without compiling.  Processes that start together (torchrun ranks, DataLoader workers)
compile once: a file lock per key makes the others wait, then load the result.  A failed compile
is written to ``failed.log`` in that folder and reported once per process; it is not retried
until ``dlkunet build`` (or removing the file) asks for it.

Environment:
  DLKUNET_JIT=0            never compile at run time (``dlkunet build`` still does)
  DLKUNET_EXTENSIONS_DIR   the cache root (default: torch's extensions folder, TORCH_EXTENSIONS_DIR
                           or ~/.cache/torch_extensions, then ``dlkunet/``)
  DLKUNET_BUILD_CUDA=0     build the CPU kernels only (as for setup.py)
  TORCH_CUDA_ARCH_LIST     GPU architectures (default: those of the visible GPUs)
  MAX_JOBS, CXX            parallel compile jobs and the C++ compiler, as for torch.utils.cpp_extension
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from . import build_spec

NAME = "dlkunet_C"
COMPLETE = "build.json"  # written last: its presence means the library beside it is whole
FAILED = "failed.log"
LOCK = "build.lock"
TAIL_LINES = 20
# Measured: the CPU kernels took 176 CPU-seconds to compile (g++ 12, -O3, 2-core EPYC, torch 2.13).
CPU_COMPILE_SECONDS = 180
PROGRESS_AFTER_S = 5   # on a terminal
PROGRESS_EVERY_S = 30  # in a log

logger = logging.getLogger(__name__)
_NINJA_STEP = re.compile(r"^(Error building extension '\w+': )?\[\d+/\d+\] ")


class BuildError(RuntimeError):
    """The first-use build failed; ``str()`` is one line, ``tail`` the compiler's last lines."""

    def __init__(self, message: str, tail: str = "", log: Optional[Path] = None):
        super().__init__(message)
        self.tail, self.log = tail, log


def jit_disabled_reason() -> str:
    """Empty when compiling at run time is allowed, else why not (DLKUNET_JIT=0)."""
    value = os.environ.get("DLKUNET_JIT", "1").strip().lower()
    return "DLKUNET_JIT=0 disables compiling at run time" if value in ("0", "false", "no", "off") else ""


def source_dir() -> Optional[Path]:
    """The C++/CUDA sources: ``dlkunet/_csrc`` in a wheel, ``csrc/`` beside the package in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / "extension.cpp").is_file():
            return candidate
    return None


def cache_root() -> Path:
    override = os.environ.get("DLKUNET_EXTENSIONS_DIR")
    if override:
        return Path(override).expanduser()
    from torch.utils.cpp_extension import get_default_build_root
    return Path(get_default_build_root()) / "dlkunet"


def _tool_version(program: str) -> str:
    """``program``'s resolved path and first line of ``--version`` (how the cache key names a compiler)."""
    path = shutil.which(program)
    if path is None:
        return f"{program} (not found)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        first = (out.stdout or out.stderr).strip().splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        first = [f"--version failed: {exc}"]
    return f"{os.path.realpath(path)} {first[0] if first else ''}".strip()


def sources_hash(csrc: Path, with_cuda: bool) -> str:
    digest = hashlib.sha256()
    for rel in build_spec.build_inputs(str(csrc), with_cuda):
        digest.update(rel.encode() + b"\0" + (csrc / rel).read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass
class Plan:
    """What a first-use build would compile, with which flags, and where it goes."""

    csrc: Path
    with_cuda: bool
    why_no_cuda: str
    sources: List[str]
    cflags: List[str]
    cuda_cflags: List[str]
    arch_list: str
    inputs: Dict[str, object] = field(default_factory=dict)
    key: str = ""
    directory: Path = Path()

    @property
    def what(self) -> str:
        return "the C++ CPU and CUDA kernels" if self.with_cuda else "the C++ CPU kernels"


def _cuda_plan(torch) -> Tuple[bool, str, str]:
    """(with_cuda, why not, architecture list), decided as setup.py decides it."""
    from torch.utils import cpp_extension

    switch = os.environ.get("DLKUNET_BUILD_CUDA", "auto").strip().lower()
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if switch == "0":
        return False, "DLKUNET_BUILD_CUDA=0", ""
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build", ""
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found", ""
    if not arch_list:
        if not torch.cuda.is_available():
            return False, "no GPU is visible and TORCH_CUDA_ARCH_LIST is unset", ""
        arch_list = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                     for i in range(torch.cuda.device_count())}))
    return True, "", arch_list


def make_plan(csrc: Optional[Path] = None) -> Plan:
    """The build for this machine and torch, and its cache key; raises BuildError without sources."""
    import torch

    csrc = Path(csrc) if csrc is not None else source_dir()
    if csrc is None:
        raise BuildError("the C++ sources are not installed (neither dlkunet/_csrc nor csrc/ was found)")
    with_cuda, why_no_cuda, arch_list = _cuda_plan(torch)
    macros = build_spec.macro_flags(build_spec.CUDA_MACROS) if with_cuda else []
    plan = Plan(csrc=csrc, with_cuda=with_cuda, why_no_cuda=why_no_cuda,
                sources=build_spec.sources(str(csrc), with_cuda),
                cflags=build_spec.cxx_flags(torch._C.has_openmp) + macros,
                cuda_cflags=(build_spec.NVCC_FLAGS + macros) if with_cuda else [], arch_list=arch_list)
    plan.inputs = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": sysconfig.get_config_var("EXT_SUFFIX"),
        "compiler": _tool_version(os.environ.get("CXX") or "c++"),
        "nvcc": _tool_version(os.path.join(str(_cuda_home()), "bin", "nvcc")) if with_cuda else None,
        "arch_list": arch_list, "cflags": plan.cflags, "cuda_cflags": plan.cuda_cflags,
        "sources": sources_hash(csrc, with_cuda),
    }
    plan.key = hashlib.sha256(json.dumps(plan.inputs, sort_keys=True).encode()).hexdigest()[:16]
    plan.directory = cache_root() / f"{NAME}-{plan.key}"
    return plan


def _cuda_home():
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME


def _import(library: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(library.name.split(".")[0], str(library))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_cached(plan: Plan):
    """The cached build for ``plan``, imported, or None when there is none yet."""
    try:
        record = json.loads((plan.directory / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    library = plan.directory / record.get("library", "")
    return _import(library) if library.is_file() else None


def previous_failure(plan: Plan) -> Optional[BuildError]:
    log = plan.directory / FAILED
    if not log.is_file():
        return None
    return BuildError(f"compiling dlkunet._C failed before (log: {log}); run `dlkunet build` to try again", log=log)


def estimate_seconds(plan: Plan) -> float:
    jobs = os.environ.get("MAX_JOBS", "")
    jobs = int(jobs) if jobs.isdigit() and int(jobs) > 0 else (os.cpu_count() or 1)
    # Seven translation units of unequal size: past a few jobs the largest sets the time.
    return max(CPU_COMPILE_SECONDS / min(jobs, 7), 45)


@contextlib.contextmanager
def _build_environment(plan: Plan) -> Iterator[None]:
    """TORCH_CUDA_ARCH_LIST as the key says, and the ninja of the ``ninja`` package on PATH when the
    venv's bin/ is not (a venv's python run without activating it); restored afterwards."""
    saved = {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "PATH")}
    if plan.with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError, AttributeError):
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _progress(start: float) -> Iterator[None]:
    """After a few seconds, the time spent so far: a line that updates itself every second on a
    terminal, else a log line every half minute."""
    stop = threading.Event()
    tty = sys.stderr.isatty()

    def tick():
        if stop.wait(PROGRESS_AFTER_S if tty else PROGRESS_EVERY_S):
            return
        while True:
            elapsed = time.monotonic() - start
            if tty:
                sys.stderr.write(f"\rdlkunet: compiling dlkunet._C ... {elapsed:.0f} s")
                sys.stderr.flush()
            else:
                logger.warning("dlkunet: still compiling dlkunet._C (%.0f s so far)", elapsed)
            if stop.wait(1 if tty else PROGRESS_EVERY_S):
                break
        if tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    thread = threading.Thread(target=tick, name="dlkunet-jit-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _compile(plan: Plan, why: str, first_use: bool):
    from torch.utils import cpp_extension

    baton = plan.directory / "lock"  # torch's own lock; left behind only by a killed build, as we hold ours
    if baton.exists():
        baton.unlink()
    with contextlib.suppress(FileNotFoundError):
        (plan.directory / COMPLETE).unlink()
    minutes = max(1, round(estimate_seconds(plan) / 60))
    advice = (" To compile ahead of time run `dlkunet build`; DLKUNET_JIT=0 disables this (the pure-PyTorch "
              "reference then runs)." if first_use else "")
    logger.warning(
        "dlkunet: compiling %s (dlkunet._C) for torch %s, because %s. This takes roughly %d minute%s here "
        "(MAX_JOBS sets the parallel jobs), once: later processes load it from %s.%s",
        plan.what, plan.inputs["torch"], why, minutes, "" if minutes == 1 else "s", plan.directory, advice)
    start = time.monotonic()
    with _build_environment(plan), _progress(start), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            module = cpp_extension.load(NAME, plan.sources, extra_cflags=plan.cflags,
                                        extra_cuda_cflags=plan.cuda_cflags or None,
                                        build_directory=str(plan.directory), with_cuda=plan.with_cuda,
                                        verbose=False)
            error = None
        except Exception as exc:  # a compile error is a RuntimeError; a missing ninja or compiler too
            error = exc
    seconds = time.monotonic() - start
    notes = [f"{w.category.__name__}: {w.message}" for w in caught]
    if error is not None:
        log = plan.directory / FAILED
        text = str(error)
        _write_atomically(log, "\n".join([f"dlkunet._C: the first-use build failed after {seconds:.0f} s",
                                          json.dumps(plan.inputs, indent=2), *notes, "", text, ""]))
        # ninja echoes each command as "[k/n] ..." before running it: not what went wrong.
        lines = [line for line in text.splitlines() if line.strip() and not _NINJA_STEP.match(line)]
        raise BuildError(f"compiling dlkunet._C failed (log: {log})", "\n".join(lines[-TAIL_LINES:]), log)
    for note in notes:
        logger.warning("dlkunet: while compiling dlkunet._C: %s", note)
    record = {"library": Path(module.__file__).name, "seconds": round(seconds, 1), "inputs": plan.inputs,
              "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write_atomically(plan.directory / COMPLETE, json.dumps(record, indent=2))
    logger.warning("dlkunet: compiled dlkunet._C in %.0f s, cached in %s", seconds, plan.directory)
    return module


def build(plan: Plan, why: str, force: bool = False, first_use: bool = False,
          retry: bool = False) -> Tuple[object, bool]:
    """``(module, compiled_here)``: the cached build for ``plan``, or compile it now.

    One process per key compiles; the others wait on the lock and load its result (or its failure,
    which they do not retry).  ``retry`` compiles again over a failure, ``force`` over anything."""
    from filelock import FileLock, Timeout

    plan.directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(plan.directory / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("dlkunet: another process is compiling dlkunet._C into %s; waiting for it", plan.directory)
        lock.acquire()
    try:
        if force or retry:
            with contextlib.suppress(FileNotFoundError):
                (plan.directory / FAILED).unlink()
        module = None if force else load_cached(plan)
        if module is not None:
            return module, False
        failure = previous_failure(plan)
        if failure is not None:
            raise failure
        return _compile(plan, why, first_use), True
    finally:
        lock.release()


def obtain(why_missing: str, compile_now: bool) -> Tuple[object, str, str]:
    """For a process whose install has no usable extension (``why_missing``): ``(module, reason, origin)``.

    origin is 'cache' (loaded from the cache), 'compiled' (compiled by this process), 'pending'
    (not built yet; ``compile_now`` was False and a first use would compile it), or 'missing'
    (with the reason: disabled, no sources, or a failed compile, reported here once)."""
    try:
        plan = make_plan()
    except BuildError as exc:
        return None, f"{why_missing}; {exc}", "missing"
    module = load_cached(plan)
    if module is not None:
        return module, "", "cache"
    disabled = jit_disabled_reason()
    if disabled:
        return None, f"{why_missing}; {disabled} (prebuild with `dlkunet build`)", "missing"
    failure = previous_failure(plan)
    if failure is not None and not compile_now:
        return None, f"{why_missing}; {failure}", "missing"
    if not compile_now:
        return None, (f"{why_missing}; {plan.what} will be compiled at first use (roughly "
                      f"{estimate_seconds(plan) / 60:.0f} min), or now by `dlkunet build`"), "pending"
    try:
        module, compiled = build(plan, f"the installed package has none ({why_missing})", first_use=True)
    except BuildError as exc:
        logger.error("dlkunet: %s.%s", exc, f" The compiler's last lines:\n{exc.tail}" if exc.tail else "")
        return None, f"{why_missing}; {exc}", "missing"
    return module, "", "compiled" if compiled else "cache"
