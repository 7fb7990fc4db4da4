"""Turn a benchmark results JSON into a markdown table and a bar chart of speedups against eager.

    python benchmarks/report.py RESULTS.json [--md OUT.md] [--png OUT.png]

Without --md the markdown goes to stdout.  The chart needs matplotlib; without it the markdown is
still written and the missing chart is reported.  Needs neither torch nor dlkunet.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional

BACKEND_ORDER = ("eager", "eager_cl", "compile", "eager_pw", "eager_pw_cl", "torch", "triton", "cuda", "cpu",
                 "triton_cl", "cuda_cl", "cpu_cl", "auto", "auto_cl")


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
        if not bandwidth or not row.get("bytes"):
            return "-"
        return f"{row['bytes'] / bandwidth * 1e3:.3g}"
    return f


def markdown(doc: dict) -> str:
    env, rows = doc.get("environment", {}), [r for r in doc.get("rows", []) if r.get("median_ms")]
    _speedups(rows)
    bw = env.get("bandwidth", {}).get("bytes_per_s")
    out = [f"# dlkunet benchmarks: {env.get('device_name', '?')}", ""]
    facts = [("size", env.get("bench_size")), ("when", env.get("timestamp_utc")), ("commit", env.get("git_commit")),
             ("torch", env.get("torch")), ("triton", env.get("triton")), ("python", env.get("python")),
             ("driver", env.get("driver")), ("CUDA", env.get("cuda_runtime")), ("CPU", env.get("cpu_model")),
             ("threads", env.get("torch_threads")),
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a JSON file written by pytest benchmarks --bench-json")
    parser.add_argument("--md", help="write the markdown here (default: stdout)")
    parser.add_argument("--png", help="write the speedup chart here (needs matplotlib)")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "rows" not in doc:
        print(f"report.py: {args.results} is not a dlkunet benchmark results file (no 'rows')", file=sys.stderr)
        return 2
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
