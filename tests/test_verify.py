"""`build.py verify`: the report on this machine (ort-cpu passes, GPU backends not run) and a perturbed graph."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx

from runtime.contract.files import file_digest


def run_verify(bundle, checkpoint, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: torch's thread pool only adds overhead
    return subprocess.run([sys.executable, "build.py", "verify", "--bundle", str(bundle), "--checkpoint",
                           str(checkpoint), *extra], capture_output=True, text=True, timeout=600, env=env)


def test_verify_passes_on_ort_cpu_and_reports_gpu_backends_not_run(m3_bundle, m3_checkpoint, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(m3_bundle, bundle)
    r = run_verify(bundle, m3_checkpoint)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((bundle / "parity.json").read_text())
    assert report["passed"]
    cpu = report["backends"]["ort-cpu"]
    assert cpu["status"] == "passed"
    graphs = {c["graph"] for c in cpu["checks"]}
    assert graphs == {"com.vision", "com.embed", "com.decoder", "gen.vision", "gen.embed", "gen.decoder",
                      "shared.vqgan"}
    e2e = {e["check"]: e for e in cpu["e2e"]}
    assert e2e["com greedy tokens"]["ok"] and "32 of 32" in e2e["com greedy tokens"]["detail"]
    assert e2e["gen 1024 indices"]["ok"] and e2e["gen image PSNR"]["ok"]
    conversation = {e["check"]: e for e in cpu["conversation"]}  # 2 turns, end to end, against the reference
    assert set(conversation) == {"com conversation turn 2 tokenization", "com conversation turn 1 greedy tokens",
                                 "com conversation turn 2 greedy tokens"}
    assert all(e["ok"] for e in conversation.values())
    assert "32 of 32" in conversation["com conversation turn 2 greedy tokens"]["detail"]
    for name in ("ort-cuda", "trt"):  # no GPU / TensorRT here: reported, never counted as passed
        assert report["backends"][name]["status"] == "not run" and report["backends"][name]["reason"]
    md = (bundle / "parity.md").read_text()
    assert "ort-cpu: passed" in md and "trt: not run" in md and "| com.decoder | decode step 8 logits |" in md
    assert "| conversation (2 turns) | result | ok |" in md and "| com conversation turn 2 tokenization |" in md


def test_verify_fails_loudly_on_a_perturbed_graph(m3_bundle, m3_checkpoint, tmp_path):
    bundle = tmp_path / "bad"
    shutil.copytree(m3_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    graphs = manifest["graphs"]
    com_only = sorted(set(graphs["com.decoder"]["initializers"]) - set(graphs["gen.decoder"]["initializers"]))
    tensor = manifest["weights"]["tensors"][com_only[0]]
    weights = np.memmap(bundle / "weights.bin", dtype=np.uint8, mode="r+")
    count = int(np.prod(tensor["shape"]))
    values = weights[tensor["offset"]: tensor["offset"] + 4 * count].view(np.float32)
    values *= 1.5  # a wrongly exported weight: the graph is internally consistent, just wrong
    weights.flush()
    # ... so, as the exporter would, the tensor is named after its (new) content in the manifest and the graph
    new = f"w.{hashlib.sha256(values.tobytes()).hexdigest()[:24]}." + com_only[0].split(".", 2)[2]
    del weights, values
    manifest["weights"]["tensors"][new] = manifest["weights"]["tensors"].pop(com_only[0])
    entry = graphs["com.decoder"]
    entry["initializers"] = [new if t == com_only[0] else t for t in entry["initializers"]]
    model = onnx.load(str(bundle / entry["file"]), load_external_data=False)
    for init in model.graph.initializer:
        init.name = new if init.name == com_only[0] else init.name
    for node in model.graph.node:
        node.input[:] = [new if i == com_only[0] else i for i in node.input]
    onnx.save(model, str(bundle / entry["file"]))
    for name in ("weights.bin", entry["file"]):
        manifest["files"][name] = {"sha256": file_digest(bundle / name), "bytes": (bundle / name).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    r = run_verify(bundle, m3_checkpoint, "--backends", "ort-cpu", "--tasks", "com")
    assert r.returncode == 2
    assert "parity FAILED" in r.stderr and "com.decoder" in r.stderr and "Traceback" not in r.stderr
    report = json.loads((bundle / "parity.json").read_text())
    assert not report["passed"] and report["backends"]["ort-cpu"]["status"] == "failed"
    assert "**NO**" in (bundle / "parity.md").read_text()
