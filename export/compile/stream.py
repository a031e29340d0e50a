"""The decoder graph exported without holding its weights: at full size they are 15 GB in fp32, the machine has 24.

The structure is traced once, with every decoder-layer parameter a weightless placeholder (one number broadcast to
its shape) and `export_params=False`, so the tracer writes no weights and folds none (the export modules hold each
MatMul operand as a parameter: export/reference/hlora.FoldedHLora). Then each layer is read from the release files,
wrapped by the same `Block` the graph was traced with, its tensors appended to weights.bin, and freed: peak memory
is one layer plus the tables, whatever the depth. The graph and its numbers are those of a plain export.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from tqdm import tqdm

from export.compile.graphs import Block, DecoderGraph
from export.compile.onnx_export import INLINE_BYTES, WeightStore, export_graph
from export.reference.hlora import FoldedHLora
from export.reference.model import HealthGPT
from runtime.contract.errors import UserError
from runtime.contract.graphspec import GraphSpec

LAYER_PARAM = re.compile(r"blocks\.(\d+)\.(.+)")


def _placeholders(module: nn.Module) -> None:
    """Every meta parameter of `module` becomes one number broadcast to its shape (no memory). The numbers differ
    (1, 2, 3, ...: exact in fp16 too) because the exporter merges parameters of equal value."""
    metas = [(m, name, p) for m in module.modules() for name, p in m._parameters.items() if p is not None and p.is_meta]
    for k, (m, name, p) in enumerate(metas, 1):
        m._parameters[name] = nn.Parameter(torch.full((), k, dtype=p.dtype).expand(p.shape), requires_grad=False)


def export_decoder(ref: HealthGPT, spec: GraphSpec, max_context: int, store: WeightStore) -> onnx.ModelProto:
    """The decoder of a `load_reference(..., stream=True)` reference, its weights streamed into `store`."""
    graph = DecoderGraph(ref.llm, max_context)  # layers still on meta: their blocks hold meta parameters
    _placeholders(graph)
    feeds = spec.sample_inputs(np.random.default_rng(0), seq=3)
    model = export_graph(spec, graph, feeds, export_params=False)
    wanted = {i.name for i in model.graph.input} - set(spec.input_names)  # the parameters, as graph inputs
    params = dict(graph.named_parameters())
    strays = sorted(wanted - set(params))
    if strays:  # a tracer-made constant (folded from a parameter) would be lost: never ship such a graph
        raise RuntimeError(f"decoder graph reads {', '.join(strays[:5])}, which are not export parameters")
    tensors = {n: params[n] for n in wanted if not _is_placeholder(params[n])}  # tables, final norm: real already
    per_layer: dict[int, list[str]] = {}
    for name in wanted - set(tensors):
        m = LAYER_PARAM.fullmatch(name)
        if m is None:
            raise RuntimeError(f"decoder parameter {name} is a placeholder outside the decoder layers")
        per_layer.setdefault(int(m.group(1)), []).append(name)
    for i in tqdm(sorted(per_layer), desc="decoder layers", unit="layer", leave=False):
        real = dict(Block(ref.layer(i), FoldedHLora).named_parameters())
        _stream(model, {n: real[LAYER_PARAM.fullmatch(n).group(2)] for n in per_layer[i]}, store)
        del real
        ref.drop_layer(i)
    _stream(model, tensors, store)
    if left := ref.tensors.unread():
        raise UserError(f"the checkpoint has {len(left)} unexpected tensor(s) that no part of the model reads: "
                        f"{', '.join(left[:8])}" + (" ..." if len(left) > 8 else ""))
    return model


def _is_placeholder(p: torch.Tensor) -> bool:
    return p.numel() > 1 and all(s == 0 for s in p.stride())


def _stream(model: onnx.ModelProto, tensors: dict[str, torch.Tensor], store: WeightStore) -> None:
    """Graph inputs named in `tensors` become initializers in `store` (content-named, as export does)."""
    if not tensors:
        return
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    have = {i.name for i in graph.initializer}
    renames = {}
    for name, t in tensors.items():
        graph.input.remove(inputs[name])
        array = t.detach().contiguous().numpy()
        init = store.put(array) if array.nbytes >= INLINE_BYTES else numpy_helper.from_array(array, name)
        renames[name] = init.name
        if init.name not in have:  # the same tensor twice (two equal parameters): one initializer
            graph.initializer.append(init)
            have.add(init.name)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
