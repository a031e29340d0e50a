#!/usr/bin/env python
"""A/B of decoder graphs: the decode step of two or more bundles' decoders at the same contexts, in one process,
timed round-robin context by context (benchmarks/timing.py: every rep of every contender in turn, so drift hits
all alike), each session as the runtime opens it (`OrtBackend('cpu')`: prepared where it would be).

    python benchmarks/decode_ab.py --bundle NAME=DIR NAME=DIR [--task com] [--contexts 100 600 1600] [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.contenders import OurDecoder, graph_weight_bytes  # noqa: E402
from benchmarks.timing import bench, load_average, machine, machine_line, markdown  # noqa: E402
from runtime.core.backend import OrtBackend  # noqa: E402
from runtime.core.bundle import Bundle  # noqa: E402
from runtime.core.kvcache import KVCache  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", nargs="+", required=True, metavar="NAME=DIR", help="contenders, named")
    p.add_argument("--task", default="com")
    p.add_argument("--contexts", type=int, nargs="+", default=[100, 600, 1600])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if not all("=" in b for b in a.bundle):
        p.error("--bundle takes NAME=DIR")
    res = {"machine": machine(a.threads), "load_start": load_average(), "task": a.task, "contexts": a.contexts}
    backend = OrtBackend("cpu", a.threads)
    decoders = {}
    for name, path in (b.split("=", 1) for b in a.bundle):
        bundle = Bundle.open(Path(path))
        graph, embed = backend.load(bundle, a.task, "decoder"), backend.load(bundle, a.task, "embed")
        decoders[name] = OurDecoder(graph, embed, KVCache(backend, graph.spec),
                                    graph_weight_bytes(bundle, a.task, "decoder"))
    stats = {}
    for c in a.contexts:  # one context at a time: no cache is reallocated between the reps
        got = bench({name: dec.decode_case(c) for name, dec in decoders.items()}, a.warmup, a.reps)
        stats.update({(name, c): s for name, s in got.items()})
    res["load_end"] = load_average()
    res["ms"] = {f"{name} @{c}": s for (name, c), s in stats.items()}
    names = list(decoders)
    print(f"{machine_line(res, a.threads)}; {a.task} decode ms per token, median of {a.reps} after {a.warmup} "
          f"warm-up, round-robin; ratio = {names[0]} / each")
    rows = [[name, *(f"{stats[name, c]['median_ms']:.1f} "
                     f"({stats[names[0], c]['median_ms'] / stats[name, c]['median_ms']:.2f}x)" for c in a.contexts)]
            for name in names]
    print(markdown(["decoder", *(f"@{c}" for c in a.contexts)], rows))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
