"""Backends run graphs; they know nothing about HealthGPT. The decode loop (core/generate.py) is the same for all.

A backend provides `load(bundle, task, name) -> Graph`, and the three things the in-place KV cache needs:
`buffer(shape, dtype)` (a persistent tensor, cache rows outermost), `head(buffer, n)` (its first n rows as a tensor
bound as a graph input in place, no copy) and `write(buffer, rows, at)` (put new rows at row offset `at`).
`Graph.run(feeds) -> {name: array}`: outputs are host arrays, or device tensors the same backend's `write` accepts,
valid until the same graph runs again (consume or copy them first).
"""

from __future__ import annotations

import os
import threading
from concurrent import futures
from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.contract.errors import UserError
from runtime.contract.graphspec import GraphSpec
from runtime.contract.healthgpt import graph_id
from runtime.contract.manifest import NOT_NUMPY
from runtime.core import prepared
from runtime.core.bundle import Bundle
from runtime.core.providers import PROVIDERS, QUIET, VERBOSE, why_not_loadable


class Graph(Protocol):
    spec: GraphSpec
    providers: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str
    concurrent: bool  # may several threads run its graphs at once (each request with its own KV cache)?

    def load(self, bundle: Bundle, task: str, name: str) -> Graph: ...

    def buffer(self, shape: tuple[int, ...], dtype: str): ...

    def head(self, buffer, n: int): ...

    def write(self, buffer, rows, at: int) -> None: ...


class OrtGraph:
    def __init__(self, session, spec: GraphSpec, weights: dict | None = None):
        self.session, self.spec = session, spec
        self.weights = weights  # the OrtValues handed in with add_initializer: ORT does not keep them alive
        self.providers = session.get_providers()  # what the session really got, not what was asked

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.spec.output_names
        if threading.current_thread() is not threading.main_thread():
            return dict(zip(names, self.session.run(names, feeds)))
        # Python handles Ctrl-C in the main thread only, between bytecodes: never during a run held in C++ (a
        # full-size prefill takes 17-40 s). So the main thread's runs go to a helper thread while it waits, and
        # Ctrl-C sets RunOptions.terminate, which ONNX Runtime checks between nodes.
        import onnxruntime as ort

        options = ort.RunOptions()
        future = _runner().submit(self.session.run, names, feeds, options)
        try:
            return dict(zip(names, future.result()))
        except KeyboardInterrupt:
            options.terminate = True
            futures.wait([future])  # ends at the next node; its "terminate flag" error is the interrupt's
            raise


_RUNNER: list[futures.ThreadPoolExecutor] = []


def _runner() -> futures.ThreadPoolExecutor:
    if not _RUNNER:
        _RUNNER.append(futures.ThreadPoolExecutor(1, thread_name_prefix="ort-run"))
    return _RUNNER[0]


def available_memory() -> int:
    """MemAvailable in bytes (Linux); elsewhere no limit is assumed."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


class OrtBackend:
    """ONNX Runtime. The weights file is memory-mapped once and every initializer is handed to every session with
    `add_initializer`: no session reads or parses weights itself, and tensors both tasks use (CLIP blocks, base
    decoder weights) are mapped once. But the CPU provider *prepacks* MatMul weights into a private copy per session
    (its kernels' layout; the Python API has no shared prepacked-weights container), so with prepack=True (default,
    fastest decode) each session holds its own copy of its weights, and a pipeline with both tasks open holds the
    base decoder twice. prepack=False: sessions compute from the shared mapping, one copy in all, at some decode
    speed (benchmarks/README.md has the figures).
    prepack=None (default): prepack unless three copies of the bundle's weights (the mapping and a copy per task)
    would not fit in the memory available when the bundle is first opened - the full-size fp32 model's 15 GB, say;
    a quantized bundle always prepacks: MatMulNBits runs from its prepacked layout (without it, decode is tens of
    times slower: benchmarks/README.md).
    The KV cache is a host numpy buffer: CPU sessions read it in place; CUDA sessions copy it in per step.
    Sessions run from several threads at once (ONNX Runtime's `run` is thread-safe), so `concurrent` is True.

    verbose: ONNX Runtime's own log from severity info up (default: quiet; a provider that fails to load is reported
    by us instead, from session.get_providers). accuracy_level: MatMulNBits' accuracy level for quantized bundles
    (default: the bundle's, from its manifest)."""

    concurrent = True

    def __init__(self, providers: str = "auto", threads: int | None = None, prepack: bool | None = None,
                 verbose: bool = False, accuracy_level: int | None = None, optimized_dir: Path | None = None,
                 session_cache: bool | None = None):
        import onnxruntime as ort

        if providers not in PROVIDERS:
            raise UserError(f"unknown providers {providers!r}; choose one of {', '.join(PROVIDERS)}")
        self.severity = VERBOSE if verbose else QUIET
        ort.set_default_logger_severity(self.severity)
        self.ort, self.requested = ort, providers
        self.name = f"ort-{providers}"
        self.threads = threads or len(os.sched_getaffinity(0))
        self.prepack, self.accuracy_level = prepack, accuracy_level
        self.optimized_dir = optimized_dir  # where each session writes the graph it really runs (which nodes fused)
        self.weights: dict[Path, dict[str, object]] = {}  # bundle -> tensor name -> OrtValue over its mmap
        self.prepacks: dict[Path, bool] = {}  # bundle -> whether its sessions prepack (prepack=None: by size)
        self.session_cache = session_cache  # None: prepared sessions for quantized bundles on the CPU (_prepared)
        self.cpu_only: dict[tuple[str, ...], bool] = {}  # providers asked for -> whether only the CPU's can load

    def shared_weights(self, bundle: Bundle) -> dict[str, object]:
        """Every tensor of the bundle's weights file as an OrtValue over one read-only memory map (made once).
        4-bit and float8 tensors are not among them: numpy has no such types to hand them over with (packed 4-bit;
        float8 only through ml_dtypes), so ONNX Runtime reads those from the weights file itself (the graphs point
        into it as external data)."""
        if bundle.root not in self.weights:
            table = bundle.manifest.weights
            mm = np.memmap(bundle.file(table.file), dtype=np.uint8, mode="r")
            self.weights[bundle.root] = {
                name: self.ort.OrtValue.ortvalue_from_numpy(
                    mm[t.offset: t.offset + t.nbytes].view(np.dtype(t.dtype)).reshape(t.shape))
                for name, t in table.tensors.items() if t.dtype not in NOT_NUMPY}
        return self.weights[bundle.root]

    def load(self, bundle: Bundle, task: str, name: str, model: bytes | None = None) -> OrtGraph:
        """model: a serialized variant of the graph to run instead (same initializers; calibration adds outputs)."""
        opts, entries = self.ort.SessionOptions(), self._entries(bundle, name)
        opts.intra_op_num_threads = self.threads
        opts.log_severity_level = min(self.severity, 3)  # 3: errors only, even when quiet
        available = self.ort.get_available_providers()
        asked = [p for p in PROVIDERS[self.requested] if p in available]
        ready = self._prepared(bundle, task, name, entries, asked) if model is None else None
        for key, value in entries.items():
            opts.add_session_config_entry(key, value)
        if ready is not None:  # optimized and prepacked already, its weights mapped from the cache
            opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = self.ort.InferenceSession(str(ready), opts, providers=["CPUExecutionProvider"])
            return self._checked(session, bundle.spec(task, name))
        opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.optimized_dir is not None:  # its initializers in a file beside it: a full-size graph passes 2 GB
            path = Path(self.optimized_dir) / f"{graph_id(task, name)}.onnx"
            opts.optimized_model_filepath = str(path)
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          f"{path.name}.data")
        if model is not None:  # its external initializers point into the bundle's weights file, relative to the bundle
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle.root))
        weights = self.shared_weights(bundle)
        for tensor in bundle.entry(task, name).initializers:
            if tensor in weights:
                opts.add_initializer(tensor, weights[tensor])
        session = self.ort.InferenceSession(model or str(bundle.path(task, name)), opts, providers=asked)
        return self._checked(session, bundle.spec(task, name), weights)

    def _prepacks(self, bundle: Bundle) -> bool:
        """Whether the bundle's sessions prepack (prepack=None: decided by size when the bundle is first loaded)."""
        if bundle.root not in self.prepacks:
            self.prepacks[bundle.root] = self.prepack if self.prepack is not None else (
                bundle.manifest.precision.quantization is not None  # MatMulNBits computes from its packed layout
                or 3 * sum(t.nbytes for t in bundle.manifest.weights.tensors.values()) < available_memory())
        return self.prepacks[bundle.root]

    def _entries(self, bundle: Bundle, name: str) -> dict[str, str]:
        """The session config entries of a graph: prepacking, MatMulNBits' accuracy level, the bundle's own."""
        entries = {} if self._prepacks(bundle) else {"session.disable_prepacking": "1"}
        quantization = bundle.manifest.precision.quantization
        level = self.accuracy_level if self.accuracy_level is not None else quantization and quantization.accuracy_level
        if level is not None:
            entries["session.qdq_matmulnbits_accuracy_level"] = str(level)
        return {**entries, **(quantization.session_config.get(name, {}) if quantization else {})}

    def _prepared(self, bundle: Bundle, task: str, name: str, entries: dict, asked: list[str]) -> Path | None:
        """This machine's prepared session of the graph (runtime/core/prepared.py), made now when missing; None when
        not used: a provider other than the CPU's, the optimized graph asked for elsewhere, or a float graph unless
        session_cache=True (by default only graphs with quantized MatMuls: fusing and prepacking them is what takes
        the time, while a float graph's prepacked copy would take as much disk again as its weights)."""
        quant = bundle.manifest.precision.quantization
        wanted = self.session_cache if self.session_cache is not None else (
            quant is not None and graph_id(task, name) in quant.quantized_matmuls)
        if not wanted or not self._cpu_only(tuple(asked)) or self.optimized_dir is not None:
            return None
        files, entry, table = bundle.manifest.files, bundle.entry(task, name), bundle.manifest.weights
        key = prepared.key({"graph": files[entry.file].sha256, "weights": files[table.file].sha256,
                            "entries": entries, "ort": self.ort.__version__, "machine": prepared.machine()})

        def write(folder: Path, data: str) -> None:
            opts = self.ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.log_severity_level = 3
            opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.optimized_model_filepath = str(folder / prepared.GRAPH)
            for k, value in {**entries, **prepared.SAVE_ENTRIES, prepared.DATA_ENTRY: data}.items():
                opts.add_session_config_entry(k, value)
            self.ort.InferenceSession(str(bundle.path(task, name)), opts, providers=["CPUExecutionProvider"])

        nbytes = sum(table.tensors[t].nbytes for t in entry.initializers if t in table.tensors)
        return prepared.lookup(key) or prepared.prepare(key, nbytes, write, graph_id(task, name))

    def _cpu_only(self, asked: tuple[str, ...]) -> bool:
        """Whether the sessions land on the CPU provider alone: the others asked for cannot load here (`auto` with
        onnxruntime-gpu on a machine without CUDA lists CUDA as available all the same)."""
        if asked not in self.cpu_only:
            self.cpu_only[asked] = all(p == "CPUExecutionProvider" or why_not_loadable(self.ort, p) for p in asked)
        return self.cpu_only[asked]

    def _checked(self, session, spec: GraphSpec, weights: dict | None = None) -> OrtGraph:
        session.disable_fallback()  # a provider failing at run time is an error, not a silent move to the CPU
        got = session.get_providers()
        if self.requested in ("cuda", "tensorrt") and got[0] != PROVIDERS[self.requested][0]:
            raise UserError(f"{PROVIDERS[self.requested][0]} was requested but could not be loaded (the session "
                            f"got {', '.join(got)}); check the CUDA/cuDNN installation or use --providers cpu")
        return OrtGraph(session, spec, weights)

    def buffer(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return np.zeros(shape, np.dtype(dtype))

    def head(self, buffer: np.ndarray, n: int) -> np.ndarray:
        return buffer[:n]  # rows outermost: a contiguous view, which ONNX Runtime reads in place

    def write(self, buffer: np.ndarray, rows: np.ndarray, at: int) -> None:
        buffer[at: at + rows.shape[0]] = rows


def open_backend(name: str, providers: str = "auto", prepack: bool | None = None, verbose: bool = False,
                 accuracy_level: int | None = None) -> Backend:
    """The backend a front-end names (--backend and its options). An option the backend cannot honour is an error:
    native TensorRT has no providers, prepacking, ONNX Runtime log level or MatMulNBits accuracy level."""
    if name == "ort":
        return OrtBackend(providers, prepack=prepack, verbose=verbose, accuracy_level=accuracy_level)
    if name == "trt":
        given = {"--providers": providers != "auto", "prepack": prepack is not None, "--verbose": verbose,
                 "--accuracy-level": accuracy_level is not None}
        if wrong := [option for option, set_ in given.items() if set_]:
            raise UserError(f"{', '.join(wrong)} apply to the ONNX Runtime backend only, not to --backend trt")
        from runtime.core.backend_trt import TrtBackend  # tensorrt and CUDA are imported only when asked for

        return TrtBackend()
    raise UserError(f"unknown backend {name!r}; choose ort or trt")
