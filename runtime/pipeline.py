"""Pipeline: a bundle opened on a backend, answering questions (com) and generating images (gen).

Each task's graphs are loaded on first use and kept, so switching back and forth costs nothing after the first
switch; tensors both tasks use are held once (see OrtBackend).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from runtime.backend import Backend, Graph, open_backend
from runtime.bundle import Bundle
from runtime.errors import UserError
from runtime.generate import generate
from runtime.image import load_image, preprocess
from runtime.kvcache import KVCache
from runtime.prompt import IMAGE_TOKEN_INDEX, Template, vq_indices
from runtime.sampling import Sampler
from runtime.tokenizer import Tokenizer


@dataclass
class TaskGraphs:
    vision: Graph
    embed: Graph
    decoder: Graph
    cache: KVCache


class Pipeline:
    def __init__(self, bundle: Bundle, backend: Backend):
        self.bundle, self.backend = bundle, backend
        tok = bundle.manifest["tokenizer"]
        self.tokenizer = Tokenizer.load(bundle.root / tok["file"], tok["bos_id"], tok["add_bos"])
        t = bundle.manifest["template"]
        self.template = Template(t["system"], t["user"], t["assistant"], t["sep"])
        self.stop_ids = set(bundle.tokens["eos"])
        self._tasks: dict[str, TaskGraphs] = {}
        self._vqgan: Graph | None = None

    @classmethod
    def open(cls, bundle: str | Path, backend: str = "ort", providers: str = "auto", prepack: bool = True,
             accuracy_level: int | None = None) -> Pipeline:
        """prepack=False: one copy of the weights for every task's sessions on ONNX Runtime's CPU provider, at some
        decode speed (see OrtBackend); worth it when both tasks stay open in one process. accuracy_level: overrides
        a quantized bundle's MatMulNBits compute type (ONNX Runtime)."""
        return cls(Bundle.open(bundle), open_backend(backend, providers, prepack, accuracy_level))

    def task(self, name: str) -> TaskGraphs:
        if name not in self.bundle.tasks:
            raise UserError(f"bundle {self.bundle.root} has no {name!r} task (it has {', '.join(self.bundle.tasks)})")
        if name not in self._tasks:
            load = lambda graph: self.backend.load(self.bundle, name, graph)  # noqa: E731
            decoder = load("decoder")
            self._tasks[name] = TaskGraphs(load("vision"), load("embed"), decoder, KVCache(self.backend, decoder.spec))
        return self._tasks[name]

    def providers(self) -> dict[str, list[str]]:
        return {f"{t}.{g}": getattr(graphs, g).providers for t, graphs in self._tasks.items()
                for g in ("vision", "embed", "decoder")}

    def prompt(self, task: str, image, question: str) -> tuple[list[int], np.ndarray]:
        """Prompt ids (with the -200 image slot) and their embeddings with the image rows spliced in: [1, L, H]."""
        graphs = self.task(task)
        ids = self.tokenizer.prompt_ids(self.template.render(question, image is not None, task))
        text = [i for i in ids if i != IMAGE_TOKEN_INDEX]
        graphs.cache.reset()  # a new request starts from an empty context
        graphs.cache.check_room(len(ids) - 1 + (graphs.vision.spec.shape("image_embeds")[1] if image else 0))
        embeds = graphs.embed.run({"input_ids": np.array([text], dtype=np.int64)})["inputs_embeds"]
        if image is None:
            return ids, embeds
        pil = image if isinstance(image, Image.Image) else load_image(image)
        image_embeds = graphs.vision.run({"pixel_values": preprocess(pil)})["image_embeds"]
        at = ids.index(IMAGE_TOKEN_INDEX)
        return ids, np.concatenate([embeds[:, :at], image_embeds.astype(embeds.dtype), embeds[:, at:]], axis=1)

    def _generate(self, task, image, text, max_new_tokens, sampler, on_token) -> list[int]:
        graphs = self.task(task)
        ids, embeds = self.prompt(task, image, text)
        budget = min(max_new_tokens, graphs.cache.capacity - embeds.shape[1])
        return generate(graphs.decoder, graphs.embed, graphs.cache, embeds, budget, sampler or Sampler(),
                        self.stop_ids, on_token)

    def ask(self, image, question: str, max_new_tokens: int = 1024, on_token: Callable[[int], None] | None = None,
            sampler: Sampler | None = None) -> str:
        tokens = self._generate("com", image, question, max_new_tokens, sampler, on_token)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def image_tokens(self, image, instruction: str, max_new_tokens: int = 1100, constrain_image_tokens: bool = False,
                     on_token: Callable[[int], None] | None = None, sampler: Sampler | None = None) -> list[int]:
        """The raw token stream of a GEN request. Constrained: logits masked to <idx_*>, exactly 1024 steps."""
        t = self.bundle.tokens
        if constrain_image_tokens:
            sampler = sampler or Sampler()
            sampler.allowed = (t["idx_0"], t["idx_0"] + t["vq_codes"])
            max_new_tokens = t["image_tokens"]
        return self._generate("gen", image, instruction, max_new_tokens, sampler, on_token)

    def decode_image(self, tokens: list[int]) -> np.ndarray:
        t = self.bundle.tokens
        indices = vq_indices(tokens, t["idx_0"], t["vq_codes"], t["image_tokens"])
        if self._vqgan is None:
            self._vqgan = self.backend.load(self.bundle, "gen", "vqgan")
        return self._vqgan.run({"indices": np.array([indices], dtype=np.int64)})["image"][0]  # [256, 256, 3] uint8

    def generate_image(self, image, instruction: str, **kw) -> np.ndarray:
        return self.decode_image(self.image_tokens(image, instruction, **kw))
