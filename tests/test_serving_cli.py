"""Serving from the command line: `python -m runtime serve` and `triton` (their own servers, started and stopped
here), the repository they write, and a tampered bundle refused at load."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from serving_support import FOLLOW_UP, INSTRUCTION, QUESTION, ROOT, expected, free_ports, scan

from runtime.contract.errors import UserError
from runtime.frontends.serving import repository
from runtime.frontends.serving.server import Server


def test_cli_serve_ask_generate(serving_env, m3_bundle, serving_pipe, tmp_path):
    """`python -m runtime serve` in this venv, `ask/generate --server` from the serving venv, SIGTERM to stop."""
    ports = free_ports()
    serve = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--bundle", str(m3_bundle), "--out",
                              str(tmp_path / "repo"), "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
                              "--metrics-port", str(ports.metrics), "--timeout", "120"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = serve.stdout.readline()
        assert line.startswith("[I] ready: gRPC"), (line, serve.stderr.read() if serve.poll() is not None else "")
        ct = scan("ct")["image"]
        cli = [str(serving_env.python), "-m", "runtime"]
        url = f"grpc://127.0.0.1:{ports.grpc}"
        ask = subprocess.run([*cli, "ask", "--server", url, "--image", ct, "--max-new-tokens", "12", QUESTION],
                             capture_output=True, text=True, cwd=ROOT, env=serving_env.environ(), timeout=120)
        assert ask.returncode == 0 and ask.stdout == expected(serving_pipe, image=ct, max_new_tokens=12)["text"] + "\n"
        chat = subprocess.run([*cli, "chat", "--server", url, "--image", ct, "--max-new-tokens", "12"],
                              input=f"{QUESTION}\n{FOLLOW_UP}\n", capture_output=True, text=True, cwd=ROOT,
                              env=serving_env.environ(), timeout=120)
        conversation = serving_pipe.conversation(ct)
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout == "".join(conversation.ask(q, 12).answer + "\n" for q in (QUESTION, FOLLOW_UP))
        out = tmp_path / "out.png"
        gen = subprocess.run([*cli, "generate", "--server", url, "--image", ct, "--constrain-image-tokens",
                              INSTRUCTION, "--out", out], capture_output=True, text=True, cwd=ROOT,
                             env=serving_env.environ(), timeout=120)
        assert gen.returncode == 0, gen.stderr
        want = expected(serving_pipe, "gen", INSTRUCTION, ct, constrain_image_tokens=True)["pixels"]
        assert np.array_equal(np.asarray(Image.open(out)), want)
        bad = subprocess.run([*cli, "ask", "--server", url, "--image", get_testdata_file("MR_truncated.dcm"), "q"],
                             capture_output=True, text=True, cwd=ROOT, env=serving_env.environ(), timeout=120)
        assert bad.returncode == 2 and bad.stderr.startswith("error: server") and "truncated" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(120)
    stderr = serve.stderr.read()
    pid = int(re.search(r"tritonserver pid (\d+)", stderr).group(1))
    assert code == 0 and "stopping tritonserver" in stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the server and its stubs are gone


def test_serve_without_out_removes_its_temporary_repository(serving_env, m3_bundle, tmp_path):
    ports, tmp = free_ports(), tmp_path / "tmp"
    tmp.mkdir()
    serve = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--bundle", str(m3_bundle), "--http-port",
                              str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
                              "--timeout", "120"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmp)})
    try:
        line = serve.stdout.readline()
        assert line.startswith("[I] ready: gRPC"), (line, serve.stderr.read() if serve.poll() is not None else "")
        assert len(list(tmp.glob("healthgpt-triton-*/healthgpt/config.pbtxt"))) == 1
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(120)
    # ours is gone (tritonserver leaves a `.ses` of its own in TMPDIR)
    assert code == 0 and list(tmp.glob("healthgpt-triton-*")) == [], serve.stderr.read()


def test_tampered_bundle_is_not_ready_with_integrity_error(serving_env, m3_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(m3_bundle, bundle)
    with open(bundle / "com.decoder.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    repo = repository.write(bundle, tmp_path / "repo")
    s = Server(serving_env, repo, free_ports()).start()
    try:
        with pytest.raises(UserError, match=r"failed to load.*com\.decoder\.onnx is corrupt \(sha256 differs"):
            s.wait_ready(300)
        assert not s.model_ready() and s.model_state()["state"] == "UNAVAILABLE"
        assert "com.decoder.onnx is corrupt (sha256 differs from the manifest)" in s.log.read_text()
        s.selftest()  # the server itself is up; only the model is not
    finally:
        s.stop()


def test_repository_config(m3_bundle, tmp_path):
    repo = repository.write(m3_bundle, tmp_path / "r", repository.Options(instances=3, kind="gpu", gpus=(0, 1)))
    config = (repo / "healthgpt" / "config.pbtxt").read_text()
    assert "instance_group [ { count: 3 kind: KIND_GPU gpus: [ 0, 1 ] } ]" in config
    assert f'key: "bundle" value {{ string_value: "{Path(m3_bundle).resolve()}" }}' in config
    assert 'key: "providers" value { string_value: "cuda" }' in config and "decoupled: true" in config
    assert "dims: [ 1024 ]" in config and not any(p.suffix in (".onnx", ".bin") for p in repo.rglob("*"))
    with pytest.raises(UserError, match="--kind gpu"):
        repository.write(m3_bundle, tmp_path / "t", repository.Options(backend="trt"))
    with pytest.raises(UserError, match="not a bundle"):
        repository.write(tmp_path, tmp_path / "u")
