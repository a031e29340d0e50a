"""engines/: profiles from manifest specs, engine manifest entries, compatibility refusals, precision and
max-context refusals, the build loop (TensorRT replaced by a stand-in: plans, manifest, timing cache, caching),
the `engines` command, and lazy `tensorrt` imports. Runs without TensorRT or a GPU."""

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_bundle import H200, TINY, make_bundle

from engines import build as eb
from export.compile import specs
from runtime.contract.errors import UserError
from runtime.contract.graphspec import GraphSpec
from runtime.contract.healthgpt import IMAGE_TOKENS
from runtime.core.bundle import Bundle
from runtime.core.trt_compat import INSTALL_HINT, DeviceInfo, check_compat

ROOT = Path(__file__).resolve().parents[1]


##### profiles #####

def test_decoder_profiles_from_manifest_spec():
    spec = specs.decoder(layers=2, kv_heads=4, head_dim=8, hidden=32, vocab=50, max_context=2048, dtype="float16")
    spec = GraphSpec.from_json(json.loads(json.dumps(spec.to_json())))  # as engines/ reads it from manifest.json
    prefill, decode = eb.profiles_for(spec)
    assert prefill["inputs_embeds"] == ((1, 1, 32), (1, 640, 32), (1, 2048, 32))
    assert decode["inputs_embeds"] == ((1, 1, 32), (1, 1, 32), (1, 1, 32))
    pasts = [n for n in spec.input_names if n.startswith("past_key_values.")]
    assert len(pasts) == 4
    for profile in (prefill, decode):
        assert set(profile) == set(spec.input_names)
        assert profile["past_length"] == ((1,), (1,), (1,))
    for name in pasts:  # the cache buffer grows from one row: prefill tuned for an empty cache, decode for a full one
        assert prefill[name] == ((1, 4, 8), (1, 4, 8), (2048, 4, 8))  # [cache rows, kv_heads, head_dim]
        assert decode[name] == ((1, 4, 8), (2048, 4, 8), (2048, 4, 8))
    assert eb.describe(spec) == "seq 1..640..2048, cache 1..1..2048 | cache 1..2048..2048"


def test_static_graphs_have_one_fixed_profile():
    for spec in (specs.vision(32, "float16"), specs.vqgan()):
        (profile,) = eb.profiles_for(GraphSpec.from_json(spec.to_json()))
        assert all(lo == opt == hi for lo, opt, hi in profile.values())
    assert eb.profiles_for(specs.vqgan())[0]["indices"][0] == (1, IMAGE_TOKENS)


def test_profiles_for_refuses_incomplete_profiles():
    class Broken:
        name, input_names = "decoder", ["inputs_embeds", "past_length"]

        def trt_profiles(self):
            return [{"inputs_embeds": ((1, 1, 4), (1, 2, 4), (1, 8, 4))}]

    with pytest.raises(ValueError, match="no shapes for past_length"):
        eb.profiles_for(Broken())


##### manifest entries and compatibility #####

def test_engine_entry_fields():
    spec = specs.decoder(**TINY, dtype="float32")
    e = eb.engine_entry("com.decoder", "engines/com.decoder.plan", "ab" * 32, 1234, H200, "fp16",
                        eb.profiles_for(spec), "key", 12.34).to_json()
    assert {"file", "sha256", "bytes", "gpu_name", "compute_capability", "tensorrt_version", "precision", "profiles",
            "built_at"} <= set(e)
    assert (e["compute_capability"], e["tensorrt_version"], e["gpu_name"]) == ("9.0", "10.8.0.43", "NVIDIA H200")
    assert e["profiles"][1]["inputs_embeds"] == [[1, 1, 6]] * 3
    json.dumps(e)  # plain JSON


def test_compat_refuses_other_compute_capability_and_tensorrt_version():
    entry = eb.engine_entry("com.decoder", "engines/com.decoder.plan", "0" * 64, 1, DeviceInfo(
        "NVIDIA L40S", "8.9", "10.3.0"), "fp16", [], "k", 1.0)
    here = DeviceInfo("NVIDIA H200", "9.0", "10.8.0")
    with pytest.raises(UserError) as err:
        check_compat(entry, here, "/data/bundle")
    assert str(err.value) == ("engine com.decoder was built for compute capability 8.9 with TensorRT 10.3.0; this "
                              "machine has 9.0 / 10.8.0: rebuild with `python build.py engines --bundle /data/bundle`")
    with pytest.raises(UserError, match="TensorRT 10.3.0; this machine has 8.9 / 10.8.0: rebuild with"):
        check_compat(entry, DeviceInfo("NVIDIA L40S", "8.9", "10.8.0"))  # same GPU, other TensorRT
    with pytest.raises(UserError, match="compute capability 8.9 .* this machine has 9.0 / 10.3.0"):
        check_compat(entry, DeviceInfo("NVIDIA H200", "9.0", "10.3.0"))  # same TensorRT, other GPU architecture
    assert check_compat(entry, DeviceInfo("NVIDIA L40S", "8.9", "10.3.0")) == []
    notes = check_compat(entry, DeviceInfo("NVIDIA L40", "8.9", "10.3.0"))  # same architecture, other model
    assert len(notes) == 1 and "rebuild with `python build.py engines --bundle BUNDLE` for best speed" in notes[0]


##### refusals before anything is built #####

def test_precision_must_match_the_bundle(bundle_dir):
    with pytest.raises(UserError, match=r"holds fp32 graphs.*strongly typed.*export --dtype fp16"):
        eb.build_engines(bundle_dir, precision="fp16")
    with pytest.raises(UserError, match=r"bf16 engines need a bf16 export"):
        eb.build_engines(bundle_dir, precision="bf16")
    fp16 = make_bundle(bundle_dir.parent / "fp16", dtype="fp16")
    with pytest.raises(UserError, match=r"holds fp16 graphs.*export --dtype fp32"):
        eb.build_engines(fp16, precision="fp32")
    manifest = Bundle.open(bundle_dir).manifest
    assert eb.check_request(manifest, None, None) == "fp32"
    assert eb.check_request(manifest, "fp32", TINY["max_context"]) == "fp32"
    with pytest.raises(UserError, match="unknown precision"):
        eb.check_request(manifest, "int8", None)


def test_max_context_must_match_the_bundle(bundle_dir):
    with pytest.raises(UserError, match=r"--max-context 4096 differs from the bundle's 64.*export --max-context 4096"):
        eb.build_engines(bundle_dir, max_context=4096)


def test_build_without_tensorrt_says_how_to_install(bundle_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, GPU machine or not
    with pytest.raises(UserError) as err:
        eb.build_engines(bundle_dir)
    assert str(err.value) == INSTALL_HINT == "TensorRT is not installed: pip install '.[tensorrt]'"
    from runtime.core.backend import open_backend

    with pytest.raises(UserError, match="TensorRT is not installed"):
        open_backend("trt")


def test_build_refuses_a_corrupt_graph(bundle_dir):
    (bundle_dir / "com.decoder.onnx").write_bytes(b"not onnx")
    with pytest.raises(UserError, match="corrupt"):
        eb.build_engines(bundle_dir)


##### the build loop, with TensorRT replaced by a stand-in #####

def test_build_engines_writes_plans_and_manifest_atomically(bundle_dir, monkeypatch):
    calls = []

    def fake_build_plan(onnx_path, profiles, timing_cache):
        calls.append((Path(onnx_path).name, len(profiles), timing_cache))
        return memoryview(f"plan {len(calls)}".encode()), f"cache {len(calls)}".encode()

    monkeypatch.setattr(eb, "current_device", lambda: H200)
    monkeypatch.setattr(eb, "build_plan", fake_build_plan)
    engines = eb.build_engines(bundle_dir)
    assert calls == [("com.decoder.onnx", 2, None)]
    entry = engines["com.decoder"].to_json()
    plan = bundle_dir / "engines" / "com.decoder.plan"
    assert entry["file"] == "engines/com.decoder.plan" and plan.read_bytes() == b"plan 1"
    assert entry["sha256"] == hashlib.sha256(b"plan 1").hexdigest() and entry["bytes"] == 6
    assert (entry["precision"], entry["compute_capability"], len(entry["profiles"])) == ("fp32", "9.0", 2)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["engines"] == {k: e.to_json() for k, e in engines.items()}
    assert manifest["files"]["engines/com.decoder.plan"] == {"sha256": entry["sha256"], "bytes": 6}
    Bundle.open(bundle_dir)  # the integrity check covers the plan
    assert (bundle_dir / "engines" / "timing.cache").read_bytes() == b"cache 1"
    assert not [p for p in bundle_dir.rglob("*.partial")]

    eb.build_engines(bundle_dir)  # unchanged inputs: kept
    assert len(calls) == 1
    plan.write_bytes(b"plan X")  # a damaged plan is rebuilt, with the saved timing cache
    eb.build_engines(bundle_dir)
    assert calls[-1] == ("com.decoder.onnx", 2, b"cache 1") and plan.read_bytes() == b"plan 2"
    custom = bundle_dir.parent / "tc" / "my.cache"
    eb.build_engines(bundle_dir, timing_cache=custom, force=True)
    assert len(calls) == 3 and custom.read_bytes() == b"cache 3"
    monkeypatch.setattr(eb, "current_device", lambda: DeviceInfo("NVIDIA L40S", "8.9", "10.8.0.43"))
    eb.build_engines(bundle_dir)  # another GPU: another cache key, so a rebuild
    assert len(calls) == 4 and json.loads((bundle_dir / "manifest.json").read_text())["engines"]["com.decoder"][
        "compute_capability"] == "8.9"


def test_engines_command(bundle_dir, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="build.py")
    eb.add_engines_command(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["engines", "--bundle", str(bundle_dir), "--precision", "fp16"])
    with pytest.raises(UserError, match="--dtype fp16"):
        a.run(a)
    monkeypatch.setattr(eb, "current_device", lambda: H200)
    monkeypatch.setattr(eb, "build_plan", lambda *args: (memoryview(b"plan"), b"cache"))
    a = parser.parse_args(["engines", "--bundle", str(bundle_dir)])
    a.run(a)
    out = capsys.readouterr().out
    assert "[I] com.decoder: building fp32 (2 profile(s): seq 1..64..64, cache 1..1..64 | cache 1..64..64)" in out
    assert "1 engines" in out and "NVIDIA H200" in out
    with pytest.raises(SystemExit):
        parser.parse_args(["engines", "--help"])
    assert "strongly typed" in capsys.readouterr().out


##### imports #####

def test_modules_import_without_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None\n"
            "import engines.build, runtime.core.trt_compat, runtime.core.backend_trt\n"
            "assert 'torch' not in sys.modules, 'the runtime side must not import torch'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_compileall():
    r = subprocess.run([sys.executable, "-m", "compileall", "-q", "engines", "runtime"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
