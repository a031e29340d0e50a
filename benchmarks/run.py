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
sys.path.insert(0, str(ROOT))

from benchmarks.cpu import physical_cores  # noqa: E402 - stdlib only: numpy must not load before the threads are set

CONTEXTS = (100, 600, 1600)
PROMPT = 616  # 576 image tokens + ~40 text tokens


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers, 1 warm-up + 3 runs; peers, variants, session "
                                                        "settings and the PyTorch TTFT skipped")
    p.add_argument("--layers", type=int, help="decoder layers of the synthetic model (default 4; --quick 2)")
    p.add_argument("--size", choices=["real", "tiny"], default="real",
                   help="widths of the synthetic model: real (M3's, the default) or tiny (a smoke run of this "
                        "script: the figures mean nothing)")
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
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from benchmarks import artifacts, report
    from benchmarks.timing import bandwidth, load_average, machine, mem_available

    t0 = time.time()
    res = {"meta": {**machine(a.threads), "size": a.size, "layers": a.layers, "quick": a.quick, "warmup": a.warmup,
                    "reps": a.reps, "max_context": artifacts.MAX_CONTEXT, "load_start": load_average(),
                    "mem_available_start_GiB": round(mem_available() / 2**30, 1)}}
    print(f"[run] {a.layers} decoder layers, {a.threads} threads, warm-up {a.warmup}, {a.reps} runs per figure, "
          f"load {res['meta']['load_start']:.2f}", flush=True)
    arts = artifacts.build_all(artifacts.Model(a.size, a.layers), a.quick)
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


class Run:
    """What the phases below share: the options, the artifacts, the results, and the objects one phase makes for the
    next (the pipeline, the shipped COM decoder, the plain base decoder). A phase frees what it alone used."""

    def __init__(self, a, arts: dict, res: dict):
        from pydicom.data import get_testdata_file

        from runtime.core.backend import OrtBackend
        from runtime.core.bundle import Bundle
        from runtime.core.clip_input import preprocess
        from runtime.core.image import load_image
        from runtime.core.pipeline import Pipeline

        self.a, self.arts, self.res = a, arts, res
        self.W, self.R, self.T = a.warmup, a.reps, a.threads
        self.t0 = time.time()
        self.bundle = Bundle.open(arts["bundle"], verify=False)
        self.cfg = self.bundle.manifest.config
        self.backend = OrtBackend("cpu", self.T)
        # No image prefix cache: each timed ask is a first question on a new image (vision graph and whole prefill).
        self.p = Pipeline(self.bundle, self.backend, prefix_cache_mb=0)
        self.scan = load_image(get_testdata_file("CT_small.dcm"))
        self.pixels = preprocess(self.scan)
        self.embeds = None  # a 616-token prompt's embeddings, for the prefill figures
        self.ref = self.decoder = self.embed = self.ours = self.base = self.gemv = None
        self.quantized = {}  # name -> a Pipeline on that calibrated bundle (time to first token, one image)

    def say(self, message: str) -> None:
        print(f"[run] {time.time() - self.t0:5.0f}s {message}", flush=True)

    def bench(self, cases: dict) -> dict:
        from benchmarks.timing import bench

        return bench(cases, self.W, self.R)


def phases(a, arts, res, np, torch):
    r = Run(a, arts, res)
    for phase in (vision_vqgan_ttft, decode_d1, decode_d2, optimizations, session_settings, genai, generate):
        phase(r, np, torch)
        gc.collect()


def vision_vqgan_ttft(r: Run, np, torch) -> None:
    """Vision, VQGAN and time to first token: our runtime vs the PyTorch reference (one reference: COM; the GEN
    vision path is timed on it with GEN's clip_layer, identical shapes, only projector values differ)."""
    import dataclasses

    from benchmarks import artifacts
    from export.reference.checkpoint import CheckpointPaths
    from export.reference.model import load_reference
    from export.reference.variants import get_task
    from export.reference.vqgan import load_vqgan
    from runtime.contract.healthgpt import COM, GEN, IMAGE_TOKENS, VQ_CODES
    from runtime.core.bundle import Bundle
    from runtime.core.pipeline import Pipeline

    r.say("vision / vqgan / time to first token")
    r.ref = ref = load_reference(r.arts["checkpoint"], COM.name)
    ref_gen = dataclasses.replace(ref, cfg=get_task(ref.variant, GEN.name))
    pv, pixels = torch.from_numpy(r.pixels), r.pixels
    com, gen_vision = r.p.task(COM.name), r.backend.load(r.bundle, GEN.name, "vision")
    vision = {"ours com": lambda: com.vision.run({"pixel_values": pixels}),
              "ours gen": lambda: gen_vision.run({"pixel_values": pixels}),
              "torch com": lambda: ref.encode_image(pv), "torch gen": lambda: ref_gen.encode_image(pv)}
    if r.a.quick:  # the reference runs the whole CLIP tower for both tasks (hidden_states[clip_layer]): same cost
        vision.pop("torch gen")
    r.res["vision"] = r.bench(vision)
    (vqgan,) = GEN.shared_graphs
    vq_graph = r.p.shared(vqgan)
    paths = CheckpointPaths.find(r.arts["checkpoint"])
    vq_torch = load_vqgan(paths.vqgan_ckpt, paths.vqgan_yaml)
    idx = np.random.default_rng(0).integers(0, VQ_CODES, (1, IMAGE_TOKENS))
    ti = torch.from_numpy(idx)

    def torch_vq():
        with torch.inference_mode():
            return vq_torch(ti)

    r.res["vqgan"] = r.bench({"ours": lambda: vq_graph.run({"indices": idx}), "torch": torch_vq})
    question = "What does this scan show? Describe the findings in the image in detail, please."
    ttft = {"ours ask": lambda: r.p.ask(r.scan, question, max_new_tokens=1),
            "torch answer": lambda: ref.answer(r.scan, question, max_new_tokens=1)}
    if r.a.quick:
        ttft.pop("torch answer")
    r.quantized = {k: Pipeline(Bundle.open(d), r.backend, prefix_cache_mb=0) for k, d in r.arts["quantized"].items()
                   if k in artifacts.TIMED and isinstance(d, Path)}
    ttft.update({f"ours ask {k}": (lambda q=q: q.ask(r.scan, question, max_new_tokens=1))
                 for k, q in r.quantized.items()})
    r.res["ttft"] = r.bench(ttft)
    for q in r.quantized.values():
        q.unload(COM.name)
    r.res["prompt_tokens"] = r.p.prompt(COM, r.scan, question).shape[1]
    # keep the COM decoder and embedding; drop both vision sessions and the reference's CLIP
    r.decoder, r.embed = com.decoder, com.embed
    r.p.unload(COM.name)
    ref.clip = None


def decode_d1(r: Run, np, torch) -> None:
    """Decode and prefill: ours (the COM decoder + its KV cache), the plain base decoder, the reference, optimum."""
    from benchmarks import artifacts
    from benchmarks import contenders as C
    from benchmarks.timing import Gemv
    from runtime.contract.reports import QuantReport
    from runtime.core.bundle import Bundle

    r.say("decode / prefill group D1")
    r.embeds = np.random.default_rng(0).standard_normal((1, PROMPT, r.cfg.hidden)).astype(np.float32)
    r.ours = ours = C.OurDecoder(r.decoder, r.embed, r.p.cache("com"), C.graph_weight_bytes(r.bundle, "com", "decoder"))
    r.base = base = C.our_decoder(Bundle.open(r.arts["variants"]["base"]), "com", r.embed, r.T)
    tref, opt = C.TorchDecoder(r.ref.llm), None
    if isinstance(r.arts["optimum"], Path):
        try:
            opt = C.OptimumDecoder(r.arts["optimum"], r.T)
        except Exception as e:  # noqa: BLE001
            r.arts["optimum"] = f"not run: {type(e).__name__}: {str(e)[:160]}"
    timed = {k: d for k, d in r.arts["quantized"].items() if k in artifacts.TIMED}
    quant = {f"ours com {scheme}": C.our_decoder(Bundle.open(d), "com", r.embed, r.T)
             for scheme, d in timed.items() if isinstance(d, Path)}
    d1 = {"ours com": ours, **quant, "ours base": base, "torch com": tref, **({"optimum base": opt} if opt else {})}
    r.gemv = Gemv(1.0)  # the bandwidth yardstick, timed in the same round-robin as the decoders
    r.res["gemv_bytes"] = r.gemv.nbytes
    r.res["decode_D1"] = {str(c): r.bench({**{k: d.decode_case(c) for k, d in d1.items()}, "GEMV": r.gemv.case()})
                          for c in CONTEXTS}
    pre = {"ours com": ours.prefill_case(r.embeds), **{k: d.prefill_case(r.embeds) for k, d in quant.items()},
           "torch com": tref.prefill_case(r.embeds)}
    if opt:
        pre["optimum base"] = opt.prefill_case(PROMPT)
    r.res["prefill_D1"] = r.bench(pre)
    r.res["bytes"] = {"ours com": [ours.weight_bytes, _kv_read(ours)], "ours base": [base.weight_bytes, _kv_read(base)],
                      "torch com": [tref.weight_bytes, None],
                      **({"optimum base": [opt.weight_bytes, None]} if opt else {}),
                      **{k: [d.weight_bytes, _kv_read(d)] for k, d in quant.items()},
                      "kv_per_token": 2 * r.cfg.layers * r.cfg.kv_heads * r.cfg.head_dim * 4}
    r.res["quantized"] = {scheme: {"rss_delta": quant[f"ours com {scheme}"].rss_delta, "bundle": str(d)}
                          if isinstance(d, Path) else d for scheme, d in timed.items()}
    # each calibrated bundle's accuracy report (calibration/report.py, written by calibrate) and its bundle size
    r.res["accuracy"] = {k: {**QuantReport.read(d, Bundle.open(d, verify=False).manifest).to_json(),
                             "bundle_bytes": _size(d)}
                         if isinstance(d, Path) else d for k, d in r.arts["quantized"].items()}
    r.res["accuracy"]["fp32"] = {"bundle_bytes": _size(r.arts["bundle"])}
    r.res["peers"] = {"optimum": str(r.arts["optimum"]) if opt is None else "ORTModelForCausalLM (onnxruntime-gpu, "
                                                                             "CPU provider)"}
    r.ref = None


def _size(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def _kv_read(decoder) -> dict[str, int]:
    return {str(c): decoder.kv_bytes_read(c) for c in CONTEXTS}


def decode_d2(r: Run, np, torch) -> None:
    """H-LoRA overhead: COM and GEN decoders vs the plain base decoder, side by side."""
    from benchmarks import contenders as C
    from benchmarks.timing import rss_bytes

    r.say("decode group D2 (H-LoRA)")
    before = rss_bytes()
    gen = r.p.task("gen")
    ours_gen = C.OurDecoder(gen.decoder, r.embed, r.p.cache("gen"), C.graph_weight_bytes(r.bundle, "gen", "decoder"),
                            rss_bytes() - before)
    d2 = {"ours com": r.ours, "ours gen": ours_gen, "ours base": r.base}
    r.res["decode_D2"] = {str(c): r.bench({**{k: d.decode_case(c) for k, d in d2.items()}, "GEMV": r.gemv.case()})
                          for c in CONTEXTS}
    r.res["bytes"]["ours gen"] = [ours_gen.weight_bytes, _kv_read(ours_gen)]
    r.p.unload("gen")
    r.gemv = None


def optimizations(r: Run, np, torch) -> None:
    """Each alternative against the shipped COM decoder, side by side."""
    from benchmarks import contenders as C
    from runtime.core.bundle import Bundle
    from runtime.core.kvcache import KVCache

    r.say("optimizations")
    ours, embeds = r.ours, r.embeds
    opts = r.res["opt"] = {}
    opts["kv"] = {str(c): r.bench({"in place (shipped)": ours.decode_case(c),
                                   "concat copy (emulated)": ours.decode_case(c, concat_copy=True)})
                  for c in CONTEXTS}
    full = C.OurDecoder(r.decoder, r.embed, KVCache(r.backend, r.decoder.spec), ours.weight_bytes,
                        full_cache=True)  # the same graph and session, its cache held at max_context rows
    opts["cache_rows"] = {
        **{str(c): r.bench({"grown (shipped)": ours.decode_case(c), "max_context rows": full.decode_case(c)})
           for c in CONTEXTS},
        "prefill": r.bench({"grown (shipped)": ours.prefill_case(embeds),
                            "max_context rows": full.prefill_case(embeds)})}
    del full
    for name, what in (("com-gemm1", ("decode600", "prefill")), ("com-allpos", ("prefill",)),
                       ("com-dynamo", ("decode600", "prefill"))):
        d = r.arts["variants"].get(name)
        if not isinstance(d, Path):
            opts[name] = d or "skipped (--quick)"
            continue
        r.say(f"  variant {name}")
        try:
            v = C.our_decoder(Bundle.open(d), "com", r.embed, r.T)
            out = {"rss_delta": v.rss_delta, "weight_bytes": v.weight_bytes}
            for m in what:
                if m == "prefill":
                    out[m] = r.bench({"shipped": ours.prefill_case(embeds), name: v.prefill_case(embeds)})
                else:
                    c = int(m[len("decode"):])
                    out[m] = r.bench({"shipped": ours.decode_case(c), name: v.decode_case(c)})
            del v
        except Exception as e:  # noqa: BLE001 - one failed comparison is reported, the run goes on
            out = f"failed: {type(e).__name__}: {str(e)[:160]}"
        opts[name] = out
        gc.collect()


def session_settings(r: Run, np, torch) -> None:
    """ONNX Runtime session settings on the shipped COM decoder graph, each against the shipped settings."""
    from benchmarks import contenders as C

    settings = {} if r.a.quick else {
        "threads=1": dict(threads=1), "threads=0 (ORT default)": dict(threads=0),
        "opt level extended": dict(opt="extended"), "opt level basic": dict(opt="basic"),
        "opt level disable": dict(opt="disable"), "mem pattern off": dict(mem_pattern=False),
        "spinning off": dict(spinning=False), "own weights (prepack)": dict(weights="own"),
        "shared, prepack off": dict(prepack=False), "own weights, prepack off": dict(weights="own", prepack=False)}
    out = r.res["opt"]["session"] = {} if settings else "skipped (--quick)"
    for label, kw in settings.items():
        r.say(f"  session {label}")
        threads = kw.pop("threads", r.T)
        try:
            v = C.our_decoder(r.bundle, "com", r.embed, threads, r.backend, settings=kw)
            out[label] = {"bench": r.bench({"shipped": r.ours.decode_case(600), label: v.decode_case(600)}),
                          "rss_delta": v.rss_delta}
            del v
        except Exception as e:  # noqa: BLE001
            out[label] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        gc.collect()


def genai(r: Run, np, torch) -> None:
    """ONNX Runtime GenAI (own venv, subprocess), with our plain base decoder measured right before and after."""
    from benchmarks import artifacts, peers

    a, T, res, base, say = r.a, r.T, r.res, r.base, r.say
    genai = res["genai"] = {}
    for prec in ("fp32", "int4"):
        if a.quick:
            genai[prec] = "skipped (--quick)"
            continue
        say(f"ORT GenAI {prec}")
        model = peers.build(artifacts.Model(a.size, a.layers), prec)
        if isinstance(model, str):
            genai[prec] = model
            continue
        anchor = lambda: {str(c): r.bench({"ours base": base.decode_case(c)})["ours base"]  # noqa: E731
                          for c in CONTEXTS}
        before_ = anchor()
        json.dump(res, open("/tmp/healthgpt-bench-partial.json", "w"), default=str)  # in case anything dies
        run = peers.run(model, T, list(CONTEXTS), PROMPT, r.W, r.R, r.cfg.max_context)
        genai[prec] = run if isinstance(run, str) else {**run, "weight_bytes": peers.weight_bytes(model),
                                                         "ours_base_before": before_, "ours_base_after": anchor()}
    if not a.quick:
        res["prefill_base_anchor"] = r.bench({"ours base": base.prefill_case(r.embeds)})
    r.base = None


def generate(r: Run, np, torch) -> None:
    """End to end: one constrained image generation (1024 decode steps), step times from on_token."""
    a, res, p, scan, say = r.a, r.res, r.p, r.scan, r.say
    if a.quick or a.no_generate:
        res["generate"] = "skipped (--quick)" if a.quick else "skipped (--no-generate)"
        return
    res["generate"] = {}
    for name, pipe in {"fp32": p, **{k: q for k, q in r.quantized.items() if k == "int4"}}.items():
        say(f"generate one image (1024 tokens), {name}")
        stamps = []
        start = time.perf_counter()
        pipe.generate_image(scan, "Reconstruct the image.", constrain_image_tokens=True,
                            on_token=lambda t: stamps.append(time.perf_counter()))
        total = time.perf_counter() - start
        steps = np.diff(stamps)
        res["generate"][name] = {"seconds": total, "tokens": len(stamps), "ttft_s": stamps[0] - start,
                                 "step_median_ms_first100": 1e3 * float(np.median(steps[:100])),
                                 "step_median_ms_last100": 1e3 * float(np.median(steps[-100:])),
                                 "step_median_ms": 1e3 * float(np.median(steps)), "n": 1}
        pipe.unload("gen")


if __name__ == "__main__":
    sys.exit(main())
