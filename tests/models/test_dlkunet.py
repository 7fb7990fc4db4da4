"""DLKUNet: parameter counts of the spec's table, shapes, backends, torch.compile."""
import pytest
import torch

from dlkunet import ops
from dlkunet.models import DLKUNet, DLKUNetL, DLKUNetM, DLKUNetS, build_model
from dlkunet_testing import fused_backends

VARIANTS = {"S": DLKUNetS, "M": DLKUNetM, "L": DLKUNetL}


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant,classes,expected", [
    ("S", 9, 1_131_379), ("M", 9, 4_494_451), ("L", 9, 17_708_659),
    ("S", 4, 1_130_894), ("M", 4, 4_493_966), ("L", 4, 17_708_174),
])
def test_parameter_counts_match_the_spec(variant, classes, expected):
    assert n_params(VARIANTS[variant](in_channels=1, num_classes=classes)) == expected


@pytest.mark.parametrize("width,expected_thousands", [
    (64, {"S": 525, "M": 2_046, "L": 7_972}),
    (128, {"S": 1_967, "M": 7_893, "L": 31_279}),
])
def test_ablation_width_parameter_counts(width, expected_thousands):
    got = {v: round(n_params(VARIANTS[v](base_width=width)) / 1000) for v in "SML"}
    assert got == expected_thousands


def test_ablation_knobs_change_the_layers():
    m = DLKUNetS(dw_kernel=5, lka_kernels=(3, 7, 3))
    assert m.stem.conv1.depthwise.kernel_size == (5, 5)
    assert m.stem.lka.conv0.kernel_size == (3, 3)
    assert m.stem.lka.conv_spatial.dilation == (3, 3) and m.stem.lka.conv_spatial.padding == (9, 9)
    m2 = DLKUNetS(lka_kernels=(5, 5, 3))
    assert m2.stem.lka.conv_spatial.padding == (6, 6)
    with pytest.raises(ValueError, match="odd"):
        DLKUNetS(dw_kernel=4)
    assert isinstance(build_model("m"), DLKUNetM)
    with pytest.raises(ValueError, match="unknown DLKUNet variant"):
        build_model("XL")


@pytest.mark.parametrize("variant", "SML")
@pytest.mark.parametrize("shape", [(1, 1, 37, 53), (2, 3, 224, 224), (1, 1, 16, 16)], ids=str)
def test_output_shape_and_dtype(variant, shape):
    model = VARIANTS[variant](in_channels=shape[1], num_classes=4).eval()
    with torch.no_grad():
        y = model(torch.randn(shape))
    assert y.shape == (shape[0], 4, shape[2], shape[3]) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("hw", [(1, 1), (3, 2), (5, 7)], ids=str)
def test_tiny_inputs(hw):
    model = DLKUNetL(base_width=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *hw)).shape == (1, 9, *hw)


def test_wrong_input_channels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects input \(N, 1, H, W\)"):
        DLKUNetS()(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("backend,device", fused_backends())
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_outputs_agree_under_every_backend(backend, device, training):
    torch.manual_seed(0)
    model = DLKUNet(in_channels=1, num_classes=3, depth=3, base_width=8).to(device).train(training)
    keys_before = list(model.state_dict())
    params_before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 1, 12, 10, device=device)
    ref_model = DLKUNet(in_channels=1, num_classes=3, depth=3, base_width=8).to(device).train(training)
    ref_model.load_state_dict(model.state_dict())
    with ops.use_backend("torch"):
        want = ref_model(x)
    with ops.use_backend(backend):
        got = model(x)
    rel = float((got - want).detach().norm() / want.detach().norm())
    assert rel <= 1e-5, f"{backend} differs from the torch backend by {rel:.2e}"
    assert list(model.state_dict()) == keys_before
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
    for (name, a), b in zip(model.named_buffers(), ref_model.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_fullgraph(backend):
    ok, why = ops.availability(backend, "cpu")
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DLKUNet(in_channels=1, num_classes=3, depth=3, base_width=4).eval()
    x = torch.randn(1, 1, 16, 16)
    with ops.use_backend(backend), torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
