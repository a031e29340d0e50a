"""The bundle manifest as types: the one contract between build time and run time.

The exporter builds a `Manifest`; the runtime, the engine builder, the verifier and the benchmarks read its
attributes. `Manifest.from_json` is the only reader: it checks every field's type (an `"eos": "32000"` is refused),
names what is missing, and checks ranges and the references between parts (every graph's weights in the weights
table, every file the runtime opens listed with its sha256, every path relative and inside the bundle). The format
version lives here, once; a manifest of another version is refused with "re-export" before anything else is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from runtime.contract.errors import UserError
from runtime.contract.graphspec import GraphSpec
from runtime.contract.healthgpt import IMAGE_TOKEN_INDEX, IMAGE_TOKENS, TASKS, VQ_CODES, graph_id
from runtime.contract.quantization import (  # noqa: F401 - the manifest's parts, importable from here
    CalibrationFile,
    Quantization,
    ReferenceBounds,
    ReportRef,
    Tolerances,
    quantization_problems,
)
from runtime.contract.records import ManifestError, Record

FORMAT = "healthgpt-edge-bundle"
# 2: typed and validated manifest, KV pairs in the decoder spec, per-tensor digests checked; 3: KV cache rows
# outermost ([cache, kv_heads, head_dim]), only the cached rows bound; 4: no `kv_cache` part (read by nothing: the
# decoder spec declares its cache inputs and outputs, export/compile/specs.py their layout)
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
WEIGHTS_FILE = "weights.bin"
WEIGHTS_ALIGN = 4096  # every tensor starts on a page: the runtime maps them in place
PRECISIONS = {"fp32": "float32", "fp16": "float16"}  # bundle precision -> its float tensors' dtype
WEIGHT_DTYPES = frozenset({"float32", "float16", "int64", "uint8", "int8", "int32", "int4", "uint4", "float8_e4m3fn"})
PACKED_4BIT = frozenset({"int4", "uint4"})  # stored two values a byte, as ONNX packs them
FLOAT8 = frozenset({"float8_e4m3fn"})  # one byte each; numpy has no such type without ml_dtypes
NOT_NUMPY = PACKED_4BIT | FLOAT8  # tensors the runtime cannot hand over as numpy arrays


def not_a_bundle_path(name: str) -> str | None:
    """Why `name` cannot be a path inside a bundle (absolute, `..`, backslashes, empty), or None when it can."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or name != p.as_posix() or name.startswith("."):
        return f"{name!r} is not a plain relative path inside the bundle"
    return None


def _positive(obj, *names: str) -> Iterator[str]:
    for n in names:
        if getattr(obj, n) < 1:
            yield f"{n} must be at least 1, got {getattr(obj, n)}"


##### the parts #####

@dataclass(frozen=True)
class TaskEntry(Record):
    rank: int
    alpha: int
    clip_layer: int
    experts: int
    scaling: float
    hlora_file: str
    fusion_file: str | None

    def problems(self):
        yield from _positive(self, "rank", "alpha", "experts")
        if self.rank % self.experts:
            yield f"rank {self.rank} is not a multiple of experts {self.experts}"


@dataclass(frozen=True)
class ModelConfig(Record):
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    base_vocab: int
    max_context: int
    sliding_window: int | None
    clip_blocks_total: int

    def problems(self):
        yield from _positive(self, "hidden", "layers", "heads", "kv_heads", "head_dim", "vocab", "base_vocab",
                             "max_context", "clip_blocks_total")
        if self.heads * self.head_dim != self.hidden or self.heads % max(self.kv_heads, 1):
            yield f"heads {self.heads} x head_dim {self.head_dim} != hidden {self.hidden}, or kv_heads do not divide"
        if not self.base_vocab < self.vocab:
            yield f"base_vocab {self.base_vocab} must be below vocab {self.vocab}"


@dataclass(frozen=True)
class Tokens(Record):
    image_token_index: int
    start_index: int
    idx_0: int
    end_index: int
    vq_codes: int
    image_tokens: int
    eos: tuple[int, ...]

    def problems(self):
        if (self.vq_codes, self.image_tokens, self.image_token_index) != (VQ_CODES, IMAGE_TOKENS, IMAGE_TOKEN_INDEX):
            yield (f"vq_codes/image_tokens/image_token_index {self.vq_codes}/{self.image_tokens}/"
                   f"{self.image_token_index} are not HealthGPT's")
        if not (self.idx_0 == self.start_index + 1 and self.end_index == self.idx_0 + self.vq_codes):
            yield "start_index, idx_0 and end_index are not consecutive"
        if not self.eos or min(self.eos) < 0:
            yield "eos must list at least one non-negative token id"

    @property
    def image_range(self) -> tuple[int, int]:
        """[lo, hi) of the <idx_*> token ids."""
        return self.idx_0, self.idx_0 + self.vq_codes


@dataclass(frozen=True)
class TokenizerInfo(Record):
    file: str
    bos_id: int | None
    add_bos: bool
    eos_token: str
    vocab_size: int


@dataclass(frozen=True)
class TemplateInfo(Record):
    name: str
    system: str
    user: str
    assistant: str
    sep: str


@dataclass(frozen=True)
class Precision(Record):
    dtype: str
    fp32_islands: tuple[str, ...]
    quantization: Quantization | None = None

    def problems(self):
        if self.dtype not in PRECISIONS:
            yield f"dtype {self.dtype!r} is not one of {', '.join(PRECISIONS)}"


@dataclass(frozen=True)
class GraphEntry(Record):
    task: str
    file: str
    spec: GraphSpec
    cache_key: str
    initializers: tuple[str, ...]


@dataclass(frozen=True)
class TensorEntry(Record):
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        if self.dtype in NOT_NUMPY:
            return (n + 1) // 2 if self.dtype in PACKED_4BIT else n
        return n * np.dtype(self.dtype).itemsize

    def problems(self):
        if self.dtype not in WEIGHT_DTYPES:
            yield f"dtype {self.dtype!r} is not a weight dtype"
        if self.offset < 0 or any(d < 0 for d in self.shape):
            yield "negative offset or dimension"


@dataclass(frozen=True)
class WeightsTable(Record):
    file: str
    tensors: dict[str, TensorEntry]
    align: int = WEIGHTS_ALIGN

    def problems(self):
        for name, t in self.tensors.items():
            parts = name.split(".")  # w.<sha256 prefix>.<dtype>.<shape>: named after its content
            if len(parts) != 4 or parts[0] != "w" or parts[2] != t.dtype or parts[3] != "x".join(map(str, t.shape)):
                yield f"tensor {name!r} does not name its dtype {t.dtype} and shape {list(t.shape)}"
            if t.offset % self.align:
                yield f"tensor {name!r} starts at {t.offset}, not on a {self.align}-byte boundary"


@dataclass(frozen=True)
class EngineEntry(Record):
    graph: str
    file: str
    sha256: str
    bytes: int
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    profiles: tuple[dict[str, tuple[tuple[int, ...], ...]], ...]
    key: str
    build_seconds: float
    built_at: str


@dataclass(frozen=True)
class FileEntry(Record):
    sha256: str
    bytes: int

    def problems(self):
        if len(self.sha256) != 64 or self.bytes < 0:
            yield "not a sha256 digest and a byte count"


##### the whole #####

@dataclass(frozen=True)
class Manifest(Record):
    format: str
    format_version: int
    variant: str
    tasks: dict[str, TaskEntry]
    config: ModelConfig
    tokens: Tokens
    tokenizer: TokenizerInfo
    template: TemplateInfo
    precision: Precision
    graphs: dict[str, GraphEntry]
    weights: WeightsTable
    tools: dict[str, str | None]
    files: dict[str, FileEntry] = field(default_factory=dict)
    engines: dict[str, EngineEntry] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest") -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{where} is not a healthgpt-edge bundle manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"the bundle has format version {data.get('format_version')}; this runtime reads "
                                f"version {FORMAT_VERSION}: re-export it with this release's `build.py export`")
        return super().from_json(data, where)

    def problems(self):
        if unknown := sorted(set(self.tasks) - set(TASKS)):
            yield f"unknown task(s) {', '.join(unknown)}"
        if not self.tasks:
            yield "no tasks"
        if max(self.tokens.eos, default=0) >= self.config.vocab or self.tokens.end_index >= self.config.vocab:
            yield f"token ids past the vocabulary of {self.config.vocab}"
        for name in self.files:
            if why := not_a_bundle_path(name):
                yield f"files: {why}"
        opened = [self.weights.file, self.tokenizer.file, *(g.file for g in self.graphs.values()),
                  *(e.file for e in self.engines.values())]
        if unlisted := sorted({f for f in opened if f not in self.files}):
            yield f"file(s) the runtime opens are not hashed in `files`: {', '.join(unlisted)}"
        for gid, g in self.graphs.items():
            if gid != graph_id(g.task, g.spec.name):
                yield f"graphs.{gid}: its task {g.task!r} and spec {g.spec.name!r} do not name it"
            if missing := [t for t in g.initializers if t not in self.weights.tensors]:
                yield f"graphs.{gid}: initializer(s) not in the weights table: {', '.join(missing[:3])}"
        for gid in self.engines:
            if gid not in self.graphs:
                yield f"engines.{gid}: no such graph"
        yield from quantization_problems(self)

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    def graph(self, task: str, name: str) -> GraphEntry:
        gid = graph_id(task, name)
        if gid not in self.graphs:
            raise UserError(f"the bundle has no {gid} graph (it holds {', '.join(self.graphs)}); export with "
                            f"--tasks {task}")
        return self.graphs[gid]
