"""Measured error of every fused backend against the float64 reference, per dtype: the numbers behind
the equivalence tests' budgets (tests/ops), for closing notes and the GPU runbook.

    python benchmarks/errors.py [--device cuda] [--json out.json] [--table benchmarks/results/errors-cpu.csv]

For each operator x backend (and eager PyTorch, ``torch``) x dtype x layout (x mode for dwconv_bn_act),
the largest relative error
||out - ref|| / ||ref|| over a few shapes, for the output and for every gradient (x and each
parameter).  The reference is the ``torch`` backend in float64 on the same values (inputs rounded to
the dtype first), so only the backend's own arithmetic is measured.  Without a CUDA device the triton
backend runs under the interpreter (set here, before triton is imported).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dlkunet.ops as ops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # report.py and harness.py beside this file
import report  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DW_SHAPES = ((2, 24, 40, 9, 13, 3), (1, 16, 8, 6, 5, 7))  # N, Cin, Cout, H, W, k
LKA_SHAPES = ((2, 16, 12, 11, (5, 7, 3)), (1, 8, 9, 7, (5, 5, 3)))  # N, C, H, W, (k0, ks, dilation)
DW_PARAMS = ("w_dw", "b_dw", "w_pw", "b_pw", "gamma", "beta")
LKA_PARAMS = ("w0", "b0", "ws", "bs", "w1", "b1")


def _rel(out, ref, scale=None):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = float(ref.norm()) if scale is None else scale
    return float((out - ref).norm()) / max(denom, 1e-300)


# Training-mode BatchNorm cancels per-channel constants, so these gradients are exactly zero; their
# rounding noise is measured against the matching weight's gradient (as tests/ops does).
ZERO_IN_TRAINING = {"grad_b_dw": "grad_w_dw", "grad_b_pw": "grad_w_pw"}


def _dw_inputs(n, cin, cout, h, w, k, g):
    return dict(
        x=torch.randn(n, cin, h, w, dtype=torch.float64, generator=g),
        w_dw=torch.randn(cin, 1, k, k, dtype=torch.float64, generator=g) / k,
        b_dw=0.1 * torch.randn(cin, dtype=torch.float64, generator=g),
        w_pw=torch.randn(cout, cin, 1, 1, dtype=torch.float64, generator=g) / cin ** 0.5,
        b_pw=0.1 * torch.randn(cout, dtype=torch.float64, generator=g),
        gamma=1 + 0.2 * torch.randn(cout, dtype=torch.float64, generator=g),
        beta=0.1 * torch.randn(cout, dtype=torch.float64, generator=g),
        running_mean=0.1 * torch.randn(cout, dtype=torch.float64, generator=g),
        running_var=0.5 + torch.rand(cout, dtype=torch.float64, generator=g))


def _lka_inputs(n, c, h, w, kernels, g):
    k0, ks, _ = kernels
    return dict(
        x=torch.randn(n, c, h, w, dtype=torch.float64, generator=g),
        w0=torch.randn(c, 1, k0, k0, dtype=torch.float64, generator=g) / k0,
        b0=0.1 * torch.randn(c, dtype=torch.float64, generator=g),
        ws=torch.randn(c, 1, ks, ks, dtype=torch.float64, generator=g) / ks,
        bs=0.1 * torch.randn(c, dtype=torch.float64, generator=g),
        w1=torch.randn(c, c, 1, 1, dtype=torch.float64, generator=g) / c ** 0.5,
        b1=0.1 * torch.randn(c, dtype=torch.float64, generator=g))


def _cast(master, dtype, device, channels_last, float32_names=()):
    """The rounded values in ``dtype`` (float32 for BatchNorm's tensors) and their float64 copies."""
    low, ref = {}, {}
    for name, t in master.items():
        dt = torch.float32 if name in float32_names else dtype
        v = t.to(dt)
        if name == "x" and channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        low[name] = v.to(device).requires_grad_(not name.startswith("running"))
        ref[name] = v.double().requires_grad_(not name.startswith("running"))
    return low, ref


def _errors(backend, run, low, ref, names, g, training):
    with ops.use_backend(backend):
        out = run(low)
    with ops.use_backend("torch"):
        want = run(ref)
    gout = torch.randn(want.shape, dtype=torch.float64, generator=g)
    leaves = ["x", *names]
    got_grads = torch.autograd.grad(out, [low[n] for n in leaves], gout.to(out.dtype).to(out.device))
    want_grads = torch.autograd.grad(want, [ref[n] for n in leaves], gout.to(want.dtype))
    want_by = {f"grad_{n}": b for n, b in zip(leaves, want_grads)}
    errs = {"out": _rel(out, want)}
    for n, a, b in zip(leaves, got_grads, want_grads):
        key = f"grad_{n}"
        scale = float(want_by[ZERO_IN_TRAINING[key]].norm()) if training and key in ZERO_IN_TRAINING else None
        errs[key] = _rel(a, b, scale)
    return errs


def _dw_run(training):
    def run(t):
        state = dict(running_mean=t["running_mean"].detach().clone(), running_var=t["running_var"].detach().clone())
        return ops.dwconv_bn_act(t["x"], *[t[n] for n in DW_PARAMS], **state, training=training)
    return run


def _lka_run(dilation):
    def run(t):
        return ops.lka_gate(t["x"], *[t[n] for n in LKA_PARAMS], dilation=dilation)
    return run


def _cases():
    """(op, mode, run, parameter names, make master inputs from a generator) for every case."""
    out = []
    for mode in ("train", "eval"):
        out += [("dwconv_bn_act", mode, _dw_run(mode == "train"), DW_PARAMS, lambda g, s=s: _dw_inputs(*s, g))
                for s in DW_SHAPES]
    out += [("lka_gate", "-", _lka_run(s[-1][2]), LKA_PARAMS, lambda g, s=s: _lka_inputs(*s, g)) for s in LKA_SHAPES]
    return out


# torch: eager PyTorch's own error in the dtype, the yardstick for the fused backends.
BACKENDS = ("torch", "cpu", "triton", "cuda")


def measure(device: str, backends=BACKENDS, dtypes=DTYPES):
    rows = []
    for backend in backends:
        ok, why = ops.availability(backend, device)
        if not ok:
            print(f"# {backend}: skipped ({why})", file=sys.stderr)
            continue
        for dtype in dtypes:
            for cl in (False, True):
                g = torch.Generator().manual_seed(0)
                worst = {}
                for op, mode, run, names, make in _cases():
                    low, ref = _cast(make(g), dtype, device, cl, ("gamma", "beta", "running_mean", "running_var"))
                    errs = worst.setdefault((op, mode), {})
                    try:
                        got = _errors(backend, run, low, ref, names, g, mode == "train")
                    except (RuntimeError, TypeError, ValueError) as exc:  # a dtype the backend lacks
                        errs["unsupported"] = str(exc).splitlines()[0][:120]
                        continue
                    for k, v in got.items():
                        errs[k] = max(errs.get(k, 0.0), v)
                for (op, mode), errs in worst.items():
                    rows.append(dict(backend=backend, device=device, dtype=str(dtype)[6:],
                                     layout="channels_last" if cl else "NCHW", op=op, mode=mode, errors=errs))
    return rows


def markdown(rows) -> str:
    lines = ["| op | mode | backend | dtype | layout | output | worst gradient (which) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["errors"]
        if "unsupported" in e:
            lines.append(f"| {r['op']} | {r['mode']} | {r['backend']} | {r['dtype']} | {r['layout']} | "
                         f"unsupported: {e['unsupported']} | |")
            continue
        grads = {k: v for k, v in e.items() if k.startswith("grad_")}
        which = max(grads, key=grads.get)
        lines.append(f"| {r['op']} | {r['mode']} | {r['backend']} | {r['dtype']} | {r['layout']} | "
                     f"{e['out']:.2g} | {grads[which]:.2g} ({which[5:]}) |")
    return "\n".join(lines)


def table_rows(rows, env):
    """``measure``'s rows in the keyed form of ``benchmarks/results/errors-<device>.csv``: one row per
    output or gradient (an unsupported dtype is one row, tensor ``-``, with the reason as its error)."""
    out = []
    for r in rows:
        base = dict(op=r["op"], backend=r["backend"], mode=r["mode"], dtype=r["dtype"],
                    layout="channels_last" if r["layout"] == "channels_last" else "nchw", machine=env["machine"],
                    **{k: env.get(k) for k in report.ERRORS_COLUMNS[8:]})
        for tensor, err in r["errors"].items():
            out.append(dict(base, tensor="-" if tensor == "unsupported" else tensor, rel_error=err))
    return out


def _environment(device):
    import subprocess
    from datetime import datetime, timezone

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short",
                                 "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        from harness import cpu_model
        machine = cpu_model()
    return dict(torch=torch.__version__, triton=triton_version, device=device, machine=machine,
                triton_interpret=os.environ.get("TRITON_INTERPRET", "0"), commit=commit,
                date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--table", metavar="CSV", help="upsert the rows into this table (benchmarks/results/"
                   "errors-<device>.csv; keyed by op, backend, mode, dtype, layout, tensor, machine)")
    args = p.parse_args(argv)
    rows = measure(args.device)
    env = _environment(args.device)
    print(f"# float64-reference errors: {env}\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)
    if args.table:
        table = report.upsert(report.read_table(args.table), table_rows(rows, env), report.ERRORS_KEY)
        report.write_table(args.table, table, report.ERRORS_COLUMNS, report.ERRORS_KEY)
        print(f"# {args.table}: {len(table)} rows")


if __name__ == "__main__":
    main()
