"""The exact structural check of a quantized bundle against the fp32 bundle it was made from.

Independent of how noisy random weights make the end-to-end figures, a broken quantizer cannot pass it:
- every quantized weight: the DequantizeLinear form the scheme writes (weight dtype, axis, block size, scale shape,
  symmetric: zero point absent or 0); its scales derived from the fp32 source (absmax / qmax, times one of AWQ's clip
  ratios for awq); re-quantizing the source with the stored scales reproduces the stored values exactly; its
  relative error within what those scales allow (half a step per element, plus what the clip cut off);
- nothing else changed: graph inputs and outputs identical, every other node identical (the quantized graph is the
  source converted to opset 21, as the quantizer converts it), every other initializer byte-identical (the router
  and norms included), and exactly the declared MatMuls rewritten (the decoder's base linears and, when the
  manifest says so, its LM head and H-LoRA A/B matrices; every vision linear); w8a8/fp8: each of their activations
  read through QuantizeLinear -> DequantizeLinear of the fp32 graph's tensor (one per-tensor scale, zero point 0);
- the quantized graph computes what the fp32 graph computes with the dequantized weights (weight-only schemes:
  DequantizeLinear run unfused, RUN_RTOL), and the session the runtime builds (fused, at the manifest's accuracy
  level, with its session entries) agrees with the unfused graph (FUSED_RTOL), where that fits in memory
  (RUN_MEMORY); a graph too large for it is recorded as not run, with the reason.

Weights are read one tensor at a time; only the graph runs hold a graph's dequantized weights (fp32 size) at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from calibration import quantize
from calibration.qdq import E4M3_MAX
from runtime.core.backend import available_memory
from runtime.core.bundle import Bundle

# scheme -> (stored weight type, DequantizeLinear axis, largest magnitude: scale = absmax / it)
FORMS = {"int4": (onnx.TensorProto.INT4, 0, 7), "int8": (onnx.TensorProto.INT8, 1, 127),
         "w8a8": (onnx.TensorProto.INT8, 1, 127), "fp8": (onnx.TensorProto.FLOAT8E4M3FN, 1, E4M3_MAX)}
QDQ_OPS = ("DequantizeLinear", "QuantizeLinear")
SCALE_RTOL = 1e-5  # a scale recomputed from the source in fp32 (one division) differs by an ulp at most
# Measured on the tiny bundles, 8 random prompt rows or one random image: the unfused int4 (blocks of 32) and int8
# decoders against the fp32 ones with the dequantized weights 2.6-3.7e-7 of the output's range (same arithmetic,
# another order); the session the runtime builds against the unfused graph: int4/int8 MatMulNBits at accuracy level
# 4 (int8 activations) 7.1-9.2e-3, w8a8 vision (as written) 0.7-1.3e-2, fp8 up to 9e-4, Q/DQ decoders ~1e-7.
# The bounds: ~30x and ~4x over those.
RUN_RTOL = 1e-5
FUSED_RTOL = 0.05
# Comparing a graph's outputs holds its dequantized weights (fp32) beside the fp32 session and the quantized ones:
# ~2x those weights' bytes. The full M3's decoders (15 GB each in fp32) do not fit a 24 GB machine: their runs are
# recorded as not run (Result.not_run), never as passed; the per-weight checks still cover every weight.
RUN_MEMORY = 2


@dataclass
class Result:
    problems: list[str] = field(default_factory=list)
    weights: int = 0  # quantized weights checked
    max_rel_error: float = 0.0
    graphs: dict[str, dict[str, float]] = field(default_factory=dict)  # graph id -> {unfused, fused}: rel diff
    not_run: dict[str, str] = field(default_factory=dict)  # graph id -> why its outputs were not compared

    @property
    def passed(self) -> bool:
        return not self.problems and self.weights > 0

    def to_json(self) -> dict:
        return {"passed": self.passed, "findings": self.problems, "weights": self.weights,
                "max_rel_error": self.max_rel_error, "graphs": self.graphs, "not_run": self.not_run,
                "bounds": {"run_rtol": RUN_RTOL, "fused_rtol": FUSED_RTOL, "scale_rtol": SCALE_RTOL}}


def check(src: Bundle, q: Bundle, run: bool = True) -> Result:
    """Every graph of `q` against the same graph of its fp32 source `src`."""
    quant, result = q.manifest.precision.quantization, Result()
    if quant is None:
        return Result([f"{q.root}: not a quantized bundle"])
    for gid, entry in q.manifest.graphs.items():
        if gid not in src.manifest.graphs:
            result.problems.append(f"{gid}: not a graph of the fp32 bundle {src.root}")
            continue
        fp_model = onnx.load(str(src.file(src.manifest.graphs[gid].file)), load_external_data=False)
        q_model = onnx.load(str(q.file(entry.file)), load_external_data=False)
        if entry.spec.name not in quant.graphs:
            if not _same_graph(q_model.graph, fp_model.graph):
                result.problems.append(f"{gid}: changed although {entry.spec.name} is not quantized")
            continue
        need, have = RUN_MEMORY * _declared_bytes(fp_model, entry.spec.name, quant), available_memory()
        deq = _check_graph(gid, fp_model, q_model, src.root, q.root, quant, result, keep=run and need <= have)
        if run and need > have:
            result.not_run[gid] = (f"the graph runs need ~{need / 2**30:.0f} GiB (the dequantized weights and the "
                                   f"sessions), {have / 2**30:.0f} GiB available; every weight was checked")
        elif run and deq and not result.problems:
            result.graphs[gid] = _run(gid, src, q, deq, result.problems)
    return result


def _declared_bytes(model: onnx.ModelProto, name: str, quant) -> int:
    """fp32 bytes of the distinct weights the declared MatMuls read: what the graph runs hold dequantized."""
    declared, dims = _declared(model, name, quant), {i.name: i.dims for i in model.graph.initializer}
    weights = {m.weight for m in quantize.weight_matmuls(model) if m.node in declared}
    return 4 * sum(int(np.prod(dims[w])) for w in weights)


def _declared(model: onnx.ModelProto, name: str, quant) -> set[str]:
    """The MatMuls the manifest says are quantized (calibrate.py's targets, by the graph's structure)."""
    roles = quantize.quantized_roles(name, quant.lm_head == "quantized", quant.adapters == "quantized")
    return {m.node for m in quantize.weight_matmuls(model) if m.role in roles}


def _check_graph(gid: str, fp_model, q_model, src_root: Path, q_root: Path, quant, result: Result,
                 keep: bool = True) -> dict:
    """The node-by-node comparison; returns the dequantized weights by fp32 initializer name (for the runs; with
    keep False none is held: each is dropped once checked)."""
    problems = result.problems
    fp = version_converter.convert_version(fp_model, quantize.OPSET).graph
    g = q_model.graph
    for kind in ("input", "output"):
        if list(getattr(g, kind)) != list(getattr(fp, kind)):
            problems.append(f"{gid}: graph {kind}s differ from the fp32 graph's")
    made = {o: n for n in g.node if n.op_type in QDQ_OPS for o in n.output}
    nodes = [n for n in g.node if n.op_type not in QDQ_OPS]
    by_key = {_key(n): n for n in fp.node}  # quantize_static sorts the nodes: paired by name (or output)
    if sorted(map(_key, nodes)) != sorted(by_key) or len(by_key) != len(fp.node):
        problems.append(f"{gid}: nodes added, removed or renamed besides the Quantize/DequantizeLinears")
        return {}
    q_inits, fp_inits = {i.name: i for i in g.initializer}, {i.name: i for i in fp.initializer}
    declared, rewritten, deq = _declared(fp_model, gid.split(".")[1], quant), set(), {}
    for qn, fn in ((n, by_key[_key(n)]) for n in nodes):
        if (qn.op_type, list(qn.output), _attributes(qn)) != (fn.op_type, list(fn.output), _attributes(fn)):
            problems.append(f"{gid}: node {qn.name} differs from the fp32 graph's")
        for i, (a, b) in enumerate(zip(qn.input, fn.input, strict=True)):
            if a in made and qn.op_type == "MatMul" and i == 1:
                rewritten.add(qn.name)
                if b not in deq:  # a weight read by several MatMuls is checked once
                    w = _check_weight(f"{gid}: {qn.name} weight {b}", made[a], q_inits, fp_inits[b], src_root,
                                      q_root, quant, result)
                    deq[b] = w if keep else None
            elif a in made and qn.op_type == "MatMul" and i == 0 and quant.activations != "float32":
                if why := _activation_problem(made, a, b, q_inits, FORMS[quant.scheme][0]):
                    problems.append(f"{gid}: {qn.name} activation {b}: {why}")
            elif a != b:
                problems.append(f"{gid}: node {qn.name} input {i} reads {a}, the fp32 graph's reads {b}")
            elif a in q_inits and not _same_initializer(q_inits[a], fp_inits.get(a)):
                problems.append(f"{gid}: node {qn.name} input {i}: initializer {a} differs from the fp32 graph's")
    if rewritten != declared:
        problems += [f"{gid}: MatMul {n} quantized, but the manifest does not declare it (the router stays float, "
                     "the LM head and H-LoRA as the manifest says)" for n in sorted(rewritten - declared)]
        problems += [f"{gid}: MatMul {n} declared quantized but still reads a float weight"
                     for n in sorted(declared - rewritten)]
    return {k: v for k, v in deq.items() if v is not None}


def _key(node: onnx.NodeProto) -> str:
    return node.name or f"-> {node.output[0]}"


def _attributes(node: onnx.NodeProto) -> list:
    """Attribute values, tensors as arrays (a re-saved graph may store the same constant in another encoding)."""
    values = [(a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute]
    return [(k, (v.data_type, numpy_helper.to_array(v).tolist()) if isinstance(v, onnx.TensorProto) else v)
            for k, v in values]


def _activation_problem(made: dict, read: str, source: str, inits: dict, dtype: int) -> str | None:
    """A Q/DQ scheme's activation: DequantizeLinear(QuantizeLinear(the fp32 graph's tensor)), one per-tensor scale
    shared by the pair, zero points 0 of the scheme's type."""
    dq = made[read]
    q = made.get(dq.input[0])
    if dq.op_type != "DequantizeLinear" or q is None or q.op_type != "QuantizeLinear" or q.input[0] != source:
        return "not QuantizeLinear -> DequantizeLinear of the fp32 graph's tensor"
    scale = inits.get(q.input[1])
    if q.input[1] != dq.input[1] or scale is None or list(scale.dims) or numpy_helper.to_array(scale) <= 0:
        return "not one positive per-tensor scale shared by its QuantizeLinear and DequantizeLinear"
    zero = [inits.get(x) for x in (q.input[2:3] + dq.input[2:3]) if x]
    if len(zero) != 2 or any(z is None or z.data_type != dtype or numpy_helper.to_array(z).astype(np.float32).any()
                             for z in zero):
        return f"zero points not 0 of type {onnx.TensorProto.DataType.Name(dtype)}"
    return None


def _same_initializer(a: onnx.TensorProto, b: onnx.TensorProto | None) -> bool:
    """Inline: the same bytes. External: the same content name (Bundle.open checked the bytes against it), type and
    shape; where in its bundle's weights file it lies does not matter."""
    if b is None or (a.data_location == onnx.TensorProto.EXTERNAL) != (b.data_location == onnx.TensorProto.EXTERNAL):
        return False
    if a.data_location == onnx.TensorProto.EXTERNAL:
        return (a.name, a.data_type, list(a.dims)) == (b.name, b.data_type, list(b.dims))
    return a == b


def _same_graph(a: onnx.GraphProto, b: onnx.GraphProto) -> bool:
    inits = {i.name: i for i in b.initializer}
    return ((list(a.node), list(a.input), list(a.output)) == (list(b.node), list(b.input), list(b.output))
            and len(a.initializer) == len(b.initializer)
            and all(_same_initializer(i, inits.get(i.name)) for i in a.initializer))


def _check_weight(where: str, dq: onnx.NodeProto, inits: dict, source: onnx.TensorProto, src_root: Path,
                  q_root: Path, quant, result: Result) -> np.ndarray | None:
    """One quantized weight against its fp32 source: form, scales, stored values, error. Returns what its
    DequantizeLinear computes (None when its form is already wrong)."""
    dtype, axis, qmax = FORMS[quant.scheme]
    block = quant.block_size if quant.scheme == "int4" else 0
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    values, scale = (inits.get(x) for x in dq.input[:2])
    w = numpy_helper.to_array(source, base_dir=str(src_root)).astype(np.float32)
    k, n = w.shape
    want_scale = ((-(-k // block), n) if block else (n,))
    form = [(values is not None and values.data_type == dtype, f"stored as {values and values.data_type}, not "
                                                               f"{onnx.TensorProto.DataType.Name(dtype)}"),
            (attrs.get("axis", 1) == axis, f"axis {attrs.get('axis', 1)}, not {axis}"),
            (attrs.get("block_size", 0) == block, f"block_size {attrs.get('block_size', 0)}, not {block}"),
            (scale is not None and tuple(scale.dims) == want_scale and scale.data_type == onnx.TensorProto.FLOAT,
             f"scale {scale and list(scale.dims)}, not fp32 {list(want_scale)}")]
    if len(dq.input) > 2 and dq.input[2]:
        zp = inits.get(dq.input[2])
        form.append((zp is not None and not numpy_helper.to_array(zp).astype(np.float32).any(), "zero point not 0"))
    if bad := [why for ok, why in form if not ok]:
        result.problems.append(f"{where}: {'; '.join(bad)}")
        return None
    assert values is not None and scale is not None  # the form checks above
    result.weights += 1
    stored = numpy_helper.to_array(values, base_dir=str(q_root))
    s = numpy_helper.to_array(scale, base_dir=str(q_root))
    step = np.repeat(s, block, axis=0)[:k] if block else s  # each element's scale, [K, N]
    deq = stored.astype(np.float32) * step
    problems = [*_scale_problems(w, s, block, qmax, quant.algorithm),
                *_requantize_problems(w, stored, step, quant.scheme, qmax)]
    norm = max(float(np.linalg.norm(w)), 1e-30)
    rel = float(np.linalg.norm(deq - w)) / norm
    # per element: half a step (and what a clip cut off); E4M3: half its 3-bit mantissa's ulp, 2^-10 steps subnormal
    bound = (np.abs(w) / 16 + step * 2.0 ** -10 if quant.scheme == "fp8"
             else step / 2 + np.maximum(np.abs(w) - qmax * step, 0))
    limit = float(np.linalg.norm(bound)) / norm
    if rel > limit * (1 + SCALE_RTOL):
        problems.append(f"relative error {rel:.4g} above the {limit:.4g} its scales allow")
    result.max_rel_error = max(result.max_rel_error, rel)
    result.problems += [f"{where}: {p}" for p in problems]
    return deq


def _scale_problems(w: np.ndarray, s: np.ndarray, block: int, qmax: float, algorithm: str) -> list[str]:
    """Each scale against the source's absmax over its block (int4) or output column: equal for round to nearest
    and the Q/DQ schemes, one of AWQ's clip ratios for awq."""
    k, n = w.shape
    absmax = (np.abs(np.pad(w, ((0, -k % block), (0, 0)))).reshape(-1, block, n).max(1) if block
              else np.abs(w).max(0))
    ratio = s.astype(np.float64) * qmax / np.maximum(absmax, 1e-30)
    allowed = quantize.CLIP_GRID if algorithm == "awq" else np.array([1.0])
    off = np.abs(ratio[..., None] - allowed).min(-1) > SCALE_RTOL * allowed.max()
    if off.any():
        at = tuple(int(i) for i in np.argwhere(off)[0])
        return [f"{int(off.sum())} of {off.size} scales not derived from the source (at {list(at)}: "
                f"{ratio[at]:.4g} x absmax / {qmax:g})"]
    return []


def _requantize_problems(w: np.ndarray, stored: np.ndarray, step: np.ndarray, scheme: str, qmax: float) -> list[str]:
    """The source re-quantized with the stored scales: the stored values, exactly."""
    if scheme == "fp8":
        again = np.clip(w / step, -qmax, qmax).astype(stored.dtype)
    else:
        again = np.clip(np.rint(w / step), -qmax - 1, qmax)
    diff = stored.astype(np.float32) != again.astype(np.float32)
    if diff.any():
        at = tuple(int(i) for i in np.argwhere(diff)[0])
        return [f"{int(diff.sum())} of {diff.size} stored values differ from the source re-quantized with the stored "
                f"scales (at {list(at)}: {stored[at]} instead of {again[at]})"]
    return []


def _run(gid: str, src: Bundle, q: Bundle, deq: dict[str, np.ndarray], problems: list[str]) -> dict[str, float]:
    """On the same inputs: the quantized graph unfused against the fp32 graph with the dequantized weights
    (weight-only schemes: the Q/DQ schemes quantize the activations too, which the accuracy report measures), and
    the session the runtime builds (fused, the manifest's accuracy level and session entries) against unfused."""
    import onnxruntime as ort

    quant, spec = q.manifest.precision.quantization, q.manifest.graphs[gid].spec
    assert quant is not None  # check() runs graphs of quantized bundles only
    feeds = spec.sample_inputs(np.random.default_rng(0), **{d: min(8, v.max) for d, v in spec.dims.items()})

    def outputs(path: Path, fused: bool, weights: dict | None = None) -> list[np.ndarray]:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused else
                                         ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        entries = quant.session_config.get(spec.name, {}) if fused else {}
        if quant.accuracy_level is not None:
            entries = {**entries, "session.qdq_matmulnbits_accuracy_level": str(quant.accuracy_level)}
        for key, value in entries.items():
            opts.add_session_config_entry(key, value)
        values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in (weights or {}).items()}
        for name, value in values.items():
            opts.add_initializer(name, value)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)

    path = q.file(q.manifest.graphs[gid].file)
    unfused = outputs(path, False)
    diffs = {"fused": _rel_diff(outputs(path, True), unfused)}
    if quant.activations == "float32":
        diffs["unfused"] = _rel_diff(unfused, outputs(src.file(src.manifest.graphs[gid].file), False, deq))
    for kind, bound in (("unfused", RUN_RTOL), ("fused", FUSED_RTOL)):
        if kind in diffs and not diffs[kind] <= bound:
            against = "the fp32 graph with the dequantized weights" if kind == "unfused" else "the unfused graph"
            problems.append(f"{gid}: the {kind} quantized graph differs from {against} by {diffs[kind]:.3g} of the "
                            f"output range (bound {bound})")
    return diffs


def _rel_diff(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Largest |difference| over the largest |value|, across the outputs."""
    return max(float(np.abs(a - b).max()) / max(float(np.abs(b).max()), 1e-30)
               for a, b in zip(got, want, strict=True) if b.size)
