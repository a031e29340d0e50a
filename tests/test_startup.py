"""Start-up at size: a bundle whose files were hashed and found good is not hashed again (runtime/core/verified.py), and
any change to a file - even one that keeps its size and restores its mtime - makes it hashed, and refused, again."""

import json
import os
import shutil
import time

import pytest
from tiny_bundle import swap_same_shape_offsets

from runtime.contract.errors import UserError
from runtime.core import bundle as bundle_mod
from runtime.core import verified
from runtime.core.bundle import Bundle


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


##### issue 24, class 2: what the record trusts #####

def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def test_a_file_changed_while_hashed_is_not_recorded(copy, monkeypatch):
    digest = bundle_mod.file_digest

    def changed_meanwhile(path):
        result = digest(path)
        if path.name == "tokenizer.json":  # changed after its bytes were read, long enough ago not to look racy
            _flip(path, 10)
            time.sleep(verified.RACY_NS / 1e9 + 0.1)
        return result

    monkeypatch.setattr(bundle_mod, "file_digest", changed_meanwhile)
    Bundle.open(copy)
    monkeypatch.setattr(bundle_mod, "file_digest", digest)
    with pytest.raises(UserError, match="tokenizer.json is corrupt"):
        Bundle.open(copy)


def test_a_file_mapped_writable_is_not_recorded(copy):
    """A write through a shared mapping to a page already dirty changes the bytes, not mtime or ctime."""
    import mmap

    path = copy / "weights.bin"
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[5000] = m[5000]  # the page dirty, the bytes as they were
        time.sleep(verified.RACY_NS / 1e9 + 0.1)
        Bundle.open(copy)
        assert str(path.resolve()) not in verified.Record().data
        m[5000] ^= 1
        with pytest.raises(UserError, match="weights.bin is corrupt"):
            Bundle.open(copy)


def _forge(copy, record):
    """A record entry claiming that a corrupted tokenizer.json was hashed and found good."""
    path = copy / "tokenizer.json"
    want = Bundle.open(copy, verify=False).manifest.files["tokenizer.json"].sha256
    _flip(path, 10)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({str(path.resolve()): [*verified.stamp(path), "", want]}))


@pytest.mark.parametrize("where", ["world-writable file", "world-writable folder", "another user's file"])
def test_a_record_others_can_write_is_not_trusted(copy, tmp_path, monkeypatch, where):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    record = verified.record_path()
    _forge(copy, record)
    Bundle.open(copy)  # a private record is trusted: the forged entry is honoured
    if where == "world-writable file":
        record.chmod(0o666)
    elif where == "world-writable folder":
        record.parent.chmod(0o777)
    else:
        monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(UserError, match="tokenizer.json is corrupt"):
        Bundle.open(copy)
    assert verified.Record().data == {}


@pytest.mark.parametrize("make", [
    lambda p: os.mkfifo(p),
    lambda p: p.symlink_to("/dev/zero"),
    lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
    lambda p: p.write_bytes(b"{" + b" " * verified.MAX_BYTES + b"}"),
], ids=["fifo", "link to /dev/zero", "deeply nested", "too large"])
def test_a_broken_record_is_an_empty_one(copy, tmp_path, make):
    """`info` (which checks every file) neither hangs, nor reads without end, nor fails: it hashes everything."""
    import stat
    import subprocess
    import sys

    record = tmp_path / "cache" / "healthgpt-edge" / "verified.json"
    record.parent.mkdir(parents=True)
    make(record)
    kind = stat.S_IFMT(record.lstat().st_mode)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "runtime", "info", "--bundle", str(copy)], capture_output=True,
                          text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert stat.S_IFMT(record.lstat().st_mode) == kind  # a FIFO or a link is left as it was, never written through
    if stat.S_ISREG(kind):  # a broken file of ours is replaced by a good record
        assert len(json.loads(record.read_text())) == len(Bundle.open(copy, verify=False).manifest.files)
