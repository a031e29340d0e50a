"""Streaming client for the served model, over gRPC with tritonclient: `python -m runtime ask/generate --server`.

    with Client("127.0.0.1:8001") as c:
        for out in c.stream(Request("What does this scan show?", image=Path("scan.dcm").read_bytes())):
            print(out.get("text", ""), end="")

Leaving a `stream` early (break, an exception) cancels the request on the server, which stops decoding.
tritonclient 2.73 runs on numpy 1.26 and 2.x; it is in the serving venv, or `pip install "tritonclient[grpc]"`.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import COM
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
           "frame": ("INT32", np.int32), "window": ("FP32", np.float32), "max_new_tokens": ("INT32", np.int32),
           "temperature": ("FP32", np.float32), "top_k": ("INT32", np.int32), "top_p": ("FP32", np.float32),
           "seed": ("INT64", np.int64), "constrain_image_tokens": ("BOOL", np.bool_)}


def _message(error) -> str:
    text = error.message() if hasattr(error, "message") else str(error)
    return " ".join(str(text).split())
