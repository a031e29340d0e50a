#!/usr/bin/env python
"""HealthGPT-M3 at its true size on this CPU (issue 15): our fp32 and int4 bundles and the PyTorch reference on the
same full checkpoint, each in a process of its own (two 15 GB models do not fit side by side in 24 GB, and each
peak RSS is then that contender's alone). Per contender: open/load time, time to first token of `ask` on pydicom's
CT_small.dcm (576 image tokens + the question), decode ms/token at ~100/~600/~1600 (median after warm-up; the KV
cache holds that many rows), seconds per generated 256x256 image (int4 by default: 1024 tokens in fp32 take tens of
minutes here), %limit of decode against the measured GEMV bandwidth and the weight bytes each token reads.
ONNX Runtime GenAI int4 of the same base model (the checkpoint's Phi-3 folder through its model builder, in its own
venv: benchmarks/peers.py), llama.cpp Q4_0 (llama-cpp-python built from source in its own venv:
benchmarks/llamacpp.py) and OpenVINO GenAI int4 (optimum-intel's export with NNCF, in its own venv:
benchmarks/openvino.py) are timed on prefill of 616 tokens and decode; they read no image.

    python benchmarks/full_size.py --checkpoint CKPT --fp32 FP32_BUNDLE --int4 INT4_BUNDLE [--genai DIR] [--reps 3]
    python benchmarks/full_size.py --checkpoint CKPT --int4 INT4 --genai DIR --llama DIR --no-torch \
        --rounds 2 --warmup 2 --reps 5        # the peers' run of issue 25
    python benchmarks/full_size.py --checkpoint CKPT --openvino DIR --no-torch --rounds 2 --warmup 2 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTEXTS = (100, 600, 1600)
QUESTION, INSTRUCTION = "What does this scan show?", "Reconstruct the image."


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ours(a: dict) -> dict:
    import numpy as np
    from pydicom.data import get_testdata_file

    from benchmarks.contenders import OurDecoder, graph_weight_bytes
    from benchmarks.timing import bench
    from runtime.contract.healthgpt import TASKS
    from runtime.core.backend import OrtBackend
    from runtime.core.bundle import Bundle
    from runtime.core.kvcache import KVCache
    from runtime.core.pipeline import Pipeline

    image = get_testdata_file("CT_small.dcm", download=False)
    out, start = {}, time.perf_counter()
    backend = OrtBackend("cpu", session_cache=a.get("session_cache"))  # None: prepared sessions (runtime default)
    pipe = Pipeline(Bundle.open(a["bundle"]), backend, prefix_cache_mb=0)  # every ask: a new image
    out["open_s"] = time.perf_counter() - start  # manifest + every file's sha256 (or its record)
    for task in a["tasks"]:
        start = time.perf_counter()
        graphs = pipe.task(task)
        t = {"load_s": time.perf_counter() - start}
        stamps = []
        start = time.perf_counter()
        pipe.tokens(TASKS[task], image, QUESTION if task == "com" else INSTRUCTION, max_new_tokens=1,
                    on_token=lambda _: stamps.append(time.perf_counter()))
        t["ttft_s"] = stamps[0] - start
        if task == "com":
            t.update(conversation_ttft(pipe, image))
        dec = OurDecoder(graphs.decoder, graphs.embed, KVCache(pipe.backend, graphs.decoder.spec),
                         graph_weight_bytes(pipe.bundle, task, "decoder"))
        cases = {str(c): dec.decode_case(c) for c in a["contexts"]}
        if task == "com":  # 576 image rows + 40 text rows from an empty cache, as the peers' 616 tokens
            cases["prefill"] = dec.prefill_case(np.random.default_rng(0).standard_normal(
                (1, 616, graphs.decoder.spec.tensor("inputs_embeds").shape[-1])).astype(np.float32))
        res = bench(cases, a["warmup"], a["reps"])
        if "prefill" in res:
            t["prefill_s"] = res.pop("prefill")["median_ms"] / 1e3
        t["decode"] = {c: {**r, "bytes": dec.weight_bytes + dec.kv_bytes_read(int(c))} for c, r in res.items()}
        if task == "gen" and a["image"]:
            start = time.perf_counter()
            pipe.generate_image(image, INSTRUCTION, constrain_image_tokens=True)
            t["image_s"] = time.perf_counter() - start
        out[task] = t
        pipe.unload(task)  # the next task's sessions do not sit beside this one's
    out["peak_rss_gib"] = peak_gib()
    return out


def conversation_ttft(pipe, image) -> dict:
    """Time to first token of a follow-up question, and of a new conversation on an image already seen (issue 23),
    with the prefix cache on (the runtime's default size) for these turns only."""
    from runtime.core.prefixes import PrefixCache

    def ttft(conv, question: str) -> float:
        stamps: list[float] = []
        start = time.perf_counter()
        conv.ask(question, max_new_tokens=1, on_token=lambda _: stamps.append(time.perf_counter()))
        return stamps[0] - start

    pipe.prefixes = PrefixCache(1024)
    conv = pipe.conversation(image)
    ttft(conv, QUESTION)  # the image's first question: its prefix computed and kept
    out = {"followup_ttft_s": ttft(conv, "Is there anything abnormal?"),
           "seen_image_ttft_s": ttft(pipe.conversation(image), QUESTION)}
    pipe.prefixes = PrefixCache(0)
    return out


def torch_reference(a: dict) -> dict:
    import torch
    from pydicom.data import get_testdata_file

    from benchmarks.contenders import TorchDecoder
    from benchmarks.timing import bench
    from export.reference.model import load_reference
    from runtime.core.image import load_image

    torch.set_num_threads(a["threads"])
    start = time.perf_counter()
    ref = load_reference(a["checkpoint"], "com")
    out = {"load_s": time.perf_counter() - start}
    image = load_image(get_testdata_file("CT_small.dcm", download=False))
    start = time.perf_counter()
    ref.answer(image, QUESTION, max_new_tokens=1)  # HF generate: vision, prompt, prefill, one token
    com = {"ttft_s": time.perf_counter() - start}
    dec = TorchDecoder(ref.llm)
    res = bench({str(c): dec.decode_case(c) for c in a["contexts"]}, a["warmup"], a["reps"])
    com["decode"] = {c: {**r, "bytes": dec.weight_bytes + dec.kv_bytes_read(int(c))} for c, r in res.items()}
    return {**out, "com": com, "peak_rss_gib": peak_gib()}


KV_BYTES = 32 * 2 * 3072 * 4  # fp32 K and V of M3's 32 layers per cached token


def genai(a: dict) -> dict:
    """GenAI int4 of the base model: built once into a["out"] (the builder's time and peak RSS kept), then timed."""
    from benchmarks import peers

    out = Path(a["out"])
    built = (out / "genai_config.json").is_file()
    start = time.perf_counter()
    model = peers.build_from(Path(a["checkpoint"]) / "Phi-3-mini-4k-instruct", out, "int4")
    if isinstance(model, str):
        return {"error": model}
    res = {} if built else {"build_s": time.perf_counter() - start, "build_peak_rss_gib":
                            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}
    run = peers.run(model, a["threads"], a["contexts"], 616, a["warmup"], a["reps"], 2048)
    if isinstance(run, str):
        return {**res, "error": run}
    weights = peers.weight_bytes(model)
    return {**res, "com": {"prefill_s": run["prefill"]["median_ms"] / 1e3, "decode": {
        c: {**d, "bytes": weights + KV_BYTES * int(c)} for c, d in run["decode"].items()}}}


def llama(a: dict) -> dict:
    """llama.cpp Q4_0 of the base model: converted and quantized once into a["out"] (benchmarks/llamacpp.py), then
    timed in its venv (llamacpp_worker.py: llama.cpp's defaults, f16 KV cache)."""
    from benchmarks import llamacpp

    model = llamacpp.gguf(Path(a["checkpoint"]) / "Phi-3-mini-4k-instruct", Path(a["out"]), "Q4_0")
    if isinstance(model, str):
        return {"error": model}
    run = llamacpp.worker({"op": "time", "model": str(model), "threads": a["threads"], "contexts": a["contexts"],
                           "prefill": 616, "warmup": a["warmup"], "reps": a["reps"]})
    if isinstance(run, str):
        return {"error": run}
    weights = model.stat().st_size  # the token embedding table included: llama.cpp's file holds it quantized
    return {"load_s": run["load_s"], "peak_rss_gib": run["peak_rss_gib"], "com": {
        "prefill_s": run["prefill"]["median_ms"] / 1e3,
        "decode": {c: {**d, "bytes": weights + KV_BYTES // 2 * int(c)} for c, d in run["decode"].items()}}}


def openvino(a: dict) -> dict:
    """OpenVINO GenAI int4 of the base model: exported once into a["out"] by optimum-intel with NNCF's int4 defaults
    (benchmarks/openvino.py; the export's time and peak RSS kept), then timed in its venv (openvino_worker.py:
    LLMPipeline on the CPU, its default KV cache there: u8 on this machine)."""
    from benchmarks import openvino as ov

    out = Path(a["out"])
    built = (out / "openvino_model.xml").is_file()
    start = time.perf_counter()
    model = ov.export(Path(a["checkpoint"]) / "Phi-3-mini-4k-instruct", out)
    if isinstance(model, str):
        return {"error": model}
    res = {} if built else {"build_s": time.perf_counter() - start, "build_peak_rss_gib":
                            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}
    run = ov.worker({"op": "time", "model": str(model), "threads": a["threads"], "contexts": a["contexts"],
                     "prefill": 616, "warmup": a["warmup"], "reps": a["reps"]})
    if isinstance(run, str):
        return {**res, "error": run}
    weights, kv = ov.weight_bytes(model), ov.kv_bytes_per_token(model, run["kv_cache"])
    return {**res, "load_s": run["load_s"], "peak_rss_gib": run["peak_rss_gib"], "kv_cache": run["kv_cache"], "com": {
        "prefill_s": run["prefill"]["median_ms"] / 1e3,
        "decode": {c: {**d, "bytes": weights + kv * int(c)} for c, d in run["decode"].items()}}}


WORKERS = {"ours": ours, "torch": torch_reference, "genai": genai, "llama": llama, "openvino": openvino}


def merge(runs: list[dict]) -> dict:
    """One contender's rounds as one result: a timing's median over the rounds' medians (its runs counted), any
    other figure's median over the rounds that have it; an error if every round failed."""
    import statistics

    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]

    def join(values: list):
        if isinstance(values[0], dict):
            if "median_ms" in values[0]:
                return {**values[0], "median_ms": statistics.median(v["median_ms"] for v in values),
                        "n": sum(v["n"] for v in values), "rounds": len(values)}
            return {k: join([v[k] for v in values if k in v]) for k in values[0]}
        return statistics.median(values) if isinstance(values[0], (int, float)) else values[0]

    return join(ok)


def spawn(kind: str, args: dict) -> dict:
    """One contender in its own process; its JSON, or what went wrong."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args["threads"])}
    r = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(args)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        return {"error": f"not run: its process failed ({(r.stderr.strip().splitlines() or ['no output'])[-1][:300]})"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(res: dict) -> str:
    gbps = res["bandwidth"]["gemv_GBps"]

    def decode(d: dict | None) -> str:
        return f"{d['median_ms']:.0f} ({100 * d['bytes'] / (d['median_ms'] / 1e3) / 1e9 / gbps:.0f}%)" if d else "-"

    lines = ["| contender | task | open+load s | TTFT s (prefill) | follow-up / seen image TTFT s | "
             + " | ".join(f"decode ms @{c} (%limit)" for c in CONTEXTS)
             + " | s per image | peak RSS GiB |", "|---" * (7 + len(CONTEXTS)) + "|"]
    for name, r in res["contenders"].items():
        if "error" in r:
            lines.append(f"| {name} | - | {r['error']} |")  # the error says 'not run: reason'
            continue
        for task in (t for t in ("com", "gen") if t in r):
            t = r[task]
            load = (f"{r.get('open_s', 0) + t.get('load_s', r.get('load_s', 0)):.1f}"
                    if {"open_s", "load_s"} & (r.keys() | t.keys()) else "-")
            image = f"{t['image_s']:.0f}" if "image_s" in t else "-"
            ttft = " ".join(([f"{t['ttft_s']:.1f}"] if "ttft_s" in t else [])
                            + ([f"(prefill 616: {t['prefill_s']:.1f})"] if "prefill_s" in t else []))
            peak = f"{r['peak_rss_gib']:.1f}" if "peak_rss_gib" in r else "-"
            turns = (f"{t['followup_ttft_s']:.1f} / {t['seen_image_ttft_s']:.1f}" if "followup_ttft_s" in t
                     else "-")
            lines.append(f"| {name} | {task} | {load} | {ttft} | {turns} | "
                         + " | ".join(decode(t["decode"].get(str(c))) for c in CONTEXTS)
                         + f" | {image} | {peak} |")
    return "\n".join(lines)


def _label(bundle: Path) -> str:
    """' b64 + H-LoRA int4': the int4 bundle's blocks and whether its adapters are quantized too."""
    quant = json.loads((bundle / "manifest.json").read_text())["precision"]["quantization"]
    adapters = " + H-LoRA int4" if quant.get("adapters") == "quantized" else " (H-LoRA fp32)"
    return f" b{quant['block_size']}{adapters}"


def contenders(a: argparse.Namespace, common: dict, first_round: bool) -> list[tuple[str, str, dict]]:
    """(name, worker, its arguments) of each contender asked for; images are generated in the first round only."""
    bundles = [("ours fp32", a.fp32, a.fp32_image, None)] if a.fp32 else []
    bundles += [(f"ours int4{_label(b)}", b, True, None) for b in a.int4]
    bundles += [(f"ours int4{_label(b)}, sessions not prepared", b, False, False) for b in a.unprepared]
    out = [(name, "ours", {**common, "bundle": str(bundle), "tasks": ["com", "gen"], "image": image and first_round,
                           "session_cache": cache}) for name, bundle, image, cache in bundles]
    if not a.no_torch:
        out.append(("PyTorch fp32", "torch", {**common, "checkpoint": str(a.checkpoint)}))
    peers = (("ORT GenAI int4 (base)", "genai", a.genai), ("llama.cpp Q4_0 (base)", "llama", a.llama),
             ("OpenVINO GenAI int4 (base)", "openvino", a.openvino))
    for name, kind, folder in peers:
        if folder is not None:
            out.append((name, kind, {**common, "checkpoint": str(a.checkpoint), "out": str(folder)}))
    return out


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(WORKERS[sys.argv[2]](json.loads(sys.argv[3]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="the full checkpoint (`build.py synth --size full`)")
    p.add_argument("--fp32", type=Path, help="its fp32 bundle (`build.py export`)")
    p.add_argument("--int4", type=Path, nargs="+", default=[], help="its int4 bundles (`build.py calibrate --scheme "
                   "int4`), their quantized graphs' sessions prepared (`python -m runtime prepare`) beforehand")
    p.add_argument("--unprepared", type=Path, nargs="+", default=[], help="int4 bundles timed without prepared "
                   "sessions (no generated image)")
    p.add_argument("--genai", type=Path, help="ORT GenAI int4 of the checkpoint's base: the model builder's output "
                   "folder (built there when missing: needs the GenAI venv, see benchmarks/peers.py)")
    p.add_argument("--llama", type=Path, help="folder for llama.cpp's GGUF files of the checkpoint's base (converted "
                   "and quantized to Q4_0 there when missing: needs the llama.cpp venv, see benchmarks/llamacpp.py)")
    p.add_argument("--openvino", type=Path, help="OpenVINO int4 IR of the checkpoint's base (exported there by "
                   "optimum-intel when missing: needs the OpenVINO venv, see benchmarks/openvino.py)")
    p.add_argument("--rounds", type=int, default=1, help="run the contenders this many times, alternated process by "
                   "process (A B C A B C); each figure is the median over the rounds")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--fp32-image", action="store_true", help="also time a generated image with the fp32 bundle")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: physical cores")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "full_size.json")
    a = p.parse_args(argv)
    from benchmarks.cpu import physical_cores

    threads = a.threads or physical_cores()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from benchmarks.timing import bandwidth, load_average, machine

    common = {"threads": threads, "warmup": a.warmup, "reps": a.reps, "contexts": list(CONTEXTS)}
    res = {"machine": machine(threads), "load_start": load_average(), "bandwidth": bandwidth(threads, 1, 5),
           "contenders": {}}
    for bundle in a.int4:  # once per machine, before the rounds: every round then loads prepared sessions
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "runtime", "prepare", "--bundle", str(bundle)], cwd=ROOT, check=True)
        res.setdefault("prepare_s", {})[str(bundle)] = time.perf_counter() - start
    runs: dict[str, list[dict]] = {}
    for r in range(a.rounds):
        for name, kind, args in contenders(a, common, first_round=r == 0):
            print(f"[run] round {r + 1}/{a.rounds}: {name}", flush=True)
            runs.setdefault(name, []).append(spawn(kind, args))
    res["contenders"] = {name: merge(rs) for name, rs in runs.items()}
    res["rounds"] = runs
    res["load_end"] = load_average()
    m = res["machine"]
    print(f"\n# {m['cpu']}, {m['usable_cpus']} CPUs ({threads} threads), flags: {m['flags']}, {m['mem_GiB']} GiB; "
          f"GEMV bandwidth {res['bandwidth']['gemv_GBps']:.1f} GB/s; load {res['load_start']:.2f} -> "
          f"{res['load_end']:.2f}; {a.rounds} round(s) alternated process by process, each {a.reps} runs after "
          f"{a.warmup} warm-up(s): the median over the rounds' medians (TTFT: one per round, image: first round)")
    print(table(res))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
