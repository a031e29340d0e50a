"""Opening a bundle: its typed manifest, paths confined to the bundle, and every byte checked against the manifest.

What `Bundle.open` checks (verify=True, the default): the manifest's schema, version and cross-references
(runtime/contract/manifest.py); that every listed file is a regular file inside the bundle directory with its recorded
size and sha256; that the weights table tiles weights.bin (aligned, in bounds, no overlaps) and that each tensor's bytes
hash to the digest its name carries, so an edited offset or two swapped entries are refused, not computed with.
`digest` is the sha256 of manifest.json, which covers all of it: pin it to pin exactly what a deployment runs.
A file hashed and found good is remembered by its inode, size and times (runtime/core/verified.py), so reopening an
unchanged multi-GB bundle costs a stat per file, and any change to a file makes it hashed again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.files import CHUNK, file_digest
from runtime.contract.graphspec import GraphSpec
from runtime.contract.manifest import MANIFEST, GraphEntry, Manifest, ManifestError, TensorEntry
from runtime.core import verified


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    digest: str  # sha256 of manifest.json

    @classmethod
    def open(cls, root: str | Path, verify: bool = True, rehash: bool = False) -> Bundle:
        """verify: check every file's size and sha256; rehash: hash them even when runtime/core/verified.py's record
        says this exact file (same inode, size, mtime and ctime) was hashed and found good before."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise UserError(f"{root} is not a bundle: it is a file, not a directory")
        try:
            raw = (root / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{root} is not a bundle: {MANIFEST} is missing (run `build.py export` first)") from None
        except OSError as e:
            raise UserError(f"{root / MANIFEST}: cannot read: {e.strerror or e}") from None
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise UserError(f"{root / MANIFEST} is not valid JSON ({e})") from None
        try:
            manifest = Manifest.from_json(data)
        except ManifestError as e:
            raise UserError(f"{root / MANIFEST}: {e}") from None
        bundle = cls(root, manifest, hashlib.sha256(raw).hexdigest())
        bundle.check_layout()
        if verify:
            bundle.verify_files(rehash)
        return bundle

    def file(self, name: str) -> Path:
        """The path of a listed file, refused when it resolves outside the bundle (a symlink, say)."""
        if name not in self.manifest.files:
            raise UserError(f"{self.root}: {name} is not listed in the manifest's files")
        path = self.root / name
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise UserError(f"{self.root}: {name} resolves outside the bundle ({path.resolve()})")
        return path

    def check_layout(self) -> None:
        """Cheap checks that need the file system but no hashing: every listed file is inside the bundle, and the
        weights table tiles the weights file. Tensors may share one range exactly: the store keeps equal bytes once,
        whatever their dtype (an int8 zero point and an fp32 zero bias of as many bytes)."""
        for name in self.manifest.files:
            self.file(name)
        table = self.manifest.weights
        size = self.file(table.file).stat().st_size if (self.root / table.file).is_file() else 0
        end, last = 0, None
        for name, t in sorted(table.tensors.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
            span = (t.offset, t.nbytes)
            if (t.offset < end and span != last) or t.offset + t.nbytes > size:
                raise UserError(f"{self.root / MANIFEST}: weights tensor {name} ({t.offset}..{t.offset + t.nbytes}) "
                                f"overlaps another or lies past the end of {table.file} ({size} bytes)")
            end, last = max(end, t.offset + t.nbytes), span

    def verify_files(self, rehash: bool = False) -> None:
        weights = self.manifest.weights.file
        # weights.bin's check covers the tensor table too: a record of it holds for this table only
        table = hashlib.sha256(json.dumps(self.manifest.weights.to_json(), sort_keys=True).encode()).hexdigest()
        record, tensors = verified.Record(), self.manifest.weights.tensors
        for name, want in self.manifest.files.items():
            path = self.file(name)
            if not path.is_file():
                raise UserError(f"bundle file {path} is missing or not a regular file")
            if path.stat().st_size != want.bytes:
                raise UserError(f"bundle file {path} is corrupt (its size differs from the manifest); re-export")
            digest = (lambda p: _hash_weights(p, tensors)) if name == weights else file_digest
            if not record.holds(path, want.sha256, table if name == weights else "", digest, rehash):
                raise UserError(f"bundle file {path} is corrupt (sha256 differs from the manifest); re-export")
        record.save()

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest.tasks)

    def entry(self, task: str, name: str) -> GraphEntry:
        return self.manifest.graph(task, name)

    def spec(self, task: str, name: str) -> GraphSpec:
        return self.entry(task, name).spec

    def path(self, task: str, name: str) -> Path:
        return self.file(self.entry(task, name).file)


def _hash_weights(path: Path, tensors: dict[str, TensorEntry]) -> str:
    """sha256 of the whole file and, in the same pass, of each tensor's bytes, checked against its name
    (w.<first 24 hex digits of its sha256>...): content addressing makes the table tamper-evident."""
    spans = sorted((t.offset, t.offset + t.nbytes, name) for name, t in tensors.items())
    whole, i, pos, current = hashlib.sha256(), 0, 0, None
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            whole.update(chunk)
            end, view = pos + len(chunk), memoryview(chunk)
            while i < len(spans) and spans[i][0] < end:
                lo, hi, name = spans[i]
                current = current or hashlib.sha256()
                current.update(view[max(lo, pos) - pos: min(hi, end) - pos])
                if hi > end:
                    break
                if current.hexdigest()[:24] != name.split(".")[1]:
                    raise UserError(f"bundle file {path} is corrupt: tensor {name} does not hold the bytes its name "
                                    "was made from (edited offset or file); re-export")
                i, current = i + 1, None
            pos = end
    return whole.hexdigest()
