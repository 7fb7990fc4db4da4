"""Bad inputs to the public operators give clear Python errors before any kernel runs."""
from pathlib import Path

import pytest
import torch

from dlkunet import ops
from dlkunet.ops import validation


def dw_args(n=2, cin=4, cout=6, h=5, w=5, k=3, dtype=torch.float32):
    return dict(
        x=torch.randn(n, cin, h, w, dtype=dtype), w_dw=torch.randn(cin, 1, k, k, dtype=dtype),
        b_dw=torch.randn(cin, dtype=dtype), w_pw=torch.randn(cout, cin, 1, 1, dtype=dtype),
        b_pw=torch.randn(cout, dtype=dtype), gamma=torch.ones(cout), beta=torch.zeros(cout),
        running_mean=torch.zeros(cout), running_var=torch.ones(cout))


def lka_args(c=4, dtype=torch.float32):
    return dict(x=torch.randn(1, c, 6, 6, dtype=dtype), w0=torch.randn(c, 1, 5, 5, dtype=dtype),
                b0=torch.randn(c, dtype=dtype), ws=torch.randn(c, 1, 7, 7, dtype=dtype),
                bs=torch.randn(c, dtype=dtype), w1=torch.randn(c, c, 1, 1, dtype=dtype), b1=torch.randn(c, dtype=dtype))


@pytest.mark.parametrize("change,error,message", [
    (dict(x=torch.randn(4, 5, 5)), ValueError, "must be 4-D"),
    (dict(x=torch.randint(0, 3, (2, 4, 5, 5))), TypeError, "float32, float16, bfloat16"),
    (dict(x=torch.randn(2, 3, 5, 5)), ValueError, "channel mismatch"),
    (dict(w_dw=torch.randn(4, 1, 4, 4)), ValueError, "even kernel size 4"),
    (dict(w_dw=torch.randn(4, 1, 3, 5)), ValueError, "square kernel"),
    (dict(w_pw=torch.randn(6, 5, 1, 1)), ValueError, "w_pw must have shape (Cout, 4, 1, 1)"),
    (dict(b_pw=torch.randn(5)), ValueError, "b_pw must have shape 6"),
    (dict(w_dw=torch.randn(4, 1, 3, 3, dtype=torch.float64)), TypeError, "w_dw has dtype torch.float64"),
    (dict(gamma=torch.ones(6, dtype=torch.float64)), TypeError, "gamma has dtype"),
    (dict(running_var=torch.ones(7)), ValueError, "running_var must have shape 6"),
    (dict(x=torch.randn(1, 4, 1, 1)), ValueError, "more than one value per channel"),
    (dict(x=torch.randn(0, 4, 5, 5)), ValueError, "is empty"),
])
def test_dwconv_bn_act_rejects_bad_input(change, error, message):
    args = dw_args()
    args.update(change)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.dwconv_bn_act(**args, training=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed devices need a CUDA GPU")
@pytest.mark.gpu
def test_mixed_devices_are_rejected():
    args = dw_args()
    args["w_pw"] = args["w_pw"].cuda()
    with pytest.raises(ValueError, match="is on cuda"):
        ops.dwconv_bn_act(**args, training=False)


def test_mixed_devices_are_rejected_meta():
    """Device checks without a GPU: a meta tensor among CPU tensors."""
    args = dw_args()
    args["b_dw"] = args["b_dw"].to("meta")
    with pytest.raises(ValueError, match="b_dw is on meta but x is on cpu"):
        ops.dwconv_bn_act(**args, training=False)


@pytest.mark.parametrize("change,error,message", [
    (dict(w0=torch.randn(4, 1, 4, 4)), ValueError, "even kernel size"),
    (dict(ws=torch.randn(3, 1, 7, 7)), ValueError, "channel mismatch"),
    (dict(w1=torch.randn(4, 3, 1, 1)), ValueError, "w1 must have shape 4x4x1x1"),
    (dict(b1=torch.randn(4, dtype=torch.float16)), TypeError, "b1 has dtype torch.float16"),
    (dict(x=torch.randn(4, 6, 6)), ValueError, "must be 4-D"),
])
def test_lka_gate_rejects_bad_input(change, error, message):
    args = lka_args()
    args.update(change)
    with pytest.raises(error, match=message):
        ops.lka_gate(**args)


def test_lka_gate_rejects_bad_dilation():
    with pytest.raises(ValueError, match="dilation must be a positive integer"):
        ops.lka_gate(**lka_args(), dilation=0)


def test_eps_must_be_finite_and_non_negative():
    for eps in (-1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
            ops.dwconv_bn_act(**dw_args(), training=False, eps=eps)


def test_w_pw_with_no_output_channel_is_rejected():
    args = dw_args()
    args["w_pw"] = torch.randn(0, 4, 1, 1)
    with pytest.raises(ValueError, match=r"w_pw must have shape \(Cout, 4, 1, 1\)"):
        ops.dwconv_bn_act(**args, training=False)


# Each fused backend's own limits: checked in Python, with the backend named, before its kernels run.
@pytest.mark.parametrize("backend,x,kernels,extra,error,message", [
    ("triton", torch.empty(1, 2, 2, 2, dtype=torch.float64), (), {}, TypeError,
     "the triton backend supports float32, float16, bfloat16, not torch.float64; use the torch backend"),
    ("cuda", torch.empty(1, 2, 2, 2, dtype=torch.float64), (), {}, TypeError, "the cuda backend supports"),
    ("cpu", torch.empty(1, 2, 2, 2, dtype=torch.int32), (), {}, TypeError, "the cpu backend supports"),
    ("cpu", torch.empty(1, 2, 2, 2), (("w_dw", 65),), {}, ValueError, "kernel sizes up to 63, w_dw has 65"),
    ("triton", torch.empty(1, 1, 1, 1).expand(1, 4, 1 << 14, 1 << 14), (), {}, ValueError,
     r"2\*\*30 or more elements"),
    ("triton", torch.empty(1, 2, 1 << 14, 1 << 12), (), {"out_channels": 16}, ValueError, "the output has 16 channels"),
    ("cuda", torch.empty(1, 1, 1, 1).expand(65536, 1, 1, 1), (), {}, ValueError, "batch size 65536 exceeds"),
    ("cuda", torch.empty(1, 1, 1, 1).expand(2, 1, 1 << 15, 1 << 15), (), {}, ValueError, "32-bit pixel indices"),
])
def test_backend_limits(backend, x, kernels, extra, error, message):
    with pytest.raises(error, match=message):
        validation.check_backend("dwconv_bn_act", backend, x, kernels, **extra)
    ok = torch.empty(1, 2, 2, 2)
    validation.check_backend("dwconv_bn_act", backend, ok, (("w_dw", 3),))  # the same backend takes a small case


def test_lka_gate_backend_limits():
    x = torch.empty(1, 4, 8, 8)
    with pytest.raises(ValueError, match="dilation up to 64, got 65"):
        validation.check_backend("lka_gate", "cpu", x, (("w0", 5), ("ws", 7)), dilation=65)
    # channels run along grid x (no practical limit); spatial tiles along grid y (at most 65535)
    validation.check_backend("lka_gate", "cuda", torch.empty(1, 1, 1, 1).expand(1, 65536, 8, 8),
                             (("w0", 5), ("ws", 7)), dilation=3)
    with pytest.raises(ValueError, match=r"a 4096x16448 image is 65792 tiles of 16x64"):
        validation.check_backend("lka_gate", "cuda", torch.empty(1, 1, 1, 1).expand(1, 1, 4096, 16448),
                                 (("w0", 5), ("ws", 7)), dilation=3)
    # the shipped kernel sizes fit the cuda backend's shared memory; a very wide dilated kernel does not
    for k0, ks, d in ((5, 7, 3), (3, 7, 3), (5, 5, 3), (7, 7, 2)):
        validation.check_backend("lka_gate", "cuda", x, (("w0", k0), ("ws", ks)), dilation=d)
    with pytest.raises(ValueError, match=r"\(k0, ks, dilation\) = \(5, 15, 9\) need \d+ bytes"):
        validation.check_backend("lka_gate", "cuda", x, (("w0", 5), ("ws", 15)), dilation=9)


def test_cuda_shared_memory_mirror_matches_the_cuda_source():
    # csrc/cuda/common.cuh: 16-row tiles, 64 wide when specialised, 32 otherwise.
    assert validation.cuda_lka_shared_bytes(5, 7, 3) == 4 * ((16 + 18 + 4) * (64 + 18 + 4) + (16 + 18) * (64 + 18))
    assert validation.cuda_lka_shared_bytes(3, 3, 1) == 4 * ((16 + 2 + 2) * (32 + 2 + 2) + (16 + 2) * (32 + 2))
    source = (Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "common.cuh").read_text()
    assert "LKA_TH = 16, LKA_TW_SPEC = 64, LKA_TW_GENERIC = 32" in source
    assert "return (AH + 2 * r0) * (AW + 2 * r0) + AH * AW;" in source


def test_the_cpu_backend_refuses_through_the_public_operator():
    ok, why = ops.availability("cpu", "cpu")
    if not ok:
        pytest.skip(f"cpu backend unavailable: {why}")
    args = dw_args(k=65, h=3, w=3)
    with ops.use_backend("cpu"), pytest.raises(ValueError, match="the cpu backend takes kernel sizes up to 63"):
        ops.dwconv_bn_act(**args, training=False)
    with ops.use_backend("torch"):  # the contract itself allows it: the reference runs it
        assert ops.dwconv_bn_act(**args, training=False).shape == (2, 6, 3, 3)
