"""Unit tests of the benchmark suite's pure parts: the report script, the byte floors, the shapes."""
from __future__ import annotations

import json

import pytest
import torch

from dlkunet_testing import load_benchmark_module as _load

report, floors, shapes = _load("report"), _load("floors"), _load("shapes")


def _row(backend, ms, kind="op", op="dwconv_bn_act", mode="eval", pass_="fwd", shape=None, **extra):
    shape = shape or (dict(N=16, Cin=96, Cout=96, H=224, W=224, k=3) if kind == "op"
                      else dict(variant="L", N=8, H=224, W=224, C=96))
    row = dict(kind=kind, op=op, backend=backend, mode=mode, dtype="float32", shape=shape, median_ms=ms,
               bytes=616_000_000, bandwidth_fraction=0.5)
    row["pass"] = pass_
    row.update(extra)
    return row


def _doc(rows, **extra):
    env = {"device_name": "Test GPU", "torch": "2.x", "bandwidth": {"bytes_per_s": 3.0e12, "method": "copy"},
           "backends": {"cuda": {"available": False, "reason": "not built"}}}
    return dict({"schema": "dlkunet-bench/1", "environment": env, "rows": rows}, **extra)


def test_markdown_pivots_backends_and_computes_speedups():
    rows = [_row("eager", 4.0), _row("triton", 1.0), _row("eager_cl", 8.0),
            _row("eager", 100.0, kind="model", op="DLKUNet-L", mode="infer", images_per_s=80.0, peak_mem_bytes=2e9),
            _row("compile", 50.0, kind="model", op="DLKUNet-L", mode="infer", images_per_s=160.0)]
    text = report.markdown(_doc(rows, skipped=[{"test": "t", "reason": "backend cuda unavailable"}] * 3,
                                failed=[{"test": "u", "when": "call", "error": "boom"}]))
    op_lines = [line for line in text.splitlines() if line.startswith("| dwconv_bn_act")]
    assert len(op_lines) == 1  # one row per case, one column per backend
    header = next(line for line in text.splitlines() if line.startswith("| op |"))
    assert header.split("|")[-4:-1] == [" eager ", " eager_cl ", " triton "]
    assert "(4.00x, 50%)" in op_lines[0] and "(0.50x, 50%)" in op_lines[0]
    # floor: 616 MB at 3 TB/s is 0.205 ms
    assert "| 0.205 |" in op_lines[0]
    model_line = next(line for line in text.splitlines() if line.startswith("| DLKUNet-L"))
    assert "(2.00x" in model_line and "160 img/s" in model_line and "2 GB" in model_line
    assert "3 x backend cuda unavailable" in text and "u (call): boom" in text
    assert "cuda (not built)" in text


def test_rows_without_eager_twin_have_no_speedup():
    text = report.markdown(_doc([_row("triton", 1.0)]))
    line = next(line for line in text.splitlines() if line.startswith("| dwconv_bn_act"))
    assert "| 1 |" in line and "x," not in line


def test_main_writes_markdown_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "r.json"
    src.write_text(json.dumps(_doc([_row("eager", 2.0), _row("cpu", 1.0),
                                    _row("eager", 2.0, pass_="fwd+bwd"), _row("compile", 4.0, pass_="fwd+bwd")])))
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    assert report.main([str(src), "--md", str(md), "--png", str(png)]) == 0
    assert "| dwconv_bn_act |" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_main_rejects_a_file_that_is_not_results(tmp_path, capsys):
    src = tmp_path / "x.json"
    src.write_text("[1, 2]")
    assert report.main([str(src)]) == 2
    assert "not a dlkunet benchmark results file" in capsys.readouterr().err


def test_floor_of_eval_dwconv_at_the_spec_shape():
    # kernels.md: float32 NCHW at N=16, C=96, 224x224, one tensor is 308 MB; eval moves at least two.
    one = 16 * 96 * 224 * 224 * 4
    assert one == pytest.approx(308e6, rel=0.002)
    fwd = floors.dwconv_bytes(16, 96, 96, 224, 224, 3, torch.float32, backward=False)
    conv_w, bn = (96 * 9 + 96 + 96 * 96 + 96) * 4, 4 * 96 * 4  # bn: gamma, beta, running mean, var
    assert fwd == 2 * one + conv_w + bn
    # backward: grad_y and x read, grad_x written; weights read, conv/gamma/beta gradients written
    bwd = floors.dwconv_bytes(16, 96, 96, 224, 224, 3, torch.float32, backward=True) - fwd
    assert bwd == 3 * one + (conv_w + bn) + (conv_w + 2 * 96 * 4)
    assert floors.dwconv_bytes(16, 192, 96, 224, 224, 3, torch.bfloat16, False) > 3 * one / 2


def test_floor_of_lka():
    act = 2 * 8 * 10 * 12 * 2
    weights = (8 * 25 + 8 + 8 * 49 + 8 + 64 + 8) * 2
    assert floors.lka_bytes(2, 8, 10, 12, 5, 7, torch.bfloat16, False) == 2 * act + weights
    assert floors.lka_bytes(2, 8, 10, 12, 5, 7, torch.bfloat16, True) == 5 * act + 3 * weights


def test_model_floor_counts_every_unit():
    from dlkunet.models import DLKUNetS

    torch.manual_seed(0)
    net = DLKUNetS(base_width=4)
    x = torch.randn(2, 1, 16, 16)
    got = floors.model_bytes(net.eval(), x, train=False)
    # At least: each of the 3 Blocks' 2 DWConvBNActs and 1 LKA per level reads and writes a tensor.
    act0 = 2 * 4 * 16 * 16 * 4
    assert got["fwd"] > 2 * 3 * act0
    params = sum(p.numel() for p in net.parameters()) * 4
    assert got["fwd"] > params
    trained = floors.model_bytes(net.train(), x, train=True)
    assert trained["train_step"] > 2 * trained["fwd"] + 5 * params - 1


def test_full_size_has_the_spec_shapes():
    full = shapes.get_size("full")
    dw = shapes.dwconv_cases(full)
    levels = [(96, 224), (192, 112), (384, 56), (768, 28), (1536, 14)]
    assert [(c.cin, c.h) for c in dw if c.where == "enc"] == levels
    assert all(c.cout == c.cin for c in dw if c.where == "enc")
    assert [(c.cin, c.cout, c.h) for c in dw if c.where == "dec"] == [(2 * c, c, h) for c, h in levels[:4]]
    assert all(c.n == 16 for c in dw) and [(c.c, c.h) for c in shapes.lka_cases(full)] == levels
    assert {(m.variant, m.batch) for m in shapes.model_cases(full)} == {(v, b) for v in "SML" for b in (1, 8, 16)}
    with pytest.raises(ValueError, match="unknown --bench-size"):
        shapes.get_size("huge")


harness = _load("harness")


def test_cuda_event_timer_keeps_microsecond_resolution_late_in_a_run(monkeypatch):
    # Events at t = 10 min and 10 min + 3 us: float32 ms from a base event would lose the 3 us.
    times = iter([0.0, 600_000.0, 600_000.003, 600_000.0035])

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.t = next(times)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            import numpy as np
            return float(np.float32(other.t - self.t))  # CUDA returns float32 milliseconds

    monkeypatch.setattr(harness.torch.cuda, "Event", FakeEvent)
    clock = harness.CudaEventTimer()
    readings = [clock() for _ in range(4)]
    assert readings[0] == 0.0 and readings[1] == pytest.approx(600.0)
    assert readings[2] - readings[1] == pytest.approx(3e-6, rel=1e-3)
    assert readings[3] - readings[2] == pytest.approx(0.5e-6, rel=1e-3)


def test_speedups_pair_rows_of_the_same_case_only():
    rows = [_row("eager", 4.0), _row("cuda", 2.0), _row("cuda", 1.0, dtype="bfloat16"),
            _row("eager", 10.0, mode="train", pass_="fwd+bwd"), _row("triton", 20.0, mode="train", pass_="fwd+bwd")]
    harness.annotate_speedups(rows)
    assert [r["speedup_vs_eager"] for r in rows] == [1.0, 2.0, None, 1.0, 0.5]


def test_channels_last_rows_are_also_compared_with_eager_in_the_same_layout():
    rows = [_row("eager", 4.0), _row("eager_cl", 2.0), _row("cpu", 2.0), _row("cpu_cl", 1.0)]
    harness.annotate_speedups(rows)
    cpu, cpu_cl = rows[2], rows[3]
    assert (cpu["speedup_vs_eager"], cpu["speedup_same_layout"]) == (2.0, 2.0)
    assert (cpu_cl["speedup_vs_eager"], cpu_cl["speedup_same_layout"]) == (4.0, 2.0)
    assert "speedup_same_layout" not in rows[1]  # peers are not fused rows
    table = report.markdown(_doc(rows))
    assert "1 (4.00x, 2.00x cl, 50%)" in table and "2 (2.00x, 50%)" in table


def test_rotation_cycles_sets_and_prepares_each():
    seen = []
    rot = harness.Rotation([("a",), ("b",), ("c",)], prepare=seen.append)
    assert [rot()[0] for _ in range(5)] == ["a", "b", "c", "a", "b"]
    assert len(seen) == 5
    big = harness.rotation_count(1 << 40, torch.device("cpu"))
    small = harness.rotation_count(1, torch.device("cpu"))
    assert big == 2 and small == 8


def test_pointwise_bound_rows_are_compared_in_their_layout_and_tabled_beside_eager():
    rows = [_row("eager", 4.0), _row("eager_cl", 2.0), _row("cpu_cl", 1.0), _row("eager_pw", 3.2),
            _row("eager_pw_cl", 1.6)]
    harness.annotate_speedups(rows)
    bound, bound_cl = rows[3], rows[4]
    assert (bound["speedup_vs_eager"], bound["speedup_same_layout"]) == (1.25, 1.25)
    assert (bound_cl["speedup_vs_eager"], bound_cl["speedup_same_layout"]) == (2.5, 1.25)
    header = next(line for line in report.markdown(_doc(rows)).splitlines() if line.startswith("| op |"))
    assert [c.strip() for c in header.split("|")[-6:-1]] == ["eager", "eager_cl", "eager_pw", "eager_pw_cl", "cpu_cl"]


def _run(rows, when, commit, **env):
    base = {"device_type": "cpu", "cpu_model": "Test CPU", "torch_threads": 2, "torch": "2.x",
            "timestamp_utc": when, "git_commit": commit, "bandwidth": {"bytes_per_s": 2.0e10}}
    return {"schema": "dlkunet-bench/1", "environment": dict(base, **env), "rows": rows}


def test_table_rows_split_the_layout_from_the_backend_and_keep_provenance():
    rows = report.table_rows(_run([_row("eager_cl", 2.0), _row("cpu", 1.0)], "2026-01-01T00:00:00Z", "abc1234"))
    assert [(r["backend"], r["layout"]) for r in rows] == [("eager", "channels_last"), ("cpu", "nchw")]
    assert rows[0]["shape"] == "N=16 Cin=96 Cout=96 H=224 W=224 k=3"
    assert report.shape_dict(rows[0]["shape"]) == dict(N=16, Cin=96, Cout=96, H=224, W=224, k=3)
    assert rows[1]["machine"] == "Test CPU, 2 threads" and rows[1]["commit"] == "abc1234"
    assert rows[1]["bandwidth_GBps"] == 20.0
    gpu = {"device_type": "cuda", "device_name": "NVIDIA H200"}
    assert report.device_kind(gpu) == "h200" and report.device_kind({"device_type": "cpu"}) == "cpu"


def test_merge_upserts_by_key_newest_run_wins(tmp_path):
    path = str(tmp_path / "cpu.csv")
    old = _run([_row("eager", 4.0), _row("cpu", 2.0), _row("cpu", 3.0, mode="train", pass_="fwd+bwd")],
               "2026-01-01T00:00:00Z", "old0000")
    new = _run([_row("eager", 4.0), _row("cpu", 1.0)], "2026-02-01T00:00:00Z", "new0000")
    # given newest first: the merge orders runs by date, so the older run cannot overwrite the newer
    assert report.merge_into(path, [new, old]) == 3
    table = {(r["backend"], r["mode"]): r for r in report.read_table(path)}
    assert table[("cpu", "eval")]["median_ms"] == 1.0 and table[("cpu", "eval")]["commit"] == "new0000"
    assert table[("cpu", "train")]["median_ms"] == 3.0 and table[("cpu", "train")]["commit"] == "old0000"
    # another machine's row of the same case is another key
    other = _run([_row("cpu", 9.0)], "2026-03-01T00:00:00Z", "x", cpu_model="Other CPU")
    assert report.merge_into(path, [other]) == 4
    text = report.markdown(report.load(path))
    assert "Other CPU, 2 threads; Test CPU, 2 threads" in text and "commits new0000 .. x" in text


def test_a_table_renders_like_the_run_it_came_from(tmp_path):
    run = _run([_row("eager", 4.0), _row("eager_cl", 2.0), _row("cpu_cl", 1.0)], "2026-01-01T00:00:00Z", "c")
    harness.annotate_speedups(run["rows"])
    path = str(tmp_path / "t.csv")
    report.merge_into(path, [run])
    line = next(x for x in report.markdown(report.load(path)).splitlines() if x.startswith("| dwconv_bn_act"))
    assert "1 (4.00x, 2.00x cl, 50%)" in line
    assert "| 30.8 |" in line  # floor: 616 MB at the row's own 20 GB/s


def test_summary_gives_median_and_range_against_eager_and_the_best_peer():
    shapes_ = [dict(N=1, Cin=c, Cout=c, H=8, W=8, k=3) for c in (8, 16, 32)]
    rows = []
    for shape, (eager, eager_cl, cpu) in zip(shapes_, [(4.0, 2.0, 1.0), (4.0, 8.0, 2.0), (3.0, 3.0, 6.0)]):
        rows += [_row("eager", eager, shape=shape), _row("eager_cl", eager_cl, shape=shape),
                 _row("cpu", cpu, shape=shape)]
    lines = report.summary({"rows": rows})
    cpu = next(x for x in lines if x.startswith("| cpu |"))
    # vs eager: 4, 2, 0.5 -> median 2; vs the best peer (fastest of eager, eager_cl): 2, 2, 0.5
    assert cpu == "| cpu | inference | 2.00x (0.50-4.00, n=3) | 2.00x (0.50-2.00, n=3) |"
    assert report.summary({"rows": rows}, per_op=True)[2].startswith("| eager_cl | dwconv_bn_act | inference |")


def test_merge_command_and_errors_table(tmp_path, capsys):
    src, into = tmp_path / "run.json", str(tmp_path / "cpu.csv")
    src.write_text(json.dumps(_run([_row("eager", 2.0)], "2026-01-01T00:00:00Z", "c")))
    assert report.main(["--merge", str(src), "--into", into]) == 0
    assert "1 rows" in capsys.readouterr().out
    errs = str(tmp_path / "e.csv")
    row = dict(op="lka_gate", backend="cpu", mode="-", dtype="float32", layout="nchw", tensor="out",
               machine="m", rel_error=1e-7)
    report.write_table(errs, [row], report.ERRORS_COLUMNS, report.ERRORS_KEY)
    target = str(tmp_path / "errors-cpu.csv")
    report.write_table(target, [dict(row, rel_error=5e-7), dict(row, tensor="grad_x")], report.ERRORS_COLUMNS,
                       report.ERRORS_KEY)
    assert report.main(["--merge", errs, "--into", target]) == 0
    got = {r["tensor"]: r["rel_error"] for r in report.read_table(target)}
    assert got == {"out": 1e-7, "grad_x": 1e-7}
