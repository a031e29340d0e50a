"""The two reports a bundle carries, as typed records with one reader each, bound to the bundle they judged.

- quant.json (`build.py calibrate`, calibration/report.py): the structural check and the accuracy report of a
  quantized bundle against its fp32 source. It is hashed in the manifest's `files`, and it names the digest of the
  bundle's other files (`bundle_files`): copied into another bundle, it does not match. Its verdict must equal the
  manifest's `precision.quantization.report.passed`.
- parity.json (`build.py verify`, export/parity/verify.py): every backend against the PyTorch reference. Written
  after the manifest, it cannot be hashed there: it names the digest of the manifest it verified (`bundle_digest`)
  and carries the sha256 of its own content (`sha256`), so a report copied from another bundle or edited by hand
  reads as "not verified", never as passed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.files import NotRegularFile, read_regular
from runtime.contract.quantization import REPORT_FILES, Tolerances
from runtime.contract.records import ManifestError, Record

PARITY = "parity.json"
READ_LIMIT = 64 * 2**20  # a report larger than this is not one of ours


def files_digest(files: dict, leave_out: tuple[str, ...] = REPORT_FILES) -> str:
    """sha256 over the bundle's file table (name and sha256 of each file), its reports left out."""
    lines = sorted(f"{name} {entry.sha256}" for name, entry in files.items() if name not in leave_out)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _read(path: Path, cls, what: str):
    try:
        return cls.from_json(json.loads(read_regular(path, READ_LIMIT)), what)  # a FIFO or /dev/zero: refused
    except NotRegularFile:
        raise ManifestError(f"{path} is not a regular file") from None
    except (OSError, ValueError, RecursionError) as e:
        raise ManifestError(f"{path} is not a readable {what}: {e}") from None


##### quant.json #####

@dataclass(frozen=True)
class QuantSummary(Record):
    scheme: str
    algorithm: str
    block_size: int | None
    lm_head: str
    graphs: tuple[str, ...]
    adapters: str = "float32"


@dataclass(frozen=True)
class TaskFigures(Record):
    """One task's accuracy against the fp32 bundle (calibration/report.py says how each is measured)."""
    vision_cosine: float
    vision_max_abs: float
    positions: int
    top1: float
    mean_kl: float
    logit_cosine_mean: float
    logit_max_abs: float
    greedy_agreement: float
    gen_indices: float | None = None
    gen_psnr: float | None = None


@dataclass(frozen=True)
class Verdict(Record):
    task: str
    check: str
    ok: bool


@dataclass(frozen=True)
class Structure(Record):
    """The exact structural check (calibration/structure.py)."""
    passed: bool
    findings: tuple[str, ...]  # one line per problem, naming the graph and tensor
    weights: int
    max_rel_error: float
    graphs: dict[str, dict[str, float]]  # graph id -> unfused / fused: relative difference
    bounds: dict[str, float]
    not_run: dict[str, str] = field(default_factory=dict)  # graph id -> why its outputs were not compared (memory)


@dataclass(frozen=True)
class QuantReport(Record):
    fp32_bundle: str
    bundle_files: str  # files_digest of the quantized bundle it judged
    quantization: QuantSummary
    images: tuple[str, ...]
    tolerances: Tolerances
    note: str
    tasks: dict[str, TaskFigures]
    structure: Structure
    checks: tuple[Verdict, ...]
    passed: bool
    not_measured: str | None = None
    peak_rss_gib: dict[str, float] = field(default_factory=dict)

    def problems(self):
        if self.passed != (self.structure.passed and all(c.ok for c in self.checks)):
            yield "passed disagrees with its checks"

    def failed(self) -> list[str]:
        return ([f"structure: {p}" for p in self.structure.findings[:3]]
                + [f"{c.task} {c.check}" for c in self.checks if not c.ok])

    @classmethod
    def read(cls, root: Path, manifest) -> QuantReport:
        """The bundle's quant.json, checked against the manifest: hashed in it (Bundle.verify_files checks the
        bytes), made for this bundle's files and this quantization, with the verdict the manifest records."""
        q = manifest.precision.quantization
        if q is None or q.report is None:
            raise UserError(f"{root}: the bundle has no quantization report")
        report = _read(root / q.report.file, cls, q.report.file)
        summary = QuantSummary(q.scheme, q.algorithm, q.block_size, q.lm_head, q.graphs, q.adapters)
        if report.bundle_files != files_digest(manifest.files) or report.quantization != summary:
            raise ManifestError(f"{root / q.report.file} was not written for this bundle (its files or quantization "
                                "differ): re-run `build.py calibrate`")
        if report.passed != q.report.passed:
            raise ManifestError(f"{root}: the manifest says the quantization report "
                                f"{'passed' if q.report.passed else 'failed'}, {q.report.file} says the opposite")
        return report


##### parity.json #####

@dataclass(frozen=True)
class GraphCheck(Record):
    graph: str
    what: str
    max_abs: float
    max_rel: float
    cosine: float
    max_abs_limit: float
    min_cosine: float
    ok: bool


@dataclass(frozen=True)
class EndToEnd(Record):
    check: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class BackendResult(Record):
    status: str  # passed | failed | not run
    reason: str | None = None
    checks: tuple[GraphCheck, ...] = ()
    e2e: tuple[EndToEnd, ...] = ()
    conversation: tuple[EndToEnd, ...] = ()  # the follow-up turns against the reference (export/parity/conversation.py)
    providers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def problems(self):
        if self.status not in ("passed", "failed", "not run"):
            yield f"status {self.status!r} is not passed, failed or not run"

    def failed(self) -> list[str]:
        return ([f"{c.graph} {c.what}" for c in self.checks if not c.ok]
                + [e.check for e in self.e2e + self.conversation if not e.ok])


@dataclass(frozen=True)
class ParityReport(Record):
    bundle: str
    bundle_digest: str  # sha256 of the manifest.json it verified
    checkpoint: str
    precision: str
    image: str
    e2e_bounds: dict[str, float | None]
    backends: dict[str, BackendResult]
    peak_rss_gib: dict[str, float]
    passed: bool
    structure: Structure | None = None  # quantized bundles: against their fp32 source, when it was given
    sha256: str = ""  # of this record with sha256 "": set by `sealed`

    def sealed(self) -> ParityReport:
        return replace(self, sha256=self._digest())

    def _digest(self) -> str:
        body = replace(self, sha256="").to_json()
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def failed(self) -> list[str]:
        out = [f"{name}: {what}" for name, b in self.backends.items() for what in b.failed()]
        return out + ([f"structure: {p}" for p in self.structure.findings[:3]] if self.structure else [])

    @classmethod
    def read(cls, root: Path, digest: str) -> ParityReport | None:
        """The bundle's parity.json, or None when there is none; refused when it is not this bundle's."""
        path = root / PARITY
        if not path.exists():
            return None
        report = _read(path, cls, PARITY)
        if report.sha256 != report._digest():
            raise ManifestError(f"{path} does not match its own sha256 (edited after `build.py verify`)")
        if report.bundle_digest != digest:
            raise ManifestError(f"{path} verified another bundle (manifest sha256 {report.bundle_digest[:12]}..., "
                                f"this one {digest[:12]}...)")
        return report
