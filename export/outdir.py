"""Output directories (bundles, synthetic checkpoints): built beside the target, swapped in whole, never clobbering.

`staged(out, kind, inputs)` yields a fresh `OUT.partial` to build in. On success it replaces OUT in one atomic
exchange (Linux renameat2), so OUT always holds a complete old or new result; on failure or Ctrl-C the partial
directory is removed. `check(out, kind, inputs)`, which staged runs first and jobs run before their work, refuses,
before anything is deleted or moved: an OUT that is a symbolic link; an OUT, OUT.partial or OUT.old that is an input
of the job, holds one or lies inside one (compared by device and inode, so symlinks and bind mounts do not hide
it); an OUT that is not a result of the same kind (an empty directory is fine); an OUT.partial that is not a
leftover of an earlier run (it carries PARTIAL_MARKER) and an OUT.old that is not a result of the same kind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.manifest import FORMAT, MANIFEST

SYNTHETIC_MARKER = ".healthgpt-edge-synthetic"  # written into every synthetic checkpoint
PARTIAL_MARKER = ".healthgpt-edge-partial"  # a folder in OUT.partial while it is built (no file listing sees it)
PHRASES = {"is": "is the input", "holds": "is a folder holding the input", "is inside": "is inside the input"}
KINDS = {"bundle": "a healthgpt-edge bundle", "checkpoint": "a synthetic checkpoint written by `build.py synth`"}


def is_ours(path: Path, kind: str) -> bool:
    if kind == "checkpoint":
        return (path / SYNTHETIC_MARKER).is_file()
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _identity(path: Path) -> tuple[tuple[int, int] | None, set[tuple[int, int]]]:
    """(device, inode) of `path` (None when it does not exist) and of every existing folder above it."""
    path = path.resolve()
    ids = []
    for p in (path, *path.parents):
        try:
            st = p.stat()
        except OSError:
            ids.append(None)
            continue
        ids.append((st.st_dev, st.st_ino))
    return ids[0], {i for i in ids[1:] if i is not None}


def _relation(target: Path, source: Path) -> str | None:
    """How `target` stands to `source`: 'is', 'holds' (a folder above it) or 'is inside'; None when apart."""
    t, t_above = _identity(target)
    s, s_above = _identity(source)
    if target.resolve() == source.resolve() or (t is not None and t == s):
        return "is"
    if source.resolve().is_relative_to(target.resolve()) or (t is not None and t in s_above):
        return "holds"
    if target.resolve().is_relative_to(source.resolve()) or (s is not None and s in t_above):
        return "is inside"
    return None


def _siblings(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".old")


def check(out: str | Path, kind: str, inputs: list[Path]) -> None:
    """Refuse an OUT whose replacement (or whose .partial/.old siblings) would destroy something (see the top),
    then put back the old result of an interrupted swap."""
    out = Path(out)
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link (to {os.readlink(out)}): give the directory itself")
    tmp, old = _siblings(out)
    for path in (out, tmp, old):
        for given in inputs:
            how = _relation(path, Path(given))
            if how:
                what = f"--out {out}" if path == out else f"--out {out} would use {path}, which"
                raise UserError(f"{what} {PHRASES[how]} {given}: choose another output directory")
    # only our own leftover (marked while it was built) or an empty folder: a real bundle named OUT.partial is kept
    leftover = tmp.is_dir() and ((tmp / PARTIAL_MARKER).is_dir() or not any(tmp.iterdir()))
    if tmp.is_symlink() or (tmp.exists() and not leftover):
        raise UserError(f"refusing to delete {tmp}: it is not a leftover of an earlier run; choose another --out "
                        "or remove it yourself")
    if old.is_symlink() or (old.exists() and not (old.is_dir() and is_ours(old, kind))):
        raise UserError(f"refusing to use {old}: it is not {KINDS[kind]}; choose another --out or remove it yourself")
    _recover(out, old)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_ours(out, kind):
        raise UserError(f"refusing to replace {out}: it is not empty and not {KINDS[kind]}; choose another --out "
                        "or remove it yourself")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    except (AttributeError, OSError):
        return False
    return rc == 0


def _recover(out: Path, old: Path) -> None:
    """An earlier swap by two renames was interrupted between them: put the old result back (check() has made sure
    OUT.old is a result of ours and no input)."""
    if not out.exists() and old.is_dir():
        old.rename(out)


@contextlib.contextmanager
def staged(out: str | Path, kind: str, inputs: list[Path]):
    out = Path(out)
    tmp, old = _siblings(out)
    check(out, kind, inputs)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed too hard to clean up (check() made sure)
        tmp.mkdir(parents=True)
        (tmp / PARTIAL_MARKER).mkdir()
        yield tmp
        (tmp / PARTIAL_MARKER).rmdir()
        if not out.exists():
            tmp.rename(out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp)  # now the old result
        else:  # no renameat2 here: two renames, undone by _recover if interrupted between them
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}"
                        + (f" ({e.filename})" if getattr(e, "filename", None) else "")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
