"""Output directories (bundles, synthetic checkpoints): built beside the target, swapped in whole, never clobbering.

`staged(out, kind, inputs)` yields a fresh `OUT.partial` to build in. On success it replaces OUT in one atomic
exchange (Linux renameat2), so OUT always holds a complete old or new result; on failure or Ctrl-C the partial
directory is removed. It refuses, before any work, to replace a directory that is not a result of the same kind
(an empty directory is fine), and one that is or holds an input of the job.
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
KINDS = {"bundle": "a healthgpt-edge bundle", "checkpoint": "a synthetic checkpoint written by `build.py synth`"}


def is_ours(path: Path, kind: str) -> bool:
    if kind == "checkpoint":
        return (path / SYNTHETIC_MARKER).is_file()
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_target(out: Path, kind: str, inputs: list[Path]) -> None:
    """Refuse an OUT that would destroy something: not ours, the input, or a folder holding an input."""
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or target in source.parents:
            raise UserError(f"--out {out} is {'the input' if target == source else 'a folder holding the input'} "
                            f"{given}: choose another output directory")
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
    """An earlier swap by two renames was interrupted between them: put the old result back."""
    if not out.exists() and old.is_dir():
        old.rename(out)


@contextlib.contextmanager
def staged(out: str | Path, kind: str, inputs: list[Path]):
    out = Path(out)
    tmp, old = out.with_name(out.name + ".partial"), out.with_name(out.name + ".old")
    _recover(out, old)
    check_target(out, kind, inputs)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed too hard to clean up
        tmp.mkdir(parents=True)
        yield tmp
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
