"""Inputs and budgets (issue 24, class 7): the Python API refuses the budgets the CLI refuses; the calibration set is
checked by content against the held-out images, and a FIFO among its inputs is named. Served budgets past int32:
test_serving.py; one-colour images: test_image_inputs.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import assert_user_error

from calibration import data
from runtime.contract.errors import UserError
from runtime.core.backend import OrtBackend
from runtime.core.bundle import Bundle
from runtime.core.image import load_image
from runtime.core.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe(m3_bundle):
    return Pipeline(Bundle.open(m3_bundle), OrtBackend("cpu", threads=1))


@pytest.mark.parametrize("budget", [0, -5, True, 2.5, "8"])
def test_the_python_api_refuses_a_budget_the_cli_refuses(pipe, ct_small, budget, monkeypatch):
    runs = []
    for task in ("com", "gen"):
        graphs = pipe.task(task)
        monkeypatch.setattr(graphs.decoder, "run", lambda feeds: runs.append(feeds))
    image = load_image(ct_small)
    with pytest.raises(UserError, match=rf"max_new_tokens {budget!r}: need a positive integer"):
        pipe.ask(image, "What is shown?", max_new_tokens=budget)
    with pytest.raises(UserError, match="need a positive integer"):
        pipe.image_tokens(image, "Reconstruct the image.", max_new_tokens=budget)
    assert runs == []  # refused before any work


def test_a_budget_of_one_is_one_token(pipe, ct_small):
    from runtime.contract.healthgpt import COM

    assert len(pipe.tokens(COM, load_image(ct_small), "What is shown?", 1)) <= 1


def _calibrate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "build.py", "calibrate", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_a_copy_of_a_held_out_image_is_refused_by_content(m3_bundle, tmp_path, ct_small):
    import pydicom

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(data.default_images()[0], images / "mr.dcm")
    shutil.copy(ct_small, images / "my_ct.dcm")  # the held-out CT under another name
    out = tmp_path / "q"
    assert_user_error(_calibrate("--bundle", m3_bundle, "--out", out, "--scheme", "int8", "--images", images),
                      "my_ct.dcm is (a copy of) an image held out")
    ds = pydicom.dcmread(ct_small)
    ds.PatientName = "Someone^Else"  # other bytes, the same pixels
    ds.save_as(images / "my_ct.dcm")
    with pytest.raises(UserError, match="my_ct.dcm is \\(a copy of\\) an image held out"):
        data.load_set([images])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_a_fifo_among_the_images_is_named(m3_bundle, tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.png")
    proc = _calibrate("--bundle", m3_bundle, "--out", tmp_path / "q", "--scheme", "int8", "--images",
                      tmp_path / "pipe.png", *data.default_images()[:2])
    assert_user_error(proc, f"calibration image {tmp_path / 'pipe.png'}: is a named pipe (FIFO), not an image file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.png"]
