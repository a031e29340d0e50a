"""`python -m runtime`: each bad input is one `error: ...` line and exit 2 (never a traceback); ask streams, generate
writes a PNG, info describes the bundle, --help explains every option."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.contract.manifest import FORMAT_VERSION, MANIFEST
from runtime.frontends import cli

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What abnormality is visible in this scan?"


def run_cli(*args, timeout: float = 180, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", *(a if isinstance(a, bytes) else str(a) for a in args)],
                          cwd=ROOT, capture_output=True, text=True, errors="backslashreplace", timeout=timeout,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def shipped(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} does not ship with this pydicom"
    return path


def copy_bundle(bundle: Path, dest: Path) -> Path:
    """A copy of the bundle to break (links would not do: the runtime refuses a symlink leading out of the bundle,
    and a hard link would make onnx's checker refuse the session's own bundle as a potential hardlink attack)."""
    shutil.copytree(bundle, dest)
    return dest


# --- bad input ----------------------------------------------------------------------------------------------------

def test_missing_image(m3_bundle, tmp_path):
    missing = tmp_path / "scan.dcm"
    assert_user_error(run_cli("ask", "--bundle", m3_bundle, "--image", missing, QUESTION), str(missing),
                      "no such file")


def test_unreadable_image(m3_bundle, tmp_path):
    fake = tmp_path / "scan.png"
    fake.write_text("not a picture\n")
    assert_user_error(run_cli("ask", "--bundle", m3_bundle, "--image", fake, QUESTION), str(fake),
                      "not an image file")


def test_truncated_dicom(m3_bundle):
    assert_user_error(run_cli("ask", "--bundle", m3_bundle, "--image", shipped("MR_truncated.dcm"), QUESTION),
                      "MR_truncated.dcm", "truncated")


def test_frame_out_of_range(m3_bundle, ct_small):
    assert_user_error(run_cli("ask", "--bundle", m3_bundle, "--image", ct_small, "--frame", 3, QUESTION),
                      "frame 3 is out of range")


def test_overlong_prompt(m3_bundle, ct_small):
    question = " ".join(["word"] * 5000)
    proc = run_cli("ask", "--bundle", m3_bundle, "--image", ct_small, "--providers", "cpu", question)
    assert_user_error(proc, "context would reach", "at most 2048")
    assert proc.stdout == ""


def test_missing_bundle(tmp_path, ct_small):
    assert_user_error(run_cli("ask", "--bundle", tmp_path / "nowhere", "--image", ct_small, QUESTION),
                      "is not a bundle", "manifest.json is missing")


def test_wrong_format_version(m3_bundle, tmp_path, ct_small):
    bundle = copy_bundle(m3_bundle, tmp_path / "b")
    manifest = json.loads((bundle / MANIFEST).read_text())
    for version in (1, 999):  # 1: a bundle exported before the typed manifest
        manifest["format_version"] = version
        (bundle / MANIFEST).write_text(json.dumps(manifest))
        for args in (("ask", "--image", ct_small, QUESTION), ("info",)):
            assert_user_error(run_cli(*args, "--bundle", bundle), f"format version {version}",
                              f"reads version {FORMAT_VERSION}", "re-export")


def test_corrupt_graph_file(m3_bundle, tmp_path, ct_small):
    graph = json.loads((m3_bundle / MANIFEST).read_text())["graphs"]["com.decoder"]["file"]
    bundle = copy_bundle(m3_bundle, tmp_path / "b")
    data = bytearray((bundle / graph).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / graph).write_bytes(bytes(data))
    assert_user_error(run_cli("ask", "--bundle", bundle, "--image", ct_small, QUESTION), graph, "corrupt")
    info = run_cli("info", "--bundle", bundle)  # info still describes the bundle, then refuses it
    assert "com.decoder" in info.stdout
    assert_user_error(info, graph, "corrupt")


def test_unloadable_provider_is_one_line(m3_bundle, ct_small):
    proc = run_cli("ask", "--bundle", m3_bundle, "--image", ct_small, "--providers", "cuda", "--max-new-tokens", 2,
                   QUESTION)
    if proc.returncode != 0:  # no usable CUDA here (the usual case on CPU machines): say so, and why
        assert_user_error(proc, "CUDAExecutionProvider was requested but could not be loaded")
        assert proc.stdout == ""


@pytest.mark.parametrize("args,fragment", [
    (("--temperature", "-1"), "argument --temperature: must be 0"),
    (("--top-p", "0"), "argument --top-p: must be in (0, 1]"),
    (("--top-k", "x"), "argument --top-k: not an integer"),
    (("--max-new-tokens", "0"), "argument --max-new-tokens: must be at least 1"),
    (("--max-new-tokens", "-1"), "argument --max-new-tokens: must be at least 1"),
    (("--seed", "-1"), "argument --seed: must be 0 or more"),  # numpy refuses negative seeds
    (("--providers", "gpu"), "argument --providers: invalid choice"),
])
def test_bad_options(m3_bundle, ct_small, args, fragment):
    assert_user_error(run_cli("ask", "--bundle", m3_bundle, "--image", ct_small, *args, QUESTION), fragment)


def test_generate_refuses_non_png_before_generating(m3_bundle, ct_small, tmp_path):
    proc = run_cli("generate", "--bundle", m3_bundle, "--image", ct_small, "x", "--out", tmp_path / "out.jpg")
    assert_user_error(proc, "PNG only")
    assert "loaded" not in proc.stderr  # refused before the bundle was even opened


def test_unconstrained_generate_on_random_weights(m3_bundle, ct_small, tmp_path):
    out = tmp_path / "out.png"
    proc = run_cli("generate", "--bundle", m3_bundle, "--image", ct_small, "--providers", "cpu",
                   "--max-new-tokens", "8", "Reconstruct the image.", "--out", out)
    assert_user_error(proc, "produced", "image tokens", "--constrain-image-tokens")
    assert not out.exists()


def test_bundle_that_is_a_file(m3_bundle, ct_small):
    assert_user_error(run_cli("ask", "--bundle", m3_bundle / MANIFEST, "--image", ct_small, QUESTION),
                      "argument --bundle", "is a file, not a bundle directory")


@pytest.mark.parametrize("question,fragment", [
    (b"What is \xff\xfe here?", "not valid UTF-8 text (byte 0xFF at character 8)"),  # argv in another encoding
    ("<image>\nWhat is this?", "remove <image> from the question"),
])
def test_question_refused_before_loading(m3_bundle, ct_small, question, fragment):
    for command in (("ask", question), ("generate", question, "--out", "never.png")):
        proc = run_cli(*command, "--bundle", m3_bundle, "--image", ct_small)
        assert_user_error(proc, fragment)
        assert "loaded" not in proc.stderr and proc.stdout == ""
    assert not (ROOT / "never.png").exists()


def test_image_must_be_a_regular_file(m3_bundle, tmp_path):
    os.mkfifo(tmp_path / "scan.dcm")  # reading it would block until a writer comes
    for path, kind in ((tmp_path / "scan.dcm", "a named pipe (FIFO)"), (tmp_path, "a directory"),
                       (os.devnull, "a device")):
        proc = run_cli("ask", "--bundle", m3_bundle, "--image", path, QUESTION, timeout=60)
        assert_user_error(proc, str(path), f"is {kind}: only regular image files are read")
    assert os.listdir(tmp_path) == ["scan.dcm"]


def broken_dicoms(tmp_path):
    import pydicom

    deflated = Path(shipped("image_dfl.dcm")).read_bytes()
    (tmp_path / "deflated.dcm").write_bytes(deflated[: len(deflated) // 2])
    palette = pydicom.dcmread(shipped("examples_palette.dcm"))
    del palette.RedPaletteColorLookupTableData
    palette.save_as(tmp_path / "palette.dcm")
    empty = pydicom.dcmread(shipped("CT_small.dcm"))
    empty.PixelData = b""
    empty.save_as(tmp_path / "empty.dcm")
    slope = pydicom.dcmread(shipped("CT_small.dcm"))
    slope.RescaleSlope = 0
    slope.save_as(tmp_path / "slope0.dcm")
    Image.fromarray(np.full((32, 32), 60000, np.uint16)).save(tmp_path / "flat16.png")
    return {"deflated.dcm": "truncated", "palette.dcm": "PALETTE COLOR image without a usable colour lookup table",
            "empty.dcm": "pixel data element is empty", "slope0.dcm": "invalid RescaleSlope",
            "flat16.png": "the image is flat"}


def test_broken_images_are_one_line(m3_bundle, tmp_path):
    for name, fragment in broken_dicoms(tmp_path).items():
        proc = run_cli("ask", "--bundle", m3_bundle, "--image", tmp_path / name, QUESTION)
        assert_user_error(proc, name, fragment)
        assert "loaded" not in proc.stderr and proc.stdout == ""


def test_generate_refuses_an_unwritable_out_before_generating(m3_bundle, ct_small, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder\n")
    (tmp_path / "dir.png").mkdir()
    for out, fragment in ((tmp_path / "file" / "x.png", "Not a directory"), (tmp_path / "dir.png", "is a directory"),
                          (Path("/proc/healthgpt/x.png"), "cannot write into /proc")):
        proc = run_cli("generate", "--bundle", m3_bundle, "--image", ct_small, "--constrain-image-tokens", "x",
                       "--out", out)
        assert_user_error(proc, str(out), fragment)
        assert "loaded" not in proc.stderr  # refused before the bundle was opened
    assert sorted(os.listdir(tmp_path)) == ["dir.png", "file"] and os.listdir(tmp_path / "dir.png") == []


def signal_handled(pid: int, signum: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signum - 1) & 1)


def stack_dump_on_sigusr1(command: list[str]) -> subprocess.CompletedProcess:
    """Start `command`, wait until it handles SIGUSR1, send it, and let the command finish."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and not signal_handled(proc.pid, signal.SIGUSR1) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_sigusr1_dumps_the_stacks_and_goes_on(m3_bundle, ct_small):
    proc = stack_dump_on_sigusr1([sys.executable, "-m", "runtime", "ask", "--bundle", str(m3_bundle), "--image",
                                  ct_small, "--providers", "cpu", QUESTION])
    assert proc.returncode == 0, proc.stderr
    assert "Current thread" in proc.stderr and 'File "' in proc.stderr and "time to first token" in proc.stderr


def test_a_stuck_decoder_is_bounded_and_shows_where(m3_bundle, ct_small):
    stuck = ("import sys, time, runtime.frontends.cli as cli, runtime.core.image as image\n"
             "cli.DECODE_LIMIT_S = 1\n"
             "def load_image(*args, **kwargs):\n"
             "    time.sleep(120)  # stands in for a decoder that never returns\n"
             "image.load_image = load_image\n"
             f"sys.exit(cli.main(['ask', '--bundle', {str(m3_bundle)!r}, '--image', {ct_small!r}, 'q']))\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", stuck], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 1 and "Timeout (0:00:01)!" in proc.stderr and "in load_image" in proc.stderr


# --- what works ---------------------------------------------------------------------------------------------------

def test_ask_streams_the_answer(m3_bundle, ct_small):
    from runtime.core.backend import OrtBackend
    from runtime.core.bundle import Bundle
    from runtime.core.pipeline import Pipeline

    proc = run_cli("ask", "--bundle", m3_bundle, "--image", ct_small, "--providers", "cpu", "--max-new-tokens", "16",
                   QUESTION)
    assert proc.returncode == 0, proc.stderr
    answer = Pipeline(Bundle.open(m3_bundle), OrtBackend("cpu")).ask(ct_small, QUESTION, max_new_tokens=16)
    assert answer and proc.stdout == answer + "\n"
    assert "time to first token" in proc.stderr and "tokens/s" in proc.stderr and "(16 tokens" in proc.stderr


def test_chat_answers_follow_ups_from_standard_input(m3_bundle, ct_small):
    from runtime.core.backend import OrtBackend
    from runtime.core.bundle import Bundle
    from runtime.core.pipeline import Pipeline

    questions = [QUESTION, "Is it serious?"]
    proc = run_cli("chat", "--bundle", m3_bundle, "--image", ct_small, "--providers", "cpu", "--max-new-tokens", "10",
                   stdin=f"{questions[0]}\n\n{questions[1]}\n")
    assert proc.returncode == 0, proc.stderr
    conversation = Pipeline(Bundle.open(m3_bundle), OrtBackend("cpu")).conversation(ct_small)
    assert proc.stdout == "".join(conversation.ask(q, 10).answer + "\n" for q in questions)
    assert proc.stderr.count("time to first token") == 2
    bad = run_cli("chat", "--bundle", m3_bundle, "--image", ct_small, "--providers", "cpu", "--max-new-tokens", "2",
                  stdin=f"{QUESTION}\n<image> again\nnever asked\n")
    assert_user_error(bad, "remove <image> from the question")  # from a pipe, the first mistake ends the chat
    assert bad.stderr.count("time to first token") == 1


class Recorder:
    def __init__(self):
        self.writes, self.flushes = [], 0

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        self.flushes += 1


def test_ask_writes_each_piece_as_it_comes(m3_bundle, ct_small, monkeypatch):
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["ask", "--bundle", str(m3_bundle), "--image", ct_small, "--providers", "cpu",
                     "--max-new-tokens", "12", QUESTION]) == 0
    pieces = [w for w in out.writes if w]
    assert len(pieces) >= 6  # one write per printable token (a few wait for the next byte of a character)
    assert out.flushes >= len(pieces)
    assert "".join(out.writes).endswith("\n")


def test_generate_writes_a_png(m3_bundle, ct_small, tmp_path):
    out = tmp_path / "sub" / "reconstruction.png"
    proc = run_cli("generate", "--bundle", m3_bundle, "--image", ct_small, "--providers", "cpu",
                   "--constrain-image-tokens", "Reconstruct the image.", "--out", out)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        assert (im.format, im.size, im.mode) == ("PNG", (256, 256), "RGB")
        assert np.asarray(im).std() > 0
    assert str(out) in proc.stdout
    assert "1024/1024" in proc.stderr and "s per image" in proc.stderr


def test_info_describes_the_bundle(m3_bundle):
    proc = run_cli("info", "--bundle", m3_bundle)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for needle in ("variant       m3", "com (H-LoRA rank 64", "gen (H-LoRA rank 256", "precision     fp32",
                   "max context   2048", "com.decoder", "gen.decoder", "gen.vision", "shared.vqgan",
                   "pixel_values float32 [1, 3, 336, 336]", "inputs_embeds float32 [1, seq=1..2048, 64]",
                   "past_key_values.{0..1}.{key,value} float32 [cache=1..2048, 4, 16] (4 tensors)",
                   "image uint8 [1, 256, 256, 3]", "weights.bin", "TensorRT engines: none",
                   "CPUExecutionProvider       loadable", "integrity     all"):
        assert needle in text, needle


def test_frame_and_window_reach_the_image_loader(ct_small):
    from runtime.core.image import load_image

    parse = cli.build_parser().parse_args
    dose = shipped("rtdose.dcm")  # 15 frames
    a = parse(["ask", "--bundle", "b", "--image", dose, "--frame", "5", "q"])
    assert np.array_equal(np.asarray(cli._load_input(a)), np.asarray(load_image(dose, frame=5)))
    assert not np.array_equal(np.asarray(cli._load_input(a)), np.asarray(load_image(dose)))
    a = parse(["ask", "--bundle", "b", "--image", ct_small, "--window", "40", "400", "q"])
    assert np.array_equal(np.asarray(cli._load_input(a)), np.asarray(load_image(ct_small, window=(40.0, 400.0))))
    assert not np.array_equal(np.asarray(cli._load_input(a)), np.asarray(load_image(ct_small)))
    with pytest.raises(cli.UserError, match="need an --image"):
        cli._load_input(parse(["ask", "--bundle", "b", "--frame", "1", "q"]))


def test_help_explains_every_option():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    assert set(subparsers) == {"ask", "chat", "generate", "info", "prepare", "app", "triton", "serve"}
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help and action.help != "==SUPPRESS==", f"{name} {action.option_strings or action.dest}"
    proc = run_cli("generate", "--help")
    assert proc.returncode == 0
    for option in ("--bundle", "--backend", "--providers", "--image", "--frame", "--window", "--max-new-tokens",
                   "--temperature", "--top-k", "--top-p", "--seed", "--out", "--constrain-image-tokens"):
        assert option in proc.stdout, option


def test_interrupt_exits_130_quietly(m3_bundle, ct_small, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "generate", "--bundle", str(m3_bundle), "--image",
                             ct_small, "--providers", "cpu", "--constrain-image-tokens", "x", "--out",
                             str(tmp_path / "x.png")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = b"", time.monotonic() + 120
    while b"image tokens" not in seen and time.monotonic() < deadline:  # interrupt mid-generation
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert b"image tokens" in seen
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"error" not in err
    assert not (tmp_path / "x.png").exists()
