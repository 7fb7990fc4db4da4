"""The CUDA kernels' numerics, run on the CPU through a small CUDA emulation (no GPU needed).

csrc/cuda/*.cu are compiled as C++ against tests/csrc/cuda_emu/shim.h (every CUDA thread a
fiber, __syncthreads a barrier), so their index math, bounds, barriers and reductions are
checked against the float64 reference on every machine with g++ and the CUDA headers.  The GPU
suite (tests/ops, cuda backend) remains the real check; this one catches logic errors early.
Shapes are tiny because the emulation is slow.  Inputs and outputs are poisoned with NaN.

Every case runs in each GEMM mode its dtype can take (common.cuh, Mma): "exact" (fp32 on CUDA
cores) and "mma" (tensor cores: TF32 for float32, the input dtype for 16-bit).  Float32 in exact
mode is held to the design's budgets against float64; every other combination is judged as eager
is in the same precision: no worse than 2x the error of an emulated eager computation whose
convolution products see operands rounded the same way and which stores every op's output and
input gradient in the input's dtype (16-bit inputs: the backward's intermediates are 16-bit planes
in the kernels too, as in eager).
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
from dlkunet_testing import eager_mma_dwconv, eager_mma_lka, load_benchmark_module

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"
UNITS = ("dwconv_bn_act_fwd", "dwconv_bn_act_bwd", "lka_gate_fwd", "lka_gate_bwd")
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
MODES = ("exact", "mma")


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


def _err(got, ref):
    got, ref = got.double().reshape(ref.shape), ref.double()
    assert not torch.isnan(got).any(), "NaN (an unwritten element?)"
    return ((got - ref).norm() / ref.norm()).item()


def _check(name, got, ref, tol):
    err = _err(got, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


def _judge(name, got, ref, tol, eager=None, floor_above=None):
    """exact mode: the design's budget; mma mode: no worse than 2x emulated eager's error, or than
    float32's budget where the MMA's rounding does not reach the value (e.g. grad_beta)."""
    if eager is None:
        return _check(name, got, ref, tol)
    err, eager_err = _err(got, ref), _err(eager, ref)
    bound = max(2 * eager_err, TOL[torch.float32])
    assert err <= bound, f"{name}: relative error {err:.3g} > 2x eager's {eager_err:.3g}"
    if floor_above is not None:  # the MMA really ran: its error is that of the rounded operands
        assert err > floor_above, f"{name}: error {err:.3g} is float32's, not the MMA precision's"


# 16-bit cases judged against emulated eager need enough elements per output and no ReLU mask to
# flip: the ratio of two 16-bit roundings' errors is a random variable.  With 3-6 input channels,
# ReLU and 9-20 pixels it reached 4.6 (grad_gamma) and 2.5 (grad_b_dw, 4 elements) across seeds; the
# row-tile cases below (8 channels, 144 pixels, no ReLU) stayed within 2x over 6 seeds each.
DW_CASES = [  # N, Cin, Cout, H, W, k, dtype, channels_last, training, relu
    (2, 5, 7, 9, 11, 3, torch.float32, False, True, True),
    (1, 70, 66, 5, 3, 5, torch.float32, False, False, True),
    (2, 17, 20, 6, 7, 7, torch.float32, True, True, False),
    (2, 3, 4, 40, 30, 5, torch.float32, False, True, True),    # > 1024 pixels: split weight gradients
    (1, 3, 4, 5, 6, 9, torch.float32, False, False, True),      # generic kernel size
    (1, 9, 70, 9, 8, 3, torch.float32, True, True, True),      # Cout > 64, channels_last: pixel-major plane (exact),
                                                                # 2 row tiles per block (mma)
    (2, 9, 10, 8, 9, 3, torch.float16, True, False, True),
    (2, 9, 10, 8, 9, 3, torch.bfloat16, False, True, True),
    (1, 9, 70, 5, 6, 3, torch.bfloat16, False, False, True),    # Cout > 64, 16-bit: 2 row tiles per block in mma mode
    (1, 5, 130, 4, 5, 3, torch.float32, False, True, True),     # 3 row tiles per TF32 block (exact: a plane)
    (1, 3, 200, 3, 4, 3, torch.float32, True, False, True),     # 4 row tiles: a plane in both modes (TF32 holds 3)
    (1, 8, 200, 12, 12, 3, torch.bfloat16, True, True, False),  # 4 row tiles per block in mma mode
    (1, 6, 150, 4, 5, 3, torch.float16, False, False, True),    # 3 row tiles, 16-bit
    (2, 6, 150, 6, 7, 3, torch.bfloat16, True, True, False),    # 3 row tiles, 2 pixel tiles
    (2, 5, 256, 6, 6, 3, torch.bfloat16, False, False, True),   # 4 row tiles, 2 pixel tiles
    (1, 5, 128, 9, 8, 3, torch.float32, False, True, True),     # 2 TF32 row tiles, 2 pixel tiles
    (1, 8, 260, 12, 12, 3, torch.float16, False, False, False), # 5 row tiles in a 6-tile block (one spare)
    (1, 8, 400, 12, 12, 3, torch.bfloat16, False, False, False), # 7 row tiles: a bfloat16 plane in mma mode
    # The staged operand (mma mode, k = 3) with 16-byte loads: channels_last with Cin a multiple of 8
    # (16-bit) or 4 (float32), partial last K step (element loads past Cin); rectangles 3 x 19 and
    # 4 x 16 with partial rows, 8 x 8 exact (16 x 48) and with partial rows (13 x 48), 5 x 8 with
    # a partial last column (5 x 45)
    (2, 40, 96, 20, 19, 3, torch.bfloat16, True, True, True),
    (1, 36, 20, 10, 16, 3, torch.float32, True, False, True),
    (1, 16, 24, 16, 48, 3, torch.float16, True, True, False),
    (1, 16, 24, 13, 48, 3, torch.float16, False, False, True),  # NCHW: element loads into the same stage
    (1, 16, 24, 5, 45, 3, torch.bfloat16, True, True, True),
    (1, 24, 300, 6, 6, 3, torch.float16, True, False, True),    # 6-tile block over two K steps
]


def _ids(c):
    return "-".join(str(v).replace("torch.", "") for v in c)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", DW_CASES, ids=_ids)
def test_dwconv_bn_act_emulated(lib, case, mode):
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
    mma = mode == "mma"
    dims = (N, Cin, Cout, H, W, k, DT[dtype], int(mma and dtype == torch.float32), int(mma))
    d = [t.double() for t in (x, w_dw, b_dw, w_pw, b_pw, gamma, beta)]
    ref_y, ref_mean, ref_var = R.dwconv_bn_act_forward(*d, rm.double(), rv.double(), training, eps, relu)

    y, mean, var = _nan((N, Cout, H, W), dtype, cl), _nan((Cout,)), _nan((Cout,))
    ws = _nan((max(1, lib.emu_dwconv_fwd_ws(*dims, int(training))),))
    assert lib.emu_dwconv_fwd(*dims, _p(x), _s(x), _arr(prm), _p(rm), _p(rv), int(training), ctypes.c_float(eps),
                              int(relu), _p(y), _s(y), _p(mean), _p(var), _p(ws)) == 0
    gy = _act(g, (N, Cout, H, W), dtype, cl)
    eager = eager_mma_dwconv(d, rm, rv, training, eps, relu, gy, dtype) if mma or dtype != torch.float32 else None
    # TF32 must show its 10-bit operands: well above float32's error
    above = TOL[torch.float32] if mma and dtype == torch.float32 else None
    _judge("y", y, ref_y, tol, eager[0] if eager else None, above)
    if training:
        _judge("mean", mean, ref_mean, 1e-5, eager[1] if eager else None)
        _judge("var", var, ref_var, 1e-5, eager[2] if eager else None)
    else:  # the running statistics, copied by the kernel
        assert torch.equal(mean, rm) and torch.equal(var, rv)

    mean_s, var_s = _f32(ref_mean), _f32(ref_var)
    # The backward normalises with the statistics its forward saved: in mma mode, those of its own z.
    mean_b, var_b = (mean, var) if mma and training else (mean_s, var_s)
    gx = _nan((N, Cin, H, W), dtype, cl)
    grads = [_nan(s) for s in [(Cin, k * k), (Cin,), (Cout, Cin), (Cout,), (Cout,), (Cout,)]]
    ws = _nan((lib.emu_dwconv_bwd_ws(*dims),))
    assert lib.emu_dwconv_bwd(*dims, _p(gy), _s(gy), _p(x), _s(x), _arr(prm), _p(mean_b), _p(var_b), int(training),
                              ctypes.c_float(eps), int(relu), _p(gx), _s(gx), _arr(grads), _p(ws)) == 0
    refs = R.dwconv_bn_act_backward(gy.double(), *d, mean_s.double(), var_s.double(), training, eps, relu)
    names = ("grad_x", "grad_w_dw", "grad_b_dw", "grad_w_pw", "grad_b_pw", "grad_gamma", "grad_beta")
    for i, (name, got, ref) in enumerate(zip(names, [gx, *grads], refs)):
        if training and name in ("grad_b_dw", "grad_b_pw"):
            assert torch.equal(got, torch.zeros_like(got)), f"{name} must be exactly zero in training"
            assert ref.abs().max() < 1e-4
        else:
            _judge(name, got, ref, tol if name == "grad_x" else 1e-5, eager[3][i] if eager else None)


LKA_CASES = [  # N, C, H, W, k0, ks, dilation, dtype, channels_last
    (2, 5, 9, 11, 5, 7, 3, torch.float32, False),
    (1, 67, 20, 35, 3, 7, 3, torch.float32, True),    # two tile rows, C > 64
    (2, 3, 17, 70, 5, 5, 3, torch.float32, False),    # partial tiles in both directions
    (1, 6, 3, 2, 5, 5, 3, torch.float32, False),      # image smaller than the kernels
    (1, 4, 7, 5, 3, 3, 2, torch.float32, False),      # generic path
    (2, 8, 6, 7, 5, 7, 3, torch.float16, True),
    (1, 8, 6, 7, 5, 7, 3, torch.bfloat16, False),
    # channels_last with C a multiple of the channels one 16-byte load holds: the multi-channel
    # stage kernel (the fp16 case above too), partial 16 x 32 tiles in both directions
    (1, 12, 20, 40, 5, 5, 3, torch.float32, True),
    (2, 16, 17, 35, 3, 7, 3, torch.bfloat16, True),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", LKA_CASES, ids=_ids)
def test_lka_gate_emulated(lib, case, mode):
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
    mma = mode == "mma"
    dims = (N, C, H, W, k0, ks, dil, DT[dtype], int(mma and dtype == torch.float32), int(mma))
    d = [t.double() for t in (x, w0, b0, wsd, bs, w1, b1)]

    out = _nan((N, C, H, W), dtype, cl)
    ws = _nan((lib.emu_lka_fwd_ws(*dims),))
    assert lib.emu_lka_fwd(*dims, _p(x), _s(x), _arr(prm), _p(out), _s(out), _p(ws)) == 0
    go = _act(g, (N, C, H, W), dtype, cl)
    eager = eager_mma_lka(d, dil, go, dtype) if mma or dtype != torch.float32 else None
    above = TOL[torch.float32] if mma and dtype == torch.float32 else None
    _judge("out", out, R.lka_gate_forward(*d, dil), tol, eager[0] if eager else None, above)

    gx = _nan((N, C, H, W), dtype, cl)
    grads = [_nan(s) for s in [(C, k0 * k0), (C,), (C, ks * ks), (C,), (C, C), (C,)]]
    ws = _nan((lib.emu_lka_bwd_ws(*dims),))
    assert lib.emu_lka_bwd(*dims, _p(go), _s(go), _p(x), _s(x), _arr(prm), _p(gx), _s(gx), _arr(grads), _p(ws)) == 0
    refs = R.lka_gate_backward(go.double(), *d, dil)
    names = ("grad_x", "grad_w0", "grad_b0", "grad_ws", "grad_bs", "grad_w1", "grad_b1")
    for i, (name, got, ref) in enumerate(zip(names, [gx, *grads], refs)):
        _judge(name, got, ref, tol if name == "grad_x" else 1e-5, eager[1][i] if eager else None)


def test_forward_fuses_as_many_row_tiles_as_the_cost_model_assumes(lib):
    """The forward writes a plane (a non-empty workspace in eval) exactly where Cout passes the
    row tiles one block holds: CUDA_FUSED_ROW_TILES of benchmarks/roofline.py on tensor cores, one
    64-row tile for the exact fp32 kernel (no tensor cores, or float32 with TF32 off)."""
    roofline = load_benchmark_module("roofline")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        for tf32, tc in ((1, 1), (0, 1), (1, 0)):
            exact = not tc or (dtype == torch.float32 and not tf32)
            tiles = 1 if exact else roofline.CUDA_FUSED_ROW_TILES[name]
            for cout in (64, 65, 128, 129, 192, 193, 256, 257, 384, 385):
                ws = lib.emu_dwconv_fwd_ws(1, 8, cout, 4, 4, 3, DT[dtype], tf32, tc, 0)
                assert (ws > 0) == (cout > 64 * tiles), (name, tf32, tc, cout, ws)
