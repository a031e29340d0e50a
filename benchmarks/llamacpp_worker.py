"""Runs INSIDE the llama.cpp venv (see llamacpp.py) and prints one JSON object on stdout. Not imported by anything
else.

    python llamacpp_worker.py '{"op": "quantize", "src": BF16_GGUF, "dst": OUT, "type": "Q4_0"}'
    python llamacpp_worker.py '{"op": "logits", "model": GGUF, "ids": NPY, "out": NPY, "threads": 2}'
        teacher-forced logits of every position of the token ids (one batch, no BOS added)
    python llamacpp_worker.py '{"op": "time", "model": GGUF, "threads": 2, "contexts": [100, 600, 1600],
                                "prefill": 616, "warmup": 2, "reps": 5}'
        load time, prefill and one-token decode at each context (the KV cache holding that many tokens), peak RSS
"""

import json
import resource
import statistics
import sys
import time

import llama_cpp
import numpy as np

FTYPES = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}


def quantize(a: dict) -> dict:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[a["type"]]
    tmp = a["dst"] + ".partial"
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(a["src"].encode(), tmp.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize({a['type']}) failed")
    import os

    os.replace(tmp, a["dst"])
    return {"seconds": time.perf_counter() - start}


def logits(a: dict) -> dict:
    ids = np.load(a["ids"]).tolist()
    llm = llama_cpp.Llama(a["model"], n_ctx=len(ids) + 8, n_batch=len(ids), n_ubatch=len(ids), logits_all=True,
                          n_threads=a["threads"], n_threads_batch=a["threads"], verbose=False)
    llm.eval(ids)
    np.save(a["out"], np.asarray(llm.scores[: len(ids)], np.float32))
    return {"positions": len(ids), "vocab": int(llm.n_vocab())}


def _stat(times: list[float], warmup: int) -> dict:
    kept = times[warmup:]
    return {"median_ms": 1e3 * statistics.median(kept), "min_ms": 1e3 * min(kept), "max_ms": 1e3 * max(kept),
            "n": len(kept), "warmup": warmup}


def timed(a: dict) -> dict:
    """llama.cpp's defaults (n_batch 512) but for the context and thread count; Llama.eval at n_tokens = c drops
    the cache beyond c and decodes the token at position c: one decode step with c tokens cached."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    llm = llama_cpp.Llama(a["model"], n_ctx=2048, n_threads=a["threads"], n_threads_batch=a["threads"],
                          verbose=False)
    out = {"load_s": time.perf_counter() - start, "decode": {}}
    runs = a["warmup"] + a["reps"]
    prompt = rng.integers(100, 32000, a["prefill"]).tolist()
    times = []
    for _ in range(runs):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        times.append(time.perf_counter() - t)
    out["prefill"] = _stat(times, a["warmup"])
    for ctx in a["contexts"]:
        llm.reset()
        llm.eval(rng.integers(100, 32000, ctx).tolist())
        times = []
        for _ in range(runs):
            llm.n_tokens = ctx
            t = time.perf_counter()
            llm.eval([int(rng.integers(100, 32000))])
            times.append(time.perf_counter() - t)
        out["decode"][str(ctx)] = _stat(times, a["warmup"])
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    print(json.dumps({"quantize": quantize, "logits": logits, "time": timed}[request["op"]](request)))
