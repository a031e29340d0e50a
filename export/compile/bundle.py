"""Checkpoint -> bundle: every task's graphs, the shared weights file, the runtime tokenizer, manifest.json.

The bundle is built in `OUT.partial/` and swapped in whole at the end (export/outdir.py), so an interrupted export
never leaves a directory that looks complete, and OUT always holds a complete bundle. Graphs whose cache key
(checkpoint content, task, graph, precision, context, exporter version) matches the previous bundle are reused
instead of re-exported - only when that bundle passes its full integrity check, so corruption is never copied on.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from export.compile import graphs, specs
from export.compile.lint import fp32_islands, lint
from export.compile.onnx_export import WeightStore, export_graph
from export.compile.stream import export_decoder
from export.compile.tokenizer import write_runtime_tokenizer
from export.outdir import staged
from export.reference.checkpoint import CheckpointPaths
from export.reference.model import HealthGPT, load_reference
from export.reference.tokenizer import load_reference_tokenizer
from export.reference.variants import get_task
from export.reference.vqgan import load_vqgan
from runtime.core.bundle import Bundle
from runtime.contract.errors import UserError
from runtime.contract.files import file_digest, write_atomic
from runtime.contract.healthgpt import IMAGE_TOKEN_INDEX, IMAGE_TOKENS, SHARED, TASK_GRAPHS, TASKS, VQ_CODES
from runtime.contract.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PRECISIONS,
    FileEntry,
    GraphEntry,
    KVInterface,
    Manifest,
    ModelConfig,
    Precision,
    TaskInfo,
    TemplateInfo,
    TensorEntry,
    TokenizerInfo,
    Tokens,
    WeightsTable,
)
from runtime.core.prompt import TEMPLATES

EXPORTER_VERSION = 3  # 3: typed manifest (format 2), KV pairs in the decoder spec
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
    cfg = ref.llm.config
    hidden, vocab = cfg.hidden_size, ref.llm.lm_head.weight.shape[0]
    head_dim = hidden // cfg.num_attention_heads
    return {"vision": specs.vision(hidden, dtype), "embed": specs.embed(hidden, vocab, max_context, dtype),
            "decoder": specs.decoder(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, hidden, vocab,
                                     max_context, dtype)}


def export_task_graph(ref: HealthGPT, name: str, spec: specs.GraphSpec, max_context: int,
                      store: WeightStore) -> onnx.ModelProto:
    """One graph of a task from a streaming reference: the decoder streamed layer by layer into `store`."""
    if name == "decoder":
        return export_decoder(ref, spec, max_context, store)
    module = {"vision": graphs.VisionGraph, "embed": graphs.EmbedGraph}[name](ref)
    return export_graph(spec, module, spec.sample_inputs(np.random.default_rng(0), seq=3))


def model_config(ref: HealthGPT, max_context: int) -> ModelConfig:
    cfg = ref.llm.config
    return ModelConfig(
        hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads,
        vocab=ref.llm.lm_head.weight.shape[0], base_vocab=ref.base_len, max_context=max_context,
        sliding_window=cfg.sliding_window, clip_blocks_total=len(ref.clip.vision_model.encoder.layers))


def export_bundle(checkpoint: str | Path, out: str | Path, tasks: tuple[str, ...] = tuple(TASKS),
                  dtype: str = "fp32", max_context: int = 2048) -> Manifest:
    paths, out = CheckpointPaths.find(checkpoint), Path(out)
    if dtype not in PRECISIONS:
        raise UserError(f"unknown dtype {dtype!r}; choose fp32 (CPU) or fp16 (GPU)")
    if not 16 <= max_context <= 131072:
        raise UserError(f"--max-context {max_context} is out of range [16, 131072]")
    for task in tasks:
        get_task(paths.variant, task)
    torch_dtype, onnx_dtype = getattr(torch, PRECISIONS[dtype]), PRECISIONS[dtype]
    with staged(out, "bundle", [paths.root]) as tmp:
        old = _reusable(out)
        store = WeightStore(tmp / "weights.bin")
        entries, config, ref = {}, None, None
        shared = sorted({g for t in tasks for g in TASKS[t].shared_graphs})
        jobs = [(t, g) for t in tasks for g in TASK_GRAPHS] + [(SHARED, g) for g in shared]
        digests = {t: checkpoint_digest(paths, _task_files(paths, t)) for t in {t for t, _ in jobs}}
        bar = tqdm(jobs, desc="export", unit="graph")
        for task, name in bar:
            graph_id = f"{task}.{name}"
            key = f"{EXPORTER_VERSION}|{digests[task]}|{graph_id}|{dtype}|{max_context}"
            key = hashlib.sha256(key.encode()).hexdigest()
            bar.set_postfix_str(graph_id)
            start = time.perf_counter()
            cached = old.graphs.get(graph_id) if old else None
            if cached and cached.cache_key == key:
                model, spec, how = onnx.load(str(out / cached.file)), cached.spec, "reused"
                config = config or old.config
            else:
                if task == SHARED:
                    spec = specs.vqgan()
                    model = export_graph(spec, load_vqgan(paths.vqgan_ckpt, paths.vqgan_yaml),
                                         spec.sample_inputs(np.random.default_rng(0), seq=3))
                else:
                    if ref is None or ref.task != task:
                        ref = None  # the previous task's reference freed before the next is read
                        ref = load_reference(paths.root, task, torch_dtype, stream=True)
                        config = model_config(ref, max_context)
                    spec = task_specs(ref, max_context, onnx_dtype)[name]
                    model = export_task_graph(ref, name, spec, max_context, store)
                how = "exported"
            problems = lint(model) + (fp32_islands(model) if dtype == "fp16" and name == "decoder" else [])
            if problems:
                raise RuntimeError(f"{graph_id} fails the TensorRT lint: {'; '.join(problems[:5])}")
            initializers = store.externalize(model)
            onnx.save(model, str(tmp / f"{graph_id}.onnx"))
            onnx.checker.check_model(str(tmp / f"{graph_id}.onnx"), full_check=True)
            entries[graph_id] = GraphEntry(task, f"{graph_id}.onnx", spec, key, tuple(initializers))
            tqdm.write(f"[I] {graph_id}: {how} in {time.perf_counter() - start:.1f}s, {len(model.graph.node)} nodes")
        store.close()
        tokenizer = TokenizerInfo(**write_runtime_tokenizer(load_reference_tokenizer(paths.base),
                                                            tmp / "tokenizer.json"))
        manifest = _manifest(paths, tasks, config, tokenizer, dtype, entries, store)
        manifest = Manifest.from_json(manifest.to_json())  # the reader's checks, before anything is swapped in
        write_atomic(tmp / MANIFEST, manifest.to_json_text())
    return manifest


def _manifest(paths: CheckpointPaths, tasks, config: ModelConfig, tokenizer: TokenizerInfo, dtype: str,
              entries: dict[str, GraphEntry], store: WeightStore) -> Manifest:
    base = config.base_vocab
    variant = paths.variant
    files = file_table(store.path.parent)
    return Manifest(
        format=FORMAT, format_version=FORMAT_VERSION, variant=variant.name,
        tasks={t: TaskInfo(**asdict(get_task(variant, t)), scaling=get_task(variant, t).scaling) for t in tasks},
        config=config,
        tokens=Tokens(image_token_index=IMAGE_TOKEN_INDEX, start_index=base, idx_0=base + 1,
                      end_index=base + 1 + VQ_CODES, vq_codes=VQ_CODES, image_tokens=IMAGE_TOKENS,
                      eos=tuple(paths.eos_ids())),
        tokenizer=tokenizer,
        template=TemplateInfo(name=variant.template, **asdict(TEMPLATES[variant.template])),
        precision=Precision(dtype, FP32_ISLANDS),
        kv_cache=KVInterface(),
        graphs=entries,
        weights=WeightsTable(store.path.name, {n: TensorEntry(t["offset"], t["dtype"], tuple(t["shape"]))
                                               for n, t in store.tensors.items()}),
        tools=tool_versions(),
        files=files,
    )


def file_table(root: Path, names: list[str] | None = None) -> dict[str, FileEntry]:
    """Size and sha256 of the named files of a bundle being built (default: all of them, the manifest aside)."""
    paths = [root / n for n in names] if names is not None else sorted(root.iterdir())
    return {p.name: FileEntry(file_digest(p), p.stat().st_size) for p in paths if p.is_file() and p.name != MANIFEST}


def _reusable(out: Path) -> Manifest | None:
    """The previous bundle's manifest, when its every byte checks out (else nothing is reused from it)."""
    if not out.is_dir():
        return None
    try:
        return Bundle.open(out).manifest
    except UserError as e:
        tqdm.write(f"[W] not reusing any graph of {out}: {e}")
        return None
