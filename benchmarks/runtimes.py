"""DLKUNet inference on the CPU against what a CPU user deploys instead, interleaved in one process.

    python benchmarks/runtimes.py                       # S, M, L at batch 1 and 8, 224x224
    python benchmarks/runtimes.py --variants S --batches 1 --rounds 9 --compile

Every round runs each row once, in turn, so a machine shared with other work slows all rows
alike; the table gives medians over rounds and, per case, the speedup of ``auto_cl`` (dlkunet's
default backend, channels_last) over the faster deployment runtime and over the faster eager
layout.  Rows (``baselines.py``): eager PyTorch in NCHW and channels_last, ``torch.compile``
(``--compile``: minutes of compiling per model here), dlkunet's ``auto`` in both layouts, and the
model exported to ONNX and run in ONNX Runtime and OpenVINO (skipped, with the reason, when not
installed).  The pytest suite (``test_models.py``) records the same rows one at a time into
``results/cpu.csv``; this script is for a side-by-side reading on a busy machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402
import harness  # noqa: E402

ROWS = ("eager", "eager_cl", "compile", "auto", "auto_cl", "onnxruntime", "openvino")


def cpu_flags() -> str:
    """The vector instruction sets /proc/cpuinfo lists (the figures depend on them)."""
    wanted = ("avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile", "avx2", "fma", "neon", "asimd")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(flag for flag in wanted if flag in have)
    except OSError:
        pass
    return "unknown"


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for name in ("onnxruntime", "openvino"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


def run_case(variant: str, batch: int, image: int, rows, rounds: int) -> dict:
    shape = (batch, 1, image, image)
    x = torch.randn(shape)
    runs, skipped = {}, {}
    for row in rows:
        ok, why = baselines.availability(row, "cpu")
        if not ok:
            skipped[row] = why
            continue
        net, fn = baselines.model(row, variant, 96, torch.device("cpu"), shape=shape)
        net.eval()
        xi = x if row in baselines.RUNTIMES else x.contiguous(memory_format=baselines.memory_format(row))
        runs[row] = (fn, xi)
    times = {row: [] for row in runs}
    with torch.inference_mode():
        for fn, xi in runs.values():  # warm-up (and, for compile, the compilation)
            fn(xi)
            fn(xi)
        for _ in range(rounds):
            for row, (fn, xi) in runs.items():
                start = time.perf_counter()
                fn(xi)
                times[row].append(time.perf_counter() - start)
    return {"medians": {row: statistics.median(t) * 1e3 for row, t in times.items()}, "skipped": skipped}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="S,M,L")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch (and runtime) threads; 0: torch's default")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (slow to compile)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for r in ROWS if r != "compile" or args.compile]
    print(f"{harness.cpu_model()} ({cpu_flags()}), {torch.get_num_threads()} threads; {versions()}; "
          f"float32, {args.image}x{args.image}, medians of {args.rounds} interleaved rounds, ms; "
          f"load average at start {os.getloadavg()[0]:.1f}\n")
    print("| model | batch | " + " | ".join(rows) + " | auto_cl vs faster runtime | auto_cl vs faster eager |")
    print("|---|---|" + "---|" * (len(rows) + 2))
    for variant in args.variants.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            result = run_case(variant, batch, args.image, rows, args.rounds)
            med = result["medians"]
            cells = [f"{med[r]:.0f}" if r in med else "skipped" for r in rows]
            ours = med.get("auto_cl")
            runtime = min((med[r] for r in baselines.RUNTIMES if r in med), default=None)
            eager = min((med[r] for r in ("eager", "eager_cl") if r in med), default=None)
            vs_runtime = f"{runtime / ours:.2f}x" if ours and runtime else "n/a"
            vs_eager = f"{eager / ours:.2f}x" if ours and eager else "n/a"
            print(f"| DLKUNet-{variant} | {batch} | " + " | ".join(cells) + f" | {vs_runtime} | {vs_eager} |",
                  flush=True)
            for row, why in result["skipped"].items():
                print(f"  ({row} skipped: {why})")


if __name__ == "__main__":
    main()
