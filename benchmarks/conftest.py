"""pytest configuration of the benchmark suite.  Entry point:

    pytest benchmarks --benchmark-only [--bench-size full|cpu|quick] [--bench-json PATH]
                                       [--bench-table PATH.csv] [--bench-device auto|cuda|cpu]
                                       [--bench-budget SECONDS] [--bench-threads N]

``--bench-size`` defaults to ``full`` with a GPU and ``cpu`` without; CI runs ``quick``.
``--bench-json`` (or env ``DLKUNET_BENCH_OUT``) writes the run's JSON record (rewritten after every
row); ``--bench-table`` upserts the run's rows into a results table at the end
(``benchmarks/results/<device>.csv``); ``python benchmarks/report.py`` renders either as a markdown
table and a chart.  The run ends with a short summary (per backend and mode: median and range of
the speedup over eager and over the best peer); ``-v`` adds the full table, and
``--bench-pytest-table`` brings back pytest-benchmark's own per-test table.
``--bench-budget`` skips, with that reason, every case that would start after SECONDS; cases run
most-informative first (fused backends and eager peers before torch.compile) so a short budget
keeps what matters.  Nothing here asserts anything about speed.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

# The suite's helper modules live beside this file.  Only this directory goes on sys.path, never
# the repository root (that would import the source tree's dlkunet instead of the installed one).
_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

import baselines  # noqa: E402
import harness  # noqa: E402
import shapes  # noqa: E402

_state = {}


def pytest_addoption(parser):
    group = parser.getgroup("dlkunet benchmarks")
    group.addoption("--bench-size", choices=shapes.SIZES, default=None,
                    help="shapes and effort: full (GPU default), cpu (CPU default), quick (CI smoke run)")
    group.addoption("--bench-device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="where to run (auto: cuda if available)")
    group.addoption("--bench-json", default=None, metavar="PATH",
                    help="write the results JSON here (default: env DLKUNET_BENCH_OUT, else none)")
    group.addoption("--bench-table", default=None, metavar="PATH.csv",
                    help="upsert this run's rows into a results table (e.g. benchmarks/results/cpu.csv)")
    group.addoption("--bench-pytest-table", action="store_true",
                    help="also print pytest-benchmark's own per-test table (it repeats the results)")
    group.addoption("--bench-budget", type=float, default=0.0, metavar="SECONDS",
                    help="skip cases that would start after this many seconds (0: no limit)")
    group.addoption("--bench-threads", type=int, default=0, metavar="N",
                    help="torch.set_num_threads(N) for the run (0: torch's default); recorded")


def _device(config) -> torch.device:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA GPU is visible to PyTorch")
    return torch.device(choice)


def pytest_configure(config):
    device = _device(config)
    size = shapes.get_size(config.getoption("--bench-size") or ("full" if device.type == "cuda" else "cpu"))
    path = config.getoption("--bench-json") or os.environ.get("DLKUNET_BENCH_OUT") or None
    _state.update(device=device, size=size, path=path, start=time.monotonic(), bench=None)
    threads = config.getoption("--bench-threads")
    if threads < 0:
        raise pytest.UsageError(f"--bench-threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    # Compile rows reset dynamo per case; never let a recompile limit silently fall back to eager.
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True


def pytest_generate_tests(metafunc):
    size, device = _state["size"], _state["device"]
    names = metafunc.fixturenames
    if "dw_case" in names:
        cases = shapes.dwconv_cases(size)
        metafunc.parametrize("dw_case", cases, ids=[c.id for c in cases])
    if "lka_case" in names:
        cases = shapes.lka_cases(size)
        metafunc.parametrize("lka_case", cases, ids=[c.id for c in cases])
    if "model_case" in names:
        cases = shapes.model_cases(size)
        metafunc.parametrize("model_case", cases, ids=[c.id for c in cases])
    if "dtype" in names:
        dts = shapes.dtypes(device.type)
        metafunc.parametrize("dtype", dts, ids=[str(d).replace("torch.", "") for d in dts])
    if "backend" in names:
        metafunc.parametrize("backend", baselines.BACKENDS)


def _priority(item):
    """Run order, so that a short --bench-budget loses the least: (1) fused backends and eager
    peers on the operators as inference and training run them, (2) models, (3) torch.compile of
    those operator cases (a compile per case), (4) the other operator modes, (5) compiled models.
    Within a tier, level by level, so an early stop still covers both operators."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    backend = params.get("backend", "")
    combo = (params.get("mode"), params.get("pass_"))
    is_model = "model_case" in params
    main_combo = combo in shapes.DW_COMBOS[:2] or combo in shapes.LKA_COMBOS
    if is_model:
        tier = 4 if backend == "compile" else 1
    elif main_combo:
        tier = 2 if backend == "compile" else 0
    else:
        tier = 3
    case = params.get("dw_case") or params.get("lka_case") or params.get("model_case")
    dts = shapes.dtypes(_state["device"].type)
    return (tier, getattr(case, "index", 0), dts.index(params["dtype"]) if params.get("dtype") in dts else 0,
            item.path.name, item.originalname, str(combo),
            baselines.BACKENDS.index(backend) if backend in baselines.BACKENDS else 0)


def _ours(path) -> bool:
    """Whether a test or report belongs to this suite (these hooks see every test in a session)."""
    return Path(str(path)).resolve().is_relative_to(_HERE)


def pytest_collection_modifyitems(config, items):
    mine = sorted((i for i in items if _ours(i.path)), key=_priority)
    items[:] = [i for i in items if not _ours(i.path)] + mine
    if _state["device"].type == "cuda":
        # pytest-benchmark reads its clock from this marker: GPU time between CUDA events.
        timer = harness.CudaEventTimer()
        for item in mine:
            item.add_marker(pytest.mark.benchmark(timer=timer))


# Seconds a case is expected to need beyond its timing: a whole-model compile takes a minute or
# more, so it is not started when less than that remains of the budget.
_COMPILE_COST = {"model": 90.0, "op": 10.0}


@pytest.fixture(autouse=True)
def _budget(request):
    budget = request.config.getoption("--bench-budget")
    if not budget:
        return
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    need = 0.0
    if params.get("backend") == "compile" and _state["size"].compile_backend == "inductor":
        need = _COMPILE_COST["model" if "model_case" in params else "op"]
    if time.monotonic() - _state["start"] + need > budget:
        pytest.skip(f"--bench-budget of {budget:.0f} s used up before this case started"
                    + (f" (a compile case needs ~{need:.0f} s)" if need else ""))


@pytest.fixture(scope="session")
def bench():
    device, size = _state["device"], _state["size"]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        copy_bytes = min(1 << 30, free // 8)
    else:
        copy_bytes = (64 << 20) if size.name == "quick" else (256 << 20)
    env = harness.environment(device, size.name)
    env["size_notes"] = size.notes
    env["timing"] = dict(size.timing.__dict__, clock="cuda events" if device.type == "cuda" else "perf_counter")
    env["compile_backend"] = size.compile_backend
    record = harness.Record(_state["path"], env)
    _state["bench"] = harness.Bench(device, size, record, copy_bytes)
    return _state["bench"]


def pytest_runtest_logreport(report):
    bench = _state.get("bench")
    if bench is None or not _ours(report.fspath):
        return
    if report.skipped and report.when in ("setup", "call"):
        bench.record.skipped.append({"test": report.nodeid, "reason": harness.short_reason(report.longrepr)})
    elif report.failed:
        bench.record.failed.append({"test": report.nodeid, "when": report.when,
                                    "error": harness.short_reason(report.longreprtext)})


def pytest_sessionfinish(session, exitstatus):
    bench = _state.get("bench")
    if bench is None:
        return
    bench.record.save()
    table = session.config.getoption("--bench-table")
    if table and bench.record.rows:
        import report

        _state["table_rows"] = report.merge_into(table, [bench.record.document()])


def pytest_benchmark_group_stats(config, benchmarks, group_by):
    """pytest-benchmark's table repeats, row by row and 196 characters wide, what the summary below
    says; it is printed only when asked for (an empty grouping makes pytest-benchmark print nothing)."""
    return None if config.getoption("--bench-pytest-table") else []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bench = _state.get("bench")
    if bench is None or not bench.record.rows:
        return
    import report

    doc = bench.record.document()
    if config.getoption("verbose") > 0:
        terminalreporter.section("dlkunet benchmark results")
        terminalreporter.write_line(report.markdown(doc))
    terminalreporter.section("dlkunet speedups (median (min-max, cases); > 1 is faster)")
    env = doc["environment"]
    terminalreporter.write_line(f"{env.get('device_name')}, torch {env.get('torch')}, {len(doc['rows'])} rows, "
                                f"{len(doc['skipped'])} skipped, {len(doc['failed'])} failed")
    for line in report.summary(doc):
        terminalreporter.write_line(line)
    if bench.record.path:
        terminalreporter.write_line(f"results JSON: {bench.record.path} (python benchmarks/report.py PATH: full table)")
    elif not config.getoption("verbose"):
        terminalreporter.write_line("full table: -v, or --bench-json PATH and python benchmarks/report.py PATH")
    if _state.get("table_rows"):
        terminalreporter.write_line(f"results table: {config.getoption('--bench-table')} "
                                    f"({_state['table_rows']} rows)")
