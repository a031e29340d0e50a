"""Everything the benchmark measures, built once and cached under $HGB_CACHE (default /tmp/healthgpt-bench/L{N}):

    ck/                 synthetic M3 checkpoint at real widths (export.synth 'real') with N decoder layers
    bundle/             the shipped bundle: export.compile.bundle.export_bundle(ck, bundle, ("com", "gen"), "fp32", MAX)
    variants/NAME/      one decoder graph each, as a bundle of its own (the shipped bundle's manifest, its graphs and
                        weights replaced by the variant's; variant.json says how it was made):
        base            plain base Phi-3 (no H-LoRA, base vocabulary): DecoderGraph(llm, MAX)
        com-gemm1       COM decoder with H-LoRA as ONE GEMM over [W; A*s; R] (shipped: FoldedHLora, W + [A; R])
        com-allpos      COM decoder returning logits for every position (shipped: last position only)
        com-dynamo      COM decoder exported with torch.onnx.export(dynamo=True) (shipped: TorchScript)
    q-NAME/             `build.py calibrate` of the shipped bundle (QUANTIZED: int4 AWQ, int8, w8a8 decoder + vision;
                        int4-rtn for the accuracy comparison only; int4-headfp32: int4 with the LM head kept float),
                        accuracy report included; q-NAME.source holds the shipped manifest's sha256 and the options
                        it was made from
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

from runtime.contract.quantization import INT4_BLOCKS

MAX_CONTEXT = 2048  # the bundle default (build.py export --max-context)
VARIANTS = ("base", "com-gemm1", "com-allpos", "com-dynamo")
# name -> calibrate() options (fp8 has no CPU kernels: it runs as written, emulated, so it is not timed here)
QUANTIZED = {"int4": dict(scheme="int4"), "int8": dict(scheme="int8"),
             "w8a8": dict(scheme="w8a8", graphs=("decoder", "vision")),
             "int4-rtn": dict(scheme="int4", algorithm="rtn"), "int4-headfp32": dict(scheme="int4", lm_head=False)}
# decoders timed beside fp32 (int4-headfp32: the LM head kept float, the alternative to the default);
# int4-rtn is there for AWQ's accuracy target
TIMED = ("int4", "int4-headfp32", "int8", "w8a8")


@dataclasses.dataclass(frozen=True)
class Model:
    """The synthetic M3 the benchmark measures: `size` as `build.py synth --size` (real: the true widths; tiny: a
    smoke run of the benchmark code), with `layers` decoder layers."""
    size: str = "real"
    layers: int = 4


def cache_root(model: Model) -> Path:
    name = f"L{model.layers}" if model.size == "real" else f"{model.size}-L{model.layers}"
    return Path(os.environ.get("HGB_CACHE", "/tmp/healthgpt-bench")) / name


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def checkpoint(model: Model) -> Path:
    ck = cache_root(model) / "ck"
    if (ck / ".done").is_file():
        return ck
    from export.synth.checkpoint import synthesize

    start = time.perf_counter()
    synthesize(ck, "m3", model.size, seed=0, layers=model.layers)
    (ck / ".done").write_text(f"{model.size}, {model.layers} layers")
    log(f"checkpoint {ck} ({model}) in {time.perf_counter() - start:.0f}s")
    return ck


def bundle(model: Model) -> Path:
    """Always through export_bundle: it reuses every graph whose cache key (exporter version included) matches."""
    from export.compile.bundle import export_bundle

    out = cache_root(model) / "bundle"
    start = time.perf_counter()
    export_bundle(checkpoint(model), out, ("com", "gen"), "fp32", MAX_CONTEXT)
    log(f"bundle {out} in {time.perf_counter() - start:.0f}s")
    return out


def variant_dir(model: Model, name: str) -> Path:
    return cache_root(model) / "variants" / name


def variants(model: Model, names=VARIANTS) -> dict[str, Path | str]:
    """name -> directory, or -> 'not built: reason' (an export that fails is reported, not fatal)."""
    from export.compile.bundle import EXPORTER_VERSION

    out, todo = {}, []
    for name in names:
        d = variant_dir(model, name)
        out[name] = d
        made = d / "variant.json"
        if not made.is_file() or json.loads(made.read_text()).get("exporter") != EXPORTER_VERSION:
            todo.append(name)
    if todo:
        out.update(_export_variants(model, todo))
    return out


def _export_variants(model: Model, names: list[str]) -> dict[str, str]:
    import torch

    from export.compile import graphs
    from export.reference.checkpoint import CheckpointPaths
    from export.reference.model import load_reference

    failed = {}
    ck = checkpoint(model)
    if "base" in names:
        from transformers import Phi3ForCausalLM

        llm = Phi3ForCausalLM.from_pretrained(CheckpointPaths.find(ck).base, dtype=torch.float32,
                                              attn_implementation="eager", local_files_only=True).eval()
        failed.update(_export_one(model, "base", graphs.DecoderGraph(llm, MAX_CONTEXT), llm))
        del llm
    rest = [n for n in names if n != "base"]
    if not rest:
        return failed
    ref = load_reference(ck, "com")
    ref.clip = None  # not needed here
    for name in rest:
        if name == "com-gemm1":
            from benchmarks.graph_variants import FusedHLora

            module = graphs.DecoderGraph(ref.llm, MAX_CONTEXT, fold=FusedHLora)
        elif name == "com-allpos":
            from benchmarks.graph_variants import AllPositionsDecoder

            module = AllPositionsDecoder(ref.llm, MAX_CONTEXT)
        else:
            module = graphs.DecoderGraph(ref.llm, MAX_CONTEXT)
        failed.update(_export_one(model, name, module, ref.llm, dynamo=name == "com-dynamo",
                                  all_positions=name == "com-allpos"))
    return failed


def _decoder_spec(llm, all_positions: bool):
    from export.compile import specs
    from runtime.contract.graphspec import TensorSpec

    spec = specs.decoder_of(llm, MAX_CONTEXT, "float32")
    if all_positions:
        logits = TensorSpec("logits", "float32", (1, "seq", llm.lm_head.weight.shape[0]))
        spec = dataclasses.replace(spec, outputs=(logits, *spec.outputs[1:]))
    return spec


def _export_one(model: Model, name: str, module, llm, dynamo: bool = False,
                all_positions: bool = False) -> dict[str, str]:
    """Export one decoder variant into variants/NAME/: a bundle holding only its com.decoder graph."""
    import numpy as np

    from export.compile.bundle import EXPORTER_VERSION
    from export.compile.onnx_export import export_graph
    from export.compile.writer import BundleWriter
    from export.outdir import staged
    from runtime.contract.manifest import GraphEntry
    from runtime.core.bundle import Bundle

    shipped = Bundle.open(cache_root(model) / "bundle", verify=False)  # built first (build_all)
    spec = _decoder_spec(llm, all_positions)
    feeds = spec.sample_inputs(np.random.default_rng(0), seq=3)
    start = time.perf_counter()
    try:
        graph = _export_dynamo(spec, module, feeds) if dynamo else export_graph(spec, module, feeds)
    except Exception as e:  # noqa: BLE001 - reported in the table as "not built: ..."
        log(f"variant {name}: export failed: {type(e).__name__}: {str(e)[:300]}")
        return {name: f"not built: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    with staged(variant_dir(model, name), "bundle", [shipped.root]) as tmp:
        writer = BundleWriter(tmp)
        inits = writer.add_graph("decoder.onnx", graph)
        writer.copy(shipped.file(shipped.manifest.tokenizer.file))
        writer.write_manifest(dataclasses.replace(
            shipped.manifest, graphs={"com.decoder": GraphEntry("com", "decoder.onnx", spec, name, inits)},
            weights=writer.weights(), files=writer.files(), engines={}))
        (tmp / "variant.json").write_text(json.dumps({"export": "dynamo" if dynamo else "torchscript",
                                                      "nodes": len(graph.graph.node), "exporter": EXPORTER_VERSION}))
    log(f"variant {name}: {len(graph.graph.node)} nodes in {time.perf_counter() - start:.0f}s")
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


def quantized(model: Model, names) -> dict[str, Path | str]:
    """name -> the calibrated bundle (remade when the shipped bundle or the options changed), or 'not built: ...'."""
    from calibration.calibrate import LM_HEAD, calibrate
    from runtime.contract.files import file_digest
    from runtime.contract.manifest import MANIFEST

    src = cache_root(model) / "bundle"
    out = {}
    for name in names:
        # int4 in TensorRT's blocks of 128 along K; the tiny widths (64) need 32
        options = {**QUANTIZED[name], "block_size": 32 if model.size == "tiny" else INT4_BLOCKS[0]}
        options.setdefault("lm_head", LM_HEAD[options["scheme"]])  # in the stamp: a new default remakes the bundle
        stamp = f"{file_digest(src / MANIFEST)} {sorted(options.items())}"
        d, source = cache_root(model) / f"q-{name}", cache_root(model) / f"q-{name}.source"
        out[name] = d
        if source.is_file() and source.read_text() == stamp:
            continue
        start = time.perf_counter()
        try:
            manifest = calibrate(src, d, **options)
        except Exception as e:  # noqa: BLE001 - reported in the table as "not built: ..."
            out[name] = f"not built: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            log(f"{name} bundle {out[name]}")
            continue
        source.write_text(stamp)
        log(f"{name} bundle {d} in {time.perf_counter() - start:.0f}s (accuracy report "
            f"{'passed' if manifest.precision.quantization.report.passed else 'FAILED'})")
    return out


def optimum(model: Model) -> Path | str:
    out = cache_root(model) / "optimum"
    if (out / ".done").is_file():
        return out
    from export.reference.checkpoint import CheckpointPaths

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from optimum.exporters.onnx import main_export

        start = time.perf_counter()
        main_export(model_name_or_path=str(CheckpointPaths.find(checkpoint(model)).base), output=str(out),
                    task="text-generation-with-past", opset=17, device="cpu", dtype="fp32",
                    local_files_only=True, do_validation=False, monolith=False)
        (out / ".done").write_text("ok")
        log(f"optimum export {out} in {time.perf_counter() - start:.0f}s")
    except Exception as e:  # noqa: BLE001
        return f"not built: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return out


def build_all(model: Model, quick: bool) -> dict:
    """Build (or find) every artifact; returns paths or 'not built: reason' strings."""
    arts = {"checkpoint": checkpoint(model), "bundle": bundle(model)}
    arts["variants"] = variants(model, ("base",) if quick else VARIANTS)
    arts["optimum"] = "skipped (--quick)" if quick else optimum(model)
    arts["quantized"] = quantized(model, ("int4",) if quick else QUANTIZED)  # --quick: int4, a smoke run
    return arts
