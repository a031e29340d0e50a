"""`build.py`: argument mistakes and unusable inputs are one `error: ...` line and exit 2, found before torch is
imported (~11 s); `kill -USR1` prints the stacks of a running build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import ROOT, assert_user_error, shipped, stack_dump_on_sigusr1

# Runs build.main in a fresh interpreter and says on stdout whether torch got imported.
RUN = ("import sys, build\n"
       "try:\n    code = build.main(sys.argv[1:])\n"
       "except SystemExit as e:\n    code = e.code\n"
       "print('torch imported:', 'torch' in sys.modules)\n"
       "sys.exit(code)\n")


def run_build(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN, *(a if isinstance(a, bytes) else str(a) for a in args)],
                          cwd=ROOT, capture_output=True, text=True, errors="backslashreplace", timeout=120)


@pytest.mark.parametrize("args,fragment", [
    (("reference", "--checkpoint", "{ckpt}", "--image", "{ct}", "--max-new-tokens", "-1", "q"),
     "argument --max-new-tokens: must be at least 1, got -1"),
    (("reference", "--checkpoint", "{tmp}/nowhere", "--image", "{ct}", "q"), "nowhere: no such directory"),
    (("reference", "--checkpoint", "{ct}", "--image", "{ct}", "q"), "is not a directory"),
    (("synth", "--out", "{tmp}/c", "--seed", "-3"), "argument --seed: must be 0 or more"),
    (("synth", "--out", "{tmp}/c", "--seed", "x"), "argument --seed: not an integer"),
    (("export", "--checkpoint", "{ckpt}", "--out", "{tmp}/b", "--max-context", "0"),
     "--max-context: must be at least 1"),
    (("export", "--checkpoint", "{ckpt}", "--out", "{tmp}/b", "--tasks", "com,xyz"), "subset of com, gen"),
    (("verify", "--bundle", "{tmp}", "--checkpoint", "{ckpt}", "--steps", "-5"), "--steps: must be at least 1"),
    (("verify", "--bundle", "{tmp}", "--checkpoint", "{ckpt}", "--backends", "ort-cpu,gpu"),
     "subset of ort-cpu, ort-cuda, trt"),
    (("reference", "--checkpoint", "{ckpt}", "--image", "{tmp}", "q"), "is a directory: only regular image files"),
    (("reference", "--checkpoint", "{ckpt}", "--image", "{ct}", b"bad \xff"), "not valid UTF-8 text (byte 0xFF"),
    (("reference", "--checkpoint", "{ckpt}", "--image", "{ct}", "<image> q"), "remove <image> from the question"),
    (("reference", "--checkpoint", "{ckpt}", "--image", "{ct}", "--task", "gen", "--out", "{tmp}/x.jpg", "q"),
     "PNG only"),
    (("reference", "--checkpoint", "{ckpt}", "--image", "{ct}", "--task", "gen", "--out", "/proc/h/x.png", "q"),
     "cannot write into /proc"),
    (("reference", "--checkpoint", "{ckpt}", "--image", "{ct}", "--follow-up", "<image> q", "q"), "remove <image>"),
    (("reference", "--checkpoint", "{ckpt}", "--image", "{ct}", "--follow-ups", "{tmp}/none.json", "q"),
     "none.json: cannot read a JSON list of questions"),
    (("reference", "--checkpoint", "{ckpt}", "--image", "{ct}", "--follow-ups", "{ct}", "q"),
     "cannot read a JSON list of questions"),
    (("reference", "--checkpoint", "{ckpt}", "--image", "{ct}", "--task", "gen", "--follow-up", "q2", "q"),
     "--follow-up and --follow-ups are for the com task"),
])
def test_mistakes_are_one_line_before_torch(tmp_path, args, fragment):
    (tmp_path / "ckpt").mkdir()  # only has to exist: every mistake is found before the checkpoint is read
    fill = {"ckpt": tmp_path / "ckpt", "tmp": tmp_path, "ct": shipped("CT_small.dcm")}
    proc = run_build(*(a if isinstance(a, bytes) else a.format(**fill) for a in args))
    assert_user_error(proc, fragment)
    assert "torch imported: False" in proc.stdout
    assert os.listdir(tmp_path) == ["ckpt"] and os.listdir(tmp_path / "ckpt") == []  # nothing written


def test_sigusr1_dumps_the_stacks_of_a_build(tmp_path):
    proc = stack_dump_on_sigusr1([sys.executable, "build.py", "synth", "--out", str(tmp_path / "ckpt")])
    assert proc.returncode == 0, proc.stderr
    assert "Current thread" in proc.stderr and 'File "' in proc.stderr
    assert Path(tmp_path / "ckpt").is_dir()


def test_reference_runs_a_conversation(m3_checkpoint, m3_com, ct_small, tmp_path):
    from runtime.core.image import load_image

    (tmp_path / "more.json").write_text('["And the edges?"]')
    questions = ["What is this?", "Anything abnormal?", "And the edges?"]
    proc = run_build("reference", "--checkpoint", m3_checkpoint, "--image", ct_small, "--max-new-tokens", "6",
                     "--follow-up", questions[1], "--follow-ups", tmp_path / "more.json", questions[0])
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = m3_com.conversation(load_image(ct_small), questions, 6)
    lines = [f"{k}: {v}" for q, (_, t) in zip(questions, want)
             for k, v in (("Q", q), ("A", m3_com.tokenizer.decode(t, skip_special_tokens=True)))]
    assert proc.stdout.splitlines()[:6] == lines
