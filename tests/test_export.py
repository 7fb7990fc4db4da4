"""ONNX export (dlkunet.export, ``dlkunet export``): the reference graph, dynamic shapes, the check."""
from __future__ import annotations

import copy

import pytest
import torch

for _module in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_module, reason=f"the ONNX export tests need {_module} (pip install dlkunet[onnx])")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from dlkunet import ops  # noqa: E402
from dlkunet.checkpointing import atomic_save, make_checkpoint  # noqa: E402
from dlkunet.cli import main  # noqa: E402
from dlkunet.export import RELATIVE_TOLERANCE, check_onnx, export_onnx  # noqa: E402
from dlkunet.models import DLKUNet  # noqa: E402
from dlkunet_testing import BUDGET, rel_err  # noqa: E402

BACKENDS = [pytest.param("torch", id="torch")] + [
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not ops.availability("cpu", "cpu")[0],
                                                           reason=f"cpu backend: {ops.availability('cpu', 'cpu')[1]}"))]


def small_model(seed: int = 0) -> DLKUNet:
    torch.manual_seed(seed)
    model = DLKUNet(in_channels=2, num_classes=3, depth=3, base_width=4)
    # Non-trivial BatchNorm statistics, so eval-mode folding is exercised.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def reference64(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), ops.use_backend("torch"):
        return copy.deepcopy(model).double()(x.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_is_the_reference_graph_with_dynamic_shapes(tmp_path, backend):
    model, path = small_model(), tmp_path / "model.onnx"
    with ops.use_backend(backend):  # whatever backend is set, the export records the reference formulas
        result = export_onnx(model, path, image_size=32)
    assert result["checked"] and result["max_abs_diff"] < 1e-3 and result["rel_diff"] <= RELATIVE_TOLERANCE
    assert result["check_shape"] == (2, 2, 48, 40)
    graph = onnx.load(str(path)).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    kinds = {node.op_type for node in graph.node}
    assert {"Conv", "Mul", "ConvTranspose", "Concat", "Relu"} <= kinds, kinds
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # N, H, W symbolic; C fixed
    assert dims[1].dim_value == 2
    # Sizes other than the traced one, odd ones included (the decoder pads there), against float64.
    for shape in [(3, 2, 37, 45), (1, 2, 16, 16), (1, 2, 9, 7)]:
        x = torch.randn(shape)
        got, ref = run_onnx(path, x), reference64(model, x)
        assert got.shape == ref.shape == (shape[0], 3, shape[2], shape[3])
        assert rel_err(got, ref) <= BUDGET[torch.float32], shape
    assert not model.training


def test_export_restores_training_mode_and_checks_against_the_model(tmp_path):
    model = small_model().train()
    result = export_onnx(model, tmp_path / "m.onnx", image_size=16, check_shape=(1, 2, 20, 24))
    assert model.training and result["check_shape"] == (1, 2, 20, 24)
    # The check can fail: the same file against a model with other weights is far off.
    with torch.no_grad():
        _, rel = check_onnx(tmp_path / "m.onnx", small_model(seed=1), torch.randn(1, 2, 16, 16))
    assert rel > 100 * RELATIVE_TOLERANCE


def test_torch_export_records_no_dlkunet_op():
    model = small_model()
    with ops.use_backend("cpu" if ops.availability("cpu", "cpu")[0] else "torch"):
        program = torch.export.export(model, (torch.randn(1, 2, 32, 32),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "dlkunet" in t], targets
    assert any("convolution" in t or "conv2d" in t for t in targets), targets


def test_cli_export(tmp_path, capsys):
    ckpt = tmp_path / "best.pt"
    atomic_save(make_checkpoint(small_model(), data={"image_size": 24}), ckpt)
    out = tmp_path / "model.onnx"
    assert main(["export", str(ckpt), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "max abs difference" in text and "(2, 2, 40, 32)" in text
    x = torch.randn(2, 2, 33, 31)
    assert rel_err(run_onnx(out, x), reference64(small_model(), x)) <= BUDGET[torch.float32]


def test_cli_export_without_check(tmp_path, capsys):
    ckpt = tmp_path / "best.pt"
    atomic_save(make_checkpoint(small_model()), ckpt)
    assert main(["export", str(ckpt), "-o", str(tmp_path / "m.onnx"), "--image-size", "16", "--no-check"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "max abs difference" not in text
