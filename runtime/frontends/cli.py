"""`python -m runtime`: answer a question about a scan, generate an image, or show what a bundle holds.

    python -m runtime ask --bundle B --image scan.dcm "What does this image show?"
    python -m runtime chat --bundle B --image scan.dcm   # follow-up questions, one per line
    python -m runtime generate --bundle B --image scan.dcm "Reconstruct the image." --out out.png
    python -m runtime info --bundle B
    python -m runtime app --bundle B          # the web app on http://127.0.0.1:7860/
    python -m runtime serve --bundle B          # Triton Inference Server; then ask/generate --server grpc://...

Torch-free: imports only the runtime's own modules (numpy, onnxruntime, tokenizers, Pillow, pydicom, tqdm; tensorrt
with --backend trt). Answers stream to stdout; progress, timings and errors go to stderr. A mistake the user can fix
(missing or unreadable file, bad bundle, over-long prompt, ...) prints one `error: ...` line and exits 2.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time
from pathlib import Path

from runtime.contract.errors import UserError, stopping
from runtime.contract.healthgpt import COM, GEN, IMAGE_TOKENS, SHARED
from runtime.core.prompt import check_question
from runtime.core.providers import quiet_ort
from runtime.core.verdict import OVERRIDE
from runtime.frontends.args import EXIT_USER_ERROR, Parser, non_negative_int, number, positive_int
from runtime.frontends.turns import chat, info, say

PROG = "python -m runtime"
EXIT_INTERRUPTED = 130
DECODE_LIMIT_S = 120  # reading the input image; seconds


def _bundle_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a bundle directory")
    return path


_float = number(float)
_temperature = number(float, lambda v: v >= 0, "must be 0 (greedy) or more")
_top_p = number(float, lambda v: 0 < v <= 1, "must be in (0, 1]")


##### the parser #####

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    bundle, run = _bundle_options(), _run_options()
    _add_ask(sub, [bundle, run])
    _add_chat(sub, [bundle, run])
    _add_generate(sub, [bundle, run])
    _add_info(sub, [bundle])
    _add_prepare(sub, [bundle])
    _add_app(sub)
    from runtime.frontends.serving.commands import add_commands  # triton, serve

    add_commands(sub)
    return parser


def _bundle_options() -> argparse.ArgumentParser:
    bundle = Parser(add_help=False)
    bundle.add_argument("--bundle", type=_bundle_dir, metavar="DIR",  # required unless --server: see main()
                        help="bundle directory written by `build.py export` (manifest.json, ONNX graphs, weights)")
    bundle.add_argument("-v", "--verbose", action="store_true",
                        help="show ONNX Runtime's own log messages (hidden by default; its provider-loading failures "
                             "are reported as one line instead)")
    return bundle


def _run_options() -> argparse.ArgumentParser:
    """What ask and generate share: the backend, the input image, the decoding."""
    run = Parser(add_help=False)
    run.add_argument("--backend", choices=["ort", "trt"], default="ort",
                     help="ort: ONNX Runtime on the bundle's ONNX graphs (default); trt: native TensorRT on the "
                          "bundle's engines (needs `build.py engines` on this GPU, and tensorrt installed)")
    run.add_argument("--providers", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                     help="ONNX Runtime execution providers (ort backend only). auto: CUDA when it loads, else CPU "
                          "(default); cpu; cuda: CUDA, refused if it cannot load; tensorrt: ONNX Runtime's TensorRT "
                          "EP (falling back to CUDA then CPU per node), refused if it cannot load")
    run.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], metavar="L",
                     help="quantized bundles on ONNX Runtime CPU: the compute type of the fused MatMulNBits (4: int8 "
                          "activations, fastest; 1: fp32, closest to the unfused graph; default: the bundle's)")
    run.add_argument(OVERRIDE, action="store_true",
                     help="run a bundle whose quantization or parity report FAILED (refused by default; said on "
                          "every start)")
    run.add_argument("--server", metavar="URL",
                     help="instead of opening --bundle, ask a server started by `serve` (grpc://HOST:PORT; the "
                          "server's backend and providers apply)")
    img = run.add_argument_group("input image")
    img.add_argument("--image", type=Path, metavar="FILE",
                     help="PNG, JPEG, TIFF, BMP (anything Pillow reads) or DICOM (.dcm, or any file with the DICM "
                          "magic); only regular files. Colour images are used as they are; monochrome DICOM is "
                          "windowed to 8 bits; images deeper than 8 bits are mapped by their range")
    img.add_argument("--frame", type=non_negative_int, metavar="N",
                     help="frame index (from 0) of a multi-frame DICOM or TIFF/GIF (default 0)")
    img.add_argument("--window", type=_float, nargs=2, metavar=("CENTER", "WIDTH"),
                     help="display window for monochrome DICOM, in modality units (e.g. Hounsfield units for CT: "
                          "`--window 40 400` for soft tissue). Default: the file's own WindowCenter/WindowWidth, "
                          "else the data's full range")
    dec = run.add_argument_group("decoding (greedy unless --temperature > 0)")
    dec.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                     help=f"stop after N new tokens (default: {COM.max_new_tokens} for ask, {GEN.max_new_tokens} "
                          "for generate, as the reference demos); generation also stops at the bundle's "
                          "end-of-sequence tokens and at its context")
    dec.add_argument("--temperature", type=_temperature, default=0.0, metavar="T",
                     help="sampling temperature; 0 = greedy argmax, the reference behaviour (default 0)")
    dec.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                     help="with --temperature > 0: sample only among the K most likely tokens (default 0 = all)")
    dec.add_argument("--top-p", type=_top_p, default=1.0, metavar="P",
                     help="with --temperature > 0: sample only among the most likely tokens whose probabilities add "
                          "up to P (nucleus sampling; default 1 = all)")
    dec.add_argument("--seed", type=non_negative_int, metavar="S",
                     help="with --temperature > 0: random seed, so the same command gives the same output "
                          "(default: a fresh seed each run)")
    return run


def _add_ask(sub, parents: list[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("ask", parents=parents, help="answer a question about an image (com task)",
                       description="Answer a question about an image with the bundle's comprehension (com) task. "
                                   "The answer streams to stdout as it is generated; the timing (time to first "
                                   "token, tokens/s) goes to stderr at the end.")
    a.add_argument("question", help="the question, e.g. \"What abnormality is visible in this CT scan?\"")
    a.set_defaults(run=cmd_ask)


def _add_chat(sub, parents: list[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("chat", parents=parents, help="a conversation about an image: follow-up questions",
                       description="Ask about an image, then follow up: each line of standard input is a question, "
                                   "answered (streamed to stdout) with the earlier questions and answers in mind. "
                                   "The image is read and prefilled once; a follow-up only prefills its own words. "
                                   "At a terminal, Ctrl-C stops the answer being written; Ctrl-D ends the chat.")
    c.set_defaults(run=cmd_chat)


def _add_generate(sub, parents: list[argparse.ArgumentParser]) -> None:
    g = sub.add_parser("generate", parents=parents, help="generate an image from an image (gen task)",
                       description="Generate a 256x256 image with the bundle's generation (gen) task, e.g. "
                                   "reconstruct, super-resolve or translate a scan between modalities. The model "
                                   "emits 1024 image tokens (a progress bar on stderr counts them), which the "
                                   "bundle's VQGAN decodes into pixels; the image is saved as PNG.")
    g.add_argument("instruction", help="e.g. \"Reconstruct the image.\"")
    g.add_argument("--out", type=Path, required=True, metavar="FILE.png", help="PNG file to write (lossless)")
    g.add_argument("--constrain-image-tokens", action="store_true",
                   help="only let the model choose image tokens, exactly 1024 of them, so a full image always comes "
                        "out (off by default, as in the reference; weak or random weights then often fail with "
                        "'produced N image tokens')")
    g.set_defaults(run=cmd_generate)


def _add_info(sub, parents: list[argparse.ArgumentParser]) -> None:
    i = sub.add_parser("info", parents=parents, help="show what a bundle holds and which providers can run it",
                       description="Show a bundle's variant, tasks, graphs (input and output names and shapes, "
                                   "from the specs in its manifest), precision, maximum context, file sizes and "
                                   "TensorRT engines; then the ONNX Runtime providers installed here and which of "
                                   "them really load; then check every file's sha256.")
    i.set_defaults(run=cmd_info)


def _add_prepare(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("prepare", parents=parents, help="prepare a bundle's ONNX Runtime CPU sessions on this machine "
                                                        "once, so that every later start maps them (seconds)",
                       description="Build each graph's ONNX Runtime CPU session once and keep it, optimized and "
                                   "with its prepacked weights, in this machine's cache ($XDG_CACHE_HOME/"
                                   "healthgpt-edge/sessions, sealed with sha256; runtime/core/prepared.py): later "
                                   "starts map it instead of optimizing and prepacking again, and hold less "
                                   "anonymous memory. The graphs with quantized MatMuls are prepared on first use "
                                   "anyway; float graphs only with --all (their prepacked copy takes as much disk "
                                   "again as their weights).")
    p.add_argument("--all", action="store_true", help="float graphs too (default: the quantized ones)")
    p.set_defaults(run=cmd_prepare)


def _add_app(sub) -> None:
    w = sub.add_parser("app", help="the clinician's web app: DICOM viewer, questions, image generation, audit log",
                       description="Serve the workstation app on this machine: open a DICOM, PNG or JPEG, window it, "
                                   "ask questions (streamed answers) and generate images, every request written to "
                                   "an audit log. Fully offline: the page loads nothing from any other host.")
    where = w.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", type=Path, metavar="DIR", help="bundle directory written by `build.py export`")
    where.add_argument("--server", metavar="URL", help="the HTTP endpoint of a `python -m runtime serve` server "
                       "(e.g. http://127.0.0.1:8000) to run the requests on, instead of a local bundle")
    w.add_argument("--backend", choices=["ort", "trt"], default="ort", help="as for `ask` (default ort)")
    w.add_argument("--providers", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                   help="as for `ask` (default auto)")
    w.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; the app has no login)")
    w.add_argument("--port", type=number(int, lambda v: 0 <= v <= 65535, "must be a port number 0..65535"),
                   default=7860, help="TCP port (default 7860; 0: any free port)")
    w.add_argument(OVERRIDE, action="store_true", help="as for `ask`: run a bundle that FAILED its verification")
    w.add_argument("--audit-log", type=Path, metavar="FILE",
                   help="JSON-lines audit log, appended (default $XDG_STATE_HOME/healthgpt-edge/audit.jsonl)")
    w.set_defaults(run=cmd_app)


##### helpers #####

def _load_input(a):
    from runtime.core.image import check_image_options, load_image

    check_image_options(a.image is not None, a.frame, a.window, "--")
    if a.image is None:
        return None
    # A decoder stuck in native code (one hang seen in 441 runs) cannot be interrupted from Python: past the limit
    # faulthandler prints every thread's stack and ends the process (exit 1), so a hang is bounded and diagnosable.
    faulthandler.dump_traceback_later(DECODE_LIMIT_S, exit=True)
    try:
        return load_image(a.image, frame=a.frame, window=tuple(a.window) if a.window else None)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _sampler(a):
    from runtime.core.sampling import Sampler

    if a.temperature == 0 and (a.top_k or a.top_p < 1 or a.seed is not None):
        print("warning: --top-k, --top-p and --seed apply only with --temperature > 0; decoding greedily",
              file=sys.stderr)
    return Sampler(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)


def _open(a, task, text: str):
    """The pipeline with `task`'s graphs loaded, so the timings below measure requests, not loading. The request is
    checked first (a prompt too long for the bundle is refused before any file is hashed or graph loaded)."""
    from runtime.core.backend import open_backend
    from runtime.core.bundle import Bundle
    from runtime.core.pipeline import Pipeline
    from runtime.core.providers import PROVIDERS, why_not_loadable
    from runtime.core.verdict import require

    start = time.perf_counter()
    try:
        with quiet_ort(a.verbose):
            backend = open_backend(a.backend, a.providers, verbose=a.verbose, accuracy_level=a.accuracy_level)
            pipe = Pipeline(Bundle.open(a.bundle, verify=False), backend)
            pipe.check_request(task, a.image is not None, text)
            pipe.bundle.verify_files()
            warning = require(pipe.bundle, a.allow_failed_verification)
            pipe.task(task.name)
    except UserError as e:
        if a.backend == "ort" and a.providers in ("cuda", "tensorrt") and "could not be loaded" in str(e):
            import onnxruntime as ort

            if reason := why_not_loadable(ort, PROVIDERS[a.providers][0]):
                raise UserError(f"{e} (the provider library says: {reason})") from None
        raise
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    where = pipe.providers().get(f"{task.name}.decoder", ["?"])[0]
    info(f"bundle {a.bundle} ({pipe.bundle.manifest.variant}, {task.name}) loaded in "
         f"{time.perf_counter() - start:.2f} s on {where}")
    return pipe


##### commands #####

def _conversation(a, text: str):
    """The session every turn streams through: a local Conversation, or one on `--server`."""
    if a.server:
        from runtime.frontends.serving.remote_cli import remote_conversation

        return remote_conversation(a)
    image = _load_input(a)
    return _open(a, COM, text).conversation(image)


def cmd_ask(a) -> int:
    check_question(a.question)
    sampler = _sampler(a)
    say(_conversation(a, a.question), a.question, a, sampler)
    return 0


def cmd_chat(a) -> int:
    """Questions from standard input, one per line, each a turn of one conversation (see turns.chat)."""
    sampler = _sampler(a)
    return chat(_conversation(a, ""), a, sampler)


def cmd_generate(a) -> int:
    if a.server:
        from runtime.frontends.serving.remote_cli import cmd_generate as generate_server

        return generate_server(a)
    from tqdm import tqdm

    from runtime.core.png import check_png_path, save_png

    check_png_path(a.out)  # now, not after the generation; save_png still writes atomically at the end
    check_question(a.instruction)
    if a.image is None:
        raise UserError("generate needs an --image (the scan to reconstruct or translate)")
    image = _load_input(a)
    sampler = _sampler(a)
    pipe = _open(a, GEN, a.instruction)
    lo, hi = pipe.bundle.manifest.tokens.image_range
    other = 0
    bar = tqdm(total=IMAGE_TOKENS, desc="image tokens", unit="tok", file=sys.stderr, dynamic_ncols=True)

    def on_token(token: int) -> None:
        nonlocal other
        if lo <= token < hi:
            bar.update(1)
        else:
            other += 1
            bar.set_postfix(other=other, refresh=False)

    start = time.perf_counter()
    try:
        with quiet_ort(a.verbose):
            tokens = pipe.image_tokens(image, a.instruction, max_new_tokens=a.max_new_tokens,
                                       constrain_image_tokens=a.constrain_image_tokens, on_token=on_token,
                                       sampler=sampler)
    finally:
        bar.close()
    decoded = time.perf_counter()
    with quiet_ort(a.verbose):
        pixels = pipe.decode_image(tokens)  # refuses anything but exactly 1024 image tokens, saying what came out
    end = time.perf_counter()
    save_png(pixels, a.out)
    print(f"[I] {pixels.shape[1]}x{pixels.shape[0]} image written to {a.out}", flush=True)
    info(f"{end - start:.2f} s per image: {len(tokens)} tokens in {decoded - start:.2f} s "
         f"({len(tokens) / max(decoded - start, 1e-9):.1f} tokens/s), VQGAN decode {end - decoded:.2f} s")
    return 0


def cmd_info(a) -> int:
    from runtime.frontends.info import show  # imported when asked: it probes provider libraries

    return show(a.bundle)


def cmd_prepare(a) -> int:
    from runtime.core.backend import OrtBackend
    from runtime.core.bundle import Bundle

    if a.bundle is None:
        raise UserError("prepare needs --bundle DIR")
    bundle, backend = Bundle.open(a.bundle), OrtBackend("cpu", session_cache=True if a.all else None)
    for gid in bundle.manifest.graphs:
        task, name = gid.split(".")
        start = time.perf_counter()
        with quiet_ort(a.verbose):  # a shared graph (shared.vqgan) is any task's
            backend.load(bundle, bundle.tasks[0] if task == SHARED else task, name)  # prepared when missing
        info(f"{gid}: ready in {time.perf_counter() - start:.1f} s")  # a graph not prepared: loaded all the same
    return 0


def cmd_app(a) -> int:
    try:
        from runtime.frontends.app import audit, server
    except ModuleNotFoundError as e:
        if e.name not in ("starlette", "uvicorn"):
            raise
        raise UserError(f"the app needs {e.name}: install it with `pip install -e '.[app]'`") from None
    return server.serve(a.bundle, a.server, a.host, a.port, a.audit_log or audit.default_path(), a.backend,
                        a.providers, lambda: quiet_ort(False), a.allow_failed_verification)


##### entry point #####

def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    needs = ("ask", "chat", "generate", "info")
    if args.command in needs and (args.bundle is None) == (getattr(args, "server", None) is None):
        parser.error(f"{args.command} needs --bundle" + (" or --server (not both)" if args.command != "info" else ""))
    try:
        return args.run(args)
    except UserError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        stopping(e)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`... | head`): stop quietly, as Python's docs recommend
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
