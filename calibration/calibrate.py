"""`build.py calibrate`: an fp32 bundle -> a quantized bundle with the same graph interfaces.

Activations are collected by running the fp32 bundle's own graphs on ONNX Runtime over the calibration set, as at
run time (the vision graph's output spliced into the decoder's prompt). Weight-only schemes (int4, int8: quantize.py)
quantize each distinct weight once for every graph that reads it; the Q/DQ schemes (w8a8, fp8: qdq.py) quantize
each graph with quantize_static, whose per-channel weights are a function of the weight alone. Either way the base
decoder weights (identical in both tasks) come out as identical bytes: one tensor in the content-addressed weights.bin.
The bundle is built in `OUT.partial/` and swapped in whole at the end, as `build.py export` does (export/outdir.py);
manifest.json is written last, so nothing before that opens as a bundle.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm import tqdm

from calibration import data, qdq, quantize, report
from export.compile.onnx_export import WeightStore
from export.compile.writer import BundleWriter
from export.outdir import check as check_out
from export.outdir import staged
from export.parity.verify import peak_rss_gib
from runtime.contract.errors import UserError
from runtime.contract.healthgpt import TASKS
from runtime.contract.manifest import CalibrationFile, Manifest, Quantization, ReportRef
from runtime.contract.quantization import ALGORITHMS, GRAPHS, ort_only
from runtime.contract.quantization import INT4_BLOCKS as BLOCK_SIZES
from runtime.core.backend import OrtBackend
from runtime.core.bundle import Bundle
from runtime.core.kvcache import KVCache
from runtime.core.pipeline import Pipeline

# LM head quantized by default where the accuracy report chose it (benchmarks/README.md: a small KL cost for a
# decode step that reads half the bytes). The Q/DQ schemes keep it float (not measured).
LM_HEAD = {"int4": True, "int8": True, "w8a8": False, "fp8": False}
# H-LoRA A/B in the scheme's form by default (benchmarks/README.md, "H-LoRA quantized"): full M3 int4 report
# unchanged (mean KL 0.235 -> 0.236 com, 0.268 -> 0.268 gen) for a bundle of 4.6 instead of 6.2 GB (the GEN adapter
# alone is 1.6 GB in fp32); int8 measured at tiny size only (its report passes). The Q/DQ schemes keep them float.
ADAPTERS = {"int4": True, "int8": True, "w8a8": False, "fp8": False}
# int8 activations inside the fused MatMulNBits: the fast kernels on this CPU (anchors.md; 8-bit below level 4
# runs ~20x slower than fp32)
ACCURACY_LEVEL = 4
WEIGHT_ONLY = "DequantizeLinear (symmetric, no zero point, opset 21) -> MatMul; standard ONNX, TensorRT-buildable"
QDQ = ("QuantizeLinear -> DequantizeLinear on the activation (per tensor, static, symmetric) and DequantizeLinear on "
       "the weight (per output channel, symmetric) -> MatMul, opset 21; standard ONNX, for TensorRT strongly typed "
       "builds")
# ONNX Runtime CPU, per graph: its QDQ fusions turn FP8 Q/DQ into MatMulIntegerToFloat, which has no float8 kernel
# (the session fails to build), so fp8 graphs run as written (Q/DQ in fp32: an exact emulation). w8a8 decoders keep
# the fusions (int8 kernels: the CPU speed path), with ONNX Runtime's x64 precision mode: on AVX2 (or AVX-512
# without VNNI) its u8s8 products saturate, and the fused decoder differed from its Q/DQ graph by 0.17 of the output
# range on the tiny bundle (2026-12-07, EPYC AVX2); the mode computes u8u8 there instead (~1e-7), and is a no-op
# where u8s8 cannot overflow (VNNI). On the vision graph ORT 1.31's MatMul+Add -> Gemm QDQ rewrite writes an invalid
# QuantizeLinear (int8 output, uint8 zero point) and the session fails to build, so vision runs as written too.
AS_WRITTEN = {"session.disable_quant_qdq": "1"}
NO_OVERFLOW = {"session.x64quantprecision": "1"}
SESSION_CONFIG = {"fp8": {"decoder": AS_WRITTEN, "vision": AS_WRITTEN},
                  "w8a8": {"decoder": NO_OVERFLOW, "vision": AS_WRITTEN}}


def _targets(model: onnx.ModelProto, graph: str, plan: Plan) -> list[quantize.WeightMatMul]:
    """Decoder: the base linears, and as planned the LM head and the H-LoRA A/B matrices; vision: every linear."""
    roles = quantize.quantized_roles(graph, plan.lm_head, plan.adapters)
    return [m for m in quantize.weight_matmuls(model) if m.role in roles]


def calibration_feeds(bundle: Bundle, samples: list[data.Sample], keys) -> dict[tuple[str, str], list[dict]]:
    """(task, graph) -> one feed per calibration sample, as the runtime feeds the graph: pixel values for vision,
    the prompt's embeddings (the fp32 vision graph's output spliced in) and an empty KV cache for the decoder."""
    backend = OrtBackend("cpu")
    pipe = Pipeline(bundle, backend)
    out = {}
    for task, graph in keys:
        spec = bundle.spec(task, graph)
        out[(task, graph)] = [
            {"pixel_values": s.pixel_values} if graph == "vision" else
            {"inputs_embeds": pipe.prompt(TASKS[task], s.path, s.prompt(task)), **KVCache(backend, spec).feeds()}
            for s in tqdm(samples, desc=f"calibrate {task}.{graph}", unit="image", leave=False)]
    return out


def collect_importance(bundle: Bundle, feeds: dict, targets: dict) -> dict[str, np.ndarray]:
    """Mean square per input channel of every target MatMul's activation, pooled by weight over the tasks and
    the calibration set. targets: (task, graph) -> (graph-only model, WeightMatMuls)."""
    backend = OrtBackend("cpu")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for (task, graph), (model, matmuls) in targets.items():
        probe = copy.deepcopy(model)
        names = sorted({m.activation for m in matmuls})
        probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
        g = backend.load(bundle, task, graph, model=probe.SerializeToString())
        for feed in feeds[(task, graph)]:
            acts = dict(zip(names, g.session.run(names, feed)))
            for m in matmuls:
                x = acts[m.activation].reshape(-1, acts[m.activation].shape[-1]).astype(np.float64)
                sums[m.weight] = sums.get(m.weight, 0) + (x * x).sum(0)
                counts[m.weight] = counts.get(m.weight, 0) + x.shape[0]
    return {w: (sums[w] / counts[w]).astype(np.float32) for w in sums}


def _relative_error(deq: np.ndarray, w: np.ndarray) -> float:
    return float(np.linalg.norm(deq - w) / max(float(np.linalg.norm(w)), 1e-30))


def _weight_only_graph(model, matmuls, scheme, block_size, importance, done, errors, root: Path,
                       store: WeightStore) -> onnx.ModelProto:
    """The graph with its target weights through DequantizeLinear; each distinct weight quantized once (`done`),
    read from the weights file in `root` when its turn comes (the graph was loaded without its weights) and written
    to the store at once: `done` and the graphs hold pointers, never a decoder's worth of quantized bytes."""
    arrays = {i.name: i for i in model.graph.initializer}
    block = block_size if scheme == "int4" else None
    for m in matmuls:
        if m.weight not in done:
            w = numpy_helper.to_array(arrays[m.weight], base_dir=str(root))
            q, scale = quantize.quantize_weight(w, scheme, block_size, importance.get(m.weight))
            errors[m.weight] = _relative_error(quantize.dequantize(q, scale, scheme, block_size), w)
            done[m.weight] = ([store.put(numpy_helper.to_array(t), t.raw_data, t.data_type)
                               for t in quantize.weight_initializers(q, scale, scheme, m.weight)], block)
    return quantize.rewrite(model, {m.weight: done[m.weight] for m in matmuls}, scheme)


def _qdq_graph(model, root: Path, matmuls, feeds, scheme, algorithm, errors) -> onnx.ModelProto:
    nodes = [m.node for m in matmuls]
    out, weights = qdq.quantize_graph(model, root, nodes, feeds, scheme, algorithm)
    deq = qdq.dequantized_weights(out, nodes)
    errors.update({m.weight: _relative_error(deq[m.node], weights[m.node]) for m in matmuls})
    return out


@dataclass(frozen=True)
class Plan:
    """What `calibrate` makes, its options checked."""
    scheme: str
    algorithm: str
    block_size: int | None  # int4 only
    graphs: tuple[str, ...]
    lm_head: bool
    adapters: bool  # the H-LoRA A and B matrices (never the router) in the scheme's form too

    @classmethod
    def of(cls, scheme: str, block_size: int, graphs: tuple[str, ...], algorithm: str | None,
           lm_head: bool | None, adapters: bool | None = None) -> Plan:
        if scheme not in ALGORITHMS:
            raise UserError(f"unknown scheme {scheme!r}; choose one of {', '.join(ALGORITHMS)}")
        algorithm = algorithm or ALGORITHMS[scheme][0]
        if algorithm not in ALGORITHMS[scheme]:
            raise UserError(f"--algorithm {algorithm} does not apply to {scheme}; choose "
                            f"{', '.join(ALGORITHMS[scheme])}")
        if block_size not in BLOCK_SIZES:
            raise UserError(f"--block-size {block_size}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
        unknown = [g for g in graphs if g not in GRAPHS]
        if unknown or not graphs:
            raise UserError(f"--graphs {','.join(graphs)}: choose from {', '.join(GRAPHS)}")
        if adapters and scheme in qdq.FORMATS:
            raise UserError(f"--adapters quantized: {scheme} keeps the H-LoRA matrices float (weight-only schemes "
                            "quantize them: int4, int8)")
        return cls(scheme, algorithm, block_size if scheme == "int4" else None, tuple(graphs),
                   LM_HEAD[scheme] if lm_head is None else lm_head, ADAPTERS[scheme] if adapters is None else adapters)


def fp32_source(bundle_dir: str | Path) -> Bundle:
    src = Bundle.open(bundle_dir)
    precision = src.manifest.precision
    if precision.quantization is not None or precision.dtype != "fp32":
        raise UserError(f"{src.root} is not an fp32 bundle (precision {precision.dtype}, quantization "
                        f"{precision.quantization and precision.quantization.scheme}); calibrate the fp32 export")
    return src


def calibrate(bundle_dir: str | Path, out: str | Path, scheme: str = "int4", block_size: int = BLOCK_SIZES[0],
              images=None, samples: int | None = None, graphs: tuple[str, ...] = ("decoder",),
              algorithm: str | None = None, lm_head: bool | None = None, adapters: bool | None = None,
              quick_report: bool = False) -> Manifest:
    """lm_head: quantize the decoder's LM head too (None: the scheme's default, LM_HEAD). quick_report: the accuracy
    report on one held-out image, 32 teacher-forced positions and no generated image (the full model on a CPU: the
    default report's 1024-step image runs alone take tens of minutes). A bundle that fails its report is written
    all the same, marked failed in its manifest (the runtime refuses it unless overridden)."""
    plan = Plan.of(scheme, block_size, graphs, algorithm, lm_head, adapters)
    src = fp32_source(bundle_dir)
    calib = data.load_set(images, samples)
    # before the work (staged() checks again): nothing deleted or moved if refused
    check_out(Path(out), "bundle", [src.root, *(s.path for s in calib)])
    with staged(Path(out), "bundle", [src.root]) as tmp:
        start = time.perf_counter()
        writer = BundleWriter(tmp)
        manifest, errors = quantize_bundle(src, writer, plan, calib)
        quantize_peak = peak_rss_gib()  # the bundle written; the report then holds the fp32 decoder too
        _release_heap()
        tqdm.write(f"[I] quantized {len(errors)} distinct weights ({plan.scheme}, {plan.algorithm}) in "
                   f"{time.perf_counter() - start:.1f}s, peak RSS {quantize_peak:.2f} GiB; "
                   f"measuring against {src.root}")
        # measured before manifest.json exists: until it is written nothing here opens as a bundle
        held_out = data.held_out_images()[:1] if quick_report else data.held_out_images()
        result = report.measure(src, Bundle(tmp, manifest, ""), held_out, *((32, False) if quick_report else ()))
        result = dataclasses.replace(result, peak_rss_gib={"quantize": round(quantize_peak, 2),
                                                           "report": round(peak_rss_gib(), 2)})
        report.write(tmp, result)
        quant = manifest.precision.quantization
        assert quant is not None  # quantize_bundle wrote it
        quant = dataclasses.replace(quant, report=ReportRef(result.passed, report.FILES[0]))
        manifest = dataclasses.replace(manifest, precision=dataclasses.replace(manifest.precision, quantization=quant),
                                       files={**manifest.files, **writer.files(list(report.FILES))})
        return writer.write_manifest(manifest)


def _release_heap() -> None:
    """Hand the freed heap of the quantizing phase back before the report maps the fp32 decoder. At full size, after
    the AWQ activation pass (fp32 decoder sessions), the report was killed for memory on a 24 GB machine at 24.3 GB
    RSS (2026-12-06) where a round-to-nearest run had peaked at 22.8: what the pass's sessions and their threads
    freed may stay in glibc's arenas otherwise."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def quantize_bundle(src: Bundle, writer: BundleWriter, plan: Plan, calib: list[data.Sample]) -> tuple[Manifest, dict]:
    """The quantized graphs and weights written by `writer`, and their manifest (not written: no report yet);
    with the relative error of each distinct quantized weight."""
    chosen = {(t, g): onnx.load(str(src.path(t, g)), load_external_data=False) for t in src.tasks for g in plan.graphs}
    targets = {k: (m, _targets(m, k[1], plan)) for k, m in chosen.items()}
    needs_feeds = plan.algorithm == "awq" or plan.scheme in qdq.FORMATS
    feeds = calibration_feeds(src, calib, targets) if needs_feeds else {}
    importance = collect_importance(src, feeds, targets) if plan.algorithm == "awq" else {}
    done: dict[str, tuple[list[onnx.TensorProto], int | None]] = {}  # weight name -> its DQ initializers
    errors: dict[str, float] = {}  # weight -> relative Frobenius error of the quantized weight
    fused, entries = {}, {}
    for graph_id, entry in tqdm(src.manifest.graphs.items(), desc="quantize", unit="graph"):
        task, name = graph_id.split(".")
        # the graph alone: each weight is read from the fp32 weights.bin when quantized or copied (full size: 15 GB)
        model = onnx.load(str(src.file(entry.file)), load_external_data=False)
        key = entry.cache_key
        if (task, name) in targets:
            matmuls = targets[(task, name)][1]
            if plan.scheme in qdq.FORMATS:
                model = _qdq_graph(model, src.root, matmuls, feeds[(task, name)], plan.scheme, plan.algorithm, errors)
            else:
                model = _weight_only_graph(model, matmuls, plan.scheme, plan.block_size, importance, done, errors,
                                           src.root, writer.store)
            fused[graph_id] = len(matmuls)
            # never mistaken for the fp32 export's graph by the export cache
            key = hashlib.sha256(f"{key}|{plan}".encode()).hexdigest()
        initializers = writer.add_graph(entry.file, model, source=src.root)
        entries[graph_id] = dataclasses.replace(entry, cache_key=key, initializers=initializers)
    weights = writer.weights()
    if not errors:
        raise UserError(f"{src.root}: no MatMul weights to quantize in {', '.join(plan.graphs)}")
    writer.copy(src.file(src.manifest.tokenizer.file))
    manifest = dataclasses.replace(
        src.manifest, graphs=entries, weights=weights, engines={}, files=writer.files(),
        precision=dataclasses.replace(src.manifest.precision, quantization=_record(src, plan, fused, errors, calib)))
    return manifest, errors


def _record(src: Bundle, plan: Plan, fused: dict, errors: dict, calib) -> Quantization:
    qdq_format = qdq.FORMATS.get(plan.scheme)
    return Quantization(
        scheme=plan.scheme, algorithm=plan.algorithm, block_size=plan.block_size,
        weights=qdq_format or plan.scheme, activations=qdq_format or "float32", graphs=plan.graphs,
        lm_head="quantized" if plan.lm_head else "float32", adapters="quantized" if plan.adapters else "float32",
        form=QDQ if qdq_format else WEIGHT_ONLY,
        ort_only=ort_only(plan.scheme, plan.block_size),
        accuracy_level=None if qdq_format else ACCURACY_LEVEL, quantized_matmuls=fused, source_bundle=str(src.root),
        calibration_set=tuple(CalibrationFile(**c) for c in data.describe(calib)),
        weight_rel_error={"mean": float(np.mean(list(errors.values()))), "max": float(max(errors.values()))},
        tolerances=report.tolerances(plan.scheme, src.manifest.config.layers), session_config={
            g: c for g, c in SESSION_CONFIG.get(plan.scheme, {}).items() if g in plan.graphs})
