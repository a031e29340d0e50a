"""The audit log: one JSON line per model request (who asked what about which file, what came out), never pixels.

Each record is one os.write on a file opened with O_APPEND, so lines from concurrent requests (threads, or two app
processes on one log) never interleave: the kernel appends each write whole. fsync before the request reports done.
The file is opened per record, so log rotation (rename + new file) needs no restart. Mode 0600: prompts can hold
patient details.
"""

from __future__ import annotations

import json
import os
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
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            fd = self._open()
            try:
                if os.write(fd, data) != len(data):  # a short write on a regular file means the disk is full
                    raise OSError(f"short write to {self.path} (disk full?)")
                os.fsync(fd)
            finally:
                os.close(fd)
