"""A conversation about one image: the session every front-end streams through (CLI, app, server).

Each turn the whole conversation is rendered again as the template renders it (reference/healthgpt.md section 4.2:
the image in the first user turn only, each earlier answer as the text the user saw, closed by the separator) and
tokenized again, as the reference does. The KV cache is kept between turns: the rows whose ids equal the start of
the new rendering are reused and only the rest is prefilled. A generated answer does not always re-tokenize to the
ids that were generated, so the reused prefix may end inside the last answer; what follows is prefilled again, and
the turn stays identical to the reference's.

A conversation starts from the image prefix cache (runtime/core/prefixes.py) when its image was seen before; else
it prefills the prompt up to the end of the image rows on its own and stores those rows there. The first turn is
therefore always two decoder runs (image prefix, then the rest), cached or not, so a conversation computes the
same numbers whether or not another one saw its image first.

Not thread-safe: one conversation per request thread. The Pipeline's graphs are shared; a backend that cannot run
two requests at once gets the turns one after another (Pipeline.serial).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from runtime.contract.healthgpt import IMAGE_TOKEN_INDEX, IMAGE_TOKENS, Task
from runtime.core.backend import Backend
from runtime.core.bundle import Bundle
from runtime.core.clip_input import preprocess
from runtime.core.generate import check_budget, forward, generate
from runtime.core.kvcache import KVCache, check_room
from runtime.core.prefixes import Prefix, PrefixCache, image_digest
from runtime.core.prompt import Template
from runtime.core.sampling import Sampler
from runtime.core.tokenizer import StreamDecoder, Tokenizer


class Pipeline(Protocol):
    """What a conversation uses of the Pipeline that makes it (runtime/core/pipeline.py imports this module)."""

    bundle: Bundle
    backend: Backend
    tokenizer: Tokenizer
    template: Template
    stop_ids: frozenset[int]
    prefixes: PrefixCache
    serial: AbstractContextManager

    def task(self, name: str) -> Any: ...  # TaskGraphs: vision, embed, decoder


class Cancelled(Exception):
    """`cancel()` said stop: the turn ended after `tokens` tokens, unrecorded; the conversation goes on."""

    def __init__(self, tokens: int):
        super().__init__(f"cancelled after {tokens} tokens")
        self.tokens = tokens


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str  # the new tokens decoded as the user sees them (special tokens skipped)
    tokens: tuple[int, ...] = ()  # empty for a turn a request carried as text


def image_rows(pipe: Pipeline, task: Task) -> int:
    return pipe.bundle.spec(task.name, "vision").shape("image_embeds")[1]


def expand(ids: Sequence[int], rows: int) -> list[int]:
    """Prompt ids one per KV row: the image slot (IMAGE_TOKEN_INDEX) as `rows` of it."""
    return [j for i in ids for j in [i] * (rows if i == IMAGE_TOKEN_INDEX else 1)]


def check_turn(pipe: Pipeline, task: Task, has_image: bool, history: Sequence[Turn], question: str) -> list[int]:
    """The prompt ids of the next turn, one per KV row (the image slot as its rows of IMAGE_TOKEN_INDEX), refused
    before any work when the context cannot hold them and what the task must produce."""
    parts = pipe.template.parts(question, has_image, task.name, [(t.question, t.answer) for t in history])
    ids = expand(pipe.tokenizer.prompt_ids(parts), image_rows(pipe, task) if has_image else 0)
    need, what = (IMAGE_TOKENS, f"{IMAGE_TOKENS} image tokens") if task.makes_images else (1, "an answer")
    turn = f" at turn {len(history) + 1} of this conversation (start a new one to go on)" if history else ""
    check_room(len(ids) + need, pipe.bundle.manifest.config.max_context,
               f"{turn}: a {len(ids)}-token prompt and {what}")
    return ids


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Conversation:
    def __init__(self, pipe: Pipeline, task: Task, image: Image.Image | None, history: Sequence[Turn] = ()):
        self.pipe, self.task, self.image = pipe, task, image
        self.id = uuid.uuid4().hex[:12]  # for audit logs
        self.turns: list[Turn] = list(history)
        self.cache: KVCache | None = None  # made by the first turn
        self._cached: list[int] = []  # the ids whose rows the cache holds, in order
        self._key = (pipe.bundle.digest, task.name, image_digest(image)) if image is not None else None

    def check(self, question: str) -> list[int]:
        """The next turn's ids, or the UserError it would raise (before any graph runs)."""
        return check_turn(self.pipe, self.task, self.image is not None, self.turns, question)

    def ask(self, question: str, max_new_tokens: int | None = None, sampler: Sampler | None = None,
            on_token: Callable[[int], None] | None = None, on_text: Callable[[str, int | None], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> Turn:
        """The next turn, streamed: on_token(id) and on_text(new printable text, id) once per token (and on_text
        once more, with id None, for text held back at the end); Cancelled when `cancel()` turns true. The stop
        token is excluded; generation also stops at max_new_tokens (default: the task's) and at the context's end."""
        check_budget(max_new_tokens)
        ids = self.check(question)
        sampler = dataclasses.replace(sampler) if sampler else Sampler()  # a copy: the caller's RNG is not advanced
        stream = StreamDecoder(self.pipe.tokenizer) if on_text else None
        tokens: list[int] = []

        def step(token: int) -> None:
            if cancel is not None and cancel():
                raise Cancelled(len(tokens))
            tokens.append(token)
            if on_token:
                on_token(token)
            if stream is not None and on_text is not None:  # one is made for the other
                on_text(stream.push(token), token)

        graphs = self.pipe.task(self.task.name)
        with self.pipe.serial:
            embeds = self._new_rows(graphs, ids)
            assert self.cache is not None  # _new_rows made it
            budget = min(max_new_tokens or self.task.max_new_tokens, self.cache.capacity - len(ids))
            try:
                generate(graphs.decoder, graphs.embed, self.cache, embeds, budget, sampler, self.pipe.stop_ids, step)
            finally:  # what the cache holds now, a cancelled turn's tokens included (the next turn drops them)
                self._cached = (ids + tokens)[:self.cache.length]
        if stream is not None and on_text is not None and (tail := stream.flush()):
            on_text(tail, None)
        turn = Turn(question, self.pipe.tokenizer.decode(tokens, skip_special_tokens=True), tuple(tokens))
        self.turns.append(turn)
        return turn

    def release(self) -> None:
        """Free the KV cache (a full-size one is up to ~1.6 GB); the turns stay, and the next turn prefills them
        again, starting from the image prefix cache."""
        self.cache, self._cached = None, []

    def _new_rows(self, graphs, ids: list[int]) -> np.ndarray:
        """The embeddings of `ids` past the longest prefix the cache holds (the cache cut there). At least the
        last id is new: its logits start the answer. The image rows are always in the reused prefix (the text
        before them is the template's alone), so what is new is text."""
        if self.cache is None:
            self.cache = KVCache(self.pipe.backend, graphs.decoder.spec)
        if self.image is not None and not self._cached:
            self._image_prefix(graphs, ids)
        keep = min(_common(self._cached, ids), len(ids) - 1)
        self.cache.truncate(keep)
        self._cached = self._cached[:keep]
        return graphs.embed.run({"input_ids": np.array([ids[keep:]], dtype=np.int64)})["inputs_embeds"]

    def _image_prefix(self, graphs, ids: list[int]) -> None:
        """Fill the cache with the prompt up to the end of the image rows: from the prefix cache, or by
        running the vision graph and prefilling them (then kept there for the next conversation on this image)."""
        assert self.cache is not None and self.image is not None and self._key is not None  # see _new_rows
        at = ids.index(IMAGE_TOKEN_INDEX)
        end = at + ids.count(IMAGE_TOKEN_INDEX)
        prefix = self.pipe.prefixes.get(self._key)
        if prefix is None:
            self.cache.reset()  # rows an interrupted first turn left (self._cached is what counts)
            text = graphs.embed.run({"input_ids": np.array([ids[:at]], dtype=np.int64)})["inputs_embeds"]
            image = graphs.vision.run({"pixel_values": preprocess(self.image)})["image_embeds"]
            forward(graphs.decoder, self.cache, np.concatenate([text, image.astype(text.dtype)], axis=1))
            if self.pipe.prefixes.keeps(self.cache.row_bytes(end)):  # no copy when the cache cannot keep it
                self.pipe.prefixes.put(self._key, Prefix(tuple(ids[:end]), self.cache.copy_rows(end)))
            self._cached = ids[:end]
        else:
            self.cache.load_rows(prefix.rows)
            self._cached = list(prefix.ids)
