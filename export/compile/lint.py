"""Checks that a graph is one TensorRT's ONNX parser can take, and that fp16 graphs keep their fp32 islands."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

MIN_OPSET = 17  # LayerNormalization and fp16-safe norms (anchors.md: TensorRT #2781, #3692, #4493)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QDQ_OPSET = {onnx.TensorProto.FLOAT8E4M3FN: 19, onnx.TensorProto.INT4: 21}  # Q/DQ of these types from this opset

# Operators marked supported ("Y") in TensorRT 10's ONNX parser support matrix:
# https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md (TensorRT 10.x, opsets 9-20).
# Control flow (If, Loop, Scan) is supported there but excluded here on purpose: the task switch is resolved at
# export, and control flow slows or breaks TensorRT and ONNX Runtime (anchors.md).
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DFT DeformConv
DepthToSpace DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity ImageScaler InstanceNormalization
IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization LpPool LRN LSTM MatMul Max
MaxPool Mean MeanVarianceNormalization MelWeightMatrix Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh ScatterElements ScatterND Selu Shape
Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze STFT Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def lint(model: onnx.ModelProto) -> list[str]:
    """Problems that would stop TensorRT (or our runtime contract); an empty list means the graph passes."""
    problems = []
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < MIN_OPSET:
            problems.append(f"opset {op.version} < {MIN_OPSET}")
        elif op.domain not in ("", "ai.onnx"):
            problems.append(f"non-standard operator domain {op.domain!r}")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.name or node.op_type}: operator {node.domain}.{node.op_type} is not standard ONNX")
        elif node.op_type not in TENSORRT_OPS:
            problems.append(f"{node.name or node.op_type}: {node.op_type} is not on the TensorRT allow-list")
    return problems + qdq_problems(model)


def qdq_problems(model: onnx.ModelProto) -> list[str]:
    """TensorRT takes only symmetric Q/DQ (zero point absent or 0), of types the graph's opset defines them for.
    Zero points held as external data are not read (the exporters keep them inline: they are small)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    inits = {i.name: i for i in model.graph.initializer}
    problems = []
    for node in (n for n in model.graph.node if n.op_type in QDQ_OPS):
        zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and zero is None:
            problems.append(f"{node.name}: zero point {node.input[2]} is not a constant")
        if zero is None:
            continue
        if opset < QDQ_OPSET.get(zero.data_type, 0):
            problems.append(f"{node.name}: {onnx.TensorProto.DataType.Name(zero.data_type)} Q/DQ needs opset "
                            f">= {QDQ_OPSET[zero.data_type]}, the graph has {opset}")
        if zero.data_location != onnx.TensorProto.EXTERNAL and np.any(
                numpy_helper.to_array(zero).astype(np.float32) != 0):
            problems.append(f"{node.name}: zero point is not 0 (TensorRT takes symmetric quantization only)")
    return problems


def fp32_islands(model: onnx.ModelProto) -> list[str]:
    """In an fp16 graph, softmax, the RMSNorm statistics and the LM head must run in fp32: problems, if any."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*inferred.graph.value_info, *inferred.graph.input,
                                                                *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    problems = []
    for node in model.graph.node:
        if node.op_type in ("Softmax", "ReduceMean", "Sqrt") and types.get(node.input[0]) != onnx.TensorProto.FLOAT:
            dtype = onnx.TensorProto.DataType.Name(types.get(node.input[0], 0))
            problems.append(f"{node.name}: {node.op_type} runs in {dtype}")
    logits = [o for o in model.graph.output if o.name == "logits"]
    if logits and logits[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        problems.append("logits are not fp32")
    return problems
