"""Build script: the Python package, plus the optional compiled extension ``dlkunet._C``.

What gets built (decided here, recorded in ``dlkunet/_build.py`` for ``dlkunet info``):
- a CUDAExtension (CPU + CUDA kernels) when torch is importable, is a CUDA build, and nvcc exists;
- a CppExtension (CPU kernels) when torch is importable and only a C++ compiler is;
- no extension otherwise: the package then runs on the pure-PyTorch (and Triton) backends.

Build switches (environment variables):
  DLKUNET_BUILD_EXT   auto (default): build what the machine allows, and on a compile error
                      install without the extension (the reason is recorded);
                      1: the extension must build (an error fails the install);
                      0: never build it.
  DLKUNET_BUILD_CUDA  auto (default) / 1 / 0: the same choice for the CUDA part alone.
  TORCH_CUDA_ARCH_LIST  GPU architectures, e.g. "9.0" or "8.0;9.0" (default "8.0;8.6;8.9;9.0").
  MAX_JOBS            parallel compile jobs (ninja), e.g. 16.
An isolated `pip install .` (pip's default) cannot see torch, so it builds no extension; the
wheel always ships the C++/CUDA sources (csrc/ as the package data dlkunet/_csrc/), and the
package compiles them at first use against the torch that is running (dlkunet/ops/jit_build.py).
`pip install --no-build-isolation .` builds the extension at install time instead.
Sources and flags come from dlkunet/ops/build_spec.py, which the first-use build reads too.
"""
import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join(HERE, "dlkunet", "_build.py")
CSRC = os.path.join(HERE, "csrc")
PACKAGES = ["dlkunet", "dlkunet.ops", "dlkunet.models", "dlkunet.data", "dlkunet.kernels"]


def _load_spec():
    """dlkunet/ops/build_spec.py by its path: importing dlkunet.ops would need torch."""
    path = os.path.join(HERE, "dlkunet", "ops", "build_spec.py")
    spec = importlib.util.spec_from_file_location("dlkunet_build_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPEC = _load_spec()


class BuildPy(build_py):
    """Also ship csrc/ as dlkunet/_csrc/: what the first-use build compiles when no extension was built."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install compiles csrc/ of the checkout itself
        target = os.path.join(self.build_lib, "dlkunet", "_csrc")
        for rel in SPEC.all_files(CSRC):
            self.mkpath(os.path.dirname(os.path.join(target, rel)))
            self.copy_file(os.path.join(CSRC, rel), os.path.join(target, rel))


def _switch(name):
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"setup.py: {name} must be auto, 0 or 1, got {value!r}")
    return value


def _record(extension, reason, torch_version=""):
    with open(RECORD, "w") as f:
        f.write('"""Written by setup.py: what the build produced (read by dlkunet info)."""\n')
        f.write(f"EXTENSION = {extension!r}\nREASON = {reason!r}\nTORCH_VERSION = {torch_version!r}\n")


def extension_plan():
    """Return (ext_modules, cmdclass)."""
    build = _switch("DLKUNET_BUILD_EXT")
    if build == "0":
        _record(None, "DLKUNET_BUILD_EXT=0 at build time")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if build == "1":
            sys.exit("setup.py: DLKUNET_BUILD_EXT=1 but torch is not importable in the build environment; "
                     "install torch first and use pip install --no-build-isolation .")
        _record(None, "torch was not importable at build time (an isolated build: pip's default)")
        return [], {}

    cuda = _switch("DLKUNET_BUILD_CUDA")
    why_no_cuda = ""
    if cuda == "0":
        why_no_cuda = "DLKUNET_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        why_no_cuda = "torch is a CPU-only build"
    elif cpp_extension.CUDA_HOME is None:
        why_no_cuda = "nvcc / CUDA_HOME not found"
    if cuda == "1" and why_no_cuda:
        sys.exit(f"setup.py: DLKUNET_BUILD_CUDA=1 but the CUDA extension cannot be built: {why_no_cuda}")
    with_cuda = not why_no_cuda
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", SPEC.DEFAULT_CUDA_ARCH_LIST)

    cxx = SPEC.cxx_flags(torch._C.has_openmp)
    sources = SPEC.sources(CSRC, with_cuda, relative_to=HERE)
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "dlkunet._C", sources, define_macros=SPEC.CUDA_MACROS,
            extra_compile_args={"cxx": cxx, "nvcc": SPEC.NVCC_FLAGS})
        kind = "cuda"
    else:
        ext = cpp_extension.CppExtension("dlkunet._C", sources, extra_compile_args={"cxx": cxx})
        kind = "cpu"
    reason = "" if with_cuda else f"CPU kernels only ({why_no_cuda})"
    _record(kind, reason, torch.__version__)

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # compile errors are SystemExit/CompileError subclasses too
                if build == "1":
                    raise
                self._give_up(exc)

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:
                if build == "1":
                    raise
                self._give_up(exc)

        def _give_up(self, exc):
            message = (f"the extension failed to compile at install time ({type(exc).__name__}: {exc}); "
                       "set DLKUNET_BUILD_EXT=1 to see the error")
            print("setup.py: WARNING: " + message, file=sys.stderr)
            _record(None, message, torch.__version__)
            self._rewrite_record_in_build_lib()

        def _rewrite_record_in_build_lib(self):
            target = os.path.join(self.build_lib, "dlkunet", "_build.py")
            if os.path.isdir(os.path.dirname(target)):
                with open(RECORD) as src, open(target, "w") as dst:
                    dst.write(src.read())

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_plan()
cmdclass["build_py"] = BuildPy

setup(
    packages=PACKAGES,
    package_dir={"dlkunet.kernels": "kernels"},
    # the Triton plans' measured table (kernels/plans.py reads it)
    package_data={"dlkunet.kernels": ["tuned_plans.csv"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
