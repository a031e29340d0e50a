"""`build.py verify`: every available backend against the PyTorch reference; parity.json + parity.md in the bundle.

Per graph (Polygraphy Comparator: max abs/rel error; cosine), tokenization (runtime ids == reference ids), end to end
(COM: greedy token agreement over N steps; GEN: the 1024 indices and the image's PSNR). A backend that cannot run
here is reported "not run: <reason>", never as passed.
"""

from __future__ import annotations

import gc
import json
import math
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from export.parity.conversation import TURNS, bounded, conversation_checks, expect_conversation, token_check
from export.parity.graphs import expect_graphs, graph_parity
from export.reference.model import HealthGPT, load_reference
from runtime.contract.errors import UserError
from runtime.contract.files import write_atomic
from runtime.contract.graphspec import Tolerance
from runtime.contract.healthgpt import GEN, IMAGE_TOKENS, TASKS
from runtime.contract.reports import PARITY, BackendResult, ParityReport, Structure
from runtime.core.backend import open_backend
from runtime.core.bundle import Bundle
from runtime.core.image import load_image
from runtime.core.pipeline import Pipeline

BACKENDS = {"ort-cpu": ("ort", "cpu"), "ort-cuda": ("ort", "cuda"), "trt": ("trt", "auto")}
# End-to-end bounds by bundle precision (per-graph bounds come from each graph's spec, scaled for fp16).
E2E = {"fp32": {"token_agreement": 1.0, "min_psnr": 40.0, "abs_scale": 1.0},
       "fp16": {"token_agreement": 0.9, "min_psnr": 30.0, "abs_scale": 100.0}}
QUESTIONS = ["What does this scan show?", "Is there anything abnormal?  Answer in 2 sentences.", "Describe it: ÄÖÜ 123"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@dataclass
class E2EExpectations:
    """The reference's end-to-end results for one task (see GraphExpectations: computed, then the model freed)."""
    task: str
    prompt_ids: list[list[int]]  # of QUESTIONS
    tokens: list[int]  # com: greedy tokens of QUESTIONS[0]; gen: the constrained image tokens
    image: np.ndarray | None  # gen: the reference's decoded image


@torch.no_grad()
def expect_e2e(ref: HealthGPT, image, steps: int) -> E2EExpectations:
    ids = [ref.prompt_ids(q) for q in QUESTIONS]
    embeds = ref.encode_image(ref.pixel_values(image))
    if not TASKS[ref.task].makes_images:
        return E2EExpectations(ref.task, ids, ref.generate(ids[0], embeds, steps), None)
    tokens = ref.generate(ids[0], embeds, GEN.max_new_tokens, constrain_image_tokens=True)
    return E2EExpectations(ref.task, ids, tokens, ref.vqgan(torch.tensor([[t - ref.idx0 for t in tokens]]))[0].numpy())


def e2e_checks(want: E2EExpectations, pipe: Pipeline, image, steps: int, bounds: dict) -> list[dict]:
    task, out = want.task, []
    run_ids = [pipe.tokenizer.prompt_ids(pipe.template.parts(q, True, task)) for q in QUESTIONS]
    out.append({"check": f"{task} tokenization", "ok": want.prompt_ids == run_ids,
                "detail": f"{sum(a == b for a, b in zip(want.prompt_ids, run_ids))}/{len(QUESTIONS)} prompts "
                          "identical"})
    if want.image is None:
        got = pipe.tokens(TASKS[task], image, QUESTIONS[0], steps)
        out.append(token_check("com greedy tokens", want.tokens, got, bounds["token_agreement"]))
    else:
        with tqdm(total=IMAGE_TOKENS, desc=f"bundle {task}", unit="token", leave=False) as bar:
            got = pipe.image_tokens(image, QUESTIONS[0], constrain_image_tokens=True, on_token=lambda _: bar.update())
        agree = sum(a == b for a, b in zip(want.tokens, got)) / len(want.tokens)
        quality = psnr(pipe.decode_image(got), want.image)
        need = bounds.get("gen_indices", bounds["token_agreement"])
        out.append(bounded(f"gen {IMAGE_TOKENS} indices", agree, need, f"{agree:.4f} of indices identical ("))
        out.append({"check": "gen image PSNR", "ok": quality >= bounds["min_psnr"],
                    "detail": f"{quality:.1f} dB (required >= {bounds['min_psnr']})"})
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def verify(bundle_dir: str | Path, checkpoint: str | Path, backends: list[str], image: str | Path,
           steps: int = 32, tasks: list[str] | None = None, structure: Structure | None = None) -> ParityReport:
    """structure: a quantized bundle's structural check against its fp32 source (calibration/structure.py, run by
    the caller: export/ does not import calibration/), recorded in the report and part of its verdict."""
    bundle = Bundle.open(bundle_dir)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UserError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    tasks = tasks or bundle.tasks
    dtype = precision = bundle.manifest.precision.dtype
    bounds = E2E[dtype]
    quant = bundle.manifest.precision.quantization  # a calibrated bundle states its own bounds against the reference
    if quant is not None:
        precision = f"{dtype} + {quant.scheme} ({quant.algorithm})"
        bounds = {**bounds, **quant.tolerances.vs_reference.to_json()}

    def tolerance(spec) -> Tolerance:
        t = spec.tolerance
        if quant is not None and spec.name in quant.graphs:
            return Tolerance(bounds["max_abs"], bounds["min_cosine"])
        return t if dtype == "fp32" else Tolerance(t.max_abs * bounds["abs_scale"], min(t.min_cosine, 0.999))

    pil = load_image(image)
    # The reference first, one task at a time, each model freed before the next is built and before any backend
    # session exists: verify never holds a PyTorch model and the bundle's sessions at once.
    expected = {}
    for task in tasks:
        ref = load_reference(checkpoint, task)
        expected[task] = (expect_graphs(ref, bundle.manifest.config.vocab, pil), expect_e2e(ref, pil, steps),
                          expect_conversation(ref, pil, steps))
        del ref
        gc.collect()
    rss = {"reference": round(peak_rss_gib(), 2)}
    results = {name: _backend(name, bundle, tasks, expected, pil, steps, bounds, tolerance) for name in backends}
    rss["end"] = round(peak_rss_gib(), 2)
    passed = (all(b.status != "failed" for b in results.values()) and any(b.status == "passed" for b in
                                                                           results.values())
              and (structure is None or structure.passed))
    report = ParityReport(bundle=str(bundle.root), bundle_digest=bundle.digest, checkpoint=str(checkpoint),
                          precision=precision, image=str(image), e2e_bounds=bounds, backends=results,
                          peak_rss_gib=rss, passed=passed, structure=structure).sealed()
    write_report(bundle.root, report)
    return report


def _backend(name, bundle, tasks, expected, pil, steps, bounds, tolerance) -> BackendResult:
    checks, e2e, turns = [], [], []
    try:
        backend = open_backend(*BACKENDS[name])
        pipe = Pipeline(bundle, backend)
        for task in tasks:
            graphs, want, conversation = expected[task]
            checks += [c.to_json() for c in graph_parity(graphs, pipe, tolerance=tolerance)]
            e2e += e2e_checks(want, pipe, pil, steps, bounds)
            if conversation is not None:
                turns += conversation_checks(conversation, pipe, pil, steps, bounds)
        providers = pipe.providers()
    except UserError as e:  # the backend cannot run here (no GPU, no TensorRT, no engines): say why
        return BackendResult("not run", reason=str(e))
    finally:
        pipe = backend = None  # this backend's sessions freed before the next backend's
        gc.collect()
    ok = all(c["ok"] for c in checks + e2e + turns)
    return BackendResult.from_json({"status": "passed" if ok else "failed", "checks": checks, "e2e": e2e,
                                    "conversation": turns, "providers": providers}, name)


def write_report(root: Path, report: ParityReport) -> None:
    lines = [f"# Parity report: {report.bundle}", "",
             f"Reference: PyTorch fp32 from `{report.checkpoint}`; bundle precision {report.precision}; "
             f"image `{Path(report.image).name}`. Overall: **{'PASSED' if report.passed else 'FAILED'}**", "",
             f"Peak RSS: {report.peak_rss_gib['reference']} GiB after the reference, {report.peak_rss_gib['end']} "
             "GiB in all (the reference is freed before any backend runs).", ""]
    if s := report.structure:
        lines += [f"Structural check against the fp32 source: **{'passed' if s.passed else 'FAILED'}** ({s.weights} "
                  f"quantized weights)", *(f"- {p}" for p in s.findings[:20]),
                  *(f"- {g}: outputs not compared: {why}" for g, why in s.not_run.items()), ""]
    for name, b in report.backends.items():
        lines.append(f"## {name}: {b.status}" + (f": {b.reason}" if b.status == "not run" else ""))
        if b.status == "not run":
            lines.append("")
            continue
        lines += ["", "| graph | output | max abs | max rel | cosine | limit | ok |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {c.graph} | {c.what} | {c.max_abs:.3g} | {c.max_rel:.3g} | {c.cosine:.7f} | "
                  f"abs <= {c.max_abs_limit:.3g}, cos >= {c.min_cosine} | {'yes' if c.ok else '**NO**'} |"
                  for c in b.checks]
        lines += ["", "| end to end | result | ok |", "|---|---|---|"]
        lines += [f"| {e.check} | {e.detail} | {'yes' if e.ok else '**NO**'} |" for e in b.e2e]
        if b.conversation:
            lines += ["", f"| conversation ({len(TURNS)} turns) | result | ok |", "|---|---|---|"]
            lines += [f"| {e.check} | {e.detail} | {'yes' if e.ok else '**NO**'} |" for e in b.conversation]
        lines.append("")
    for name, text in ((PARITY, json.dumps(report.to_json(), indent=1)), ("parity.md", "\n".join(lines))):
        write_atomic(root / name, text)


def failures(report: ParityReport) -> list[str]:
    """One line per failed check, naming the backend and graph."""
    out = []
    for name, b in report.backends.items():
        for c in b.checks:
            if not c.ok:
                out.append(f"{name}: {c.graph} {c.what}: max abs {c.max_abs:.3g} > {c.max_abs_limit:.3g} "
                           f"or cosine {c.cosine:.6f} < {c.min_cosine}")
        out += [f"{name}: {e.check}: {e.detail}" for e in b.e2e + b.conversation if not e.ok]
    return out + [f"structure: {p}" for p in (report.structure.findings if report.structure else ())]
