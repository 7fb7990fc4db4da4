"""ONNX export of a DLKUNet, for ONNX Runtime, OpenVINO or any other ONNX consumer.

``export_onnx(model, path)`` writes the model's reference decomposition (standard ``Conv``,
``BatchNormalization``, ``Relu``, ``Mul``, ``ConvTranspose``, ``Concat``, ``Pad`` ... nodes, no
dlkunet custom op) with dynamic batch, height and width, through PyTorch's exporter
(``torch.onnx.export(..., dynamo=True)``, which needs the ``onnx`` and ``onnxscript`` packages).
It then runs the file in ONNX Runtime on a random input of another shape than the one it was
traced with and reports the largest absolute difference from PyTorch.

Whatever dlkunet backend is set, an export (``torch.onnx.export`` or ``torch.export.export`` of
any model holding dlkunet modules) records the reference formulas: ``dlkunet.ops`` resolves to the
``torch`` backend while ``torch.compiler.is_exporting()`` (or the TorchScript exporter's
``torch.onnx.is_in_onnx_export()``) is true.  Batch normalisation is exported in eval mode (the
running statistics); the model is put in eval mode for the export and restored afterwards.

Command line: ``dlkunet export CHECKPOINT -o model.onnx``.  Running the file::

    import onnxruntime as ort                       # pip install onnxruntime
    session = ort.InferenceSession("model.onnx")
    logits = session.run(None, {"image": x})[0]     # x: float32 numpy (N, C, H, W)

    import openvino as ov                           # pip install openvino
    compiled = ov.Core().compile_model("model.onnx", "CPU")
    logits = compiled(x)[0]
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# ONNX Runtime against PyTorch, float32: ||ort - torch|| / ||torch|| above this fails the check.  The
# two run the same float32 formulas with different convolution algorithms (measured on DLKUNet-S/L
# at 224x224: 1e-8 to 1e-7 in max abs difference, ~1e-7 relative); a wrong graph is off by O(1).
RELATIVE_TOLERANCE = 1e-4


class ExportCheckError(RuntimeError):
    """The exported graph disagrees with PyTorch."""


def _in_channels(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "in_channels" in config:
        return int(config["in_channels"])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError("cannot tell the model's input channels; pass example=")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def check_onnx(path, model: nn.Module, x: torch.Tensor) -> Tuple[float, float]:
    """Run ``path`` in ONNX Runtime on ``x``; return (max abs, relative L2) difference from ``model(x)``."""
    ort = _onnxruntime()
    if ort is None:
        raise ImportError("checking the export needs onnxruntime (pip install onnxruntime, or dlkunet[onnx])")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).float()
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.cpu().float().numpy()})[0])
    ref = ref.cpu()
    if got.shape != ref.shape:
        raise ExportCheckError(f"ONNX Runtime gave shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
    diff = got - ref
    max_abs = diff.abs().max().item()
    rel = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
    return max_abs, rel


def export_onnx(model: nn.Module, path, *, example: Optional[torch.Tensor] = None, image_size: int = 224,
                opset: Optional[int] = None, check: bool = True, check_shape: Optional[Sequence[int]] = None,
                quiet: bool = True) -> Dict[str, object]:
    """Export ``model`` to ``path`` (ONNX) with dynamic batch, height and width; optionally check it.

    ``example``: the tensor to trace with (default: a random (1, C, image_size, image_size) on the
    model's device).  ``check``: run the file in ONNX Runtime on a random input of ``check_shape``
    (default: batch 2, height + 16, width + 8 of the example, so the dynamic axes are exercised) and
    compare with PyTorch; raises ExportCheckError beyond ``RELATIVE_TOLERANCE``.
    Returns ``{"path", "bytes", "input_shape", "check_shape", "max_abs_diff", "rel_diff", "checked"}``
    (the last three None / False when ``check`` is off).
    """
    from .ops import use_backend

    if example is None:
        device = next(model.parameters()).device
        example = torch.randn(1, _in_channels(model), image_size, image_size, device=device)
    if example.dim() != 4:
        raise ValueError(f"example must be a 4-D (N, C, H, W) tensor, got shape {tuple(example.shape)}")
    if check and _onnxruntime() is None:
        raise ImportError("checking the export needs onnxruntime (pip install onnxruntime, or dlkunet[onnx]); "
                          "pass check=False (CLI: --no-check) to export without the check")
    dim = torch.export.Dim.DYNAMIC
    was_training = model.training
    model.eval()
    try:
        # The backend switch is belt and braces: dlkunet.ops already resolves to the reference while
        # exporting.  The exporter prints its progress to stdout; keep it for errors only.
        sink = io.StringIO()
        with use_backend("torch"), (contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext()):
            try:
                torch.onnx.export(
                    model, (example.contiguous(),), os.fspath(path), input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], opset_version=opset, dynamo=True, external_data=False,
                    dynamic_shapes=({0: dim, 2: dim, 3: dim},), verbose=False)
            except Exception:
                if quiet:
                    print(sink.getvalue(), end="")
                raise
        result: Dict[str, object] = {"path": os.fspath(path), "bytes": os.path.getsize(path),
                                     "input_shape": tuple(example.shape), "check_shape": None,
                                     "max_abs_diff": None, "rel_diff": None, "checked": False}
        if check:
            n, c, h, w = example.shape
            shape = tuple(check_shape) if check_shape is not None else (2, c, h + 16, w + 8)
            x = torch.randn(shape, device=example.device, dtype=example.dtype)
            max_abs, rel = check_onnx(path, model, x)
            result.update(check_shape=shape, max_abs_diff=max_abs, rel_diff=rel, checked=True)
            if not rel <= RELATIVE_TOLERANCE:  # NaN fails too
                raise ExportCheckError(f"{path}: ONNX Runtime differs from PyTorch on a random {shape} input: "
                                       f"max abs {max_abs:.3g}, relative {rel:.3g} (> {RELATIVE_TOLERANCE:g})")
        return result
    finally:
        model.train(was_training)
