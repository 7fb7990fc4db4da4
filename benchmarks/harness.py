"""Timing, bandwidth, memory and the run's record, shared by the benchmark tests.

GPU work is timed with CUDA events (pytest-benchmark's timer is replaced by one that records an
event and waits for it, so a round's time is GPU time between two events); CPU work with
``time.perf_counter``.  Each round gets the next of several input buffers (enough to overflow the
last-level cache) from an untimed setup, so a repeated call does not just hit cache.  The median
over rounds is reported.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import time
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence

import torch


class CudaEventTimer:
    """A clock that reads GPU time, in seconds, advanced by the time between consecutive events.

    cudaEventElapsedTime returns float32 milliseconds: measured from one old base event its
    resolution would decay to tens of microseconds after minutes, so each reading adds only the
    (short) interval since the previous event to a float64 total.
    """

    def __init__(self):
        self.last = None
        self.now = 0.0

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        if self.last is not None:
            self.now += self.last.elapsed_time(event) * 1e-3
        self.last = event
        return self.now

    def __repr__(self):
        return "CudaEventTimer"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache the rotation must overflow (L2 on GPUs, L3 on CPUs)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    try:
        out = subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True, timeout=5).stdout
        if int(out.strip() or 0) > 0:
            return int(out.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return 32 << 20


def rotation_count(set_bytes: int, device: torch.device, max_sets: int = 8) -> int:
    """How many input sets to cycle so that together they are 3x the last-level cache."""
    return max(2, min(max_sets, math.ceil(3 * cache_bytes(device) / max(set_bytes, 1))))


class Rotation:
    """Cycles through pre-built argument tuples; ``prepare`` runs on each untimed (e.g. clears grads)."""

    def __init__(self, sets: Sequence[tuple], prepare: Optional[Callable[[tuple], None]] = None):
        self.sets, self.prepare, self.i = list(sets), prepare, 0

    def __call__(self) -> tuple:
        args = self.sets[self.i % len(self.sets)]
        self.i += 1
        if self.prepare is not None:
            self.prepare(args)
        return args


# ----------------------------------------------------------------------------- memory


def reset_peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    try:  # writing 5 resets the process's peak RSS (VmHWM), Linux >= 4.0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "process_peak_rss"
    except OSError:
        return "process_peak_rss_since_start"


def peak_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- bandwidth


def measure_bandwidth(device: torch.device, nbytes: int) -> Dict[str, float]:
    """Bytes read + written per second by a large copy (device-to-device on GPUs, memcpy on CPUs)."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) * 1e-3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            elapsed = time.perf_counter() - t0
        if i >= 3:
            times.append(elapsed)
    median = sorted(times)[len(times) // 2]
    return {"bytes_per_s": 2 * n * 4 / median, "copy_bytes": n * 4, "copy_median_ms": median * 1e3,
            "method": "torch copy_ device-to-device" if device.type == "cuda" else
            f"torch copy_ (memcpy) with {torch.get_num_threads()} threads"}


# ----------------------------------------------------------------------------- environment


def _run(cmd: List[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def driver_version() -> str:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    try:
        import ctypes
        v = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
        return f"CUDA driver API {v.value // 1000}.{v.value % 1000 // 10} (nvidia-smi not found)"
    except (OSError, AttributeError):
        return "unknown"


def environment(device: torch.device, size_name: str) -> dict:
    import dlkunet
    import dlkunet.ops as ops

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "timestamp_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bench_size": size_name,
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "dlkunet": getattr(dlkunet, "__version__", None),
        "git_commit": _run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"])
        or None,
        "platform": platform.platform(),
        # Other processes skew CPU numbers: the load when the run began says how much to trust them.
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "backends": {name: dict(zip(("available", "reason"), ops.availability(name, device.type)))
                     for name in ops.BACKENDS},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "driver": driver_version(),
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "gpu_memory_bytes": props.total_memory,
            "gpu_sm_count": props.multi_processor_count,
            "gpu_capability": f"{props.major}.{props.minor}",
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        })
    return env


# ----------------------------------------------------------------------------- the record


def annotate_speedups(rows: List[dict]) -> None:
    """speedup_vs_eager = eager median / this median, for rows whose eager twin ran in this run;
    fused rows (and the eager_pw bounds) also get speedup_same_layout, against eager or eager_cl in
    their own layout."""
    peers = {(r["backend"], _twin_key(r)): r["median_ms"] for r in rows
             if r["backend"] in ("eager", "eager_cl") and r.get("median_ms")}
    for r in rows:
        ms = r.get("median_ms")
        base = peers.get(("eager", _twin_key(r)))
        r["speedup_vs_eager"] = round(base / ms, 4) if base and ms else None
        if r["backend"] not in ("eager", "eager_cl", "compile"):  # fused, or a bound (baselines.py)
            peer = "eager_cl" if r["backend"].endswith("_cl") else "eager"
            same = peers.get((peer, _twin_key(r)))
            r["speedup_same_layout"] = round(same / ms, 4) if same and ms else None


def _twin_key(row: dict):
    return (row["kind"], row["op"], json.dumps(row["shape"], sort_keys=True), row["dtype"], row["mode"], row["pass"])


class Record:
    """The run's results; rewritten to ``path`` after every row so a killed run keeps what it had."""

    def __init__(self, path: Optional[str], env: dict):
        self.path, self.env = path, env
        self.rows: List[dict] = []
        self.skipped: List[dict] = []
        self.failed: List[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def document(self) -> dict:
        annotate_speedups(self.rows)
        if hasattr(os, "getloadavg"):
            self.env["loadavg_at_save"] = [round(v, 2) for v in os.getloadavg()]
        return {"schema": "dlkunet-bench/1", "environment": self.env, "rows": self.rows,
                "skipped": self.skipped, "failed": self.failed}

    def save(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.document(), f, indent=1)
        os.replace(tmp, self.path)


def short_reason(longrepr) -> str:
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    text = re.sub(r"^Skipped: ", "", str(text))
    return text.strip().splitlines()[-1][:400] if text.strip() else ""


# ----------------------------------------------------------------------------- one measurement


class Bench:
    """What a benchmark test needs: the device, the size's settings, and ``measure``."""

    def __init__(self, device: torch.device, size, record: Record, bandwidth_bytes: int):
        self.device, self.size, self.record = device, size, record
        self._bandwidth_bytes = bandwidth_bytes
        self.timer = CudaEventTimer() if device.type == "cuda" else time.perf_counter

    @property
    def bandwidth(self) -> float:
        """Measured once per run, on first use; stored in the record's environment."""
        if "bandwidth" not in self.record.env:
            self.record.env["bandwidth"] = measure_bandwidth(self.device, self._bandwidth_bytes)
        return self.record.env["bandwidth"]["bytes_per_s"]

    def require(self, backend: str) -> None:
        import pytest
        import baselines

        ok, why = baselines.availability(backend, self.device.type)
        if not ok:
            pytest.skip(f"backend {backend} unavailable on {self.device.type}: {why}")

    def rotation(self, make: Callable[[], tuple], set_bytes: int, prepare=None) -> Rotation:
        return Rotation([make() for _ in range(rotation_count(set_bytes, self.device))], prepare)

    def measure(self, benchmark, target: Callable, rotation: Rotation, row: dict, nbytes: int) -> dict:
        """Warm up (compile / JIT / autotune) untimed, then time ``target`` over rotated inputs."""
        import pytest

        bandwidth = self.bandwidth
        timing = self.size.timing
        target(*rotation())  # first call: compilation and autotuning happen here, untimed
        synchronize(self.device)
        args = rotation()
        t0 = self.timer()
        target(*args)
        estimate = max(self.timer() - t0, 1e-7)
        rounds = max(timing.min_rounds, min(timing.max_rounds, math.ceil(timing.target_s / estimate)))
        memory_kind = reset_peak_memory(self.device)
        benchmark.pedantic(target, setup=lambda: (rotation(), {}), rounds=rounds,
                           warmup_rounds=timing.warmup_rounds)
        if benchmark.stats is None:
            pytest.skip("pytest-benchmark is disabled (--benchmark-disable): nothing was measured")
        stats = benchmark.stats.stats
        median = stats.median
        row.update({
            "median_ms": median * 1e3, "mean_ms": stats.mean * 1e3, "min_ms": stats.min * 1e3,
            "iqr_ms": stats.iqr * 1e3, "rounds": stats.rounds, "rotated_sets": len(rotation.sets),
            "bytes": int(nbytes), "achieved_GBps": nbytes / median / 1e9,
            "bandwidth_fraction": (nbytes / bandwidth) / median,
            "peak_mem_bytes": peak_memory(self.device), "peak_mem_kind": memory_kind,
        })
        benchmark.extra_info.update({k: v for k, v in row.items() if k != "shape"})
        benchmark.extra_info["shape"] = json.dumps(row["shape"])
        self.record.add(row)
        return row
