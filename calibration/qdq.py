"""W8A8 and FP8 Q/DQ graphs for TensorRT's strongly typed builds, by `onnxruntime.quantization.quantize_static`.

Each target MatMul gets QuantizeLinear -> DequantizeLinear on its activation (per tensor, static scale, symmetric:
zero point 0, as TensorRT requires) and DequantizeLinear on its weight (per output channel, symmetric); standard ONNX
at opset 21. The calibration ranges come from quantize_static's own calibrators (MinMax, Percentile, Entropy) run on
feeds the caller computes with the fp32 bundle's graphs.

Hand-written on top of it, and why:
- the other readers of a quantized activation (the H-LoRA A and R MatMuls, Shape) are put back on the float tensor:
  quantize_static shares one Q/DQ pair between all of them (its DedicatedQDQPair gives each its own Q/DQ instead), and
  the H-LoRA branch stays float;
- FP8 (E4M3): quantize_static only takes its Distribution method for float8 (scales from the standard deviation, not
  the amax TensorRT and ModelOpt scale by), so the int8 graph it writes is turned into FP8: the same Q/DQ nodes,
  activation scales amax / 448 from the calibrated int8 ranges (amax = 127 x scale: symmetric int8 is [-127, 127]),
  weights re-quantized from fp32 per output channel.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from calibration.quantize import IR_VERSION, OPSET
from runtime.contract.quantization import ALGORITHMS as _ALGORITHMS

ALGORITHMS = _ALGORITHMS["w8a8"]  # first: the default
INT8_MAX = 127  # symmetric int8 range [-127, 127] (onnxruntime.quantization's ONNX_INT_TYPE_SYMMETRIC_RANGE)
E4M3_MAX = 448.0
FORMATS = {"w8a8": "int8", "fp8": "float8e4m3fn"}  # scheme -> weight and activation type, as the manifest says it


class _Feeds:
    """A CalibrationDataReader over a list of feed dicts, read in strides (`set_range`, CalibStridedMinMax): one
    sample per collection, because the histogram calibrators stack a collection's outputs into one array and the
    decoder's prompts differ in length."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self.set_range(0, len(feeds))

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.todo = iter(self.feeds[start_index:end_index])

    def get_next(self):
        return next(self.todo, None)


def quantize_graph(model: onnx.ModelProto, weights_dir: Path, nodes: list[str], feeds: list[dict], scheme: str,
                   algorithm: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A Q/DQ copy of `model` (loaded without its weights, which lie in `weights_dir`; the copy holds them inside)
    where the MatMuls named `nodes` are quantized, and those MatMuls' fp32 weights by node name."""
    from onnx import external_data_helper, version_converter
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # converted before the weights come in: the converter serializes the model, and protobuf stops at 2 GB
    model = version_converter.convert_version(model, OPSET)
    model.ir_version = IR_VERSION
    external_data_helper.load_external_data_for_model(model, str(weights_dir))
    by_name = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    weights = {n: numpy_helper.to_array(inits[by_name[n].input[1]]) for n in nodes}  # fp32, for FP8 and the errors
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[algorithm]
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice (root logger) does not apply here
    try:
        with tempfile.TemporaryDirectory(prefix="healthgpt-qdq-") as tmp:
            out = Path(tmp) / "q.onnx"
            quantize_static(model, out, _Feeds(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=nodes, calibrate_method=method, use_external_data_format=True,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                           "CalibStridedMinMax": 1, "OpTypesToExcludeOutputQuantization": ["MatMul"],
                                           "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})
            q = onnx.load(str(out))
    finally:
        root.setLevel(level)
    _float_side_readers(q, set(nodes))
    if scheme == "fp8":
        _to_fp8(q, nodes, weights)
    return q, weights


def _producers_and_readers(graph):
    made = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return made, readers


def _float_side_readers(model: onnx.ModelProto, targets: set[str]) -> None:
    """Readers of an activation DequantizeLinear that are not target MatMuls read the float tensor again."""
    made, readers = _producers_and_readers(model.graph)
    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in made]:
        q = made[dq.input[0]]
        if q.op_type != "QuantizeLinear":
            continue
        for reader in readers.get(dq.output[0], []):
            if reader.name not in targets:
                reader.input[:] = [q.input[0] if i == dq.output[0] else i for i in reader.input]


def weight_dequantize(model: onnx.ModelProto, nodes: list[str]) -> dict[str, onnx.NodeProto]:
    """Target MatMul name -> the DequantizeLinear feeding its weight (its input 1)."""
    made, _ = _producers_and_readers(model.graph)
    by_name = {n.name: n for n in model.graph.node}
    return {n: made[by_name[n].input[1]] for n in nodes}


def _to_fp8(model: onnx.ModelProto, nodes: list[str], weights: dict[str, np.ndarray]) -> None:
    """The int8 Q/DQ graph -> E4M3: weights re-quantized from fp32 (per output channel), activation scales from
    the calibrated amax, every zero point an E4M3 zero."""
    inits = {i.name: i for i in model.graph.initializer}

    def replace(name: str, array: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    for node, dq in weight_dequantize(model, nodes).items():
        w = weights[node]
        scale = (np.maximum(np.abs(w).max(0), 1e-30) / E4M3_MAX).astype(np.float32)
        replace(dq.input[0], np.clip(w / scale, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn))  # no NaN
        replace(dq.input[1], scale)
        replace(dq.input[2], np.zeros(scale.shape, ml_dtypes.float8_e4m3fn))
    activation = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for name in activation:
        scale = numpy_helper.to_array(inits[name]) * np.float32(INT8_MAX / E4M3_MAX)
        replace(name, scale.astype(np.float32))
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in activation:
            replace(n.input[2], np.zeros(numpy_helper.to_array(inits[n.input[2]]).shape, ml_dtypes.float8_e4m3fn))


def dequantized_weights(model: onnx.ModelProto, nodes: list[str]) -> dict[str, np.ndarray]:
    """Target MatMul name -> what its weight DequantizeLinear computes (fp32), for the error statistics."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node, dq in weight_dequantize(model, nodes).items():
        q, scale = (numpy_helper.to_array(inits[x]).astype(np.float32) for x in dq.input[:2])
        out[node] = q * scale
    return out
