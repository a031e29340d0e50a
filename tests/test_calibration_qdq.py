"""`build.py calibrate --scheme w8a8|fp8 --graphs decoder,vision` on the tiny synthetic bundle: Q/DQ graphs in
standard ONNX that pass onnx.checker, the lint and `verify`, with the base weights stored once; ONNX Runtime runs them
as the manifest says; the runtime asks and generates from them; `build.py engines` records the scheme (TensorRT
replaced by a stand-in; the real build where TensorRT and a GPU exist)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_bundle import H200, TRT_REASON

from calibration import report
from calibration.calibrate import calibrate
from engines import build as eb
from export.compile.lint import lint
from export.parity.verify import verify
from runtime.contract.errors import UserError
from runtime.contract.manifest import Manifest
from runtime.contract.records import ManifestError
from runtime.core.backend import OrtBackend
from runtime.core.bundle import Bundle
from runtime.core.pipeline import Pipeline

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SCHEMES = ("w8a8", "fp8")
TYPES = {"w8a8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}
ROLES = {"decoder": {"base"}, "vision": {"linear"}}  # what is quantized: H-LoRA and the LM head stay fp32


@pytest.fixture(scope="module")
def qdq_bundles(m3_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("qdq")
    calibrate(m3_bundle, root / "w8a8", "w8a8", graphs=("decoder", "vision"), samples=3)
    r = subprocess.run([sys.executable, "build.py", "calibrate", "--bundle", str(m3_bundle), "--out",
                        str(root / "fp8"), "--scheme", "fp8", "--graphs", "decoder,vision", "--samples", "3"],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    return {s: root / s for s in SCHEMES}


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_qdq_bundle_is_standard_onnx_with_the_base_weights_stored_once(scheme, qdq_bundles):
    bundle = Bundle.open(qdq_bundles[scheme])  # every file matches its sha256
    q = bundle.manifest.precision.quantization
    assert (q.scheme, q.algorithm, q.graphs, q.lm_head, q.accuracy_level) == (
        scheme, "minmax", ("decoder", "vision"), "float32", None)
    assert q.weights == q.activations == {"w8a8": "int8", "fp8": "float8e4m3fn"}[scheme]
    read = {}  # graph id -> the quantized weights its MatMuls read
    for graph_id, _entry in bundle.manifest.graphs.items():
        task, name = graph_id.split(".")
        path = bundle.path(task, name)
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert lint(model) == [] and all(n.domain == "" for n in model.graph.node)
        if name not in ROLES:
            assert not [n for n in model.graph.node if "Linear" in n.op_type], graph_id
            continue
        assert model.opset_import[0].version == 21
        inits, made = {i.name: i for i in model.graph.initializer}, _producers(model)
        matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in made
                   and made[n.input[1]].op_type == "DequantizeLinear"]
        assert len(matmuls) == q.quantized_matmuls[graph_id] > 0
        for n in matmuls:
            w_dq, x_dq = made[n.input[1]], made[n.input[0]]
            weight, w_scale = inits[w_dq.input[0]], inits[w_dq.input[1]]
            assert weight.data_type == TYPES[scheme] and list(w_scale.dims) == [weight.dims[1]]  # per channel
            assert x_dq.op_type == "DequantizeLinear" and made[x_dq.input[0]].op_type == "QuantizeLinear"
            assert list(inits[x_dq.input[1]].dims) == [] and inits[x_dq.input[2]].data_type == TYPES[scheme]
        read[graph_id] = {made[n.input[1]].input[0] for n in matmuls}
        # what stayed float: H-LoRA A, R and B x 8 and the LM head read fp32 weights and the fp32 activation
        floats = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        assert len(floats) == {"decoder": 25, "vision": 0}[name]
        assert all(made[n.input[0]].op_type != "DequantizeLinear" for n in floats)
    assert read["com.decoder"] == read["gen.decoder"] and len(read["com.decoder"]) == 8  # one tensor for both
    assert read["gen.vision"] & read["com.vision"]  # the CLIP block GEN uses is COM's block, stored once
    stored = {n for n, t in bundle.manifest.weights.tensors.items() if t.dtype in ("int8", "float8_e4m3fn")}
    assert stored == set().union(*read.values())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_onnx_runtime_runs_them_as_the_manifest_says(scheme, qdq_bundles, tmp_path):
    bundle = Bundle.open(qdq_bundles[scheme])
    backend = OrtBackend("cpu", optimized_dir=tmp_path)
    backend.load(bundle, "com", "decoder")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "com.decoder.onnx"), load_external_data=False).graph.node)
    config = bundle.manifest.precision.quantization.session_config
    if scheme == "w8a8":  # int8 kernels: ONNX Runtime fused every Q/DQ MatMul; u8u8 where u8s8 would overflow
        assert ops["MatMulIntegerToFloat"] == 8 and config["decoder"] == {"session.x64quantprecision": "1"}
    else:  # fp8 as written (Q/DQ in fp32): with the CPU provider's QDQ fusions on, the session does not build
        assert ops["MatMulIntegerToFloat"] == 0 and ops["QuantizeLinear"] == 8
        assert config["decoder"] == {"session.disable_quant_qdq": "1"}
        import onnxruntime as ort

        with pytest.raises(Exception, match="float8e4m3fn"):
            ort.InferenceSession(str(bundle.path("com", "decoder")), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_accuracy_report_and_verify_pass_with_the_schemes_tolerances(scheme, qdq_bundles, m3_checkpoint, ct_small,
                                                                      tmp_path):
    root = qdq_bundles[scheme]
    result = json.loads((root / "quant.json").read_text())
    assert result["passed"] and result["tolerances"] == report.TOLERANCES[scheme].to_json()
    for t in result["tasks"].values():
        assert t["positions"] >= 256 and t["vision_cosine"] < 1.0 and t["mean_kl"] > 0  # quantized: not fp32 copies
    copy = tmp_path / scheme
    shutil.copytree(root, copy)  # verify writes parity.json into the bundle
    # COM only: GEN's verify adds the reference's 1024-token generation; GEN is in the accuracy report above
    parity = verify(copy, m3_checkpoint, ["ort-cpu"], ct_small, steps=8, tasks=["com"]).to_json()
    assert parity["passed"] and scheme in parity["precision"], parity["backends"]["ort-cpu"]
    checks = parity["backends"]["ort-cpu"]["checks"]
    vision = [c for c in checks if c["graph"].endswith(".vision")]
    assert vision and all(c["max_abs_limit"] == report.TOLERANCES[scheme].vs_reference.max_abs for c in vision)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_runtime_asks_and_generates_from_the_qdq_bundle(scheme, qdq_bundles, ct_small):
    pipe = Pipeline(Bundle.open(qdq_bundles[scheme]), OrtBackend("cpu"))
    assert len(pipe.ask(ct_small, "What does this scan show?", max_new_tokens=8)) > 0
    if scheme == "fp8":  # once: the accuracy report already made both bundles' GEN images through Pipeline
        image = pipe.generate_image(ct_small, "Reconstruct the image.", constrain_image_tokens=True)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8


def test_the_manifest_checks_the_session_config_and_reads_bundles_without_one(qdq_bundles):
    data = json.loads((qdq_bundles["fp8"] / "manifest.json").read_text())
    q = data["precision"]["quantization"]
    q["session_config"]["decoder"]["intra_op_num_threads"] = "2"  # a session option, not a config entry
    with pytest.raises(ManifestError, match="intra_op_num_threads are not ONNX Runtime session config entries"):
        Manifest.from_json(data)
    q["session_configs"] = q.pop("session_config")
    with pytest.raises(ManifestError, match="unknown key.*session_configs"):
        Manifest.from_json(data)
    del q["session_configs"]  # as int4/int8 bundles written before the field existed
    assert Manifest.from_json(data).precision.quantization.session_config == {}


def test_engines_record_the_scheme_of_quantized_graphs(qdq_bundles, tmp_path, monkeypatch):
    bundle = tmp_path / "w8a8"
    shutil.copytree(qdq_bundles["w8a8"], bundle)
    built = []
    monkeypatch.setattr(eb, "current_device", lambda: H200)
    monkeypatch.setattr(eb, "build_plan", lambda path, profiles, cache: (built.append(path.name) or memoryview(
        b"plan"), b"cache"))
    engines = eb.build_engines(bundle)
    assert {g: e.precision for g, e in engines.items()} == {
        "com.vision": "fp32+w8a8", "com.embed": "fp32", "com.decoder": "fp32+w8a8", "gen.vision": "fp32+w8a8",
        "gen.embed": "fp32", "gen.decoder": "fp32+w8a8", "shared.vqgan": "fp32"}
    assert "com.decoder.onnx" in built and Bundle.open(bundle).manifest.engines == engines
    m = Bundle.open(bundle).manifest
    other = dataclasses.replace(m, precision=dataclasses.replace(m.precision, quantization=dataclasses.replace(
        m.precision.quantization, algorithm="entropy")))
    assert eb.engine_key(m, "com.decoder", "fp32", H200) != eb.engine_key(other, "com.decoder", "fp32", H200)


@pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")
def test_trt_engines_from_qdq_graphs_answer_as_onnx_runtime(qdq_bundles, ct_small, tmp_path):
    from runtime.core.backend_trt import TrtBackend

    for scheme in SCHEMES:
        bundle = tmp_path / scheme
        shutil.copytree(qdq_bundles[scheme], bundle)
        eb.build_engines(bundle)
        trt = Pipeline(Bundle.open(bundle), TrtBackend())
        ort = Pipeline(Bundle.open(bundle), OrtBackend("cpu"))
        pixels = {"pixel_values": np.asarray(ort.task("com").vision.spec.sample_inputs(np.random.default_rng(0))[
            "pixel_values"])}
        a, b = (np.asarray(p.task("com").vision.run(pixels)["image_embeds"]) for p in (ort, trt))
        assert float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())) > 0.999, scheme
        assert len(trt.ask(ct_small, "What does this scan show?", max_new_tokens=4)) > 0


def _qdq_model(zero_point: np.ndarray, opset: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(zero_point, "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_lint_takes_symmetric_qdq_only_and_float8_from_opset_19():
    import ml_dtypes

    assert lint(_qdq_model(np.int8(0), 21)) == []
    assert lint(_qdq_model(np.zeros((), ml_dtypes.float8_e4m3fn), 19)) == []
    assert any("zero point is not 0" in p for p in lint(_qdq_model(np.int8(3), 21)))
    assert any("FLOAT8E4M3FN Q/DQ needs opset >= 19" in p for p in lint(_qdq_model(
        np.zeros((), ml_dtypes.float8_e4m3fn), 17)))


def test_qdq_algorithms_are_the_calibrators(m3_bundle, tmp_path):
    with pytest.raises(UserError, match="--algorithm awq does not apply to fp8; choose minmax, percentile, entropy"):
        calibrate(m3_bundle, tmp_path / "q", "fp8", algorithm="awq")
    assert not (tmp_path / "q").exists()
