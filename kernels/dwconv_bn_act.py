"""dwconv_bn_act on the Triton kernels: forward and backward (see ``dlkunet.ops.reference`` for the
contract).

Forward (``plans``, the tensor-core kernels of ``_fast``): eval folds BN and b_pw into the GEMM's
epilogue (1-2 launches); training reduces the batch moments of z in a statistics GEMM, merges them
on the device (float64, a fixed order: no E[z^2]-E[z]^2 cancellation, no atomics), and recomputes z
with the batch-statistics affine (4 launches).
Backward (``_common``): z is recomputed from x; gz (the gradient at z) is the one full intermediate
written, plus gd (the gradient at the depthwise output) for the transposed depthwise conv.
"""
from __future__ import annotations

import torch

from . import _common as C
from . import plans as P


def _check(x, w_dw, w_pw):
    x, fmt, cl = C.prepare("dwconv_bn_act", x)
    cin = x.shape[1]
    k = w_dw.shape[-1]
    # validated by dlkunet.ops.validation; internal invariants only
    assert tuple(w_dw.shape) == (cin, 1, k, k) and k % 2 == 1, "w_dw: (Cin, 1, k, k), k odd"
    assert w_pw.dim() == 4 and tuple(w_pw.shape[1:]) == (cin, 1, 1), "w_pw: (Cout, Cin, 1, 1)"
    dt = x.dtype
    wd = w_dw.to(dt).contiguous().view(cin, k * k)
    wp = w_pw.to(dt).contiguous().view(w_pw.shape[0], cin)
    return x, fmt, cl, k, wd, wp


def dwconv_bn_act_forward(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var,
                          training: bool, eps: float, relu: bool):
    if training:
        return P.dwconv_bn_act_train(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, eps, relu)
    return P.dwconv_bn_act_eval(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var, eps, relu)


def dwconv_bn_act_backward(grad_y, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var,
                           training: bool, eps: float, relu: bool):
    x_in = (x, w_dw, b_dw, w_pw, b_pw, gamma, beta)
    x, fmt, cl, k, wd, wp = _check(x, w_dw, w_pw)
    n, cin, h, w = x.shape
    cout = wp.shape[0]
    dev = x.device
    assert tuple(grad_y.shape) == (n, cout, h, w), "grad_y: the output's shape"
    gy = grad_y.to(x.dtype).contiguous(memory_format=fmt)
    prec = P.precision(x.dtype)
    bd = b_dw.to(x.dtype).contiguous()
    rstd = torch.rsqrt(var.float() + eps)
    g_ = gamma.float()
    rows = [rstd, (b_pw.float() - mean.float()) * rstd, g_, beta.float(), g_ * rstd]
    groups = C.num_groups(n * h * w, triton_cdiv(cout, 64))
    gz = C.like(x, cout, fmt)
    if training:
        # grad_z = gamma*rstd*(g - mean(g) - zhat*mean(g*zhat)): the two means need a pass of their own.
        part = C.dw_pw(C.BN_BWD_STATS, x, wd, bd, wp, C.params(rows, cout, dev), 1, cl, prec, relu=relu,
                       aux=gy, groups=groups)
        sums = part[:, :2].double().sum(0)
        m = float(n * h * w)
        rows += [(sums[0] / m).float(), (sums[1] / m).float()]
        C.dw_pw(C.BN_BWD_GZ, x, wd, bd, wp, C.params(rows, cout, dev), 1, cl, prec, relu=relu, out=gz, aux=gy,
                groups=groups)
    else:
        part = C.dw_pw(C.BN_BWD_GZ, x, wd, bd, wp, C.params(rows, cout, dev), 1, cl, prec, relu=relu, out=gz,
                       aux=gy, groups=groups)
        sums = part[:, :2].double().sum(0)
    grad_beta, grad_gamma = sums[0].float(), sums[1].float()
    gd = C.like(x, cin, fmt)
    dwp = C.pw_bwd_data(gz, wp, x, k, 1, cl, prec, gd)
    grad_wpw, grad_bpw = C.pw_bwd_weight(gz, x, wd, bd, 1, cl, prec)
    grad_x = C.like(x, cin, fmt)
    C.dw_bwd(gd, wd, 1, cl, grad_x)
    grad_wdw, grad_bdw = dwp[:k * k].t().reshape(cin, 1, k, k), dwp[k * k].clone()  # returns never alias
    if training:
        # BatchNorm removes any per-channel constant of z, so both biases get exactly zero gradient.
        grad_bdw, grad_bpw = torch.zeros_like(grad_bdw), torch.zeros_like(grad_bpw)
    grads = (grad_x, grad_wdw, grad_bdw, grad_wpw.view(cout, cin, 1, 1), grad_bpw, grad_gamma, grad_beta)
    return tuple(C.as_input(g, t) for g, t in zip(grads, x_in))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
