"""dwconv_bn_act on the Triton kernels of ``_common``: forward and backward (see
``dlkunet.ops.reference`` for the contract).

Forward, eval: one pass (BN and b_pw folded into a per-channel scale/shift of the pointwise result).
Forward, training: a statistics pass (centred per-block moments, merged in float64: no
E[z^2]-E[z]^2 cancellation), then the eval pass with the batch statistics.
Backward: z is recomputed from x; gz (the gradient at z) is the one full intermediate written,
plus gd (the gradient at the depthwise output) for the transposed depthwise conv.
"""
from __future__ import annotations

import torch

from . import _common as C
from . import plans as P


def _merge_stats(part: torch.Tensor):
    """Chan's merge of per-program (mean, M2, count) rows into the biased batch mean and variance
    (float64: the epilogue's shift b_pw - mean is formed before rounding to float32)."""
    part = part.double()
    mean_i, m2_i, cnt_i = part[:, 0], part[:, 1], part[:, 2]
    total = cnt_i.sum(0)
    mean = (cnt_i * mean_i).sum(0) / total
    m2 = (m2_i + cnt_i * (mean_i - mean) ** 2).sum(0)
    return mean, m2 / total


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
    if not training:  # the planned tensor-core path: 1-2 launches, BN folded on the device
        return P.dwconv_bn_act_eval(x, w_dw, b_dw, w_pw, b_pw, gamma, beta, running_mean, running_var,
                                    eps, relu)
    x, fmt, cl, k, wd, wp = _check(x, w_dw, w_pw)
    n, cin, h, w = x.shape
    cout = wp.shape[0]
    dev = x.device
    bd = b_dw.to(x.dtype).contiguous()
    if training:
        groups = C.num_groups(n * h * w, triton_cdiv(cout, 64))
        part = C.dw_pw(C.STATS, x, wd, bd, wp, C.params([], cout, dev), 1, cl, groups=groups)
        mean, var = _merge_stats(part)
        mean = mean + b_pw.double()
    else:
        mean, var = running_mean.double(), running_var.double()
    scale = torch.rsqrt(var + eps) * gamma.double()
    shift = (b_pw.double() - mean) * scale + beta.double()
    y = C.like(x, cout, fmt)
    C.dw_pw(C.AFFINE, x, wd, bd, wp, C.params([scale.float(), shift.float()], cout, dev), 1, cl, relu=relu, out=y)
    # float() copies: the statistics never alias the running buffers.
    return y, mean.float(), var.float()


def dwconv_bn_act_backward(grad_y, x, w_dw, b_dw, w_pw, b_pw, gamma, beta, mean, var,
                           training: bool, eps: float, relu: bool):
    x_in = (x, w_dw, b_dw, w_pw, b_pw, gamma, beta)
    x, fmt, cl, k, wd, wp = _check(x, w_dw, w_pw)
    n, cin, h, w = x.shape
    cout = wp.shape[0]
    dev = x.device
    assert tuple(grad_y.shape) == (n, cout, h, w), "grad_y: the output's shape"
    gy = grad_y.to(x.dtype).contiguous(memory_format=fmt)
    bd = b_dw.to(x.dtype).contiguous()
    rstd = torch.rsqrt(var.float() + eps)
    g_ = gamma.float()
    rows = [rstd, (b_pw.float() - mean.float()) * rstd, g_, beta.float(), g_ * rstd]
    groups = C.num_groups(n * h * w, triton_cdiv(cout, 64))
    gz = C.like(x, cout, fmt)
    if training:
        # grad_z = gamma*rstd*(g - mean(g) - zhat*mean(g*zhat)): the two means need a pass of their own.
        part = C.dw_pw(C.BN_BWD_STATS, x, wd, bd, wp, C.params(rows, cout, dev), 1, cl, relu=relu,
                       aux=gy, groups=groups)
        sums = part[:, :2].double().sum(0)
        m = float(n * h * w)
        rows += [(sums[0] / m).float(), (sums[1] / m).float()]
        C.dw_pw(C.BN_BWD_GZ, x, wd, bd, wp, C.params(rows, cout, dev), 1, cl, relu=relu, out=gz, aux=gy,
                groups=groups)
    else:
        part = C.dw_pw(C.BN_BWD_GZ, x, wd, bd, wp, C.params(rows, cout, dev), 1, cl, relu=relu, out=gz,
                       aux=gy, groups=groups)
        sums = part[:, :2].double().sum(0)
    grad_beta, grad_gamma = sums[0].float(), sums[1].float()
    gd = C.like(x, cin, fmt)
    dwp = C.pw_bwd_data(gz, wp, x, k, 1, cl, gd)
    grad_wpw, grad_bpw = C.pw_bwd_weight(gz, x, wd, bd, 1, cl)
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
