"""The benchmark script runs end to end (tiny widths, one repetition: a smoke run of its code, not a measurement)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_run(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "HGB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--size", "tiny", "--layers", "1",
                           "--warmup", "0", "--reps", "1", "--threads", "1", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["meta"]["layers"] == 1 and res["meta"]["cpu"]  # the machine is recorded with the table
    for key in ("vision", "vqgan", "ttft", "decode_D1", "prefill_D1", "decode_D2"):
        assert res[key], key
    assert set(res["decode_D1"]) == {"100", "600", "1600"}
    assert "ours com" in res["decode_D1"]["600"] and "GEMV" in res["decode_D1"]["600"]
    # --quick: the int4 decoder beside fp32, its limit from the int4 bytes (fewer than fp32's)
    assert "ours com int4" in res["decode_D1"]["600"] and "ours com int4" in res["prefill_D1"]
    rows = res["derived"]["decode"]
    assert rows["ours com int4"]["weights"] < rows["ours com"]["weights"] and res["quantized"]["int4"]["rss_delta"]
    assert "ours ask int4" in res["ttft"]  # time to first token of the int4 bundle's ask
    report = res["accuracy"]["int4"]  # the int4 bundle's own accuracy report, with its size beside fp32's
    assert set(report["tasks"]) == {"com", "gen"} and report["tasks"]["com"]["positions"] >= 256
    assert 0 < report["bundle_bytes"] < res["accuracy"]["fp32"]["bundle_bytes"]
    assert any(t["target"].startswith("int4: its accuracy within") for t in res["targets"])


def test_profile_smoke_run(m3_bundle, tmp_path):
    """benchmarks/op_profile.py at tiny size: every class of the decoder's nodes found, bytes accounted for."""
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "benchmarks/op_profile.py", "--bundle", str(m3_bundle), "--context", "40",
                           "--prefill", "10", "--reps", "1", "--threads", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    layers = 2
    for kind in ("decode", "prefill"):
        table = res[kind]
        assert table["base linears"]["nodes"] == 4 * layers and table["LM head"]["nodes"] == 1
        assert table["norms"]["nodes"] == 2 * layers + 1
        hlora, parts = table["H-LoRA (A/R, routing, gate, B, add)"], res[f"{kind} H-LoRA by op"]
        assert hlora["weight_bytes"] > 0 and {"Softmax", "Add"} <= parts.keys()
        assert sum(r["nodes"] for r in parts.values()) == hlora["nodes"]
        assert abs(sum(r["ms"] for r in parts.values()) - hlora["ms"]) < 1e-6  # one run: its medians add up
        assert abs(sum(r["share"] for r in table.values()) - 1) < 1e-6 and all(r["ms"] >= 0 for r in table.values())
        weights = sum(r["weight_bytes"] for r in table.values())  # every weight of the bundle read once per step
        assert res["weight_bytes"] <= weights <= 1.1 * res["weight_bytes"], (weights, res["weight_bytes"])
    # the cached rows (40 of a 64-row buffer) are what attention reads
    assert res["decode"]["attention (scores, softmax, values, RoPE)"]["activation_bytes"] >= res["kv_bytes"]
    assert "decode step at 40 cached tokens" in proc.stdout


CGROUP_V1 = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
NO_CGROUP = None if os.geteuid() == 0 and (CGROUP_V1.is_file() or Path("/sys/fs/cgroup/cgroup.controllers").is_file()) \
    else "benchmarks/memory_limit.py needs root and a cgroup memory controller"


@pytest.mark.skipif(NO_CGROUP is not None, reason=NO_CGROUP or "")
def test_memory_limit_reports_completion_and_oom_kills(tmp_path):
    """512 MiB of numpy inside 1 GiB completes; inside 0.25 GiB the kernel kills it and the report says so."""
    alloc = [sys.executable, "-c", "import numpy as np; print(np.ones(2**26).sum())"]
    for limit, completed in ((1.0, True), (0.25, False)):
        out = tmp_path / f"{limit}.json"
        r = subprocess.run([sys.executable, "benchmarks/memory_limit.py", "--limit-gib", str(limit), "--json",
                            str(out), "--", *alloc], capture_output=True, text=True, timeout=120)
        res = json.loads(out.read_text())
        assert (r.returncode == 0) == completed == res["completed"], r.stderr[-500:]
        assert (res["oom_kills"] > 0) != completed and res["peak_gib"] <= limit + 1e-6


def test_openvino_peer_without_its_venv_is_not_run(tmp_path, monkeypatch):
    """benchmarks/openvino.py when its venv cannot be made: every step answers 'not run: reason' and leaves nothing
    behind, and full_size.py records that as the contender's error; a complete export is reused without the venv."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import full_size
    from benchmarks import openvino as ov

    monkeypatch.setenv("HGB_OPENVINO_VENV", "/dev/null/ov-venv")  # `python -m venv` fails at once: not a directory
    out = tmp_path / "ov"
    assert ov.export(tmp_path / "base", out).startswith("not run: venv failed")
    assert not out.exists() and not out.with_name("ov.partial").exists()
    assert ov.worker({"op": "time", "model": str(out), "threads": 1}).startswith("not run: venv failed")
    ck = tmp_path / "ck"
    args = {"checkpoint": str(ck), "out": str(out), "threads": 1, "warmup": 0, "reps": 1, "contexts": [100]}
    assert full_size.openvino(args)["error"].startswith("not run: venv failed")
    a = full_size.argparse.Namespace(fp32=None, fp32_image=False, int4=[], unprepared=[], no_torch=True, genai=None,
                                     llama=None, openvino=out, checkpoint=ck)
    assert [(n, k) for n, k, _ in full_size.contenders(a, {}, True)] == [("OpenVINO GenAI int4 (base)", "openvino")]
    out.mkdir()  # an export already there: reused as it is, its weights file counted
    (out / "openvino_model.xml").write_text("<net/>")
    (out / "openvino_model.bin").write_bytes(b"\0" * 1000)
    assert ov.export(tmp_path / "base", out) == out and ov.weight_bytes(out) == 1000
    # Phi-3-mini's geometry: u8 K (per channel, blocks of 32) and V (per token) against f16's 2 bytes an element
    (out / "config.json").write_text(json.dumps({"hidden_size": 3072, "num_attention_heads": 32,
                                                 "num_key_value_heads": 32, "num_hidden_layers": 32}))
    assert ov.kv_bytes_per_token(out, {"key": "u8", "value": "u8"}) == 32 * 32 * (120 + 104)
    assert ov.kv_bytes_per_token(out, {"key": "f16", "value": "f16"}) == full_size.KV_BYTES // 2


def test_decode_attention_smoke_run(tmp_path):
    """benchmarks/decode_attention.py at toy widths, GQA (4 query heads on 2 KV heads): every form runs and is
    tabulated (its figures mean nothing), and the bytes a step reads count the KV heads."""
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, "benchmarks/decode_attention.py", "--contexts", "8", "40", "--layers", "2",
                           "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--threads", "1", "--warmup", "1",
                           "--reps", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    forms = ["scores, alpha = 1/sqrt(d) (before)", "scores, alpha = 1 (now)", "values (alpha = 1)",
             "GroupQueryAttention float32", "GroupQueryAttention float16"]
    for context in ("8", "40"):
        assert list(res["contexts"][context]) == forms
        assert res["contexts"][context]["GroupQueryAttention float16"]["kv_bytes"] == 2 * 2 * int(context) * 2 * 16 * 2
        assert res["contexts"][context]["scores, alpha = 1 (now)"]["kv_bytes"] == 2 * int(context) * 2 * 16 * 4
    assert all(f"| {form} |" in proc.stdout for form in forms)


def test_decode_ab_smoke_run(m3_bundle, tmp_path):
    """benchmarks/decode_ab.py on one tiny bundle named twice: both decoders timed at each context, ratios printed."""
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, "benchmarks/decode_ab.py", "--bundle", f"a={m3_bundle}", f"b={m3_bundle}",
                           "--contexts", "8", "40", "--threads", "1", "--warmup", "1", "--reps", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(json.loads(out.read_text())["ms"]) == ["a @40", "a @8", "b @40", "b @8"]
    assert "| a | " in proc.stdout and "| b | " in proc.stdout
    bad = subprocess.run([sys.executable, "benchmarks/decode_ab.py", "--bundle", str(m3_bundle)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "NAME=DIR" in bad.stderr


def test_hlora_forms_compute_the_same_and_run(tmp_path):
    """benchmarks/hlora_forms.py at toy widths: every graph form of the adapted linears computes what the exported
    form does (the benchmark checks it on its own inputs; int8 activations allow a little), and is tabulated."""
    out = tmp_path / "forms.json"
    proc = subprocess.run([sys.executable, "benchmarks/hlora_forms.py", "--layers", "1", "--hidden", "128",
                           "--intermediate", "256", "--rank", "16", "--rows", "1", "8", "--threads", "1", "--warmup",
                           "0", "--reps", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for m in ("1", "8"):
        assert set(res["agreement"][m]) == {"now", "B fp32", "[W|A]", "[W;B]"}
        assert max(res["agreement"][m].values()) < 2e-3, res["agreement"][m]
    assert res["nodes_per_layer"]["base only"] == 4 and res["nodes_per_layer"]["now"] == 32
    assert "| [W;B] |" in proc.stdout


def test_fused_hlora_probe_runs():
    """benchmarks/fused_hlora.py: one line per adapted linear, and the square one (o) computed as H-LoRA exactly."""
    proc = subprocess.run([sys.executable, "benchmarks/fused_hlora.py", "--hidden", "64", "--intermediate", "128",
                           "--rank", "16"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"qkv", "o", "gate_up", "down"}
    error = float(rows["o"].split("max |error| ")[1].split()[0])
    assert error < 1e-5


def test_linear_kernels_smoke_run(tmp_path):
    """benchmarks/linear_kernels.py at toy widths: every form runs and is tabulated (its figures mean nothing), and
    the int4 Q/DQ forms run as the fused MatMulNBits they claim to time, at their accuracy level."""
    import onnx
    import onnxruntime as ort

    from benchmarks.linear_kernels import FORMS, graph, shapes

    out = tmp_path / "linears.json"
    proc = subprocess.run([sys.executable, "benchmarks/linear_kernels.py", "--layers", "1", "--hidden", "128",
                           "--intermediate", "256", "--rows", "1", "8", "--threads", "1", "--warmup", "1", "--reps",
                           "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for m in ("1", "8"):
        assert list(res["rows"][m]) == list(FORMS)
    assert all(f"| {form} |" in proc.stdout for form in FORMS)
    for form in ("int4 b128, accuracy 4", "int4 b64, accuracy 1"):
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(FORMS[form][3]))
        ort.InferenceSession(graph(form, 1, shapes(128, 256), np.random.default_rng(0)), opts,
                             providers=["CPUExecutionProvider"])
        fused = [n for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node if n.op_type == "MatMulNBits"]
        assert len(fused) == 4
        assert {(a.name, a.i) for n in fused for a in n.attribute if a.name in ("accuracy_level", "block_size")} == \
            {("accuracy_level", FORMS[form][3]), ("block_size", FORMS[form][2])}
