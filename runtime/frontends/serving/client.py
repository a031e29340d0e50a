"""Streaming client for the served model, over gRPC with tritonclient: `python -m runtime ask/generate --server`.

    with Client("127.0.0.1:8001") as c:
        for out in c.stream(Request("What does this scan show?", image=Path("scan.dcm").read_bytes())):
            print(out.get("text", ""), end="")

Leaving a `stream` early (break, an exception) cancels the request on the server, which stops decoding.
tritonclient 2.73 runs on numpy 1.26 and 2.x; it is in the serving venv, or `pip install "tritonclient[grpc]"`.
"""

from __future__ import annotations

import queue
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import COM, GEN
from runtime.frontends.serving.repository import MODEL


@dataclass
class Request:
    prompt: str
    task: str = COM.name
    image: bytes | None = None  # the file's bytes: DICOM, PNG, JPEG, ...
    frame: int | None = None
    window: tuple[float, float] | None = None
    max_new_tokens: int | None = None  # None: the task's default (runtime.contract.healthgpt)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    constrain_image_tokens: bool = False


def grpc_address(url: str) -> str:
    """`grpc://host:port` or `host:port` (default port 8001) -> `host:port`."""
    if "://" in url:
        scheme, url = url.split("://", 1)
        if scheme != "grpc":
            raise UserError(f"--server {scheme}://...: the client streams over gRPC; give grpc://HOST:PORT "
                            "(tritonserver's gRPC port, 8001 by default)")
    url = url.rstrip("/")
    return url if ":" in url else f"{url}:8001"


class Client:
    def __init__(self, url: str, timeout: float | None = None):
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            raise UserError("tritonclient is not installed in this Python: run the client from the serving venv "
                            "(.venv-serving/bin/python -m runtime ...) or `pip install \"tritonclient[grpc]\"`"
                            ) from None
        self._grpc, self.address, self.timeout = grpcclient, grpc_address(url), timeout
        self._client = grpcclient.InferenceServerClient(self.address)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def stream(self, request: Request) -> Iterator[dict[str, np.ndarray]]:
        """The request's responses as they arrive: {output name: array}, until the final one."""
        from tritonclient.utils import InferenceServerException

        responses: queue.Queue = queue.Queue()
        try:
            self._client.start_stream(callback=lambda result, error: responses.put((result, error)))
            self._client.async_stream_infer(MODEL, self._inputs(request), request_id=uuid.uuid4().hex,
                                            enable_empty_final_response=True)
        except InferenceServerException as e:
            raise UserError(f"server {self.address}: {e.message()}") from None
        done = False
        try:
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise UserError(f"server {self.address}: no response for {self.timeout} s") from None
                if error is not None:
                    done = True
                    raise UserError(f"server {self.address}: {_message(error)}")
                response = result.get_response()
                outputs = {o.name: result.as_numpy(o.name) for o in response.outputs}
                if outputs:
                    yield outputs
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    done = True
                    return
        finally:
            # Left before the final response (a break, an error): tell the server, so it stops decoding.
            self._client.stop_stream(cancel_requests=not done)

    def ask(self, request: Request, on_text=None) -> tuple[str, list[int]]:
        """The answer and its token ids; `on_text(delta)` as text arrives."""
        parts, ids = [], []
        for out in self.stream(request):
            if "token_id" in out:
                ids.append(int(out["token_id"][0]))
            text = out["text"][0].decode("utf-8") if "text" in out else ""
            parts.append(text)
            if on_text and text:
                on_text(text)
        return "".join(parts), ids

    def generate(self, request: Request) -> tuple[bytes, np.ndarray]:
        """The PNG and the image's VQ indices."""
        outs = list(self.stream(request))
        if len(outs) != 1 or "image_png" not in outs[0]:
            raise UserError(f"server {self.address}: expected one image response, got {len(outs)} responses")
        return bytes(outs[0]["image_png"][0]), outs[0]["indices"]

    def _inputs(self, r: Request) -> list:
        values = {"prompt": r.prompt.encode(), "task": r.task.encode(), "image": r.image, "frame": r.frame,
                  "window": r.window, "max_new_tokens": r.max_new_tokens, "temperature": r.temperature,
                  "top_k": r.top_k, "top_p": r.top_p, "seed": r.seed,
                  "constrain_image_tokens": r.constrain_image_tokens}
        inputs = []
        for name, value in values.items():
            if value is None:
                continue
            array = np.array(value if name == "window" else [value], dtype=_DTYPES[name][1])
            tensor = self._grpc.InferInput(name, list(array.shape), _DTYPES[name][0])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs


_DTYPES = {"prompt": ("BYTES", np.object_), "task": ("BYTES", np.object_), "image": ("BYTES", np.object_),
           "frame": ("INT64", np.int64), "window": ("FP32", np.float32), "max_new_tokens": ("INT64", np.int64),
           "temperature": ("FP32", np.float32), "top_k": ("INT64", np.int64), "top_p": ("FP32", np.float32),
           "seed": ("INT64", np.int64), "constrain_image_tokens": ("BOOL", np.bool_)}


def _message(error) -> str:
    text = error.message() if hasattr(error, "message") else str(error)
    return " ".join(str(text).split())


##### `python -m runtime ask/generate --server` #####

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
    from runtime.core.image import save_png

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
