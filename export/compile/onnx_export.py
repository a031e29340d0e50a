"""torch module + GraphSpec -> ONNX, and the one weights file every graph of a bundle points into.

Weights are content-addressed: an initializer is stored once however many graphs (or tasks) use it, and it is
renamed after its content, so the same tensor has the same name in every graph (ONNX Runtime can then share one
in-memory copy between sessions with `add_initializer`).
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from runtime.graphspec import GraphSpec

OPSET = 17
ALIGN = 4096  # page-aligned offsets so the runtime can memory-map tensors in place
INLINE_BYTES = 1024  # shape constants and other tiny tensors stay inside the graph
PACKED = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


@torch.no_grad()
def export_graph(spec: GraphSpec, module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """TorchScript export (measured faster on ORT CPU than the dynamo path for this decoder; see benchmarks/)."""
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python values we made static on purpose
        path = Path(tmp) / "graph.onnx"
        torch.onnx.export(module.eval(), args, str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(), opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)
        model = onnx.load(str(path))  # pulls any external data into memory
    model.graph.name = spec.name
    return model


class WeightStore:
    """Appends distinct tensors to one file; `externalize` points a graph's initializers into it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offsets: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
        self.tensors: dict[str, dict] = {}  # initializer name -> offset, dtype, shape (for the manifest)

    def add(self, raw: bytes) -> tuple[str, int, int]:
        digest = hashlib.sha256(raw).hexdigest()
        if digest not in self.offsets:
            offset = -self.file.tell() % ALIGN + self.file.tell()
            self.file.seek(offset)
            self.file.write(raw)
            self.offsets[digest] = (offset, len(raw))
        return (digest, *self.offsets[digest])

    def close(self) -> None:
        self.file.close()

    def externalize(self, model: onnx.ModelProto) -> list[str]:
        """Move the graph's large initializers into the store, in place; returns their (content) names."""
        graph, renames, kept = model.graph, {}, {}
        for init in list(graph.initializer):
            array = numpy_helper.to_array(init)
            # 4-bit tensors: numpy (ml_dtypes) holds one value per byte; ONNX stores two, as raw_data already has them
            raw = init.raw_data if init.data_type in PACKED else array.tobytes()
            if len(raw) < INLINE_BYTES:
                continue
            digest, offset, length = self.add(raw)
            name = f"w.{digest[:24]}.{array.dtype.name}.{'x'.join(map(str, array.shape))}"
            self.tensors[name] = {"offset": offset, "dtype": array.dtype.name, "shape": list(array.shape)}
            renames[init.name] = name
            if name in kept:  # the same tensor twice in one graph: keep one initializer
                graph.initializer.remove(init)
                continue
            kept[name] = init
            init.name = name
            init.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(field)
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (("location", self.path.name), ("offset", offset), ("length", length)):
                init.external_data.add(key=key, value=str(value))
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
        return list(kept)
