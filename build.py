#!/usr/bin/env python
"""healthgpt-edge build driver: synth -> export -> (calibrate) -> (engines) -> verify; `reference` runs PyTorch.

Every command reads local files only (no model hub). Run `python build.py COMMAND --help` for its options.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys
from pathlib import Path

from engines.build import add_engines_command
from runtime.contract.errors import UserError, stopping
from runtime.contract.healthgpt import TASKS
from runtime.contract.quantization import INT4_BLOCKS
from runtime.frontends.args import Parser, non_negative_int, positive_int


def _directory(text: str) -> Path:
    """An argparse type: an existing directory, checked before anything imports torch (~11 s)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory" if Path(text).exists() else f"{text}: no such "
                                         "directory")
    return Path(text)


def _subset(*names: str):
    """An argparse type: a comma-separated, non-empty subset of `names`."""
    def check(text: str) -> list[str]:
        items = text.split(",")
        unknown = [n for n in items if n not in names]
        if unknown or len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated subset of {', '.join(names)}")
        return items
    return check


def cmd_synth(a):
    from export.synth.checkpoint import synthesize

    paths = synthesize(a.out, a.variant, a.size, a.seed)
    print(f"[I] synthetic {a.variant} ({a.size}) checkpoint written to {paths.root}")


def cmd_reference(a):
    from runtime.core.image import load_image
    from runtime.core.png import check_png_path, save_png
    from runtime.core.prompt import check_question

    questions = [a.prompt, *a.follow_up, *(_questions_file(a.follow_ups) if a.follow_ups else [])]
    if len(questions) > 1 and a.task != "com":
        raise UserError("--follow-up and --follow-ups are for the com task (a conversation)")
    for question in questions:  # the input checks first: loading the reference takes torch and the whole model
        check_question(question)
    max_new_tokens = a.max_new_tokens or TASKS[a.task].max_new_tokens  # the reference demos' defaults
    image = load_image(a.image)
    out = a.out or Path("reference.png")
    if a.task == "gen":
        check_png_path(out)
    from export.reference.model import load_reference

    ref = load_reference(a.checkpoint, a.task)
    if len(questions) > 1:
        for question, (_, tokens) in zip(questions, ref.conversation(image, questions, max_new_tokens)):
            print(f"Q: {question}\nA: {ref.tokenizer.decode(tokens, skip_special_tokens=True)}")
    elif a.task == "com":
        print(ref.answer(image, a.prompt, max_new_tokens))
    else:
        save_png(ref.generate_image(image, a.prompt, max_new_tokens, a.constrain_image_tokens), out)
        print(f"[I] image written to {out}")


def _questions_file(path: Path) -> list[str]:
    try:
        questions = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read a JSON list of questions: {e}") from None
    if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
        raise UserError(f"{path}: expected a JSON list of question strings")
    return questions


def cmd_export(a):
    from export.compile.bundle import export_bundle

    manifest = export_bundle(a.checkpoint, a.out, tuple(a.tasks), a.dtype, a.max_context)
    total = sum(f.bytes for f in manifest.files.values())
    print(f"[I] bundle {a.out}: {len(manifest.graphs)} graphs, {total / 2**20:.1f} MiB in all")


def _structure(bundle_dir: Path, fp32_bundle: Path | None):
    """A quantized bundle's structural check against its fp32 source: --fp32-bundle, else the source its manifest
    records when it is still there; None for an fp32 bundle or when no source is at hand (verify says so)."""
    from calibration import structure
    from runtime.contract.reports import Structure
    from runtime.core.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    quant = bundle.manifest.precision.quantization
    source = fp32_bundle or (quant and Path(quant.source_bundle))
    if quant is None or not (source / "manifest.json").is_file():
        if quant is not None:
            print(f"[W] no structural check: the fp32 source {source} is not there (give --fp32-bundle)")
        return None
    return Structure.from_json(structure.check(Bundle.open(source), bundle).to_json())


def cmd_verify(a):
    from pydicom.data import get_testdata_file

    from export.parity.verify import failures, verify

    a.image = a.image or Path(get_testdata_file("CT_small.dcm"))
    shape = _structure(a.bundle, a.fp32_bundle)
    report = verify(a.bundle, a.checkpoint, a.backends, a.image, a.steps, a.tasks, shape)
    for name, b in report.backends.items():
        print(f"[I] {name}: {b.status}" + (f" ({b.reason})" if b.status == "not run" else ""))
    if report.structure is not None:
        print(f"[I] structural check against the fp32 source: {'passed' if report.structure.passed else 'FAILED'}")
    print(f"[I] report: {Path(a.bundle) / 'parity.md'}")
    bad = failures(report)
    if bad or not report.passed:
        raise UserError("parity FAILED: " + ("; ".join(bad[:5]) or "no backend could run"))


def cmd_calibrate(a):
    from calibration.calibrate import calibrate

    manifest = calibrate(a.bundle, a.out, a.scheme, a.block_size, a.images, a.samples,
                         tuple(g for g in a.graphs.split(",") if g), a.algorithm,
                         None if a.lm_head is None else a.lm_head == "quantized",
                         None if a.adapters is None else a.adapters == "quantized", a.quick_report)
    q = manifest.precision.quantization
    total = sum(f.bytes for f in manifest.files.values())
    print(f"[I] {a.out}: {q.scheme} ({q.algorithm}), {sum(q.quantized_matmuls.values())} MatMuls through "
          f"DequantizeLinear, calibrated on {len(q.calibration_set)} images, {total / 2**20:.1f} MiB in all")
    print(f"[I] accuracy report: {Path(a.out) / 'quant.md'}")
    if not q.report.passed:
        from runtime.contract.reports import QuantReport

        failed = QuantReport.read(Path(a.out), manifest).failed()
        raise UserError(f"{a.out}: the {q.scheme} bundle FAILED its report ({'; '.join(failed[:5])}; see quant.md); "
                        "it is marked failed and the runtime refuses it without --allow-failed-verification")


def add_synth(sub) -> None:
    s = sub.add_parser("synth", help="write a random checkpoint in the exact release layout")
    s.add_argument("--out", type=Path, required=True, help="directory to create (replaced if it exists)")
    s.add_argument("--variant", choices=["m3", "l14"], default="m3", help="m3 = Phi-3-mini base, l14 = phi-4 base")
    s.add_argument("--size", choices=["tiny", "real", "full"], default="tiny",
                   help="tiny: small widths, real geometry; real: the model's true widths with 2 decoder layers; "
                        "full (m3 only): the whole model, its base in two bf16 shards as released (~9 GB)")
    s.add_argument("--seed", type=non_negative_int, default=0)
    s.set_defaults(run=cmd_synth)


def add_reference(sub) -> None:
    r = sub.add_parser("reference", help="run the PyTorch reference on one image")
    r.add_argument("--checkpoint", type=_directory, required=True, help="checkpoint directory (release layout)")
    r.add_argument("--task", choices=["com", "gen"], default="com", help="com: answer; gen: generate an image")
    r.add_argument("--image", type=Path, required=True, help="PNG/JPEG/TIFF/BMP or DICOM file")
    r.add_argument("--out", type=Path, help="gen: PNG to write (default reference.png)")
    r.add_argument("--max-new-tokens", type=positive_int, default=None)
    r.add_argument("--constrain-image-tokens", action="store_true",
                   help="gen: only <idx_*> tokens, exactly 1024 (random weights never emit a full image otherwise)")
    r.add_argument("--follow-up", action="append", default=[], metavar="QUESTION",
                   help="com: a follow-up question about the same image, asked after the answer (repeatable)")
    r.add_argument("--follow-ups", type=Path, metavar="FILE.json",
                   help="com: follow-up questions as a JSON list of strings, asked after any --follow-up")
    r.add_argument("prompt", help="question (com) or instruction (gen)")
    r.set_defaults(run=cmd_reference)


def add_export(sub) -> None:
    e = sub.add_parser("export", help="checkpoint -> bundle of per-task ONNX graphs + manifest")
    e.add_argument("--checkpoint", type=_directory, required=True)
    e.add_argument("--out", type=Path, required=True, help="bundle directory (replaced atomically)")
    e.add_argument("--tasks", type=_subset("com", "gen"), default=["com", "gen"],
                   help="comma-separated: com, gen (default both)")
    e.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="fp32 for CPU; fp16 for GPU (norms, softmax and LM head stay fp32)")
    e.add_argument("--max-context", type=positive_int, default=2048,
                   help="KV cache length (prompt + generated tokens)")
    e.set_defaults(run=cmd_export)


def add_calibrate(sub) -> None:
    c = sub.add_parser("calibrate", help="fp32 bundle -> quantized bundle (same graph interfaces) + quant.json/md")
    c.add_argument("--bundle", type=Path, required=True, help="the fp32 bundle written by `build.py export`")
    c.add_argument("--out", type=Path, required=True, help="quantized bundle directory (replaced atomically)")
    c.add_argument("--scheme", choices=["int4", "int8", "w8a8", "fp8"], default="int4",
                   help="weight-only: int4 (blocks along K) or int8 (per channel), DequantizeLinear -> MatMul; "
                        "Q/DQ for TensorRT strongly typed engines: w8a8 (int8 weights per channel, int8 activations "
                        "per tensor) or fp8 (E4M3)")
    c.add_argument("--block-size", type=int, choices=INT4_BLOCKS, default=INT4_BLOCKS[0],
                   help=f"int4 block along K (default {INT4_BLOCKS[0]}; TensorRT takes 64 and 128, 32 makes an ONNX "
                        f"Runtime-only bundle)")
    c.add_argument("--algorithm", choices=["awq", "rtn", "minmax", "percentile", "entropy"],
                   help="int4: awq (activation-aware clipping, default) or rtn (round to nearest); int8: rtn; "
                        "w8a8, fp8: the activation ranges' calibration, minmax (default), percentile or entropy")
    c.add_argument("--images", nargs="+", type=Path,
                   help="calibration images or folders (PNG/JPEG/TIFF/DICOM; default: medical images shipped "
                        "inside the installed packages)")
    c.add_argument("--samples", type=int, help="use the first N calibration images")
    c.add_argument("--graphs", default="decoder", help="comma-separated: decoder, vision (default decoder)")
    c.add_argument("--lm-head", choices=["quantized", "float32"],
                   help="the decoder's LM head: quantized with the base weights or kept float32 (default: quantized "
                        "for int4 and int8, float32 for w8a8 and fp8; calibration/calibrate.py says why)")
    c.add_argument("--adapters", choices=["quantized", "float32"],
                   help="the H-LoRA A and B matrices: in the scheme's form too (int4, int8; the router stays float) or "
                        "kept float32 (default: calibration/calibrate.py's ADAPTERS, chosen by measurement)")
    c.add_argument("--quick-report", action="store_true",
                   help="accuracy report on one held-out image and 32 positions, no generated image (full size)")
    c.set_defaults(run=cmd_calibrate)


def add_verify(sub) -> None:
    v = sub.add_parser("verify", help="compare every available backend with the PyTorch reference; write "
                                      "parity.json + parity.md into the bundle (exit 2 when a check fails)")
    v.add_argument("--bundle", type=_directory, required=True)
    v.add_argument("--checkpoint", type=_directory, required=True, help="the checkpoint the bundle was exported from")
    v.add_argument("--backends", type=_subset("ort-cpu", "ort-cuda", "trt"), default=["ort-cpu", "ort-cuda", "trt"],
                   help="comma-separated: ort-cpu, ort-cuda, trt; one that cannot run here is reported 'not run'")
    v.add_argument("--image", type=Path, help="scan to run end to end (default: pydicom's CT_small.dcm)")
    v.add_argument("--steps", type=positive_int, default=32, help="com: greedy tokens compared end to end")
    v.add_argument("--tasks", type=_subset("com", "gen"), help="comma-separated subset of the bundle's tasks "
                   "(default all)")
    v.add_argument("--fp32-bundle", type=_directory, help="a quantized bundle's fp32 source, for the exact structural "
                   "check (default: the source its manifest records, when it is still there)")
    v.set_defaults(run=cmd_verify)


def main(argv=None) -> int:
    p = Parser(prog="build.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (add_synth, add_reference, add_export, add_calibrate, add_engines_command, add_verify):
        add(sub)
    a = p.parse_args(argv)
    try:
        a.run(a)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # outputs are staged and swapped in whole: nothing half-written is left behind
        stopping(e)
        terminated = isinstance(e, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a container stop), unwound as Ctrl-C is, so the staged OUT.partial is removed."""


def _terminate(signum, frame):
    raise Terminated


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack, goes on
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
