"""A hand-made bundle for the engine and TensorRT-backend tests: one tiny decoder-shaped graph and its manifest,
written here (no exporter, no torch), plus the prefill/decode loop both backends are driven through."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.compile import specs
from runtime.contract.errors import UserError
from runtime.contract.files import file_digest
from runtime.contract.graphspec import GraphSpec
from runtime.contract.healthgpt import IMAGE_TOKENS, VQ_CODES
from runtime.contract.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    FileEntry,
    GraphEntry,
    Manifest,
    ModelConfig,
    Precision,
    TaskEntry,
    TemplateInfo,
    TokenizerInfo,
    Tokens,
    WeightsTable,
)
from runtime.core.kvcache import KVCache
from runtime.core.trt_compat import DeviceInfo, current_device

H200 = DeviceInfo("NVIDIA H200", "9.0", "10.8.0.43")
TINY = dict(layers=1, kv_heads=2, head_dim=3, hidden=6, vocab=6, max_context=64)  # specs.decoder needs >= 64


def _trt_reason() -> str | None:
    try:
        current_device()
    except UserError as e:
        return f"TensorRT not installed / no GPU: {e}"
    return None


TRT_REASON = _trt_reason()  # None where TensorRT and a GPU are usable


def tiny_decoder_onnx(spec: GraphSpec) -> onnx.ModelProto:
    """Decoder interface of `spec` (names and shapes from the spec, none typed here) with trivial arithmetic:
    new key rows = inputs_embeds viewed as [S, kv_heads, head_dim], value rows = 2 * key rows,
    logits = sum over S of inputs_embeds + past_length * (sum of every cache input). The last term reads the
    whole cache, so a wrong in-place write shows up in the next step's logits."""
    onnx_type = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}

    def info(t):
        return helper.make_tensor_value_info(t.name, onnx_type[t.dtype], list(t.shape))

    kv_heads, head_dim = spec.shape(spec.inputs[2].name)[1:]
    embeds, past_length = spec.inputs[0].name, spec.inputs[1].name
    pasts = [t.name for t in spec.inputs[2:]]
    logits, presents = spec.outputs[0].name, [t.name for t in spec.outputs[1:]]
    consts = [helper.make_tensor("view", TensorProto.INT64, [3], [-1, kv_heads, head_dim]),
              helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
              helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])]
    nodes = [helper.make_node("Reshape", [embeds, "view"], [presents[0]]),
             helper.make_node("Mul", [presents[0], "two"], [presents[1]]),
             helper.make_node("ReduceSum", [embeds, "axis1"], ["x_sum"], keepdims=0),
             *(helper.make_node("ReduceSum", [p], [f"sum{i}"], keepdims=0) for i, p in enumerate(pasts)),
             helper.make_node("Sum", [f"sum{i}" for i in range(len(pasts))], ["cache_sum"]),
             helper.make_node("Cast", [past_length], ["past_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["past_f", "cache_sum"], ["weighted"]),
             helper.make_node("Add", ["x_sum", "weighted"], [logits])]
    graph = helper.make_graph(nodes, "decoder", [info(t) for t in spec.inputs], [info(t) for t in spec.outputs],
                              consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # what ORT/TRT read
    onnx.checker.check_model(model, full_check=True)
    return model


def make_manifest(spec: GraphSpec, dtype: str, files: dict[str, FileEntry]) -> Manifest:
    """A complete, valid manifest around the one graph (the fields the graph does not use hold plausible values)."""
    t = TINY
    return Manifest(
        format=FORMAT, format_version=FORMAT_VERSION, variant="m3",
        tasks={"com": TaskEntry(rank=4, alpha=8, clip_layer=-2, experts=4, scaling=8.0, hlora_file="com.bin",
                               fusion_file=None)},
        config=ModelConfig(hidden=t["hidden"], layers=t["layers"], heads=2, kv_heads=t["kv_heads"], head_dim=3,
                           vocab=8200, base_vocab=4, max_context=t["max_context"], sliding_window=None,
                           clip_blocks_total=1),
        tokens=Tokens(image_token_index=-200, start_index=4, idx_0=5, end_index=5 + VQ_CODES, vq_codes=VQ_CODES,
                      image_tokens=IMAGE_TOKENS, eos=(0,)),
        tokenizer=TokenizerInfo(file="tokenizer.json", bos_id=None, add_bos=False, eos_token="</s>", vocab_size=8200),
        template=TemplateInfo(name="phi3_instruct", system="", user="", assistant="", sep=""),
        precision=Precision(dtype, ()),
        graphs={"com.decoder": GraphEntry("com", "com.decoder.onnx", spec, "", ())},
        weights=WeightsTable("weights.bin", {}), tools={}, files=files)


def make_bundle(root: Path, dtype: str = "fp32") -> Path:
    """The bundle directory; `dtype` is what its manifest claims (the graph itself is fp32 either way)."""
    root.mkdir(parents=True, exist_ok=True)
    spec = specs.decoder(**TINY, dtype="float32")
    onnx.save(tiny_decoder_onnx(spec), str(root / "com.decoder.onnx"))
    (root / "weights.bin").write_bytes(bytes(4096))  # the shared weights file every bundle has (empty here)
    (root / "tokenizer.json").write_text("{}")  # listed like every bundle's; these tests never tokenize
    files = {p.name: FileEntry(file_digest(p), p.stat().st_size) for p in sorted(root.iterdir())}
    (root / MANIFEST).write_text(make_manifest(spec, dtype, files).to_json_text())
    return root


def run_steps(backend, bundle, steps):
    """Prefill then decode through the real KVCache; per step (logits, copy of the first cache buffer, the cache
    buffers the step was fed)."""
    decoder = backend.load(bundle, "com", "decoder")
    cache = KVCache(backend, decoder.spec)
    out = []
    for x in steps:  # x: [1, S, hidden]
        cache.check_room(x.shape[1])
        fed = dict(cache.buffers)
        o = decoder.run({"inputs_embeds": x, **cache.feeds()})
        cache.update(o)
        out.append((np.asarray(o["logits"]), np.array(np.asarray(next(iter(cache.buffers.values())))), fed))
    return out, decoder, cache


def steps(rng):
    return [rng.standard_normal((1, s, TINY["hidden"])).astype(np.float32) for s in (3, 1, 1, 2)]


def swap_same_shape_offsets(manifest: dict) -> None:
    """Swap the offsets of two weights-table entries of one dtype and shape: a plausible layout, the wrong bytes."""
    tensors = manifest["weights"]["tensors"]
    by_shape = {}
    for name, t in tensors.items():
        by_shape.setdefault((t["dtype"], tuple(t["shape"])), []).append(name)
    a, b = next(names for names in by_shape.values() if len(names) >= 2)[:2]
    tensors[a]["offset"], tensors[b]["offset"] = tensors[b]["offset"], tensors[a]["offset"]
