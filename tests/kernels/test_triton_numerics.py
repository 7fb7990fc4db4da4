"""Triton-specific numerics the shared equivalence suite (tests/ops) does not single out: batch
statistics without cancellation, every ablation kernel size, and multi-block reductions.  Under
the interpreter (no GPU) the shapes stay tiny; each case still spans several pixel blocks and
several reduction groups (16-pixel blocks, 2 groups there)."""
from __future__ import annotations

import pytest
import torch

from dlkunet.ops import availability, reference
from dlkunet_testing import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ok, why = availability("triton", DEVICE)
pytestmark = pytest.mark.skipif(not ok, reason=f"triton backend unavailable: {why}")


def _kernels():
    from dlkunet import kernels
    return kernels


def _dwconv_inputs(n, cin, cout, h, w, k, offset, g):
    x = torch.randn(n, cin, h, w, dtype=torch.float64, generator=g)
    p = [torch.randn(cin, 1, k, k, dtype=torch.float64, generator=g) / k,
         torch.randn(cin, dtype=torch.float64, generator=g) * 0.1,
         torch.randn(cout, cin, 1, 1, dtype=torch.float64, generator=g) / cin ** 0.5,
         offset + torch.randn(cout, dtype=torch.float64, generator=g),
         1 + 0.2 * torch.randn(cout, dtype=torch.float64, generator=g),
         0.1 * torch.randn(cout, dtype=torch.float64, generator=g),
         0.1 * torch.randn(cout, dtype=torch.float64, generator=g),
         0.5 + torch.rand(cout, dtype=torch.float64, generator=g)]
    return x, p


def test_batch_statistics_survive_a_large_mean():
    # z has mean ~1e3 and variance ~1: E[z^2] - E[z]^2 in float32 would lose every digit.
    g = torch.Generator().manual_seed(1)
    x, p = _dwconv_inputs(2, 5, 17, 7, 6, 3, 1000.0, g)
    y, mean, var = _kernels().dwconv_bn_act_forward(x.float().to(DEVICE), *[t.float().to(DEVICE) for t in p],
                                                    True, 1e-5, True)
    y_ref, mean_ref, var_ref = reference.dwconv_bn_act_forward(x, *p, True, 1e-5, True)
    assert rel_err(mean, mean_ref) <= 1e-6
    assert rel_err(var, var_ref) <= 1e-5
    assert rel_err(y, y_ref) <= 1e-5


@pytest.mark.parametrize("k", [3, 5, 7])
def test_dwconv_bn_act_kernel_sizes(k):
    g = torch.Generator().manual_seed(k)
    x, p = _dwconv_inputs(2, 6, 18, 5, 7, k, 0.0, g)
    gy = torch.randn(2, 18, 5, 7, dtype=torch.float64, generator=g)
    training = k != 5
    K = _kernels()
    dev = lambda t: t.float().to(DEVICE)  # noqa: E731
    y, mean, var = K.dwconv_bn_act_forward(dev(x), *map(dev, p), training, 1e-5, True)
    grads = K.dwconv_bn_act_backward(dev(gy), dev(x), *map(dev, p[:6]), mean, var, training, 1e-5, True)
    y_ref, m_ref, v_ref = reference.dwconv_bn_act_forward(x, *p, training, 1e-5, True)
    ref = reference.dwconv_bn_act_backward(gy, x, *p[:6], m_ref, v_ref, training, 1e-5, True)
    assert rel_err(y, y_ref) <= 1e-5
    for i, (got, want) in enumerate(zip(grads, ref)):
        # training: the bias gradients are exactly zero; judge them at their weights' scale
        scale = float(ref[i - 1].norm()) if training and i in (2, 4) else None
        assert rel_err(got, want, scale) <= 1e-5, f"gradient {i}"


@pytest.mark.parametrize("k0,ks,dilation", [(5, 7, 3), (3, 7, 3), (5, 5, 3)])
def test_lka_gate_ablation_kernels(k0, ks, dilation):
    g = torch.Generator().manual_seed(k0 * 10 + ks)
    c, n, h, w = 17, 2, 6, 5  # H, W below the dilated kernel's reach: a1's zero padding matters
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=g)
    p = [torch.randn(c, 1, k0, k0, dtype=torch.float64, generator=g) / k0,
         torch.randn(c, dtype=torch.float64, generator=g) * 0.1,
         torch.randn(c, 1, ks, ks, dtype=torch.float64, generator=g) / ks,
         torch.randn(c, dtype=torch.float64, generator=g) * 0.1,
         torch.randn(c, c, 1, 1, dtype=torch.float64, generator=g) / c ** 0.5,
         torch.randn(c, dtype=torch.float64, generator=g) * 0.1]
    go = torch.randn_like(x)
    K = _kernels()
    dev = lambda t: t.float().to(DEVICE).contiguous(memory_format=torch.channels_last) if t.dim() == 4 and t.shape[0] == n else t.float().to(DEVICE)  # noqa: E731,E501
    out = K.lka_gate_forward(dev(x), *map(dev, p), dilation)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grads = K.lka_gate_backward(dev(go), dev(x), *map(dev, p), dilation)
    assert rel_err(out, reference.lka_gate_forward(x, *p, dilation)) <= 1e-5
    for i, (got, want) in enumerate(zip(grads, reference.lka_gate_backward(go, x, *p, dilation))):
        assert rel_err(got, want) <= 1e-5, f"gradient {i}"
