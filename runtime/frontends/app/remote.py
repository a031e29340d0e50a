"""The app's model on a Triton server (`python -m runtime app --server URL`): the same methods as LocalModel, over
Triton's HTTP generate endpoints (standard library only: the app's venv cannot hold tritonclient).

Questions stream from `/generate_stream` (server-sent events, one per token), each carrying the conversation's
earlier turns (the server is stateless); a stop closes the connection, which cancels the request's decode loop on
the server. Images come whole from `/generate`: the server sends no progress
for them, so the progress bar jumps from 0 to done. The bundle's facts are read from the bundle the server's
model configuration names, when this machine can open it (the same workstation); otherwise they show as unknown.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import COM, GEN, IMAGE_TOKENS
from runtime.core.conversation import Cancelled, Turn
from runtime.frontends.app.model import BundleFacts, parity_status

MODEL = "healthgpt"  # runtime/frontends/serving/repository.py writes the model under this name


def _error_message(body: bytes, code: int) -> str:
    """Triton's error text: a JSON body ({"error": ...}) or, from the streaming endpoint, an event carrying it."""
    for line in body.splitlines() or [b""]:
        try:
            message = json.loads(line.removeprefix(b"data: ") or b"{}").get("error")
        except (ValueError, AttributeError):
            continue
        if message:
            return message
    return f"the server answered HTTP {code}"


@dataclass
class RemoteConversation:
    """The server keeps nothing between requests: each turn sends the image and the earlier turns again."""

    image: Image.Image | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    turns: list[Turn] = field(default_factory=list)

    def release(self) -> None:
        """Nothing is held here: the server's image prefix cache is its own."""


class RemoteModel:
    def __init__(self, url: str, timeout: float = 600):
        self.url, self.timeout = url.rstrip("/"), timeout
        if not self.url.startswith(("http://", "https://")):
            raise UserError(f"--server {url}: give the server's HTTP endpoint, e.g. http://127.0.0.1:8000")
        config = self._get(f"/v2/models/{MODEL}/config")
        self.params = {k: v.get("string_value") for k, v in (config.get("parameters") or {}).items()}
        self.tasks, self.facts, self.manifest_sha256 = [COM.name, GEN.name], None, "?"
        try:
            from runtime.core.bundle import Bundle

            bundle = Bundle.open(self.params.get("bundle", ""), verify=False)
            self.tasks, self.facts, self.manifest_sha256 = bundle.tasks, BundleFacts.of(bundle.manifest), bundle.digest
        except UserError:
            pass  # the bundle lives on the server's machine only
        self.max_context = self.facts.max_context if self.facts else None

    def _get(self, path: str) -> dict:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise UserError(f"server {self.url}: {path} answered HTTP {e.code} (is the model loaded?)") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise UserError(f"server {self.url} cannot be reached: {getattr(e, 'reason', e)}") from None

    def _post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise UserError(_error_message(e.read(), e.code)) from None
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"server {self.url} cannot be reached: {getattr(e, 'reason', e)}") from None

    def describe(self) -> dict:
        f = self.facts
        bundle = self.params.get("bundle", "?")
        parity = (parity_status(Path(bundle), self.manifest_sha256, self.params.get("backend", "ort"),
                                 "CPUExecutionProvider") if f else
                  {"status": "not verified", "backend": None, "detail": f"the bundle {bundle} is on the server's "
                                                                         "machine: check its parity.md there"})
        return {"bundle": f"{bundle} on {self.url}", "variant": f.variant if f else "?",
                "precision": f.precision if f else "?", "max_context": self.max_context,
                "tasks": self.tasks, "backend": f"triton ({self.params.get('backend', '?')})",
                "providers": [self.params.get("providers", "?")], "manifest_sha256": self.manifest_sha256,
                "verification_warning": None, "parity": parity}

    @staticmethod
    def _image(image: Image.Image | None) -> dict:
        if image is None:
            return {}
        out = io.BytesIO()
        image.save(out, format="PNG")  # lossless: the server gets exactly the pixels shown
        return {"image_base64": base64.b64encode(out.getvalue()).decode()}

    def conversation(self, image) -> RemoteConversation:
        return RemoteConversation(image)

    def ask(self, conversation: RemoteConversation, question: str, max_new_tokens: int,
            on_text: Callable[[str, int | None], None], stop: threading.Event) -> Turn:
        history = json.dumps([{"question": t.question, "answer": t.answer} for t in conversation.turns])
        body = {"task": COM.name, "prompt": question, "max_new_tokens": max_new_tokens, "history": history,
                **self._image(conversation.image)}
        text: list[str] = []
        ids: list[int] = []
        with self._post(f"/v2/models/{MODEL}/generate_stream", body) as response:
            for line in response:
                if stop.is_set():
                    raise Cancelled(len(ids))  # leaving the `with` hangs up: the server cancels the request
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise UserError(event["error"])
                ids += [event["token_id"]] if "token_id" in event else []
                if event.get("text") or "token_id" in event:
                    text.append(event.get("text", ""))
                    on_text(text[-1], event.get("token_id"))
        conversation.turns.append(Turn(question, "".join(text), tuple(ids)))
        return conversation.turns[-1]

    def generate(self, image, instruction: str, constrain: bool, on_progress: Callable[[int, int, int], None],
                 stop: threading.Event) -> np.ndarray:
        on_progress(0, 0, IMAGE_TOKENS)
        body = {"task": GEN.name, "prompt": instruction, "constrain_image_tokens": constrain, **self._image(image)}
        with self._post(f"/v2/models/{MODEL}/generate", body) as response:
            reply = json.loads(response.read())
        if stop.is_set():
            raise Cancelled(0)
        on_progress(IMAGE_TOKENS, 0, IMAGE_TOKENS)
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["image_png_base64"]))).convert("RGB"))
