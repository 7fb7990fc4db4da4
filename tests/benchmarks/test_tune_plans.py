"""benchmarks/tune_plans.py and the measured table it writes: the smoke run (tiny shapes, the CPU
interpreter) tunes one case per op, every candidate's error is within budget, the table it writes
merges into a shipped-format table, and kernels/plans.py then runs the table's plan and tiles."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlkunet.ops import availability
from dlkunet_testing import load_benchmark_module

ok, why = availability("triton", "cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"triton backend unavailable: {why}")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tune_plans.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(SCRIPT), str(out), "--smoke"], cwd=out, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_tunes_one_case_per_op(smoke):
    tune = load_benchmark_module("tune_plans")
    best = _read(smoke / "tuned_plans.csv")
    assert [r["op"] for r in best] == ["dwconv_bn_act", "lka_gate"]
    every = _read(smoke / "tune.csv")
    candidates = [r for r in every if r["plan"] != "part"]
    assert {r["plan"] for r in candidates} == {"fused", "split", "split_cudnn", "split_cublas", "chain"}
    assert {r["case"].split()[0] for r in candidates if r["plan"] == "split_cublas"} == {"dwconv_bn_act"}
    assert {r["case"].split()[0] for r in candidates if r["plan"] == "chain"} == {"lka_gate"}
    assert all(r["status"] == "ok" for r in candidates), [r for r in candidates if r["status"] != "ok"]
    for r in best:
        assert r["device"] == "cpu (interpreter)" and list(r) == list(tune.TABLE_FIELDS)
        # the chosen row is one of the measured candidates, the fastest of them
        mine = [c for c in candidates if c["case"].startswith(r["op"])]
        assert float(r["ms"]) == pytest.approx(min(float(c["ms"]) for c in mine), rel=1e-3)
    # each stage timed alone, ours beside PyTorch's
    parts = {r["fused"] for r in every if r["plan"] == "part"}
    assert {"dw k3 ours", "dw k3 cudnn", "dw k7 d3 ours", "pointwise+epilogue ours"} <= parts


def test_merged_table_drives_the_plan_choice(smoke, tmp_path):
    from dlkunet.kernels import plans
    table = tmp_path / "tuned_plans.csv"
    run = subprocess.run([sys.executable, str(SCRIPT), str(smoke / "tuned_plans.csv"), "--merge", str(table)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    (row,) = [r for r in _read(table) if r["op"] == "lka_gate"]
    k0, ks, dil = (int(v) for v in row["kernels"].split())
    cpu = torch.device("cpu")
    args = ("lka_gate", 2, int(row["cin"]), int(row["cout"]), int(row["h"]), int(row["w"]), (k0, ks, dil),
            getattr(torch, row["dtype"]), row["layout"] == "cl", cpu, "ieee")
    with plans.tuned_table(table):
        plan = plans.choose(*args)
        assert (plan.name, plan.gemm) == (row["plan"], tuple(int(v) for v in row["gemm"].split()))
        # another image size of the same channels takes the nearest measured size's plan
        other = plans.choose(*args[:4], 2 * int(row["h"]), 2 * int(row["w"]), *args[6:])
        assert other == plan
        assert plans.faster_than_eager("lka_gate", *args[2:10]) == (float(row["ms"]) < float(row["eager_ms"]))
        # channels the table never measured: the cost model's plan, and auto keeps PyTorch
        unmeasured = plans.choose(args[0], 2, 40, 40, *args[4:])
        assert unmeasured.name in plans.PLANS
        assert not plans.faster_than_eager("lka_gate", 40, 40, *args[4:10])
