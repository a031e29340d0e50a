#!/usr/bin/env python
"""healthgpt-edge benchmark (issue 6): our runtime vs the PyTorch reference, optimum-onnx and ONNX Runtime GenAI on a
synthetic HealthGPT-M3 at real widths with N decoder layers; every figure a median after warm-up; prints a table
and writes JSON. See benchmarks/README.md.

    python benchmarks/run.py [--quick] [--layers N] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTEXTS = (100, 600, 1600)
PROMPT = 616  # 576 image tokens + ~40 text tokens


def physical_cores() -> int:
    seen, cur, allowed = set(), {}, os.sched_getaffinity(0)
    for line in [*open("/proc/cpuinfo"), "\n"]:
        if ":" in line:
            k, v = (s.strip() for s in line.split(":", 1))
            cur[k] = v
        elif cur:
            if int(cur.get("processor", -1)) in allowed:
                seen.add((cur.get("physical id"), cur.get("core id")))
            cur = {}
    return len(seen) or len(allowed)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers, 1 warm-up + 3 runs; peers, variants, session "
                                                        "settings and the PyTorch TTFT skipped")
    p.add_argument("--layers", type=int, help="decoder layers of the synthetic model (default 4; --quick 2)")
    p.add_argument("--json", type=Path, help="where to write the results (default benchmarks/results/"
                                             "{full,quick}.json)")
    p.add_argument("--threads", type=int, help="intra-op threads for every contender (default: physical cores)")
    p.add_argument("--warmup", type=int, help="warm-up runs per figure (default 3; --quick 1)")
    p.add_argument("--reps", type=int, help="timed runs per figure, median reported (default 10; --quick 3)")
    p.add_argument("--no-generate", action="store_true", help="skip the measured 1024-token image generation")
    a = p.parse_args(argv)
    a.layers = a.layers or (2 if a.quick else 4)
    a.threads = a.threads or physical_cores()
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    a.reps = a.reps or (3 if a.quick else 10)
    a.json = a.json or ROOT / "benchmarks" / "results" / ("quick.json" if a.quick else "full.json")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    # the same thread count for every contender, set before numpy/torch/onnxruntime load their pools
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from benchmarks import artifacts, report
    from benchmarks.timing import bandwidth, load_average, machine, mem_available

    t0 = time.time()
    res = {"meta": {**machine(a.threads), "layers": a.layers, "quick": a.quick, "warmup": a.warmup,
                    "reps": a.reps, "max_context": artifacts.MAX_CONTEXT, "load_start": load_average(),
                    "mem_available_start_GiB": round(mem_available() / 2**30, 1)}}
    print(f"[run] {a.layers} decoder layers, {a.threads} threads, warm-up {a.warmup}, {a.reps} runs per figure, "
          f"load {res['meta']['load_start']:.2f}", flush=True)
    arts = artifacts.build_all(a.layers, a.quick)
    res["meta"]["build_s"] = round(time.time() - t0)
    t1 = time.time()

    print("[run] memory bandwidth", flush=True)
    res["bandwidth"] = bandwidth(a.threads, a.warmup, a.reps)
    phases(a, arts, res, np, torch)
    res["meta"]["load_end"] = load_average()
    res["meta"]["measure_s"] = round(time.time() - t1)
    report.finish(res)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1, default=str))
    print(report.table(res))
    print(f"[run] JSON: {a.json}")
    return 0


def phases(a, arts, res, np, torch):
    from export.reference import load_reference
    from export.variants import get_task
    from export.vqgan import load_vqgan
    from benchmarks import contenders as C
    from benchmarks import peers
    from benchmarks.timing import Gemv, bench, rss_bytes
    from runtime.backend import OrtBackend
    from runtime.bundle import Bundle
    from runtime.image import load_image, preprocess
    from runtime.kvcache import KVCache
    from runtime.pipeline import Pipeline
    from pydicom.data import get_testdata_file

    W, R, T = a.warmup, a.reps, a.threads
    t0 = time.time()
    say = lambda m: print(f"[run] {time.time() - t0:5.0f}s {m}", flush=True)  # noqa: E731
    bundle = Bundle.open(arts["bundle"], verify=False)
    backend = OrtBackend("cpu", T)
    p = Pipeline(bundle, backend)
    scan = load_image(get_testdata_file("CT_small.dcm"))
    pixels = preprocess(scan)

    # -- vision, vqgan, time to first token: our runtime vs the PyTorch reference (one reference: COM; the GEN
    #    vision path is timed on it with GEN's clip_layer, identical shapes, only projector values differ)
    say("vision / vqgan / time to first token")
    ref = load_reference(arts["checkpoint"], "com")
    ref_gen = __import__("dataclasses").replace(ref, cfg=get_task(ref.variant, "gen"))
    pv = torch.from_numpy(pixels)
    com = p.task("com")
    gen_vision = backend.load(bundle, "gen", "vision")
    vision = {"ours com": lambda: com.vision.run({"pixel_values": pixels}),
              "ours gen": lambda: gen_vision.run({"pixel_values": pixels}),
              "torch com": lambda: ref.encode_image(pv), "torch gen": lambda: ref_gen.encode_image(pv)}
    if a.quick:  # the reference runs the whole CLIP tower for both tasks (hidden_states[clip_layer]): same cost
        vision.pop("torch gen")
    res["vision"] = bench(vision, W, R)
    vq_graph = backend.load(bundle, "gen", "vqgan")
    paths = __import__("export.checkpoint", fromlist=["x"]).CheckpointPaths.find(arts["checkpoint"])
    vq_torch = load_vqgan(paths.vqgan_ckpt, paths.vqgan_yaml)
    idx = np.random.default_rng(0).integers(0, 8192, (1, 1024))
    ti = torch.from_numpy(idx)

    def torch_vq():
        with torch.inference_mode():
            return vq_torch(ti)

    res["vqgan"] = bench({"ours": lambda: vq_graph.run({"indices": idx}), "torch": torch_vq}, W, R)
    vq_graph = vq_torch = gen_vision = None  # free them (None, not del: the lambdas above name them)
    question = "What does this scan show? Describe the findings in the image in detail, please."
    ttft = {"ours ask": lambda: p.ask(scan, question, max_new_tokens=1),
            "torch answer": lambda: ref.answer(scan, question, max_new_tokens=1)}
    if a.quick:
        ttft.pop("torch answer")
    res["ttft"] = bench(ttft, W, R)
    res["prompt_tokens"] = len(p.prompt("com", scan, question)[1][0])
    com.vision, ref.clip, ref_gen = None, None, None
    gc.collect()

    # -- decode and prefill: ours (Pipeline's COM decoder + KVCache), the plain base decoder, the reference,
    #    optimum (group D1)
    say("decode / prefill group D1")
    embeds = np.random.default_rng(0).standard_normal((1, PROMPT, bundle.config["hidden"])).astype(np.float32)
    ours = C.OurDecoder(com.decoder, com.embed, com.cache, C.graph_weight_bytes(bundle, "com", "decoder"))
    base_dir = arts["variants"]["base"]
    base = C.our_decoder(C.mini_bundle(base_dir), "com", com.embed, T)
    tref = C.TorchDecoder(ref.llm)
    opt = None
    if isinstance(arts["optimum"], Path):
        try:
            opt = C.OptimumDecoder(arts["optimum"], T)
        except Exception as e:  # noqa: BLE001
            arts["optimum"] = f"not run: {type(e).__name__}: {str(e)[:160]}"
    d1 = {"ours com": ours, "ours base": base, "torch com": tref, **({"optimum base": opt} if opt else {})}
    gemv = Gemv(1.0)  # the bandwidth yardstick, timed in the same round-robin as the decoders
    res["gemv_bytes"] = gemv.nbytes
    res["decode_D1"] = {str(c): bench({**{k: d.decode_case(c) for k, d in d1.items()}, "GEMV": gemv.case()}, W, R)
                        for c in CONTEXTS}
    pre = {"ours com": ours.prefill_case(embeds), "torch com": tref.prefill_case(embeds)}
    if opt:
        pre["optimum base"] = opt.prefill_case(PROMPT)
    res["prefill_D1"] = bench(pre, W, R)
    kv_read = lambda d: {str(c): d.kv_bytes_read(c) for c in CONTEXTS}  # noqa: E731
    res["bytes"] = {"ours com": [ours.weight_bytes, kv_read(ours)], "ours base": [base.weight_bytes, kv_read(base)],
                    "torch com": [tref.weight_bytes, None],
                    **({"optimum base": [opt.weight_bytes, None]} if opt else {}),
                    "kv_per_token": 2 * bundle.config["layers"] * bundle.config["kv_heads"]
                    * bundle.config["head_dim"] * 4}
    res["peers"] = {"optimum": str(arts["optimum"]) if opt is None else "ORTModelForCausalLM (onnxruntime-gpu, "
                                                                         "CPU provider)"}
    d1 = tref = opt = pre = ref = None
    gc.collect()

    # -- H-LoRA overhead (group D2): COM and GEN decoders vs the plain base decoder, side by side
    say("decode group D2 (H-LoRA)")
    before = rss_bytes()
    gen = p.task("gen")
    ours_gen = C.OurDecoder(gen.decoder, com.embed, gen.cache, C.graph_weight_bytes(bundle, "gen", "decoder"),
                            rss_bytes() - before)
    d2 = {"ours com": ours, "ours gen": ours_gen, "ours base": base}
    res["decode_D2"] = {str(c): bench({**{k: d.decode_case(c) for k, d in d2.items()}, "GEMV": gemv.case()}, W, R)
                        for c in CONTEXTS}
    res["bytes"]["ours gen"] = [ours_gen.weight_bytes, kv_read(ours_gen)]
    del d2, ours_gen, gen, gemv
    p._tasks.pop("gen")
    gc.collect()

    # -- optimizations, each against the shipped COM decoder side by side
    say("optimizations")
    opts = res["opt"] = {}
    opts["kv"] = {str(c): bench({"in place (shipped)": ours.decode_case(c),
                                 "concat copy (emulated)": ours.decode_case(c, concat_copy=True)}, W, R)
                  for c in CONTEXTS}
    full = C.OurDecoder(com.decoder, com.embed, KVCache(backend, com.decoder.spec), ours.weight_bytes,
                        full_cache=True)  # the same graph and session, its cache held at max_context rows
    opts["cache_rows"] = {
        **{str(c): bench({"grown (shipped)": ours.decode_case(c), "max_context rows": full.decode_case(c)}, W, R)
           for c in CONTEXTS},
        "prefill": bench({"grown (shipped)": ours.prefill_case(embeds), "max_context rows": full.prefill_case(embeds)},
                         W, R)}
    del full
    for name, what in (("com-gemm1", ("decode600", "prefill")), ("com-allpos", ("prefill",)),
                       ("com-dynamo", ("decode600", "prefill"))):
        d = arts["variants"].get(name)
        if not isinstance(d, Path):
            opts[name] = d or "skipped (--quick)"
            continue
        say(f"  variant {name}")
        try:
            v = C.our_decoder(C.mini_bundle(d), "com", com.embed, T)
            out = {"rss_delta": v.rss_delta, "weight_bytes": v.weight_bytes}
            for m in what:
                if m == "prefill":
                    out[m] = bench({"shipped": ours.prefill_case(embeds), name: v.prefill_case(embeds)}, W, R)
                else:
                    c = int(m[len("decode"):])
                    out[m] = bench({"shipped": ours.decode_case(c), name: v.decode_case(c)}, W, R)
        except Exception as e:  # noqa: BLE001 - one failed comparison is reported, the run goes on
            out = f"failed: {type(e).__name__}: {str(e)[:160]}"
        opts[name] = out
        del v
        gc.collect()
    settings = {} if a.quick else {
        "threads=1": dict(threads=1), "threads=0 (ORT default)": dict(threads=0),
        "opt level extended": dict(opt="extended"), "opt level basic": dict(opt="basic"),
        "opt level disable": dict(opt="disable"), "mem pattern off": dict(mem_pattern=False),
        "spinning off": dict(spinning=False), "own weights (prepack)": dict(weights="own"),
        "shared, prepack off": dict(prepack=False), "own weights, prepack off": dict(weights="own", prepack=False)}
    opts["session"] = {} if settings else "skipped (--quick)"
    for label, kw in settings.items():
        say(f"  session {label}")
        threads = kw.pop("threads", T)
        try:
            v = C.our_decoder(bundle, "com", com.embed, threads, backend, settings=kw)
            r = bench({"shipped": ours.decode_case(600), label: v.decode_case(600)}, W, R)
            opts["session"][label] = {"bench": r, "rss_delta": v.rss_delta}
        except Exception as e:  # noqa: BLE001
            opts["session"][label] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        del v
        gc.collect()

    # -- ONNX Runtime GenAI (own venv, subprocess), with our plain base decoder measured right before and after
    genai = res["genai"] = {}
    for prec in ("fp32", "int4"):
        if a.quick:
            genai[prec] = "skipped (--quick)"
            continue
        say(f"ORT GenAI {prec}")
        model = peers.build(a.layers, prec)
        if isinstance(model, str):
            genai[prec] = model
            continue
        anchor = lambda: {str(c): bench({"ours base": base.decode_case(c)}, W, R)["ours base"]  # noqa: E731
                          for c in CONTEXTS}
        before_ = anchor()
        json.dump(res, open("/tmp/healthgpt-bench-partial.json", "w"), default=str)  # in case anything dies
        run = peers.run(model, T, list(CONTEXTS), PROMPT, W, R, 2048)
        genai[prec] = run if isinstance(run, str) else {**run, "weight_bytes": peers.weight_bytes(model),
                                                         "ours_base_before": before_, "ours_base_after": anchor()}
    if not a.quick:
        res["prefill_base_anchor"] = bench({"ours base": base.prefill_case(embeds)}, W, R)
    base = None
    gc.collect()

    # -- end to end: one constrained image generation (1024 decode steps), step times from on_token
    if a.quick or a.no_generate:
        res["generate"] = "skipped (--quick)" if a.quick else "skipped (--no-generate)"
        return
    say("generate one image (1024 tokens)")
    stamps = []
    start = time.perf_counter()
    p.generate_image(scan, "Reconstruct the image.", constrain_image_tokens=True,
                     on_token=lambda t: stamps.append(time.perf_counter()))
    total = time.perf_counter() - start
    steps = np.diff(stamps)
    res["generate"] = {"seconds": total, "tokens": len(stamps), "ttft_s": stamps[0] - start,
                       "step_median_ms_first100": 1e3 * float(np.median(steps[:100])),
                       "step_median_ms_last100": 1e3 * float(np.median(steps[-100:])),
                       "step_median_ms": 1e3 * float(np.median(steps)), "n": 1}


if __name__ == "__main__":
    sys.exit(main())
