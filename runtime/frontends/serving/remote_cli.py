"""`python -m runtime ask/chat/generate --server`: the CLI's commands run on a served model through the gRPC client."""

from __future__ import annotations

import time
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import GEN
from runtime.core.image import check_image_options
from runtime.frontends.serving.client import Client, RemoteConversation, Request


def _image_bytes(a) -> bytes | None:
    check_image_options(a.image is not None, a.frame, a.window, "--")
    if a.image is None:
        return None
    try:
        return Path(a.image).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{a.image}: no such file") from None
    except OSError as e:
        raise UserError(f"{a.image}: cannot read: {e.strerror or e}") from None


def remote_conversation(a) -> RemoteConversation:
    """`ask/chat --server`: the CLI's session on the server (the CLI streams it as it streams a local one)."""
    return RemoteConversation(a.server, _image_bytes(a), a.frame, tuple(a.window) if a.window else None)


def cmd_generate(a) -> int:
    from runtime.core.png import save_png

    if a.image is None:
        raise UserError("generate needs an --image (the scan to reconstruct or translate)")
    if Path(a.out).suffix.lower() != ".png":
        raise UserError(f"{a.out}: images are saved as PNG only (lossless); use a .png file name")
    start = time.perf_counter()
    request = Request(a.instruction, GEN.name, _image_bytes(a), a.frame, tuple(a.window) if a.window else None,
                      a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, a.constrain_image_tokens)
    with Client(a.server) as client:
        png, _ = client.generate(request)
    save_png(png, a.out)
    print(f"[I] image written to {a.out} ({time.perf_counter() - start:.2f} s from {client.address})", flush=True)
    return 0
