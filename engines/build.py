"""Bundle ONNX graphs -> TensorRT engines under BUNDLE/engines/<graph_id>.plan, recorded in the bundle manifest.

One engine per graph of the manifest:
- optimization profiles come from the graph's spec (`GraphSpec.trt_profiles()`): the decoder gets a prefill profile
  (seq 1..max_context, tuned for the one-row cache of an empty context) and a single-token decode profile (tuned for
  a full cache); vision and vqgan are static (one min = opt = max profile);
- the network is strongly typed. TensorRT 11 has no weak typing (no fp16/bf16/int8/fp8 builder flags), so an
  engine computes in the precision its ONNX graph carries, fp32 islands included: `precision` can only confirm the
  bundle's dtype. fp16 engines come from `build.py export --dtype fp16`; bf16 follows the same rule and needs a bf16
  export;
  INT4/INT8/FP8 engines come from `build.py calibrate` (Q/DQ nodes in the graph), and their manifest entry says
  so (precision 'fp32+w8a8');
- one timing cache is shared by every build and saved after each (atomically), so rebuilds are fast;
- each plan is written atomically, then recorded under the manifest's `engines[graph_id]` (GPU, compute
  capability, TensorRT version, precision, profiles, cache key) and in its `files`, so the bundle's integrity check
  covers it; the manifest is rewritten atomically after every engine. An engine whose cache key (graph and weights
  content, spec, precision, GPU model, TensorRT version) still matches is kept ("[I] ... cached").

`tensorrt` is imported only inside `build_plan()`; everything else is plain data and testable without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.files import check_file, write_atomic
from runtime.contract.graphspec import GraphSpec
from runtime.contract.manifest import MANIFEST, EngineEntry, FileEntry, Manifest
from runtime.contract.quantization import TENSORRT_INT4_BLOCKS
from runtime.core.bundle import Bundle
from runtime.core.trt_compat import DeviceInfo, check_compat, current_device
from runtime.frontends.args import positive_int

BUILD_PRECISIONS = ("fp32", "fp16", "bf16")  # what TensorRT could build; a bundle holds fp32 or fp16
BUILDER_VERSION = 1  # bump when the build settings below change: every cached engine is then rebuilt
ENGINE_DIR = "engines"

__all__ = ["BUILD_PRECISIONS", "add_engines_command", "build_engines", "build_plan", "check_compat", "check_request",
           "engine_entry", "engine_key", "graph_precision", "profiles_for"]

Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max) of one input


##### pure functions: no TensorRT #####

def profiles_for(spec: GraphSpec) -> list[dict[str, Shapes]]:
    """Per optimization profile, input name -> (min, opt, max): spec.trt_profiles(), checked to cover every input."""
    profiles = spec.trt_profiles()
    for i, profile in enumerate(profiles):
        missing = [name for name in spec.input_names if name not in profile]
        if missing:
            raise ValueError(f"{spec.name} profile {i} has no shapes for {', '.join(missing)}")
        for name, (lo, opt, hi) in profile.items():
            if not (len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))):
                raise ValueError(f"{spec.name} profile {i}: {name} has min/opt/max {lo} / {opt} / {hi}")
    return profiles


def check_request(manifest: Manifest, precision: str | None, max_context: int | None) -> str:
    """The precision to build (the bundle's own when None); refuses what the exported graphs cannot give."""
    have, bundle_context = manifest.precision.dtype, manifest.config.max_context
    if max_context is not None and max_context != bundle_context:
        raise UserError(f"--max-context {max_context} differs from the bundle's {bundle_context}: the KV cache shape "
                        f"is baked into the exported graphs; re-export with `python build.py export --max-context "
                        f"{max_context}`, then build engines again")
    if precision is None:
        return have
    if precision not in BUILD_PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(BUILD_PRECISIONS)}")
    if precision != have:
        why = (f"--precision {precision} does not match the bundle, which holds {have} graphs: TensorRT builds "
               "strongly typed networks (TensorRT 11 has no weak typing), so an engine computes in the precision its "
               "ONNX graph carries")
        if precision == "bf16":
            raise UserError(f"{why}; bf16 engines need a bf16 export, which `build.py export` does not write "
                            f"(it writes fp32 or fp16): export with `--dtype fp16` for GPU, or build --precision "
                            f"{have}")
        raise UserError(f"{why}: re-export with `python build.py export --dtype {precision}`, then build engines again")
    return precision


def graph_precision(manifest: Manifest, graph_id: str, precision: str) -> str:
    """What the engine of `graph_id` computes in: the build precision, and the scheme of a quantized graph (its Q/DQ
    nodes carry it: a strongly typed network takes the types from the graph), e.g. 'fp32+w8a8'."""
    quantization = manifest.precision.quantization
    if quantization is None or manifest.graphs[graph_id].spec.name not in quantization.graphs:
        return precision
    return f"{precision}+{quantization.scheme}"


def engine_key(manifest: Manifest, graph_id: str, precision: str, device: DeviceInfo) -> str:
    """Content hash of everything an engine depends on; an engine whose key matches is reused, never rebuilt."""
    graph, files, quantization = manifest.graphs[graph_id], manifest.files, manifest.precision.quantization
    parts = [str(BUILDER_VERSION), graph_id, files[graph.file].sha256, files[manifest.weights.file].sha256,
             json.dumps(graph.spec.to_json(), sort_keys=True), precision,
             json.dumps(quantization.to_json() if quantization else None), device.name,
             device.compute_capability, device.tensorrt_version]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def engine_entry(graph_id: str, file: str, sha256: str, nbytes: int, device: DeviceInfo, precision: str,
                 profiles: list[dict[str, Shapes]], key: str, seconds: float) -> EngineEntry:
    """The manifest record of one engine: what the runtime checks (runtime.core.trt_compat) and what built it."""
    return EngineEntry(
        graph=graph_id, file=file, sha256=sha256, bytes=nbytes, gpu_name=device.name,
        compute_capability=device.compute_capability, tensorrt_version=device.tensorrt_version, precision=precision,
        profiles=tuple({name: tuple(tuple(s) for s in shapes) for name, shapes in p.items()} for p in profiles),
        key=key, build_seconds=round(seconds, 1),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def save_manifest(root: Path, manifest: Manifest) -> None:
    write_atomic(root / MANIFEST, manifest.to_json_text())


def describe(spec: GraphSpec) -> str:
    """Each profile's dynamic dims, or 'static': e.g. 'seq 1..640..2048, cache 1..1..2048 | cache 1..2048..2048'."""
    dynamic = []
    for override in spec.profiles or ({},):
        ranges = {**spec.dims, **override}
        dynamic.append(", ".join(f"{k} {d.min}..{d.opt}..{d.max}" for k, d in ranges.items() if d.min != d.max)
                       or "static")
    return " | ".join(dynamic)


##### TensorRT #####

def build_plan(onnx_path: Path, profiles: list[dict[str, Shapes]], timing_cache: bytes | None):
    """Parse the ONNX graph (external weights beside it) as a strongly typed network and build a serialized engine.
    Returns (plan, timing cache): both buffers; the cache holds the old entries plus this build's."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.exception import PolygraphyException

    try:
        builder, network, parser = network_from_onnx_path(str(onnx_path), strongly_typed=True)
        # No fp16/bf16/int8/fp8 flags: strongly typed, Q/DQ types come from the graph. Polygraphy clears TF32 unless
        # asked, so fp32 graphs stay fp32.
        config = CreateConfig(profiles=[_polygraphy_profile(Profile, p) for p in profiles])(builder, network)
        if timing_cache:
            try:
                if not config.set_timing_cache(config.create_timing_cache(timing_cache), ignore_mismatch=False):
                    print("[W] timing cache was made on another GPU or TensorRT version; starting an empty one")
            except (RuntimeError, TypeError, ValueError) as e:
                print(f"[W] timing cache unreadable ({e}); starting an empty one")
        plan = engine_bytes_from_network((builder, network, parser), config=config)
    except PolygraphyException as e:
        raise UserError(f"TensorRT could not build an engine from {onnx_path.name}: {e} (TensorRT {trt.__version__}; "
                        "its log is above)") from None
    return memoryview(plan), bytes(memoryview(config.get_timing_cache().serialize()))


def _polygraphy_profile(Profile, shapes: dict[str, Shapes]):
    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    return profile


##### the build #####

def build_engines(bundle_dir: str | Path, precision: str | None = None, max_context: int | None = None,
                  timing_cache: str | Path | None = None, force: bool = False) -> dict[str, EngineEntry]:
    """Build (or keep, when its cache key matches) one engine per graph; returns the manifest's engines.

    precision: "fp32" | "fp16" | "bf16", or None for the bundle's own; anything but the bundle's dtype is refused
    (the precision is carried by the ONNX graph). max_context: a check only (the cache shape is in the graphs).
    timing_cache: file to read and update (default BUNDLE/engines/timing.cache). force: rebuild every engine."""
    root = Path(bundle_dir)
    bundle = Bundle.open(root, verify=False)
    manifest = bundle.manifest
    precision = check_request(manifest, precision, max_context)
    if (q := manifest.precision.quantization) and q.ort_only:
        blocks = " or ".join(map(str, TENSORRT_INT4_BLOCKS))
        raise UserError(f"{root} is quantized in a form TensorRT cannot build ({q.scheme} in blocks of {q.block_size}; "
                        f"TensorRT takes int4 blocks of {blocks}): recalibrate with --block-size {blocks} for "
                        f"TensorRT, or run this bundle with ONNX Runtime")
    engines, files = dict(manifest.engines), dict(manifest.files)
    plans = {e.file for e in engines.values()}
    graphs_only = dataclasses.replace(manifest, engines={}, files={k: v for k, v in files.items() if k not in plans})
    Bundle(root, graphs_only, bundle.digest).verify_files()  # plans are checked (rebuilt if stale) one by one below
    device = current_device()
    cache_path = Path(timing_cache) if timing_cache else root / ENGINE_DIR / "timing.cache"
    (root / ENGINE_DIR).mkdir(exist_ok=True)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[I] building engines for {device.name} (compute capability {device.compute_capability}), "
          f"TensorRT {device.tensorrt_version}, {precision}, timing cache {cache_path}")
    start_all = time.perf_counter()
    for graph_id, graph in manifest.graphs.items():
        spec = graph.spec
        profiles = profiles_for(spec)
        key = engine_key(manifest, graph_id, precision, device)
        file = f"{ENGINE_DIR}/{graph_id}.plan"
        old = engines.get(graph_id)
        if not force and old and old.key == key and _intact(root / old.file, old):
            print(f"[I] {graph_id}: cached engine {old.file} ({old.bytes / 2**20:.1f} MiB, key matches)")
            continue
        print(f"[I] {graph_id}: building {graph_precision(manifest, graph_id, precision)} ({len(profiles)} "
              f"profile(s): {describe(spec)})", flush=True)
        start = time.perf_counter()
        plan, cache = build_plan(bundle.file(graph.file), profiles, cache_path.read_bytes() if cache_path.is_file()
                                 else None)
        write_atomic(root / file, plan)
        if cache:
            write_atomic(cache_path, cache)
        seconds = time.perf_counter() - start
        entry = engine_entry(graph_id, file, hashlib.sha256(plan).hexdigest(), plan.nbytes, device,
                             graph_precision(manifest, graph_id, precision), profiles, key, seconds)
        engines[graph_id], files[file] = entry, FileEntry(entry.sha256, entry.bytes)
        manifest = dataclasses.replace(manifest, engines=dict(engines), files=dict(files))
        save_manifest(root, manifest)
        print(f"[I] {graph_id}: built in {seconds:.1f}s, {entry.bytes / 2**20:.1f} MiB -> {file}", flush=True)
    print(f"[I] engines done in {time.perf_counter() - start_all:.1f}s")
    return engines


def _intact(path: Path, entry: EngineEntry) -> bool:
    try:
        check_file(path, entry.sha256, entry.bytes)
    except UserError:
        return False
    return True


##### CLI: `build.py engines` #####

def add_engines_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "engines", help="build TensorRT engines for every graph of a bundle (on the GPU that will run them)",
        description="Build one TensorRT engine per graph of an exported bundle, under BUNDLE/engines/, and record "
                    "them in its manifest with this GPU's compute capability and the TensorRT version; the runtime "
                    "refuses engines built for another GPU architecture or TensorRT version. Needs TensorRT and a "
                    "CUDA GPU (pip install '.[tensorrt]'). Engines whose inputs did not change are kept.")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory written by `build.py export`")
    p.add_argument("--precision", choices=BUILD_PRECISIONS, default=None,
                   help="must be the bundle's dtype (the default): TensorRT 11 networks are strongly typed, so the "
                        "precision is carried by the ONNX graph. For fp16 engines export with `--dtype fp16`")
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="check only: must equal the bundle's (the RoPE tables and KV cache limits are in the graphs)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="tactic timing cache to reuse and update (default BUNDLE/engines/timing.cache)")
    p.add_argument("--force", action="store_true", help="rebuild every engine, even those whose inputs are unchanged")
    p.set_defaults(run=cmd_engines)
    return p


def cmd_engines(a) -> None:
    engines = build_engines(a.bundle, a.precision, a.max_context, a.timing_cache, a.force)
    for graph_id, e in engines.items():
        print(f"    {graph_id:16} {e.precision:5} {len(e.profiles)} profile(s) {e.bytes / 2**20:9.1f} MiB "
              f"built in {e.build_seconds:7.1f}s on {e.gpu_name} (cc {e.compute_capability}, TensorRT "
              f"{e.tensorrt_version})")
    total = sum(e.bytes for e in engines.values())
    print(f"[I] bundle {a.bundle}: {len(engines)} engines, {total / 2**20:.1f} MiB in all")
