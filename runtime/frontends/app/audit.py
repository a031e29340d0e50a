"""The audit log: one JSON line per model request (who asked what about which file, what came out), never pixels;
a request refused before it ran gets its line too (status "refused"). Lines are ASCII JSON (anything else escaped),
so no reader that splits on Unicode line breaks (U+2028, U+0085) sees two records in one, and an unpaired surrogate
in a question is written as its escape. The log must be a regular file: a FIFO or device is refused at start-up.

Each record is one os.write on a file opened with O_APPEND, so lines from concurrent requests (threads, or two app
processes on one log) never interleave: the kernel appends each write whole. fsync before the request reports done.
The file is opened per record, so log rotation (rename + new file) needs no restart. Mode 0600: prompts can hold
patient details.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from pathlib import Path

from runtime.contract.errors import UserError


def default_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "healthgpt-edge" / "audit.jsonl"


class AuditLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:  # fail at start, not after the first answer
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(self._open())
        except OSError as e:
            raise UserError(f"audit log {self.path}: cannot append: {e.strerror or e}") from None
        self._lock = threading.Lock()  # one fsync at a time; the appends themselves need no lock

    def _open(self) -> int:
        """Non-blocking, so that a FIFO with no reader fails at once instead of hanging start-up."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise OSError(e.errno, "it is a named pipe (FIFO) or device, not a regular file") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "it is not a regular file (a FIFO, device or socket)")
        return fd

    def write(self, record: dict) -> None:
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("ascii")
        with self._lock:
            fd = self._open()
            try:
                if os.write(fd, data) != len(data):  # a short write on a regular file means the disk is full
                    raise OSError(f"short write to {self.path} (disk full?)")
                os.fsync(fd)
            finally:
                os.close(fd)
