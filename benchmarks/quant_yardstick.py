"""The quantizers on one model (issue 22's yardstick): ours, ONNX Runtime GenAI's and llama.cpp's, each against the
same fp32 network on the same teacher-forced positions.

    python benchmarks/quant_yardstick.py --base CKPT/Phi-3-mini-4k-instruct --layers 4 --work /tmp/yard-L4
    python benchmarks/quant_yardstick.py --base CKPT/Phi-3-mini-4k-instruct --work /tmp/yard-full \
        --ours int4-rtn-128-q,int4-rtn-128-f,int4-rtn-32-f,int4-awq-128-f,int8-q

The network is the plain base Phi-3 of the checkpoint (its first --layers layers; 0: all), as GenAI's model builder
writes it in fp32 (`genai-fp32/`): that graph is the reference. Contenders, each fed the same token ids in one
prefill (every position's logits):
- ours: `calibration.quantize` (the function `build.py calibrate` runs) applied to every MatMul weight of that fp32
  graph, the DequantizeLinear form fused by ONNX Runtime at the accuracy level our bundles record (4), as our
  runtime runs it. Names: SCHEME-ALGORITHM-BLOCK-HEAD (head q: LM head quantized, f: kept fp32), int8-q / int8-f.
  AWQ's activation statistics come from other token ids than the measured ones.
- GenAI int4: its model builder's defaults (`-p int4 -e cpu`), run as built.
- llama.cpp Q4_0 and Q8_0: convert_hf_to_gguf.py (bf16, exact) and llama_model_quantize; llama.cpp bf16 is its own
  floor (its CPU kernels round activations to bf16).
The ids are seeded random base-vocabulary ids: on random weights no text is more typical than another.
Per contender: mean KL(fp32 || contender), top-1 agreement, logit cosine (calibration.report.compare: the figures of
our accuracy report) and, for the ONNX graphs, the hidden state's relative error after every layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import llamacpp, peers  # noqa: E402
from benchmarks.timing import machine  # noqa: E402
from calibration import quantize  # noqa: E402
from calibration.calibrate import ACCURACY_LEVEL  # noqa: E402
from calibration.report import compare  # noqa: E402

LLAMA = ("bf16", "Q4_0", "Q8_0")


def prefix_model(base: Path, layers: int, out: Path) -> Path:
    """An HF folder holding `base`'s first `layers` decoder layers (the same tensors), kept in `out`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {k: f for k, f in index.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(keep.values())):
        with safe_open(str(base / shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k, s in keep.items() if s == shard})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2))
    return out


def residual_outputs(model: onnx.ModelProto) -> list[str]:
    """The hidden state after each decoder layer in a GenAI-built graph: the residual sum (output 3) of the next
    layer's input norm, or of the final norm; named here where the builder left it unnamed."""
    skips = [n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"
             and ("input_layernorm" in n.name or "final_norm" in n.name)]
    names = []
    for n in skips:
        while len(n.output) < 4:
            n.output.append("")
        if not n.output[3]:
            n.output[3] = f"{n.name}/residual_sum"
        names.append(n.output[3])
    model.graph.output.extend(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in names)
    return names


def run_onnx(model: onnx.ModelProto, folder: Path, ids: np.ndarray, threads: int, level: int | None,
             probes: bool = True, extra: tuple[str, ...] = ()) -> tuple[np.ndarray, list[np.ndarray], dict]:
    """Every position's logits, the hidden state after each layer, and the `extra` values of one prefill."""
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    hidden = residual_outputs(model) if probes else []
    model.graph.output.extend(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in extra)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    opts.add_session_config_entry("session.disable_prepacking", "1")  # fp32 at full size: no second 15 GB copy
    if level is not None:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    head = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids[None].astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, len(ids)), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(len(ids), dtype=np.int64)[None]
        else:  # past_key_values.N.key/value [batch, kv heads, 0, head dim]
            feeds[i.name] = np.zeros((1, i.shape[1], 0, head), np.float32)
    names = ["logits", *hidden, *extra]
    out = dict(zip(names, sess.run(names, feeds)))
    return out["logits"][0], [out[h][0] for h in hidden], {x: out[x] for x in extra}


def awq_importance(model: onnx.ModelProto, folder: Path, ids: np.ndarray, threads: int) -> dict[str, np.ndarray]:
    """Mean square per input channel of every weight MatMul's activation, from a prefill of `ids`."""
    matmuls = quantize.weight_matmuls(model)
    acts = sorted({m.activation for m in matmuls})
    _, _, values = run_onnx(model, folder, ids, threads, None, probes=False, extra=tuple(acts))
    return {m.weight: (values[m.activation].reshape(-1, values[m.activation].shape[-1]).astype(np.float64) ** 2
                       ).mean(0).astype(np.float32) for m in matmuls}


def ours(model: onnx.ModelProto, folder: Path, name: str, importance: dict) -> tuple[onnx.ModelProto, int]:
    """The fp32 graph with our quantizer's weights (stored in folder/NAME.data), and the bytes of its weights."""
    scheme, *rest = name.split("-")
    algorithm, block, head = (rest[0], int(rest[1]), rest[2]) if scheme == "int4" else ("rtn", 0, rest[0])
    targets = [m for m in quantize.weight_matmuls(model) if m.role == "linear" or (m.role == "lm_head" and head == "q")]
    inits = {i.name: i for i in model.graph.initializer}
    data, done = folder / f"{name}.data", {}
    with open(data, "wb") as f:
        for m in targets:
            if m.weight in done:
                continue
            w = numpy_helper.to_array(inits[m.weight], base_dir=str(folder))
            q, scale = quantize.quantize_weight(w, scheme, block, importance.get(m.weight) if algorithm == "awq"
                                                else None)
            tensors = quantize.weight_initializers(q, scale, scheme, m.weight)
            for t in tensors:
                offset = f.tell()
                f.write(t.raw_data)
                external_data_helper.set_external_data(t, data.name, offset, len(t.raw_data))
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
            done[m.weight] = (tensors, block or None)
    out = quantize.rewrite(model, done, scheme)
    return out, weight_bytes(out, folder)


def weight_bytes(model: onnx.ModelProto, folder: Path) -> int:
    """Bytes of the graph's initializers, the embedding table excluded (a step gathers one row of it)."""
    total = 0
    for t in model.graph.initializer:
        if "embed_tokens" not in t.name:
            ext = {e.key: e.value for e in t.external_data}
            total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def figures(ref: np.ndarray, got: np.ndarray, ref_hidden=(), hidden=()) -> dict:
    c = compare(list(ref), list(got))
    rel = [float(np.linalg.norm(h - r) / np.linalg.norm(r)) for r, h in zip(ref_hidden, hidden)]
    return {"mean_kl": float(np.mean(c["kl"])), "top1": float(np.mean(c["top1"])),
            "cosine": float(np.mean(c["cosine"])), "max_abs": c["max_abs"], "hidden_rel_error": rel}


def llama_rows(base: Path, work: Path, ids_file: Path, ref: np.ndarray, threads: int) -> dict:
    rows = {}
    for kind in LLAMA:
        path = llamacpp.gguf(base, work, kind)
        if isinstance(path, str):
            rows[f"llama.cpp {kind}"] = path
            continue
        out = work / f"logits-llama-{kind}.npy"
        answer = llamacpp.worker({"op": "logits", "model": str(path), "ids": str(ids_file), "out": str(out),
                                  "threads": threads})
        rows[f"llama.cpp {kind}"] = answer if isinstance(answer, str) else {
            **figures(ref, np.load(out)), "bytes": path.stat().st_size}
    return rows


def measure(a: argparse.Namespace) -> dict:
    base = Path(a.base)
    base = prefix_model(base, a.layers, Path(a.work) / "hf") if a.layers else base
    rng = np.random.default_rng(0)
    ids, calib = rng.integers(100, 32000, a.positions), rng.integers(100, 32000, a.positions)
    ids_file = Path(a.work) / "ids.npy"
    np.save(ids_file, ids)
    rows: dict = {}
    fp32 = peers.build_from(base, Path(a.work) / "genai-fp32", "fp32")
    if isinstance(fp32, str):
        raise SystemExit(f"the fp32 reference could not be built: {fp32}")
    graph = onnx.load(str(fp32 / "model.onnx"), load_external_data=False)
    ref, ref_hidden, _ = run_onnx(graph, fp32, ids, a.threads, None)
    rows["fp32 (GenAI builder)"] = {**figures(ref, ref, ref_hidden, ref_hidden), "bytes": weight_bytes(graph, fp32)}
    genai = peers.build_from(base, Path(a.work) / "genai-int4", "int4")
    if isinstance(genai, str):
        rows["GenAI int4"] = genai
    else:
        g = onnx.load(str(genai / "model.onnx"), load_external_data=False)
        logits, hidden, _ = run_onnx(g, genai, ids, a.threads, None)
        rows["GenAI int4"] = {**figures(ref, logits, ref_hidden, hidden), "bytes": weight_bytes(g, genai)}
    if a.llama:
        rows.update(llama_rows(base, Path(a.work), ids_file, ref, a.threads))
    importance = awq_importance(graph, fp32, calib, a.threads) if any("awq" in v for v in a.ours) else {}
    for name in a.ours:
        start = time.perf_counter()
        model, size = ours(graph, fp32, name, importance)
        logits, hidden, _ = run_onnx(model, fp32, ids, a.threads, a.accuracy_level)
        rows[f"ours {name}"] = {**figures(ref, logits, ref_hidden, hidden), "bytes": size,
                                "seconds": round(time.perf_counter() - start, 1)}
        (fp32 / f"{name}.data").unlink()
        print(f"[yardstick] ours {name}: KL {rows[f'ours {name}']['mean_kl']:.4g}", flush=True)
    return {"layers": a.layers or json.loads((base / "config.json").read_text())["num_hidden_layers"],
            "positions": a.positions, "machine": machine(a.threads), "rows": rows}


def table(res: dict) -> str:
    lines = [f"{res['layers']} layers, {res['positions']} teacher-forced positions, against fp32 (GenAI builder's "
             f"graph)", "", "| contender | weights GB | mean KL | top-1 | logit cosine | hidden rel. err. (last "
             "layer) |", "|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        if isinstance(r, str):
            lines.append(f"| {name} | {r} | | | | |")
            continue
        last = f"{r['hidden_rel_error'][-1]:.4f}" if r["hidden_rel_error"] else "-"
        lines.append(f"| {name} | {r['bytes'] / 1e9:.3f} | {r['mean_kl']:.4g} | {r['top1']:.3f} | "
                     f"{r['cosine']:.4f} | {last} |")
    per_layer = {n: r["hidden_rel_error"] for n, r in res["rows"].items()
                 if not isinstance(r, str) and r["hidden_rel_error"] and not n.startswith("fp32")}
    if per_layer:
        lines += ["", "Hidden state's relative error after each layer:", "",
                  "| layer | " + " | ".join(per_layer) + " |", "|---|" + "---|" * len(per_layer)]
        for i in range(len(next(iter(per_layer.values())))):
            lines.append(f"| {i} | " + " | ".join(f"{e[i]:.4f}" for e in per_layer.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="HF Phi-3 folder (a checkpoint's Phi-3-mini-4k-instruct)")
    p.add_argument("--layers", type=int, default=0, help="its first N layers only (0: all)")
    p.add_argument("--work", required=True, help="folder for the built models (kept, reused)")
    p.add_argument("--positions", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours", type=lambda s: s.split(","), default="int4-rtn-128-q,int4-rtn-128-f,int4-rtn-32-q,"
                   "int4-rtn-32-f,int4-awq-128-q,int4-awq-128-f,int4-awq-32-f,int8-q,int8-f".split(","))
    p.add_argument("--accuracy-level", type=int, default=ACCURACY_LEVEL,
                   help="MatMulNBits' accuracy level for ours (default: the one our bundles record)")
    p.add_argument("--no-llama", dest="llama", action="store_false", help="leave llama.cpp out")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    res = measure(a)
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
