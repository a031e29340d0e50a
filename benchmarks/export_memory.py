#!/usr/bin/env python
"""Export (and calibrate) peak RSS and time against decoder depth, at M3's real widths (issue 15): the streaming
export must grow by < 0.15 GB per decoder layer. Each step runs as its own process under /usr/bin/time, so every
peak is that step's alone; checkpoints are synthesized once into --work and reused.

    python benchmarks/export_memory.py [--layers 2,4,8] [--checkpoint FULL_CKPT] [--calibrate]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.timing import machine  # noqa: E402


def timed(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (GiB) of one command, from GNU time."""
    r = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    wall, kib = r.stderr.strip().splitlines()[-1].split()
    return {"s": float(wall), "peak_rss_gib": int(kib) / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="2,4,8", help="decoder depths to synthesize at real widths (comma-separated)")
    p.add_argument("--checkpoint", type=Path, action="append", default=[],
                   help="an extra checkpoint to measure (e.g. the full-size one from `build.py synth --size full`)")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "export_memory")
    p.add_argument("--calibrate", action="store_true", help="also measure `build.py calibrate --scheme int4`")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "export_memory.json")
    a = p.parse_args(argv)
    from export.synth.checkpoint import synthesize

    cases = []
    for n in (int(x) for x in a.layers.split(",") if x):
        ckpt = a.work / f"m3-real-{n}"
        if not ckpt.is_dir():
            print(f"[setup] synthesizing M3 at real widths with {n} layers", flush=True)
            synthesize(ckpt, "m3", "real", seed=0, layers=n)
        cases.append((n, ckpt))
    cases += [(json.loads((c / "Phi-3-mini-4k-instruct" / "config.json").read_text())["num_hidden_layers"], c)
              for c in a.checkpoint]
    rows = []
    for layers, ckpt in cases:
        bundle = a.work / f"bundle-{ckpt.name}"
        print(f"[run] export {ckpt} ({layers} layers)", flush=True)
        row = {"layers": layers, "checkpoint": str(ckpt),
               "export": timed([sys.executable, "build.py", "export", "--checkpoint", str(ckpt), "--out", str(bundle)])}
        row["bundle_gib"] = sum(f.stat().st_size for f in bundle.iterdir()) / 2**30
        if a.calibrate:
            print(f"[run] calibrate int4 {bundle}", flush=True)
            row["calibrate_int4"] = timed([sys.executable, "build.py", "calibrate", "--bundle", str(bundle), "--out",
                                           str(a.work / f"int4-{ckpt.name}"), "--scheme", "int4", "--samples", "2"])
        rows.append(row)
    info = machine(0)
    print(f"\n# {info['cpu']}, {info['usable_cpus']} CPUs, flags: {info['flags']}, {info['mem_GiB']} GiB")
    print("| decoder layers | export s | export peak RSS GiB | bundle GiB |" + (" calibrate int4 s | peak GiB |"
                                                                            if a.calibrate else ""))
    print("|---|---|---|---|" + ("---|---|" if a.calibrate else ""))
    for r in rows:
        cal = (f" {r['calibrate_int4']['s']:.0f} | {r['calibrate_int4']['peak_rss_gib']:.2f} |" if a.calibrate else "")
        print(f"| {r['layers']} | {r['export']['s']:.0f} | {r['export']['peak_rss_gib']:.2f} | {r['bundle_gib']:.2f} |"
              + cal)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        slope = ((last["export"]["peak_rss_gib"] - first["export"]["peak_rss_gib"])
                 / max(last["layers"] - first["layers"], 1))
        print(f"\nexport peak RSS growth: {slope:.3f} GiB per decoder layer (target < 0.15)")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
