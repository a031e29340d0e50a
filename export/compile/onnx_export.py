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

from runtime.contract.graphspec import GraphSpec
from runtime.contract.manifest import WEIGHTS_ALIGN, TensorEntry
from runtime.contract.quantization import INLINE_BYTES

OPSET = 17
PACKED = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


@torch.no_grad()
def export_graph(spec: GraphSpec, module: torch.nn.Module, feeds: dict[str, np.ndarray],
                 export_params: bool = True) -> onnx.ModelProto:
    """TorchScript export (measured faster on ORT CPU than the dynamo path for this decoder; see benchmarks/).
    export_params=False: the parameters become graph inputs named after them (export/compile/stream.py)."""
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python values we made static on purpose
        path = Path(tmp) / "graph.onnx"
        torch.onnx.export(module.eval(), args, str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(), opset_version=OPSET,
                          dynamo=False, do_constant_folding=True,
                          export_params=export_params)
        model = onnx.load(str(path))  # pulls any external data into memory
    model.graph.name = spec.name
    return model


class WeightStore:
    """Appends distinct tensors to one file; `externalize` points a graph's initializers into it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offsets: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
        self.tensors: dict[str, TensorEntry] = {}  # initializer name -> its entry in the manifest
        self.pointers: dict[str, onnx.TensorProto] = {}  # initializer name -> its external initializer here

    def add(self, raw: bytes) -> tuple[str, int, int]:
        digest = hashlib.sha256(raw).hexdigest()
        if digest not in self.offsets:
            offset = -self.file.tell() % WEIGHTS_ALIGN + self.file.tell()
            self.file.seek(offset)
            self.file.write(raw)
            self.offsets[digest] = (offset, len(raw))
        return (digest, *self.offsets[digest])

    def close(self) -> None:
        self.file.close()

    def put(self, array: np.ndarray, raw: bytes | None = None, data_type: int | None = None) -> onnx.TensorProto:
        """An initializer for `array` pointing into the store, named after its content. raw: its bytes when numpy's
        are not ONNX's (4-bit tensors: numpy (ml_dtypes) holds one value per byte, ONNX packs two)."""
        digest, offset, length = self.add(array.tobytes() if raw is None else raw)
        name = f"w.{digest[:24]}.{array.dtype.name}.{'x'.join(map(str, array.shape))}"
        self.tensors[name] = TensorEntry(offset, array.dtype.name, tuple(array.shape))
        data_type = data_type or onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        init = onnx.TensorProto(name=name, dims=array.shape, data_type=data_type,
                                data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", offset), ("length", length)):
            init.external_data.add(key=key, value=str(value))
        self.pointers[name] = init
        return init

    def externalize(self, model: onnx.ModelProto, source: Path | None = None) -> list[str]:
        """Move the graph's large initializers into the store, in place; returns their (content) names.
        External initializers are the store's own (streamed in: export/compile/stream.py; put by calibrate), or
        with `source` (the folder their files are in: another bundle) copied over one tensor at a time. Names are
        content names, so a source tensor whose bytes are already here points here without being read."""
        graph, renames, kept = model.graph, {}, {}
        for init in graph.initializer:
            if init.name in self.pointers:
                kept.setdefault(init.name, self.pointers[init.name])
                continue
            if init.data_location == onnx.TensorProto.EXTERNAL and source is None:
                kept.setdefault(init.name, init)
                continue
            if init.data_location == onnx.TensorProto.EXTERNAL:
                onnx.external_data_helper.load_external_data_for_tensor(init, str(source))
                init.data_location = onnx.TensorProto.DEFAULT
                del init.external_data[:]
            array = numpy_helper.to_array(init)
            raw = init.raw_data if init.data_type in PACKED else array.tobytes()
            if len(raw) < INLINE_BYTES:
                kept.setdefault(init.name, init)
                continue
            external = self.put(array, raw, init.data_type)
            init.ClearField("raw_data")  # a bundle's worth of weights never sits in memory at once
            renames[init.name] = external.name
            kept.setdefault(external.name, external)  # the same tensor twice in one graph: one initializer
        inits = list(kept.values())
        del graph.initializer[:]
        graph.initializer.extend(inits)
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
        return [i.name for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
