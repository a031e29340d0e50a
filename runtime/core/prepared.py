"""Sessions prepared once per machine: the graph as ONNX Runtime runs it (its optimizations applied, MatMulNBits
fused) saved with its *prepacked* weights, so that later starts map both from disk instead of optimizing, fusing
and prepacking again (issue 25, item 5). Measured on the full M3's int4 COM decoder, its files in the page cache
(benchmarks/README.md): a session in 2.8 s instead of 8.5 s, holding 0.08 GiB of anonymous memory instead of 3.3
(the prepacked weights are file-backed pages the kernel may drop and read again), the same outputs to the bit;
preparing it took 43-47 s once. Preparing never stands in the way of a start: when it fails (a full disk, say), the
graph is loaded as it would be without the cache, and a warning says why.

The prepacked layout is the CPU kernels' own, picked for this processor by this ONNX Runtime build (ONNX Runtime
warns that such a file "should only be used in the same environment"), so it never goes into a bundle: it lives in
a machine-local cache, `$XDG_CACHE_HOME/healthgpt-edge/sessions/<key>/`, keyed by all it depends on - the graph's
and the weights' sha256 from the bundle's (checked) manifest, the session's options, the ONNX Runtime version and
the CPU's model and flags. It is as tamper-evident as the bundle: each entry is written under a temporary name,
its files hashed into seal.json, and renamed into place whole; every load checks the files against the seal
through the same verified-file record as the bundle (runtime/core/verified.py: an unchanged file is known by its
inode and times, a changed one is hashed again), in a folder that must be the user's own and writable by no one
else. An entry that fails is set aside and prepared again. HEALTHGPT_EDGE_NO_SESSION_CACHE=1 turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from runtime.contract.files import file_digest, write_atomic
from runtime.core import verified

GRAPH, DATA, SEAL = "graph.onnx", "graph.data", "seal.json"
# What makes a session save its optimized graph with every weight and each prepacked copy in one data file
DATA_ENTRY = "session.optimized_model_external_initializers_file_name"
SAVE_ENTRIES = {"session.optimized_model_external_initializers_min_size_in_bytes": "1024",
                "session.save_external_prepacked_constant_initializers": "1"}
# Saving writes the original weights and their prepacked copy (measured: 5.3 GB for a 2.1 GB int4 decoder)
DISK_FACTOR = 3
ALIGN = 4096  # every tensor and prepacked blob of the data file at a page boundary (_realign)
FORMAT = 1  # of what prepare() writes (_realign's layout): a new one never reads an older entry


def enabled() -> bool:
    return os.environ.get("HEALTHGPT_EDGE_NO_SESSION_CACHE", "") in ("", "0")


def root() -> Path:
    return verified.record_path().parent / "sessions"


def machine() -> str:
    """The processor as the kernels see it: its model name and feature flags."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    return f"{platform.machine()}|{fields.get('model name', '')}|{fields.get('flags', fields.get('Features', ''))}"


def key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({**parts, "format": FORMAT}, sort_keys=True).encode()).hexdigest()[:32]


def _private_dir(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and verified.private(st)


def lookup(name: str) -> Path | None:
    """The prepared graph of entry `name`, its files checked against its seal; None when there is none (or it
    cannot be trusted: then it is set aside, to be prepared again)."""
    entry = root() / name
    if not (enabled() and _private_dir(root()) and _private_dir(entry)):
        return None
    try:
        seal, record = json.loads((entry / SEAL).read_text()), verified.Record()
        ok = set(seal) == {GRAPH, DATA} and all(record.holds(entry / f, d, "session") for f, d in seal.items())
        record.save()
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        print(f"[W] the prepared session {entry} does not match its seal; preparing it again", file=sys.stderr)
        _discard(entry)
        return None
    return entry / GRAPH


def prepare(name: str, nbytes: int, write: Callable[[Path, str], None], what: str) -> Path | None:
    """Runs write(folder, data file name), which builds a session saving its optimized graph to folder/GRAPH with
    its external and prepacked weights in the data file; seals it and moves it into place. None (nothing kept) when
    the cache folder is not private or lacks DISK_FACTOR x nbytes of free space."""
    base = root()
    if not enabled():
        return None
    with contextlib.suppress(OSError):
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _private_dir(base) or shutil.disk_usage(base).free < DISK_FACTOR * nbytes:
        return None
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=base))  # private, unique per call
    print(f"[I] preparing {what} for this machine, once: {base / name}", file=sys.stderr)
    try:
        write(tmp, DATA)
        _realign(tmp)
        write_atomic(tmp / SEAL, json.dumps({f: file_digest(tmp / f) for f in (GRAPH, DATA)}))
        with contextlib.suppress(OSError):  # another process prepared it first: theirs is as good
            tmp.rename(base / name)
    except Exception as e:  # any failure here only costs the cache: the plain load follows
        print(f"[W] could not prepare {what} ({type(e).__name__}: {e}); loading it without the cache", file=sys.stderr)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lookup(name)


def _realign(folder: Path) -> None:
    """ONNX Runtime 1.31 writes the data file unaligned (its ModelSavingOptions.align_offset cannot be set from the
    session options), and its MatMulNBits kernels at accuracy level 4 crash on unaligned mapped weights: every int4
    decoder saved so, tiny or full size, segfaulted on its first run, and ran once its data was inline (2026-12-06).
    So the data file is written again with every tensor and every prepacked blob (external data entries
    `prepacked_N`: `kernel|offset;length;checksum[|...]`) at an ALIGN boundary, as align_offset would write it."""
    import onnx

    model = onnx.load(str(folder / GRAPH), load_external_data=False)
    with open(folder / DATA, "rb") as src, open(folder / f"{DATA}.aligned", "wb") as out:

        def moved(offset: int, length: int) -> int:
            at = -out.tell() % ALIGN + out.tell()
            src.seek(offset)
            out.seek(at)
            out.write(src.read(length))  # one tensor or blob at a time (the largest: ~0.2 GB)
            return at

        for init in model.graph.initializer:
            entries = {e.key: e for e in init.external_data}
            if init.data_location != onnx.TensorProto.EXTERNAL or entries["location"].value != DATA:
                continue
            entries["offset"].value = str(moved(int(entries["offset"].value), int(entries["length"].value)))
            for key, e in entries.items():
                if key.startswith("prepacked"):
                    kernel, *blobs = e.value.split("|")
                    spans = [blob.split(";") for blob in blobs]
                    e.value = "|".join([kernel, *(f"{moved(int(o), int(n))};{n};{c}" for o, n, c in spans)])
        out.truncate(max(out.tell(), 1))
    os.replace(folder / f"{DATA}.aligned", folder / DATA)
    write_atomic(folder / GRAPH, model.SerializeToString())


def _discard(entry: Path) -> None:
    aside = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".discarded", dir=entry.parent))
    with contextlib.suppress(OSError):
        entry.rename(aside / "entry")
    shutil.rmtree(aside, ignore_errors=True)
