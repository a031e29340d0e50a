"""runtime/core/backend_trt.py: engine lookup and refusals, profile selection, the whole TrtBackend on the host with
TensorRT and CUDA emulated, and, where TensorRT and a GPU exist, a real engine built from the tiny decoder graph and
run through the KV-cache loop against ONNX Runtime."""

import ctypes
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_bundle import H200, TINY, TRT_REASON, run_steps, steps

from engines import build as eb
from export.compile import specs
from runtime.contract.errors import UserError
from runtime.contract.manifest import FileEntry
from runtime.core.backend import OrtBackend
from runtime.core.backend_trt import find_engine, pick_profile
from runtime.core.bundle import Bundle
from runtime.core.trt_compat import DeviceInfo


def test_pick_profile_decode_for_one_token_prefill_otherwise():
    spec = specs.decoder(**TINY, dtype="float32")
    built = eb.profiles_for(spec)
    stored = eb.engine_entry("com.decoder", "engines/com.decoder.plan", "0" * 64, 1, H200, "fp32", built, "k",
                             1.0).profiles  # as the runtime reads them from the manifest
    for profiles in (built, stored):
        def shapes(seq):
            return {n: spec.shape(n, seq=seq) for n in spec.input_names}

        assert pick_profile(profiles, shapes(1)) == 1
        assert pick_profile(profiles, shapes(5)) == 0
        assert pick_profile(profiles, shapes(TINY["max_context"])) == 0
        assert pick_profile(profiles, shapes(TINY["max_context"] + 1)) is None


def with_engine(bundle: Bundle, entry) -> Bundle:
    """The bundle as if `build.py engines` had recorded `entry` (the plan file itself is not there)."""
    files = {**bundle.manifest.files, entry.file: FileEntry(entry.sha256, entry.bytes)}
    manifest = dataclasses.replace(bundle.manifest, engines={entry.graph: entry}, files=files)
    return Bundle(bundle.root, manifest, bundle.digest)


def test_runtime_refuses_missing_or_foreign_engine(bundle_dir):
    bundle = Bundle.open(bundle_dir)
    with pytest.raises(UserError, match=r"no TensorRT engine for com.decoder: run `python build.py engines --bundle"):
        find_engine(bundle, "com.decoder", H200)
    entry = eb.engine_entry("com.decoder", "engines/com.decoder.plan", "0" * 64, 1,
                            DeviceInfo("NVIDIA A100", "8.0", "10.8.0.43"), "fp32", [], "k", 1.0)
    bundle = with_engine(bundle, entry)
    with pytest.raises(UserError, match="built for compute capability 8.0 .* rebuild with `python build.py engines"):
        find_engine(bundle, "com.decoder", H200)
    # same architecture, other model: a note only
    bundle = with_engine(bundle, dataclasses.replace(entry, gpu_name="NVIDIA H100", compute_capability="9.0"))
    with pytest.warns(UserWarning, match="built on a NVIDIA H100 and runs on a NVIDIA H200"):
        with pytest.raises(UserError, match="engine .*com.decoder.plan is missing: run `python build.py engines"):
            find_engine(bundle, "com.decoder", H200)


##### the fixture graph on ONNX Runtime (the reference the GPU test compares against) #####

def test_fixture_graph_on_onnxruntime(bundle_dir):
    xs = steps(np.random.default_rng(0))
    out, _, cache = run_steps(OrtBackend("cpu"), Bundle.open(bundle_dir), xs)
    assert cache.length == 7
    written = np.concatenate(xs, axis=1).reshape(7, 2, 3)  # [7, kv_heads, head_dim]
    np.testing.assert_allclose(out[-1][1][:7], written, rtol=1e-6)
    assert not out[-1][1][7:].any()
    past, total = 0, 0.0
    for x, (logits, _, _) in zip(xs, out):
        np.testing.assert_allclose(logits, x.sum(axis=1) + past * 3 * total, rtol=1e-5, atol=1e-5)
        past, total = past + x.shape[1], total + x.sum()


##### TrtBackend's own logic, with TensorRT and CUDA emulated on the host #####
# Device memory is host memory here (cudaMalloc -> a ctypes buffer, copies -> memmove) and an "engine" runs the ONNX
# graph with ONNX Runtime on the bound addresses. What this checks: profile selection, shapes and addresses bound,
# KV buffers bound in place (never copied), staging of host feeds, outputs to host, the strided cache write, the
# shared scratch. What it cannot check: TensorRT itself (the GPU test below does).

class HostCudart:
    """The libcudart calls Polygraphy's wrapper and runtime/core/backend_trt.py make, on host memory."""

    def __init__(self):
        self.blocks = {}

    def cudaMalloc(self, ref, nbytes):
        block = ctypes.create_string_buffer(nbytes.value)
        self.blocks[ctypes.addressof(block)] = block
        ref._obj.value = ctypes.addressof(block)
        return 0

    def cudaFree(self, ptr):
        self.blocks.pop(ptr.value, None)
        return 0

    def cudaMemcpy(self, dst, src, nbytes, kind, stream=None):
        ctypes.memmove(dst.value, src.value, nbytes.value)
        return 0

    cudaMemcpyAsync = cudaMemcpy

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        for i in range(height.value):
            ctypes.memmove(dst.value + i * dpitch.value, src.value + i * spitch.value, width.value)
        return 0

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        ctypes.memset(ptr.value, value.value, nbytes.value)
        return 0

    def cudaStreamCreate(self, ref):
        ref._obj.value = 1
        return 0

    def cudaStreamSynchronize(self, stream):
        return 0


def host_array(ptr, shape, dtype):
    dtype = np.dtype(dtype)
    raw = (ctypes.c_char * (int(np.prod(shape)) * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype).reshape(shape)


class OrtEngine:
    """An ICudaEngine stand-in: the graph's ONNX run by ONNX Runtime on the addresses its context was given."""

    def __init__(self, onnx_path, spec):
        import onnxruntime as ort

        self.session, self.spec = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]), spec
        self.names = spec.input_names + spec.output_names
        self.num_io_tensors, self.device_memory_size_v2 = len(self.names), 4096

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return specs_dtype(self.spec, name)

    def is_shape_inference_io(self, name):
        return False

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"
        return OrtContext(self)


def specs_dtype(spec, name):
    return np.dtype(spec.tensor(name).dtype)


class OrtContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.profile, self.memory, self.runs = engine, {}, {}, 0, None, []

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def _dims(self):  # symbolic dim -> value, from the input shapes set (not a TensorRT name: private)
        return {d: self.shapes[t.name][i] for t in self.engine.spec.inputs for i, d in enumerate(t.shape)
                if isinstance(d, str)}

    def get_tensor_shape(self, name):
        return self.engine.spec.shape(name, **self._dims())

    def execute_async_v3(self, stream):
        spec = self.engine.spec
        assert self.memory and self.memory[1] >= self.engine.device_memory_size_v2
        if spec.profiles:  # the decoder: the decode profile for one token, prefill otherwise
            assert self.profile == (1 if self._dims()["seq"] == 1 else 0)
        feeds = {n: host_array(self.addresses[n], self.shapes[n], specs_dtype(spec, n)) for n in spec.input_names}
        self.runs.append(dict(self.addresses))
        for name, value in zip(spec.output_names, self.engine.session.run(spec.output_names, feeds)):
            host_array(self.addresses[name], value.shape, value.dtype)[...] = value
        return True


@pytest.fixture
def emulated_trt(monkeypatch):
    """`tensorrt` and libcudart replaced by host stand-ins; the fake build writes the ONNX path as the 'plan'."""
    import types

    import polygraphy.backend.trt as ptrt
    from polygraphy.cuda import cuda as pcuda

    import runtime.core.backend_trt as bt

    trt = types.ModuleType("tensorrt")
    trt.__version__ = H200.tensorrt_version
    trt.nptype = lambda t: t
    trt.Runtime = lambda logger: "runtime"
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    wrapper = pcuda.Cuda.__new__(pcuda.Cuda)
    wrapper.handle = HostCudart()
    monkeypatch.setattr(pcuda, "G_CUDA", wrapper)
    monkeypatch.setattr(ptrt, "get_trt_logger", lambda: "logger", raising=False)
    monkeypatch.setattr(bt, "current_device", lambda: H200)
    monkeypatch.setattr(eb, "current_device", lambda: H200)
    monkeypatch.setattr(eb, "build_plan", lambda onnx_path, profiles, cache: (memoryview(str(onnx_path).encode()),
                                                                               b"cache"))

    def engine_from_bytes(plan, runtime):
        path = Path(plan.decode())
        manifest = Bundle.open(path.parent, verify=False).manifest
        graph = next(g for g in manifest.graphs.values() if g.file == path.name)
        return OrtEngine(str(path), graph.spec)

    monkeypatch.setattr(ptrt, "engine_from_bytes", engine_from_bytes, raising=False)
    return bt


def test_trt_backend_logic_emulated(bundle_dir, emulated_trt):
    eb.build_engines(bundle_dir)
    bundle = Bundle.open(bundle_dir)
    xs = steps(np.random.default_rng(2))
    ref, _, _ = run_steps(OrtBackend("cpu"), bundle, xs)
    backend = emulated_trt.TrtBackend()
    got, decoder, cache = run_steps(backend, bundle, xs)
    assert decoder.providers == [f"TensorRT {H200.tensorrt_version} on {H200.name}"]
    for (r_logits, r_cache, _), (g_logits, g_cache, _) in zip(ref, got):
        np.testing.assert_allclose(g_logits, r_logits, rtol=1e-6)
        np.testing.assert_array_equal(g_cache, r_cache)
    assert [g[1].shape[0] for g in got] == [4, 4, 8, 8]  # grown to powers of two: 3, 4, 5 and 7 rows used
    for run, (_, _, fed) in zip(decoder.context.runs, got):  # the cache is bound where it lives: no copy, every step
        for name, buf in fed.items():
            assert isinstance(buf, emulated_trt.DeviceTensor) and run[name] == buf.ptr
    assert decoder.context.memory == (backend.scratch.ptr, backend.scratch.allocated_nbytes)
    out = decoder.run({"inputs_embeds": xs[1], **cache.feeds()})
    assert isinstance(out["logits"], np.ndarray) and isinstance(out["present.0.value"], emulated_trt.DeviceTensor)
    rows = xs[1].reshape(1, 2, 3)  # [1, kv_heads, head_dim]
    np.testing.assert_array_equal(np.asarray(out["present.0.value"]), 2 * rows)
    backend.write(cache.buffers["past_key_values.0.value"], np.full((2, 2, 3), 7, np.float32), 6)  # host rows
    assert (np.asarray(cache.buffers["past_key_values.0.value"])[6:] == 7).all()
    with pytest.raises(ValueError, match="cannot write rows"):
        backend.write(cache.buffers["past_key_values.0.value"], np.zeros((3, 2, 3), np.float32), 6)
    with pytest.raises(TypeError, match="inputs_embeds is float16"):
        decoder.run({"inputs_embeds": xs[1].astype(np.float16), **cache.feeds()})
    with pytest.raises(UserError, match="fit none of the engine's optimization profiles"):
        decoder.run({"inputs_embeds": np.zeros((1, 65, 6), np.float32), **cache.feeds()})


def test_trt_backend_pipeline_emulated_on_an_exported_bundle(m3_bundle, ct_small, emulated_trt, tmp_path):
    """Every graph of a real exported bundle (vision, embed, decoder, vqgan) through TrtBackend's code: the same
    answer and the same generated image as ONNX Runtime."""
    import shutil

    from runtime.core.pipeline import Pipeline

    bundle = tmp_path / "m3"
    shutil.copytree(m3_bundle, bundle)
    eb.build_engines(bundle)
    ort = Pipeline(Bundle.open(bundle), OrtBackend("cpu"))
    trt = Pipeline(Bundle.open(bundle), emulated_trt.TrtBackend())
    question = "What does the image show?"
    assert trt.ask(ct_small, question, max_new_tokens=8) == ort.ask(ct_small, question, max_new_tokens=8)
    tokens = ort.image_tokens(ct_small, "Reconstruct the image.", constrain_image_tokens=True)
    np.testing.assert_array_equal(trt.decode_image(tokens), ort.decode_image(tokens))
    assert trt.providers()["com.decoder"] == [f"TensorRT {H200.tensorrt_version} on {H200.name}"]


##### TensorRT + GPU #####

@pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")
def test_trt_engine_matches_onnxruntime(bundle_dir):
    from runtime.core.backend_trt import DeviceTensor, TrtBackend

    engines = eb.build_engines(bundle_dir)
    assert engines["com.decoder"]["profiles"][1]["inputs_embeds"] == [[1, 1, 6]] * 3
    bundle = Bundle.open(bundle_dir)  # verifies the plan's sha256 too
    xs = steps(np.random.default_rng(1))
    ref, _, _ = run_steps(OrtBackend("cpu"), bundle, xs)
    backend = TrtBackend()
    got, decoder, cache = run_steps(backend, bundle, xs)
    assert decoder.providers[0].startswith("TensorRT ") and decoder.profile == 0  # last step had seq 2: prefill
    assert all(isinstance(b, DeviceTensor) for b in cache.buffers.values())
    for (r_logits, r_cache, _), (g_logits, g_cache, _) in zip(ref, got):
        np.testing.assert_allclose(g_logits, r_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(g_cache, r_cache)  # in-place writes, exactly the ONNX Runtime rows
    o = decoder.run({"inputs_embeds": xs[1], **cache.feeds()})  # one token: the decode profile
    assert decoder.profile == 1 and isinstance(o["present.0.key"], DeviceTensor)
    backend.write(cache.buffers["past_key_values.0.key"], np.ones((1, 2, 3), np.float32), 7)  # host rows too
    assert (np.asarray(cache.buffers["past_key_values.0.key"])[7] == 1).all()
    assert eb.build_engines(bundle_dir)["com.decoder"]["built_at"] == engines["com.decoder"]["built_at"]  # cached
    assert (bundle_dir / "engines" / "timing.cache").stat().st_size > 0


@pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")
def test_trt_pipeline_matches_onnxruntime_on_an_exported_bundle(m3_bundle, ct_small, tmp_path):
    """Every graph of a real exported bundle (tiny, fp32) as an engine; greedy COM tokens equal ONNX Runtime's."""
    import shutil

    from runtime.core.backend_trt import TrtBackend
    from runtime.core.pipeline import Pipeline

    bundle = tmp_path / "m3"
    shutil.copytree(m3_bundle, bundle)  # the session's bundle stays engine-free for the other tests
    engines = eb.build_engines(bundle)
    assert set(engines) == set(Bundle.open(bundle).manifest.graphs)
    question = "What does the image show?"
    want = Pipeline(Bundle.open(bundle), OrtBackend("cpu")).ask(ct_small, question, max_new_tokens=16)
    assert Pipeline(Bundle.open(bundle), TrtBackend()).ask(ct_small, question, max_new_tokens=16) == want
