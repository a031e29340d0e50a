"""The manifest's quantization record, and every field of it checked against what it describes.

`Quantization.problems` checks the record alone (each enum, the scheme's algorithm, block size, stored types and
accuracy level, the relative errors, the report's file, the ONNX Runtime session entries the project writes);
`quantization_problems(manifest)` checks it against the rest of the manifest: graphs that exist, the stored
tensors' dtypes against the scheme, and the int4 scales' shapes against block_size. The report's verdict against
the hashed quant.json is checked where the file is read (runtime/contract/reports.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from runtime.contract.records import Record

# scheme -> calibration algorithms (first: calibrate's default)
ALGORITHMS = {"int4": ("awq", "rtn"), "int8": ("rtn",), "w8a8": ("minmax", "percentile", "entropy"),
              "fp8": ("minmax", "percentile", "entropy")}
SCHEMES = tuple(ALGORITHMS)
# First: the default, chosen from the quantizers' comparison (benchmarks/README.md, "Quantizers on one model"): the
# TensorRT-legal block with the least KL per byte against both peers' int4
INT4_BLOCKS = (64, 128, 32)
TENSORRT_INT4_BLOCKS = (128, 64)  # TensorRT's INT4 weight-only blocks; an int4 bundle in blocks of 32 is ORT-only


def ort_only(scheme: str, block_size: int | None) -> bool:
    """Whether TensorRT cannot build this scheme's form: int4 in blocks it does not take."""
    return scheme == "int4" and block_size not in TENSORRT_INT4_BLOCKS
# scheme -> (stored weight type, what the quantized MatMuls read), as the record names them, and the weights
# table's dtype of the stored weights
TYPES = {"int4": ("int4", "float32", "int4"), "int8": ("int8", "float32", "int8"), "w8a8": ("int8", "int8", "int8"),
         "fp8": ("float8e4m3fn", "float8e4m3fn", "float8_e4m3fn")}
QUANTIZED_DTYPES = frozenset(t[2] for t in TYPES.values())
GRAPHS = ("decoder", "vision")  # the graphs calibrate can quantize
LM_HEAD = ("quantized", "float32")
ADAPTERS = ("quantized", "float32")  # the H-LoRA A/B matrices (the router stays float)
REPORT_FILES = ("quant.json", "quant.md")  # the typed, hashed verdict first; the manifest's report points to it
# The only ONNX Runtime session entries a bundle may ask for, with their allowed values (calibrate.py says why)
SESSION_ENTRIES = {"session.disable_quant_qdq": ("1",), "session.x64quantprecision": ("1",)}
INLINE_BYTES = 1024  # tensors below this stay inside the graph file (export/compile/onnx_export.py): not in the table


@dataclass(frozen=True)
class CalibrationFile(Record):
    file: str  # its name
    path: str  # where it was on the machine that calibrated
    sha256: str


@dataclass(frozen=True)
class ReferenceBounds(Record):
    """What `build.py verify` requires of a quantized bundle against the PyTorch fp32 reference. None: measured and
    reported, not a limit (a floor every outcome meets would be no check at all)."""
    max_abs: float
    min_cosine: float
    token_agreement: float | None
    gen_indices: float | None
    min_psnr: float


@dataclass(frozen=True)
class Tolerances(Record):
    """The accuracy report's bounds against the fp32 bundle (calibration/report.py), per scheme; None: reported,
    not a limit."""
    min_top1: float | None
    max_mean_kl: float
    min_greedy: float | None
    min_vision_cosine: float
    min_gen_indices: float | None
    min_psnr: float
    min_logit_cosine: float
    vs_reference: ReferenceBounds


@dataclass(frozen=True)
class ReportRef(Record):
    passed: bool
    file: str

    def problems(self):
        if self.file != REPORT_FILES[0]:
            yield f"report.file {self.file!r} is not {REPORT_FILES[0]}"


@dataclass(frozen=True)
class Quantization(Record):
    """The typed slot `build.py calibrate` fills: which scheme, how, on what data, and how accurate it came out."""
    scheme: str  # int4 | int8 (weight-only) | w8a8 | fp8 (Q/DQ on weights and activations)
    algorithm: str  # awq (activation-aware clipping), rtn; Q/DQ activation ranges: minmax, percentile, entropy
    block_size: int | None  # int4: elements per scale along K; None: per output channel (int8)
    weights: str  # the stored weight type
    activations: str  # what the quantized MatMuls read: float32 (weight-only), int8, float8e4m3fn
    graphs: tuple[str, ...]  # graph names quantized (decoder, vision)
    lm_head: str  # float32 | quantized
    form: str  # the ONNX form, in words
    ort_only: bool  # True: a form TensorRT cannot build (int4 in blocks TensorRT does not take)
    accuracy_level: int | None  # ONNX Runtime's MatMulNBits compute type (session.qdq_matmulnbits_accuracy_level)
    quantized_matmuls: dict[str, int]  # graph id -> MatMuls reading a DequantizeLinear
    source_bundle: str
    calibration_set: tuple[CalibrationFile, ...]
    weight_rel_error: dict[str, float]  # mean / max relative Frobenius error of the quantized weights
    tolerances: Tolerances
    report: ReportRef | None = None  # None only while calibrate writes the bundle: the manifest requires it
    # graph name -> ONNX Runtime session config entries its sessions need (OrtBackend sets them), e.g. fp8:
    # session.disable_quant_qdq = 1 (the CPU provider's QDQ fusions have no float8 kernels)
    session_config: dict[str, dict[str, str]] = field(default_factory=dict)
    adapters: str = "float32"  # quantized: the H-LoRA A/B matrices in the scheme's form too (weight-only schemes)

    def problems(self) -> Iterator[str]:
        if self.scheme not in ALGORITHMS:
            yield f"scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}"
            return
        if self.algorithm not in ALGORITHMS[self.scheme]:
            yield f"algorithm {self.algorithm!r} is not one of {self.scheme}'s: {', '.join(ALGORITHMS[self.scheme])}"
        if self.block_size != (self.block_size if self.scheme == "int4" else None) or (
                self.scheme == "int4" and self.block_size not in INT4_BLOCKS):
            want = f"one of {', '.join(map(str, INT4_BLOCKS))}" if self.scheme == "int4" else "null (per channel)"
            yield f"block_size {self.block_size} for {self.scheme}: must be {want}"
        if self.ort_only != ort_only(self.scheme, self.block_size):
            yield (f"ort_only {self.ort_only} for {self.scheme} in blocks of {self.block_size}: TensorRT takes int4 "
                   f"in blocks of {' or '.join(map(str, TENSORRT_INT4_BLOCKS))} only")
        if (self.weights, self.activations) != TYPES[self.scheme][:2]:
            yield f"weights/activations {self.weights}/{self.activations} are not {self.scheme}'s"
        if self.lm_head not in LM_HEAD:
            yield f"lm_head {self.lm_head!r} is not one of {', '.join(LM_HEAD)}"
        if self.adapters not in ADAPTERS or (self.adapters == "quantized" and TYPES[self.scheme][1] != "float32"):
            yield f"adapters {self.adapters!r}: one of {', '.join(ADAPTERS)}, quantized for weight-only schemes only"
        if not self.graphs or not set(self.graphs) <= set(GRAPHS) or len(set(self.graphs)) != len(self.graphs):
            yield f"graphs {list(self.graphs)} must be a subset of {', '.join(GRAPHS)}"
        weight_only = TYPES[self.scheme][1] == "float32"
        if weight_only != (self.accuracy_level is not None) or not 0 <= (self.accuracy_level or 0) <= 4:
            yield f"accuracy_level {self.accuracy_level}: weight-only schemes take 0..4, Q/DQ schemes none"
        errors = self.weight_rel_error
        if set(errors) != {"mean", "max"} or not all(map(math.isfinite, errors.values())) or not (
                0 <= errors["mean"] <= errors["max"]):
            yield f"weight_rel_error {errors} must hold a finite mean <= max, both >= 0"
        yield from self._session_problems()

    def _session_problems(self) -> Iterator[str]:
        if bad := [k for entries in self.session_config.values() for k in entries if not k.startswith("session.")]:
            yield f"session_config key(s) {', '.join(bad)} are not ONNX Runtime session config entries"
            return
        for graph, entries in self.session_config.items():
            if graph not in self.graphs:
                yield f"session_config.{graph}: not a quantized graph"
            for key, value in entries.items():
                if value not in SESSION_ENTRIES.get(key, ()):
                    yield (f"session_config.{graph}: {key}={value!r} is not allowed (allowed: "
                           + ", ".join(f"{k} in {list(v)}" for k, v in SESSION_ENTRIES.items()) + ")")


def quantization_problems(manifest) -> Iterator[str]:
    """The quantization record against the manifest it sits in."""
    q = manifest.precision.quantization
    if q is None or q.scheme not in TYPES:
        return
    where = "precision.quantization"
    names = {g.spec.name for g in manifest.graphs.values()}
    if missing := [g for g in q.graphs if g not in names]:
        yield f"{where}.graphs: no such graph(s) in the bundle: {', '.join(missing)}"
    for gid, count in q.quantized_matmuls.items():
        entry = manifest.graphs.get(gid)
        if entry is None or entry.spec.name not in q.graphs or count < 1:
            yield f"{where}.quantized_matmuls.{gid}: not a quantized graph of this bundle, or no MatMuls"
    if q.report is None or q.report.file not in manifest.files:
        yield f"{where}.report: no hashed report (a quantized bundle always has one: re-run `build.py calibrate`)"
    stored = TYPES[q.scheme][2]
    for gid, entry in manifest.graphs.items():
        tensors = {n: manifest.weights.tensors[n] for n in entry.initializers if n in manifest.weights.tensors}
        dtypes = {t.dtype for t in tensors.values()} & QUANTIZED_DTYPES
        quantized = gid in q.quantized_matmuls
        if dtypes - {stored} or quantized != (stored in dtypes):
            yield (f"{where}: scheme {q.scheme} stores {stored}, but graph {gid} holds "
                   f"{', '.join(sorted(dtypes)) or 'no quantized'} tensors")
            continue
        yield from _scale_problems(gid, q, tensors.values(), where)


def _scale_problems(gid: str, q: Quantization, tensors, where: str) -> Iterator[str]:
    """Each stored weight [K, N] has its fp32 scale, [ceil(K / block_size), N] (int4) or [N], among its graph's
    tensors where the scale is large enough to lie in the weights table."""
    shapes = {t.shape for t in tensors if t.dtype == "float32"}
    for t in tensors:
        if t.dtype != TYPES[q.scheme][2] or len(t.shape) != 2:
            continue
        k, n = t.shape
        want = (-(-k // q.block_size), n) if q.block_size else (n,)
        if 4 * math.prod(want) >= INLINE_BYTES and want not in shapes:
            yield (f"{where}: graph {gid} has no fp32 scale of shape {list(want)} for its {t.dtype} weight "
                   f"{list(t.shape)} (block_size {q.block_size})")
            return
