#!/usr/bin/env python
"""Where a decoder step's time goes (issue 25, item 1): ONNX Runtime's own profiler over the shipped session of a
bundle's decoder (OrtBackend.load, profiler switched on), for decode steps at a context and for a prefill, tabulated
per op class beside the bytes each class reads (weights: the initializers each node of ONNX Runtime's optimized
graph reads, prepacked or not; activations: the profiler's activation_size, the KV cache rows included). The first
step of each kind is a warm-up and is left out.

    python benchmarks/op_profile.py --bundle BUNDLE [--task com] [--context 600] [--prefill 616] [--reps 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.contenders import TOKEN, OurDecoder, graph_weight_bytes  # noqa: E402
from runtime.core.backend import OrtBackend  # noqa: E402
from runtime.core.bundle import Bundle  # noqa: E402
from runtime.core.generate import decode_one_token, forward  # noqa: E402
from runtime.core.kvcache import KVCache  # noqa: E402

# node-name scopes of the exported decoder (export/compile/graphs.py): one H-LoRA linear each
HLORA_SCOPE = re.compile(r"^/(qkv|o|gate_up|down)(_\d+)?/")
WEIGHT_OPS = {"MatMul", "MatMulNBits", "FusedMatMul", "Gemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
# the class whose time is furthest above its bytes': also tabulated per op type, under HLORA_OPS
HLORA, HLORA_OPS = "H-LoRA (A/R, routing, gate, B, add)", "H-LoRA by op"
CLASSES = {"attention (scores, softmax, values, RoPE)": {"FusedMatMul", "Softmax", "MatMul"},
           "norms": {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization"},
           "MLP activation, residual adds": {"QuickGelu", "Sigmoid", "Mul", "Add"}}


class _Profiling:
    """onnxruntime as OrtBackend uses it, except that every SessionOptions it makes has the profiler on."""

    def __init__(self, ort, prefix: str):
        self._ort, self._prefix = ort, prefix

    def __getattr__(self, name: str):
        return getattr(self._ort, name)

    def SessionOptions(self):  # noqa: N802 - onnxruntime's name
        opts = self._ort.SessionOptions()
        opts.enable_profiling, opts.profile_file_prefix = True, self._prefix
        return opts


def op_class(name: str, op: str, weight_bytes: int, base: bool) -> str:
    """The class of one node: base linears, H-LoRA, LM head, attention, norms, MLP glue, shape and layout ops."""
    if HLORA_SCOPE.match(name):
        return "base linears" if base else HLORA
    if op in WEIGHT_OPS and weight_bytes > 0:
        return "LM head"
    return next((c for c, ops in CLASSES.items() if op in ops), "shape and layout")


def graph_facts(optimized: Path) -> tuple[dict[str, int], set[str]]:
    """From ONNX Runtime's optimized graph: node name -> bytes of the initializers it reads (the profiler's
    parameter_size misses prepacked weights; 4-bit tensors count half a byte per value), and the names of the base
    linears: in an H-LoRA scope, the weight node that shares its input with another (A, R) and is added
    to (the B term, or a Gemm's C); its weights need not be the largest at tiny widths."""
    model = onnx.load(str(optimized), load_external_data=False)
    size = {}
    for t in model.graph.initializer:
        bits = 4 if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else 8 * np.dtype(
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        size[t.name] = int(np.prod(t.dims, dtype=np.int64)) * bits // 8
    weights = {n.name: sum(size.get(i, 0) for i in n.input) for n in model.graph.node}
    added = {i for n in model.graph.node if n.op_type == "Add" for i in n.input}  # ORT may fuse B + add into a Gemm
    added |= {n.input[2] for n in model.graph.node if n.op_type == "Gemm" and len(n.input) > 2}
    readers: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        if weights[n.name] and HLORA_SCOPE.match(n.name):
            readers[n.input[0]] += 1
    base = {n.name for n in model.graph.node if weights[n.name] and HLORA_SCOPE.match(n.name)
            and readers[n.input[0]] > 1 and n.output[0] in added}
    return weights, base


def tabulate(events: list[dict], weights_of: dict[str, int], base: set[str], ops_of: str | None = None) -> dict:
    """Node events of one run -> per class: ms, node count, weight and activation bytes read; with `ops_of`, the
    nodes of that class only, per op type."""
    table: dict[str, dict] = {}
    for e in events:
        args, name = e["args"], e["name"].removesuffix("_kernel_time")
        weights = weights_of.get(name, 0)
        key = op_class(name, args["op_name"], weights, name in base)
        if ops_of is not None:
            if key != ops_of:
                continue
            key = args["op_name"]
        row = table.setdefault(key, {"ms": 0.0, "nodes": 0, "weight_bytes": 0, "activation_bytes": 0})
        row["ms"] += e["dur"] / 1e3
        row["nodes"] += 1
        row["weight_bytes"] += weights
        row["activation_bytes"] += int(args.get("activation_size", 0))
    return table


def runs(profile: Path) -> list[list[dict]]:
    """The profiler's node events, grouped by the session run they belong to, in order."""
    trace = json.loads(profile.read_text())
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run")
    grouped: list[list[dict]] = [[] for _ in spans]
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            i = next((k for k, (a, b) in enumerate(spans) if a <= e["ts"] <= b), None)
            if i is not None:
                grouped[i].append(e)
    return grouped


def median_table(tables: list[dict[str, dict]], step_ms: float | None = None) -> dict[str, dict]:
    """Per row: the median ms over the runs (node counts and bytes are the same in every run of one kind), by time,
    with its share of `step_ms` (default: the rows' own total)."""
    out = {c: {**tables[0][c], "ms": statistics.median(t[c]["ms"] for t in tables if c in t)} for c in tables[0]}
    total = sum(r["ms"] for r in out.values()) if step_ms is None else step_ms
    for r in out.values():
        r["share"] = r["ms"] / total if total else 0.0
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"]))


def profile(bundle_dir: Path, task: str, context: int, prefill_len: int, reps: int, threads: int | None,
            workdir: Path) -> dict:
    bundle = Bundle.open(bundle_dir)
    backend = OrtBackend("cpu", threads, optimized_dir=workdir)
    embed = backend.load(bundle, task, "embed")  # not profiled: made before the profiler is switched on
    backend.ort = _Profiling(backend.ort, str(workdir / "decoder"))
    graph = backend.load(bundle, task, "decoder")
    dec = OurDecoder(graph, embed, KVCache(backend, graph.spec), graph_weight_bytes(bundle, task, "decoder"))
    ids = np.random.default_rng(0).integers(3, 1000, size=(1, prefill_len)).astype(np.int64)
    embeds = embed.run({"input_ids": ids})["inputs_embeds"]
    kinds = ["decode"] * (reps + 1) + ["prefill"] * (reps + 1)
    for kind in kinds:
        dec.at(context if kind == "decode" else 0)
        decode_one_token(graph, embed, dec.cache, TOKEN) if kind == "decode" else forward(graph, dec.cache, embeds)
    grouped = runs(Path(graph.session.end_profiling()))
    if len(grouped) != len(kinds):
        raise RuntimeError(f"the profile holds {len(grouped)} runs, {len(kinds)} were made")
    weights_of, base = graph_facts(workdir / f"{task}.decoder.onnx")  # OrtBackend's optimized_dir
    tables = {}
    for k in ("decode", "prefill"):
        events = [g for g, kk in zip(grouped, kinds) if kk == k][1:]
        tables[k] = median_table([tabulate(g, weights_of, base) for g in events])
        step_ms = sum(r["ms"] for r in tables[k].values())
        tables[f"{k} {HLORA_OPS}"] = median_table([tabulate(g, weights_of, base, HLORA) for g in events], step_ms)
    return {"bundle": str(bundle_dir), "task": task, "context": context, "prefill_tokens": prefill_len, "reps": reps,
            "threads": backend.threads, "weight_bytes": dec.weight_bytes, "kv_bytes": dec.kv_bytes_read(context),
            **tables}


def report(res: dict) -> str:
    lines = []
    for kind, what in (("decode", f"decode step at {res['context']} cached tokens"),
                       ("prefill", f"prefill of {res['prefill_tokens']} tokens")):
        lines.append(f"{res['task']} {what} (median of {res['reps']}, {res['threads']} threads)")
        lines.append(f"  {'op class':<40} {'ms':>9} {'share':>6} {'nodes':>6} {'weights MB':>11} {'activ. MB':>10}")
        parts = {f"  of which: {op}": r for op, r in res[f"{kind} {HLORA_OPS}"].items()}
        for cls, row in res[kind].items():
            for c, r in [(cls, row), *(parts.items() if cls == HLORA else ())]:
                lines.append(f"  {c:<40} {r['ms']:9.3f} {r['share']:6.1%} {r['nodes']:6d} "
                             f"{r['weight_bytes'] / 1e6:11.2f} {r['activation_bytes'] / 1e6:10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--task", default="com")
    p.add_argument("--context", type=int, default=600)
    p.add_argument("--prefill", type=int, default=616)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = profile(a.bundle, a.task, a.context, a.prefill, a.reps, a.threads, Path(tmp))
    print(report(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
