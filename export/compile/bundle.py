"""Checkpoint -> bundle: every task's graphs, the shared weights file, the runtime tokenizer, manifest.json.

The bundle is built in `OUT.partial/` and swapped in whole at the end (export/outdir.py), so an interrupted export
never leaves a directory that looks complete, and OUT always holds a complete bundle. Graphs whose cache key
(checkpoint content, task, graph, precision, context, exporter version) matches the previous bundle are reused
instead of re-exported - only when that bundle passes its full integrity check, so corruption is never copied on.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from export.compile import graphs, specs
from export.compile.lint import fp32_islands
from export.compile.onnx_export import export_graph
from export.compile.stream import export_decoder
from export.compile.tokenizer import write_runtime_tokenizer
from export.compile.writer import BundleWriter
from export.outdir import staged
from export.reference.checkpoint import CheckpointPaths
from export.reference.model import HealthGPT, load_reference
from export.reference.tokenizer import load_reference_tokenizer
from export.reference.variants import get_task
from export.reference.vqgan import load_vqgan
from runtime.contract.errors import UserError
from runtime.contract.files import file_digest
from runtime.contract.healthgpt import IMAGE_TOKEN_INDEX, IMAGE_TOKENS, SHARED, TASK_GRAPHS, TASKS, VQ_CODES, graph_id
from runtime.contract.manifest import (
    FORMAT,
    FORMAT_VERSION,
    PRECISIONS,
    GraphEntry,
    Manifest,
    ModelConfig,
    Precision,
    TaskEntry,
    TemplateInfo,
    TokenizerInfo,
    Tokens,
)
from runtime.core.bundle import Bundle
from runtime.core.prompt import TEMPLATES

EXPORTER_VERSION = 4  # 3: typed manifest (format 2), KV pairs in the decoder spec; 4: lean decoder, rows-outermost KV
FP32_ISLANDS = ("rmsnorm statistics", "attention softmax", "lm_head")
TOOLS = ("torch", "transformers", "onnx", "onnxruntime-gpu", "onnxruntime", "tensorrt", "polygraphy", "numpy")


def tool_versions() -> dict[str, str | None]:
    versions = {}
    for pkg in TOOLS:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def checkpoint_digest(paths: CheckpointPaths, task_files: list[Path]) -> str:
    """Content hash of every file the export reads (not mtimes: a copied checkpoint stays cached)."""
    h = hashlib.sha256()
    files = [*sorted(paths.base.rglob("*")), *sorted(paths.clip.rglob("*")), *task_files]
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(file_digest(f).encode())
    return h.hexdigest()


def _task_files(paths: CheckpointPaths, task: str) -> list[Path]:
    if task == SHARED:
        return [paths.vqgan_ckpt, paths.vqgan_yaml]
    return [f for f in (paths.hlora(task), paths.fusion(task)) if f is not None]


def task_specs(ref: HealthGPT, max_context: int, dtype: str) -> dict[str, specs.GraphSpec]:
    hidden, vocab = ref.llm.config.hidden_size, ref.llm.lm_head.weight.shape[0]
    return {"vision": specs.vision(hidden, dtype), "embed": specs.embed(hidden, vocab, max_context, dtype),
            "decoder": specs.decoder_of(ref.llm, max_context, dtype)}


def model_config(ref: HealthGPT, max_context: int) -> ModelConfig:
    cfg = ref.llm.config
    return ModelConfig(
        hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads,
        vocab=ref.llm.lm_head.weight.shape[0], base_vocab=ref.base_len, max_context=max_context,
        sliding_window=cfg.sliding_window, clip_blocks_total=len(ref.clip.vision_model.encoder.layers))


@dataclass
class Exporter:
    """One export's settings and the streaming reference of the task in hand (one task's model in memory at a time).
    Each graph is made by the method named after it."""
    paths: CheckpointPaths
    dtype: str
    max_context: int
    writer: BundleWriter
    ref: HealthGPT | None = None
    config: ModelConfig | None = None

    def reference(self, task: str) -> HealthGPT:
        if self.ref is None or self.ref.task != task:
            self.ref = None  # the previous task's reference freed before the next is read
            self.ref = load_reference(self.paths, task, getattr(torch, PRECISIONS[self.dtype]), stream=True)
            self.config = model_config(self.ref, self.max_context)
        return self.ref

    def spec(self, task: str, name: str) -> specs.GraphSpec:
        if task == SHARED:
            return {"vqgan": specs.vqgan}[name]()
        return task_specs(self.reference(task), self.max_context, PRECISIONS[self.dtype])[name]

    def graph(self, task: str, spec: specs.GraphSpec) -> onnx.ModelProto:
        return getattr(self, spec.name)(task, spec)

    def vision(self, task: str, spec: specs.GraphSpec) -> onnx.ModelProto:
        return export_graph(spec, graphs.VisionGraph(self.reference(task)), _sample(spec))

    def embed(self, task: str, spec: specs.GraphSpec) -> onnx.ModelProto:
        return export_graph(spec, graphs.EmbedGraph(self.reference(task)), _sample(spec))

    def decoder(self, task: str, spec: specs.GraphSpec) -> onnx.ModelProto:
        """Streamed layer by layer into the weights store; fp16 graphs keep their fp32 islands (checked)."""
        return export_decoder(self.reference(task), spec, self.max_context, self.writer.store)

    def vqgan(self, task: str, spec: specs.GraphSpec) -> onnx.ModelProto:
        return export_graph(spec, load_vqgan(self.paths.vqgan_ckpt, self.paths.vqgan_yaml), _sample(spec))


def _sample(spec: specs.GraphSpec) -> dict[str, np.ndarray]:
    return spec.sample_inputs(np.random.default_rng(0), seq=3)


def export_bundle(checkpoint: str | Path, out: str | Path, tasks: tuple[str, ...] = tuple(TASKS),
                  dtype: str = "fp32", max_context: int = 2048) -> Manifest:
    paths, out = CheckpointPaths.find(checkpoint), Path(out)
    if dtype not in PRECISIONS:
        raise UserError(f"unknown dtype {dtype!r}; choose fp32 (CPU) or fp16 (GPU)")
    if not 16 <= max_context <= 131072:
        raise UserError(f"--max-context {max_context} is out of range [16, 131072]")
    for task in tasks:
        get_task(paths.variant, task)
    with staged(out, "bundle", [paths.root]) as tmp:
        old = _reusable(out)
        exporter = Exporter(paths, dtype, max_context, BundleWriter(tmp))
        shared = sorted({g for t in tasks for g in TASKS[t].shared_graphs})
        jobs = [(t, g) for t in tasks for g in TASK_GRAPHS] + [(SHARED, g) for g in shared]
        digests = {t: checkpoint_digest(paths, _task_files(paths, t)) for t in {t for t, _ in jobs}}
        entries = {}
        for task, name in (bar := tqdm(jobs, desc="export", unit="graph")):
            gid = graph_id(task, name)
            bar.set_postfix_str(gid)
            key = hashlib.sha256(f"{EXPORTER_VERSION}|{digests[task]}|{gid}|{dtype}|{max_context}".encode()).hexdigest()
            entries[gid] = _export_one(exporter, old, task, name, key)
        config = exporter.config or (old.manifest.config if old else None)
        exporter.ref = None
        tokenizer = TokenizerInfo(**write_runtime_tokenizer(load_reference_tokenizer(paths.base),
                                                            tmp / "tokenizer.json"))
        return exporter.writer.write_manifest(_manifest(paths, tasks, config, tokenizer, dtype, entries,
                                                        exporter.writer))


def _export_one(exporter: Exporter, old: Bundle | None, task: str, name: str, key: str) -> GraphEntry:
    """A graph exported, or reused from the previous bundle when its cache key matches; written to the bundle."""
    start, gid = time.perf_counter(), graph_id(task, name)
    cached = old.manifest.graphs.get(gid) if old else None
    if old and cached and cached.cache_key == key:
        model, spec, how = onnx.load(str(old.file(cached.file))), cached.spec, "reused"
        exporter.config = exporter.config or old.manifest.config
    else:
        spec = exporter.spec(task, name)
        model, how = exporter.graph(task, spec), "exported"
    islands = fp32_islands(model) if exporter.dtype == "fp16" and spec.kv_pairs else []  # the decoder's islands
    initializers = exporter.writer.add_graph(f"{gid}.onnx", model, problems=tuple(islands))
    tqdm.write(f"[I] {gid}: {how} in {time.perf_counter() - start:.1f}s, {len(model.graph.node)} nodes")
    return GraphEntry(task, f"{gid}.onnx", spec, key, initializers)


def _manifest(paths: CheckpointPaths, tasks, config: ModelConfig, tokenizer: TokenizerInfo, dtype: str,
              entries: dict[str, GraphEntry], writer: BundleWriter) -> Manifest:
    base = config.base_vocab
    variant = paths.variant
    weights = writer.weights()
    return Manifest(
        format=FORMAT, format_version=FORMAT_VERSION, variant=variant.name,
        tasks={t: TaskEntry(**asdict(get_task(variant, t)), scaling=get_task(variant, t).scaling) for t in tasks},
        config=config,
        tokens=Tokens(image_token_index=IMAGE_TOKEN_INDEX, start_index=base, idx_0=base + 1,
                      end_index=base + 1 + VQ_CODES, vq_codes=VQ_CODES, image_tokens=IMAGE_TOKENS,
                      eos=tuple(paths.eos_ids())),
        tokenizer=tokenizer,
        template=TemplateInfo(name=variant.template, **asdict(TEMPLATES[variant.template])),
        precision=Precision(dtype, FP32_ISLANDS),
        graphs=entries,
        weights=weights,
        tools=tool_versions(),
        files=writer.files(),
    )


def _reusable(out: Path) -> Bundle | None:
    """The previous bundle, when its every byte checks out (else nothing is reused from it)."""
    if not out.is_dir():
        return None
    try:
        return Bundle.open(out)
    except UserError as e:
        tqdm.write(f"[W] not reusing any graph of {out}: {e}")
        return None
