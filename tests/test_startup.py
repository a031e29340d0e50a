"""Start-up at size: a bundle whose files were hashed and found good is not hashed again (runtime/core/verified.py), and
any change to a file - even one that keeps its size and restores its mtime - makes it hashed, and refused, again."""

import json
import os
import shutil
import time

import pytest
from tiny_bundle import swap_same_shape_offsets

from runtime.core import bundle as bundle_mod
from runtime.core import verified
from runtime.core.bundle import Bundle
from runtime.contract.errors import UserError


@pytest.fixture
def hashed(monkeypatch):
    """Counts the files the bundle check really hashes."""
    seen = []
    digest, weights = bundle_mod.file_digest, bundle_mod._hash_weights
    monkeypatch.setattr(bundle_mod, "file_digest", lambda p: seen.append(p.name) or digest(p))
    monkeypatch.setattr(bundle_mod, "_hash_weights", lambda p, t: seen.append(p.name) or weights(p, t))
    return seen


@pytest.fixture
def copy(m3_bundle, tmp_path):
    out = shutil.copytree(m3_bundle, tmp_path / "b")
    time.sleep(verified.RACY_NS / 1e9 + 0.1)  # files changed within the last second are never recorded
    return out


def test_an_unchanged_bundle_is_hashed_once(copy, hashed):
    Bundle.open(copy)
    files = set(Bundle.open(copy, verify=False).manifest.files)
    assert set(hashed) == files
    hashed.clear()
    Bundle.open(copy)
    assert hashed == []  # a stat per file, no hashing
    Bundle.open(copy, rehash=True)
    assert set(hashed) == files


def test_a_changed_file_is_hashed_again_and_refused(copy, hashed):
    Bundle.open(copy)
    path = copy / "weights.bin"
    st = path.stat()
    with open(path, "r+b") as f:  # same size, one byte flipped, then the old times put back
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    hashed.clear()
    with pytest.raises(UserError, match="corrupt"):
        Bundle.open(copy)
    assert "weights.bin" in hashed


def test_a_file_replaced_by_a_good_copy_is_hashed_again(copy, hashed):
    Bundle.open(copy)
    shutil.copy2(copy / "tokenizer.json", copy / "t.json")
    os.replace(copy / "t.json", copy / "tokenizer.json")  # same bytes and mtime, new inode
    hashed.clear()
    Bundle.open(copy)
    assert hashed == ["tokenizer.json"]


def test_the_record_can_be_switched_off(copy, hashed, monkeypatch):
    Bundle.open(copy)
    monkeypatch.setenv("HEALTHGPT_EDGE_NO_RECORD", "1")
    hashed.clear()
    Bundle.open(copy)
    assert set(hashed) == set(Bundle.open(copy, verify=False).manifest.files)


def test_a_recorded_weights_file_is_checked_again_against_an_edited_tensor_table(copy):
    Bundle.open(copy)  # weights.bin recorded as good for this table
    manifest = json.loads((copy / "manifest.json").read_text())
    swap_same_shape_offsets(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="does not hold the bytes its name was made from"):
        Bundle.open(copy)
