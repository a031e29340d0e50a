"""Backends run graphs; they know nothing about HealthGPT. The decode loop (runtime/generate.py) is the same for all.

A backend provides `load(bundle, task, name) -> Graph`, and the two things a preallocated KV cache needs:
`buffer(shape, dtype)` (a persistent tensor bound as a graph input in place) and `write(buffer, rows, at)`
(put new rows at sequence offset `at`). `Graph.run(feeds) -> {name: array}`: outputs are host arrays, or device
tensors the same backend's `write` accepts, valid until the same graph runs again (consume or copy them first).
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from runtime.bundle import Bundle
from runtime.errors import UserError
from runtime.graphspec import DTYPES, GraphSpec

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "auto": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


class Graph(Protocol):
    spec: GraphSpec
    providers: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def load(self, bundle: Bundle, task: str, name: str) -> Graph: ...

    def buffer(self, shape: tuple[int, ...], dtype: str): ...

    def write(self, buffer, rows, at: int) -> None: ...


class OrtGraph:
    def __init__(self, session, spec: GraphSpec):
        self.session, self.spec = session, spec
        self.providers = session.get_providers()  # what the session really got, not what was asked

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.spec.output_names, self.session.run(self.spec.output_names, feeds)))


class OrtBackend:
    """ONNX Runtime. The weights file is memory-mapped once and every initializer is handed to every session
    with `add_initializer`, so tensors both tasks use (CLIP blocks, base decoder weights) live once in memory.
    The KV cache is a host numpy buffer: CPU sessions read it in place; CUDA sessions copy it in per step."""

    def __init__(self, providers: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        if providers not in PROVIDERS:
            raise UserError(f"unknown providers {providers!r}; choose one of {', '.join(PROVIDERS)}")
        ort.set_default_logger_severity(4)  # provider-load failures are reported by us (session.get_providers)
        self.ort, self.requested = ort, providers
        self.name = f"ort-{providers}"
        self.threads = threads or len(os.sched_getaffinity(0))
        self.weights: dict[str, object] = {}  # tensor name -> OrtValue over the mmap (shared by all sessions)

    def _shared_weights(self, bundle: Bundle) -> dict[str, object]:
        if not self.weights:
            table = bundle.manifest["weights"]
            mm = np.memmap(bundle.root / table["file"], dtype=np.uint8, mode="r")
            for name, t in table["tensors"].items():
                dtype = np.dtype(t["dtype"])
                arr = mm[t["offset"]: t["offset"] + int(np.prod(t["shape"])) * dtype.itemsize].view(dtype)
                arr = arr.reshape(t["shape"])
                self.weights[name] = self.ort.OrtValue.ortvalue_from_numpy(arr)
        return self.weights

    def load(self, bundle: Bundle, task: str, name: str) -> OrtGraph:
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # onnxruntime-gpu warns about providers it cannot load; we report them instead
        weights = self._shared_weights(bundle)
        for tensor in bundle.entry(task, name)["initializers"]:
            opts.add_initializer(tensor, weights[tensor])
        available = self.ort.get_available_providers()
        asked = [p for p in PROVIDERS[self.requested] if p in available]
        session = self.ort.InferenceSession(str(bundle.path(task, name)), opts, providers=asked)
        session.disable_fallback()  # a provider failing at run time is an error, not a silent move to the CPU
        got = session.get_providers()
        if self.requested in ("cuda", "tensorrt") and got[0] != PROVIDERS[self.requested][0]:
            raise UserError(f"{PROVIDERS[self.requested][0]} was requested but could not be loaded (the session "
                            f"got {', '.join(got)}); check the CUDA/cuDNN installation or use --providers cpu")
        return OrtGraph(session, bundle.spec(task, name))

    def buffer(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return np.zeros(shape, DTYPES[dtype])

    def write(self, buffer: np.ndarray, rows: np.ndarray, at: int) -> None:
        buffer[:, :, at: at + rows.shape[2]] = rows


def open_backend(name: str, providers: str = "auto") -> Backend:
    if name == "ort":
        return OrtBackend(providers)
    if name == "trt":
        from runtime.backend_trt import TrtBackend  # tensorrt and CUDA are imported only when asked for

        return TrtBackend()
    raise UserError(f"unknown backend {name!r}; choose ort or trt")
