"""Reliability and security (issue 11): concurrent requests, tamper-evident bundles, outputs that never clobber,
checkpoints accounted for, errors found before the work. Image and prompt-text input cases: test_image.py,
test_tokenizer.py, test_cli.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_user_error, run_cli
from tiny_bundle import swap_same_shape_offsets

from export.compile.bundle import export_bundle
from export.outdir import staged
from export.reference.model import load_reference
from export.synth.checkpoint import synthesize
from runtime.contract.errors import UserError
from runtime.contract.healthgpt import GEN
from runtime.contract.manifest import MANIFEST
from runtime.core.backend import OrtBackend
from runtime.core.bundle import Bundle
from runtime.core.image import load_image
from runtime.core.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("What does this scan show?", "Is there a lesion?", "Describe the anatomy.", "Any fracture?")


@pytest.fixture(scope="module")
def pipe(m3_bundle):
    return Pipeline(Bundle.open(m3_bundle), OrtBackend("cpu", threads=1))


@pytest.fixture(scope="module")
def scans():
    from pydicom.data import get_testdata_file

    return [load_image(get_testdata_file(name, download=False)) for name in ("CT_small.dcm", "MR_small.dcm")]


def _edit_manifest(bundle: Path, edit) -> Path:
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    return bundle


@pytest.fixture
def copy(m3_bundle, tmp_path):
    return shutil.copytree(m3_bundle, tmp_path / "b")


##### 1. concurrent requests on one Pipeline #####

def test_concurrent_requests_get_their_own_answers(pipe, scans):
    """3 threads x 20 requests over both tasks, each answer compared with the same request made alone. Random
    weights answer alike whatever the question, so each request samples with a seed of its own: a request that
    read another's cache or sampler state would come out different."""
    from runtime.core.sampling import Sampler

    requests = [(i % 2 == 0, scans[(i // 2) % 2], QUESTIONS[i % 4], i) for i in range(20)]

    def run(ask: bool, image, text, seed):
        sampler = Sampler(temperature=1.0, seed=seed)
        return (pipe.ask(image, text, max_new_tokens=12, sampler=sampler) if ask else
                tuple(pipe.image_tokens(image, text, max_new_tokens=12, sampler=sampler)))

    serial = [run(*r) for r in requests]
    assert len(set(serial)) == len(serial)  # every request's answer is its own, so a mix-up would show
    results, errors = {}, []

    def worker(k: int):
        try:
            for i in range(len(requests)):
                j = (i + 7 * k) % len(requests)  # each thread in its own order
                results[k, j] = run(*requests[j])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(results) == 60
    wrong = [(k, j) for (k, j), got in results.items() if got != serial[j]]
    assert wrong == []


def test_a_request_does_not_advance_the_callers_sampler(pipe, scans):
    from runtime.core.sampling import Sampler

    sampler = Sampler(temperature=1.0, seed=3)
    first = pipe.ask(scans[0], QUESTIONS[0], max_new_tokens=8, sampler=sampler)
    assert pipe.ask(scans[0], QUESTIONS[0], max_new_tokens=8, sampler=sampler) == first
    tokens = pipe.image_tokens(scans[0], "Reconstruct.", max_new_tokens=4, constrain_image_tokens=False,
                               sampler=sampler)
    assert sampler.allowed is None and len(tokens) <= 4


##### 2. --out never destroys what is not ours #####

def test_export_refuses_to_replace_the_input_or_foreign_folders(m3_checkpoint, tmp_path):
    before = sorted(p.name for p in m3_checkpoint.iterdir())
    for out, why in ((m3_checkpoint, "is the input"), (m3_checkpoint.parent, "a folder holding the input")):
        with pytest.raises(UserError, match=why):
            export_bundle(m3_checkpoint, out, ("com",))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "report.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to replace .*not empty and not a healthgpt-edge bundle"):
        export_bundle(m3_checkpoint, foreign, ("com",))
    assert (foreign / "report.txt").read_text() == "keep me"
    assert sorted(p.name for p in m3_checkpoint.iterdir()) == before
    with pytest.raises(UserError, match="refusing to replace .*not a synthetic checkpoint"):
        synthesize(foreign)
    assert (foreign / "report.txt").read_text() == "keep me" and not (tmp_path / "notes.partial").exists()


def test_build_py_export_onto_its_checkpoint_is_one_error_line(m3_checkpoint):
    proc = subprocess.run([sys.executable, "build.py", "export", "--checkpoint", str(m3_checkpoint), "--out",
                           str(m3_checkpoint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_user_error(proc, "is the input")
    assert (m3_checkpoint / "HealthGPT-M3").is_dir()


def test_failed_write_leaves_nothing_behind(m3_checkpoint, tmp_path, monkeypatch):
    import export.compile.writer as writer

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "WeightStore", full_disk)
    with pytest.raises(UserError, match="cannot write .*No space left on device"):
        export_bundle(m3_checkpoint, tmp_path / "out", ("com",))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_interrupted_swap_is_recovered(tmp_path):
    out = tmp_path / "bundle"
    old = tmp_path / "bundle.old"  # what a swap by two renames leaves when killed between them
    old.mkdir()
    (old / MANIFEST).write_text(json.dumps({"format": "healthgpt-edge-bundle"}))
    with pytest.raises(RuntimeError):
        with staged(out, "bundle", []):
            assert (out / MANIFEST).is_file()  # the old bundle is back before any work
            raise RuntimeError("the job fails")
    assert (out / MANIFEST).is_file() and not old.exists() and not (tmp_path / "bundle.partial").exists()


##### 3. corruption is never laundered, non-finite logits are an error #####

def test_reexport_over_a_corrupt_bundle_rebuilds_it(m3_checkpoint, tmp_path, capsys):
    out = tmp_path / "b"
    export_bundle(m3_checkpoint, out, ("com",), max_context=64)
    with open(out / "weights.bin", "r+b") as f:
        f.seek(4096 + 17)
        f.write(b"\xff\xff\xff\x7f")  # a NaN in some weight
    capsys.readouterr()
    export_bundle(m3_checkpoint, out, ("com",), max_context=64)
    log = capsys.readouterr()
    assert "not reusing any graph" in log.out + log.err and "reused" not in log.out
    Bundle.open(out)  # every byte checks out again


def test_non_finite_logits_are_an_error(pipe, scans, monkeypatch):
    decoder = pipe.task("com").decoder
    real = decoder.run

    def nan_logits(feeds):
        out = real(feeds)
        return {**out, "logits": np.full_like(out["logits"], np.nan)}

    monkeypatch.setattr(decoder, "run", nan_logits)
    with pytest.raises(UserError, match="non-finite logits"):
        pipe.ask(scans[0], QUESTIONS[0], max_new_tokens=4)


##### 4. the manifest is validated, confined and protected #####

@pytest.mark.parametrize("edit,match", [
    (lambda m: m["graphs"]["com.embed"].update(file="../../etc/passwd"), "not hashed in `files`"),
    (lambda m: m["files"].update({"/etc/passwd": m["files"]["weights.bin"]}), "not a plain relative path"),
    (lambda m: m["files"].update({"../x": m["files"]["weights.bin"]}), "not a plain relative path"),
    (lambda m: m["files"].pop("tokenizer.json"), "not hashed in `files`: tokenizer.json"),
    (lambda m: m["tokens"].update(eos="32000"), r"manifest.tokens.eos: expected a list"),
    (lambda m: m["tokens"].update(eos=["32000"]), r"manifest.tokens.eos\[0\]: expected int, got str"),
    (lambda m: m["config"].pop("hidden"), "manifest.config: missing key 'hidden'"),
    (lambda m: m["config"].update(max_context=0), "max_context must be at least 1"),
    (lambda m: m.pop("weights"), "missing key 'weights'"),
    (lambda m: m["graphs"]["com.decoder"]["initializers"].append("w.nothing"), "not in the weights table"),
    (lambda m: next(iter(m["weights"]["tensors"].values())).update(offset=4), "not on a 4096-byte boundary"),
])
def test_a_bad_manifest_is_refused(copy, edit, match):
    _edit_manifest(copy, edit)
    with pytest.raises(UserError, match=match):
        Bundle.open(copy, verify=False)


def _alias(manifest: dict, partial: bool) -> None:
    """Another tensor over the bytes of a float32 one: as int8 of the same bytes (what the store writes for equal
    bytes of two dtypes), or over its first half only."""
    tensors = manifest["weights"]["tensors"]
    name, t = next((n, t) for n, t in tensors.items() if t["dtype"] == "float32")
    count = int(np.prod(t["shape"])) * 4 // (2 if partial else 1)
    tensors[f"{name.rsplit('.', 2)[0]}.int8.{count}"] = {**t, "dtype": "int8", "shape": [count]}


def test_equal_bytes_of_two_dtypes_share_one_range(copy):
    _edit_manifest(copy, lambda m: _alias(m, partial=False))
    Bundle.open(copy)  # layout and content both hold


def test_a_partly_overlapping_tensor_is_refused(copy):
    _edit_manifest(copy, lambda m: _alias(m, partial=True))
    with pytest.raises(UserError, match="overlaps another"):
        Bundle.open(copy, verify=False)


def test_swapped_tensor_offsets_are_caught_by_content(copy):
    _edit_manifest(copy, swap_same_shape_offsets)
    Bundle.open(copy, verify=False)  # the layout is still plausible ...
    with pytest.raises(UserError, match="does not hold the bytes its name was made from"):
        Bundle.open(copy)  # ... the bytes are not


def test_a_symlink_out_of_the_bundle_is_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(copy / "tokenizer.json", outside)
    (copy / "tokenizer.json").symlink_to(outside)
    with pytest.raises(UserError, match="resolves outside the bundle"):
        Bundle.open(copy, verify=False)


def test_cli_refuses_a_tampered_manifest_in_one_line(copy, ct_small):
    _edit_manifest(copy, lambda m: m["graphs"]["com.embed"].update(file="/etc/passwd"))
    for args in (("ask", "--image", ct_small, "Hi?"), ("info",)):
        assert_user_error(run_cli(*args, "--bundle", copy), "manifest.json", "not hashed in `files`")


def test_info_prints_the_bundle_digest(m3_bundle):
    proc = run_cli("info", "--bundle", m3_bundle)
    assert proc.returncode == 0, proc.stderr
    assert f"sha256 {hashlib.sha256((m3_bundle / MANIFEST).read_bytes()).hexdigest()}" in proc.stdout


##### 7. a checkpoint whose config does not match its weights #####

def _broken_checkpoint(m3_checkpoint: Path, tmp_path: Path, edit) -> Path:
    ck = shutil.copytree(m3_checkpoint, tmp_path / "ck")
    edit(ck)
    return ck


def _config(path: Path, **changes):
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(json.dumps(cfg))


BASE, CLIP = "Phi-3-mini-4k-instruct", "clip-vit-large-patch14-336"


@pytest.mark.parametrize("edit,match", [
    (lambda ck: _config(ck / CLIP / "config.json", **{"vision_config.num_hidden_layers": 2}),
     r"CLIP at .*unexpected keys \(vision_model.encoder.layers.2"),
    (lambda ck: _config(ck / CLIP / "config.json", **{"vision_config.num_hidden_layers": -1}),
     "num_hidden_layers must be a positive integer, got -1"),
    (lambda ck: _config(ck / BASE / "config.json", hidden_size=-64), "hidden_size must be a positive integer"),
    (lambda ck: _config(ck / BASE / "config.json", num_attention_heads=0), "num_attention_heads must be a positive"),
    (lambda ck: (ck / BASE / "config.json").write_text("{oops"), "config.json is not readable JSON"),
    (lambda ck: (ck / BASE / "generation_config.json").unlink(), "generation_config.json is missing"),
    (lambda ck: (ck / "HealthGPT-M3" / "com_hlora_weights.bin").write_bytes(b""), "cannot be loaded safely"),
    (lambda ck: next((ck / BASE).glob("*.safetensors")).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{"),
     "cannot load the base LLM"),
])
def test_a_checkpoint_that_does_not_add_up_is_refused(m3_checkpoint, tmp_path, edit, match):
    ck = _broken_checkpoint(m3_checkpoint, tmp_path, edit)
    with pytest.raises(UserError, match=match):
        load_reference(ck, "com")


def test_unused_tensors_in_a_release_file_are_an_error(m3_checkpoint, tmp_path):
    import torch

    def add_stray(ck):
        path = ck / "HealthGPT-M3" / "com_hlora_weights.bin"
        sd = torch.load(path, weights_only=True)
        sd["base_model.model.model.layers.99.mlp.down_proj.lora_A.weight"] = torch.zeros(2, 2)
        torch.save(sd, path)

    ck = _broken_checkpoint(m3_checkpoint, tmp_path, add_stray)
    with pytest.raises(UserError, match=r"has unexpected 1 key\(s\): .*layers.99"):
        load_reference(ck, "com")


##### 10. what can be checked is checked before the work #####

def test_generate_checks_room_for_the_image_tokens_first(pipe, scans, monkeypatch):
    small = dataclasses.replace(pipe.bundle.manifest,
                                config=dataclasses.replace(pipe.bundle.manifest.config, max_context=1200))
    tight = Pipeline(Bundle(pipe.bundle.root, small, pipe.bundle.digest), pipe.backend)
    calls = []
    graphs = tight.task(GEN.name)
    for name in ("vision", "embed", "decoder"):
        monkeypatch.setattr(getattr(graphs, name), "run", lambda feeds, name=name: calls.append(name))
    with pytest.raises(UserError, match=r"would reach \d+ tokens; this bundle holds at most 1200: a \d+-token prompt "
                                        r"and 1024 image tokens"):
        tight.image_tokens(scans[0], "Reconstruct the image.", constrain_image_tokens=True)
    assert calls == []


##### 8. Ctrl-C in build.py is one line, not a traceback #####

def test_ctrl_c_during_export_exits_130_quietly(m3_checkpoint, tmp_path, monkeypatch, capsys):
    import build
    import export.compile.bundle as eb

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(eb, "export_bundle", interrupted)
    assert build.main(["export", "--checkpoint", str(m3_checkpoint), "--out", str(tmp_path / "b")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
