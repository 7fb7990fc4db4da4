"""Operator-level benchmarks: dwconv_bn_act and lka_gate against their peers (see baselines.py).

``fwd`` runs under ``torch.no_grad()``; ``fwd+bwd`` runs the forward with autograd and a backward
from a random gradient, producing the input's and every parameter's gradient.  Gradients are
cleared in the untimed setup of each round.
"""
from __future__ import annotations

import pytest
import torch

import baselines
import floors
import shapes


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _target(fn, backward: bool):
    if backward:
        def step(x, grad):
            fn(x).backward(grad)
    else:
        def step(x, grad):
            with torch.no_grad():
                fn(x)
    return step


def _clear(module):
    def prepare(args):
        args[0].grad = None
        module.zero_grad(set_to_none=True)
    return prepare


def _inputs(bench, shape_in, shape_out, dtype, backend, backward):
    fmt = baselines.memory_format(backend)
    device = bench.device

    def make():
        x = torch.randn(shape_in, device=device, dtype=dtype).contiguous(memory_format=fmt)
        grad = torch.randn(shape_out, device=device, dtype=dtype).contiguous(memory_format=fmt) if backward else None
        return x.requires_grad_(backward), grad
    es = torch.empty((), dtype=dtype).element_size()
    set_bytes = es * (torch.Size(shape_in).numel() + (torch.Size(shape_out).numel() if backward else 0))
    return make, set_bytes


def _skip_unless_measured_here(bench, backend, case, combo):
    if backend in baselines.BOUNDS and not isinstance(case, shapes.DWCase):
        pytest.skip("the pointwise-only bound belongs to dwconv_bn_act")
    if backend in baselines.RUNTIMES:
        pytest.skip("the deployment runtimes run whole exported models")
    if backend in baselines.DEFAULT:
        pytest.skip("auto is measured on whole models; for one operator it is one of the named rows")
    if backend == "compile":
        why = shapes.wants_compile(bench.size, case.index, combo, model=False)
        if why:
            pytest.skip(why)


@pytest.mark.parametrize("mode,pass_", shapes.DW_COMBOS, ids=[f"{m}-{p}" for m, p in shapes.DW_COMBOS])
def test_dwconv_bn_act(benchmark, bench, dw_case, dtype, mode, pass_, backend):
    bench.require(backend)
    _skip_unless_measured_here(bench, backend, dw_case, (mode, pass_))
    c = dw_case
    backward = pass_ == "fwd+bwd"
    module, fn = baselines.dwconv(backend, c.cin, c.cout, c.k, dtype, bench.device, bench.size.compile_backend)
    module.train(mode == "train")
    make, set_bytes = _inputs(bench, (c.n, c.cin, c.h, c.w), (c.n, c.cout, c.h, c.w), dtype, backend, backward)
    rotation = bench.rotation(make, set_bytes, _clear(module))
    row = dict(kind="op", op="dwconv_bn_act", backend=backend, mode=mode, **{"pass": pass_},
               dtype=_dtype_name(dtype), shape=c.shape(), where=c.where)
    nbytes = floors.dwconv_bytes(c.n, c.cin, c.cout, c.h, c.w, c.k, dtype, backward)
    bench.measure(benchmark, _target(fn, backward), rotation, row, nbytes)


@pytest.mark.parametrize("mode,pass_", shapes.LKA_COMBOS, ids=[p for _, p in shapes.LKA_COMBOS])
def test_lka_gate(benchmark, bench, lka_case, dtype, mode, pass_, backend):
    bench.require(backend)
    _skip_unless_measured_here(bench, backend, lka_case, (mode, pass_))
    c = lka_case
    backward = pass_ == "fwd+bwd"
    module, fn = baselines.lka(backend, c.c, c.kernels, dtype, bench.device, bench.size.compile_backend)
    shape = (c.n, c.c, c.h, c.w)
    make, set_bytes = _inputs(bench, shape, shape, dtype, backend, backward)
    rotation = bench.rotation(make, set_bytes, _clear(module))
    row = dict(kind="op", op="lka_gate", backend=backend, mode=mode, **{"pass": pass_},
               dtype=_dtype_name(dtype), shape=c.shape())
    k0, ks, _ = c.kernels
    nbytes = floors.lka_bytes(c.n, c.c, c.h, c.w, k0, ks, dtype, backward)
    bench.measure(benchmark, _target(fn, backward), rotation, row, nbytes)
