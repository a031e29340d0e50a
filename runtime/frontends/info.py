"""`python -m runtime info`: what a bundle holds (graphs, shapes, weights, engines) and which providers can run it."""

from __future__ import annotations

import re
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.graphspec import GraphSpec, TensorSpec
from runtime.contract.healthgpt import IMAGE_PATCHES
from runtime.core.providers import PROVIDERS, quiet_ort, why_not_loadable


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


_LAYERED = re.compile(r"^(.*?)\.(\d+)\.(\w+)$")  # past_key_values.7.key, present.7.value


def _tensor_lines(spec: GraphSpec, tensors: tuple[TensorSpec, ...]) -> list[str]:
    """One line per tensor (spec.render), the per-layer KV tensors folded into one line per group."""
    lines: list[str] = []
    groups: dict[tuple[str, str, str], tuple[int, set[int], set[str]]] = {}  # -> (line, layers, kinds)
    for t in tensors:
        m = _LAYERED.match(t.name)
        if m is None:
            lines.append(f"{t.name} {t.dtype} {spec.render(t.name)}")
            continue
        key = (m.group(1), t.dtype, spec.render(t.name))
        if key not in groups:
            groups[key] = (len(lines), set(), set())
            lines.append("")  # filled in below
        groups[key][1].add(int(m.group(2)))
        groups[key][2].add(m.group(3))
    for (prefix, dtype, shape), (at, layers, kinds) in groups.items():
        n = len(layers) * len(kinds)
        lines[at] = (f"{prefix}.{{{min(layers)}..{max(layers)}}}.{{{','.join(sorted(kinds))}}} {dtype} {shape} "
                     f"({n} tensors)")
    return lines


def _probe_providers(bundle) -> tuple[list[str], dict[str, str]]:
    """ONNX Runtime providers installed, and for each runtime choice whether a session really gets it (or why not),
    found by loading the bundle's smallest graph."""
    import onnxruntime as ort

    from runtime.core.backend import OrtBackend

    available = ort.get_available_providers()
    task = bundle.tasks[0]
    result = {}
    for choice in ("cpu", "cuda", "tensorrt"):
        wanted = PROVIDERS[choice][0]
        if wanted not in available:
            result[wanted] = "not installed"
            continue
        try:
            with quiet_ort(verbose=False):
                OrtBackend(choice).load(bundle, task, "embed")
            result[wanted] = "loadable"
        except UserError as e:
            result[wanted] = "not loadable: " + (why_not_loadable(ort, wanted) or str(e))
        except Exception as e:  # noqa: BLE001 - a provider that crashes on load is reported, not fatal
            result[wanted] = f"not loadable: {type(e).__name__}: {e}"
    return available, result


def _quantization(q) -> list[str]:
    if q is None:
        return ["none"]
    block = f"blocks of {q.block_size}" if q.block_size else "per channel"
    where = "; ONNX Runtime only (no TensorRT engines)" if q.ort_only else ""
    report = f"{'passed' if q.report.passed else 'FAILED'} ({q.report.file})"
    level = "" if q.accuracy_level is None else f"; MatMulNBits accuracy level {q.accuracy_level}"
    return [f"{q.scheme} {q.algorithm} (weights {q.weights} {block}, activations {q.activations}) on "
            f"{', '.join(q.graphs)}, LM head {q.lm_head}, H-LoRA {q.adapters}; {q.form}{where}",
            f"{sum(q.quantized_matmuls.values())} MatMuls through DequantizeLinear ("
            + ", ".join(f"{g} {n}" for g, n in q.quantized_matmuls.items()) + f"){level}; accuracy report {report}",
            *(f"ONNX Runtime {g} sessions: " + ", ".join(f"{k}={v}" for k, v in c.items())
              for g, c in q.session_config.items()),
            f"calibrated on {len(q.calibration_set)} images: " + ", ".join(c.file for c in q.calibration_set)]


def _verdict(bundle) -> list[str]:
    """The reports' verdicts (each read only when it belongs to this bundle), and what the runtime does with them."""
    from runtime.core.verdict import OVERRIDE, Verdict

    v = Verdict.of(bundle)
    lines = [f"verification  quantization report {v.quant}; parity {v.parity}"]
    if not v.passed:
        lines += [f"              FAILED: {c}" for c in v.failed[:10]]
        lines.append(f"              ask, generate, app and serve refuse this bundle unless given {OVERRIDE}")
    return lines


def show(bundle_dir: Path) -> int:
    from importlib import metadata
    from importlib.util import find_spec

    from runtime.core.bundle import Bundle

    bundle = Bundle.open(bundle_dir, verify=False)  # describe first, then check the files (below)
    m = bundle.manifest
    cfg, files = m.config, m.files
    print(f"bundle        {bundle.root}  (format {m.format} v{m.format_version})")
    print(f"digest        sha256 {bundle.digest} (of manifest.json, which hashes every file: pin this)")
    print(f"variant       {m.variant}  (template {m.template.name})")
    print("tasks         " + ", ".join(f"{t} (H-LoRA rank {c.rank}, CLIP layer {c.clip_layer})"
                                          for t, c in m.tasks.items()))
    islands = ", ".join(m.precision.fp32_islands) or "none"
    print(f"precision     {m.precision.dtype}  (fp32 islands: {islands})")
    for i, line in enumerate(_quantization(m.precision.quantization)):
        print(f"{'quantization' if i == 0 else '':<13} {line}")
    print(f"max context   {cfg.max_context} tokens (prompt, {IMAGE_PATCHES} image rows and generated tokens together)")
    print(f"model         hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads ({cfg.kv_heads} KV), "
          f"vocabulary {cfg.vocab}")
    if tools := {k: v for k, v in m.tools.items() if v}:
        print("exported with " + ", ".join(f"{k} {v}" for k, v in tools.items()))

    print("graphs:")
    for graph_id, entry in m.graphs.items():
        print(f"  {graph_id:<14} {entry.file} ({_size(files[entry.file].bytes)} + {len(entry.initializers)} "
              f"tensors from {m.weights.file})")
        for kind, tensors in (("input", entry.spec.inputs), ("output", entry.spec.outputs)):
            for line in _tensor_lines(entry.spec, tensors):
                print(f"      {kind:<6} {line}")

    used = [set(e.initializers) for e in m.graphs.values()]
    shared = sum(1 for name in m.weights.tensors if sum(name in u for u in used) > 1)
    print(f"weights       {m.weights.file}: {len(m.weights.tensors)} tensors, {shared} of them used by more than one "
          f"graph (stored and loaded once)")
    print("files:")
    for name, f in sorted(files.items()):
        print(f"  {name:<24} {_size(f.bytes):>10}")
    print(f"  {'total':<24} {_size(sum(f.bytes for f in files.values())):>10}")

    if m.engines:
        print("TensorRT engines:")
        for graph_id, e in m.engines.items():
            print(f"  {graph_id:<14} {e.file} ({_size(e.bytes)}), {e.precision}, built for {e.gpu_name} (compute "
                  f"capability {e.compute_capability}), TensorRT {e.tensorrt_version}")
    else:
        print(f"TensorRT engines: none (build them on the target GPU: python build.py engines --bundle {bundle.root})")

    bundle.verify_files()  # before any graph is handed to ONNX Runtime below
    print(f"integrity     all {len(files)} files match their sha256 in the manifest (and every weight its name)")
    print("\n".join(_verdict(bundle)))
    available, loadable = _probe_providers(bundle)
    print(f"onnxruntime   {_version(metadata, 'onnxruntime-gpu') or _version(metadata, 'onnxruntime')}: "
          f"providers available {', '.join(available)}")
    for provider, state in loadable.items():
        print(f"  {provider:<26} {state}")
    trt = _version(metadata, "tensorrt") or ("installed" if find_spec("tensorrt") else None)
    print(f"tensorrt      {trt or 'not installed'} (for --backend trt)")
    return 0


def _version(metadata, package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
