"""Reading a bundle: the manifest, its format version, every file's sha256, and the graph specs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from runtime.errors import UserError
from runtime.graphspec import GraphSpec

FORMAT = "healthgpt-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str | None]:
    versions = {}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime-gpu", "onnxruntime", "tensorrt", "polygraphy", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


@dataclass
class Bundle:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> Bundle:
        root = Path(root)
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except FileNotFoundError:
            raise UserError(f"{root} is not a bundle: {MANIFEST} is missing (run `build.py export` first)") from None
        except ValueError as e:
            raise UserError(f"{root / MANIFEST} is not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise UserError(f"{root / MANIFEST} is not a healthgpt-edge bundle manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{root} has bundle format version {manifest.get('format_version')}; this runtime reads "
                            f"version {FORMAT_VERSION}: re-export it with this release's `build.py export`")
        bundle = cls(root, manifest)
        if verify:
            bundle.verify_files()
        return bundle

    def verify_files(self) -> None:
        for name, want in self.manifest["files"].items():
            path = self.root / name
            if not path.is_file():
                raise UserError(f"bundle file {path} is missing")
            if path.stat().st_size != want["bytes"] or file_digest(path) != want["sha256"]:
                raise UserError(f"bundle file {path} is corrupt (sha256 differs from the manifest); re-export")

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def tokens(self) -> dict:
        return self.manifest["tokens"]

    @property
    def quantization(self) -> dict | None:
        """precision.quantization: None for an exported bundle, the record `build.py calibrate` writes otherwise."""
        return self.manifest["precision"].get("quantization")

    def graph_id(self, task: str, name: str) -> str:
        return f"shared.{name}" if name == "vqgan" else f"{task}.{name}"

    def spec(self, task: str, name: str) -> GraphSpec:
        return GraphSpec.from_json(self.entry(task, name)["spec"])

    def path(self, task: str, name: str) -> Path:
        return self.root / self.entry(task, name)["file"]

    def entry(self, task: str, name: str) -> dict:
        graph_id = self.graph_id(task, name)
        if graph_id not in self.manifest["graphs"]:
            have = ", ".join(self.manifest["graphs"])
            raise UserError(f"bundle {self.root} has no {graph_id} graph (it holds {have}); export with --tasks {task}")
        return self.manifest["graphs"][graph_id]
