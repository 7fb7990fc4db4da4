"""dwconv_bn_act on the Triton kernels: forward and backward (see ``dlkunet.ops.reference`` for the
contract).

Forward (``plans``, the tensor-core kernels of ``_fast``): eval folds BN and b_pw into the GEMM's
epilogue (1-2 launches); training reduces the batch moments of z in a statistics GEMM, merges them
on the device (float64, a fixed order: no E[z^2]-E[z]^2 cancellation, no atomics), and recomputes z
with the batch-statistics affine (4 launches).
Backward (``_common``): z is recomputed (from d where the forward's plan writes d, else from x's
taps); gz (the gradient at z) is the one full intermediate written, plus gd (the gradient at the
depthwise output) for the transposed depthwise conv.
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
    wd = C.dense(w_dw, dt).view(cin, k * k)
    wp = C.dense(w_pw, dt).view(w_pw.shape[0], cin)
    return x, fmt, cl, k, wd, wp


def dwconv_bn_act_forward(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var,
                          training: bool, eps: float, relu: bool):
    if training:
        return P.dwconv_bn_act_train(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, eps, relu)
    return P.dwconv_bn_act_eval(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var, eps, relu)


def dwconv_bn_act_backward(grad_y, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var,
                           training: bool, eps: float, relu: bool):
    """Every reduction is merged on the device (``C.sum_groups``) and BatchNorm's per-channel
    factors are formed inside the kernels: no host torch op but allocations (and, in training, the
    zero bias gradients).  d is written once where the forward's plan splits
    (``plans.backward_depthwise``), else recomputed by each kernel."""
    x_in = (x, w_dw, b_dw, w_pw, b_pw, gamma, beta)
    x, fmt, cl, k, wd, wp = _check(x, w_dw, w_pw)
    n, cin, h, w = x.shape
    cout = wp.shape[0]
    assert tuple(grad_y.shape) == (n, cout, h, w), "grad_y: the output's shape"
    gy = C.dense(grad_y, x.dtype, fmt)
    prec = P.precision(x.dtype)
    bd = C.dense(b_dw, x.dtype)
    bn = tuple(C.dense(t) for t in (gamma, beta, mean, var))
    d = P.backward_depthwise("dwconv_bn_act", x, C.dense(w_dw, x.dtype), bd, 1, cout, (k,))
    b_pw = C.dense(b_pw)
    groups = C.num_groups(n * h * w, triton_cdiv(cout, 64))
    gz = C.like(x, cout, fmt)
    grad_beta = torch.empty(cout, dtype=torch.float32, device=x.device)
    grad_gamma = torch.empty(cout, dtype=torch.float32, device=x.device)
    common = dict(relu=relu, bn=bn, eps=eps, aux=gy, groups=groups, d=d)
    if training:
        # grad_z = gamma*rstd*(g - mean(g) - zhat*mean(g*zhat)): the two means need a pass of their own.
        part = C.dw_pw(C.BN_BWD_STATS, x, wd, bd, wp, b_pw, 1, cl, prec, **common)
        C.sum_groups(part, grad_beta, grad_gamma)  # the two sums, which the gz pass turns into means
        C.dw_pw(C.BN_BWD_GZ_CENTRED, x, wd, bd, wp, b_pw, 1, cl, prec, centred=(grad_beta, grad_gamma), out=gz,
                **common)
    else:
        part = C.dw_pw(C.BN_BWD_GZ, x, wd, bd, wp, b_pw, 1, cl, prec, out=gz, **common)
        C.sum_groups(part, grad_beta, grad_gamma)
    gd = C.like(x, cin, fmt)
    grad_wdw, grad_bdw = C.pw_bwd_data(gz, wp, x, k, 1, cl, prec, gd)
    grad_wpw, grad_bpw = C.pw_bwd_weight(gz, x, wd, bd, 1, cl, prec, d)
    grad_x = C.like(x, cin, fmt)
    C.dw_bwd(gd, wd, 1, cl, grad_x)
    if training:
        # BatchNorm removes any per-channel constant of z, so both biases get exactly zero gradient.
        grad_bdw, grad_bpw = torch.zeros_like(grad_bdw), torch.zeros_like(grad_bpw)
    grads = (grad_x, grad_wdw.view(cin, 1, k, k), grad_bdw, grad_wpw.view(cout, cin, 1, 1), grad_bpw, grad_gamma,
             grad_beta)
    return tuple(C.as_input(g, t) for g, t in zip(grads, x_in))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
