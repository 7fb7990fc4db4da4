"""`dlkunet info`: versions, backends (and why any is missing), and the model zoo's sizes.

Nothing is compiled here: a compiled backend whose extension a first use would build says so.
"""
from __future__ import annotations

import os
import platform
from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import __version__, ops
from .models import VARIANTS


def conv_macs(model: torch.nn.Module, height: int = 224, width: int = 224) -> int:
    """Multiply-accumulates of the convolutions (and matmuls) for one image, on the meta device.

    torch.utils.flop_counter counts 2 FLOPs per MAC and only conv/matmul; the paper's FLOPs column
    came from a counter that also counts other layers, so the two figures differ by design."""
    meta = model.to("meta")
    x = torch.empty(1, model.config["in_channels"], height, width, device="meta")
    with ops.use_backend("torch"), FlopCounterMode(display=False) as counter, torch.no_grad():
        meta.eval()(x)
    return counter.get_total_flops() // 2


def model_table(in_channels: int = 1, num_classes: int = 9, size: int = 224) -> Dict[str, Dict[str, float]]:
    rows = {}
    for name, cls in VARIANTS.items():
        model = cls(in_channels=in_channels, num_classes=num_classes)
        params = sum(p.numel() for p in model.parameters())
        rows[name] = {"params": params, "gmacs": conv_macs(model, size, size) / 1e9}
    return rows


def _versions() -> Dict[str, str]:
    versions = {"dlkunet": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "torch CUDA": str(torch.version.cuda)}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    if torch.cuda.is_available():
        versions["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        versions["GPU"] = "none visible"
    return versions


def print_info() -> None:
    print("dlkunet: DLKUNet for medical image segmentation\n")
    for key, value in _versions().items():
        print(f"  {key:<11} {value}")
    print(f"\nbackend setting: {ops.get_backend()} (DLKUNET_BACKEND, dlkunet.ops.set_backend)")
    for device in ("cpu", "cuda"):
        for op in ops.backends.OPERATORS:
            choices = ", ".join(f"{mode} {_auto_choice(device, op, mode)}" for mode in ops.backends.MODES)
            print(f"  {device} tensors, {op}: {choices}")
    print("backends:")
    for name in ops.BACKENDS:
        print(f"  {name:<7} {backend_status(name)}")
    module, _ = ops.extension.load_extension(compile_now=False)
    if module is not None and hasattr(module, "cpu_parallel_threads"):
        torch_threads, kernel_threads = torch.get_num_threads(), module.cpu_parallel_threads()
        why = " (the extension was built without torch's OpenMP)" if kernel_threads < torch_threads else ""
        print(f"  CPU threads: torch {torch_threads}, cpu kernels {kernel_threads}{why}")
        if hasattr(module, "cpu_tile_gemm_available"):
            gemm = "dlkunet's AVX2 kernel" if module.cpu_tile_gemm_available() else "at::mm"
            print(f"  CPU kernels: {module.cpu_isa()} depthwise rows (DLKUNET_CPU_ISA), pointwise GEMMs on {gemm} "
                  "(DLKUNET_CPU_GEMM=mkl: at::mm)")
    print(f"  triton plans: {_triton_table()}")
    print("\nmodels (1 input channel, 9 classes; MACs of convolutions at 1x1x224x224,\n"
          "torch.utils.flop_counter; the paper's FLOPs column counts more layer types):")
    for name, row in model_table().items():
        print(f"  DLKUNet-{name}  {row['params']:>12,} parameters  {row['gmacs']:6.2f} GMACs")


def _triton_table() -> str:
    """Which GPU models the triton backend's measured table covers, and whether this machine's is
    one of them (auto runs CUDA inference on triton only where that table says it is faster)."""
    try:
        from .kernels import plans
    except ImportError as exc:
        return f"unavailable ({exc})"
    models = plans.measured_models()
    listed = ", ".join(f"{name} ({count} shapes)" for name, count in sorted(models.items())) or "none"
    line = f"measured on {listed} ({plans.TUNED_TABLE.name})"
    if torch.cuda.is_available():
        here = torch.cuda.get_device_name(torch.cuda.current_device())
        if here not in models:
            line += (f"; not on this {here}: auto keeps its inference on torch until "
                     "`python benchmarks/tune_plans.py OUT` measures it")
    return line


def backend_status(name: str) -> str:
    """One line: available or why not; for the compiled backends, where their extension comes from
    (the install, the first-use build cache) or that a first use will compile it."""
    ok, why = ops.availability(name, compile_now=False)
    if not ok:
        return f"unavailable: {why}"
    if name not in ("cpu", "cuda"):
        return "available"
    where, detail = ops.extension.origin()
    if where == "install":
        return f"available: dlkunet._C from the install ({detail})"
    if where in ("cache", "compiled"):
        return f"available: dlkunet._C built at first use, from the cache ({os.path.dirname(detail)})"
    return f"not built yet: {detail}"


def _auto_choice(device: str, op: str, mode: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        return "- (no GPU)"
    setting = ops.get_backend()
    if setting != "auto":
        ok, why = ops.availability(setting, device, compile_now=False)
        return setting if ok else f"error: {why}"
    preference = ops.backends.AUTO_PREFERENCE.get((device, op, mode), ())
    if device == "cuda" and "triton" in preference and ops.availability("triton", device)[0]:
        return "triton where this GPU's measured table has it faster, else torch"
    name, _ = ops.backends.auto_choice(device, op, mode, compile_now=False)
    if name in ("cpu", "cuda") and ops.extension.origin()[0] == "pending":
        return f"{name} (compiled at first use)"
    return name
