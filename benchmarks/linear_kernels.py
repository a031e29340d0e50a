#!/usr/bin/env python
"""The decoder's linears on ONNX Runtime CPU, one weight form at a time (issue 25): what MLAS's kernels do with a
decode step's single row and with a 616-row prefill, on this machine.

One Phi-3 layer's four base linears (qkv, o, gate_up, down at M3's widths by default), `--layers` copies with their
own weights (so none is still in the CPU's caches), each form a graph of its own, timed round-robin
(benchmarks/timing.py):

- int4 in blocks of 32 / 64 / 128, accuracy level 4 (int8 activations) or 1 (fp32): the Q/DQ form our int4 bundles
  ship (DequantizeLinear -> MatMul), fused by ONNX Runtime into MatMulNBits with the session entry the runtime sets;
- int8 MatMulNBits, blocks of 64, accuracy level 4: the 8-bit form of the same op;
- int8 per channel, int8 activations: DynamicQuantizeMatMul (MLAS's QGEMM), the form our w8a8 decoders fuse to.

Per form: the weight bytes a layer reads and, at each M of `--rows`, ms scaled to 32 layers with GB/s (M = 1) or
GFLOP/s. Decode is bound by bytes only where a form reaches the machine's GEMV bandwidth (printed beside it).

    python benchmarks/linear_kernels.py [--layers 4] [--rows 1 616] [--reps 7] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.timing import Case, bandwidth, bench, load_average, machine, machine_line, markdown  # noqa: E402

MS = "com.microsoft"
# name -> (kind, bits, block, accuracy level)
FORMS = {"int4 b32, accuracy 4": ("qdq", 4, 32, 4), "int4 b64, accuracy 4 (the default)": ("qdq", 4, 64, 4),
         "int4 b128, accuracy 4": ("qdq", 4, 128, 4), "int4 b64, accuracy 1": ("qdq", 4, 64, 1),
         "int8 b64 MatMulNBits, accuracy 4": ("nbits", 8, 64, 4), "int8 per channel (QGEMM, w8a8)": ("qgemm", 8, 0, 0)}


def shapes(hidden: int, intermediate: int) -> list[tuple[int, int]]:
    """(K, N) of a Phi-3 layer's fused qkv, o, fused gate_up and down."""
    return [(hidden, 3 * hidden), (hidden, hidden), (hidden, 2 * intermediate), (intermediate, hidden)]


def weight_bytes(form: str, dims: list[tuple[int, int]]) -> int:
    _, bits, block, _ = FORMS[form]
    return sum(k * n * bits // 8 + (k // block if block else 1) * n * 4 for k, n in dims)


def graph(form: str, layers: int, dims: list[tuple[int, int]], rng) -> bytes:
    kind, bits, block, _ = FORMS[form]
    nodes, inits, outputs = [], [], []
    for i in range(layers * len(dims)):
        k, n = dims[i % len(dims)]
        x, y, w, s = ("x" if k == dims[0][0] else "h"), f"y{i}", f"w{i}", f"s{i}"
        if kind == "qdq":  # [K, N] int4, one scale per block of K, as calibration/quantize.py writes it
            raw = rng.integers(0, 256, k * n // 2, dtype=np.uint8).tobytes()
            inits += [helper.make_tensor(w, TensorProto.INT4, (k, n), raw, raw=True),
                      numpy_helper.from_array(rng.random((k // block, n), dtype=np.float32) * 0.01, s)]
            nodes += [helper.make_node("DequantizeLinear", [w, s], [w + "_dq"], axis=0, block_size=block),
                      helper.make_node("MatMul", [x, w + "_dq"], [y])]
        elif kind == "nbits":  # MatMulNBits' own layout: [N, K / block, block * bits / 8]
            inits += [numpy_helper.from_array(rng.integers(0, 256, (n, k // block, block * bits // 8), dtype=np.uint8),
                                              w), numpy_helper.from_array(rng.random(n * k // block, np.float32), s)]
            nodes.append(helper.make_node("MatMulNBits", [x, w, s], [y], domain=MS, K=k, N=n, bits=bits,
                                          block_size=block, accuracy_level=FORMS[form][3]))
        else:
            inits += [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), w),
                      numpy_helper.from_array(rng.random(n, np.float32) * 0.01, s)]
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, w, s], [y], domain=MS))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["m", k])
              for name, k in (("x", dims[0][0]), ("h", dims[-1][0]))]
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
    return helper.make_model(helper.make_graph(nodes, "linears", inputs, outputs, inits), opset_imports=opsets,
                             ir_version=10).SerializeToString()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 616], help="M: 1 (a decode step), 616 (a prefill)")
    p.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS))
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    dims = shapes(a.hidden, a.intermediate)
    res = {"machine": machine(a.threads), "load_start": load_average(), "args": vars(a) | {"json": None},
           "gemv": bandwidth(a.threads, 2, 5, gib=0.5)["gemv_GBps"], "rows": {}}
    sessions = {}
    for form in a.forms:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        kind, _, _, level = FORMS[form]
        if kind == "qdq":  # the level ONNX Runtime gives the MatMulNBits it fuses (the others carry theirs)
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        sessions[form] = ort.InferenceSession(graph(form, a.layers, dims, rng), opts,
                                              providers=["CPUExecutionProvider"])
    for m in a.rows:
        feeds = {"x": rng.standard_normal((m, dims[0][0]), dtype=np.float32),
                 "h": rng.standard_normal((m, dims[-1][0]), dtype=np.float32)}
        stats = bench({f: Case(lambda s=s: s.run(None, feeds)) for f, s in sessions.items()}, a.warmup, a.reps)
        res["rows"][m] = {f: {**stats[f], "layer_bytes": weight_bytes(f, dims)} for f in a.forms}
    res["load_end"] = load_average()
    flops = 2 * sum(k * n for k, n in dims) * a.layers
    print(f"{machine_line(res, a.threads)}; GEMV {res['gemv']:.1f} GB/s; {a.layers} layers of (K, N) {dims}; median "
          f"of {a.reps} after {a.warmup} warm-ups, round-robin; ms scaled to 32 layers")
    rows = []
    for form in a.forms:
        cells = [form, f"{res['rows'][a.rows[0]][form]['layer_bytes'] / 1e6:.1f}"]
        for m in a.rows:
            r = res["rows"][m][form]
            sec = r["median_ms"] / 1e3
            rate = (f"{a.layers * r['layer_bytes'] / sec / 1e9:.1f} GB/s" if m == 1
                    else f"{flops * m / sec / 1e9:.0f} GFLOP/s")
            cells.append(f"{r['median_ms'] * 32 / a.layers:.0f} ({rate})")
        rows.append(cells)
    print(markdown(["form", "MB a layer", *(f"ms @M={m}" for m in a.rows)], rows))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
