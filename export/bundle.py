"""Checkpoint -> bundle: every task's graphs, the shared weights file, the runtime tokenizer, manifest.json.

The bundle is built in `OUT.partial/` and swapped in at the end, so an interrupted export never leaves a directory
that looks complete. Graphs whose cache key (checkpoint content, task, graph, precision, context, exporter version)
matches the previous bundle are reused instead of re-exported.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from export import graphs, specs
from export.checkpoint import CheckpointPaths
from export.lint import fp32_islands, lint
from export.onnx_export import WeightStore, export_graph
from export.reference import HealthGPT, load_reference
from export.tokenizer import load_reference_tokenizer, write_runtime_tokenizer
from export.variants import IMAGE_TOKENS, VQ_CODES, get_task
from export.vqgan import load_vqgan
from runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, file_digest, tool_versions
from runtime.errors import UserError
from runtime.prompt import IMAGE_TOKEN_INDEX, TEMPLATES

EXPORTER_VERSION = 2
DTYPES = {"fp32": (torch.float32, "float32"), "fp16": (torch.float16, "float16")}
TASK_GRAPHS = ("vision", "embed", "decoder")
KV_INTERFACE = {
    "layout": "per layer, keys and values: [batch=1, kv_heads, cache, head_dim], past_length <= cache <= max_context",
    "inputs": "past_key_values.{i}.key/value: the runtime's whole buffer, read-only; rows >= past_length ignored",
    "outputs": "present.{i}.key/value: only the new rows [1, kv_heads, seq, head_dim]",
    "update": "the runtime writes the new rows at [past_length, past_length + seq) in place, first moving to a "
              "buffer of the next power-of-two rows when they do not fit",
    "position_input": "past_length",
}


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
    if task == "shared":
        return [paths.vqgan_ckpt, paths.vqgan_yaml]
    return [f for f in (paths.hlora(task), paths.fusion(task)) if f is not None]


def task_modules(ref: HealthGPT, max_context: int, dtype: str) -> dict[str, tuple[specs.GraphSpec, torch.nn.Module]]:
    cfg = ref.llm.config
    hidden, vocab = cfg.hidden_size, ref.llm.lm_head.weight.shape[0]
    head_dim = hidden // cfg.num_attention_heads
    return {
        "vision": (specs.vision(hidden, dtype), graphs.VisionGraph(ref)),
        "embed": (specs.embed(hidden, vocab, max_context, dtype), graphs.EmbedGraph(ref)),
        "decoder": (specs.decoder(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, hidden, vocab,
                                  max_context, dtype), graphs.DecoderGraph(ref.llm, max_context)),
    }


def model_config(ref: HealthGPT, max_context: int) -> dict:
    cfg = ref.llm.config
    return {
        "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "vocab": ref.llm.lm_head.weight.shape[0], "base_vocab": ref.base_len, "max_context": max_context,
        "sliding_window": cfg.sliding_window, "clip_blocks_total": len(ref.clip.vision_model.encoder.layers),
    }


def export_bundle(checkpoint: str | Path, out: str | Path, tasks: tuple[str, ...] = ("com", "gen"),
                  dtype: str = "fp32", max_context: int = 2048) -> dict:
    paths, out = CheckpointPaths.find(checkpoint), Path(out)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose fp32 (CPU) or fp16 (GPU)")
    if not 16 <= max_context <= 131072:
        raise UserError(f"--max-context {max_context} is out of range [16, 131072]")
    for task in tasks:
        get_task(paths.variant, task)
    torch_dtype, onnx_dtype = DTYPES[dtype]
    old = _read_old_manifest(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    store = WeightStore(tmp / "weights.bin")
    entries, config, ref = {}, None, None
    jobs = [(t, g) for t in tasks for g in TASK_GRAPHS] + ([("shared", "vqgan")] if "gen" in tasks else [])
    digests = {t: checkpoint_digest(paths, _task_files(paths, t)) for t in {t for t, _ in jobs}}
    bar = tqdm(jobs, desc="export", unit="graph")
    for task, name in bar:
        graph_id = f"{task}.{name}"
        key = f"{EXPORTER_VERSION}|{digests[task]}|{graph_id}|{dtype}|{max_context}"
        key = hashlib.sha256(key.encode()).hexdigest()
        bar.set_postfix_str(graph_id)
        start = time.perf_counter()
        cached = old.get("graphs", {}).get(graph_id, {})
        if cached.get("cache_key") == key and (out / cached["file"]).is_file():
            model, spec, how = onnx.load(str(out / cached["file"])), specs.GraphSpec.from_json(cached["spec"]), "reused"
            config = config or old.get("config")
        else:
            if task == "shared":
                spec, module = specs.vqgan(), load_vqgan(paths.vqgan_ckpt, paths.vqgan_yaml)
            else:
                if ref is None or ref.task != task:
                    ref = load_reference(paths.root, task, torch_dtype)
                    config = model_config(ref, max_context)
                spec, module = task_modules(ref, max_context, onnx_dtype)[name]
            model, how = export_graph(spec, module, spec.sample_inputs(np.random.default_rng(0), seq=3)), "exported"
        problems = lint(model) + (fp32_islands(model) if dtype == "fp16" and name == "decoder" else [])
        if problems:
            raise RuntimeError(f"{graph_id} fails the TensorRT lint: {'; '.join(problems[:5])}")
        initializers = store.externalize(model)
        onnx.save(model, str(tmp / f"{graph_id}.onnx"))
        onnx.checker.check_model(str(tmp / f"{graph_id}.onnx"), full_check=True)
        entries[graph_id] = {"task": task, "file": f"{graph_id}.onnx", "spec": spec.to_json(), "cache_key": key,
                             "initializers": initializers}
        tqdm.write(f"[I] {graph_id}: {how} in {time.perf_counter() - start:.1f}s, {len(model.graph.node)} nodes")
    store.close()
    if config is None:  # every graph reused from a bundle written before config was recorded: impossible today
        raise RuntimeError("no model config")
    slow = load_reference_tokenizer(paths.base)
    tokenizer = write_runtime_tokenizer(slow, tmp / "tokenizer.json")
    base_len = config["base_vocab"]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "variant": paths.variant.name,
        "tasks": {t: {**asdict(get_task(paths.variant, t)), "scaling": get_task(paths.variant, t).scaling}
                  for t in tasks},
        "config": config,
        "tokens": {"image_token_index": IMAGE_TOKEN_INDEX, "start_index": base_len, "idx_0": base_len + 1,
                   "end_index": base_len + 1 + VQ_CODES, "vq_codes": VQ_CODES, "image_tokens": IMAGE_TOKENS,
                   "eos": paths.eos_ids()},
        "tokenizer": tokenizer,
        "template": {"name": paths.variant.template, **asdict(TEMPLATES[paths.variant.template])},
        "precision": {"dtype": dtype, "fp32_islands": ["rmsnorm statistics", "attention softmax", "lm_head"],
                      "quantization": None},
        "kv_cache": KV_INTERFACE,
        "graphs": entries,
        "weights": {"file": "weights.bin", "tensors": store.tensors},
        "tools": tool_versions(),
    }
    write_manifest(tmp, manifest)
    swap_in(tmp, out)
    return manifest


def write_manifest(root: Path, manifest: dict) -> None:
    """Record the sha256 and size of every file of `root` in manifest["files"], then write manifest.json."""
    manifest["files"] = {p.name: {"sha256": file_digest(p), "bytes": p.stat().st_size}
                         for p in sorted(root.iterdir()) if p.is_file() and p.name != MANIFEST}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _read_old_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp` with renames only (the old bundle is deleted last)."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
