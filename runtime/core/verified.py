"""Files already hashed in full, remembered so that a multi-GB bundle opens without hashing it again.

The record keys each digest by what the file system says of the file: device, inode, size, mtime and ctime (in
ns). Any write to the file, a rename over it, a copy, or `touch` restoring the old mtime changes the inode or the
ctime, which no unprivileged process can set back, so the record stops matching and the file is hashed again. The
record lives in the user's cache directory (`$XDG_CACHE_HOME/healthgpt-edge/verified.json`, mode 0600): it speeds up
the same user's next start; it is no defence against someone who can write that user's files. File times tick
coarsely (a jiffy), so a file changed within the last second is not recorded: a second change in the same tick
could leave every field equal (git's "racy" entries).
`HEALTHGPT_EDGE_NO_RECORD=1` (or `Bundle.open(..., rehash=True)`) hashes everything every time.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from runtime.contract.files import write_atomic

KEEP = 256  # entries: the record stays small whatever is opened
RACY_NS = 1_000_000_000


def record_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "healthgpt-edge" / "verified.json"


def _stamp(path: Path, context: str) -> list:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, context]


def enabled() -> bool:
    return os.environ.get("HEALTHGPT_EDGE_NO_RECORD", "") in ("", "0")


class Record:
    """The record, read once per bundle check and written once at its end (`save`), not once per file."""

    def __init__(self):
        self.data, self.changed = {}, False
        if enabled():
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(record_path().read_text())
                self.data = data if isinstance(data, dict) else {}

    def known(self, path: Path, sha256: str, context: str = "") -> bool:
        """True when `path` was hashed to `sha256` (with `context`, e.g. the weights table it was checked against)
        and has not changed since."""
        entry = self.data.get(str(path.resolve()))
        return entry is not None and entry == [*_stamp(path, context), sha256]

    def remember(self, path: Path, sha256: str, context: str = "") -> None:
        """A file just hashed and checked (not when changed within RACY_NS: its times may not show a next change)."""
        if not enabled() or time.time_ns() - path.stat().st_ctime_ns < RACY_NS:
            return
        self.data.pop(str(path.resolve()), None)
        self.data[str(path.resolve())] = [*_stamp(path, context), sha256]
        self.changed = True

    def save(self) -> None:
        """Concurrent writers may drop each other's entries: that costs one hash at the next start."""
        if not self.changed:
            return
        with contextlib.suppress(Exception):  # a read-only home or a full disk: the next start hashes again
            target = record_path()
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(target, json.dumps(dict(list(self.data.items())[-KEEP:])))
            os.chmod(target, 0o600)
