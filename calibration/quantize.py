"""Weight-only quantization of an ONNX graph's MatMul weights into the one standard form both consumers take:
opset 21 `DequantizeLinear` (symmetric, no zero point) feeding the original `MatMul`.

- int4: blocks along K (axis 0, scale [ceil(K/block), N]); ONNX Runtime's CPU provider fuses DQ+MatMul into 4-bit
  MatMulNBits at load, and it is TensorRT's INT4 weight-only form (anchors.md, "Quantized graphs on ONNX Runtime").
- int8: per output channel (axis 1, scale [N]); fused into 8-bit MatMulNBits (fast at accuracy level 4).

Hand-written rather than onnxruntime.quantization's MatMulNBitsQuantizer: that one quantizes a whole model in one
go (we quantize each distinct weight once for every graph that uses it, so the base decoder stays shared between
the tasks), its 8-bit QDQ path silently leaves the weights fp32, and it has no activation-aware algorithm in QDQ
format. The activation-aware algorithm here is AWQ's clipping search: per block and column, the clip ratio that
minimizes the output error weighted by the calibration activations' mean square per input channel (the graph is
unchanged, so the fusion still applies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

OPSET = 21  # DequantizeLinear with INT4 and block_size
IR_VERSION = 10  # the IR of opset 21 (ONNX Runtime 1.31 reads up to 11)
SCHEMES = {"int4": (4, 0), "int8": (8, 1)}  # bits, DQ axis
CLIP_GRID = np.linspace(1.0, 0.5, 11)  # AWQ searches clip ratios from the block's max down to half of it


@dataclass(frozen=True)
class WeightMatMul:
    node: str
    weight: str  # initializer name (content-addressed in bundles: equal names = equal tensors, in any graph)
    activation: str  # the MatMul's input: what calibration measures
    # base (a base linear, H-LoRA beside it), hlora (A or B), router (R: feeds the routing Softmax), lm_head (output:
    # logits), linear (other)
    role: str


def weight_matmuls(model: onnx.ModelProto) -> list[WeightMatMul]:
    """The MatMuls whose right-hand side is a 2-D initializer, with their role found from the graph's structure:
    a folded H-LoRA linear is `x @ W + B((x @ A) * gate(softmax(x @ R)))`, so W is the weight MatMul that shares its
    input with two others (A and R; R the one whose output reaches a Softmax) and is added to a fourth (B)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    found = [n for n in graph.node
             if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    by_output = {n.output[0]: n for n in found}
    readers: dict[str, list] = {}
    for n in found:
        readers.setdefault(n.input[0], []).append(n)
    softmax_inputs = _softmax_inputs(graph)
    roles: dict[str, str] = {}
    for add in (n for n in graph.node if n.op_type == "Add"):
        pair = [by_output[i] for i in add.input if i in by_output]
        if len(add.input) != 2 or len(pair) != 2:
            continue
        for w, b in (pair, pair[::-1]):
            siblings = [s for s in readers[w.input[0]] if s is not w]
            if len(siblings) == 2 and b not in siblings:
                roles.update({w.name: "base", b.name: "hlora"})
                roles.update({s.name: "router" if s.output[0] in softmax_inputs else "hlora" for s in siblings})
    outputs = {o.name for o in graph.output}
    role = lambda n: roles.get(n.name, "lm_head" if n.output[0] in outputs else "linear")  # noqa: E731
    return [WeightMatMul(n.name, n.input[1], n.input[0], role(n)) for n in found]


def _softmax_inputs(graph: onnx.GraphProto) -> set[str]:
    """Tensors a Softmax reads, directly or through a Cast (the fp32 island of fp16 graphs)."""
    casts = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    read = {n.input[0] for n in graph.node if n.op_type == "Softmax"}
    return read | {casts[t] for t in read if t in casts}


def quantized_roles(graph: str, lm_head: bool, adapters: bool) -> set[str]:
    """The roles whose MatMuls a scheme quantizes in a graph: calibrate's targets and what the structural check
    requires rewritten. The router always stays float."""
    if graph == "vision":
        return {"linear"}
    return {"base"} | ({"lm_head"} if lm_head else set()) | ({"hlora"} if adapters else set())


def quantize_weight(w: np.ndarray, scheme: str, block: int, importance: np.ndarray | None = None):
    """w [K, N] fp32 -> (q, scale): q int8 values (int4 range for int4), scale fp32 ([ceil(K/block), N] or [N]).
    importance [K] (mean square of the activations per input channel): search the clip ratio (int4 only)."""
    bits, _ = SCHEMES[scheme]
    qmax = 2 ** (bits - 1) - 1
    k, n = w.shape
    if scheme == "int8":  # per channel: one scale per output column
        scale = np.maximum(np.abs(w).max(0), 1e-30) / qmax
        return np.clip(np.rint(w / scale), -qmax - 1, qmax).astype(np.int8), scale.astype(np.float32)
    pad = -k % block
    wb = np.pad(w, ((0, pad), (0, 0))).reshape(-1, block, n)  # [blocks, block, N]
    absmax = np.maximum(np.abs(wb).max(1), 1e-30)  # [blocks, N]
    ratios = CLIP_GRID if importance is not None else CLIP_GRID[:1]
    h = None if importance is None else np.pad(importance, (0, pad)).reshape(-1, block, 1).astype(np.float32)
    best_scale: np.ndarray | None = None
    best_err: np.ndarray | None = None
    for r in ratios:
        scale = (absmax * r / qmax).astype(np.float32)
        err = None
        if h is not None:
            deq = np.clip(np.rint(wb / scale[:, None]), -qmax - 1, qmax) * scale[:, None]
            err = (h * (wb - deq) ** 2).sum(1)  # [blocks, N]: output error under the calibration activations
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            assert err is not None and best_err is not None  # more than one ratio only with importance (h)
            better = err < best_err
            best_scale, best_err = np.where(better, scale, best_scale), np.where(better, err, best_err)
    assert best_scale is not None  # ratios is never empty
    q = np.clip(np.rint(wb / best_scale[:, None]), -qmax - 1, qmax).reshape(-1, n)[:k]
    return q.astype(np.int8), best_scale


def dequantize(q: np.ndarray, scale: np.ndarray, scheme: str, block: int) -> np.ndarray:
    """What DequantizeLinear computes, for the error statistics."""
    if scheme == "int8":
        return q.astype(np.float32) * scale
    return q.astype(np.float32) * np.repeat(scale, block, axis=0)[: q.shape[0]]


def weight_initializers(q: np.ndarray, scale: np.ndarray, scheme: str, name: str) -> list[onnx.TensorProto]:
    import ml_dtypes

    values = q.astype(ml_dtypes.int4) if scheme == "int4" else q
    return [numpy_helper.from_array(values, f"{name}.q{scheme}"), numpy_helper.from_array(scale, f"{name}.scale")]


def rewrite(model: onnx.ModelProto, quantized: dict[str, tuple[list[onnx.TensorProto], int | None]],
            scheme: str) -> onnx.ModelProto:
    """A copy of `model` at opset 21 or later where every MatMul whose weight is in `quantized` reads it through its own
    DequantizeLinear (one DQ per MatMul: a shared DQ is not fused). quantized: weight name -> (q and scale
    initializers, block size or None); the fp32 originals that no node reads any more are dropped."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < OPSET:
        out = version_converter.convert_version(model, OPSET)
        out.ir_version = IR_VERSION
    else:  # already there (e.g. a graph with contrib ops, which the converter cannot take)
        out = onnx.ModelProto()
        out.CopyFrom(model)
    graph, _, axis = out.graph, *SCHEMES[scheme]
    added = set()
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in quantized:
            tensors, block = quantized[node.input[1]]
            if tensors[0].name not in added:
                graph.initializer.extend(tensors)
                added.add(tensors[0].name)
            attrs: dict[str, Any] = {"axis": axis, **({"block_size": block} if block else {})}
            deq = f"{node.name}/DequantizeLinear"
            nodes.append(helper.make_node("DequantizeLinear", [t.name for t in tensors], [deq + "_output"],
                                          name=deq, **attrs))
            node.input[1] = deq + "_output"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return out
