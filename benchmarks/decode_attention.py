#!/usr/bin/env python
"""Decode attention on ONNX Runtime CPU (issue 25): how fast each form reads the cached K/V rows of one step.

One query token against `--layers` distinct caches (so no layer's rows are still in the CPU's caches when read),
at M3's widths by default, each form a graph of its own, timed round-robin (benchmarks/timing.py):

- scores, alpha = 1/sqrt(d): q against the cached keys as ONNX Runtime fuses our exported graph when the scale sits
  on the scores (FusedMatMul, batch-transposed operands, alpha = the scale) - the form before this change;
- scores, alpha = 1: the same product without the scale (it now rides on q's rotation, export/compile/graphs.py);
- values: the softmax row against the cached values (FusedMatMul, alpha 1), as the graph does;
- GroupQueryAttention fp32 / fp16: ONNX Runtime's fused CPU op (RoPE, scores, softmax, values; KV buffer shared in
  place, [1, kv_heads, max, d]), the ORT-CPU variant's candidate; fp16 halves the bytes a step reads.

With `--kv-heads` below `--heads` (GQA, L14's phi-4: 40 and 10), the products take each KV head's query group as
their rows, as the exported graph does.

    python benchmarks/decode_attention.py [--contexts 600 1600] [--layers 32] [--heads 32] [--kv-heads 32]
        [--head-dim 96] [--reps 15] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.timing import Case, bench, load_average, machine, machine_line, markdown  # noqa: E402

MS = "com.microsoft"


def _model(nodes, inputs, outputs) -> bytes:
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def products(kind: str, layers: int, heads: int, kv_heads: int, d: int, alpha: float) -> bytes:
    """`layers` FusedMatMuls over caches [C, kv_heads, d], each reading its own layer's rows (scores or values); with
    GQA each KV head's query group is folded into the rows (M = heads / kv_heads), as export/compile/graphs.py does."""
    f, g = TensorProto.FLOAT, heads // kv_heads
    inputs = [_vi("q", f, [g, kv_heads, d]), _vi("p", f, [kv_heads, g, "C"])]
    nodes, outputs = [], []
    for i in range(layers):
        inputs.append(_vi(f"cache{i}", f, ["C", kv_heads, d]))
        outputs.append(_vi(f"y{i}", f, None))
        attrs = dict(transBatchA=1, transBatchB=1, transB=1) if kind == "scores" else dict(transBatchB=1)
        nodes.append(helper.make_node("FusedMatMul", ["q" if kind == "scores" else "p", f"cache{i}"], [f"y{i}"],
                                      domain=MS, alpha=alpha, **attrs))
    return _model(nodes, inputs, outputs)


def gqa(layers: int, heads: int, kv_heads: int, d: int, rows: int, elem: int) -> bytes:
    """`layers` GroupQueryAttention nodes (packed QKV of one token, rotary inside), each over its own KV buffers."""
    nodes, outputs = [], []
    inputs = [_vi("qkv", elem, [1, 1, (heads + 2 * kv_heads) * d]), _vi("seqlens", TensorProto.INT32, [1]),
              _vi("total", TensorProto.INT32, [1]), _vi("cos", elem, [rows, d // 2]), _vi("sin", elem, [rows, d // 2])]
    for i in range(layers):
        kv = [f"k{i}", f"v{i}"]
        inputs += [_vi(n, elem, [1, kv_heads, rows, d]) for n in kv]
        outputs += [_vi(f"y{i}", elem, None), *(_vi(f"{n}_out", elem, [1, kv_heads, rows, d]) for n in kv)]
        nodes.append(helper.make_node("GroupQueryAttention", ["qkv", "", "", *kv, "seqlens", "total", "cos", "sin"],
                                      [f"y{i}", f"k{i}_out", f"v{i}_out"], domain=MS, num_heads=heads,
                                      kv_num_heads=kv_heads, do_rotary=1))
    return _model(nodes, inputs, outputs)


def cases(ort, a, context: int) -> tuple[dict[str, Case], dict[str, int]]:
    """name -> Case, and name -> the K/V bytes one step of it reads."""
    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    layers, heads, kvh, d = a.layers, a.heads, a.kv_heads or a.heads, a.head_dim

    def session(model):
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    caches = {f"cache{i}": rng.standard_normal((context, kvh, d), dtype=np.float32) for i in range(layers)}
    out, read = {}, {}
    for name, kind, alpha in (("scores, alpha = 1/sqrt(d) (before)", "scores", d ** -0.5),
                              ("scores, alpha = 1 (now)", "scores", 1.0), ("values (alpha = 1)", "values", 1.0)):
        s = session(products(kind, layers, heads, kvh, d, alpha))
        feeds = {"q": rng.standard_normal((heads // kvh, kvh, d), dtype=np.float32),
                 "p": rng.random((kvh, heads // kvh, context), dtype=np.float32), **caches}
        feeds = {i.name: feeds[i.name] for i in s.get_inputs()}
        out[name], read[name] = Case(lambda s=s, f=feeds: s.run(None, f)), layers * context * kvh * d * 4
    rows = 1 << context.bit_length()  # a power-of-two buffer with room for this token
    angles = np.arange(rows)[:, None] / (10000 ** (np.arange(0, d, 2) / d))[None]
    for dtype, elem in ((np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16)):
        s = session(gqa(layers, heads, kvh, d, rows, elem))
        binding = s.io_binding()
        binding.bind_cpu_input("qkv", rng.standard_normal((1, 1, (heads + 2 * kvh) * d)).astype(dtype))
        binding.bind_cpu_input("seqlens", np.array([context], np.int32))  # past rows; this token is row `context`
        binding.bind_cpu_input("total", np.array([context + 1], np.int32))
        binding.bind_cpu_input("cos", np.cos(angles).astype(dtype))
        binding.bind_cpu_input("sin", np.sin(angles).astype(dtype))
        for i in range(layers):
            for n in (f"k{i}", f"v{i}"):
                buf = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, kvh, rows, d)).astype(dtype))
                binding.bind_ortvalue_input(n, buf)
                binding.bind_ortvalue_output(f"{n}_out", buf)  # shared: written in place, as a runtime would
            binding.bind_output(f"y{i}")
        name = f"GroupQueryAttention {np.dtype(dtype).name}"
        out[name] = Case(lambda s=s, b=binding: s.run_with_iobinding(b))
        read[name] = 2 * layers * context * kvh * d * np.dtype(dtype).itemsize
    return out, read


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[600, 1600])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32, help="query heads (M3: 32; L14's phi-4: 40)")
    p.add_argument("--kv-heads", type=int, help="KV heads (default: --heads, M3's MHA; L14's phi-4: 10)")
    p.add_argument("--head-dim", type=int, default=96)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    import onnxruntime as ort

    res = {"machine": machine(a.threads), "load_start": load_average(), "args": vars(a) | {"json": None},
           "contexts": {}}
    for context in a.contexts:
        timed, read = cases(ort, a, context)
        stats = bench(timed, a.warmup, a.reps)
        res["contexts"][context] = {k: {**stats[k], "kv_bytes": read[k]} for k in timed}
    res["load_end"] = load_average()
    print(f"{machine_line(res, a.threads)}; {a.layers} layers x {a.heads} heads ({a.kv_heads or a.heads} KV) x d "
          f"{a.head_dim}; median of {a.reps} after {a.warmup} warm-up, round-robin")
    forms = res["contexts"][a.contexts[0]]
    rows = [[name, *(f"{r['median_ms']:.1f} ({r['kv_bytes'] / r['median_ms'] / 1e6:.1f})"
                     for r in (res["contexts"][c][name] for c in a.contexts))] for name in forms]
    print(markdown(["form", *(f"ms @{c} (GB/s)" for c in a.contexts)], rows))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
