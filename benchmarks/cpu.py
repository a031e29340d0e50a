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
