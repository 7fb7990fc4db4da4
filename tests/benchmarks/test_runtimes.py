"""benchmarks/runtimes.py: the interleaved comparison against the deployment runtimes prints one
row per case with every requested column, a ratio where both sides ran, and why a row was skipped."""
from __future__ import annotations

import importlib.util

from dlkunet_testing import load_benchmark_module as _load

runtimes = _load("runtimes")


def test_table_has_every_row_and_the_ratios(capsys):
    runtimes.main(["--variants", "S", "--batches", "1", "--image", "16", "--rounds", "1", "--threads", "1"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| model |"))
    for row in ("eager", "eager_cl", "auto", "auto_cl", "onnxruntime", "openvino"):
        assert f" {row} |" in header
    assert "compile" not in header, "torch.compile is opt-in (--compile)"
    (line,) = [line for line in out.splitlines() if line.startswith("| DLKUNet-S | 1 |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert all(float(c) > 0 for c in cells[2:6]), cells  # eager, eager_cl, auto, auto_cl ran
    assert cells[-1].endswith("x"), "auto_cl against the faster eager layout"
    have_runtime = all(importlib.util.find_spec(p) for p in ("onnx", "onnxscript", "onnxruntime"))
    if have_runtime:
        assert cells[-2].endswith("x") and float(cells[6]) > 0
    else:
        assert "onnxruntime skipped:" in out and cells[-2] == "n/a"
    assert "threads;" in out and "torch " in out
