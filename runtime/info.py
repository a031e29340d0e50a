"""`python -m runtime info`: what a bundle holds (graphs, shapes, weights, engines) and which providers can run it."""

from __future__ import annotations

import re
from pathlib import Path

from runtime.cli import _quiet_ort, _size
from runtime.errors import UserError

def _shape(dims: dict, shape) -> str:
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(str(d))
        elif d in dims:
            lo, _, hi = dims[d]
            out.append(f"{d}={lo}..{hi}")
        else:
            out.append(str(d))
    return "[" + ", ".join(out) + "]"


_LAYERED = re.compile(r"^(.*?)\.(\d+)\.(\w+)$")  # past_key_values.7.key, present.7.value


def _tensor_lines(tensors: list[dict], dims: dict) -> list[str]:
    """One line per tensor, the per-layer KV tensors folded into one line per group."""
    lines, groups = [], {}
    for t in tensors:
        m = _LAYERED.match(t["name"])
        if m is None:
            lines.append(f"{t['name']} {t['dtype']} {_shape(dims, t['shape'])}")
            continue
        key = (m.group(1), t["dtype"], _shape(dims, t["shape"]))
        if key not in groups:
            groups[key] = (len(lines), set(), set())
            lines.append(None)
        groups[key][1].add(int(m.group(2)))
        groups[key][2].add(m.group(3))
    for (prefix, dtype, shape), (at, layers, kinds) in groups.items():
        n = len(layers) * len(kinds)
        lines[at] = (f"{prefix}.{{{min(layers)}..{max(layers)}}}.{{{','.join(sorted(kinds))}}} {dtype} {shape} "
                     f"({n} tensors)")
    return lines


_PROVIDER_LIBRARIES = {"CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
                       "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so"}


def why_not_loadable(ort, provider: str) -> str | None:
    """ONNX Runtime falls back silently; loading the provider's shared library ourselves says what is missing."""
    import ctypes

    library = _PROVIDER_LIBRARIES.get(provider)
    if library is None:
        return None
    path = Path(ort.__file__).parent / "capi" / library
    if not path.is_file():
        return f"{library} is not part of this onnxruntime installation"
    try:
        ctypes.CDLL(str(path))
    except OSError as e:
        return str(e).replace(f"{path}: ", "")
    return None


def _probe_providers(bundle) -> tuple[list[str], dict[str, str]]:
    """ONNX Runtime providers installed, and for each runtime choice whether a session really gets it (or why not),
    found by loading the bundle's smallest graph."""
    import onnxruntime as ort

    from runtime.backend import PROVIDERS, OrtBackend

    available = ort.get_available_providers()
    task = bundle.tasks[0]
    result = {}
    for choice in ("cpu", "cuda", "tensorrt"):
        wanted = PROVIDERS[choice][0]
        if wanted not in available:
            result[wanted] = "not installed"
            continue
        try:
            with _quiet_ort(verbose=False):
                OrtBackend(choice).load(bundle, task, "embed")
            result[wanted] = "loadable"
        except UserError as e:
            result[wanted] = "not loadable: " + (why_not_loadable(ort, wanted) or str(e))
        except Exception as e:  # noqa: BLE001 - a provider that crashes on load is reported, not fatal
            result[wanted] = f"not loadable: {type(e).__name__}: {e}"
    return available, result


def show(a) -> int:
    from importlib import metadata
    from importlib.util import find_spec

    from runtime.bundle import Bundle

    bundle = Bundle.open(a.bundle, verify=False)  # describe first, then check the files (below)
    m = bundle.manifest
    cfg, prec, files = m.get("config", {}), m.get("precision", {}), m.get("files", {})
    print(f"bundle        {bundle.root}  (format {m['format']} v{m['format_version']})")
    print(f"variant       {m.get('variant')}  (template {m.get('template', {}).get('name')})")
    print("tasks         " + ", ".join(f"{t} (H-LoRA rank {c.get('rank')}, CLIP layer {c.get('clip_layer')})"
                                          for t, c in m["tasks"].items()))
    q = prec.get("quantization")
    quant = "none" if not q else (f"{q['scheme']} {q['algorithm']}" + (f", block {q['block_size']}" if q["block_size"]
                                                                        else ", per channel"))
    islands = ", ".join(prec.get("fp32_islands") or []) or "none"
    print(f"precision     {prec.get('dtype')}  (quantization: {quant}; fp32 islands: {islands})")
    if q:
        print(f"quantized     {sum(q['quantized_matmuls'].values())} MatMuls through DequantizeLinear "
              f"({', '.join(f'{g} {n}' for g, n in q['quantized_matmuls'].items())}); LM head {q['lm_head']}; "
              f"MatMulNBits accuracy level {q['accuracy_level']}; accuracy report: "
              f"{'passed' if q['report']['passed'] else 'FAILED'} ({q['report']['file']})")
        names = [c["file"] for c in q["calibration_set"]]
        print(f"calibrated on {len(names)} images: {', '.join(names)}")
    print(f"max context   {cfg.get('max_context')} tokens (prompt, 576 image rows and generated tokens together)")
    print(f"model         hidden {cfg.get('hidden')}, {cfg.get('layers')} layers, {cfg.get('heads')} heads "
          f"({cfg.get('kv_heads')} KV), vocabulary {cfg.get('vocab')}")
    tools = {k: v for k, v in (m.get("tools") or {}).items() if v}
    if tools:
        print("exported with " + ", ".join(f"{k} {v}" for k, v in tools.items()))

    print("graphs:")
    for graph_id, entry in m["graphs"].items():
        spec = entry["spec"]
        nbytes = files.get(entry["file"], {}).get("bytes")
        print(f"  {graph_id:<14} {entry['file']} ({_size(nbytes) if nbytes is not None else '?'} + "
              f"{len(entry.get('initializers', []))} tensors from {m.get('weights', {}).get('file', '?')})")
        for kind in ("inputs", "outputs"):
            for line in _tensor_lines(spec[kind], spec.get("dims", {})):
                print(f"      {kind[:-1] if kind == 'inputs' else 'output':<6} {line}")

    weights = m.get("weights", {})
    if weights:
        used = [set(e.get("initializers", [])) for e in m["graphs"].values()]
        shared = sum(1 for name in weights.get("tensors", {}) if sum(name in u for u in used) > 1)
        print(f"weights       {weights['file']}: {len(weights.get('tensors', {}))} tensors, {shared} of them used by "
              f"more than one graph (stored and loaded once)")
    print("files:")
    for name, f in sorted(files.items()):
        print(f"  {name:<24} {_size(f['bytes']):>10}")
    print(f"  {'total':<24} {_size(sum(f['bytes'] for f in files.values())):>10}")

    engines = m.get("engines") or {}
    if engines:
        print("TensorRT engines:")
        for graph_id, e in engines.items():
            print(f"  {graph_id:<14} {e.get('file')} ({_size(e.get('bytes', 0))}), {e.get('precision')}, built for "
                  f"{e.get('gpu_name')} (compute capability {e.get('compute_capability')}), TensorRT "
                  f"{e.get('tensorrt_version')}")
    else:
        print(f"TensorRT engines: none (build them on the target GPU: python build.py engines --bundle {bundle.root})")

    available, loadable = _probe_providers(bundle)
    print(f"onnxruntime   {_version(metadata, 'onnxruntime-gpu') or _version(metadata, 'onnxruntime')}: "
          f"providers available {', '.join(available)}")
    for provider, state in loadable.items():
        print(f"  {provider:<26} {state}")
    trt = _version(metadata, "tensorrt") or ("installed" if find_spec("tensorrt") else None)
    print(f"tensorrt      {trt or 'not installed'} (for --backend trt)")

    bundle.verify_files()
    print(f"integrity     all {len(files)} files match their sha256 in the manifest")
    return 0


def _version(metadata, package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
