"""Server overhead: the bundle behind tritonserver (gRPC streaming) against the same Pipeline in this process.

    .venv-serving/bin/python benchmarks/serving.py --bundle BUNDLE [--clients 1,4] [--warmup 1] [--reps 5]

Runs in the serving venv (`python -m runtime serve` creates it): tritonclient and the runtime are both there, so
client and in-process contenders share one numpy and one onnxruntime. With C clients, C Pipelines run in C threads
here and the server has C instances (one Pipeline each), every one a CPU-provider Pipeline with prepack off as the
repository opens it. Every round runs the in-process contender, then the server, at each client count (interleaved:
load changes hit both); figures are medians over the rounds after the warm-up rounds. Per request: time to first
token (com), tokens/s after it, seconds per constrained 1024-token image (gen). Prints a table and, with --json, the
figures and the machine (CPU model, flags).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pydicom.data import get_testdata_file  # noqa: E402

from benchmarks.cpu import cpu_flags  # noqa: E402
from benchmarks.timing import machine  # noqa: E402
from runtime.core.backend import OrtBackend  # noqa: E402
from runtime.core.bundle import Bundle  # noqa: E402
from runtime.core.pipeline import Pipeline  # noqa: E402
from runtime.core.sampling import Sampler  # noqa: E402
from runtime.frontends.serving import environment, repository  # noqa: E402
from runtime.frontends.serving.client import Client, Request  # noqa: E402
from runtime.frontends.serving.server import Ports, Server  # noqa: E402

QUESTION, INSTRUCTION = "What does this scan show?", "Reconstruct the image."
def com_local(pipe: Pipeline, image: bytes, tokens: int) -> dict:
    stamps: list[float] = []
    start = time.perf_counter()
    pipe.ask(image, QUESTION, max_new_tokens=tokens, on_token=lambda t: stamps.append(time.perf_counter()),
             sampler=Sampler())
    return _com_figures(start, stamps)


def com_server(client: Client, image: bytes, tokens: int) -> dict:
    stamps: list[float] = []
    start = time.perf_counter()
    for out in client.stream(Request(QUESTION, image=image, max_new_tokens=tokens)):
        if "token_id" in out:
            stamps.append(time.perf_counter())
    return _com_figures(start, stamps)


def _com_figures(start: float, stamps: list[float]) -> dict:
    return {"ttft_s": stamps[0] - start, "tokens": len(stamps),
            "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def gen_local(pipe: Pipeline, image: bytes) -> dict:
    from runtime.core.png import png_bytes

    start = time.perf_counter()
    png_bytes(pipe.generate_image(image, INSTRUCTION, constrain_image_tokens=True))  # the server encodes it too
    return {"image_s": time.perf_counter() - start}


def gen_server(client: Client, image: bytes) -> dict:
    start = time.perf_counter()
    client.generate(Request(INSTRUCTION, task="gen", image=image, constrain_image_tokens=True))
    return {"image_s": time.perf_counter() - start}


def concurrently(fns) -> tuple[list[dict], float]:
    """Run the callables at once, one thread each: their results and the wall time of all."""
    results: list = [None] * len(fns)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fns[i]())) for i in range(len(fns))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--clients", default="1,4")
    p.add_argument("--tokens", type=int, default=64, help="max new tokens per answer (default 64)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.add_argument("--port-base", type=int, default=18600, help="HTTP port; gRPC and metrics the next two")
    return p.parse_args()


def _rounds(a, counts: list[int], pipes: list, clients: list, image: bytes) -> dict:
    """Every round: for each client count, in-process then through the server, com then gen; warm-ups dropped."""
    rows: dict = {}
    for rnd in range(a.warmup + a.reps):
        for c in counts:
            for where in ("in-process", "server"):
                if where == "in-process":
                    com = [lambda p=pp: com_local(p, image, a.tokens) for pp in pipes[:c]]
                    gen = [lambda p=pp: gen_local(p, image) for pp in pipes[:c]]
                else:
                    com = [lambda k=k: com_server(k, image, a.tokens) for k in clients[:c]]
                    gen = [lambda k=k: gen_server(k, image) for k in clients[:c]]
                time.sleep(0.3)  # let the other contender's spinning thread pools go idle
                com_res, com_wall = concurrently(com)
                time.sleep(0.3)
                gen_res, gen_wall = concurrently(gen)
                if rnd < a.warmup:
                    continue
                r = rows.setdefault((c, where), {"ttft_s": [], "tok_s": [], "image_s": [], "agg_tok_s": [],
                                                 "images_per_s": []})
                r["ttft_s"] += [x["ttft_s"] for x in com_res]
                r["tok_s"] += [x["tok_s"] for x in com_res]
                r["image_s"] += [x["image_s"] for x in gen_res]
                r["agg_tok_s"].append(sum(x["tokens"] for x in com_res) / com_wall)
                r["images_per_s"].append(c / gen_wall)
    return rows


def _print_table(a, counts: list[int], rows: dict, info: dict) -> None:
    med = {key: {m: statistics.median(v) for m, v in r.items()} for key, r in rows.items()}
    print(f"# {info['cpu']}, {info['usable_cpus']} usable CPUs, flags: {info['flags']}; bundle {a.bundle}; "
          f"{a.tokens} tokens; median of {a.reps} rounds after {a.warmup} warm-up")
    print("| clients | where | TTFT ms | tokens/s per client | tokens/s all | s per image | images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c in counts:
        for where in ("in-process", "server"):
            m = med[(c, where)]
            print(f"| {c} | {where} | {1e3 * m['ttft_s']:.1f} | {m['tok_s']:.0f} | {m['agg_tok_s']:.0f} | "
                  f"{m['image_s']:.2f} | {m['images_per_s']:.2f} |")
        i, s = med[(c, "in-process")], med[(c, "server")]
        print(f"| {c} | server / in-process | {s['ttft_s'] / i['ttft_s']:.2f}x | {s['tok_s'] / i['tok_s']:.2f}x | "
              f"{s['agg_tok_s'] / i['agg_tok_s']:.2f}x | {s['image_s'] / i['image_s']:.2f}x | "
              f"{s['images_per_s'] / i['images_per_s']:.2f}x |")


def main() -> int:
    a = _parse()
    counts = [int(c) for c in a.clients.split(",")]
    image = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    most = max(counts)
    pipes = [Pipeline(Bundle.open(a.bundle), OrtBackend("cpu", prepack=False)) for _ in range(most)]
    for pipe in pipes:
        for task in ("com", "gen"):
            pipe.task(task)
    env = environment.ensure()
    repo = repository.write(a.bundle, Path(f"/tmp/healthgpt-serving-bench-{time.time_ns()}"),
                            repository.Options(instances=most))
    server = Server(env, repo, Ports(a.port_base, a.port_base + 1, a.port_base + 2)).start()
    try:
        server.wait_ready(600)
        clients = [Client(server.grpc) for _ in range(most)]
        rows = _rounds(a, counts, pipes, clients, image)
        for k in clients:
            k.close()
    finally:
        server.stop()
    info = machine(len(os.sched_getaffinity(0)))
    _print_table(a, counts, rows, info)
    if a.json:
        tmp = a.json.with_name(f".{a.json.name}.tmp")
        tmp.write_text(json.dumps({"machine": {**info, "cpu_flags": cpu_flags()}, "tokens": a.tokens, "reps": a.reps,
                                   "warmup": a.warmup, "rows": {f"{c}/{w}": r for (c, w), r in rows.items()}},
                                  indent=1))
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
