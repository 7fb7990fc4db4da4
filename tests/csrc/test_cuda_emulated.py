"""The CUDA kernels' numerics, run on the CPU through a small CUDA emulation (no GPU needed).

csrc/cuda/*.cu are compiled as C++ against tests/csrc/cuda_emu/shim.h (every CUDA thread a
fiber, __syncthreads a barrier), so their index math, bounds, barriers and reductions are
checked against the float64 reference on every machine with g++ and the CUDA headers.  The GPU
suite (tests/ops, cuda backend) remains the real check; this one catches logic errors early.
Shapes are tiny because the emulation is slow.  Inputs and outputs are poisoned with NaN.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from dlkunet.ops import reference as R

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"
UNITS = ("dwconv_bn_act_fwd", "dwconv_bn_act_bwd", "lka_gate_fwd", "lka_gate_bwd")
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _cuda_include():
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.insert(0, str(Path(os.path.realpath(nvcc)).parents[1]))
    for home in homes:
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return str(Path(home) / "include")
    return None


CXX = shutil.which("g++")
CUDA_INCLUDE = _cuda_include()
pytestmark = pytest.mark.skipif(CXX is None or CUDA_INCLUDE is None,
                                reason="needs g++ and the CUDA headers (cuda_runtime.h) for the emulation")


def emulate_source(text: str) -> str:
    """Rewrite kernel launches and dynamic shared memory into the shim's host calls."""
    text = text.replace("extern __shared__ float smem[];", "float* smem = (float*)dlk_dyn_smem();")
    launch = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}()]*?>)?)<<<([^>]*)>>>\(")
    out, i = [], 0
    while (m := launch.search(text, i)) is not None:
        out.append(text[i:m.start()])
        j, depth = m.end(), 1
        while depth:
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        out.append(f"dlk_launch({m.group(2)}, [&]() {{ {m.group(1)}({text[m.end():j - 1]}); }})")
        i = j
    out.append(text[i:])
    return "".join(out)


def test_emulate_source_rewrites_launches():
    src = "k<T, 3><<<grid, 256, 0, s>>>(a, f(b), c);\nextern __shared__ float smem[];"
    assert emulate_source(src) == ("dlk_launch(grid, 256, 0, s, [&]() { k<T, 3>(a, f(b), c); });\n"
                                   "float* smem = (float*)dlk_dyn_smem();")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    build = tmp_path_factory.mktemp("cuda_emu")
    (build / "common.cuh").write_text(emulate_source((CUDA_DIR / "common.cuh").read_text()))
    shutil.copy(CUDA_DIR / "launch.h", build / "launch.h")
    sources = []
    for unit in UNITS:
        (build / f"{unit}.cpp").write_text(emulate_source((CUDA_DIR / f"{unit}.cu").read_text()))
        sources.append(build / f"{unit}.cpp")
    shutil.copy(EMU_DIR / "api.cpp", build / "api.cpp")
    sources.append(build / "api.cpp")

    def compile_one(src):
        cmd = [CXX, "-std=c++20", "-O1", "-fPIC", "-w", "-include", str(EMU_DIR / "shim.h"), f"-I{build}",
               f"-I{CUDA_INCLUDE}", "-c", str(src), "-o", str(src.with_suffix(".o"))]
        return subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for src, proc in zip(sources, pool.map(compile_one, sources)):
            assert proc.returncode == 0, f"emulation build of {src.name} failed:\n{proc.stderr[-4000:]}"
    so = build / "libdlkemu.so"
    proc = subprocess.run([CXX, "-shared", "-o", str(so), *[str(s.with_suffix(".o")) for s in sources]],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    handle = ctypes.CDLL(str(so))
    for name in ("emu_dwconv_fwd_ws", "emu_dwconv_bwd_ws", "emu_lka_fwd_ws", "emu_lka_bwd_ws"):
        getattr(handle, name).restype = ctypes.c_longlong
    return handle


def _p(t):
    return ctypes.c_void_p(t.data_ptr())


def _s(t):
    return (ctypes.c_int64 * 4)(*t.stride())


def _arr(ts):
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def _f32(t):
    return t.detach().float().contiguous()


def _nan(shape, dtype=torch.float32, cl=False):
    t = torch.full(shape, float("nan"), dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _act(g, shape, dtype, cl):
    t = torch.randn(*shape, generator=g).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _check(name, got, ref, tol):
    got, ref = got.double().reshape(ref.shape), ref.double()
    assert not torch.isnan(got).any(), f"{name}: NaN (an unwritten element?)"
    err = ((got - ref).norm() / ref.norm()).item()
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


DW_CASES = [  # N, Cin, Cout, H, W, k, dtype, channels_last, training, relu
    (2, 5, 7, 9, 11, 3, torch.float32, False, True, True),
    (1, 70, 66, 5, 3, 5, torch.float32, False, False, True),
    (2, 17, 20, 6, 7, 7, torch.float32, True, True, False),
    (2, 3, 4, 40, 30, 5, torch.float32, False, True, True),    # > 1024 pixels: split weight gradients
    (1, 3, 4, 5, 6, 9, torch.float32, False, False, True),      # generic kernel size
    (2, 9, 10, 8, 9, 3, torch.float16, True, False, True),
    (2, 9, 10, 8, 9, 3, torch.bfloat16, False, True, True),
]


@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_dwconv_bn_act_emulated(lib, case):
    N, Cin, Cout, H, W, k, dtype, cl, training, relu = case
    eps, tol = 1e-5, TOL[dtype]
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    x = _act(g, (N, Cin, H, W), dtype, cl)
    w_dw = (torch.randn(Cin, 1, k, k, generator=g) * 0.3).to(dtype)
    b_dw = torch.randn(Cin, generator=g).to(dtype)
    w_pw = (torch.randn(Cout, Cin, 1, 1, generator=g) * 0.3).to(dtype)
    b_pw = torch.randn(Cout, generator=g).to(dtype)
    gamma, beta = torch.rand(Cout, generator=g) + 0.5, torch.randn(Cout, generator=g)
    rm, rv = torch.randn(Cout, generator=g) * 0.2, torch.rand(Cout, generator=g) + 0.5
    prm = [_f32(w_dw).view(Cin, k * k), _f32(b_dw), _f32(w_pw).view(Cout, Cin), _f32(b_pw), gamma, beta]
    dims = (N, Cin, Cout, H, W, k, DT[dtype])
    d = [t.double() for t in (x, w_dw, b_dw, w_pw, b_pw, gamma, beta)]
    ref_y, ref_mean, ref_var = R.dwconv_bn_act_forward(*d, rm.double(), rv.double(), training, eps, relu)

    y, mean, var = _nan((N, Cout, H, W), dtype, cl), _nan((Cout,)), _nan((Cout,))
    ws = _nan((max(1, lib.emu_dwconv_fwd_ws(*dims, int(training))),))
    assert lib.emu_dwconv_fwd(*dims, _p(x), _s(x), _arr(prm), _p(rm), _p(rv), int(training), ctypes.c_float(eps),
                              int(relu), _p(y), _s(y), _p(mean), _p(var), _p(ws)) == 0
    _check("y", y, ref_y, tol)
    if training:
        _check("mean", mean, ref_mean, 1e-5)
        _check("var", var, ref_var, 1e-5)

    gy = _act(g, (N, Cout, H, W), dtype, cl)
    mean_s, var_s = _f32(ref_mean), _f32(ref_var)
    gx = _nan((N, Cin, H, W), dtype, cl)
    grads = [_nan(s) for s in [(Cin, k * k), (Cin,), (Cout, Cin), (Cout,), (Cout,), (Cout,)]]
    ws = _nan((lib.emu_dwconv_bwd_ws(*dims),))
    assert lib.emu_dwconv_bwd(*dims, _p(gy), _s(gy), _p(x), _s(x), _arr(prm), _p(mean_s), _p(var_s), int(training),
                              ctypes.c_float(eps), int(relu), _p(gx), _s(gx), _arr(grads), _p(ws)) == 0
    refs = R.dwconv_bn_act_backward(gy.double(), *d, mean_s.double(), var_s.double(), training, eps, relu)
    names = ("grad_x", "grad_w_dw", "grad_b_dw", "grad_w_pw", "grad_b_pw", "grad_gamma", "grad_beta")
    for name, got, ref in zip(names, [gx, *grads], refs):
        if training and name in ("grad_b_dw", "grad_b_pw"):
            assert torch.equal(got, torch.zeros_like(got)), f"{name} must be exactly zero in training"
            assert ref.abs().max() < 1e-4
        else:
            # half-precision inputs: gradients of the parameters are float32 here (the glue casts them)
            _check(name, got, ref, tol if name == "grad_x" else 1e-5)


LKA_CASES = [  # N, C, H, W, k0, ks, dilation, dtype, channels_last
    (2, 5, 9, 11, 5, 7, 3, torch.float32, False),
    (1, 67, 20, 35, 3, 7, 3, torch.float32, True),    # two tile rows, C > 64
    (2, 3, 17, 70, 5, 5, 3, torch.float32, False),    # partial tiles in both directions
    (1, 6, 3, 2, 5, 5, 3, torch.float32, False),      # image smaller than the kernels
    (1, 4, 7, 5, 3, 3, 2, torch.float32, False),      # generic path
    (2, 8, 6, 7, 5, 7, 3, torch.float16, True),
    (1, 8, 6, 7, 5, 7, 3, torch.bfloat16, False),
]


@pytest.mark.parametrize("case", LKA_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_lka_gate_emulated(lib, case):
    N, C, H, W, k0, ks, dil, dtype, cl = case
    tol = TOL[dtype]
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    x = _act(g, (N, C, H, W), dtype, cl)
    w0 = (torch.randn(C, 1, k0, k0, generator=g) * 0.3).to(dtype)
    b0 = torch.randn(C, generator=g).to(dtype)
    wsd = (torch.randn(C, 1, ks, ks, generator=g) * 0.2).to(dtype)
    bs = torch.randn(C, generator=g).to(dtype)
    w1 = (torch.randn(C, C, 1, 1, generator=g) * 0.3).to(dtype)
    b1 = torch.randn(C, generator=g).to(dtype)
    prm = [_f32(w0).view(C, -1), _f32(b0), _f32(wsd).view(C, -1), _f32(bs), _f32(w1).view(C, C), _f32(b1)]
    dims = (N, C, H, W, k0, ks, dil, DT[dtype])
    d = [t.double() for t in (x, w0, b0, wsd, bs, w1, b1)]

    out = _nan((N, C, H, W), dtype, cl)
    ws = _nan((lib.emu_lka_fwd_ws(*dims),))
    assert lib.emu_lka_fwd(*dims, _p(x), _s(x), _arr(prm), _p(out), _s(out), _p(ws)) == 0
    _check("out", out, R.lka_gate_forward(*d, dil), tol)

    go = _act(g, (N, C, H, W), dtype, cl)
    gx = _nan((N, C, H, W), dtype, cl)
    grads = [_nan(s) for s in [(C, k0 * k0), (C,), (C, ks * ks), (C,), (C, C), (C,)]]
    ws = _nan((lib.emu_lka_bwd_ws(*dims),))
    assert lib.emu_lka_bwd(*dims, _p(go), _s(go), _p(x), _s(x), _arr(prm), _p(gx), _s(gx), _arr(grads), _p(ws)) == 0
    refs = R.lka_gate_backward(go.double(), *d, dil)
    names = ("grad_x", "grad_w0", "grad_b0", "grad_ws", "grad_bs", "grad_w1", "grad_b1")
    for name, got, ref in zip(names, [gx, *grads], refs):
        _check(name, got, ref, tol if name == "grad_x" else 1e-5)
