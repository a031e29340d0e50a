"""Everything the benchmark measures, built once and cached under $HGB_CACHE (default /tmp/healthgpt-bench/L{N}):

    ck/                 synthetic M3 checkpoint at real widths (export.synth 'real') with N decoder layers
    bundle/             the shipped bundle: export.bundle.export_bundle(ck, bundle, ("com", "gen"), "fp32", MAX)
    variants/NAME/      one decoder graph each, weights externalized like a bundle (a mini manifest.json):
        base            plain base Phi-3 (no H-LoRA, base vocabulary): DecoderGraph(llm, MAX, fold_hlora=False)
        com-gemm1       COM decoder with H-LoRA as ONE GEMM over [W; A*s; R] (export.hlora.FoldedHLora: W + [A; R])
        com-allpos      COM decoder returning logits for every position (shipped: last position only)
        com-dynamo      COM decoder exported with torch.onnx.export(dynamo=True) (shipped: TorchScript)
    optimum/            optimum-onnx main_export(base, task="text-generation-with-past") of the plain base model
    genai-fp32/, genai-int4/   ONNX Runtime GenAI model builder output of the plain base (built in peers.py)

Nothing here is written into the repository. Torch is imported lazily (only building needs it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path

MAX_CONTEXT = 2048  # the bundle default (build.py export --max-context)
VARIANTS = ("base", "com-gemm1", "com-allpos", "com-dynamo")


def cache_root(layers: int) -> Path:
    return Path(os.environ.get("HGB_CACHE", "/tmp/healthgpt-bench")) / f"L{layers}"


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def checkpoint(layers: int) -> Path:
    ck = cache_root(layers) / "ck"
    if (ck / ".done").is_file():
        return ck
    from export import synth

    # our own Size with N layers, registered in this process only (export/synth.py is not edited)
    name = f"bench{layers}"
    synth.SIZES["m3", name] = dataclasses.replace(synth.SIZES["m3", "real"], layers=layers)
    start = time.perf_counter()
    synth.synthesize(ck, "m3", name, seed=0)
    (ck / ".done").write_text(name)
    log(f"checkpoint {ck} ({layers} layers) in {time.perf_counter() - start:.0f}s")
    return ck


def bundle(layers: int) -> Path:
    """Always through export_bundle: it reuses every graph whose cache key (exporter version included) matches."""
    from export.bundle import export_bundle

    out = cache_root(layers) / "bundle"
    start = time.perf_counter()
    export_bundle(checkpoint(layers), out, ("com", "gen"), "fp32", MAX_CONTEXT)
    log(f"bundle {out} in {time.perf_counter() - start:.0f}s")
    return out


def variant_dir(layers: int, name: str) -> Path:
    return cache_root(layers) / "variants" / name


def variants(layers: int, names=VARIANTS) -> dict[str, Path | str]:
    """name -> directory, or -> 'not built: reason' (an export that fails is reported, not fatal)."""
    from export.bundle import EXPORTER_VERSION

    out, todo = {}, []
    for name in names:
        d = variant_dir(layers, name)
        out[name] = d
        manifest = d / "manifest.json"
        if not manifest.is_file() or json.loads(manifest.read_text()).get("exporter") != EXPORTER_VERSION:
            todo.append(name)
    if todo:
        out.update(_export_variants(layers, todo))
    return out


def _export_variants(layers: int, names: list[str]) -> dict[str, str]:
    import torch

    from export import graphs
    from export.checkpoint import CheckpointPaths
    from export.reference import load_reference

    failed = {}
    ck = checkpoint(layers)
    if "base" in names:
        from transformers import Phi3ForCausalLM

        llm = Phi3ForCausalLM.from_pretrained(CheckpointPaths.find(ck).base, dtype=torch.float32,
                                              attn_implementation="eager", local_files_only=True).eval()
        failed.update(_export_one(layers, "base", graphs.DecoderGraph(llm, MAX_CONTEXT, fold_hlora=False), llm))
        del llm
    rest = [n for n in names if n != "base"]
    if not rest:
        return failed
    ref = load_reference(ck, "com")
    ref.clip = None  # not needed here
    for name in rest:
        if name == "com-gemm1":
            from benchmarks.graph_variants import FusedHLora

            saved, graphs.FoldedHLora = graphs.FoldedHLora, FusedHLora  # this process only
            try:
                module = graphs.DecoderGraph(ref.llm, MAX_CONTEXT)
            finally:
                graphs.FoldedHLora = saved
        elif name == "com-allpos":
            from benchmarks.graph_variants import AllPositionsDecoder

            module = AllPositionsDecoder(ref.llm, MAX_CONTEXT)
        else:
            module = graphs.DecoderGraph(ref.llm, MAX_CONTEXT)
        failed.update(_export_one(layers, name, module, ref.llm, dynamo=name == "com-dynamo",
                                  all_positions=name == "com-allpos"))
    return failed


def _decoder_spec(llm, all_positions: bool):
    from export import specs
    from runtime.graphspec import TensorSpec

    cfg = llm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    vocab = llm.lm_head.weight.shape[0]
    spec = specs.decoder(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, cfg.hidden_size, vocab,
                         MAX_CONTEXT, "float32")
    if all_positions:
        logits = TensorSpec("logits", "float32", (1, "seq", vocab))
        spec = dataclasses.replace(spec, outputs=(logits, *spec.outputs[1:]))
    return spec


def _export_one(layers: int, name: str, module, llm, dynamo: bool = False,
                all_positions: bool = False) -> dict[str, str]:
    """Export one decoder variant into variants/NAME/ (graph + weights.bin + a mini manifest)."""
    import numpy as np
    import onnx

    from export.bundle import EXPORTER_VERSION
    from export.onnx_export import WeightStore, export_graph

    d = variant_dir(layers, name)
    tmp = d.with_name(name + ".partial")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec = _decoder_spec(llm, all_positions)
    feeds = spec.sample_inputs(np.random.default_rng(0), seq=3)
    start = time.perf_counter()
    try:
        model = _export_dynamo(spec, module, feeds) if dynamo else export_graph(spec, module, feeds)
    except Exception as e:  # noqa: BLE001 - reported in the table as "not built: ..."
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"variant {name}: export failed: {type(e).__name__}: {str(e)[:300]}")
        return {name: f"not built: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    store = WeightStore(tmp / "weights.bin")
    inits = store.externalize(model)
    store.close()
    onnx.save(model, str(tmp / "decoder.onnx"))
    manifest = {"graphs": {"com.decoder": {"file": "decoder.onnx", "spec": spec.to_json(), "initializers": inits}},
                "weights": {"file": "weights.bin", "tensors": store.tensors},
                "export": "dynamo" if dynamo else "torchscript", "nodes": len(model.graph.node),
                "exporter": EXPORTER_VERSION}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    log(f"variant {name}: {len(model.graph.node)} nodes in {time.perf_counter() - start:.0f}s")
    return {}


def _export_dynamo(spec, module, feeds):
    """torch.onnx.export(dynamo=True), same names and dynamic axes as the shipped TorchScript path."""
    import tempfile

    import onnx
    import torch

    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    # torch.export dynamic shapes: the sequence axis of inputs_embeds and the cache's row axis (as in the spec)
    seq, rows = torch.export.Dim("seq", min=1, max=MAX_CONTEXT), torch.export.Dim("cache", min=1, max=MAX_CONTEXT)
    dynamic = ({1: seq}, None, ({2: rows},) * (len(args) - 2))  # forward(inputs_embeds, past_length, *cache)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # torch.export first: torch.onnx.export(dynamo=True) re-types the *cache tuple of dynamic_shapes as a list
        program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic)
        path = Path(tmp) / "graph.onnx"
        torch.onnx.export(program, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
                          opset_version=18, dynamo=True, external_data=True, optimize=True)
        model = onnx.load(str(path))
    model.graph.name = spec.name
    return model


def optimum(layers: int) -> Path | str:
    out = cache_root(layers) / "optimum"
    if (out / ".done").is_file():
        return out
    from export.checkpoint import CheckpointPaths

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from optimum.exporters.onnx import main_export

        start = time.perf_counter()
        main_export(model_name_or_path=str(CheckpointPaths.find(checkpoint(layers)).base), output=str(out),
                    task="text-generation-with-past", opset=17, device="cpu", dtype="fp32",
                    local_files_only=True, do_validation=False, monolith=False)
        (out / ".done").write_text("ok")
        log(f"optimum export {out} in {time.perf_counter() - start:.0f}s")
    except Exception as e:  # noqa: BLE001
        return f"not built: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return out


def build_all(layers: int, quick: bool) -> dict:
    """Build (or find) every artifact; returns paths or 'not built: reason' strings."""
    arts = {"checkpoint": checkpoint(layers), "bundle": bundle(layers)}
    arts["variants"] = variants(layers, ("base",) if quick else VARIANTS)
    arts["optimum"] = "skipped (--quick)" if quick else optimum(layers)
    return arts
