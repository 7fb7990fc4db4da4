"""benchmarks/errors.py, the per-dtype error table: it measures what it says on a real backend."""
from __future__ import annotations

import pytest
import torch

from dlkunet.ops import availability
from dlkunet_testing import BUDGET, load_benchmark_module

errors = load_benchmark_module("errors")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_every_output_and_gradient_is_measured_within_budget(backend):
    ok, why = availability(backend, "cpu")
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")
    rows = errors.measure("cpu", backends=(backend,), dtypes=(torch.float32,))
    # two layouts x (dwconv train, dwconv eval, lka_gate)
    assert len(rows) == 6
    want = {"dwconv_bn_act": {"out", "grad_x", *(f"grad_{n}" for n in errors.DW_PARAMS)},
            "lka_gate": {"out", "grad_x", *(f"grad_{n}" for n in errors.LKA_PARAMS)}}
    for r in rows:
        assert set(r["errors"]) == want[r["op"]], r
        # float32 against float64: rounding, not zero and not over the budget
        assert all(0 < e <= BUDGET[torch.float32] for e in r["errors"].values()), r
    table = errors.markdown(rows)
    assert table.count("\n") == len(rows) + 1


def test_a_wrong_result_shows_up_as_a_large_error():
    bad = errors._rel(torch.ones(4) * 1.1, torch.ones(4))
    assert bad == pytest.approx(0.1)
    assert errors._rel(torch.tensor([float("nan")]), torch.ones(1)) == float("inf")
