"""Tune the Triton backend's forward plans on a GPU and write the table ``kernels/plans.py`` reads.

For every real shape (DLKUNet-L at batch 16 from 224x224: the encoder Blocks' and decoder Blocks'
eval dwconv_bn_act, the five lka_gate levels), float32 (TF32, eager's default) and bfloat16, NCHW
and channels_last, it times eager PyTorch in the same dtype and layout (cuDNN; float32 also with
TF32 off), then each plan: ``fused`` at its shipped tile, ``split`` by coordinate descent (the
depthwise tile with the shipped GEMM tile, then the GEMM tile), ``split_cudnn``, for lka_gate
``chain`` (its window by rule, split's best GEMM tile) and, for channels_last dwconv_bn_act,
``split_cublas``; then each stage alone beside cuDNN's and cuBLAS's
(rows with plan ``part``: where the time goes).  Every candidate's error against float64 is measured
on the timed input, and a candidate whose error is over twice eager's own (or over the
float32/16-bit budget where that is larger) is never chosen.

    python benchmarks/tune_plans.py OUTDIR [--jobs 14] [--ops dwconv_bn_act,lka_gate] [--cases REGEX] [--smoke]
    python benchmarks/tune_plans.py OUTDIR/tuned_plans.csv --merge kernels/tuned_plans.csv

OUTDIR gets ``tune.csv`` (every candidate) and ``tuned_plans.csv`` (the fastest valid candidate per
case, in the format of ``kernels/tuned_plans.csv``; ``--merge`` upserts it there).  With
``--jobs J`` (default 14), J worker processes first compile every candidate once into Triton's
on-disk cache, so the timing process that follows only loads them (compilation is CPU-bound and
the device has 16 cores; nothing is timed while they compile).  ``--smoke`` runs tiny shapes on
the CPU under TRITON_INTERPRET=1 (the test suite does, so the script never rots); its times are
meaningless.
"""
from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # shapes.py beside this file
import shapes  # noqa: E402

# Candidates: errors over max(2x eager's error, these budgets) are never chosen (issue 13's oracle
# for TF32 and 16-bit; float32 without TF32 keeps the test budgets).
BUDGET = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
EAGER_ERROR_FACTOR = 2.0
DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = ("nchw", "cl")
# do_bench's warm-up and measuring time per candidate, milliseconds.
WARMUP_MS, REP_MS = 10, 40
EPS = 1e-5  # BatchNorm2d's default
TABLE_FIELDS = ("device", "op", "dtype", "layout", "cin", "cout", "h", "w", "kernels", "plan", "fused", "dw",
                "gemm", "ms", "eager_ms", "speedup", "err", "eager_err", "n")


@dataclass(frozen=True)
class Case:
    op: str
    n: int
    cin: int
    cout: int
    h: int
    w: int
    kernels: Tuple[int, ...]  # (k,) for dwconv_bn_act, (k0, ks, dilation) for lka_gate
    dtype: torch.dtype
    layout: str

    @property
    def key(self) -> str:
        return (f"{self.op} {str(self.dtype)[6:]} {self.layout} N{self.n} {self.cin}->{self.cout} "
                f"{self.h}x{self.w} k{'/'.join(map(str, self.kernels))}")


def cases(size_name: str, ops: List[str]) -> List[Case]:
    size = shapes.get_size(size_name)
    out = []
    for dtype in DTYPES:
        for layout in LAYOUTS:
            if "dwconv_bn_act" in ops:
                for c in shapes.dwconv_cases(size):
                    out.append(Case("dwconv_bn_act", c.n, c.cin, c.cout, c.h, c.w, (c.k,), dtype, layout))
            if "lka_gate" in ops:
                for c in shapes.lka_cases(size):
                    out.append(Case("lka_gate", c.n, c.c, c.c, c.h, c.w, tuple(c.kernels), dtype, layout))
    return out


# ------------------------------------------------------------------------------------------------
# inputs, eager and float64 references


def make_inputs(case: Case, device, seed: int):
    """x and the op's parameters in the op's dtypes (drawn on the device: level 0 in float32 is
    0.6 GB), and the same values in float64 for the truth."""
    g = torch.Generator(device=device).manual_seed(seed)
    n, cin, cout, h, w = case.n, case.cin, case.cout, case.h, case.w

    def randn(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=g, device=device) * scale + offset

    x = randn(n, cin, h, w)
    if case.op == "dwconv_bn_act":
        k = case.kernels[0]
        p = [randn(cin, 1, k, k, scale=1 / k), randn(cin, scale=0.1), randn(cout, cin, 1, 1, scale=cin ** -0.5),
             randn(cout, scale=0.1), randn(cout, scale=0.2, offset=1.0), randn(cout, scale=0.1),
             randn(cout, scale=0.1), torch.rand(cout, generator=g, device=device) + 0.5]
        conv = 4  # the convolutions' weights and biases are in the input dtype, BN's stay float32
    else:
        k0, ks, _ = case.kernels
        p = [randn(cin, 1, k0, k0, scale=1 / k0), randn(cin, scale=0.1), randn(cin, 1, ks, ks, scale=1 / ks),
             randn(cin, scale=0.1), randn(cin, cin, 1, 1, scale=cin ** -0.5), randn(cin, scale=0.1)]
        conv = len(p)
    fmt = torch.channels_last if case.layout == "cl" else torch.contiguous_format
    xd = x.to(case.dtype).contiguous(memory_format=fmt)
    del x
    pd = [t.to(case.dtype if i < conv else torch.float32) for i, t in enumerate(p)]
    return xd, pd, xd.double(), [t.double() for t in pd]


def eager(case: Case, x, p):
    """What a user runs without dlkunet: the nn modules' functional calls."""
    if case.op == "dwconv_bn_act":
        w_dw, b_dw, w_pw, b_pw, gamma, beta, rm, rv = p
        k = w_dw.shape[-1]
        d = F.conv2d(x, w_dw, b_dw, padding=k // 2, groups=x.shape[1])
        z = F.conv2d(d, w_pw, b_pw)
        return F.relu(F.batch_norm(z, rm, rv, gamma, beta, False, 0.0, EPS))
    from dlkunet.ops import reference
    return reference.lka_gate(x, *p, dilation=case.kernels[2])


def ours(case: Case, x, p):
    from dlkunet.kernels import plans
    if case.op == "dwconv_bn_act":
        return plans.dwconv_bn_act_eval(x, *p, EPS, True)[0]
    return plans.lka_gate_fwd(x, *p, case.kernels[2])


def rel_err(out, ref) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------------------
# candidates


def _scaled_patch(tile, factor):
    """(BH, BW) of a patch ``factor`` times the size (BW kept; BH at least 1)."""
    bh, bw = tile[0], tile[1]
    return max(1, int(bh * factor)), bw


def fused_candidates(case: Case):
    from dlkunet.kernels import plans as P
    base = P.tiles(P.FUSED, case.cin, case.cout, case.w, case.dtype).fused
    # On the H200 (2026-11-30) the fused kernel lost to split at all 56 shapes, by 1.0-7.5x, with
    # three tiles tried each (docs/gpu-plans.md): the shipped tile alone keeps it on the record.
    return [base]


def dw_candidates(case: Case):
    from dlkunet.kernels import plans as P
    base = P.tiles(P.SPLIT, case.cin, case.cout, case.w, case.dtype).dw
    bh, bw, bc, warps = base
    return list(dict.fromkeys([base, (*_scaled_patch(base, 2), bc, warps), (bh, bw, 2 * bc, warps),
                               (*_scaled_patch(base, 0.5), bc, 4), (*_scaled_patch(base, 2), 2 * bc, 8)]))


def gemm_candidates(case: Case):
    from dlkunet.kernels import plans as P
    base = P.tiles(P.SPLIT, case.cin, case.cout, case.w, case.dtype).gemm
    bk = base[2]
    # 128x128 at 4 warps: with TF32 operands stored rounded, the one float32 tile whose both operands
    # the compiler pipelines with cp.async (at 8 warps it loads the weights through registers).
    return list(dict.fromkeys([base, (128, 128, bk, 8, 3), (128, 128, bk, 4, 3), (128, 64, bk, 4, 4),
                               (64, 64, bk, 4, 4), (128, 256, bk, 8, 3)]))


# ------------------------------------------------------------------------------------------------
# timing


def _timer(device):
    if device.type == "cuda":
        import triton.testing

        def bench(fn):
            return float(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))
        return bench

    def bench(fn):  # the smoke run: one call, wall clock
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return bench


def _budget(case: Case, eager_err: float) -> float:
    return max(EAGER_ERROR_FACTOR * eager_err, BUDGET[case.dtype])


class Tuner:
    def __init__(self, device, writer, compile_only: bool, max_candidates: Optional[int] = None):
        self.device = device
        self.max_candidates = max_candidates  # the smoke run tries the shipped tiles only
        self.writer = writer
        self.compile_only = compile_only
        self.bench = _timer(device)

    def run(self, case: Case, plan, x, p, truth, budget, eager_ms) -> Tuple[float, float]:
        """(ms, error) of ``plan`` on the case; inf where it fails or is invalid."""
        from dlkunet.kernels import plans as P
        try:
            with P.forced(plan):
                out = ours(case, x, p)
                err = rel_err(out, truth) if truth is not None else 0.0
                ms = self.bench(lambda: ours(case, x, p)) if not self.compile_only else 0.0
            status = "ok" if err <= budget else "error over budget"
        except Exception as e:  # noqa: BLE001 (a tile that does not compile or launch is a result)
            ms, err, status = float("inf"), float("inf"), f"{type(e).__name__}: {str(e)[:120]}"
        if self.writer is not None:
            self.writer.writerow(dict(case=case.key, plan=plan.name, fused=plan.fused, dw=plan.dw, gemm=plan.gemm,
                                      ms=ms, err=err, eager_ms=eager_ms, status=status))
        return (ms, err) if status == "ok" else (float("inf"), err)

    def tune(self, case: Case, seed: int):
        from dlkunet.kernels import plans as P
        x, p, x64, p64 = make_inputs(case, self.device, seed)
        truth = None
        eager_ms = eager_err = notf32_ms = notf32_err = float("nan")
        budget = float("inf")
        if not self.compile_only:
            with torch.no_grad():
                truth = eager(case, x64, p64)
                eager_err = rel_err(eager(case, x, p), truth)
                eager_ms = self.bench(lambda: eager(case, x, p))
                if case.dtype == torch.float32 and self.device.type == "cuda":
                    with _tf32(False):
                        notf32_err = rel_err(eager(case, x, p), truth)
                        notf32_ms = self.bench(lambda: eager(case, x, p))
            budget = _budget(case, eager_err)
        base = P.tiles(P.SPLIT, case.cin, case.cout, case.w, case.dtype)
        results = []  # (ms, err, Plan)
        with torch.no_grad():
            for tile in fused_candidates(case)[:self.max_candidates]:
                plan = P.Plan(P.FUSED, fused=tile, dw=base.dw)
                results.append((*self.run(case, plan, x, p, truth, budget, eager_ms), plan))
            best_dw, best_dw_ms = base.dw, float("inf")
            for dw in dw_candidates(case)[:self.max_candidates]:
                plan = P.Plan(P.SPLIT, dw=dw, gemm=base.gemm)
                ms, err = self.run(case, plan, x, p, truth, budget, eager_ms)
                results.append((ms, err, plan))
                if ms < best_dw_ms:
                    best_dw, best_dw_ms = dw, ms
            best_gemm, best_gemm_ms = base.gemm, best_dw_ms
            for gemm in gemm_candidates(case)[1:self.max_candidates]:
                plan = P.Plan(P.SPLIT, dw=best_dw, gemm=gemm)
                ms, err = self.run(case, plan, x, p, truth, budget, eager_ms)
                results.append((ms, err, plan))
                if ms < best_gemm_ms:
                    best_gemm, best_gemm_ms = gemm, ms
            plan = P.Plan(P.SPLIT_CUDNN, gemm=best_gemm)
            results.append((*self.run(case, plan, x, p, truth, budget, eager_ms), plan))
            if case.op == "lka_gate":  # a1 on chip, in the window chain_window gives the shape
                plan = P.Plan(P.CHAIN, gemm=best_gemm)
                results.append((*self.run(case, plan, x, p, truth, budget, eager_ms), plan))
            if case.op == "dwconv_bn_act" and case.layout == "cl":
                plan = P.Plan(P.SPLIT_CUBLAS, dw=best_dw)
                results.append((*self.run(case, plan, x, p, truth, budget, eager_ms), plan))
            ms, err, plan = min(results, key=lambda r: r[0])
            if not self.compile_only:
                self.parts(case, x, p, best_dw, best_gemm, eager_ms)
            extra = {}
            if case.dtype == torch.float32 and not self.compile_only and self.device.type == "cuda":
                with _tf32(False):  # the full-precision path on the same tiles, beside eager's
                    extra = dict(zip(("tf32x3_ms", "tf32x3_err"),
                                     self.run(case, plan, x, p, truth, _budget(case, notf32_err), notf32_ms)))
        return dict(ms=ms, err=err, plan=plan, eager_ms=eager_ms, eager_err=eager_err, notf32_ms=notf32_ms,
                    notf32_err=notf32_err, model_plan=_model_choice(case), **extra)


    def parts(self, case: Case, x, p, dw_tile, gemm_tile, eager_ms):
        """Time each stage alone, ours beside PyTorch's (tune.csv rows with plan 'part'): where the
        split plan's time goes, and what cuDNN does with the same stage."""
        from dlkunet.kernels import _fast as FK
        from dlkunet.kernels import plans as P
        cl = case.layout == "cl"
        fmt = torch.channels_last if cl else torch.contiguous_format
        ours, cudnn = P.Plan(P.SPLIT, dw=dw_tile), P.Plan(P.SPLIT_CUDNN)
        if case.op == "dwconv_bn_act":
            stages = [("dw k%d" % case.kernels[0], p[0], p[1], 1)]
            w_pw, b_pw = p[2], p[3]
            stats = [torch.empty(case.cout, device=x.device) for _ in range(2)]
            prm, epi, relu, eps = (b_pw, *p[4:8], *stats), FK.EPI_BN, True, EPS
        else:
            k0, ks, dil = case.kernels
            stages = [("dw k%d" % k0, p[0], p[1], 1), ("dw k%d d%d" % (ks, dil), p[2], p[3], dil)]
            w_pw, b_pw = p[4], p[5]
            prm, epi, relu, eps = (b_pw,) * 7, FK.EPI_GATE, False, 0.0
        prec = P.precision(case.dtype)
        t = x
        for i, (name, wt, bt, dil) in enumerate(stages):
            last = i == len(stages) - 1  # ours: with the GEMM operands' TF32 rounding, as the plan runs it
            ms = self.bench(functools.partial(P._gemm_operands, t, wt, bt, w_pw, dil, fmt, ours, prec) if last
                            else functools.partial(P._depthwise, t, wt, bt, dil, fmt, ours))
            self._part(case, f"{name} ours", ms, eager_ms)
            self._part(case, f"{name} cudnn", self.bench(functools.partial(P._depthwise, t, wt, bt, dil, fmt, cudnn)),
                       eager_ms)
            if last:  # the GEMM's operands as the split plan makes them (under TF32: rounded)
                d, w_gemm, gemm_prec = P._gemm_operands(t, wt, bt, w_pw, dil, fmt, ours, prec)
            t = P._depthwise(t, wt, bt, dil, fmt, cudnn)
        y = torch.empty_like(x[:, :1].expand(-1, case.cout, -1, -1), memory_format=fmt)
        ms = self.bench(lambda: P._launch_gemm(d, w_gemm, x, y, prm, eps, epi, relu, cl, gemm_prec, gemm_tile))
        self._part(case, "pointwise+epilogue ours", ms, eager_ms)
        self._part(case, "pointwise conv cudnn", self.bench(lambda: F.conv2d(t, w_pw, b_pw)), eager_ms)

    def _part(self, case, name, ms, eager_ms):
        self.writer.writerow(dict(case=case.key, plan="part", fused=name, dw="", gemm="", ms=ms, err="",
                                  eager_ms=eager_ms, status="ok"))


class _tf32:
    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.prev = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32 = self.prev


def _model_choice(case: Case) -> str:
    from dlkunet.kernels import plans as P
    ks = case.kernels[:1] if case.op == "dwconv_bn_act" else case.kernels
    peaks = P._peaks(torch.device("cuda")) if torch.cuda.is_available() else P._PEAKS["H100"]
    prec = P.precision(case.dtype)
    return min(P.PLANS, key=lambda nm: P.predicted_seconds(nm, case.op, case.n, case.cin, case.cout, case.h,
                                                          case.w, ks, case.dtype, prec, peaks))


# ------------------------------------------------------------------------------------------------
# driver


def table_row(device, case: Case, r) -> dict:
    plan = r["plan"]
    fmt = lambda t: " ".join(map(str, t))  # noqa: E731
    from dlkunet.kernels import plans
    return dict(device=plans.device_name(device), op=case.op, dtype=str(case.dtype)[6:], layout=case.layout,
                cin=case.cin, cout=case.cout, h=case.h, w=case.w, kernels=fmt(case.kernels), plan=plan.name,
                fused=fmt(plan.fused), dw=fmt(plan.dw), gemm=fmt(plan.gemm), ms=f"{r['ms']:.4f}",
                eager_ms=f"{r['eager_ms']:.4f}", speedup=f"{r['eager_ms'] / r['ms']:.2f}", err=f"{r['err']:.2e}",
                eager_err=f"{r['eager_err']:.2e}", n=case.n)


def _row_key(r: dict) -> tuple:
    return tuple(r[f] for f in ("device", "op", "dtype", "layout", "cin", "cout", "h", "w", "kernels"))


def merge(new_path: str, table_path: str) -> int:
    """Upsert the valid rows of ``new_path`` into ``table_path`` (rows whose every candidate failed
    have ms 'inf' and are left out), sorted by device, op, dtype, layout and level."""
    rows = {}
    if os.path.exists(table_path):
        with open(table_path, newline="") as f:
            rows = {_row_key(r): r for r in csv.DictReader(f)}
    with open(new_path, newline="") as f:
        new = [r for r in csv.DictReader(f) if r["ms"] != "inf"]
    rows.update({_row_key(r): r for r in new})
    order = lambda r: (r["device"], r["op"], r["dtype"], r["layout"], -int(r["h"]), int(r["cin"]))  # noqa: E731
    with open(table_path, "w", newline="") as f:
        w = csv.DictWriter(f, TABLE_FIELDS)
        w.writeheader()
        w.writerows(sorted(rows.values(), key=order))
    print(f"{table_path}: {len(new)} row(s) merged, {len(rows)} in all")
    return 0


def compile_worker(todo: List[Case], device):
    """Run every candidate once (fills Triton's on-disk cache); no timing, no reference."""
    tuner = Tuner(device, None, compile_only=True)
    for i, case in enumerate(todo):
        tuner.tune(case, seed=i)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--ops", default="dwconv_bn_act,lka_gate")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--cases", default="", help="a regular expression the case names must match "
                    "(e.g. 'float32|lka_gate bfloat16 cl')")
    ap.add_argument("--merge", default=None, metavar="TABLE",
                    help="instead of tuning: upsert OUT (a tuned_plans.csv) into TABLE, keyed by device and shape")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.out, args.merge)
    ops = args.ops.split(",")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        # On the CPU eager float32 has no TF32 mode: compare the full-precision paths.
        torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cpu" if args.smoke else "cuda")
    todo = cases("quick" if args.smoke else "full", ops)
    if args.smoke:  # one case per op: float32 dwconv_bn_act, bfloat16 lka_gate, channels_last
        wanted = (("dwconv_bn_act", torch.float32, "cl"), ("lka_gate", torch.bfloat16, "cl"))
        todo = list({c.op: c for c in todo if (c.op, c.dtype, c.layout) in wanted}.values())
    if args.cases:
        todo = [c for c in todo if re.search(args.cases, c.key)]
    if args.worker is not None:
        compile_worker(todo[args.worker::args.jobs], device)
        return 0
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if args.jobs > 1 and not args.smoke:
        cmd = [sys.executable, os.path.abspath(__file__), args.out, "--jobs", str(args.jobs), "--ops", args.ops,
               "--cases", args.cases]
        procs = [subprocess.Popen(cmd + ["--worker", str(i)]) for i in range(args.jobs)]
        codes = [pr.wait() for pr in procs]
        print(f"compiled every candidate in {time.time() - t0:.0f} s (worker exit codes {codes})", flush=True)
    with open(os.path.join(args.out, "tune.csv"), "w", newline="") as f_all, \
            open(os.path.join(args.out, "tuned_plans.csv"), "w", newline="") as f_best:
        every = csv.DictWriter(f_all, ["case", "plan", "fused", "dw", "gemm", "ms", "err", "eager_ms", "status"])
        every.writeheader()
        best = csv.DictWriter(f_best, TABLE_FIELDS)
        best.writeheader()
        tuner = Tuner(device, every, compile_only=False, max_candidates=1 if args.smoke else None)
        print(f"{'case':58s} {'plan':5s} {'ms':>8s} {'eager':>8s} {'x':>6s} {'noTF32':>8s} {'tf32x3':>8s} "
              f"{'err':>8s} {'eager err':>9s} model", flush=True)
        for i, case in enumerate(todo):
            r = tuner.tune(case, seed=i)
            best.writerow(table_row(device, case, r))
            f_all.flush()
            f_best.flush()
            print(f"{case.key:58s} {r['plan'].name:5s} {r['ms']:8.3f} {r['eager_ms']:8.3f} "
                  f"{r['eager_ms'] / r['ms']:6.2f} {r['notf32_ms']:8.3f} {r.get('tf32x3_ms', float('nan')):8.3f} "
                  f"{r['err']:8.1e} {r['eager_err']:9.1e} {r['model_plan']}", flush=True)
    print(f"total {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
