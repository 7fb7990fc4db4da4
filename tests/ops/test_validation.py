"""Bad inputs to the public operators give clear Python errors before any kernel runs."""
import pytest
import torch

from dlkunet import ops


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
