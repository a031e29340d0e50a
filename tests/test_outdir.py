"""--out never deletes, moves or writes through an input (issue 24, class 1): the OUT.partial / OUT.old swap of
export/outdir.py, and the calibrate / export / synth commands that use it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import assert_user_error

from export.outdir import PARTIAL_MARKER, staged
from runtime.contract.errors import UserError
from runtime.contract.manifest import FORMAT, MANIFEST

ROOT = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` (symlinks as their target) with its content's sha256: what was lost, moved or left."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("-> " + str(p.readlink()) if p.is_symlink() else
                    "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def fake_bundle(path: Path, note: str = "") -> Path:
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"format": FORMAT, "note": note}))
    return path


def build(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "build.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          check=False,
                          timeout=timeout)


def refused(out: Path, inputs: list[Path], match: str) -> None:
    """staged() refuses before any work, and nothing under out's folder changes."""
    before = tree(out.parent)
    with pytest.raises(UserError, match=match), staged(out, "bundle", inputs):
        raise AssertionError("the job ran")
    assert tree(out.parent) == before


def test_an_input_named_like_the_work_folders_is_never_touched(tmp_path):
    src = fake_bundle(tmp_path / "B.partial", "input")
    refused(tmp_path / "B", [src], r"would use .*B\.partial, which is the input")
    src = fake_bundle(tmp_path / "C.old", "input")  # OUT missing: the interrupted-swap recovery must not move it
    refused(tmp_path / "C", [src], r"would use .*C\.old, which is the input")
    inner = fake_bundle(tmp_path / "D.partial" / "inner", "input")  # a folder holding an input
    refused(tmp_path / "D", [inner], r"D\.partial, which is a folder holding the input")


def test_out_inside_an_input_or_through_a_link_is_refused(tmp_path):
    src = fake_bundle(tmp_path / "src", "input")
    refused(src / "q", [src], "is inside the input")
    (tmp_path / "alias").symlink_to(src)
    refused(tmp_path / "alias", [src], "is a symbolic link")
    refused(tmp_path / "alias" / "q", [src], "is inside the input")
    target = fake_bundle(tmp_path / "other", "someone's bundle")
    (tmp_path / "link").symlink_to(target)
    refused(tmp_path / "link", [src], r"--out .*link is a symbolic link \(to .*other\)")


def test_foreign_work_folders_are_refused_and_leftovers_cleared(tmp_path):
    (tmp_path / "B.partial").mkdir()
    (tmp_path / "B.partial" / "thesis.txt").write_text("keep me")
    refused(tmp_path / "B", [], r"refusing to delete .*B\.partial: it is not a leftover")
    (tmp_path / "C.old").mkdir()
    (tmp_path / "C.old" / "notes.txt").write_text("keep me")
    refused(tmp_path / "C", [], r"refusing to use .*C\.old: it is not a healthgpt-edge bundle")
    (tmp_path / "D.partial").symlink_to(tmp_path / "B.partial")
    refused(tmp_path / "D", [], r"refusing to delete .*D\.partial")
    fake_bundle(tmp_path / "F.partial", "a complete bundle someone named so")
    refused(tmp_path / "F", [], r"refusing to delete .*F\.partial: it is not a leftover")
    leftover = tmp_path / "E.partial"  # what a run killed by SIGKILL leaves
    leftover.mkdir()
    (leftover / PARTIAL_MARKER).mkdir()
    (leftover / "weights.bin").write_bytes(b"half")
    with staged(tmp_path / "E", "bundle", []) as tmp:
        assert tmp == leftover and sorted(p.name for p in tmp.iterdir()) == [PARTIAL_MARKER]
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT}))
    assert sorted(p.name for p in (tmp_path / "E").iterdir()) == [MANIFEST] and not leftover.exists()


def test_calibrate_onto_its_input_s_name_is_one_error_line(m3_bundle, tmp_path):
    src = shutil.copytree(m3_bundle, tmp_path / "B.partial")
    before = tree(tmp_path)
    proc = build("calibrate", "--bundle", src, "--out", tmp_path / "B", "--scheme", "int8")
    assert_user_error(proc, "B.partial, which is the input")
    shutil.move(src, tmp_path / "C.old")
    proc = build("calibrate", "--bundle", tmp_path / "C.old", "--out", tmp_path / "C", "--scheme", "int8")
    assert_user_error(proc, "C.old, which is the input")
    proc = build("calibrate", "--bundle", tmp_path / "C.old", "--out", tmp_path / "C.old" / "q", "--scheme", "int8")
    assert_user_error(proc, "is inside the input")
    (tmp_path / "link").symlink_to(tmp_path / "C.old")
    proc = build("calibrate", "--bundle", tmp_path / "C.old", "--out", tmp_path / "link", "--scheme", "int8")
    assert_user_error(proc, "is a symbolic link")
    (tmp_path / "link").unlink()
    shutil.move(tmp_path / "C.old", src)
    assert tree(tmp_path) == before


def test_export_onto_its_checkpoint_s_name_is_one_error_line(m3_checkpoint, tmp_path):
    ck = tmp_path / "CK.partial"
    ck.symlink_to(m3_checkpoint)  # the checkpoint seen through a link: still the input
    before, kept = tree(tmp_path), tree(m3_checkpoint)
    assert_user_error(build("export", "--checkpoint", ck, "--out", tmp_path / "CK"), "CK.partial, which is the input")
    assert_user_error(build("export", "--checkpoint", m3_checkpoint, "--out", tmp_path / "CK"),
                      "CK.partial, which is the input")
    assert tree(tmp_path) == before and tree(m3_checkpoint) == kept
