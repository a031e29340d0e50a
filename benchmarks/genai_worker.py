"""Runs INSIDE the ONNX Runtime GenAI venv (see peers.py): times one model-builder output with GenAI's own generator
and prints one JSON object on stdout. Not imported by anything else (GenAI needs the CPU `onnxruntime` package,
which must never enter the project's .venv).

    python genai_worker.py '{"model": DIR, "threads": 2, "contexts": [100, 600, 1600], "prefill": 616,
                             "warmup": 3, "reps": 10, "max_length": 2048}'
"""

import json
import statistics
import sys
import time

import numpy as np
import onnxruntime_genai as og


def stat(times, warmup):
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
            "n": len(times), "warmup": warmup}


def main():
    a = json.loads(sys.argv[1])
    path = a["model"]
    cfg_file = f"{path}/genai_config.json"
    cfg = json.load(open(cfg_file))
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = a["threads"]  # same thread count as every other contender
    json.dump(cfg, open(cfg_file, "w"), indent=4)
    config = og.Config(path)
    config.clear_providers()  # CPU
    model = og.Model(config)
    rng = np.random.default_rng(0)
    warmup, reps = a["warmup"], a["reps"]

    def generator():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=a["max_length"], do_sample=False)
        return og.Generator(model, params)

    out = {"genai_version": og.__version__, "share_buffer": cfg["search"].get("past_present_share_buffer"),
           "decode": {}, "notes": []}
    # prefill: a fresh generator per run, `prefill` tokens appended (append_tokens runs the model on them)
    times = []
    for _i in range(warmup + reps):
        g = generator()
        ids = rng.integers(0, 32000, size=a["prefill"], dtype=np.int32)
        t = time.perf_counter()
        g.append_tokens(ids)
        times.append(time.perf_counter() - t)
        del g
    out["prefill"] = stat(times[warmup:], warmup)
    # decode: one generator; grow the context to each target with append_tokens, then time generate_next_token
    # (each call runs the model once on the previous token and picks the next: one decode step), then, right
    # after, a 1 GiB fp32 GEMV through numpy: the bandwidth yardstick the main process uses too
    n = int((2**30 / 4) ** 0.5) // 64 * 64
    mat, vec = rng.standard_normal((n, n), dtype=np.float32), np.ones(n, np.float32)
    out["gemv_bytes"], out["gemv"] = mat.nbytes, {}
    g, length = generator(), 0
    for ctx in a["contexts"]:
        need = ctx - length
        try:
            g.append_tokens(rng.integers(0, 32000, size=need, dtype=np.int32))
        except Exception as e:  # older GenAI: no append after generation; start over with a full prompt
            out["notes"].append(f"append after decode refused ({e}); fresh generator for context {ctx}")
            g = generator()
            g.append_tokens(rng.integers(0, 32000, size=ctx, dtype=np.int32))
        length = ctx
        times, gemv = [], []
        for _ in range(warmup + reps):  # back to back, as in a real decode loop
            t = time.perf_counter()
            g.generate_next_token()
            times.append(time.perf_counter() - t)
            length += 1
        for _ in range(warmup + reps):  # then the yardstick, its warm-up absorbing GenAI's spinning threads
            t = time.perf_counter()
            mat @ vec
            gemv.append(time.perf_counter() - t)
        out["decode"][str(ctx)] = stat(times[warmup:], warmup)
        out["gemv"][str(ctx)] = stat(gemv[warmup:], warmup)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
