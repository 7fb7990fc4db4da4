"""The one place the measured peers come from.

Every row of the suite is one of these "backends":

``eager``     plain PyTorch modules in NCHW: nn.Conv2d (depthwise) + nn.Conv2d (1x1) + nn.BatchNorm2d
              + nn.ReLU, and the LKA module written with three nn.Conv2d and the gate (cuDNN / oneDNN).
              For models: DLKUNet on the ``torch`` backend (the same modules' formulas).
``eager_cl``  the same, weights and activations in channels_last.
``compile``   ``torch.compile`` of the eager module (dynamic=False; the backend the size asks for).
``triton`` / ``cuda`` / ``cpu``  dlkunet's modules (DWConvBNAct, LKA, DLKUNet) with that backend
              selected; skipped, with ``dlkunet.ops.availability``'s reason, where it cannot run.
``<fused>_cl``  the same in channels_last, the fair match for ``eager_cl`` (same layout); the report
              gives their speedup against eager_cl as well as against eager.
``auto`` / ``auto_cl``  models only: what a user gets by default (``dlkunet.ops.backends``'s
              measured choice per operator and mode).
``onnxruntime`` / ``openvino``  models only, inference only, CPU: the model exported by
              ``dlkunet.export.export_onnx`` (the reference graph) and run in that deployment runtime
              with as many threads as torch uses; skipped, with the reason, where the runtime or the
              exporter's packages (onnx, onnxscript) are not installed.
``eager_pw`` / ``eager_pw_cl``  dwconv_bn_act only, a bound rather than a peer: eager's pointwise 1x1
              convolution alone (the operator's GEMM, as PyTorch runs it), in each layout.  A fused
              kernel still does that GEMM, so eager / eager_pw is the most any fusion can gain over
              eager without a faster GEMM; where the GEMM dominates that bound is small.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

import dlkunet.ops as ops
from dlkunet.models import build_model
from dlkunet.models.blocks import LKA, DWConvBNAct

PEERS = ("eager", "eager_cl", "compile")
FUSED = ("triton", "cuda", "cpu")
FUSED_CL = tuple(f"{name}_cl" for name in FUSED)
DEFAULT = ("auto", "auto_cl")  # models only
BOUNDS = ("eager_pw", "eager_pw_cl")  # dwconv_bn_act only
RUNTIMES = ("onnxruntime", "openvino")  # models only, inference only
BACKENDS = PEERS + BOUNDS + FUSED + FUSED_CL + DEFAULT + RUNTIMES


def backend_name(backend: str) -> str:
    """The dlkunet backend a fused row runs (``cpu_cl`` -> ``cpu``)."""
    return backend[:-3] if backend in FUSED_CL + DEFAULT[1:] else backend


class EagerDWConvBNAct(nn.Module):
    """What a DLKUNet Block's convolution is without dlkunet: four standard modules."""

    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, k, padding=k // 2, groups=cin, bias=True)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=True)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.pointwise(self.depthwise(x))))


class EagerLKA(nn.Module):
    """Large-kernel attention as VAN / the DLKUNet authors write it."""

    def __init__(self, dim: int, kernels=(5, 7, 3)):
        super().__init__()
        k0, ks, d = kernels
        self.conv0 = nn.Conv2d(dim, dim, k0, padding=(k0 - 1) // 2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, ks, padding=d * (ks - 1) // 2, dilation=d, groups=dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


def availability(backend: str, device_type: str) -> Tuple[bool, str]:
    if backend in PEERS + BOUNDS + DEFAULT:
        return True, ""
    if backend in RUNTIMES:
        if device_type != "cpu":
            return False, f"the {backend} rows run on the CPU"
        for package in ("onnx", "onnxscript", backend):
            if importlib.util.find_spec(package) is None:
                return False, f"{package} is not installed (pip install {package})"
        return True, ""
    return ops.availability(backend_name(backend), device_type)


def memory_format(backend: str) -> torch.memory_format:
    return torch.channels_last if backend.endswith("_cl") else torch.contiguous_format


def _cast(module: nn.Module, dtype: torch.dtype, backend: str) -> nn.Module:
    """Convolutions in ``dtype``; BatchNorm stays float32 (as under autocast) for every peer."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.to(dtype)
    return module.to(memory_format=memory_format(backend))


def _compiled(module: nn.Module, compile_backend: str) -> Callable:
    # A fresh dynamo cache per case: results never depend on which cases ran before, and the
    # recompile limit can never silently turn a "compile" row into eager.
    torch._dynamo.reset()
    return torch.compile(module, backend=compile_backend, dynamic=False)


def _with_backend(module: nn.Module, backend: str) -> Callable:
    backend = backend_name(backend)

    def run(*args):
        with ops.use_backend(backend):
            return module(*args)
    return run


def dwconv(backend: str, cin: int, cout: int, k: int, dtype, device, compile_backend: str = "inductor"):
    """(module, callable) for one dwconv_bn_act peer."""
    if backend in BOUNDS:
        module = _cast(nn.Conv2d(cin, cout, 1).to(device), dtype, backend)
        return module, module
    if backend in PEERS:
        module = _cast(EagerDWConvBNAct(cin, cout, k).to(device), dtype, backend)
        return module, (_compiled(module, compile_backend) if backend == "compile" else module)
    module = _cast(DWConvBNAct(cin, cout, k).to(device), dtype, backend)
    return module, _with_backend(module, backend)


def lka(backend: str, c: int, kernels, dtype, device, compile_backend: str = "inductor"):
    if backend in PEERS:
        module = _cast(EagerLKA(c, kernels).to(device), dtype, backend)
        return module, (_compiled(module, compile_backend) if backend == "compile" else module)
    module = _cast(LKA(c, kernels).to(device), dtype, backend)
    return module, _with_backend(module, backend)


_EXPORTED: Dict[tuple, str] = {}  # (variant, base_width, input shape) -> .onnx path, shared by the runtimes


def _exported(net: nn.Module, key: tuple, shape) -> str:
    if key not in _EXPORTED:
        from dlkunet.export import export_onnx

        path = os.path.join(tempfile.mkdtemp(prefix="dlkunet-bench-"), "model.onnx")
        export_onnx(net.eval(), path, example=torch.randn(shape), check=False)
        _EXPORTED[key] = path
    return _EXPORTED[key]


def runtime_session(backend: str, path: str) -> Callable:
    """A callable running the ONNX file in ``backend`` on a CPU tensor, with torch's thread count."""
    import numpy as np

    threads = torch.get_num_threads()
    if backend == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.ascontiguousarray(x.numpy())})[0]
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads})
    return lambda x: compiled(np.ascontiguousarray(x.numpy()))[0]


def model(backend: str, variant: str, base_width: int, device, compile_backend: str = "inductor",
          shape: Optional[Tuple[int, int, int, int]] = None):
    """DLKUNet-<variant>; eager peers run it on the pure-PyTorch ``torch`` backend; the runtimes
    run it exported (traced at ``shape``, the benchmark's input shape)."""
    net = build_model(variant, base_width=base_width).to(device)
    if backend in RUNTIMES:
        net.eval()
        return net, runtime_session(backend, _exported(net, (variant, base_width, tuple(shape)), shape))
    net = net.to(memory_format=memory_format(backend))
    if backend in PEERS:
        run = _compiled(net, compile_backend) if backend == "compile" else net
        return net, _with_backend(run, "torch")
    return net, _with_backend(net, backend)
