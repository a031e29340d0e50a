"""Measurement helpers: interleaved medians, memory bandwidth, the machine's description, RSS."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from benchmarks.cpu import kernel_flags, physical_cores


@dataclass
class Case:
    """One contender: `step` is timed; `prepare` (untimed) runs before every call, e.g. to rewind a KV cache."""

    step: Callable[[], object]
    prepare: Callable[[], object] | None = None


def stat(times: list[float], warmup: int) -> dict:
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
            "n": len(times), "warmup": warmup}


SETTLE_S = 0.3  # > the spin-wait of the thread pools involved (ORT's, OpenMP's, OpenBLAS's: up to ~0.1-0.2 s)


def _settle(case: Case, step_s: float) -> None:
    """Before a timed run: let the previous contender's busy-waiting threads go idle (on 2 cores they would steal
    one from this run) without leaving this contender's own threads cold: short steps run untimed for SETTLE_S;
    long ones (>= 1 s) just sleep SETTLE_S (one wake-up is nothing beside a second)."""
    if step_s >= 1.0:
        time.sleep(SETTLE_S)
        return
    end = time.perf_counter() + SETTLE_S
    while time.perf_counter() < end:
        if case.prepare:
            case.prepare()
        case.step()


def bench(cases: dict[str, Case | Callable], warmup: int, reps: int) -> dict[str, dict]:
    """Warm each contender up, then time them round-robin (rep 1 of every contender, rep 2, ...), so that a change
    in the machine's load during the measurement hits every contender alike; each timed run is preceded by
    _settle() so that no contender pays for the spinning threads of the one before it. Returns name -> stat()."""
    cases = {k: v if isinstance(v, Case) else Case(v) for k, v in cases.items()}
    step_s = {}
    for name, case in cases.items():
        for _ in range(max(warmup, 1)):
            if case.prepare:
                case.prepare()
            start = time.perf_counter()
            case.step()
            step_s[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, case in cases.items():
            _settle(case, step_s[name])
            if case.prepare:
                case.prepare()
            start = time.perf_counter()
            case.step()
            times[name].append(time.perf_counter() - start)
    return {k: stat(v, warmup) for k, v in times.items()}


class Gemv:
    """fp32 GEMV over a `gib` GiB matrix through numpy's BLAS: a contender in the decode groups, so the bandwidth
    that the limit is computed from is measured side by side with the decoders (same moments, same load)."""

    def __init__(self, gib: float = 1.0):
        n = int((gib * 2**30 / 4) ** 0.5) // 64 * 64
        self.a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        self.x = np.ones(n, np.float32)
        self.nbytes = self.a.nbytes

    def case(self) -> Case:
        return Case(lambda: self.a @ self.x)


def bandwidth(threads: int, warmup: int, reps: int, gib: float = 1.0) -> dict:
    """Memory bandwidth three ways, with `threads` threads (numpy's BLAS honours OPENBLAS_NUM_THREADS, set by
    run.py before numpy is imported): fp32 GEMV `a @ x` (a of `gib` GiB: the access pattern of decode), a
    threaded sum (read only), a threaded copy (read + write counted). GB/s = 1e9 bytes/s."""
    gemv = Gemv(gib)
    flat = gemv.a.reshape(-1)
    chunks = np.array_split(flat, threads)
    dst = np.empty_like(flat)
    dchunks = np.array_split(dst, threads)
    pool = ThreadPoolExecutor(threads)

    def tsum():
        return sum(pool.map(np.sum, chunks))

    def tcopy():
        list(pool.map(lambda i: np.copyto(dchunks[i], chunks[i]), range(threads)))

    res = bench({"gemv": gemv.case(), "sum": tsum, "copy": tcopy}, warmup, reps)
    pool.shutdown()
    nbytes = gemv.nbytes
    out = {"matrix_bytes": nbytes, "threads": threads}
    for name, factor in (("gemv", 1), ("sum", 1), ("copy", 2)):
        out[f"{name}_GBps"] = factor * nbytes / (res[name]["median_ms"] / 1e3) / 1e9
        out[f"{name}_stat"] = res[name]
    return out


def machine_line(res: dict, threads: int) -> str:
    """What every table is printed with: the CPU, threads, kernel flags and the load average at start and end."""
    m = res["machine"]
    return f"{m['cpu']}, {threads} threads, flags {m['flags']}; load {res['load_start']:.2f} -> {res['load_end']:.2f}"


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = [head, ["---"] * len(head), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def load_average() -> float:
    return os.getloadavg()[0]


def machine(threads: int) -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "physical_cores": physical_cores(), "flags": kernel_flags(), "threads_used": threads,
            "mem_GiB": round(mem / 2**30, 1),
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 0
