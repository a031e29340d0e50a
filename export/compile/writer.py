"""The one bundle writer: `build.py export`, `build.py calibrate` and the benchmarks' graph variants all use it.

It writes into a staging folder (export/outdir.py swaps it in whole): each graph is linted, its weights moved into
the content-addressed weights.bin, saved and checked; the manifest goes last, after the reader's own checks, so
nothing in the folder opens as a bundle before it is complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from export.compile.lint import lint
from export.compile.onnx_export import WeightStore
from runtime.contract.files import file_digest, write_atomic
from runtime.contract.manifest import MANIFEST, WEIGHTS_FILE, FileEntry, Manifest, WeightsTable


class BundleWriter:
    def __init__(self, root: Path):
        self.root = root
        self.store = WeightStore(root / WEIGHTS_FILE)

    def add_graph(self, file: str, model: onnx.ModelProto, source: Path | None = None,
                  problems: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Lint, externalize into the store (source: the bundle folder the graph's external weights are read from),
        save, check; returns the graph's external initializers. problems: the caller's own findings, reported with
        the lint's."""
        found = lint(model) + list(problems)
        if found:
            raise RuntimeError(f"{file} fails the TensorRT lint: {'; '.join(found[:5])}")
        initializers = tuple(self.store.externalize(model, source=source))
        onnx.save(model, str(self.root / file))
        onnx.checker.check_model(str(self.root / file), full_check=True)
        return initializers

    def copy(self, src: Path) -> None:
        shutil.copy2(src, self.root / src.name)

    def weights(self) -> WeightsTable:
        """The store closed, its table for the manifest."""
        self.store.close()
        return WeightsTable(self.store.path.name, dict(self.store.tensors))

    def files(self, names: list[str] | None = None) -> dict[str, FileEntry]:
        return file_table(self.root, names)

    def write_manifest(self, manifest: Manifest) -> Manifest:
        """Through the reader's checks first; written last, atomically."""
        manifest = Manifest.from_json(manifest.to_json())
        write_atomic(self.root / MANIFEST, manifest.to_json_text())
        return manifest


def file_table(root: Path, names: list[str] | None = None) -> dict[str, FileEntry]:
    """Size and sha256 of the named files of a bundle being built (default: all of them, the manifest aside)."""
    paths = [root / n for n in names] if names is not None else sorted(root.iterdir())
    return {p.name: FileEntry(file_digest(p), p.stat().st_size) for p in paths if p.is_file() and p.name != MANIFEST}
