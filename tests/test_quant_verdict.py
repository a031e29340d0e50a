"""A failed verdict is never silent (a failed bundle is marked so, refused by every front-end unless overridden, and
the override said on every start), every quantization record field is validated against what it describes, and
the reports are bound to the bundle they judged."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engines import build as eb
from runtime.contract.errors import UserError
from runtime.contract.manifest import Manifest
from runtime.contract.records import ManifestError
from runtime.contract.reports import PARITY, BackendResult, EndToEnd, ParityReport
from runtime.core.bundle import Bundle
from runtime.core.verdict import OVERRIDE, Verdict, require

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


FLOOR_CALIBRATE = """
import sys
import numpy as np
from calibration import quantize
import build

original = quantize.quantize_weight

def floor_rounding(w, scheme, block, importance=None):  # a quantizer that rounds down
    q, scale = original(w, scheme, block, importance)
    return np.clip(np.floor(w / np.repeat(scale, block, axis=0)[: w.shape[0]]), -8, 7).astype(np.int8), scale

quantize.quantize_weight = floor_rounding
sys.exit(build.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def calibrated_with_a_broken_quantizer(m3_bundle, tmp_path_factory):
    """`build.py calibrate` with a quantizer that rounds down: its report fails."""
    out = tmp_path_factory.mktemp("failed") / "int4"
    proc = subprocess.run([sys.executable, "-c", FLOOR_CALIBRATE, "calibrate", "--bundle", str(m3_bundle), "--out",
                           str(out), "--scheme", "int4", "--block-size", "32", "--algorithm", "rtn", "--quick-report"],
                          capture_output=True, text=True, timeout=600, env=ENV, cwd=Path(__file__).parents[1])
    return out, proc


@pytest.fixture(scope="module")
def failed_bundle(calibrated_with_a_broken_quantizer):
    return calibrated_with_a_broken_quantizer[0]


def _runtime(*args):
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV)


def test_calibrate_that_fails_its_report_leaves_the_bundle_marked_failed(calibrated_with_a_broken_quantizer):
    failed_bundle, proc = calibrated_with_a_broken_quantizer
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "FAILED its report" in errors[0] and "stored values differ" in errors[0] and OVERRIDE in errors[0]
    bundle = Bundle.open(failed_bundle)
    assert bundle.manifest.precision.quantization.report.passed is False
    verdict = Verdict.of(bundle)
    assert verdict.quant == "FAILED" and not verdict.passed
    assert any("structure:" in f and "stored values differ" in f for f in verdict.failed), verdict.failed
    assert "**FAILED**" in (failed_bundle / "quant.md").read_text()


def test_ask_refuses_a_failed_bundle_and_the_override_says_so(failed_bundle, ct_small):
    ask = ("ask", "--bundle", failed_bundle, "--providers", "cpu", "--image", ct_small, "--max-new-tokens", "2", "Hi?")
    r = _runtime(*ask)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "FAILED its verification" in lines[0] and "structure" in lines[0] and OVERRIDE in lines[0]
    r = _runtime(*ask, OVERRIDE)
    assert r.returncode == 0, r.stderr
    assert "warning: running a bundle that FAILED its verification" in r.stderr
    r = _runtime("info", "--bundle", failed_bundle)
    assert r.returncode == 0 and "quantization report FAILED" in r.stdout and OVERRIDE in r.stdout


def test_the_app_and_the_server_refuse_it_unless_overridden(failed_bundle, tmp_path):
    from runtime.frontends.app.model import LocalModel
    from runtime.frontends.serving import repository

    with pytest.raises(UserError, match=OVERRIDE):
        LocalModel.open(failed_bundle, "ort", "cpu")
    model = LocalModel.open(failed_bundle, "ort", "cpu", allow_failed=True)
    assert "FAILED its verification" in model.describe()["verification_warning"]  # the page's banner
    with pytest.raises(UserError, match=OVERRIDE):
        repository.write(failed_bundle, tmp_path / "repo")
    repo = repository.write(failed_bundle, tmp_path / "repo", repository.Options(allow_failed=True))
    assert 'key: "allow_failed_verification" value { string_value: "true" }' in (
        repo / repository.MODEL / "config.pbtxt").read_text()  # each instance logs the warning when it starts


INT8 = {"scheme": "int8", "block_size": None, "weights": "int8", "ort_only": False}  # a record consistent in itself
FP8 = {"scheme": "fp8", "algorithm": "minmax", "block_size": None, "weights": "float8e4m3fn", "ort_only": False,
       "activations": "float8e4m3fn", "accuracy_level": None, "adapters": "float32"}
BAD_FIELDS = {  # case -> (forged fields, what the refusal names)
    "int4 -> int8": (INT8, "int8 stores int8, but graph com.decoder holds int4"),
    "int4 -> fp8": (FP8, "fp8 stores float8_e4m3fn, but graph com.decoder holds int4"),
    "scheme": ({"scheme": "int2"}, "scheme 'int2'"),
    "block_size": ({"block_size": 999}, "block_size 999"),
    "block_size 64, not the scales'": ({"block_size": 64, "ort_only": False}, "no fp32 scale of shape"),
    "lm_head": ({"lm_head": "banana"}, "lm_head 'banana'"),
    "adapters": ({"adapters": "banana"}, "adapters 'banana'"),
    "adapters of a Q/DQ scheme": ({**FP8, "adapters": "quantized"}, "quantized for weight-only schemes only"),
    "graphs": ({"graphs": ["nope"]}, "graphs ['nope']"),
    "report.file": ({"report": {"passed": True, "file": "../../../etc/passwd"}}, "report.file"),
    "weight_rel_error": ({"weight_rel_error": {}}, "weight_rel_error {}"),
    "session_config key": ({"session_config": {"decoder": {"session.load_model_format": "ORT"}}},
                           "session.load_model_format"),
    "session_config value": ({"session_config": {"decoder": {"session.disable_quant_qdq": "yes"}}}, "'yes'"),
    "session_config graph": ({"session_config": {"vision": {"session.disable_quant_qdq": "1"}}},
                             "session_config.vision"),
    "accuracy_level": ({"accuracy_level": 7}, "accuracy_level 7"),
    "ort_only": ({"ort_only": False}, "ort_only False for int4 in blocks of 32"),  # TensorRT takes 64 or 128
    "quantized_matmuls": ({"quantized_matmuls": {"shared.vqgan": 3}}, "quantized_matmuls.shared.vqgan"),
}


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_every_quantization_field_is_validated_against_what_it_describes(case, failed_bundle):
    fields, named = BAD_FIELDS[case]
    data = json.loads((failed_bundle / "manifest.json").read_text())
    data["precision"]["quantization"].update(fields)
    with pytest.raises(ManifestError) as e:
        Manifest.from_json(data)
    assert named in str(e.value), str(e.value)


def test_tensorrt_engines_are_refused_for_an_ort_only_bundle(failed_bundle):
    assert Bundle.open(failed_bundle).manifest.precision.quantization.ort_only  # int4 in blocks of 32
    with pytest.raises(UserError, match="form TensorRT cannot build.*blocks of 32"):
        eb.build_engines(failed_bundle)


@pytest.mark.parametrize("size", [0, -32])
def test_block_sizes_that_are_no_block_are_refused(size, failed_bundle):
    data = json.loads((failed_bundle / "manifest.json").read_text())
    data["precision"]["quantization"]["block_size"] = size
    with pytest.raises(ManifestError, match=f"block_size {size}"):
        Manifest.from_json(data)


def test_the_manifest_verdict_must_equal_the_hashed_report(failed_bundle):
    bundle = Bundle.open(failed_bundle)
    q = bundle.manifest.precision.quantization
    forged = dataclasses.replace(q, report=dataclasses.replace(q.report, passed=True))
    manifest = dataclasses.replace(bundle.manifest, precision=dataclasses.replace(bundle.manifest.precision,
                                                                                   quantization=forged))
    with pytest.raises(UserError, match="says the opposite"):
        Verdict.of(Bundle(bundle.root, manifest, bundle.digest))


def _parity(bundle: Bundle, passed: bool) -> ParityReport:
    status = BackendResult("passed") if passed else BackendResult("failed", e2e=(EndToEnd("com greedy tokens", False,
                                                                                          "first 3 of 32"),))
    return ParityReport(bundle=str(bundle.root), bundle_digest=bundle.digest, checkpoint="ck", precision="fp32",
                        image="CT_small.dcm", e2e_bounds={}, backends={"ort-cpu": status}, peak_rss_gib={},
                        passed=passed).sealed()


def test_a_parity_report_counts_only_for_the_bundle_it_verified(m3_bundle, failed_bundle, tmp_path):
    from runtime.frontends.app.model import parity_status

    fp = tmp_path / "fp"
    shutil.copytree(m3_bundle, fp)
    src = Bundle.open(fp)
    (fp / PARITY).write_text(json.dumps(_parity(src, True).to_json()))
    assert parity_status(fp, src.digest, "ort", "CPUExecutionProvider")["status"] == "passed"
    q = tmp_path / "q"
    shutil.copytree(failed_bundle, q)
    shutil.copy(fp / PARITY, q / PARITY)  # copied from the fp32 bundle into a never-verified one
    status = parity_status(q, Bundle.open(q).digest, "ort", "CPUExecutionProvider")
    assert status["status"] == "not verified" and "verified another bundle" in status["detail"]
    assert Verdict.of(Bundle.open(q)).parity.startswith("not verified")
    edited = json.loads((fp / PARITY).read_text())
    edited["backends"]["ort-cpu"]["status"] = "failed"  # a verdict edited by hand
    (fp / PARITY).write_text(json.dumps(edited))
    assert "its own sha256" in parity_status(fp, src.digest, "ort", "CPUExecutionProvider")["detail"]
    (fp / PARITY).write_text(json.dumps(_parity(src, False).to_json()))
    with pytest.raises(UserError, match="parity report: ort-cpu"):
        require(src, allow_failed=False)
    assert "FAILED" in require(src, allow_failed=True)
