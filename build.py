#!/usr/bin/env python
"""healthgpt-edge build driver: synth -> export -> (calibrate) -> (engines) -> verify, plus `reference` to run the PyTorch model.

Every command reads local files only (no model hub). Run `python build.py COMMAND --help` for its options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.build import add_engines_command
from runtime.errors import UserError


def cmd_synth(a):
    from export.synth import synthesize

    paths = synthesize(a.out, a.variant, a.size, a.seed)
    print(f"[I] synthetic {a.variant} ({a.size}) checkpoint written to {paths.root}")


def cmd_reference(a):
    from export.reference import load_reference
    from runtime.image import load_image, save_png

    ref = load_reference(a.checkpoint, a.task)
    image = load_image(a.image)
    if a.task == "com":
        print(ref.answer(image, a.prompt, a.max_new_tokens))
    else:
        out = a.out or Path("reference.png")
        save_png(ref.generate_image(image, a.prompt, a.max_new_tokens, a.constrain_image_tokens), out)
        print(f"[I] image written to {out}")


def cmd_export(a):
    from export.bundle import export_bundle

    manifest = export_bundle(a.checkpoint, a.out, tuple(a.tasks.split(",")), a.dtype, a.max_context)
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"[I] bundle {a.out}: {len(manifest['graphs'])} graphs, {total / 2**20:.1f} MiB in all")


def cmd_verify(a):
    from export.verify import failures, verify

    report = verify(a.bundle, a.checkpoint, a.backends.split(","), a.image, a.steps,
                    a.tasks.split(",") if a.tasks else None)
    for name, b in report["backends"].items():
        print(f"[I] {name}: {b['status']}" + (f" ({b['reason']})" if b["status"] == "not run" else ""))
    print(f"[I] report: {Path(a.bundle) / 'parity.md'}")
    bad = failures(report)
    if bad or not report["passed"]:
        raise UserError("parity FAILED: " + ("; ".join(bad[:5]) or "no backend could run"))


def cmd_calibrate(a):
    from calibration.calibrate import calibrate

    manifest = calibrate(a.bundle, a.out, a.scheme, a.block_size, a.images, a.samples,
                         tuple(g for g in a.graphs.split(",") if g), a.algorithm, a.lm_head)
    q = manifest["precision"]["quantization"]
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"[I] {a.out}: {q['scheme']} ({q['algorithm']}), {sum(q['quantized_matmuls'].values())} MatMuls through "
          f"DequantizeLinear, calibrated on {len(q['calibration_set'])} images, {total / 2**20:.1f} MiB in all")
    print(f"[I] accuracy report: {Path(a.out) / 'quant.md'}")
    if not q["report"]["passed"]:
        raise UserError(f"{a.out}: the {q['scheme']} bundle is outside its tolerances (see quant.md)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="build.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a random checkpoint in the exact release layout")
    s.add_argument("--out", type=Path, required=True, help="directory to create (replaced if it exists)")
    s.add_argument("--variant", choices=["m3", "l14"], default="m3", help="m3 = Phi-3-mini base, l14 = phi-4 base")
    s.add_argument("--size", choices=["tiny", "real"], default="tiny",
                   help="tiny: small widths, real geometry; real: the model's true widths with 2 decoder layers")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=cmd_synth)

    r = sub.add_parser("reference", help="run the PyTorch reference on one image")
    r.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (release layout)")
    r.add_argument("--task", choices=["com", "gen"], default="com", help="com: answer; gen: generate an image")
    r.add_argument("--image", type=Path, required=True, help="PNG/JPEG/TIFF/BMP or DICOM file")
    r.add_argument("--out", type=Path, help="gen: PNG to write (default reference.png)")
    r.add_argument("--max-new-tokens", type=int, default=None)
    r.add_argument("--constrain-image-tokens", action="store_true",
                   help="gen: only <idx_*> tokens, exactly 1024 (random weights never emit a full image otherwise)")
    r.add_argument("prompt", help="question (com) or instruction (gen)")
    r.set_defaults(run=cmd_reference)

    e = sub.add_parser("export", help="checkpoint -> bundle of per-task ONNX graphs + manifest")
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True, help="bundle directory (replaced atomically)")
    e.add_argument("--tasks", default="com,gen", help="comma-separated: com, gen (default both)")
    e.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="fp32 for CPU; fp16 for GPU (norms, softmax and LM head stay fp32)")
    e.add_argument("--max-context", type=int, default=2048, help="KV cache length (prompt + generated tokens)")
    e.set_defaults(run=cmd_export)

    c = sub.add_parser("calibrate", help="fp32 bundle -> quantized bundle (same graph interfaces) + quant.json/md")
    c.add_argument("--bundle", type=Path, required=True, help="the fp32 bundle written by `build.py export`")
    c.add_argument("--out", type=Path, required=True, help="quantized bundle directory (replaced atomically)")
    c.add_argument("--scheme", choices=["int4", "int8"], default="int4",
                   help="weight-only: int4 (blocks along K) or int8 (per channel), DequantizeLinear -> MatMul")
    c.add_argument("--block-size", type=int, choices=[128, 64, 32], default=128, help="int4 block along K")
    c.add_argument("--algorithm", choices=["awq", "rtn"],
                   help="int4: awq (activation-aware clipping, default) or rtn (round to nearest); int8: rtn")
    c.add_argument("--images", nargs="+", type=Path,
                   help="calibration images or folders (PNG/JPEG/TIFF/DICOM; default: medical images shipped "
                        "inside the installed packages)")
    c.add_argument("--samples", type=int, help="use the first N calibration images")
    c.add_argument("--graphs", default="decoder", help="comma-separated: decoder, vision (default decoder)")
    c.add_argument("--lm-head", action="store_true", help="quantize the LM head too (default: kept fp32)")
    c.set_defaults(run=cmd_calibrate)

    add_engines_command(sub)

    v = sub.add_parser("verify", help="compare every available backend with the PyTorch reference; write "
                                      "parity.json + parity.md into the bundle (exit 2 when a check fails)")
    v.add_argument("--bundle", type=Path, required=True)
    v.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint the bundle was exported from")
    v.add_argument("--backends", default="ort-cpu,ort-cuda,trt",
                   help="comma-separated: ort-cpu, ort-cuda, trt; one that cannot run here is reported 'not run'")
    v.add_argument("--image", type=Path, help="scan to run end to end (default: pydicom's CT_small.dcm)")
    v.add_argument("--steps", type=int, default=32, help="com: greedy tokens compared end to end")
    v.add_argument("--tasks", help="comma-separated subset of the bundle's tasks (default all)")
    v.set_defaults(run=cmd_verify)

    a = p.parse_args(argv)
    if a.command == "verify" and a.image is None:
        from pydicom.data import get_testdata_file

        a.image = Path(get_testdata_file("CT_small.dcm"))
    if a.command == "reference" and a.max_new_tokens is None:
        a.max_new_tokens = 1024 if a.task == "com" else 1100  # the reference demos' defaults
    try:
        a.run(a)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
