"""`build.py calibrate` on the tiny synthetic bundle: int4 (AWQ clip search) and int8 weight-only bundles that pass
onnx.checker, the lint and `verify`, whose every DQ+MatMul ONNX Runtime fuses, and that the runtime runs; bad
calibration sets and an interrupted calibration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest

from calibration import calibrate as calibrate_mod
from calibration import data, quantize
from calibration.calibrate import calibrate
from export.compile.lint import lint
from runtime.contract.errors import UserError
from runtime.core.backend import OrtBackend
from runtime.core.bundle import Bundle
from runtime.core.pipeline import Pipeline

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def int4_bundle(m3_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    # the tiny widths (64, 128) are below the release's blocks of 128; the LM head quantized (the int4 default)
    calibrate(m3_bundle, out, "int4", block_size=32)
    return out


@pytest.fixture(scope="module")
def int8_bundle(m3_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    r = subprocess.run([sys.executable, "build.py", "calibrate", "--bundle", str(m3_bundle), "--out", str(out),
                        "--scheme", "int8", "--lm-head", "float32", "--adapters", "float32"], capture_output=True,
                       text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "accuracy report" in r.stdout
    return out


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_bundle_is_standard_onnx_with_shared_base_weights(scheme, int4_bundle, int8_bundle):
    root = {"int4": int4_bundle, "int8": int8_bundle}[scheme]
    bundle = Bundle.open(root)  # every file matches its sha256 in the manifest
    q = bundle.manifest.precision.quantization.to_json()
    assert q["scheme"] == scheme and q["algorithm"] == ("awq" if scheme == "int4" else "rtn")
    lm_head = scheme == "int4"  # int8 was calibrated with --lm-head float32 --adapters float32
    adapters = q["adapters"] == "quantized"  # int4: the default
    assert q["block_size"] == (32 if scheme == "int4" else None)
    assert q["lm_head"] == ("quantized" if lm_head else "float32") and adapters == (scheme == "int4")
    matmuls = 8 + lm_head + 16 * adapters  # qkv, o, gate_up, down x 2 layers (+ the LM head, + H-LoRA A and B)
    assert q["quantized_matmuls"] == {"com.decoder": matmuls, "gen.decoder": matmuls}
    assert {c["file"] for c in q["calibration_set"]} >= {"MR_small.dcm", "examples_rgb_color.dcm"}
    assert all(len(c["sha256"]) == 64 for c in q["calibration_set"])
    assert not {c["file"] for c in q["calibration_set"]} & set(data.HELD_OUT)
    assert {"quant.json", "quant.md", "weights.bin"} <= set(bundle.manifest.files)
    want_dtype = {"int4": onnx.TensorProto.INT4, "int8": onnx.TensorProto.INT8}[scheme]
    per_task = {}
    for task in bundle.tasks:
        path = bundle.path(task, "decoder")
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert lint(model) == [] and model.opset_import[0].version == 21
        inits, outputs = {i.name: i for i in model.graph.initializer}, {o.name for o in model.graph.output}
        dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dqs) == matmuls
        assert all(inits[n.input[0]].data_type == want_dtype and len(n.input) == 2 for n in dqs)
        head = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.output[0] in outputs}
        per_task[task] = {n.input[0] for n in dqs if n.output[0] not in head}
        float_weights = Counter(m.role for m in quantize.weight_matmuls(model))  # MatMuls still on an fp32 weight
        # H-LoRA A, R and B x 8 linears (+ the LM head); the routers always
        assert sum(float_weights.values()) == 25 - lm_head - 16 * adapters
        assert float_weights["lm_head"] == 1 - lm_head
        routers = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                   and inits[n.input[1]].dims[-1] == 4]  # [hidden, 4 experts]
        assert len(routers) == 8
    # base weights: one tensor, both tasks; the adapters are each task's own
    assert len(per_task["com"] & per_task["gen"]) == 8 and len(per_task["com"]) == 8 + 16 * adapters


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_onnx_runtime_fuses_every_weight_only_dequantize_matmul(scheme, int4_bundle, int8_bundle, tmp_path):
    bundle = Bundle.open({"int4": int4_bundle, "int8": int8_bundle}[scheme])
    backend = OrtBackend("cpu", optimized_dir=tmp_path)
    for task in bundle.tasks:
        backend.load(bundle, task, "decoder")
        ops = Counter(n.op_type for n in onnx.load(str(tmp_path / f"{task}.decoder.onnx"),
                                                   load_external_data=False).graph.node)
        assert ops["DequantizeLinear"] == 0, f"{task}: DequantizeLinear left unfused"
        assert ops["MatMulNBits"] == bundle.manifest.precision.quantization.quantized_matmuls[f"{task}.decoder"]


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_accuracy_report_and_verify_pass_with_the_schemes_tolerances(scheme, int4_bundle, int8_bundle,
                                                                      m3_checkpoint):
    root = {"int4": int4_bundle, "int8": int8_bundle}[scheme]
    result = json.loads((root / "quant.json").read_text())
    assert result["passed"] and result["tolerances"]["min_top1"] > 0
    for _task, t in result["tasks"].items():
        assert t["positions"] >= 256 and 0 <= t["mean_kl"] <= result["tolerances"]["max_mean_kl"]
    assert "gen_psnr" in result["tasks"]["gen"] and "stress test" in (root / "quant.md").read_text()
    rss = result["peak_rss_gib"]  # the quantize step's peak, and the process's with the report's sessions
    assert 0 < rss["quantize"] <= rss["report"] and "GiB quantizing" in (root / "quant.md").read_text()
    r = subprocess.run([sys.executable, "build.py", "verify", "--bundle", str(root), "--checkpoint",
                        str(m3_checkpoint), "--backends", "ort-cpu"], capture_output=True, text=True, timeout=600,
                       env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((root / "parity.json").read_text())
    assert report["passed"] and scheme in report["precision"]
    # the structural check against the fp32 source the manifest records, in both reports
    assert report["structure"]["passed"] and report["structure"]["weights"] > 0 and result["structure"]["passed"]
    assert "structural check against the fp32 source: passed" in r.stdout


def test_runtime_asks_and_generates_from_the_int4_bundle(int4_bundle, ct_small):
    pipe = Pipeline(Bundle.open(int4_bundle), OrtBackend("cpu"))
    assert len(pipe.ask(ct_small, "What does this scan show?", max_new_tokens=8)) > 0
    image = pipe.generate_image(ct_small, "Reconstruct the image.", constrain_image_tokens=True)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8


def test_awq_and_rtn_share_the_form_and_awq_lowers_the_weighted_error():
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(256, 64)).astype(np.float32)  # heavy-tailed, as the synthetic weights
    importance = rng.gamma(0.5, size=256).astype(np.float32)
    errors = {}
    for name, imp in (("rtn", None), ("awq", importance)):
        q, scale = quantize.quantize_weight(w, "int4", 64, imp)
        assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7 and scale.shape == (4, 64)
        errors[name] = float((importance[:, None] * (quantize.dequantize(q, scale, "int4", 64) - w) ** 2).sum())
    assert errors["awq"] < errors["rtn"]
    q, scale = quantize.quantize_weight(w, "int8", 128)
    assert scale.shape == (64,) and np.abs(quantize.dequantize(q, scale, "int8", 128) - w).max() <= scale.max() / 2


def test_bad_calibration_sets_get_one_clear_error(m3_bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.png").write_text("not an image")
    (tmp_path / "notes" / "b.png").write_text("nor this")
    single = data.default_images()[0]
    cases = {"holds no files": [empty], "unreadable": [tmp_path / "notes"], "at least 2 images": [single],
             "no such file": [tmp_path / "missing.png"]}
    for message, images in cases.items():
        r = subprocess.run([sys.executable, "build.py", "calibrate", "--bundle", str(m3_bundle), "--out",
                            str(tmp_path / "q"), "--images", *map(str, images)], capture_output=True, text=True,
                           timeout=300, env=ENV)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (message, r.stderr)
        assert r.stderr.startswith("error: ")
    assert not (tmp_path / "q").exists()


def test_calibrating_a_quantized_bundle_is_refused(int4_bundle, tmp_path):
    with pytest.raises(UserError, match="not an fp32 bundle"):
        calibrate(int4_bundle, tmp_path / "q", "int8")


def test_an_interrupted_calibration_leaves_no_complete_looking_bundle(m3_bundle, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate_mod.report, "measure", interrupted)  # after every graph was written
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        calibrate(m3_bundle, out, "int8", samples=2)
    assert not out.exists() and not out.with_name("q.partial").exists()  # nothing complete-looking, nothing left
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_full_size_benchmark_smoke_run(m3_checkpoint, m3_bundle, int4_bundle, tmp_path):
    """benchmarks/full_size.py end to end on the tiny bundles (one repetition: its code, not a measurement)."""
    out = tmp_path / "full_size.json"
    r = subprocess.run([sys.executable, "benchmarks/full_size.py", "--checkpoint", str(m3_checkpoint), "--fp32",
                        str(m3_bundle), "--int4", str(int4_bundle), "--warmup", "0", "--reps", "1", "--threads", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    block = json.loads((int4_bundle / "manifest.json").read_text())["precision"]["quantization"]["block_size"]
    int4 = f"ours int4 b{block} + H-LoRA int4"  # its blocks; the int4 default quantizes the adapters too
    assert res["machine"]["cpu"] and set(res["contenders"]) == {"ours fp32", int4, "PyTorch fp32"}
    assert set(res["prepare_s"]) == {str(int4_bundle)}
    for name, c in res["contenders"].items():
        assert "error" not in c, (name, c)
        assert set(c["com"]["decode"]) == {"100", "600", "1600"} and c["com"]["ttft_s"] > 0 and c["peak_rss_gib"] > 0
    assert res["contenders"][int4]["gen"]["image_s"] > 0 and f"| {int4} | gen |" in r.stdout
    q, fp32 = (res["contenders"][n]["com"]["decode"]["600"]["bytes"] for n in (int4, "ours fp32"))
    assert q < fp32  # %limit from the bytes the int4 decoder really reads
