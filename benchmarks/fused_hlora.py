#!/usr/bin/env python
"""Can one of ONNX Runtime's fused CPU ops compute an H-LoRA term (issue 25, item 4)? A probe, not a timing.

H-LoRA adds sum_e softmax(x R)_e * B_e (A_e x) to each adapted linear: a dense soft mixture of 4 rank-r/4 experts
with no activation between A and B (export/reference/hlora.py). The nearest fused op ONNX Runtime has is the
contrib MoE: with k = 4 (every expert), activation "identity" and no renormalization it is exactly that mixture,
router softmax included. This script builds one MoE node per shape of a Phi-3 layer's adapted linears (qkv, o,
gate_up, down at the given widths) and compares it with the mixture computed in numpy, printing the error or ONNX
Runtime's refusal for each. MoE's output has the input's width, so only the square linear (o) can take it.

    python benchmarks/fused_hlora.py [--hidden 3072] [--intermediate 8192] [--rank 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.linear_kernels import shapes  # noqa: E402

EXPERTS = 4


def moe_model(a: np.ndarray, b: np.ndarray) -> bytes:
    """One MoE node: fc1 = the experts' A [E, r/E, in], fc2 = their B [E, out, r/E], every expert weighted."""
    k_in = a.shape[2]
    node = helper.make_node("MoE", ["x", "router", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=EXPERTS,
                            activation_type="identity", normalize_routing_weights=0)
    graph = helper.make_graph([node], "hlora", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k_in]),
                                                helper.make_tensor_value_info("router", TensorProto.FLOAT,
                                                                              ["m", EXPERTS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, "fc1"), numpy_helper.from_array(b, "fc2")])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                  helper.make_opsetid("com.microsoft", 1)]
                             ).SerializeToString()


def probe(ort, k_in: int, n_out: int, rank: int, rng) -> str:
    a = (rng.standard_normal((EXPERTS, rank // EXPERTS, k_in)) / np.sqrt(k_in)).astype(np.float32)
    b = (rng.standard_normal((EXPERTS, n_out, rank // EXPERTS)) / np.sqrt(rank)).astype(np.float32)
    x = rng.standard_normal((3, k_in), dtype=np.float32)
    logits = rng.standard_normal((3, EXPERTS), dtype=np.float32)
    gate = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = sum(gate[:, e:e + 1] * (x @ a[e].T @ b[e].T) for e in range(EXPERTS))
    try:
        sess = ort.InferenceSession(moe_model(a, b), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x, "router": logits})[0]
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's refusal is the finding
        return f"refused: {str(e).split('Status Message: ')[-1].strip()[:160]}"
    err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    return f"computes it: max |error| {err:.2e} (max |value| {scale:.2f})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--rank", type=int, default=64)
    a = p.parse_args(argv)
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, com.microsoft MoE (k={EXPERTS}, identity) as one H-LoRA term, rank {a.rank}")
    for name, (k_in, n_out) in zip(("qkv", "o", "gate_up", "down"), shapes(a.hidden, a.intermediate)):
        print(f"  {name:8} {k_in:>6} -> {n_out:<6} {probe(ort, k_in, n_out, a.rank, rng)}")


if __name__ == "__main__":
    main()
