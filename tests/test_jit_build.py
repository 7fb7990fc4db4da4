"""The extension compiled at first use (dlkunet.ops.jit_build) when the install has none.

Fast tests run in this environment with the installed extension hidden from the subprocess
(``--hide-installed``) and a broken or slowed-down compiler, or none needed.  The slow ones make
a fresh venv (reusing this environment's torch through a .pth file, so nothing large is
downloaded), install the package with a plain, isolated ``pip install``, and compile for real,
once, shared by the tests of this module.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from dlkunet.ops import jit_build
from dlkunet_testing import BUDGET

ROOT = Path(__file__).resolve().parents[1]

# Runs both operators (forward, and a backward) under ``auto`` on CPU float64 tensors, then on
# the reference, and prints where the extension came from, the backend auto chose and the errors.
SCRIPT = r'''
import json, sys, time
import torch
from dlkunet.ops import extension
if "--hide-installed" in sys.argv:
    extension._loaded["installed"] = (None, "hidden by the test")
from dlkunet import ops

g = torch.Generator().manual_seed(0)
def rand(*shape, low=None):
    t = torch.randn(*shape, dtype=torch.float64, generator=g)
    return t.abs() + 0.5 if low else t
x = rand(2, 4, 9, 9)
lka = [rand(4, 1, 5, 5), rand(4), rand(4, 1, 7, 7), rand(4), rand(4, 4, 1, 1), rand(4)]
dw = [rand(4, 1, 3, 3), rand(4), rand(6, 4, 1, 1), rand(6), rand(6), rand(6), rand(6), rand(6, low=True)]

def run():
    xr = x.clone().requires_grad_()
    y = ops.lka_gate(xr, *lka)
    y.square().sum().backward()
    with torch.no_grad():
        z = ops.dwconv_bn_act(x, *[t.clone() for t in dw], training=False)
    return [y.detach(), xr.grad, z]

start = time.perf_counter()
module, why = extension.load_extension()
load_s = time.perf_counter() - start
got = run()
backend = ops.resolve("cpu", "lka_gate", "inference")
with ops.use_backend("torch"):
    want = run()
print(json.dumps({
    "origin": extension.origin()[0], "backend": backend, "load_s": load_s,
    "errors": [float((a - b).norm() / b.norm()) for a, b in zip(got, want)],
    "equal": all(torch.equal(a, b) for a, b in zip(got, want)),
}))
'''


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLKUNET_", "PYTHON"))}
    env.update(DLKUNET_EXTENSIONS_DIR=str(cache), **extra)
    return env


def _start(python, script: Path, env: dict, cwd: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([str(python), str(script), *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> tuple:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return json.loads(out.strip().splitlines()[-1]), err


def _count(text: str, needle: str) -> int:
    return text.count(needle)


STARTED = "dlkunet: compiling the C++"   # the message a compile starts with


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "use_cpu_backend.py"
    path.write_text(SCRIPT)
    return path


# ---- the cache key ------------------------------------------------------------------------------------

def test_changing_a_source_file_changes_the_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("DLKUNET_EXTENSIONS_DIR", str(tmp_path / "cache"))
    csrc = tmp_path / "csrc"
    shutil.copytree(jit_build.source_dir(), csrc)
    before = jit_build.make_plan(csrc)
    assert before.key == jit_build.make_plan(csrc).key, "the key must be stable"
    assert before.directory.parent == tmp_path / "cache" and before.key in before.directory.name
    source = csrc / "cpu" / "lka_gate.cpp"
    original = source.read_bytes()
    source.write_bytes(original + b"\n// changed\n")
    assert jit_build.make_plan(csrc).key != before.key
    source.write_bytes(original)
    header = csrc / "cpu" / "common.h"
    original = header.read_bytes()
    header.write_bytes(original + b"\n")
    assert jit_build.make_plan(csrc).key != before.key, "a header is an input too"
    header.write_bytes(original)
    cuda = csrc / "cuda" / "glue.h"
    cuda.write_bytes(cuda.read_bytes() + b"\n")
    assert (jit_build.make_plan(csrc).key != before.key) == before.with_cuda, "CUDA files count in CUDA builds only"


def test_cache_key_names_torch_compiler_and_flags(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("DLKUNET_EXTENSIONS_DIR", str(tmp_path))
    plan = jit_build.make_plan()
    assert plan.inputs["torch"] == torch.__version__ and plan.inputs["cuda"] == torch.version.cuda
    assert plan.inputs["python"] == sysconfig.get_config_var("EXT_SUFFIX")
    assert plan.inputs["cflags"] == plan.cflags and "-O3" in plan.cflags
    monkeypatch.setenv("CXX", "false")
    assert jit_build.make_plan().key != plan.key, "another compiler is another build"


def test_sources_and_flags_are_the_ones_setup_py_uses():
    text = (ROOT / "setup.py").read_text()
    assert "SPEC.sources(CSRC" in text and "SPEC.cxx_flags(" in text and "SPEC.NVCC_FLAGS" in text
    plan_sources = [Path(p).relative_to(jit_build.source_dir()).as_posix() for p in jit_build.make_plan().sources]
    assert "extension.cpp" in plan_sources and any(p.startswith("cpu/") for p in plan_sources)


# ---- first use without a compiler, without JIT, without a use -----------------------------------------

def test_broken_compiler_is_reported_once_and_the_reference_runs(tmp_path, script):
    cache = tmp_path / "cache"
    env = _env(cache, CXX="false")
    result, err = _finish(_start(sys.executable, script, env, tmp_path, "--hide-installed"))
    assert result["origin"] == "missing" and result["backend"] == "torch" and result["equal"], result
    assert _count(err, STARTED) == 1, err
    assert _count(err, "dlkunet: compiling dlkunet._C failed (log: ") == 1, err
    assert _count(err, "The compiler's last lines:\nCommand '['false',") == 1, err
    assert _count(err, "no fused backend for cpu tensors") == 1, err
    logs = list(cache.glob("*/failed.log"))
    assert len(logs) == 1 and str(logs[0]) in err and "Command '['false'," in logs[0].read_text()

    # A later process does not try again (nor per call): it says so once, and runs the reference.
    result, err = _finish(_start(sys.executable, script, env, tmp_path, "--hide-installed"))
    assert result["origin"] == "missing" and result["equal"], result
    assert _count(err, STARTED) == 0 and _count(err, "dlkunet: compiling dlkunet._C failed before") == 1, err

    # `dlkunet build`, which that message names, does try again, and fails the same way, visibly.
    out = subprocess.run([sys.executable, "-m", "dlkunet", "build"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2 and _count(out.stderr, "dlkunet: compiling the C++") == 1, out.stderr
    assert "the compiler's last lines:\nCommand '['false'," in out.stderr, out.stderr
    assert "dlkunet: error: compiling dlkunet._C failed (log: " in out.stderr, out.stderr


def test_processes_starting_together_compile_once(tmp_path, script):
    """The lock: with a compiler that takes 8 s per file and fails, two processes started together
    make one attempt; the other waits for it (or, if it came late, finds its failure) and does not
    retry.  The compiler's version queries go to the real one, so ninja really runs it."""
    compiler = tmp_path / "slow-cxx"
    compiler.write_text("#!/bin/sh\ncase \"$*\" in *-dump*|*--version*|-v) exec c++ \"$@\";; esac\n"
                        "sleep 8\necho 'slow-cxx: error: broken on purpose' >&2\nexit 1\n")
    compiler.chmod(0o755)
    env = _env(tmp_path / "cache", CXX=str(compiler))
    procs = [_start(sys.executable, script, env, tmp_path, "--hide-installed") for _ in range(2)]
    results = [_finish(p) for p in procs]
    errs = "".join(err for _, err in results)
    assert _count(errs, STARTED) == 1, errs
    assert _count(errs, "dlkunet: compiling dlkunet._C failed before") == 1, errs  # after waiting, or late
    assert _count(errs, "broken on purpose") >= 1 and "FAILED" in errs, errs
    assert all(r["equal"] and r["backend"] == "torch" for r, _ in results)


def test_jit_disabled_compiles_nothing(tmp_path, script):
    result, err = _finish(_start(sys.executable, script, _env(tmp_path / "cache", DLKUNET_JIT="0"), tmp_path,
                                 "--hide-installed"))
    assert result["origin"] == "missing" and result["equal"], result
    assert STARTED not in err and "DLKUNET_JIT=0" in err
    assert not (tmp_path / "cache").exists()


def test_nothing_compiles_without_a_use_of_a_compiled_backend(tmp_path):
    """Import, the reference backend, and `dlkunet info` (which says a first use would compile)."""
    code = ("from dlkunet.ops import extension\n"
            "extension._loaded['installed'] = (None, 'hidden by the test')\n"
            "import torch, dlkunet.ops as ops\n"
            "from dlkunet.models import DLKUNet\n"
            "with ops.use_backend('torch'):\n"
            "    DLKUNet(1, 2, depth=2, base_width=4).eval()(torch.randn(1, 1, 8, 8))\n"
            "from dlkunet.info import print_info\n"
            "print_info()\n")
    env = _env(tmp_path / "cache", CXX="false")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert STARTED not in out.stderr and not (tmp_path / "cache").exists(), out.stderr
    assert "cpu     not built yet: not built at install time" not in out.stdout  # hidden, not "not built"
    assert "cpu     not built yet: hidden by the test; the C++ CPU kernels will be compiled at first use" in out.stdout
    assert "inference cpu (compiled at first use)" in out.stdout


# ---- a fresh venv, a plain `pip install .`, a real compile (slow) -------------------------------------

def _copy_checkout(dest: Path) -> Path:
    """The files of this checkout as a fresh clone would have them (nothing built, nothing ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """(python, env, workdir): a new venv holding only an isolated `pip install` of this checkout.

    torch and the other dependencies come from this environment's site-packages through a .pth
    file (its .pth files, an editable install of dlkunet among them, are not processed); PATH has
    only the new venv and the system, so ninja is found through the ninja package."""
    base = tmp_path_factory.mktemp("fresh")
    source = _copy_checkout(base / "src")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "parent_env.pth").write_text("\n".join(parents) + "\n")
    env = _env(base / "cache", PATH=f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", MAX_JOBS="2",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    start = time.monotonic()
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", str(source)],
                             env=env, cwd=base, capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    print(f"\nisolated pip install: {time.monotonic() - start:.1f} s")
    return python, env, base


def _dlkunet(fresh_venv, *args) -> str:
    python, env, workdir = fresh_venv
    out = subprocess.run([str(python), "-m", "dlkunet", *args], env=env, cwd=workdir,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_isolated_install_ships_the_sources_and_no_extension(fresh_venv):
    python, env, workdir = fresh_venv
    code = ("import dlkunet, dlkunet._build as b, pathlib; p = pathlib.Path(dlkunet.__file__).parent\n"
            "print(b.EXTENSION, (p / '_csrc' / 'extension.cpp').is_file(),"
            " (p / '_csrc' / 'cpu' / 'common.h').is_file(), sorted(x.name for x in p.glob('_C*')), p)")
    out = subprocess.run([str(python), "-c", code], env=env, cwd=workdir, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:4] == ["None", "True", "True", "[]"], out.stdout
    assert str(workdir / "venv") in out.stdout, "the fresh venv's dlkunet, not this environment's"
    info = _dlkunet(fresh_venv, "info")
    assert "cpu     not built yet: not built at install time: torch was not importable" in info, info


@pytest.mark.slow
def test_first_use_compiles_once_then_loads_from_the_cache(fresh_venv, tmp_path, script):
    """Two processes start together: one compiles, the other waits and loads it; a third loads
    from the cache; the results match the reference; `dlkunet info` says where it came from."""
    python, env, workdir = fresh_venv
    procs = [_start(python, script, env, workdir) for _ in range(2)]
    results = [_finish(p) for p in procs]
    errs = "".join(err for _, err in results)
    assert sorted(r["origin"] for r, _ in results) == ["cache", "compiled"], errs
    assert _count(errs, STARTED) == 1 and _count(errs, "waiting for it") == 1, errs
    assert _count(errs, "dlkunet: compiled dlkunet._C in") == 1, errs
    third, err = _finish(_start(python, script, env, workdir))
    assert third["origin"] == "cache" and STARTED not in err, err
    for result in [r for r, _ in results] + [third]:
        assert result["backend"] == "cpu", result
        assert max(result["errors"]) < BUDGET[torch.float64], result
    print(f"\nload from the cache: {third['load_s']:.2f} s")
    info = _dlkunet(fresh_venv, "info")
    assert "cpu     available: dlkunet._C built at first use, from the cache" in info, info
    built = _dlkunet(fresh_venv, "build")
    assert built.startswith("already built") and str(env["DLKUNET_EXTENSIONS_DIR"]) in built, built
