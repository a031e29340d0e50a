"""The app's HTTP API without a browser (issue 24, classes 4 and 5): every model request, refused ones included, is
one ASCII audit line; a bad request is a 400 with one error, never a hang or a 500; the audit log must be a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn", reason="the app extra is not installed (scripts/setup.sh does it)")

from runtime.contract.errors import UserError
from runtime.frontends.app.audit import AuditLog
from runtime.frontends.app.model import LocalModel
from runtime.frontends.app.server import bind, create_app

ROOT = Path(__file__).resolve().parents[1]
PAGE = {"x-healthgpt-app": "1"}


class App:
    def __init__(self, bundle: Path, audit: Path):
        self.audit_path = audit
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = create_app(LocalModel.open(bundle, "ort", "cpu"), AuditLog(audit), ["127.0.0.1"])
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, http="h11",
                                                    ws="none", lifespan="on", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the app did not start"
            time.sleep(0.05)

    def call(self, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:  # nothing may hang
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def lines(self) -> list[bytes]:
        return self.audit_path.read_bytes().splitlines() if self.audit_path.exists() else []


@pytest.fixture(scope="module")
def app(m3_bundle, tmp_path_factory):
    a = App(m3_bundle, tmp_path_factory.mktemp("app") / "audit.jsonl")
    yield a
    a.server.should_exit = True
    a.thread.join(10)


@pytest.fixture(scope="module")
def scan(app, ct_small) -> dict:
    status, body = app.call("/api/scans", Path(ct_small).read_bytes(), {**PAGE, "x-filename": "CT_small.dcm"})
    assert status == 200, body
    return json.loads(body)


def ask(app: App, payload: dict | bytes, headers: dict | None = None) -> tuple[int, bytes]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return app.call("/api/ask", body, {**PAGE, "content-type": "application/json"} if headers is None else headers)


def events(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode("ascii").splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("payload,error", [
    ({"question": "Hi?", "scan": "SCAN", "frame": "x"}, "frame 'x': need an integer"),
    ({"question": "Hi?", "scan": "SCAN", "frame": 7}, "frame 7 is out of range"),
    ({"question": "Hi?", "scan": "SCAN", "window": [40, -1]}, "width > 0"),
    ({"question": "Hi?", "max_new_tokens": 0}, "max new tokens 0"),
    ({"question": "Hi?", "max_new_tokens": 2**40}, f"max new tokens {2**40}"),
    ({"question": "Hi?", "scan": "nope"}, "no longer held by the app"),
    ({"question": "lone \ud800 surrogate"}, "not valid UTF-8 text (U+D800 at character 5)"),
    (b"[" * 200_000, "request body is not JSON"),
    ({"question": "Hi?", "from": "elsewhere"}, "missing x-healthgpt-app header"),
], ids=["frame type", "frame range", "window", "zero budget", "huge budget", "unknown scan", "lone surrogate",
        "deep JSON", "not from the page"])
def test_a_refused_request_is_a_400_and_one_audit_line(app, scan, payload, error):
    before = app.lines()
    payload = dict(payload) if isinstance(payload, dict) else payload
    foreign = isinstance(payload, dict) and payload.pop("from", None) == "elsewhere"
    if isinstance(payload, dict):
        payload = {k: scan["id"] if v == "SCAN" else v for k, v in payload.items()}
    status, body = ask(app, payload, {"content-type": "application/json"} if foreign else None)
    assert status == 400 and error in json.loads(body)["error"], body
    lines = app.lines()
    assert lines[:len(before)] == before and len(lines) == len(before) + 1
    assert max(lines[-1]) < 128  # ASCII, whatever the question held
    record = json.loads(lines[-1])
    assert record["status"] == "refused" and error in record["error"] and record["task"] == "com"
    assert record["bundle_manifest_sha256"] and "pixel" not in str(record.keys())


def test_a_refused_generation_is_audited_too(app):
    before = app.lines()
    status, body = app.call("/api/generate", json.dumps({"instruction": "Reconstruct the image.", "scan": "gone"})
                            .encode(), {**PAGE, "content-type": "application/json"})
    assert status == 400 and "no longer held by the app" in json.loads(body)["error"]
    lines = app.lines()
    assert len(lines) == len(before) + 1
    record = json.loads(lines[-1])
    assert (record["task"], record["status"], record["prompt"]) == ("gen", "refused", "Reconstruct the image.")


def test_line_separators_in_a_question_are_escaped(app, scan):
    before = app.lines()
    question = "Any lesion?\u2028{\"status\":\"forged\"}\u0085 ok"
    status, body = ask(app, {"question": question, "scan": scan["id"], "max_new_tokens": 2})
    assert status == 200 and events(body)[-1]["type"] == "done", body
    raw = app.audit_path.read_bytes()
    assert len(raw.decode("ascii").splitlines()) == len(before) + 1  # even str.splitlines sees one record
    record = json.loads(app.lines()[-1])
    assert record["prompt"] == question and record["status"] == "done"


@pytest.mark.parametrize("query", ["center=1", "width=400", "center=1&width=0"])
def test_a_half_window_is_a_400(app, scan, query):
    status, body = app.call(f"/api/scans/{scan['id']}/image?{query}")
    assert status == 400 and "error" in json.loads(body), body
    status, body = app.call(f"/api/scans/{scan['id']}/image?center=40&width=400")
    assert status == 200 and body.startswith(b"\x89PNG")


def test_an_audit_log_that_is_a_fifo_is_refused_at_start_up(m3_bundle, tmp_path):
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "runtime", "app", "--bundle", str(m3_bundle), "--port", "0",
                           "--audit-log", str(fifo)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"audit log {fifo}" in errors[0] and "named pipe (FIFO)" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl"] and fifo.is_fifo()


def test_audit_log_appends_whole_lines_from_concurrent_writers(tmp_path):
    path = tmp_path / "logs" / "audit.jsonl"
    logs = [AuditLog(path), AuditLog(path)]  # two instances: as two app processes on one log

    def write(k: int) -> None:
        for i in range(40):
            logs[k % 2].write({"writer": k, "i": i, "prompt": f"{k}-{i} " + "x" * 20_000})

    threads = [threading.Thread(target=write, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["writer"], r["i"]) for r in records) == [(k, i) for k in range(6) for i in range(40)]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(UserError, match="cannot append"):
            AuditLog(tmp_path / "ro" / "audit.jsonl")
