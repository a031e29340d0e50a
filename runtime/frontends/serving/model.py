"""The python-backend models Triton runs (named by the repository's model.py files; see repository.py).

HealthGPTModel: one runtime Pipeline per instance, both tasks resident, the task chosen per request. The model is
decoupled: a `com` request streams one response per token (`token_id` and the `text` it adds; a last text-only
response flushes held-back characters), a `gen` request gets one response (`image_png`, `indices`); every request
ends with a final-flag response. A `com` request may carry the conversation's earlier turns (`history`): each request
stands alone, so any instance can serve any turn, and the instance's image prefix cache spares a follow-up the
vision graph and the image's prefill. Triton calls `execute` of one instance from one thread, one call at a time, and
this model finishes each request inside `execute`: so each instance serves one request at a time (the Pipeline
itself is thread-safe; an instance simply has no second request to give it), and concurrency comes from
instance_group count. Mistakes in a request come back as that request's Triton error; nothing a request sends takes
the instance down. A request the client cancels stops decoding within CANCEL_POLL_S and a token.

Imported only inside Triton's stub (triton_python_backend_utils exists only there).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.contract import healthgpt
from runtime.contract.errors import UserError
from runtime.contract.healthgpt import COM
from runtime.core.conversation import Cancelled, Turn
from runtime.core.image import check_image_options, load_image
from runtime.core.png import png_bytes
from runtime.core.prompt import vq_indices
from runtime.core.sampling import Sampler
from runtime.frontends.serving.repository import bundle_facts

CANCEL_POLL_S = 0.02
# Integer inputs are INT64 on the wire, so that 2**32 + 3 arrives as itself, not wrapped to 3, and is refused here.
MAX_NEW_TOKENS = 2**31 - 1
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class HealthGPTModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        if args["model_instance_kind"] == "GPU":
            # This instance's stub process has not touched CUDA yet: show it only its GPU (untested here).
            os.environ["CUDA_VISIBLE_DEVICES"] = args["model_instance_device_id"]
        from runtime.core.backend import open_backend
        from runtime.core.bundle import Bundle
        from runtime.core.pipeline import Pipeline
        from runtime.core.verdict import require

        backend = open_backend(params["backend"], params["providers"],
                               prepack={"true": True, "false": False}.get(params["prepack"]))  # "": not ONNX Runtime
        self.pipe = Pipeline(Bundle.open(params["bundle"]), backend)  # verifies every file's sha256
        self.facts = bundle_facts(self.pipe.bundle)
        if warning := require(self.pipe.bundle, params.get("allow_failed_verification") == "true"):
            _log("warn", f"healthgpt {args['model_instance_name']}: {warning}")
        for task in self.facts.tasks:
            self.pipe.task(task)
        _log("info", f"healthgpt {args['model_instance_name']}: bundle {params['bundle']}, tasks "
                     f"{', '.join(self.facts.tasks)}, {self.pipe.providers().get('com.decoder', ['?'])[0]}")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            last = None  # sent with the final flag: None, or the request's error
            try:
                self._serve(request, sender)
            except Cancelled as e:
                _log("info", f"request {request.request_id() or '(no id)'} cancelled by the client after {e.tokens} "
                             "tokens")
            except UserError as e:
                last = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
            except Exception as e:  # a bug, not the request's fault: report it, keep the instance serving
                _log("error", traceback.format_exc())
                message = f"internal error: {type(e).__name__}: {e}"
                last = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
            sender.send(last, flags=FINAL)
        return None

    def _serve(self, request, sender) -> None:
        task = healthgpt.task(_text(request, "task") or COM.name)  # an unknown name: a UserError saying which exist
        prompt = _text(request, "prompt")
        if prompt is None:
            raise UserError("the request has no prompt")
        image = _image(request)
        max_new = _scalar(request, "max_new_tokens", int, task.max_new_tokens)
        if not 1 <= max_new <= MAX_NEW_TOKENS:
            raise UserError(f"max_new_tokens must be from 1 to {MAX_NEW_TOKENS}, got {max_new}")
        try:
            sampler = Sampler(temperature=_scalar(request, "temperature", float, 0.0),
                              top_k=_scalar(request, "top_k", int, 0), top_p=_scalar(request, "top_p", float, 1.0),
                              seed=_scalar(request, "seed", int, None))
        except ValueError as e:
            raise UserError(f"sampling: {e}") from None
        next_poll = 0.0

        def cancelled() -> bool:
            # is_cancelled() is a round trip to the server (~0.8 ms here, as much as a tiny model's token):
            # asked at most every CANCEL_POLL_S, so a cancelled request stops within that much and one token.
            nonlocal next_poll
            now = time.monotonic()
            if now < next_poll:
                return False
            next_poll = now + CANCEL_POLL_S
            return request.is_cancelled()

        if not task.makes_images:
            def on_text(text: str, token: int | None) -> None:
                token_id = {} if token is None else {"token_id": np.array([token], np.int32)}
                if text or token_id:
                    sender.send(_response(text=text, **token_id))

            conversation = self.pipe.conversation(image, task, _history(request))
            conversation.ask(prompt, max_new, sampler, on_text=on_text, cancel=cancelled)
            return
        if _given(request, "history"):
            raise UserError(f"history: a {task.name} request answers with an image, not as a conversation")
        tokens = self.pipe.image_tokens(image, prompt, max_new_tokens=max_new, sampler=sampler,
                                        constrain_image_tokens=_scalar(request, "constrain_image_tokens", bool, False),
                                        cancel=cancelled)
        pixels = self.pipe.decode_image(tokens)
        f = self.facts
        png = png_bytes(pixels)
        # A JSON client (image_base64, e.g. HTTP /generate) cannot take raw bytes back either.
        image_out = {"image_png_base64": base64.b64encode(png)} if _given(request, "image_base64") else \
            {"image_png": png}
        sender.send(_response(**image_out, indices=np.array(vq_indices(tokens, f.idx_0, f.vq_codes, f.image_tokens),
                                                            np.int32)))


class SelfTestModel:
    """2 * every input: a client that gets [2,4,6,8] back for [1,2,3,4] knows tensors cross the stub intact."""

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(name, pb_utils.get_input_tensor_by_name(r, name)
                                                            .as_numpy() * 2) for name in ("ints", "floats")])
                for r in requests]


def _log(level: str, message: str) -> None:
    getattr(pb_utils.Logger, f"log_{level}")(message)  # the stub adds Logger to pb_utils after importing us


def _response(**outputs) -> pb_utils.InferenceResponse:
    tensors = [pb_utils.Tensor(name, np.array([value], dtype=np.object_) if isinstance(value, (str, bytes)) else value)
               for name, value in outputs.items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)


def _given(request, name: str) -> bool:
    return pb_utils.get_input_tensor_by_name(request, name) is not None


def _one(request, name: str):
    """The single element of an optional input, or None when the request leaves it out."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise UserError(f"{name}: expected one value, got {values.size}")
    return values[0]


def _scalar(request, name: str, kind, default):
    value = _one(request, name)
    if value is None:
        return default
    value = kind(value)
    if kind is float and not np.isfinite(value):
        raise UserError(f"{name} must be finite, got {value}")
    return value


def _text(request, name: str) -> str | None:
    value = _one(request, name)
    if value is None:
        return None
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise UserError(f"{name} is not UTF-8 text") from None


def _image(request):
    """The request's image (raw file bytes, or base64 for JSON clients), decoded like `--image`, or None."""
    raw, encoded = _one(request, "image"), _text(request, "image_base64")
    if raw is not None and encoded is not None:
        raise UserError("send the image once: as image (bytes) or as image_base64, not both")
    if encoded is not None:
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error as e:
            raise UserError(f"image_base64 is not valid base64: {e}") from None
    frame, window = _scalar(request, "frame", int, None), pb_utils.get_input_tensor_by_name(request, "window")
    check_image_options(raw is not None, frame, window)
    if raw is None:
        return None
    if frame is not None and frame < 0:
        raise UserError(f"frame must be 0 or more, got {frame}")
    window = tuple(float(v) for v in window.as_numpy().reshape(-1)) if window is not None else None
    return load_image(bytes(raw), frame=frame, window=window)


def _history(request) -> list[Turn]:
    """The conversation's earlier turns the request carries (JSON [{"question", "answer"}, ...]; none: a first turn)."""
    text = _text(request, "history")
    if text is None:
        return []
    try:
        turns = json.loads(text)
    except ValueError:
        turns = None
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("question"), str) and isinstance(t.get("answer"), str)
            for t in turns):
        raise UserError('history: need a JSON list of {"question": text, "answer": text} turns')
    return [Turn(t["question"], t["answer"]) for t in turns]
