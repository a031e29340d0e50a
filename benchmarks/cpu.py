"""CPU facts the benchmark needs before numpy loads (its thread pools read the environment once)."""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs of the CPUs this process may use."""
    cores, cur = set(), {}
    allowed = os.sched_getaffinity(0)
    try:
        for line in open("/proc/cpuinfo"):
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                if k in ("processor", "physical id", "core id"):
                    cur[k] = v
            elif cur:
                if int(cur.get("processor", -1)) in allowed:
                    cores.add((cur.get("physical id"), cur.get("core id")))
                cur = {}
        if cur and int(cur.get("processor", -1)) in allowed:
            cores.add((cur.get("physical id"), cur.get("core id")))
    except OSError:
        pass
    return len(cores) or len(allowed)


FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile")  # what the kernels use


def cpu_flags() -> list[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return line.split(":", 1)[1].split()
    return []


def kernel_flags() -> str:
    """The CPU flags that pick ONNX Runtime's and PyTorch's kernels, for every table's machine line."""
    flags = cpu_flags()
    return " ".join(f for f in FLAGS if f in flags) or "none of " + ",".join(FLAGS)
