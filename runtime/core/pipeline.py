"""Pipeline: a bundle opened on a backend, answering questions (com) and generating images (gen).

Each task's graphs are loaded on first use and kept, so switching back and forth costs nothing after the first
switch; tensors both tasks use are held once (see OrtBackend).

Concurrency: one Pipeline may serve several threads at once. What requests share is read-only (the graphs, the
weights, the tokenizer); what one request writes is its own (a KV cache made per request, its sampler). ONNX
Runtime runs one session from several threads at once; a backend that cannot (`concurrent = False`: native
TensorRT, one CUDA stream and shared staging buffers) gets its requests one after another, in arrival order, and
a waiting request simply blocks until the one before it is done.

Every request is a turn of a Conversation (runtime/core/conversation.py): a single question is a one-turn
conversation. Conversations on an image already seen start from the image prefix cache (`prefixes`), shared by
every thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import COM, GEN, IMAGE_TOKEN_INDEX, IMAGE_TOKENS, Task
from runtime.core.backend import Backend, Graph
from runtime.core.bundle import Bundle
from runtime.core.clip_input import preprocess
from runtime.core.conversation import Conversation, Turn, check_turn
from runtime.core.image import load_image
from runtime.core.kvcache import KVCache
from runtime.core.prefixes import PrefixCache
from runtime.core.prompt import Template, vq_indices
from runtime.core.sampling import Sampler
from runtime.core.tokenizer import Tokenizer


@dataclass(frozen=True)
class TaskGraphs:
    vision: Graph
    embed: Graph
    decoder: Graph


class Pipeline:
    def __init__(self, bundle: Bundle, backend: Backend, prefix_cache_mb: float = 1024):
        self.bundle, self.backend = bundle, backend
        m = bundle.manifest
        self.tokenizer = Tokenizer.load(bundle.file(m.tokenizer.file), m.tokenizer.bos_id, m.tokenizer.add_bos)
        t = m.template
        self.template = Template(t.system, t.user, t.assistant, t.sep)
        self.stop_ids = frozenset(m.tokens.eos)
        self._tasks: dict[str, TaskGraphs] = {}
        self._shared: dict[str, Graph] = {}
        self._loading = threading.Lock()
        self.serial: contextlib.AbstractContextManager = (
            contextlib.nullcontext() if getattr(backend, "concurrent", False) else threading.Lock())
        self.prefixes = PrefixCache(prefix_cache_mb)  # ~0.45 GB per image at full size (M3, fp32 KV)

    def task(self, name: str) -> TaskGraphs:
        if name not in self.bundle.tasks:
            raise UserError(f"bundle {self.bundle.root} has no {name!r} task (it has {', '.join(self.bundle.tasks)})")
        with self._loading:
            if name not in self._tasks:
                load = lambda graph: self.backend.load(self.bundle, name, graph)  # noqa: E731
                self._tasks[name] = TaskGraphs(load("vision"), load("embed"), load("decoder"))
        return self._tasks[name]

    def unload(self, name: str) -> None:
        """Drop a task's graphs (their sessions and prepacked weights); the next request loads them again."""
        with self._loading:
            self._tasks.pop(name, None)

    def cache(self, task: str) -> KVCache:
        """A fresh, empty KV cache for one request on `task`'s decoder."""
        return KVCache(self.backend, self.task(task).decoder.spec)

    def providers(self) -> dict[str, list[str]]:
        return {f"{t}.{g}": getattr(graphs, g).providers for t, graphs in self._tasks.items()
                for g in ("vision", "embed", "decoder")}

    def check_request(self, task: Task, has_image: bool, text: str) -> list[int]:
        """The prompt ids (with the -200 image slot), refused before any work when the context cannot hold the
        prompt and what the task must produce (one token; GEN: the 1024 image tokens)."""
        check_turn(self, task, has_image, (), text)
        return self.tokenizer.prompt_ids(self.template.parts(text, has_image, task.name))

    def conversation(self, image, task: Task = COM, history: Sequence[Turn] = ()) -> Conversation:
        """A conversation about `image` (a path, file bytes or a decoded PIL image; None: text only) on `task`'s
        graphs, continuing `history` (earlier turns a stateless request carries as text)."""
        pil = image if image is None or isinstance(image, Image.Image) else load_image(image)
        return Conversation(self, task, pil, history)

    def prompt(self, task: Task, image, text: str) -> np.ndarray:
        """The prompt's embeddings with the image rows spliced in: [1, L, H]."""
        ids = self.check_request(task, image is not None, text)
        graphs = self.task(task.name)
        text_ids = np.array([[i for i in ids if i != IMAGE_TOKEN_INDEX]], dtype=np.int64)
        embeds = graphs.embed.run({"input_ids": text_ids})["inputs_embeds"]
        if image is None:
            return embeds
        pil = image if isinstance(image, Image.Image) else load_image(image)
        image_embeds = graphs.vision.run({"pixel_values": preprocess(pil)})["image_embeds"]
        at = ids.index(IMAGE_TOKEN_INDEX)
        return np.concatenate([embeds[:, :at], image_embeds.astype(embeds.dtype), embeds[:, at:]], axis=1)

    def tokens(self, task: Task, image, text: str, max_new_tokens: int | None = None, sampler: Sampler | None = None,
               on_token: Callable[[int], None] | None = None, cancel: Callable[[], bool] | None = None) -> list[int]:
        """One request's new tokens (the stop token excluded): its own cache, its own sampler state."""
        return list(self.conversation(image, task).ask(text, max_new_tokens, sampler, on_token, cancel=cancel).tokens)

    def ask(self, image, question: str, max_new_tokens: int | None = None,
            on_token: Callable[[int], None] | None = None, sampler: Sampler | None = None) -> str:
        return self.conversation(image).ask(question, max_new_tokens, sampler, on_token).answer

    def image_tokens(self, image, instruction: str, max_new_tokens: int | None = None,
                     constrain_image_tokens: bool = False, on_token: Callable[[int], None] | None = None,
                     sampler: Sampler | None = None, cancel: Callable[[], bool] | None = None) -> list[int]:
        """The raw token stream of a GEN request. Constrained: logits masked to <idx_*>, exactly 1024 steps."""
        if constrain_image_tokens:
            sampler = dataclasses.replace(sampler or Sampler(), allowed=self.bundle.manifest.tokens.image_range)
            max_new_tokens = IMAGE_TOKENS
        return self.tokens(GEN, image, instruction, max_new_tokens, sampler, on_token, cancel)

    def shared(self, name: str) -> Graph:
        """A graph the tasks share (the VQGAN), loaded on first use."""
        with self._loading:
            if name not in self._shared:
                self._shared[name] = self.backend.load(self.bundle, GEN.name, name)
        return self._shared[name]

    def decode_image(self, tokens: list[int]) -> np.ndarray:
        t = self.bundle.manifest.tokens
        indices = vq_indices(tokens, t.idx_0, t.vq_codes, t.image_tokens)
        (vqgan,) = GEN.shared_graphs
        with self.serial:
            return self.shared(vqgan).run({"indices": np.array([indices], dtype=np.int64)})["image"][0]  # [256,256,3]

    def generate_image(self, image, instruction: str, **kw) -> np.ndarray:
        return self.decode_image(self.image_tokens(image, instruction, **kw))
