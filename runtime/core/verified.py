"""Files already hashed in full, remembered so that a multi-GB bundle opens without hashing it again.

The record keys each digest by what the file system says of the file: device, inode, size, mtime and ctime (in
ns). Any write to the file, a rename over it, a copy, or `touch` restoring the old mtime changes the inode or the
ctime, which no unprivileged process can set back, so the record stops matching and the file is hashed again.
What it trusts, and when:
- a file is recorded only when it is yours and no one else may write it (owned by you, not group- or world-writable),
  when its stat is the same before and after hashing (a file changed while hashed is not recorded), when it was not
  changed within the last second (file times tick coarsely: a second change in the same tick could leave every
  field equal, git's "racy" entries), and when no process you can see holds it in a shared writable mapping (a
  write through one to a page already dirty changes the bytes without touching mtime or ctime, which stat cannot
  see). A mapping made later takes a fresh write fault, which does update the times.
- the record itself (`$XDG_CACHE_HOME/healthgpt-edge/verified.json`) is read only when it is a regular file of at
  most MAX_BYTES, in a folder that is not a link, both owned by you and writable by no one else; anything else
  (a FIFO, a link, a file of another user's, a world-writable folder, JSON too deep to parse) is treated as an
  empty record, and one that is not a plain file of yours is never written over.
It speeds up the same user's next start; it is no defence against root or a process of yours that it cannot see.
`HEALTHGPT_EDGE_NO_RECORD=1` (or `Bundle.open(..., rehash=True)`) hashes everything every time.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from runtime.contract.files import file_digest, write_atomic

KEEP = 256  # entries: the record stays small whatever is opened
MAX_BYTES = 1 << 20  # KEEP entries take ~60 kB
RACY_NS = 1_000_000_000


def record_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "healthgpt-edge" / "verified.json"


def stamp(path: Path) -> list:
    """What the record keys a digest by (take it before hashing; remember() compares it with the one after)."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def enabled() -> bool:
    return os.environ.get("HEALTHGPT_EDGE_NO_RECORD", "") in ("", "0")


def private(st: os.stat_result) -> bool:
    """Owned by this user and writable by no one else."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _writable_mappings() -> set | None:
    """(device, inode) and path of every file a process this user can see maps shared and writable (the path too:
    on overlayfs a mapping shows the lower file's inode); None when /proc cannot tell (then nothing is recorded)."""
    if not Path("/proc/self/maps").is_file():
        return None
    found = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError, ValueError):
            for line in maps.read_text().splitlines():
                f = line.split(maxsplit=5)  # address perms offset major:minor inode path
                if len(f) >= 5 and f[1][1] == "w" and f[1][3] == "s" and f[4] != "0":
                    major, minor = (int(x, 16) for x in f[3].split(":"))
                    found |= {(os.makedev(major, minor), int(f[4])), f[5] if len(f) > 5 else None}
    return found


def _read(path: Path) -> tuple[dict, bool]:
    """(entries, writable): the record's entries when it can be trusted (see the top), else {}; whether save() may
    replace what is at `path`."""
    try:
        folder = os.lstat(path.parent)
    except FileNotFoundError:
        return {}, True
    except OSError:
        return {}, False
    if not stat.S_ISDIR(folder.st_mode) or not private(folder):
        return {}, False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}, True
    except OSError:  # a link (ELOOP), unreadable
        return {}, False
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not private(st):
            return {}, False
        raw = f.read(MAX_BYTES + 1) if st.st_size <= MAX_BYTES else b""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # too large (read as b""), torn, or nested past the parser's stack
        return {}, True
    ok = isinstance(data, dict) and all(isinstance(v, list) for v in data.values())
    return data if ok else {}, True


class Record:
    """The record, read once per bundle check and written once at its end (`save`), not once per file."""

    def __init__(self):
        self.data: dict[str, list] = {}  # resolved path -> [*stamp, context, sha256]
        self.new: list[str] = []
        self.writable = False
        if enabled():
            self.data, self.writable = _read(record_path())

    def known(self, path: Path, sha256: str, context: str = "") -> bool:
        """True when `path` was hashed to `sha256` (with `context`, e.g. the weights table it was checked against)
        and has not changed since."""
        entry = self.data.get(str(path.resolve()))
        return entry is not None and entry == [*stamp(path), context, sha256]

    def holds(self, path: Path, sha256: str, context: str = "", digest: Callable[[Path], str] | None = None,
              rehash: bool = False) -> bool:
        """Whether `path` hashes to `sha256`: known from the record (unless rehash), or hashed now with `digest`
        (default: the file's sha256) and then remembered."""
        if not rehash and self.known(path, sha256, context):
            return True
        before = stamp(path)  # recorded only if the file is the same after hashing
        if (digest or file_digest)(path) != sha256:
            return False
        self.remember(path, sha256, context, before)
        return True

    def remember(self, path: Path, sha256: str, context: str, before: list) -> None:
        """A file just hashed and checked, `before` its stamp() taken before hashing: recorded only as the top
        says (unchanged while hashed, not changed within RACY_NS, private; save() drops those mapped writable)."""
        st = path.stat()
        if (not self.writable or stamp(path) != before or time.time_ns() - st.st_ctime_ns < RACY_NS
                or not private(st)):
            return
        self.data.pop(str(path.resolve()), None)
        self.data[str(path.resolve())] = [*before, context, sha256]
        self.new.append(str(path.resolve()))

    def save(self) -> None:
        """Concurrent writers may drop each other's entries: that costs one hash at the next start."""
        if not self.new:
            return
        mapped = _writable_mappings()  # one scan of /proc, after every file's stamp was taken
        for key in dict.fromkeys(self.new):
            if mapped is None or tuple(self.data[key][:2]) in mapped or key in mapped:
                del self.data[key]
        with contextlib.suppress(Exception):  # a read-only home or a full disk: the next start hashes again
            target = record_path()
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if _read(target)[1]:  # the folder is still private and nothing but a plain file of ours is replaced
                write_atomic(target, json.dumps(dict(list(self.data.items())[-KEEP:])))
                os.chmod(target, 0o600)
