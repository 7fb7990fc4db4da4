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
An isolated `pip install .` cannot see torch, so it builds no extension: use
`pip install --no-build-isolation .` to build against the torch you run.
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join(HERE, "dlkunet", "_build.py")
PACKAGES = ["dlkunet", "dlkunet.ops", "dlkunet.models", "dlkunet.data", "dlkunet.kernels"]


def _switch(name):
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"setup.py: {name} must be auto, 0 or 1, got {value!r}")
    return value


def _record(extension, reason, torch_version=""):
    with open(RECORD, "w") as f:
        f.write('"""Written by setup.py: what the build produced (read by dlkunet info)."""\n')
        f.write(f"EXTENSION = {extension!r}\nREASON = {reason!r}\nTORCH_VERSION = {torch_version!r}\n")


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


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
        _record(None, "torch was not importable at build time (isolated build); "
                      "reinstall with: pip install --no-build-isolation .")
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
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0")

    cxx = ["-O3", "-std=c++17"]
    # at::parallel_for is a header template: compiled without -fopenmp it runs serially inside this
    # extension even though torch itself is threaded.  Compile flag only: the GOMP_* calls stay
    # undefined here and bind, through libtorch_cpu's dependencies, to the OpenMP runtime torch
    # loaded (wheels may ship it renamed); linking -lgomp could load a second runtime.
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    macros = []
    if with_cuda:
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        macros.append(("DLKUNET_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "dlkunet._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]})
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
            message = f"the extension failed to compile ({type(exc).__name__}: {exc}); set DLKUNET_BUILD_EXT=1 to see the error"
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

setup(
    packages=PACKAGES,
    package_dir={"dlkunet.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
