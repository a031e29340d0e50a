"""What the app asks of a model: describe itself, hold conversations about an image (streamed answers), generate an
image with progress.

`LocalModel` runs a bundle in this process through the public Pipeline API and its conversations
(runtime/core/conversation.py); `RemoteModel` (remote.py) does the same on a Triton server. The app needs nothing
else.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
from PIL import Image

from runtime.contract.manifest import Manifest
from runtime.contract.records import ManifestError
from runtime.contract.reports import ParityReport
from runtime.core.conversation import Cancelled, Turn


class Session(Protocol):
    """A conversation about one image: runtime/core/conversation.py's, or one a server continues (remote.py)."""

    id: str
    turns: list[Turn]

    def release(self) -> None:
        """Free what the conversation holds between turns (its KV cache); it goes on from its turns."""


S = TypeVar("S", bound=Session)  # a model's own kind of conversation: what it makes, it is asked to go on with


class Model(Protocol[S]):
    tasks: list[str]
    manifest_sha256: str  # the bundle's digest, for the audit log

    @property
    def max_context(self) -> int | None:  # None: not known here (a server's bundle)
        ...

    def describe(self) -> dict: ...

    def conversation(self, image: Image.Image | None) -> S: ...

    def ask(self, conversation: S, question: str, max_new_tokens: int,
            on_text: Callable[[str, int | None], None], stop: threading.Event) -> Turn:
        """The conversation's next turn; on_text(new printable text, token id) once per token (and once more, id
        None, for text held back at the end). Cancelled when `stop` is set; the conversation then goes on."""

    def generate(self, image: Image.Image, instruction: str, constrain: bool,
                 on_progress: Callable[[int, int, int], None], stop: threading.Event) -> np.ndarray:
        """uint8 [256, 256, 3]; on_progress(image tokens, other tokens, image tokens needed) once per token."""


@dataclass(frozen=True)
class BundleFacts:
    """The manifest facts the app shows or needs, read in this one place."""

    variant: str
    precision: str
    max_context: int
    image_token_ids: range
    image_tokens: int

    @classmethod
    def of(cls, manifest: Manifest) -> BundleFacts:
        return cls(manifest.variant, manifest.precision.dtype, manifest.config.max_context,
                   range(*manifest.tokens.image_range), manifest.tokens.image_tokens)


# The backend names `build.py verify` writes into parity.json, by what this process really runs on.
_PARITY_KEYS = {("ort", "CPUExecutionProvider"): "ort-cpu", ("ort", "CUDAExecutionProvider"): "ort-cuda"}


def parity_status(root: Path, digest: str, backend: str, provider: str) -> dict:
    """passed / failed / not verified, for the backend and provider in use, with a one-line reason; from the
    bundle's parity.json when it was written for this bundle (its manifest digest)."""
    key = "trt" if backend == "trt" else _PARITY_KEYS.get((backend, provider))
    try:
        report = ParityReport.read(root, digest)
    except ManifestError as e:
        return {"status": "not verified", "backend": key, "detail": str(e)}
    if report is None:
        return {"status": "not verified", "backend": key,
                "detail": "the bundle has no parity report; run `build.py verify` on it"}
    summary = ", ".join(f"{name}: {b.status}" for name, b in report.backends.items())
    entry = report.backends.get(key) if key else None
    if entry is None:
        what = key or f"{backend} on {provider}"
        return {"status": "not verified", "backend": key, "detail": f"the report has no result for {what} ({summary})"}
    if entry.status == "passed":
        return {"status": "passed", "backend": key, "detail": f"{key} passed ({summary})"}
    if entry.status == "failed":
        return {"status": "failed", "backend": key,
                "detail": f"{key} FAILED {len(entry.failed())} check(s): see parity.md in the bundle ({summary})"}
    return {"status": "not verified", "backend": key,
            "detail": f"{key} was not run: {entry.reason or 'no reason given'}"}


class LocalModel:
    """A bundle opened in this process. The Pipeline is thread-safe, but requests take turns here: on one workstation
    two decodes at once would each run at half speed, and the one who asked first should get their answer first."""

    def __init__(self, pipe, backend: str, warning: str | None = None):
        self.pipe = pipe
        self.warning = warning  # the bundle failed its verification and the user overrode the refusal
        self.facts = BundleFacts.of(pipe.bundle.manifest)
        self.tasks = list(pipe.bundle.tasks)
        self.manifest_sha256 = pipe.bundle.digest
        self.max_context = self.facts.max_context
        for task in self.tasks:  # load now: errors show at start, and the first request is not the slow one
            pipe.task(task)
        self._backend = backend
        self._lock = threading.Lock()

    @classmethod
    def open(cls, bundle: Path, backend: str, providers: str, allow_failed: bool = False) -> LocalModel:
        from runtime.core.backend import open_backend
        from runtime.core.bundle import Bundle
        from runtime.core.pipeline import Pipeline
        from runtime.core.verdict import require

        # Both tasks stay open: one copy of the shared weights instead of one per task (prepack off, see OrtBackend).
        prepack = False if backend == "ort" else None
        pipe = Pipeline(Bundle.open(bundle), open_backend(backend, providers, prepack=prepack))
        return cls(pipe, backend, require(pipe.bundle, allow_failed))

    def describe(self) -> dict:
        providers = self.pipe.providers()
        first = next(iter(providers.values()))[0]
        return {"bundle": str(self.pipe.bundle.root), "variant": self.facts.variant,
                "precision": self.facts.precision, "max_context": self.facts.max_context, "tasks": self.tasks,
                "backend": self._backend, "providers": sorted({p[0] for p in providers.values()}),
                "manifest_sha256": self.manifest_sha256, "verification_warning": self.warning,
                "parity": parity_status(self.pipe.bundle.root, self.manifest_sha256, self._backend, first)}

    @contextlib.contextmanager
    def _turn(self, stop: threading.Event):
        """Wait for the model, giving up when the user stops while waiting."""
        while not self._lock.acquire(timeout=0.1):
            if stop.is_set():
                raise Cancelled(0)
        try:
            yield
        finally:
            self._lock.release()

    def conversation(self, image):
        return self.pipe.conversation(image)

    def ask(self, conversation, question, max_new_tokens, on_text, stop) -> Turn:
        with self._turn(stop):
            return conversation.ask(question, max_new_tokens, on_text=on_text, cancel=stop.is_set)

    def generate(self, image, instruction, constrain, on_progress, stop) -> np.ndarray:
        ids, need = self.facts.image_token_ids, self.facts.image_tokens
        counts = [0, 0]  # image tokens, other tokens

        def on_token(token: int) -> None:
            counts[token not in ids] += 1
            on_progress(counts[0], counts[1], need)

        with self._turn(stop):
            tokens = self.pipe.image_tokens(image, instruction, constrain_image_tokens=constrain, on_token=on_token,
                                            cancel=stop.is_set)
            return self.pipe.decode_image(tokens)  # a UserError saying what came out unless exactly 1024 image tokens
