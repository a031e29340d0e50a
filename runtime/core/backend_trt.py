"""Native TensorRT backend: the bundle's engines (BUNDLE/engines/<graph_id>.plan, from `build.py engines`) run on
one CUDA stream, with the KV cache bound in place. Same protocol as OrtBackend (runtime/core/backend.py); no torch.

- `tensorrt` and the CUDA runtime (Polygraphy's ctypes wrapper over libcudart) are imported when a TrtBackend is made.
- Each engine's manifest entry is checked against this GPU and TensorRT version before it is deserialized.
- `Graph.run(feeds)` takes numpy arrays or this backend's DeviceTensors. It returns fresh numpy arrays, except the new
  KV rows (`present.*`), which stay on the GPU as DeviceTensor *views* of the graph's output buffers for `write`:
  consume them before the same graph runs again (`np.asarray(t)` copies one to the host).
- One stream, stages one after another: so every execution context shares one activation scratch buffer, sized to
  the largest engine's `device_memory_size_v2`. KV buffers and weights live outside it.
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from runtime.contract.errors import UserError
from runtime.contract.graphspec import GraphSpec
from runtime.contract.healthgpt import graph_id as graph_id_of
from runtime.contract.manifest import EngineEntry
from runtime.core.bundle import Bundle
from runtime.core.trt_compat import DeviceInfo, check_compat, current_device

H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyKind


def _cudart():
    from polygraphy import cuda

    return cuda.wrapper()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"CUDA error {status} in {what}")


class DeviceTensor:
    """A typed region of GPU memory: a KV-cache buffer, or a view of a graph's output. `owner` keeps it allocated."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype, owner=None):
        self.ptr, self.shape, self.dtype, self.owner = ptr, tuple(shape), np.dtype(dtype), owner

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        host = np.empty(self.shape, self.dtype)
        _cudart().memcpy(host.ctypes.data, self.ptr, self.nbytes, ctypes.c_int(D2H))  # synchronous
        return host if dtype is None else host.astype(dtype)


def pick_profile(profiles: list[dict], shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Index of the most specific profile (smallest max - min spread) admitting every input shape, or None.
    Decoder: seq == 1 -> the decode profile (1..1..1), seq > 1 -> the prefill profile."""
    fits = []
    for i, profile in enumerate(profiles):
        ranges = {name: (lo, hi) for name, (lo, _, hi) in profile.items()}
        if all(len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi))
               for n, (lo, hi) in ranges.items()):
            fits.append((sum(b - a for lo, hi in ranges.values() for a, b in zip(lo, hi)), i))
    return min(fits)[1] if fits else None


def find_engine(bundle: Bundle, graph_id: str, device: DeviceInfo) -> tuple[EngineEntry, Path]:
    """The graph's engine entry and plan path, refused (UserError saying what to run) when it is missing or was
    built for another GPU architecture or TensorRT version."""
    rebuild = f"run `python build.py engines --bundle {bundle.root}` on this machine (or use the ort backend)"
    entry = bundle.manifest.engines.get(graph_id)
    if entry is None:
        raise UserError(f"bundle {bundle.root} has no TensorRT engine for {graph_id}: {rebuild}")
    for note in check_compat(entry, device, bundle.root):
        warnings.warn(note, stacklevel=3)
    path = bundle.file(entry.file)
    if not path.is_file():
        raise UserError(f"TensorRT engine {path} is missing: {rebuild}")
    return entry, path


class TrtGraph:
    def __init__(self, backend: TrtBackend, graph_id: str, engine, spec: GraphSpec, profiles: list[dict]):
        trt = backend.trt
        self.backend, self.graph_id, self.engine, self.spec, self.profiles = backend, graph_id, engine, spec, profiles
        self.providers = [backend.label]
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.profile = 0  # a new context starts on profile 0
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
                       for n in spec.input_names + spec.output_names}
        self.staging: dict[str, Any] = {}  # name -> DeviceArray: host feeds copied in, outputs written by TensorRT
        self.on_device = {present for _, present in spec.kv_pairs}  # new KV rows stay on the GPU for `write`

    def _staging(self, name: str, nbytes: int):
        from polygraphy import cuda

        if name not in self.staging:
            self.staging[name] = cuda.DeviceArray.raw((0,))
        return self.staging[name].resize((max(nbytes, 1),))  # grows only; never shrinks

    def run(self, feeds: dict) -> dict:
        shapes = {n: tuple(feeds[n].shape) for n in self.spec.input_names}
        profile = pick_profile(self.profiles, shapes)
        if profile is None:
            raise UserError(f"{self.graph_id}: input shapes {shapes} fit none of the engine's optimization profiles "
                            f"{self.profiles}; the bundle limits them (see its manifest)")
        stream, cudart = self.backend.stream, _cudart()
        if profile != self.profile:  # prefill <-> decode: once per phase change, not per token
            if not self.context.set_optimization_profile_async(profile, stream.ptr):
                raise RuntimeError(f"{self.graph_id}: could not select optimization profile {profile}")
            self.profile = profile
        for name in self.spec.input_names:
            x = feeds[name]
            if x.dtype != self.dtypes[name]:
                raise TypeError(f"{self.graph_id}: {name} is {x.dtype}, the engine takes {self.dtypes[name]}")
            if isinstance(x, DeviceTensor):  # persistent KV buffer: bound in place, never copied
                ptr = x.ptr
            else:
                x = np.ascontiguousarray(x)
                ptr = self._staging(name, x.nbytes).ptr
                cudart.memcpy(ptr, x.ctypes.data, x.nbytes, ctypes.c_int(H2D), stream.ptr)
            if not self.context.set_input_shape(name, shapes[name]) or not self.context.set_tensor_address(name, ptr):
                raise RuntimeError(f"{self.graph_id}: TensorRT refused {name} with shape {shapes[name]}")
        tensors: dict[str, DeviceTensor] = {}
        for name in self.spec.output_names:  # output shapes follow from the input shapes just set
            shape, dtype = tuple(self.context.get_tensor_shape(name)), self.dtypes[name]
            buf = self._staging(name, int(np.prod(shape)) * dtype.itemsize)
            self.context.set_tensor_address(name, buf.ptr)
            tensors[name] = DeviceTensor(buf.ptr, shape, dtype, owner=buf)
        if not self.context.execute_async_v3(stream.ptr):
            raise RuntimeError(f"{self.graph_id}: execute_async_v3 failed (see the TensorRT log above)")
        out: dict[str, DeviceTensor | np.ndarray] = dict(tensors)
        for name, t in tensors.items():
            if name not in self.on_device:
                host = np.empty(t.shape, t.dtype)
                cudart.memcpy(host.ctypes.data, t.ptr, t.nbytes, ctypes.c_int(D2H), stream.ptr)
                out[name] = host
        stream.synchronize()
        return out


class TrtBackend:
    """Engines built on this machine by `build.py engines`. All graphs run on one stream, one after another."""

    name = "trt"
    concurrent = False  # one stream, per-graph staging buffers and one shared scratch: one request at a time

    def __init__(self):
        self.device = current_device()  # first: a UserError with the install hint when TensorRT or the GPU is missing
        import tensorrt as trt
        from polygraphy import cuda
        from polygraphy.backend.trt import get_trt_logger

        self.label = f"TensorRT {self.device.tensorrt_version} on {self.device.name}"
        self.trt, self.runtime = trt, trt.Runtime(get_trt_logger())
        self.stream = cuda.Stream()
        self.scratch = cuda.DeviceArray.raw((0,))  # activation memory shared by every context (sequential use)
        self.graphs: list[TrtGraph] = []

    def load(self, bundle: Bundle, task: str, name: str) -> TrtGraph:
        from polygraphy.backend.trt import engine_from_bytes

        graph_id, spec = graph_id_of(task, name), bundle.spec(task, name)
        entry, path = find_engine(bundle, graph_id, self.device)
        engine = engine_from_bytes(path.read_bytes(), runtime=self.runtime)
        io = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if missing := [n for n in spec.input_names + spec.output_names if n not in io]:
            raise UserError(f"engine {path} does not match its graph (no tensor {', '.join(missing)}): rebuild with "
                            f"`python build.py engines --bundle {bundle.root} --force`")
        if host := [n for n in spec.input_names if engine.is_shape_inference_io(n)]:
            raise RuntimeError(f"{graph_id}: {', '.join(host)} feed shape computations (host-side shape tensors), "
                               "which this backend does not bind; export them as data inputs")
        graph = TrtGraph(self, graph_id, engine, spec, list(entry.profiles))
        self.graphs.append(graph)
        self._share_scratch(engine.device_memory_size_v2)
        return graph

    def _share_scratch(self, need: int) -> None:
        if need > self.scratch.allocated_nbytes:
            self.stream.synchronize()  # nothing may still run on the old buffer
            self.scratch.resize((need,))
        for g in self.graphs:  # (re)bind every context: the buffer may have moved
            g.context.set_device_memory(self.scratch.ptr, self.scratch.allocated_nbytes)

    def buffer(self, shape: tuple[int, ...], dtype: str) -> DeviceTensor:
        from polygraphy import cuda

        item = np.dtype(dtype)
        owner = cuda.DeviceArray.raw((int(np.prod(shape)) * item.itemsize,))
        t = DeviceTensor(owner.ptr, shape, item, owner)
        # Zeroed: rows past the cache length are masked, but a masked 0 * NaN from stale garbage would still be NaN.
        _check(_cudart().handle.cudaMemsetAsync(ctypes.c_void_p(t.ptr), ctypes.c_int(0), ctypes.c_size_t(t.nbytes),
                                                ctypes.c_void_p(self.stream.ptr)), "cudaMemsetAsync")
        return t

    def head(self, buffer: DeviceTensor, n: int) -> DeviceTensor:
        return DeviceTensor(buffer.ptr, (n, *buffer.shape[1:]), buffer.dtype, buffer.owner)  # rows outermost: a view

    def write(self, buffer: DeviceTensor, rows, at: int) -> None:
        # buffer: [rows, kv_heads, head_dim] on the GPU; rows: [S, kv_heads, head_dim], device or host
        cap, per_row = buffer.shape[0], buffer.shape[1:]
        s = rows.shape[0]
        if tuple(rows.shape) != (s, *per_row) or not 0 <= at <= cap - s:
            raise ValueError(f"cannot write rows {tuple(rows.shape)} at {at} into a cache of shape {buffer.shape}")
        if s == 0:
            return
        if isinstance(rows, DeviceTensor):
            if rows.dtype != buffer.dtype:
                raise TypeError(f"rows are {rows.dtype}, the cache is {buffer.dtype}")
            src, kind = rows.ptr, D2D
        else:
            rows = np.ascontiguousarray(rows, dtype=buffer.dtype)
            src, kind = rows.ctypes.data, H2D
        # Rows outermost: the S new rows are one contiguous block at row `at`. Same stream as the graphs: ordered
        # after the step.
        row, c = int(np.prod(per_row)) * buffer.dtype.itemsize, ctypes  # bytes per cache row
        _check(_cudart().handle.cudaMemcpyAsync(c.c_void_p(buffer.ptr + at * row), c.c_void_p(src), c.c_size_t(s * row),
                                                c.c_int(kind), c.c_void_p(self.stream.ptr)), "cudaMemcpyAsync")
