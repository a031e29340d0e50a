"""Runs INSIDE the OpenVINO venv (see openvino.py) and prints one JSON object on stdout. Not imported by anything
else.

    python -P openvino_worker.py '{"op": "time", "model": OV_DIR, "threads": 2, "contexts": [100, 600, 1600],
                                   "prefill": 616, "warmup": 2, "reps": 5}'
        (-P: without it this folder comes first on sys.path and `import openvino` finds benchmarks/openvino.py)
        load time, prefill and one-token decode at each context, peak RSS, the CPU plugin's KV cache precision
"""

import json
import resource
import statistics
import sys
import time

import numpy as np
import openvino as ov
import openvino_genai as ov_genai


def _stat(times: list[float], warmup: int) -> dict:
    kept = times[warmup:]
    return {"median_ms": 1e3 * statistics.median(kept), "min_ms": 1e3 * min(kept), "max_ms": 1e3 * max(kept),
            "n": len(kept), "warmup": warmup}


def _generate(pipe, ids: np.ndarray, new_tokens: int):
    """Greedy generation of exactly `new_tokens` tokens after the prompt `ids` (EOS ignored): its raw perf metrics."""
    config = ov_genai.GenerationConfig()
    config.do_sample, config.ignore_eos = False, True
    config.max_new_tokens = config.min_new_tokens = new_tokens
    result = pipe.generate(ov.Tensor(ids[None].astype(np.int64)), config)
    assert len(result.tokens[0]) == new_tokens, (len(result.tokens[0]), new_tokens)
    return result.perf_metrics.raw_metrics


def timed(a: dict) -> dict:
    """LLMPipeline on "CPU" with INFERENCE_NUM_THREADS = threads and the plugin's defaults otherwise (on this CPU:
    bf16 inference precision, u8 KV cache), greedy. The scheduler settings are those LLMPipeline picks by itself on
    a CPU (get_latency_oriented_scheduler_config: no cap on the tokens of one step, so a prompt is one step) but
    for prefix caching, off here: it is on by default (for chat), and then every prompt's KV blocks stay in memory
    after it. Giving a scheduler_config also makes GenAI's paged-attention backend (continuous batching) required:
    without one, LLMPipeline tries it and falls back to the SDPA backend silently. The prompts are token ids (an
    ov.Tensor: no tokenizer, no chat template), uniform in [100, 32000), a new one for every run.

    load_s: wall time of the LLMPipeline constructor (reads the IR, compiles it for the CPU, loads the tokenizers).
    prefill: GenAI's time to first token (raw_metrics.m_times_to_first_token) of a prompt of `prefill` ids with one
        new token asked for: the whole prompt's forward pass plus the greedy pick of the first token, from the
        start of generate(); warmup + reps runs, a new prompt each.
    decode[c]: one generate() after a prompt of c ids asking for warmup + reps + 1 new tokens (min_new_tokens equal,
        ignore_eos); the time of a decode step is the gap between two consecutive new-token timestamps
        (raw_metrics.m_new_token_times, checked against raw_metrics.m_durations): the first gap is the step that
        feeds the first new token with c tokens in the cache, the k-th gap has c + k - 1 of them; the first
        `warmup` gaps are dropped.
    """
    rng = np.random.default_rng(0)
    scheduler = ov_genai.SchedulerConfig()
    scheduler.max_num_batched_tokens = sys.maxsize  # as GenAI's own latency-oriented default for LLMPipeline
    scheduler.enable_prefix_caching = False
    start = time.perf_counter()
    pipe = ov_genai.LLMPipeline(a["model"], "CPU", INFERENCE_NUM_THREADS=a["threads"], scheduler_config=scheduler)
    out = {"load_s": time.perf_counter() - start, "decode": {}}
    runs = a["warmup"] + a["reps"]
    times = [_generate(pipe, rng.integers(100, 32000, a["prefill"]), 1).m_times_to_first_token[0] / 1e6
             for _ in range(runs)]
    out["prefill"] = _stat(times, a["warmup"])
    for ctx in a["contexts"]:
        raw = _generate(pipe, rng.integers(100, 32000, ctx), runs + 1)
        stamps = list(raw.m_new_token_times)  # milliseconds in this version (the stub says microseconds)
        gaps = [(t1 - t0) / 1e3 for t0, t1 in zip(stamps, stamps[1:])]
        check = sum(raw.m_durations) / 1e6  # the same gaps in microseconds, as GenAI computes them
        assert len(gaps) == runs and abs(sum(gaps) - check) <= 0.01 * check, (gaps, list(raw.m_durations))
        out["decode"][str(ctx)] = _stat(gaps, a["warmup"])
    core = ov.Core()
    out["kv_cache"] = {k: core.get_property("CPU", f"{k.upper()}_CACHE_PRECISION").get_type_name()
                       for k in ("key", "value")}
    out["inference_precision"] = core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    print(json.dumps({"time": timed}[request["op"]](request)))
