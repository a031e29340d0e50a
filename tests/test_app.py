"""The workstation app in a real browser: Debian's chromium, headless, driven by Playwright, on the tiny M3 bundle.

The app runs in this process (uvicorn on a free port of 127.0.0.1) so the test can watch what reaches the model:
the pixel_values fed to the com vision graph. Expected answers and images come from a second Pipeline opened on
the same bundle with the same settings. Screenshots of every state go to artifacts/app/ (git-ignored).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/setup.sh does it)")
uvicorn = pytest.importorskip("uvicorn", reason="the app extra is not installed (scripts/setup.sh does it)")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it when run as root)",
                allow_module_level=True)

from runtime.core.backend import OrtBackend  # noqa: E402
from runtime.core.bundle import Bundle, file_digest
from runtime.core.clip_input import preprocess  # noqa: E402
from runtime.core.image import load_image  # noqa: E402
from runtime.core.pipeline import Pipeline  # noqa: E402
from runtime.frontends.app.audit import AuditLog  # noqa: E402
from runtime.frontends.app.model import LocalModel  # noqa: E402
from runtime.frontends.app.server import bind, create_app  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "app"
LUNG = (-600.0, 1500.0)
QUESTION = "What abnormality is visible in this CT scan?"
INSTRUCTION = "Reconstruct the image."
# Chromium phones home (updates, safe browsing, sync) unless told not to; the test also records every request.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]


def pydicom_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file(name, download=False)


class Served:
    """The app on a free port, with its model's com graphs watched: vision inputs recorded, decoding slowable."""

    def __init__(self, bundle: Path, audit_path: Path):
        self.model = LocalModel.open(bundle, "ort", "cpu")
        self.pixel_values: list[np.ndarray] = []
        self.decoder_runs = 0
        self.slow = threading.Event()  # set: each decode step takes 100 ms more, so a person could press stop
        com = self.model.pipe.task("com")
        vision_run, decoder_run = com.vision.run, com.decoder.run

        def watched_vision(feeds):
            self.pixel_values.append(feeds["pixel_values"].copy())
            return vision_run(feeds)

        def watched_decoder(feeds):
            self.decoder_runs += 1
            if self.slow.is_set():
                time.sleep(0.1)
            return decoder_run(feeds)

        com.vision.run, com.decoder.run = watched_vision, watched_decoder
        self.audit_path = audit_path
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(self.model, AuditLog(audit_path), ["127.0.0.1"]), log_level="warning",
                                access_log=False, http="h11", ws="none", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the app did not start"
            time.sleep(0.1)

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(m3_bundle, tmp_path_factory):
    s = Served(m3_bundle, tmp_path_factory.mktemp("app") / "audit.jsonl")
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(m3_bundle):
    """The expected outputs: the public Pipeline API, opened as the app opens it."""
    return Pipeline(Bundle.open(m3_bundle), OrtBackend("cpu", prepack=False))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)  # fresh profile each run
        yield b
        b.close()


@pytest.fixture
def page(browser, served):
    """A fresh page on the app; every request the browser makes is recorded in page.requests."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.requests = []
    context.on("request", lambda r: page.requests.append(r.url))
    page.set_default_timeout(60_000)
    page.goto(served.url + "/")
    wait_until(page, "() => document.getElementById('model').textContent.includes('fp32')")
    yield page
    context.close()


def wait_until(page, js: str, arg=None, timeout: float = 60) -> None:
    """Poll a JS function until it returns true (Playwright's wait_for_function evaluates strings, which the app's
    Content-Security-Policy forbids, as it should)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(js, arg):
        assert time.monotonic() < deadline, f"timed out waiting for {js}"
        time.sleep(0.02)


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def only_own_host(page, served) -> None:
    assert page.requests, "no requests recorded"
    foreign = [u for u in page.requests if not (u.startswith(served.url + "/") or u.startswith("blob:" + served.url))]
    assert not foreign, f"the page reached other hosts: {foreign}"


def shown(page, selector: str) -> np.ndarray:
    """The pixels of an <img> as the browser decoded them (RGB)."""
    w, h, data = page.evaluate("""(sel) => {
        const img = document.querySelector(sel), c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data;
        let s = ''; for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode(...d.subarray(i, i + 8192));
        return [c.width, c.height, btoa(s)]; }""", selector)
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(h, w, 4)[..., :3]


def wait_new_image(page, selector: str, previous: str | None) -> str:
    wait_until(page, "([sel, prev]) => { const i = document.querySelector(sel);"
                           " return !i.hidden && i.src && i.src !== prev && i.complete && i.naturalWidth > 0; }",
                           [selector, previous])
    return page.get_attribute(selector, "src")


def open_file(page, path, previous: str | None = None) -> str:
    page.set_input_files("#file", str(path))
    return wait_new_image(page, "#scan", previous)


def wait_status(page, selector: str, word: str) -> str:
    wait_until(page, "([sel, word]) => document.querySelector(sel).textContent.startsWith(word)",
                           [selector, word])
    return page.text_content(selector)


def ask(page, question: str, max_tokens: int, wait_for: str = "done") -> str:
    page.fill("#question", question)
    page.fill("#max-tokens", str(max_tokens))
    page.click("#ask")
    return wait_status(page, "#ask-status", wait_for)


def expected_answer(reference, image, question, max_tokens) -> tuple[str, int]:
    tokens = []
    answer = reference.ask(image, question, max_new_tokens=max_tokens, on_token=tokens.append)
    return answer, len(tokens)


def test_workstation_session(page, served, reference, m3_bundle):
    """Open CT_small, lung preset, ask (streamed), stop a long answer, generate; the audit log has it all."""
    ct = pydicom_file("CT_small.dcm")
    screenshot(page, "01-loaded")
    assert "m3 · fp32 · ort on CPUExecutionProvider" in page.text_content("#model")
    banner = page.text_content("#parity-banner")  # the fixture bundle was never verified: say so, loudly
    assert page.is_visible("#parity-banner") and "PARITY NOT VERIFIED" in banner and "build.py verify" in banner
    lung = _open_ct_in_the_lung_window(page, ct)

    want, n_tokens = expected_answer(reference, Image.fromarray(lung), QUESTION, 24)
    assert n_tokens >= 8, "the fixture model stops too early to test stopping"
    stopped_at, partial = _stop_a_long_answer(page, served, want)

    # Ask: the streamed answer is Pipeline.ask's on the windowed image, and the model saw exactly those pixels
    # (once: the stopped turn's conversation already holds the image rows).
    status = ask(page, QUESTION, 24)
    answer = page.text_content("#answer")
    assert answer == want and answer
    assert len(served.pixel_values) == 1
    assert np.array_equal(served.pixel_values[0], preprocess(Image.fromarray(lung)))
    assert re.fullmatch(r"done in \d+\.\d\d s", status)
    assert re.fullmatch(r"first token \d+\.\d{3} s", page.text_content("#ttft"))
    assert re.fullmatch(r"\d+\.\d tokens/s", page.text_content("#rate"))
    assert page.text_content("#tokens") == f"{n_tokens} tokens"
    screenshot(page, "05-answer")

    png = _generate_from_the_image_in_view(page, served, reference, lung)
    _check_the_audit_log(served, m3_bundle, ct, (want, n_tokens), (stopped_at, partial), png)
    only_own_host(page, served)


def _open_ct_in_the_lung_window(page, ct: str) -> np.ndarray:
    """The file's own window shown as the model gets it, its tags (the name masked until asked), the lung preset."""
    src = open_file(page, ct)
    file_window = shown(page, "#scan")
    assert np.array_equal(file_window, np.asarray(load_image(ct)))
    assert page.text_content("#tag-modality") == "CT" and page.text_content("#tag-study_date") == "2004-01-19"
    assert page.text_content("#tag-patient_name") == "••••••"  # masked until asked
    page.click("#reveal")
    assert page.text_content("#tag-patient_name") == "CompressedSamples^CT1"
    page.click("#reveal")
    screenshot(page, "02-ct-file-window")

    page.click("button[data-preset='lung']")
    wait_new_image(page, "#scan", src)
    lung = shown(page, "#scan")
    assert not np.array_equal(lung, file_window)
    assert np.array_equal(lung, np.asarray(load_image(ct, window=LUNG)))
    assert (page.input_value("#center"), page.input_value("#width")) == ("-600", "1500")
    screenshot(page, "03-lung")
    return lung


def _stop_a_long_answer(page, served, want: str) -> tuple[int, str]:
    """Stop really stops the decode loop: no decoder step runs after it, far short of the budget."""
    served.pixel_values.clear()
    served.slow.set()
    try:
        ask(page, QUESTION, 1000, wait_for="running")
        wait_until(page, "() => parseInt(document.getElementById('tokens').textContent) >= 3")
        assert page.text_content("#ask-status") == "running…"  # the tokens stream in while it runs
        page.click("#ask-stop")
        wait_status(page, "#ask-status", "stopped")
        runs = served.decoder_runs
        time.sleep(0.5)
        assert served.decoder_runs == runs
        stopped_at = int(page.text_content("#tokens").split()[0])
        assert 3 <= stopped_at < 24
        partial = page.text_content("#answer")
        assert partial and want.startswith(partial)  # greedy: the same answer, cut short
    finally:
        served.slow.clear()
    screenshot(page, "04-stopped")
    return stopped_at, partial


def _generate_from_the_image_in_view(page, served, reference, lung: np.ndarray) -> bytes:
    """Progress over 1024 image tokens, then the image beside the input equals Pipeline.generate_image."""
    page.click("#generate")
    wait_until(page, "() => document.getElementById('progress').value >= 64")
    screenshot(page, "06-generating")
    wait_status(page, "#generate-status", "done")
    assert page.evaluate("[document.getElementById('progress').value, document.getElementById('progress').max]") == \
        [1024, 1024]
    out_src = wait_new_image(page, "#generated", None)
    want_img = reference.generate_image(Image.fromarray(lung), INSTRUCTION, constrain_image_tokens=True)
    assert np.array_equal(shown(page, "#generated"), want_img)
    png = urllib.request.urlopen(served.url + out_src).read()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), want_img)
    screenshot(page, "07-generated")
    return png


def _check_the_audit_log(served, m3_bundle, ct: str, answered: tuple[str, int], stopped_turn: tuple[int, str],
                         png: bytes) -> None:
    (want, n_tokens), (stopped_at, partial) = answered, stopped_turn
    records = served.audit()
    manifest = file_digest(m3_bundle / "manifest.json")
    ct_sha = hashlib.sha256(Path(ct).read_bytes()).hexdigest()
    asked = [r for r in records if r["task"] == "com" and r["status"] == "done" and r["answer"] == want]
    stopped = [r for r in records if r["task"] == "com" and r["status"] == "stopped"]
    made = [r for r in records if r["task"] == "gen" and r.get("output_sha256") == hashlib.sha256(png).hexdigest()]
    assert len(asked) == 1 and len(stopped) == 1 and len(made) == 1
    for r in asked + stopped + made:
        assert r["input_sha256"] == ct_sha and r["bundle_manifest_sha256"] == manifest
        assert r["window"] == list(LUNG) and r["frame"] == 0 and r["duration_s"] > 0 and r["time"].endswith("+00:00")
    assert asked[0]["prompt"] == QUESTION and asked[0]["tokens"] == n_tokens
    assert stopped[0]["tokens"] == stopped_at and stopped[0]["answer"] == partial
    assert made[0]["prompt"] == INSTRUCTION and made[0]["status"] == "done" and made[0]["constrain_image_tokens"]
    assert not any("pixel" in key for r in records for key in r)


def test_user_errors_show_in_the_page_and_the_app_keeps_working(page, served, reference, tmp_path):
    """A truncated DICOM and an over-long question each show their message; the next request works."""
    ct = pydicom_file("CT_small.dcm")
    src = open_file(page, ct)
    data = Path(ct).read_bytes()
    broken = tmp_path / "truncated.dcm"
    broken.write_bytes(data[: len(data) // 2])
    page.set_input_files("#file", str(broken))
    page.wait_for_selector("#error", state="visible")
    assert "truncated.dcm: corrupt or truncated DICOM pixel data" in page.text_content("#error-text")
    assert page.get_attribute("#scan", "src") == src  # the open image stays
    screenshot(page, "08-truncated-dicom")

    ask(page, "word " * 3000, 8, wait_for="failed")
    assert "this bundle holds at most 2048" in page.text_content("#error-text")
    screenshot(page, "09-question-too-long")

    ask(page, QUESTION, 8)
    assert page.is_hidden("#error")
    assert page.text_content("#answer") == expected_answer(reference, load_image(ct), QUESTION, 8)[0]
    only_own_host(page, served)


def test_multiframe_slider_feeds_the_frame_on_screen(page, served):
    path = pydicom_file("rtdose.dcm")  # 15 frames of 10x10
    src = open_file(page, path)
    assert page.is_visible("#frames") and page.text_content("#frame-label") == "1 / 15"
    page.eval_on_selector("#frame", "(e) => { e.value = 7; e.dispatchEvent(new Event('input')); }")
    wait_new_image(page, "#scan", src)
    assert page.text_content("#frame-label") == "8 / 15"
    frame = shown(page, "#scan")
    assert np.array_equal(frame, np.asarray(load_image(path, frame=7)))
    assert not np.array_equal(frame, np.asarray(load_image(path, frame=0)))
    served.pixel_values.clear()
    ask(page, QUESTION, 2)
    assert np.array_equal(served.pixel_values[0], preprocess(Image.fromarray(frame)))
    screenshot(page, "10-multiframe")
    only_own_host(page, served)


def run_cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "runtime", "app", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_cli_serves_the_page_and_leaves_on_ctrl_c(m3_bundle, tmp_path):
    proc = run_cli("--bundle", str(m3_bundle), "--port", "0", "--providers", "cpu",
                   "--audit-log", str(tmp_path / "audit.jsonl"))
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line + proc.stderr.read()
        page = urllib.request.urlopen(url.group(0)).read().decode()
        assert "HealthGPT workstation" in page
        info = json.loads(urllib.request.urlopen(url.group(0) + "api/info").read())
        assert info["variant"] == "m3" and info["parity"]["status"] == "not verified"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err  # the CLI's exit status for an interrupt, as for `ask`
    assert "Traceback" not in err


def test_cli_user_errors(m3_bundle, tmp_path):
    from test_runtime import NO_TORCH  # the import blocker: every runtime.frontends.app module loads, torch never tries

    r = subprocess.run([sys.executable, "-c", NO_TORCH, "app", "--server", "http://127.0.0.1:9"],  # nobody there
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2 and r.stderr.startswith("error: server http://127.0.0.1:9 cannot be reached")
    assert "Traceback" not in r.stderr
    assert "blocked imports tried: []; loaded: []" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run_cli("--bundle", str(m3_bundle), "--port", str(busy.getsockname()[1]),
                    "--audit-log", str(tmp_path / "a.jsonl"))
        out, err = r.communicate(timeout=60)
    assert r.returncode == 2 and err.startswith("error: cannot listen on 127.0.0.1:") and "Traceback" not in err
    r = run_cli("--bundle", str(tmp_path / "nope"), "--port", "0", "--audit-log", str(tmp_path / "a.jsonl"))
    out, err = r.communicate(timeout=60)
    assert r.returncode == 2 and "manifest.json is missing" in err and "Traceback" not in err
