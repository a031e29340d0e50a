"""Files: sha256 digests, the one size + digest check, and atomic writes (temp file beside the target, then rename).

Every file the project writes goes through `atomic_write`, so a crash, a full disk or Ctrl-C leaves either the old
file or the new one, never half of one, and no temp file behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import uuid
from pathlib import Path

from runtime.contract.errors import UserError

CHUNK = 1 << 22


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for an error message."""
    return ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")


class NotRegularFile(OSError):
    """A FIFO, device, directory or socket where a regular file was expected."""


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of `path`, only if it is a regular file: a FIFO would block and a device never end. The check is on
    the opened descriptor (opened non-blocking, so even a FIFO opens at once), not on the name, so nothing can be
    swapped in between. At most `limit` bytes (ValueError past it). Raises OSError as the system gives it
    (FileNotFoundError included), NotRegularFile for anything but a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, f"is {file_kind(mode)}")
    with os.fdopen(fd, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def check_file(path: Path, sha256: str, nbytes: int) -> None:
    """A regular file of exactly `nbytes` bytes whose sha256 is `sha256`, else a UserError saying which."""
    if not path.is_file():
        raise UserError(f"{path} is missing")
    if path.stat().st_size != nbytes or file_digest(path) != sha256:
        raise UserError(f"{path} is corrupt (its size or sha256 differs from the manifest); re-export")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    """Open a temp file beside `path` for writing; on success it is flushed to disk and renamed over `path`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode.replace("w", "x")) as f:  # a plain open keeps the umask's permissions (not mkstemp's 0600)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):  # only left behind when something above failed
            tmp.unlink()


def write_atomic(path: str | Path, data: bytes | str) -> None:
    with atomic_write(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
