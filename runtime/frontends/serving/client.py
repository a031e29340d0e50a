"""Streaming client for the served model, over gRPC with tritonclient: `python -m runtime ask/chat/generate --server`.

    with Client("127.0.0.1:8001") as c:
        for out in c.stream(Request("What does this scan show?", image=Path("scan.dcm").read_bytes())):
            print(out.get("text", ""), end="")

Leaving a `stream` early (break, an exception) cancels the request on the server, which stops decoding.
tritonclient 2.73 runs on numpy 1.26 and 2.x; it is in the serving venv, or `pip install "tritonclient[grpc]"`.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import COM
from runtime.core.conversation import Cancelled, Turn
from runtime.core.image import check_image_options
from runtime.core.sampling import Sampler
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
    history: Sequence[Turn] = ()  # the conversation's earlier turns: the server keeps nothing between requests


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

    def ask(self, request: Request, on_text: Callable[[str, int | None], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> tuple[str, list[int]]:
        """The answer and its token ids; on_text(text, id) per response, as the session's (runtime/core/
        conversation.py); Cancelled when `cancel()` turns true (leaving the stream cancels the request)."""
        parts: list[str] = []
        ids: list[int] = []
        for out in self.stream(request):
            if cancel is not None and cancel():
                raise Cancelled(len(ids))
            token = int(out["token_id"][0]) if "token_id" in out else None
            ids += [token] if token is not None else []
            parts.append(out["text"][0].decode("utf-8") if "text" in out else "")
            if on_text:
                on_text(parts[-1], token)
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
                  "constrain_image_tokens": r.constrain_image_tokens, "history": history_json(r.history)}
        inputs = []
        for name, value in values.items():
            if value is None:
                continue
            array: np.ndarray = np.array(value if name == "window" else [value], dtype=_DTYPES[name][1])
            tensor = self._grpc.InferInput(name, list(array.shape), _DTYPES[name][0])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs


_DTYPES = {"prompt": ("BYTES", np.object_), "task": ("BYTES", np.object_), "image": ("BYTES", np.object_),
           "frame": ("INT64", np.int64), "window": ("FP32", np.float32), "max_new_tokens": ("INT64", np.int64),
           "temperature": ("FP32", np.float32), "top_k": ("INT64", np.int64), "top_p": ("FP32", np.float32),
           "seed": ("INT64", np.int64), "constrain_image_tokens": ("BOOL", np.bool_), "history": ("BYTES", np.object_)}


def history_json(turns: Sequence[Turn]) -> bytes | None:
    """A request's earlier turns as the server reads them (serving/model.py): [{"question", "answer"}, ...]."""
    return json.dumps([{"question": t.question, "answer": t.answer} for t in turns]).encode() if turns else None


class RemoteConversation:
    """The session API (runtime/core/conversation.py) over a server: each turn carries the earlier ones."""

    def __init__(self, url: str, image: bytes | None, frame: int | None = None, window=None, task: str = COM.name):
        check_image_options(image is not None, frame, window)
        self.client, self.request = Client(url), Request("", task, image, frame, window)
        self.turns: list[Turn] = []

    def ask(self, question: str, max_new_tokens: int | None = None, sampler: Sampler | None = None,
            on_token: Callable[[int], None] | None = None, on_text: Callable[[str, int | None], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> Turn:
        s = sampler or Sampler()
        request = dataclasses.replace(self.request, prompt=question, max_new_tokens=max_new_tokens,
                                      temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                                      history=tuple(self.turns))

        def each(text: str, token: int | None) -> None:
            if on_token and token is not None:
                on_token(token)
            if on_text:
                on_text(text, token)

        answer, ids = self.client.ask(request, each, cancel)
        self.turns.append(Turn(question, answer, tuple(ids)))
        return self.turns[-1]


def _message(error) -> str:
    text = error.message() if hasattr(error, "message") else str(error)
    return " ".join(str(text).split())
