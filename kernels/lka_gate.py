"""lka_gate on the Triton kernels of ``_common``: forward and backward (see
``dlkunet.ops.reference`` for the contract).

Forward: the plans of ``plans.lka_gate_fwd`` (a1 written once and the rest fused; a1 and a2
written once; or a2 written once with a1 kept on chip).  a1 is zero outside the image, as for two
separate convolutions.
Backward: a1 is recomputed (with a2, in one launch, where the forward's plan is ``chain``); the
gradients flow through gu = g*x (at the pointwise output), ga2 = gu @ W1, ga1 = dw_ks^T(ga2) and
grad_x = g*u + dw_k0^T(ga1).
"""
from __future__ import annotations

import torch

from . import _common as C
from . import plans as P


def _check(x, w0, ws, w1, dilation):
    x, fmt, cl = C.prepare("lka_gate", x)
    c = x.shape[1]
    # validated by dlkunet.ops.validation; internal invariants only
    for wt in (w0, ws):
        assert tuple(wt.shape) == (c, 1, wt.shape[-1], wt.shape[-1]) and wt.shape[-1] % 2 == 1, "(C, 1, k, k), k odd"
    assert tuple(w1.shape) == (c, c, 1, 1) and int(dilation) >= 1, "w1: (C, C, 1, 1); dilation >= 1"
    dt = x.dtype
    k0, ks = w0.shape[-1], ws.shape[-1]
    return (x, fmt, cl, k0, ks, C.dense(w0, dt).view(c, k0 * k0), C.dense(ws, dt).view(c, ks * ks),
            C.dense(w1, dt).view(c, c))


def lka_gate_forward(x, w0, b0, ws, bs, w1, b1, dilation: int):
    # the planned tensor-core path (kernels/plans.py): fused, split or chain
    return P.lka_gate_fwd(x, w0, b0, ws, bs, w1, b1, dilation)


def lka_gate_backward(grad_out, x, w0, b0, ws, bs, w1, b1, dilation: int):
    inputs = (x, w0, b0, ws, bs, w1, b1)
    x, fmt, cl, k0, ks, w0_, ws_, w1_ = _check(x, w0, ws, w1, dilation)
    assert grad_out.shape == x.shape, "grad_out: x's shape"
    dil = int(dilation)
    c = x.shape[1]
    g = C.dense(grad_out, x.dtype, fmt)
    bs_ = C.dense(bs, x.dtype)
    prec = P.precision(x.dtype)
    stages = P.backward_lka_stages(x, w0, b0, ws, bs, dil)  # the chain plan writes both in one launch
    if stages is None:
        a1 = C.dw_fwd(x, w0_, C.dense(b0, x.dtype), 1, cl, C.like(x, c, fmt))
        a2 = P.backward_depthwise("lka_gate", a1, C.dense(ws, x.dtype), bs_, dil, c, (k0, ks, dil))
    else:
        a1, a2 = stages
    gu = C.like(x, c, fmt)
    gx_direct = C.like(x, c, fmt, torch.float32)
    C.dw_pw(C.GATE_BWD, a1, ws_, bs_, w1_, C.dense(b1), dil, cl, prec, out=gu, out2=gx_direct, aux=g, aux2=x,
            d=a2)
    # float32 intermediates: in bf16 their rounding alone put grad_b0 at the 1e-2 budget.
    ga2 = C.like(x, c, fmt, torch.float32)
    grad_ws, grad_bs = C.pw_bwd_data(gu, w1_, a1, ks, dil, cl, prec, ga2)
    grad_w1, grad_b1 = C.pw_bwd_weight(gu, a1, ws_, bs_, dil, cl, prec, a2)
    ga1 = C.like(x, c, fmt, torch.float32)
    grad_w0, grad_b0 = C.dw_bwd(ga2, ws_, dil, cl, ga1, t2=x, k2=k0)
    grad_x = C.like(x, c, fmt)
    C.dw_bwd(ga1, w0_, 1, cl, grad_x, add=gx_direct)
    grads = (grad_x, grad_w0.view(c, 1, k0, k0), grad_b0, grad_ws.view(c, 1, ks, ks), grad_bs,
             grad_w1.view(c, c, 1, 1), grad_b1)
    return tuple(C.as_input(gr, t) for gr, t in zip(grads, inputs))
