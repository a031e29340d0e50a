#!/usr/bin/env python
"""Run a command inside a memory cgroup and report whether it completed (issue 25: `ask` on the full int4 bundle in
4 GiB, an 8 GB workstation), its peak, the kernel's OOM kills and the charge split into anonymous and file-backed
memory (mapped weights are file-backed: reclaimable under the limit; ONNX Runtime's prepacked copies are anonymous).

    sudo python benchmarks/memory_limit.py --limit-gib 4 -- python -m runtime ask --bundle INT4 --image scan.dcm "..."

cgroup v1 (memory.limit_in_bytes, as on this project's machines) or v2 (memory.max); the group is made under the
memory hierarchy's root and removed afterwards. Needs the right to create cgroups (root here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

V1, V2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
V1_FILES = {"limit": "memory.limit_in_bytes", "peak": "memory.max_usage_in_bytes", "stat": "memory.stat"}
V2_FILES = {"limit": "memory.max", "peak": "memory.peak", "stat": "memory.stat"}


def _group() -> tuple[Path, dict[str, str], str]:
    name = f"healthgpt-bench-{os.getpid()}"
    if (V1 / "memory.limit_in_bytes").is_file():
        return V1 / name, V1_FILES, "v1"
    if (V2 / "cgroup.controllers").is_file():
        return V2 / name, V2_FILES, "v2"
    raise SystemExit("error: no cgroup v1 memory hierarchy or cgroup v2 mount found under /sys/fs/cgroup")


def _stat(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def _oom_kills(group: Path, version: str) -> int:
    if version == "v1":
        return _stat(group / "memory.oom_control").get("oom_kill", 0)
    return _stat(group / "memory.events").get("oom_kill", 0)


def run(command: list[str], limit_gib: float) -> dict:
    group, files, version = _group()
    try:
        group.mkdir()
    except OSError as e:
        raise SystemExit(f"error: cannot create the cgroup {group} ({e}); run as root") from None
    try:
        (group / files["limit"]).write_text(str(int(limit_gib * 2**30)))
        start = time.perf_counter()
        child = subprocess.Popen(command, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        keys = ("total_rss", "total_cache") if version == "v1" else ("anon", "file")
        anon = file = 0
        while child.poll() is None:  # sampled while it runs: the group's charge empties when it exits
            stat = _stat(group / files["stat"])
            anon, file = max(anon, stat.get(keys[0], 0)), max(file, stat.get(keys[1], 0))
            time.sleep(0.2)
        return {"command": command, "cgroup": version, "limit_gib": limit_gib, "returncode": child.returncode,
                "completed": child.returncode == 0, "oom_kills": _oom_kills(group, version),
                "peak_gib": int((group / files["peak"]).read_text()) / 2**30, "seconds": time.perf_counter() - start,
                "max_anon_gib": anon / 2**30, "max_file_gib": file / 2**30}
    finally:
        group.rmdir()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit-gib", type=float, default=4.0)
    p.add_argument("--json", type=Path)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("give the command to run after --")
    res = run(command, a.limit_gib)
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0 if res["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
