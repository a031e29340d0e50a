#!/usr/bin/env python
"""One decoder layer's four H-LoRA linears on ONNX Runtime CPU, in each graph form the decoder could take (issue 25):
what the adapter costs beyond its bytes at a decode step's single row and at a 616-row prefill.

Every form computes y = x W + ((x A) * (softmax(x R) S)) B for qkv, o, gate_up and down at M3's widths (COM:
rank 64, 4 experts; S spreads each expert's gate over its rank / 4 columns), W and the adapters int4 in blocks of
64 (Q/DQ, fused by ONNX Runtime into MatMulNBits, accuracy level 4, as the runtime sets it), the router fp32:

- base only: x W, the lower bound;
- now: the exported form (A, R, Softmax, S, Mul, B, Add: 7 nodes beside the base);
- B fp32: B as a float MatMul that ONNX Runtime fuses with the Add into a Gemm (the base's output as C);
- [W|A]: the base and A as one MatMul of N = out + rank, then a Split (W no longer shareable between tasks);
- [W;B]: B stacked under W along K, fed [x, gated a] (one MatMul for base and B, no Add; W not shareable).

`--layers` copies with their own weights (so none is still in the CPU's caches), round-robin
(benchmarks/timing.py); ms scaled to 32 layers, with the nodes ONNX Runtime runs per layer.

    python benchmarks/hlora_forms.py [--layers 4] [--rank 64] [--rows 1 616] [--reps 7] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.linear_kernels import shapes  # noqa: E402
from benchmarks.timing import Case, bench, load_average, machine, machine_line, markdown  # noqa: E402

EXPERTS, BLOCK = 4, 64
FORMS = ["base only", "now", "B fp32", "[W|A]", "[W;B]"]


def pack_int4(q: np.ndarray) -> bytes:
    """Signed int4 values [K, N] -> ONNX's INT4 raw bytes (two a byte, the first in the low nibble)."""
    flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    flat = np.concatenate([flat, np.zeros(len(flat) % 2, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


class Int4:
    """An int4 matrix [K, N] in blocks of 64 along K: values and one scale per block and column."""

    def __init__(self, q: np.ndarray, scales: np.ndarray):
        self.q, self.scales = q, scales

    @classmethod
    def random(cls, k: int, n: int, rng) -> Int4:
        return cls(rng.integers(-8, 8, (k, n), dtype=np.int8), rng.random((-(-k // BLOCK), n), dtype=np.float32) * 0.01)

    def concat(self, other: Int4, axis: int) -> Int4:
        return Int4(np.concatenate([self.q, other.q], axis), np.concatenate([self.scales, other.scales], axis))


class Adapted:
    """One adapted linear's weights, the same in every form: W, A, B int4, the router R fp32."""

    def __init__(self, k: int, n: int, rank: int, rng):
        self.w, self.a, self.b = Int4.random(k, n, rng), Int4.random(k, rank, rng), Int4.random(rank, n, rng)
        self.route = rng.standard_normal((k, EXPERTS), dtype=np.float32) * 0.05
        self.spread = np.eye(EXPERTS, dtype=np.float32).repeat(rank // EXPERTS, axis=1)


class _Graph:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs

    def const(self, a: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(a, name))
        return name

    def int4(self, x: str, m: Int4) -> str:
        """x @ m in the Q/DQ form calibration/quantize.py writes (ONNX Runtime fuses it into MatMulNBits)."""
        w = self.name("w")
        self.inits.append(helper.make_tensor(w, TensorProto.INT4, m.q.shape, pack_int4(m.q), raw=True))
        dq = self.node("DequantizeLinear", [w, self.const(m.scales)], axis=0, block_size=BLOCK)[0]
        return self.node("MatMul", [x, dq])[0]

    def gated(self, x: str, a: str, lin: Adapted) -> str:
        """(x A) * (softmax(x R) S), given a = x A."""
        gate = self.node("Softmax", [self.node("MatMul", [x, self.const(lin.route)])[0]], axis=-1)[0]
        return self.node("Mul", [a, self.node("MatMul", [gate, self.const(lin.spread)])[0]])[0]

    def linear(self, form: str, x: str, lin: Adapted) -> str:
        if form == "base only":
            return self.int4(x, lin.w)
        if form == "[W|A]":
            n = lin.w.q.shape[1]
            y, a = self.node("Split", [self.int4(x, lin.w.concat(lin.a, 1)),
                                       self.const(np.array([n, lin.a.q.shape[1]], np.int64))], 2, axis=-1)
            return self.node("Add", [y, self.int4(self.gated(x, a, lin), lin.b)])[0]
        h = self.gated(x, self.int4(x, lin.a), lin)
        if form == "[W;B]":
            return self.int4(self.node("Concat", [x, h], axis=-1)[0], lin.w.concat(lin.b, 0))
        if form == "B fp32":
            b = (lin.b.q.astype(np.float32) * np.repeat(lin.b.scales, BLOCK, axis=0)[: lin.b.q.shape[0]])
            lora = self.node("MatMul", [h, self.const(b)])[0]
        else:
            lora = self.int4(h, lin.b)
        return self.node("Add", [self.int4(x, lin.w), lora])[0]


def weights(layers: int, dims: list[tuple[int, int]], rank: int, seed: int = 0) -> list[Adapted]:
    rng = np.random.default_rng(seed)
    return [Adapted(*dims[i % len(dims)], rank, rng) for i in range(layers * len(dims))]


def graph(form: str, linears: list[Adapted], hidden: int) -> bytes:
    g, outputs = _Graph(), []
    for lin in linears:
        y = g.linear(form, "x" if lin.w.q.shape[0] == hidden else "h", lin)
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "m", k])  # 3-D, as the decoder's
              for name, k in (("x", hidden), ("h", linears[-1].w.q.shape[0]))]
    return helper.make_model(helper.make_graph(g.nodes, "hlora", inputs, outputs, g.inits),
                             opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()


def agreement(outputs: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Per form: the largest difference from the exported form's outputs over their largest magnitude (every form
    computes the same function; int8 activations make them differ a little)."""
    want = outputs["now"]
    scale = max(float(np.abs(w).max()) for w in want)
    return {f: max(float(np.abs(g - w).max()) for g, w in zip(out, want)) / scale
            for f, out in outputs.items() if f != "base only"}


def session(ort, model: bytes, threads: int, optimized: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = threads, 3  # no warning about the saved optimized graph
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")  # as runtime/core/backend.py
    opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--rank", type=int, default=64, help="the adapter's total rank (M3: COM 64, GEN 256)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 616])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    import onnx
    import onnxruntime as ort

    rng, dims = np.random.default_rng(1), shapes(a.hidden, a.intermediate)
    linears = weights(a.layers, dims, a.rank)
    res = {"machine": machine(a.threads), "load_start": load_average(), "args": vars(a) | {"json": None},
           "nodes_per_layer": {}, "agreement": {}, "rows": {}}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, form in enumerate(FORMS):
            optimized = Path(tmp) / f"{i}.onnx"
            sessions[form] = session(ort, graph(form, linears, a.hidden), a.threads, optimized)
            res["nodes_per_layer"][form] = len(onnx.load(str(optimized)).graph.node) / a.layers
    for m in a.rows:
        feeds = {"x": rng.standard_normal((1, m, dims[0][0]), dtype=np.float32),
                 "h": rng.standard_normal((1, m, dims[-1][0]), dtype=np.float32)}
        res["agreement"][m] = agreement({f: s.run(None, feeds) for f, s in sessions.items()})
        res["rows"][m] = bench({f: Case(lambda s=s: s.run(None, feeds)) for f, s in sessions.items()}, a.warmup, a.reps)
    res["load_end"] = load_average()
    print(f"{machine_line(res, a.threads)}; {a.layers} layers of (K, N) {dims}, rank {a.rank}; median of {a.reps} "
          f"after {a.warmup} warm-ups, round-robin; ms scaled to 32 layers")
    scaled = {m: {f: res["rows"][m][f]["median_ms"] * 32 / a.layers for f in FORMS} for m in a.rows}
    rows = [[f, f"{res['nodes_per_layer'][f]:.0f}",
             *(f"{scaled[m][f]:.1f} (+{scaled[m][f] - scaled[m][FORMS[0]]:.1f})" for m in a.rows)] for f in FORMS]
    print(markdown(["form", "ORT nodes a layer", *(f"ms @M={m} (over {FORMS[0]})" for m in a.rows)], rows))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
