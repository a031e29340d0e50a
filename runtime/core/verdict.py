"""A bundle's verification verdict, and the refusal to run one whose verification failed.

Two reports can fail a bundle: its quantization report (quant.json, verdict recorded in the manifest) and its
parity report (parity.json, bound to the manifest's digest). `require` refuses a failed bundle with one error
naming the failed checks and the override; overridden, it returns the line every front-end shows on every start.
A report that does not belong to the bundle is no verdict at all: a quant.json that disagrees with the manifest is
refused outright, a parity.json made for another bundle (or edited) reads as "not verified".
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.contract.errors import UserError
from runtime.contract.records import ManifestError
from runtime.contract.reports import ParityReport, QuantReport
from runtime.core.bundle import Bundle

OVERRIDE = "--allow-failed-verification"


@dataclass(frozen=True)
class Verdict:
    quant: str  # passed | FAILED | none (not quantized)
    parity: str  # passed | FAILED | not verified (why)
    parity_report: ParityReport | None
    failed: tuple[str, ...]  # the failed checks, one line each

    @classmethod
    def of(cls, bundle: Bundle) -> Verdict:
        failed: list[str] = []
        quant = "none"
        if bundle.manifest.precision.quantization is not None:
            try:
                report = QuantReport.read(bundle.root, bundle.manifest)
            except ManifestError as e:
                raise UserError(f"{bundle.root}: {e}") from None
            quant = "passed" if report.passed else "FAILED"
            failed += [f"quantization report: {c}" for c in report.failed()]
        try:
            parity_report = ParityReport.read(bundle.root, bundle.digest)
        except ManifestError as e:
            parity_report, parity = None, f"not verified ({e})"
        else:
            parity = ("not verified (no parity.json: run `build.py verify`)" if parity_report is None
                      else "passed" if parity_report.passed else "FAILED")
        if parity_report is not None and not parity_report.passed:
            failed += [f"parity report: {c}" for c in parity_report.failed() or ["no backend could run"]]
        return cls(quant, parity, parity_report, tuple(failed))

    @property
    def passed(self) -> bool:
        return not self.failed


def require(bundle: Bundle, allow_failed: bool) -> str | None:
    """Refuse a bundle whose verification failed, unless `allow_failed`; then the warning to show on every start."""
    verdict = Verdict.of(bundle)
    if verdict.passed:
        return None
    checks = "; ".join(verdict.failed[:5]) + (f" (and {len(verdict.failed) - 5} more)" if verdict.failed[5:] else "")
    if not allow_failed:
        raise UserError(f"{bundle.root} FAILED its verification: {checks}; to run it anyway, pass {OVERRIDE}")
    return f"running a bundle that FAILED its verification ({OVERRIDE}): {checks}"
