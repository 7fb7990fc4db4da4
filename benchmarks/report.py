"""The benchmark results table: per-device CSV files, their markdown, their chart and their summary.

    python benchmarks/report.py TABLE.csv|RUN.json [--md OUT.md] [--png OUT.png] [--summary]
    python benchmarks/report.py --merge RUN.json [RUN.json ...] --into benchmarks/results/DEVICE.csv
    python benchmarks/report.py --merge errors.csv --into benchmarks/results/errors-DEVICE.csv

Recorded results live in one CSV per device kind (``benchmarks/results/cpu.csv``, ``h200.csv``),
one row per measurement, keyed by ``KEY`` (op, backend, mode, pass, dtype, shape, layout,
machine); a newer measurement of the same key replaces the older one (an upsert), so the table
holds the latest figure of each case and git holds the history.  Every row carries the versions,
commit and date it was measured with; speedups are the ratios measured in that row's own run.

A run's JSON record (``pytest benchmarks --bench-json``) renders the same way, and ``--merge``
upserts it into a table.  Without --md the markdown goes to stdout.  The chart needs matplotlib;
without it the markdown is still written and the missing chart is reported.  Needs neither torch
nor dlkunet.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections import OrderedDict, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence

BACKEND_ORDER = ("eager", "eager_cl", "compile", "eager_pw", "eager_pw_cl", "torch", "triton", "cuda", "cpu",
                 "triton_cl", "cuda_cl", "cpu_cl", "auto", "auto_cl")


# ----------------------------------------------------------------------------- the keyed table

KEY = ("op", "backend", "mode", "pass", "dtype", "shape", "layout", "machine")
VALUES = ("kind", "where", "median_ms", "iqr_ms", "min_ms", "rounds", "bytes", "bandwidth_fraction",
          "speedup_vs_eager", "speedup_same_layout", "images_per_s", "peak_mem_bytes", "params")
PROVENANCE = ("bench_size", "threads", "torch", "triton", "python", "driver", "cuda", "bandwidth_GBps",
              "commit", "date")
COLUMNS = KEY + VALUES + PROVENANCE
# benchmarks/errors.py's table: each backend's relative error against float64, per output and gradient.
ERRORS_KEY = ("op", "backend", "mode", "dtype", "layout", "tensor", "machine")
ERRORS_COLUMNS = ERRORS_KEY + ("rel_error", "torch", "triton", "triton_interpret", "commit", "date")
_NUMERIC = {"rel_error", "median_ms", "iqr_ms", "min_ms", "rounds", "bytes", "bandwidth_fraction", "speedup_vs_eager",
            "speedup_same_layout", "images_per_s", "peak_mem_bytes", "params", "threads", "bandwidth_GBps"}


def shape_text(shape: dict) -> str:
    """A shape dict as the table keys it: ``N=2 Cin=96 Cout=96 H=64 W=64 k=3`` (the harness's order)."""
    return " ".join(f"{k}={v}" for k, v in shape.items())


def shape_dict(text: str) -> dict:
    out = {}
    for part in text.split():
        k, _, v = part.partition("=")
        out[k] = int(v) if re.fullmatch(r"-?\d+", v) else v
    return out


def machine(env: dict) -> str:
    """Where a run measured: the GPU's name, or the CPU's model and the threads torch used."""
    if env.get("device_type") == "cuda":
        return str(env.get("device_name", "?"))
    return f"{env.get('cpu_model') or env.get('device_name') or '?'}, {env.get('torch_threads', '?')} threads"


def device_kind(env: dict) -> str:
    """The results file a run belongs in: ``cpu``, or the GPU's model (``NVIDIA H200`` -> ``h200``)."""
    if env.get("device_type") != "cuda":
        return "cpu"
    name = re.sub(r"^(nvidia|amd)\s+", "", str(env.get("device_name", "gpu")), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def table_rows(doc: dict) -> List[dict]:
    """A run's JSON record as table rows (backend ``cpu_cl`` -> backend ``cpu``, layout ``channels_last``)."""
    env = doc.get("environment", {})
    bw = env.get("bandwidth", {}).get("bytes_per_s")
    provenance = {"bench_size": env.get("bench_size"), "threads": env.get("torch_threads"),
                  "torch": env.get("torch"), "triton": env.get("triton"), "python": env.get("python"),
                  "driver": env.get("driver"), "cuda": env.get("cuda_runtime"),
                  "bandwidth_GBps": round(bw / 1e9, 2) if bw else None,
                  "commit": env.get("git_commit"), "date": env.get("timestamp_utc")}
    out = []
    for r in doc.get("rows", []):
        if not r.get("median_ms"):
            continue
        cl = r["backend"].endswith("_cl")
        row = {"op": r["op"], "backend": r["backend"][:-3] if cl else r["backend"], "mode": r["mode"],
               "pass": r["pass"], "dtype": r["dtype"], "shape": shape_text(r["shape"]),
               "layout": "channels_last" if cl else "nchw", "machine": machine(env)}
        row.update({k: r.get(k) for k in VALUES})
        row.update(provenance)
        out.append(row)
    return out


def _key(row: dict, key: Sequence[str] = KEY) -> tuple:
    return tuple(str(row[k]) for k in key)


def read_table(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in _NUMERIC & set(r):
            v = float(r[k]) if r[k] not in ("", None) else None
            r[k] = int(v) if v is not None and v.is_integer() else v
    return rows


def write_table(path: str, rows: Iterable[dict], columns: Sequence[str] = COLUMNS,
                key: Sequence[str] = KEY) -> None:
    """Sorted by key (machine first), so that a rewrite only shows the rows that changed in a diff."""
    order = ["machine"] + [k for k in key if k != "machine"]
    rows = sorted(rows, key=lambda r: tuple(str(r.get(k)) for k in order))
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in columns})
    os.replace(tmp, path)


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}" if not v.is_integer() else str(int(v))
    return v


def upsert(table: List[dict], new: Sequence[dict], key: Sequence[str] = KEY) -> List[dict]:
    """The table with ``new`` rows replacing those of the same key (and added where the key is new)."""
    merged = OrderedDict((_key(r, key), r) for r in table)
    for r in new:
        merged[_key(r, key)] = r
    return list(merged.values())


def merge_into(path: str, docs: Sequence[dict]) -> int:
    """Upsert runs (oldest first, so that the newest measurement of a key wins); returns the row count."""
    docs = sorted(docs, key=lambda d: d.get("environment", {}).get("timestamp_utc") or "")
    table = read_table(path)
    for doc in docs:
        table = upsert(table, table_rows(doc))
    write_table(path, table)
    return len(table)


def merge_table(path: str, source: str) -> int:
    """Upsert the rows of another table of the same kind (benchmark or errors, told by its columns)."""
    new = read_table(source)
    errors = bool(new) and "tensor" in new[0]
    key, columns = (ERRORS_KEY, ERRORS_COLUMNS) if errors else (KEY, COLUMNS)
    table = upsert(read_table(path), new, key)
    write_table(path, table, columns, key)
    return len(table)


def as_document(table: List[dict]) -> dict:
    """Table rows back in the run record's shape, for ``markdown`` and ``chart``."""
    def order(t):
        numbers = tuple(v for v in shape_dict(t["shape"]).values() if isinstance(v, int))
        return (t.get("kind") or "", t["op"], t["mode"], t["pass"], t["dtype"], numbers, t["layout"], t["backend"])

    rows = []
    for t in sorted(table, key=order):
        r = {k: t.get(k) for k in VALUES + ("bandwidth_GBps",) if t.get(k) not in (None, "")}
        r.update(op=t["op"], mode=t["mode"], dtype=t["dtype"], shape=shape_dict(t["shape"]),
                 backend=t["backend"] + ("_cl" if t["layout"] == "channels_last" else ""))
        r["pass"] = t["pass"]
        rows.append(r)

    def span(name):
        values = sorted({str(t[name]) for t in table if t.get(name) not in (None, "")})
        return values[0] if len(values) == 1 else (f"{values[0]} .. {values[-1]}" if values else None)

    machines = sorted({t["machine"] for t in table})
    env = {"device_name": "; ".join(machines) or "?", "torch": span("torch"), "triton": span("triton"),
           "python": span("python"), "driver": span("driver"), "cuda_runtime": span("cuda"),
           "threads_span": span("threads"), "commit_span": span("commit"), "date_span": span("date")}
    return {"schema": "dlkunet-bench-table/1", "environment": env, "rows": rows}


def load(path: str) -> dict:
    """A results table (.csv) or a run's JSON record, as a document ``markdown`` and ``chart`` take."""
    if path.endswith(".csv"):
        return as_document(read_table(path))
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "rows" not in doc:
        raise ValueError(f"{path} is not a dlkunet benchmark results file (no 'rows')")
    return doc


# ----------------------------------------------------------------------------- rendering

def _backends(rows: List[dict]) -> List[str]:
    present = {r["backend"] for r in rows}
    return [b for b in BACKEND_ORDER if b in present] + sorted(present - set(BACKEND_ORDER))


def _speedups(rows: List[dict]) -> None:
    """Fill speedup_vs_eager where a file lacks it (same rule as the harness)."""
    def key(r):
        return (r["kind"], r["op"], json.dumps(r["shape"], sort_keys=True), r["dtype"], r["mode"], r["pass"])
    eager = {key(r): r["median_ms"] for r in rows if r["backend"] == "eager" and r.get("median_ms")}
    for r in rows:
        if r.get("speedup_vs_eager") is None and eager.get(key(r)) and r.get("median_ms"):
            r["speedup_vs_eager"] = eager[key(r)] / r["median_ms"]


def _shape(row: dict) -> str:
    s = row["shape"]
    if row["kind"] == "model":
        return f"b{s['N']} {s['H']}x{s['W']}" + ("" if s.get("C", 96) == 96 else f" C{s['C']}")
    if "Cin" in s:
        return f"N{s['N']} {s['Cin']}->{s['Cout']} {s['H']}x{s['W']}"
    return f"N{s['N']} C{s['C']} {s['H']}x{s['W']}"


def _bytes(n: Optional[float]) -> str:
    if not n:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return ""
    text = f"{row['median_ms']:.3g}"
    if row.get("speedup_vs_eager"):
        text += f" ({row['speedup_vs_eager']:.2f}x"
        if row["backend"].endswith("_cl") and row.get("speedup_same_layout"):
            text += f", {row['speedup_same_layout']:.2f}x cl"
        text += f", {row['bandwidth_fraction']:.0%})" if row.get("bandwidth_fraction") is not None else ")"
    if row["kind"] == "model" and row.get("images_per_s"):
        text += f" {row['images_per_s']:.3g} img/s"
        if row.get("peak_mem_bytes"):
            text += f" {_bytes(row['peak_mem_bytes'])}"
    return text


def _table(rows: List[dict], lead: List[str], lead_of, floor_ms) -> List[str]:
    backends = _backends(rows)
    groups: Dict[tuple, Dict[str, dict]] = OrderedDict()
    for r in rows:
        groups.setdefault(lead_of(r), {})[r["backend"]] = r
    head = lead + ["floor ms"] + backends
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_backend in groups.items():
        any_row = next(iter(by_backend.values()))
        cells = list(key) + [floor_ms(any_row)] + [_cell(by_backend.get(b)) for b in backends]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _floor_ms(bandwidth: Optional[float]):
    def f(row):
        bw = row["bandwidth_GBps"] * 1e9 if row.get("bandwidth_GBps") else bandwidth  # a table row's own run
        if not bw or not row.get("bytes"):
            return "-"
        return f"{row['bytes'] / bw * 1e3:.3g}"
    return f


def markdown(doc: dict) -> str:
    env, rows = doc.get("environment", {}), [r for r in doc.get("rows", []) if r.get("median_ms")]
    _speedups(rows)
    bw = env.get("bandwidth", {}).get("bytes_per_s")
    out = [f"# dlkunet benchmarks: {env.get('device_name', '?')}", ""]
    facts = [("size", env.get("bench_size")), ("when", env.get("timestamp_utc")), ("commit", env.get("git_commit")),
             ("torch", env.get("torch")), ("triton", env.get("triton")), ("python", env.get("python")),
             ("driver", env.get("driver")), ("CUDA", env.get("cuda_runtime")), ("CPU", env.get("cpu_model")),
             ("threads", env.get("torch_threads") or env.get("threads_span")),
             ("measured", env.get("date_span")), ("commits", env.get("commit_span")),
             ("load average at start", env.get("loadavg_at_start") if env.get("device_type") == "cpu" else None),
             ("bandwidth", f"{bw / 1e9:.4g} GB/s ({env['bandwidth'].get('method')})" if bw else None)]
    out.append(", ".join(f"{k} {v}" for k, v in facts if v not in (None, "")))
    if env.get("size_notes"):
        out += ["", f"Note: {env['size_notes']}."]
    backends = env.get("backends", {})
    missing = [f"{b} ({v.get('reason')})" for b, v in backends.items() if not v.get("available")]
    if missing:
        out += ["", "Unavailable backends: " + "; ".join(missing) + "."]
    out += ["", "Cells: median ms (speedup vs eager in this run; for *_cl rows also vs eager_cl, the same "
                "layout, marked cl; achieved fraction of the bandwidth floor). "
                "floor ms = bytes that must move / measured copy bandwidth. "
                "eager_pw: eager's pointwise 1x1 convolution alone; its speedup is the most any fusion "
                "of dwconv_bn_act can gain over eager with the same GEMM."]
    ops = [r for r in rows if r["kind"] == "op"]
    if ops:
        out += ["", "## Operators", ""]
        out += _table(ops, ["op", "shape", "dtype", "mode", "pass"],
                      lambda r: (r["op"], _shape(r), r["dtype"], r["mode"], r["pass"]), _floor_ms(bw))
    models = [r for r in rows if r["kind"] == "model"]
    if models:
        out += ["", "## Models (cells add images/s and peak memory)", ""]
        out += _table(models, ["model", "shape", "dtype", "mode"],
                      lambda r: (r["op"], _shape(r), r["dtype"], r["mode"]), _floor_ms(bw))
    reasons = defaultdict(int)
    for s in doc.get("skipped", []):
        reasons[s.get("reason", "")] += 1
    if reasons:
        out += ["", "## Skipped", ""] + [f"- {n} x {why}" for why, n in sorted(reasons.items(), key=lambda t: -t[1])]
    if doc.get("failed"):
        out += ["", "## Failed", ""] + [f"- {f['test']} ({f.get('when')}): {f.get('error')}" for f in doc["failed"]]
    return "\n".join(out) + "\n"


def _geomean(values: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _color(backend: str) -> str:
    """One colour per backend in every panel and every chart."""
    palette = ("#7f7f7f", "#bcbd22", "#1f77b4", "#8c564b", "#c49c94", "#17becf", "#d62728", "#2ca02c", "#ff7f0e",
               "#ff9896", "#98df8a", "#ffbb78",  # *_cl: the light shade of their backend
               "#9467bd", "#c5b0d5")
    return palette[BACKEND_ORDER.index(backend)] if backend in BACKEND_ORDER else "#9467bd"


def chart(doc: dict, path: str) -> None:
    """Bars of speedup vs eager: ops as a geometric mean over shapes, models per case."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc.get("rows", []) if r.get("median_ms")]
    _speedups(rows)
    panels = []
    ops = [r for r in rows if r["kind"] == "op" and r.get("speedup_vs_eager") and r["backend"] != "eager"]
    if ops:
        groups = defaultdict(list)
        for r in ops:
            label = f"{r['op']}\n{r['mode'] + ' ' if r['mode'] != '-' else ''}{r['pass']} {r['dtype']}"
            groups[(label, r["backend"])].append(r["speedup_vs_eager"])
        panels.append(("operators (geometric mean over shapes)", {k: _geomean(v) for k, v in groups.items()}))
    models = [r for r in rows if r["kind"] == "model" and r.get("speedup_vs_eager") and r["backend"] != "eager"]
    if models:
        panels.append(("models", {(f"{r['op']} {_shape(r)}\n{r['mode']}", r["backend"]): r["speedup_vs_eager"]
                                  for r in models}))
    if not panels:
        panels.append(("no rows with an eager twin", {}))
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 4.5 * len(panels)), squeeze=False)
    for ax, (title, values) in zip(axes[:, 0], panels):
        labels = list(OrderedDict.fromkeys(k[0] for k in values))
        backends = [b for b in _backends([{"backend": k[1]} for k in values])]
        width = 0.8 / max(len(backends), 1)
        for i, b in enumerate(backends):
            xs = [j + i * width for j, lab in enumerate(labels) if (lab, b) in values]
            ys = [values[(lab, b)] for lab in labels if (lab, b) in values]
            ax.bar(xs, ys, width, label=b, color=_color(b))
        ax.axhline(1.0, color="black", linewidth=0.8)
        if values:
            ax.set_yscale("log")  # speedups and slowdowns alike
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("speedup vs eager (x)")
        ax.set_title(f"{doc.get('environment', {}).get('device_name', '?')}: {title}")
        if backends:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the summary

PEERS = ("eager", "eager_cl", "compile")
INFERENCE = {("eval", "fwd"), ("-", "fwd"), ("infer", "fwd")}
TRAINING = {("train", "fwd+bwd"), ("-", "fwd+bwd"), ("train", "step"), ("train", "fwd+bwd+step")}


def _mode_of(row: dict) -> str:
    """inference (eval forward, lka_gate forward, model inference), training (a forward+backward or a
    training step), or the partial combination itself (train fwd, eval fwd+bwd)."""
    combo = (row["mode"], row["pass"])
    if combo in INFERENCE or (row.get("kind") == "model" and row["mode"] == "infer"):
        return "inference"
    if combo in TRAINING or (row.get("kind") == "model" and row["mode"] == "train"):
        return "training"
    return f"{row['mode']} {row['pass']}"


def _range(values: List[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f}, n={len(values)})"


OURS = ("torch", "triton", "cuda", "cpu", "auto")


def summary(doc: dict, per_op: bool = False, only: Optional[Sequence[str]] = None) -> List[str]:
    """Per backend (and layout) and mode: median and range of the speedup over eager in the same
    layout, and over the best peer (the fastest of eager, eager_cl and torch.compile on the same
    case, the backend itself excluded), as markdown table lines; ``only``: these backends (in
    either layout)."""
    rows = [r for r in doc.get("rows", []) if r.get("median_ms")]
    cases: Dict[tuple, Dict[str, float]] = defaultdict(dict)
    for r in rows:
        cases[(r.get("kind"), r["op"], json.dumps(r["shape"], sort_keys=True), r["dtype"], r["mode"], r["pass"])][
            r["backend"]] = r["median_ms"]
    vs_eager: Dict[tuple, List[float]] = defaultdict(list)
    vs_peer: Dict[tuple, List[float]] = defaultdict(list)
    modes = []
    for (kind, op, _, _, mode, pass_), times in cases.items():
        label = _mode_of({"kind": kind, "mode": mode, "pass": pass_})
        subject = (op if kind == "op" else "models") if per_op else ""
        if (subject, label) not in modes:
            modes.append((subject, label))
        for backend, ms in times.items():
            if backend == "eager":
                continue
            same = times.get("eager_cl" if backend.endswith("_cl") and backend != "eager_cl" else "eager")
            if same:
                vs_eager[(backend, subject, label)].append(same / ms)
            peers = [times[p] for p in PEERS if p in times and p != backend]
            if peers:
                vs_peer[(backend, subject, label)].append(min(peers) / ms)
    order = ["inference", "training"]
    modes.sort(key=lambda m: (m[0], order.index(m[1]) if m[1] in order else len(order), m[1]))
    lines = ["| backend | " + ("what | " if per_op else "") + "mode | vs eager (same layout) | vs best peer |",
             "|---|" + ("---|" if per_op else "") + "---|---|---|"]
    for backend in _backends([{"backend": k[0]} for k in vs_eager.keys() | vs_peer.keys()]):
        if only is not None and backend.removesuffix("_cl") not in only:
            continue
        for subject, label in modes:
            k = (backend, subject, label)
            if k in vs_eager or k in vs_peer:
                lines.append(f"| {backend} | " + (f"{subject} | " if per_op else "")
                             + f"{label} | {_range(vs_eager.get(k, []))} | {_range(vs_peer.get(k, []))} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", help="a results table (.csv) or a run's JSON record "
                                                   "(pytest benchmarks --bench-json); with --merge, runs to upsert")
    parser.add_argument("--md", help="write the markdown here (default: stdout)")
    parser.add_argument("--png", help="write the speedup chart here (needs matplotlib)")
    parser.add_argument("--summary", action="store_true",
                        help="only the summary: per backend, op and mode, median and range of the speedups")
    parser.add_argument("--ours", action="store_true", help="with --summary: dlkunet's backends only, not the peers")
    parser.add_argument("--merge", action="store_true", help="upsert the given runs into --into")
    parser.add_argument("--into", metavar="TABLE.csv",
                        help="the table --merge writes (e.g. benchmarks/results/cpu.csv)")
    args = parser.parse_args(argv)
    if args.merge:
        if not args.into or not args.results:
            parser.error("--merge needs runs and --into TABLE.csv")
        docs = []
        for path in args.results:
            if path.endswith(".csv"):
                n = merge_table(args.into, path)
                continue
            try:
                docs.append(load(path))
            except ValueError as exc:
                print(f"report.py: {exc}", file=sys.stderr)
                return 2
        if docs:
            n = merge_into(args.into, docs)
        print(f"{args.into}: {n} rows after merging {len(args.results)} file(s)")
        return 0
    if len(args.results) != 1:
        parser.error("give one results table or run record (or --merge RUNS --into TABLE.csv)")
    try:
        doc = load(args.results[0])
    except ValueError as exc:
        print(f"report.py: {exc}", file=sys.stderr)
        return 2
    if args.summary:
        text = "\n".join(summary(doc, per_op=True, only=OURS if args.ours else None)) + "\n"
    else:
        text = markdown(doc)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if args.png:
        try:
            chart(doc, args.png)
        except ImportError as exc:
            print(f"report.py: no chart ({exc}); install matplotlib", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
