"""`python -m runtime ask/generate --server`: the CLI's commands run on a served model through the gRPC client."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import COM, GEN
from runtime.frontends.serving.client import Client, Request


def _request(a, task: str, prompt: str) -> Request:
    image = None
    if a.image is not None:
        try:
            image = Path(a.image).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{a.image}: no such file") from None
        except OSError as e:
            raise UserError(f"{a.image}: cannot read: {e.strerror or e}") from None
    elif a.frame is not None or a.window is not None:
        raise UserError("--frame and --window need an --image")
    return Request(prompt, task, image, a.frame, tuple(a.window) if a.window else None, a.max_new_tokens,
                   a.temperature, a.top_k, a.top_p, a.seed, getattr(a, "constrain_image_tokens", False))


def cmd_ask(a) -> int:
    out = sys.stdout
    stamps: list[float] = []

    def on_text(text: str) -> None:
        stamps.append(time.perf_counter())
        out.write(text)
        out.flush()

    start = time.perf_counter()
    with Client(a.server) as client:
        _, ids = client.ask(_request(a, COM.name, a.question), on_text)
    out.write("\n")
    ttft = f"time to first text {stamps[0] - start:.3f} s, " if stamps else ""
    print(f"[I] {ttft}{len(ids)} tokens in {time.perf_counter() - start:.2f} s from {client.address}",
          file=sys.stderr)
    return 0


def cmd_generate(a) -> int:
    from runtime.core.png import save_png

    if a.image is None:
        raise UserError("generate needs an --image (the scan to reconstruct or translate)")
    if Path(a.out).suffix.lower() != ".png":
        raise UserError(f"{a.out}: images are saved as PNG only (lossless); use a .png file name")
    start = time.perf_counter()
    with Client(a.server) as client:
        png, _ = client.generate(_request(a, GEN.name, a.instruction))
    save_png(png, a.out)
    print(f"[I] image written to {a.out} ({time.perf_counter() - start:.2f} s from {client.address})", flush=True)
    return 0
